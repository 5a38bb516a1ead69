"""What Ray Train costs over the plain engine: steady-state images/s and start-up time, side by side.

The same model (mobilenet, 64 px, the generated demo set, global batch 32, report recipe) is trained by

  a  the engine, `TrainingRun(config, data).fit()`, in a fresh process with 1 torch thread,
  b  Ray Train, 1 worker x 1 CPU (Ray gives it OMP_NUM_THREADS=1), on a local Ray,
  c  Ray Train, 2 workers x 1 CPU (DDP over gloo) on the same machine,
  a2 the engine in a fresh process with one torch thread per core: what (c) competes with.

The machine is shared and its load swings several-fold within a minute, so (a) and (b) run *side by
side*: (a) is built first and waits; (b) starts alone (its start-up is timed undisturbed); (a) starts
training when (b)'s first epoch is seen and is stopped when (b) ends. Only epochs during which both were
training count, so external load hits both alike. Then a2, c, a2 run one after the other, each alone.
One JSON line is appended to bench/results/ray_overhead.jsonl.

Priorities: Ray starts every worker process at nice 15 (raylet setting `worker_niceness`, env
RAY_worker_niceness), so that drivers win the CPU. Beside a nice-0 process in the same scheduling group
a Ray Train worker gets a small fraction of a core (measured here at 32 px: 265 -> 50 img/s, the engine kept
250). The engine processes are therefore started at the niceness Ray gives its workers, so that only
Ray's own work differs between (a) and (b).

    python bench/ray_overhead.py                     # ~5 min on 2 loaded cores
    python bench/ray_overhead.py --side-by-side-epochs 12 --epochs 6

Figures:
* steady images/s: the engine's own per-epoch `images_per_second` (training images / seconds inside
  `train_one_epoch`, summed over workers), median over the epochs that count (never a run's first; in
  the side-by-side pair only epochs while both trained); "wall" images/s: training images /
  median time between consecutive epoch ends, which also pays for validation, checkpoint and report.
* start-up: time from the call (data preparation and model construction included; for Ray also the
  trainer, controller, worker processes and process group) to the end of the first epoch, minus the
  first epoch's own training-loop seconds, minus the steady per-epoch non-training time (validation,
  checkpoint, report: median of period - training seconds over later epochs). Ray epoch ends are seen
  by a `ray.train.UserCallback` on the Train controller, which polls the workers every 2 s
  (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S), so each Ray time carries up to 2 s of that latency.
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import os
import shlex
import shutil
import statistics
import sys
import tempfile
import threading
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import machine  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "ray_overhead.jsonl"
GOAL_STEADY_RATIO = 0.9  # Ray Train, 1 worker, at >= 90% of the engine's steady-state images/s
GOAL_STARTUP_SECONDS = 15.0
EPOCH_KEYS = ("epoch", "epoch_seconds", "images_per_second")


# --- helpers ----------------------------------------------------------------------------------------


def append_json(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a") as file:
        file.write(json.dumps(record) + "\n")


def read_json_lines(path: Path) -> list[dict[str, Any]]:
    """The complete lines of an events file (a process stopped mid-write leaves a partial last line)."""
    records = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return records


class EpochEndRecorder(ray.train.UserCallback):
    """Runs on the Train controller: appends (time, rank 0's epoch metrics) to a file per report."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        append_json(self.path, {"time": time.time(), **{key: metrics[0][key] for key in EPOCH_KEYS}})


def with_starts(started: float, epochs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each epoch record with `start`: the previous epoch's end (the call time for the first)."""
    ends = [started] + [e["time"] for e in epochs]
    return [{**e, "start": start} for e, start in zip(epochs, ends, strict=False)]


def startup_seconds(started: float, epochs: list[dict[str, Any]]) -> dict[str, float]:
    """Start-up as defined in the module docstring (needs at least two epochs)."""
    later = with_starts(started, epochs)[1:]
    non_training = statistics.median(e["time"] - e["start"] - e["epoch_seconds"] for e in later)
    to_first_epoch = epochs[0]["time"] - started
    return {
        "time_to_first_epoch_s": to_first_epoch,
        "first_epoch_train_s": epochs[0]["epoch_seconds"],
        "steady_non_training_s_per_epoch": non_training,
        "startup_s": to_first_epoch - epochs[0]["epoch_seconds"] - non_training,
    }


def steady_figures(epochs: list[dict[str, Any]], train_images: int) -> dict[str, Any]:
    """Median per-epoch training-loop rate and wall rate over the epochs that count."""
    return {
        "steady_images_per_second": statistics.median(e["images_per_second"] for e in epochs),
        "wall_images_per_second": train_images / statistics.median(e["time"] - e["start"] for e in epochs),
        "steady_epochs": len(epochs),
    }


# --- the ways to train ------------------------------------------------------------------------------


def engine_process(config_json: str, threads: int, niceness: int, events: str, go: str | None) -> None:
    """(a)/(a2) in a spawned process: the engine with `threads` torch threads, epoch ends to `events`.

    With `go`, the process builds its run, creates `go + ".ready"` and waits for the file `go` to
    exist before training: its start-up is then over before the run it is compared with begins.
    """
    os.nice(niceness - os.nice(0))
    os.environ["OMP_NUM_THREADS"] = str(threads)  # the engine's cpu_threads() reads it, as under Ray
    config = TrainConfig.model_validate_json(config_json)
    data = prepare_data(config.data_dir, config.image_size, cache_dir=config.cache_dir)
    run = TrainingRun(config, data)
    if go is not None:
        Path(f"{go}.ready").touch()
        while not Path(go).exists():
            time.sleep(0.05)
    run.fit(
        lambda epoch, metrics, _: append_json(
            Path(events), {"time": time.time(), **{key: metrics[key] for key in EPOCH_KEYS}}
        )
    )


def ray_worker_niceness() -> int:
    """The niceness Ray runs its worker processes at (15 unless RAY_worker_niceness says otherwise)."""
    return ray.get(ray.remote(num_cpus=0)(lambda: os.nice(0)).remote())


def start_engine(
    config: TrainConfig, threads: int, niceness: int, events: Path, go: Path | None = None
) -> tuple[float, multiprocessing.Process]:
    process = multiprocessing.get_context("spawn").Process(
        target=engine_process,
        args=(config.model_dump_json(), threads, niceness, str(events), str(go) if go else None),
        daemon=True,
    )
    started = time.time()
    process.start()
    return started, process


def ray_trainer(config: TrainConfig, resources: WorkerResources, storage: Path, name: str) -> Any:
    check_fits(resources)
    return build_trainer(
        config,
        resources,
        storage=storage,
        name=name,
        max_failures=0,
        callbacks=[EpochEndRecorder(storage / f"{name}.epochs.jsonl")],
    )


def run_side_by_side(config: TrainConfig, storage: Path, train_images: int, niceness: int) -> dict[str, Any]:
    """(a) built and waiting; (b) alone until its first epoch ends, then (a) trains beside it until (b) ends."""
    b_events, a_events, go = storage / "b.epochs.jsonl", storage / "a.epochs.jsonl", storage / "a.go"
    # (a) runs as many epochs as fit in (b)'s remaining time; it is stopped when (b) ends.
    _, process = start_engine(config.with_overrides({"epochs": 1000}), 1, niceness, a_events, go)
    try:
        while not Path(f"{go}.ready").exists():
            if not process.is_alive():
                raise RuntimeError(f"engine process (a) exited with {process.exitcode} before training")
            time.sleep(0.1)
        trainer = ray_trainer(config, WorkerResources(workers=1, cpus_per_worker=1), storage, "b")
        outcome: dict[str, Any] = {}
        b_started = time.time()
        thread = threading.Thread(target=lambda: outcome.update(result=trainer.fit()), daemon=True)
        thread.start()
        while thread.is_alive() and not read_json_lines(b_events):
            time.sleep(0.1)
        go.touch()
        a_started = time.time()
        thread.join()
        b_ended = time.time()
    finally:
        process.terminate()
        process.join()
    if outcome.get("result") is None or outcome["result"].error is not None:
        raise RuntimeError(f"Ray Train run (b) failed: {outcome}")

    b_epochs = with_starts(b_started, read_json_lines(b_events))
    a_epochs = with_starts(a_started, read_json_lines(a_events))
    b_steady = [e for e in b_epochs if e["start"] >= a_started]  # (a) trained throughout
    a_steady = [e for e in a_epochs[1:] if e["time"] <= b_ended]  # not its first (warm-up) epoch
    if not a_steady or not b_steady:
        raise RuntimeError("no overlapping steady epochs: run with more --side-by-side-epochs")
    return {
        "a": {**steady_figures(a_steady, train_images), "torch_threads": 1, "epochs": a_epochs},
        "b": {**steady_figures(b_steady, train_images), **startup_seconds(b_started, b_epochs), "epochs": b_epochs},
    }


def run_alone(
    kind: str, index: int, config: TrainConfig, storage: Path, train_images: int, cores: int, niceness: int
) -> dict[str, Any]:
    """(a2) or (c) with the machine to itself (apart from other users)."""
    name = f"{kind}-{index}"
    events = storage / f"{name}.epochs.jsonl"
    if kind == "a2":
        started, process = start_engine(config, cores, niceness, events)
        process.join()
        extra: dict[str, Any] = {"torch_threads": cores}
    else:
        trainer = ray_trainer(config, WorkerResources(workers=2, cpus_per_worker=1), storage, name)
        started = time.time()
        result = trainer.fit()
        if result.error is not None:
            raise RuntimeError(f"Ray Train run (c) failed: {result.error}")
        extra = {"workers": 2, "cpus_per_worker": 1}
    epochs = with_starts(started, read_json_lines(events))
    return {**steady_figures(epochs[1:], train_images), **startup_seconds(started, epochs), **extra, "epochs": epochs}


# --- main -------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4, help="epochs of each (a2) and (c) run; >= 2")
    parser.add_argument("--side-by-side-epochs", type=int, default=8, help="epochs of (b); (a) runs beside it")
    parser.add_argument("--model", default="mobilenet")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--skip-alone", action="store_true", help="only the side-by-side (a) vs (b)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.epochs < 2 or args.side_by_side_epochs < 4:
        parser.error(
            f"--epochs must be >= 2 and --side-by-side-epochs >= 4, got {args.epochs}, {args.side_by_side_epochs}"
        )

    cores = os.cpu_count() or 1
    data_dir = demo_data_dir()
    config = TrainConfig(
        data_dir=data_dir,
        image_size=args.image_size,
        model=args.model,
        epochs=args.epochs,
        batch_size=args.batch_size,
        device="cpu",
    )
    data = prepare_data(data_dir, args.image_size)  # build the decoded cache now, outside every timing
    train_images = sum(split_counts(data)["train"])

    temp_dir = os.environ.get("RAY_TMPDIR") or tempfile.mkdtemp(prefix="ray-bench-", dir="/tmp")
    storage = Path(tempfile.mkdtemp(prefix="ray-overhead-"))
    ray.init(**{**local_ray_init_kwargs(max(2, cores)), "log_to_driver": False}, _temp_dir=temp_dir)
    load = [os.getloadavg()[0]]
    try:
        niceness = ray_worker_niceness()
        figures = run_side_by_side(
            config.with_overrides({"epochs": args.side_by_side_epochs}), storage, train_images, niceness
        )
        load.append(os.getloadavg()[0])
        a, b = figures["a"], figures["b"]
        print(
            f"side by side: a {a['steady_images_per_second']:.1f} img/s, b {b['steady_images_per_second']:.1f}"
            f" img/s; b start-up {b['startup_s']:.1f} s",
            flush=True,
        )
        if not args.skip_alone:
            alone = [
                (kind, run_alone(kind, index, config, storage, train_images, cores, niceness))
                for index, kind in enumerate(("a2", "c", "a2"))
            ]
            load.append(os.getloadavg()[0])
            for kind, run in alone:
                print(
                    f"{kind}: {run['steady_images_per_second']:.1f} img/s, start-up {run['startup_s']:.1f} s",
                    flush=True,
                )
            a2_runs = [run for kind, run in alone if kind == "a2"]
            figures["a2"] = {
                key: statistics.mean(run[key] for run in a2_runs)
                for key in ("steady_images_per_second", "wall_images_per_second", "startup_s")
            } | {"runs": a2_runs}
            figures["c"] = next(run for kind, run in alone if kind == "c")
    finally:
        ray.shutdown()
        shutil.rmtree(storage, ignore_errors=True)

    ratios = {}
    for numerator, denominator in (("b", "a"), ("c", "a2")):
        if numerator in figures:
            for measure in ("steady_images_per_second", "wall_images_per_second"):
                ratios[f"{numerator}_over_{denominator}_{measure}"] = (
                    figures[numerator][measure] / figures[denominator][measure]
                )
    goals = {
        f"b_steady_ge_{GOAL_STEADY_RATIO}_a": ratios["b_over_a_steady_images_per_second"] >= GOAL_STEADY_RATIO,
        f"b_startup_lt_{GOAL_STARTUP_SECONDS:g}s": figures["b"]["startup_s"] < GOAL_STARTUP_SECONDS,
    }
    record = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "machine": {**machine(), "torch": torch.__version__, "ray": ray.__version__},
        "load_average_1min": load,  # before, between and after the phases: other users slow every run
        "model": args.model,
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "epochs_per_run": {"b": args.side_by_side_epochs, "a2": args.epochs, "c": args.epochs},
        "train_images": train_images,
        "niceness_of_every_run": niceness,
        "resources": {
            "a": "engine process, 1 torch thread (side by side with b)",
            "b": "Ray Train 1 worker x 1 CPU",
            "a2": f"engine process, {cores} torch threads (alone)",
            "c": "Ray Train 2 workers x 1 CPU",
        },
        "ratios": ratios,
        "goals": goals,
        "figures": figures,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    append_json(args.output, record)
    print("ratios:", {key: round(value, 3) for key, value in ratios.items()}, "goals:", goals)
    return 0


if __name__ == "__main__":
    sys.exit(main())
