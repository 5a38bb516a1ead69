"""How much an average of the weights (`ema_decay`) steadies and raises the validation curve.

A search reads its metric after every epoch on a small validation split (about 125 images of
paintings-dev). This trains the same seeded configuration once per `--decays` value (`none`: the
weights as trained) with the engine alone, no Ray, and compares the validation curves of those runs.
Training is the same in each (the average never touches it: the train losses are checked equal),
so the curves differ only in which weights are validated.

Per run it records the curve and: the mean absolute change between consecutive epochs after the
fifth (how much the metric swings), the mean of the last 4 epochs (what a full trial is worth), the
best epoch, and the value after 2 epochs (what ASHA's first rung sees).

    python bench/ema_probe.py [--data ../shared/data/paintings-dev] [--lrs 3e-4 1e-3 2.5e-3 7e-3]

Appends one JSON line to bench/results/ema_probe.jsonl.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from itertools import pairwise
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import record  # noqa: E402

from prado_dist.config import TrainConfig  # noqa: E402
from prado_dist.engine.process import load_data  # noqa: E402
from prado_dist.engine.session import TrainingRun  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "paintings-dev"
# Learning rate, decay, decay start: drawn from the MobileNet space's ranges, low to high lr.
CONFIGS = {3e-4: (0.05, 5), 1e-3: (0.05, 10), 2.5e-3: (0.01, 6), 7e-3: (0.03, 12)}
SUMMARY = ("mean_abs_change_after_epoch_5", "mean_last_4", "best", "after_2_epochs")


def summary(curve: list[float]) -> dict[str, float]:
    swings = statistics.mean(abs(b - a) for a, b in pairwise(curve[5:]))
    return dict(zip(SUMMARY, (swings, statistics.mean(curve[-4:]), max(curve), curve[1]), strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--lrs", type=float, nargs="+", default=list(CONFIGS))
    parser.add_argument("--decays", nargs="+", default=["none", "0.9", "0.97"])
    parser.add_argument("--epochs", type=int, default=16, help="at least 7 (swings are measured after epoch 5)")
    parser.add_argument("--image-size", type=int, default=32)
    args = parser.parse_args()
    if args.epochs < 7:
        raise SystemExit(f"--epochs {args.epochs}: at least 7, to measure the swings after epoch 5")
    if not args.data.is_dir():
        raise SystemExit(f"no data at {args.data}: pass --data DIR (a folder per painter)")

    runs = []
    data = load_data(TrainConfig(data_dir=args.data, image_size=args.image_size))  # decoded once, shared by all runs
    for lr in args.lrs:
        decay, decay_start = CONFIGS.get(lr, (0.05, 10))
        train_losses = []
        for ema in args.decays:
            config = TrainConfig(
                model="mobilenet",
                data_dir=args.data,
                image_size=args.image_size,
                epochs=args.epochs,
                bn_momentum=0.3,  # as the search_efficiency runs (short runs, see TrainConfig)
                lr=lr,
                decay=decay,
                decay_start=decay_start,
                ema_decay=None if ema == "none" else float(ema),
            )
            started = time.perf_counter()
            history = TrainingRun(config, data).fit()
            curve = [m["val_balanced_accuracy"] for m in history]
            train_losses.append([m["train_loss"] for m in history])
            runs.append({"lr": lr, "ema_decay": ema, "seconds": time.perf_counter() - started, "curve": curve})
            runs[-1].update(summary(curve))
            print(f"lr {lr:g} ema {ema}: " + " ".join(f"{v:.2f}" for v in curve), flush=True)
        if any(losses != train_losses[0] for losses in train_losses):
            raise SystemExit(f"lr {lr:g}: the train losses differ between averages: the average changed training")

    by_decay = {
        ema: {key: statistics.median(r[key] for r in runs if r["ema_decay"] == ema) for key in SUMMARY}
        for ema in args.decays
    }
    line = record(
        {
            "benchmark": "ema_probe",
            "data": str(args.data),
            "epochs": args.epochs,
            "image_size": args.image_size,
            "median_over_lrs": by_decay,
            "runs": runs,
        }
    )
    RESULTS.mkdir(exist_ok=True)
    with open(RESULTS / "ema_probe.jsonl", "a") as out:
        out.write(json.dumps(line) + "\n")
    print(json.dumps(by_decay, indent=1))


if __name__ == "__main__":
    main()
