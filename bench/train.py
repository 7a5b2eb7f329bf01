"""The training engine: one (method, seed) run from initialisation to its test metrics.

Every method gets the same model, data order, optimizer and schedule for a given seed. Each
epoch: train, report the epoch's per-task loss and accuracy to the method, evaluate on the
validation split, keep the best-validation state (the suite's primary metric). At the end the
best state is evaluated once on the test split; the test split never selects anything.

Epochs are numbered from 1 (epoch 1 is the first) everywhere: MLflow metric steps,
``summary/best_epoch``, :attr:`RunResult.best_epoch`, progress output and ``on_epoch``.
"""

from __future__ import annotations

import copy
import math
import tempfile
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import yaml
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

import methods
from bench.progress import RunProgress, Sweep
from bench.resume import CHECKPOINT_FORMAT, CheckpointError, EpochCheckpoint, FitProgress, capture_rng, restore_rng, run_key
from bench.signals import interrupts_held, interruption_reason
from bench.spec import RunSpec
from bench.step import seed_everything, supplied_hparams, training_step
from bench.timing import STEP_PHASES, PhaseTimer
from bench.tracking import FAILURE_REASON_TAG, Tracker, environment_tags
from methods.base import EpochStats
from methods.engine import check_finite_losses
from tasks.base import TaskSuite

RUN_KEY_TAG = "run_key"
"""MLflow tag holding a run's key (:func:`bench.resume.run_key`)."""
DIVERGED_TAG = "diverged"
"""MLflow tag ``"true"`` on a run that ended FAILED by a non-finite loss: a result, not a crash."""


class RunTakenOver(Exception):
    """Raised by a ``before_writes`` callback when another process has taken the run over (it
    retried the run of a worker that seemed dead).

    The run stops without writing anything more: its MLflow run and epoch checkpoint are the
    other process's now and are left as they are. The exception propagates to the caller of
    :func:`train_run`.
    """


class StopTraining(Exception):
    """Raised by an ``on_epoch`` callback to end a run early (e.g. a pruned tuning trial).

    The run ends KILLED in MLflow with the exception's message as the reason, its epoch
    checkpoint is removed, and the exception propagates to the caller of :func:`train_run`.
    """


@dataclass
class RunResult:
    """The outcome of one (method, seed) run, as the summary table and files show it."""

    method: str
    seed: int
    status: str
    run_id: str | None = None
    reason: str | None = None
    best_epoch: int | None = None
    """The epoch of the best validation value, counted from 1."""
    best_val: float | None = None
    test: dict[str, float] = field(default_factory=dict)
    ms_per_step: dict[str, float] = field(default_factory=dict)
    step_ms: float | None = None
    peak_memory_mb: float | None = None
    peak_memory_increase_mb: float | None = None
    train_seconds: float | None = None
    timed_steps: int | None = None
    """Training steps behind ``ms_per_step`` and ``step_ms``."""
    crashed: bool = False
    """FAILED by an error other than a non-finite loss (a bug or bad data, not a divergence)."""


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


def make_scheduler(spec: RunSpec, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler | None:
    """The spec's learning-rate schedule, stepped once per epoch: cosine to 0 over the run, or
    ``lr * lr_gamma ** (epoch // lr_step_size)`` (StepLR, LibMTL's ``step``), or none."""
    if spec.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=spec.epochs)
    if spec.scheduler == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=spec.lr_step_size, gamma=spec.lr_gamma)
    return None


def method_hparams(spec: RunSpec, suite: TaskSuite, method: str, seed: int) -> dict[str, Any]:
    """The spec's hyperparameters for ``method``, plus what the harness supplies (:func:`supplied_hparams`)."""
    return supplied_hparams(spec.method_hparams(method), suite, method, seed)


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
def predict(model: nn.Module, loader: DataLoader, device: torch.device, suite: TaskSuite) -> tuple[Any, Any]:
    """Model outputs and targets over a whole split, on the CPU, as ``suite.evaluation_record`` keeps them."""
    model.eval()
    outputs, targets = [], []
    for x, y in loader:
        kept_outputs, kept_targets = suite.evaluation_record(model(_to(x, device)), _to(y, device))
        outputs.append(_to(kept_outputs, torch.device("cpu")))
        targets.append(_to(kept_targets, torch.device("cpu")))
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


def _log_new_metrics(tracker: Tracker, metrics: Mapping[str, float], logged_metrics: Collection[str]) -> None:
    """Log the run-level ``metrics`` that are not among ``logged_metrics``: a resumed final phase
    (killed after logging some of them) logs each ``summary/*`` and ``test/*`` metric once."""
    new = {key: value for key, value in metrics.items() if key not in logged_metrics}
    if new:
        tracker.log_metrics(new)


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


def train_run(
    spec: RunSpec,
    suite: TaskSuite,
    method_name: str,
    seed: int,
    tracker: Tracker,
    *,
    run_name: str | None = None,
    identity: Mapping[str, Any] | None = None,
    tags: Mapping[str, str] | None = None,
    on_epoch: Callable[[int, float], None] | None = None,
    before_writes: Callable[[], None] | None = None,
    evaluate_test: bool = True,
    sweep: Sweep | None = None,
) -> RunResult:
    """Train ``method_name`` with ``seed`` on ``suite``; log everything; return the result.

    A non-finite loss ends the run as FAILED (the reason logged) and returns; Ctrl-C or
    SIGTERM (:mod:`bench.signals`) ends it as KILLED and re-raises; any other error ends it
    as FAILED and re-raises. A store that cannot record the end (it stayed locked, it failed)
    adds a note to the error rather than replacing it, and the next run can still start
    (:meth:`Tracker.end_run`).

    Runs are crash-safe (:mod:`bench.resume`): if this MLflow experiment holds a run with the
    same key (configuration and ``identity``) that finished or diverged, its result is
    returned without training; an unfinished one continues from its last epoch checkpoint in
    the same MLflow run. A checkpoint that cannot be used is reported in one line and the run
    trains from its first epoch, in the same MLflow run; epochs that run has logged already
    are not logged again. ``run_name`` and ``tags`` label the MLflow run. ``on_epoch(epoch,
    value)`` is called after each epoch (counted from 1; on resume also for the epochs done
    before) with the validation value of the primary metric; it may raise
    :class:`StopTraining`. ``before_writes()`` is called before the MLflow run starts, before
    each epoch's checkpoint and metrics are written, and before the final writes (summary,
    best checkpoint; then FINISHED); it may raise :class:`RunTakenOver`. With
    ``evaluate_test=False`` the test split is never used: no test metrics, no test
    predictions (a tuning trial). ``sweep`` places the run in its sweep for
    the progress output (:mod:`bench.progress`).
    """
    seed_everything(seed)
    device = torch.device(spec.device)
    model = suite.build_model(spec.backbone).to(device)
    hparams = method_hparams(spec, suite, method_name, seed)
    method = methods.create(method_name, suite.n_tasks, **hparams).to(device)
    optimizer = make_optimizer(spec, [*model.parameters(), *method.parameters()])
    scheduler = make_scheduler(spec, optimizer)
    loaders = _loaders(spec, suite, seed)
    shared = model.shared_parameters()
    names = suite.task_names

    key = run_key(_run_config(spec, suite, method, seed), identity)
    checkpoint = EpochCheckpoint(spec.results, key)
    checkpoint.remove_stale_temporaries()
    earlier = tracker.find_run(RUN_KEY_TAG, key)
    if earlier is not None and (
        earlier.info.status == "FINISHED" or earlier.data.tags.get(DIVERGED_TAG) == "true"
    ):
        checkpoint.remove()
        tqdm.write(f"{method_name} seed {seed}: done earlier in MLflow run {earlier.info.run_id}; not trained again")
        return result_from_run(earlier, method_name, seed, suite.primary_metric)
    earlier, saved, logged_epochs = _continuation(tracker, checkpoint, earlier, f"{method_name} seed {seed}")
    logged_metrics = set() if earlier is None else set(earlier.data.metrics)

    params = {
        **{k: v for k, v in spec.to_dict().items() if k not in ("methods", "seeds", "hparams", "task_options")},
        "method": method_name,
        "seed": seed,
        "hp": method.hparam_values,
        "task_options": suite.config(),
        "primary_metric": suite.primary_metric,
    }
    if before_writes is not None:
        before_writes()
    run_id = tracker.start_run(
        run_name or f"{method_name}-seed{seed}" + ("-features" if spec.grad_level == "features" else ""),
        params,
        {**environment_tags(spec.device), **(tags or {}), RUN_KEY_TAG: key},
        run_id=None if earlier is None else earlier.info.run_id,
    )
    result = RunResult(method=method_name, seed=seed, status="RUNNING", run_id=run_id)
    progress = FitProgress()
    try:
        tracker.log_data_identity(suite.identity())
        with tempfile.TemporaryDirectory() as scratch:
            config_path = Path(scratch) / "config.yaml"
            config_path.write_text(yaml.safe_dump(_run_config(spec, suite, method, seed), sort_keys=False))
            tracker.log_artifact(config_path)
        if saved is not None:
            modules = _resumable(model, method, optimizer, scheduler)
            progress = checkpoint.restore(saved, modules, loaders["train"].generator)
            tqdm.write(f"{method_name} seed {seed}: resuming after epoch {progress.epochs_done} of {spec.epochs}")
            if progress.epochs_done not in logged_epochs:
                tracker.log_metrics(progress.last_epoch_metrics, step=progress.epochs_done)
            for epoch, value in enumerate(progress.primary_values, start=1):
                if on_epoch is not None:
                    on_epoch(epoch, value)
        run_progress = RunProgress(method_name, seed, suite.primary_metric, spec.epochs, progress.epochs_done, sweep)
        try:
            _fit(spec, suite, model, method, optimizer, scheduler, loaders, shared, names, tracker, result,
                 progress, checkpoint, logged_epochs, logged_metrics, run_progress, on_epoch, before_writes)
        finally:
            run_progress.close()
        if evaluate_test:
            _test(spec, suite, model, loaders["test"], device, tracker, result, logged_metrics)
        if before_writes is not None:
            before_writes()
    except methods.NonFiniteLossError as error:
        result.status, result.reason = "FAILED", str(error)
        tracker.end_run("FAILED", str(error), tags={DIVERGED_TAG: "true"})
        checkpoint.remove()
        return result
    except RunTakenOver:
        tracker.leave_run()
        raise
    except StopTraining as stop:
        result.status, result.reason = "KILLED", str(stop)
        tracker.end_run_after(stop, "KILLED", result.reason)
        checkpoint.remove()
        raise
    except KeyboardInterrupt as interrupt:
        result.status, result.reason = "KILLED", interruption_reason(interrupt)
        with interrupts_held(deliver=False):  # a second Ctrl-C must not leave the run RUNNING
            tracker.end_run_after(interrupt, "KILLED", result.reason)
        raise
    except BaseException as error:
        result.status, result.reason = "FAILED", f"{type(error).__name__}: {error}"
        tracker.end_run_after(error, "FAILED", result.reason)
        raise
    result.status = "FINISHED"
    tracker.end_run("FINISHED")
    checkpoint.remove()
    return result


def _continuation(
    tracker: Tracker, checkpoint: EpochCheckpoint, earlier: Any, label: str
) -> tuple[Any, dict[str, Any] | None, set[int]]:
    """How an unfinished MLflow run ``earlier`` (or ``None``) goes on: the run to continue,
    its epoch checkpoint's state, and the epochs it has logged.

    A checkpoint that cannot be used is reported in one line (the run then trains from epoch
    1). A run logged when epochs were counted from 0 is ended KILLED, saying why, and not
    continued: its history and a new one counted from 1 would mix.
    """
    if earlier is None:
        return None, None, set()
    run_id = earlier.info.run_id
    logged_epochs = tracker.logged_steps(run_id, "time/step_ms")
    saved = None
    try:
        saved = checkpoint.load(run_id)
    except CheckpointError as error:
        tqdm.write(f"{label}: ignoring the epoch checkpoint: {error}; training from epoch 1")
    if 0 in logged_epochs:
        reason = (
            f"its epochs are numbered from 0 (logged before checkpoint format {CHECKPOINT_FORMAT}); "
            "trained again in a new MLflow run"
        )
        tracker.end_other_run(run_id, "KILLED", reason)
        tqdm.write(f"{label}: MLflow run {run_id}: {reason}")
        return None, None, set()
    return earlier, saved, logged_epochs


def _resumable(
    model: nn.Module, method: methods.Method, optimizer: torch.optim.Optimizer, scheduler: Any
) -> dict[str, Any]:
    """What an epoch checkpoint saves and restores through ``state_dict``."""
    return {"model": model, "method": method, "optimizer": optimizer, "scheduler": scheduler}


def result_from_run(run: Any, method: str, seed: int, primary_metric: str) -> RunResult:
    """The :class:`RunResult` of an MLflow run that :func:`train_run` logged, read back.

    The inverse of what the run logs at its end: ``test/<metric>``, and
    ``summary/<phase>_ms``, ``summary/step_ms``, ``summary/timed_steps``, memory, seconds, best
    epoch and value.
    """
    metrics, tags = run.data.metrics, run.data.tags
    summary = {k.removeprefix("summary/"): v for k, v in metrics.items() if k.startswith("summary/")}
    best_epoch, timed_steps = summary.get("best_epoch"), summary.get("timed_steps")
    return RunResult(
        method=method,
        seed=seed,
        status=run.info.status,
        run_id=run.info.run_id,
        reason=tags.get(FAILURE_REASON_TAG),
        best_epoch=None if best_epoch is None else int(best_epoch),
        best_val=summary.get(f"best_val_{primary_metric}"),
        test={k.removeprefix("test/"): v for k, v in metrics.items() if k.startswith("test/")},
        ms_per_step={
            k.removesuffix("_ms"): v for k, v in summary.items() if k.endswith("_ms") and k != "step_ms"
        },
        step_ms=summary.get("step_ms"),
        peak_memory_mb=summary.get("peak_memory_mb"),
        peak_memory_increase_mb=summary.get("peak_memory_increase_mb"),
        train_seconds=summary.get("train_seconds"),
        timed_steps=None if timed_steps is None else int(timed_steps),
    )


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
    progress: FitProgress,
    checkpoint: EpochCheckpoint,
    logged_epochs: set[int],
    logged_metrics: Collection[str],
    run_progress: RunProgress,
    on_epoch: Callable[[int, float], None] | None,
    before_writes: Callable[[], None] | None,
) -> None:
    """Train the epochs after ``progress.epochs_done``; after each, call ``before_writes``,
    write the epoch checkpoint, then log the epoch (unless it is among ``logged_epochs``),
    then report it to ``run_progress`` and ``on_epoch``. At the end call ``before_writes``
    again and log the ``summary/*`` metrics (those not among ``logged_metrics``, the run's
    metrics before it resumed) and the best checkpoint."""
    device = torch.device(spec.device)
    timer = PhaseTimer(device)
    # The NaN check reads the losses on the host: free on a CPU, a synchronisation per step on
    # a GPU, where it is done once per epoch instead.
    check_each_step = device.type != "cuda"
    maximize = suite.primary_direction == "maximize"
    best_value = progress.best_value
    if best_value is None:
        best_value = -math.inf if maximize else math.inf
    best_state = progress.best_state
    result.best_epoch = progress.best_epoch
    totals = dict(progress.phase_ms_totals)
    total_steps = progress.steps
    peak, peak_increase = progress.peak_memory_mb, progress.peak_memory_increase_mb
    started = time.perf_counter() - progress.train_seconds
    loader_generator = loaders["train"].generator
    for epoch in range(progress.epochs_done + 1, spec.epochs + 1):
        loss_sum = torch.zeros(suite.n_tasks, device=device)
        weight_sum = torch.zeros(suite.n_tasks, device=device)
        correct = torch.zeros(suite.n_tasks, device=device)
        seen = 0
        steps = 0
        batches = run_progress.steps(loaders["train"], epoch)
        while True:
            with timer("data"):
                batch = next(batches, None)
                if batch is None:
                    break
                x, y = suite.augment(_to(batch[0], device), _to(batch[1], device))
            outputs, losses, weights = training_step(
                model, suite, method, optimizer, x, y, shared, timer,
                grad_level=spec.grad_level, amp=spec.amp, check_finite=check_each_step,
            )  # fmt: skip
            steps += 1
            loss_sum += losses
            weight_sum += weights
            correct += suite.correct(outputs.detach() if isinstance(outputs, Tensor) else outputs, y)
            seen += x.shape[0]
        timing = timer.epoch()
        if not check_each_step:  # one check per epoch: a NaN anywhere propagates into the sum
            check_finite_losses(method.name, loss_sum)
        train_loss = (loss_sum / max(steps, 1)).cpu()
        train_accuracy = (correct / max(seen, 1)).cpu()
        method.epoch_end(EpochStats(train_loss=train_loss, train_accuracy=train_accuracy))
        if scheduler is not None:
            scheduler.step()

        val_outputs, val_targets = predict(model, loaders["val"], device, suite)
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
        for phase, ms in timing.ms_per_step.items():
            totals[phase] = totals.get(phase, 0.0) + ms * timing.steps
        total_steps += timing.steps
        peak = max(peak, timing.peak_memory_mb)
        peak_increase = max(peak_increase, timing.peak_memory_increase_mb)
        progress = FitProgress(
            epochs_done=epoch,
            best_value=best_value,
            best_epoch=result.best_epoch,
            best_state=best_state,
            phase_ms_totals=dict(totals),
            steps=total_steps,
            peak_memory_mb=peak,
            peak_memory_increase_mb=peak_increase,
            train_seconds=time.perf_counter() - started,
            primary_values=[*progress.primary_values, value],
            last_epoch_metrics=metrics,
        )
        rng = capture_rng(loader_generator)
        if before_writes is not None:
            before_writes()
        checkpoint.save(result.run_id or "", progress, _resumable(model, method, optimizer, scheduler), rng)
        if epoch not in logged_epochs:
            tracker.log_metrics(metrics, step=epoch)
        # The next epoch starts from the random state just saved, whether resumed or not.
        restore_rng(rng, loader_generator)
        run_progress.epoch_done(epoch, value, timing.step_ms)
        if on_epoch is not None:
            on_epoch(epoch, value)

    result.train_seconds = progress.train_seconds
    result.best_val = best_value
    result.ms_per_step = {phase: total / max(total_steps, 1) for phase, total in totals.items()}
    result.step_ms = sum(result.ms_per_step.get(p, 0.0) for p in STEP_PHASES)
    result.timed_steps = total_steps
    result.peak_memory_mb, result.peak_memory_increase_mb = peak, peak_increase
    assert best_state is not None
    model.load_state_dict(best_state["model"])
    method.load_state_dict(best_state["method"])
    summary = {
        "summary/train_seconds": result.train_seconds,
        "summary/step_ms": result.step_ms,
        "summary/timed_steps": float(total_steps),
        "summary/peak_memory_mb": peak,
        "summary/peak_memory_increase_mb": peak_increase,
        "summary/best_epoch": float(best_state["epoch"]),
        f"summary/best_val_{suite.primary_metric}": best_value,
        **{f"summary/{phase}_ms": ms for phase, ms in result.ms_per_step.items()},
    }
    if before_writes is not None:
        before_writes()
    _log_new_metrics(tracker, summary, logged_metrics)
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
    logged_metrics: Collection[str],
) -> None:
    """Evaluate the best state on the test split; log the ``test/*`` metrics (those not among
    ``logged_metrics``) and the per-item predictions."""
    outputs, targets = predict(model, loader, device, suite)
    result.test = suite.evaluate(outputs, targets)
    _log_new_metrics(tracker, _prefixed("test", result.test), logged_metrics)
    rows = _prediction_rows(suite, outputs, targets)
    if rows is not None:
        with tempfile.TemporaryDirectory() as scratch:
            path = Path(scratch) / "test_predictions.csv"
            pd.DataFrame(rows).to_csv(path, index=False)
            tracker.log_artifact(path)
