"""``nyuv2``: NYUv2 in the preprocessing of MTAN and LibMTL, three dense tasks, the standard metrics.

Data layout (Liu et al., "End-to-End Multi-Task Learning with Attention", CVPR 2019, whose
preprocessed files LibMTL's ``examples/nyu`` reads)::

    DIR/train/{image,label,depth,normal}/{i}.npy     i = 0 ... 794
    DIR/val/{image,label,depth,normal}/{i}.npy       i = 0 ... 653

A folder with other counts in this layout (a subset, or other data preprocessed the same way)
is accepted with a :class:`FolderSizeWarning`: published numbers are on 795 + 654 images.

Each ``.npy`` file holds one image, channels last (LibMTL's ``create_dataset.py`` moves the
last axis to the front when it loads them):

=========  ===============  =========================================================
folder     array shape      content
=========  ===============  =========================================================
image      (288, 384, 3)    RGB in [0, 1]
label      (288, 384)       13-class semantic label 0 ... 12; -1 where unlabelled
depth      (288, 384, 1)    depth; 0 where the sensor gave none
normal     (288, 384, 3)    unit surface normal; (0, 0, 0) where none
=========  ===============  =========================================================

Items are served channels first: image float32 ``[3, H, W]`` and targets
``{"segmentation": int64 [H, W], "depth": float32 [1, H, W], "normal": float32 [3, H, W]}``.

Splits: LibMTL trains on all 795 ``train`` images and reports the epoch that scores best on
the 654 ``val`` images. Here ``val`` is the harness's test split, used once with the checkpoint
selected on a validation split carved at random (``split_seed``) from ``train``
(``val_fraction`` of it), so the test images never select anything.

Tasks, losses (LibMTL's ``examples/nyu/utils.py``) and metrics:

- ``segmentation``: cross-entropy over pixels whose label is not -1. Metrics, over all
  labelled pixels of a split: ``miou`` = mean over classes of TP / (TP + FP + FN), over the
  classes that occur in the labels or the predictions; ``pixel_accuracy`` = share of labelled
  pixels predicted right.
- ``depth``: L1 over pixels whose depth is not 0. Metrics over all such pixels of a split:
  ``abs_err`` = mean |d - d*|, ``rel_err`` = mean |d - d*| / d*, and ``delta_1.25`` = share with
  max(d / d*, d* / d) < 1.25 (Eigen et al., NeurIPS 2014; d <= 0 counts as outside).
- ``normal``: 1 - cosine between the prediction scaled to unit length and the target, over
  pixels whose target is not (0, 0, 0). Metrics over all such pixels of a split: the angle
  error ``acos(<n, n*>)`` in degrees, its ``mean_angle`` and ``median_angle``, and the shares
  ``within_11.25``, ``within_22.5`` and ``within_30`` degrees.

Differences from LibMTL's code, none of which matters on complete data: LibMTL averages depth
errors per batch and then weights the batches by size (the result depends on the batch
size); here they are pooled over all valid pixels. LibMTL's mIoU averages over all 13
classes (NaN when a class occurs neither in labels nor predictions). LibMTL's normal mask
drops pixels whose three target components sum to 0; here only all-zero targets are dropped.
A loss over a batch with no valid pixel is 0 here (LibMTL divides by zero).

Training accuracy (``correct``, also DeepChest's signal) is per image: pixel accuracy for
segmentation, the share within the 1.25 depth ratio for depth, the share within 11.25
degrees for normals, each over the image's valid pixels (0 for an image without any).
The suite's primary metric, used to select the checkpoint, is ``mean_accuracy``: the mean of
``pixel_accuracy``, ``delta_1.25`` and ``within_11.25`` of the split, three shares in [0, 1]
that weigh the three tasks alike without a baseline.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from tasks.base import SPLIT_NAMES, TaskSuite
from tasks.checks import check_integer, check_real
from tasks.dense_models import DENSE_BACKBONES, DenseMultiTaskModel, build_dense_model
from tasks.registry import register

TASK_NAMES: tuple[str, ...] = ("segmentation", "depth", "normal")
TASK_CHANNELS: dict[str, int] = {"segmentation": 13, "depth": 1, "normal": 3}
"""Output channels of each task's head: 13 classes, 1 depth, 3 normal components."""
N_CLASSES = TASK_CHANNELS["segmentation"]
IGNORE_LABEL = -1
IMAGE_SIZE: tuple[int, int] = (288, 384)
"""Height and width of the MTAN/LibMTL preprocessing."""
PUBLISHED_FOLDER_SIZES: dict[str, int] = {"train": 795, "val": 654}
"""Number of images in each folder of the MTAN/LibMTL preprocessing, on which LibMTL and MTAN publish."""
DEFAULT_DATA_DIR = "data/nyuv2"
DOWNLOAD_URL = "https://www.dropbox.com/sh/86nssgwm6hm3vkb/AACrnUQ4GxpdrBbLjb6n-mWNa?dl=0"
"""MTAN's preprocessed NYUv2, linked from MTAN's README and LibMTL's ``examples/nyu/README.md``."""
MODALITIES: tuple[str, ...] = ("image", "label", "depth", "normal")
AUGMENT_SCALES: tuple[float, ...] = (1.0, 1.2, 1.5)
DEPTH_RATIO_THRESHOLD = 1.25
ANGLE_THRESHOLDS: tuple[float, ...] = (11.25, 22.5, 30.0)
_EVALUATION_CHUNK = 16  # images evaluated at once, bounding the working memory of evaluate

METRIC_DIRECTIONS: dict[str, str] = {
    "miou/segmentation": "maximize",
    "pixel_accuracy/segmentation": "maximize",
    "abs_err/depth": "minimize",
    "rel_err/depth": "minimize",
    "delta_1.25/depth": "maximize",
    "mean_angle/normal": "minimize",
    "median_angle/normal": "minimize",
    **{f"within_{threshold:g}/normal": "maximize" for threshold in ANGLE_THRESHOLDS},
    "mean_accuracy": "maximize",
}
"""Every key of :meth:`NYUv2FormatSuite.evaluate` and whether higher or lower is better."""

TASK_METRICS: dict[str, tuple[str, ...]] = {
    "segmentation": ("miou/segmentation", "pixel_accuracy/segmentation"),
    "depth": ("abs_err/depth", "rel_err/depth"),
    "normal": ("mean_angle/normal", "median_angle/normal", *(f"within_{t:g}/normal" for t in ANGLE_THRESHOLDS)),
}
"""The metrics LibMTL reports for each task (the ones Delta_m averages)."""


class FolderSizeWarning(UserWarning):
    """A folder in the NYUv2 layout holds other counts than the published 795 train and 654 val images."""


def file_shape(modality: str, image_size: tuple[int, int]) -> tuple[int, ...]:
    """The array shape of one ``.npy`` file of ``modality`` (channels last)."""
    height, width = image_size
    return {"image": (height, width, 3), "label": (height, width), "depth": (height, width, 1),
            "normal": (height, width, 3)}[modality]


def check_folder(split_dir: Path, image_size: tuple[int, int], expected_count: int | None) -> int:
    """Check ``split_dir/{image,label,depth,normal}/{i}.npy`` and return the number of images.

    Every modality must hold the files ``0.npy ... (N-1).npy``, without gaps, for the same ``N``
    (that of ``image/``), ``N`` must equal ``expected_count`` when given, and every file's array must
    have the shape of :func:`file_shape` and a numeric dtype. Only the files' headers are read.

    Raises:
        FileNotFoundError: a folder or file is missing (the message names it).
        ValueError: a count, file name, shape or dtype is wrong (the message names the file
            and what was expected).
    """
    layout = "DIR/{train,val}/{image,label,depth,normal}/<i>.npy"
    if not split_dir.is_dir():
        raise FileNotFoundError(f"{split_dir} does not exist; expected the NYUv2 layout {layout}")
    indices: dict[str, set[int]] = {}
    for modality in MODALITIES:
        folder = split_dir / modality
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder} does not exist; expected the NYUv2 layout {layout}")
        found = set()
        for path in folder.glob("*.npy"):
            if not path.stem.isdigit():
                raise ValueError(f"{path}: expected files named <i>.npy with i = 0, 1, 2, ...")
            found.add(int(path.stem))
        indices[modality] = found
    count = len(indices["image"])
    if count == 0:
        raise FileNotFoundError(f"{split_dir / 'image'} holds no .npy files; expected the NYUv2 layout {layout}")
    if expected_count is not None and count != expected_count:
        raise ValueError(
            f"{split_dir / 'image'} holds {count} .npy files; expected {expected_count}: the folder is incomplete, "
            "delete it to have it written again"
        )
    highest = max(indices["image"])
    gaps = sorted(set(range(highest)) - indices["image"])
    if gaps:
        raise FileNotFoundError(
            f"{split_dir / 'image' / f'{gaps[0]}.npy'} is missing, a gap in the numbering ({len(gaps)} missing "
            f"below {highest}.npy): the images must be numbered 0.npy, 1.npy, ... without gaps"
        )
    wanted = set(range(count))
    for modality in MODALITIES:
        missing = sorted(wanted - indices[modality])
        extra = sorted(indices[modality] - wanted)
        if missing:
            raise FileNotFoundError(
                f"{split_dir / modality / f'{missing[0]}.npy'} is missing ({len(missing)} missing in all): "
                f"{split_dir / 'image'} holds {count} images, so every folder needs 0.npy ... {count - 1}.npy"
            )
        if extra:
            raise ValueError(
                f"{split_dir / modality / f'{extra[0]}.npy'} is unexpected: {split_dir / 'image'} holds "
                f"{count} images, so every folder needs exactly 0.npy ... {count - 1}.npy"
            )
    files = [(modality, index) for index in range(count) for modality in MODALITIES]
    for modality, index in tqdm(files, desc=f"checking {split_dir}", unit="file", leave=False, disable=None):
        path = split_dir / modality / f"{index}.npy"
        try:
            array = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as error:
            raise ValueError(f"{path} is not a readable .npy array: {error}") from None
        expected = file_shape(modality, image_size)
        if array.shape != expected:
            raise ValueError(
                f"{path} has shape {array.shape}; expected {expected} (height, width"
                f"{', channels' if len(expected) == 3 else ''}; channels last)"
            )
        if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
            raise ValueError(f"{path} has dtype {array.dtype}; expected a numeric array")
    return count


def find_root(data_dir: str | None) -> Path:
    """The NYUv2 folder ``data_dir`` (default :data:`DEFAULT_DATA_DIR`), or an error saying where to get the data."""
    root = Path(data_dir if data_dir is not None else DEFAULT_DATA_DIR).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(
            f"no NYUv2 folder at {root}: download MTAN's preprocessed NYUv2 from {DOWNLOAD_URL} (linked from "
            "LibMTL's examples/nyu/README.md), unpack it so that the folder holds train/ and val/, and pass "
            f"--data-dir DIR (default {DEFAULT_DATA_DIR}; README, 'NYUv2')"
        )
    return root


class NYUv2Dataset(Dataset):
    """Images of one folder of the NYUv2 layout, read from disk when an item is accessed.

    Items are ``(image [3, H, W] float32, {"segmentation": [H, W] int64, "depth": [1, H, W],
    "normal": [3, H, W]})``. ``indices`` are the file numbers served, in item order.
    """

    def __init__(self, split_dir: Path, indices: Sequence[int]) -> None:
        self.split_dir = split_dir
        self.indices = [int(index) for index in indices]

    def __len__(self) -> int:
        return len(self.indices)

    def _channels_first(self, modality: str, index: int) -> Tensor:
        array = np.load(self.split_dir / modality / f"{index}.npy")
        return torch.from_numpy(np.ascontiguousarray(np.moveaxis(array, -1, 0), dtype=np.float32))

    def _label(self, index: int) -> Tensor:
        path = self.split_dir / "label" / f"{index}.npy"
        label = np.load(path)
        valid = np.isin(label, np.arange(IGNORE_LABEL, N_CLASSES))
        if not valid.all():
            bad = np.unique(label[~valid])[:5].tolist()
            raise ValueError(
                f"{path} holds label values {bad}; expected {IGNORE_LABEL} (unlabelled) or a class 0 ... {N_CLASSES - 1}"
            )
        return torch.from_numpy(label.astype(np.int64))

    def __getitem__(self, position: int) -> tuple[Tensor, dict[str, Tensor]]:
        index = self.indices[position]
        targets = {
            "segmentation": self._label(index),
            "depth": self._channels_first("depth", index),
            "normal": self._channels_first("normal", index),
        }
        return self._channels_first("image", index), targets


def carve_validation(n_train: int, val_fraction: float, split_seed: int) -> tuple[list[int], list[int]]:
    """Split file numbers ``0 ... n_train-1`` at random into (train, val), each sorted.

    ``round(n_train * val_fraction)`` numbers go to val; the permutation comes from
    ``numpy.random.default_rng(split_seed)``.
    """
    n_val = round(n_train * val_fraction)
    if not 1 <= n_val <= n_train - 2:
        raise ValueError(
            f"val_fraction={val_fraction} of {n_train} training images gives {n_val} validation images; "
            f"choose it so that at least 1 image goes to validation and 2 stay for training"
        )
    order = np.random.default_rng(split_seed).permutation(n_train)
    return sorted(order[n_val:].tolist()), sorted(order[:n_val].tolist())


# ---------------------------------------------------------------- metrics


def confusion_matrix(predicted: Tensor, labels: Tensor, n_classes: int = N_CLASSES) -> Tensor:
    """Pixel counts ``[C, C]`` (int64; row = true class, column = predicted class) over labelled pixels.

    ``predicted`` and ``labels`` are integer class maps of the same shape; pixels labelled
    ``-1`` are left out.
    """
    labelled = labels != IGNORE_LABEL
    pairs = labels[labelled].to(torch.int64) * n_classes + predicted[labelled].to(torch.int64)
    return torch.bincount(pairs, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def segmentation_scores(confusion: Tensor) -> dict[str, float]:
    """``miou`` and ``pixel_accuracy`` of a confusion matrix from :func:`confusion_matrix`.

    IoU_c = TP_c / (TP_c + FP_c + FN_c); mIoU averages it over the classes with
    TP_c + FP_c + FN_c > 0. Pixel accuracy = sum_c TP_c / number of labelled pixels. Both are
    NaN without a labelled pixel.
    """
    confusion = confusion.to(torch.float64)
    true_positives = confusion.diagonal()
    union = confusion.sum(0) + confusion.sum(1) - true_positives
    occurring = union > 0
    total = confusion.sum()
    return {
        "miou": float((true_positives[occurring] / union[occurring]).mean()) if occurring.any() else math.nan,
        "pixel_accuracy": float(true_positives.sum() / total) if total > 0 else math.nan,
    }


def depth_within_ratio(predicted: Tensor, target: Tensor) -> Tensor:
    """Boolean map: the target depth is valid (not 0) and max(d/d*, d*/d) < 1.25 (d <= 0 is never within)."""
    valid = (target != 0) & (predicted > 0)
    safe_predicted = torch.where(valid, predicted, torch.ones_like(predicted))
    safe_target = torch.where(valid, target, torch.ones_like(target))
    ratio = torch.maximum(safe_predicted / safe_target, safe_target / safe_predicted)
    return valid & (ratio < DEPTH_RATIO_THRESHOLD)


def depth_error_sums(predicted: Tensor, target: Tensor) -> Tensor:
    """Sums over the valid pixels (target depth not 0): ``[sum |d-d*|, sum |d-d*|/d*, n within 1.25, n valid]``, float64."""
    valid = target != 0
    error = (predicted[valid] - target[valid]).abs().to(torch.float64)
    return torch.stack([
        error.sum(),
        (error / target[valid].to(torch.float64)).sum(),
        depth_within_ratio(predicted, target).sum().to(torch.float64),
        valid.sum().to(torch.float64),
    ])


def depth_scores(sums: Tensor) -> dict[str, float]:
    """``abs_err``, ``rel_err`` and ``delta_1.25`` from the sums of :func:`depth_error_sums` (NaN without a valid pixel)."""
    absolute, relative, within, count = sums.tolist()
    if count == 0:
        return {"abs_err": math.nan, "rel_err": math.nan, "delta_1.25": math.nan}
    return {"abs_err": absolute / count, "rel_err": relative / count, "delta_1.25": within / count}


def normal_valid(target: Tensor) -> Tensor:
    """``[B, H, W]`` map of the pixels whose target normal ``[B, 3, H, W]`` is not (0, 0, 0)."""
    return (target != 0).any(dim=1)


def angle_errors(predicted: Tensor, target: Tensor) -> Tensor:
    """Per-pixel angle ``acos(<p / |p|, n*>)`` in degrees, ``[B, H, W]``, between ``[B, 3, H, W]`` normals.

    The target is taken as unit length (as the preprocessing stores it); the cosine is clamped
    to [-1, 1]. A zero prediction has cosine 0 (90 degrees).
    """
    cosine = (F.normalize(predicted, dim=1) * target).sum(dim=1).clamp(-1.0, 1.0)
    return torch.rad2deg(torch.acos(cosine))


def normal_scores(errors: np.ndarray) -> dict[str, float]:
    """``mean_angle``, ``median_angle`` and ``within_<t>`` shares of the angle errors (degrees) of all valid pixels."""
    if errors.size == 0:
        return {"mean_angle": math.nan, "median_angle": math.nan,
                **{f"within_{t:g}": math.nan for t in ANGLE_THRESHOLDS}}
    errors = errors.astype(np.float64)
    return {
        "mean_angle": float(errors.mean()),
        "median_angle": float(np.median(errors)),
        **{f"within_{t:g}": float((errors < t).mean()) for t in ANGLE_THRESHOLDS},
    }


def _per_image_share(hits: Tensor, valid: Tensor) -> Tensor:
    """``[B]``: share of each image's valid pixels that are hits (0 for an image without valid pixels)."""
    dims = tuple(range(1, hits.dim()))
    return (hits & valid).sum(dim=dims).to(torch.float32) / valid.sum(dim=dims).clamp(min=1).to(torch.float32)


# ---------------------------------------------------------------- augmentation


def scale_crop_flip(
    image: Tensor, targets: dict[str, Tensor], scale: float, top: int, left: int, flip: bool
) -> tuple[Tensor, dict[str, Tensor]]:
    """One image's crop of ``1/scale`` of its height and width at (``top``, ``left``), resized back, optionally flipped.

    The image and normals are resized bilinearly (``align_corners=True``), label and depth by
    nearest neighbour; depth is divided by ``scale`` (the scene looks ``scale`` times nearer);
    a horizontal flip mirrors every map and negates the normals' x component. This is the
    augmentation LibMTL's NYUv2 example applies (its ``RandomScaleCrop`` and flip). ``image`` is
    ``[3, H, W]``, targets as the items of :class:`NYUv2Dataset`.
    """
    height, width = image.shape[-2:]
    crop_height, crop_width = int(height / scale), int(width / scale)
    rows, columns = slice(top, top + crop_height), slice(left, left + crop_width)

    def resize(crop: Tensor, mode: str) -> Tensor:
        options = {"align_corners": True} if mode == "bilinear" else {}
        return F.interpolate(crop[None], size=(height, width), mode=mode, **options)[0]

    image = resize(image[:, rows, columns], "bilinear")
    label = resize(targets["segmentation"][None, rows, columns].to(image.dtype), "nearest")[0]
    depth = resize(targets["depth"][:, rows, columns], "nearest") / scale
    normal = resize(targets["normal"][:, rows, columns], "bilinear")
    if flip:
        image, label, depth, normal = (tensor.flip(-1) for tensor in (image, label, depth, normal))
        normal = torch.cat([-normal[:1], normal[1:]])
    return image, {"segmentation": label.to(targets["segmentation"].dtype), "depth": depth, "normal": normal}


# ---------------------------------------------------------------- the suite


class NYUv2FormatSuite(TaskSuite):
    """Segmentation, depth and surface normals from data in the NYUv2 layout of the module docstring.

    Subclasses give the root folder and options to :meth:`_load` and define :meth:`config`.
    The model is :func:`tasks.dense_models.build_dense_model` (dilated ResNet, a DeepLab head
    per task); outputs and targets are dicts keyed by :data:`TASK_NAMES`.
    """

    task_names = TASK_NAMES
    primary_metric = "mean_accuracy"
    primary_direction = "maximize"
    backbones = DENSE_BACKBONES

    def _load(
        self,
        root: Path,
        image_size: tuple[int, int],
        expected_sizes: dict[str, int] | None,
        val_fraction: float,
        split_seed: int,
        augment: bool,
        pretrained: str,
    ) -> None:
        """Check the files under ``root`` and set up the splits (train and val from ``train/``, test = ``val/``).

        ``expected_sizes``: the number of images each folder must hold, or ``None`` for any
        number; the numbers found are kept in ``folder_sizes``.
        """
        self.val_fraction = check_real("val_fraction", val_fraction, 0.0, 1.0)
        self.split_seed = check_integer("split_seed", split_seed, 0, 2**32 - 1)
        self.use_augmentation = _check_bool("augment", augment)
        self.pretrained = _check_weights("pretrained", pretrained)
        self.root = root
        self.image_size = image_size
        counts = {
            folder: check_folder(root / folder, image_size, None if expected_sizes is None else expected_sizes[folder])
            for folder in ("train", "val")
        }
        self.folder_sizes = counts
        train_files, val_files = carve_validation(counts["train"], self.val_fraction, self.split_seed)
        self._files = {"train": ("train", train_files), "val": ("train", val_files),
                       "test": ("val", list(range(counts["val"])))}
        self._datasets = {split: NYUv2Dataset(root / folder, files) for split, (folder, files) in self._files.items()}

    def splits(self) -> dict[str, Dataset]:
        """``train`` and ``val`` (carved from the ``train/`` folder) and ``test`` (the ``val/`` folder)."""
        return dict(self._datasets)

    def item_ids(self, split: str) -> list[str]:
        """``<folder>/<i>``: the folder and file number of each item of ``split``."""
        if split not in self._files:
            raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLIT_NAMES)}")
        folder, files = self._files[split]
        return [f"{folder}/{index}" for index in files]

    def build_model(self, backbone: str = "resnet50") -> DenseMultiTaskModel:
        """A dilated ``backbone`` (resnet18 or resnet50) with a DeepLab head per task."""
        return build_dense_model(TASK_CHANNELS, backbone, self.pretrained)

    def _check_batch(self, outputs: dict[str, Tensor], targets: dict[str, Tensor]) -> None:
        for name, value in (("outputs", outputs), ("targets", targets)):
            if not isinstance(value, dict) or set(value) != set(TASK_NAMES):
                keys = sorted(value) if isinstance(value, dict) else type(value).__name__
                raise ValueError(f"{name} must be a dict with the keys {list(TASK_NAMES)}, got {keys}")

    def losses(self, outputs: dict[str, Tensor], targets: dict[str, Tensor]) -> Tensor:
        """``[segmentation, depth, normal]`` losses of the batch (see the module docstring), each a mean over valid pixels."""
        self._check_batch(outputs, targets)
        labels = targets["segmentation"]
        segmentation = F.cross_entropy(outputs["segmentation"], labels, ignore_index=IGNORE_LABEL, reduction="sum")
        segmentation = segmentation / (labels != IGNORE_LABEL).sum().clamp(min=1)
        depth_valid = targets["depth"] != 0
        depth = ((outputs["depth"] - targets["depth"]).abs() * depth_valid).sum() / depth_valid.sum().clamp(min=1)
        normal_mask = normal_valid(targets["normal"])
        cosine = (F.normalize(outputs["normal"], dim=1) * targets["normal"]).sum(dim=1)
        normal = ((1.0 - cosine) * normal_mask).sum() / normal_mask.sum().clamp(min=1)
        return torch.stack([segmentation, depth, normal])

    @torch.no_grad()
    def correct(self, outputs: dict[str, Tensor], targets: dict[str, Tensor]) -> Tensor:
        """Per task, the sum over the batch's images of each image's accuracy (module docstring): ``[3]``."""
        self._check_batch(outputs, targets)
        labels = targets["segmentation"]
        segmentation = _per_image_share(outputs["segmentation"].argmax(dim=1) == labels, labels != IGNORE_LABEL)
        depth = _per_image_share(depth_within_ratio(outputs["depth"], targets["depth"]), targets["depth"] != 0)
        within = angle_errors(outputs["normal"], targets["normal"]) < ANGLE_THRESHOLDS[0]
        normal = _per_image_share(within, normal_valid(targets["normal"]))
        return torch.stack([segmentation.sum(), depth.sum(), normal.sum()])

    def evaluation_record(
        self, outputs: dict[str, Tensor], targets: dict[str, Tensor]
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Predicted classes (int8) instead of the 13 class scores, and int8 labels; the rest as it is.

        :meth:`evaluate` gives the same metrics on the result, which takes about a third of
        the memory of the raw outputs and targets (a whole test split of 654 images: about 2.5 GB).
        """
        self._check_batch(outputs, targets)
        return (
            {**outputs, "segmentation": outputs["segmentation"].argmax(dim=1).to(torch.int8)},
            {**targets, "segmentation": targets["segmentation"].to(torch.int8)},
        )

    @torch.no_grad()
    def evaluate(self, outputs: dict[str, Tensor], targets: dict[str, Tensor]) -> dict[str, float]:
        """Every metric of the module docstring over a whole split, pooled over its valid pixels.

        ``outputs["segmentation"]`` may be class scores ``[N, 13, H, W]`` or predicted classes
        ``[N, H, W]`` (as :meth:`evaluation_record` keeps them). Images are processed in chunks
        so the working memory stays small. Keys: those of :meth:`metric_directions`.
        """
        self._check_batch(outputs, targets)
        n_images = targets["segmentation"].shape[0]
        confusion = torch.zeros(N_CLASSES, N_CLASSES, dtype=torch.int64)
        depth_sums = torch.zeros(4, dtype=torch.float64)
        errors = []
        for start in range(0, n_images, _EVALUATION_CHUNK):
            chunk = slice(start, start + _EVALUATION_CHUNK)
            predicted = outputs["segmentation"][chunk]
            if predicted.is_floating_point():
                predicted = predicted.argmax(dim=1)
            confusion += confusion_matrix(predicted, targets["segmentation"][chunk]).cpu()
            depth_sums += depth_error_sums(outputs["depth"][chunk], targets["depth"][chunk]).cpu()
            normal_target = targets["normal"][chunk]
            chunk_errors = angle_errors(outputs["normal"][chunk], normal_target)[normal_valid(normal_target)]
            errors.append(chunk_errors.to(torch.float32).cpu().numpy())
        segmentation = segmentation_scores(confusion)
        depth = depth_scores(depth_sums)
        normal = normal_scores(np.concatenate(errors) if errors else np.zeros(0))
        metrics = {
            **{f"{key}/segmentation": value for key, value in segmentation.items()},
            **{f"{key}/depth": value for key, value in depth.items()},
            **{f"{key}/normal": value for key, value in normal.items()},
        }
        metrics["mean_accuracy"] = float(
            np.mean([metrics["pixel_accuracy/segmentation"], metrics["delta_1.25/depth"], metrics["within_11.25/normal"]])
        )
        return metrics

    def metric_directions(self) -> dict[str, str]:
        """``"maximize"`` or ``"minimize"`` for every key of :meth:`evaluate`."""
        return dict(METRIC_DIRECTIONS)

    def task_metrics(self) -> dict[str, tuple[str, ...]]:
        """LibMTL's metrics of each task: mIoU, pixel accuracy; abs and rel error; the five angle metrics."""
        return dict(TASK_METRICS)

    @classmethod
    def reported_metrics(cls) -> tuple[str, ...]:
        """LibMTL's nine metrics, task by task (those of :meth:`task_metrics`)."""
        return tuple(key for keys in TASK_METRICS.values() for key in keys)

    def augment(self, x: Tensor, targets: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """With ``augment=True``: per image, a random scale of 1.0, 1.2 or 1.5 and a flip with probability 1/2.

        Draws (from torch's global generator) a scale, a crop position uniform over the valid
        ones and a flip for each image, and applies :func:`scale_crop_flip`. Without the
        option the batch is returned unchanged.
        """
        if not self.use_augmentation:
            return x, targets
        height, width = x.shape[-2:]
        images, items = [], []
        for index in range(x.shape[0]):
            scale = AUGMENT_SCALES[int(torch.randint(len(AUGMENT_SCALES), ()))]
            top = int(torch.randint(height - int(height / scale) + 1, ()))
            left = int(torch.randint(width - int(width / scale) + 1, ()))
            flip = bool(torch.rand(()) < 0.5)
            item_targets = {task: target[index] for task, target in targets.items()}
            image, item_targets = scale_crop_flip(x[index], item_targets, scale, top, left, flip)
            images.append(image)
            items.append(item_targets)
        return torch.stack(images), {task: torch.stack([item[task] for item in items]) for task in TASK_NAMES}

    def _options(self) -> dict[str, Any]:
        """The options every suite of this layout has, for :meth:`config`."""
        return {"val_fraction": self.val_fraction, "split_seed": self.split_seed, "augment": self.use_augmentation}


def _check_bool(option: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{option} must be true or false, got {value!r}")
    return value


def _check_weights(option: str, value: Any) -> str:
    """``none``, ``imagenet`` or the path of an existing weights file."""
    if value in ("none", "imagenet"):
        return value
    if isinstance(value, str) and Path(value).expanduser().is_file():
        return str(Path(value).expanduser())
    raise ValueError(f"{option} must be none, imagenet or the path of an existing weights file, got {value!r}")


@register("nyuv2")
class NYUv2Suite(NYUv2FormatSuite):
    """NYUv2 as preprocessed by MTAN and used by LibMTL (module docstring): 795 + 654 images at 288 x 384.

    Folders in the layout with other counts are accepted with a :class:`FolderSizeWarning`.
    """

    run_defaults = {
        "epochs": 200, "batch_size": 8, "lr": 1e-4, "weight_decay": 1e-5, "optimizer": "adam",
        "scheduler": "step", "backbone": "resnet50",
    }
    option_help = {
        "data_dir": f"folder holding train/ and val/ of the MTAN/LibMTL preprocessing (default {DEFAULT_DATA_DIR}; see README)",
        "val_fraction": "share of the train/ images (795 in the published set) carved out for validation, in (0, 1)",
        "split_seed": "seed of the random train/validation carve (independent of the training seed)",
        "augment": "random scale 1.0/1.2/1.5 and horizontal flip of training batches (LibMTL's --aug)",
        "pretrained": "encoder start: none, imagenet (torchvision's, from the local torch hub cache) or a weights file",
    }

    def __init__(
        self,
        data_dir: str | None = None,
        val_fraction: float = 0.1,
        split_seed: int = 0,
        augment: bool = False,
        pretrained: str = "none",
    ) -> None:
        self._load(find_root(data_dir), IMAGE_SIZE, None, val_fraction, split_seed, augment, pretrained)
        if self.folder_sizes != PUBLISHED_FOLDER_SIZES:
            warnings.warn(
                f"{self.root} holds {self.folder_sizes['train']} train/ and {self.folder_sizes['val']} val/ images; "
                f"LibMTL's and MTAN's published NYUv2 numbers are on the {PUBLISHED_FOLDER_SIZES['train']} train/ and "
                f"{PUBLISHED_FOLDER_SIZES['val']} val/ images of MTAN's preprocessing, so results on this data are not "
                "comparable with them (fine for a quick check or for your own data)",
                FolderSizeWarning,
                stacklevel=2,
            )

    def config(self) -> dict[str, Any]:
        """The suite's options."""
        return {"data_dir": str(self.root.resolve()), **self._options(), "pretrained": self.pretrained}
