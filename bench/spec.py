"""The run spec: everything that defines a sweep of (method, seed) training runs.

A spec is resolved from three layers, later ones winning: built-in defaults (some of them the
task suite's own, e.g. its number of epochs), a YAML or TOML file (``--config``), and
command-line flags. The resolved spec is validated up front and saved with every run.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

import methods
import tasks
from bench.credentials import masked
from bench.step import GRAD_LEVELS
from methods.base import resolve_hparams

OPTIMIZERS = ("adam", "adamw", "sgd", "rmsprop")
SCHEDULERS = ("none", "cosine", "step")
MAX_SEED = 2**32 - 1
"""The largest seed: NumPy's ``np.random.seed`` takes seeds from 0 to ``2**32 - 1``."""
MIN_BATCH_SIZE = 2
"""The smallest training batch: every backbone normalises with BatchNorm, which cannot train on one item."""

RUN_DEFAULTS: dict[str, Any] = {
    "methods": "all",
    "seeds": [0],
    "epochs": 5,
    "batch_size": 32,
    "lr": 1e-3,
    "optimizer": "adam",
    "weight_decay": 0.0,
    "scheduler": "none",
    "lr_step_size": 100,
    "lr_gamma": 0.5,
    "backbone": "resnet18",
    "device": None,
    "results": "results",
    "tracking_uri": None,
    "save_checkpoint": True,
    "grad_level": "parameters",
    "amp": False,
}
"""Defaults for every key except ``task``; a suite may override some (``TaskSuite.run_defaults``)."""


@dataclass
class RunSpec:
    """A validated sweep: every method in ``methods`` trained once per seed in ``seeds``."""

    task: str
    methods: list[str]
    seeds: list[int]
    epochs: int
    batch_size: int
    lr: float
    optimizer: str
    weight_decay: float
    scheduler: str
    backbone: str
    device: str
    results: Path
    tracking_uri: str
    save_checkpoint: bool
    task_options: dict[str, Any] = field(default_factory=dict)
    hparams: dict[str, dict[str, Any]] = field(default_factory=dict)
    lr_step_size: int = 100
    """``step`` scheduler: epochs between two decays (LibMTL's default)."""
    lr_gamma: float = 0.5
    """``step`` scheduler: factor applied to the learning rate at each decay (LibMTL's default)."""
    grad_level: str = "parameters"
    """Where gradient methods take per-task gradients: ``parameters`` or ``features`` (:mod:`bench.step`)."""
    amp: bool = False
    """bf16 autocast of the forward pass (CUDA only); Gramian, solvers and weights stay float32."""

    def to_dict(self) -> dict[str, Any]:
        """Plain values (for YAML, MLflow params, study attributes and the summary), with a
        password of the tracking URI hidden (:func:`~bench.credentials.masked`)."""
        out = dataclasses.asdict(self)
        out["results"] = str(self.results)
        out["tracking_uri"] = masked(self.tracking_uri)
        return out

    def method_hparams(self, method: str) -> dict[str, Any]:
        """The hyperparameters given for ``method`` (validated; defaults not filled in)."""
        return dict(self.hparams.get(method, {}))


def load_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a YAML (.yaml/.yml) or TOML (.toml) run spec; keys may use '-' or '_'.

    A file that does not parse, whose top level is not a mapping, or whose keys are not names
    or name one option twice (``batch-size`` and ``batch_size``) is an error naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    if path.suffix not in (".toml", ".yaml", ".yml"):
        raise ValueError(f"config file {path}: expected a .yaml, .yml or .toml file")
    text = path.read_text()
    try:
        data = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
    except tomllib.TOMLDecodeError as error:
        raise ValueError(f"config file {path} is not valid TOML: {error}") from None
    except yaml.YAMLError as error:
        raise ValueError(f"config file {path} is not valid YAML: {_yaml_problem(error)}") from None
    if data is None:  # an empty YAML file
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {path}: expected a mapping of run options at the top")
    options: dict[str, Any] = {}
    spelled: dict[str, str] = {}
    for key, value in data.items():
        if not isinstance(key, str):
            raise ValueError(
                f"config file {path}: {key!r} is not an option name; run options are names such as batch_size"
            )
        name = key.replace("-", "_")
        if name in spelled:
            raise ValueError(f"config file {path} gives {name} twice, as {spelled[name]} and {key}: keep one")
        spelled[name], options[name] = key, value
    return options


def _yaml_problem(error: yaml.YAMLError) -> str:
    """Where and what PyYAML's ``error`` is, on one line."""
    mark = getattr(error, "problem_mark", None)
    if mark is None:
        return " ".join(str(error).split())
    return f"line {mark.line + 1}, column {mark.column + 1}: {error.problem}"  # type: ignore[attr-defined]


def parse_assignments(items: list[str], what: str) -> dict[str, str]:
    """``["a.b=1", ...]`` -> ``{"a.b": "1"}``, with an error naming a malformed item."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{what} {item!r}: expected KEY=VALUE")
        out[key.strip()] = value.strip()
    return out


def option_value(text: str) -> Any:
    """A task option from the command line: int, float, true/false, or the string itself."""
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    return text


def hparams_from_flags(items: list[str]) -> dict[str, dict[str, str]]:
    """``--hp cagrad.calpha=0.4`` items -> ``{"cagrad": {"calpha": "0.4"}}``."""
    out: dict[str, dict[str, str]] = {}
    for key, value in parse_assignments(items, "--hp").items():
        method, dot, name = key.rpartition(".")
        if not dot or not method:
            raise ValueError(f"--hp {key}={value}: expected METHOD.NAME=VALUE, e.g. cagrad.calpha=0.4")
        out.setdefault(method, {})[name] = value
    return out


def _merge_nested(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    merged = {k: dict(v) for k, v in base.items()}
    for key, values in override.items():
        merged.setdefault(key, {}).update(values)
    return merged


def _as_list(value: Any) -> list[Any]:
    """A comma-separated string (items stripped, empty ones dropped), a list or tuple, or one value, as a list."""
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


def _whole(value: Any) -> int | None:
    """``value`` as an ``int`` when it is one (a bool is not) or a string of digits; else ``None``.

    A float is not a whole number here, even ``2.0``: ``seeds: [0, 1.7]`` must not become seed 1.
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and re.fullmatch(r"[+-]?\d+", value.strip()):
        return int(value)
    return None


def _positive_int(value: Any, flag: str) -> int:
    """``value`` as an integer >= 1 (strings of digits accepted), or an error naming ``flag``."""
    whole = _whole(value)
    if whole is None or whole < 1:
        raise ValueError(f"{flag}: expected a positive integer, got {value!r}")
    return whole


def _finite_number(value: Any, flag: str) -> float:
    """``value`` as a finite float (a number or a numeric string; a bool is not), or an error naming ``flag``."""
    try:
        number = math.nan if isinstance(value, bool) else float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number):
        raise ValueError(f"{flag}: expected a finite number, got {value!r}")
    return number


def _boolean(value: Any, key: str) -> bool:
    """``value`` when it is ``True`` or ``False``; text such as ``"no"`` is an error, never read as true."""
    if not isinstance(value, bool):
        raise ValueError(f"{key}: expected true or false (unquoted in YAML and TOML), got {value!r}")
    return value


def _text(value: Any, flag: str) -> str:
    """``value`` when it is a string, or an error naming ``flag``."""
    if not isinstance(value, str):
        raise ValueError(f"{flag}: expected text, got {value!r}")
    return value


def _optional_text(value: Any, flag: str) -> str | None:
    """``value`` when it is a string or ``None`` (not given), or an error naming ``flag``."""
    return None if value is None else _text(value, flag)


def resolve_seeds(value: Any) -> list[int]:
    """``--seeds`` (a comma-separated string or a list) as distinct whole numbers from 0 to :data:`MAX_SEED`."""
    seeds: list[int] = []
    for item in _as_list(value):
        seed = _whole(item)
        if seed is None:
            raise ValueError(f"--seeds: {item!r} is not a whole number; give seeds such as 0,1,2")
        if not 0 <= seed <= MAX_SEED:
            raise ValueError(f"--seeds: {seed} is out of range; a seed is a whole number from 0 to {MAX_SEED}")
        if seed in seeds:
            raise ValueError(f"--seeds: {seed} is given twice; give distinct seeds")
        seeds.append(seed)
    if not seeds:
        raise ValueError("--seeds is empty; give a comma-separated list, e.g. 0,1,2")
    return seeds


def resolve_methods(value: Any) -> list[str]:
    """``all`` -> every native method, ``libmtl:all`` -> every LibMTL one; otherwise a validated
    list (``libmtl:<name>`` allowed), in order, without repeats."""
    names = [str(name).strip() for name in _as_list(value)]
    every = {
        "all": methods.available(),
        "libmtl:all": [n for n in methods.available(include_libmtl=True) if n.startswith("libmtl:")],
    }
    resolved: list[str] = []
    for name in names:
        expanded = every.get(name, [name])
        for method in expanded:
            methods.method_class(method)  # raises with the list of valid names
            if method not in resolved:
                resolved.append(method)
    if not resolved:
        raise ValueError("--methods is empty; give 'all' or a comma-separated list")
    return resolved


def resolve_device(device: str | None) -> torch.device:
    """``device`` (``None``: cuda when available, else cpu) as a device this machine has, or an error."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        parsed_device = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device!r}: expected cpu, cuda or cuda:N") from None
    if parsed_device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    return parsed_device


def check_backbone(task: str, backbone: str) -> str:
    """``backbone`` if task suite ``task`` builds its model on it, else an error listing those it does."""
    valid = tasks.suite_class(task).backbones
    if backbone not in valid:
        raise ValueError(f"--backbone {backbone!r}: the {task} suite builds on {', '.join(valid)}")
    return backbone


def check_grad_level(grad_level: str, chosen_methods: list[str]) -> str:
    """``grad_level`` if it is valid for every method in ``chosen_methods``, else an error saying what to change.

    LibMTL's own classes (``libmtl:<name>``) take parameter-level gradients only.
    """
    if grad_level not in GRAD_LEVELS:
        raise ValueError(f"--grad-level {grad_level!r}: valid: {', '.join(GRAD_LEVELS)}")
    libmtl_methods = [m for m in chosen_methods if m.startswith(methods.registry.LIBMTL_PREFIX)]
    if grad_level == "features" and libmtl_methods:
        raise ValueError(
            f"--grad-level features is for native methods; LibMTL's own classes ({', '.join(libmtl_methods)}) "
            "take parameter-level gradients only: leave them out of --methods or use --grad-level parameters"
        )
    return grad_level


def check_batch_size(batch_size: int) -> int:
    """``batch_size``, or an error when BatchNorm cannot train on it (below :data:`MIN_BATCH_SIZE`)."""
    if batch_size < MIN_BATCH_SIZE:
        raise ValueError(
            f"--batch-size {batch_size}: every backbone normalises with BatchNorm, which cannot train on a batch "
            f"of one; use --batch-size {MIN_BATCH_SIZE} or more"
        )
    return batch_size


def resolve_spec(
    config: Mapping[str, Any], flags: Mapping[str, Any]
) -> RunSpec:
    """Merge defaults < config file < flags, validate, and return the spec.

    ``flags`` holds only the options given on the command line. ``task_options`` and
    ``hparams`` are merged key by key.
    """
    layered: dict[str, Any] = {}
    for layer in (config, flags):
        for key, value in layer.items():
            if key in ("task_options", "hparams") and not isinstance(value, Mapping):
                raise ValueError(f"{key} must be a mapping, got {value!r}")
            if key == "hparams":
                if not all(isinstance(v, Mapping) for v in value.values()):
                    raise ValueError("hparams must map each method to a mapping of name: value")
                layered[key] = _merge_nested(layered.get(key, {}), value)
            elif key == "task_options":
                odd = [name for name in value if not isinstance(name, str)]
                if odd:
                    raise ValueError(f"task_options: {odd[0]!r} is not an option name; see python -m bench list")
                layered[key] = {**layered.get(key, {}), **value}
            else:
                layered[key] = value
    unknown = sorted(set(layered) - set(RUN_DEFAULTS) - {"task", "task_options", "hparams"})
    if unknown:
        raise ValueError(
            f"unknown run option(s) {', '.join(unknown)}; valid: "
            + ", ".join(sorted([*RUN_DEFAULTS, "task", "task_options", "hparams"]))
        )
    if "task" not in layered:
        raise ValueError(f"no task given: use --task NAME; valid: {', '.join(tasks.available())}")
    task = _text(layered["task"], "--task")
    suite_defaults = tasks.run_defaults(task)
    values = {**RUN_DEFAULTS, **suite_defaults, **layered}

    chosen_methods = resolve_methods(values["methods"])
    seeds = resolve_seeds(values["seeds"])
    epochs = _positive_int(values["epochs"], "--epochs")
    batch_size = check_batch_size(_positive_int(values["batch_size"], "--batch-size"))
    lr = _finite_number(values["lr"], "--lr")
    weight_decay = _finite_number(values["weight_decay"], "--weight-decay")
    if not lr > 0:
        raise ValueError(f"--lr: expected a positive number, got {lr}")
    if weight_decay < 0:
        raise ValueError(f"--weight-decay: expected a non-negative number, got {weight_decay}")
    if values["optimizer"] not in OPTIMIZERS:
        raise ValueError(f"--optimizer {values['optimizer']!r}: valid: {', '.join(OPTIMIZERS)}")
    if values["scheduler"] not in SCHEDULERS:
        raise ValueError(f"--scheduler {values['scheduler']!r}: valid: {', '.join(SCHEDULERS)}")
    lr_step_size = _positive_int(values["lr_step_size"], "--lr-step-size")
    lr_gamma = _finite_number(values["lr_gamma"], "--lr-gamma")
    if not 0 < lr_gamma <= 1:
        raise ValueError(f"--lr-gamma: expected a number in (0, 1], got {lr_gamma}")

    backbone = check_backbone(task, _text(values["backbone"], "--backbone"))
    parsed_device = resolve_device(_optional_text(values["device"], "--device"))
    grad_level = check_grad_level(values["grad_level"], chosen_methods)
    amp = _boolean(values["amp"], "amp")
    save_checkpoint = _boolean(values["save_checkpoint"], "save_checkpoint")
    if amp and parsed_device.type != "cuda":
        raise ValueError(f"--amp needs a CUDA device (bf16 autocast); this run is on {parsed_device}")

    hparams = {m: dict(v) for m, v in (values.get("hparams") or {}).items()}
    for method, given in hparams.items():
        if method not in chosen_methods:
            raise ValueError(
                f"hyperparameters given for {method!r}, which is not among the methods run "
                f"({', '.join(chosen_methods)})"
            )
        declared = methods.hparams(method)
        hparams[method] = {
            k: v for k, v in resolve_hparams(method, declared, given).items() if k in given
        }

    results = Path(_text(values["results"], "--results"))
    tracking_uri = (
        _optional_text(values["tracking_uri"], "--tracking-uri")
        or os.environ.get("MLFLOW_TRACKING_URI")
        or f"sqlite:///{(results / 'mlflow.db').resolve()}"
    )
    return RunSpec(
        task=task,
        methods=chosen_methods,
        seeds=seeds,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        optimizer=values["optimizer"],
        weight_decay=weight_decay,
        scheduler=values["scheduler"],
        backbone=backbone,
        device=str(parsed_device),
        results=results,
        tracking_uri=str(tracking_uri),
        save_checkpoint=save_checkpoint,
        task_options=dict(values.get("task_options") or {}),
        hparams=hparams,
        lr_step_size=lr_step_size,
        lr_gamma=lr_gamma,
        grad_level=grad_level,
        amp=amp,
    )
