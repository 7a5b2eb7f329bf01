"""UW, uncertainty weighting (Kendall, Gal & Cipolla, CVPR 2018), in LibMTL's form.

Learnable log-variances s_t, initialised to -0.5 (LibMTL 1.1.5 ``weighting/UW.py``):

    loss = sum_t L_t / (2 exp(s_t)) + s_t / 2,   w_t = 1 / (2 exp(s_t))

The s_t are this method's parameters (``m.parameters()``): give them to the optimizer. No
hyperparameters.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from methods.base import Method, Weighting
from methods.registry import register

INITIAL_LOG_VARIANCE = -0.5


@register
class UW(Method):
    """Uncertainty weighting with one learnable log-variance per task."""

    name = "uw"

    def __init__(self, n_tasks: int, **hparams: Any) -> None:
        super().__init__(n_tasks, **hparams)
        self.log_variance = nn.Parameter(torch.full((n_tasks,), INITIAL_LOG_VARIANCE))

    def weigh(self, losses: Tensor, gramian: Tensor | None) -> Weighting:
        s = self.log_variance
        return Weighting(weights=1 / (2 * torch.exp(s)), extra_loss=s.sum() / 2)
