"""Workers: processes that train the trials of shared studies until none is left.

    python -m bench worker --storage postgresql://user@host:5432/optuna

A worker needs only the storage URL: each study holds its run spec. It serves every study of
this harness in the storage (or those given with ``--studies``): it claims one waiting
trial (a tuning trial or a grid cell), trains it while recording heartbeats, records the
outcome, and repeats. When nothing waits but trials still run elsewhere, it checks them every
heartbeat and retries the trial of a worker that died; it stops when every trial is over.
Ctrl-C or SIGTERM ends its trial's run KILLED and queues the trial again, with the same
parameters; a second signal does not cut that short.
``--results``, ``--tracking-uri`` and ``--device`` replace the study's values on this machine
(e.g. a path to a shared disk, a common MLflow server, another GPU).

A password stays off the command line, where ``ps`` shows it: PostgreSQL reads it from
``PGPASSWORD`` or ``PGPASSFILE``, or the whole storage URL comes from ``BENCH_STORAGE_URL``
instead of ``--storage``. A study keeps its tracking URI with the password hidden; the worker
takes that URI with its password from ``MLFLOW_TRACKING_URI`` (:mod:`bench.credentials`).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from optuna.trial import TrialState
from rich.console import Console

import tasks
from bench.credentials import STORAGE_URL_ENV, TRACKING_URI_ENV, masked, unmasked
from bench.errors import INPUT_ERRORS, print_error
from bench.grid import run_grid_cell
from bench.signals import interrupts_held, interruption_exit_code, interruption_reason, interruption_signal
from bench.spec import RunSpec, resolve_spec
from bench.studies import (
    KIND_ATTR,
    SPEC_ATTR,
    WORKER_ATTR,
    Claim,
    SharedStudy,
    claim_waiting_trial,
    fail_stale_trials,
    finish_trial,
    harness_study_names,
    heartbeat,
    load_shared_study,
    open_storage,
    worker_id,
)
from bench.tune import run_tuning_trial

JOBS: dict[str, Callable[[SharedStudy, Claim, WorkerContext], str]] = {
    "tune": run_tuning_trial,
    "grid": run_grid_cell,
}
"""What a worker does with a claimed trial, by the kind of its study: train it, print a line on
how it ended, return the trial's final state name."""
POLL_SECONDS = 2.0
"""How often an idle worker looks at the storage."""
HELPER_EXIT_SECONDS = 60.0
"""How long worker processes get to end their trials after an interrupt or error before they are killed."""


@dataclass
class WorkerContext:
    """What a worker keeps across trials: the run options of its command line, the MLflow
    tracking URI of its environment, and the task suites it has built (once per task and options)."""

    overrides: dict[str, Any]
    console: Console
    tracking_uri: str | None = None
    """The tracking URI with its password, for a study that stores it hidden (``MLFLOW_TRACKING_URI``)."""
    suites: dict[str, tasks.TaskSuite] = field(default_factory=dict)

    def spec(self, shared: SharedStudy) -> RunSpec:
        """The study's run spec with this worker's overrides, validated on this machine.

        A study keeps its tracking URI with the password hidden; unless ``--tracking-uri``
        replaces it, the password comes from :attr:`tracking_uri` when that is the same URI.
        """
        stored = shared.attrs[SPEC_ATTR]
        overrides = dict(self.overrides)
        if "tracking_uri" not in overrides:
            overrides["tracking_uri"] = unmasked(stored["tracking_uri"], self.tracking_uri)
            if overrides["tracking_uri"] is None:
                raise ValueError(
                    f"study {shared.name!r} tracks its runs at {stored['tracking_uri']}, whose password the study "
                    f"does not keep: set {TRACKING_URI_ENV} to that URI with its password, or give --tracking-uri "
                    "(or leave the password out of the URI; PostgreSQL reads PGPASSWORD or PGPASSFILE)"
                )
        return resolve_spec(stored, overrides)

    def suite(self, spec: RunSpec) -> tasks.TaskSuite:
        key = json.dumps([spec.task, spec.task_options], sort_keys=True, default=str)
        if key not in self.suites:
            self.suites[key] = tasks.create(spec.task, **spec.task_options)
        return self.suites[key]


def work(url: str, names: Sequence[str] | None, context: WorkerContext) -> Counter[str]:
    """Serve the studies ``names`` (all of this harness's when ``None``) until every trial is
    over; return how many trials this worker ended in each state."""
    ended: Counter[str] = Counter()
    for name in names or harness_study_names(url):
        context.spec(load_shared_study(url, name))  # bad overrides fail before any claim
    while True:
        studies = [load_shared_study(url, name) for name in names or harness_study_names(url)]
        claimed = None
        try:
            with interrupts_held():  # a claim is recorded whole, and then handled below
                claimed = _claim(studies)
            if claimed is None:
                if not any(s.pending() for s in studies):
                    return ended
                time.sleep(POLL_SECONDS)  # trials run elsewhere: wait for them, retry them if their worker dies
                continue
            shared, claim = claimed
            with heartbeat(shared, claim):
                state = JOBS[shared.attrs[KIND_ATTR]](shared, claim, context)
        except KeyboardInterrupt as interrupt:
            if claimed is not None:
                with interrupts_held(deliver=False):  # a second Ctrl-C must not leave the trial RUNNING
                    finish_trial(*claimed, state=TrialState.FAIL, failure=interruption_reason(interrupt), retry=True)
            raise
        ended[state] += 1


def _claim(studies: Sequence[SharedStudy]) -> tuple[SharedStudy, Claim] | None:
    """Retry the trials of dead workers, then claim the first waiting trial of ``studies``."""
    for shared in studies:
        fail_stale_trials(shared)
        claim = claim_waiting_trial(shared)
        if claim is not None:
            return shared, claim
    return None


def run_workers(
    url: str, names: Sequence[str], count: int, results: Path, tracking_uri: str, console: Console
) -> None:
    """Work on the studies ``names`` with ``count`` worker processes: this one, and ``count - 1``
    started here (``python -m bench worker``, their output in ``<results>/logs``).

    The storage ``url`` and the MLflow ``tracking_uri``, which may hold passwords, reach the
    started processes in their environment (:data:`~bench.credentials.STORAGE_URL_ENV`,
    ``MLFLOW_TRACKING_URI``), not on their command line. Ctrl-C or SIGTERM here is passed on to
    them (another error here ends them with SIGTERM), and this process returns only once they
    have ended: none is left running on its own.
    """
    log_dir = Path(results) / "logs"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    command = [sys.executable, "-m", "bench", "worker", "--studies", ",".join(names)]
    environment = {**os.environ, STORAGE_URL_ENV: url, TRACKING_URI_ENV: tracking_uri}
    helpers: list[tuple[subprocess.Popen[bytes], Path]] = []
    try:
        for index in range(1, count):
            log_dir.mkdir(parents=True, exist_ok=True)
            log_path = log_dir / f"{stamp}-worker{index}.log"
            with log_path.open("w") as log:
                # A session of their own: Ctrl-C in the terminal reaches this process only, which
                # passes it on once (a second one would cut their clean-up short).
                process = subprocess.Popen(
                    command, env=environment, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
                )
                helpers.append((process, log_path))
        if helpers:
            console.print(
                f"{len(helpers)} more worker process(es) started; their output: {log_dir}/{stamp}-worker*.log"
            )
        work(url, names, WorkerContext({}, console, tracking_uri))
        for process, _ in helpers:
            process.wait()
    except BaseException as error:
        signum = interruption_signal(error) if isinstance(error, KeyboardInterrupt) else signal.SIGTERM
        _stop_helpers([process for process, _ in helpers], signum)
        raise
    for process, log_path in helpers:
        if process.returncode != 0:
            console.print(f"[red]a worker process exited with code {process.returncode}; see {log_path}[/]")


def _stop_helpers(processes: Sequence[subprocess.Popen[bytes]], signum: signal.Signals) -> None:
    """Pass ``signum`` on to the worker processes this one started and wait until they have
    ended their trials; kill those that have not within :data:`HELPER_EXIT_SECONDS`, or at
    once on a second interrupt: none outlives this process."""
    for process in processes:
        if process.poll() is None:
            process.send_signal(signum)
    deadline = time.monotonic() + HELPER_EXIT_SECONDS
    try:
        for process in processes:
            process.wait(timeout=max(deadline - time.monotonic(), 0.0))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()


def worker_command(args: argparse.Namespace, console: Console) -> int:
    """``python -m bench worker``: exit code 0 when every trial is over, 1 when trials are left
    that a worker on another machine holds, 2 on bad input, 130 on Ctrl-C and 143 on SIGTERM."""
    overrides = {k: getattr(args, k) for k in ("results", "tracking_uri", "device") if getattr(args, k) is not None}
    names = [n for n in args.studies.split(",") if n.strip()] if args.studies else None
    url = args.storage or os.environ.get(STORAGE_URL_ENV)
    try:
        if not url:
            raise ValueError(f"no storage: give --storage URL, or set {STORAGE_URL_ENV} to it")
        open_storage(url, must_exist=True)  # a worker joins a sweep: a mistyped path creates nothing
        ended = work(url, names, WorkerContext(overrides, console, os.environ.get(TRACKING_URI_ENV)))
    except INPUT_ERRORS as error:
        return print_error(console, error)
    except KeyboardInterrupt as interrupt:
        console.print(f"[yellow]{interruption_reason(interrupt)}: this worker's trial is queued again[/]")
        return interruption_exit_code(interrupt)
    summary = ", ".join(f"{n} {state}" for state, n in sorted(ended.items())) or "nothing to do"
    console.print(f"worker {worker_id()} on {masked(url)}: {summary}")
    held = [
        f"{shared.name} trial {trial.number} (worker {trial.user_attrs.get(WORKER_ATTR, 'not recorded')})"
        for shared in (load_shared_study(url, name) for name in names or harness_study_names(url))
        for trial in shared.foreign_claims()
    ]
    if held:
        print_error(
            console,
            f"trials still RUNNING, held by workers on other machines: {'; '.join(held)}. A worker started on "
            "that machine retries them once their process is gone",
        )
        return 1
    return 0
