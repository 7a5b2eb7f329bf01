"""UW-O, analytical uncertainty weighting (Kirchdorfer et al., GCPR 2024, arXiv 2408.07985).

The closed-form optimum of UW's log-variances for the current losses, applied per step:

    w_t = 1 / detach(L_t),   loss = sum_t w_t L_t

Gradient-free and parameter-free. A loss of exactly zero would get an infinite weight; it is
clamped to the smallest normal float of the loss's dtype. No hyperparameters.
"""

from __future__ import annotations

import torch
from torch import Tensor

from methods.base import Method, Weighting
from methods.registry import register


def inverse_losses(losses: Tensor) -> Tensor:
    """``1 / detach(L_t)``, with zero losses clamped to the dtype's smallest normal number."""
    detached = losses.detach()
    return 1 / detached.clamp_min(torch.finfo(detached.dtype).tiny)


@register
class UWO(Method):
    """UW-O: each task weighted by the inverse of its current (detached) loss."""

    name = "uwo"

    def weigh(self, losses: Tensor, gramian: Tensor | None) -> Weighting:
        return Weighting(inverse_losses(losses))
