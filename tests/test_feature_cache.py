"""The transfer-learning feature cache: one backbone pass, then head-only training; safe to share.

Engine tests run on a hand-made 32 px dataset without Ray; backbones have random weights (nothing is
downloaded). The last test runs a search over the mobilenetv2 transfer space on a 2-CPU local Ray.
"""

from __future__ import annotations

import logging
import math
import sqlite3
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from prado_dist.config import TrainConfig
from prado_dist.data import PreparedData, stratified_split
from prado_dist.engine import TrainingRun, evaluate_checkpoint
from prado_dist.engine.export import PaintingClassifier
from prado_dist.engine.features import (
    FEATURES_DIR,
    FeatureHead,
    compute_features,
    feature_key,
    load_or_build_features,
)
from prado_dist.engine.loop import InputPipeline
from prado_dist.models import TransferModel, create_model, list_models
from prado_dist.search import load_space

TRANSFER_SPACES = ["efficientnet_b3", "resnet50v2", "mobilenetv2", "vgg19"]
CLASSES = ["goya", "bayeu", "haes", "pizarro", "ribera"]
IMAGE_SIZE = 32


def tiny_data(images: int = 40, seed: int = 0) -> PreparedData:
    """`images` random 32 px images, each class tinted its own colour so a head has something to learn."""
    rng = np.random.default_rng(seed)
    labels = np.arange(images, dtype=np.int64) % len(CLASSES)
    pixels = rng.integers(0, 160, size=(images, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    pixels[..., 0] += (labels * 20).astype(np.uint8)[:, None, None]
    return PreparedData(
        images=pixels,
        labels=labels,
        classes=list(CLASSES),
        splits=stratified_split(labels, 0.2, 0.2, seed=42),
        fingerprint=f"tiny-{images}-{seed}",
        rejected=[],
    )


def transfer_config(tmp_path: Path, model: str = "mobilenetv2", **overrides) -> TrainConfig:
    """The report's transfer setting (no augmentation, no class weights, no schedule), tiny."""
    base = {
        "model": model,
        "image_size": IMAGE_SIZE,
        "epochs": 2,
        "batch_size": 8,
        "flip_prob": 0.0,
        "pca_std": 0.0,
        "class_weights": False,
        "decay": 0.0,
        "decay_start": 1,
        "cache_dir": tmp_path / "cache",
        "device": "cpu",
    }
    return TrainConfig().with_overrides({**base, **overrides})


@pytest.fixture(autouse=True)
def fresh_announcements(monkeypatch: pytest.MonkeyPatch) -> None:
    """Messages are logged once per process; each test sees its own."""
    monkeypatch.setattr("prado_dist.engine.session._announced", set())


@pytest.fixture
def backbone_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Every TransferModel backbone forward, cached build or per-batch training alike (batch sizes)."""
    calls: list[int] = []
    original = TransferModel.forward_features

    def counted(self: TransferModel, x: torch.Tensor) -> torch.Tensor:
        calls.append(len(x))
        return original(self, x)

    monkeypatch.setattr(TransferModel, "forward_features", counted)
    return calls


def feature_files(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "cache" / FEATURES_DIR).glob("*.npy"))


@pytest.mark.parametrize("name", sorted(list_models(family="transfer")))
def test_each_backbone_trains_a_head_on_cached_features(name: str, tmp_path: Path) -> None:
    data = tiny_data()
    run = TrainingRun(transfer_config(tmp_path, name, epochs=1), data)
    assert run.use_features and isinstance(run.model, FeatureHead)
    backbone_before = {k: v.clone() for k, v in run.network.backbone.state_dict().items()}
    classifier_before = run.network.classifier.weight.detach().clone()
    history = run.fit()
    assert math.isfinite(history[0]["train_loss"]) and history[0]["feature_cache_built"] == 1.0
    (path,) = feature_files(tmp_path)
    features = np.load(path, mmap_mode="r")
    assert features.shape == (len(data.labels), run.network.num_features) and features.dtype == np.float32
    # The head moved, the backbone did not; the checkpoint holds the whole model.
    assert not torch.equal(run.network.classifier.weight, classifier_before)
    for key, value in run.network.backbone.state_dict().items():
        assert torch.equal(value, backbone_before[key]), key
    assert set(run.state_dict(0)["model"]) == set(run.network.state_dict())


def test_feature_head_on_cached_features_equals_the_whole_model() -> None:
    torch.manual_seed(0)
    model = create_model("mobilenetv2", dropout=0.3).eval()
    images = tiny_data().images[:8]
    x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy()).float()
    normalised = InputPipeline(0.0, 0.0, model.pixel_mean_std)(x, train=False)
    features = compute_features(model, images, device=torch.device("cpu"), batch_size=3)
    head = FeatureHead(model).eval()
    torch.testing.assert_close(head(features), model(normalised), rtol=1e-4, atol=1e-5)


def test_second_run_reuses_the_features_with_zero_backbone_passes(
    tmp_path: Path, backbone_calls: list[int], caplog: pytest.LogCaptureFixture
) -> None:
    data = tiny_data()
    caplog.set_level(logging.INFO, logger="prado_dist")
    first = TrainingRun(transfer_config(tmp_path), data)
    first.fit()
    # One pass over every image of every split, in batches of batch_size, and nothing after it.
    assert sum(backbone_calls) == len(data.labels)
    assert len(backbone_calls) == math.ceil(len(data.labels) / 8)
    assert "feature cache on" in caplog.text

    backbone_calls.clear()
    head_settings = {"lr": 1e-2, "dropout": 0.4, "label_smoothing": 0.1, "weight_decay": 1e-4, "decay": 0.1}
    second = TrainingRun(transfer_config(tmp_path, **head_settings), data)
    history = second.fit()
    assert backbone_calls == []  # the second trial costs a head's training only
    assert [m["feature_cache_built"] for m in history] == [0.0, 0.0]
    assert len(feature_files(tmp_path)) == 1
    assert history[-1]["lr"] == pytest.approx(1e-2 * math.exp(-0.1))
    assert history[-1]["train_loss"] != first.history[-1]["train_loss"]


@pytest.mark.parametrize("ema_decay", [None, 0.5])
def test_cached_training_gives_the_uncached_results(tmp_path: Path, ema_decay: float | None) -> None:
    data = tiny_data()
    # dropout: the head's randomness must line up too; ema_decay: validated on the averaged head
    settings = {"dropout": 0.3, "epochs": 2, "ema_decay": ema_decay}
    # Built and trained one after the other: dropout draws from the global RNG, seeded by each run.
    cached = TrainingRun(transfer_config(tmp_path, **settings), data)
    cached.fit()
    uncached = TrainingRun(transfer_config(tmp_path, feature_cache=False, **settings), data)
    uncached.fit()
    assert cached.use_features and not uncached.use_features
    for with_cache, without in zip(cached.history, uncached.history, strict=True):
        for key in ("train_loss", "train_accuracy", "val_loss", "val_balanced_accuracy", "lr"):
            assert with_cache[key] == pytest.approx(without[key], rel=1e-4, abs=1e-6), key
    for key, value in uncached.evaluated_network.state_dict().items():
        torch.testing.assert_close(cached.evaluated_network.state_dict()[key], value, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    ("setting", "value", "reason"),
    [
        ("flip_prob", 0.5, "flip_prob=0.5 augments images"),
        ("pca_std", 0.1, "pca_std=0.1 augments images"),
        ("unfreeze_stages", 1, "unfreeze_stages=1 fine-tunes the backbone"),
        ("feature_cache", False, "feature_cache=false"),
    ],
)
def test_augmentation_or_fine_tuning_turns_the_cache_off_and_says_why(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, setting: str, value: object, reason: str
) -> None:
    caplog.set_level(logging.INFO, logger="prado_dist")
    run = TrainingRun(transfer_config(tmp_path, **{setting: value}), tiny_data())
    assert not run.use_features and run.model is run.network
    assert f"feature cache disabled for mobilenetv2: {reason}" in caplog.text
    assert not (tmp_path / "cache" / FEATURES_DIR).exists()


def test_custom_models_never_mention_the_cache(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="prado_dist")
    run = TrainingRun(transfer_config(tmp_path, model="plain_cnn"), tiny_data())
    assert not run.use_features and "feature cache" not in caplog.text


def test_key_follows_weights_seed_and_data(tmp_path: Path) -> None:
    data = tiny_data()

    def model(seed: int) -> TransferModel:
        torch.manual_seed(seed)
        return create_model("mobilenetv2")

    assert feature_key(model(1), data) == feature_key(model(1), data)
    assert feature_key(model(1), data) != feature_key(model(2), data)  # random init depends on the seed
    assert feature_key(model(1), data) != feature_key(model(1), tiny_data(seed=1))


@pytest.mark.parametrize("ema_decay", [None, 0.5])
def test_checkpoint_of_a_cached_run_evaluates_and_exports_on_images(tmp_path: Path, ema_decay: float | None) -> None:
    data = tiny_data()
    config = transfer_config(tmp_path, epochs=1, ema_decay=ema_decay)
    run = TrainingRun(config, data)
    run.fit()
    state = run.state_dict(0)
    expected, _ = run.evaluate("test")
    metrics, confusion = evaluate_checkpoint(state, data, "test", device="cpu")
    assert metrics["test_accuracy"] == pytest.approx(expected["test_accuracy"])
    assert int(confusion.sum()) == len(data.splits["test"])

    # What the search logs to MLflow: a fresh run's whole model on images, with its normalisation.
    fresh = TrainingRun(config, data)
    fresh.load_model_state(state["model"])
    classifier = PaintingClassifier(fresh.network, fresh.image_pipeline, data.classes, IMAGE_SIZE)
    images = torch.from_numpy(data.images[:4].transpose(0, 3, 1, 2).copy()).float()
    probabilities = classifier(images)
    features = compute_features(run.network, data.images[:4], device=torch.device("cpu"))
    head = FeatureHead(run.evaluated_network).eval()  # the averaged head, with ema_decay
    torch.testing.assert_close(probabilities, head(features).softmax(dim=1), rtol=1e-4, atol=1e-5)
    assert fresh._loaders is None  # exporting never touched the features


def test_concurrent_builders_share_one_build(tmp_path: Path, backbone_calls: list[int]) -> None:
    data = tiny_data()
    torch.manual_seed(0)
    model = create_model("mobilenetv2").eval()
    results: list = []
    errors: list[BaseException] = []

    def build() -> None:
        try:
            results.append(load_or_build_features(model, data, tmp_path / "cache", batch_size=8))
        except BaseException as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=build) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert sorted(result.built for result in results) == [False, False, True]
    assert sum(backbone_calls) == len(data.labels)  # the waiting builders reused the first one's file
    for result in results[1:]:
        np.testing.assert_array_equal(result.features, results[0].features)
    directory = tmp_path / "cache" / FEATURES_DIR
    assert [p.name for p in directory.iterdir() if p.name.startswith(".")] == []  # no staging files left


def test_an_interrupted_build_leaves_no_partial_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = tiny_data()
    model = create_model("mobilenetv2").eval()
    original = TransferModel.pool_features
    calls = {"n": 0}

    class Killed(BaseException):
        """Like a KeyboardInterrupt or SystemExit in a worker: not an Exception."""

    def failing(self: TransferModel, x: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] == 2:
            raise Killed
        return original(self, x)

    monkeypatch.setattr(TransferModel, "pool_features", failing)
    with pytest.raises(Killed):
        load_or_build_features(model, data, tmp_path / "cache", batch_size=8)
    directory = tmp_path / "cache" / FEATURES_DIR
    assert [p for p in directory.iterdir() if p.suffix == ".npy"] == []
    monkeypatch.setattr(TransferModel, "pool_features", original)
    rebuilt = load_or_build_features(model, data, tmp_path / "cache", batch_size=8)
    assert rebuilt.built and rebuilt.features.shape == (len(data.labels), model.num_features)


@pytest.mark.parametrize("name", TRANSFER_SPACES)
def test_transfer_spaces_start_from_the_report_configuration(name: str) -> None:
    space = load_space(name)
    assert space.model == name and space.epochs == 25
    baseline = space.base_config(**space.baseline_point())
    # The report: Adam lr 1e-3, no class weights, no LR schedule, no augmentation, frozen base.
    assert (baseline.lr, baseline.decay, baseline.class_weights) == (1e-3, 0.0, False)
    assert (baseline.flip_prob, baseline.pca_std, baseline.unfreeze_stages) == (0.0, 0.0, 0)
    assert {"lr", "decay", "weight_decay", "label_smoothing", "dropout"} <= set(space.params)
    assert baseline.feature_cache  # nothing in the space turns the cache off


@pytest.mark.ray
@pytest.mark.slow
def test_two_ray_workers_share_one_feature_file_and_match_one_process(small_demo: Path, tmp_path: Path) -> None:
    from prado_dist.data import prepare_data, split_counts
    from prado_dist.distributed import WorkerResources, load_ray_checkpoint, run_training
    from tests.conftest import local_ray

    # test_fraction 0.25: 180 training images, two equal shards (DDP's mean gradient = the global one).
    data = prepare_data(small_demo, IMAGE_SIZE, cache_dir=tmp_path / "cache", test_fraction=0.25)
    train_images = sum(split_counts(data)["train"])
    assert train_images % 2 == 0, train_images
    # One global batch = the whole training split: the epoch is one optimizer step on either side.
    config = transfer_config(
        tmp_path, epochs=1, batch_size=train_images, data_dir=small_demo, test_fraction=0.25, dropout=0.0
    )
    with local_ray(num_cpus=2):
        # Both workers ask for the features of a cold cache at once: one builds, the other waits.
        result = run_training(config, WorkerResources(workers=2), storage=tmp_path / "ray", name="ddp", max_failures=0)
    assert result.error is None
    assert result.metrics["feature_cache"] == 1.0
    assert len(feature_files(tmp_path)) == 1
    distributed = load_ray_checkpoint(result.checkpoint)

    single = TrainingRun(config, data)
    single.fit()
    assert not single.features_built  # the workers' file
    assert distributed["model"].keys() == single.network.state_dict().keys()  # the whole model
    for name in ("classifier.weight", "classifier.bias"):
        torch.testing.assert_close(distributed["model"][name], single.network.state_dict()[name], rtol=1e-4, atol=1e-6)
    assert distributed["history"][0]["val_loss"] == pytest.approx(single.history[0]["val_loss"], rel=1e-4)


@pytest.mark.ray
@pytest.mark.slow
def test_search_over_a_transfer_space_builds_features_once(
    small_demo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from prado_dist.distributed import leftover_resources
    from prado_dist.search import SearchSettings, run_search
    from tests.conftest import local_ray

    overrides = {
        "image_size": 32,
        "epochs": 2,
        "num_samples": 2,
        "max_concurrent": 1,
        "trial.cpus_per_worker": 1,
        "cache_dir": str(tmp_path / "cache"),
    }
    space = load_space("mobilenetv2", overrides)
    monkeypatch.chdir(tmp_path)  # a sqlite tracking URI keeps artifacts in ./mlruns
    db = tmp_path / "mlflow.db"
    settings = SearchSettings(
        space=space, data_dir=small_demo, storage=str(tmp_path / "runs"), mlflow_uri=f"sqlite:///{db}"
    )
    with local_ray(num_cpus=2):
        outcome = run_search(settings)
        leftovers = leftover_resources()
    assert len(outcome.trials) == 2 and all(t["status"] == "ok" for t in outcome.trials.values())
    assert outcome.baseline_val is not None  # the report's configuration ran first
    assert leftovers["placement_groups"] == []
    assert len(feature_files(tmp_path)) == 1
    with sqlite3.connect(db) as connection:
        rows = connection.execute(
            "select m.run_uuid, m.key, max(m.value) from metrics m join tags t on t.run_uuid = m.run_uuid "
            "where t.key = 'mlflow.parentRunId' and m.key like 'feature_cache%' group by m.run_uuid, m.key"
        ).fetchall()
    recorded: dict[str, dict[str, float]] = {}
    for run_id, key, value in rows:
        recorded.setdefault(run_id, {})[key] = value
    assert len(recorded) == 2 and all(r["feature_cache"] == 1.0 for r in recorded.values())
    # The first trial ran the backbone; the second trained only the head on its features.
    assert sorted(r["feature_cache_built"] for r in recorded.values()) == [0.0, 1.0]
    assert set(outcome.test) >= {"test_accuracy", "test_balanced_accuracy"}
    # The logged model is the whole network with its normalisation: it classifies images.
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{db}")
    classifier = mlflow.pytorch.load_model(f"runs:/{outcome.parent_run_id}/model", map_location="cpu")
    for batch in (1, 3):  # any batch size: MLflow's torch.export kept the batch dimension dynamic
        images = torch.randint(0, 256, (batch, 3, 32, 32)).float()
        probabilities = classifier(images)
        assert probabilities.shape == (batch, 5)
        assert probabilities.sum(dim=1).tolist() == pytest.approx([1.0] * batch, abs=1e-4)
