"""The table `python -m bench run` prints at the end of a sweep: the suite's reported metrics, spread
only where there is one, and the training steps behind each cost figure."""

from __future__ import annotations

from rich.console import Console

from bench.runner import summary_table
from bench.train import RunResult
from tasks.nyuv2 import TASK_METRICS

NYUV2_METRICS = [key for keys in TASK_METRICS.values() for key in keys]


def run_result(method: str, seed: int, metrics: dict[str, float], step_ms: float) -> RunResult:
    return RunResult(method, seed, "FINISHED", test=metrics, step_ms=step_ms, peak_memory_mb=900.0, timed_steps=6)


def rendered(table: object) -> list[list[str]]:
    """The table's rows as printed, each split into its cells."""
    console = Console(record=True, width=400)
    console.print(table)
    lines = [line.replace("┃", "│") for line in console.export_text().splitlines()]
    return [[cell.strip() for cell in line.strip("│ ").split("│")] for line in lines if "│" in line]


def test_nyuv2_table_shows_libmtls_nine_metrics() -> None:
    metrics = {key: 0.25 for key in NYUV2_METRICS} | {"delta_1.25/depth": 0.5, "mean_accuracy": 0.5}
    header, *rows = rendered(
        summary_table("nyuv2-synthetic", "mean_accuracy", [run_result("ew", 0, metrics, 120.0)])
    )
    assert header == ["method", *NYUV2_METRICS, "ms/step", "x EW", "peak MB", "timed steps/run", "runs ok"]
    assert rows == [["ew", *["0.2500"] * 9, "120", "1.00", "900", "6", "1/1"]]


def test_spread_only_from_two_seeds_and_the_steps_behind_the_cost() -> None:
    results = [
        run_result("ew", 0, {"mean_auroc": 0.60, "mean_accuracy": 0.90}, 100.0),
        run_result("ew", 1, {"mean_auroc": 0.70, "mean_accuracy": 0.92}, 110.0),
        run_result("uw", 0, {"mean_auroc": 0.65, "mean_accuracy": 0.91}, 105.0),
    ]
    header, ew, uw = rendered(summary_table("cxr14-synthetic", "mean_auroc", results))
    assert header[1:3] == ["mean_auroc", "mean_accuracy"]
    assert ew[:4] == ["ew", "0.6500 ± 0.0707", "0.9100 ± 0.0141", "105 ± 7"]
    assert uw[:4] == ["uw", "0.6500", "0.9100", "105"]  # one seed: no spread to show
    assert ew[-2:] == ["6", "2/2"] and uw[-2:] == ["6", "1/1"]
