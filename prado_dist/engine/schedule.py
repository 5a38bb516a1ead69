"""The report's learning-rate schedule (report section 1.5)."""

from __future__ import annotations

import math

import torch


def exponential_decay_after(
    optimizer: torch.optim.Optimizer, decay_start: int, decay: float
) -> torch.optim.lr_scheduler.LambdaLR:
    """Keep the learning rate for `decay_start` epochs, then multiply it by exp(-decay) every epoch.

    Report: decay_start 10, decay 0.05, i.e. lr_t = lr_{t-1} * exp(-0.05) from epoch 10 on. Step the
    scheduler once per epoch, after the epoch.
    """
    if decay_start < 0 or decay < 0:
        raise ValueError(f"decay_start and decay must be >= 0, got {decay_start} and {decay}")

    def factor(epoch: int) -> float:
        return math.exp(-decay * max(0, epoch - decay_start + 1))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
