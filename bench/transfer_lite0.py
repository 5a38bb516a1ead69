"""Real ImageNet transfer learning against the report's CNNs from scratch, side by side (issue 24).

On one dataset (default ../shared/data/paintings-dev), one split and one image size, each
configuration is one single-process `TrainingRun`; its best epoch by validation balanced accuracy is
evaluated once on the test split. Wall time covers building the run (and the backbone's feature
pass) and training:

- `lite0 frozen`: the report's transfer recipe (frozen backbone, head on cached features, 25 epochs,
  Adam 1e-3, no augmentation, no class weights, no schedule) with the packaged ImageNet weights;
- `lite0 frozen, random weights`: the same head on a randomly initialised backbone (the control);
- `lite0 fine-tune N`: the last N of its 5 stages trained too (`--finetune-epochs`, `--finetune-lr`);
- the report's CNNs from scratch with the tool's defaults (its recipe), for `--cnn-epochs` epochs.

    python bench/transfer_lite0.py --image-size 96 --cnns mobilenet
    python bench/transfer_lite0.py --image-size 224 --cnns mobilenet resnet29 vgg   # the issue's size: hours on 2 cores
Appends one JSON line per configuration (a shared run_id) to bench/results/transfer_lite0.jsonl.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from prado_dist.config import TrainConfig
from prado_dist.data import prepare_data, split_counts
from prado_dist.engine import TrainingRun

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import record  # noqa: E402  (a sibling bench module)

RESULTS = Path(__file__).resolve().parent / "results" / "transfer_lite0.jsonl"
SHARED_PAINTINGS = Path(__file__).resolve().parents[2] / "shared" / "data" / "paintings-dev"
# The report's transfer setting (chapter 5), as search_spaces/lite0.yaml fixes it.
TRANSFER = {"model": "lite0", "epochs": 25, "flip_prob": 0.0, "pca_std": 0.0, "class_weights": False,
            "output_bias": False, "decay": 0.0, "decay_start": 1}  # fmt: skip


def configurations(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """name -> TrainConfig overrides of every configuration measured."""
    runs = {
        "lite0 frozen": {**TRANSFER, "pretrained": "package"},
        "lite0 frozen, random weights": dict(TRANSFER),
    }
    finetune = {
        f"lite0 fine-tune {stages}": {
            **TRANSFER,
            "pretrained": "package",
            "unfreeze_stages": stages,
            "epochs": args.finetune_epochs,
            "lr": args.finetune_lr,
        }
        for stages in args.finetune_stages
    }
    scratch = {f"{cnn} from scratch": {"model": cnn, "epochs": args.cnn_epochs} for cnn in args.cnns}
    first, *rest = list(finetune.items()) or [(None, None)]
    # The first fine-tuning before the CNNs, the others after: a run cut short still compares each kind.
    ordered = ([first] if first[0] else []) + list(scratch.items()) + rest
    runs.update(ordered)
    return runs


def best_epoch_run(overrides: dict[str, Any], data, common: dict[str, Any]) -> dict[str, Any]:
    """Train one configuration; test metrics of its best validation epoch, wall time, history."""
    started = time.perf_counter()
    run = TrainingRun(TrainConfig().with_overrides({**common, **overrides}), data)
    best: dict[str, Any] = {"score": float("-inf")}

    def keep_best(epoch: int, metrics: dict[str, float], run: TrainingRun) -> None:
        if metrics["val_balanced_accuracy"] > best["score"]:
            best.update(score=metrics["val_balanced_accuracy"], epoch=epoch,
                        model=copy.deepcopy(run.evaluated_network.state_dict()))  # fmt: skip

    history = run.fit(keep_best)
    seconds = time.perf_counter() - started
    run.load_model_state(best["model"])
    test, _ = run.evaluate("test")
    return {
        "test_balanced_accuracy": test["test_balanced_accuracy"],
        "test_accuracy": test["test_accuracy"],
        "best_epoch": best["epoch"],
        "best_val_balanced_accuracy": best["score"],
        "wall_s": seconds,
        "feature_cache": run.use_features,
        "features_s": run.features_seconds,
        "trainable_parameters": sum(p.numel() for p in run.network.parameters() if p.requires_grad),
        "settings": {key: str(value) for key, value in overrides.items()},
        "val_curve": [round(epoch["val_balanced_accuracy"], 4) for epoch in history],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=SHARED_PAINTINGS)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--cnns", nargs="*", default=["mobilenet"], choices=["mobilenet", "resnet29", "vgg"])
    parser.add_argument("--cnn-epochs", type=int, default=50, help="the report's 50; fewer on a CPU")
    parser.add_argument("--finetune-stages", type=int, nargs="*", default=[1, 2])
    parser.add_argument("--finetune-epochs", type=int, default=10)
    parser.add_argument("--finetune-lr", type=float, default=1e-4)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    data = prepare_data(args.data, args.image_size)
    # A cold feature cache, so that the frozen run's time includes its one backbone pass.
    common = {"image_size": args.image_size, "data_dir": args.data, "device": "cpu",
              "cache_dir": Path(tempfile.mkdtemp(prefix="transfer-lite0-"))}  # fmt: skip
    counts = split_counts(data)
    shared = {"data": f"{args.data.name} ({len(data.labels)} images)", "image_size": args.image_size,
              "images": {split: sum(values) for split, values in counts.items()},
              "run_id": time.strftime("%Y%m%dT%H%M%S")}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for name, overrides in configurations(args).items():
        result = best_epoch_run(overrides, data, common)
        # One line per configuration, written as it finishes (a CPU run takes long); run_id groups them.
        with args.out.open("a") as out:
            out.write(json.dumps(record({**shared, "configuration": name, **result})) + "\n")
        print(f"{name:30s} test balanced accuracy {result['test_balanced_accuracy']:.3f} "
              f"(best epoch {result['best_epoch']}) in {result['wall_s']:7.1f} s", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
