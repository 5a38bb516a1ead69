"""BatchNorm statistics recomputed before evaluation (PreciseBN, issue 22), without Ray."""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from prado_dist.config import TrainConfig
from prado_dist.data import PreparedData, prepare_data
from prado_dist.engine import TrainingRun, evaluate_checkpoint, load_checkpoint, save_checkpoint
from prado_dist.engine.batchnorm import recalibrate_batchnorm, training_batchnorm_layers
from prado_dist.engine.export import PaintingClassifier


@pytest.fixture(scope="module")
def tiny_data(small_demo: Path, tmp_path_factory: pytest.TempPathFactory) -> PreparedData:
    return prepare_data(small_demo, 32, cache_dir=tmp_path_factory.mktemp("cache"))


def config(data_dir: Path, **overrides) -> TrainConfig:
    base = {"model": "mobilenet", "image_size": 32, "epochs": 1, "data_dir": data_dir, "device": "cpu"}
    return TrainConfig().with_overrides({**base, **overrides})


def tiny_network() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 5, 3), nn.BatchNorm2d(5), nn.Flatten()
    )


def input_moments(network: nn.Module, batches: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each BatchNorm layer's exact input mean and unbiased variance over all `batches` (train mode)."""
    layers = [m for m in network.modules() if isinstance(m, nn.BatchNorm2d)]
    seen: dict[nn.Module, list[torch.Tensor]] = {layer: [] for layer in layers}
    handles = [layer.register_forward_pre_hook(lambda m, inputs: seen[m].append(inputs[0])) for layer in layers]
    network.train()
    with torch.no_grad():
        for batch in batches:
            network(batch)
    for handle in handles:
        handle.remove()
    moments = []
    for layer in layers:
        values = torch.cat(seen[layer]).double().transpose(0, 1).reshape(layer.num_features, -1)
        moments.append((values.mean(dim=1), values.var(dim=1)))
    return moments


def batches_of(seed: int, count: int = 3) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 3, 8, 8, generator=generator) * 2 + 1 for _ in range(count)]


def test_recalibrated_statistics_are_the_exact_moments_of_the_pass() -> None:
    network = tiny_network()
    batches = batches_of(seed=1)
    expected = input_moments(copy.deepcopy(network), batches)
    network.eval()
    seen = recalibrate_batchnorm(network, batches, lambda x: x, device=torch.device("cpu"))
    assert seen == 12
    assert not network.training  # its mode is left as it was
    layers = [m for m in network.modules() if isinstance(m, nn.BatchNorm2d)]
    for layer, (mean, variance) in zip(layers, expected, strict=True):
        torch.testing.assert_close(layer.running_mean, mean.float())
        torch.testing.assert_close(layer.running_var, variance.float())
        assert int(layer.num_batches_tracked) == 0  # untouched: only the statistics change


def _recalibrate_on_rank(rank: int, world_size: int, port: int, results: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        network = tiny_network()
        recalibrate_batchnorm(network, batches_of(seed=10 + rank), lambda x: x, device=torch.device("cpu"))
        results[rank] = [t.clone() for t in network.state_dict().values()]
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_end_with_the_statistics_of_the_union() -> None:
    port = 29_400 + os.getpid() % 500
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_recalibrate_on_rank, args=(2, port, results), nprocs=2, join=True)
        per_rank = [results[0], results[1]]
    for first, second in zip(*per_rank, strict=True):
        torch.testing.assert_close(first, second, rtol=0, atol=0)  # every rank ends identical
    single = tiny_network()
    recalibrate_batchnorm(single, batches_of(seed=10) + batches_of(seed=11), lambda x: x, device=torch.device("cpu"))
    for distributed, alone in zip(per_rank[0], single.state_dict().values(), strict=True):
        torch.testing.assert_close(distributed, alone)


@pytest.mark.parametrize("model", ["vgg", "resnet29", "mobilenet"])
def test_validation_uses_recalibrated_statistics_and_training_is_unchanged(
    tiny_data: PreparedData, small_demo: Path, model: str
) -> None:
    # batch 25: the 193 training images end in a batch of 1 at 32, which VGG's BatchNorm1d refuses
    settings = {"model": model, "batch_size": 25}
    plain = TrainingRun(config(small_demo, **settings, bn_recalibration_images=None), tiny_data)
    recalibrated = TrainingRun(config(small_demo, **settings, bn_recalibration_images=64), tiny_data)
    before, after = plain.fit()[0], recalibrated.fit()[0]
    assert after["train_loss"] == before["train_loss"]  # train-mode BatchNorm uses batch statistics
    for name, weight in plain.network.named_parameters():
        torch.testing.assert_close(recalibrated.network.get_parameter(name), weight, rtol=0, atol=0)
    assert after["bn_recalibration_seconds"] > 0
    random_state = torch.random.get_rng_state()
    recalibrated.recalibrate_batchnorm()
    assert torch.equal(torch.random.get_rng_state(), random_state)  # dropout's random stream is untouched
    assert after["val_loss"] != before["val_loss"]
    # What was validated is what the run now holds: evaluating again gives the same figures.
    assert recalibrated.evaluate("val")[0]["val_loss"] == pytest.approx(after["val_loss"])
    layers = training_batchnorm_layers(recalibrated.network)
    assert layers and all(
        not torch.equal(a.running_mean, b.running_mean)
        for a, b in zip(layers, training_batchnorm_layers(plain.network), strict=True)
    )


def test_with_recalibration_the_momentum_changes_nothing(tiny_data: PreparedData, small_demo: Path) -> None:
    # Training normalises with batch statistics and the pass overwrites the running ones, so a short
    # run needs no bn_momentum workaround (search_spaces/demo.yaml dropped its 0.3).
    runs = [
        TrainingRun(config(small_demo, epochs=2, bn_momentum=momentum, bn_recalibration_images=64), tiny_data).fit()
        for momentum in (None, 0.3)
    ]
    for keras, short in zip(*runs, strict=True):
        for name in ("train_loss", "val_loss", "val_balanced_accuracy"):
            assert short[name] == keras[name], name
    plain = TrainingRun(config(small_demo, epochs=2, bn_momentum=0.3, bn_recalibration_images=None), tiny_data).fit()
    assert plain[-1]["val_loss"] != runs[1][-1]["val_loss"]  # the pass is what evaluation used


def test_a_rank_never_recalibrates_on_a_single_image(tiny_data: PreparedData, small_demo: Path) -> None:
    # 3 images over 2 ranks would leave each rank one, which VGG's train-mode BatchNorm1d refuses.
    run = TrainingRun(config(small_demo, model="vgg", bn_recalibration_images=3), tiny_data, rank=0, world_size=2)
    assert len(run._recalibration_loader(3).dataset) == 2
    assert run.recalibrate_batchnorm() > 0


def test_an_averaged_run_recalibrates_the_average(tiny_data: PreparedData, small_demo: Path) -> None:
    run = TrainingRun(config(small_demo, ema_decay=0.5, bn_recalibration_images=64), tiny_data)
    trained_stats = [layer.running_mean.clone() for layer in training_batchnorm_layers(run.network)]
    run.fit()
    # The trained network keeps its own running statistics; the average, which is evaluated, was
    # recalibrated: evaluating it once more gives the validated figures.
    first = run.history[0]
    assert run.evaluate("val")[0]["val_loss"] == pytest.approx(first["val_loss"])
    averaged = training_batchnorm_layers(run.evaluated_network)
    assert all(not torch.equal(a.running_mean, b) for a, b in zip(averaged, trained_stats, strict=True))


def test_checkpoint_export_and_resume_keep_the_evaluated_statistics(
    tiny_data: PreparedData, small_demo: Path, tmp_path: Path
) -> None:
    settings = {"epochs": 3, "bn_recalibration_images": 64}
    uninterrupted = TrainingRun(config(small_demo, **settings), tiny_data).fit()
    first = TrainingRun(config(small_demo, **settings), tiny_data)
    first.history.append(first.run_epoch(0))
    save_checkpoint(tmp_path / "last.pt", first.state_dict(epoch=0))
    state = load_checkpoint(tmp_path / "last.pt")
    # The checkpoint's model is the evaluated one: the test split evaluated from it equals the run's.
    metrics, _ = evaluate_checkpoint(state, tiny_data, "val", device="cpu")
    assert metrics["val_loss"] == pytest.approx(first.evaluate("val")[0]["val_loss"])
    # The exported classifier gives the evaluated network's outputs.
    exporter = TrainingRun(config(small_demo, **settings), tiny_data)
    exporter.load_model_state(state["model"])
    classifier = PaintingClassifier(exporter.network, exporter.image_pipeline, tiny_data.classes, 32)
    images = torch.from_numpy(tiny_data.images[tiny_data.splits["val"][:6]].transpose(0, 3, 1, 2).copy())
    evaluated = first.evaluated_network.eval()
    expected = evaluated(first.image_pipeline(images, train=False)).softmax(dim=1)
    torch.testing.assert_close(classifier(images.float()), expected)
    # A resumed run continues exactly as the uninterrupted one.
    resumed = TrainingRun(config(small_demo, **settings), tiny_data)
    resumed.load_state_dict(state)
    rest = resumed.fit()[1:]
    for resumed_epoch, straight in zip(rest, uninterrupted[1:], strict=True):
        assert resumed_epoch["train_loss"] == pytest.approx(straight["train_loss"], rel=1e-6)
        assert resumed_epoch["val_loss"] == pytest.approx(straight["val_loss"], rel=1e-6)


def test_frozen_batchnorm_of_a_transfer_model_is_left_alone() -> None:
    from prado_dist.models import create_model

    model = create_model("mobilenetv2", num_classes=3, image_size=32)
    assert training_batchnorm_layers(model) == []
    before = copy.deepcopy(model.state_dict())
    assert recalibrate_batchnorm(model, [torch.randn(2, 3, 32, 32)], lambda x: x, device=torch.device("cpu")) == 0
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_one_class_validation_warns_once_naming_the_settings(
    tiny_data: PreparedData, small_demo: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run = TrainingRun(config(small_demo, epochs=2, bn_recalibration_images=None), tiny_data)
    with torch.no_grad():  # a classifier whose bias outweighs everything: one class for every image
        classifier = run.network.get_classifier()
        classifier.weight.zero_()
        classifier.bias.copy_(torch.tensor([50.0] + [0.0] * (len(tiny_data.classes) - 1)))
    run.optimizer.param_groups[0]["lr"] = 1e-12  # keep it so for both epochs
    with caplog.at_level(logging.WARNING, logger="prado_dist.engine.session"):
        run.fit()
    warnings = [record.getMessage() for record in caplog.records if "predicted" in record.getMessage()]
    assert len(warnings) == 1  # once per run, not every epoch
    assert f"{tiny_data.classes[0]!r} for all" in warnings[0]
    assert "bn_recalibration_images" in warnings[0] and "bn_momentum" in warnings[0]


@pytest.mark.parametrize(
    ("recalibration", "names"),
    [([], ["lr=1e-12", "lower lr"]), (["--set", "bn_recalibration_images=null"], ["bn_momentum"])],
)
def test_the_train_cli_warns_when_validation_predicts_one_class(
    small_demo: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    recalibration: list[str],
    names: list[str],
) -> None:
    from prado_dist import train
    from prado_dist.engine import session

    def one_class_model(*args, **kwargs) -> nn.Module:
        model = create_model(*args, **kwargs)
        with torch.no_grad():  # a bias that outweighs everything: one class for every image
            classifier = model.get_classifier()
            classifier.weight.zero_()
            classifier.bias.zero_()
            classifier.bias[0] = 50.0
        return model

    create_model = session.create_model
    monkeypatch.setattr(session, "create_model", one_class_model)
    argv = ["--model", "mobilenet", "--data", str(small_demo), "--image-size", "32", "--epochs", "1"]
    argv += ["--single-process", "--device", "cpu", "--lr", "1e-12", "--out", str(tmp_path / "out"), *recalibration]
    with caplog.at_level(logging.WARNING, logger="prado_dist.engine.session"):
        assert train.main(argv) == 0
    warnings = [record.getMessage() for record in caplog.records if "predicted" in record.getMessage()]
    assert len(warnings) == 1, warnings
    assert all(name in warnings[0] for name in names), warnings[0]
