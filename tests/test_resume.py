"""Crash safety: a run or a worker killed with SIGKILL resumes, and ends as if never stopped."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch
from mlflow.tracking import MlflowClient

import methods
from bench.cli import main
from bench.resume import EpochCheckpoint, FitProgress, capture_rng, run_key
from bench.runner import summary_files
from bench.tracking import experiment_name

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


def start_and_kill_after_first_checkpoint(argv: list[str], results: Path) -> dict:
    """Start ``python -m bench`` with ``argv``, SIGKILL it once an epoch checkpoint exists;
    return that checkpoint."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen([sys.executable, "-m", "bench", *argv], env=env, cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoints = results / "checkpoints"
    deadline = time.monotonic() + 600
    while not any(checkpoints.glob("*.pt")):
        assert process.poll() is None, "the run ended before its first epoch checkpoint"
        assert time.monotonic() < deadline, "no epoch checkpoint within 600 s"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    (path,) = checkpoints.glob("*.pt")
    return torch.load(path, weights_only=False)


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


def test_sigkilled_run_resumes_in_the_same_mlflow_run_and_matches_an_uninterrupted_one(
    results: Path, uninterrupted: dict, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [*RUN, "--results", str(results)]
    saved = start_and_kill_after_first_checkpoint(argv, results)
    assert 1 <= saved["progress"]["epochs_done"] < EPOCHS
    client, (killed,) = mlflow_runs(results)
    assert killed.info.status == "RUNNING" and killed.info.run_id == saved["run_id"]

    assert main(argv) == 0
    assert f"resuming after epoch {saved['progress']['epochs_done']} of {EPOCHS}" in capsys.readouterr().out
    assert_same_outcome(summary_row(results), uninterrupted)
    client, (run,) = mlflow_runs(results)
    assert run.info.run_id == saved["run_id"] and run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/mean_auroc")] == list(range(EPOCHS))
    assert not list((results / "checkpoints").glob("*"))  # removed once the run is over

    # Run again: nothing is trained, nothing is logged twice.
    history = len(client.get_metric_history(run.info.run_id, "train/loss/Hernia"))
    assert main(argv) == 0
    assert "not trained again" in capsys.readouterr().out
    client, (again,) = mlflow_runs(results)
    assert again.info.run_id == run.info.run_id
    assert len(client.get_metric_history(run.info.run_id, "train/loss/Hernia")) == history
    assert summary_row(results)["test"] == uninterrupted["test"]


def test_sigkilled_worker_is_detected_by_its_heartbeat_and_its_cell_resumed(results: Path, uninterrupted: dict) -> None:
    storage = f"sqlite:///{results / 'optuna.db'}"
    argv = [*RUN, "--results", str(results), "--storage", storage, "--heartbeat", "1"]
    saved = start_and_kill_after_first_checkpoint(argv, results)

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
    assert checkpoint.load()["progress"]["epochs_done"] == 1  # the previous checkpoint, intact
    assert [p.name for p in checkpoint.path.parent.iterdir()] == ["key.pt"]  # no temporary file left


def test_checkpoint_restores_pcgrads_random_task_order_and_global_random_states(tmp_path: Path) -> None:
    def step(method: methods.Method) -> torch.Tensor:
        gramian = torch.tensor([[2.0, -1.0, 0.5], [-1.0, 3.0, -0.8], [0.5, -0.8, 1.0]])
        return method.weigh(torch.ones(3), gramian).weights

    generator = torch.Generator().manual_seed(7)
    original = methods.create("pcgrad", 3, seed=3)
    for _ in range(5):
        step(original)
    checkpoint = EpochCheckpoint(tmp_path, "key")
    checkpoint.save("run", FitProgress(), {"method": original}, capture_rng(generator))
    expected = [step(original) for _ in range(8)], torch.rand(3), torch.rand(3, generator=generator)

    restored = methods.create("pcgrad", 3, seed=3)
    torch.manual_seed(123)
    generator.manual_seed(123)
    checkpoint.restore(checkpoint.load(), {"method": restored}, generator)
    again = [step(restored) for _ in range(8)], torch.rand(3), torch.rand(3, generator=generator)
    assert all(torch.equal(a, b) for a, b in zip(expected[0], again[0]))
    assert torch.equal(expected[1], again[1]) and torch.equal(expected[2], again[2])


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
    checkpoint.restore(checkpoint.load(), {"method": restored}, torch.Generator())
    assert restored.host.epoch == 2 and restored.first_epoch_steps == 1  # GradNorm's second epoch on
    assert restored.host.train_loss_buffer[:, 0].tolist() == [0.5, 1.0, 2.0]
