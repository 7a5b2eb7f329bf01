"""CAGrad, conflict-averse gradient descent (Liu et al., NeurIPS 2021), in LibMTL's form.

With G = J J^T, b = 1/T (uniform), g0 = sqrt(mean(G) + 1e-8) (the norm of the mean gradient)
and c = calpha g0 + 1e-8:

    w   = argmin_{w in simplex} w^T G b + c sqrt(w^T G w + 1e-8)     (SLSQP from w = b)
    g_w = sum_t w_t g_t,   ||g_w|| = sqrt(w^T G w)
    g   = mean_t g_t + c / (||g_w|| + 1e-8) g_w
    rescale 0: g,  1: g / (1 + calpha^2),  2: g / (1 + calpha)

Defaults calpha = 0.5, rescale = 1 (LibMTL 1.1.5 ``config.py``). The solve uses scipy's SLSQP
on the T x T Gramian, as LibMTL does (one transfer of G to the CPU per step). Returned weights
are on the raw gradients: ``(1/T + c w_t / (||g_w|| + 1e-8)) / rescale_divisor``.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import minimize
from torch import Tensor

from methods.base import HParam, Method, Need, Weighting
from methods.registry import register


@register
class CAGrad(Method):
    """Conflict-averse gradient: the mean gradient pushed towards the worst-off task."""

    name = "cagrad"
    hparams = (
        HParam("calpha", float, 0.5, "radius of the ball around the mean gradient", low=0.0, high=1.0),
        HParam("rescale", int, 1, "0: none, 1: / (1 + calpha^2), 2: / (1 + calpha)", choices=(0, 1, 2)),
    )
    calpha: float
    rescale: int

    @property
    def needs(self) -> Need:
        return Need.GRAMIAN

    def weigh(self, losses: Tensor, gramian: Tensor | None) -> Weighting:
        assert gramian is not None
        grams = gramian.detach().cpu()
        radius = (self.calpha * (grams.mean() + 1e-8).sqrt() + 1e-8).item()
        matrix = grams.numpy()
        uniform = np.full(self.n_tasks, 1.0 / self.n_tasks)

        def objective(w: np.ndarray) -> float:
            return float(w @ matrix @ uniform + radius * np.sqrt(w @ matrix @ w + 1e-8))

        solution = minimize(
            objective,
            uniform,
            bounds=[(0.0, 1.0)] * self.n_tasks,
            constraints=({"type": "eq", "fun": lambda w: 1 - w.sum()},),
        ).x
        w = torch.from_numpy(solution).to(grams.dtype)
        mixed_norm = (w @ grams @ w).clamp_min(0).sqrt()
        coefficients = 1 / self.n_tasks + radius / (mixed_norm + 1e-8) * w
        divisor = {0: 1.0, 1: 1 + self.calpha**2, 2: 1 + self.calpha}[self.rescale]
        return Weighting((coefficients / divisor).to(gramian.device))
