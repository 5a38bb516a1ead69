"""Replay ASHA settings on recorded full-length trials: would a scheduler setting alone help?

`search_efficiency.py` takes about 40 minutes per 3 seeds and its ratio swings from 0.2 to "never"
between seeds, so it cannot tell scheduler settings apart. This replays them in seconds on trials that
really ran: the full-length (never stopped) trials of the random searches that `search_efficiency.py`
recorded. Each resample draws

  - a random search: `budget / epochs` trials from the pool, run to the end; its final best is the
    target, as in `search_efficiency.py`;
  - an ASHA search: trials drawn from the same pool in order, each stopped at a rung unless its score
    there is in the rung's top 1/reduction_factor (Ray's `ASHAScheduler` rule, one trial at a time),
    until the budget is spent.

and records how many epochs the ASHA search needed to reach the target, over those the random search
needed. A second random search in place of the ASHA one gives the yardstick: what the ratio looks
like for a search no better than the baseline. Trials are drawn at random, not by TPE: this isolates
the scheduler. `--window N` ranks trials at a rung by the mean of their last N epochs instead of the
last epoch (a smoothed score, which the product does not offer; replayed to see whether it would be
worth building).

    python bench/asha_replay.py                    # pools the trials recorded on paintings-dev
    python bench/asha_replay.py --grace 2 4 --reduction 2 3 --window 1 2
    python bench/asha_replay.py --runs /tmp/search-efficiency-*/runs --data paintings-dev   # Tune folders

Appends one JSON line to bench/results/asha_replay.jsonl.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import record  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
METRIC = "val_balanced_accuracy"


def curves_from_results(data_name: str, epochs: int) -> dict[str, list[float]]:
    """Full-length random-search trials on `data_name` that earlier runs recorded, keyed by their config.

    `search_efficiency.py` lines hold each seed's trials; this script's own lines hold the trials it
    pooled from Tune folders (`--runs`), so that a replay can be repeated once those are gone.
    """
    recorded = []
    for name in ("search_efficiency.jsonl", "asha_replay.jsonl"):
        if (RESULTS / name).is_file():
            recorded += [json.loads(line) for line in (RESULTS / name).read_text().splitlines()]
    pool = {}
    for line in recorded:
        if Path(line.get("data", "")).name != data_name:
            continue
        trials = list(line.get("pooled_trials", []))
        for searches in line.get("trials", {}).values():  # search_efficiency.py: per seed
            trials += searches["random"]
        for trial in trials:
            if len(trial["curve"]) == epochs:
                pool[json.dumps(trial["params"], sort_keys=True)] = trial["curve"]
    return pool


def curves_from_runs(run_roots: list[Path], epochs: int) -> dict[str, list[float]]:
    """Full-length trials of the `random-*` searches in Tune storage folders (`params.json`, `result.json`)."""
    pool = {}
    for trial_dir in itertools.chain.from_iterable(root.glob("random-*/run_trial_*") for root in run_roots):
        results = trial_dir / "result.json"
        if not results.is_file() or not results.stat().st_size:
            continue
        by_epoch = {}
        for line in results.read_text().splitlines():
            row = json.loads(line)
            by_epoch[row["epochs_completed"]] = row[METRIC]  # a restored trial may repeat an epoch
        if sorted(by_epoch) == list(range(1, epochs + 1)):
            params = json.loads((trial_dir / "params.json").read_text())
            pool[json.dumps(params, sort_keys=True)] = [by_epoch[e] for e in range(1, epochs + 1)]
    return pool


def rungs(grace: int, reduction: int, epochs: int) -> list[int]:
    """Ray's ASHA milestones below the full length: grace, grace*rf, grace*rf^2, ..."""
    milestones, milestone = [], grace
    while milestone < epochs:
        milestones.append(milestone)
        milestone *= reduction
    return milestones


def asha_search(curves: np.ndarray, order, budget: int, grace: int, reduction: int, window: int) -> list[float]:
    """Best score so far after each epoch spent, with trials taken from `order` until the budget is spent."""
    epochs = curves.shape[1]
    recorded = {milestone: [] for milestone in rungs(grace, reduction, epochs)}
    best, trace = float("-inf"), []
    for index in order:
        curve, stop = curves[index], epochs
        for milestone, scores in recorded.items():
            score = float(curve[max(0, milestone - window) : milestone].mean())
            cutoff = np.percentile(scores, (1 - 1 / reduction) * 100) if scores else None
            scores.append(score)
            if cutoff is not None and score < cutoff:
                stop = milestone
                break
        for value in curve[:stop]:
            best = max(best, float(value))
            trace.append(best)
            if len(trace) == budget:
                return trace
    return trace


def random_search(curves: np.ndarray, order, budget: int) -> list[float]:
    """Every trial to its full length: ASHA with no rung below it."""
    return asha_search(curves, order, budget, grace=curves.shape[1], reduction=2, window=1)


def first_reaching(trace: list[float], target: float) -> int | None:
    return next((spent for spent, best in enumerate(trace, start=1) if best >= target - 1e-12), None)


def replay(curves: np.ndarray, budget: int, grace: int, reduction: int, window: int, resamples: int, seed: int):
    rng = np.random.default_rng(seed)
    ratios = []
    for _ in range(resamples):
        baseline = random_search(curves, rng.integers(len(curves), size=budget // curves.shape[1]), budget)
        target, random_needed = baseline[-1], first_reaching(baseline, baseline[-1])
        # More draws than the budget can use: the search ends when its epochs are spent.
        trace = asha_search(curves, rng.integers(len(curves), size=budget), budget, grace, reduction, window)
        needed = first_reaching(trace, target)
        ratios.append(needed / random_needed if needed else float("inf"))
    return {
        "grace_period": grace,
        "reduction_factor": reduction,
        "window": window,
        "median_ratio": _finite(statistics.median(ratios)),
        "share_ratio_at_most_half": sum(r <= 0.5 for r in ratios) / len(ratios),
        "share_never": sum(r == float("inf") for r in ratios) / len(ratios),
    }


def _finite(ratio: float) -> float | None:
    """None for "never reached" (JSON has no infinity)."""
    return ratio if ratio != float("inf") else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="paintings-dev", help="name of the data folder whose recorded trials to pool")
    parser.add_argument(
        "--runs", type=Path, nargs="*", default=[], help="Tune storage folders to pool instead (trials on --data)"
    )
    parser.add_argument("--epochs", type=int, default=16, help="full trial length")
    parser.add_argument("--budget", type=int, default=128)
    parser.add_argument("--grace", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--reduction", type=int, nargs="+", default=[2, 3])
    parser.add_argument("--window", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--resamples", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    if args.runs:
        pool, source = curves_from_runs(args.runs, args.epochs), [str(p) for p in args.runs]
    else:
        pool, source = curves_from_results(args.data, args.epochs), "trials recorded in bench/results/"
    if len(pool) < 8:
        print(f"only {len(pool)} full-length {args.epochs}-epoch random-search trials found in {source}: "
              "run bench/search_efficiency.py first, or pass --runs with its Tune folders")  # fmt: skip
        return 1
    curves = np.array(list(pool.values()))
    print(f"{len(curves)} full-length trials from {source}; {args.resamples} resamples per setting", flush=True)
    # No rung below the full length: a second random search, the yardstick for the ratios below.
    reference = replay(curves, args.budget, args.epochs, 2, 1, args.resamples, args.seed)
    print("a second random search:", json.dumps(reference), flush=True)
    settings = []
    for grace, reduction, window in itertools.product(args.grace, args.reduction, args.window):
        settings.append(replay(curves, args.budget, grace, reduction, window, args.resamples, args.seed))
        print(json.dumps(settings[-1]), flush=True)
    entry = record(
        {
            "benchmark": "asha_replay",
            "data": args.data,
            "trials_pooled": len(curves),
            "source": source,
            "epochs_per_trial": args.epochs,
            "budget_epochs": args.budget,
            "resamples": args.resamples,
            "second_random_search": reference,
            "settings": settings,
            "pooled_trials": [
                {"params": json.loads(key), "curve": [round(v, 4) for v in curve]} for key, curve in pool.items()
            ],
        }
    )
    RESULTS.mkdir(exist_ok=True)
    with open(RESULTS / "asha_replay.jsonl", "a") as file:
        file.write(json.dumps(entry) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
