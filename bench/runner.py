"""A sweep: every (method, seed) of a run spec, then the summary table and files."""

from __future__ import annotations

import json
import math
import statistics
import traceback
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pandas as pd
from rich.console import Console
from rich.table import Table

import tasks
from bench.spec import RunSpec
from bench.tracking import Tracker
from bench.train import RunResult, train_run


def run_sweep(spec: RunSpec, console: Console) -> list[RunResult]:
    """Train every method of ``spec`` with every seed; always write the summary.

    A run that fails (non-finite loss, or an error) is recorded as FAILED and the sweep goes
    on; Ctrl-C stops the sweep after recording the interrupted run as KILLED.
    """
    suite = tasks.create(spec.task, **spec.task_options)
    with Tracker(spec.tracking_uri, spec.task, spec.results) as tracker:
        return _run_cells(spec, suite, tracker, console)


def _run_cells(spec: RunSpec, suite: tasks.TaskSuite, tracker: Tracker, console: Console) -> list[RunResult]:
    console.print(
        f"[bold]{spec.task}[/]: {suite.n_tasks} tasks, "
        + ", ".join(f"{k} {len(v)}" for k, v in suite.splits().items())  # type: ignore[arg-type]
        + f"; {len(spec.methods)} method(s) x {len(spec.seeds)} seed(s) on {spec.device}; "
        f"tracking at {spec.tracking_uri}"
    )
    results: list[RunResult] = []
    try:
        for method in spec.methods:
            for seed in spec.seeds:
                try:
                    result = train_run(spec, suite, method, seed, tracker)
                except KeyboardInterrupt:
                    results.append(RunResult(method, seed, "KILLED", reason="interrupted (Ctrl-C)"))
                    raise
                except Exception as error:  # recorded FAILED in MLflow by train_run
                    console.print(f"[red]{method} seed {seed} failed:[/]\n{traceback.format_exc()}")
                    result = RunResult(
                        method, seed, "FAILED", reason=f"{type(error).__name__}: {error}", crashed=True
                    )
                if result.status == "FAILED":
                    console.print(f"[yellow]{method} seed {seed}: FAILED: {result.reason}[/]")
                results.append(result)
    finally:
        paths = write_summary(spec, suite.primary_metric, results)
        console.print(summary_table(spec.task, suite.primary_metric, results))
        console.print(f"summary: {paths[0]} and {paths[1]}; runs in MLflow at {spec.tracking_uri}")
    return results


def aggregate(primary_metric: str, results: Sequence[RunResult]) -> list[dict[str, Any]]:
    """One row per method: test metrics mean and std over finished seeds, cost, run counts."""
    rows = []
    methods_in_order = list(dict.fromkeys(r.method for r in results))
    ew_step = _mean([r.step_ms for r in results if r.method == "ew" and r.status == "FINISHED"])
    for method in methods_in_order:
        runs = [r for r in results if r.method == method]
        done = [r for r in runs if r.status == "FINISHED"]
        row: dict[str, Any] = {"method": method, "finished": len(done), "runs": len(runs)}
        for metric in (primary_metric, "mean_accuracy"):
            values = [r.test[metric] for r in done if metric in r.test]
            row[f"test_{metric}_mean"] = _mean(values)
            row[f"test_{metric}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0 if values else math.nan
        row["step_ms"] = _mean([r.step_ms for r in done])
        row["ratio_to_ew"] = row["step_ms"] / ew_step if ew_step and ew_step == ew_step else math.nan
        row["peak_memory_mb"] = max((r.peak_memory_mb or 0.0 for r in done), default=math.nan)
        row["train_seconds"] = _mean([r.train_seconds for r in done])
        rows.append(row)
    return rows


def _mean(values: Sequence[float | None]) -> float:
    present = [v for v in values if v is not None and v == v]
    return statistics.fmean(present) if present else math.nan


def _fmt(value: float, digits: int) -> str:
    return "-" if value != value else f"{value:.{digits}f}"


def summary_table(task: str, primary_metric: str, results: Sequence[RunResult]) -> Table:
    """The terminal table: quality (mean +- std over seeds) and cost per method."""
    table = Table(title=f"{task}: test metrics of the best-validation checkpoint")
    for column in ("method", f"{primary_metric}", "mean accuracy", "ms/step", "x EW", "peak MB", "runs ok"):
        table.add_column(column, justify="left" if column == "method" else "right")
    for row in aggregate(primary_metric, results):
        table.add_row(
            row["method"],
            f"{_fmt(row[f'test_{primary_metric}_mean'], 4)} ± {_fmt(row[f'test_{primary_metric}_std'], 4)}",
            f"{_fmt(row['test_mean_accuracy_mean'], 4)} ± {_fmt(row['test_mean_accuracy_std'], 4)}",
            _fmt(row["step_ms"], 0),
            _fmt(row["ratio_to_ew"], 2),
            _fmt(row["peak_memory_mb"], 0),
            f"{row['finished']}/{row['runs']}",
        )
    return table


def write_summary(spec: RunSpec, primary_metric: str, results: Sequence[RunResult]) -> tuple[Path, Path]:
    """``<results>/summary-<task>.csv`` (one row per run) and ``.json`` (spec, runs, per method)."""
    spec.results.mkdir(parents=True, exist_ok=True)
    csv_path = spec.results / f"summary-{spec.task}.csv"
    json_path = spec.results / f"summary-{spec.task}.json"
    flat_rows = []
    for r in results:
        row = {k: v for k, v in asdict(r).items() if k not in ("test", "ms_per_step")}
        row.update({f"test_{k}": v for k, v in r.test.items()})
        row.update({f"{k}_ms": v for k, v in r.ms_per_step.items()})
        flat_rows.append(row)
    pd.DataFrame(flat_rows).to_csv(csv_path, index=False)
    json_path.write_text(
        json.dumps(
            {
                "spec": spec.to_dict(),
                "primary_metric": primary_metric,
                "runs": [asdict(r) for r in results],
                "methods": aggregate(primary_metric, results),
            },
            indent=2,
            default=str,
        )
    )
    return csv_path, json_path
