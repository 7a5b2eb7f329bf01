"""NIH ChestX-ray14 facts and table logic shared by the ``cxr14`` and ``cxr14-synthetic`` suites.

The data set (Wang et al., CVPR 2017) has 112,120 frontal radiographs of 30,805 patients and
a metadata table, ``Data_Entry_2017.csv``, with one row per image: its file name (``Image
Index``), its findings joined by ``|`` (``Finding Labels``; ``No Finding`` when none) and its
``Patient ID``. The table exists in two revisions: the 2017 original (an empty trailing column,
ages such as ``058Y`` in some copies) and the 2020 one (integer ages, no trailing column);
only the three columns above are read, so both parse alike.

Splits are patient-wise: no patient has images in two splits, since images of one patient are
strongly correlated and a split by image leaks (Rajpurkar et al., 2017, split by patient).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

FINDINGS: tuple[str, ...] = (
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
)
"""The 14 ChestX-ray14 findings, in the data set's customary order ("No Finding" is no task)."""

TABLE_COLUMNS: tuple[str, ...] = ("Image Index", "Finding Labels", "Patient ID")
"""The columns of ``Data_Entry_2017.csv`` that are read."""


@dataclass(frozen=True)
class ChestXray14Metadata:
    """The ChestX-ray14 table, one entry per image, in table order.

    Attributes:
        image_ids: ``Image Index`` file names.
        patient_ids: ``Patient ID`` numbers.
        labels: uint8 ``[N, 14]``, 1 where the finding of :data:`FINDINGS` is present.
    """

    image_ids: np.ndarray
    patient_ids: np.ndarray
    labels: np.ndarray

    def rows(self, rows: np.ndarray) -> ChestXray14Metadata:
        """The table restricted to ``rows`` (indices or a boolean mask), in that order."""
        return ChestXray14Metadata(self.image_ids[rows], self.patient_ids[rows], self.labels[rows])


def read_data_entry(path: str | Path) -> ChestXray14Metadata:
    """Parse a ``Data_Entry_2017.csv`` table (2017 or 2020 revision, plain or ``.gz``).

    Raises ``ValueError`` naming the file when a required column is missing, an image is
    listed twice, or a finding is not one of the 14 nor ``No Finding``.
    """
    path = Path(path)
    header = pd.read_csv(path, nrows=0)
    header.columns = header.columns.str.strip()
    missing = [column for column in TABLE_COLUMNS if column not in header.columns]
    if missing:
        raise ValueError(
            f"{path} lacks the column(s) {missing}; a ChestX-ray14 Data_Entry_2017.csv has "
            f"{', '.join(TABLE_COLUMNS)} (found: {', '.join(header.columns)})"
        )
    table = pd.read_csv(path, usecols=lambda column: column.strip() in TABLE_COLUMNS, dtype={"Image Index": str})
    table.columns = table.columns.str.strip()
    duplicated = table["Image Index"][table["Image Index"].duplicated()]
    if len(duplicated):
        raise ValueError(f"{path} lists {len(duplicated)} image(s) twice, e.g. {duplicated.iloc[0]!r}")
    codes, combinations = pd.factorize(table["Finding Labels"].astype(str).str.strip())
    combination_labels = np.zeros((len(combinations), len(FINDINGS)), dtype=np.uint8)
    known = set(FINDINGS) | {"No Finding"}
    for row, combination in enumerate(combinations):
        for finding in combination.split("|"):
            finding = finding.strip()
            if finding not in known:
                raise ValueError(f"{path} holds an unknown finding {finding!r}; expected one of {sorted(known)}")
            if finding != "No Finding":
                combination_labels[row, FINDINGS.index(finding)] = 1
    return ChestXray14Metadata(
        image_ids=table["Image Index"].str.strip().to_numpy(dtype=object),
        patient_ids=table["Patient ID"].to_numpy(dtype=np.int64),
        labels=combination_labels[codes],
    )


def assign_patients(
    patient_ids: np.ndarray, val_fraction: float, test_fraction: float, rng: np.random.Generator
) -> np.ndarray:
    """Split index (0 train, 1 val, 2 test) of every row, patient-wise.

    Patients are shuffled; those whose images start within the first ``test_fraction`` of
    all images go to test, the next ``val_fraction`` to val, the rest to train. With
    ``test_fraction=0`` this carves a validation split from a training pool.
    """
    patients, row_patient, image_counts = np.unique(patient_ids, return_inverse=True, return_counts=True)
    order = rng.permutation(len(patients))
    start_share = (np.cumsum(image_counts[order]) - image_counts[order]) / len(patient_ids)
    split_in_order = np.where(
        start_share < test_fraction, 2, np.where(start_share < test_fraction + val_fraction, 1, 0)
    )
    patient_split = np.empty(len(patients), dtype=np.int64)
    patient_split[order] = split_in_order
    return patient_split[row_patient]


def sample_split(
    pool: np.ndarray,
    size: int,
    labels: np.ndarray,
    min_positives: int,
    rng: np.random.Generator,
    split: str,
    strict: bool = True,
) -> np.ndarray:
    """Draw ``size`` rows of ``pool`` holding at least ``min_positives`` positives per finding.

    Going from the rarest finding in the pool to the most common, random positives of that
    finding are added until the rows drawn so far hold ``min_positives`` of them
    (co-occurring labels count); the rest is drawn uniformly at random. Common findings thus
    keep their prevalence while rare ones are over-represented in a small draw. With
    ``strict=False`` a finding with fewer positives in the pool keeps all it has instead of
    raising. Returns sorted rows.
    """
    if size > len(pool):
        raise ValueError(f"the {split} split needs {size} images but its patients have only {len(pool)}")
    pool_labels = labels[pool].astype(bool)
    drawn = np.zeros(len(pool), dtype=bool)
    for finding in np.argsort(pool_labels.sum(axis=0), kind="stable"):
        available = int(pool_labels[:, finding].sum())
        if available < min_positives and strict:
            raise ValueError(
                f"the {split} split's patients have only {available} images with {FINDINGS[finding]}, fewer "
                f"than min_positives={min_positives}; lower min_positives or give the {split} split more images"
            )
        missing = min(min_positives, available) - int(pool_labels[drawn, finding].sum())
        if missing <= 0:
            continue
        candidates = np.flatnonzero(pool_labels[:, finding] & ~drawn)
        drawn[rng.choice(candidates, size=missing, replace=False)] = True
    if drawn.sum() > size:
        raise ValueError(
            f"the {split} split would need {int(drawn.sum())} images to hold min_positives={min_positives} "
            f"positives of every finding, more than its {size}; lower min_positives or draw more images"
        )
    remaining = np.flatnonzero(~drawn)
    drawn[rng.choice(remaining, size=size - int(drawn.sum()), replace=False)] = True
    return np.sort(pool[drawn])


def check_patient_disjoint(patients: dict[str, np.ndarray]) -> None:
    """Raise ``ValueError`` if any patient appears in two of the named splits."""
    names = list(patients)
    sets = {name: set(np.asarray(ids).tolist()) for name, ids in patients.items()}
    for i, first in enumerate(names):
        for second in names[i + 1 :]:
            shared = sets[first] & sets[second]
            if shared:
                raise ValueError(
                    f"{len(shared)} patient(s) are in both the {first} and {second} splits, e.g. "
                    f"{sorted(shared)[:5]}; the splits would leak"
                )


SUBSET_OPTION_HELP: dict[str, str] = {
    "subset": "number of images over all splits for quick runs, stratified by finding; 0 = all",
    "min_positives": "positives of every finding kept in every split of a subset, when available",
}
"""Help of the options of :func:`draw_subset`, for suites that expose them."""


def draw_subset(
    rows: dict[str, np.ndarray],
    labels: dict[str, np.ndarray],
    subset: int,
    min_positives: int,
    rng: np.random.Generator,
) -> dict[str, np.ndarray]:
    """``subset`` rows over all splits, each split keeping its share, stratified by finding.

    ``rows[split]`` indexes ``labels[split]``; each split's draw is :func:`sample_split` with
    ``strict=False`` (a finding keeps up to ``min_positives`` positives where it has them).
    """
    total = sum(len(r) for r in rows.values())
    if subset > total:
        raise ValueError(f"subset={subset} exceeds the {total} images available")
    sizes = {split: round(subset * len(r) / total) for split, r in rows.items() if split != "train"}
    sizes["train"] = subset - sum(sizes.values())
    return {
        split: sample_split(r, sizes[split], labels[split], min_positives, rng, split, strict=False)
        for split, r in rows.items()
    }
