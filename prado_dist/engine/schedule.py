"""The report's learning-rate schedule (report section 1.5)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch


def exponential_decay_after(
    optimizer: torch.optim.Optimizer, decay_start: int, decay: float
) -> torch.optim.lr_scheduler.LambdaLR:
    """Keep the learning rate for `decay_start` epochs, then multiply it by exp(-decay) every epoch.

    Report: decay_start 10, decay 0.05, i.e. lr_t = lr_{t-1} * exp(-0.05) from epoch 10 on. Step the
    scheduler once per epoch, after the epoch.
    """
    return torch.optim.lr_scheduler.LambdaLR(optimizer, decay_factor(decay_start, decay))


def decay_factor(decay_start: int, decay: float) -> Callable[[int], float]:
    """The schedule's multiplier of the initial learning rate after `epoch` scheduler steps."""
    if decay_start < 0 or decay < 0:
        raise ValueError(f"decay_start and decay must be >= 0, got {decay_start} and {decay}")

    def factor(epoch: int) -> float:
        return math.exp(-decay * max(0, epoch - decay_start + 1))

    return factor


def set_learning_rate(scheduler: torch.optim.lr_scheduler.LambdaLR, lr: float, decay_start: int, decay: float) -> None:
    """Go on from the schedule's position with another initial `lr` and decay: the epoch's learning
    rate becomes `lr` times the (new) decay factor at that position, and the schedule continues from it.

    A cloned checkpoint's optimiser and scheduler state carry the donor's values; a population-based
    search's perturbed settings, or a replayed schedule's, replace them here.
    """
    factor = decay_factor(decay_start, decay)
    groups = scheduler.optimizer.param_groups
    scheduler.lr_lambdas = [factor] * len(groups)
    scheduler.base_lrs = [lr] * len(groups)
    for group in groups:
        group["initial_lr"] = lr
        group["lr"] = lr * factor(scheduler.last_epoch)
