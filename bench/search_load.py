"""Many short trials in one search: does anything leak (actors, placement groups, processes, files)?

A search of `--trials` trials of 1 epoch at 32 px on a small generated set, on a local Ray with 2
logical CPUs and no dashboard (the laptop case), with ASHA and MLflow (sqlite) as in real use. Before
and after the search the driver counts:

* Ray actors alive (`ray._private.state.actors()`: the State API needs the dashboard) and by class;
* placement groups not REMOVED, and CPUs available against the cluster's total;
* the driver's child processes (`ps --ppid`), and the raylet's (Ray workers) with their memory;
* the driver's open file descriptors (`/proc/self/fd`, and what they point at) and resident memory.

It runs `--searches` such searches one after the other on the same Ray instance (as `compare` does)
and counts after each, `--settle` seconds after it ended: the first search pays for what a process
loads once (imports, MLflow's database engine, matplotlib's fonts, Ray's driver logs); what still
grows from the first search to the last, divided by the trials in between, is what each trial
leaves behind. Then it shuts Ray down and counts the driver's descriptors and children once more.
One JSON line is appended to bench/results/search_load.jsonl; the figures are discussed in
bench/README.md.

    python bench/search_load.py --trials 50 --searches 3     # issue 21 item 13: ~5 min
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ray

from prado_dist.data.demo import make_demo_dataset
from prado_dist.distributed import leftover_resources
from prado_dist.distributed.resources import local_ray_init_kwargs
from prado_dist.search import SearchSettings, load_space, run_search

RESULTS = Path(__file__).resolve().parent / "results" / "search_load.jsonl"


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


def descriptor_targets() -> collections.Counter:
    """What the driver's descriptors point at, with numbers stripped (socket:[123] -> socket)."""
    targets = collections.Counter()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        targets[target.split(":[")[0] if ":[" in target else target] += 1
    return targets


def resident_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child_processes() -> list[str]:
    """The driver's direct children, as `pid command` lines."""
    out = subprocess.run(["ps", "--ppid", str(os.getpid()), "-o", "pid=,args="], capture_output=True, text=True)
    return [line.strip()[:120] for line in out.stdout.splitlines() if line.strip() and " ps --ppid" not in line]


def worker_processes() -> dict:
    """The raylet's children (Ray workers, idle or running an actor): count and resident memory."""
    out = subprocess.run(["ps", "-eo", "pid=,ppid=,rss=,args="], capture_output=True, text=True).stdout
    rows = [line.split(None, 3) for line in out.splitlines() if line.strip()]
    raylets = {pid for pid, ppid, _, args in rows if ppid == str(os.getpid()) and "raylet/raylet" in args}
    workers = [(int(rss), args) for pid, ppid, rss, args in rows if ppid in raylets]
    return {"count": len(workers), "rss_mib": round(sum(rss for rss, _ in workers) / 1024)}


def alive_actors() -> dict[str, int]:
    from ray._private import state  # the GCS actor table: ray.util.state needs the dashboard

    alive = [info for info in state.actors().values() if info["State"] != "DEAD"]
    return dict(collections.Counter(f"{info['ActorClassName']} ({info['State']})" for info in alive))


def snapshot() -> dict:
    figures = {"driver_fds": open_descriptors(), "driver_rss_mib": round(resident_mib(), 1)}
    figures["driver_children"] = child_processes()
    if ray.is_initialized():
        leftovers = leftover_resources()
        figures.update(
            actors_alive=alive_actors(),
            placement_groups=len(leftovers["placement_groups"]),
            cpus_available=leftovers["available"].get("CPU", 0.0),
            cpus_total=leftovers["total"].get("CPU", 0.0),
            memory_available_mib=round(leftovers["available"].get("memory", 0.0) / 2**20),
            memory_total_mib=round(leftovers["total"].get("memory", 0.0) / 2**20),
            ray_workers=worker_processes(),
        )
    return figures


def machine() -> dict:
    cpu = next(
        (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "unknown"
    )
    return {"cores": os.cpu_count(), "cpu": cpu, "python": platform.python_version(), "ray": ray.__version__}


def run_searches(args: argparse.Namespace, root: Path) -> tuple[list[dict], list]:
    """`args.searches` searches of `args.trials` trials each; a snapshot `args.settle` s after each."""
    data = make_demo_dataset(root / "data", images=args.images, seed=0, size=64)
    space = load_space("demo", {"num_samples": args.trials, "epochs": 1, "image_size": 32, "scheduler.grace_period": 1})
    snapshots, outcomes = [], []
    for index in range(args.searches):
        settings = SearchSettings(
            space, data, storage=str(root / "runs"), name=f"load-{index}", mlflow_uri=f"sqlite:///{root}/mlflow.db",
            experiment="load",
        )  # fmt: skip
        started = time.monotonic()
        outcomes.append(run_search(settings))
        seconds = time.monotonic() - started
        time.sleep(args.settle)
        snapshots.append({"search_seconds": round(seconds, 1), **snapshot()})
    return snapshots, outcomes


def leaks(first: dict, last: dict, trials_between: int) -> dict:
    """What grew from the end of the first search to the end of the last (nothing, ideally)."""
    return {
        "actors_alive": sum(last["actors_alive"].values()) - sum(first["actors_alive"].values()),
        "placement_groups": last["placement_groups"] - first["placement_groups"],
        "cpus_reserved": first["cpus_available"] - last["cpus_available"],
        "ray_workers": last["ray_workers"]["count"] - first["ray_workers"]["count"],
        "driver_fds": last["driver_fds"] - first["driver_fds"],
        "driver_children": len(last["driver_children"]) - len(first["driver_children"]),
        "driver_rss_mib": round(last["driver_rss_mib"] - first["driver_rss_mib"], 1),
        "driver_rss_mib_per_trial": round((last["driver_rss_mib"] - first["driver_rss_mib"]) / trials_between, 3)
        if trials_between
        else None,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=50, help="trials per search")
    parser.add_argument("--searches", type=int, default=3, help="searches one after the other (2+ to see growth)")
    parser.add_argument("--images", type=int, default=150, help="generated demo images (64 px sources)")
    parser.add_argument("--num-cpus", type=int, default=2)
    parser.add_argument("--settle", type=float, default=10.0, help="seconds to wait before counting leftovers")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="search-load-"))
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    os.environ["RAY_TMPDIR"] = temp_dir
    os.environ["PRADO_DIST_CACHE"] = str(root / "cache")  # decoded images: not into ~/.cache
    load_before = os.getloadavg()
    before_ray, fds_before_ray = snapshot(), descriptor_targets()
    ray.init(**{**local_ray_init_kwargs(args.num_cpus), "log_to_driver": False}, _temp_dir=temp_dir)  # as tune does
    before = snapshot()
    after_each, outcomes = run_searches(args, root)
    ray.shutdown()
    time.sleep(2)
    after_shutdown = snapshot()
    trials = [trial for outcome in outcomes for trial in outcome.trials.values()]
    statuses = collections.Counter(trial["status"] for trial in trials)
    figures = {
        "trials": len(trials),
        "trials_ok": statuses.get("ok", 0),
        "trials_failed": statuses.get("error", 0),
        "seconds_per_trial": round(sum(s["search_seconds"] for s in after_each) / max(1, len(trials)), 2),
        "before_ray": before_ray,
        "before_search": before,
        "after_each_search": after_each,
        "after_ray_shutdown": after_shutdown,
        "grown_from_first_to_last_search": leaks(after_each[0], after_each[-1], args.trials * (args.searches - 1)),
        "left_by_the_first_search": leaks(before, after_each[0], args.trials),
        "driver_fds_after_shutdown_by_target": dict(descriptor_targets() - fds_before_ray),
    }
    line = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join([sys.executable, *sys.argv]),
        "machine": {**machine(), "load_average_before": load_before, "load_average_after": os.getloadavg()},
        "setup": {"space": "demo", "epochs": 1, "image_size": 32, "images": args.images, "num_cpus": args.num_cpus},
        **figures,
    }
    RESULTS.parent.mkdir(exist_ok=True)
    with open(RESULTS, "a") as handle:
        handle.write(json.dumps(line) + "\n")
    print(json.dumps({key: figures[key] for key in ("trials", "trials_ok", "seconds_per_trial")}, indent=2))
    print(
        json.dumps(
            {key: value for key, value in figures.items() if key.startswith(("grown", "left", "driver"))}, indent=2
        )
    )
    shutil.rmtree(root, ignore_errors=True)
    shutil.rmtree(temp_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
