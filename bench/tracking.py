"""MLflow tracking: one experiment per task suite, one run per (method, seed).

The default store is SQLite at ``<results>/mlflow.db`` with artifacts under
``<results>/mlartifacts``; any tracking URI (a server, ``MLFLOW_TRACKING_URI``) works too.
Tuning studies (``bench tune``) log into the same experiment; their runs carry the tag
:data:`TUNING_STUDY_TAG`, and readers of results leave them out.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow
import torch
from mlflow.data.code_dataset_source import CodeDatasetSource
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import Run, RunStatus
from mlflow.environment_variables import MLFLOW_RUN_ID
from mlflow.tracking import MlflowClient

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

logging.getLogger("alembic").setLevel(logging.WARNING)


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


class Tracker:
    """Opens the experiment of a task suite in a tracking store and logs runs into it.

    The experiment is created with the type tag :data:`EXPERIMENT_KIND_TAG` (model training);
    an existing experiment without that tag receives it.

    A context manager: MLflow's ``set_tracking_uri`` also sets the ``MLFLOW_TRACKING_URI``
    environment variable, which leaving the context restores.
    """

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc_info: object) -> None:
        mlflow.set_tracking_uri(self._previous_uri)  # None unsets the environment variable

    def __init__(self, tracking_uri: str, task: str, results: Path) -> None:
        self._previous_uri = os.environ.get("MLFLOW_TRACKING_URI")
        if tracking_uri.startswith("sqlite:///"):
            Path(tracking_uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        mlflow.set_tracking_uri(tracking_uri)
        self.tracking_uri = tracking_uri
        name = experiment_name(task)
        try:
            experiment = mlflow.get_experiment_by_name(name)
        except Exception as error:  # the store is unreachable or unreadable
            raise ConnectionError(
                f"cannot open the MLflow tracking store {tracking_uri}: {error}. Check the URI "
                "(--tracking-uri or MLFLOW_TRACKING_URI) and that the server is running"
            ) from error
        if experiment is None:
            local = "://" not in tracking_uri or tracking_uri.startswith(("sqlite:", "file:"))
            location = (results / "mlartifacts").resolve().as_uri() if local else None
            self.experiment_id = mlflow.create_experiment(
                name, artifact_location=location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
            )
        else:
            self.experiment_id = experiment.experiment_id
            if EXPERIMENT_KIND_TAG not in experiment.tags:
                client = MlflowClient(tracking_uri)
                client.set_experiment_tag(self.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)

    def start_run(
        self, run_name: str, params: Mapping[str, Any], tags: Mapping[str, str], run_id: str | None = None
    ) -> str:
        """Start a run with its params and tags, or continue run ``run_id``; return its id.

        A continued run keeps the params it has and receives only those it lacks (MLflow
        refuses to change a logged param).
        """
        if run_id is None:
            run = mlflow.start_run(experiment_id=self.experiment_id, run_name=run_name)
        else:
            run = mlflow.start_run(run_id=run_id)
        logged = run.data.params
        mlflow.log_params({k: v for k, v in flatten(params).items() if k not in logged})
        mlflow.set_tags(dict(tags))
        return run.info.run_id

    def find_run(self, tag: str, value: str) -> Run | None:
        """The latest run of the experiment (not deleted) whose tag ``tag`` is ``value``."""
        runs = MlflowClient(self.tracking_uri).search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{tag}` = '{value}'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        return runs[0] if runs else None

    def set_tags(self, tags: Mapping[str, str]) -> None:
        mlflow.set_tags(dict(tags))

    def logged_steps(self, run_id: str, metric: str) -> set[int]:
        """The steps at which run ``run_id`` has a value of ``metric``."""
        return {m.step for m in MlflowClient(self.tracking_uri).get_metric_history(run_id, metric)}

    def log_data_identity(self, identity: Mapping[str, Any]) -> None:
        """Each split as an MLflow input: name, size and the sha256 of its item ids."""
        for split, info in identity["splits"].items():
            dataset = MetaDataset(
                CodeDatasetSource({"suite": str(identity["suite"]), "split": split}),
                name=f"{identity['suite']}/{split} (n={info['size']})",
                digest=info["sha256"][:32],
            )
            mlflow.log_input(dataset, context=split)
        mlflow.log_dict(dict(identity), "data_identity.json")

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        finite = {k: float(v) for k, v in metrics.items() if v == v}  # NaN is not logged
        mlflow.log_metrics(finite, step=step)

    def log_artifact(self, path: Path) -> None:
        mlflow.log_artifact(str(path))

    def end_run(self, status: str, reason: str | None = None) -> None:
        """End the active run as FINISHED, FAILED or KILLED, with the reason as a tag."""
        if reason:
            mlflow.set_tag("failure_reason", reason[:5000])
        mlflow.end_run(status=RunStatus.to_string(RunStatus.from_string(status)))

    def leave_run(self) -> None:
        """Stop logging to the active run without ending it: another process continues it.

        MLflow's ``end_run`` always writes a status; this only takes the run off this
        thread's stack of active runs (MLflow's own), so that the next run can start.
        """
        if mlflow.active_run() is not None:
            mlflow.tracking.fluent._active_run_stack.get().pop()
            MLFLOW_RUN_ID.unset()

    def end_other_run(self, run_id: str, status: str, reason: str) -> None:
        """End run ``run_id`` (not the active one) as FAILED or KILLED, with the reason as a tag."""
        client = MlflowClient(self.tracking_uri)
        client.set_tag(run_id, "failure_reason", reason[:5000])
        client.set_terminated(run_id, RunStatus.to_string(RunStatus.from_string(status)))
