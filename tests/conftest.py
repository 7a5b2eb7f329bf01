"""Small, generic helpers for the tests of ``methods/``: a tiny multi-task net and its gradients.

They are handed to tests through the ``mtl`` fixture (no ``import conftest``), so they work
under any pytest import mode. ``mlflow_template`` gives the harness's tests an empty MLflow store,
``results`` a results directory holding a copy of it.
"""

from __future__ import annotations

import os
import shutil
import types
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn


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
