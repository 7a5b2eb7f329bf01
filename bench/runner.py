"""A sweep: every (method, seed) of a run spec, then the summary table and files.

Run in this process, cell after cell, or shared through an Optuna storage by any number of
workers (:mod:`bench.grid`). Either way each run is crash-safe (:mod:`bench.resume`): the
same command run again reuses finished runs and continues unfinished ones.
"""

from __future__ import annotations

import json
import math
import re
import statistics
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pandas as pd
from rich.console import Console
from rich.table import Table

import tasks
from bench.credentials import masked
from bench.display import count_range, mean_std, number
from bench.errors import print_error
from bench.grid import cell_spec, grid_results, prepare_grid, tuned_tags, undone_message
from bench.progress import Sweep
from bench.signals import interruption_reason
from bench.spec import RunSpec
from bench.studies import (
    DEFAULT_HEARTBEAT_SECONDS,
    default_storage,
    open_storage,
)
from bench.sweep_cli import StorageOptions
from bench.tracking import Tracker
from bench.train import RunResult, train_run
from bench.tune import TunedSetting, tuned_settings
from bench.worker import run_workers


def run_sweep(spec: RunSpec, console: Console, options: StorageOptions | None = None) -> list[RunResult]:
    """Train every method of ``spec`` with every seed; always write the summary.

    A run that fails (non-finite loss, or an error) is recorded as FAILED and the sweep goes
    on; Ctrl-C or SIGTERM stops the sweep after recording the interrupted run as KILLED. A grid
    cell not done when the workers stop (KILLED in the results) is named, saying what to do. With
    ``options.shared`` the grid is shared through the Optuna storage by this process, the
    ``options.workers - 1`` worker processes it starts and any that join; with
    ``options.tuned`` each method trains with the settings of its best tuning trial there.
    """
    options = options or StorageOptions(None, None, DEFAULT_HEARTBEAT_SECONDS, False)
    suite = tasks.create(spec.task, **spec.task_options)
    url = options.storage or default_storage(spec.results)
    tuned = tuned_settings(url, spec.task, spec.methods) if options.tuned else {}
    if options.shared:
        open_storage(url)  # connect before anything is written
    # Opening the tracker creates the MLflow experiment before any worker starts.
    with Tracker(spec.tracking_uri, spec.task, spec.results) as tracker:
        if not options.shared:
            return _run_cells(spec, suite, tracker, console, tuned)
    shared = prepare_grid(url, spec, suite, tuned, options.heartbeat)
    _print_header(spec, suite, console)
    console.print(f"grid {shared.name} in {masked(url)}: {options.workers or 1} worker process(es) here")
    try:
        run_workers(url, [shared.name], options.workers or 1, spec.results, spec.tracking_uri, console)
    finally:
        results = grid_results(shared, spec)
        _print_summary(spec, suite, results, tuned, console)
    message = undone_message(results, url)
    if message is not None:
        print_error(console, message)
    return results


def _print_header(spec: RunSpec, suite: tasks.TaskSuite, console: Console) -> None:
    console.print(
        f"[bold]{spec.task}[/]: {suite.n_tasks} tasks, "
        + ", ".join(f"{k} {len(v)}" for k, v in suite.splits().items())  # type: ignore[arg-type]
        + f"; {len(spec.methods)} method(s) x {len(spec.seeds)} seed(s) on {spec.device}; "
        f"tracking at {masked(spec.tracking_uri)}"
    )


def _print_summary(
    spec: RunSpec,
    suite: tasks.TaskSuite,
    results: Sequence[RunResult],
    tuned: Mapping[str, TunedSetting],
    console: Console,
) -> None:
    paths = write_summary(spec, suite.primary_metric, results, tuned)
    console.print(summary_table(spec.task, suite.primary_metric, results))
    console.print(f"summary: {paths[0]} and {paths[1]}; runs in MLflow at {masked(spec.tracking_uri)}")


def _run_cells(
    spec: RunSpec,
    suite: tasks.TaskSuite,
    tracker: Tracker,
    console: Console,
    tuned: Mapping[str, TunedSetting],
) -> list[RunResult]:
    _print_header(spec, suite, console)
    results: list[RunResult] = []
    sweep = Sweep.with_bar(len(spec.methods) * len(spec.seeds))
    try:
        for method in spec.methods:
            for seed in spec.seeds:
                try:
                    result = train_run(
                        cell_spec(spec, method, tuned), suite, method, seed, tracker,
                        tags=tuned_tags(tuned, method), sweep=sweep,
                    )  # fmt: skip
                except KeyboardInterrupt as interrupt:
                    results.append(RunResult(method, seed, "KILLED", reason=interruption_reason(interrupt)))
                    raise
                except Exception as error:  # recorded FAILED in MLflow by train_run
                    console.print(f"[red]{method} seed {seed} failed:[/]\n{masked(traceback.format_exc())}")
                    result = RunResult(
                        method, seed, "FAILED", reason=masked(f"{type(error).__name__}: {error}"), crashed=True
                    )
                if result.status == "FAILED":
                    console.print(f"[yellow]{method} seed {seed}: FAILED: {result.reason}[/]")
                results.append(result)
                sweep.run_over()
    finally:
        sweep.close()
        _print_summary(spec, suite, results, tuned, console)
    return results


def aggregate(primary_metric: str, results: Sequence[RunResult]) -> list[dict[str, Any]]:
    """One row per method: every test metric's mean and sample std over finished seeds (the
    primary metric first; std ``None`` below two seeds), cost with its spread, the training steps
    timed in each run, run counts."""
    rows = []
    methods_in_order = list(dict.fromkeys(r.method for r in results))
    ew_step = _mean([r.step_ms for r in results if r.method == "ew" and r.status == "FINISHED"])
    for method in methods_in_order:
        runs = [r for r in results if r.method == method]
        done = [r for r in runs if r.status == "FINISHED"]
        row: dict[str, Any] = {"method": method, "finished": len(done), "runs": len(runs)}
        for metric in dict.fromkeys([primary_metric, *(key for r in done for key in r.test)]):
            values = [r.test[metric] for r in done if metric in r.test]
            row[f"test_{metric}_mean"], row[f"test_{metric}_std"] = _mean(values), _std(values)
        row["step_ms"], row["step_ms_std"] = _mean([r.step_ms for r in done]), _std([r.step_ms for r in done])
        row["ratio_to_ew"] = row["step_ms"] / ew_step if ew_step and ew_step == ew_step else math.nan
        row["timed_steps"] = [r.timed_steps for r in done]
        row["peak_memory_mb"] = max((r.peak_memory_mb or 0.0 for r in done), default=math.nan)
        row["train_seconds"] = _mean([r.train_seconds for r in done])
        rows.append(row)
    return rows


def _present(values: Sequence[float | None]) -> list[float]:
    return [v for v in values if v is not None and v == v]


def _mean(values: Sequence[float | None]) -> float:
    present = _present(values)
    return statistics.fmean(present) if present else math.nan


def _std(values: Sequence[float | None]) -> float | None:
    """Sample standard deviation; ``None`` (null in the summary JSON) below two values, where there is no spread."""
    present = _present(values)
    return statistics.stdev(present) if len(present) > 1 else None


def summary_table(task: str, primary_metric: str, results: Sequence[RunResult]) -> Table:
    """The terminal table per method: the suite's reported test metrics (mean ± std over seeds,
    the std from two seeds on), ms/step (± std over runs), ratio to EW, peak memory, the
    training steps timed per run and the runs that finished."""
    metrics = tasks.suite_class(task).reported_metrics()
    table = Table(title=f"{task}: test metrics of the checkpoint with the best validation {primary_metric}")
    for column in ("method", *metrics, "ms/step", "x EW", "peak MB", "timed steps/run", "runs ok"):
        table.add_column(column, justify="left" if column == "method" else "right")
    for row in aggregate(primary_metric, results):
        table.add_row(
            row["method"],
            *(mean_std(row.get(f"test_{m}_mean"), row.get(f"test_{m}_std"), 4) for m in metrics),
            mean_std(row["step_ms"], row["step_ms_std"], 0),
            number(row["ratio_to_ew"], 2),
            number(row["peak_memory_mb"], 0),
            count_range(row["timed_steps"]),
            f"{row['finished']}/{row['runs']}",
        )
    return table


SUMMARY_TIME_FORMAT = "%Y%m%dT%H%M%S"
"""The UTC time in a summary's name, to the second; milliseconds and ``Z`` follow it."""


def summary_stem(task: str, moment: datetime) -> str:
    """``summary-<task>-<UTC time>``, e.g. ``summary-cxr14-20261129T075612.345Z``: names sort by time."""
    utc = moment.astimezone(timezone.utc)
    return f"summary-{task}-{utc.strftime(SUMMARY_TIME_FORMAT)}.{utc.microsecond // 1000:03d}Z"


def summary_files(results: Path, task: str) -> list[Path]:
    """The summary CSVs of ``task`` in ``results`` (one per sweep), oldest first; each has its ``.json``."""
    pattern = re.compile(rf"summary-{re.escape(task)}-\d{{8}}T\d{{6}}\.\d{{3}}Z\.csv")
    return sorted(p for p in Path(results).glob(f"summary-{task}-*.csv") if pattern.fullmatch(p.name))


def write_summary(
    spec: RunSpec,
    primary_metric: str,
    results: Sequence[RunResult],
    tuned: Mapping[str, TunedSetting] | None = None,
) -> tuple[Path, Path]:
    """``<results>/summary-<task>-<UTC time>.csv`` (one row per run) and ``.json`` (spec, tuned
    settings per method with ``--tuned``, runs, per method): new files for every sweep, so that
    no sweep's summary replaces another's (:func:`summary_stem`). Passwords in URLs (the tracking
    URI, a failure reason quoting one) are hidden."""
    spec.results.mkdir(parents=True, exist_ok=True)
    moment = datetime.now(timezone.utc)
    while (spec.results / f"{summary_stem(spec.task, moment)}.csv").exists():  # a sweep in the same millisecond
        moment += timedelta(milliseconds=1)
    csv_path = spec.results / f"{summary_stem(spec.task, moment)}.csv"
    json_path = csv_path.with_suffix(".json")
    flat_rows = []
    for r in results:
        row = {k: v for k, v in asdict(r).items() if k not in ("test", "ms_per_step")}
        row.update({f"test_{k}": v for k, v in r.test.items()})
        row.update({f"{k}_ms": v for k, v in r.ms_per_step.items()})
        flat_rows.append(row)
    csv_path.write_text(masked(pd.DataFrame(flat_rows).to_csv(index=False)))
    summary = {
        "spec": spec.to_dict(),
        "tuned": {m: asdict(s) for m, s in (tuned or {}).items()},
        "primary_metric": primary_metric,
        "runs": [asdict(r) for r in results],
        "methods": aggregate(primary_metric, results),
    }
    json_path.write_text(masked(json.dumps(summary, indent=2, default=str)))
    return csv_path, json_path
