"""Data layer: sources, the generated demo set, the decode-once cache, splits and augmentation.

Knows nothing of models, the engine or Ray. Public API (used by the layers above):

- `CLASSES`, `PRADO_AUTHORS`: the five Prado painters in class order and their `author` strings.
- `find_samples(root) -> SampleSet`: the labelled files of a Kaggle or folder-per-class folder.
- `prepare_data(data_dir, image_size, ...) -> PreparedData`: find images, decode them once into a
  memory-mapped uint8 cache (`fingerprint` = the cache key), split them train/val/test
  (stratified, seeded); `split_counts(prepared)` gives images per class in each split.
- `PaintingsDataset(prepared, split)`: a torch Dataset of (uint8 CHW tensor, label), read from
  the memory map; pickles as a path, so it is cheap to send to Ray workers.
- `augment_batch` (training: flip -> `per_image_standardize` -> `pca_colour_jitter`) and
  `per_image_standardize` alone (evaluation), plus `random_horizontal_flip`: batch operations on
  float tensors on the training device.
- `class_weights`, `output_bias`: the report's class-imbalance remedies.
- `demo_data_dir()`: the built-in generated dataset, built once into the cache folder.
- `DataError`: a dataset folder that cannot be used (a `ValueError`; the message says why).
"""

from __future__ import annotations

from typing import Any

from prado_dist.data.augment import (
    augment_batch,
    pca_colour_jitter,
    per_image_standardize,
    random_horizontal_flip,
)
from prado_dist.data.cache import CACHE_ENV, default_cache_dir
from prado_dist.data.dataset import PaintingsDataset, PreparedData, prepare_data, split_counts
from prado_dist.data.imbalance import class_weights, output_bias
from prado_dist.data.sources import CLASSES, PRADO_AUTHORS, DataError, Sample, SampleSet, find_samples
from prado_dist.data.split import SPLITS, stratified_split

__all__ = [
    "CACHE_ENV",
    "CLASSES",
    "PRADO_AUTHORS",
    "SPLITS",
    "DataError",
    "PaintingsDataset",
    "PreparedData",
    "Sample",
    "SampleSet",
    "augment_batch",
    "class_weights",
    "default_cache_dir",
    "demo_data_dir",
    "find_samples",
    "output_bias",
    "pca_colour_jitter",
    "per_image_standardize",
    "prepare_data",
    "random_horizontal_flip",
    "split_counts",
    "stratified_split",
]


def __getattr__(name: str) -> Any:
    # The demo generator is imported on first use only: it is not needed to train on real data,
    # and importing it lazily keeps `prado_dist.data` free of an import cycle with `demo`.
    if name == "demo_data_dir":
        from prado_dist.data.demo import demo_data_dir

        return demo_data_dir
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
