"""`python -m bench report` end to end: from a small demo store, from CSVs, on bad input."""

from __future__ import annotations

import html
import json
import statistics
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient
from mlflow.entities import Run
from scipy import stats as scipy_stats

from bench import report_build, report_plots
from bench.cli import main
from bench.results_io import LONG_COLUMNS
from bench.train import result_from_run
from bench.tracking import experiment_name

TASK = "cxr14-synthetic"
DEMSAR_CSV = Path(__file__).parent / "reference" / "demsar2006_table6.csv"
"""Demsar (2006) Table 6 in the long format; see tests/test_stats.py for its source and the voting row."""
METHODS = ("ew", "uwo", "uwso")
"""Methods whose first-epoch models differ: EW, DeepChest (weights start at 1) and UW (a uniform
scale that Adam ignores) train the same model until DeepChest's first update, so every block would
tie. UW-O weighs tasks by their inverse losses, UW-SO by a softmax of them."""
SEEDS = ("0", "1")


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A store of 3 methods x 2 seeds (2 epochs of 65 training images at 16 px), its report and its CSV export."""
    results = tmp_path_factory.mktemp("demo")
    code = main(
        ["run", "--task", TASK, "--methods", ",".join(METHODS), "--seeds", ",".join(SEEDS), "--epochs", "2",
         "--task-opt", "n_images=100", "--task-opt", "val_fraction=0.15", "--task-opt", "min_positives=1",
         "--image-size", "16", "--batch-size", "32", "--no-checkpoint", "--results", str(results)]
    )  # fmt: skip
    assert code == 0
    csv = results / "runs.csv"
    assert main(["report", "--results", str(results), "--bootstrap", "300", "--export-csv", str(csv)]) == 0
    return {"results": results, "report": results / "report", "csv": csv}


def printed_text(capsys: pytest.CaptureFixture[str]) -> str:
    """What the command printed, its line wrapping undone."""
    return " ".join(capsys.readouterr().out.split())


def store_runs(results: Path) -> list[Run]:
    client = MlflowClient(tracking_uri=f"sqlite:///{results / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(experiment_name(TASK))
    return client.search_runs([experiment.experiment_id], filter_string="attributes.status = 'FINISHED'")


def store_values(results: Path, key: str) -> dict[str, list[float]]:
    """method -> the runs' values of ``key`` in seed order, read straight from MLflow."""
    values: dict[str, dict[str, float]] = {}
    for run in store_runs(results):
        values.setdefault(run.data.params["method"], {})[run.data.params["seed"]] = run.data.metrics[key]
    return {m: [by_seed[s] for s in SEEDS] for m, by_seed in values.items()}


def test_report_writes_every_output(demo: dict[str, Path]) -> None:
    report = demo["report"]
    for name in ("report.md", "report.html", "stats.json", "figures/cd_diagram.png", "figures/weights.png",
                 "figures/validation.png", "figures/cost.png", "tables/summary.tex", "tables/cost.tex",
                 "tables/per_task_auroc.tex", "tables/wilcoxon_vs_ew.tex"):  # fmt: skip
        assert (report / name).is_file(), name
    page = (report / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 4 and 'src="figures/' not in page
    latex = (report / "tables" / "summary.tex").read_text()
    assert all(rule in latex for rule in ("\\toprule", "\\midrule", "\\bottomrule"))
    markdown = (report / "report.md").read_text()
    assert "![Critical difference diagram of auroc" in markdown and "| method |" in markdown


def test_report_agrees_with_the_store(demo: dict[str, Path]) -> None:
    results = demo["results"]
    stats = json.loads((demo["report"] / "stats.json").read_text())
    assert stats["metric"] == "auroc" and stats["reference"] == "ew"
    assert stats["reference_reason"].startswith("the default: ew is among the methods")

    summary = {row["method"]: row for row in stats["tables"]["summary"]}
    for key in ("mean_auroc", "mean_accuracy"):  # what the chest X-ray suites report
        for method, values in store_values(results, f"test/{key}").items():
            assert summary[method][f"{key}_mean"] == pytest.approx(statistics.fmean(values))
            assert summary[method][f"{key}_std"] == pytest.approx(statistics.stdev(values))
    assert not any(key.startswith("mean_f1") for key in summary["ew"])

    tasks = [
        key.removeprefix("test/auroc/") for key in store_runs(results)[0].data.metrics if key.startswith("test/auroc/")
    ]
    per_task = {(row["task"], row["method"]): row["mean"] for row in stats["tables"]["per_task_auroc"]}
    matrix = {m: [] for m in METHODS}  # blocks (task, seed) x methods, straight from MLflow
    for task in tasks:
        for method, values in store_values(results, f"test/auroc/{task}").items():
            assert per_task[(task, method)] == pytest.approx(statistics.fmean(values))
            matrix[method].extend(values)
    columns = np.array([matrix[m] for m in METHODS]).T
    assert (columns != columns[:, :1]).any(), "every block ties: the fixture's methods train the same models"
    expected_ranks = scipy_stats.rankdata(-columns, axis=1).mean(axis=0)
    auroc = stats["metrics"]["auroc"]
    assert auroc["n_blocks"] == len(tasks) * len(SEEDS)
    assert [auroc["average_ranks"][m] for m in METHODS] == pytest.approx(expected_ranks)
    expected_friedman = scipy_stats.friedmanchisquare(*columns.T)
    assert auroc["friedman"]["tie_corrected_statistic"] == pytest.approx(expected_friedman.statistic)
    for method in ("uwo", "uwso"):
        difference = columns[:, METHODS.index(method)] - columns[:, METHODS.index("ew")]
        # rounded like the report's, so that differences equal but for float error tie
        expected = scipy_stats.wilcoxon(np.round(difference, 12), zero_method="zsplit")
        assert auroc["wilcoxon_holm"][method]["pvalue"] == pytest.approx(expected.pvalue)

    step_ms, timed_steps = store_values(results, "summary/step_ms"), store_values(results, "summary/timed_steps")
    cost = {row["method"]: row for row in stats["tables"]["cost"]}
    for method, values in step_ms.items():
        assert cost[method]["step_ms"] == pytest.approx(statistics.fmean(values))
        assert cost[method]["step_ms_std"] == pytest.approx(statistics.stdev(values))
        assert cost[method]["ratio_to_ew"] == pytest.approx(statistics.fmean(values) / statistics.fmean(step_ms["ew"]))
        assert min(timed_steps[method]) > 0
        assert (cost[method]["timed_steps_min"], cost[method]["timed_steps_max"]) == (
            min(timed_steps[method]),
            max(timed_steps[method]),
        )

    mean_auroc = store_values(results, "test/mean_auroc")
    bootstrap = stats["paired_bootstrap_mean_auroc"][TASK]["ew"]["uwso"]
    assert bootstrap["difference"] == pytest.approx(
        statistics.fmean(np.subtract(mean_auroc["uwso"], mean_auroc["ew"]))
    )
    assert bootstrap["ci_low"] <= bootstrap["difference"] <= bootstrap["ci_high"]

    ew_means = {t: per_task[(t, "ew")] for t in tasks}
    expected_delta = 100 * statistics.fmean((per_task[(t, "uwso")] - ew_means[t]) / ew_means[t] for t in tasks)
    assert summary["uwso"]["delta_m_vs_ew_per-task"] == pytest.approx(expected_delta)


def test_runs_read_back_their_timed_steps(demo: dict[str, Path]) -> None:
    for run in store_runs(demo["results"]):
        result = result_from_run(run, run.data.params["method"], int(run.data.params["seed"]), "mean_auroc")
        assert result.timed_steps == run.data.metrics["summary/timed_steps"] > 0


def flat_numbers(value: object, path: str = "") -> dict[str, object]:
    """Nested dicts as one flat dict ``{"a/b": value}``, for ``pytest.approx``."""
    if not isinstance(value, dict):
        return {path: value}
    return {k: v for key, item in value.items() for k, v in flat_numbers(item, f"{path}/{key}").items()}


def test_plotted_epochs_are_mlflow_steps_counted_from_1_and_agree_with_best_epoch(
    demo: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plotted = []
    original = report_plots.validation_curves

    def recording(curves: pd.DataFrame, *args: object) -> Path:
        plotted.append(curves)
        return original(curves, *args)

    monkeypatch.setattr(report_plots, "validation_curves", recording)
    assert main(["report", "--results", str(demo["results"]), "--bootstrap", "10", "--out", str(tmp_path)]) == 0
    (curves,) = plotted

    # A run logged before epochs were counted from 1 (its steps from 0) is plotted from 1 too.
    def uw_logged_from_0(*args: object) -> pd.DataFrame:
        histories = load_histories(*args)
        return histories.assign(step=histories["step"] - (histories["method"] == "uw").astype(int))

    load_histories = report_build.load_histories
    monkeypatch.setattr(report_build, "load_histories", uw_logged_from_0)
    assert main(["report", "--results", str(demo["results"]), "--bootstrap", "10", "--out", str(tmp_path / "old")]) == 0
    plotted_again = plotted[1].drop(columns="step").reset_index(drop=True)
    pd.testing.assert_frame_equal(plotted_again, curves.drop(columns="step").reset_index(drop=True))
    client = MlflowClient(tracking_uri=f"sqlite:///{demo['results'] / 'mlflow.db'}")
    for run in store_runs(demo["results"]):
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "val/mean_auroc")]
        assert steps == [1, 2]  # epoch 1 is the first
        mine = curves[(curves["method"] == run.data.params["method"]) & (curves["seed"].astype(str) == run.data.params["seed"])]
        assert sorted(mine["epoch"]) == steps
        # The best epoch the run reports is the plotted x of its best value (the first, on a tie).
        best_x = mine.sort_values("epoch", kind="stable").set_index("epoch")["value"].idxmax()
        assert run.data.metrics["summary/best_epoch"] == best_x


def test_exported_csv_gives_the_same_statistics(demo: dict[str, Path], tmp_path: Path) -> None:
    exported = pd.read_csv(demo["csv"], dtype={"seed": str})
    assert tuple(exported.columns) == LONG_COLUMNS
    assert set(exported["method"]) == set(METHODS) and set(exported["seed"]) == set(SEEDS)
    assert main(["report", "--from", str(demo["csv"]), "--out", str(tmp_path)]) == 0
    from_csv = json.loads((tmp_path / "stats.json").read_text())
    from_store = json.loads((demo["report"] / "stats.json").read_text())
    for metric in ("auroc", "mean_auroc", "accuracy"):
        for key in ("average_ranks", "friedman", "iman_davenport", "nemenyi_cd", "wilcoxon_holm"):
            expected = flat_numbers(from_store["metrics"][metric][key])
            assert flat_numbers(from_csv["metrics"][metric][key]) == pytest.approx(expected), (metric, key)
    for table in ("summary", "cost"):  # equal up to rounding: the round trip need not keep the summation order
        for csv_row, store_row in zip(from_csv["tables"][table], from_store["tables"][table], strict=True):
            assert flat_numbers(csv_row) == pytest.approx(flat_numbers(store_row), nan_ok=True), table


def write_csv(path: Path, rows: list[tuple[str, str, str, str, float]]) -> Path:
    pd.DataFrame(rows, columns=LONG_COLUMNS).to_csv(path, index=False)
    return path


def test_demsar_table_6_from_a_csv(tmp_path: Path) -> None:
    assert main(["report", "--from", str(DEMSAR_CSV), "--reference", "C4.5", "--out", str(tmp_path / "out")]) == 0
    auc = json.loads((tmp_path / "out" / "stats.json").read_text())["metrics"]["auc"]
    assert auc["blocks"] == "data sets, each the mean over its seeds" and auc["n_blocks"] == 14
    methods = list(dict.fromkeys(pd.read_csv(DEMSAR_CSV)["method"]))  # C4.5, C4.5+m, C4.5+cf, C4.5+m+cf
    assert [round(auc["average_ranks"][m], 3) for m in methods] == [3.143, 2.000, 2.893, 1.964]
    assert round(auc["friedman"]["statistic"], 2) == 9.28 and round(auc["iman_davenport"]["statistic"], 2) == 3.69
    assert round(auc["nemenyi_cd"], 2) == 1.25
    assert (tmp_path / "out" / "figures" / "cd_diagram.png").is_file()


def test_unequal_seeds_drop_incomplete_blocks_with_a_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = [
        (m, "suite", s, f"error/{t}", 0.1 * (i + 1) + 0.01 * int(s))
        for i, m in enumerate(("a", "b", "c"))
        for s in "012"
        for t in ("T1", "T2")
        if not (m == "c" and s == "2")
    ]
    csv = write_csv(tmp_path / "unequal.csv", rows)
    code = main(
        ["report", "--from", str(csv), "--reference", "a", "--minimize", "error", "--out", str(tmp_path / "out")]
    )
    assert code == 0
    printed = printed_text(capsys)
    assert "2 incomplete block(s) dropped" in printed and "task T1, seed 2 (no c)" in printed
    error = json.loads((tmp_path / "out" / "stats.json").read_text())["metrics"]["error"]
    assert error["n_blocks"] == 4 and len(error["dropped_blocks"]) == 2
    assert error["average_ranks"] == {"a": 1.0, "b": 2.0, "c": 3.0}  # lower error ranks first


def test_one_method_gives_tables_and_says_why_no_test(tmp_path: Path) -> None:
    csv = write_csv(tmp_path / "one.csv", [("ew", "suite", s, "acc", 0.5 + 0.1 * int(s)) for s in "012"])
    assert main(["report", "--from", str(csv), "--out", str(tmp_path / "out")]) == 0
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert "Only one method (ew)" in markdown and "| ew | 3 | 0.6000 ± 0.1000 |" in markdown
    acc = json.loads((tmp_path / "out" / "stats.json").read_text())["metrics"]["acc"]
    assert "friedman" not in acc and "wilcoxon_holm" not in acc


def test_csv_with_missing_columns_names_them(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    csv = tmp_path / "bad.csv"
    pd.DataFrame({"method": ["ew"], "dataset": ["d"], "metric": ["acc"]}).to_csv(csv, index=False)
    assert main(["report", "--from", str(csv), "--out", str(tmp_path / "out")]) == 2
    assert "lacks the column(s) seed, value" in printed_text(capsys)


def test_an_empty_csv_is_named_and_says_what_a_results_csv_holds(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    csv = tmp_path / "empty.csv"
    csv.write_text("")
    assert main(["report", "--from", str(csv), "--out", str(tmp_path / "out")]) == 2
    assert f"{csv} is empty; a results CSV has the header line method,dataset,seed,metric,value" in printed_text(capsys)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("infinite", ["inf", "-inf", "Infinity"])
def test_an_infinite_value_is_refused_not_ranked(
    infinite: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = [(m, "suite", s, "acc", 0.5 + 0.1 * i) for i, m in enumerate(("ew", "uw")) for s in "012"]
    csv = write_csv(tmp_path / "results.csv", rows)
    lines = csv.read_text().splitlines()
    lines[2] = f"ew,suite,1,acc,{infinite}"  # CSV line 3: the second data row
    csv.write_text("\n".join(lines) + "\n")
    assert main(["report", "--from", str(csv), "--out", str(tmp_path / "out")]) == 2
    printed = printed_text(capsys)
    assert f"{csv}: the value column must hold finite numbers; CSV line(s) 3 hold" in printed
    assert not (tmp_path / "out").exists()


def test_no_finished_runs_names_the_experiment_and_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    run = client.create_run(client.create_experiment(experiment_name(TASK)))
    client.set_terminated(run.info.run_id, status="FAILED")
    assert main(["report", "--results", str(tmp_path)]) == 2
    printed = printed_text(capsys)
    assert f"no FINISHED runs in experiment(s) {experiment_name(TASK)} of the MLflow store {uri}" in printed
    assert main(["report", "--results", str(tmp_path / "nothing")]) == 2
    assert "there is no MLflow store at" in printed_text(capsys)


def test_all_tied_blocks_are_reported_as_such(tmp_path: Path) -> None:
    """Three methods with the same AUROC on every (task, seed): the report says why a test is undefined."""
    rows = [
        (m, "suite", s, f"auroc/{t}", 0.5 + 0.1 * i + 0.01 * int(s))
        for m in ("ew", "deepchest", "uw")
        for s in "01"
        for i, t in enumerate(("T1", "T2", "T3"))
    ]
    csv = write_csv(tmp_path / "tied.csv", rows)
    assert main(["report", "--from", str(csv), "--out", str(tmp_path / "out")]) == 0
    friedman = json.loads((tmp_path / "out" / "stats.json").read_text())["metrics"]["auroc"]["friedman"]
    assert friedman["tie_corrected_statistic"] is None
    reason = "every one of the 6 blocks ties all 3 methods, so SciPy's tie correction divides 0 by 0"
    assert friedman["tie_corrected_undefined"] == reason
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert f"(tie-corrected, SciPy: {reason})" in markdown
    assert "all 6 blocks tie: every method (ew, deepchest, uw) has the same auroc in every block" in markdown
    assert "| 0.00 | 1.000 | 0.00 | 1.000 | 1.353 | none: every block ties |" in markdown  # Friedman table
    assert html.escape(reason) in (tmp_path / "out" / "report.html").read_text()


def test_reference_defaults_to_a_method_that_ran(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = [(m, "suite", s, "acc", 0.5 + 0.1 * i + 0.01 * int(s)) for i, m in enumerate(("uw", "mgda")) for s in "012"]
    csv = write_csv(tmp_path / "no_ew.csv", rows)
    assert main(["report", "--from", str(csv), "--out", str(tmp_path / "out")]) == 0
    printed = printed_text(capsys)
    assert "reference method of the tests: uw (the default: ew is not among the methods, so the first one is" in printed
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["reference"] == "uw" and list(stats["metrics"]["acc"]["wilcoxon_holm"]) == ["mgda"]
    assert "Reference method of the tests: `uw` (the default" in (tmp_path / "out" / "report.md").read_text()
    assert main(["report", "--from", str(csv), "--reference", "mgda", "--out", str(tmp_path / "chosen")]) == 0
    assert "reference method of the tests: mgda (chosen with --reference)" in printed_text(capsys)


NYUV2_METRICS = (
    "miou/segmentation", "pixel_accuracy/segmentation", "abs_err/depth", "rel_err/depth", "mean_angle/normal",
    "median_angle/normal", "within_11.25/normal", "within_22.5/normal", "within_30/normal",
)  # fmt: skip


def test_nyuv2_summary_shows_its_nine_metrics(tmp_path: Path) -> None:
    """LibMTL's metrics of each task, best in bold by its direction (lower abs_err wins)."""
    rows = []
    for i, method in enumerate(("ew", "uw")):
        for seed in "01":
            values = {key: 0.2 + 0.1 * i + 0.01 * int(seed) for key in (*NYUV2_METRICS, "delta_1.25/depth")}
            values["mean_accuracy"] = 0.5 + 0.1 * i
            rows += [(method, "nyuv2-synthetic", seed, key, value) for key, value in values.items()]
    csv = write_csv(tmp_path / "nyuv2.csv", rows)
    assert main(["report", "--from", str(csv), "--out", str(tmp_path / "out")]) == 0
    summary = json.loads((tmp_path / "out" / "stats.json").read_text())["tables"]["summary"]
    assert [row["abs_err/depth_mean"] for row in summary] == pytest.approx([0.205, 0.305])
    markdown = (tmp_path / "out" / "report.md").read_text()
    header = next(line for line in markdown.splitlines() if line.startswith("| method | seeds |"))
    assert header.split(" | ")[2:11] == list(NYUV2_METRICS)
    ew_row = next(line for line in markdown.splitlines() if line.startswith("| ew | 2 |")).split(" | ")
    assert ew_row[2] == "0.2050 ± 0.0071" and ew_row[4] == "**0.2050 ± 0.0071**"  # mIoU: higher wins; abs_err: lower
    assert "the metrics they average in the tables above" in markdown


def test_cost_spread_only_from_two_seeds(tmp_path: Path) -> None:
    rows = [
        (m, "suite", s, metric, value)
        for m, seeds in (("ew", "01"), ("uw", "0"))
        for s in seeds
        for metric, value in (("acc", 0.5 + 0.1 * int(s)), ("cost/step_ms", 10.0 + int(s)), ("cost/timed_steps", 6))
    ]
    csv = write_csv(tmp_path / "cost.csv", rows)
    assert main(["report", "--from", str(csv), "--out", str(tmp_path / "out")]) == 0
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert "| ew | 2 | 10.5 ± 0.7 | 1.00 | 6 |" in markdown and "| uw | 1 | 10.0 | 0.95 | 6 |" in markdown


def test_a_baseline_scoring_zero_leaves_delta_m_out_with_a_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An AUROC of 0 (possible on a tiny test split) makes a relative improvement over EW undefined:
    the report is still written, without the Delta_m% column against EW, and says why."""
    rows = [
        (m, "suite", s, f"auroc/{t}", 0.0 if (m, t) == ("ew", "T1") else 0.5 + 0.1 * i + 0.05 * j + 0.01 * int(s))
        for i, m in enumerate(("ew", "uw", "mgda"))
        for s in "01"
        for j, t in enumerate(("T1", "T2", "T3"))
    ]
    csv = write_csv(tmp_path / "zero.csv", rows)
    assert main(["report", "--from", str(csv), "--out", str(tmp_path / "out")]) == 0
    assert "Delta_m% vs ew is left out: the baseline 'ew' scores 0 on" in printed_text(capsys)
    summary = json.loads((tmp_path / "out" / "stats.json").read_text())["tables"]["summary"]
    assert not any(key.startswith("delta_m_vs_ew") for key in summary[0])
    assert "Δm% vs ew" not in (tmp_path / "out" / "report.md").read_text()


def test_one_seed_per_method_gives_a_cost_table_without_spread(tmp_path: Path) -> None:
    """With one seed every cost std is undefined; the cost table shows the means alone."""
    rows = [
        (m, "suite", "0", metric, value)
        for i, m in enumerate(("ew", "uw", "mgda"))
        for metric, value in (("acc", 0.5 + 0.1 * i), ("cost/step_ms", 10.0 + i), ("cost/timed_steps", 6))
    ]
    csv = write_csv(tmp_path / "one_seed.csv", rows)
    assert main(["report", "--from", str(csv), "--out", str(tmp_path / "out")]) == 0
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert "| ew | 1 | 10.0 | 1.00 | 6 |" in markdown and "| mgda | 1 | 12.0 | 1.20 | 6 |" in markdown
