"""The training engine: one (method, seed) run from initialisation to its test metrics.

Every method gets the same model, data order, optimizer and schedule for a given seed. Each
epoch: train, report the epoch's per-task loss and accuracy to the method, evaluate on the
validation split, keep the best-validation state (the suite's primary metric). At the end the
best state is evaluated once on the test split; the test split never selects anything.
"""

from __future__ import annotations

import copy
import math
import random
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import yaml
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

import methods
from bench.spec import RunSpec
from bench.timing import STEP_PHASES, PhaseTimer
from bench.tracking import Tracker, environment_tags
from methods.base import EpochStats
from tasks.base import TaskSuite


@dataclass
class RunResult:
    """The outcome of one (method, seed) run, as the summary table and files show it."""

    method: str
    seed: int
    status: str
    run_id: str | None = None
    reason: str | None = None
    best_epoch: int | None = None
    best_val: float | None = None
    test: dict[str, float] = field(default_factory=dict)
    ms_per_step: dict[str, float] = field(default_factory=dict)
    step_ms: float | None = None
    peak_memory_mb: float | None = None
    peak_memory_increase_mb: float | None = None
    train_seconds: float | None = None
    crashed: bool = False
    """FAILED by an error other than a non-finite loss (a bug or bad data, not a divergence)."""


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch; make CPU kernels deterministic."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def make_optimizer(spec: RunSpec, params: Iterable[Tensor]) -> torch.optim.Optimizer:
    """The spec's optimizer over ``params`` (model and method parameters alike)."""
    params = list(params)
    if spec.optimizer == "adam":
        return torch.optim.Adam(params, lr=spec.lr, weight_decay=spec.weight_decay)
    if spec.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)
    if spec.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=spec.lr, weight_decay=spec.weight_decay)
    return torch.optim.SGD(params, lr=spec.lr, momentum=0.9, weight_decay=spec.weight_decay)


def method_hparams(spec: RunSpec, suite: TaskSuite, method: str, seed: int) -> dict[str, Any]:
    """The spec's hyperparameters for ``method``, plus what the harness supplies.

    The harness fills in, unless given: ``seed`` (methods with a random element get the run's
    seed) and ``prevalence`` (DeepChest's ``init=prevalence`` reads the training split's rates).
    """
    given = spec.method_hparams(method)
    declared = {h.name for h in methods.hparams(method)}
    if "seed" in declared:
        given.setdefault("seed", seed)
    prevalence = suite.prevalence()
    if "prevalence" in declared and prevalence is not None:
        given.setdefault("prevalence", tuple(prevalence))
    return given


def _concat(chunks: list[Any]) -> Any:
    """Concatenate per-batch model outputs or targets (tensors, lists or dicts of tensors)."""
    first = chunks[0]
    if isinstance(first, Tensor):
        return torch.cat(chunks)
    if isinstance(first, dict):
        return {k: _concat([c[k] for c in chunks]) for k in first}
    return [_concat([c[i] for c in chunks]) for i in range(len(first))]


def _to(value: Any, device: torch.device) -> Any:
    if isinstance(value, Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to(v, device) for v in value)
    return value


@torch.no_grad()
def predict(model: nn.Module, loader: DataLoader, device: torch.device) -> tuple[Any, Any]:
    """Model outputs and targets over a whole split, on the CPU."""
    model.eval()
    outputs, targets = [], []
    for x, y in loader:
        outputs.append(_to(model(_to(x, device)), torch.device("cpu")))
        targets.append(y)
    model.train()
    return _concat(outputs), _concat(targets)


def _loaders(spec: RunSpec, suite: TaskSuite, seed: int) -> dict[str, DataLoader]:
    splits: dict[str, Dataset] = suite.splits()
    generator = torch.Generator().manual_seed(seed)
    train_size = len(splits["train"])  # type: ignore[arg-type]
    return {
        "train": DataLoader(
            splits["train"],
            batch_size=spec.batch_size,
            shuffle=True,
            generator=generator,
            # BatchNorm cannot train on a batch of one; a short last batch is dropped.
            drop_last=train_size > spec.batch_size,
        ),
        "val": DataLoader(splits["val"], batch_size=spec.batch_size * 2),
        "test": DataLoader(splits["test"], batch_size=spec.batch_size * 2),
    }


def _prefixed(prefix: str, values: dict[str, float]) -> dict[str, float]:
    return {f"{prefix}/{k}": v for k, v in values.items()}


def _per_task(prefix: str, names: tuple[str, ...], values: Tensor) -> dict[str, float]:
    return {f"{prefix}/{name}": float(v) for name, v in zip(names, values.tolist())}


def _prediction_rows(suite: TaskSuite, outputs: Any, targets: Any) -> list[dict[str, Any]] | None:
    """Per-item test predictions for binary multi-label suites (probabilities and labels)."""
    if not isinstance(outputs, Tensor) or outputs.dim() != 2:
        return None
    probabilities = torch.sigmoid(outputs).numpy()
    labels = targets.numpy()
    rows = []
    for index, item in enumerate(suite.item_ids("test")):
        row: dict[str, Any] = {"id": item}
        for t, name in enumerate(suite.task_names):
            row[f"prob/{name}"] = float(probabilities[index, t])
            row[f"label/{name}"] = int(labels[index, t])
        rows.append(row)
    return rows


def train_run(spec: RunSpec, suite: TaskSuite, method_name: str, seed: int, tracker: Tracker) -> RunResult:
    """Train ``method_name`` with ``seed`` on ``suite``; log everything; return the result.

    A non-finite loss ends the run as FAILED (the reason logged) and returns; Ctrl-C ends it
    as KILLED and re-raises; any other error ends it as FAILED and re-raises.
    """
    seed_everything(seed)
    device = torch.device(spec.device)
    model = suite.build_model(spec.backbone).to(device)
    hparams = method_hparams(spec, suite, method_name, seed)
    method = methods.create(method_name, suite.n_tasks, **hparams).to(device)
    optimizer = make_optimizer(spec, [*model.parameters(), *method.parameters()])
    scheduler = (
        torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=spec.epochs)
        if spec.scheduler == "cosine"
        else None
    )
    loaders = _loaders(spec, suite, seed)
    shared = model.shared_parameters()
    names = suite.task_names

    params = {
        **{k: v for k, v in spec.to_dict().items() if k not in ("methods", "seeds", "hparams", "task_options")},
        "method": method_name,
        "seed": seed,
        "hp": method.hparam_values,
        "task_options": suite.config(),
        "primary_metric": suite.primary_metric,
    }
    run_id = tracker.start_run(f"{method_name}-seed{seed}", params, environment_tags(spec.device))
    result = RunResult(method=method_name, seed=seed, status="RUNNING", run_id=run_id)
    try:
        tracker.log_data_identity(suite.identity())
        with tempfile.TemporaryDirectory() as scratch:
            config_path = Path(scratch) / "config.yaml"
            config_path.write_text(yaml.safe_dump(_run_config(spec, suite, method, seed), sort_keys=False))
            tracker.log_artifact(config_path)
        _fit(spec, suite, model, method, optimizer, scheduler, loaders, shared, names, tracker, result)
        _test(spec, suite, model, loaders["test"], device, tracker, result)
    except methods.NonFiniteLossError as error:
        result.status, result.reason = "FAILED", str(error)
        tracker.end_run("FAILED", str(error))
        return result
    except KeyboardInterrupt:
        result.status, result.reason = "KILLED", "interrupted (Ctrl-C)"
        tracker.end_run("KILLED", result.reason)
        raise
    except BaseException as error:
        result.status, result.reason = "FAILED", f"{type(error).__name__}: {error}"
        tracker.end_run("FAILED", result.reason)
        raise
    result.status = "FINISHED"
    tracker.end_run("FINISHED")
    return result


def _run_config(spec: RunSpec, suite: TaskSuite, method: methods.Method, seed: int) -> dict[str, Any]:
    """This run alone as a run spec that ``bench run --config`` accepts, every value resolved.

    Where results go (``results``, ``tracking_uri``) is left out: it says where, not what.
    """
    hparams = {k: list(v) if isinstance(v, tuple) else v for k, v in method.hparam_values.items() if v is not None}
    where = ("results", "tracking_uri")
    return {
        **{k: v for k, v in spec.to_dict().items() if k not in where},
        "methods": [method.name],
        "seeds": [seed],
        "task_options": suite.config(),
        "hparams": {method.name: hparams},
    }


def _fit(
    spec: RunSpec,
    suite: TaskSuite,
    model: nn.Module,
    method: methods.Method,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    loaders: dict[str, DataLoader],
    shared: list[Tensor],
    names: tuple[str, ...],
    tracker: Tracker,
    result: RunResult,
) -> None:
    device = torch.device(spec.device)
    timer = PhaseTimer(device)
    maximize = suite.primary_direction == "maximize"
    best_value = -math.inf if maximize else math.inf
    best_state: dict[str, Any] | None = None
    totals: dict[str, float] = {}
    total_steps = 0
    peak = peak_increase = 0.0
    started = time.perf_counter()
    epochs = tqdm(range(spec.epochs), desc=f"{result.method} seed {result.seed}", unit="epoch", disable=None)
    for epoch in epochs:
        loss_sum = torch.zeros(suite.n_tasks, device=device)
        weight_sum = torch.zeros(suite.n_tasks, device=device)
        correct = torch.zeros(suite.n_tasks, device=device)
        seen = 0
        steps = 0
        batches = iter(tqdm(loaders["train"], desc=f"epoch {epoch + 1}", leave=False, unit="step", disable=None))
        while True:
            with timer("data"):
                batch = next(batches, None)
                if batch is None:
                    break
                x, y = _to(batch[0], device), _to(batch[1], device)
            with timer("forward"):
                outputs = model(x)
                losses = suite.losses(outputs, y)
            weights = method.backward(losses, shared, timer=timer)
            with timer("optimizer"):
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                method.zero_grad(set_to_none=True)
            timer.step()
            steps += 1
            loss_sum += losses.detach()
            weight_sum += weights
            correct += suite.correct(outputs.detach() if isinstance(outputs, Tensor) else outputs, y)
            seen += x.shape[0]
        timing = timer.epoch()
        train_loss = (loss_sum / max(steps, 1)).cpu()
        train_accuracy = (correct / max(seen, 1)).cpu()
        method.epoch_end(EpochStats(train_loss=train_loss, train_accuracy=train_accuracy))
        if scheduler is not None:
            scheduler.step()

        val_outputs, val_targets = predict(model, loaders["val"], device)
        val_metrics = suite.evaluate(val_outputs, val_targets)
        value = val_metrics[suite.primary_metric]
        improved = value > best_value if maximize else value < best_value
        if improved or best_state is None:
            best_value, result.best_epoch = value, epoch
            best_state = {
                "model": copy.deepcopy(model.state_dict()),
                "method": copy.deepcopy(method.state_dict()),
                "epoch": epoch,
            }
        metrics = {
            **_per_task("train/loss", names, train_loss),
            **_per_task("train/accuracy", names, train_accuracy),
            **_per_task("train/weight", names, (weight_sum / max(steps, 1)).cpu()),
            **_prefixed("val", val_metrics),
            **{f"time/{phase}_ms": ms for phase, ms in timing.ms_per_step.items()},
            "time/step_ms": timing.step_ms,
            "memory/peak_mb": timing.peak_memory_mb,
            "memory/peak_increase_mb": timing.peak_memory_increase_mb,
        }
        tracker.log_metrics(metrics, step=epoch)
        epochs.set_postfix({suite.primary_metric: f"{value:.4f}", "ms/step": f"{timing.step_ms:.0f}"})
        for phase, ms in timing.ms_per_step.items():
            totals[phase] = totals.get(phase, 0.0) + ms * timing.steps
        total_steps += timing.steps
        peak = max(peak, timing.peak_memory_mb)
        peak_increase = max(peak_increase, timing.peak_memory_increase_mb)

    result.train_seconds = time.perf_counter() - started
    result.best_val = best_value
    result.ms_per_step = {phase: total / max(total_steps, 1) for phase, total in totals.items()}
    result.step_ms = sum(result.ms_per_step.get(p, 0.0) for p in STEP_PHASES)
    result.peak_memory_mb, result.peak_memory_increase_mb = peak, peak_increase
    assert best_state is not None
    model.load_state_dict(best_state["model"])
    method.load_state_dict(best_state["method"])
    summary = {
        "summary/train_seconds": result.train_seconds,
        "summary/step_ms": result.step_ms,
        "summary/peak_memory_mb": peak,
        "summary/peak_memory_increase_mb": peak_increase,
        "summary/best_epoch": float(result.best_epoch or 0),
        f"summary/best_val_{suite.primary_metric}": best_value,
        **{f"summary/{phase}_ms": ms for phase, ms in result.ms_per_step.items()},
    }
    tracker.log_metrics(summary)
    if spec.save_checkpoint:
        with tempfile.TemporaryDirectory() as scratch:
            path = Path(scratch) / "best_checkpoint.pt"
            torch.save(best_state, path)
            tracker.log_artifact(path)


def _test(
    spec: RunSpec,
    suite: TaskSuite,
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    tracker: Tracker,
    result: RunResult,
) -> None:
    outputs, targets = predict(model, loader, device)
    result.test = suite.evaluate(outputs, targets)
    tracker.log_metrics(_prefixed("test", result.test))
    rows = _prediction_rows(suite, outputs, targets)
    if rows is not None:
        with tempfile.TemporaryDirectory() as scratch:
            path = Path(scratch) / "test_predictions.csv"
            pd.DataFrame(rows).to_csv(path, index=False)
            tracker.log_artifact(path)
