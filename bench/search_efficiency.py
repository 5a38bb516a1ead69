"""TPE + ASHA (or PBT / PB2) against random search without early stopping, for the same budget of epochs.

For each seed both searches run on the same data and space until their trials have trained
`--budget` epochs in total. From every search's results (ordered by time) we get the best
validation metric reached as a function of epochs spent, and the number of epochs each search
needed to reach the random search's final best. Goal: TPE+ASHA needs at most half of them.
Also measured: Tune's per-trial overhead (trial start to first reported epoch, minus that epoch).

    python bench/search_efficiency.py [--data DIR] [--seeds 3] [--first-seed 0] [--budget 24] [--set KEY=VALUE ...]
        [--scheduler asha|pbt|pb2] [--population 4] [--reuse-random] [--work-dir DIR] [--plot NAME.png]

`--scheduler pbt` (or pb2) compares a population-based search of `--population` members, each
training the space's `epochs`, with the same random search; its fields are named `pbt_*` where
TPE + ASHA's are `tpe_*`.

Appends one JSON line to bench/results/search_efficiency.jsonl and writes a plot next to it.

Every search runs in a fresh temporary folder, or in `--work-dir DIR`: there a search that finished
in an earlier run of this script (its folder holds summary/summary.json) is read back from its
storage instead of run again, so a run that broke after its searches loses nothing.

`--reuse-random` takes each seed's random search from the newest recorded line with the same space,
data, budget and settings, instead of running it again, which halves the time of comparing TPE+ASHA
variants. That is sound because the random search is seeded and ignores the `searcher.*` and
`scheduler.*` settings: reruns of the same seed reached the same final best (seeds 0-5, measured),
only the time order of two concurrent trials' epochs moved its epoch count by 1-2.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import textwrap
from pathlib import Path

import ray

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import record  # noqa: E402

from prado_dist.config import parse_set  # noqa: E402
from prado_dist.data.demo import demo_data_dir  # noqa: E402
from prado_dist.distributed.resources import local_ray_init_kwargs  # noqa: E402
from prado_dist.engine.reporting import plt  # noqa: E402
from prado_dist.search import SearchSettings, load_space, run_search  # noqa: E402
from prado_dist.search.runner import finished_outcome  # noqa: E402
from prado_dist.search.storage import SearchLocation  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
PAINTINGS_DEV = Path(__file__).resolve().parents[2] / "shared" / "data" / "paintings-dev"


def best_so_far(outcome, metric_mode: str = "max") -> list[tuple[int, float]]:
    """(epochs spent, best validation metric so far) after every reported epoch, in time order."""
    events = []
    for trial in outcome.trials.values():
        for (_epoch, value), stamp in zip(trial["curve"], trial["timestamps"], strict=True):
            events.append((stamp, value))
    events.sort()
    best, curve = float("-inf"), []
    for spent, (_, value) in enumerate(events, start=1):
        best = max(best, value)
        curve.append((spent, best))
    return curve


def trial_curves(outcome) -> list[dict]:
    """Each trial's config and per-epoch validation metric, for `asha_replay.py`."""
    return [
        {"params": trial["config"], "curve": [round(value, 4) for _, value in trial["curve"]]}
        for trial in outcome.trials.values()
    ]


def epochs_to_reach(curve: list[tuple[int, float]], target: float) -> int | None:
    return next((spent for spent, best in curve if best >= target - 1e-12), None)


def random_only_settings(overrides: list[str]) -> list[str]:
    """The overrides that change a random search without early stopping (not the searcher's or ASHA's)."""
    return sorted(o for o in overrides if not o.startswith(("searcher.", "scheduler.")))


def recorded_random(args: argparse.Namespace, data: Path, seed: int) -> tuple[list[tuple[int, float]], dict, str]:
    """The newest recorded random search of `seed` under the same conditions: curve, per-seed fields, date."""
    lines = (RESULTS / "search_efficiency.jsonl").read_text().splitlines() if RESULTS.is_dir() else []
    for line in reversed(lines):
        entry = json.loads(line)
        same = (entry["space"], entry["data"], entry["budget_epochs"], random_only_settings(entry["overrides"])) == (
            args.space,
            str(data),
            args.budget,
            random_only_settings(args.overrides),
        )
        if same and str(seed) in entry.get("curves", {}):
            fields = next(s for s in entry["seeds"] if s["seed"] == seed)
            curve = [(int(n), float(v)) for n, v in entry["curves"][str(seed)]["random"]]
            return curve, fields, entry["date"]
    raise SystemExit(f"--reuse-random: no recorded random search of seed {seed} with these settings; run without it")


def searched_labels(args: argparse.Namespace) -> tuple[str, str]:
    """(key of the searched search in curves and epoch counts, prefix of its per-seed fields)."""
    return ("tpe_asha", "tpe") if args.scheduler == "asha" else (args.scheduler, args.scheduler)


def run(args: argparse.Namespace, data: Path, seed: int, searched: bool, root: Path):
    """The searched search of `seed` (TPE + ASHA, or population-based), or the random baseline."""
    # Each seed changes both the searcher's draws and the training runs' initialisation and augmentation.
    overrides = {**parse_set(args.overrides), "search_seed": seed, "seed": seed, "num_samples": args.budget}
    if not searched:
        overrides.update({"searcher.kind": "random", "scheduler.kind": "fifo"})
    elif args.scheduler != "asha":
        overrides.update({"scheduler.kind": args.scheduler, "num_samples": args.population})
    name = f"{searched_labels(args)[1] if searched else 'random'}-{seed}"
    settings = SearchSettings(
        space=load_space(args.space, overrides),
        data_dir=data,
        storage=str(root / "runs"),
        name=name,
        mlflow_uri=f"sqlite:///{root}/mlflow.db",
        experiment="search-efficiency",
        epoch_budget=args.budget,
    )
    if SearchLocation(str(root / "runs" / name), root / "runs" / name).summary_file.is_file():
        print(f"{settings.name}: finished in {root} already, read back", flush=True)
        return finished_outcome(settings)
    return run_search(settings)


def plot_curves(curves: dict, args: argparse.Namespace, data: Path, seeds: list[int]) -> None:
    """Best validation score so far against epochs spent, both searches of every seed."""
    figure, axes = plt.subplots(figsize=(7, 4.2))
    for seed, (tpe_curve, random_curve) in curves.items():
        axes.step(
            *zip(*tpe_curve, strict=True),
            where="post",
            color="tab:blue",
            alpha=0.8,
            label=("TPE + ASHA" if args.scheduler == "asha" else args.scheduler.upper()) if seed == seeds[0] else None,
        )
        axes.step(
            *zip(*random_curve, strict=True),
            where="post",
            color="tab:orange",
            alpha=0.8,
            label="random, no early stopping" if seed == seeds[0] else None,
        )
    settings = f", {' '.join(args.overrides)}" if args.overrides else ""
    axes.set_title(
        textwrap.fill(
            f"space {args.space}{settings} on {data.name}: seeds {seeds[0]}-{seeds[-1]}, {args.budget} epochs each",
            110,
        ),
        fontsize=8,
    )
    axes.set_xlabel("epochs spent (all trials)")
    axes.set_ylabel("best validation balanced accuracy so far")
    axes.legend()
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(RESULTS / args.plot, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=None, help="default: paintings-dev if present, else demo")
    parser.add_argument("--space", default="demo")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=0, help="run seeds FIRST_SEED .. FIRST_SEED+SEEDS-1")
    parser.add_argument("--budget", type=int, default=24, help="epochs per search (all trials together)")
    parser.add_argument("--num-cpus", type=int, default=2)
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="space override for both searches, e.g. --set scheduler.grace_period=2",
    )
    parser.add_argument("--plot", default="search_efficiency.png", help="file name in bench/results/")
    parser.add_argument("--scheduler", choices=("asha", "pbt", "pb2"), default="asha", help="the searched search")
    parser.add_argument("--population", type=int, default=4, help="members of a pbt / pb2 search")
    parser.add_argument("--reuse-random", action="store_true", help="take the random searches from earlier lines")
    parser.add_argument("--work-dir", type=Path, default=None, help="default: a new temporary folder")
    args = parser.parse_args()
    if Path(args.plot).name != args.plot:  # checked now, not after an hour of searches
        parser.error(f"--plot takes a file name (written to {RESULTS}), not a path: {args.plot!r}")
    data = args.data or (PAINTINGS_DEV if PAINTINGS_DEV.is_dir() else demo_data_dir())
    if args.data is None and data != PAINTINGS_DEV:
        print(f"{PAINTINGS_DEV} not found: searching the generated demo set instead (pass --data DIR)", flush=True)
    print(f"data: {data}", flush=True)
    root = args.work_dir or Path(tempfile.mkdtemp(prefix="search-efficiency-"))
    print(f"searches in {root}", flush=True)
    ray.init(**{**local_ray_init_kwargs(args.num_cpus), "log_to_driver": False})  # as prado_dist.tune starts it
    per_seed, curves, trials, overheads = [], {}, {}, []
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    reused = {}
    label, prefix = searched_labels(args)
    for seed in seeds:
        tpe = run(args, data, seed, True, root)
        outcomes, trials[seed] = [tpe], {label: trial_curves(tpe)}
        if args.reuse_random:
            random_curve, random_fields, reused[seed] = recorded_random(args, data, seed)
        else:
            random = run(args, data, seed, False, root)
            outcomes.append(random)
            trials[seed]["random"] = trial_curves(random)
            random_curve = best_so_far(random)
            random_fields = {
                "random_final_best": random_curve[-1][1],
                "epochs_to_reach_random_best": {"random": epochs_to_reach(random_curve, random_curve[-1][1])},
                "random_trials": len(random.trials),
                "random_test_accuracy": random.test["test_accuracy"],
            }
        tpe_curve = best_so_far(tpe)
        # Unrounded: a recorded curve keeps 4 decimals, the per-seed fields the exact value.
        target = random_fields["random_final_best"]
        needed = {
            label: epochs_to_reach(tpe_curve, target),
            "random": random_fields["epochs_to_reach_random_best"]["random"],
        }
        per_seed.append(
            {
                "seed": seed,
                "random_final_best": target,
                f"{prefix}_final_best": tpe_curve[-1][1],
                "epochs_to_reach_random_best": needed,
                "ratio": needed[label] / needed["random"] if needed[label] else None,
                f"{prefix}_trials": len(tpe.trials),
                "random_trials": random_fields["random_trials"],
                f"{prefix}_stopped_early": sum(t["stopped_early"] for t in tpe.trials.values()),
                f"{prefix}_test_accuracy": tpe.test["test_accuracy"],
                "random_test_accuracy": random_fields["random_test_accuracy"],
            }
        )
        curves[seed] = (tpe_curve, random_curve)
        for outcome in outcomes:
            overheads += [
                t["first_report_s"] - t["first_epoch_s"]
                for t in outcome.trials.values()
                if t.get("first_report_s") is not None
            ]
        print(json.dumps(per_seed[-1]), flush=True)
    ray.shutdown()

    # A seed where TPE+ASHA never reached random's best counts as an infinite ratio, not as missing.
    ratios = [s["ratio"] if s["ratio"] is not None else math.inf for s in per_seed]
    median_ratio = statistics.median(ratios)
    entry = record(
        {
            "benchmark": "search_efficiency",
            "space": args.space,
            "overrides": args.overrides,
            "scheduler": args.scheduler,
            **({"population": args.population} if args.scheduler != "asha" else {}),
            "data": str(data),
            "budget_epochs": args.budget,
            "plot": args.plot,
            "seeds": per_seed,
            f"median_ratio_{prefix}_to_random_epochs": median_ratio if math.isfinite(median_ratio) else None,
            f"seeds_where_{prefix}_reached_random_best": sum(math.isfinite(r) for r in ratios),
            "goal": "median ratio <= 0.5",
            # Trial start to first reported epoch, minus that epoch's own training time.
            "median_trial_overhead_s": statistics.median(overheads) if overheads else None,
            # (epochs spent, best so far) per seed, so that runs of other seeds can be pooled and replotted.
            "curves": {
                seed: {label: [[n, round(v, 4)] for n, v in tpe], "random": [[n, round(v, 4)] for n, v in rnd]}
                for seed, (tpe, rnd) in curves.items()
            },
            "trials": trials,
            # seed -> date of the line whose random search was reused (--reuse-random)
            **({"random_reused_from": reused} if reused else {}),
        }
    )
    RESULTS.mkdir(exist_ok=True)
    # The numbers before the plot: a failing plot must not lose an hour of searches.
    with open(RESULTS / "search_efficiency.jsonl", "a") as file:
        file.write(json.dumps(entry) + "\n")
    plot_curves(curves, args, data, list(seeds))
    keys = (
        f"median_ratio_{prefix}_to_random_epochs",
        f"seeds_where_{prefix}_reached_random_best",
        "median_trial_overhead_s",
    )
    print(json.dumps({key: entry[key] for key in keys}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
