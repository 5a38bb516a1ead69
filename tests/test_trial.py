"""A search's trials (issue 20): one-worker trials train inside their reused Tune actor, with the same
per-epoch results as a Ray Train run of the same trial; a killed trial resumes from its last epoch."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest
from ray import tune

from prado_dist.config import TrainConfig
from prado_dist.engine import load_checkpoint
from prado_dist.search import SearchSettings, load_space, run_search, trial
from tests.conftest import local_ray

# What depends on the machine or the clock, not on the training.
TIMING = {"epoch_seconds", "images_per_second", "bn_recalibration_seconds", "features_seconds", "data_seconds"}


class FakeTuneSession:
    """What `tune.report` and `tune.get_checkpoint` do inside a trial actor, kept in memory."""

    def __init__(self) -> None:
        self.reports: list[dict[str, Any]] = []
        self.checkpoint_states: list[dict[str, Any]] = []

    def report(self, metrics: dict[str, Any], checkpoint=None) -> None:
        self.reports.append(metrics)
        with checkpoint.as_directory() as directory:
            self.checkpoint_states.append(load_checkpoint(Path(directory) / trial.CHECKPOINT_FILE))


def run_in_this_process(config: TrainConfig, monkeypatch: pytest.MonkeyPatch) -> list[dict[str, float]]:
    session = FakeTuneSession()
    monkeypatch.setattr(trial.tune, "report", session.report)
    monkeypatch.setattr(trial.tune, "get_checkpoint", lambda: None)
    monkeypatch.setattr(trial.ray, "get_runtime_context", lambda: type("Context", (), {"get_node_id": lambda: "n"}))
    trial.train_in_actor(config, "val_balanced_accuracy")
    assert len(session.checkpoint_states) == len(session.reports)  # every epoch comes with its checkpoint
    return [{k: v for k, v in row.items() if k not in TIMING and isinstance(v, int | float)} for row in session.reports]


def test_a_trial_after_another_in_the_same_actor_trains_as_if_alone(
    small_demo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A reused actor keeps module state between trials; nothing of one trial may reach the next: not
    # the RNG, not BatchNorm overrides, not an EMA copy, not another model's or image size's data.
    base = {"data_dir": small_demo, "epochs": 2, "image_size": 32, "device": "cpu", "seed": 3}
    trial_b = TrainConfig(**base, model="mobilenet", lr=2e-3)
    trial_a = TrainConfig(**{**base, "image_size": 40, "seed": 9}, model="plain_cnn", ema_decay=0.9, bn_momentum=0.5)
    first = run_in_this_process(trial_b, monkeypatch)
    run_in_this_process(trial_a, monkeypatch)
    again = run_in_this_process(trial_b, monkeypatch)
    assert [row["epochs_completed"] for row in first] == [1, 2]
    assert len(again) == len(first)
    for row_again, row_first in zip(again, first, strict=True):
        assert row_again == pytest.approx(row_first)


def test_data_is_decoded_once_per_actor_and_changes_with_the_size(small_demo: Path, monkeypatch) -> None:
    loads: list[int] = []
    monkeypatch.setattr(trial, "load_data", lambda config: loads.append(config.image_size) or object())
    monkeypatch.setattr(trial, "_decoded", {})
    config = TrainConfig(data_dir=small_demo, image_size=32)
    assert trial.trial_data(config) is trial.trial_data(config.with_overrides({"lr": 0.1}))
    trial.trial_data(config.with_overrides({"image_size": 40}))
    assert loads == [32, 40]


SMALL = {"num_samples": 1, "epochs": 3, "image_size": 32, "scheduler.grace_period": 4}


def search_settings(small_demo: Path, tmp_path: Path, name: str, **overrides: Any) -> SearchSettings:
    space = load_space("demo", {**SMALL, **overrides})
    return SearchSettings(
        space=space,
        data_dir=small_demo,
        storage=str(tmp_path / "runs"),
        name=name,
        mlflow_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
    )


def only_trial(outcome) -> dict[str, Any]:
    (result,) = outcome.trials.values()
    return result


@pytest.mark.ray
@pytest.mark.slow
def test_one_worker_trial_gives_the_same_epochs_in_its_actor_and_through_ray_train(
    small_demo: Path, tmp_path: Path
) -> None:
    with local_ray(num_cpus=2):
        in_actor = run_search(search_settings(small_demo, tmp_path, "actor"))
        ray_train = run_search(search_settings(small_demo, tmp_path, "train", **{"trial.ray_train": "always"}))
    curve = only_trial(in_actor)["curve"]
    assert [epoch for epoch, _ in curve] == [1, 2, 3]
    through_ray_train = only_trial(ray_train)["curve"]
    assert [epoch for epoch, _ in through_ray_train] == [1, 2, 3]
    assert [value for _, value in through_ray_train] == pytest.approx([value for _, value in curve], abs=1e-6)
    assert ray_train.test == pytest.approx(in_actor.test, abs=1e-6)
    # Tune holds each path's checkpoints itself: the best epoch's is read back from the trial's folder.
    assert in_actor.best_val["epochs_completed"] == ray_train.best_val["epochs_completed"]


class KillOnce(tune.Callback):
    """SIGKILL the trial's process once Tune holds its first epoch's checkpoint; note every epoch reported."""

    killed: list[int] = []
    epochs: list[int] = []

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        self.epochs.append(result["epochs_completed"])

    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info) -> None:
        if not self.killed and trial.last_result.get("epochs_completed") == 1:
            self.killed.append(trial.last_result["pid"])
            os.kill(trial.last_result["pid"], signal.SIGKILL)


@pytest.mark.ray
@pytest.mark.slow
def test_trial_whose_process_is_killed_resumes_from_its_last_epoch(small_demo: Path, tmp_path: Path) -> None:
    KillOnce.killed, KillOnce.epochs = [], []
    settings = search_settings(small_demo, tmp_path, "killed")
    settings.callbacks.append(KillOnce())
    with local_ray(num_cpus=2):
        outcome = run_search(settings)
    assert len(KillOnce.killed) == 1
    result = only_trial(outcome)
    assert result["status"] == "ok"
    # Epoch 1 was not trained again: the retried trial started from its checkpoint.
    assert KillOnce.epochs == [1, 2, 3]
    assert [epoch for epoch, _ in result["curve"]] == [1, 2, 3]


class FakeResult:
    def __init__(self, trial_id: str, losses: list[float]) -> None:
        self.metrics = {"trial_id": trial_id}
        self.error = None
        self.best_checkpoints = [(f"{trial_id}-{epoch}", {"val_loss": loss}) for epoch, loss in enumerate(losses)]


def test_best_checkpoint_follows_the_spaces_metric_and_mode() -> None:
    from prado_dist.search.results import best_checkpoint

    space = load_space("demo", {"metric": "val_loss", "mode": "min"})
    results = [FakeResult("a", [1.2, 0.9]), FakeResult("b", [0.7, 1.5])]
    trial_id, metrics, checkpoint = best_checkpoint(results, space)
    assert (trial_id, metrics["val_loss"], checkpoint) == ("b", 0.7, "b-0")


@pytest.mark.ray
@pytest.mark.slow
def test_search_on_val_loss_keeps_and_tests_the_lowest_loss_checkpoint(small_demo: Path, tmp_path: Path) -> None:
    settings = search_settings(small_demo, tmp_path, "loss", metric="val_loss", mode="min", epochs=4)
    with local_ray(num_cpus=2):
        outcome = run_search(settings)
    result = only_trial(outcome)
    losses = [value for _, value in result["curve"]]
    assert len(losses) == 4
    assert outcome.best_val["val_loss"] == pytest.approx(min(losses))
    assert outcome.best_val["epochs_completed"] == 1 + losses.index(min(losses))
