"""EW, equal weighting: the plain sum of the task losses.

    loss = sum_t L_t,  w_t = 1

Source: the baseline of every MTL paper; LibMTL 1.1.5 ``weighting/EW.py`` (weights of 1, not
1/T). No hyperparameters.
"""

from __future__ import annotations

import torch
from torch import Tensor

from methods.base import Method, Weighting
from methods.registry import register


@register
class EW(Method):
    """Equal weighting: ``w_t = 1`` for every task at every step."""

    name = "ew"

    def weigh(self, losses: Tensor, gramian: Tensor | None) -> Weighting:
        return Weighting(torch.ones_like(losses.detach()))
