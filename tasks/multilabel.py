"""Reusable base for binary multi-label suites: one binary classification task per label.

The model is a shared encoder with one ``nn.Linear(feature_dim, 1)`` head per label; its
output is a ``[B, T]`` tensor of logits. Targets are ``[B, T]`` tensors of 0/1 floats.
"""

from __future__ import annotations

import math
import warnings
from abc import abstractmethod

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score
from torch import nn
from torch.utils.data import Dataset

from tasks.base import MultiTaskModel, TaskSuite
from tasks.models import build_encoder


class MultiLabelModel(MultiTaskModel):
    """A multi-task model whose heads each emit one logit; ``forward`` returns ``[B, T]`` logits."""

    def combine(self, head_outputs: list[torch.Tensor]) -> torch.Tensor:
        """Concatenate the heads' ``[B, 1]`` logits into a ``[B, T]`` tensor."""
        return torch.cat(head_outputs, dim=1)


class ImageLabelDataset(Dataset):
    """Images held in memory as uint8, served as float32 in [0, 1] with float32 label vectors.

    Attributes:
        images: uint8 tensor ``[N, C, H, W]``.
        labels: float32 tensor ``[N, T]`` of 0/1.
        item_ids: one identifier per item, in item order.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, item_ids: list[str]) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be a uint8 tensor [N, C, H, W], got {images.dtype} {tuple(images.shape)}")
        if labels.dim() != 2 or labels.shape[0] != images.shape[0] or len(item_ids) != images.shape[0]:
            raise ValueError(
                f"need one label row and one id per image: {images.shape[0]} images, "
                f"{labels.shape[0]} label rows, {len(item_ids)} ids"
            )
        self.images = images
        self.labels = labels.to(torch.float32)
        self.item_ids = list(item_ids)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index].to(torch.float32) / 255.0, self.labels[index]


def _check_logits_and_targets(outputs: torch.Tensor, targets: torch.Tensor, n_tasks: int) -> None:
    if outputs.dim() != 2 or outputs.shape[1] != n_tasks or outputs.shape != targets.shape:
        raise ValueError(
            f"expected logits and targets of shape [N, {n_tasks}], got {tuple(outputs.shape)} "
            f"and {tuple(targets.shape)}"
        )


class MultiLabelSuite(TaskSuite):
    """A suite of binary tasks, one per label, evaluated by AUROC, accuracy and F1.

    Subclasses provide the data (:meth:`splits`, :meth:`item_ids`, :meth:`labels`) and
    :meth:`config`; this class provides the model, losses, training accuracy and metrics.
    ``in_channels`` is the number of image channels the encoder reads.
    """

    primary_metric = "mean_auroc"
    primary_direction = "maximize"
    in_channels: int = 1

    @abstractmethod
    def labels(self, split: str) -> torch.Tensor:
        """The 0/1 label matrix ``[N, T]`` of ``split``, in item order."""

    def build_model(self, backbone: str = "resnet18") -> MultiLabelModel:
        """Encoder from :func:`tasks.models.build_encoder` plus one linear single-logit head per task."""
        encoder, feature_dim = build_encoder(backbone, in_channels=self.in_channels)
        heads = nn.ModuleList(nn.Linear(feature_dim, 1) for _ in self.task_names)
        return MultiLabelModel(encoder, heads)

    def losses(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Binary cross-entropy with logits of each task, averaged over the batch: shape ``[T]``."""
        _check_logits_and_targets(outputs, targets, self.n_tasks)
        per_item = F.binary_cross_entropy_with_logits(outputs, targets.to(outputs.dtype), reduction="none")
        return per_item.mean(dim=0)

    def correct(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per-task count of items where ``sigmoid(logit) >= 0.5`` equals the target: shape ``[T]``.

        ``sigmoid(logit) >= 0.5`` is computed as ``logit >= 0``, which is the same test.
        """
        _check_logits_and_targets(outputs, targets, self.n_tasks)
        predictions = outputs.detach() >= 0
        return (predictions == (targets >= 0.5)).sum(dim=0).to(torch.float32)

    def evaluate(self, outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        """AUROC, accuracy and F1 of every task, and their macro means over tasks.

        Keys: ``auroc/<task>``, ``accuracy/<task>``, ``f1/<task>``, ``mean_auroc``,
        ``mean_accuracy``, ``mean_f1``. Predictions use the threshold
        ``sigmoid(logit) >= 0.5``. A task whose targets hold one class only has no AUROC:
        it is reported as NaN, left out of ``mean_auroc``, and an ``UndefinedMetricWarning``
        names it. F1 of a task with neither predicted nor true positives is 0.
        """
        _check_logits_and_targets(outputs, targets, self.n_tasks)
        scores = torch.sigmoid(outputs.detach().to(torch.float64)).cpu().numpy()
        truth = (targets.detach().cpu().numpy() >= 0.5).astype(np.int64)
        predictions = (scores >= 0.5).astype(np.int64)
        metrics: dict[str, float] = {}
        aurocs, accuracies, f1s = [], [], []
        for index, task in enumerate(self.task_names):
            task_truth = truth[:, index]
            if np.unique(task_truth).size < 2:
                warnings.warn(
                    f"AUROC of task {task!r} is undefined: its {task_truth.size} evaluated targets are all "
                    f"{int(task_truth[0]) if task_truth.size else 'missing'}; it is reported as NaN and left "
                    "out of mean_auroc",
                    UndefinedMetricWarning,
                    stacklevel=2,
                )
                auroc = math.nan
            else:
                auroc = float(roc_auc_score(task_truth, scores[:, index]))
                aurocs.append(auroc)
            accuracy = float(accuracy_score(task_truth, predictions[:, index]))
            f1 = float(f1_score(task_truth, predictions[:, index], zero_division=0.0))
            metrics[f"auroc/{task}"] = auroc
            metrics[f"accuracy/{task}"] = accuracy
            metrics[f"f1/{task}"] = f1
            accuracies.append(accuracy)
            f1s.append(f1)
        metrics["mean_auroc"] = float(np.mean(aurocs)) if aurocs else math.nan
        metrics["mean_accuracy"] = float(np.mean(accuracies))
        metrics["mean_f1"] = float(np.mean(f1s))
        return metrics

    def metric_directions(self) -> dict[str, str]:
        """Every metric of :meth:`evaluate` is better when higher."""
        keys = [f"{metric}/{task}" for task in self.task_names for metric in ("auroc", "accuracy", "f1")]
        keys += ["mean_auroc", "mean_accuracy", "mean_f1"]
        return {key: "maximize" for key in keys}

    def prevalence(self) -> list[float]:
        """Positive rate of each task in the train split."""
        return self.labels("train").to(torch.float64).mean(dim=0).tolist()
