"""Command-line options of shared sweeps: ``tune``, ``worker``, and ``run --storage/--workers/--tuned``.

Only the parsers live here (the commands are in :mod:`bench.tune`, :mod:`bench.worker` and
:mod:`bench.runner`), so that building the CLI does not import MLflow.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

from bench.credentials import STORAGE_URL_ENV
from bench.studies import DEFAULT_HEARTBEAT_SECONDS, GRACE_HEARTBEATS


def add_storage_options(parser: argparse.ArgumentParser) -> None:
    """``--storage``, ``--workers`` and ``--heartbeat``, shared by ``tune`` and ``run``."""
    parser.add_argument(
        "--storage",
        help="Optuna storage shared by all workers: sqlite:///PATH, postgresql://USER:PASSWORD@HOST:PORT/DB, "
        "mysql+pymysql://..., or a journal file PATH.log (default sqlite:///<results>/optuna.db)",
    )
    parser.add_argument(
        "--workers", type=int, help="worker processes on this machine, this one included (default 1: this one)"
    )
    parser.add_argument(
        "--heartbeat",
        type=int,
        help=f"seconds between a running trial's heartbeats; another worker retries a trial silent for "
        f"{GRACE_HEARTBEATS} heartbeats (default {DEFAULT_HEARTBEAT_SECONDS}; database storages only)",
    )


def add_tune_parser(commands: Any) -> argparse.ArgumentParser:
    """Register ``tune`` with its own options; the caller adds the run options."""
    tune = commands.add_parser(
        "tune",
        help="tune each method's hyperparameters with Optuna, the same budget for every method",
        description="One Optuna study per (task, method): lr, weight decay and the method's declared "
        "hyperparameters; objective: the best validation value of the suite's primary metric; "
        "median pruning per epoch; every trial an MLflow run nested under its study's run.",
        argument_default=argparse.SUPPRESS,
    )
    tune.add_argument("--trials", type=int, required=True, help="trials per method (the same budget for each)")
    add_storage_options(tune)
    tune.add_argument(
        "--space",
        action="append",
        metavar="NAME=LOW:HIGH|A,B",
        help="replace a search dimension (repeatable): lr, weight_decay or METHOD.HPARAM, "
        "e.g. --space lr=1e-4:1e-2 --space mgda.normalization=none,l2",
    )
    tune.add_argument(
        "--full-trials",
        dest="full_trials",
        action="store_true",
        help="also test each trial (test metrics and predictions) and keep its best checkpoint, as `run` "
        "does (default: a trial only trains and validates; the test split plays no part in tuning)",
    )
    return tune


def add_run_sweep_options(run: argparse.ArgumentParser) -> None:
    """``run``'s options for a grid shared by workers and for tuned settings."""
    add_storage_options(run)
    run.add_argument(
        "--tuned",
        action="store_true",
        help="train each method with its best tuning trial's lr, weight decay and hyperparameters "
        "(from the studies in --storage)",
    )


def add_worker_parser(commands: Any) -> None:
    """Register ``worker``."""
    worker = commands.add_parser(
        "worker",
        help="train the waiting trials of shared tuning studies and grids (join from any machine)",
        description="Serve every study of this harness in the storage (or --studies) until all "
        "their trials are over; retries the trials of workers that died (database storages).",
    )
    worker.add_argument(
        "--storage",
        help=f"the sweep's Optuna storage URL (or journal file PATH.log); default ${STORAGE_URL_ENV}, which keeps "
        "a password off the command line",
    )
    worker.add_argument("--studies", help="comma list of study names (default: every study of this harness there)")
    worker.add_argument("--results", help="results directory on this machine (default: the study's)")
    worker.add_argument("--tracking-uri", dest="tracking_uri", help="MLflow tracking URI here (default: the study's)")
    worker.add_argument("--device", help="cpu, cuda or cuda:N on this machine (default: the study's)")


@dataclass(frozen=True)
class StorageOptions:
    """``--storage``, ``--workers``, ``--heartbeat`` and ``--tuned`` (``None``: not given)."""

    storage: str | None
    workers: int | None
    heartbeat: int
    tuned: bool

    @classmethod
    def pop(cls, args: argparse.Namespace) -> StorageOptions:
        """Take these options out of ``args`` (what stays are run options); validate them."""
        given = vars(args)
        options = cls(
            given.pop("storage", None),
            given.pop("workers", None),
            given.pop("heartbeat", DEFAULT_HEARTBEAT_SECONDS),
            given.pop("tuned", False),
        )
        if options.workers is not None and options.workers < 1:
            raise ValueError(f"--workers: expected a positive integer, got {options.workers}")
        if options.heartbeat < 1:
            raise ValueError(f"--heartbeat: expected a positive number of seconds, got {options.heartbeat}")
        return options

    @property
    def shared(self) -> bool:
        """Whether the run's grid is shared through a storage (``--storage`` or ``--workers``)."""
        return self.storage is not None or self.workers is not None
