"""Settings that change between epochs: a copied checkpoint with perturbed settings, a replayed schedule."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from prado_dist.config import ConfigError, TrainConfig
from prado_dist.data import PreparedData, prepare_data
from prado_dist.engine import TrainingRun, load_checkpoint, save_checkpoint


@pytest.fixture(scope="module")
def tiny_data(small_demo: Path, tmp_path_factory: pytest.TempPathFactory) -> PreparedData:
    return prepare_data(small_demo, 32, cache_dir=tmp_path_factory.mktemp("cache"))


def config(data_dir: Path, **overrides) -> TrainConfig:
    base = {"model": "mobilenet", "image_size": 32, "epochs": 3, "decay_start": 1, "decay": 0.5, "data_dir": data_dir}
    return TrainConfig().with_overrides({**base, **overrides})


def test_a_copied_checkpoint_trains_on_with_the_copying_runs_settings(
    tiny_data: PreparedData, small_demo: Path, tmp_path: Path
) -> None:
    donor = TrainingRun(config(small_demo), tiny_data)
    donor.history.append(donor.run_epoch(0))
    save_checkpoint(tmp_path / "donor.pt", donor.state_dict(epoch=0))
    perturbed = {"lr": 2e-3, "pca_std": 0.3, "flip_prob": 0.2, "weight_decay": 1e-4, "label_smoothing": 0.1}
    clone = TrainingRun(config(small_demo, **perturbed), tiny_data)
    clone.load_state_dict(load_checkpoint(tmp_path / "donor.pt"))

    for name, value in donor.network.state_dict().items():  # the donor's weights ...
        torch.testing.assert_close(clone.network.state_dict()[name], value)
    # ... and schedule position (one decay step after epoch 0), with the clone's own settings
    assert clone.scheduler.last_epoch == donor.scheduler.last_epoch == 1
    group = clone.optimizer.param_groups[0]
    assert group["lr"] == pytest.approx(2e-3 * math.exp(-0.5))
    assert group["weight_decay"] == 1e-4
    assert (clone.image_pipeline.pca_std, clone.image_pipeline.flip_prob) == (0.3, 0.2)
    assert clone.pipeline is clone.image_pipeline
    # The optimiser moments are the donor's (Adam's state is not reset by the copy).
    donor_state = donor.optimizer.state_dict()["state"]
    torch.testing.assert_close(clone.optimizer.state_dict()["state"][0]["exp_avg"], donor_state[0]["exp_avg"])

    history = clone.fit()
    assert [row["lr"] for row in history] == pytest.approx([1e-3, 2e-3 * math.exp(-0.5), 2e-3 * math.exp(-1.0)])
    assert [row["pca_std"] for row in clone.settings_history] == [0.1, 0.3, 0.3]  # epoch 0 was the donor's


def test_a_schedule_applies_its_settings_before_each_epoch(tiny_data: PreparedData, small_demo: Path) -> None:
    schedule = {1: {"lr": 5e-4, "pca_std": 0.2}, 2: {"flip_prob": 0.0}}
    run = TrainingRun(config(small_demo, schedule=schedule, decay=0.0), tiny_data)
    history = run.fit()
    assert [row["lr"] for row in history] == pytest.approx([1e-3, 5e-4, 5e-4])
    assert [(row["lr"], row["pca_std"], row["flip_prob"]) for row in run.settings_history] == [
        (1e-3, 0.1, 0.5),
        (5e-4, 0.2, 0.5),
        (5e-4, 0.2, 0.0),
    ]


def test_a_scheduled_run_resumes_at_the_settings_it_had_reached(
    tiny_data: PreparedData, small_demo: Path, tmp_path: Path
) -> None:
    settings = {"schedule": {1: {"lr": 5e-4, "weight_decay": 1e-3}}}
    straight = TrainingRun(config(small_demo, **settings), tiny_data)
    straight.fit()
    interrupted = TrainingRun(config(small_demo, **settings), tiny_data)
    for epoch in (0, 1):
        interrupted.history.append(interrupted.run_epoch(epoch))
    save_checkpoint(tmp_path / "ckpt.pt", interrupted.state_dict(epoch=1))
    resumed = TrainingRun(config(small_demo, **settings), tiny_data)
    resumed.load_state_dict(load_checkpoint(tmp_path / "ckpt.pt"))
    assert resumed.optimizer.param_groups[0]["weight_decay"] == 1e-3
    resumed.fit()
    assert [row["lr"] for row in resumed.history] == pytest.approx([row["lr"] for row in straight.history])
    assert resumed.settings_history == straight.settings_history


@pytest.mark.parametrize(
    ("schedule", "message"),
    [
        ({2: {"dropout": 0.5}}, "only"),
        ({-1: {"lr": 1e-3}}, "negative"),
        ({2: {"flip_prob": 1.5}}, "flip_prob"),
    ],
)
def test_a_schedule_is_validated_with_the_config(schedule: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        TrainConfig().with_overrides({"schedule": schedule})


def test_a_cached_feature_run_refuses_augmentation_later(tiny_data: PreparedData, small_demo: Path) -> None:
    run = TrainingRun(config(small_demo, model="mobilenetv2", pca_std=0.0, flip_prob=0.0), tiny_data)
    assert run.use_features
    with pytest.raises(ConfigError, match="feature_cache=false"):
        run.apply_settings({"pca_std": 0.1})
    run.apply_settings({"lr": 1e-4})  # the head's learning rate can change
    assert run.optimizer.param_groups[0]["lr"] == pytest.approx(1e-4)
