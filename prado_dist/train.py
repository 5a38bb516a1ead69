"""`python -m prado_dist.train`: train one model with the report's configuration.

By default the run goes through Ray Train (`TorchTrainer`, W=1 included), on this machine or on
the cluster at `--address`; `--single-process` runs the same engine in this process without Ray.
Either way the best epoch's checkpoint is evaluated once on the test split, and the confusion
matrix (text, PNG, CSV) and learning curves (PNG) are written to the run's output folder.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from prado_dist.config import SCHEDULABLE, ConfigError, TrainConfig, parse_set
from prado_dist.data import DataError, PreparedData, split_counts
from prado_dist.data.demo import announce_data
from prado_dist.engine import (
    TrainingRun,
    config_from_schedule,
    evaluate_checkpoint,
    load_checkpoint,
    load_data,
    resolve_device,
    save_checkpoint,
)
from prado_dist.engine.metrics import SELECTION_METRIC
from prado_dist.engine.reporting import (
    confusion_table,
    epoch_line,
    plot_confusion,
    plot_learning_curves,
    write_confusion_csv,
)
from prado_dist.models import is_model, unknown_model

if TYPE_CHECKING:  # imported lazily below: --single-process runs never import Ray
    from prado_dist.distributed import WorkerResources

DEFAULTS = TrainConfig()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m prado_dist.train",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="Any other setting: --set KEY=VALUE (repeatable), e.g. --set pca_std=0 --set ema_decay=0.97; "
        f"settings: {', '.join(TrainConfig.model_fields)}.",
    )
    _add_setting_arguments(parser)
    parser.add_argument("--out", type=Path, default=None, help="output folder (default runs/train-MODEL-TIME)")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the unfinished run in --out, with the same settings and data; its checkpoints are "
        "unpickled (torch.load), so only resume runs you trust",
    )
    _add_ray_arguments(parser)
    return parser


def _add_setting_arguments(parser: argparse.ArgumentParser) -> None:
    """The training settings: the ones typed most as flags, any other through --set, or a replayed schedule."""
    # Each flag is a `--set` underneath (absent: the config's default).
    settings = parser.add_argument_group("settings (defaults: the report's, prado_dist/config.py)")
    for flag, kind, text in COMMON_SETTINGS:
        field = flag.removeprefix("--").replace("-", "_")
        default = DEFAULTS.model_dump()[field]
        settings.add_argument(flag, type=kind, default=argparse.SUPPRESS, help=f"{text} (default {default})")
    settings.add_argument("--data", type=Path, default=None, help="dataset root; omitted: the generated demo set")
    settings.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="any training setting"
    )
    settings.add_argument(
        "--schedule",
        type=Path,
        default=None,
        help="replay a recorded schedule (a population-based search's summary/schedule.json): its settings, "
        "epoch by epoch, on a freshly initialised model",
    )


def _add_ray_arguments(parser: argparse.ArgumentParser) -> None:
    """How Ray Train runs the training: its workers and their resources, the cluster, the storage."""
    ray_group = parser.add_argument_group("Ray Train")
    ray_group.add_argument("--workers", type=int, default=1, help="data-parallel workers")
    ray_group.add_argument("--use-gpu", action="store_true", help="one GPU per worker")
    ray_group.add_argument("--cpus-per-worker", type=float, default=1.0, help="logical CPUs per worker")
    ray_group.add_argument("--address", default=None, help="Ray cluster address; omitted: a local Ray")
    ray_group.add_argument("--storage", default=None, help="Ray storage path or URI (default OUT/ray)")
    ray_group.add_argument("--max-failures", type=int, default=2, help="worker-group restarts from checkpoint")
    ray_group.add_argument("--single-process", action="store_true", help="no Ray: train in this process")


COMMON_SETTINGS = (
    ("--model", str, "a name from prado_dist.models.list_models()"),
    ("--epochs", int, "epochs"),
    ("--image-size", int, "image side in pixels"),
    ("--batch-size", int, "global batch"),
    ("--lr", float, "initial learning rate"),
    ("--pretrained", str, "transfer models: a weight file, hf-cache, or package (lite0's installed ImageNet weights)"),
    ("--seed", int, "training seed"),
    ("--device", str, "auto, cpu or cuda: where --single-process trains and the final test runs"),
)


def config_from_args(args: argparse.Namespace, data_dir: Path | None) -> TrainConfig:
    """Defaults (or a replayed schedule's settings), then the flags given, then `--set`."""
    flags = [flag.removeprefix("--").replace("-", "_") for flag, _, _ in COMMON_SETTINGS]
    overrides = {name: getattr(args, name) for name in flags if hasattr(args, name)} | parse_set(args.overrides)
    if args.schedule is not None:
        return replayed_config(args.schedule, {**overrides, "data_dir": data_dir})
    if not is_model(overrides.get("model", DEFAULTS.model)):  # checked here, before the images are decoded
        raise ConfigError(f"--model: {unknown_model(overrides['model'])}")
    return TrainConfig().with_overrides({**overrides, "data_dir": data_dir})


def replayed_config(path: Path, overrides: dict) -> TrainConfig:
    """The config that replays the schedule in `path`; what it sets epoch by epoch cannot be overridden."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"--schedule {path}: cannot read it ({err})") from None
    fixed_by_schedule = sorted(set(overrides) & {*SCHEDULABLE, "epochs"})
    if fixed_by_schedule:
        raise ConfigError(f"--schedule sets {fixed_by_schedule} epoch by epoch: edit {path} instead of passing them")
    try:
        return config_from_schedule(record, overrides)
    except ConfigError as err:
        raise ConfigError(f"--schedule {path}: {err}") from None


def train_single_process(
    config: TrainConfig, data: PreparedData, out: Path, resume: bool = False
) -> tuple[dict, list[dict]]:
    """Train in this process, keeping the best epoch's checkpoint; returns (best state, history).
    With `resume`, training goes on after the epoch of `out/last.pt`, when there is one."""
    run = TrainingRun(config, data)
    best = {"score": float("-inf"), "path": out / "best.pt"}
    if resume and (out / "last.pt").is_file():
        run.load_state_dict(load_checkpoint(out / "last.pt"))
        best["score"] = max((row[SELECTION_METRIC] for row in run.history), default=float("-inf"))

    def on_epoch_end(epoch: int, metrics: dict[str, float], run: TrainingRun) -> None:
        print(epoch_line(metrics, config.epochs), flush=True)
        save_checkpoint(out / "last.pt", run.state_dict(epoch))
        if metrics[SELECTION_METRIC] > best["score"]:
            best["score"] = metrics[SELECTION_METRIC]
            save_checkpoint(best["path"], run.state_dict(epoch))

    history = run.fit(on_epoch_end)
    return load_checkpoint(best["path"]), history


def train_with_ray(config: TrainConfig, args: argparse.Namespace, out: Path) -> tuple[dict, list[dict]]:
    """Train through Ray Train; returns (best checkpoint state, per-epoch history)."""
    from prado_dist.distributed import best_checkpoint_state, connect, load_ray_checkpoint, run_training

    resources = resources_from_args(args, config.batch_size)
    connect(args.address)
    storage = args.storage or out / "ray"
    result = run_training(config, resources, storage=storage, name=out.name, max_failures=args.max_failures)
    return best_checkpoint_state(result), load_ray_checkpoint(result.checkpoint)["history"]


def resources_from_args(args: argparse.Namespace, batch_size: int) -> WorkerResources:
    """The Ray Train workers asked for; raises `ResourceError` (a ValueError) for impossible values."""
    from prado_dist.distributed import WorkerResources, check_global_batch

    resources = WorkerResources(
        workers=args.workers, cpus_per_worker=args.cpus_per_worker, gpus_per_worker=1.0 if args.use_gpu else 0.0
    )
    check_global_batch(batch_size, resources.workers)
    return resources


def final_report(state: dict, history: list[dict], data: PreparedData, out: Path, device: str) -> dict:
    """Evaluate the best checkpoint once on the test split and write the figures and tables."""
    metrics, confusion = evaluate_checkpoint(state, data, "test", device=device)
    classes = data.classes
    print(f"\nBest epoch {int(state['epoch']) + 1} (by validation balanced accuracy), on the test split:")
    print(
        f"  accuracy {metrics['test_accuracy']:.4f}   balanced accuracy {metrics['test_balanced_accuracy']:.4f}"
        f"   macro-F1 {metrics['test_macro_f1']:.4f}"
    )
    for name in classes:
        precision, recall = metrics[f"test_precision_{name}"], metrics[f"test_recall_{name}"]
        print(f"  {name:<10} precision {precision:.3f}  recall {recall:.3f}")
    print(confusion_table(confusion, classes))
    write_confusion_csv(confusion, classes, out / "confusion_matrix.csv")
    plot_confusion(confusion, classes, out / "confusion_matrix.png")
    plot_learning_curves(history, out / "learning_curves.png", title=f"{json.loads(state['config'])['model']}")
    (out / "test_metrics.json").write_text(json.dumps(metrics, indent=2))
    (out / "history.json").write_text(json.dumps(history, indent=2))
    print(f"\nWrote {out}/: confusion_matrix.png/.csv, learning_curves.png, test_metrics.json, best.pt")
    return metrics


RUN_FILE = "run.json"  # in --out: the data fingerprint a run trains on, checked by --resume


def check_out_folder(out: Path, config: TrainConfig, resume: bool) -> None:
    """A new run needs an empty --out; --resume needs an unfinished run there with the same settings.

    Ray Train resumes a run from the checkpoints in its storage (OUT/ray), optimiser state and
    learning rate included, whatever the new settings; a finished run would train nothing and the new
    config.json would land beside the old metrics (issue 21, item 2).
    """
    if not resume:
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise ConfigError(
                f"--out {out} already holds files (an earlier run?); pass another --out (or none: a new "
                "runs/train-MODEL-TIME is made), or --resume to continue that run with the same settings"
            )
        return
    if not (out / "config.json").is_file():
        raise ConfigError(f"--resume: {out} holds no run to continue (no config.json); drop --resume to start one")
    if (out / "test_metrics.json").is_file():
        raise ConfigError(f"--resume: the run in {out} has finished (test_metrics.json); start a new one elsewhere")
    earlier = json.loads((out / "config.json").read_text())
    now = json.loads(config.model_dump_json())
    changed = {key: (earlier.get(key), now[key]) for key in now if earlier.get(key) != now[key]}
    if changed:
        listing = ", ".join(f"{key} {old!r} -> {new!r}" for key, (old, new) in changed.items())
        raise ConfigError(f"--resume: the run in {out} has other settings ({listing}); resume with its settings")


def check_same_data(out: Path, fingerprint: str) -> None:
    """--resume: the run's images must be the ones it started on (the cache key of their contents)."""
    recorded = json.loads((out / RUN_FILE).read_text()).get("data_fingerprint") if (out / RUN_FILE).is_file() else None
    if recorded != fingerprint:
        raise DataError(
            f"--resume: the run in {out} trained on other data (fingerprint {recorded or 'not recorded'}, "
            f"now {fingerprint[:12]}...); resume it with the same --data, or start a new run"
        )


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        config = config_from_args(args, announce_data(args.data))
        resolve_device(config.device)  # the final test runs there: refused now, not after training
        if not args.single_process:
            resources_from_args(args, config.batch_size)  # --workers 0 and the like: before any decoding
        out = (args.out or Path("runs") / f"train-{config.model}-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
        check_out_folder(out, config, args.resume)
        data = load_data(config)
        if args.resume:
            check_same_data(out, data.fingerprint)
    except (ConfigError, DataError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(config.model_dump_json(indent=2))
    (out / RUN_FILE).write_text(json.dumps({"data_fingerprint": data.fingerprint}))
    counts = split_counts(data)
    print(f"{config.model} on {len(data.labels)} images, classes {data.classes}; per split {counts}", flush=True)
    if args.single_process:
        state, history = train_single_process(config, data, out, resume=args.resume)
    else:
        from prado_dist.distributed import ResourceError

        try:
            state, history = train_with_ray(config, args, out)
        except (ConnectionError, ResourceError) as err:  # unreachable --address; resources that cannot fit
            print(f"error: {err}", file=sys.stderr)
            return 2
        save_checkpoint(out / "best.pt", state)
    final_report(state, history, data, out, device=config.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
