"""`python -m bench tune`: search spaces from the methods' declarations, pruning, a journal
file storage, `run --tuned` without a completed trial, clear errors that write nothing, trials
that see no test data, and a report that never reads tuning runs as results.
Studies shared by several worker processes: tests/test_shared_sweeps.py."""

from __future__ import annotations

import re
import socket
from pathlib import Path

import optuna
import pytest
from mlflow.entities import Param
from mlflow.tracking import MlflowClient
from optuna.distributions import CategoricalDistribution, FloatDistribution

import methods
from bench.cli import main
from bench.results_io import NoResultsError, load_mlflow
from bench.tracking import TUNED_FROM_TAG, TUNING_STUDY_TAG, experiment_name
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


def test_the_report_reads_the_benchmark_runs_and_never_the_tuning_runs(results: Path) -> None:
    # A benchmark run, then a tuning study of the same method and seed: its trial ran later.
    assert main(["run", *TINY, "--epochs", "1", "--methods", "ew", "--results", str(results)]) == 0
    assert main(["tune", *TINY, "--epochs", "1", "--methods", "ew", "--trials", "1", "--results", str(results)]) == 0
    runs = mlflow_runs(results)
    (benchmark,) = [r for r in runs if TUNING_STUDY_TAG not in r.data.tags]
    assert len(runs) == 3  # the benchmark run, the study's run and its trial
    loaded = load_mlflow(f"sqlite:///{results / 'mlflow.db'}")
    assert [r.run_id for r in loaded.runs] == [benchmark.info.run_id]
    assert set(loaded.long["method"]) == {"ew"} and loaded.warnings == []
    value = loaded.long.set_index("metric").loc["mean_auroc", "value"]
    assert value == benchmark.data.metrics["test/mean_auroc"]


def _finished_run(client: MlflowClient, experiment_id: str, params: dict[str, str], tags: dict[str, str]) -> str:
    run = client.create_run(experiment_id, tags=tags)
    client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in params.items()])
    client.log_metric(run.info.run_id, "test/mean_auroc", 0.6)
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


def test_tuned_learning_rates_differ_by_method_and_other_differences_name_the_runs_to_delete(results: Path) -> None:
    uri = f"sqlite:///{results / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment(experiment_name(TASK))
    _finished_run(client, experiment, {"method": "ew", "seed": "0"}, {TUNING_STUDY_TAG: study_name(TASK, "ew")})
    with pytest.raises(NoResultsError, match="but 1 of tuning studies .* python -m bench run --tuned"):
        load_mlflow(uri)

    common = {"task": TASK, "seed": "0", "epochs": "20", "weight_decay": "0.0"}
    tuned = [
        _finished_run(client, experiment, {**common, "method": m, "lr": lr}, {TUNED_FROM_TAG: f"{m} study, trial 0"})
        for m, lr in (("ew", "0.001"), ("uw", "0.0003"))
    ]
    assert load_mlflow(uri).warnings == []  # each method with its own tuned learning rate
    short = _finished_run(client, experiment, {**common, "method": "uwo", "lr": "0.001", "epochs": "2"}, {})
    (warning,) = load_mlflow(uri).warnings
    assert f"epochs (2 in run(s) {short}, 20 in run(s) {', '.join(tuned)})" in warning
    assert f"MLFLOW_TRACKING_URI={uri} mlflow runs delete --run-id ID" in warning


def test_a_trial_is_neither_tested_nor_checkpointed_unless_asked_and_prints_one_readable_line(
    results: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    keeping_checkpoints = [a for a in TINY if a != "--no-checkpoint"]
    argv = ["tune", *keeping_checkpoints, "--epochs", "1", "--methods", "ew", "--results", str(results)]
    assert main([*argv, "--trials", "1"]) == 0
    first_out = " ".join(capsys.readouterr().out.split())
    assert main([*argv, "--trials", "2", "--full-trials"]) == 0  # for the trials that start from now on
    client = MlflowClient(tracking_uri=f"sqlite:///{results / 'mlflow.db'}")
    trials = {int(r.data.tags["optuna.trial"]): r for r in mlflow_runs(results) if "optuna.trial" in r.data.tags}
    artifacts = {n: {a.path for a in client.list_artifacts(r.info.run_id)} for n, r in trials.items()}
    assert not any(key.startswith("test/") for key in trials[0].data.metrics)
    assert {"best_checkpoint.pt", "test_predictions.csv"}.isdisjoint(artifacts[0])
    assert "test/mean_auroc" in trials[1].data.metrics
    assert {"best_checkpoint.pt", "test_predictions.csv"} <= artifacts[1]

    study = optuna.load_study(study_name=study_name(TASK, "ew"), storage=f"sqlite:///{results / 'optuna.db'}")
    first = study.trials[0]
    name = study_name(TASK, "ew")
    params = f"lr={first.params['lr']:.3g}, weight_decay={first.params['weight_decay']:.3g}"
    assert f"{name} trial 1 of 1 (#0): {params}" in first_out
    ended = re.search(rf"{name} trial 1 of 1 \(#0\): COMPLETE, best validation mean_auroc (\S+), (\S+) s", first_out)
    assert ended is not None, first_out
    assert float(ended.group(1)) == float(f"{first.value:.4g}") and float(ended.group(2)) > 0
    assert "{'lr'" not in first_out  # no raw dictionary
