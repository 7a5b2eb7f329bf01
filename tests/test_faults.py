"""Faults injected into real runs (SIGKILL, SIGSTOP/SIGCONT, signals during writes, ...) and what
the harness guarantees after each: docs/faults.md lists them."""

from __future__ import annotations

import collections
import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import optuna
import psutil
import pytest
import torch
from mlflow.tracking import MlflowClient

from bench import worker
from bench.cli import main
from bench.resume import EpochCheckpoint, FitProgress, capture_rng
from bench.signals import CTRL_C_EXIT_CODE, SIGTERM_EXIT_CODE
from bench.studies import WORKER_ATTR
from bench.tracking import experiment_name

# --- Shared sweeps under pauses, kills and signals (issue 14, items 2, 5 and 9) -------------------

TASK = "cxr14-synthetic"
SMALL = [
    "--task", TASK, "--task-opt", "n_images=140", "--task-opt", "min_positives=1", "--image-size", "16",
    "--device", "cpu", "--no-checkpoint",
]
"""98 training images of 16 x 16: an epoch takes a fraction of a second."""
GRID = ["run", *SMALL, "--methods", "ew", "--batch-size", "16", "--epochs", "3"]
"""One grid cell of three epochs of six steps."""


def _storage(results: Path) -> str:
    return f"sqlite:///{results / 'optuna.db'}"


Start = Callable[..., subprocess.Popen[bytes]]


@pytest.fixture
def start() -> Iterator[Start]:
    """``start(argv, log, new_session=False)``: ``python -m bench ARGV`` in another process, its
    output in ``log``. Whatever a test leaves of it (paused, or its worker processes) is killed."""
    processes: list[subprocess.Popen[bytes]] = []

    def started(argv: list[str], log: Path, *, new_session: bool = False) -> subprocess.Popen[bytes]:
        with log.open("w") as output:
            process = subprocess.Popen([sys.executable, "-m", "bench", *argv], stdout=output,
                                       stderr=subprocess.STDOUT, start_new_session=new_session)
        processes.append(process)
        return process

    yield started
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            for left in [*psutil.Process(process.pid).children(recursive=True), psutil.Process(process.pid)]:
                left.kill()
        process.wait()


def _wait_for(condition: Callable[[], bool], process: subprocess.Popen[bytes], log: Path, what: str) -> None:
    deadline = time.monotonic() + 120
    while not condition():
        assert process.poll() is None, f"the process ended before {what}:\n{log.read_text()}"
        assert time.monotonic() < deadline, f"not within 120 s: {what}"
        time.sleep(0.05)


def _stop_holding_no_lock(process: subprocess.Popen[bytes], databases: list[Path]) -> None:
    """SIGSTOP ``process`` at a moment when it holds no lock on ``databases`` (SQLite):
    a process stopped inside a read or write would block every other writer."""
    while True:
        process.send_signal(signal.SIGSTOP)
        try:
            for database in databases:
                with contextlib.closing(sqlite3.connect(database, timeout=0.1)) as connection:
                    connection.execute("BEGIN EXCLUSIVE")
                    connection.rollback()
            return
        except sqlite3.OperationalError:  # stopped inside a read or write: let it finish, stop it again
            process.send_signal(signal.SIGCONT)
            time.sleep(0.05)


def _trials(storage: str) -> list[optuna.trial.FrozenTrial]:
    """The trials of the (one) study in ``storage``; none before it exists."""
    names = optuna.get_all_study_names(storage)
    return optuna.load_study(study_name=names[0], storage=storage).get_trials() if names else []


def _mlflow(results: Path) -> tuple[MlflowClient, list]:
    client = MlflowClient(tracking_uri=f"sqlite:///{results / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(experiment_name(TASK))
    return client, [] if experiment is None else client.search_runs([experiment.experiment_id])


def test_a_paused_worker_whose_cell_was_retried_stops_before_writing_and_exits_cleanly(
    results: Path, start: Start
) -> None:
    argv = [*GRID, "--results", str(results), "--storage", _storage(results), "--heartbeat", "1"]
    log = results / "paused.log"
    paused = start(argv, log)

    def first_epoch_logged() -> bool:
        client, runs = _mlflow(results)
        return bool(runs) and bool(client.get_metric_history(runs[0].info.run_id, "val/mean_auroc"))

    _wait_for(first_epoch_logged, paused, log, "the first epoch was logged")
    _stop_holding_no_lock(paused, [results / "optuna.db", results / "mlflow.db"])  # training epoch 2, most likely
    try:
        # This worker waits until the paused one's heartbeat is 3 s old, retries the cell and finishes it.
        assert main(argv) == 0
    finally:
        paused.send_signal(signal.SIGCONT)
    assert paused.wait(timeout=120) == 0, log.read_text()
    output = " ".join(log.read_text().split())
    assert "took" in output and "over" in output and "stopped without writing" in output
    assert "UpdateFinishedTrialError" not in output

    client, (run,) = _mlflow(results)
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/mean_auroc")] == [1, 2, 3]
    assert not list((results / "checkpoints").glob("*"))  # nothing written after the cell was done
    first, retry = _trials(_storage(results))
    assert (first.state.name, retry.state.name) == ("FAIL", "COMPLETE")
    assert first.user_attrs[WORKER_ATTR].endswith(f":{paused.pid}")


def test_a_cell_killed_with_a_journal_storage_is_retried_by_the_same_command(results: Path, start: Start) -> None:
    journal = results / "optuna.log"
    argv = [*GRID, "--results", str(results), "--storage", str(journal)]
    log = results / "killed.log"
    killed = start(argv, log)
    _wait_for(lambda: any((results / "checkpoints").glob("*.pt")), killed, log, "the first epoch checkpoint")
    killed.send_signal(signal.SIGKILL)
    killed.wait()

    # Its claim names a process of this machine that is gone: the same command retries the cell.
    assert main(argv) == 0
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
    first, retry = optuna.load_study(study_name=optuna.get_all_study_names(storage)[0], storage=storage).get_trials()
    assert (first.state.name, retry.state.name) == ("FAIL", "COMPLETE")
    assert first.user_attrs["failure"] == f"its worker process {first.user_attrs[WORKER_ATTR]} is gone (killed?)"
    _, (run,) = _mlflow(results)
    assert run.info.status == "FINISHED"


def test_a_cell_held_by_a_worker_on_another_machine_is_named_and_the_command_exits_1(
    results: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def claimed_elsewhere(shared, claim, context):  # type: ignore[no-untyped-def]
        shared.storage.set_trial_user_attr(claim.trial_id, WORKER_ATTR, "elsewhere:4242")
        return "RUNNING"

    argv = [*GRID, "--results", str(results), "--storage", str(results / "optuna.log")]
    with monkeypatch.context() as patch:
        patch.setitem(worker.JOBS, "grid", claimed_elsewhere)
        assert main(argv) == 1
    assert main(argv) == 1  # the claim stays: it cannot be judged from this machine
    output = " ".join(capsys.readouterr().out.split())
    assert "1 cell(s) not done: ew seed 0 (not done: still RUNNING, claimed by worker elsewhere:4242)" in output
    assert "python -m bench worker --storage" in output


class _InterruptWhilePickled:
    """Sends this process SIGINT while ``torch.save`` pickles it; loads back as an empty dict."""

    def __reduce__(self) -> tuple:
        os.kill(os.getpid(), signal.SIGINT)
        return collections.OrderedDict, ()


def test_ctrl_c_during_a_checkpoint_write_interrupts_once_the_checkpoint_is_in_place(tmp_path: Path) -> None:
    checkpoint = EpochCheckpoint(tmp_path, "key")
    model = torch.nn.Linear(2, 1)
    rng = capture_rng(torch.Generator().manual_seed(0))
    checkpoint.save("run", FitProgress(epochs_done=1), {"model": model}, rng)
    interrupting = torch.nn.Module()
    interrupting.state_dict = lambda: {"signal": _InterruptWhilePickled()}  # type: ignore[method-assign]

    with pytest.raises(KeyboardInterrupt):
        checkpoint.save("run", FitProgress(epochs_done=2), {"model": model, "other": interrupting}, rng)
    assert checkpoint.load("run")["progress"]["epochs_done"] == 2  # written whole, then interrupted
    assert [p.name for p in tmp_path.joinpath("checkpoints").iterdir()] == ["key.pt"]


@pytest.mark.parametrize(
    ("signum", "to_group", "exit_code", "reason"),
    [
        (signal.SIGTERM, False, SIGTERM_EXIT_CODE, "terminated (SIGTERM)"),
        (signal.SIGINT, True, CTRL_C_EXIT_CODE, "interrupted (Ctrl-C)"),
    ],
    ids=["SIGTERM to the command", "Ctrl-C to its process group"],
)
def test_an_interrupted_tune_with_two_workers_ends_both_and_queues_its_trials_with_their_parameters(
    results: Path, start: Start, signum: signal.Signals, to_group: bool, exit_code: int, reason: str
) -> None:
    storage = _storage(results)
    argv = ["tune", *SMALL, "--methods", "ew", "--batch-size", "16", "--epochs", "200", "--trials", "2",
            "--workers", "2", "--heartbeat", "1", "--results", str(results)]
    log = results / "tune.log"
    command = start(argv, log, new_session=True)

    def both_trials_train() -> bool:
        running = [t for t in _trials(storage) if t.state.name == "RUNNING" and len(t.params) == 2]
        _, runs = _mlflow(results)
        return len(running) == 2 and len({t.user_attrs.get(WORKER_ATTR) for t in running}) == 2 and len(runs) == 3

    _wait_for(both_trials_train, command, log, "both workers train a trial")
    helper_pid = next(
        int(t.user_attrs[WORKER_ATTR].rpartition(":")[2])
        for t in _trials(storage)
        if not t.user_attrs[WORKER_ATTR].endswith(f":{command.pid}")
    )
    if to_group:
        os.killpg(command.pid, signum)
    else:
        command.send_signal(signum)
    assert command.wait(timeout=120) == exit_code, log.read_text()
    assert not psutil.pid_exists(helper_pid)  # the worker it started has ended too

    trials = _trials(storage)
    failed = [t for t in trials if t.state.name == "FAIL"]
    retries = {t.system_attrs["failed_trial"]: t for t in trials if t.state.name == "WAITING"}
    assert len(failed) == 2 and len(trials) == 4  # none left RUNNING
    for trial in failed:
        assert trial.user_attrs["failure"] == reason
        assert retries[trial.number].params == trial.params  # the retry trains what was interrupted
    client, runs = _mlflow(results)
    (parent,) = [r for r in runs if r.info.run_name == "tune-ew"]
    assert parent.info.status == "KILLED" and parent.data.tags["failure_reason"] == reason
    assert {r.info.status for r in runs if r.info.run_id != parent.info.run_id} == {"KILLED"}
