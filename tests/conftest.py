"""Small, generic helpers for the tests of ``methods/``: a tiny multi-task net and its gradients.

They are handed to tests through the ``mtl`` fixture (no ``import conftest``), so they work
under any pytest import mode. ``mlflow_template`` gives the harness's tests an empty MLflow store,
``results`` a results directory holding a copy of it, ``postgres_url`` a throwaway PostgreSQL server.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import types
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

POSTGRES_USER, POSTGRES_PASSWORD = "bench", "bench-secret"
"""The role of the ``postgres_url`` server, and its password."""


class TinyMTLNet(nn.Module):
    """A shared MLP encoder and one linear regression head per task."""

    def __init__(self, n_tasks: int, in_dim: int = 6, hidden: int = 10) -> None:
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Linear(in_dim, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh()
        )
        self.heads = nn.ModuleList(nn.Linear(hidden, 1) for _ in range(n_tasks))

    def forward(self, x: Tensor) -> Tensor:
        h = self.encoder(x)
        return torch.cat([head(h) for head in self.heads], dim=1)


def make_net(n_tasks: int, seed: int = 0, in_dim: int = 6, hidden: int = 10) -> TinyMTLNet:
    torch.manual_seed(seed)
    return TinyMTLNet(n_tasks, in_dim, hidden)


def make_batch(n_tasks: int, seed: int, n: int = 16, in_dim: int = 6) -> tuple[Tensor, Tensor]:
    """Inputs and per-task regression targets of different scales (so the tasks conflict)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, in_dim, generator=g)
    scales = torch.linspace(0.5, 2.0, n_tasks)
    y = torch.randn(n, n_tasks, generator=g) * scales + torch.randn(n_tasks, generator=g)
    return x, y


def task_losses(net: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Per-task mean squared errors, shape [T], attached to the graph."""
    return ((net(x) - y) ** 2).mean(dim=0)


def flat_grad(params) -> Tensor:
    """The parameters' ``.grad`` flattened and concatenated (zeros where ``.grad`` is None)."""
    return torch.cat(
        [
            (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
            for p in params
        ]
    )


def jacobian(losses: Tensor, params) -> Tensor:
    """Rows d L_t / d params, computed independently with ``torch.autograd.grad``, [T, D]."""
    params = list(params)
    rows = []
    for t in range(losses.numel()):
        grads = torch.autograd.grad(losses[t], params, retain_graph=True, allow_unused=True)
        rows.append(
            torch.cat(
                [
                    (g if g is not None else torch.zeros_like(p)).reshape(-1)
                    for g, p in zip(grads, params)
                ]
            )
        )
    return torch.stack(rows)


@pytest.fixture
def mtl() -> types.SimpleNamespace:
    return types.SimpleNamespace(
        TinyMTLNet=TinyMTLNet,
        make_net=make_net,
        make_batch=make_batch,
        task_losses=task_losses,
        flat_grad=flat_grad,
        jacobian=jacobian,
    )


@pytest.fixture(scope="session")
def mlflow_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty MLflow SQLite store, created once per session: a test copies it to
    ``<results>/mlflow.db`` instead of creating (migrating) a new store, which takes seconds."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def results(tmp_path: Path, mlflow_template: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A results directory holding an empty MLflow store; worker processes that run
    ``python -m bench`` find this checkout through ``PYTHONPATH``."""
    shutil.copy(mlflow_template, tmp_path / "mlflow.db")
    repo = Path(__file__).resolve().parent.parent
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")]))
    return tmp_path


def _postgres_bin() -> Path | None:
    """The directory of Debian's PostgreSQL server programs (initdb, pg_ctl), if installed."""
    debian = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), reverse=True)  # newest version first
    found = shutil.which("initdb") or next(iter(debian), None)
    return None if found is None else Path(found).resolve().parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    """``postgresql+psycopg://bench:PASSWORD@127.0.0.1:PORT/postgres`` of a throwaway server that
    lives for this module: Debian's PostgreSQL (``scripts/install-postgres`` installs it),
    initialised in a temporary directory, listening on a free port of 127.0.0.1 with password
    authentication; the test is skipped, with the reason, when it cannot start here."""
    pytest.importorskip("psycopg", reason="psycopg is not installed: pip install -e '.[test]'")
    bindir = _postgres_bin()
    if bindir is None:
        pytest.skip("PostgreSQL is not installed (no initdb): run scripts/install-postgres (Debian, root or sudo)")
    run_as: list[str] = []
    owner = None
    if os.geteuid() == 0:  # the server refuses to run as root
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no 'postgres' user to run the PostgreSQL server as")
        runuser = shutil.which("runuser")
        if runuser is None:
            pytest.skip("running as root and runuser is missing, so the PostgreSQL server cannot run as 'postgres'")
        run_as = [runuser, "-u", "postgres", "--"]
    base = Path(tempfile.mkdtemp(prefix="bench-postgres-"))
    password_file = base / "password"
    password_file.write_text(POSTGRES_PASSWORD)
    if owner is not None:
        for path in (base, password_file):
            os.chown(path, owner.pw_uid, owner.pw_gid)
    port = _free_port()
    data = base / "data"
    initdb = [*run_as, str(bindir / "initdb"), "-D", str(data), "-U", POSTGRES_USER, f"--pwfile={password_file}",
              "--auth=scram-sha-256", "--encoding=UTF8", "--no-sync"]
    start = [*run_as, str(bindir / "pg_ctl"), "-D", str(data), "-l", str(base / "server.log"), "-w", "-t", "60",
             "-o", f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c fsync=off", "start"]
    try:
        for command in (initdb, start):
            done = subprocess.run(command, capture_output=True, text=True, timeout=120)
            if done.returncode != 0:
                log = (base / "server.log").read_text() if (base / "server.log").exists() else ""
                reason = f"{(done.stderr or done.stdout).strip()} {log.strip()}"
                pytest.skip(f"PostgreSQL could not start here: {reason}"[:500])
        yield f"postgresql+psycopg://{POSTGRES_USER}:{POSTGRES_PASSWORD}@127.0.0.1:{port}/postgres"
    finally:
        if (data / "postmaster.pid").exists():
            subprocess.run([*run_as, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                           capture_output=True, timeout=60)
        shutil.rmtree(base, ignore_errors=True)
