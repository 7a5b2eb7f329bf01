"""A preprocessing cache: images decoded and resized once, then read from a memory-mapped array.

Decoding a 1024 x 1024 PNG and resizing it costs milliseconds; reading the resized uint8
image from a memory-mapped file costs microseconds. A cache is one directory:

- ``images.npy``: uint8 ``[N, 1, S, S]``, one slot per image name, opened memory-mapped;
- ``names.txt``: the image name of each slot, one per line;
- ``stamps.npy``: int64 ``[N, 2]``, the size in bytes and the modification time in
  nanoseconds of the file each slot was decoded from;
- ``status.npy``: uint8 ``[N]``, :data:`PENDING`, :data:`STORED` or :data:`FAILED` per slot;
- ``meta.json``: source directory, image size and format version.

The directory's name holds a hash of the source directory, the size and the names, so
another size (or another data set) builds another cache. :meth:`ImageCache.build` decodes
only the slots asked for that are not yet stored, or whose file's size or modification time
differs from its stamp (a replaced image is decoded again, its slot alone), in parallel
worker processes, with a progress bar. A slot's status becomes :data:`STORED` only after its
pixels and stamp are flushed to disk, and a stored slot is marked :data:`PENDING` on disk
before its pixels are overwritten, so an interrupted build (Ctrl-C, SIGKILL, power loss)
never leaves a half-written image marked as stored; running it again resumes where it
stopped. Images that cannot be read are marked :data:`FAILED` with the reason, reported by
name, and retried on the next build.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import multiprocessing
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

FORMAT_VERSION = 2
PENDING, STORED, FAILED = 0, 1, 2
CHUNK_SIZE = 32
"""Images one worker decodes before it reports back (and their statuses are flushed)."""
SIXTEEN_BIT_GRAY_MODES = ("I;16", "I;16B", "I;16L", "I")
"""PIL modes of 16-bit grayscale images (``I`` is how older Pillow versions open a 16-bit PNG)."""


def decode_image(path: str | Path, size: int) -> np.ndarray:
    """Decode an image file into a uint8 ``[size, size]`` grayscale array.

    16-bit grayscale images are scaled to 8 bits (divided by 257 = 65535 / 255, rounded), so
    a picture saved with 8 or 16 bits gives the same pixels; colour or alpha images are
    converted to 8-bit grayscale (``L``). The image is then resized to ``size x size`` with
    PIL's antialiased bilinear filter. A truncated or corrupt file raises ``OSError`` (PIL
    refuses truncated images by default).
    """
    with Image.open(path) as image:
        image.load()
        if image.mode in SIXTEEN_BIT_GRAY_MODES:
            eight_bit = np.rint(np.asarray(image, dtype=np.float64) / 257.0)
            gray = Image.fromarray(np.clip(eight_bit, 0, 255).astype(np.uint8))
        else:
            gray = image if image.mode == "L" else image.convert("L")
        return np.asarray(gray.resize((size, size), Image.Resampling.BILINEAR), dtype=np.uint8)


def file_stamp(path: str | Path) -> tuple[int, int]:
    """``(size in bytes, modification time in ns)`` of a file: what a stored slot is checked against."""
    info = os.stat(path)
    return info.st_size, info.st_mtime_ns


def _stamp_or_reason(path: Path | None) -> tuple[int, int] | str:
    """:func:`file_stamp` of ``path``, or why the file cannot be read (None: it was not found)."""
    if path is None:
        return "file not found"
    try:
        return file_stamp(path)
    except OSError as error:  # removed or unreadable since it was listed
        return f"{type(error).__name__}: {error}"


def _decode_chunk(images_file: str, size: int, items: list[tuple[int, str]]) -> list[tuple[int, str | None]]:
    """Decode ``(slot, path)`` items into the cache file; flush; return each slot's error or None."""
    images = np.load(images_file, mmap_mode="r+")
    outcome: list[tuple[int, str | None]] = []
    for slot, path in items:
        try:
            images[slot, 0] = decode_image(path, size)
            outcome.append((slot, None))
        except (OSError, ValueError, SyntaxError) as error:  # PIL's errors for unreadable files
            outcome.append((slot, f"{type(error).__name__}: {error}"))
    images.flush()
    return outcome


@dataclass
class BuildReport:
    """What one :meth:`ImageCache.build` did.

    Attributes:
        decoded: images decoded and stored now (refreshed ones included).
        reused: images found already stored, their files unchanged.
        refreshed: stored images decoded again because their file's size or modification time changed.
        failed: image name -> why it could not be read (missing file, truncated PNG, ...).
        seconds: wall time of the build.
    """

    decoded: int = 0
    reused: int = 0
    refreshed: int = 0
    failed: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0


def cache_key(source: Path, size: int, names: Sequence[str]) -> str:
    """Hex digest identifying a cache: the resolved source directory, the size and the slot names."""
    digest = hashlib.sha256()
    digest.update(json.dumps({"source": str(source.resolve()), "size": size, "version": FORMAT_VERSION}).encode())
    digest.update("\n".join(names).encode("utf-8"))
    return digest.hexdigest()[:16]


class ImageCache:
    """The cache of ``names`` from ``source`` at ``size`` pixels, under ``root`` (created if absent).

    Attributes:
        directory: the cache directory.
        names: slot names; ``slot_of[name]`` is a name's slot.
        size: image side in pixels.
    """

    def __init__(self, root: str | Path, source: str | Path, names: Sequence[str], size: int) -> None:
        self.source = Path(source)
        self.names = list(names)
        self.size = int(size)
        self.slot_of = {name: slot for slot, name in enumerate(self.names)}
        if len(self.slot_of) != len(self.names):
            raise ValueError("image names must be unique")
        key = cache_key(self.source, self.size, self.names)
        self.directory = Path(root) / f"{self.source.resolve().name}-{self.size}px-{key}"
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise OSError(
                f"cannot create the image cache {self.directory} ({error}); choose a writable place with "
                "--task-opt cache_dir=DIR or BENCH_CACHE_DIR"
            ) from None
        with self._locked():
            self._create_files()

    @property
    def _images_file(self) -> Path:
        return self.directory / "images.npy"

    @property
    def _stamps_file(self) -> Path:
        return self.directory / "stamps.npy"

    @property
    def _status_file(self) -> Path:
        return self.directory / "status.npy"

    def _locked(self) -> _FileLock:
        return _FileLock(self.directory / "lock")

    def _create_files(self) -> None:
        """Create the arrays and metadata once (each through a temporary file and an atomic rename)."""
        if self._status_file.exists():
            return
        count = len(self.names)
        for path, dtype, shape in (
            (self._images_file, np.uint8, (count, 1, self.size, self.size)),
            (self._stamps_file, np.int64, (count, 2)),
            (self._status_file, np.uint8, (count,)),  # last: its presence says the cache is complete
        ):
            partial = path.with_suffix(".partial.npy")
            array = np.lib.format.open_memmap(partial, mode="w+", dtype=dtype, shape=shape)
            del array  # a new memmap file is all zeros (sparse on disk): every slot PENDING
            os.replace(partial, path)
        (self.directory / "names.txt").write_text("\n".join(self.names) + "\n", encoding="utf-8")
        meta = {"source": str(self.source.resolve()), "size": self.size, "count": count, "version": FORMAT_VERSION}
        (self.directory / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")

    def images(self) -> np.ndarray:
        """The read-only memory-mapped uint8 array ``[N, 1, S, S]`` (only STORED slots hold images)."""
        return np.load(self._images_file, mmap_mode="r")

    def status(self) -> np.ndarray:
        """A copy of the per-slot status array."""
        return np.array(np.load(self._status_file, mmap_mode="r"))

    def build(self, paths: Mapping[str, Path | None], workers: int = 0, progress: bool = True) -> BuildReport:
        """Store every image of ``paths`` (name -> file, or None when the file is missing).

        Stored slots whose file has the size and modification time of their stamp are kept;
        the others are decoded (again). ``workers`` > 0 decodes in that many processes, 0 in
        this one. Returns a :class:`BuildReport`; unreadable images are in ``failed``.
        """
        started = time.perf_counter()
        report = BuildReport()
        unknown = [name for name in paths if name not in self.slot_of]
        if unknown:
            raise KeyError(f"{len(unknown)} image(s) have no slot in this cache, e.g. {unknown[0]!r}")
        with self._locked():
            status = np.load(self._status_file, mmap_mode="r+")
            stamps = np.load(self._stamps_file, mmap_mode="r+")
            todo: list[tuple[int, str]] = []
            for name, path in paths.items():
                slot = self.slot_of[name]
                stamp = _stamp_or_reason(path)
                if isinstance(stamp, str):
                    status[slot] = FAILED
                    report.failed[name] = stamp
                elif status[slot] == STORED and tuple(stamps[slot]) == stamp:
                    report.reused += 1
                else:
                    if status[slot] == STORED:
                        status[slot] = PENDING  # flushed below, before its pixels are overwritten
                        report.refreshed += 1
                    stamps[slot] = stamp
                    todo.append((slot, str(path)))
            stamps.flush()  # a slot becomes STORED after its decode, with its stamp on disk
            status.flush()
            bar = tqdm(total=len(todo), desc=f"caching {self.size}px images", unit="img", disable=None if progress else True)
            try:
                for outcome in self._decode(todo, workers):
                    for slot, error in outcome:
                        if error is None:
                            status[slot] = STORED
                            report.decoded += 1
                        else:
                            status[slot] = FAILED
                            report.failed[self.names[slot]] = error
                    status.flush()
                    bar.update(len(outcome))
            finally:
                bar.close()
                status.flush()
        report.seconds = time.perf_counter() - started
        return report

    def _decode(self, todo: list[tuple[int, str]], workers: int) -> Iterator[list[tuple[int, str | None]]]:
        chunks = [todo[start : start + CHUNK_SIZE] for start in range(0, len(todo), CHUNK_SIZE)]
        if workers <= 0 or len(chunks) <= 1:
            for chunk in chunks:
                yield _decode_chunk(str(self._images_file), self.size, chunk)
            return
        # fork: workers need only NumPy and PIL and start at once; nothing is re-imported.
        context = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            futures = [pool.submit(_decode_chunk, str(self._images_file), self.size, chunk) for chunk in chunks]
            try:
                for future in futures:
                    yield future.result()
            except BaseException:
                for future in futures:
                    future.cancel()
                raise


class _FileLock:
    """An exclusive ``flock`` on a file, so that concurrent runs build a cache one at a time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._handle: int | None = None

    def __enter__(self) -> _FileLock:
        self._handle = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
        fcntl.flock(self._handle, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc_info: object) -> None:
        assert self._handle is not None
        fcntl.flock(self._handle, fcntl.LOCK_UN)
        os.close(self._handle)
        self._handle = None
