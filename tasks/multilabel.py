"""Reusable base for binary multi-label suites: one binary classification task per label.

The model is a shared encoder with one ``nn.Linear(feature_dim, 1)`` head per label; its
output is a ``[B, T]`` tensor of logits. Targets are ``[B, T]`` tensors of 0/1 floats.
"""

from __future__ import annotations

import math
import warnings
from collections import OrderedDict
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score
from torch import nn
from torch.utils.data import Dataset

from tasks.augment import BatchAugmentation
from tasks.base import MultiTaskModel, TaskSuite
from tasks.checks import check_choice, check_integer
from tasks.models import BACKBONES, NORMALIZATIONS, ImageNormalization, build_encoder


class MultiLabelModel(MultiTaskModel):
    """A multi-task model whose heads each emit one logit; ``forward`` returns ``[B, T]`` logits."""

    def combine(self, head_outputs: list[torch.Tensor]) -> torch.Tensor:
        """Concatenate the heads' ``[B, 1]`` logits into a ``[B, T]`` tensor."""
        return torch.cat(head_outputs, dim=1)


class ImageLabelDataset(Dataset):
    """uint8 images with float32 0/1 label vectors; items are ``(image [C, H, W] uint8, labels [T])``.

    Images stay uint8 until the model's :class:`~tasks.models.ImageNormalization` scales them
    on the training device. ``images`` is a uint8 tensor in memory or a NumPy array, e.g. a
    memory-mapped image cache, read one item at a time; ``rows`` maps item ``i`` to image
    ``rows[i]`` (default: item ``i`` is image ``i``).

    Attributes:
        images: uint8 tensor or array ``[M, C, H, W]``.
        labels: float32 tensor ``[N, T]`` of 0/1.
        item_ids: one identifier per item, in item order.
    """

    def __init__(
        self,
        images: torch.Tensor | np.ndarray,
        labels: torch.Tensor,
        item_ids: list[str],
        rows: np.ndarray | None = None,
    ) -> None:
        if images.dtype not in (torch.uint8, np.uint8) or images.ndim != 4:
            raise ValueError(f"images must be uint8 [N, C, H, W], got {images.dtype} {tuple(images.shape)}")
        self.rows = np.arange(images.shape[0]) if rows is None else np.asarray(rows, dtype=np.int64)
        if labels.dim() != 2 or labels.shape[0] != len(self.rows) or len(item_ids) != len(self.rows):
            raise ValueError(
                f"need one label row and one id per item: {len(self.rows)} items, "
                f"{labels.shape[0]} label rows, {len(item_ids)} ids"
            )
        self.images = images
        self.labels = labels.to(torch.float32)
        self.item_ids = list(item_ids)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.images[self.rows[index]]
        if isinstance(image, np.ndarray):
            image = torch.from_numpy(np.array(image))
        return image, self.labels[index]


def _check_logits_and_targets(outputs: torch.Tensor, targets: torch.Tensor, n_tasks: int) -> None:
    if outputs.dim() != 2 or outputs.shape[1] != n_tasks or outputs.shape != targets.shape:
        raise ValueError(
            f"expected logits and targets of shape [N, {n_tasks}], got {tuple(outputs.shape)} "
            f"and {tuple(targets.shape)}"
        )


class MultiLabelSuite(TaskSuite):
    """A suite of binary tasks, one per label, evaluated by AUROC, accuracy and F1.

    Subclasses build the data (``self._datasets``, one :class:`ImageLabelDataset` per split)
    and provide :meth:`config`; this class provides split access, the model, losses, training
    accuracy and metrics.

    Model options a subclass may set (class defaults shown): ``in_channels = 1`` image
    channels; ``pretrained = "none"`` (or ``"imagenet"`` or a file, see
    :func:`~tasks.models.build_encoder`); ``normalization = "none"`` (a key of
    :data:`~tasks.models.NORMALIZATIONS`); ``hidden_units = 0`` (when positive, a shared
    ``Linear(feature_dim, hidden_units)`` + ReLU layer between encoder and heads, as in
    DeepChest's code); ``augmentation = None`` (a :class:`~tasks.augment.BatchAugmentation`
    applied to training batches).
    """

    primary_metric = "mean_auroc"
    primary_direction = "maximize"
    backbones = BACKBONES
    in_channels: int = 1
    pretrained: str = "none"
    normalization: str = "none"
    hidden_units: int = 0
    augmentation: BatchAugmentation | None = None

    IMAGE_MODEL_OPTION_HELP: dict[str, str] = {
        "pretrained": "none, imagenet (torchvision weights from the local torch hub cache), or a .pth file",
        "normalization": f"input normalisation after scaling to [0, 1]: {', '.join(NORMALIZATIONS)}",
        "hidden_units": "width of a shared hidden layer before the heads (DeepChest's code: 512); 0 = none",
        "crop_scale_min": "least area share of the random resized crop, in (0, 1]; 1 = no crop",
        "flip": "random horizontal flips of training images (true/false)",
        "max_rotation": "largest random rotation of training images in degrees; 0 = none",
    }
    """Help of the options :meth:`_set_image_model_options` takes, for suites that expose them."""

    def _set_image_model_options(
        self,
        pretrained: str,
        normalization: str,
        hidden_units: int,
        crop_scale_min: float,
        flip: bool,
        max_rotation: float,
    ) -> None:
        """Validate and set the model and augmentation options of :data:`IMAGE_MODEL_OPTION_HELP`."""
        self.pretrained = str(pretrained)
        self.normalization = check_choice("normalization", normalization, tuple(NORMALIZATIONS))
        self.hidden_units = check_integer("hidden_units", hidden_units, 0, 65536)
        self.augmentation = BatchAugmentation(
            crop_scale_min=float(crop_scale_min), flip=bool(flip), max_rotation=float(max_rotation)
        )

    def _image_model_config(self) -> dict[str, Any]:
        """The options of :meth:`_set_image_model_options`, for :meth:`config`."""
        augmentation = self.augmentation
        if augmentation is None:
            raise RuntimeError("call _set_image_model_options before _image_model_config")
        return {
            "pretrained": self.pretrained,
            "normalization": self.normalization,
            "hidden_units": self.hidden_units,
            "crop_scale_min": augmentation.crop_scale_min,
            "flip": augmentation.flip,
            "max_rotation": augmentation.max_rotation,
        }

    _datasets: dict[str, ImageLabelDataset]
    """The ``train``, ``val`` and ``test`` datasets; subclasses build them at construction."""

    def _check_split_name(self, split: str) -> None:
        if split not in self._datasets:
            raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(self._datasets)}")

    def splits(self) -> dict[str, ImageLabelDataset]:
        """The ``"train"``, ``"val"`` and ``"test"`` datasets."""
        return dict(self._datasets)

    def item_ids(self, split: str) -> list[str]:
        """The item ids (image file names) of ``split``, in item order."""
        self._check_split_name(split)
        return list(self._datasets[split].item_ids)

    def labels(self, split: str) -> torch.Tensor:
        """The 0/1 label matrix ``[N, T]`` of ``split``, in item order."""
        self._check_split_name(split)
        return self._datasets[split].labels

    def build_model(self, backbone: str = "resnet18") -> MultiLabelModel:
        """Shared encoder (input normalisation, backbone, optional hidden layer) plus one linear single-logit head per task."""
        network, feature_dim = build_encoder(backbone, in_channels=self.in_channels, weights=self.pretrained)
        layers: dict[str, nn.Module] = {
            "normalize": ImageNormalization(*NORMALIZATIONS[self.normalization]),
            "backbone": network,
        }
        if self.hidden_units > 0:
            layers["hidden"] = nn.Sequential(nn.Linear(feature_dim, self.hidden_units), nn.ReLU())
            feature_dim = self.hidden_units
        heads = nn.ModuleList(nn.Linear(feature_dim, 1) for _ in self.task_names)
        return MultiLabelModel(nn.Sequential(OrderedDict(layers)), heads)

    def augment(self, x: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Apply :attr:`augmentation` (if any) to a training batch; labels are unchanged."""
        if self.augmentation is None:
            return x, targets
        return self.augmentation(x), targets

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

    @classmethod
    def reported_metrics(cls) -> tuple[str, ...]:
        """Mean AUROC and mean accuracy over the findings."""
        return ("mean_auroc", "mean_accuracy")

    def prevalence(self) -> list[float]:
        """Positive rate of each task in the train split."""
        return self.labels("train").to(torch.float64).mean(dim=0).tolist()
