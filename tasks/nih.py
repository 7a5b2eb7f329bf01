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

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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

DOWNLOAD_URL = "https://nihcc.app.box.com/v/ChestXray-NIHCC"
"""Where the NIH Clinical Center distributes the data set and its table."""

_DOWNLOAD_AGAIN = f"download Data_Entry_2017.csv again from {DOWNLOAD_URL}"


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

    Blank lines are skipped. Raises ``ValueError`` naming the file, and the CSV line (the
    header is line 1) and ``Image Index`` of the first offending row, when the file is not a
    CSV table (a row with more fields than the header, say), a required column is missing,
    an ``Image Index`` is blank or listed twice, a ``Finding Labels`` cell is empty or holds
    a finding that is neither one of the 14 nor ``No Finding``, or a ``Patient ID`` is not a
    non-negative integer.
    """
    path = Path(path)
    header = _read_csv(path, nrows=0)
    header.columns = header.columns.str.strip()
    missing = [column for column in TABLE_COLUMNS if column not in header.columns]
    if missing:
        raise ValueError(
            f"{path} lacks the column(s) {missing}; a ChestX-ray14 Data_Entry_2017.csv has "
            f"{', '.join(TABLE_COLUMNS)} (found: {', '.join(header.columns)}); {_DOWNLOAD_AGAIN}"
        )
    # Every column is parsed so that a row with more fields than the header is refused.
    table = _read_csv(path, dtype=str, keep_default_na=False, skip_blank_lines=False)
    table.columns = table.columns.str.strip()
    table = table[(table != "").any(axis=1)]  # blank lines; the index keeps each row's place in the file
    table = table[list(TABLE_COLUMNS)].apply(lambda column: column.str.strip())
    if table.empty:
        raise ValueError(f"{path} lists no images; {_DOWNLOAD_AGAIN}")
    image_ids = table["Image Index"]
    _refuse_rows(path, table, image_ids == "", lambda row: "its Image Index (the image's file name) is blank")
    _refuse_rows(
        path,
        table,
        image_ids.duplicated(),
        lambda row: f"the image is listed before, on line {_line(image_ids.index[image_ids == row['Image Index']][0])}",
    )
    _refuse_rows(
        path,
        table,
        table["Finding Labels"] == "",
        lambda row: "its Finding Labels is empty (an image without findings reads 'No Finding')",
    )
    _refuse_rows(
        path,
        table,
        ~table["Patient ID"].str.fullmatch(r"\d{1,18}"),
        lambda row: f"its Patient ID {row['Patient ID']!r} is not a non-negative integer",
    )
    known = set(FINDINGS) | {"No Finding"}
    codes, combinations = pd.factorize(table["Finding Labels"])
    unknown = np.array([not set(_split_findings(combination)) <= known for combination in combinations])
    _refuse_rows(
        path,
        table,
        unknown[codes],
        lambda row: f"its Finding Labels holds {sorted(set(_split_findings(row['Finding Labels'])) - known)}, "
        f"which are neither one of the 14 findings {list(FINDINGS)} nor 'No Finding'",
    )
    combination_labels = np.zeros((len(combinations), len(FINDINGS)), dtype=np.uint8)
    for index, combination in enumerate(combinations):
        present = [FINDINGS.index(finding) for finding in _split_findings(combination) if finding != "No Finding"]
        combination_labels[index, present] = 1
    return ChestXray14Metadata(
        image_ids=image_ids.to_numpy(dtype=object),
        patient_ids=table["Patient ID"].to_numpy().astype(np.int64),
        labels=combination_labels[codes],
    )


def _read_csv(path: Path, **options: Any) -> pd.DataFrame:
    """``pandas.read_csv(path, **options)``; a file that is no CSV table raises ``ValueError`` naming it."""
    try:
        return pd.read_csv(path, **options)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} cannot be read as a CSV table ({str(error).strip()}); {_DOWNLOAD_AGAIN}") from None


def _split_findings(labels: str) -> list[str]:
    """The findings of a ``Finding Labels`` cell (joined by ``|``)."""
    return [finding.strip() for finding in labels.split("|")]


def _line(row: int) -> int:
    """The 1-based CSV line of the table row at file position ``row`` (the header is line 1)."""
    return row + 2


def _refuse_rows(
    path: Path, table: pd.DataFrame, bad: pd.Series | np.ndarray, problem: Callable[[pd.Series], str]
) -> None:
    """Raise ``ValueError`` naming the first row of ``table`` where ``bad`` holds, ``problem(row)`` and their count."""
    bad = np.asarray(bad, dtype=bool)
    if not bad.any():
        return
    position = table.index[np.flatnonzero(bad)[0]]
    row = table.loc[position]
    name = f" (Image Index {row['Image Index']!r})" if row["Image Index"] else ""
    count = int(bad.sum())
    others = f"; {count - 1} more row(s) have this problem" if count > 1 else ""
    raise ValueError(
        f"{path}, line {_line(position)}{name}: {problem(row)}{others}; correct the table or {_DOWNLOAD_AGAIN}"
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
