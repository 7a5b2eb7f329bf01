"""MLflow tracking: one experiment per task suite, one run per (method, seed).

The default store is SQLite at ``<results>/mlflow.db`` with artifacts under
``<results>/mlartifacts``; any tracking URI (a server, ``MLFLOW_TRACKING_URI``) works too.
Tuning studies (``bench tune``) log into the same experiment; their runs carry the tag
:data:`TUNING_STUDY_TAG`, and readers of results leave them out.

**A store that fails.** A locked SQLite store is waited for, for a bounded time
(:mod:`bench.stores`), at every call; a store that stays locked or fails ends only the run
that meets it: MLflow's active run is cleared whatever happens, so the next run starts. A
tracking server is first asked once, quickly (:func:`first_contact`): one that is down or does
not answer is an error in seconds, not after MLflow's retries (about 4 minutes).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from functools import partial
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

import mlflow
import torch
from mlflow.data.code_dataset_source import CodeDatasetSource
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import Run, RunStatus
from mlflow.environment_variables import MLFLOW_HTTP_REQUEST_MAX_RETRIES, MLFLOW_HTTP_REQUEST_TIMEOUT, MLFLOW_RUN_ID
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from tqdm.auto import tqdm

from bench.credentials import masked
from bench.signals import interrupts_held
from bench.stores import creating_store, is_locked, store_wait_seconds, wait_while_locked

REPO_ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("torchvision", "numpy", "scipy", "scikit-learn", "mlflow", "libmtl")

TUNING_STUDY_TAG = "optuna.study"
"""MLflow run tag naming the tuning study a run belongs to (the study's run and its trials):
such a run searches settings and is never a benchmark result."""
TUNED_FROM_TAG = "tuned_from"
"""MLflow run tag of a ``run --tuned`` run: the study and trial whose settings it trained with."""
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
"""The experiment type (tag :data:`EXPERIMENT_KIND_TAG`) of model training, as opposed to a GenAI
application: MLflow 3 UIs that type experiments by this tag open them at their runs, not their
traces (later ones, 3.17 among them, follow the UI's own GenAI / Model training switch instead)."""
INPUT_ATTEMPTS = 3
"""Tries of logging a split as an MLflow input: workers that start at once race to create the same
data set row, and the loser's transaction fails on the store's unique constraint."""

FAILURE_REASON_TAG = "failure_reason"
"""MLflow run tag: why a run ended FAILED or KILLED."""
FIRST_CONTACT_TIMEOUT_SECONDS = 10
"""How long the first request to a tracking server may take (:func:`first_contact`)."""
SLOW_STORE_SECONDS = 2.0
"""A tracking server whose first answer takes longer than this is reported as slow."""

logging.getLogger("alembic").setLevel(logging.WARNING)

Value = TypeVar("Value")


def experiment_name(task: str) -> str:
    """The MLflow experiment of a task suite."""
    return f"mtl-bench/{task}"


def git_commit() -> str:
    """The commit of this checkout (with ``-dirty`` when it has changes), or ``unknown``."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("-dirty" if dirty else "")


def environment_tags(device: str) -> dict[str, str]:
    """Tags that say where a run came from: commit, package versions, device, machine."""
    tags = {
        "git_commit": git_commit(),
        "device": device,
        "python": platform.python_version(),
        "version.torch": torch.__version__,
        "cuda": str(torch.version.cuda),
    }
    for package in PACKAGES:
        try:
            tags[f"version.{package}"] = metadata.version(package)
        except metadata.PackageNotFoundError:
            tags[f"version.{package}"] = "not installed"
    tags["machine"] = f"{platform.system()} {platform.machine()}"
    return tags


def flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested mapping -> ``{"a.b": "value"}`` with values as strings, for MLflow params."""
    flat: dict[str, str] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, prefix=f"{name}."))
        else:
            flat[name] = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
    return flat


@contextmanager
def first_contact(tracking_uri: str) -> Iterator[None]:
    """Inside, MLflow's requests to the tracking server ``tracking_uri`` are tried once each,
    with a timeout of :data:`FIRST_CONTACT_TIMEOUT_SECONDS` (unless
    ``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` or ``MLFLOW_HTTP_REQUEST_TIMEOUT`` is set): a server that
    is down or silent fails in seconds instead of after MLflow's retries (about 4 minutes).

    Meant for the first call to a store. An answer slower than :data:`SLOW_STORE_SECONDS` is
    reported on standard error. Other URIs (SQLite, files) are left as they are.
    """
    if not tracking_uri.startswith(("http://", "https://")):
        yield
        return
    quick = {MLFLOW_HTTP_REQUEST_MAX_RETRIES: 0, MLFLOW_HTTP_REQUEST_TIMEOUT: FIRST_CONTACT_TIMEOUT_SECONDS}
    changed = [variable for variable in quick if not variable.is_set()]
    for variable in changed:
        variable.set(quick[variable])
    started = time.monotonic()
    try:
        yield
    except MlflowException as error:
        raise ConnectionError(
            f"the MLflow tracking server {masked(tracking_uri)} failed at the first request: {error}. Check the "
            "URI (--tracking-uri or MLFLOW_TRACKING_URI) and that the server is running; to give a slow server "
            f"longer, set MLFLOW_HTTP_REQUEST_TIMEOUT (seconds, {MLFLOW_HTTP_REQUEST_TIMEOUT.get()} here) and "
            "MLFLOW_HTTP_REQUEST_MAX_RETRIES"
        ) from error
    finally:
        for variable in changed:
            variable.unset()
    seconds = time.monotonic() - started
    if seconds > SLOW_STORE_SECONDS:
        tqdm.write(
            f"the MLflow tracking server {masked(tracking_uri)} is slow: its first answer took {seconds:.1f} s, "
            "and every run logs through it",
            file=sys.stderr,
        )


def _store_name(tracking_uri: str) -> str:
    """How messages name the MLflow store at ``tracking_uri`` (its password hidden)."""
    return f"MLflow tracking store {masked(tracking_uri)}"


def _reason_tag(reason: str) -> str:
    """The value of :data:`FAILURE_REASON_TAG` for ``reason``: passwords hidden, at most 5000 characters."""
    return masked(reason)[:5000]


def _uninterrupted(action: Callable[[], Value]) -> Value:
    """``action()`` (one call to the store) with Ctrl-C and SIGTERM held back until it is over
    (:func:`~bench.signals.interrupts_held`): cut inside a write, MLflow's SQLite session keeps
    its transaction open and the store locked by this very process, so that the run could not
    then be ended KILLED."""
    with interrupts_held():
        return action()


def end_run_by_id(tracking_uri: str, run_id: str, status: str, reason: str | None = None) -> None:
    """End run ``run_id`` of the store at ``tracking_uri`` (not an active run of this process)
    as FINISHED, FAILED or KILLED, with the reason as :data:`FAILURE_REASON_TAG`; waits while
    the store is locked."""
    client, store = MlflowClient(tracking_uri), _store_name(tracking_uri)
    if reason is not None:
        wait_while_locked(
            partial(_uninterrupted, lambda: client.set_tag(run_id, FAILURE_REASON_TAG, _reason_tag(reason))), store
        )
    ending = RunStatus.to_string(RunStatus.from_string(status))
    wait_while_locked(partial(_uninterrupted, lambda: client.set_terminated(run_id, ending)), store)


def _log_input(dataset: MetaDataset, context: str) -> None:
    """``mlflow.log_input``, tried again when another process created the same data set row at
    the same moment (the failed transaction is rolled back whole, so nothing is logged twice)."""
    for attempt in range(1, INPUT_ATTEMPTS + 1):
        try:
            mlflow.log_input(dataset, context=context)
            return
        except MlflowException as error:
            text = str(error).lower()
            if attempt == INPUT_ATTEMPTS or ("unique constraint" not in text and "duplicate entry" not in text):
                raise


class Tracker:
    """Opens the experiment of a task suite in a tracking store and logs runs into it.

    The experiment is created with the type tag :data:`EXPERIMENT_KIND_TAG` (model training);
    an existing experiment without that tag receives it. A SQLite store is opened by one
    process at a time (:func:`bench.stores.creating_store`), so that two commands started on a
    fresh results folder do not both create its tables; a tracking server is first asked
    within :func:`first_contact`. Every call waits for a locked SQLite store
    (:func:`bench.stores.wait_while_locked`).

    A context manager: MLflow's ``set_tracking_uri`` also sets the ``MLFLOW_TRACKING_URI``
    environment variable, which leaving the context restores.
    """

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc_info: object) -> None:
        mlflow.set_tracking_uri(self._previous_uri)  # None unsets the environment variable

    def __init__(self, tracking_uri: str, task: str, results: Path) -> None:
        store_wait_seconds()  # a bad BENCH_STORE_WAIT_SECONDS is an error before anything is written
        self._previous_uri = os.environ.get("MLFLOW_TRACKING_URI")
        mlflow.set_tracking_uri(tracking_uri)
        self.tracking_uri = tracking_uri
        self._store_name = _store_name(tracking_uri)
        sqlite_file = tracking_uri.removeprefix("sqlite:///") if tracking_uri.startswith("sqlite:///") else None
        try:
            with creating_store(Path(sqlite_file)) if sqlite_file else nullcontext(), first_contact(tracking_uri):
                self.experiment_id = self._open_experiment(experiment_name(task), results)
        except ConnectionError:
            raise
        except Exception as error:  # the store is unreachable or unreadable
            raise ConnectionError(
                masked(
                    f"cannot open the MLflow tracking store {tracking_uri}: {error}. Check the URI "
                    "(--tracking-uri or MLFLOW_TRACKING_URI) and that the server is running"
                )
            ) from error

    def _open_experiment(self, name: str, results: Path) -> str:
        """The id of experiment ``name``, created (or given its type tag) when needed."""
        experiment = self._call(lambda: mlflow.get_experiment_by_name(name))
        if experiment is None:
            local = "://" not in self.tracking_uri or self.tracking_uri.startswith(("sqlite:", "file:"))
            location = (results / "mlartifacts").resolve().as_uri() if local else None
            return self._call(
                lambda: mlflow.create_experiment(
                    name, artifact_location=location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
                )
            )
        if EXPERIMENT_KIND_TAG not in experiment.tags:
            client = MlflowClient(self.tracking_uri)
            experiment_id = experiment.experiment_id
            self._call(lambda: client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND))
        return experiment.experiment_id

    def _call(self, action: Callable[[], Value]) -> Value:
        """``action()``, waiting while the store is locked (:func:`bench.stores.wait_while_locked`);
        see :func:`_uninterrupted` for Ctrl-C and SIGTERM."""
        return wait_while_locked(partial(_uninterrupted, action), self._store_name)

    def start_run(
        self, run_name: str, params: Mapping[str, Any], tags: Mapping[str, str], run_id: str | None = None
    ) -> str:
        """Start a run with its params and tags, or continue run ``run_id``; return its id.

        A continued run keeps the params it has and receives only those it lacks (MLflow
        refuses to change a logged param). When its params or tags cannot be logged, the run
        ends FAILED (:meth:`end_run_after`) and the error propagates.
        """
        if run_id is None:
            run = self._call(lambda: mlflow.start_run(experiment_id=self.experiment_id, run_name=run_name))
        else:
            run = self._call(lambda: mlflow.start_run(run_id=run_id))
        try:
            logged = run.data.params
            self._call(lambda: mlflow.log_params({k: v for k, v in flatten(params).items() if k not in logged}))
            self._call(lambda: mlflow.set_tags(dict(tags)))
        except BaseException as error:
            self.end_run_after(error, "FAILED", f"{type(error).__name__}: {error}")
            raise
        return run.info.run_id

    def find_run(self, tag: str, value: str) -> Run | None:
        """The latest run of the experiment (not deleted) whose tag ``tag`` is ``value``."""
        runs = self._call(
            lambda: MlflowClient(self.tracking_uri).search_runs(
                [self.experiment_id],
                filter_string=f"tags.`{tag}` = '{value}'",
                order_by=["attributes.start_time DESC"],
                max_results=1,
            )
        )
        return runs[0] if runs else None

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self._call(lambda: mlflow.set_tags(dict(tags)))

    def logged_steps(self, run_id: str, metric: str) -> set[int]:
        """The steps at which run ``run_id`` has a value of ``metric``."""
        history = self._call(lambda: MlflowClient(self.tracking_uri).get_metric_history(run_id, metric))
        return {m.step for m in history}

    def log_data_identity(self, identity: Mapping[str, Any]) -> None:
        """Each split as an MLflow input: name, size and the sha256 of its item ids."""
        for split, info in identity["splits"].items():
            dataset = MetaDataset(
                CodeDatasetSource({"suite": str(identity["suite"]), "split": split}),
                name=f"{identity['suite']}/{split} (n={info['size']})",
                digest=info["sha256"][:32],
            )
            self._call(partial(_log_input, dataset, split))
        self._call(lambda: mlflow.log_dict(dict(identity), "data_identity.json"))

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        finite = {k: float(v) for k, v in metrics.items() if v == v}  # NaN is not logged
        self._call(lambda: mlflow.log_metrics(finite, step=step))

    def log_artifact(self, path: Path) -> None:
        self._call(lambda: mlflow.log_artifact(str(path)))

    def end_run(self, status: str, reason: str | None = None, tags: Mapping[str, str] | None = None) -> None:
        """End the active run as FINISHED, FAILED or KILLED, with ``tags`` and the reason
        (passwords in it hidden) as the tag :data:`FAILURE_REASON_TAG`.

        MLflow's active run is cleared whatever happens, so the next run can start: a store
        that stays locked or fails raises, and leaves this run RUNNING in the store (where
        running the command again continues it).
        """
        active = mlflow.active_run()
        if active is None:
            return
        ending = RunStatus.to_string(RunStatus.from_string(status))
        labels = {**(tags or {}), **({FAILURE_REASON_TAG: _reason_tag(reason)} if reason else {})}
        try:
            if labels:
                self._call(lambda: mlflow.set_tags(labels))
        finally:
            try:
                _uninterrupted(lambda: mlflow.end_run(status=ending))  # clears the active run, then writes
            except Exception as error:
                if not is_locked(error):
                    raise
                client = MlflowClient(self.tracking_uri)
                self._call(lambda: client.set_terminated(active.info.run_id, ending))

    def end_run_after(
        self, error: BaseException, status: str, reason: str, tags: Mapping[str, str] | None = None
    ) -> None:
        """End the active run after ``error`` (:meth:`end_run`). When the store refuses, ``error``
        receives a note saying so instead of being replaced: the caller re-raises ``error``, and
        an interrupt still stops the sweep."""
        try:
            self.end_run(status, reason, tags)
        except Exception as store_error:
            error.add_note(f"the MLflow run was not marked {status} in the store: {store_error}")

    def leave_run(self) -> None:
        """Stop logging to the active run without ending it: another process continues it.

        MLflow's ``end_run`` always writes a status; this only takes the run off this
        thread's stack of active runs (MLflow's own), so that the next run can start.
        """
        if mlflow.active_run() is not None:
            mlflow.tracking.fluent._active_run_stack.get().pop()
            MLFLOW_RUN_ID.unset()

    def end_other_run(self, run_id: str, status: str, reason: str) -> None:
        """End run ``run_id`` (not the active one) as FAILED or KILLED, with the reason (passwords
        in it hidden) as a tag (:func:`end_run_by_id`)."""
        end_run_by_id(self.tracking_uri, run_id, status, reason)
