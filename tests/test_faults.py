"""Faults and bad input injected into the harness, and what it guarantees (docs/faults.md)."""

from __future__ import annotations

import json
import subprocess
import types
from pathlib import Path
from typing import Any

import optuna
import pytest
from mlflow.tracking import MlflowClient
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from bench import worker
from bench.cli import main
from bench.credentials import STORAGE_URL_ENV, TRACKING_URI_ENV, masked

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
