"""Time per trial of the report's transfer-learning training, with and without the feature cache.

A trial = one `TrainingRun` of the report's transfer setting (frozen backbone, no augmentation, Adam,
no class weights, no schedule) for `--epochs` (25, the report's) epochs at `--image-size` (224) px:

- first cached trial: builds the run, runs the backbone once over every image (the feature build),
  then trains the head alone for all epochs on the cached features;
- later cached trial: another head configuration; the features are reused, the backbone never runs;
- uncached trial: `feature_cache=False`, the backbone runs on every batch of every epoch. On a CPU
  it takes hours at 224 px, so it runs `--uncached-epochs` (1) epoch(s) and the trial is
  extrapolated: setup + epochs x (measured seconds per epoch), flagged `extrapolated_from_epochs`.

Images: ../shared/data/paintings-dev when present (real paintings), else the generated demo set;
`--images K` takes a stratified subset of K of them (0: all) so that a CPU run stays short. Every
figure is for that subset; the ratio cached / uncached barely depends on it (both scale with the
number of images, and a cached trial's fixed costs only make it look worse on small sets).
Backbones have random weights (nothing is downloaded): the cost is the same as with ImageNet weights.
Appends one JSON line per backbone to bench/results/feature_cache.jsonl.

    python bench/feature_cache.py                                   # 4 backbones, CPU, 64 images
    python bench/feature_cache.py --models mobilenetv2 --images 0 --uncached-epochs 25 --device cuda
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from prado_dist.config import TrainConfig
from prado_dist.data import PreparedData, prepare_data, split_counts, stratified_split
from prado_dist.engine import TrainingRun

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_step import machine_info  # noqa: E402  (a sibling bench script)

RESULTS = Path(__file__).resolve().parent / "results" / "feature_cache.jsonl"
SHARED_PAINTINGS = Path(__file__).resolve().parents[2] / "shared" / "data" / "paintings-dev"
BACKBONES = ["mobilenetv2", "efficientnet_b3", "resnet50v2", "vgg19"]


def bench_data(data_dir: Path | None, image_size: int, images: int) -> tuple[PreparedData, str]:
    """The decoded dataset (or a stratified subset of `images` of it) and a description."""
    if data_dir is None:
        if SHARED_PAINTINGS.is_dir():
            data_dir = SHARED_PAINTINGS
        else:
            from prado_dist.data import demo_data_dir

            data_dir = demo_data_dir()
    data = prepare_data(data_dir, image_size)
    name = f"{data_dir.name} ({len(data.labels)} images)"
    if not images or images >= len(data.labels):
        return data, name
    # Stratified: each class keeps its share (at least 3 images, one per split).
    rng = np.random.default_rng(0)
    keep: list[int] = []
    for label in range(len(data.classes)):
        members = np.flatnonzero(data.labels == label)
        share = max(3, round(images * len(members) / len(data.labels)))
        keep.extend(rng.choice(members, size=min(share, len(members)), replace=False).tolist())
    keep = sorted(keep)
    labels = data.labels[keep]
    subset = PreparedData(
        images=np.ascontiguousarray(data.images[keep]),
        labels=labels,
        classes=data.classes,
        splits=stratified_split(labels, 0.2, 0.2, seed=42),
        fingerprint=f"{data.fingerprint}-subset-{len(keep)}",
        rejected=[],
    )
    return subset, f"{name}, stratified subset of {len(keep)}"


def timed_trial(config: TrainConfig, data: PreparedData) -> tuple[float, float, TrainingRun]:
    """(setup seconds, training seconds, run) of one trial."""
    started = time.perf_counter()
    run = TrainingRun(config, data)
    setup = time.perf_counter() - started
    run.fit()
    return setup, time.perf_counter() - started - setup, run


def bench_backbone(name: str, args: argparse.Namespace, data: PreparedData, description: str) -> dict[str, Any]:
    cache_dir = Path(tempfile.mkdtemp(prefix="feature-bench-"))  # a cold feature cache
    try:
        config = TrainConfig().with_overrides(
            {
                "model": name,
                "image_size": args.image_size,
                "epochs": args.epochs,
                "batch_size": 32,
                "flip_prob": 0.0,
                "pca_std": 0.0,
                "class_weights": False,
                "output_bias": False,
                "decay": 0.0,
                "cache_dir": cache_dir,
                "device": args.device,
            }
        )
        first_setup, first_train, first = timed_trial(config, data)
        if not (first.use_features and first.features_built):
            raise RuntimeError(f"{name}: the first cached trial did not build the features")
        later_setup, later_train, later = timed_trial(config.with_overrides({"lr": 3e-3, "dropout": 0.2}), data)
        if later.features_built:
            raise RuntimeError(f"{name}: the second cached trial rebuilt the features")
        uncached_epochs = min(args.uncached_epochs, args.epochs)
        un_setup, un_train, _ = timed_trial(
            config.with_overrides({"feature_cache": False, "epochs": uncached_epochs}), data
        )
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)
    uncached_epoch = un_train / uncached_epochs
    uncached_trial = un_setup + args.epochs * uncached_epoch
    first_trial, later_trial = first_setup + first_train, later_setup + later_train
    counts = split_counts(data)
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable.rsplit("/", 1)[-1], *sys.argv]),
        "machine": machine_info(),
        "load_average_1min": os.getloadavg()[0],
        "model": name,
        "timm_name": first.network.timm_name,
        "device": str(first.device),
        "weights": "random init (cost only; nothing downloaded)",
        "data": description,
        "images": {split: sum(values) for split, values in counts.items()},
        "image_size": args.image_size,
        "batch_size": 32,
        "epochs": args.epochs,
        "feature_build_s": first.features_seconds,
        "feature_build_images_per_s": len(data.labels) / first.features_seconds,
        "first_cached_trial_s": first_trial,
        "later_cached_trial_s": later_trial,
        "later_cached_trial_setup_s": later_setup,
        "later_cached_trial_features_open_s": later.features_seconds,
        "uncached_trial_s": uncached_trial,
        "uncached_setup_s": un_setup,
        "uncached_epoch_s": uncached_epoch,
        "extrapolated_from_epochs": uncached_epochs if uncached_epochs < args.epochs else None,
        "ratio_later_cached_to_uncached": later_trial / uncached_trial,
        "ratio_first_cached_to_uncached": first_trial / uncached_trial,
        "goal_ratio_below": 0.1,
    }


def summary_line(record: dict[str, Any]) -> str:
    extrapolated = record["extrapolated_from_epochs"]
    return (
        f"{record['model']:16s} feature build {record['feature_build_s']:7.1f} s | trial: first cached "
        f"{record['first_cached_trial_s']:7.1f} s, later cached {record['later_cached_trial_s']:6.2f} s, uncached "
        f"{record['uncached_trial_s']:8.1f} s{f' (extrapolated from {extrapolated} epoch)' if extrapolated else ''}"
        f" | later/uncached {record['ratio_later_cached_to_uncached']:.4f}, "
        f"first/uncached {record['ratio_first_cached_to_uncached']:.3f}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=BACKBONES, choices=BACKBONES)
    parser.add_argument("--data", type=Path, default=None, help="default: ../shared/data/paintings-dev or demo")
    parser.add_argument("--images", type=int, default=64, help="stratified subset size; 0: all images")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--epochs", type=int, default=25, help="report: 25 for the transfer models")
    parser.add_argument("--uncached-epochs", type=int, default=1, help="measured; the rest is extrapolated")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    data, description = bench_data(args.data, args.image_size, args.images)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for name in args.models:
        record = bench_backbone(name, args, data, description)
        with args.out.open("a") as results:
            results.write(json.dumps(record) + "\n")
        print(summary_line(record), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
