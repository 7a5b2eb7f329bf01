"""PCGrad, projecting conflicting gradients (Yu et al., NeurIPS 2020), in LibMTL 1.1.5's form.

For each task i, over j in a fresh random order of ALL tasks (j = i included, as in LibMTL
``weighting/PCGrad.py``):

    if <pc_i, g_j> < 0:  pc_i <- pc_i - <pc_i, g_j> / ||g_j||^2 g_j
    shared gradient = sum_i pc_i

Each pc_i stays a combination sum_k A_ik g_k, so inner products come from the Gramian:
<pc_i, g_j> = (A G)_ij, and the returned weights are w_k = sum_i A_ik. A task whose gradient is
zero is never projected onto (LibMTL 1.1.5 divides by zero there). The random order comes from
this method's own generator, seeded by ``seed``; it is saved in ``state_dict()``.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from torch import Tensor

from methods.base import HParam, Method, Need, Weighting
from methods.registry import register


@register
class PCGrad(Method):
    """Gradient surgery: remove from each task's gradient its conflicts with the others."""

    name = "pcgrad"
    hparams = (
        HParam(
            "seed",
            int,
            0,
            "seed of the random task order (the harness passes the run's seed)",
            low=0,
            high=2**32 - 1,
            tunable=False,
        ),
    )
    seed: int

    def __init__(self, n_tasks: int, **hparams: Any) -> None:
        super().__init__(n_tasks, **hparams)
        self.order_rng = random.Random(self.seed)

    @property
    def needs(self) -> Need:
        return Need.GRAMIAN

    def weigh(self, losses: Tensor, gramian: Tensor | None) -> Weighting:
        assert gramian is not None
        grams = gramian.detach().cpu().double().numpy()
        n = self.n_tasks
        coefficients = np.eye(n)
        for i in range(n):
            order = list(range(n))
            self.order_rng.shuffle(order)
            for j in order:
                squared_norm = grams[j, j]
                if squared_norm <= 0:
                    continue
                inner = coefficients[i] @ grams[:, j]
                if inner < 0:
                    coefficients[i, j] -= inner / squared_norm
        weights = torch.from_numpy(coefficients.sum(axis=0))
        return Weighting(weights.to(device=gramian.device, dtype=gramian.dtype))

    def get_extra_state(self) -> Any:
        return self.order_rng.getstate()

    def set_extra_state(self, state: Any) -> None:
        self.order_rng.setstate(state)
