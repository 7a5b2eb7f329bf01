"""One training step, shared by the training engine and the profiler so that both time the same work.

    forward (under bf16 autocast with ``amp``) -> per-task losses [T] in float32
    -> the method's backward (parameter- or feature-level Gramian, or one weighted backward)
    -> optimizer step

Each part runs inside its :class:`~bench.timing.PhaseTimer` phase.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

import methods
from bench.timing import PhaseTimer
from tasks.base import MultiTaskModel, TaskSuite

GRAD_LEVELS: tuple[str, ...] = ("parameters", "features")
"""Where gradient methods take per-task gradients: the shared parameters (exact, the methods'
published form) or the shared representation (MGDA-UB's approximation; one encoder pass)."""


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch; make CPU kernels deterministic."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def supplied_hparams(
    given: Mapping[str, Any], suite: TaskSuite, method: str, seed: int, n_tasks: int | None = None
) -> dict[str, Any]:
    """``given`` plus what the harness fills in unless given.

    ``seed``: methods with a random element get the run's seed. ``prevalence``: DeepChest's
    ``init=prevalence`` reads the training split's rates (of the first ``n_tasks`` tasks when
    only those are trained, as the profiler may).
    """
    out = dict(given)
    declared = {h.name for h in methods.hparams(method)}
    if "seed" in declared:
        out.setdefault("seed", seed)
    prevalence = suite.prevalence()
    if "prevalence" in declared and prevalence is not None:
        out.setdefault("prevalence", tuple(prevalence[:n_tasks]))
    return out


def autocast(device: torch.device, amp: bool) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on CUDA when ``amp``; otherwise nothing. ``amp`` off CUDA is an error."""
    if not amp:
        return contextlib.nullcontext()
    if device.type != "cuda":
        raise ValueError(f"--amp needs a CUDA device (bf16 autocast of the forward pass); this run is on {device}")
    return torch.autocast(device_type="cuda", dtype=torch.bfloat16)


def training_step(
    model: MultiTaskModel,
    suite: TaskSuite,
    method: methods.Method,
    optimizer: torch.optim.Optimizer,
    x: Any,
    targets: Any,
    shared: list[Tensor],
    timer: PhaseTimer,
    *,
    grad_level: str = "parameters",
    amp: bool = False,
    check_finite: bool = True,
    n_tasks: int | None = None,
) -> tuple[Any, Tensor, Tensor]:
    """Run one step; return ``(outputs, detached losses [T], weights [T])``.

    ``n_tasks`` keeps only the first ``n_tasks`` losses (the profiler's fewer-task setting).
    Under ``amp`` only the forward pass runs in bf16; losses, Gramian, solvers and weights
    stay float32.
    """
    if grad_level not in GRAD_LEVELS:
        raise ValueError(f"grad_level must be one of {', '.join(GRAD_LEVELS)}, got {grad_level!r}")
    device = next(model.parameters()).device
    with timer("forward"):
        with autocast(device, amp):
            if grad_level == "features":
                outputs, features = model.forward_with_features(x)
            else:
                outputs, features = model(x), None
            losses = suite.losses(outputs, targets)
        losses = losses.float()
        if n_tasks is not None:
            losses = losses[:n_tasks]
    weights = method.backward(losses, shared, features=features, check_finite=check_finite, timer=timer)
    with timer("optimizer"):
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        method.zero_grad(set_to_none=True)
    timer.step()
    return outputs, losses.detach(), weights
