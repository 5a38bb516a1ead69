"""The training engine on tiny inputs, without Ray."""

from __future__ import annotations

import errno
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from prado_dist.config import ConfigError, TrainConfig
from prado_dist.data import PreparedData, prepare_data
from prado_dist.engine import (
    CheckpointError,
    Counts,
    NonFiniteLossError,
    TrainingRun,
    evaluate_checkpoint,
    exponential_decay_after,
    load_checkpoint,
    metrics_from_counts,
    save_checkpoint,
)
from prado_dist.engine import checkpoint as checkpoint_module
from prado_dist.engine.loop import weighted_cross_entropy
from prado_dist.models import create_model, list_models
from prado_dist.search.plots import ParameterAxis, parameter_points, plot_parameter_effects

CLASSES = ["goya", "bayeu", "haes", "pizarro", "ribera"]


@pytest.fixture(scope="module")
def tiny_data(small_demo: Path, tmp_path_factory: pytest.TempPathFactory) -> PreparedData:
    return prepare_data(small_demo, 32, cache_dir=tmp_path_factory.mktemp("cache"))


def config(data_dir: Path, **overrides) -> TrainConfig:
    base = {"model": "mobilenet", "image_size": 32, "epochs": 2, "bn_momentum": 0.3, "data_dir": data_dir}
    return TrainConfig().with_overrides({**base, **overrides})


def test_schedule_keeps_lr_then_decays_exponentially() -> None:
    optimizer = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    scheduler = exponential_decay_after(optimizer, decay_start=10, decay=0.05)
    rates = []
    for _ in range(13):  # one epoch: train (optimizer steps), then step the schedule
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates[:10] == [1e-3] * 10  # the report: unchanged for epochs 0-9
    assert rates[10] == pytest.approx(1e-3 * math.exp(-0.05))
    assert rates[12] == pytest.approx(1e-3 * math.exp(-0.15))


def test_class_weighted_loss_divides_by_batch_size_like_keras() -> None:
    logits = torch.randn(4, 5)
    labels = torch.tensor([0, 1, 1, 4])
    weights = torch.tensor([0.5, 1.0, 1.5, 2.0, 3.0])
    per_sample = weighted_cross_entropy(weights)(logits, labels)
    plain = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    torch.testing.assert_close(per_sample.mean(), (plain * weights[labels]).sum() / 4)


def test_metrics_from_counts() -> None:
    counts = Counts.zeros(5)
    logits = torch.eye(5)[[0, 0, 1, 2, 2, 3]]  # predictions 0,0,1,2,2,3
    counts.add(logits, torch.tensor([0, 1, 1, 2, 3, 3]), loss_sum=6.0)
    metrics = metrics_from_counts(counts, CLASSES, prefix="val_")
    assert metrics["val_loss"] == pytest.approx(1.0)
    assert metrics["val_accuracy"] == pytest.approx(4 / 6)
    # recalls: goya 1, bayeu 1/2, haes 1, pizarro 1/2; ribera absent -> not averaged
    assert metrics["val_balanced_accuracy"] == pytest.approx((1 + 0.5 + 1 + 0.5) / 4)
    assert metrics["val_recall_bayeu"] == pytest.approx(0.5)
    assert metrics["val_precision_goya"] == pytest.approx(0.5)


def test_seeded_runs_are_reproducible(tiny_data: PreparedData, small_demo: Path) -> None:
    first = TrainingRun(config(small_demo, epochs=1), tiny_data).fit()
    second = TrainingRun(config(small_demo, epochs=1), tiny_data).fit()
    for key in ("train_loss", "val_loss", "val_balanced_accuracy"):
        assert first[0][key] == second[0][key]


@pytest.mark.parametrize("ema_decay", [None, 0.5])
def test_resume_continues_with_same_state_and_schedule(
    tiny_data: PreparedData, small_demo: Path, tmp_path, ema_decay: float | None
) -> None:
    settings = {"epochs": 3, "decay_start": 1, "decay": 0.5, "ema_decay": ema_decay}
    straight = TrainingRun(config(small_demo, **settings), tiny_data)
    straight.fit()

    interrupted = TrainingRun(config(small_demo, **settings), tiny_data)
    interrupted.run_epoch(0)
    interrupted.history.append({"epoch": 0})
    save_checkpoint(tmp_path / "ckpt.pt", interrupted.state_dict(epoch=0))
    resumed = TrainingRun(config(small_demo, **settings), tiny_data)
    resumed.load_state_dict(load_checkpoint(tmp_path / "ckpt.pt"))
    assert resumed.start_epoch == 1
    history = resumed.fit()
    assert [m["lr"] for m in history[1:]] == pytest.approx([m["lr"] for m in straight.history[1:]])
    for name, value in straight.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[name], value, rtol=1e-4, atol=1e-5)
    for name, value in straight.evaluated_network.state_dict().items():  # the average resumes too
        torch.testing.assert_close(resumed.evaluated_network.state_dict()[name], value, rtol=1e-4, atol=1e-5)


def test_weight_average_is_what_is_validated_and_checkpointed(tiny_data: PreparedData, small_demo: Path) -> None:
    plain = TrainingRun(config(small_demo, epochs=1), tiny_data)
    plain.fit()
    averaged = TrainingRun(config(small_demo, epochs=1, ema_decay=0.5), tiny_data)
    averaged.fit()
    # Training is untouched by the average: same losses, same trained weights.
    assert [m["train_loss"] for m in averaged.history] == [m["train_loss"] for m in plain.history]
    state = averaged.state_dict(epoch=0)
    # (Weights only: the plain run's BatchNorm statistics were recalibrated for its validation.)
    for name, value in plain.network.named_parameters():
        torch.testing.assert_close(state["trained_model"][name], value)
    assert averaged.ema_steps == state["ema_steps"] == len(averaged.loaders["train"])
    # The checkpoint's "model" is the average, which differs from the trained weights...
    assert any(not torch.equal(state["model"][name], value) for name, value in state["trained_model"].items())
    # ...and it is what the run validated: a checkpoint evaluation of "model" repeats the last epoch.
    metrics, _ = evaluate_checkpoint(state, tiny_data, "val", device="cpu")
    assert metrics["val_loss"] == pytest.approx(averaged.history[-1]["val_loss"], rel=1e-5)
    assert averaged.history[-1]["val_loss"] != pytest.approx(plain.history[-1]["val_loss"], rel=1e-5)


def test_checkpoints_resume_only_with_the_same_averaging(tiny_data: PreparedData, small_demo: Path) -> None:
    with_average = TrainingRun(config(small_demo, ema_decay=0.9), tiny_data).state_dict(epoch=0)
    without = TrainingRun(config(small_demo), tiny_data).state_dict(epoch=0)
    with pytest.raises(CheckpointError, match="with an average.*ema_decay=None"):
        TrainingRun(config(small_demo), tiny_data).load_state_dict(with_average)
    with pytest.raises(CheckpointError, match="without an average.*ema_decay=0.9"):
        TrainingRun(config(small_demo, ema_decay=0.9), tiny_data).load_state_dict(without)


def test_nan_loss_stops_with_epoch_and_step(tiny_data: PreparedData, small_demo: Path) -> None:
    run = TrainingRun(config(small_demo, lr=1e30), tiny_data)
    with pytest.raises(NonFiniteLossError, match=r"epoch \d+, step \d+"):
        run.fit()


def test_checkpoints_are_weights_only_and_foreign_files_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "ok.pt"
    save_checkpoint(path, {"model": {"w": torch.ones(2)}, "epoch": 3, "config": "{}"})
    assert load_checkpoint(path)["epoch"] == 3
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(truncated)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": np.arange(3)}, foreign)  # a numpy object: refused by weights_only
    with pytest.raises(CheckpointError):
        load_checkpoint(foreign)
    other = tmp_path / "other.pt"
    torch.save({"state": torch.ones(1)}, other)
    with pytest.raises(CheckpointError, match="not a prado_dist checkpoint"):
        load_checkpoint(other)


def test_config_rejects_unknown_and_invalid_settings() -> None:
    with pytest.raises(ConfigError, match="unknown setting"):
        TrainConfig().with_overrides({"learning_rate": 0.1})
    with pytest.raises(ConfigError, match="epochs"):
        TrainConfig().with_overrides({"epochs": 0})
    with pytest.raises(ConfigError, match="ema_decay"):
        TrainConfig().with_overrides({"ema_decay": 1.0})  # an average that never moves


@pytest.mark.parametrize("name", [name for name in list_models() if name not in list_models(family="transfer")])
def test_exported_classifier_takes_any_batch_size(name: str) -> None:
    # What MLflow 3 does when a search logs its best model: torch.export with `Dim.AUTO` on the
    # batch dimension of a 2-image example. Anything that turns the batch size into a Python int
    # (len(x), x.shape[0] in arithmetic) fixes it, and the logged model then refuses other batch sizes.
    from prado_dist.engine.export import PaintingClassifier
    from prado_dist.engine.loop import InputPipeline

    torch.manual_seed(0)
    model = create_model(name, image_size=32)
    classifier = PaintingClassifier(model, InputPipeline(), ["a", "b", "c", "d", "e"], image_size=32)
    example = torch.rand(2, 3, 32, 32) * 255
    program = torch.export.export(classifier, (example,), dynamic_shapes=[{0: torch.export.Dim.AUTO}])
    for batch in (1, 3):
        images = torch.rand(batch, 3, 32, 32) * 255
        torch.testing.assert_close(program.module()(images), classifier(images))


# --- search figures ---------------------------------------------------------------------------------
SEARCHED = {
    "lr": ParameterAxis(log=True),
    "flip_prob": ParameterAxis(categories=(0.0, 0.5)),
    "pca_std": ParameterAxis(),
}
TRIALS = {
    "a": {"config": {"lr": 1e-3, "flip_prob": 0.5, "pca_std": 0.1}, "best": 0.61, "stopped_early": False},
    "b": {"config": {"lr": 3e-4, "flip_prob": 0.0, "pca_std": 0.2}, "best": 0.35, "stopped_early": True},
    "failed": {"config": {"lr": 1e-2, "flip_prob": 0.0, "pca_std": 0.0}, "best": None, "stopped_early": True},
}


def test_parameter_points_place_choices_by_category_and_leave_out_unscored_trials() -> None:
    assert parameter_points(TRIALS.values(), "lr", SEARCHED["lr"]) == ([1e-3, 3e-4], [0.61, 0.35], [False, True])
    assert parameter_points(TRIALS.values(), "flip_prob", SEARCHED["flip_prob"])[0] == [1.0, 0.0]
    outside = {"config": {"flip_prob": 0.25}, "best": 0.5, "stopped_early": False}
    assert parameter_points([outside], "flip_prob", SEARCHED["flip_prob"]) == ([], [], [])


@pytest.mark.parametrize(("searched", "grid"), [(3, (1, 3)), (5, (2, 3)), (7, (2, 4))])
def test_parameter_effects_draw_one_panel_per_searched_parameter(
    searched: int, grid: tuple[int, int], tmp_path: Path
) -> None:
    axes = {f"p{i}": ParameterAxis() for i in range(searched)}
    trials = {"a": {"config": {name: 0.1 * i for i, name in enumerate(axes)}, "best": 0.6, "stopped_early": False}}
    path = plot_parameter_effects(trials, axes, "val_balanced_accuracy", tmp_path / "effects.png", best="a")
    rows, columns = grid
    assert Image.open(path).size == (round(columns * 3.4 * 110), round(rows * 2.9 * 110))


def test_full_disk_while_saving_a_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "ckpt" / "checkpoint.pt"
    save_checkpoint(path, {"model": {"w": torch.ones(3)}, "epoch": 1, "config": "{}"})

    def half_then_enospc(payload, file) -> None:
        file.write(b"PK\x03\x04" + b"\0" * 4096)  # the start of a zip, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint_module.torch, "save", half_then_enospc)
    with pytest.raises(OSError) as raised:
        save_checkpoint(path, {"model": {"w": torch.zeros(3)}, "epoch": 2, "config": "{}"})
    assert raised.value.errno == errno.ENOSPC
    assert str(path) in str(raised.value) and "previous one is unchanged" in str(raised.value)
    monkeypatch.undo()
    state = load_checkpoint(path)
    assert state["epoch"] == 1 and torch.equal(state["model"]["w"], torch.ones(3))
    assert [p.name for p in path.parent.iterdir()] == ["checkpoint.pt"]  # no temporary file left
