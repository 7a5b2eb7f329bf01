"""Stores that are locked or being created: a bounded wait instead of a failure or a race.

Both stores of the harness are SQLite files by default, which several processes may write:
the MLflow tracking store (``<results>/mlflow.db``) and the Optuna storage
(``<results>/optuna.db``).

**Locked.** A process that holds a write lock on a SQLite file (another command, ``mlflow
ui``, a ``sqlite3`` shell) makes every other writer wait; past SQLite's busy timeout the
write fails with ``database is locked``. :func:`wait_while_locked` tries such a call again,
with growing pauses, for up to :func:`store_wait_seconds` (:data:`STORE_WAIT_ENV`, default
:data:`DEFAULT_STORE_WAIT_SECONDS`), says once on standard error which store it waits for,
and then fails with :class:`StoreLockedError`, which names the store.

**Created.** Creating a store's tables (MLflow's and Optuna's Alembic migrations) is not
safe in two processes at once: two commands started on a fresh results folder would both
migrate. :func:`creating_store` serialises opening a SQLite store with a lock file next to it
(``<file>.lock``), so one process creates the tables and the other finds them.
"""

from __future__ import annotations

import math
import os
import sqlite3
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from filelock import FileLock, Timeout
from tqdm.auto import tqdm

STORE_WAIT_ENV = "BENCH_STORE_WAIT_SECONDS"
"""Environment variable: seconds to wait for a locked SQLite store before failing."""
DEFAULT_STORE_WAIT_SECONDS = 60.0
FIRST_PAUSE_SECONDS = 0.25
"""The pause before the first retry of a locked store; each later pause doubles, up to :data:`MAX_PAUSE_SECONDS`."""
MAX_PAUSE_SECONDS = 8.0

Value = TypeVar("Value")


class StoreLockedError(ConnectionError):
    """A SQLite store stayed locked by another process for longer than :func:`store_wait_seconds`."""


def store_wait_seconds() -> float:
    """Seconds to wait for a locked store: :data:`STORE_WAIT_ENV`, else :data:`DEFAULT_STORE_WAIT_SECONDS`."""
    text = os.environ.get(STORE_WAIT_ENV)
    if text is None:
        return DEFAULT_STORE_WAIT_SECONDS
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds >= 0):
        raise ValueError(
            f"{STORE_WAIT_ENV}={text!r}: expected the seconds to wait for a locked store, a number >= 0 "
            f"(default {DEFAULT_STORE_WAIT_SECONDS:g})"
        )
    return seconds


def is_locked(error: BaseException) -> bool:
    """Whether ``error``, or an error it was raised from, is SQLite's ``database is locked``
    (as MLflow and SQLAlchemy raise it, wrapped)."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, sqlite3.OperationalError) and "database is locked" in str(current):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


def wait_while_locked(action: Callable[[], Value], store: str) -> Value:
    """``action()``; while it fails because a SQLite store is locked, called again after growing
    pauses for up to :func:`store_wait_seconds`. ``store`` names the store in messages, e.g.
    ``MLflow tracking store sqlite:///results/mlflow.db``.

    The first wait is announced on standard error. A store still locked after the wait raises
    :class:`StoreLockedError` naming it; any other error propagates at once.
    """
    wait = store_wait_seconds()
    deadline = time.monotonic() + wait
    pause = FIRST_PAUSE_SECONDS
    announced = False
    while True:
        try:
            return action()
        except Exception as error:
            if not is_locked(error):
                raise
            left = deadline - time.monotonic()
            if left <= 0:
                raise StoreLockedError(
                    f"the {store} is locked by another process (a bench command, mlflow ui or a sqlite3 "
                    f"shell holding a write lock) and stayed locked for {wait:g} s. Stop that process, or wait "
                    f"longer: set {STORE_WAIT_ENV} (seconds)"
                ) from error
            if not announced:
                tqdm.write(
                    f"the {store} is locked by another process; waiting up to {wait:g} s ({STORE_WAIT_ENV})",
                    file=sys.stderr,
                )
                announced = True
            time.sleep(min(pause, left))
            pause = min(2 * pause, MAX_PAUSE_SECONDS)


@contextmanager
def creating_store(database: Path) -> Iterator[None]:
    """Hold the lock file ``<database>.lock`` inside: one process at a time opens (and, the first
    time, creates) the SQLite store ``database``.

    Raises:
        StoreLockedError: another process held the lock for longer than :func:`store_wait_seconds`.
    """
    database.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(f"{database}.lock")
    wait = store_wait_seconds()
    try:
        lock.acquire(timeout=wait)
    except Timeout:
        raise StoreLockedError(
            f"another process has been creating or opening the store {database} for {wait:g} s (it holds "
            f"{lock.lock_file}). Wait for it, or set {STORE_WAIT_ENV} (seconds) to wait longer"
        ) from None
    try:
        yield
    finally:
        lock.release()
