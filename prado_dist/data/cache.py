"""Decode once: every image decoded, resized and stored in a memory-mapped uint8 array on disk.

Training then reads pixels straight from the page cache instead of decoding JPEGs every epoch in
every Ray worker (bench/data_pipeline.py measures the difference). One cache folder per content:

    cache_dir/<key>/images.npy   uint8 (N, H, W, 3), opened with np.load(mmap_mode="r")
    cache_dir/<key>/meta.json    labels, classes, source paths, rejected files, image size
    cache_dir/<key>.lock         held while a process builds <key>; others wait, then reuse it

`key` hashes the file contents (not their paths, so a moved dataset keeps its cache), labels,
classes, image size and `CACHE_FORMAT_VERSION`. A folder is built under a temporary name and
renamed into place, so a reader never sees a half-written cache. How one file becomes pixels
(`decode_image`) is decode.py's job.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np
from filelock import FileLock, Timeout
from tqdm import tqdm

from prado_dist.data.decode import ImageRejected, decode_image
from prado_dist.data.sources import DataError, Sample, SampleSet

logger = logging.getLogger(__name__)
T = TypeVar("T")

# Bump whenever decoding (decode.py) or the on-disk format changes, so old caches are not reused.
CACHE_FORMAT_VERSION = 2  # 2: JPEGs decoded at reduced size (draft), 16-bit images resized before 8-bit
CACHE_ENV = "PRADO_DIST_CACHE"
IMAGES_FILE = "images.npy"
META_FILE = "meta.json"

_HASH_CHUNK = 1 << 20
# Pillow releases the GIL while decoding and resizing, so threads decode in parallel without the
# start-up cost of processes; more than 8 gains little on the Prado JPEGs.
_MAX_WORKERS = 8
# Images are decoded in chunks so out-of-order results never pile up in memory.
_DECODE_CHUNK = 256


@dataclass
class DecodedCache:
    """An opened cache folder."""

    key: str
    directory: Path
    images: np.ndarray  # np.memmap, uint8 (N, H, W, 3), read-only
    labels: np.ndarray  # int64 (N,)
    classes: list[str]
    paths: list[Path]  # source file of each image
    rejected: list[tuple[Path, str]]  # files that could not be decoded
    # Groups of 2+ source files with identical contents (same picture twice: a split leak, or two labels).
    duplicates: list[list[Sample]] = field(default_factory=list)


def default_cache_dir() -> Path:
    """`$PRADO_DIST_CACHE`, else `~/.cache/prado_dist`."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "prado_dist").expanduser()


def file_digest(path: Path) -> str:
    """sha256 of a file's contents, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def file_digests(sample_set: SampleSet) -> list[str]:
    """sha256 of every sample's file, in sample order."""
    # hashlib releases the GIL on large buffers, so threads hash files in parallel.
    with ThreadPoolExecutor(decode_workers()) as pool:
        return list(pool.map(file_digest, (sample.path for sample in sample_set.samples)))


def duplicate_groups(sample_set: SampleSet, digests: Sequence[str]) -> list[list[Sample]]:
    """Samples whose files have identical contents, in groups of two or more (sample order)."""
    groups: dict[str, list[Sample]] = {}
    for digest, sample in zip(digests, sample_set.samples, strict=True):
        groups.setdefault(digest, []).append(sample)
    return [group for group in groups.values() if len(group) > 1]


def cache_key(sample_set: SampleSet, image_size: int, digests: Sequence[str] | None = None) -> str:
    """The content fingerprint naming a cache folder (also used to tag runs)."""
    if digests is None:
        digests = file_digests(sample_set)
    description = {
        "format": CACHE_FORMAT_VERSION,
        "image_size": image_size,
        "classes": list(sample_set.classes),
        "items": [[digest, sample.label] for digest, sample in zip(digests, sample_set.samples, strict=True)],
    }
    return hashlib.sha256(json.dumps(description, separators=(",", ":")).encode()).hexdigest()


def build_cache(sample_set: SampleSet, image_size: int, cache_dir: Path | None = None) -> DecodedCache:
    """Open the cache for these samples, decoding and writing it first if it does not exist yet.

    Safe for concurrent processes: one builds under a file lock, the others wait and reuse.
    """
    if image_size < 2:
        raise ValueError(f"image_size must be at least 2 pixels, got {image_size}")
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise _cache_write_error(cache_dir, err) from err
    digests = file_digests(sample_set)
    key = cache_key(sample_set, image_size, digests)
    duplicates = duplicate_groups(sample_set, digests)
    directory = cache_dir / key

    def build() -> None:
        if directory.exists():
            # Only reachable if a cache folder was damaged by hand; rebuild it.
            logger.warning("removing incomplete cache folder %s", directory)
            shutil.rmtree(directory)
        for leftover in cache_dir.glob(f"{_staging_prefix(key)}*"):  # from a killed build; we hold the lock
            shutil.rmtree(leftover, ignore_errors=True)
        try:
            _write_cache(sample_set, image_size, key, directory)
        except OSError as err:  # _write_cache has removed its staging folder; earlier caches are untouched
            raise _cache_write_error(cache_dir, err) from err
        if duplicates:  # reported once, when the cache is built; `inspect` lists them every time
            logger.warning(describe_duplicates(duplicates, sample_set.classes))

    cached, _ = build_once(
        cache_dir / f"{key}.lock", lambda: _open_if_complete(directory, key, image_size, sample_set), build, directory
    )
    cached.duplicates = duplicates
    return cached


def build_once(
    lock_path: Path, read: Callable[[], T | None], build: Callable[[], None], what: object
) -> tuple[T, bool]:
    """What `read()` finds complete; else `build()` it first, once across processes (Ray workers,
    trials): one builds under a file lock, the others wait and then read its result. `build` must
    publish atomically (write aside, rename into place), so that `read` never sees half of it.
    Returns (the result, whether this call built it)."""
    found = read()
    if found is not None:
        return found, False
    lock = FileLock(str(lock_path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        logger.info("waiting for another process to finish building %s", what)
        lock.acquire()
    try:
        found = read()
        if found is not None:
            return found, False
        build()
    finally:
        lock.release()
    found = read()
    if found is None:
        raise RuntimeError(f"{what} was written but cannot be read back")
    return found, True


def describe_duplicates(duplicates: Sequence[Sequence[Sample]], classes: Sequence[str]) -> str:
    """One line per group of identical files, e.g. `a.jpg (goya) = b.jpg (bayeu)  [two classes]`."""
    conflicting = sum(len({sample.label for sample in group}) > 1 for group in duplicates)
    lines = [
        f"{len(duplicates)} group(s) of files with identical contents ({conflicting} under different classes): "
        "the same picture can land in both training and test splits, or carry two labels. Remove the copies."
    ]
    for group in duplicates:
        labels = {sample.label for sample in group}
        note = "  [different classes]" if len(labels) > 1 else ""
        lines.append("  " + " = ".join(f"{sample.path} ({classes[sample.label]})" for sample in group) + note)
    return "\n".join(lines)


def _cache_write_error(cache_dir: Path, err: OSError) -> DataError:
    where = f" ({err.filename})" if err.filename else ""
    return DataError(
        f"cannot write the decoded-image cache in {cache_dir}: {err.strerror or err}{where}; free disk space "
        f"there or set ${CACHE_ENV} to a writable folder with room for the decoded images"
    )


def _write_cache(sample_set: SampleSet, image_size: int, key: str, directory: Path) -> None:
    samples = sample_set.samples
    staging = Path(tempfile.mkdtemp(prefix=_staging_prefix(key), dir=directory.parent))
    try:
        images_path = staging / IMAGES_FILE
        shape = (len(samples), image_size, image_size, 3)
        images = np.lib.format.open_memmap(images_path, mode="w+", dtype=np.uint8, shape=shape)
        _preallocate(images_path)
        kept, rejected = _decode_into(images, samples, image_size)
        images.flush()
        del images
        if not kept:
            problems = [f"{samples[index].path}: {reason}" for index, reason in rejected[:3]]
            raise DataError(f"none of the {len(samples)} image files could be decoded; first problems: {problems}")
        if len(kept) < len(samples):
            _shrink_npy(images_path, len(kept))
        meta = {
            "format": CACHE_FORMAT_VERSION,
            "key": key,
            "image_size": image_size,
            "classes": list(sample_set.classes),
            "labels": [samples[i].label for i in kept],
            # Sample indices, not paths: the key ignores paths, so the same cache serves a dataset
            # that was moved or renamed, and paths are resolved against the current sample list.
            "kept": kept,
            "rejected": [[index, reason] for index, reason in rejected],
            "paths_when_built": [str(samples[i].path) for i in kept],
        }
        # meta.json written last inside the staging folder; the rename below publishes both at once.
        (staging / META_FILE).write_text(json.dumps(meta, ensure_ascii=False, indent=0), encoding="utf-8")
        os.replace(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("cached %d images (%d rejected) in %s", len(kept), len(rejected), directory)


def _staging_prefix(key: str) -> str:
    return f".{key}.building-"


def _decode_into(
    images: np.ndarray, samples: Sequence[Sample], image_size: int
) -> tuple[list[int], list[tuple[int, str]]]:
    """Decode `samples` into consecutive rows of `images`; kept and rejected sample indices."""
    kept: list[int] = []
    rejected: list[tuple[int, str]] = []

    def decode(index: int) -> np.ndarray | ImageRejected:
        try:
            return decode_image(samples[index].path, image_size)
        except ImageRejected as err:
            return err

    with (
        ThreadPoolExecutor(decode_workers()) as pool,
        tqdm(total=len(samples), desc="decoding images", unit="img", disable=None) as progress,
    ):
        for start in range(0, len(samples), _DECODE_CHUNK):
            indices = range(start, min(start + _DECODE_CHUNK, len(samples)))
            for index, result in zip(indices, pool.map(decode, indices), strict=True):
                if isinstance(result, ImageRejected):
                    logger.warning("skipping %s: %s", samples[index].path, result)
                    rejected.append((index, str(result)))
                else:
                    images[len(kept)] = result
                    kept.append(index)
                progress.update()
    return kept, rejected


def _shrink_npy(path: Path, rows: int) -> None:
    """Rewrite an .npy file keeping its first `rows` rows (rejected images leave unused rows)."""
    full = np.load(path, mmap_mode="r")
    shrunk_path = path.with_suffix(".shrunk.npy")
    shape = (rows, *full.shape[1:])
    shrunk = np.lib.format.open_memmap(shrunk_path, mode="w+", dtype=full.dtype, shape=shape)
    _preallocate(shrunk_path)
    for start in range(0, rows, _DECODE_CHUNK):
        shrunk[start : start + _DECODE_CHUNK] = full[start : min(start + _DECODE_CHUNK, rows)]
    shrunk.flush()
    del shrunk, full
    os.replace(shrunk_path, path)


def _preallocate(path: Path) -> None:
    """Reserve the disk blocks of a new (sparse) memmap file now.

    A write into a memory map on a full disk is a SIGBUS that kills the process without a message;
    reserving first turns it into an OSError (ENOSPC) here, which is reported and cleaned up.
    """
    if not hasattr(os, "posix_fallocate"):  # macOS, Windows
        return
    with open(path, "r+b") as handle:
        try:
            os.posix_fallocate(handle.fileno(), 0, os.fstat(handle.fileno()).st_size)
        except OSError as err:
            if err.errno not in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS):  # not supported here: go on
                raise


def _open_if_complete(directory: Path, key: str, image_size: int, sample_set: SampleSet) -> DecodedCache | None:
    """The cache in `directory`, or None when it is absent or does not match what was asked."""
    meta_path = directory / META_FILE
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        images = np.load(directory / IMAGES_FILE, mmap_mode="r")
        labels = np.asarray(meta["labels"], dtype=np.int64)
        expected_shape = (len(labels), image_size, image_size, 3)
        if meta["format"] != CACHE_FORMAT_VERSION or meta["key"] != key or images.shape != expected_shape:
            raise ValueError(f"images {images.shape} or metadata do not match {expected_shape}")
        samples = sample_set.samples
        return DecodedCache(
            key=key,
            directory=directory,
            images=images,
            labels=labels,
            classes=list(meta["classes"]),
            paths=[samples[index].path for index in meta["kept"]],
            rejected=[(samples[index].path, reason) for index, reason in meta["rejected"]],
        )
    except (OSError, ValueError, KeyError, IndexError, TypeError) as err:
        logger.warning("ignoring unusable cache %s: %s", directory, err)
        return None


def decode_workers() -> int:
    """Threads that hash and decode: one per core, at most `_MAX_WORKERS`."""
    return max(1, min(_MAX_WORKERS, os.cpu_count() or 1))
