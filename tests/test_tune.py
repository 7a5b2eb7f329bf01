"""`python -m bench tune`: search spaces from the methods' declarations, pruning, a journal
file storage, `run --tuned` without a completed trial, and clear errors that write nothing.
Studies shared by several worker processes: tests/test_shared_sweeps.py."""

from __future__ import annotations

import socket
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.distributions import CategoricalDistribution, FloatDistribution

import methods
from bench.cli import main
from bench.tracking import experiment_name
from bench.tune import parse_space, search_space, study_name

REPO = Path(__file__).resolve().parent.parent
TASK = "cxr14-synthetic"
TINY = [
    "--task", TASK, "--task-opt", "n_images=140", "--task-opt", "min_positives=1", "--image-size", "16",
    "--batch-size", "64", "--epochs", "2", "--device", "cpu", "--no-checkpoint",
]
LR = FloatDistribution(1e-5, 1e-2, log=True)
WEIGHT_DECAY = FloatDistribution(1e-6, 1e-2, log=True)


def mlflow_runs(results: Path) -> list:
    client = MlflowClient(tracking_uri=f"sqlite:///{results / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(experiment_name(TASK))
    return client.search_runs([experiment.experiment_id])


def test_search_space_is_lr_weight_decay_and_the_declared_tunable_hyperparameters() -> None:
    # Ranges and choices as documented in the README and the method modules.
    assert search_space("cagrad", {}, {}) == {
        "lr": LR, "weight_decay": WEIGHT_DECAY,
        "calpha": FloatDistribution(0.0, 1.0), "rescale": CategoricalDistribution([0, 1, 2]),
    }
    assert search_space("mgda", {}, {})["normalization"] == CategoricalDistribution(["none", "l2", "loss", "loss+"])
    assert search_space("gradnorm", {}, {})["alpha"] == FloatDistribution(0.0, 5.0)
    deepchest = search_space("deepchest", {}, {})
    assert sorted(deepchest) == ["cap", "decay", "factor", "init", "lr", "signal", "weight_decay"]  # no prevalence
    assert deepchest["init"] == CategoricalDistribution(["ones", "prevalence"])
    assert search_space("pcgrad", {}, {}) == {"lr": LR, "weight_decay": WEIGHT_DECAY}  # its seed is the run's
    assert search_space("uwso", {}, {})["temperature"] == FloatDistribution(0.01, 100.0, log=True)
    assert "calpha" not in search_space("cagrad", {"calpha": 0.4}, {})  # fixed with --hp
    for method in methods.available(include_libmtl=True):  # every declaration yields a space
        assert {"lr", "weight_decay"} <= set(search_space(method, {}, {}))


def test_space_overrides() -> None:
    overrides = parse_space(["lr=1e-4:1e-3", "cagrad.rescale=0,1", "uwso.temperature=1:10", "mgda.normalization=l2"],
                            ["cagrad", "uwso", "mgda"])
    assert search_space("cagrad", {}, overrides["cagrad"])["lr"] == FloatDistribution(1e-4, 1e-3, log=True)
    assert search_space("cagrad", {}, overrides["cagrad"])["rescale"] == CategoricalDistribution([0, 1])
    assert search_space("uwso", {}, overrides["uwso"])["temperature"] == FloatDistribution(1.0, 10.0, log=True)
    assert search_space("mgda", {}, overrides["mgda"])["normalization"] == CategoricalDistribution(["l2"])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--methods", "cagrad", "--space", "cagrad.beta=0:1"],
         "cagrad declares no tunable hyperparameter 'beta'; its tunable ones: calpha"),
        (["--methods", "pcgrad", "--space", "pcgrad.seed=0:5"], "pcgrad declares no tunable hyperparameter 'seed'"),
        (["--methods", "cagrad", "--space", "cagrad.calpha=0.2:2"], "calpha=2.0 is out of range"),
        (["--methods", "cagrad", "--hp", "cagrad.calpha=0.4", "--space", "cagrad.calpha=0:1"], "fixed with --hp"),
        (["--methods", "ew", "--space", "mgda.normalization=l2"], "'mgda' is not among the methods tuned"),
        (["--methods", "ew", "--lr", "0.1"], "tuning searches lr"),
        (["--methods", "ew", "--seeds", "0,1"], "one seed"),
        (["--methods", "ew", "--storage", "results/optuna.db"], "expected a database URL"),
        (["--methods", "ew", "--storage", "mysql+nosuchdriver://u:p@localhost/db"], "storage mysql+nosuchdriver://u:***@localhost/db"),
    ],
)
def test_bad_tuning_input_is_a_clear_error_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    results = tmp_path / "results"
    assert main(["tune", *TINY, "--trials", "2", "--results", str(results), *argv]) == 2
    assert message in " ".join(capsys.readouterr().out.split())
    assert not results.exists()


def test_unreachable_storage_is_a_clear_error_that_hides_the_password(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once the socket is closed
    results = tmp_path / "results"
    url = f"postgresql+psycopg://bench:secret@127.0.0.1:{port}/optuna"
    assert main(["tune", *TINY, "--methods", "ew", "--trials", "2", "--storage", url, "--results", str(results)]) == 2
    out = " ".join(capsys.readouterr().out.split())
    assert f"cannot open the Optuna storage postgresql+psycopg://bench:***@127.0.0.1:{port}/optuna" in out
    assert "secret" not in out and not results.exists()


def test_trials_that_all_fail_end_in_a_clear_error(
    results: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def crash(*args: object, **kwargs: object) -> None:
        raise RuntimeError("out of memory")

    monkeypatch.setattr("bench.tune.train_run", crash)
    assert main(["tune", *TINY, "--methods", "ew", "--trials", "2", "--results", str(results)]) == 1
    out = " ".join(capsys.readouterr().out.split())
    assert "no trial of tune/cxr14-synthetic/ew completed: 2 trials ended as RuntimeError: out of memory" in out
    (parent,) = mlflow_runs(results)
    assert parent.info.status == "FAILED" and "out of memory" in parent.data.tags["failure_reason"]
    assert not any(k.startswith("best.") for k in parent.data.tags)
    assert main(["run", *TINY, "--methods", "ew", "--tuned", "--results", str(results)]) == 2
    assert "has no completed trial" in capsys.readouterr().out


def test_a_pruned_trial_stops_after_its_reported_epoch_and_its_mlflow_run_says_why(
    results: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A pruner that prunes every value below 2 (AUROC never reaches it) from the first epoch.
    monkeypatch.setattr("bench.tune.pruner", lambda: optuna.pruners.ThresholdPruner(lower=2.0))
    assert main(["tune", *TINY, "--methods", "ew", "--trials", "1", "--results", str(results)]) == 1
    study = optuna.load_study(study_name=study_name(TASK, "ew"), storage=f"sqlite:///{results / 'optuna.db'}")
    (trial,) = study.get_trials()
    assert trial.state.name == "PRUNED" and list(trial.intermediate_values) == [1]
    (parent,) = [r for r in mlflow_runs(results) if r.info.run_name == "tune-ew"]
    (child,) = [r for r in mlflow_runs(results) if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert child.info.status == "KILLED"
    assert child.data.tags["failure_reason"] == "pruned by Optuna's ThresholdPruner after epoch 1"
    assert not list((results / "checkpoints").glob("*"))


def test_a_journal_file_storage(results: Path) -> None:
    journal = results / "sweep.log"
    argv = ["tune", *TINY, "--epochs", "1", "--methods", "ew", "--trials", "1", "--storage", str(journal),
            "--results", str(results)]
    assert main(argv) == 0
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
    (trial,) = optuna.load_study(study_name=study_name(TASK, "ew"), storage=storage).get_trials()
    assert trial.state.name == "COMPLETE"
