"""Crash safety: a run or a worker killed with SIGKILL or SIGTERM resumes, and ends as if never
stopped; a checkpoint that does not load safely is refused, never executed."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

import methods
from bench.cli import main
from bench.resume import CHECKPOINT_FORMAT, CheckpointError, EpochCheckpoint, FitProgress, capture_rng, run_key
from bench.runner import summary_files
from bench.signals import SIGTERM_EXIT_CODE
from bench.spec import OPTIMIZERS, SCHEDULERS, resolve_spec
from bench.tracking import experiment_name
from bench.train import RUN_KEY_TAG, make_optimizer, make_scheduler

REPO = Path(__file__).resolve().parent.parent
TASK = "cxr14-synthetic"
EPOCHS = 3
RUN = [
    "run", "--methods", "deepchest", "--task", TASK, "--task-opt", "n_images=140", "--task-opt", "min_positives=1",
    "--image-size", "16", "--batch-size", "64", "--epochs", str(EPOCHS), "--device", "cpu", "--no-checkpoint",
]
"""One training step per epoch (98 training images, batch 64, the short last batch dropped)."""


@pytest.fixture
def results(tmp_path: Path, mlflow_template: Path) -> Path:
    shutil.copy(mlflow_template, tmp_path / "mlflow.db")
    return tmp_path


def summary_row(results: Path) -> dict:
    (row,) = json.loads(summary_files(results, TASK)[-1].with_suffix(".json").read_text())["runs"]
    return row


def mlflow_runs(results: Path) -> tuple[MlflowClient, list]:
    client = MlflowClient(tracking_uri=f"sqlite:///{results / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(experiment_name(TASK))
    return client, client.search_runs([experiment.experiment_id])


def start_and_signal_after_first_checkpoint(
    argv: list[str], results: Path, signum: signal.Signals = signal.SIGKILL
) -> tuple[dict, int]:
    """Start ``python -m bench`` with ``argv``, send it ``signum`` once an epoch checkpoint
    exists; return that checkpoint (as it is after the process ended) and the exit code."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen([sys.executable, "-m", "bench", *argv], env=env, cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoints = results / "checkpoints"
    deadline = time.monotonic() + 600
    while not any(checkpoints.glob("*.pt")):
        assert process.poll() is None, "the run ended before its first epoch checkpoint"
        assert time.monotonic() < deadline, "no epoch checkpoint within 600 s"
        time.sleep(0.02)
    process.send_signal(signum)
    code = process.wait(timeout=600)
    (path,) = checkpoints.glob("*.pt")
    return torch.load(path, weights_only=True), code


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory, mlflow_template: Path) -> dict:
    results = tmp_path_factory.mktemp("uninterrupted")
    shutil.copy(mlflow_template, results / "mlflow.db")
    assert main([*RUN, "--results", str(results)]) == 0
    return summary_row(results)


def assert_same_outcome(row: dict, reference: dict) -> None:
    assert row["status"] == "FINISHED"
    assert row["test"] == reference["test"]  # bit-for-bit on CPU
    assert (row["best_epoch"], row["best_val"]) == (reference["best_epoch"], reference["best_val"])


def resume_and_check_it_matches(
    argv: list[str], results: Path, saved: dict, uninterrupted: dict, capsys: pytest.CaptureFixture[str]
) -> tuple[MlflowClient, Run]:
    """Run ``argv`` again after an interruption: it resumes after the saved epoch, in the saved
    MLflow run, logs each epoch once (from 1) and ends as the uninterrupted run did."""
    assert main(argv) == 0
    assert f"resuming after epoch {saved['progress']['epochs_done']} of {EPOCHS}" in capsys.readouterr().out
    assert_same_outcome(summary_row(results), uninterrupted)
    client, (run,) = mlflow_runs(results)
    assert run.info.run_id == saved["run_id"] and run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/mean_auroc")] == list(range(1, EPOCHS + 1))
    return client, run


def test_sigkilled_run_resumes_in_the_same_mlflow_run_and_matches_an_uninterrupted_one(
    results: Path, uninterrupted: dict, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [*RUN, "--results", str(results)]
    saved, _ = start_and_signal_after_first_checkpoint(argv, results)
    assert 1 <= saved["progress"]["epochs_done"] < EPOCHS
    client, (killed,) = mlflow_runs(results)
    assert killed.info.status == "RUNNING" and killed.info.run_id == saved["run_id"]

    client, run = resume_and_check_it_matches(argv, results, saved, uninterrupted, capsys)
    assert not list((results / "checkpoints").glob("*"))  # removed once the run is over

    # Run again: nothing is trained, nothing is logged twice.
    history = len(client.get_metric_history(run.info.run_id, "train/loss/Hernia"))
    assert main(argv) == 0
    assert "not trained again" in capsys.readouterr().out
    client, (again,) = mlflow_runs(results)
    assert again.info.run_id == run.info.run_id
    assert len(client.get_metric_history(run.info.run_id, "train/loss/Hernia")) == history
    assert summary_row(results)["test"] == uninterrupted["test"]


def test_sigtermed_run_ends_killed_with_its_checkpoint_intact_and_the_same_command_resumes_it(
    results: Path, uninterrupted: dict, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [*RUN, "--results", str(results)]
    saved, code = start_and_signal_after_first_checkpoint(argv, results, signal.SIGTERM)
    assert code == SIGTERM_EXIT_CODE == 143
    assert 1 <= saved["progress"]["epochs_done"] < EPOCHS and saved["format"] == CHECKPOINT_FORMAT
    client, (killed,) = mlflow_runs(results)
    assert killed.info.status == "KILLED" and killed.info.run_id == saved["run_id"]
    assert killed.data.tags["failure_reason"] == "terminated (SIGTERM)"

    resume_and_check_it_matches(argv, results, saved, uninterrupted, capsys)


class Payload:
    """Unpickling it (a load that is not weights-only) creates the file ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return Path.touch, (self.marker,)


def test_a_crafted_checkpoint_is_not_executed_and_the_run_trains_again_in_the_same_mlflow_run(
    results: Path, uninterrupted: dict, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [*RUN, "--results", str(results)]
    assert main(argv) == 0
    client, (run,) = mlflow_runs(results)
    history = client.get_metric_history(run.info.run_id, "train/loss/Hernia")
    # The run as a crash leaves it, its checkpoint replaced by a pickle that runs code.
    client.set_terminated(run.info.run_id, "KILLED")
    marker = results / "payload-ran"
    path = results / "checkpoints" / f"{run.data.tags[RUN_KEY_TAG]}.pt"
    path.parent.mkdir(exist_ok=True)
    torch.save({"format": CHECKPOINT_FORMAT, "payload": Payload(marker)}, path)
    capsys.readouterr()

    assert main(argv) == 0
    assert not marker.exists()
    out = capsys.readouterr().out
    assert f"ignoring the epoch checkpoint: {path} does not load as a weights-only checkpoint" in out
    assert "training from epoch 1" in out and "resuming" not in out
    assert_same_outcome(summary_row(results), uninterrupted)
    client, (again,) = mlflow_runs(results)
    assert again.info.run_id == run.info.run_id and again.info.status == "FINISHED"
    # The epochs trained again are not logged a second time.
    assert client.get_metric_history(run.info.run_id, "train/loss/Hernia") == history
    assert not path.exists()


def test_a_run_logged_with_epochs_from_0_is_ended_and_trained_again_in_a_new_mlflow_run(
    results: Path, uninterrupted: dict, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [*RUN, "--results", str(results)]
    assert main(argv) == 0
    client, (run,) = mlflow_runs(results)
    client.delete_run(run.info.run_id)
    # An unfinished run as the harness logged it when epochs were counted from 0.
    legacy = client.create_run(run.info.experiment_id, tags={RUN_KEY_TAG: run.data.tags[RUN_KEY_TAG]})
    client.log_metric(legacy.info.run_id, "time/step_ms", 1.0, step=0)
    client.set_terminated(legacy.info.run_id, "KILLED")
    capsys.readouterr()

    assert main(argv) == 0
    assert f"MLflow run {legacy.info.run_id}: its epochs are numbered from 0" in capsys.readouterr().out
    assert_same_outcome(summary_row(results), uninterrupted)
    client, runs = mlflow_runs(results)
    (new,) = [r for r in runs if r.info.run_id != legacy.info.run_id]
    old = client.get_run(legacy.info.run_id)
    assert old.info.status == "KILLED" and "trained again in a new MLflow run" in old.data.tags["failure_reason"]
    assert [m.step for m in client.get_metric_history(old.info.run_id, "time/step_ms")] == [0]
    assert [m.step for m in client.get_metric_history(new.info.run_id, "time/step_ms")] == list(range(1, EPOCHS + 1))


def test_a_checkpoint_of_an_older_format_or_another_run_is_refused_saying_which_file_and_why(tmp_path: Path) -> None:
    checkpoint = EpochCheckpoint(tmp_path, "key")
    checkpoint.path.parent.mkdir()
    torch.save({"format": 1, "key": "key", "run_id": "run"}, checkpoint.path)
    with pytest.raises(CheckpointError, match=f"{checkpoint.path} is in checkpoint format 1, not {CHECKPOINT_FORMAT}"):
        checkpoint.load("run")
    checkpoint.save("run", FitProgress(epochs_done=1), {}, capture_rng(torch.Generator()))
    with pytest.raises(CheckpointError, match="belongs to run key in MLflow run run, not to run key in MLflow run other"):
        checkpoint.load("other")
    checkpoint.path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="does not load as a weights-only checkpoint"):
        checkpoint.load("run")


def test_sigkilled_worker_is_detected_by_its_heartbeat_and_its_cell_resumed(results: Path, uninterrupted: dict) -> None:
    storage = f"sqlite:///{results / 'optuna.db'}"
    argv = [*RUN, "--results", str(results), "--storage", storage, "--heartbeat", "1"]
    saved, _ = start_and_signal_after_first_checkpoint(argv, results)

    # The same command again: its worker waits until the dead worker's cell is stale (3 s
    # without a heartbeat), fails it, and trains the queued retry from the checkpoint.
    assert main(argv) == 0
    assert_same_outcome(summary_row(results), uninterrupted)
    _, (run,) = mlflow_runs(results)
    assert run.info.run_id == saved["run_id"] and run.info.status == "FINISHED"
    (name,) = optuna.get_all_study_names(storage)
    trials = optuna.load_study(study_name=name, storage=storage).get_trials()
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE"]
    assert trials[1].system_attrs["failed_trial"] == 0
    assert trials[0].user_attrs["worker"] != trials[1].user_attrs["worker"]


def test_checkpoint_write_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    checkpoint = EpochCheckpoint(tmp_path, "key")
    model = torch.nn.Linear(2, 1)
    generator = torch.Generator().manual_seed(0)
    checkpoint.save("run", FitProgress(epochs_done=1), {"model": model}, capture_rng(generator))

    def failing_save(obj: object, file: object) -> None:
        file.write(b"partial")  # type: ignore[attr-defined]
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save("run", FitProgress(epochs_done=2), {"model": model}, capture_rng(generator))
    monkeypatch.undo()
    assert checkpoint.load("run")["progress"]["epochs_done"] == 1  # the previous checkpoint, intact
    assert [p.name for p in checkpoint.path.parent.iterdir()] == ["key.pt"]  # no temporary file left


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_every_optimizer_and_schedule_round_trips_through_a_weights_only_checkpoint(
    tmp_path: Path, optimizer: str, scheduler: str
) -> None:
    spec = resolve_spec({}, {"task": TASK, "methods": "ew", "optimizer": optimizer, "scheduler": scheduler,
                             "results": str(tmp_path)})
    model = torch.nn.Linear(3, 2)
    modules = {"model": model, "optimizer": make_optimizer(spec, model.parameters())}
    modules["scheduler"] = make_scheduler(spec, modules["optimizer"])
    model(torch.ones(4, 3)).sum().backward()
    modules["optimizer"].step()
    if modules["scheduler"] is not None:
        modules["scheduler"].step()
    checkpoint = EpochCheckpoint(tmp_path, "key")
    checkpoint.save("run", FitProgress(epochs_done=1), modules, capture_rng(torch.Generator()))
    saved = checkpoint.load("run")
    for name, module in modules.items():
        assert (saved["states"][name] is None) == (module is None)
        if module is not None:
            torch.testing.assert_close(saved["states"][name], module.state_dict(), rtol=0, atol=0)


def test_checkpoint_restores_pcgrads_random_task_order_and_global_random_states(tmp_path: Path) -> None:
    """Python's, NumPy's and torch's random states and the loader's, through a weights-only load."""

    def step(method: methods.Method) -> torch.Tensor:
        gramian = torch.tensor([[2.0, -1.0, 0.5], [-1.0, 3.0, -0.8], [0.5, -0.8, 1.0]])
        return method.weigh(torch.ones(3), gramian).weights

    generator = torch.Generator().manual_seed(7)
    original = methods.create("pcgrad", 3, seed=3)
    for _ in range(5):
        step(original)
    checkpoint = EpochCheckpoint(tmp_path, "key")

    def draws() -> list[float]:
        return [random.gauss(0.0, 1.0), random.random(), *np.random.rand(3).tolist(), np.random.randn(),
                *torch.rand(3).tolist(), *torch.rand(3, generator=generator).tolist()]

    # Python and NumPy each keep the second of a pair of gaussians in their state.
    random.gauss(0.0, 1.0)
    np.random.randn()
    checkpoint.save("run", FitProgress(), {"method": original}, capture_rng(generator))
    expected = [step(original) for _ in range(8)], draws()

    restored = methods.create("pcgrad", 3, seed=3)
    random.seed(123)
    np.random.seed(123)
    torch.manual_seed(123)
    generator.manual_seed(123)
    checkpoint.restore(checkpoint.load("run"), {"method": restored}, generator)
    again = [step(restored) for _ in range(8)], draws()
    assert all(torch.equal(a, b) for a, b in zip(expected[0], again[0]))
    assert expected[1] == again[1]


def test_run_key_is_deterministic_and_tells_configurations_apart() -> None:
    config = {"task": TASK, "methods": ["libmtl:mgda"], "seeds": [0], "epochs": 3, "hparams": {"libmtl:mgda": {}}}
    key = run_key(config)
    assert key == run_key(dict(reversed(list(config.items()))))
    assert key.startswith("cxr14-synthetic_libmtl-mgda_seed0_")
    assert run_key({**config, "epochs": 4}) != key
    assert run_key(config, {"study": "s", "trial": 0}) != key


def test_checkpoint_keeps_libmtl_state_held_outside_tensors(tmp_path: Path) -> None:
    original = methods.create("libmtl:gradnorm", 3)
    original.first_epoch_loss_sum += torch.tensor([0.5, 1.0, 2.0])
    original.first_epoch_steps = 1
    for _ in range(2):
        original.epoch_end({"train_loss": torch.ones(3)})
    checkpoint = EpochCheckpoint(tmp_path, "key")
    checkpoint.save("run", FitProgress(), {"method": original}, capture_rng(torch.Generator()))
    restored = methods.create("libmtl:gradnorm", 3)
    checkpoint.restore(checkpoint.load("run"), {"method": restored}, torch.Generator())
    assert restored.host.epoch == 2 and restored.first_epoch_steps == 1  # GradNorm's second epoch on
    assert restored.host.train_loss_buffer[:, 0].tolist() == [0.5, 1.0, 2.0]
