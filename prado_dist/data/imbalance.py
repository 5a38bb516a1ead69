"""The report's two remedies for class imbalance (goya 1,080 images, ribera 222).

- `class_weights`: loss weight `w_c = n / (|C| * n_c)` per class (Keras/scikit-learn "balanced").
- `output_bias`: initial bias of the output layer with `softmax(b) = class frequencies`, so an
  untrained model already predicts the prior and the first epochs are not spent learning it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def class_weights(counts: Sequence[int] | np.ndarray) -> np.ndarray:
    """`n / (|C| * n_c)` per class; report counts (1080, 446, 326, 290, 222) give about
    (0.438, 1.060, 1.450, 1.630, 2.130)."""
    counts = _check_counts(counts)
    return counts.sum() / (len(counts) * counts)


def output_bias(counts: Sequence[int] | np.ndarray) -> np.ndarray:
    """`log f_c` centred to mean 0: any `log f + const` solves `softmax(b) = f`; centring keeps it small."""
    log_frequency = np.log(_check_counts(counts) / np.sum(counts))
    return log_frequency - log_frequency.mean()


def _check_counts(counts: Sequence[int] | np.ndarray) -> np.ndarray:
    array = np.asarray(counts, dtype=np.float64)
    if array.ndim != 1 or array.size == 0 or np.any(array <= 0):
        raise ValueError(f"class counts must be a non-empty 1-D sequence of positive numbers, got {counts!r}")
    return array
