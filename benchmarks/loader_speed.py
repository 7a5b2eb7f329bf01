"""Images per second of the cxr14 input pipeline at 224 px: PNG decoding vs the image cache.

Builds an NIH-layout folder of ``--images`` copies of the two real NIH images in
``../shared/data/nih-sample`` (upscaled to ``--source-size`` pixels, as the originals are
1024 x 1024, and PNG-encoded once), then measures in one process:

- the cache build (decode + resize + store) with ``--workers`` processes;
- a DataLoader that decodes and resizes every PNG on the fly, with 0 and 2 workers;
- a DataLoader reading the memory-mapped cache, with 0 and 2 workers;
- the default training augmentation (:mod:`tasks.augment`) in batches on the CPU, one thread.

"per core" divides by the number of processes doing the work (the main process when there
are 0 workers). Each cache-reading row is the best of ``--repeats`` passes over all images
with the same loader, whose workers persist, so that their start-up is not counted; decoding
rows are one pass each.

    python benchmarks/loader_speed.py --images 2000 --size 224 --workers 2
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from rich.console import Console
from rich.table import Table
from torch.utils.data import DataLoader, Dataset

from tasks.augment import BatchAugmentation
from tasks.cxr14 import find_images
from tasks.image_cache import ImageCache, decode_image
from tasks.multilabel import ImageLabelDataset

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "nih-sample"


class DecodingDataset(Dataset):
    """Decode and resize each PNG when it is asked for (no cache)."""

    def __init__(self, paths: list[Path], size: int) -> None:
        self.paths, self.size = paths, size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return torch.from_numpy(np.array(decode_image(self.paths[index], self.size)))[None], 0


def make_folder(root: Path, count: int, source_size: int) -> list[str]:
    """``count`` PNG copies of the sample images under ``root/images_001/images``; returns their names."""
    encoded = []
    for path in sorted(SAMPLE.glob("*.png")):
        image = Image.open(path)
        if source_size:
            image = image.resize((source_size, source_size), Image.Resampling.BICUBIC)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        encoded.append(buffer.getvalue())
    folder = root / "images_001" / "images"
    folder.mkdir(parents=True)
    names = [f"{index:08d}_000.png" for index in range(count)]
    for index, name in enumerate(names):
        (folder / name).write_bytes(encoded[index % len(encoded)])
    return names


def loader_rate(dataset: Dataset, workers: int, batch_size: int, repeats: int) -> float:
    """Best images/s over ``repeats`` full passes of one loader (workers persist between passes)."""
    loader = DataLoader(
        dataset, batch_size=batch_size, shuffle=True, num_workers=workers, persistent_workers=workers > 0
    )
    best = 0.0
    for _ in range(repeats):
        started = time.perf_counter()
        count = sum(len(batch[0]) for batch in loader)
        best = max(best, count / (time.perf_counter() - started))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000, help="images in the test folder")
    parser.add_argument("--size", type=int, default=224, help="side of the cached images")
    parser.add_argument("--source-size", type=int, default=1024, help="side of the PNGs (0: the samples' 512)")
    parser.add_argument("--workers", type=int, default=2, help="processes building the cache")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    torch.set_num_threads(1)

    scratch = Path(tempfile.mkdtemp(prefix="loader-speed-"))
    try:
        names = make_folder(scratch / "data", args.images, args.source_size)
        paths = find_images(scratch / "data")
        rows: list[dict[str, object]] = []

        def add(what: str, processes: int, rate: float) -> None:
            rows.append({"what": what, "processes": processes, "images_per_s": rate, "per_core": rate / processes})

        cache = ImageCache(scratch / "cache", scratch / "data", names, args.size)
        report = cache.build({name: paths[name] for name in names}, workers=args.workers)
        add(f"cache build ({report.seconds:.1f} s for {args.images})", max(args.workers, 1), args.images / report.seconds)

        ordered = [paths[name] for name in names]
        labels = torch.zeros(len(names), 14)
        cached = ImageLabelDataset(cache.images(), labels, names)
        decoding_repeats = 1  # one pass of decoding is already long
        for workers in (0, 2):
            rate = loader_rate(DecodingDataset(ordered, args.size), workers, args.batch_size, decoding_repeats)
            add(f"decode PNG on the fly, {workers} workers", max(workers, 1), rate)
        for workers in (0, 2):
            rate = loader_rate(cached, workers, args.batch_size, args.repeats)
            add(f"read the cache, {workers} workers", max(workers, 1), rate)

        augmentation = BatchAugmentation()
        batch = torch.from_numpy(np.array(cache.images()[: args.batch_size]))
        augmentation(batch)
        started = time.perf_counter()
        for _ in range(args.repeats * 4):
            augmentation(batch)
        rate = args.repeats * 4 * len(batch) / (time.perf_counter() - started)
        add("default augmentation, batched on the CPU, 1 thread", 1, rate)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    table = Table(title=f"cxr14 input pipeline at {args.size} px ({args.images} images of {args.source_size or 512} px)")
    for column in ("what", "processes", "images/s", "images/s per core"):
        table.add_column(column, justify="left" if column == "what" else "right")
    for row in rows:
        table.add_row(str(row["what"]), str(row["processes"]), f"{row['images_per_s']:.0f}", f"{row['per_core']:.0f}")
    Console().print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
