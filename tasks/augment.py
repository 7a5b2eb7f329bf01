"""Random training augmentation of image batches on the training device, one resampling per image.

Each image of a batch gets its own random resized crop, horizontal flip and small rotation,
composed into one affine map and applied with one bilinear ``grid_sample`` for the whole
batch. Composing them resamples each image once (three separate transforms would blur it
three times), and a batched map keeps the work on the device that trains: a GPU trains
ResNet-18 at thousands of images per second, faster than a CPU loader could augment them.

The crop follows torchvision's ``RandomResizedCrop``: an area share ``a ~ U(scale_min, 1)``
and an aspect ratio ``r`` log-uniform in ``[3/4, 4/3]`` give a crop of relative width
``sqrt(a r)`` and height ``sqrt(a / r)`` (each at most 1), placed uniformly inside the image
and resized to the full image. In the normalised coordinates of ``affine_grid`` the output
pixel ``p`` samples the input at ``R(theta) F S p + t``, with ``S = diag(w, h)`` the crop size,
``F = diag(-1, 1)`` on flipped images, ``R(theta)`` a rotation by ``theta ~ U(-max, max)``
degrees and ``t`` the crop centre. Pixels mapped outside the image read 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class BatchAugmentation:
    """Per-image random resized crop, horizontal flip and rotation of ``[B, C, H, W]`` batches.

    Attributes:
        crop_scale_min: least area share of a crop, in (0, 1]; 1 disables cropping (and
            the aspect-ratio change).
        flip: flip each image horizontally with probability 1/2.
        max_rotation: largest rotation in degrees, in [0, 180]; 0 disables rotation.
    """

    crop_scale_min: float = 0.75
    flip: bool = True
    max_rotation: float = 10.0

    def __post_init__(self) -> None:
        if not 0.0 < self.crop_scale_min <= 1.0:
            raise ValueError(f"crop_scale_min must be in (0, 1], got {self.crop_scale_min}")
        if not 0.0 <= self.max_rotation <= 180.0:
            raise ValueError(f"max_rotation must be in [0, 180] degrees, got {self.max_rotation}")

    @property
    def enabled(self) -> bool:
        """Whether the augmentation changes anything."""
        return self.crop_scale_min < 1.0 or self.flip or self.max_rotation > 0.0

    def affine_matrices(self, batch_size: int, device: torch.device) -> torch.Tensor:
        """One random ``[2, 3]`` affine map per image (see the module docstring): ``[B, 2, 3]``."""
        uniform = torch.rand(batch_size, 6, device=device)
        area = self.crop_scale_min + (1.0 - self.crop_scale_min) * uniform[:, 0]
        log_ratio = math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * uniform[:, 1]
        if self.crop_scale_min == 1.0:  # no crop: keep the whole image at its own aspect ratio
            log_ratio = torch.zeros_like(log_ratio)
        width = torch.sqrt(area * torch.exp(log_ratio)).clamp(max=1.0)
        height = torch.sqrt(area / torch.exp(log_ratio)).clamp(max=1.0)
        centre_x = (1.0 - width) * (2.0 * uniform[:, 2] - 1.0)
        centre_y = (1.0 - height) * (2.0 * uniform[:, 3] - 1.0)
        flip = torch.where(uniform[:, 4] < 0.5, -1.0, 1.0) if self.flip else torch.ones_like(width)
        angle = torch.deg2rad(self.max_rotation * (2.0 * uniform[:, 5] - 1.0))
        cos, sin = torch.cos(angle), torch.sin(angle)
        return torch.stack(
            [
                torch.stack([cos * flip * width, -sin * height, centre_x], dim=1),
                torch.stack([sin * flip * width, cos * height, centre_y], dim=1),
            ],
            dim=1,
        )

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Augmented float32 images in [0, 1] (uint8 input is scaled by 1/255), same shape."""
        if images.dim() != 4:
            raise ValueError(f"expected images [B, C, H, W], got shape {tuple(images.shape)}")
        if not images.is_floating_point():
            images = images.to(torch.float32) / 255.0
        if not self.enabled:
            return images
        theta = self.affine_matrices(images.shape[0], images.device).to(images.dtype)
        grid = F.affine_grid(theta, list(images.shape), align_corners=False)
        return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
