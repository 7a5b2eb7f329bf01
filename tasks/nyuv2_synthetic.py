"""``nyuv2-synthetic``: generated indoor scenes in the NYUv2 file layout, for tests and demos.

The suite writes ``.npy`` files in exactly the layout and format of the MTAN/LibMTL
preprocessing (see :mod:`tasks.nyuv2`) and reads them back through the same loader, checks,
model, losses and metrics as ``nyuv2``; only the image size and counts are smaller.

A scene (all quantities drawn from ``numpy.random.default_rng([data_seed, folder, i])``, so an
image depends only on the seed, its folder, its number and the image size):

- a wall (class 0) above a random horizon and a floor (class 1) below it; the wall's depth
  is 4 to 7 with a slight horizontal slope, the floor's falls linearly from the wall's depth
  at the horizon to 1 at the bottom row;
- 2 to 5 boxes of random classes 2 ... 12, each a planar patch with its own depth slope, in
  front of what lies behind it, drawn far to near so nearer boxes hide farther ones;
- surface normals from the local depth slope: ``normalize(-0.3 dz/du, -0.3 dz/dv, 1)`` with
  ``u, v`` the image coordinates scaled to [0, 1], so depth and normals are related;
- the image: each class's colour (drawn once from ``data_seed``) times Lambertian shading of
  the normal, dimmed with distance (``exp(-depth / 8)``) towards a grey haze, plus noise;
- 3 % of the pixels unlabelled (-1) and, independently, 3 % without depth (0) and normal
  (0, 0, 0), like sensor holes, so that the masks of losses and metrics are exercised.

The files go to ``<data_dir>/nyuv2-synthetic-v1-<H>x<W>-train<n>-val<m>-seed<s>/``, written
once: into a temporary folder first, renamed into place when complete, so concurrent runs
never read a half-written set. ``data_dir`` defaults to this user's cache folder (see
:func:`default_data_dir`), created with mode 0700. A set is reused only when its folder is
owned by this user and writable by no one else, so that another local user cannot swap its
data (as anyone could in a fixed-name folder of the shared temporary directory).
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from tasks.checks import check_integer
from tasks.nyuv2 import MODALITIES, N_CLASSES, NYUv2FormatSuite
from tasks.registry import register

GENERATOR_VERSION = 1
"""Part of the cache folder name; raised whenever generated images change."""
WALL, FLOOR = 0, 1
_FOLDER_CODES = {"train": 0, "val": 1}
_PALETTE_STREAM = 2
_MISSING_SHARE = 0.03
_NORMAL_SLOPE_SCALE = 0.3
_LIGHT = np.array([0.4, -0.6, 0.7]) / np.linalg.norm([0.4, -0.6, 0.7])


def _normals_from_slopes(slope_u: np.ndarray, slope_v: np.ndarray) -> np.ndarray:
    """Unit normals ``[H, W, 3]`` of ``normalize(-s dz/du, -s dz/dv, 1)`` (module docstring)."""
    normal = np.stack(
        [-_NORMAL_SLOPE_SCALE * slope_u, -_NORMAL_SLOPE_SCALE * slope_v, np.ones_like(slope_u)], axis=-1
    )
    return normal / np.linalg.norm(normal, axis=-1, keepdims=True)


def generate_scene(
    rng: np.random.Generator, height: int, width: int, palette: np.ndarray
) -> dict[str, np.ndarray]:
    """One scene as the four arrays of the NYUv2 layout (channels last, float32; see the module docstring)."""
    v, u = np.meshgrid(np.linspace(0.0, 1.0, height), np.linspace(0.0, 1.0, width), indexing="ij")
    horizon = rng.uniform(0.4, 0.6)
    wall_depth = rng.uniform(4.0, 7.0)
    wall_slope = rng.uniform(-1.0, 1.0)
    floor_slope = -(wall_depth - 1.0) / (1.0 - horizon)
    is_wall = v < horizon
    depth = np.where(is_wall, wall_depth + wall_slope * (u - 0.5), wall_depth + floor_slope * (v - horizon))
    label = np.where(is_wall, WALL, FLOOR)
    slope_u = np.where(is_wall, wall_slope, 0.0)
    slope_v = np.where(is_wall, 0.0, floor_slope)

    n_boxes = rng.integers(2, 6)
    boxes = []
    for _ in range(n_boxes):
        centre_u, centre_v = rng.uniform(0.1, 0.9), rng.uniform(horizon - 0.1, 0.9)
        half_u, half_v = rng.uniform(0.08, 0.2), rng.uniform(0.08, 0.25)
        row = round(min(centre_v + half_v, 1.0) * (height - 1))
        column = round(centre_u * (width - 1))
        base_depth = max(depth[row, column] - rng.uniform(0.2, 1.0), 0.7)
        boxes.append((base_depth, centre_u, centre_v, half_u, half_v, rng.integers(2, N_CLASSES),
                      rng.uniform(-1.5, 1.5), rng.uniform(-1.5, 1.5)))
    for base_depth, centre_u, centre_v, half_u, half_v, box_class, box_slope_u, box_slope_v in sorted(
        boxes, key=lambda box: -box[0]
    ):
        inside = (np.abs(u - centre_u) < half_u) & (np.abs(v - centre_v) < half_v)
        box_depth = np.maximum(base_depth + box_slope_u * (u - centre_u) + box_slope_v * (v - centre_v), 0.5)
        depth = np.where(inside, box_depth, depth)
        label = np.where(inside, box_class, label)
        slope_u = np.where(inside, box_slope_u, slope_u)
        slope_v = np.where(inside, box_slope_v, slope_v)

    normal = _normals_from_slopes(slope_u, slope_v)
    shading = 0.35 + 0.65 * np.clip(normal @ _LIGHT, 0.0, 1.0)
    haze = np.exp(-depth / 8.0)[..., None]
    image = palette[label] * shading[..., None] * haze + 0.25 * (1.0 - haze)
    image = np.clip(image + rng.normal(0.0, 0.02, image.shape), 0.0, 1.0)

    unlabelled = rng.random((height, width)) < _MISSING_SHARE
    no_depth = rng.random((height, width)) < _MISSING_SHARE
    label = np.where(unlabelled, -1, label)
    depth = np.where(no_depth, 0.0, depth)
    normal = np.where(no_depth[..., None], 0.0, normal)
    return {
        "image": image.astype(np.float32),
        "label": label.astype(np.float32),
        "depth": depth[..., None].astype(np.float32),
        "normal": normal.astype(np.float32),
    }


def write_dataset(root: Path, folder_sizes: dict[str, int], height: int, width: int, data_seed: int) -> None:
    """Write ``root/{train,val}/{image,label,depth,normal}/{i}.npy`` with ``folder_sizes`` scenes per folder."""
    palette = np.random.default_rng([data_seed, _PALETTE_STREAM]).uniform(0.15, 0.95, (N_CLASSES, 3))
    for folder, count in folder_sizes.items():
        for modality in MODALITIES:
            (root / folder / modality).mkdir(parents=True, exist_ok=True)
        for index in tqdm(range(count), desc=f"generating nyuv2-synthetic {folder}", unit="image", disable=None):
            rng = np.random.default_rng([data_seed, _FOLDER_CODES[folder], index])
            for modality, array in generate_scene(rng, height, width, palette).items():
                np.save(root / folder / modality / f"{index}.npy", array)


def default_data_dir() -> Path:
    """``$XDG_CACHE_HOME/mtl-weighting-bench/nyuv2-synthetic``, ``~/.cache/...`` when it is unset."""
    cache_home = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache_home) / "mtl-weighting-bench" / "nyuv2-synthetic"


def check_private(folder: Path) -> None:
    """Raise ``ValueError`` unless ``folder`` is owned by this user and not group- or world-writable."""
    info = folder.stat()
    if info.st_uid != os.getuid() or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise ValueError(
            f"{folder} is not private to this user (owner uid {info.st_uid}, this user {os.getuid()}; mode "
            f"{stat.filemode(info.st_mode)}): another user could have changed the data in it. Delete it to "
            "have it generated again, or pass a data_dir (--data-dir) of your own"
        )


def ensure_dataset(base_dir: Path, folder_sizes: dict[str, int], height: int, width: int, data_seed: int) -> Path:
    """The folder of this data set under ``base_dir``, generated first if absent (module docstring)."""
    name = (
        f"nyuv2-synthetic-v{GENERATOR_VERSION}-{height}x{width}"
        f"-train{folder_sizes['train']}-val{folder_sizes['val']}-seed{data_seed}"
    )
    root = base_dir / name
    if root.is_dir():
        check_private(root)
        return root
    base_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f"{name}.partial-", dir=base_dir))
    try:
        write_dataset(scratch, folder_sizes, height, width, data_seed)
        os.rename(scratch, root)
    except OSError:
        if not root.is_dir():  # not a concurrent writer that finished first: a real failure
            raise
        check_private(root)
    finally:
        if scratch.exists():
            shutil.rmtree(scratch)
    return root


@register("nyuv2-synthetic")
class NYUv2SyntheticSuite(NYUv2FormatSuite):
    """Generated scenes in the NYUv2 layout; everything else as ``nyuv2`` (module docstring).

    ``image_size`` is the height; the width is 4/3 of it, NYUv2's aspect ratio (288 x 384).
    The ``val/`` folder (``n_test`` images) is the test split, as in ``nyuv2``.
    """

    # Sized so that `bench run --methods all` finishes in a few minutes on 2 CPU cores.
    run_defaults = {"epochs": 2, "batch_size": 4, "lr": 1e-3}
    option_help = {
        "n_train": "images in the train/ folder (validation is carved from them), an integer in [4, 100000]",
        "n_test": "images in the val/ folder, the test split, an integer in [1, 100000]",
        "image_size": "image height in pixels (width = 4/3 of it), a multiple of 3 in [12, 288]",
        "data_seed": "seed of the generated scenes (independent of the training seed)",
        "val_fraction": "share of the train/ images carved out for validation, in (0, 1)",
        "split_seed": "seed of the random train/validation carve",
        "augment": "random scale 1.0/1.2/1.5 and horizontal flip of training batches",
        "data_dir": "where the generated files are kept (default $XDG_CACHE_HOME/mtl-weighting-bench/nyuv2-synthetic)",
    }

    def __init__(
        self,
        n_train: int = 16,
        n_test: int = 8,
        image_size: int = 24,
        data_seed: int = 0,
        val_fraction: float = 0.25,
        split_seed: int = 0,
        augment: bool = False,
        data_dir: str | None = None,
    ) -> None:
        self.n_train = check_integer("n_train", n_train, 4, 100_000)
        self.n_test = check_integer("n_test", n_test, 1, 100_000)
        height = check_integer("image_size", image_size, 12, 288)
        if height % 3:
            raise ValueError(f"image_size must be a multiple of 3 (the width is 4/3 of it), got {height}")
        self.data_seed = check_integer("data_seed", data_seed, 0, 2**32 - 1)
        self.data_dir = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
        folder_sizes = {"train": self.n_train, "val": self.n_test}
        root = ensure_dataset(self.data_dir, folder_sizes, height, height * 4 // 3, self.data_seed)
        self._load(root, (height, height * 4 // 3), folder_sizes, val_fraction, split_seed, augment, "none")

    def config(self) -> dict[str, Any]:
        """The suite's options."""
        return {
            "n_train": self.n_train,
            "n_test": self.n_test,
            "image_size": self.image_size[0],
            "data_seed": self.data_seed,
            **self._options(),
            "data_dir": str(self.data_dir.resolve()),
        }
