"""Crash-safe runs: a deterministic key per run and a resumable checkpoint after every epoch.

A run is identified by its *run key*: the task, method and seed, and the SHA-256 of its
resolved configuration (every option that changes what is trained, as ``bench run --config``
reads it; where results go is not part of it) plus, for tuning trials, the study and trial.
The same command run again computes the same key, so it finds

* the run's MLflow run (tagged ``run_key``): a finished run is reused, not trained again;
* the run's epoch checkpoint, ``<results>/checkpoints/<run key>.pt``: an unfinished run
  continues from its last finished epoch, in the same MLflow run.

The checkpoint holds everything the next epoch depends on: model, method (including its
random state, e.g. PCGrad's task order), optimizer and scheduler state, the random states of
Python, NumPy, torch (CPU and CUDA) and of the training data loader's generator, and the
progress so far (best validation value and state, accumulated timing). It is written to a
temporary file in the same directory and moved into place with ``os.replace``, which is
atomic on POSIX and Windows: a crash while writing leaves the previous checkpoint intact, and
the temporary file it leaves is deleted when the run starts or resumes.
Resuming on a CPU therefore reproduces an uninterrupted run exactly.

The checkpoint holds only tensors, numbers, strings, ``None`` and lists, tuples and dicts of
them (the random states of Python and NumPy are converted to lists), and it is read with
``torch.load(..., weights_only=True)``, which rebuilds nothing else: a crafted file in the
results folder cannot run code when the command is run again. A checkpoint that does not
load that way, or that belongs to another run or format, raises :class:`CheckpointError`.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.signals import interrupts_held

CHECKPOINT_FORMAT = 2
"""Version of the checkpoint layout; a checkpoint of another version is refused.

Format 2: read with ``weights_only=True`` (random states as lists), epochs numbered from 1.
"""


TEMPORARY_SUFFIX = ".tmp"
"""The end of the name of a checkpoint write's temporary file (``.<run key>.pt.XXXX.tmp``)."""


class CheckpointError(Exception):
    """An epoch checkpoint that cannot be used: unreadable, unsafe, or not this run's."""


def run_key(config: Mapping[str, Any], identity: Mapping[str, Any] | None = None) -> str:
    """``<task>_<method>_seed<seed>_<hash>``: the run's identity across processes and machines.

    ``config`` is the run's resolved configuration (one method, one seed, as
    :func:`bench.train.run_config` gives it); ``identity`` adds what else tells runs with the
    same configuration apart (a tuning study and trial). The hash is the first 16 hex digits
    of the SHA-256 of both, serialised as canonical JSON (sorted keys).
    """
    (method,), (seed,) = config["methods"], config["seeds"]
    canonical = json.dumps({"config": config, "identity": dict(identity or {})}, sort_keys=True, default=str)
    digest = hashlib.sha256(canonical.encode()).hexdigest()[:16]
    parts = (str(config["task"]), str(method), f"seed{seed}", digest)
    return "_".join(re.sub(r"[^A-Za-z0-9.-]+", "-", part) for part in parts)


@dataclass
class FitProgress:
    """What training has accumulated over the epochs done so far.

    ``primary_values`` holds the validation value of the suite's primary metric after each
    epoch; ``last_epoch_metrics`` the metrics of the last epoch, which are logged to MLflow
    after its checkpoint is written (and again on resume if they never reached MLflow).
    """

    epochs_done: int = 0
    best_value: float | None = None
    best_epoch: int | None = None
    best_state: dict[str, Any] | None = None
    phase_ms_totals: dict[str, float] = field(default_factory=dict)
    steps: int = 0
    peak_memory_mb: float = 0.0
    peak_memory_increase_mb: float = 0.0
    train_seconds: float = 0.0
    primary_values: list[float] = field(default_factory=list)
    last_epoch_metrics: dict[str, float] = field(default_factory=dict)


def capture_rng(loader_generator: torch.Generator) -> dict[str, Any]:
    """The random states of Python, NumPy, torch (CPU and every CUDA device) and the loader,
    as tensors, numbers, strings and lists (what ``torch.load(..., weights_only=True)`` reads)."""
    version, internal, gauss_next = random.getstate()
    algorithm, keys, position, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    return {
        "python": [version, list(internal), gauss_next],
        "numpy": [algorithm, keys.tolist(), position, has_gauss, cached_gaussian],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "loader": loader_generator.get_state(),
    }


def restore_rng(state: Mapping[str, Any], loader_generator: torch.Generator) -> None:
    """Set every random state captured by :func:`capture_rng`."""
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    algorithm, keys, position, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((algorithm, np.array(keys, dtype=np.uint32), position, has_gauss, cached_gaussian))
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
    loader_generator.set_state(state["loader"])


class EpochCheckpoint:
    """The resumable state of one run, at ``<results>/checkpoints/<run key>.pt``."""

    def __init__(self, results: Path, key: str) -> None:
        self.key = key
        self.path = Path(results) / "checkpoints" / f"{key}.pt"

    def save(
        self,
        run_id: str,
        progress: FitProgress,
        modules: Mapping[str, Any],
        rng: Mapping[str, Any],
    ) -> None:
        """Write the state atomically: a temporary file in the same directory, then ``os.replace``.

        ``modules`` maps names (model, method, optimizer, scheduler) to objects with a
        ``state_dict()``, or to ``None``. Ctrl-C and SIGTERM wait until the checkpoint is in
        place (:func:`~bench.signals.interrupts_held`), then interrupt as usual: cut in the
        middle, ``torch.save`` would turn the interrupt into an error about the file.
        """
        state = {
            "format": CHECKPOINT_FORMAT,
            "key": self.key,
            "run_id": run_id,
            "progress": dict(vars(progress)),
            "states": {name: None if m is None else m.state_dict() for name, m in modules.items()},
            "rng": dict(rng),
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with interrupts_held():
            handle, temporary = tempfile.mkstemp(
                dir=self.path.parent, prefix=self._temporary_prefix, suffix=TEMPORARY_SUFFIX
            )
            try:
                with os.fdopen(handle, "wb") as file:
                    torch.save(state, file)
                    file.flush()
                    os.fsync(file.fileno())
                os.replace(temporary, self.path)
            except BaseException:
                Path(temporary).unlink(missing_ok=True)
                raise

    def load(self, run_id: str) -> dict[str, Any] | None:
        """The state saved by MLflow run ``run_id``, or ``None`` when there is no checkpoint.

        The file is read with ``weights_only=True``. A file that does not load so (corrupt,
        written in format 1, or holding other objects, e.g. a crafted pickle), or that is not
        in :data:`CHECKPOINT_FORMAT`, or not of this run key and MLflow run, raises
        :class:`CheckpointError` saying which file and why.
        """
        if not self.path.is_file():
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise CheckpointError(
                f"{self.path} does not load as a weights-only checkpoint of format {CHECKPOINT_FORMAT}: "
                f"{_why_not_loaded(error)}"
            ) from error
        if not isinstance(state, dict):
            raise CheckpointError(f"{self.path} holds a {type(state).__name__}, not a checkpoint")
        if state.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(f"{self.path} is in checkpoint format {state.get('format')}, not {CHECKPOINT_FORMAT}")
        if state.get("key") != self.key or state.get("run_id") != run_id:
            raise CheckpointError(
                f"{self.path} belongs to run {state.get('key')} in MLflow run {state.get('run_id')}, "
                f"not to run {self.key} in MLflow run {run_id}"
            )
        return state

    def restore(
        self, state: Mapping[str, Any], modules: Mapping[str, Any], loader_generator: torch.Generator
    ) -> FitProgress:
        """Load the saved states into ``modules`` (as given to :meth:`save`) and every random
        state; return the progress."""
        for name, module in modules.items():
            saved = state["states"][name]
            if (module is None) != (saved is None):
                raise RuntimeError(f"{self.path}: the saved {name} state does not match this run's {name}")
            if module is not None:
                module.load_state_dict(saved)
        restore_rng(state["rng"], loader_generator)
        return FitProgress(**state["progress"])

    @property
    def _temporary_prefix(self) -> str:
        """The start of the name of a temporary file that a write of this checkpoint makes."""
        return f".{self.path.name}."

    def remove(self) -> None:
        """Delete the checkpoint (once its run is over)."""
        self.path.unlink(missing_ok=True)

    def remove_stale_temporaries(self) -> None:
        """Delete the temporary files (``.<run key>.pt.*.tmp``, each as large as a checkpoint) that
        writes of this run's checkpoint left behind when killed before their ``os.replace``.

        Called when the run starts or resumes, before it writes a checkpoint itself; the
        temporary files of other run keys (other processes' writes in flight) are left alone.
        """
        for temporary in self.path.parent.glob(f"{self._temporary_prefix}*{TEMPORARY_SUFFIX}"):
            temporary.unlink(missing_ok=True)


def _why_not_loaded(error: Exception) -> str:
    """The gist of ``torch.load``'s error, on one line, without its advice to load the file
    unsafely or to allow what it refused."""
    text = str(error)
    unpickler = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n\n|$)", text, flags=re.DOTALL)
    gist = unpickler.group(1).split(". Please")[0] if unpickler else text.strip().split("\n")[0]
    return " ".join(gist.split()) or type(error).__name__
