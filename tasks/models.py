"""Shared encoders built from torchvision backbones.

Every encoder is randomly initialised (``weights=None``: nothing is ever downloaded), takes
``in_channels``-channel images (1 for grayscale X-rays), and returns pooled features of
shape ``[B, feature_dim]``: the ImageNet classifier is removed so that task heads can be
attached on top.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn
from torchvision import models

BACKBONES: tuple[str, ...] = ("resnet18", "resnet50", "densenet121")
"""Names accepted by :func:`build_encoder`."""


def _first_conv_like(conv: nn.Conv2d, in_channels: int) -> nn.Conv2d:
    """A freshly initialised copy of ``conv`` that reads ``in_channels`` input channels.

    The initialisation (Kaiming normal, fan-out, ReLU gain) is the one torchvision gives
    the first convolution of its ResNets, so the replaced stem starts like the original.
    """
    replacement = nn.Conv2d(
        in_channels,
        conv.out_channels,
        kernel_size=conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        bias=conv.bias is not None,
    )
    nn.init.kaiming_normal_(replacement.weight, mode="fan_out", nonlinearity="relu")
    return replacement


def _resnet_encoder(constructor: Callable[..., models.ResNet], in_channels: int) -> tuple[nn.Module, int]:
    network = constructor(weights=None)
    network.conv1 = _first_conv_like(network.conv1, in_channels)
    feature_dim = network.fc.in_features
    network.fc = nn.Identity()
    return network, feature_dim


def _densenet_encoder(constructor: Callable[..., models.DenseNet], in_channels: int) -> tuple[nn.Module, int]:
    network = constructor(weights=None)
    network.features.conv0 = _first_conv_like(network.features.conv0, in_channels)
    feature_dim = network.classifier.in_features
    network.classifier = nn.Identity()
    return network, feature_dim


def build_encoder(backbone: str = "resnet18", in_channels: int = 1) -> tuple[nn.Module, int]:
    """Build a randomly initialised shared encoder.

    Args:
        backbone: one of :data:`BACKBONES`.
        in_channels: number of input image channels (1 for grayscale).

    Returns:
        ``(encoder, feature_dim)``: ``encoder(x)`` maps ``[B, in_channels, H, W]`` to pooled
        features ``[B, feature_dim]`` (512 for resnet18, 2048 for resnet50, 1024 for
        densenet121).
    """
    if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
        raise ValueError(f"in_channels must be a positive integer, got {in_channels!r}")
    if backbone == "resnet18":
        return _resnet_encoder(models.resnet18, in_channels)
    if backbone == "resnet50":
        return _resnet_encoder(models.resnet50, in_channels)
    if backbone == "densenet121":
        return _densenet_encoder(models.densenet121, in_channels)
    raise ValueError(f"unknown backbone {backbone!r}; valid backbones: {', '.join(BACKBONES)}")
