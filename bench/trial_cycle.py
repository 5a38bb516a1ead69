"""How long the quickstart's search takes with Ray Train's default poll interval and with prado_dist's.

Ray Train's controller polls its workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (Ray's default
2 s) and notices that a run has finished only then. A local Ray started by prado_dist sets 0.5 s
(`prado_dist.distributed.resources.local_ray_init_kwargs`). This runs the quickstart's command,
`python -m prado_dist.tune --space demo`, alternately with Ray's default (the variable set to 2.0)
and with prado_dist's (the variable unset), `--rounds` times each, on the same cached demo data,
and compares the wall times as a ratio of medians measured side by side.

    python bench/trial_cycle.py [--rounds 2] [--space demo]

Appends one JSON line to bench/results/trial_cycle.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import record  # noqa: E402

from prado_dist.data.demo import demo_data_dir  # noqa: E402
from prado_dist.distributed.resources import HEALTH_CHECK_ENV, LOCAL_HEALTH_CHECK_INTERVAL_S  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
RAY_DEFAULT_INTERVAL_S = 2.0  # ray.train.v2._internal.constants.DEFAULT_HEALTH_CHECK_INTERVAL_S


def run_search(space: str, data: Path, interval: float | None, root: Path) -> dict:
    """One search in a fresh process (its own local Ray); `interval` None leaves prado_dist's default."""
    env = {key: value for key, value in os.environ.items() if key != HEALTH_CHECK_ENV}
    if interval is not None:
        env[HEALTH_CHECK_ENV] = str(interval)
    command = [
        sys.executable,
        "-m",
        "prado_dist.tune",
        "--space",
        space,
        "--data",
        str(data),
        "--storage",
        str(root / "runs"),
        "--mlflow-uri",
        f"sqlite:///{root}/mlflow.db",
    ]
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    if done.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    # From the summary that prado_dist.tune prints at the end (tune.print_summary).
    best = re.search(r"validation val_balanced_accuracy ([0-9.]+) \(epoch", done.stdout)
    trials = re.search(r"(\d+) trials, (\d+) stopped early, (\d+) failed", done.stdout)
    return {
        "interval_s": interval if interval is not None else LOCAL_HEALTH_CHECK_INTERVAL_S,
        "wall_s": round(wall, 1),
        "best_val_balanced_accuracy": float(best.group(1)) if best else None,
        "trials_stopped_failed": [int(n) for n in trials.groups()] if trials else None,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--space", default="demo")
    parser.add_argument("--rounds", type=int, default=2, help="searches per setting, alternated")
    args = parser.parse_args()
    data = demo_data_dir()  # built once here, so that no search pays for it
    runs = []
    for round_ in range(args.rounds):
        # Alternated, and the order flipped every round, so that a drift in the machine's load
        # falls on both settings alike.
        order = [RAY_DEFAULT_INTERVAL_S, None] if round_ % 2 == 0 else [None, RAY_DEFAULT_INTERVAL_S]
        for interval in order:
            with tempfile.TemporaryDirectory(prefix="trial-cycle-") as root:
                runs.append(run_search(args.space, data, interval, Path(root)))
            print(json.dumps(runs[-1]), flush=True)
    ray_default = statistics.median(r["wall_s"] for r in runs if r["interval_s"] == RAY_DEFAULT_INTERVAL_S)
    ours = statistics.median(r["wall_s"] for r in runs if r["interval_s"] == LOCAL_HEALTH_CHECK_INTERVAL_S)
    entry = record(
        {
            "benchmark": "trial_cycle",
            "space": args.space,
            "data": str(data),
            "runs": runs,
            "median_wall_s": {
                f"ray_default_{RAY_DEFAULT_INTERVAL_S}s": ray_default,
                f"prado_dist_{LOCAL_HEALTH_CHECK_INTERVAL_S}s": ours,
            },
            "ratio_prado_dist_to_ray_default": round(ours / ray_default, 3),
        }
    )
    RESULTS.mkdir(exist_ok=True)
    with open(RESULTS / "trial_cycle.jsonl", "a") as file:
        file.write(json.dumps(entry) + "\n")
    print(json.dumps({key: entry[key] for key in ("median_wall_s", "ratio_prado_dist_to_ray_default")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
