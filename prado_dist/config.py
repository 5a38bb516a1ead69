"""Typed, validated run configuration shared by every layer.

One flat, frozen model so that search spaces and `--set key=value` address parameters by their
plain names (`lr`, `pca_std`, ...). Defaults are the report's hand-picked configuration
(../shared/reference/report-facts.md); the search starts from exactly these values.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

# Settings a run can change between epochs without being rebuilt (TrainingRun.apply_settings): what
# population-based training perturbs and what a recorded schedule replays (issue 23).
SCHEDULABLE = ("lr", "decay", "decay_start", "weight_decay", "label_smoothing", "pca_std", "flip_prob")


class TrainConfig(BaseModel):
    """Everything one training run needs; saved with every run and checkpoint."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # --- data -------------------------------------------------------------------------------
    data_dir: Path | None = None  # None -> the generated demo dataset
    image_size: int = Field(224, ge=32, le=1024)  # report: 224x224, bilinear
    test_fraction: float = Field(0.2, gt=0.0, lt=1.0)  # report: 20% held out
    val_fraction: float = Field(0.2, gt=0.0, lt=1.0)  # of the rest; the search selects on it
    split_seed: int = 42  # report: seed 42
    cache_dir: Path | None = None  # decoded-image cache; None -> ~/.cache/prado_dist

    # --- model ------------------------------------------------------------------------------
    model: str = "resnet29"
    dropout: float = Field(0.0, ge=0.0, lt=1.0)  # before the classifier; report: none
    pretrained: Path | None = None  # transfer learning: local weight file (no downloads)
    unfreeze_stages: int = Field(0, ge=0)  # transfer learning: 0 = frozen backbone (report)
    # transfer learning: with a frozen backbone and no augmentation, run the backbone once and train
    # the head on stored features (prado_dist/engine/features.py); results are the same, only faster.
    feature_cache: bool = True
    # BatchNorm running-statistics momentum (PyTorch sense). None keeps the models' Keras value
    # 0.01, right for the report's 50 epochs x 59 steps; runs of a few dozen steps need ~0.1, or
    # evaluation uses statistics that are still mostly their initial values.
    bn_momentum: float | None = Field(None, gt=0.0, le=1.0)
    # Before every validation, recompute the training BatchNorm layers' statistics from this many
    # training images (PreciseBN, prado_dist/engine/batchnorm.py), so that evaluation, checkpoints and
    # exports use the statistics of the weights evaluated, whatever bn_momentum (issue 22; training
    # is unchanged). None: the running statistics as trained (report).
    bn_recalibration_images: int | None = Field(256, ge=2)

    # --- optimisation -----------------------------------------------------------------------
    epochs: int = Field(50, ge=1)  # report: 50 (transfer learning: 25)
    batch_size: int = Field(32, ge=1)  # global batch across all workers; report: 32
    lr: float = Field(1e-3, gt=0.0)  # report: Adam, lr 1e-3
    decay: float = Field(0.05, ge=0.0)  # lr *= exp(-decay) per epoch after decay_start
    decay_start: int = Field(10, ge=0)  # report: lr unchanged for epochs 0-9
    weight_decay: float = Field(0.0, ge=0.0)  # report: none
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)  # report: none
    # Validate, checkpoint and export an exponential moving average of the weights (timm's
    # ModelEmaV3, updated every step, warming up so that a short run is not tied to its initial
    # weights). None: the weights as trained (report). The search's metric is read after every epoch
    # on a small validation split: at lr >= 2.5e-3 the trained weights' score swings by 0.04-0.06
    # between epochs on paintings-dev (32 px, 16 epochs), with 0.97 the average's by 0.02-0.03 (bench/ema_probe.py).
    ema_decay: float | None = Field(None, gt=0.0, lt=1.0)
    class_weights: bool = True  # report: n / (|C| * n_c)
    output_bias: bool = True  # report: softmax(b) = class frequencies

    # --- augmentation -----------------------------------------------------------------------
    flip_prob: float = Field(0.5, ge=0.0, le=1.0)  # report: 0.5
    pca_std: float = Field(0.1, ge=0.0)  # report: std of alpha 0.1

    # --- settings that change over epochs ---------------------------------------------------------
    # {epoch: {setting: value}}: applied before that (0-based) epoch trains, each lasting until the
    # next change; the values above are those of epoch 0. A population-based search's winning
    # schedule, replayed by `train --schedule` (search_spaces/README.md).
    schedule: dict[int, dict[str, float]] = {}

    # --- execution --------------------------------------------------------------------------
    seed: int = 42
    device: str = "auto"  # "auto" -> cuda when available, else cpu

    @field_validator("schedule")
    @classmethod
    def _schedulable(cls, schedule: dict[int, dict[str, float]]) -> dict[int, dict[str, float]]:
        for epoch, changes in schedule.items():
            if epoch < 0:
                raise ValueError(f"schedule: epoch {epoch} is negative; epochs count from 0")
            unknown = sorted(set(changes) - set(SCHEDULABLE))
            if unknown:
                raise ValueError(f"schedule: epoch {epoch} changes {unknown}; only {list(SCHEDULABLE)} can change")
        return dict(sorted(schedule.items()))

    @model_validator(mode="after")
    def _schedule_values_valid(self) -> TrainConfig:
        for epoch in self.schedule:
            try:
                self.settings_at(epoch)
            except ValidationError as err:
                raise ValueError(f"schedule: epoch {epoch}: {format_validation_error(err)}") from None
        return self

    def settings_at(self, epoch: int) -> TrainConfig:
        """This config with its schedule's changes up to and including `epoch` applied (no schedule left)."""
        values = self.model_dump(exclude={"schedule"})
        for start, changes in self.schedule.items():
            if start <= epoch:
                values.update(changes)
        return type(self).model_validate(values)

    def with_overrides(self, overrides: dict[str, Any]) -> TrainConfig:
        """A copy with `overrides` applied and validated again (unknown keys are rejected)."""
        unknown = sorted(set(overrides) - set(type(self).model_fields))
        if unknown:
            raise ConfigError(f"unknown setting(s) {unknown}; known settings: {sorted(type(self).model_fields)}")
        try:
            return type(self).model_validate({**self.model_dump(), **overrides})
        except ValidationError as err:
            raise ConfigError(format_validation_error(err)) from None


class ConfigError(ValueError):
    """A configuration value a user supplied is invalid; the message says what is accepted."""


def format_validation_error(err: ValidationError, source: str = "") -> str:
    """One line per problem: `source: key: message (got value)`."""
    prefix = f"{source}: " if source else ""
    lines = []
    for problem in err.errors():
        # A validator's own ValueError already names the setting and the bad value; pydantic's
        # "Value error, " prefix and, for whole-object checks, the entire input only bury it.
        message = problem["msg"].removeprefix("Value error, ")
        if not problem["loc"]:
            lines.append(f"{prefix}{message}")
            continue
        key = ".".join(str(part) for part in problem["loc"])
        lines.append(f"{prefix}{key}: {message} (got {problem.get('input')!r})")
    return "\n".join(lines)


def parse_set(items: list[str]) -> dict[str, Any]:
    """`key=value` strings to a dict, values parsed as YAML scalars (1e-3, true, [1, 2] ...)."""
    parsed = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        try:
            parsed[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as err:
            raise ConfigError(
                f"--set {item!r}: the value is not valid YAML ({getattr(err, 'problem', None) or err}); close "
                "its brackets and quotes, e.g. --set 'key=[1, 2]' or --set 'key=\"text\"'"
            ) from None
    return parsed


DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"  # MLflow 3 refuses a plain ./mlruns file store


def tracking_uri(cli_value: str | None) -> str:
    """--mlflow-uri, else $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working directory."""
    return cli_value or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
