"""DeepChest: gradient-free, accuracy-driven dynamic task weighting.

Source: the DeepChest paper's repository (youssefkhalil320/DeepChest-MTL, file
``weighting/dwbstl.py``, there called DWBSTL). Weights w_t scale the losses,
``loss = sum_t w_t L_t``, and change only once per epoch, from each task's TRAINING accuracy
acc_t accumulated over that epoch:

    thr = mean_t acc_t
    acc_t <  thr:  w_t <- min(factor * w_t, cap)      (lagging task: up-weight)
    acc_t >= thr:  w_t <- w_t / decay                  (a tie decays)

No floor, no renormalisation, no gradient access. Defaults as in the repository: factor 1.1,
cap 1.5, decay 1.05.

Initial weights (``init``): ``ones``, or ``prevalence``: ``w0_t = 1 + p_t / 2`` from the
training split's positive rate p_t. The repository derives w0 from single-task accuracies as
``1 + (1 - acc_STL_t) / 2``; for a single-task model that predicts the majority class,
``1 - acc_STL_t = p_t``.

Signal (``signal``): ``accuracy`` (the repository's rule, default), or ``loss``: the paper's
abstract speaks of task-specific loss trends, so this option scores each task by the ratio of
its mean training loss to the previous epoch's and up-weights the tasks whose loss fell least
(score_t = -L_t^(e) / L_t^(e-1), same threshold rule); the first epoch only records losses.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from methods.base import EpochStats, HParam, Method, Weighting
from methods.registry import register


def prevalence_weights(prevalence: Tensor) -> Tensor:
    """DeepChest's initial weights from training-split prevalences: ``1 + p_t / 2``."""
    return 1 + prevalence / 2


@register
class DeepChest(Method):
    """Per-task loss weights nudged once per epoch towards the tasks with below-mean accuracy."""

    name = "deepchest"
    hparams = (
        HParam("factor", float, 1.1, "multiplier for lagging tasks", low=1.0, high=2.0),
        HParam("cap", float, 1.5, "upper bound of a weight", low=1.0, high=10.0),
        HParam("decay", float, 1.05, "divisor for tasks at or above the mean", low=1.0, high=2.0),
        HParam(
            "signal",
            str,
            "accuracy",
            "per-task score that decides lagging tasks",
            choices=("accuracy", "loss"),
        ),
        HParam(
            "init",
            str,
            "ones",
            "initial weights: ones, or 1 + prevalence/2",
            choices=("ones", "prevalence"),
        ),
        HParam(
            "prevalence",
            tuple,
            None,
            "training-split positive rate per task, required by init=prevalence",
            tunable=False,
        ),
    )
    factor: float
    cap: float
    decay: float
    signal: str
    init: str
    prevalence: tuple[float, ...] | None

    def __init__(self, n_tasks: int, **hparams: Any) -> None:
        super().__init__(n_tasks, **hparams)
        if self.init == "prevalence":
            if self.prevalence is None or len(self.prevalence) != n_tasks:
                raise ValueError(
                    f"deepchest.init='prevalence' needs prevalence=<{n_tasks} floats in [0, 1]>"
                    f" (the training split's positive rate per task), got {self.prevalence!r}"
                )
            rates = torch.tensor(self.prevalence, dtype=torch.float32)
            if not bool(((rates >= 0) & (rates <= 1)).all()):
                raise ValueError(f"deepchest.prevalence must lie in [0, 1], got {self.prevalence}")
            initial = prevalence_weights(rates)
        else:
            initial = torch.ones(n_tasks)
        self.register_buffer("task_weights", initial)
        self.register_buffer("previous_loss", torch.full((n_tasks,), float("nan")))

    def weigh(self, losses: Tensor, gramian: Tensor | None) -> Weighting:
        return Weighting(self.task_weights.clone())

    def epoch_end(self, stats: EpochStats | Mapping[str, Any]) -> None:
        stats = EpochStats.coerce(stats)
        score = self._score(stats)
        if score is None:
            return
        score = score.to(self.task_weights.device)
        lagging = score < score.mean()
        self.task_weights = torch.where(
            lagging,
            torch.clamp(self.task_weights * self.factor, max=self.cap),
            self.task_weights / self.decay,
        )

    def _score(self, stats: EpochStats) -> Tensor | None:
        if self.signal == "accuracy":
            if stats.train_accuracy is None:
                raise ValueError(
                    "deepchest (signal='accuracy') needs train_accuracy in the epoch statistics: "
                    "the per-task training accuracy accumulated over the epoch"
                )
            return _per_task(stats.train_accuracy, self.n_tasks, "train_accuracy")
        loss = _per_task(stats.train_loss, self.n_tasks, "train_loss").to(self.previous_loss)
        previous, self.previous_loss = self.previous_loss, loss.clone()
        if bool(torch.isnan(previous).any()):
            return None
        return -loss / previous


def _per_task(values: Tensor, n_tasks: int, what: str) -> Tensor:
    if values.shape != (n_tasks,):
        raise ValueError(f"{what} must have shape [{n_tasks}], got {tuple(values.shape)}")
    return values
