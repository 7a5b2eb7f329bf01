"""GradNorm (Chen et al., ICML 2018), in LibMTL 1.1.5's form (``weighting/GradNorm.py``).

Learnable scores s (init 1); weights ``w = T softmax(s)``. The first epoch is EW, and its mean
training loss per task is recorded as L_t(0). From the second epoch on, with g_t the gradient
of L_t over all shared parameters:

    G_t = ||w_t g_t||,   Ltilde_t = L_t / L_t(0),   r_t = Ltilde_t / mean(Ltilde)
    L_grad = sum_t | G_t - detach(mean(G) r_t^alpha) |       (back-propagated into s only)
    shared gradient = sum_t detach(w_t) g_t

Default alpha = 1.5. Only the Gramian's diagonal is used (``||g_t||^2 = G_tt``). The scores s
are this method's parameters (``m.parameters()``): give them to the optimizer.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from methods.base import EpochStats, HParam, Method, Need, Weighting
from methods.registry import register


@register
class GradNorm(Method):
    """Gradient normalisation: learn weights that equalise the tasks' training rates."""

    name = "gradnorm"
    hparams = (
        HParam("alpha", float, 1.5, "strength of the pull to equal training rates", low=0.0, high=5.0),
    )
    alpha: float

    def __init__(self, n_tasks: int, **hparams: Any) -> None:
        super().__init__(n_tasks, **hparams)
        self.scores = nn.Parameter(torch.ones(n_tasks))
        self.register_buffer("first_epoch_loss_sum", torch.zeros(n_tasks))
        self.first_epoch_steps = 0
        self.epoch = 0

    @property
    def needs(self) -> Need:
        return Need.NOTHING if self.epoch == 0 else Need.GRAMIAN

    def weigh(self, losses: Tensor, gramian: Tensor | None) -> Weighting:
        if gramian is None:
            self.first_epoch_loss_sum += losses.detach()
            self.first_epoch_steps += 1
            return Weighting(torch.ones_like(losses.detach()))
        weights = self.n_tasks * torch.softmax(self.scores, dim=0)
        grad_norms = weights * gramian.diagonal().clamp_min(0).sqrt()
        first_epoch_loss = self.first_epoch_loss_sum / self.first_epoch_steps
        loss_ratio = losses.detach() / first_epoch_loss
        relative_rate = loss_ratio / loss_ratio.mean()
        target = (grad_norms.mean() * relative_rate**self.alpha).detach()
        return Weighting(weights.detach(), extra_loss=(grad_norms - target).abs().sum())

    def epoch_end(self, stats: EpochStats | Mapping[str, Any]) -> None:
        EpochStats.coerce(stats)
        if self.epoch == 0 and self.first_epoch_steps == 0:
            raise RuntimeError(
                "gradnorm: epoch_end() was called before any backward() in the first epoch; "
                "it needs the first epoch's losses as its reference"
            )
        self.epoch += 1

    def get_extra_state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "first_epoch_steps": self.first_epoch_steps}

    def set_extra_state(self, state: dict[str, int]) -> None:
        self.epoch = state["epoch"]
        self.first_epoch_steps = state["first_epoch_steps"]
