"""What Ray Train costs over the plain engine: steady-state images/s and start-up time, side by side.

The same model (mobilenet, 64 px, the generated demo set, global batch 32, report recipe) is trained by

  a  the engine in this process: `TrainingRun(config, data).fit()` (torch threads = this machine's cores),
  b  Ray Train, 1 worker x (cores) CPUs: the same thread count as (a), so the difference is Ray's,
  c  Ray Train, 2 workers x 1 CPU (DDP over gloo), also on this machine,

in an interleaved order (default "a b c b a": drifting load from other users hits a and b alike), all
while the same local Ray instance is up. Appends one JSON line to bench/results/ray_overhead.jsonl.

    python bench/ray_overhead.py                          # ~6 min on 2 loaded cores
    python bench/ray_overhead.py --schedule "a b a b" --epochs 4

What is measured, per run:
* steady state: the engine's own per-epoch `images_per_second` (training loop only: training images /
  seconds inside `train_one_epoch`, summed over workers), median over every epoch after the first;
  and a wall rate, training images / median time between consecutive epoch ends, which also pays for
  validation, the checkpoint and `ray.train.report`.
* start-up: time from the call (data preparation and model construction included; for Ray: trainer,
  controller, worker processes, process group) to the end of the first epoch, minus the first epoch's
  own training-loop seconds, minus the steady per-epoch non-training time (validation, checkpoint,
  report; median of period - training seconds over later epochs). For Ray, epoch ends are seen by a
  `ray.train.UserCallback` on the Train controller, which polls the workers every 2 s
  (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S): each Ray time carries up to 2 s of that latency.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import ray
import ray.train
import torch

from prado_dist.config import TrainConfig
from prado_dist.data import prepare_data, split_counts
from prado_dist.data.demo import demo_data_dir
from prado_dist.distributed import WorkerResources, build_trainer, check_fits
from prado_dist.distributed.resources import local_ray_init_kwargs
from prado_dist.engine import TrainingRun

RESULTS = Path(__file__).resolve().parent / "results" / "ray_overhead.jsonl"
GOAL_STEADY_RATIO = 0.9  # Ray Train, 1 worker, at >= 90% of the engine's steady-state images/s
GOAL_STARTUP_SECONDS = 15.0


# --- helpers ----------------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict[str, Any]:
    return {
        "hostname": platform.node(),
        "cpu_model": cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "ray": ray.__version__,
        "python": platform.python_version(),
    }


class EpochEndRecorder(ray.train.UserCallback):
    """Runs on the Train controller: appends (time, rank 0's epoch metrics) to a file per report."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        keys = ("epoch", "epoch_seconds", "images_per_second")
        record = {"time": time.time(), **{key: metrics[0][key] for key in keys}}
        with open(self.path, "a") as file:
            file.write(json.dumps(record) + "\n")


def summarise_run(started: float, epochs: list[dict[str, float]]) -> dict[str, Any]:
    """Start-up and steady-state figures of one run from its epoch-end records (see module docstring)."""
    ends = [started] + [e["time"] for e in epochs]
    periods = [later - earlier for earlier, later in zip(ends[1:], ends[2:], strict=False)]
    overheads = [period - e["epoch_seconds"] for period, e in zip(periods, epochs[1:], strict=True)]
    time_to_first_epoch = epochs[0]["time"] - started
    return {
        "time_to_first_epoch_s": time_to_first_epoch,
        "first_epoch_train_s": epochs[0]["epoch_seconds"],
        "steady_non_training_s_per_epoch": statistics.median(overheads),
        "startup_s": time_to_first_epoch - epochs[0]["epoch_seconds"] - statistics.median(overheads),
        "steady_period_s": statistics.median(periods),
        "epochs": [{**e, "time": e["time"] - started} for e in epochs],
    }


# --- the three ways to train ------------------------------------------------------------------------


def run_engine(config: TrainConfig) -> dict[str, Any]:
    started = time.time()
    data = prepare_data(config.data_dir, config.image_size, cache_dir=config.cache_dir)
    run = TrainingRun(config, data)
    epochs: list[dict[str, float]] = []
    run.fit(lambda epoch, m, _: epochs.append(
        {"time": time.time(), "epoch": epoch, "epoch_seconds": m["epoch_seconds"],
         "images_per_second": m["images_per_second"]}))
    return {**summarise_run(started, epochs), "torch_threads": torch.get_num_threads()}


def run_ray(config: TrainConfig, resources: WorkerResources, storage: Path, name: str) -> dict[str, Any]:
    events = storage / f"{name}.epochs.jsonl"
    check_fits(resources)
    trainer = build_trainer(config, resources, storage=storage, name=name, max_failures=0,
                            callbacks=[EpochEndRecorder(events)])
    started = time.time()
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    epochs = [json.loads(line) for line in events.read_text().splitlines()]
    return {**summarise_run(started, epochs), "workers": resources.workers,
            "cpus_per_worker": resources.cpus_per_worker}


# --- main -------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--schedule", default="a b c b a", help="order of runs: a engine, b Ray 1 worker, c 2")
    parser.add_argument("--epochs", type=int, default=3, help="per run; the first is start-up, the rest steady")
    parser.add_argument("--model", default="mobilenet")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    schedule = args.schedule.split()
    if not schedule or set(schedule) - {"a", "b", "c"} or args.epochs < 2:
        parser.error(f"--schedule takes a, b, c (got {args.schedule!r}); --epochs must be >= 2")

    cores = os.cpu_count() or 1
    data_dir = demo_data_dir()
    config = TrainConfig(data_dir=data_dir, image_size=args.image_size, model=args.model, epochs=args.epochs,
                         batch_size=args.batch_size, device="cpu")
    data = prepare_data(data_dir, args.image_size)  # build the decoded cache now, outside every timing
    train_images = sum(split_counts(data)["train"])
    resources = {"b": WorkerResources(workers=1, cpus_per_worker=cores), "c": WorkerResources(workers=2)}

    temp_dir = os.environ.get("RAY_TMPDIR") or tempfile.mkdtemp(prefix="ray-bench-", dir="/tmp")
    storage = Path(tempfile.mkdtemp(prefix="ray-overhead-"))
    ray.init(**{**local_ray_init_kwargs(max(2, cores)), "log_to_driver": False}, _temp_dir=temp_dir)
    runs: list[dict[str, Any]] = []
    try:
        for index, kind in enumerate(schedule):
            if kind == "a":
                run = run_engine(config)
            else:
                run = run_ray(config, resources[kind], storage, name=f"{kind}{index}")
            runs.append({"kind": kind, **run})
            print(f"{kind}: startup {run['startup_s']:5.1f} s (first epoch ends at "
                  f"{run['time_to_first_epoch_s']:.1f} s)  steady "
                  + " ".join(f"{e['images_per_second']:.1f}" for e in run["epochs"][1:]) + " img/s", flush=True)
    finally:
        ray.shutdown()
        shutil.rmtree(storage, ignore_errors=True)

    figures: dict[str, dict[str, float]] = {}
    for kind in sorted(set(schedule)):
        mine = [r for r in runs if r["kind"] == kind]
        steady = [e["images_per_second"] for r in mine for e in r["epochs"][1:]]
        figures[kind] = {
            "steady_images_per_second": statistics.median(steady),
            "wall_images_per_second": train_images / statistics.median(r["steady_period_s"] for r in mine),
            "startup_s": statistics.median(r["startup_s"] for r in mine),
            "time_to_first_epoch_s": statistics.median(r["time_to_first_epoch_s"] for r in mine),
            "runs": len(mine),
        }
    ratios = {}
    for kind in ("b", "c"):
        if kind in figures and "a" in figures:
            for measure in ("steady_images_per_second", "wall_images_per_second"):
                ratios[f"{kind}_over_a_{measure}"] = figures[kind][measure] / figures["a"][measure]
    goals = {}
    if "b_over_a_steady_images_per_second" in ratios:
        ratio = ratios["b_over_a_steady_images_per_second"]
        goals[f"b_steady_ge_{GOAL_STEADY_RATIO}_a"] = ratio >= GOAL_STEADY_RATIO
    if "b" in figures:
        goals[f"b_startup_lt_{GOAL_STARTUP_SECONDS:g}s"] = figures["b"]["startup_s"] < GOAL_STARTUP_SECONDS

    engine_threads = next((r["torch_threads"] for r in runs if r["kind"] == "a"), None)
    record = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "machine": machine_info(),
        "load_average_1min": os.getloadavg()[0],  # other users of a shared machine slow every run down
        "model": args.model, "image_size": args.image_size, "batch_size": args.batch_size,
        "epochs_per_run": args.epochs, "train_images": train_images, "schedule": schedule,
        "resources": {"a": f"this process, {engine_threads} torch threads",
                      "b": f"1 worker x {resources['b'].cpus_per_worker:g} CPUs", "c": "2 workers x 1 CPU"},
        "figures": figures, "ratios": ratios, "goals": goals, "runs": runs,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    with args.output.open("a") as results:
        results.write(json.dumps(record) + "\n")
    for kind, figure in figures.items():
        print(f"{kind}: steady {figure['steady_images_per_second']:.1f} img/s, "
              f"wall {figure['wall_images_per_second']:.1f} img/s, start-up {figure['startup_s']:.1f} s "
              f"({figure['runs']} runs)")
    print("ratios:", {k: round(v, 3) for k, v in ratios.items()}, "goals:", goals)
    return 0


if __name__ == "__main__":
    sys.exit(main())
