"""Hard-parameter-sharing models for dense prediction: a dilated ResNet encoder, a DeepLab head per task.

The architecture is LibMTL's for NYUv2 (its ``examples/nyu``): a ResNet-50 whose last two
stages trade their stride for dilation (Yu et al., "Dilated Residual Networks", CVPR 2017),
so that the shared feature map has 1/8 of the input resolution, and one DeepLabV3 head per task
(atrous spatial pyramid pooling with rates 12, 24, 36, then a 3x3 and a 1x1 convolution;
Chen et al., "Rethinking Atrous Convolution", 2017). Every head's output is upsampled
bilinearly (``align_corners=True``, as LibMTL) to the input size.

``resnet18`` is a small variant for quick runs, dilated the same way. The encoders are
randomly initialised unless ImageNet or other weights are asked for (LibMTL starts from
torchvision's original ImageNet weights of ResNet-50).
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision import models
from torchvision.models.segmentation.deeplabv3 import DeepLabHead

from tasks.base import MultiTaskModel
from tasks.models import backbone_network

DENSE_BACKBONES: tuple[str, ...] = ("resnet18", "resnet50")
"""Names accepted by :func:`build_dilated_encoder`."""


def dilate_stage(stage: nn.Sequential, dilation: int, previous_dilation: int) -> None:
    """Make a stride-2 ResNet stage keep its input resolution, in place.

    Every stride-2 convolution (the first block's and its shortcut's) gets stride 1; the 3x3
    convolutions of the first block get ``previous_dilation``, those of the later blocks
    ``dilation``, with padding equal to the dilation so that sizes are kept. This is what
    torchvision's ``replace_stride_with_dilation`` does for the Bottleneck blocks of ResNet-50,
    which it does not support for the BasicBlocks of ResNet-18.
    """
    for index, block in enumerate(stage):
        block_dilation = previous_dilation if index == 0 else dilation
        for module in block.modules():
            if not isinstance(module, nn.Conv2d):
                continue
            module.stride = (1, 1)
            if module.kernel_size == (3, 3):
                module.dilation = (block_dilation, block_dilation)
                module.padding = (block_dilation, block_dilation)


def build_dilated_encoder(backbone: str = "resnet50", weights: str | Path | None = None) -> tuple[nn.Module, int]:
    """A ResNet encoder with output stride 8: ``[B, 3, H, W]`` -> ``[B, C, ceil(H/8), ceil(W/8)]``.

    Args:
        backbone: one of :data:`DENSE_BACKBONES` (``C`` = 512 for resnet18, 2048 for resnet50).
        weights: ``None`` or ``"none"`` (random initialisation), ``"imagenet"`` or the path of a
            torchvision state dict, read as :func:`tasks.models.build_encoder` reads them
            (nothing is downloaded; a missing file raises an error that says where to put it).

    Returns:
        ``(encoder, C)``; the encoder is the ResNet without its pooling and classifier.
    """
    if backbone == "resnet50":
        dilated_resnet50 = functools.partial(models.resnet50, replace_stride_with_dilation=[False, True, True])
        network = backbone_network(backbone, dilated_resnet50, weights)
    elif backbone == "resnet18":
        network = backbone_network(backbone, models.resnet18, weights)
        dilate_stage(network.layer3, dilation=2, previous_dilation=1)
        dilate_stage(network.layer4, dilation=4, previous_dilation=2)
    else:
        raise ValueError(
            f"unknown backbone {backbone!r} for a dense-prediction suite; valid backbones: {', '.join(DENSE_BACKBONES)}"
        )
    encoder = nn.Sequential(
        network.conv1, network.bn1, network.relu, network.maxpool,
        network.layer1, network.layer2, network.layer3, network.layer4,
    )
    return encoder, network.fc.in_features


class DenseMultiTaskModel(MultiTaskModel):
    """Shared encoder and one dense head per task; ``forward(x)`` returns ``{task: [B, C_task, H, W]}``.

    Each head's output is upsampled bilinearly (``align_corners=True``) to the input's height
    and width.
    """

    def __init__(self, encoder: nn.Module, heads: nn.ModuleList, task_names: tuple[str, ...]) -> None:
        super().__init__(encoder, heads)
        if len(task_names) != len(heads):
            raise ValueError(f"need one task name per head: {len(heads)} heads, {len(task_names)} names")
        self.task_names = tuple(task_names)

    def decode(self, x: torch.Tensor, features: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every head's prediction from the shared ``features``, at the resolution of the input ``x``."""
        size = x.shape[-2:]
        return {
            task: F.interpolate(head(features), size=size, mode="bilinear", align_corners=True)
            for task, head in zip(self.task_names, self.heads)
        }


def build_dense_model(
    task_channels: dict[str, int], backbone: str = "resnet50", weights: str | Path | None = None
) -> DenseMultiTaskModel:
    """A dilated encoder from :func:`build_dilated_encoder` and a torchvision ``DeepLabHead`` per task.

    Args:
        task_channels: output channels of each task's head, in task order (e.g. 13 classes
            for segmentation, 1 for depth, 3 for surface normals).
        weights: the encoder's initial weights, as :func:`build_dilated_encoder` takes them.
    """
    encoder, channels = build_dilated_encoder(backbone, weights)
    heads = nn.ModuleList(DeepLabHead(channels, out_channels) for out_channels in task_channels.values())
    return DenseMultiTaskModel(encoder, heads, tuple(task_channels))
