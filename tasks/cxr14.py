"""``cxr14``: NIH ChestX-ray14, the 14 findings as binary tasks on the real radiographs.

Point it at a folder holding the data set as the NIH distributes it::

    DIR/Data_Entry_2017.csv                  (2017 or 2020 revision)
    DIR/images_001/images/00000001_000.png   ... images_012/images/...   (or one DIR/images/)
    DIR/train_val_list.txt, DIR/test_list.txt   (optional: the official split)

Splits are patient-wise. With both list files (``split=official``, the default when they are
present) the test split is ``test_list.txt`` and the validation split is carved, by patient
and seeded, from ``train_val_list.txt``: it takes ``val_fraction / (1 - test_fraction)`` of
its images (12.5 % with the defaults), so train:val keeps the ratio of the random split.
Without them (``split=random``) patients are shuffled into train/val/test holding
``1 - val_fraction - test_fraction``, ``val_fraction`` and ``test_fraction`` of the images
(70/10/20 by default). No patient is in two splits; this is checked at load.

``subset=N`` draws N images over all splits (each split keeping its share), stratified so
that every finding keeps up to ``min_positives`` positives in every split (the rarest first;
see :func:`tasks.nih.sample_split`).

The table is checked row by row (:func:`tasks.nih.read_data_entry`): a malformed row is
refused with its line, never filled in. Images are decoded (16-bit PNGs scaled to 8 bits) and
resized once into a :class:`~tasks.image_cache.ImageCache` under ``cache_dir`` and read from
it memory-mapped; an image whose file changed size or modification time since it was cached
is decoded again. Images listed in the table but missing on disk, and files that cannot be
decoded, are reported by name with their count and left out.
Training batches are augmented on the training device (:mod:`tasks.augment`).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tasks.base import SPLIT_NAMES
from tasks.checks import check_choice, check_integer, check_real
from tasks.image_cache import ImageCache
from tasks.multilabel import ImageLabelDataset, MultiLabelSuite
from tasks.nih import (
    DOWNLOAD_URL,
    FINDINGS,
    SUBSET_OPTION_HELP,
    ChestXray14Metadata,
    assign_patients,
    check_patient_disjoint,
    draw_subset,
    read_data_entry,
)
from tasks.registry import register

TABLE_FILE = "Data_Entry_2017.csv"
OFFICIAL_LISTS = {"train_val": "train_val_list.txt", "test": "test_list.txt"}


class DataWarning(UserWarning):
    """Images of the table that are missing or unreadable and were left out, or decoded again."""


def default_data_dir() -> str:
    """``$BENCH_DATA_DIR`` if set, else ``data/cxr14``."""
    return os.environ.get("BENCH_DATA_DIR", "data/cxr14")


def default_cache_dir() -> str:
    """``$BENCH_CACHE_DIR`` if set, else ``data/cache``."""
    return os.environ.get("BENCH_CACHE_DIR", "data/cache")


def find_table(data_dir: Path) -> Path:
    """``Data_Entry_2017.csv`` in ``data_dir`` (or the only ``Data_Entry_2017*.csv`` there)."""
    if not data_dir.is_dir():
        raise FileNotFoundError(
            f"no ChestX-ray14 folder at {data_dir}: download the data set from {DOWNLOAD_URL} "
            f"(Data_Entry_2017.csv and images_001 ... images_012), unpack it there, and pass "
            f"--data-dir DIR or set BENCH_DATA_DIR (README, 'ChestX-ray14')"
        )
    exact = data_dir / TABLE_FILE
    if exact.is_file():
        return exact
    candidates = sorted(data_dir.glob("Data_Entry_2017*.csv"))
    if len(candidates) == 1:
        return candidates[0]
    raise FileNotFoundError(
        f"{data_dir} has no {TABLE_FILE}"
        + (f" (several candidates: {', '.join(c.name for c in candidates)}; keep one)" if candidates else "")
        + f"; it is part of the NIH download ({DOWNLOAD_URL})"
    )


def find_images(data_dir: Path) -> dict[str, Path]:
    """Image name -> path of every PNG under ``images_*/images/`` or ``images/`` of ``data_dir``."""
    found: dict[str, Path] = {}
    folders = sorted(data_dir.glob("images_*/images")) + [data_dir / "images"]
    for folder in folders:
        if not folder.is_dir():
            continue
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.name.endswith(".png"):
                    found.setdefault(entry.name, Path(entry.path))
    return found


def _read_list(path: Path) -> set[str]:
    return {line.strip() for line in path.read_text().splitlines() if line.strip()}


def _report_left_out(what: str, names: list[str]) -> None:
    if names:
        shown = ", ".join(sorted(names)[:10]) + (", ..." if len(names) > 10 else "")
        warnings.warn(f"{len(names)} image(s) {what} and left out: {shown}", DataWarning, stacklevel=3)


@register("cxr14")
class ChestXray14Suite(MultiLabelSuite):
    """NIH ChestX-ray14: one binary task per finding, AUROC per finding and their mean.

    Items are ``(x, y)``: ``x`` uint8 ``[1, image_size, image_size]``, ``y`` float32 ``[14]``
    of 0/1 in the order of :data:`~tasks.nih.FINDINGS`. See the module docstring for the
    layout, splits, subset and cache.
    """

    task_names = FINDINGS
    run_defaults = {"epochs": 10, "batch_size": 32}
    option_help = {
        "data_dir": "the ChestX-ray14 folder (default $BENCH_DATA_DIR or data/cxr14)",
        "image_size": "side of the square images the network sees, an integer in [16, 1024] (default 224)",
        "split": "official (train_val_list.txt/test_list.txt), random (patient-wise), or auto: official when the lists exist",
        "data_seed": "seed of the patient split and the subset (independent of the training seed)",
        "val_fraction": "share of images in the val split, in (0, 1)",
        "test_fraction": "share of images in the test split with split=random, in (0, 1)",
        "cache_dir": "where decoded images are cached (default $BENCH_CACHE_DIR or data/cache)",
        "cache_workers": "processes decoding images into the cache; 0 decodes in this process",
        **SUBSET_OPTION_HELP,
        **MultiLabelSuite.IMAGE_MODEL_OPTION_HELP,
    }

    def __init__(
        self,
        data_dir: str | None = None,
        image_size: int = 224,
        split: str = "auto",
        subset: int = 0,
        data_seed: int = 0,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        min_positives: int = 5,
        cache_dir: str | None = None,
        cache_workers: int | None = None,
        pretrained: str = "none",
        normalization: str = "imagenet",
        hidden_units: int = 0,
        crop_scale_min: float = 0.75,
        flip: bool = True,
        max_rotation: float = 10.0,
    ) -> None:
        self.data_dir = Path(data_dir if data_dir is not None else default_data_dir())
        self.image_size = check_integer("image_size", image_size, 16, 1024)
        self.split = check_choice("split", split, ("auto", "official", "random"))
        self.subset = check_integer("subset", subset, 0, 10**7)
        self.data_seed = check_integer("data_seed", data_seed, 0, 2**63 - 1)
        self.val_fraction = check_real("val_fraction", val_fraction, 0.0, 1.0)
        self.test_fraction = check_real("test_fraction", test_fraction, 0.0, 1.0)
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError(f"val_fraction + test_fraction must be below 1, got {val_fraction} + {test_fraction}")
        self.min_positives = check_integer("min_positives", min_positives, 0, 10**6)
        self.cache_dir = Path(cache_dir if cache_dir is not None else default_cache_dir())
        self.cache_workers = check_integer(
            "cache_workers", min(8, os.cpu_count() or 1) if cache_workers is None else cache_workers, 0, 256
        )
        self._set_image_model_options(pretrained, normalization, hidden_units, crop_scale_min, flip, max_rotation)

        table = find_table(self.data_dir)
        metadata = read_data_entry(table)
        on_disk = find_images(self.data_dir)
        if not on_disk:
            raise FileNotFoundError(
                f"found no PNG images under {self.data_dir}/images_*/images/ or {self.data_dir}/images/; "
                f"unpack the NIH image archives there ({DOWNLOAD_URL})"
            )
        rows = self._split_rows(metadata)
        needed = np.concatenate(list(rows.values()))
        cache = ImageCache(self.cache_dir, self.data_dir, metadata.image_ids.tolist(), self.image_size)
        report = cache.build(
            {str(name): on_disk.get(str(name)) for name in metadata.image_ids[needed]}, workers=self.cache_workers
        )
        if report.refreshed:
            warnings.warn(
                f"{report.refreshed} cached image(s) changed on disk (size or modification time) and were "
                "decoded again",
                DataWarning,
                stacklevel=2,
            )
        missing = [name for name, reason in report.failed.items() if reason == "file not found"]
        _report_left_out("of the table are missing on disk", missing)
        _report_left_out(
            "could not be decoded",
            [f"{name} ({reason})" for name, reason in report.failed.items() if reason != "file not found"],
        )
        failed = set(report.failed)
        self._metadata: dict[str, ChestXray14Metadata] = {}
        self._datasets: dict[str, ImageLabelDataset] = {}
        images = cache.images()
        for split, split_rows in rows.items():
            kept = np.array([r for r in split_rows if metadata.image_ids[r] not in failed], dtype=np.int64)
            if len(kept) == 0:
                raise ValueError(f"the {split} split has no readable images in {self.data_dir}")
            part = metadata.rows(kept)
            self._metadata[split] = part
            self._datasets[split] = ImageLabelDataset(
                images,
                torch.as_tensor(part.labels, dtype=torch.float32),
                [str(name) for name in part.image_ids],
                rows=np.array([cache.slot_of[str(name)] for name in part.image_ids], dtype=np.int64),
            )
        check_patient_disjoint({split: part.patient_ids for split, part in self._metadata.items()})
        self._warn_absent_findings()

    def _split_rows(self, metadata: ChestXray14Metadata) -> dict[str, np.ndarray]:
        """Table rows of each split (before unreadable images are removed), checked patient-disjoint."""
        lists = {key: self.data_dir / name for key, name in OFFICIAL_LISTS.items()}
        have_lists = all(path.is_file() for path in lists.values())
        if self.split == "official" and not have_lists:
            raise FileNotFoundError(
                f"split=official needs {lists['train_val']} and {lists['test']}; use split=random for a "
                "seeded patient-wise split"
            )
        rng = np.random.default_rng([self.data_seed, 0])
        if self.split == "random" or not have_lists:
            assignment = assign_patients(metadata.patient_ids, self.val_fraction, self.test_fraction, rng)
        else:
            names = metadata.image_ids.astype(str)
            test = np.isin(names, list(_read_list(lists["test"])))
            train_val = np.isin(names, list(_read_list(lists["train_val"]))) & ~test
            assignment = np.full(len(names), -1, dtype=np.int64)
            assignment[test] = 2
            carve = self.val_fraction / (1.0 - self.test_fraction)
            assignment[train_val] = assign_patients(metadata.patient_ids[train_val], carve, 0.0, rng)
            unlisted = int((assignment < 0).sum())
            if unlisted:
                warnings.warn(f"{unlisted} image(s) of the table are in neither list file and left out", DataWarning)
        rows = {split: np.flatnonzero(assignment == index) for index, split in enumerate(SPLIT_NAMES)}
        check_patient_disjoint({split: metadata.patient_ids[r] for split, r in rows.items()})
        if self.subset:
            labels = {split: metadata.labels for split in rows}
            rows = draw_subset(rows, labels, self.subset, self.min_positives, np.random.default_rng([self.data_seed, 1]))
        return rows

    def _warn_absent_findings(self) -> None:
        for split, part in self._metadata.items():
            absent = [FINDINGS[t] for t in np.flatnonzero(part.labels.sum(axis=0) == 0)]
            if absent:
                warnings.warn(
                    f"the {split} split has no positive of {', '.join(absent)}; their AUROC is undefined there",
                    DataWarning,
                    stacklevel=3,
                )

    def patient_ids(self, split: str) -> list[int]:
        """The ``Patient ID`` of each item of ``split``, in item order."""
        self._check_split_name(split)
        return self._metadata[split].patient_ids.tolist()

    def config(self) -> dict[str, Any]:
        """The suite's options."""
        return {
            "data_dir": str(self.data_dir),
            "image_size": self.image_size,
            "split": self.split,
            "subset": self.subset,
            "data_seed": self.data_seed,
            "val_fraction": self.val_fraction,
            "test_fraction": self.test_fraction,
            "min_positives": self.min_positives,
            "cache_dir": str(self.cache_dir),
            "cache_workers": self.cache_workers,
            **self._image_model_config(),
        }
