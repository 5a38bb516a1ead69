"""`python -m prado_dist.data inspect`: what a dataset folder holds before anyone trains on it.

Prints images per class and per split (building the decode cache if needed, since the split is
made over the images that decode), the source files' pixel sizes, and every file left out.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from prado_dist.config import TrainConfig
from prado_dist.data.cache import describe_duplicates
from prado_dist.data.dataset import PreparedData, prepare_data, split_counts
from prado_dist.data.sources import DataError, SampleSet, find_samples


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = TrainConfig()
    parser.add_argument("--data", type=Path, required=True, help="dataset folder (Kaggle or folder-per-class layout)")
    parser.add_argument("--image-size", type=int, default=defaults.image_size, help="cache image side (px)")
    parser.add_argument(
        "--cache-dir", type=Path, default=None, help="default: $PRADO_DIST_CACHE or ~/.cache/prado_dist"
    )
    parser.add_argument("--test-fraction", type=float, default=defaults.test_fraction)
    parser.add_argument("--val-fraction", type=float, default=defaults.val_fraction)
    parser.add_argument("--split-seed", type=int, default=defaults.split_seed)


def main(args: argparse.Namespace) -> int:
    try:
        sample_set = find_samples(args.data)
        prepared = prepare_data(
            args.data,
            args.image_size,
            cache_dir=args.cache_dir,
            test_fraction=args.test_fraction,
            val_fraction=args.val_fraction,
            split_seed=args.split_seed,
        )
    except (DataError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(describe_dataset(args.data, sample_set, prepared))
    return 0


def describe_dataset(data_dir: Path, sample_set: SampleSet, prepared: PreparedData) -> str:
    """The inspect report as text: class/split table, source image sizes, rejected files."""
    lines = [
        f"dataset   {data_dir} ({sample_set.layout} layout)",
        f"cache     {prepared.fingerprint} ({prepared.image_size}x{prepared.image_size} px)",
        "",
        *_count_table(prepared),
        "",
        *_size_table([sample.path for sample in sample_set.samples]),
        "",
    ]
    if prepared.rejected:
        lines.append(f"rejected files ({len(prepared.rejected)}):")
        lines.extend(f"  {path}: {reason}" for path, reason in prepared.rejected)
    else:
        lines.append("rejected files: none")
    if prepared.duplicates:
        lines.append(describe_duplicates(prepared.duplicates, prepared.classes))
    else:
        lines.append("identical files: none")
    return "\n".join(lines)


def _count_table(prepared: PreparedData) -> list[str]:
    per_split = split_counts(prepared)
    totals = np.bincount(prepared.labels, minlength=len(prepared.classes)).tolist()
    names = list(per_split)
    width = max(len("class"), *(len(name) for name in prepared.classes))
    row = f"{{:<{width}}}" + "{:>8}" * (1 + len(names))
    lines = [row.format("class", "total", *names)]
    for label, name in enumerate(prepared.classes):
        lines.append(row.format(name, totals[label], *(per_split[split][label] for split in names)))
    lines.append(row.format("all", sum(totals), *(sum(per_split[split]) for split in names)))
    return lines


def _size_table(paths: Sequence[Path]) -> list[str]:
    sizes = []
    for path in paths:
        try:
            # Image.open reads the header only; the pixels are never decoded here.
            with Image.open(path) as image:
                sizes.append(image.size)
        except Exception:  # unreadable files are listed as rejected by prepare_data
            continue
    if not sizes:
        return ["source image sizes: no readable files"]
    widths, heights = np.array(sizes).T
    row = "{:<22}{:>8}{:>8}{:>8}"
    return [
        row.format("source image size (px)", "min", "median", "max"),
        row.format("width", widths.min(), int(np.median(widths)), widths.max()),
        row.format("height", heights.min(), int(np.median(heights)), heights.max()),
    ]
