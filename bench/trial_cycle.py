"""What a trial costs beyond its epochs: trials in their reused Tune actor against Ray Train trials.

Issue 20. Two experiments, each alternating the two trial paths side by side on the same cached
demo data (`trial.ray_train: auto`, the default, trains one-worker trials in their Tune actor;
`always` nests a Ray Train run in every trial, as before):

- `quickstart`: the README's search, `python -m prado_dist.tune --space demo`, in a fresh process
  each (its own local Ray): wall time end to end and console lines.
- `overhead`: searches run in this process on one local Ray, the quickstart's and one of
  `--short-trials` 1-epoch trials: per trial, the wall time from Tune starting it to its end minus
  the seconds of its epochs (median and p95), the time to the first started trial, trials per hour.

    python bench/trial_cycle.py [--rounds 2] [--experiments quickstart overhead] [--short-trials 20]

Appends one JSON line per experiment to bench/results/trial_cycle.jsonl; figures in bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import record  # noqa: E402
from ray import tune  # noqa: E402

from prado_dist.data.demo import demo_data_dir  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
PATHS = ("auto", "always")  # trial.ray_train


def alternated(rounds: int) -> list[str]:
    """Both paths per round, the order flipped every round so that a drift in load hits both alike."""
    return [path for round_ in range(rounds) for path in (PATHS if round_ % 2 == 0 else PATHS[::-1])]


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


# --- the quickstart's command, end to end ------------------------------------------------------------
def quickstart(path: str, data: Path, root: Path) -> dict:
    command = [sys.executable, "-m", "prado_dist.tune", "--space", "demo", "--data", str(data)]
    command += ["--storage", str(root / "runs"), "--mlflow-uri", f"sqlite:///{root}/mlflow.db"]
    command += [f"--set=trial.ray_train={path}"]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    if done.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return {
        "ray_train": path,
        "wall_s": round(wall, 1),
        "console_lines": len((done.stdout + done.stderr).splitlines()),
    }


# --- per-trial overhead, in this process ---------------------------------------------------------------
class TrialClock(tune.Callback):
    """Driver-side times of each trial: started, ended, and the epoch seconds it reported."""

    def __init__(self) -> None:
        self.started: dict[str, float] = {}
        self.ended: dict[str, float] = {}
        self.epoch_seconds: dict[str, float] = {}

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self.started.setdefault(trial.trial_id, time.monotonic())

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        self.epoch_seconds[trial.trial_id] = self.epoch_seconds.get(trial.trial_id, 0.0) + result["epoch_seconds"]

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self.ended[trial.trial_id] = time.monotonic()

    def overheads(self) -> list[float]:
        return [self.ended[t] - self.started[t] - self.epoch_seconds.get(t, 0.0) for t in self.ended]


def overhead(path: str, data: Path, root: Path, overrides: dict) -> dict:
    from prado_dist.search import SearchSettings, load_space, run_search

    clock = TrialClock()
    space = load_space("demo", {**overrides, "trial.ray_train": path})
    settings = SearchSettings(
        space=space,
        data_dir=data,
        storage=str(root / "runs"),
        mlflow_uri=f"sqlite:///{root}/mlflow.db",
        callbacks=[clock],
    )
    started = time.monotonic()
    run_search(settings)
    wall = time.monotonic() - started
    overheads = clock.overheads()
    return {
        "ray_train": path,
        "trials": len(overheads),
        "wall_s": round(wall, 1),
        "first_trial_started_s": round(min(clock.started.values()) - started, 1),
        "overhead_median_s": round(statistics.median(overheads), 2),
        "overhead_p95_s": round(percentile(overheads, 0.95), 2),
        "epoch_seconds_total": round(sum(clock.epoch_seconds.values()), 1),
        "trials_per_hour": round(len(overheads) / wall * 3600, 1),
    }


def summarise(runs: list[dict], keys: tuple[str, ...]) -> dict:
    medians = {
        path: {key: statistics.median(run[key] for run in runs if run["ray_train"] == path) for key in keys}
        for path in PATHS
    }
    ratio = medians["always"]["wall_s"] / medians["auto"]["wall_s"]
    return {"median": medians, "wall_ratio_ray_train_to_actor": round(ratio, 2)}


def save(entry: dict) -> None:
    RESULTS.mkdir(exist_ok=True)
    with open(RESULTS / "trial_cycle.jsonl", "a") as file:
        file.write(json.dumps(record(entry)) + "\n")
    print(json.dumps({key: value for key, value in entry.items() if key != "runs"}), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2, help="runs per path, alternated")
    parser.add_argument("--experiments", nargs="+", default=["quickstart", "overhead"])
    parser.add_argument("--short-trials", type=int, default=20, help="trials of the 1-epoch search")
    args = parser.parse_args()
    data = demo_data_dir()  # built once here, so that no search pays for it
    if "quickstart" in args.experiments:
        runs = []
        for path in alternated(args.rounds):
            with tempfile.TemporaryDirectory(prefix="trial-cycle-") as root:
                runs.append(quickstart(path, data, Path(root)))
            print(json.dumps(runs[-1]), flush=True)
        save({"benchmark": "trial_cycle", "experiment": "quickstart", "runs": runs, **summarise(runs, ("wall_s",))})
    if "overhead" in args.experiments:
        import ray

        from prado_dist.distributed.resources import local_ray_init_kwargs

        ray.init(**local_ray_init_kwargs())
        searches = {"quickstart": {}, "short": {"num_samples": args.short_trials, "epochs": 1}}
        for search, overrides in searches.items():
            runs = []
            for path in alternated(args.rounds):
                with tempfile.TemporaryDirectory(prefix="trial-cycle-") as root:
                    runs.append(overhead(path, data, Path(root), overrides))
                print(json.dumps({"search": search, **runs[-1]}), flush=True)
            keys = ("wall_s", "overhead_median_s", "overhead_p95_s", "first_trial_started_s", "trials_per_hour")
            entry = {"benchmark": "trial_cycle", "experiment": "overhead", "search": search, "overrides": overrides}
            save({**entry, "runs": runs, **summarise(runs, keys)})
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
