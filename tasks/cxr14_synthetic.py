"""``cxr14-synthetic``: the 14 ChestX-ray14 findings as binary tasks on generated images.

Labels are real: rows are sampled from the NIH ChestX-ray14 metadata table
(``Data_Entry_2017_v2020.csv.gz``) that ships inside the PyPI package ``torchxrayvision``,
so the findings' prevalences, co-occurrences and patient ids are those of the real data set.
Images are generated: a smooth random chest-like background plus noise, onto which every
finding that is present plants its own pattern. Each finding has a fixed signed amplitude,
so tasks differ in difficulty; the amplitudes follow the order of the per-finding AUROCs
that CheXNet (Rajpurkar et al., 2017) reports on the real images (Emphysema, Cardiomegaly
and Hernia easiest; Infiltration, Pneumonia and Nodule hardest).

How the data are drawn (all from ``data_seed``, independently of any training seed):

1. Patients are shuffled and cut into test, val and train groups so that each group holds
   ``test_fraction``, ``val_fraction`` and the rest of all the table's images; no patient
   is in two splits.
2. Each split draws ``round(n_images * fraction)`` images (train: the remainder) from its
   own patients. The draw first guarantees ``min_positives`` positives for every finding:
   going from the rarest finding in the split's pool to the most common, it adds random
   positives of that finding until the images drawn so far hold ``min_positives`` of them
   (co-occurring labels count). It then fills the split with images drawn uniformly at
   random. Common findings therefore keep their real prevalence, while a rare finding is
   over-represented in a small split (Hernia, 0.2 % of the table, has at least
   ``min_positives`` positives per split).
3. The image of table row ``r`` is a function of ``(data_seed, r, image_size,
   signal_scale)`` only, so an image does not change when other options change.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from tasks.base import SPLIT_NAMES
from tasks.checks import check_integer, check_real
from tasks.multilabel import ImageLabelDataset, MultiLabelSuite
from tasks.nih import FINDINGS, ChestXray14Metadata, assign_patients, check_patient_disjoint, read_data_entry, sample_split
from tasks.registry import register

METADATA_FILE = "Data_Entry_2017_v2020.csv.gz"


@dataclass(frozen=True)
class FindingSignal:
    """The pattern a finding plants in an image when it is present.

    Attributes:
        kind: ``"blob"`` (a Gaussian spot) or ``"stripes"`` (an oriented grating under a
            Gaussian envelope).
        amplitude: peak intensity change in pixel units of [0, 1] (negative: darker); it is
            multiplied by the suite's ``signal_scale``. Larger magnitude = easier task.
    """

    kind: str
    amplitude: float


FINDING_SIGNALS: dict[str, FindingSignal] = {
    "Atelectasis": FindingSignal("blob", 0.10),
    "Cardiomegaly": FindingSignal("blob", 0.22),
    "Effusion": FindingSignal("blob", 0.14),
    "Infiltration": FindingSignal("stripes", 0.05),
    "Mass": FindingSignal("blob", 0.14),
    "Nodule": FindingSignal("blob", 0.07),
    "Pneumonia": FindingSignal("stripes", 0.07),
    "Pneumothorax": FindingSignal("blob", -0.16),
    "Consolidation": FindingSignal("blob", 0.08),
    "Edema": FindingSignal("stripes", 0.16),
    "Emphysema": FindingSignal("stripes", -0.24),
    "Fibrosis": FindingSignal("stripes", 0.10),
    "Pleural_Thickening": FindingSignal("stripes", 0.10),
    "Hernia": FindingSignal("blob", 0.20),
}
"""Each finding's pattern kind and amplitude; where patterns lie is drawn from ``data_seed``."""

# Independent random streams derived from data_seed.
_PATIENT_STREAM = 0
_SAMPLING_STREAM = 1
_PATTERN_STREAM = 2
_IMAGE_STREAM = 3

# Background and noise model, in pixel units of [0, 1] and image coordinates in [-1, 1].
_SMOOTH_GRID = 4  # the smooth random field is a GRID x GRID Gaussian grid, upsampled
_SMOOTH_STD = 0.04
_NOISE_STD = 0.04
_JITTER_STD = 0.06  # per-image shift of a finding's pattern centre
_AMPLITUDE_JITTER_STD = 0.15  # per-image relative change of a finding's amplitude
# Per-image draws: brightness, contrast, thorax scale, lung scale, smooth grid,
# pattern centre jitter (x, y per finding), amplitude jitter (per finding); then pixel noise.
_N_IMAGE_PARAMETERS = 4 + _SMOOTH_GRID * _SMOOTH_GRID + 3 * len(FINDINGS)
_GENERATION_CHUNK = 1024  # images generated at once, bounding the float32 working memory


def _random_generator(data_seed: int, *stream: int) -> np.random.Generator:
    return np.random.default_rng([data_seed, *stream])


def metadata_path() -> Path:
    """Path of the ChestX-ray14 metadata table inside the installed torchxrayvision package.

    The package is located without being imported (importing it is slow).
    """
    spec = importlib.util.find_spec("torchxrayvision")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "cxr14-synthetic reads the ChestX-ray14 label table shipped with torchxrayvision; "
            "install it with: pip install torchxrayvision"
        )
    path = Path(spec.submodule_search_locations[0]) / "data" / METADATA_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing from the installed torchxrayvision; reinstall it with: "
            "pip install --force-reinstall torchxrayvision"
        )
    return path


@functools.lru_cache(maxsize=1)
def load_metadata() -> ChestXray14Metadata:
    """Read and parse the table of :func:`metadata_path` (cached; the arrays are read-only)."""
    metadata = read_data_entry(metadata_path())
    for array in (metadata.image_ids, metadata.patient_ids, metadata.labels):
        array.flags.writeable = False
    return metadata


def _split_sizes(n_images: int, val_fraction: float, test_fraction: float) -> dict[str, int]:
    n_val = round(n_images * val_fraction)
    n_test = round(n_images * test_fraction)
    return {"train": n_images - n_val - n_test, "val": n_val, "test": n_test}


@dataclass(frozen=True)
class _PatternGeometry:
    """Where and how each finding's pattern is drawn; arrays of length 14, in image coordinates."""

    centre_x: torch.Tensor
    centre_y: torch.Tensor
    width: torch.Tensor
    angle: torch.Tensor
    frequency: torch.Tensor
    is_stripes: torch.Tensor
    amplitude: torch.Tensor

    @classmethod
    def draw(cls, data_seed: int, signal_scale: float) -> _PatternGeometry:
        rng = _random_generator(data_seed, _PATTERN_STREAM)
        n = len(FINDINGS)

        def tensor(values: Any) -> torch.Tensor:
            return torch.as_tensor(np.asarray(values), dtype=torch.float32)

        return cls(
            centre_x=tensor(rng.uniform(-0.6, 0.6, n)),
            centre_y=tensor(rng.uniform(-0.6, 0.6, n)),
            width=tensor(rng.uniform(0.12, 0.22, n)),
            angle=tensor(rng.uniform(0.0, np.pi, n)),
            # Cycles per coordinate unit: a stripe period of 1/3 to 1/2 of the image side, coarse
            # enough to survive the 4x downsampling of a ResNet stem.
            frequency=tensor(rng.uniform(1.0, 1.5, n)),
            is_stripes=tensor([FINDING_SIGNALS[f].kind == "stripes" for f in FINDINGS]),
            amplitude=tensor([FINDING_SIGNALS[f].amplitude * signal_scale for f in FINDINGS]),
        )


def _soft_ellipse(
    x: torch.Tensor,
    y: torch.Tensor,
    centre_x: float,
    centre_y: float,
    half_width: torch.Tensor,
    half_height: torch.Tensor,
) -> torch.Tensor:
    """About 1 inside the ellipse and 0 outside, with a soft edge; broadcasts over images."""
    distance = ((x - centre_x) / half_width) ** 2 + ((y - centre_y) / half_height) ** 2
    return torch.sigmoid((1.0 - distance) / 0.08)


def _generate_images(
    rows: np.ndarray, labels: np.ndarray, data_seed: int, image_size: int, geometry: _PatternGeometry
) -> torch.Tensor:
    """uint8 images ``[len(rows), 1, S, S]`` of the given table rows (see the module docstring)."""
    coordinates = torch.linspace(-1.0, 1.0, image_size)
    y, x = torch.meshgrid(coordinates, coordinates, indexing="ij")
    images = torch.empty((len(rows), 1, image_size, image_size), dtype=torch.uint8)
    n_draws = _N_IMAGE_PARAMETERS + image_size * image_size
    for start in range(0, len(rows), _GENERATION_CHUNK):
        chunk_rows = rows[start : start + _GENERATION_CHUNK]
        draws = torch.as_tensor(
            np.stack(
                [_random_generator(data_seed, _IMAGE_STREAM, int(row)).standard_normal(n_draws) for row in chunk_rows]
            ),
            dtype=torch.float32,
        )
        brightness, contrast, thorax_scale, lung_scale = (draws[:, i, None, None] for i in range(4))
        offset = 4
        smooth_grid = draws[:, offset : offset + _SMOOTH_GRID**2].reshape(-1, 1, _SMOOTH_GRID, _SMOOTH_GRID)
        offset += _SMOOTH_GRID**2
        jitter = draws[:, offset : offset + 2 * len(FINDINGS)].reshape(-1, len(FINDINGS), 2)
        offset += 2 * len(FINDINGS)
        amplitude_jitter = draws[:, offset : offset + len(FINDINGS)]
        noise = draws[:, _N_IMAGE_PARAMETERS:].reshape(-1, image_size, image_size)

        thorax_size = 1.0 + 0.04 * thorax_scale
        lung_size = 1.0 + 0.05 * lung_scale
        thorax = _soft_ellipse(x, y, 0.0, 0.05, 0.85 * thorax_size, 0.95 * thorax_size)
        lungs = _soft_ellipse(x, y, -0.4, 0.0, 0.3 * lung_size, 0.6 * lung_size)
        lungs = lungs + _soft_ellipse(x, y, 0.4, 0.0, 0.3 * lung_size, 0.6 * lung_size)
        anatomy = 0.08 + 0.42 * thorax - 0.22 * lungs
        smooth = F.interpolate(smooth_grid, size=(image_size, image_size), mode="bicubic", align_corners=True)
        chunk = 0.04 * brightness + (1.0 + 0.08 * contrast) * anatomy + _SMOOTH_STD * smooth[:, 0] + _NOISE_STD * noise

        image_index, finding = np.nonzero(labels[chunk_rows])
        image_index = torch.as_tensor(image_index, dtype=torch.long)
        finding = torch.as_tensor(finding, dtype=torch.long)
        dx = x - (geometry.centre_x[finding] + _JITTER_STD * jitter[image_index, finding, 0])[:, None, None]
        dy = y - (geometry.centre_y[finding] + _JITTER_STD * jitter[image_index, finding, 1])[:, None, None]
        width = geometry.width[finding][:, None, None]
        envelope = torch.exp(-(dx**2 + dy**2) / (2.0 * width**2))
        angle = geometry.angle[finding][:, None, None]
        along_stripes = dx * torch.cos(angle) + dy * torch.sin(angle)
        grating = torch.cos(2.0 * np.pi * geometry.frequency[finding][:, None, None] * along_stripes)
        is_stripes = geometry.is_stripes[finding][:, None, None]
        pattern = envelope * (is_stripes * grating + (1.0 - is_stripes))
        strength = geometry.amplitude[finding] * (1.0 + _AMPLITUDE_JITTER_STD * amplitude_jitter[image_index, finding])
        chunk.index_add_(0, image_index, strength[:, None, None] * pattern)

        images[start : start + len(chunk_rows), 0] = torch.round(chunk.clamp(0.0, 1.0) * 255.0).to(torch.uint8)
    return images


@register("cxr14-synthetic")
class ChestXray14SyntheticSuite(MultiLabelSuite):
    """ChestX-ray14's 14 findings as binary tasks: real labels and patients, generated images.

    Items are ``(x, y)``: ``x`` uint8 ``[1, image_size, image_size]``, ``y``
    float32 ``[14]`` of 0/1 in the order of :data:`FINDINGS`. Item ids are the real
    ``Image Index`` file names. See the module docstring for how data are drawn.
    """

    task_names = FINDINGS
    # Sized so that `bench run --methods all` (four of the nine methods take 14 backward passes
    # through ResNet-18 per step) finishes in under 10 minutes on 2 CPU cores.
    run_defaults = {"epochs": 2, "batch_size": 64}
    option_help = {
        "n_images": "number of images over all splits, an integer up to 112120",
        "image_size": "side of the square grayscale images in pixels, an integer in [16, 128]",
        "data_seed": "seed of the sampling, the split and the images (independent of the training seed)",
        "val_fraction": "share of the images in the val split, in (0, 1)",
        "test_fraction": "share of the images in the test split, in (0, 1); val_fraction + test_fraction < 1",
        "min_positives": "least number of positives of every finding in every split, an integer in [1, 100]",
        "signal_scale": "multiplier of every finding's pattern amplitude (higher: easier tasks), in (0, 10)",
    }

    def __init__(
        self,
        n_images: int = 800,
        image_size: int = 32,
        data_seed: int = 0,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        min_positives: int = 5,
        signal_scale: float = 1.0,
    ) -> None:
        metadata = load_metadata()
        n_table = len(metadata.image_ids)
        self.n_images = check_integer("n_images", n_images, 1, n_table)
        self.image_size = check_integer("image_size", image_size, 16, 128)
        self.data_seed = check_integer("data_seed", data_seed, 0, 2**63 - 1)
        self.val_fraction = check_real("val_fraction", val_fraction, 0.0, 1.0)
        self.test_fraction = check_real("test_fraction", test_fraction, 0.0, 1.0)
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError(
                f"val_fraction + test_fraction must be below 1 to leave images for training, "
                f"got {self.val_fraction} + {self.test_fraction}"
            )
        self.min_positives = check_integer("min_positives", min_positives, 1, 100)
        self.signal_scale = check_real("signal_scale", signal_scale, 0.0, 10.0)
        self._check_split_sizes(n_table)

        row_split = assign_patients(
            metadata.patient_ids, self.val_fraction, self.test_fraction,
            _random_generator(self.data_seed, _PATIENT_STREAM),
        )
        sampling_rng = _random_generator(self.data_seed, _SAMPLING_STREAM)
        sizes = _split_sizes(self.n_images, self.val_fraction, self.test_fraction)
        self._rows = {
            split: sample_split(
                np.flatnonzero(row_split == split_index), sizes[split], metadata.labels, self.min_positives,
                sampling_rng, split,
            )
            for split_index, split in enumerate(SPLIT_NAMES)
        }
        check_patient_disjoint({split: metadata.patient_ids[rows] for split, rows in self._rows.items()})

        geometry = _PatternGeometry.draw(self.data_seed, self.signal_scale)
        self._datasets = {
            split: ImageLabelDataset(
                images=_generate_images(rows, metadata.labels, self.data_seed, self.image_size, geometry),
                labels=torch.as_tensor(metadata.labels[rows], dtype=torch.float32),
                item_ids=[str(image_id) for image_id in metadata.image_ids[rows]],
            )
            for split, rows in self._rows.items()
        }

    def _check_split_sizes(self, n_table: int) -> None:
        """Every split must have room for ``min_positives`` positives of each of the 14 findings."""
        needed = len(FINDINGS) * self.min_positives

        def smallest_split(n: int) -> int:
            return min(_split_sizes(n, self.val_fraction, self.test_fraction).values())

        if smallest_split(self.n_images) >= needed:
            return
        minimum = self.n_images
        while minimum < n_table and smallest_split(minimum) < needed:
            minimum += 1
        sizes = _split_sizes(self.n_images, self.val_fraction, self.test_fraction)
        raise ValueError(
            f"n_images={self.n_images} gives splits of {sizes} images, but min_positives={self.min_positives} "
            f"for {len(FINDINGS)} findings needs at least {needed} images in every split; with these "
            f"fractions use n_images in [{minimum}, {n_table}], or lower min_positives"
        )

    def patient_ids(self, split: str) -> list[int]:
        """The ``Patient ID`` of each item of ``split``, in item order."""
        self._check_split_name(split)
        return load_metadata().patient_ids[self._rows[split]].tolist()

    def config(self) -> dict[str, Any]:
        """The suite's options."""
        return {
            "n_images": self.n_images,
            "image_size": self.image_size,
            "data_seed": self.data_seed,
            "val_fraction": self.val_fraction,
            "test_fraction": self.test_fraction,
            "min_positives": self.min_positives,
            "signal_scale": self.signal_scale,
        }
