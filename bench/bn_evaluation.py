"""Validation with BatchNorm statistics recomputed for the evaluated weights (issue 22), side by side.

Training never reads BatchNorm's running statistics (train mode normalises with batch statistics),
so ONE training run per configuration gives every evaluation variant: after each epoch the network
is validated as trained (its running statistics, `running`) and, on a copy, after recomputing the
statistics from N training images (`recalibrated_N`, prado_dist/engine/batchnorm.py). The runs
themselves are trained with `bn_recalibration_images` off; the copies make the in-place
recalibration of a real run, whose statistics depend on the weights only.

`ranking`: random configurations from search_spaces/mobilenet.yaml's ranges (lr, decay, pca_std,
flip_prob), mobilenet, 32 px, 16 epochs, `bn_momentum` 0.3 as the README's searches; per variant the
Spearman correlation between each configuration's score after epochs 1, 2, 4 and its best.

`defaults`: the train CLI's defaults (`bn_momentum` the models' 0.01) at 96 px, 20 epochs; per
variant the best validation epoch's test balanced accuracy, as `python -m prado_dist.train` reports.

    python bench/bn_evaluation.py ranking [--data DIR ...] [--configs 12]
    python bench/bn_evaluation.py defaults [--model mobilenet] [--image-size 96] [--epochs 20]

Appends one JSON line per experiment and dataset to bench/results/bn_evaluation.jsonl.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import record  # noqa: E402

from prado_dist.config import TrainConfig  # noqa: E402
from prado_dist.engine.loop import evaluate  # noqa: E402
from prado_dist.engine.process import load_data  # noqa: E402
from prado_dist.engine.session import TrainingRun  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
PAINTINGS_DEV = Path(__file__).resolve().parents[2] / "shared" / "data" / "paintings-dev"
METRIC = "val_balanced_accuracy"


def draw_configurations(count: int, seed: int) -> list[dict[str, float]]:
    """`count` draws from search_spaces/mobilenet.yaml's ranges of lr, decay, pca_std and flip_prob."""
    rng = np.random.default_rng(seed)
    return [
        {
            "lr": float(np.exp(rng.uniform(np.log(1e-4), np.log(1e-2)))),
            "decay": float(rng.uniform(0.0, 0.15)),
            "pca_std": float(rng.uniform(0.0, 0.3)),
            "flip_prob": float(rng.choice([0.0, 0.5])),
        }
        for _ in range(count)
    ]


class VariantEvaluator:
    """After every epoch: the run's own validation and each recalibrated copy's, and the best of each."""

    def __init__(self, images: list[int], keep_best: bool = False) -> None:
        self.images = images
        self.keep_best = keep_best
        self.curves: dict[str, list[float]] = {"running": [], **{f"recalibrated_{n}": [] for n in images}}
        self.recalibration_seconds: dict[str, list[float]] = {f"recalibrated_{n}": [] for n in images}
        self.best_states: dict[str, dict] = {}

    def __call__(self, epoch: int, metrics: dict[str, float], run: TrainingRun) -> None:
        self._record("running", metrics[METRIC], run.network)
        for n in self.images:
            network = copy.deepcopy(run.network)
            seconds = run.recalibrate_batchnorm(network, images=n)
            self.recalibration_seconds[f"recalibrated_{n}"].append(seconds)
            val, _ = evaluate(
                network, run.loaders["val"], run.loss_fn, run.pipeline, device=run.device, classes=run.classes
            )
            self._record(f"recalibrated_{n}", val[METRIC], network)
        scores = "  ".join(f"{name} {curve[-1]:.3f}" for name, curve in self.curves.items())
        print(f"  epoch {epoch + 1:>2}  train loss {metrics['train_loss']:.4f}  {scores}", flush=True)

    def _record(self, variant: str, score: float, network) -> None:
        curve = self.curves[variant]
        if self.keep_best and (not curve or score > max(curve)):  # the CLI keeps the first best epoch
            self.best_states[variant] = copy.deepcopy(network.state_dict())
        curve.append(score)


def spearman_with_best(curves: list[list[float]], epochs: tuple[int, ...] = (1, 2, 4)) -> dict[str, float]:
    best = [max(curve) for curve in curves]
    return {f"epoch_{e}": float(spearmanr([curve[e - 1] for curve in curves], best).statistic) for e in epochs}


def ranking(args: argparse.Namespace) -> None:
    configurations = draw_configurations(args.configs, args.seed)
    for data_dir in args.data:
        data_dir = None if str(data_dir) == "demo" else data_dir
        data = load_data(TrainConfig(data_dir=data_dir, image_size=args.image_size))
        runs = []
        for number, params in enumerate(configurations):
            config = TrainConfig(
                model="mobilenet",
                data_dir=data_dir,
                image_size=args.image_size,
                epochs=args.epochs,
                bn_momentum=0.3,  # as the README's searches
                bn_recalibration_images=None,
                device="cpu",
                **params,
            )
            print(f"{data_dir or 'demo'} configuration {number}: {params}", flush=True)
            evaluator = VariantEvaluator(args.images)
            history = TrainingRun(config, data).fit(evaluator)
            runs.append(run_summary(params, history, evaluator))
        variants = list(runs[0]["curves"])
        correlations = {v: spearman_with_best([r["curves"][v] for r in runs]) for v in variants}
        shares = {v: statistics.median(r["recalibration_share_of_epoch"][v] for r in runs) for v in variants[1:]}
        line = record(
            {
                "benchmark": "bn_evaluation",
                "experiment": "ranking",
                "data": str(data_dir or "demo"),
                "train_images": len(data.splits["train"]),
                "model": "mobilenet",
                "image_size": args.image_size,
                "epochs": args.epochs,
                "bn_momentum": 0.3,
                "spearman_with_best": correlations,
                "median_recalibration_share_of_epoch": shares,
                "runs": runs,
            }
        )
        append(line)
        print(json.dumps({"spearman_with_best": correlations, "share_of_epoch": shares}, indent=1), flush=True)


def run_summary(params: dict, history: list[dict], evaluator: VariantEvaluator) -> dict:
    epoch_seconds = [m["epoch_seconds"] for m in history]
    shares = {
        name: statistics.median(s / e for s, e in zip(seconds, epoch_seconds, strict=True))
        for name, seconds in evaluator.recalibration_seconds.items()
    }
    return {
        "params": params,
        "train_losses": [m["train_loss"] for m in history],
        "median_epoch_seconds": statistics.median(epoch_seconds),
        "recalibration_share_of_epoch": shares,
        "curves": evaluator.curves,
    }


def defaults(args: argparse.Namespace) -> None:
    data_dir = args.data[0]
    config = TrainConfig(
        model=args.model,
        data_dir=data_dir,
        image_size=args.image_size,
        epochs=args.epochs,
        bn_recalibration_images=None,
        device="cpu",
    )
    data = load_data(config)
    evaluator = VariantEvaluator(args.images, keep_best=True)
    started = time.perf_counter()
    run = TrainingRun(config, data)
    history = run.fit(evaluator)
    tests = {}
    for variant, state in evaluator.best_states.items():
        run.network.load_state_dict(state)
        metrics, _ = run.evaluate("test")
        curve = evaluator.curves[variant]
        tests[variant] = {
            "best_epoch": curve.index(max(curve)) + 1,
            "best_val_balanced_accuracy": max(curve),
            "test_balanced_accuracy": metrics["test_balanced_accuracy"],
            "test_accuracy": metrics["test_accuracy"],
        }
    line = record(
        {
            "benchmark": "bn_evaluation",
            "experiment": "defaults",
            "data": str(data_dir),
            "train_images": len(data.splits["train"]),
            "model": args.model,
            "image_size": args.image_size,
            "epochs": args.epochs,
            "bn_momentum": config.bn_momentum,
            "seconds": time.perf_counter() - started,
            "test": tests,
            **run_summary({}, history, evaluator),
        }
    )
    append(line)
    print(json.dumps(tests, indent=1), flush=True)


def append(line: dict) -> None:
    RESULTS.mkdir(exist_ok=True)
    with open(RESULTS / "bn_evaluation.jsonl", "a") as out:
        out.write(json.dumps(line) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("experiment", choices=["ranking", "defaults"])
    parser.add_argument("--data", nargs="+", default=None, help="dataset folders, or 'demo' (ranking: both)")
    parser.add_argument("--images", type=int, nargs="+", default=[256], help="recalibration images per variant")
    parser.add_argument("--configs", type=int, default=12, help="ranking: random configurations")
    parser.add_argument("--seed", type=int, default=0, help="ranking: seed of the configurations' draws")
    parser.add_argument("--model", default="mobilenet", help="defaults: the model")
    parser.add_argument("--image-size", type=int, default=None, help="default: 32 (ranking), 96 (defaults)")
    parser.add_argument("--epochs", type=int, default=None, help="default: 16 (ranking), 20 (defaults)")
    args = parser.parse_args()
    is_ranking = args.experiment == "ranking"
    chosen = args.data or ([PAINTINGS_DEV, "demo"] if is_ranking else [PAINTINGS_DEV])
    args.data = [Path(d) if d != "demo" else d for d in chosen]
    args.image_size = args.image_size or (32 if is_ranking else 96)
    args.epochs = args.epochs or (16 if is_ranking else 20)
    for data_dir in args.data:
        if data_dir != "demo" and not data_dir.is_dir():
            raise SystemExit(f"no data at {data_dir}: pass --data DIR (a folder per painter) or demo")
    ranking(args) if is_ranking else defaults(args)


if __name__ == "__main__":
    main()
