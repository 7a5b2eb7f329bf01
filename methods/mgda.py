"""MGDA (Sener & Koltun, NeurIPS 2018), in LibMTL 1.1.5's form (``weighting/MGDA.py``).

The shared gradient is the min-norm point of the convex hull of the (normalised) per-task
gradients:

    c = argmin_{c in simplex} || sum_t c_t g_t / n_t ||^2,   shared gradient = sum_t c_t g_t / n_t

with normalisers n_t: ``none`` 1 (default), ``l2`` ||g_t||, ``loss`` L_t, ``loss+`` L_t ||g_t||.
Solver (Sener & Koltun's MinNormSolver, as LibMTL uses it): start from the best pair of tasks
(closed form for two points), then at most 250 projected-gradient steps on the simplex, each
followed by an exact line search between the current and the new point; stop when the L1
change of c falls below 1e-5. Everything runs on the T x T Gramian: with G' = G / (n n^T),
||sum c_t g_t / n_t||^2 = c^T G' c.

Returned weights are on the raw gradients: w_t = c_t / n_t.
"""

from __future__ import annotations

import torch
from torch import Tensor

from methods.base import HParam, Method, Need, Weighting
from methods.registry import register

MAX_ITERATIONS = 250
STOP_TOLERANCE = 1e-5
# MinNormSolver's bounds for the pair solution when one point dominates the segment.
PAIR_EDGE = 0.999


def _pair_min_norm(v1v1: Tensor, v1v2: Tensor, v2v2: Tensor) -> tuple[Tensor | float, Tensor]:
    """``gamma`` minimising ||gamma v1 + (1 - gamma) v2||^2 over [0, 1], and that squared norm."""
    if v1v2 >= v1v1:
        return PAIR_EDGE, v1v1
    if v1v2 >= v2v2:
        return 1 - PAIR_EDGE, v2v2
    gamma = (v2v2 - v1v2) / (v1v1 + v2v2 - 2 * v1v2)
    return gamma, v2v2 + gamma * (v1v2 - v2v2)


def _project_to_simplex(y: Tensor) -> Tensor:
    """Euclidean projection of ``y`` onto the probability simplex.

    The running sum is accumulated in ``y``'s own dtype, one element at a time, as LibMTL's
    solver does, so that both stop at the same iteration.
    """
    descending = torch.sort(y, descending=True).values
    threshold = (y.sum() - 1) / y.numel()
    running = torch.zeros((), dtype=y.dtype)
    for k in range(y.numel() - 1):
        running = running + descending[k]
        candidate = (running - 1) / (k + 1)
        if candidate > descending[k + 1]:
            threshold = candidate
            break
    return torch.clamp(y - threshold, min=0)


def _next_point(current: Tensor, direction: Tensor) -> Tensor:
    """Step along ``direction`` (made to sum to zero) to the simplex boundary, then project."""
    step = direction - direction.sum() / direction.numel()
    to_zero = -current[step < 0] / step[step < 0]
    to_one = (1 - current[step > 0]) / step[step > 0]
    length = torch.ones((), dtype=current.dtype)
    if bool((to_zero > 1e-7).any()):
        length = to_zero[to_zero > 1e-7].min()
    if bool((to_one > 1e-7).any()):
        length = torch.minimum(length, to_one[to_one > 1e-7].min())
    return _project_to_simplex(step * length + current)


def _quadratic(a: Tensor, b: Tensor, grams: Tensor) -> Tensor:
    """``a^T G b`` summed elementwise over ``outer(a, b) * G``, the order LibMTL sums in."""
    return (torch.outer(a, b) * grams).sum()


def min_norm_weights(gramian: Tensor) -> tuple[Tensor, int, bool]:
    """Min-norm convex combination for Gramian ``gramian``: (weights, iterations, converged).

    Runs on the CPU (a short loop of T x T operations with data-dependent stopping) and returns
    weights on the Gramian's device.
    """
    grams = gramian.detach().cpu()
    n = grams.shape[0]
    best = None
    for i in range(n):
        for j in range(i + 1, n):
            gamma, cost = _pair_min_norm(grams[i, i], grams[i, j], grams[j, j])
            if best is None or cost < best[3]:
                best = (i, j, gamma, cost)
    assert best is not None
    i, j, gamma, _ = best
    weights = torch.zeros(n, dtype=grams.dtype)
    weights[i], weights[j] = gamma, 1 - gamma
    if n < 3:
        return weights.to(gramian.device), 0, True
    for iteration in range(1, MAX_ITERATIONS + 1):
        candidate = _next_point(weights, -(grams @ weights))
        v1v1 = _quadratic(weights, weights, grams)
        v1v2 = _quadratic(weights, candidate, grams)
        v2v2 = _quadratic(candidate, candidate, grams)
        gamma, _ = _pair_min_norm(v1v1, v1v2, v2v2)
        updated = gamma * weights + (1 - gamma) * candidate
        if bool((updated - weights).abs().sum() < STOP_TOLERANCE):
            return weights.to(gramian.device), iteration, True
        weights = updated
    return weights.to(gramian.device), MAX_ITERATIONS, False


def gradient_normalisers(normalization: str, losses: Tensor, gramian: Tensor) -> Tensor:
    """MGDA's per-task normalisers n_t (see module docstring)."""
    norms = gramian.diagonal().clamp_min(0).sqrt()
    if normalization == "l2":
        return norms
    if normalization == "loss":
        return losses.to(gramian.dtype)
    if normalization == "loss+":
        return losses.to(gramian.dtype) * norms
    return torch.ones_like(norms)


@register
class MGDA(Method):
    """Multiple-gradient descent: the min-norm point of the tasks' gradients."""

    name = "mgda"
    hparams = (
        HParam(
            "normalization",
            str,
            "none",
            "per-task gradient normalisation before the min-norm solve",
            choices=("none", "l2", "loss", "loss+"),
        ),
    )
    normalization: str

    @property
    def needs(self) -> Need:
        return Need.GRAMIAN

    def weigh(self, losses: Tensor, gramian: Tensor | None) -> Weighting:
        assert gramian is not None
        normalisers = gradient_normalisers(self.normalization, losses, gramian)
        if not bool((normalisers > 0).all()):
            raise FloatingPointError(
                f"mgda(normalization={self.normalization!r}): a task's normaliser is zero "
                f"({normalisers.tolist()}); use normalization='none' for zero gradients or losses"
            )
        normalised = gramian / torch.outer(normalisers, normalisers)
        weights, _, _ = min_norm_weights(normalised)
        return Weighting(weights / normalisers)
