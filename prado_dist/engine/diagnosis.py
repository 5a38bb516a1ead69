"""Recognising a validation that predicts one painter for every image, and naming its likely cause.

A model whose BatchNorm statistics lag its weights, or whose learning rate is too high, collapses
to one class; the accuracy alone does not say so, and the remedy depends on the run's settings.
"""

from __future__ import annotations

from prado_dist.config import TrainConfig
from prado_dist.engine.metrics import Counts


def single_predicted_class(counts: Counts) -> int | None:
    """The class predicted for every image, when images of two or more classes were all given one."""
    predicted = counts.confusion.sum(dim=0)
    present = int((counts.confusion.sum(dim=1) > 0).sum())
    if present < 2 or int((predicted > 0).sum()) != 1:
        return None
    return int(predicted.argmax())


def one_class_cause(config: TrainConfig) -> str:
    """The likely cause of a one-class validation, and what to change, for a run with `config`."""
    if config.bn_recalibration_images is None:
        momentum = config.bn_momentum or "the models' Keras 0.01"
        return (
            f"Likely cause: BatchNorm running statistics that still lag the weights (bn_momentum {momentum}); "
            "recompute them before validation with bn_recalibration_images=256 (--set "
            "bn_recalibration_images=256), or set bn_momentum=0.1"
        )
    return (
        "The BatchNorm statistics were recomputed, so the weights themselves predict one class: likely "
        f"a learning rate too high for this data (lr={config.lr:g}) or too few epochs; try a lower "
        "lr or more epochs"
    )
