"""Seeded, stratified train/val/test split.

The report split 80/20 at random with seed 42 and used the 20% both for validation and as test
set (report-facts.md, "Split"). A hyperparameter search must not select on its test set, so here
the non-test rest is split again into train and val; stratification keeps the rare painters
(ribera: 222 of 2,364 images) represented in every split.
"""

from __future__ import annotations

import math

import numpy as np

SPLITS: tuple[str, ...] = ("train", "val", "test")


def stratified_split(
    labels: np.ndarray, test_fraction: float = 0.2, val_fraction: float = 0.2, seed: int = 42
) -> dict[str, np.ndarray]:
    """Sorted index arrays `train`, `val`, `test` that partition `range(len(labels))`.

    Per class, `round(n_c * test_fraction)` images go to test and `round(rest * val_fraction)` of
    the rest to val, each at least one; which ones is drawn from `seed` alone.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be a 1-D integer array, got shape {labels.shape} dtype {labels.dtype}")
    if labels.size == 0:
        raise ValueError("cannot split an empty label array")
    for name, fraction in (("test_fraction", test_fraction), ("val_fraction", val_fraction)):
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"{name} must be strictly between 0 and 1, got {fraction}")

    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {name: [] for name in SPLITS}
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        if len(members) < len(SPLITS):
            raise ValueError(
                f"class {label} has {len(members)} image(s); at least {len(SPLITS)} are needed to put "
                f"one in each of {list(SPLITS)}"
            )
        members = rng.permutation(members)
        n_test = _share(len(members), test_fraction, keep=2)
        n_val = _share(len(members) - n_test, val_fraction, keep=1)
        parts["test"].append(members[:n_test])
        parts["val"].append(members[n_test : n_test + n_val])
        parts["train"].append(members[n_test + n_val :])
    return {name: np.sort(np.concatenate(chunks)).astype(np.int64) for name, chunks in parts.items()}


def _share(count: int, fraction: float, keep: int) -> int:
    """`count * fraction` rounded half up, but at least 1 and leaving at least `keep` behind."""
    return min(max(math.floor(count * fraction + 0.5), 1), count - keep)
