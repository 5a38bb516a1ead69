"""`python -m prado_dist.compare --spaces vgg resnet29 ...`: the report's comparison, tuned.

One search per space at the same epoch budget, selected on validation and tested once, under one
MLflow parent run; the leaderboard (size, cost, the report's own figure, the report configuration's
score, the tuned score, test scores with 95% bootstrap intervals) as CSV, Markdown and a plot.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from prado_dist.comparison import ComparisonSettings, open_comparison, run_comparison
from prado_dist.config import ConfigError
from prado_dist.data import DataError
from prado_dist.data.demo import announce_data
from prado_dist.distributed import ResourceError, connect
from prado_dist.search import SearchError, SearchInterrupted, TrackingError, parse_set, tracking_uri
from prado_dist.search.console import quiet_libraries
from prado_dist.search.mlflow_experiment import how_to_open

# A comparison that fits a 2-core machine in minutes (bench/README.md has its timings): small images,
# few epochs, one CPU per trial. Applied before --set, which overrides any of it.
PROFILES: dict[str, dict[str, object]] = {
    "quick": {
        "image_size": 48,  # the VGG-like net at 64 px: 60 s an epoch on one core of paintings-dev
        "epochs": 6,
        "batch_size": 32,
        "num_samples": 8,
        "max_concurrent": 2,
        "trial.workers": 1,
        "trial.cpus_per_worker": 1,
        "trial.gpus_per_worker": 0,
        "scheduler.grace_period": 2,
        "scheduler.reduction_factor": 2,
        "searcher.startup_trials": 4,
    },
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m prado_dist.compare", description=__doc__.splitlines()[0])
    parser.add_argument("--spaces", nargs="+", required=True, help="space names or YAML paths, e.g. vgg resnet29")
    parser.add_argument("--data", type=Path, default=None, help="dataset root; omitted: the generated demo set")
    parser.add_argument(
        "--budget-epochs", type=int, default=None, help="each search stops after this many epochs of all its trials"
    )
    parser.add_argument("--profile", choices=sorted(PROFILES), default=None, help="quick: a 2-core comparison")
    parser.add_argument("--storage", default="runs", help="folder for the comparison and its searches")
    parser.add_argument("--name", default=None, help="comparison name (default compare-TIME)")
    parser.add_argument("--resume", action="store_true", help="continue the newest (or --name) comparison")
    parser.add_argument("--mlflow-uri", default=None, help="default $MLFLOW_TRACKING_URI or sqlite:///mlflow.db")
    parser.add_argument("--experiment", default="comparison", help="MLflow experiment of the comparison's runs")
    parser.add_argument("--address", default=None, help="Ray cluster address (e.g. auto); omitted: local Ray")
    parser.add_argument("--num-cpus", type=int, default=None, help="local Ray only: logical CPUs")
    parser.add_argument("--verbose", action="store_true", help="also Tune's tables and the libraries' logs")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="for every space"
    )
    return parser


def settings_from_args(args: argparse.Namespace) -> ComparisonSettings:
    if args.budget_epochs is not None and args.budget_epochs < 1:
        raise SearchError(f"--budget-epochs must be at least 1 epoch, got {args.budget_epochs}")
    if args.data is not None and not args.data.exists():
        raise DataError(f"--data {args.data} does not exist")
    overrides = {**PROFILES.get(args.profile, {}), **parse_set(args.overrides)}
    return ComparisonSettings(
        spaces=args.spaces,
        data_dir=announce_data(args.data),
        overrides=overrides,
        epoch_budget=args.budget_epochs,
        storage=args.storage,
        name=args.name,
        resume=args.resume,
        mlflow_uri=tracking_uri(args.mlflow_uri),
        experiment=args.experiment,
        verbose=args.verbose,
    )


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    quiet_libraries(args.verbose)
    try:
        settings = settings_from_args(args)
        comparison = open_comparison(settings)  # spaces, folder and a resume's settings: before Ray starts
        connect(args.address, num_cpus=args.num_cpus)
        run_comparison(comparison)
    except SearchInterrupted as err:
        print(f"\n{err}", file=sys.stderr)
        return 130
    except (ConfigError, DataError, ResourceError, SearchError, TrackingError, ConnectionError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"\n=== Comparison {comparison.name} ===")
    print((comparison.folder / "leaderboard.md").read_text())
    for space, reason in comparison.failed.items():
        print(f"{space}: its search failed ({reason}); --resume --name {comparison.name} tries it again")
    print(f"Files: {comparison.folder}; MLflow parent run {comparison.parent_run_id}")
    print(f"  {how_to_open(settings.mlflow_uri, comparison.experiment_id)}")
    return 1 if comparison.failed else 0


if __name__ == "__main__":
    sys.exit(main())
