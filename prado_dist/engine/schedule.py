"""The report's learning-rate schedule (report section 1.5), changed settings mid-run, and a run's
settings over epochs as a replayable record (population-based search, issue 23)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from typing import Any

import torch

from prado_dist.config import SCHEDULABLE, ConfigError, TrainConfig


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


# --- a run's settings over epochs, as a file -------------------------------------------------------
SCHEDULE_FORMAT = 1
# Where a replay runs is the replaying machine's business, not the schedule's.
NOT_RECORDED = {"data_dir", "cache_dir", "device", "schedule"}


def schedule_record(config: TrainConfig, settings_history: list[dict[str, Any]], **about: Any) -> dict[str, Any]:
    """A JSON-able record of what a run trained with, epoch by epoch (`TrainingRun.settings_history`):
    its fixed settings and, for each epoch, the SCHEDULABLE values it trained that epoch with."""
    fixed = config.model_dump(mode="json", exclude=NOT_RECORDED) | {"epochs": len(settings_history)}
    return {"format": SCHEDULE_FORMAT, **about, "config": fixed, "epochs": [dict(row) for row in settings_history]}


def config_from_schedule(record: dict[str, Any], overrides: dict[str, Any] | None = None) -> TrainConfig:
    """The config that replays `record`: its fixed settings, epoch 0's values, and a change wherever a
    later epoch's values differ from the epoch before (`overrides`: e.g. the replaying machine's data)."""
    if record.get("format") != SCHEDULE_FORMAT or not record.get("epochs"):
        raise ConfigError(
            "not a prado_dist schedule (expected the summary/schedule.json a population-based search writes)"
        )
    rows = sorted(record["epochs"], key=lambda row: int(row["epoch"]))
    if [int(row["epoch"]) for row in rows] != list(range(len(rows))):
        raise ConfigError(
            f"the schedule's epochs must be 0, 1, 2, ... without gaps; got {[row['epoch'] for row in rows]}"
        )
    first = {key: rows[0][key] for key in SCHEDULABLE if key in rows[0]}
    changes = {}
    for before, row in itertools.pairwise(rows):
        changed = {key: row[key] for key in SCHEDULABLE if key in row and row[key] != before.get(key)}
        if changed:
            changes[int(row["epoch"])] = changed
    settings = {**record["config"], **first, "epochs": len(rows), "schedule": changes, **(overrides or {})}
    return TrainConfig().with_overrides(settings)
