"""The interface every task suite implements, and the multi-task model it builds.

A task suite bundles everything a training run needs to know about one multi-task problem:
its data splits, a model (one shared encoder plus one head per task), one loss per task,
per-task training accuracy, and the evaluation metrics of a whole split.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

SPLIT_NAMES: tuple[str, ...] = ("train", "val", "test")
"""Keys of the dictionary returned by :meth:`TaskSuite.splits`."""


class MultiTaskModel(nn.Module):
    """A shared encoder followed by one head per task (hard parameter sharing).

    ``forward(x)`` runs the encoder once and every head on its features (:meth:`decode`); the
    heads' outputs are combined by :meth:`combine` (a list by default; suites whose heads all
    emit one logit override it to return a ``[B, T]`` tensor). Models whose heads need more
    than the features (e.g. the input size, to upsample) override :meth:`decode`.
    """

    def __init__(self, encoder: nn.Module, heads: nn.ModuleList) -> None:
        super().__init__()
        if len(heads) == 0:
            raise ValueError("a multi-task model needs at least one head; got an empty ModuleList")
        self.encoder = encoder
        self.heads = heads

    def forward(self, x: torch.Tensor) -> Any:
        """Encode ``x`` once and apply every task head to the shared features."""
        return self.forward_with_features(x)[0]

    def forward_with_features(self, x: torch.Tensor) -> tuple[Any, torch.Tensor]:
        """The model's output and the shared representation ``z = encoder(x)`` the heads read.

        The feature-level gradient mode weighs tasks by the gradients of the losses with
        respect to ``z``.
        """
        features = self.encoder(x)
        return self.decode(x, features), features

    def decode(self, x: torch.Tensor, features: torch.Tensor) -> Any:
        """Every head applied to the shared ``features``, combined (``x`` is the model's input)."""
        return self.combine([head(features) for head in self.heads])

    def combine(self, head_outputs: list[torch.Tensor]) -> Any:
        """Combine the per-task head outputs into the model's output (here: the list itself)."""
        return head_outputs

    def shared_parameters(self) -> list[nn.Parameter]:
        """The parameters shared by all tasks: those of the encoder."""
        return list(self.encoder.parameters())


class TaskSuite(ABC):
    """A multi-task problem: data splits, model, per-task losses and evaluation.

    Class attributes every suite defines:
        task_names: one name per task; ``T = len(task_names)``.
        primary_metric: the key of :meth:`evaluate`'s result used for model selection.
        primary_direction: ``"maximize"`` or ``"minimize"`` for ``primary_metric``.
        option_help: one help line per constructor option (read by :func:`tasks.options`).
        backbones: the encoders :meth:`build_model` accepts (checked before a run starts).

    ``name`` is set by :func:`tasks.register`.
    """

    name: str
    task_names: tuple[str, ...]
    primary_metric: str
    primary_direction: str
    option_help: dict[str, str]
    backbones: tuple[str, ...]
    run_defaults: dict[str, Any] = {}
    """Training defaults that suit this suite (e.g. ``epochs``, ``batch_size``); run options win."""

    @property
    def n_tasks(self) -> int:
        """The number of tasks ``T``."""
        return len(self.task_names)

    @abstractmethod
    def splits(self) -> dict[str, Dataset]:
        """The ``"train"``, ``"val"`` and ``"test"`` datasets; items are ``(x, targets)``."""

    @abstractmethod
    def item_ids(self, split: str) -> list[str]:
        """Stable identifiers of the items of ``split`` (e.g. image file names), in item order."""

    @abstractmethod
    def build_model(self, backbone: str = "resnet18") -> MultiTaskModel:
        """A freshly initialised model for this suite (shared encoder + one head per task)."""

    @abstractmethod
    def losses(self, outputs: Any, targets: Any) -> torch.Tensor:
        """Per-task losses of one batch: a differentiable tensor of shape ``[T]`` (batch means)."""

    @abstractmethod
    def correct(self, outputs: Any, targets: Any) -> torch.Tensor:
        """Per-task number of correct predictions in one batch: a float tensor of shape ``[T]``.

        Used to accumulate each task's training accuracy over an epoch.
        """

    @abstractmethod
    def evaluate(self, outputs: Any, targets: Any) -> dict[str, float]:
        """Metrics of a whole split, from its concatenated outputs and targets."""

    @abstractmethod
    def metric_directions(self) -> dict[str, str]:
        """For each metric key :meth:`evaluate` returns: ``"maximize"`` or ``"minimize"``."""

    @abstractmethod
    def config(self) -> dict[str, Any]:
        """The suite's options (as passed to :func:`tasks.create`, defaults filled in), for logging."""

    def task_metrics(self) -> dict[str, tuple[str, ...]]:
        """For each task, the keys of :meth:`evaluate` that measure it (used by Delta_m).

        The default is each task's own primary per-task metric, ``<primary>/<task>``, for
        suites whose primary metric is a mean over tasks named ``mean_<primary>``; suites
        with several metrics per task (e.g. NYUv2) override it.
        """
        metric = self.primary_metric.removeprefix("mean_")
        return {task: (f"{metric}/{task}",) for task in self.task_names}

    @classmethod
    def reported_metrics(cls) -> tuple[str, ...]:
        """The keys of :meth:`evaluate` that results tables show for this suite.

        The default is the primary metric; suites that report more (e.g. NYUv2's LibMTL
        metrics) override it. Read from the class alone, without building the suite.
        """
        return (cls.primary_metric,)

    def augment(self, x: Any, targets: Any) -> tuple[Any, Any]:
        """Random training augmentation of one batch already on the training device.

        Called on every training batch (never on validation or test batches), after it is
        moved to the device, inside the timed ``data`` phase; randomness comes from torch's
        global generator, which the harness seeds per run. The default changes nothing.
        """
        return x, targets

    def evaluation_record(self, outputs: Any, targets: Any) -> tuple[Any, Any]:
        """What :meth:`evaluate` needs of one evaluated batch: ``(outputs, targets)`` to keep.

        The harness applies it to every batch of a split on the device, keeps the result on
        the CPU and hands :meth:`evaluate` the concatenation. The default keeps both as they
        are; dense-prediction suites keep a smaller form with the same metrics (e.g. predicted
        classes instead of class scores) so that a whole split fits in memory.
        """
        return outputs, targets

    def prevalence(self) -> list[float] | None:
        """Positive rate of each task in the train split for binary suites; ``None`` otherwise."""
        return None

    def identity(self) -> dict[str, Any]:
        """What identifies the data a run saw, so results can be checked to be comparable.

        Returns the suite name, its options, and for each split its size and the sha256 of
        its sorted item ids (one id per line, UTF-8).
        """
        split_identities = {}
        for split in SPLIT_NAMES:
            ids = self.item_ids(split)
            digest = hashlib.sha256("\n".join(sorted(ids)).encode("utf-8")).hexdigest()
            split_identities[split] = {"size": len(ids), "sha256": digest}
        return {"suite": self.name, "options": self.config(), "splits": split_identities}
