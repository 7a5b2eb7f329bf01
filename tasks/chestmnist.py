"""``chestmnist``: MedMNIST's ChestMNIST, the 14 ChestX-ray14 findings on small images.

ChestMNIST (Yang et al., Scientific Data 2023) resizes NIH ChestX-ray14 to 28, 64, 128 or
224 pixels and keeps the data set's official patient-wise split, as train 78,468 / val
11,219 / test 22,433 images. Its labels are the 14 findings in the order of
:data:`~tasks.nih.FINDINGS`. The suite reads MedMNIST's file from ``data_dir``:
``chestmnist.npz`` for 28 px, ``chestmnist_<size>.npz`` otherwise, with arrays
``<split>_images`` uint8 ``[N, S, S]`` and ``<split>_labels`` uint8 ``[N, 14]``. With
``download=true`` and the file absent, the ``medmnist`` package fetches it (needs internet
and ``pip install -e ".[chestmnist]"``). All images are held in memory (5.6 GB at 224 px).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tasks.base import SPLIT_NAMES
from tasks.checks import check_integer
from tasks.multilabel import ImageLabelDataset, MultiLabelSuite
from tasks.nih import FINDINGS, SUBSET_OPTION_HELP, draw_subset
from tasks.registry import register

SIZES: tuple[int, ...] = (28, 64, 128, 224)
DOWNLOAD_URL = "https://zenodo.org/records/10519652"
"""MedMNIST v2's record on Zenodo, which holds every ``chestmnist[_SIZE].npz``."""


def npz_name(size: int) -> str:
    """MedMNIST's file name of ChestMNIST at ``size`` pixels."""
    return "chestmnist.npz" if size == 28 else f"chestmnist_{size}.npz"


def _download(data_dir: Path, size: int) -> None:
    """Fetch ``npz_name(size)`` into ``data_dir`` with the ``medmnist`` package.

    Raises:
        FileNotFoundError: the package is not installed, so the absent file cannot be fetched
            (the message says how to install it and where to put the file instead).
    """
    try:
        import medmnist
    except ModuleNotFoundError:
        raise FileNotFoundError(
            f"{data_dir / npz_name(size)} does not exist and download=true needs the medmnist package, which is "
            f'not installed: pip install -e ".[chestmnist]", or download {npz_name(size)} from {DOWNLOAD_URL} '
            "into that folder"
        ) from None
    data_dir.mkdir(parents=True, exist_ok=True)
    medmnist.ChestMNIST(split="train", download=True, root=str(data_dir), size=size)


@register("chestmnist")
class ChestMNISTSuite(MultiLabelSuite):
    """ChestMNIST: the 14 findings as binary tasks on MedMNIST's resized images, official split.

    Items are ``(x, y)``: ``x`` uint8 ``[1, size, size]``, ``y`` float32 ``[14]``; item ids are
    ``<split>/<index in MedMNIST's array>``. Training batches are augmented on the device.
    """

    task_names = FINDINGS
    run_defaults = {"epochs": 10, "batch_size": 64}
    option_help = {
        "data_dir": "folder holding chestmnist[_SIZE].npz (default $BENCH_DATA_DIR or data/medmnist)",
        "size": f"image side in pixels, one of {', '.join(map(str, SIZES))} (default 28)",
        "download": "fetch the file with the medmnist package when it is absent (needs internet)",
        "data_seed": "seed of the subset draw (independent of the training seed)",
        **SUBSET_OPTION_HELP,
        **MultiLabelSuite.IMAGE_MODEL_OPTION_HELP,
    }

    def __init__(
        self,
        data_dir: str | None = None,
        size: int = 28,
        download: bool = False,
        subset: int = 0,
        data_seed: int = 0,
        min_positives: int = 5,
        pretrained: str = "none",
        normalization: str = "imagenet",
        hidden_units: int = 0,
        crop_scale_min: float = 0.75,
        flip: bool = True,
        max_rotation: float = 10.0,
    ) -> None:
        self.data_dir = Path(data_dir if data_dir is not None else os.environ.get("BENCH_DATA_DIR", "data/medmnist"))
        if size not in SIZES:
            raise ValueError(f"size must be one of {', '.join(map(str, SIZES))}, got {size!r}")
        self.size = int(size)
        self.download = bool(download)
        self.subset = check_integer("subset", subset, 0, 10**7)
        self.data_seed = check_integer("data_seed", data_seed, 0, 2**63 - 1)
        self.min_positives = check_integer("min_positives", min_positives, 0, 10**6)
        self._set_image_model_options(pretrained, normalization, hidden_units, crop_scale_min, flip, max_rotation)
        arrays = self._load()
        rows = {split: np.arange(len(arrays[f"{split}_labels"])) for split in SPLIT_NAMES}
        if self.subset:
            labels = {split: arrays[f"{split}_labels"] for split in SPLIT_NAMES}
            rows = draw_subset(rows, labels, self.subset, self.min_positives, np.random.default_rng([self.data_seed, 1]))
        self._datasets = {
            split: ImageLabelDataset(
                torch.from_numpy(np.ascontiguousarray(arrays[f"{split}_images"][r][:, None])),
                torch.as_tensor(arrays[f"{split}_labels"][r], dtype=torch.float32),
                [f"{split}/{index}" for index in r],
            )
            for split, r in rows.items()
        }

    def _load(self) -> dict[str, np.ndarray]:
        path = self.data_dir / npz_name(self.size)
        if not path.is_file():
            if not self.download:
                raise FileNotFoundError(
                    f"{path} does not exist: get ChestMNIST with --task-opt download=true (needs internet and "
                    f'pip install -e ".[chestmnist]"), or download {npz_name(self.size)} from {DOWNLOAD_URL} '
                    "into that folder"
                )
            _download(self.data_dir, self.size)
        with np.load(path) as archive:
            arrays = {key: archive[key] for key in archive.files}
        for split in SPLIT_NAMES:
            images, labels = arrays.get(f"{split}_images"), arrays.get(f"{split}_labels")
            if images is None or labels is None:
                raise ValueError(f"{path} lacks {split}_images or {split}_labels; is it a MedMNIST ChestMNIST file?")
            if images.dtype != np.uint8 or images.shape[1:] != (self.size, self.size):
                raise ValueError(
                    f"{path}: {split}_images should be uint8 [N, {self.size}, {self.size}], got "
                    f"{images.dtype} {list(images.shape)}"
                )
            if labels.shape != (len(images), len(FINDINGS)):
                raise ValueError(
                    f"{path}: {split}_labels should be [{len(images)}, {len(FINDINGS)}], got {list(labels.shape)}"
                )
        return arrays

    def config(self) -> dict[str, Any]:
        """The suite's options."""
        return {
            "data_dir": str(self.data_dir),
            "size": self.size,
            "download": self.download,
            "subset": self.subset,
            "data_seed": self.data_seed,
            "min_positives": self.min_positives,
            **self._image_model_config(),
        }
