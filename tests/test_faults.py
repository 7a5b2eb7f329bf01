"""Fault injection: what the harness guarantees when a store, a worker or the data fails.

Each block tests one area; docs/faults.md lists every fault tried and the guarantee.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import types
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import optuna
import psutil
import pytest
import sqlalchemy
import torch
from mlflow.tracking import MlflowClient
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

import bench.runner
from bench import worker
from bench.cli import main
from bench.credentials import STORAGE_URL_ENV, TRACKING_URI_ENV, masked
from bench.resume import EpochCheckpoint, FitProgress, capture_rng
from bench.results_io import PREDICTIONS_ARTIFACT
from bench.runner import summary_files
from bench.signals import CTRL_C_EXIT_CODE, SIGTERM_EXIT_CODE
from bench.stores import STORE_WAIT_ENV
from bench.studies import WORKER_ATTR
from bench.tracking import Tracker, experiment_name

REPO = Path(__file__).resolve().parent.parent
TASK = "cxr14-synthetic"
TINY_RUN = [
    "run", "--methods", "ew", "--task", TASK, "--task-opt", "n_images=140", "--task-opt", "min_positives=1",
    "--image-size", "16", "--batch-size", "64", "--device", "cpu", "--no-checkpoint",
]  # fmt: skip
"""One method on a tiny suite: one training step per epoch (98 training images, batch 64)."""


# --- Stores: locked, slow, unreachable, or created by two processes at once (issue 14, items 1, 7, 8) ---

TWO_RUNS = [*TINY_RUN, "--seeds", "0,1", "--epochs", "2"]
"""A sweep of two runs, one training step per epoch."""
MLFLOW_BUSY_TIMEOUT = "busy_timeout = 20000"
"""What MLflow sets in every SQLite session: wait 20 s for a lock before ``database is locked``."""


@pytest.fixture
def short_sqlite_busy_timeout() -> Iterator[None]:
    """MLflow's SQLite sessions wait 200 ms for a lock instead of 20 s, so that a lock fails
    MLflow's calls within a test's time; the harness's own, longer wait is what is tested."""

    def shorten(
        connection: object, cursor: object, statement: str, parameters: object, context: object, executemany: bool
    ) -> tuple[str, object]:
        return statement.replace(MLFLOW_BUSY_TIMEOUT, "busy_timeout = 200"), parameters

    sqlalchemy.event.listen(sqlalchemy.engine.Engine, "before_cursor_execute", shorten, retval=True)
    yield
    sqlalchemy.event.remove(sqlalchemy.engine.Engine, "before_cursor_execute", shorten)


class StoreLock:
    """Another connection that holds a SQLite file in ``BEGIN EXCLUSIVE``: no one else reads or
    writes it until :meth:`release`, or for ``hold_seconds`` when set. Taken once, when the
    sweep logs its first epoch's metrics."""

    def __init__(self, database: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.connection = sqlite3.connect(database, isolation_level=None, check_same_thread=False)
        self.hold_seconds: float | None = None
        self.taken = False
        self.held = False
        self._guard = threading.Lock()
        log_metrics = Tracker.log_metrics

        def log_metrics_under_lock(tracker: Tracker, metrics: dict, step: int | None = None) -> None:
            if not self.taken:
                self.hold()
            log_metrics(tracker, metrics, step)

        monkeypatch.setattr(Tracker, "log_metrics", log_metrics_under_lock)

    def hold(self) -> None:
        with self._guard:
            self.connection.execute("BEGIN EXCLUSIVE")
            self.taken = self.held = True
        if self.hold_seconds is not None:
            threading.Timer(self.hold_seconds, self.release).start()

    def release(self) -> None:
        with self._guard:
            if self.held:
                self.connection.execute("ROLLBACK")
                self.held = False

    def close(self) -> None:
        self.release()
        self.connection.close()


@pytest.fixture
def store_lock(results: Path, monkeypatch: pytest.MonkeyPatch, short_sqlite_busy_timeout: None) -> Iterator[StoreLock]:
    lock = StoreLock(results / "mlflow.db", monkeypatch)
    yield lock
    lock.close()


def sweep_runs(results: Path) -> dict[int, dict]:
    """The runs of the latest summary by seed."""
    runs = json.loads(summary_files(results, TASK)[-1].with_suffix(".json").read_text())["runs"]
    return {run["seed"]: run for run in runs}


def mlflow_statuses(results: Path) -> dict[str, str]:
    """MLflow run name -> status."""
    client = MlflowClient(tracking_uri=f"sqlite:///{results / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(experiment_name(TASK))
    return {run.info.run_name: run.info.status for run in client.search_runs([experiment.experiment_id])}


def test_a_store_locked_for_seconds_during_a_sweep_is_waited_for(
    results: Path, store_lock: StoreLock, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(STORE_WAIT_ENV, "30")
    store_lock.hold_seconds = 2.0
    assert main([*TWO_RUNS, "--results", str(results)]) == 0
    captured = capsys.readouterr()
    assert store_lock.taken
    store = f"MLflow tracking store sqlite:///{(results / 'mlflow.db').resolve()}"
    assert f"{store} is locked by another process; waiting" in captured.err
    assert {seed: run["status"] for seed, run in sweep_runs(results).items()} == {0: "FINISHED", 1: "FINISHED"}
    assert mlflow_statuses(results) == {"ew-seed0": "FINISHED", "ew-seed1": "FINISHED"}


def test_a_store_locked_past_the_wait_fails_that_run_alone_and_names_the_store(
    results: Path, store_lock: StoreLock, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(STORE_WAIT_ENV, "1")
    train_run = bench.runner.train_run

    def release_when_the_next_run_starts(*args: object, **kwargs: object) -> object:
        store_lock.release()
        return train_run(*args, **kwargs)

    monkeypatch.setattr(bench.runner, "train_run", release_when_the_next_run_starts)
    assert main([*TWO_RUNS, "--results", str(results)]) == 1  # one run crashed
    printed = capsys.readouterr()
    runs = sweep_runs(results)
    store = f"MLflow tracking store sqlite:///{(results / 'mlflow.db').resolve()}"
    assert runs[0]["status"] == "FAILED"
    assert runs[0]["reason"].startswith(f"StoreLockedError: the {store} is locked by another process")
    assert STORE_WAIT_ENV in runs[0]["reason"]
    assert runs[1]["status"] == "FINISHED"
    assert mlflow_statuses(results)["ew-seed1"] == "FINISHED"
    assert "already active" not in printed.out + printed.err


def _closed_port() -> int:
    """A local port nothing listens on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _bench(argv: list[str], timeout: float, **env: str) -> subprocess.CompletedProcess[str]:
    """``python -m bench argv`` in a process of its own, without MLflow's HTTP retry settings."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_HTTP_REQUEST")}
    environment.update(PYTHONPATH=str(REPO), **env)
    return subprocess.run(
        [sys.executable, "-m", "bench", *argv],
        cwd=REPO, env=environment, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


@pytest.mark.parametrize("command", ["run", "report"])
def test_an_unreachable_tracking_server_is_an_error_in_seconds(command: str, tmp_path: Path) -> None:
    uri = f"http://127.0.0.1:{_closed_port()}"
    argv = [*TWO_RUNS, "--results", str(tmp_path)] if command == "run" else ["report", "--results", str(tmp_path)]
    started = time.monotonic()
    done = _bench([*argv, "--tracking-uri", uri], timeout=120)  # MLflow's own retries take about 4 minutes
    printed = " ".join(done.stdout.split())
    assert done.returncode == 2, printed + done.stderr
    assert f"error: the MLflow tracking server {uri} failed at the first request" in printed
    assert "Traceback" not in done.stdout + done.stderr
    assert time.monotonic() - started < 90
    assert not (tmp_path / "mlflow.db").exists()


def test_a_tracking_server_that_never_answers_is_an_error_after_its_timeout(tmp_path: Path) -> None:
    with socket.socket() as silent:  # accepts connections (the kernel does) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        uri = f"http://127.0.0.1:{silent.getsockname()[1]}"
        done = _bench(
            ["report", "--results", str(tmp_path), "--tracking-uri", uri], timeout=90, MLFLOW_HTTP_REQUEST_TIMEOUT="2"
        )
    printed = " ".join(done.stdout.split())
    assert done.returncode == 2, printed + done.stderr
    assert f"the MLflow tracking server {uri} failed at the first request" in printed
    assert "MLFLOW_HTTP_REQUEST_TIMEOUT (seconds, 2 here)" in printed


class _SlowEmptyServer(BaseHTTPRequestHandler):
    """An MLflow server that holds no experiment and answers each request after 2.5 s."""

    def _answer(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        time.sleep(2.5)
        body = b"{}"
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _answer

    def log_message(self, *args: object) -> None:
        pass


def test_a_slow_tracking_server_is_reported_as_slow(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for variable in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.delenv(variable, raising=False)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _SlowEmptyServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    uri = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        assert main(["report", "--results", str(tmp_path), "--tracking-uri", uri]) == 2  # no runs there
    finally:
        server.shutdown()
        server.server_close()
    captured = capsys.readouterr()
    assert "no FINISHED runs" in " ".join(captured.out.split())
    assert f"the MLflow tracking server {uri} is slow: its first answer took" in captured.err


OPEN_BOTH_STORES = """
import sys, time
from pathlib import Path
from bench.studies import default_storage, open_storage
from bench.tracking import Tracker
results, go = Path(sys.argv[1]), Path(sys.argv[2])
print("ready", flush=True)
while not go.exists():
    time.sleep(0.01)
with Tracker(f"sqlite:///{results / 'mlflow.db'}", "cxr14-synthetic", results):
    open_storage(default_storage(results))
"""


def test_two_commands_on_a_fresh_results_folder_create_each_store_once(tmp_path: Path) -> None:
    results, go = tmp_path / "results", tmp_path / "go"
    environment = {**os.environ, "PYTHONPATH": str(REPO)}
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", OPEN_BOTH_STORES, str(results), str(go)],
            cwd=REPO, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        for _ in range(2)
    ]
    try:
        for process in processes:
            assert process.stdout.readline().strip() == "ready"  # both have imported everything
        go.touch()  # both open the stores now
        outcomes = [process.communicate(timeout=120) for process in processes]
    finally:
        for process in processes:
            process.kill()
    for process, (_, errors) in zip(processes, outcomes):
        assert process.returncode == 0, errors
    client = MlflowClient(tracking_uri=f"sqlite:///{results / 'mlflow.db'}")
    assert client.get_experiment_by_name(experiment_name(TASK)) is not None
    assert optuna.get_all_study_summaries(f"sqlite:///{results / 'optuna.db'}") == []


# --- Leftovers (issue 14, item 10): temporary checkpoint files, a resumed final phase -----------

LEFTOVER_RUN = [*TINY_RUN, "--epochs", "1"]
"""One method, one epoch of one training step: the run ends in seconds."""


@pytest.fixture
def interrupted_in_final_phase(results: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run :data:`LEFTOVER_RUN` into ``results`` and press Ctrl-C after its test metrics are
    logged, while its test predictions are written; return the run key (its checkpoint stays)."""
    log_artifact = Tracker.log_artifact

    def interrupt_at_the_predictions(tracker: Tracker, path: Path) -> None:
        if path.name == PREDICTIONS_ARTIFACT:
            raise KeyboardInterrupt
        log_artifact(tracker, path)

    with monkeypatch.context() as patch:
        patch.setattr(Tracker, "log_artifact", interrupt_at_the_predictions)
        assert main([*LEFTOVER_RUN, "--results", str(results)]) == 130
    (checkpoint,) = (results / "checkpoints").glob("*.pt")
    return checkpoint.stem


def final_phase_histories(results: Path) -> dict[str, int]:
    """Number of values logged for each ``summary/*`` and ``test/*`` metric of the one run."""
    client = MlflowClient(tracking_uri=f"sqlite:///{results / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(experiment_name(TASK))
    (run,) = client.search_runs([experiment.experiment_id])
    return {
        key: len(client.get_metric_history(run.info.run_id, key))
        for key in run.data.metrics
        if key.startswith(("summary/", "test/"))
    }


def test_a_resumed_final_phase_logs_each_summary_and_test_metric_once(
    results: Path, interrupted_in_final_phase: str
) -> None:
    before = final_phase_histories(results)
    assert "test/mean_auroc" in before and "summary/step_ms" in before
    assert main([*LEFTOVER_RUN, "--results", str(results)]) == 0
    after = final_phase_histories(results)
    assert set(after) >= set(before)
    assert after == dict.fromkeys(after, 1)


def test_stale_temporary_checkpoints_of_the_run_are_removed_when_it_resumes_and_no_others(
    results: Path, interrupted_in_final_phase: str
) -> None:
    checkpoints = results / "checkpoints"
    stale = checkpoints / f".{interrupted_in_final_phase}.pt.k1ll3d0.tmp"  # as a write killed mid-way leaves it
    other = checkpoints / f".{TASK}_ew_seed1_0123456789abcdef.pt.w0rk1ng.tmp"  # another run writing now
    for path in (stale, other):
        path.write_bytes(b"partial")
    assert main([*LEFTOVER_RUN, "--results", str(results)]) == 0
    assert not stale.exists()
    assert other.read_bytes() == b"partial"


# ---- Credentials: a password in --storage or --tracking-uri is never shown, stored or put on a command line ----

CREDENTIALS_RUN = [
    "--task", "cxr14-synthetic", "--task-opt", "n_images=140", "--task-opt", "min_positives=1",
    "--image-size", "16", "--batch-size", "64", "--epochs", "1", "--device", "cpu", "--no-checkpoint",
]  # fmt: skip
"""One training step per run."""


def new_database(server_url: str, name: str) -> str:
    """The URL (password included) of a new database ``name`` on the server of ``server_url``."""
    engine = create_engine(server_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    return make_url(server_url).set(database=name).render_as_string(hide_password=False)


def mlflow_contents(tracking_uri: str) -> list[dict[str, dict[str, str]]]:
    """The params and tags of every run in the MLflow store at ``tracking_uri``."""
    client = MlflowClient(tracking_uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    return [{"params": r.data.params, "tags": r.data.tags} for r in client.search_runs(experiments)]


def optuna_contents(storage_url: str) -> list[dict[str, object]]:
    """The attributes of every study in the storage at ``storage_url``, and of their trials."""
    contents: list[dict[str, object]] = []
    for name in optuna.get_all_study_names(storage_url):
        study = optuna.load_study(study_name=name, storage=storage_url)
        contents.append({"user": study.user_attrs})
        contents.extend({"user": t.user_attrs, "system": t.system_attrs} for t in study.get_trials())
    return contents


def test_a_password_in_the_store_urls_reaches_no_output_store_file_or_worker_command_line(
    postgres_url: str, results: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    storage, password = postgres_url, make_url(postgres_url).password
    assert password
    tracking = new_database(postgres_url, "credentials_mlflow")
    monkeypatch.delenv(TRACKING_URI_ENV, raising=False)
    monkeypatch.delenv(STORAGE_URL_ENV, raising=False)
    monkeypatch.chdir(results)  # MLflow keeps a database store's artifacts in ./mlruns
    started: list[tuple[list[str], dict[str, str]]] = []

    def start(command: list[str], **options: Any) -> subprocess.Popen[bytes]:
        started.append((command, options["env"]))
        return subprocess.Popen(command, **options)

    monkeypatch.setattr(worker, "subprocess", types.SimpleNamespace(Popen=start, STDOUT=subprocess.STDOUT))
    urls = ["--storage", storage, "--tracking-uri", tracking, "--results", str(results)]

    assert main(["run", *CREDENTIALS_RUN, *urls, "--methods", "ew", "--workers", "2"]) == 0
    assert main(["tune", *CREDENTIALS_RUN, *urls, "--methods", "ew", "--trials", "1"]) == 0
    # A worker elsewhere: the studies keep no password, so it needs the tracking URI with it ...
    assert main(["worker", "--storage", storage]) == 2
    # ... from its environment, as the storage URL.
    monkeypatch.setenv(TRACKING_URI_ENV, tracking)
    monkeypatch.setenv(STORAGE_URL_ENV, storage)
    assert main(["worker"]) == 0
    # A password in the query of a storage URL, in an error.
    query_url = make_url(storage).set(password=None).render_as_string() + "?password=not-the-password"
    assert main(["worker", "--storage", query_url]) == 2

    console = capsys.readouterr()
    sinks = {
        "console": console.out + console.err,
        "worker command lines": json.dumps([command for command, _ in started]),
        "MLflow runs": json.dumps(mlflow_contents(tracking)),
        "Optuna studies and trials": json.dumps(optuna_contents(storage), default=str),
        **{str(path): path.read_bytes().decode(errors="replace") for path in results.rglob("*") if path.is_file()},
    }
    assert [where for where, content in sinks.items() if password in content or "not-the-password" in content] == []

    # The URLs are shown and kept, without the password; the worker started here got them by environment.
    out = sinks["console"]
    assert f"tracking at {masked(tracking)}" in out and f"storage {masked(storage)}" in out
    assert f"set {TRACKING_URI_ENV} to that URI with its password" in out
    assert "?password=***" in out and "a worker process exited" not in out
    assert {run["params"]["tracking_uri"] for run in mlflow_contents(tracking)} == {masked(tracking)}
    assert len(started) == 1 and {k: started[0][1][k] for k in (STORAGE_URL_ENV, TRACKING_URI_ENV)} == {
        STORAGE_URL_ENV: storage,
        TRACKING_URI_ENV: tracking,
    }
    assert any(path.parent.name == "logs" for path in map(Path, sinks)) and list(results.glob("summary-*.json"))


# --- Shared sweeps under pauses, kills and signals (issue 14, items 2, 5 and 9) -------------------

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
