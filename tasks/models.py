"""Shared encoders built from torchvision backbones, and the input normalisation before them.

An encoder takes ``in_channels``-channel images (1 for grayscale X-rays) and returns pooled
features of shape ``[B, feature_dim]``: the ImageNet classifier is removed so that task heads
can be attached on top. It starts randomly initialised, or from torchvision's ImageNet
weights when they are on disk (nothing is ever downloaded here; see :func:`build_encoder`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn
from torchvision import models

BACKBONES: tuple[str, ...] = ("resnet18", "resnet50", "densenet121")
"""Names accepted by :func:`build_encoder`."""

IMAGENET_WEIGHTS: dict[str, models.WeightsEnum] = {
    "resnet18": models.ResNet18_Weights.IMAGENET1K_V1,
    "resnet50": models.ResNet50_Weights.IMAGENET1K_V2,
    "densenet121": models.DenseNet121_Weights.IMAGENET1K_V1,
}
"""torchvision's ImageNet weights used by ``weights="imagenet"`` (its recommended ones)."""

NORMALIZATIONS: dict[str, tuple[float, float]] = {
    "none": (0.0, 1.0),
    "imagenet": (0.449, 0.226),
}
"""Input ``(mean, std)`` after scaling to [0, 1]. ``imagenet``: the means of ImageNet's
per-channel statistics (0.485, 0.456, 0.406) and (0.229, 0.224, 0.225), the usual choice
for grayscale images fed to ImageNet-pretrained networks whose first convolution sums the
colour channels."""


class ImageNormalization(nn.Module):
    """Scale uint8 images to [0, 1] (float images are taken as already there); then ``(x - mean) / std``.

    Part of the model, so that data stay uint8 (four times less memory traffic) until they
    reach the training device.
    """

    def __init__(self, mean: float, std: float) -> None:
        super().__init__()
        if std <= 0:
            raise ValueError(f"std must be positive, got {std}")
        self.register_buffer("mean", torch.tensor(float(mean)))
        self.register_buffer("std", torch.tensor(float(std)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W]`` uint8 or float images -> normalised float32 images."""
        if not x.is_floating_point():
            x = x.to(torch.float32) / 255.0
        return (x - self.mean) / self.std


def imagenet_weights_path(backbone: str) -> Path:
    """Where torchvision looks for ``backbone``'s ImageNet weights: ``<torch hub dir>/checkpoints/<file>``.

    The hub directory is ``$TORCH_HOME/hub`` (default ``~/.cache/torch/hub``).
    """
    weights = IMAGENET_WEIGHTS[backbone]
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(weights.url).path).name


def _missing_weights_message(backbone: str) -> str:
    path = imagenet_weights_path(backbone)
    weights = IMAGENET_WEIGHTS[backbone]
    return (
        f"ImageNet weights for {backbone} are not on this machine: expected {path}. Download them "
        f"once on a machine with internet, e.g. `curl -L --create-dirs -o {path} {weights.url}` or "
        f"`python -c \"import torchvision; torchvision.models.{backbone}(weights='{weights.name}')\"`, "
        "and copy the file there (set TORCH_HOME to use another hub directory), or pass the file "
        "itself as pretrained=/path/to/file.pth"
    )


def _first_conv_like(conv: nn.Conv2d, in_channels: int, pretrained: bool) -> nn.Conv2d:
    """A copy of the RGB stem ``conv`` that reads ``in_channels`` input channels.

    Pretrained, a grayscale stem gets the RGB kernels summed over colour channels, so a gray
    image gives the response the RGB network gives that image repeated in three channels.
    Otherwise the stem is freshly initialised (Kaiming normal, fan-out, ReLU gain, as
    torchvision initialises its ResNets). A pretrained 3-channel stem is kept as is.
    """
    if pretrained and in_channels == conv.in_channels:
        return conv
    replacement = nn.Conv2d(
        in_channels,
        conv.out_channels,
        kernel_size=conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        bias=conv.bias is not None,
    )
    if pretrained and in_channels == 1:
        with torch.no_grad():
            replacement.weight.copy_(conv.weight.sum(dim=1, keepdim=True))
    else:
        nn.init.kaiming_normal_(replacement.weight, mode="fan_out", nonlinearity="relu")
    return replacement


def backbone_network(backbone: str, constructor: Callable[..., nn.Module], weights: str | Path | None) -> nn.Module:
    """``constructor``'s torchvision network for ``backbone``, random or with ``weights``.

    ``weights``: ``None``/``"none"`` (random), ``"imagenet"`` (the file torchvision keeps in its
    hub cache, :func:`imagenet_weights_path`; never downloaded) or a state-dict file.
    """
    if weights is None or weights == "none":
        return constructor(weights=None)
    if weights == "imagenet":
        if not imagenet_weights_path(backbone).is_file():
            raise FileNotFoundError(_missing_weights_message(backbone))
        return constructor(weights=IMAGENET_WEIGHTS[backbone])
    path = Path(weights)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weights file {path} does not exist; or use pretrained=imagenet")
    network = constructor(weights=None)
    state = torch.load(path, map_location="cpu", weights_only=True)
    try:
        network.load_state_dict(state)
    except RuntimeError as error:
        raise ValueError(
            f"{path} is not a torchvision {backbone} state dict (as saved by model.state_dict()): {error}. "
            f"For torchvision's own release file use pretrained=imagenet with the file at "
            f"{imagenet_weights_path(backbone)}"
        ) from None
    return network


def _resnet_encoder(
    backbone: str, constructor: Callable[..., models.ResNet], in_channels: int, weights: str | Path | None
) -> tuple[nn.Module, int]:
    network = backbone_network(backbone, constructor, weights)
    network.conv1 = _first_conv_like(network.conv1, in_channels, pretrained=weights not in (None, "none"))
    feature_dim = network.fc.in_features
    network.fc = nn.Identity()
    return network, feature_dim


def _densenet_encoder(
    backbone: str, constructor: Callable[..., models.DenseNet], in_channels: int, weights: str | Path | None
) -> tuple[nn.Module, int]:
    network = backbone_network(backbone, constructor, weights)
    network.features.conv0 = _first_conv_like(
        network.features.conv0, in_channels, pretrained=weights not in (None, "none")
    )
    feature_dim = network.classifier.in_features
    network.classifier = nn.Identity()
    return network, feature_dim


def build_encoder(
    backbone: str = "resnet18", in_channels: int = 1, weights: str | Path | None = None
) -> tuple[nn.Module, int]:
    """Build a shared encoder, randomly initialised or pretrained.

    Args:
        backbone: one of :data:`BACKBONES`.
        in_channels: number of input image channels (1 for grayscale).
        weights: ``None`` or ``"none"`` (random), ``"imagenet"`` (torchvision's ImageNet
            weights, read from :func:`imagenet_weights_path`; a ``FileNotFoundError`` says
            where to put them when absent) or the path of a torchvision state dict.

    Returns:
        ``(encoder, feature_dim)``: ``encoder(x)`` maps ``[B, in_channels, H, W]`` to pooled
        features ``[B, feature_dim]`` (512 for resnet18, 2048 for resnet50, 1024 for
        densenet121).
    """
    if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
        raise ValueError(f"in_channels must be a positive integer, got {in_channels!r}")
    if backbone == "resnet18":
        return _resnet_encoder(backbone, models.resnet18, in_channels, weights)
    if backbone == "resnet50":
        return _resnet_encoder(backbone, models.resnet50, in_channels, weights)
    if backbone == "densenet121":
        return _densenet_encoder(backbone, models.densenet121, in_channels, weights)
    raise ValueError(f"unknown backbone {backbone!r}; valid backbones: {', '.join(BACKBONES)}")
