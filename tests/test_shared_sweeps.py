"""Sweeps shared by worker processes: a tuning study on SQLite (two workers), then `run
--tuned`; a `bench run` grid on a throwaway PostgreSQL server (three workers).

The server is the ``postgres_url`` fixture (``conftest.py``); its tests are skipped, with the
reason shown by ``pytest -ra``, when it cannot start here.
"""

from __future__ import annotations

import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from sqlalchemy.engine import make_url

from bench import worker
from bench.cli import main
from bench.runner import summary_files
from bench.tracking import experiment_name
from bench.tune import study_name

REPO = Path(__file__).resolve().parent.parent
TASK = "cxr14-synthetic"
TINY = [
    "--task", TASK, "--task-opt", "n_images=140", "--task-opt", "min_positives=1", "--image-size", "16",
    "--batch-size", "64", "--epochs", "1", "--device", "cpu", "--no-checkpoint",
]
"""One training step per epoch (98 training images, batch 64, the short last batch dropped)."""


def mlflow_runs(results: Path) -> list:
    client = MlflowClient(tracking_uri=f"sqlite:///{results / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(experiment_name(TASK))
    return client.search_runs([experiment.experiment_id])


def hold_first_job_until_other_workers_claim(monkeypatch: pytest.MonkeyPatch, kind: str, others: int) -> None:
    """Make this process's worker, once it holds its first trial, wait until ``others`` other
    workers hold one too: then every worker has claimed a trial while the others were claiming."""
    job = worker.JOBS[kind]
    waited = []

    def held_job(shared, claim, context):  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + 600
        while not waited:
            holders = {t.user_attrs.get("worker") for t in shared.study.get_trials(deepcopy=False)}
            if len(holders - {None, claim.frozen.user_attrs["worker"]}) >= others:
                waited.append(True)
            assert time.monotonic() < deadline, "the other worker processes claimed nothing within 600 s"
            time.sleep(0.2)
        return job(shared, claim, context)

    monkeypatch.setitem(worker.JOBS, kind, held_job)


def test_two_worker_processes_share_a_study_without_duplicates_then_run_tuned(
    results: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hold_first_job_until_other_workers_claim(monkeypatch, "tune", others=1)
    storage = f"sqlite:///{results / 'optuna.db'}"
    argv = ["tune", *TINY, "--methods", "ew", "--trials", "4", "--workers", "2", "--results", str(results)]
    assert main(argv) == 0
    study = optuna.load_study(study_name=study_name(TASK, "ew"), storage=storage)
    trials = study.get_trials()
    assert [t.number for t in trials] == [0, 1, 2, 3]
    assert {t.state.name for t in trials} == {"COMPLETE"}
    assert len({t.user_attrs["worker"] for t in trials}) == 2  # this process and the one it started

    runs = mlflow_runs(results)
    (parent,) = [r for r in runs if r.info.run_name == "tune-ew"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert parent.info.status == "FINISHED" and len(children) == len(runs) - 1 == 4
    by_trial = {int(r.data.tags["optuna.trial"]): r for r in children}
    assert sorted(by_trial) == [0, 1, 2, 3]
    for trial in trials:
        params = by_trial[trial.number].data.params
        assert float(params["lr"]) == trial.params["lr"]
        assert float(params["weight_decay"]) == trial.params["weight_decay"]
    assert parent.data.tags["best.lr"] == str(study.best_trial.params["lr"])

    # The same command again trains nothing.
    assert main(argv) == 0
    assert len(study.get_trials()) == 4 and len(mlflow_runs(results)) == 5

    # --tuned: the best trial's settings, over the seeds given.
    assert main(["run", *TINY, "--methods", "ew", "--epochs", "2", "--tuned", "--results", str(results)]) == 0
    (tuned,) = [r for r in mlflow_runs(results) if "tuned_from" in r.data.tags]
    assert tuned.data.tags["tuned_from"] == f"{study_name(TASK, 'ew')} trial {study.best_trial.number}"
    assert float(tuned.data.params["lr"]) == study.best_trial.params["lr"]
    assert tuned.data.params["epochs"] == "2" and "mlflow.parentRunId" not in tuned.data.tags


def test_three_workers_on_postgresql_train_each_cell_exactly_once(
    postgres_url: str, results: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hold_first_job_until_other_workers_claim(monkeypatch, "grid", others=2)
    argv = ["run", *TINY, "--methods", "ew,uw,deepchest", "--storage", postgres_url, "--workers", "3",
            "--results", str(results)]
    assert main(argv) == 0

    (name,) = optuna.get_all_study_names(postgres_url)
    trials = optuna.load_study(study_name=name, storage=postgres_url).get_trials()
    cells = sorted((t.user_attrs["method"], t.user_attrs["seed"]) for t in trials)
    assert cells == [("deepchest", 0), ("ew", 0), ("uw", 0)]  # each cell once
    assert {t.state.name for t in trials} == {"COMPLETE"}
    assert len({t.user_attrs["worker"] for t in trials}) == 3  # one cell per worker

    runs = mlflow_runs(results)
    assert sorted((r.data.params["method"], int(r.data.params["seed"])) for r in runs) == cells
    assert {r.info.status for r in runs} == {"FINISHED"}
    summary = pd.read_csv(summary_files(results, TASK)[-1])
    assert sorted(zip(summary["method"], summary["seed"])) == cells
    assert set(summary["run_id"]) == {r.info.run_id for r in runs}

    # The same command again trains nothing and rebuilds the same summary from the storage.
    assert main(argv) == 0
    assert len(mlflow_runs(results)) == 3
    first, again = summary_files(results, TASK)
    assert pd.read_csv(first).equals(summary) and pd.read_csv(again).equals(summary)


def test_wrong_postgresql_password_is_a_clear_error_that_writes_nothing(
    postgres_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    wrong = postgres_url.replace(make_url(postgres_url).password, "not-the-password")
    results = tmp_path / "results"
    assert main(["run", *TINY, "--methods", "ew", "--storage", wrong, "--results", str(results)]) == 2
    out = " ".join(capsys.readouterr().out.split())
    assert "cannot open the Optuna storage postgresql+psycopg://bench:***@127.0.0.1" in out
    assert 'password authentication failed for user "bench"' in out
    assert "not-the-password" not in out and not results.exists()
