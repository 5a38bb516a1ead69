"""From a dataset folder to split, memory-mapped training data.

`prepare_data` = find the files (sources.py) -> decode once (cache.py) -> stratified split
(split.py). `PaintingsDataset` serves one split straight from the memory map. Both pickle the
memory map as its file path, so sending them to Ray workers costs bytes, not the image array;
each worker reopens the file, which must therefore be on a disk the worker can see.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from prado_dist.data.cache import build_cache
from prado_dist.data.sources import DataError, Sample, find_samples
from prado_dist.data.split import SPLITS, stratified_split


@dataclass
class PreparedData:
    """Decoded images with labels and split indices; `fingerprint` identifies the data of a run."""

    images: np.ndarray  # np.memmap, uint8 (N, H, W, 3)
    labels: np.ndarray  # int64 (N,)
    classes: list[str]
    splits: dict[str, np.ndarray]  # "train" / "val" / "test" -> sorted indices into images
    fingerprint: str  # the cache key: file contents, labels, classes, image size
    rejected: list[tuple[Path, str]]  # files left out, with the reason
    paths: list[Path] = field(default_factory=list)  # source file of each image (error analysis)
    # Source files with identical contents, in groups of 2+ (logged when the cache is built).
    duplicates: list[list[Sample]] = field(default_factory=list)

    @property
    def image_size(self) -> int:
        return int(self.images.shape[1])

    def __getstate__(self) -> dict[str, Any]:
        # Pickling a memmap copies every pixel; Ray would ship the whole cache to each worker.
        # The file is on the same disk for every local worker, so send its path instead.
        state = self.__dict__.copy()
        path = _memmap_path(self.images)
        if path is not None:
            state["images"] = path
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        if isinstance(state["images"], Path):
            state["images"] = np.load(state["images"], mmap_mode="r")
        self.__dict__.update(state)


def prepare_data(
    data_dir: Path | None,
    image_size: int = 224,
    *,
    cache_dir: Path | None = None,
    test_fraction: float = 0.2,
    val_fraction: float = 0.2,
    split_seed: int = 42,
) -> PreparedData:
    """Find, decode (once, cached under `cache_dir`) and split the images of `data_dir`.

    `cache_dir` defaults to `$PRADO_DIST_CACHE` or `~/.cache/prado_dist`. Raises `DataError` when
    the folder is not a usable dataset or a class has too few decodable images to split.
    `data_dir` None means the generated demo set, built once per machine (so every node of a Ray
    cluster finds it, not only the one that started the run).
    """
    if data_dir is None:
        from prado_dist.data.demo import demo_data_dir  # lazy: demo imports this module's package

        data_dir = demo_data_dir()
    sample_set = find_samples(Path(data_dir))
    # Checked on the files before any decode, then on what decoded.
    require_splittable(np.asarray([sample.label for sample in sample_set.samples]), sample_set.classes, [])
    cache = build_cache(sample_set, image_size, cache_dir)
    require_splittable(cache.labels, cache.classes, cache.rejected)
    splits = stratified_split(cache.labels, test_fraction, val_fraction, split_seed)
    return PreparedData(
        images=cache.images,
        labels=cache.labels,
        classes=cache.classes,
        splits=splits,
        fingerprint=cache.key,
        # Files the finder skipped are re-listed every time; decode failures come from the cache.
        rejected=[*sample_set.rejected, *cache.rejected],
        paths=cache.paths,
        duplicates=cache.duplicates,
    )


def require_splittable(labels: np.ndarray, classes: list[str], rejected: list[tuple[Path, str]]) -> None:
    """`DataError` naming each class with fewer decodable images than splits (one per split is needed)."""
    counts = np.bincount(labels, minlength=len(classes))
    small = {name: int(count) for name, count in zip(classes, counts, strict=True) if count < len(SPLITS)}
    if small:
        left_out = f" ({len(rejected)} file(s) could not be decoded; the warnings above name them)" if rejected else ""
        raise DataError(
            f"class(es) {small} have fewer than {len(SPLITS)} usable images, one for each of {list(SPLITS)}"
            f"{left_out}; add images or remove the class"
        )


def split_counts(prepared: PreparedData) -> dict[str, list[int]]:
    """Images per class (in class order) in each split."""
    return {
        name: np.bincount(prepared.labels[indices], minlength=len(prepared.classes)).tolist()
        for name, indices in prepared.splits.items()
    }


class PaintingsDataset(Dataset):
    """One split as `(uint8 tensor 3xHxW, int label)` pairs, read from the memory-mapped cache.

    Augmentation and standardisation happen later, on whole batches on the training device
    (augment.py), so a worker process only copies bytes.
    """

    def __init__(self, prepared: PreparedData, split: str) -> None:
        if split not in prepared.splits:
            raise ValueError(f"unknown split {split!r}; known splits: {sorted(prepared.splits)}")
        self.split = split
        self.classes = list(prepared.classes)
        self.indices = np.asarray(prepared.splits[split], dtype=np.int64)
        self.labels = np.asarray(prepared.labels[self.indices], dtype=np.int64)
        # A memmap is reopened from its file in each process; a plain in-memory array (tests,
        # hand-built PreparedData) has no file and travels as it is.
        self._images_path = _memmap_path(prepared.images)
        self._images: np.ndarray | None = prepared.images

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item: int) -> tuple[torch.Tensor, int]:
        image = self._array()[self.indices[item]]
        # The copy makes the tensor own writable, contiguous memory (the memmap is read-only).
        return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))), int(self.labels[item])

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        if self._images_path is not None:
            state["_images"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def _array(self) -> np.ndarray:
        if self._images is None:
            assert self._images_path is not None  # guaranteed by __getstate__
            self._images = np.load(self._images_path, mmap_mode="r")
        return self._images


def _memmap_path(images: np.ndarray) -> Path | None:
    """The .npy file behind a memmap of that whole file; None for anything else (in-memory arrays)."""
    if not isinstance(images, np.memmap) or images.filename is None or not images.flags.c_contiguous:
        return None
    # A slice of the memmap keeps the file name but not the file's shape: reopening would be wrong.
    whole = np.load(images.filename, mmap_mode="r")
    return Path(images.filename) if whole.shape == images.shape and whole.dtype == images.dtype else None
