"""Sweeps shared through an Optuna storage: studies as queues of training jobs.

Every sweep that several workers share is an Optuna study in one storage (a URL: SQLite,
PostgreSQL, MySQL, or a journal file). The study's user attributes say what it is (``kind``:
``tune`` or ``grid``) and hold the resolved run spec, so a worker on another machine needs
only the storage URL (and, for a tracking URI with a password, which the study keeps hidden,
that URI: :mod:`bench.credentials`). Each trial of the study is one training run (a tuning trial, or one
(method, seed) cell of a grid).

**Exactly once.** The whole budget is put in the study up front as WAITING trials. A worker
claims one by moving it from WAITING to RUNNING, which the storage does atomically (a
database transaction; the log order of a journal file): of two workers that try, one wins.
Workers never create trials, so a study never exceeds its budget (``Study.optimize`` with
``MaxTrialsCallback`` can: workers that finish together may each start one more trial).

**Dead workers.** With a database storage every running trial records a heartbeat
(Optuna's ``RDBStorage`` heartbeat, every ``heartbeat`` seconds, judged by the database's
clock). A trial whose last heartbeat is older than the grace period (three heartbeats) is
failed by the next worker that looks (``optuna.storages.fail_stale_trials``), and
``RetryHeartbeatStaleTrialCallback`` queues a copy with the same parameters; the copy
continues the dead trial's MLflow run and, where its epoch checkpoint is readable (the same
results directory), its last epoch. Optuna 5 has no heartbeat for journal files: there a
worker records its host, process id and process start time with its claim, and a claim on
this machine whose process is gone is failed and retried the same way. A claim of a worker on
another machine cannot be judged from here: it stays RUNNING, and the commands say which
trials it holds; a worker started on that machine retries them if their process is gone.

**Claims can be lost.** A worker whose heartbeat stopped for the grace period (the process
was paused, e.g. with SIGSTOP, or its machine stalled) has had its trial retried by another
worker. Before it writes anything for a trial it checks that the trial is still its own
(:func:`holds_claim`), and stops that trial without writing when it is not.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import threading
import urllib.parse
import warnings
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import psutil
import sqlalchemy
from optuna.exceptions import ExperimentalWarning, UpdateFinishedTrialError
from optuna.storages import (
    BaseStorage,
    JournalStorage,
    RDBStorage,
    RetryHeartbeatStaleTrialCallback,
)
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, TrialState

from bench.credentials import masked
from bench.stores import creating_store

DEFAULT_HEARTBEAT_SECONDS = 30
GRACE_HEARTBEATS = 3
"""A running trial is stale after this many heartbeat intervals without a heartbeat."""
MAX_RETRIES = 3
"""How often a trial whose worker died is queued again before it stays FAIL."""
KIND_ATTR = "kind"
"""Study user attribute marking the studies of this harness: ``tune`` or ``grid``."""
SPEC_ATTR = "spec"
"""Study user attribute: the resolved run spec (``RunSpec.to_dict()``) the workers train with; a
password of its tracking URI is hidden there, and workers take it from their own environment."""
CONFIG_ATTR = "config"
"""Study user attribute: the spec without :data:`WHERE_KEYS`, compared when a command is run again."""
WHERE_KEYS = ("results", "tracking_uri", "device", "save_checkpoint")
"""Spec keys that say where (or whether) results are kept, not what is trained."""
HEARTBEAT_ATTR = "heartbeat"
WORKER_ATTR = "worker"
"""Trial user attribute: ``host:pid`` of the worker that ran the trial."""
WORKER_STARTED_ATTR = "worker_started"
"""Trial user attribute: when the worker's process started (seconds since the epoch), which
tells it apart from a later process that got the same process id."""
FAILURE_ATTR = "failure"
"""Trial user attribute: why the trial failed."""
CONNECT_ARGS: dict[str, dict[str, Any]] = {
    "sqlite": {"timeout": 60},  # wait up to 60 s for another worker's write lock
    "postgresql": {"connect_timeout": 10},  # an unreachable server is an error after 10 s
    "mysql": {"connect_timeout": 10},
}
"""Database driver options by SQLAlchemy backend name."""

DRIVER_PACKAGES = {
    "psycopg": "'psycopg[binary]' (or this project's [postgresql] extra)",
    "psycopg2": "psycopg2-binary",
    "pymysql": "pymysql",
    "MySQLdb": "mysqlclient",
}
"""What to ``pip install`` for a database driver module that is missing."""

_OPEN: dict[tuple[str, int | None], BaseStorage] = {}


def default_storage(results: Path) -> str:
    """The default storage: SQLite at ``<results>/optuna.db``."""
    return f"sqlite:///{(Path(results) / 'optuna.db').resolve()}"


def open_storage(url: str, heartbeat: int | None = None, *, must_exist: bool = False) -> BaseStorage:
    """The Optuna storage at ``url``, connected; a clear error when it cannot be opened.

    ``url`` is a SQLAlchemy database URL (``sqlite:///results/optuna.db``,
    ``postgresql://user:password@host:5432/db``, ``mysql+pymysql://...``) or the path of a
    journal file ending in ``.log``. ``heartbeat`` (seconds) turns on the heartbeat of
    database storages. With ``must_exist``, a SQLite or journal file that does not exist is
    an error instead of being created. Storages are opened once per process.
    """
    if (url, heartbeat) in _OPEN:
        return _OPEN[(url, heartbeat)]
    if "://" not in url:
        storage = _open_journal(url, must_exist)
    else:
        storage = _open_database(url, heartbeat, must_exist)
    _OPEN[(url, heartbeat)] = storage
    return storage


def _open_journal(path_text: str, must_exist: bool) -> BaseStorage:
    path = Path(path_text)
    if path.suffix != ".log":
        raise ValueError(
            f"storage {path_text!r}: expected a database URL (sqlite:///results/optuna.db, "
            "postgresql://user:password@host/db, mysql+pymysql://...) or a journal file path ending in .log"
        )
    if must_exist and not path.is_file():
        raise ValueError(f"no Optuna journal file at {path}; check --storage")
    if not path.parent.is_dir():
        raise ValueError(f"storage {path_text}: the directory {path.parent} does not exist")
    return JournalStorage(JournalFileBackend(str(path)))


def _open_database(url: str, heartbeat: int | None, must_exist: bool) -> BaseStorage:
    parsed = _database_url(url)
    shown = masked(url)
    backend = parsed.get_backend_name()
    database = None
    if backend == "sqlite" and parsed.database not in (None, "", ":memory:"):
        database = Path(parsed.database)
        if must_exist and not database.is_file():
            raise ValueError(f"no Optuna storage at {database}; check --storage (or run `python -m bench tune` first)")
    if backend == "postgresql" and parsed.get_driver_name() == "psycopg2" and not _importable("psycopg2"):
        parsed = parsed.set(drivername="postgresql+psycopg")  # psycopg 3, the driver this project installs
    _check_driver(parsed, shown)
    try:
        # One process at a time creates a SQLite storage's tables (Optuna's migrations).
        with creating_store(database) if database is not None else nullcontext(), warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)
            return RDBStorage(
                parsed.render_as_string(hide_password=False),
                engine_kwargs={"connect_args": CONNECT_ARGS.get(backend, {})},
                heartbeat_interval=heartbeat,
                grace_period=None if heartbeat is None else GRACE_HEARTBEATS * heartbeat,
                heartbeat_stale_trial_callback=None
                if heartbeat is None
                else RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRIES),
            )
    except sqlalchemy.exc.ArgumentError as error:
        raise ValueError(f"storage {shown}: {error}") from None
    except sqlalchemy.exc.OperationalError as error:
        reason = str(error.orig).strip().splitlines()[0] if error.orig is not None else str(error)
        raise ConnectionError(
            f"cannot open the Optuna storage {shown}: {reason}. Check the host, port, user, password "
            "and database name in the URL, and that the database server is running and reachable"
        ) from None


def _database_url(url: str) -> sqlalchemy.engine.URL:
    """``url`` parsed; a ValueError that says how to write it when it is not a database URL,
    its port is not a number, or it names PostgreSQL ``postgres`` (SQLAlchemy's name is
    ``postgresql``). No message shows the password."""
    try:
        parsed = sqlalchemy.engine.make_url(url)
    except sqlalchemy.exc.ArgumentError:
        raise ValueError(f"storage {masked(url)!r} is not a database URL, e.g. sqlite:///results/optuna.db") from None
    except ValueError:  # SQLAlchemy reads the port with int()
        host_and_port = urllib.parse.urlsplit(url).netloc.rpartition("@")[2]
        raise ValueError(
            f"storage URL: the port in {host_and_port!r} is not a number; write HOST:PORT with the port in "
            "digits, e.g. postgresql://USER:PASSWORD@db-host:5432/DB"
        ) from None
    dialect, plus, driver = parsed.drivername.partition("+")
    if dialect == "postgres":
        fixed = parsed.set(drivername=f"postgresql{plus}{driver}")
        raise ValueError(
            f"storage {masked(url)}: SQLAlchemy names PostgreSQL 'postgresql', not 'postgres': use "
            f"{fixed.render_as_string(hide_password=True)}"
        )
    return parsed


def _check_driver(parsed: sqlalchemy.engine.URL, shown: str) -> None:
    """A ValueError naming what to install when the database dialect or driver of ``parsed``
    (shown as ``shown``) cannot be loaded."""
    try:
        parsed.get_dialect().import_dbapi()
    except sqlalchemy.exc.NoSuchModuleError:
        raise ValueError(
            f"storage {shown}: SQLAlchemy has no database dialect {parsed.drivername!r}; use sqlite:///PATH, "
            "postgresql://USER:PASSWORD@HOST:PORT/DB, mysql+pymysql://USER:PASSWORD@HOST:PORT/DB or a PATH.log journal"
        ) from None
    except ImportError as error:
        module = error.name or parsed.get_driver_name()
        raise ValueError(
            f"storage {shown}: the database driver {module!r} is not installed; "
            f"pip install {DRIVER_PACKAGES.get(module, module)}"
        ) from None


def _importable(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def worker_id() -> str:
    """``host:pid`` of this process, recorded on every trial it runs."""
    return f"{socket.gethostname()}:{os.getpid()}"


def local_worker_alive(trial: FrozenTrial) -> bool | None:
    """Whether the worker process that claimed ``trial`` still runs: ``None`` when it cannot be
    told from here (a worker on another machine, or a claim that recorded no worker yet).

    A process that has exited (a zombie too) or whose process id now belongs to a process
    started at another time is gone.
    """
    host, _, pid = str(trial.user_attrs.get(WORKER_ATTR, "")).rpartition(":")
    started = trial.user_attrs.get(WORKER_STARTED_ATTR)
    if host != socket.gethostname() or not pid.isdigit() or started is None:
        return None
    try:
        process = psutil.Process(int(pid))
        return process.status() != psutil.STATUS_ZOMBIE and process.create_time() == started
    except psutil.NoSuchProcess:
        return False


@dataclass
class SharedStudy:
    """A study of this harness and the storage it lives in (opened with its heartbeat)."""

    study: optuna.Study
    storage: BaseStorage

    @property
    def name(self) -> str:
        return self.study.study_name

    @property
    def attrs(self) -> dict[str, Any]:
        return self.study.user_attrs

    @property
    def heartbeat(self) -> int | None:
        """Seconds between heartbeats, or ``None`` when the storage has no heartbeat."""
        if not isinstance(self.storage, RDBStorage):
            return None
        return self.attrs.get(HEARTBEAT_ATTR)

    def counts(self) -> Counter[str]:
        """Number of trials per state name (WAITING, RUNNING, COMPLETE, PRUNED, FAIL)."""
        return Counter(t.state.name for t in self.study.get_trials(deepcopy=False))

    def pending(self) -> bool:
        """Whether trials are still WAITING, or RUNNING where a dead worker would be detected
        (a database storage's heartbeat; in a journal file, a worker process on this machine)."""
        counts = self.counts()
        if counts["WAITING"] > 0 or (counts["RUNNING"] > 0 and self.heartbeat is not None):
            return True
        return any(local_worker_alive(t) for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))

    def foreign_claims(self) -> list[FrozenTrial]:
        """The RUNNING trials whose worker cannot be judged from here (a journal file's claims
        by workers on other machines): nobody here retries them."""
        if self.heartbeat is not None:
            return []
        running = self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        return [t for t in running if local_worker_alive(t) is None]


def load_shared_study(url: str, name: str) -> SharedStudy:
    """Study ``name`` of this harness at ``url``; a database storage opened with the study's heartbeat."""
    plain = open_storage(url)
    try:
        study = optuna.load_study(study_name=name, storage=plain)
    except KeyError:
        known = ", ".join(harness_study_names(url)) or "none"
        raise ValueError(f"no study {name!r} in {masked(url)}; the studies of this harness there: {known}") from None
    if KIND_ATTR not in study.user_attrs:
        raise ValueError(f"study {name!r} in {masked(url)} was not made by `python -m bench`")
    storage = open_storage(url, study.user_attrs.get(HEARTBEAT_ATTR)) if isinstance(plain, RDBStorage) else plain
    return SharedStudy(optuna.load_study(study_name=name, storage=storage), storage)


def harness_study_names(url: str) -> list[str]:
    """Names of the studies of this harness in the storage at ``url``, oldest first."""
    summaries = optuna.get_all_study_summaries(open_storage(url), include_best_trial=False)
    return [s.study_name for s in summaries if KIND_ATTR in s.user_attrs]


def create_shared_study(
    url: str,
    name: str,
    direction: str,
    identity: Mapping[str, Any],
    extra: Mapping[str, Any],
    heartbeat: int | None,
) -> SharedStudy:
    """Create study ``name`` (or load it if it exists) and check or set its attributes.

    ``identity`` says what the study computes (kind, configuration, search space): an
    existing study must have the same, else the error names what differs. ``extra`` (e.g.
    where results go) and ``heartbeat`` are set when the study is created and kept after.
    """
    identity = json.loads(json.dumps(identity))  # as the storage returns it: tuples become lists
    plain = open_storage(url)
    study = optuna.create_study(study_name=name, storage=plain, direction=direction, load_if_exists=True)
    existing = study.user_attrs
    if KIND_ATTR in existing:
        differing = sorted(k for k in identity if existing.get(k) != identity[k])
        if differing:
            details = "; ".join(_difference(k, existing.get(k), identity[k]) for k in differing)
            raise ValueError(
                f"study {name!r} in {masked(url)} was made for another configuration ({details}). "
                f"Use another --storage, or delete the study: optuna delete-study --study-name '{name}' "
                f"--storage '{masked(url)}'"
            )
    else:
        for key, value in {**extra, HEARTBEAT_ATTR: heartbeat, **identity}.items():
            study.set_user_attr(key, value)  # the kind last: a study without it is not picked up
    return load_shared_study(url, name)


def _difference(key: str, before: Any, now: Any) -> str:
    if isinstance(before, Mapping) and isinstance(now, Mapping):
        keys = sorted(k for k in {*before, *now} if before.get(k) != now.get(k))
        return f"{key}: " + ", ".join(f"{k} {before.get(k)!r} in the study, {now.get(k)!r} now" for k in keys)
    return f"{key}: {before!r} in the study, {now!r} now"


def add_waiting_trials(shared: SharedStudy, jobs: list[dict[str, Any]]) -> None:
    """Queue one WAITING trial per job; a job's items become the trial's user attributes."""
    for job in jobs:
        shared.study.add_trial(optuna.trial.create_trial(state=TrialState.WAITING, user_attrs=job))


@dataclass(frozen=True)
class Claim:
    """A trial this worker moved from WAITING to RUNNING."""

    trial_id: int
    frozen: FrozenTrial

    @property
    def first_number(self) -> int:
        """The number of the trial this one retries, else its own: the job's lasting identity."""
        return int(self.frozen.system_attrs.get("failed_trial", self.frozen.number))


def fail_stale_trials(shared: SharedStudy) -> None:
    """Fail the running trials whose worker is dead, and queue their retries: with a heartbeat,
    those whose worker stopped sending it; without (a journal file), those claimed by a
    process of this machine that is gone."""
    if shared.heartbeat is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)
            optuna.storages.fail_stale_trials(shared.study)
        return
    study_id = shared.storage.get_study_id_from_name(shared.name)
    for trial in shared.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if local_worker_alive(trial) is False:
            claim = Claim(shared.storage.get_trial_id_from_study_id_trial_number(study_id, trial.number), trial)
            finish_trial(
                shared, claim, state=TrialState.FAIL, retry=True,
                failure=f"its worker process {trial.user_attrs[WORKER_ATTR]} is gone (killed?)",
            )  # fmt: skip


def claim_waiting_trial(shared: SharedStudy) -> Claim | None:
    """Move the first WAITING trial this worker can get to RUNNING; ``None`` when none is left."""
    storage = shared.storage
    study_id = storage.get_study_id_from_name(shared.name)
    for frozen in storage.get_all_trials(study_id, deepcopy=False, states=(TrialState.WAITING,)):
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, frozen.number)
        try:
            if not storage.set_trial_state_values(trial_id, state=TrialState.RUNNING):
                continue  # another worker was faster
        except UpdateFinishedTrialError:
            continue
        if shared.heartbeat is not None:
            storage.record_heartbeat(trial_id)  # type: ignore[attr-defined]
        storage.set_trial_user_attr(trial_id, WORKER_STARTED_ATTR, psutil.Process().create_time())
        storage.set_trial_user_attr(trial_id, WORKER_ATTR, worker_id())
        return Claim(trial_id, storage.get_trial(trial_id))
    return None


def holds_claim(shared: SharedStudy, claim: Claim) -> bool:
    """Whether ``claim``'s trial is still RUNNING, that is this worker's: not failed and retried
    by another worker (its heartbeat came too late), nor ended otherwise."""
    return shared.storage.get_trial(claim.trial_id).state == TrialState.RUNNING


@contextmanager
def heartbeat(shared: SharedStudy, claim: Claim) -> Iterator[None]:
    """Record the claimed trial's heartbeat every ``shared.heartbeat`` seconds while inside."""
    interval = shared.heartbeat
    if interval is None:
        yield
        return
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(interval):
            try:
                shared.storage.record_heartbeat(claim.trial_id)  # type: ignore[attr-defined]
            except sqlalchemy.exc.SQLAlchemyError as error:  # e.g. a dropped connection: beat again next time
                warnings.warn(f"heartbeat of trial {claim.frozen.number} not recorded: {error}", stacklevel=1)

    thread = threading.Thread(target=beat, name=f"heartbeat-{claim.trial_id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def finish_trial(
    shared: SharedStudy,
    claim: Claim,
    *,
    value: float | None = None,
    state: TrialState = TrialState.COMPLETE,
    failure: str | None = None,
    retry: bool = False,
) -> None:
    """End a claimed trial: COMPLETE with ``value``, PRUNED, or FAIL with ``failure`` (kept as
    the trial's ``failure`` attribute, passwords in it hidden) and, with ``retry``, a copy queued
    to run again.

    A trial that another worker already ended (failed as stale and retried: its heartbeat
    came too late) is left as it is, and no retry is queued for it.
    """
    try:
        if not holds_claim(shared, claim):
            return
        if failure is not None:
            shared.storage.set_trial_user_attr(claim.trial_id, FAILURE_ATTR, masked(failure)[:5000])
        values = None if value is None else [value]
        shared.study.tell(claim.frozen.number, values, state=state, skip_if_finished=True)
    except UpdateFinishedTrialError:  # another worker ended it just now
        return
    if retry:
        RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRIES)(shared.study, shared.storage.get_trial(claim.trial_id))
