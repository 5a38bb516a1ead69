"""What the leaderboard measures of each searched model besides its scores: size, cost of a forward
pass, training throughput on this machine, and how sure its test scores are."""

from __future__ import annotations

import statistics
from typing import Any

import numpy as np
import torch
from scipy import stats
from torch.utils.flop_counter import FlopCounterMode

from prado_dist.data import PreparedData
from prado_dist.engine.export import classifier_from_checkpoint

BOOTSTRAP_RESAMPLES = 2000


def model_size(state: dict[str, Any], data: PreparedData) -> tuple[int, float]:
    """(trainable parameters, forward GFLOPs per image at the trained size) of a checkpoint's network.

    FLOPs as torch's FlopCounterMode counts them (a multiply-add is 2), over the whole network: a frozen
    backbone costs its forward pass even when training ran on cached features."""
    classifier = classifier_from_checkpoint(state, data)
    network = classifier.model
    trainable = sum(parameter.numel() for parameter in network.parameters() if parameter.requires_grad)
    image = torch.zeros(1, 3, classifier.image_size, classifier.image_size)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        network(image)
    return trainable, counter.get_total_flops() / 1e9


def training_throughput(trials: dict[str, dict[str, Any]]) -> float | None:
    """The median over all trained epochs of the search of training images per second (this machine)."""
    rates = [rate for trial in trials.values() for rate in trial.get("images_per_second", [])]
    return statistics.median(rates) if rates else None


def bootstrap_intervals(confusion: torch.Tensor, seed: int = 0) -> dict[str, tuple[float, float]]:
    """95% percentile-bootstrap intervals of accuracy and balanced accuracy over the test images.

    The confusion matrix holds every (true, predicted) pair, so the images are resampled from it."""
    counts = confusion.long().numpy()
    pairs = np.argwhere(counts > 0)
    repeats = counts[counts > 0]
    true, predicted = np.repeat(pairs[:, 0], repeats), np.repeat(pairs[:, 1], repeats)
    num_classes = counts.shape[0]
    intervals = {}
    for name, statistic in [("accuracy", _accuracy), ("balanced_accuracy", _balanced_accuracy(num_classes))]:
        result = stats.bootstrap(
            (true, predicted),
            statistic,
            paired=True,
            vectorized=True,
            n_resamples=BOOTSTRAP_RESAMPLES,
            confidence_level=0.95,
            method="percentile",
            rng=np.random.default_rng(seed),
        )
        intervals[name] = (float(result.confidence_interval.low), float(result.confidence_interval.high))
    return intervals


def _accuracy(true: np.ndarray, predicted: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean(true == predicted, axis=axis)


def _balanced_accuracy(num_classes: int):
    def statistic(true: np.ndarray, predicted: np.ndarray, axis: int = -1) -> np.ndarray:
        # Mean recall over the classes present in the resample (sklearn's definition, as the engine's).
        recalls = []
        for label in range(num_classes):
            support = np.sum(true == label, axis=axis)
            hits = np.sum((true == label) & (predicted == label), axis=axis)
            recalls.append(np.where(support > 0, hits / np.maximum(support, 1), np.nan))
        return np.nanmean(np.stack(recalls), axis=0)

    return statistic
