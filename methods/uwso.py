"""UW-SO, soft optimal uncertainty weighting (Kirchdorfer et al., GCPR 2024, arXiv 2408.07985).

UW-O's inverse losses passed through a softmax with temperature T:

    w_t = softmax_t( (1 / detach(L_t)) / T ),   loss = sum_t w_t L_t

Weights sum to 1. Default temperature 1; the paper sweeps 1 to 20. Gradient-free and
parameter-free.
"""

from __future__ import annotations

import torch
from torch import Tensor

from methods.base import HParam, Method, Weighting
from methods.registry import register
from methods.uwo import inverse_losses


@register
class UWSO(Method):
    """UW-SO: softmax of the inverse detached losses, divided by a temperature."""

    name = "uwso"
    hparams = (
        HParam(
            "temperature",
            float,
            1.0,
            "softmax temperature T: higher is closer to equal weights",
            low=0.01,
            high=100.0,
            log=True,
        ),
    )
    temperature: float

    def weigh(self, losses: Tensor, gramian: Tensor | None) -> Weighting:
        return Weighting(torch.softmax(inverse_losses(losses) / self.temperature, dim=0))
