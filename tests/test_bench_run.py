"""`python -m bench run` end to end on a small cxr14-synthetic suite, read back from MLflow."""

from __future__ import annotations

import json
import math
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import requests
import torch
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import DatasetInput
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

import methods
import tasks
from bench.cli import LISTED_RUN_DEFAULTS, main
from bench.progress import Sweep
from bench.runner import summary_files
from bench.spec import RUN_DEFAULTS
from bench.tracking import EXPERIMENT_KIND_TAG, Tracker, experiment_name

REPO = Path(__file__).resolve().parent.parent
TASK = "cxr14-synthetic"
SMALL = ["--task", TASK, "--task-opt", "n_images=700", "--image-size", "16", "--batch-size", "128", "--epochs", "2"]


def run_cli(results: Path, *extra: str) -> int:
    return main(["run", *SMALL, "--results", str(results), *extra])


def runs_of(results: Path) -> list[mlflow.entities.Run]:
    client = MlflowClient(tracking_uri=f"sqlite:///{results / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(experiment_name(TASK))
    assert experiment is not None
    return client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    results = tmp_path_factory.mktemp("results")
    code = run_cli(results, "--methods", "ew,deepchest,pcgrad", "--seeds", "0,1", "--hp", "deepchest.init=prevalence")
    assert code == 0
    return results


def test_one_finished_run_per_method_and_seed(sweep: Path) -> None:
    runs = runs_of(sweep)
    cells = sorted((r.data.params["method"], r.data.params["seed"]) for r in runs)
    assert cells == sorted((m, s) for m in ("ew", "deepchest", "pcgrad") for s in ("0", "1"))
    assert {r.info.status for r in runs} == {"FINISHED"}


def test_run_params_tags_metrics_and_inputs(sweep: Path) -> None:
    run = next(r for r in runs_of(sweep) if r.data.params["method"] == "pcgrad")
    params, metrics, tags = run.data.params, run.data.metrics, run.data.tags
    assert params["optimizer"] == "adam" and params["epochs"] == "2" and params["batch_size"] == "128"
    assert params["task_options.image_size"] == "16" and params["task_options.n_images"] == "700"
    assert params["hp.seed"] == params["seed"]  # the harness passes the run seed to pcgrad
    assert tags["device"] == "cpu" and tags["version.torch"] == torch.__version__
    assert "git_commit" in tags
    for task in ("Atelectasis", "Hernia"):
        assert f"train/loss/{task}" in metrics and f"train/weight/{task}" in metrics
        assert f"test/auroc/{task}" in metrics or f"test/accuracy/{task}" in metrics
    for key in ("val/mean_auroc", "test/mean_auroc", "test/mean_accuracy", "time/forward_ms",
                "time/gradients_ms", "time/weighting_ms", "time/optimizer_ms", "memory/peak_mb"):
        assert key in metrics and math.isfinite(metrics[key]), key
    contexts = sorted(i.tags[0].value for i in run.inputs.dataset_inputs)
    assert contexts == ["test", "train", "val"]
    digests = {i.dataset.digest for i in run.inputs.dataset_inputs}
    assert len(digests) == 3


def test_per_epoch_history_and_best_checkpoint_is_tested(sweep: Path) -> None:
    run = next(r for r in runs_of(sweep) if r.data.params["method"] == "ew")
    client = MlflowClient(tracking_uri=f"sqlite:///{sweep / 'mlflow.db'}")
    history = client.get_metric_history(run.info.run_id, "val/mean_auroc")
    assert [m.step for m in history] == [1, 2]  # epochs counted from 1
    best_epoch = max(history, key=lambda m: m.value).step
    assert run.data.metrics["summary/best_epoch"] == best_epoch
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "test_predictions.csv", "best_checkpoint.pt", "data_identity.json"} <= artifacts
    local = Path(client.download_artifacts(run.info.run_id, "best_checkpoint.pt"))
    checkpoint = torch.load(local, weights_only=True)
    assert checkpoint["epoch"] == best_epoch
    predictions = pd.read_csv(client.download_artifacts(run.info.run_id, "test_predictions.csv"))
    assert len(predictions) == int(json.loads(Path(client.download_artifacts(run.info.run_id, "data_identity.json")).read_text())["splits"]["test"]["size"])


def test_deepchest_weights_follow_its_rule_in_a_real_run(sweep: Path) -> None:
    run = next(r for r in runs_of(sweep) if r.data.params["method"] == "deepchest")
    client = MlflowClient(tracking_uri=f"sqlite:///{sweep / 'mlflow.db'}")
    names = ["Atelectasis", "Cardiomegaly", "Hernia"]
    for name in names:
        weights = [m.value for m in client.get_metric_history(run.info.run_id, f"train/weight/{name}")]
        accuracy0 = [m.value for m in client.get_metric_history(run.info.run_id, f"train/accuracy/{name}")][0]
        all_acc0 = [
            client.get_metric_history(run.info.run_id, f"train/accuracy/{t}")[0].value
            for t in ("Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
                      "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia")
        ]
        expected = min(weights[0] * 1.1, 1.5) if accuracy0 < sum(all_acc0) / 14 else weights[0] / 1.05
        assert weights[1] == pytest.approx(expected, rel=1e-5)


def test_summary_files_and_same_seed_same_numbers(sweep: Path, tmp_path: Path) -> None:
    summary = pd.read_csv(summary_files(sweep, TASK)[-1])
    assert len(summary) == 6 and set(summary["status"]) == {"FINISHED"}
    data = json.loads(summary_files(sweep, TASK)[-1].with_suffix(".json").read_text())
    assert [m["method"] for m in data["methods"]] == ["ew", "deepchest", "pcgrad"]
    assert data["methods"][0]["ratio_to_ew"] == pytest.approx(1.0)
    # Deterministic on CPU: the config saved with a run reproduces its test metrics.
    run = next(r for r in runs_of(sweep) if (r.data.params["method"], r.data.params["seed"]) == ("ew", "1"))
    client = MlflowClient(tracking_uri=f"sqlite:///{sweep / 'mlflow.db'}")
    saved = client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path))
    assert main(["run", "--config", saved, "--results", str(tmp_path), "--no-checkpoint"]) == 0
    again = pd.read_csv(summary_files(tmp_path, TASK)[-1]).iloc[0]
    first = summary[(summary["method"] == "ew") & (summary["seed"] == 1)].iloc[0]
    assert again["test_mean_auroc"] == first["test_mean_auroc"]
    assert again["best_val"] == first["best_val"]


def test_each_sweep_in_a_results_folder_keeps_its_own_summary(
    results: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tiny = ["--task-opt", "n_images=140", "--task-opt", "min_positives=1", "--epochs", "1", "--no-checkpoint"]
    printed = []
    for method in ("ew", "uw"):
        assert main(["run", *SMALL, *tiny, "--methods", method, "--results", str(results)]) == 0
        printed.append(" ".join(capsys.readouterr().out.split()))
    csvs = sorted(results.glob(f"summary-{TASK}*.csv"))
    assert [pd.read_csv(path)["method"].tolist() for path in csvs] == [["ew"], ["uw"]]
    assert [json.loads(p.with_suffix(".json").read_text())["spec"]["methods"] for p in csvs] == [["ew"], ["uw"]]
    assert summary_files(results, TASK) == csvs
    for path, out in zip(csvs, printed):
        assert f"summary: {path} and {path.with_suffix('.json')}" in out


def test_the_experiment_opens_as_model_training_in_the_mlflow_ui(results: Path) -> None:
    uri = f"sqlite:///{results / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    with Tracker(uri, TASK, results) as tracker:
        created = client.get_experiment(tracker.experiment_id)
    older = client.create_experiment(experiment_name("nyuv2"))  # made before the harness set the type
    with Tracker(uri, "nyuv2", results):
        pass
    assert created.tags[EXPERIMENT_KIND_TAG] == "custom_model_development"
    assert client.get_experiment(older).tags[EXPERIMENT_KIND_TAG] == "custom_model_development"


DIGESTS = {"train": "1" * 64, "val": "2" * 64, "test": "3" * 64}
IDENTITY = {"suite": TASK, "options": {}, "splits": {s: {"size": 3, "sha256": d} for s, d in DIGESTS.items()}}


def test_a_data_set_row_created_by_another_worker_at_once_is_not_a_failure(
    results: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Workers that start at once race to create the same data set row in the MLflow store; the
    loser's insert fails on the unique constraint. That is tried again, not a failed cell."""
    uri = f"sqlite:///{results / 'mlflow.db'}"
    client, log_input, raced = MlflowClient(tracking_uri=uri), mlflow.log_input, []

    def racing_log_input(dataset: MetaDataset, context: str) -> None:
        if context not in raced:  # the other worker creates the row between our look-up and insert
            raced.append(context)
            other = client.create_run(tracker.experiment_id)
            client.log_inputs(other.info.run_id, [DatasetInput(dataset._to_mlflow_entity(), [])])
            raise MlflowException("(sqlite3.IntegrityError) UNIQUE constraint failed: datasets.experiment_id")
        log_input(dataset, context=context)

    monkeypatch.setattr(mlflow, "log_input", racing_log_input)
    with Tracker(uri, TASK, results) as tracker:
        run_id = tracker.start_run("race", {}, {})
        tracker.log_data_identity(IDENTITY)
        tracker.end_run("FINISHED")
    inputs = client.get_run(run_id).inputs.dataset_inputs
    assert sorted(i.dataset.digest for i in inputs) == sorted(d[:32] for d in DIGESTS.values())  # each once

    def failing_log_input(dataset: object, context: str) -> None:
        raise MlflowException("the store is read-only")

    monkeypatch.setattr(mlflow, "log_input", failing_log_input)
    with Tracker(uri, TASK, results) as tracker, pytest.raises(MlflowException, match="read-only"):
        tracker.start_run("broken", {}, {})
        try:
            tracker.log_data_identity(IDENTITY)
        finally:
            tracker.end_run("FAILED")


def test_config_file_with_flag_override(tmp_path: Path) -> None:
    config = tmp_path / "spec.yaml"
    config.write_text(
        "methods: uwso\nseeds: [3]\nepochs: 1\nlr: 0.01\nhparams:\n  uwso:\n    temperature: 4\n"
        "task_options:\n  n_images: 700\n"
    )
    code = main(["run", "--config", str(config), "--task", TASK, "--image-size", "16", "--batch-size", "128",
                 "--lr", "0.002", "--results", str(tmp_path / "r"), "--no-checkpoint"])
    assert code == 0
    (run,) = runs_of(tmp_path / "r")
    params = run.data.params
    assert params["lr"] == "0.002" and params["seed"] == "3" and params["hp.temperature"] == "4.0"
    assert params["task_options.n_images"] == "700"
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'r' / 'mlflow.db'}")
    assert "best_checkpoint.pt" not in {a.path for a in client.list_artifacts(run.info.run_id)}


def test_toml_config(tmp_path: Path) -> None:
    config = tmp_path / "spec.toml"
    config.write_text('methods = "ew"\nepochs = 1\n[task_options]\nn_images = 700\nimage_size = 16\n')
    assert main(["run", "--config", str(config), "--task", TASK, "--batch-size", "128",
                 "--results", str(tmp_path / "r"), "--no-checkpoint"]) == 0
    assert runs_of(tmp_path / "r")[0].data.params["epochs"] == "1"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--methods", "ew,nosuch"], "valid: cagrad, deepchest"),
        (["--hp", "cagrad.calpha=7", "--methods", "cagrad"], "calpha=7"),
        (["--hp", "cagrad.nosuch=1", "--methods", "cagrad"], "valid: calpha"),
        (["--hp", "mgda.normalization=l2", "--methods", "ew"], "not among the methods"),
        (["--seeds", "0,x"], "--seeds"),
        (["--lr", "-1"], "--lr"),
        (["--task-opt", "nosuch=1", "--methods", "ew"], "valid options"),
    ],
)
def test_bad_input_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str) -> None:
    code = main(["run", "--task", TASK, "--results", str(tmp_path), *argv])
    assert code == 2
    assert message in " ".join(capsys.readouterr().out.split())


def test_unknown_task_lists_valid_ones(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--task", "nosuch", "--results", str(tmp_path)]) == 2
    assert "cxr14-synthetic" in capsys.readouterr().out


def test_non_finite_loss_fails_that_run_and_the_sweep_goes_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from methods.uwo import UWO

    def poisoned_backward(self, losses, shared_params, **options):  # type: ignore[no-untyped-def]
        return methods.Method.backward(self, losses * float("nan"), shared_params, **options)

    monkeypatch.setattr(UWO, "backward", poisoned_backward)
    code = run_cli(tmp_path, "--methods", "uwo,ew")
    assert code == 0  # a divergence is a result, not a crash
    runs = {r.data.params["method"]: r for r in runs_of(tmp_path)}
    assert runs["uwo"].info.status == "FAILED"
    assert "non-finite loss" in runs["uwo"].data.tags["failure_reason"]
    assert runs["ew"].info.status == "FINISHED"
    summary = pd.read_csv(summary_files(tmp_path, TASK)[-1])
    assert list(summary["status"]) == ["FAILED", "FINISHED"]


def test_ctrl_c_marks_the_run_killed_and_the_store_stays_readable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from methods.ew import EW

    calls = {"n": 0}
    original = EW.backward

    def interrupted(self, losses, shared_params, **options):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(self, losses, shared_params, **options)

    monkeypatch.setattr(EW, "backward", interrupted)
    assert run_cli(tmp_path, "--methods", "ew,uwso") == 130
    (run,) = runs_of(tmp_path)
    assert run.info.status == "KILLED" and run.data.params["method"] == "ew"
    assert pd.read_csv(summary_files(tmp_path, TASK)[-1])["status"].tolist() == ["KILLED"]


def test_list_prints_methods_hyperparameters_and_tasks(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for text in ("deepchest", "calpha", "0.5", "libmtl:mgda", "normalization", "cxr14-synthetic", "n_images"):
        assert text in out


def test_list_in_a_log_prints_every_name_and_help_whole(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list"]) == 0  # standard output captured: not a terminal
    lines = capsys.readouterr().out.splitlines()
    for text in (
        *methods.available(include_libmtl=True),
        *(h.describe() for name in methods.available(include_libmtl=True) for h in methods.hparams(name)),
        *(info.help for name in tasks.available() for info in tasks.options(name).values()),
    ):
        assert any(text in line for line in lines), text  # on one line: neither cut nor wrapped


TINY = ["--task", TASK, "--task-opt", "n_images=140", "--task-opt", "min_positives=1", "--image-size", "16",
        "--batch-size", "64", "--epochs", "2", "--no-checkpoint", "--methods", "ew"]
"""One training step per epoch (98 training images, batch 64, the short last batch dropped)."""
PROGRESS_LINE = re.compile(
    r"run (\d+) of (\d+): ew seed (\d+), epoch (\d+)/2, val mean_auroc \d\.\d{4}, \d+ ms/step, "
    r"ETA run \d+:\d\d:\d\d, sweep \d+:\d\d:\d\d"
)


def test_progress_in_a_log_is_one_line_per_epoch_and_runs_done_earlier_count_as_done(
    results: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["run", *TINY, "--seeds", "0", "--results", str(results)]) == 0
    lines = capsys.readouterr().out.splitlines()
    progress = [match.groups() for line in lines if (match := PROGRESS_LINE.fullmatch(line))]
    assert progress == [("1", "1", "0", "1"), ("1", "1", "0", "2")]

    assert main(["run", *TINY, "--seeds", "0,1", "--results", str(results)]) == 0
    lines = capsys.readouterr().out.splitlines()
    progress = [match.groups() for line in lines if (match := PROGRESS_LINE.fullmatch(line))]
    assert progress == [("2", "2", "1", "1"), ("2", "2", "1", "2")]  # seed 0 was run 1, reused
    assert any(line.startswith("ew seed 0: done earlier") for line in lines)


def test_sweep_time_left_counts_the_runs_not_started_shared_among_those_running() -> None:
    # Run 2 of 6, 3 of its 10 epochs left, 2 s per epoch: its 3 epochs, then 4 runs of 10.
    assert Sweep(6, position=2).seconds_left(3, 10, 2.0) == 2.0 * (3 + 4 * 10)
    # A shared grid: 3 cells started of 6, 2 of them training at once.
    assert Sweep(6, position=3, parallel=2).seconds_left(3, 10, 2.0) == 2.0 * (3 + 3 * 10 / 2)
    assert Sweep(6, position=6).seconds_left(0, 10, 2.0) == 0.0


def test_list_shows_each_suites_training_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list"]) == 0
    rows = {}
    for line in capsys.readouterr().out.splitlines():
        cells = [cell.strip() for cell in line.split("│")[1:-1]]
        if len(cells) == 1 + len(LISTED_RUN_DEFAULTS):
            rows[cells[0]] = dict(zip(LISTED_RUN_DEFAULTS, cells[1:]))
    for name in ["(built-in)", *tasks.available()]:
        expected = {**RUN_DEFAULTS, **({} if name == "(built-in)" else tasks.run_defaults(name))}
        shown = rows[name]
        assert int(shown["epochs"]) == expected["epochs"] and int(shown["batch_size"]) == expected["batch_size"]
        assert float(shown["lr"]) == expected["lr"] and float(shown["weight_decay"]) == expected["weight_decay"]
        assert (shown["optimizer"], shown["scheduler"], shown["backbone"]) == (
            expected["optimizer"], expected["scheduler"], expected["backbone"]
        )
    assert rows["nyuv2"]["epochs"] == "200" and rows["nyuv2"]["lr"] == "0.0001"


def test_list_shows_every_run_default_a_suite_sets() -> None:
    for name in tasks.available():
        assert set(tasks.run_defaults(name)) <= set(LISTED_RUN_DEFAULTS), name


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_runs_over_an_mlflow_tracking_server(tmp_path: Path) -> None:
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--default-artifact-root", (tmp_path / "artifacts").as_uri(), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if requests.get(f"{url}/health", timeout=2).ok:
                    break
            except requests.ConnectionError:
                pass
            assert server.poll() is None, "mlflow server exited"
            assert time.monotonic() < deadline, "mlflow server did not start within 120 s"
            time.sleep(1)
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        command = [sys.executable, "-m", "bench", "run", *SMALL, "--epochs", "1", "--methods", "ew",
                   "--results", str(tmp_path / "r"), "--tracking-uri", url, "--no-checkpoint"]
        subprocess.run(command, check=True, env=env, cwd=tmp_path, timeout=600)
        experiments = requests.get(f"{url}/api/2.0/mlflow/experiments/get-by-name",
                                   params={"experiment_name": experiment_name(TASK)}, timeout=10).json()
        experiment_id = experiments["experiment"]["experiment_id"]
        found = requests.post(f"{url}/api/2.0/mlflow/runs/search", json={"experiment_ids": [experiment_id]}, timeout=10).json()
        (run,) = found["runs"]
        assert run["info"]["status"] == "FINISHED"
        assert {p["key"]: p["value"] for p in run["data"]["params"]}["method"] == "ew"
        assert any(m["key"] == "test/mean_auroc" for m in run["data"]["metrics"])
    finally:
        server.terminate()
        server.wait(timeout=30)
