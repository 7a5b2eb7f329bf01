"""The real ChestX-ray14 path on real pixels: NIH layout, splits, image cache, models, ChestMNIST.

Test folders are built from the two real NIH images in ../shared/data/nih-sample, copied
under the names of real rows of the NIH table (so labels, patients and their images-per-
patient are the data set's own), as README of that folder suggests.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import tasks
from bench.cli import main
from bench.runner import summary_files
from tasks import cxr14, image_cache, models, nih
from tasks.augment import BatchAugmentation
from tasks.cxr14_synthetic import load_metadata

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO.parent / "shared" / "data" / "nih-sample"
SAMPLE_IMAGES = ("00000001_000.png", "00027426_000.png")
N_ROWS = 80


def table_rows(n: int, seed: int = 0) -> pd.DataFrame:
    """``n`` real rows of the NIH table (``n`` >= 42), drawn so that every finding has at least 3 positives."""
    metadata = load_metadata()
    rng = np.random.default_rng(seed)
    chosen: list[int] = []
    for finding in range(len(nih.FINDINGS)):
        positives = np.flatnonzero(metadata.labels[:, finding])
        chosen.extend(rng.choice(positives, size=3, replace=False).tolist())
    chosen.extend(rng.choice(len(metadata.image_ids), size=n - len(chosen), replace=False).tolist())
    rows = np.unique(chosen)[:n]
    labels = ["|".join(f for f, v in zip(nih.FINDINGS, metadata.labels[r]) if v) or "No Finding" for r in rows]
    return pd.DataFrame(
        {
            "Image Index": metadata.image_ids[rows],
            "Finding Labels": labels,
            "Follow-up #": 0,
            "Patient ID": metadata.patient_ids[rows],
            "Patient Age": 50,
            "Patient Gender": "M",
            "View Position": "PA",
        }
    )


def write_table(table: pd.DataFrame, path: Path, revision: int) -> None:
    """Write ``table`` as the 2017 (``058Y`` ages, empty trailing column) or 2020 revision."""
    out = table.copy()
    if revision == 2017:
        out["Patient Age"] = [f"{age:03d}Y" for age in out["Patient Age"]]
        out[""] = ""
    out.to_csv(path, index=False)


def make_nih_folder(root: Path, n: int = N_ROWS, broken: bool = True, layout: str = "nested") -> pd.DataFrame:
    """An NIH-layout folder of ``n`` real table rows; with ``broken``, one truncated PNG and one missing file."""
    table = table_rows(n)
    root.mkdir(parents=True, exist_ok=True)
    write_table(table, root / "Data_Entry_2017.csv", 2017)
    sources = [(SAMPLE / name).read_bytes() for name in SAMPLE_IMAGES]
    for index, name in enumerate(table["Image Index"]):
        folder = root / (f"images_{1 + index % 2:03d}/images" if layout == "nested" else "images")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(sources[index % 2])
    if broken:
        truncated, missing = table["Image Index"].iloc[3], table["Image Index"].iloc[4]
        (root / "images_002/images" / truncated).write_bytes(sources[1][:5000])
        (root / "images_001/images" / missing).unlink()
    return table


@pytest.fixture(scope="module")
def nih_folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pd.DataFrame]:
    root = tmp_path_factory.mktemp("cxr14")
    return root, make_nih_folder(root)


def create_suite(root: Path, cache: Path, **options: object) -> tasks.TaskSuite:
    defaults = {"data_dir": str(root), "cache_dir": str(cache), "image_size": 32, "cache_workers": 0}
    return tasks.create("cxr14", **{**defaults, **options})


def test_the_shared_sample_table_parses() -> None:
    metadata = nih.read_data_entry(SAMPLE / "Data_Entry_2017_sample.csv")
    assert metadata.image_ids.tolist() == list(SAMPLE_IMAGES)
    assert metadata.patient_ids.tolist() == [1, 27426]
    assert metadata.labels[0].tolist() == [0, 1] + [0] * 12 and metadata.labels[1].sum() == 0


def test_both_table_revisions_give_the_same_metadata(tmp_path: Path) -> None:
    table = table_rows(50)
    write_table(table, tmp_path / "2017.csv", 2017)
    write_table(table, tmp_path / "2020.csv", 2020)
    first_row = (tmp_path / "2017.csv").read_text().splitlines()[1]
    assert ",050Y," in first_row and first_row.endswith(",")
    old, new = nih.read_data_entry(tmp_path / "2017.csv"), nih.read_data_entry(tmp_path / "2020.csv")
    assert old.image_ids.tolist() == new.image_ids.tolist() == table["Image Index"].tolist()
    assert np.array_equal(old.labels, new.labels) and np.array_equal(old.patient_ids, new.patient_ids)
    reference = load_metadata()
    rows = [reference.image_ids.tolist().index(name) for name in table["Image Index"]]
    assert np.array_equal(new.labels, reference.labels[rows])


def test_a_table_without_required_columns_is_refused_by_name(tmp_path: Path) -> None:
    table = table_rows(50).drop(columns=["Patient ID"])
    table.to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(ValueError, match="Patient ID"):
        nih.read_data_entry(tmp_path / "bad.csv")


def without_whitespace(text: str) -> str:
    """``text`` without spaces and line breaks, so that a path the console wrapped still matches."""
    return "".join(text.split())


@pytest.mark.parametrize(
    ("column", "value", "problem"),
    [
        ("Finding Labels", "", "its Finding Labels is empty"),
        ("Patient ID", "", "its Patient ID '' is not a non-negative integer"),
        ("Patient ID", "P-17", "its Patient ID 'P-17' is not a non-negative integer"),
        ("Image Index", "", "its Image Index (the image's file name) is blank"),
        ("Finding Labels", "Mass|Tumour", "its Finding Labels holds ['Tumour']"),
    ],
)
def test_a_malformed_table_row_is_refused_with_its_line(tmp_path: Path, column: str, value: str, problem: str) -> None:
    table = table_rows(50).astype({"Patient ID": object})
    name = table["Image Index"].iloc[7]
    table.loc[table.index[7], column] = value
    path = tmp_path / "Data_Entry_2017.csv"
    write_table(table, path, 2017)
    where = f"{path}, line 9" + (f" (Image Index {name!r})" if column != "Image Index" else "")
    with pytest.raises(ValueError) as refused:
        nih.read_data_entry(path)
    message = str(refused.value)
    assert message.startswith(f"{where}: {problem}") and nih.DOWNLOAD_URL in message


def test_blank_lines_are_skipped_and_counted_in_the_reported_line(tmp_path: Path) -> None:
    table = table_rows(50).astype({"Patient ID": object})
    path = tmp_path / "Data_Entry_2017.csv"

    def write_with_blank_lines() -> None:
        write_table(table, path, 2020)
        lines = path.read_text().splitlines()
        path.write_text("\n".join(lines[:3] + [""] + lines[3:]) + "\n\n")

    write_with_blank_lines()
    assert nih.read_data_entry(path).image_ids.tolist() == table["Image Index"].tolist()
    table.loc[table.index[9], "Patient ID"] = "x"
    write_with_blank_lines()
    with pytest.raises(ValueError, match=re.escape(f"{path}, line 12 (Image Index {table['Image Index'].iloc[9]!r})")):
        nih.read_data_entry(path)


def test_a_duplicated_image_names_both_lines(tmp_path: Path) -> None:
    table = table_rows(50)
    table.loc[table.index[20], "Image Index"] = table["Image Index"].iloc[5]
    write_table(table, tmp_path / "t.csv", 2020)
    with pytest.raises(ValueError, match=r"t\.csv, line 22 .*listed before, on line 7"):
        nih.read_data_entry(tmp_path / "t.csv")


MALFORMED_TABLES = {
    "not CSV": ("Image Index,Finding Labels,Patient ID\na.png,Mass,1\nb.png,Mass,2,7,8\n", "Error tokenizing data"),
    "empty": ("", "No columns to parse from file"),
    "no Patient ID": ("Image Index,Finding Labels\na.png,Mass\n", "lacks the column(s) ['Patient ID']"),
    "non-numeric Patient ID": ("Image Index,Finding Labels,Patient ID\na.png,Mass,1\nb.png,Mass,two\n", "line 3"),
    "blank Image Index": ("Image Index,Finding Labels,Patient ID\na.png,Mass,1\n ,Mass,2\n", "line 3"),
}


@pytest.mark.parametrize("case", MALFORMED_TABLES)
def test_a_malformed_table_is_a_clean_cli_error_naming_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    content, problem = MALFORMED_TABLES[case]
    (tmp_path / "d").mkdir()
    path = tmp_path / "d" / "Data_Entry_2017.csv"
    path.write_text(content)
    code = main([
        "run", "--task", "cxr14", "--data-dir", str(path.parent), "--methods", "ew", "--epochs", "1",
        "--task-opt", f"cache_dir={tmp_path / 'cache'}", "--results", str(tmp_path / "results"),
    ])  # fmt: skip
    captured = capsys.readouterr()
    output = without_whitespace(captured.out + captured.err)
    assert code == 2 and "Traceback" not in output
    assert without_whitespace(f"error: {path}") in output and without_whitespace(problem) in output
    assert without_whitespace(nih.DOWNLOAD_URL) in output


def test_missing_data_folder_says_where_and_how_to_get_it(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nihcc.app.box.com.*--data-dir"):
        create_suite(tmp_path / "absent", tmp_path / "cache")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no Data_Entry_2017.csv"):
        create_suite(tmp_path / "empty", tmp_path / "cache")


def test_random_split_is_patient_disjoint_and_reports_unreadable_images(
    nih_folder: tuple[Path, pd.DataFrame], tmp_path: Path
) -> None:
    root, table = nih_folder
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        suite = create_suite(root, tmp_path / "cache")
    messages = [str(w.message) for w in caught if issubclass(w.category, cxr14.DataWarning)]
    truncated, missing = table["Image Index"].iloc[3], table["Image Index"].iloc[4]
    assert any("1 image(s) of the table are missing on disk" in m and missing in m for m in messages)
    assert any("1 image(s) could not be decoded" in m and truncated in m and "truncated" in m for m in messages)

    ids = {split: suite.item_ids(split) for split in tasks.SPLIT_NAMES}
    assert sum(len(v) for v in ids.values()) == N_ROWS - 2
    assert truncated not in sum(ids.values(), []) and missing not in sum(ids.values(), [])
    patients = {split: set(suite.patient_ids(split)) for split in ids}
    assert not patients["train"] & patients["val"] and not patients["train"] & patients["test"]
    assert not patients["val"] & patients["test"]
    patient_of = dict(zip(table["Image Index"], table["Patient ID"]))
    for split in ids:
        assert [patient_of[i] for i in ids[split]] == suite.patient_ids(split)
    label_of = {name: labels for name, labels in zip(table["Image Index"], table["Finding Labels"])}
    name = ids["train"][0]
    expected = [float(f in label_of[name].split("|")) for f in nih.FINDINGS]
    assert suite.labels("train")[0].tolist() == expected
    assert suite.prevalence() == pytest.approx(suite.labels("train").mean(dim=0).tolist())


def test_cached_pixels_are_the_downsized_source_image(nih_folder: tuple[Path, pd.DataFrame], tmp_path: Path) -> None:
    root, table = nih_folder
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", cxr14.DataWarning)
        suite = create_suite(root, tmp_path / "cache", image_size=64)
    dataset = suite.splits()["train"]
    x, _ = dataset[0]
    assert x.dtype == torch.uint8 and x.shape == (1, 64, 64)
    position = table["Image Index"].tolist().index(dataset.item_ids[0])
    original = torch.from_numpy(np.array(Image.open(SAMPLE / SAMPLE_IMAGES[position % 2]))).to(torch.float32)
    reference = F.interpolate(original[None, None], size=(64, 64), mode="bilinear", antialias=True)[0]
    assert (x.to(torch.float32) - reference).abs().mean() < 2.0


def test_official_lists_fix_the_test_split_and_val_is_carved_by_patient(tmp_path: Path) -> None:
    root = tmp_path / "data"
    table = make_nih_folder(root, broken=False, layout="flat")
    patients = np.unique(table["Patient ID"])
    test_patients = set(patients[: len(patients) // 4].tolist())
    is_test = table["Patient ID"].isin(test_patients)
    (root / "test_list.txt").write_text("\n".join(table["Image Index"][is_test]) + "\n")
    (root / "train_val_list.txt").write_text("\n".join(table["Image Index"][~is_test]) + "\n")
    suite = create_suite(root, tmp_path / "cache", val_fraction=0.2, test_fraction=0.2)
    assert suite.config()["split"] == "auto"
    assert sorted(suite.item_ids("test")) == sorted(table["Image Index"][is_test])
    train_val = set(suite.item_ids("train")) | set(suite.item_ids("val"))
    assert train_val == set(table["Image Index"][~is_test])
    assert not set(suite.patient_ids("train")) & set(suite.patient_ids("val"))
    assert 0 < len(suite.item_ids("val")) < len(suite.item_ids("train"))

    leaking = table.copy()
    leaking.loc[leaking.index[~is_test][0], "Patient ID"] = sorted(test_patients)[0]
    write_table(leaking, root / "Data_Entry_2017.csv", 2020)
    with pytest.raises(ValueError, match="1 patient.*in both the train.*and test splits"):
        create_suite(root, tmp_path / "cache", split="official")


def test_subset_keeps_positives_of_every_finding(nih_folder: tuple[Path, pd.DataFrame], tmp_path: Path) -> None:
    root, _ = nih_folder
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", cxr14.DataWarning)
        full = create_suite(root, tmp_path / "cache", split="random")
        small = create_suite(root, tmp_path / "cache", split="random", subset=50, min_positives=1)
    assert sum(len(small.item_ids(s)) for s in tasks.SPLIT_NAMES) <= 50
    for split in tasks.SPLIT_NAMES:
        assert set(small.item_ids(split)) <= set(full.item_ids(split))
        had = full.labels(split).sum(dim=0) > 0
        kept = small.labels(split).sum(dim=0) > 0
        assert torch.equal(had, kept), split


def test_interrupted_cache_build_resumes_without_half_written_images(
    nih_folder: tuple[Path, pd.DataFrame], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, table = nih_folder
    found = cxr14.find_images(root)
    names = table["Image Index"].tolist()
    paths = {name: found.get(name) for name in names}
    clean = image_cache.ImageCache(tmp_path / "clean", root, names, 24)
    clean.build(paths, progress=False)

    decode = image_cache.decode_image
    calls = {"n": 0}

    def dying_decode(path: str, size: int) -> np.ndarray:
        calls["n"] += 1
        if calls["n"] == image_cache.CHUNK_SIZE + 5:  # in the middle of the second chunk
            raise KeyboardInterrupt
        return decode(path, size)

    monkeypatch.setattr(image_cache, "decode_image", dying_decode)
    interrupted = image_cache.ImageCache(tmp_path / "resumed", root, names, 24)
    with pytest.raises(KeyboardInterrupt):
        interrupted.build(paths, progress=False)
    status = interrupted.status()
    # the first chunk was flushed, minus its truncated PNG (the missing file is never decoded)
    assert (status == image_cache.STORED).sum() == image_cache.CHUNK_SIZE - 1

    monkeypatch.setattr(image_cache, "decode_image", decode)
    resumed = image_cache.ImageCache(tmp_path / "resumed", root, names, 24)
    report = resumed.build(paths, progress=False)
    assert report.reused == image_cache.CHUNK_SIZE - 1
    assert report.decoded == len(names) - 2 - report.reused and len(report.failed) == 2
    stored = resumed.status() == image_cache.STORED
    assert np.array_equal(stored, clean.status() == image_cache.STORED)
    assert np.array_equal(resumed.images()[stored], clean.images()[stored])


def test_sigkilled_cache_build_resumes(nih_folder: tuple[Path, pd.DataFrame], tmp_path: Path) -> None:
    """A build killed with SIGKILL in the middle leaves only complete images marked stored."""
    root, table = nih_folder
    script = (
        "import sys, time, numpy as np\n"
        "from tasks import cxr14, image_cache\n"
        "decode = image_cache.decode_image\n"
        "def slow(path, size):\n"
        "    time.sleep(0.05)\n"
        "    return decode(path, size)\n"
        "image_cache.decode_image = slow\n"
        f"names = {table['Image Index'].tolist()!r}\n"
        f"found = cxr14.find_images(__import__('pathlib').Path({str(root)!r}))\n"
        f"cache = image_cache.ImageCache({str(tmp_path / 'cache')!r}, {str(root)!r}, names, 24)\n"
        "cache.build({n: found.get(n) for n in names}, progress=False)\n"
    )
    process = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    names = table["Image Index"].tolist()
    cache_dirs: list[Path] = []
    deadline = 60.0
    import time

    start = time.monotonic()
    while time.monotonic() - start < deadline:
        cache_dirs = list((tmp_path / "cache").glob("*/status.npy"))
        if cache_dirs and (np.load(cache_dirs[0]) == image_cache.STORED).sum() >= image_cache.CHUNK_SIZE:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    status = np.load(cache_dirs[0])
    assert 0 < (status == image_cache.STORED).sum() < len(names) - 2
    found = cxr14.find_images(root)
    resumed = image_cache.ImageCache(tmp_path / "cache", root, names, 24)
    report = resumed.build({n: found.get(n) for n in names}, progress=False)
    assert report.reused == (status == image_cache.STORED).sum() and len(report.failed) == 2
    stored = np.flatnonzero(resumed.status() == image_cache.STORED)
    for slot in stored:
        expected = image_cache.decode_image(found[names[slot]], 24)
        assert np.array_equal(resumed.images()[slot, 0], expected)


def test_parallel_build_equals_serial_and_sizes_get_their_own_cache(
    nih_folder: tuple[Path, pd.DataFrame], tmp_path: Path
) -> None:
    root, table = nih_folder
    found = cxr14.find_images(root)
    names = table["Image Index"].tolist()
    paths = {name: found.get(name) for name in names}
    serial = image_cache.ImageCache(tmp_path, root, names, 20)
    serial_report = serial.build(paths, workers=0, progress=False)
    parallel = image_cache.ImageCache(tmp_path / "p", root, names, 20)
    parallel_report = parallel.build(paths, workers=2, progress=False)
    assert serial_report.failed == parallel_report.failed and len(serial_report.failed) == 2
    assert np.array_equal(serial.images(), parallel.images())
    other_size = image_cache.ImageCache(tmp_path, root, names, 28)
    assert other_size.directory != serial.directory
    assert json.loads((other_size.directory / "meta.json").read_text())["size"] == 28


def test_sixteen_bit_pngs_are_cached_as_their_eight_bit_version(tmp_path: Path) -> None:
    gray = np.array(Image.open(SAMPLE / SAMPLE_IMAGES[0]))
    wide = gray.astype(np.uint16) * 257  # the same picture in 16 bits
    files = {"8-bit.png": Image.fromarray(gray), "I;16.png": Image.fromarray(wide)}
    files["I;16B.tiff"] = Image.frombytes("I;16B", wide.shape[::-1], wide.astype(">u2").tobytes())
    files["I.tiff"] = Image.fromarray(wide.astype(np.int32))
    for name, image in files.items():
        image.save(tmp_path / name)
    modes = [Image.open(tmp_path / name).mode for name in files]
    assert modes[0] == "L" and modes[1] in ("I;16", "I") and modes[2:] == ["I;16B", "I"]  # "I": older Pillow
    cache = image_cache.ImageCache(tmp_path / "cache", tmp_path, list(files), 64)
    cache.build({name: tmp_path / name for name in files}, progress=False)
    pixels = cache.images()[:, 0].astype(np.int16)
    assert 100 < pixels[0].mean() < 160
    assert np.abs(pixels[1:] - pixels[0]).max() <= 1


def replace_keeping_mtime(path: Path, content: bytes) -> None:
    """Write ``content`` to ``path`` and give it back its modification time."""
    mtime_ns = path.stat().st_mtime_ns
    path.write_bytes(content)
    os.utime(path, ns=(mtime_ns, mtime_ns))


def test_a_changed_image_file_is_decoded_again_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sources = [(SAMPLE / name).read_bytes() for name in SAMPLE_IMAGES]
    assert len(sources[0]) != len(sources[1])
    paths = {name: tmp_path / name for name in ("a.png", "b.png", "c.png")}
    for path in paths.values():
        path.write_bytes(sources[0])
    cache = image_cache.ImageCache(tmp_path / "cache", tmp_path, list(paths), 32)
    assert cache.build(paths, progress=False).decoded == 3
    original = np.array(cache.images()[0, 0])

    replace_keeping_mtime(paths["b.png"], sources[1])  # another size, the same time
    touched = paths["c.png"].stat().st_mtime_ns + 10**9
    os.utime(paths["c.png"], ns=(touched, touched))  # the same size, another time
    report = cache.build(paths, progress=False)
    assert np.array_equal(cache.images()[1, 0], image_cache.decode_image(paths["b.png"], 32))
    assert (report.reused, report.refreshed, report.decoded) == (1, 2, 2)
    assert np.array_equal(cache.images()[2, 0], original) and np.array_equal(cache.images()[0, 0], original)
    assert cache.build(paths, progress=False).reused == 3

    def interrupted(path: str, size: int) -> np.ndarray:
        raise KeyboardInterrupt

    replace_keeping_mtime(paths["a.png"], sources[1])
    monkeypatch.setattr(image_cache, "decode_image", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cache.build(paths, progress=False)
    assert cache.status()[0] == image_cache.PENDING  # not served with the old pixels
    monkeypatch.undo()
    report = cache.build(paths, progress=False)
    assert (report.reused, report.decoded) == (2, 1)
    assert np.array_equal(cache.images()[0, 0], cache.images()[1, 0])


def test_the_suite_says_how_many_cached_images_changed(tmp_path: Path) -> None:
    root = tmp_path / "data"
    table = make_nih_folder(root, n=45, broken=False, layout="flat")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        create_suite(root, tmp_path / "cache", split="random")
        assert not any("changed on disk" in str(w.message) for w in caught)
        name = table["Image Index"].iloc[0]
        replace_keeping_mtime(root / "images" / name, (SAMPLE / SAMPLE_IMAGES[1]).read_bytes())
        suite = create_suite(root, tmp_path / "cache", split="random")
    messages = [str(w.message) for w in caught if issubclass(w.category, cxr14.DataWarning)]
    assert any(m.startswith("1 cached image(s) changed on disk") for m in messages)
    split = next(s for s in tasks.SPLIT_NAMES if name in suite.item_ids(s))
    x, _ = suite.splits()[split][suite.item_ids(split).index(name)]
    assert np.array_equal(x[0].numpy(), image_cache.decode_image(root / "images" / name, 32))


def test_cli_runs_cxr14_end_to_end_on_real_pixels(nih_folder: tuple[Path, pd.DataFrame], tmp_path: Path) -> None:
    root, table = nih_folder
    command = [
        sys.executable, "-m", "bench", "run", "--task", "cxr14", "--data-dir", str(root), "--methods", "ew,deepchest",
        "--epochs", "1", "--image-size", "32", "--batch-size", "16", "--task-opt", f"cache_dir={tmp_path / 'cache'}",
        "--hp", "deepchest.init=prevalence", "--no-checkpoint", "--results", str(tmp_path / "results"),
    ]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    truncated, missing = table["Image Index"].iloc[3], table["Image Index"].iloc[4]
    assert missing in done.stderr and truncated in done.stderr
    summary = json.loads(summary_files(tmp_path / "results", "cxr14")[-1].with_suffix(".json").read_text())
    rows = summary["runs"] if isinstance(summary, dict) else summary
    assert {row["method"] for row in rows} == {"ew", "deepchest"}
    assert all(row["status"] == "FINISHED" for row in rows)


def test_imagenet_weights_load_from_the_hub_cache_with_a_gray_stem(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="checkpoints/resnet18-.*curl"):
        models.build_encoder("resnet18", 1, weights="imagenet")
    from torchvision.models import resnet18

    reference = resnet18(weights=None)
    path = models.imagenet_weights_path("resnet18")
    path.parent.mkdir(parents=True)
    torch.save(reference.state_dict(), path)
    encoder, dim = models.build_encoder("resnet18", 1, weights="imagenet")
    assert dim == 512
    assert torch.equal(encoder.conv1.weight, reference.conv1.weight.sum(dim=1, keepdim=True))
    assert torch.equal(encoder.layer4[1].conv2.weight, reference.layer4[1].conv2.weight)
    gray = torch.rand(2, 1, 32, 32)
    encoder.eval(), reference.eval()
    reference.fc = torch.nn.Identity()
    assert torch.allclose(encoder(gray), reference(gray.expand(-1, 3, -1, -1)), atol=1e-5)

    file_encoder, _ = models.build_encoder("resnet18", 1, weights=str(path))
    assert torch.equal(file_encoder.conv1.weight, encoder.conv1.weight)
    torch.save({"not": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="not a torchvision resnet18 state dict"):
        models.build_encoder("resnet18", 1, weights=str(tmp_path / "bad.pth"))


def test_hidden_layer_option_sits_between_encoder_and_heads(nih_folder: tuple[Path, pd.DataFrame], tmp_path: Path) -> None:
    root, _ = nih_folder
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", cxr14.DataWarning)
        suite = create_suite(root, tmp_path / "cache", hidden_units=512)
    model = suite.build_model("resnet18")
    assert model.encoder.hidden[0].out_features == 512 and model.heads[0].in_features == 512
    assert any(p is model.encoder.hidden[0].weight for p in model.shared_parameters())
    x = torch.stack([suite.splits()["train"][i][0] for i in range(4)])
    assert model(x).shape == (4, 14)


def test_augmentation_flips_crops_and_rotates_each_image_on_its_own() -> None:
    torch.manual_seed(0)
    images = torch.randint(0, 256, (32, 1, 24, 24), dtype=torch.uint8)
    scaled = images.to(torch.float32) / 255.0
    assert torch.equal(BatchAugmentation(1.0, False, 0.0)(images), scaled)

    flipped = BatchAugmentation(1.0, True, 0.0)(images)
    same = [torch.allclose(o, s, atol=1e-5) for o, s in zip(flipped, scaled)]
    mirrored = [torch.allclose(o, s.flip(-1), atol=1e-5) for o, s in zip(flipped, scaled)]
    assert all(a or b for a, b in zip(same, mirrored)) and any(same) and any(mirrored)

    theta = BatchAugmentation(0.5, False, 0.0).affine_matrices(1000, torch.device("cpu"))
    width, height = theta[:, 0, 0], theta[:, 1, 1]
    assert (width * height >= 0.5 - 1e-6).all() and (width <= 1).all() and (height <= 1).all()
    assert (theta[:, 0, 2].abs() + width <= 1 + 1e-6).all() and (theta[:, 0, 1] == 0).all()
    assert width.min() < 0.8  # crops really vary

    theta = BatchAugmentation(1.0, False, 10.0).affine_matrices(1000, torch.device("cpu"))
    angle = torch.rad2deg(torch.atan2(theta[:, 1, 0], theta[:, 0, 0]))
    assert angle.abs().max() <= 10 + 1e-4 and angle.abs().max() > 9
    assert torch.allclose(theta[:, 0, 0] ** 2 + theta[:, 1, 0] ** 2, torch.ones(1000))


def write_chestmnist(path: Path, size: int = 28, per_split: int = 40) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    arrays = {}
    for split in tasks.SPLIT_NAMES:
        arrays[f"{split}_images"] = rng.integers(0, 256, (per_split, size, size), dtype=np.uint8)
        arrays[f"{split}_labels"] = (rng.random((per_split, 14)) < 0.2).astype(np.uint8)
    np.savez_compressed(path, **arrays)
    return arrays


def test_chestmnist_reads_the_official_split_from_its_npz(tmp_path: Path) -> None:
    arrays = write_chestmnist(tmp_path / "chestmnist.npz")
    suite = tasks.create("chestmnist", data_dir=str(tmp_path))
    assert {s: len(suite.item_ids(s)) for s in tasks.SPLIT_NAMES} == {"train": 40, "val": 40, "test": 40}
    x, y = suite.splits()["val"][3]
    assert torch.equal(x[0], torch.from_numpy(arrays["val_images"][3]))
    assert y.tolist() == arrays["val_labels"][3].astype(float).tolist()
    small = tasks.create("chestmnist", data_dir=str(tmp_path), subset=30, min_positives=1)
    assert sum(len(small.item_ids(s)) for s in tasks.SPLIT_NAMES) == 30
    train_positive = arrays["train_labels"].sum(axis=0) > 0
    assert ((small.labels("train").sum(dim=0) > 0).numpy() == train_positive).all()


def test_chestmnist_bad_input_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="download=true"):
        tasks.create("chestmnist", data_dir=str(tmp_path), size=64)
    write_chestmnist(tmp_path / "chestmnist_64.npz", size=28)
    with pytest.raises(ValueError, match=r"uint8 \[N, 64, 64\]"):
        tasks.create("chestmnist", data_dir=str(tmp_path), size=64)
    with pytest.raises(ValueError, match="size must be one of"):
        tasks.create("chestmnist", data_dir=str(tmp_path), size=32)
