"""The generated demo dataset: layout, determinism, class imbalance, and that it is learnable
by its style (a tiny CNN) but not by its mean colour."""

from __future__ import annotations

import argparse
import csv
import re
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from prado_dist.data import demo
from prado_dist.data.demo import class_counts, demo_data_dir, make_demo_dataset
from prado_dist.data.sources import CLASSES, PRADO_AUTHORS, find_samples

IMAGE_URL = re.compile(r"^https://demo\.invalid/images/([0-9a-f-]{36})\.jpg$")


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_demo_dataset(tmp_path_factory.mktemp("demo"))  # the defaults: 600 images, 128 px


def _rows(root: Path) -> list[dict[str, str]]:
    with open(root / "prado.csv", newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _labels(rows: list[dict[str, str]]) -> np.ndarray:
    author_to_label = {PRADO_AUTHORS[name]: label for label, name in enumerate(CLASSES)}
    return np.array([author_to_label[row["author"]] for row in rows])


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(path.relative_to(root)): path.read_bytes() for path in root.rglob("*") if path.is_file()}


def test_same_seed_gives_byte_identical_files(tmp_path: Path) -> None:
    first = _tree_bytes(make_demo_dataset(tmp_path / "a", images=30, seed=7, size=64))
    second = _tree_bytes(make_demo_dataset(tmp_path / "b", images=30, seed=7, size=64))
    other_seed = _tree_bytes(make_demo_dataset(tmp_path / "c", images=30, seed=8, size=64))
    assert len(first) == 31  # prado.csv + 30 images
    assert first == second
    assert not set(first) & set(other_seed) - {"prado.csv"}  # new seed, new uuids


def test_class_counts_follow_the_report_imbalance() -> None:
    assert class_counts(2364) == [1080, 446, 326, 290, 222]  # the report's own counts
    assert class_counts(600) == [274, 113, 83, 74, 56]
    for images in (5, 7, 50, 599, 601, 10_000):
        counts = class_counts(images)
        assert sum(counts) == images and min(counts) >= 1
        assert counts == sorted(counts, reverse=True)
    with pytest.raises(ValueError, match="at least 5"):
        class_counts(4)


def test_layout_csv_and_images(demo_dir: Path) -> None:
    rows = _rows(demo_dir)
    assert {"work_url", "work_image_url", "author", "work_title"} <= set(rows[0])
    counts = Counter(row["author"] for row in rows)
    assert [counts[PRADO_AUTHORS[name]] for name in CLASSES] == class_counts(600)
    assert set(counts) == {
        "Goya y Lucientes, Francisco de",
        "Bayeu y Subías, Francisco",
        "Haes, Carlos de",
        "Pizarro y Librado, Cecilio",
        "Ribera y Fieve, Carlos Luis de",
    }
    names = set()
    for row in rows:
        match = IMAGE_URL.match(row["work_image_url"])
        assert match, row["work_image_url"]
        assert uuid.UUID(match[1]).version == 4
        names.add(f"{match[1]}.jpg")
    assert names == {path.name for path in (demo_dir / "images").iterdir()}  # one file per row
    found = find_samples(demo_dir)  # read the way the data layer reads the real Kaggle folder
    assert (found.layout, found.counts(), found.rejected) == ("kaggle", class_counts(600), [])
    for name in sorted(names)[:50]:
        with Image.open(demo_dir / "images" / name) as image:
            assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (128, 128))
            image.load()


# --- learnability ------------------------------------------------------------------------------


def _load(root: Path, rows: list[dict[str, str]], pixels: int) -> np.ndarray:
    images = []
    for row in rows:
        with Image.open(root / "images" / row["work_image_url"].rsplit("/", 1)[1]) as image:
            images.append(np.asarray(image.convert("RGB").resize((pixels, pixels), Image.BILINEAR)))
    return np.stack(images).astype(np.float32) / 255.0


def _stratified_split(labels: np.ndarray, train_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    train, test = [], []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        cut = int(round(train_fraction * len(members)))
        train += list(members[:cut])
        test += list(members[cut:])
    return np.array(train), np.array(test)


def _balanced_accuracy(truth: np.ndarray, predicted: np.ndarray) -> float:
    return float(np.mean([np.mean(predicted[truth == c] == c) for c in np.unique(truth)]))


def _mean_colour_accuracy(images: np.ndarray, labels: np.ndarray, train: np.ndarray, test: np.ndarray) -> float:
    """The best of three mean-RGB classifiers: nearest centroid, linear and quadratic logistic."""
    colour = images.mean(axis=(1, 2))
    colour = (colour - colour[train].mean(0)) / colour[train].std(0)
    centroids = np.stack([colour[train][labels[train] == c].mean(0) for c in range(len(CLASSES))])
    nearest = np.argmin(((colour[test, None] - centroids[None]) ** 2).sum(-1), axis=1)
    scores = [_balanced_accuracy(labels[test], nearest)]

    r, g, b = colour.T
    ones = np.ones_like(r)
    for features in (
        np.stack([r, g, b, ones], 1),
        np.stack([r, g, b, r * r, g * g, b * b, r * g, g * b, r * b, ones], 1),
    ):
        weights = np.zeros((features.shape[1], len(CLASSES)))
        one_hot = np.eye(len(CLASSES))[labels[train]]
        # Class-weighted, like the report's loss, so that the classifier aims at balanced accuracy.
        class_weight = (len(train) / (len(CLASSES) * np.bincount(labels[train])))[labels[train], None]
        for _ in range(1500):
            logits = features[train] @ weights
            probabilities = np.exp(logits - logits.max(1, keepdims=True))
            probabilities /= probabilities.sum(1, keepdims=True)
            weights -= 0.5 * features[train].T @ ((probabilities - one_hot) * class_weight) / len(train)
        scores.append(_balanced_accuracy(labels[test], np.argmax(features[test] @ weights, 1)))
    return max(scores)


def _tiny_cnn(width: int = 16) -> nn.Module:
    def block(inputs: int, outputs: int) -> list[nn.Module]:
        return [nn.Conv2d(inputs, outputs, 3, padding=1, bias=False), nn.BatchNorm2d(outputs), nn.ReLU()]

    return nn.Sequential(
        *block(3, width),
        nn.MaxPool2d(2),
        *block(width, 2 * width),
        nn.MaxPool2d(2),
        *block(2 * width, 4 * width),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4 * width, len(CLASSES)),
    )


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    # One thread: the convolutions are tiny, and on a shared 2-core machine two threads that
    # wait on each other were measured 5x slower (20 s against 4 s) than one.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _cnn_accuracy(
    images: np.ndarray, labels: np.ndarray, train: np.ndarray, test: np.ndarray, epochs: int = 12
) -> float:
    torch.manual_seed(0)
    inputs = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    # Per-image standardisation as in the report: removes each image's brightness and contrast.
    inputs = (inputs - inputs.mean((1, 2, 3), keepdim=True)) / inputs.std((1, 2, 3), keepdim=True)
    targets = torch.from_numpy(labels)
    model = _tiny_cnn()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    batch_size = 32
    steps_per_epoch = -(-len(train) // batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 5e-3, total_steps=epochs * steps_per_epoch)
    weight = torch.tensor(len(train) / (len(CLASSES) * np.bincount(labels[train])), dtype=torch.float32)
    loss_function = nn.CrossEntropyLoss(weight=weight)
    order = torch.Generator().manual_seed(0)
    train_index = torch.from_numpy(train)
    for _ in range(epochs):
        model.train()
        for batch in train_index[torch.randperm(len(train), generator=order)].split(batch_size):
            optimizer.zero_grad()
            loss_function(model(inputs[batch]), targets[batch]).backward()
            optimizer.step()
            schedule.step()
    model.eval()
    with torch.no_grad():
        predicted = model(inputs[torch.from_numpy(test)]).argmax(1).numpy()
    return _balanced_accuracy(labels[test], predicted)


def test_style_is_learnable_but_mean_colour_is_not(demo_dir: Path, one_torch_thread: None) -> None:
    rows = _rows(demo_dir)
    labels = _labels(rows)
    images = _load(demo_dir, rows, pixels=40)
    train, test = _stratified_split(labels, train_fraction=0.7, seed=1)

    mean_colour = _mean_colour_accuracy(images, labels, train, test)
    cnn = _cnn_accuracy(images, labels, train, test)
    print(
        f"balanced accuracy on {len(test)} held-out images: CNN {cnn:.3f}, mean colour {mean_colour:.3f}, chance 0.200"
    )
    assert cnn > 0.6
    assert mean_colour < 0.45
    assert cnn - mean_colour > 0.15


# --- the cached default set --------------------------------------------------------------------


@pytest.fixture
def small_builds(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Make `demo_data_dir` build 20 small images instead of 600 and record each build."""
    builds: list[Path] = []
    real_make = demo.make_demo_dataset

    def small_make(out_dir: Path, images: int = 600, seed: int = 0, size: int = 128) -> Path:
        builds.append(Path(out_dir))
        return real_make(out_dir, images=20, seed=seed, size=32)

    monkeypatch.setattr(demo, "make_demo_dataset", small_make)
    return builds


def test_demo_data_dir_builds_once_and_reuses(
    tmp_path: Path, small_builds: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    first = demo_data_dir(tmp_path)
    assert first == tmp_path / "demo-v1-600-0"
    assert (first / "prado.csv").is_file() and len(list((first / "images").glob("*.jpg"))) == 20
    message = capsys.readouterr().err
    assert str(first) in message and "python -m prado_dist.data fetch" in message

    assert demo_data_dir(tmp_path) == first
    assert len(small_builds) == 1
    assert capsys.readouterr().err == ""  # said once only
    assert sorted(path.name for path in tmp_path.iterdir()) == ["demo-v1-600-0", "demo-v1-600-0.lock"]


def test_demo_data_dir_concurrent_callers_share_one_build(
    tmp_path: Path, small_builds: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PRADO_DIST_CACHE", str(tmp_path / "env-cache"))
    (tmp_path / "env-cache").mkdir()
    (tmp_path / "env-cache" / "demo-v1-600-0.tmp-killed").mkdir()  # a killed build's leftovers
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(demo_data_dir())) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [tmp_path / "env-cache" / "demo-v1-600-0"] * 4
    assert len(small_builds) == 1
    assert not list((tmp_path / "env-cache").glob("*.tmp-*"))


def test_cli_main_writes_the_dataset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    args = parser.parse_args(["--out", str(tmp_path / "d"), "--images", "12", "--size", "32"])
    assert demo.main(args) == 0
    assert len(_rows(tmp_path / "d")) == 12
    assert "wrote 12 generated images" in capsys.readouterr().out
