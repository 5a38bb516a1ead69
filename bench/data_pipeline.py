"""Data pipeline throughput: decoding once vs reading the cache vs batch augmentation.

Measures, on ../shared/data/paintings-dev (real JPEGs; fallback: the generated demo set):
- decode: `prepare_data` on a cold cache in a temporary folder (hash + decode + resize + write),
- cache read: iterating `PaintingsDataset` over every image of the memory-mapped cache,
- augment: `augment_batch` on a 32x3x224x224 float batch (GPU when there is one), median of repeats,
and appends one JSON line to bench/results/data_pipeline.jsonl. The cache exists so that every
epoch after the first costs a memory copy instead of a JPEG decode; target: reads >= 20x decoding.

    python bench/data_pipeline.py [--data DIR] [--image-size 224] [--repeats 7]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from prado_dist.data import PaintingsDataset, augment_batch, prepare_data
from prado_dist.data.cache import decode_workers
from prado_dist.data.demo import make_demo_dataset

REPO = Path(__file__).resolve().parents[1]
PAINTINGS_DEV = REPO.parent / "shared" / "data" / "paintings-dev"
RESULTS = REPO / "bench" / "results" / "data_pipeline.jsonl"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=None, help=f"dataset folder (default: {PAINTINGS_DEV})")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="prado-bench-") as scratch:
        data = args.data or (PAINTINGS_DEV if PAINTINGS_DEV.is_dir() else None)
        if data is None:
            data = make_demo_dataset(Path(scratch) / "generated", images=600, size=256)
        figures = measure_cache(data, args.image_size, Path(scratch) / "cache", args.repeats)
    figures.update(measure_augment(args.repeats))
    figures["cache_read_over_decode"] = round(figures["cache_read_images_per_s"] / figures["decode_images_per_s"], 1)

    record = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", *sys.argv]),
        "machine": machine(),
        "data": str(data),
        **figures,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as handle:
        handle.write(json.dumps(record) + "\n")
    print(json.dumps(record, indent=2))
    return 0


def measure_cache(data: Path, image_size: int, cache_dir: Path, repeats: int) -> dict[str, float | int]:
    start = time.perf_counter()
    prepared = prepare_data(data, image_size, cache_dir=cache_dir)
    cold_s = time.perf_counter() - start
    images = len(prepared.labels)

    start = time.perf_counter()
    prepared = prepare_data(data, image_size, cache_dir=cache_dir)
    warm_s = time.perf_counter() - start  # hashing the files + opening the memory map

    datasets = [PaintingsDataset(prepared, split) for split in prepared.splits]
    read_times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for dataset in datasets:
            for index in range(len(dataset)):
                _image, _label = dataset[index]
        read_times.append(time.perf_counter() - start)
    return {
        "images": images,
        "image_size": image_size,
        "decode_threads": decode_workers(),
        "cold_prepare_s": round(cold_s, 3),
        "decode_images_per_s": round(images / cold_s, 1),
        "warm_prepare_s": round(warm_s, 3),
        "cache_read_images_per_s": round(images / statistics.median(read_times), 1),
    }


def measure_augment(repeats: int, batch: int = 32, size: int = 224) -> dict[str, float | str]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    x = torch.rand(batch, 3, size, size, device=device) * 255
    generator = torch.Generator(device=device).manual_seed(0)
    times = []
    for repeat in range(repeats + 2):  # two warm-up rounds (allocator, kernels)
        synchronise(device)
        start = time.perf_counter()
        augment_batch(x, flip_prob=0.5, pca_std=0.1, generator=generator)
        synchronise(device)
        if repeat >= 2:
            times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return {
        "augment_device": str(device),
        "augment_torch_threads": torch.get_num_threads(),
        "augment_batch_ms": round(1000 * median, 2),
        "augment_images_per_s": round(batch / median, 1),
    }


def synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def machine() -> dict[str, str | int | None]:
    cpu_model = platform.processor() or None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cores": os.cpu_count(),
        "cpu": cpu_model,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__,
    }


if __name__ == "__main__":
    sys.exit(main())
