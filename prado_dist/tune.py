"""`python -m prado_dist.tune --space NAME`: search learning rate, decay and augmentation strength.

Optuna TPE proposes configurations (the report's own first), ASHA stops weak trials early, each
trial trains in its own reused Ray actor (data-parallel ones as Ray Train runs), and MLflow records
the search as a parent run with one child per trial.
At the end the best trial's best checkpoint is evaluated once on the test split.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from prado_dist.config import ConfigError
from prado_dist.data import DataError
from prado_dist.data.demo import announce_data
from prado_dist.distributed import ResourceError, connect
from prado_dist.search import (
    SearchError,
    SearchInterrupted,
    SearchOutcome,
    SearchSettings,
    TrackingError,
    check_search,
    known_spaces,
    load_space,
    parse_set,
    prepare_search,
    run_prepared,
    tracking_uri,
)
from prado_dist.search.console import quiet_libraries
from prado_dist.search.mlflow_experiment import how_to_open


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m prado_dist.tune", description=__doc__.splitlines()[0])
    parser.add_argument("--space", required=True, help=f"a name ({', '.join(known_spaces())}) or a YAML path")
    parser.add_argument("--data", type=Path, default=None, help="dataset root; omitted: the generated demo set")
    parser.add_argument("--num-samples", type=int, default=None, help="trials (default: the space's)")
    parser.add_argument("--max-concurrent", type=int, default=None, help="trials at once (default: what fits)")
    parser.add_argument("--workers-per-trial", type=int, default=None, help="data-parallel workers per trial")
    parser.add_argument("--gpus-per-worker", type=float, default=None, help="fractions share a GPU")
    parser.add_argument("--cpus-per-worker", type=float, default=None)
    parser.add_argument("--address", default=None, help="Ray cluster address (e.g. auto); omitted: local Ray")
    parser.add_argument("--num-cpus", type=int, default=None, help="local Ray only: logical CPUs")
    parser.add_argument("--storage", default="runs", help="folder or URI for Tune/Train results")
    parser.add_argument("--name", default=None, help="search name (default SPACE-TIME)")
    parser.add_argument("--mlflow-uri", default=None, help="default $MLFLOW_TRACKING_URI or sqlite:///mlflow.db")
    parser.add_argument("--experiment", default=None, help="MLflow experiment (default: the space name)")
    parser.add_argument(
        "--epoch-budget", type=int, default=None, help="stop the search once its trials have trained this many epochs"
    )
    parser.add_argument(
        "--register-model", default=None, metavar="NAME", help="register the best model in MLflow's Model Registry"
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the newest (or --name) search; Tune's state and the checkpoints in --storage are unpickled, "
        "which can run any code: only resume from storage you trust",
    )
    parser.add_argument(
        "--verbose", action="store_true", help="also Tune's tables and result boxes, and Ray's, Optuna's, MLflow's logs"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a fixed setting or space key, e.g. --set epochs=10 --set image_size=64",
    )
    return parser


def settings_from_args(args: argparse.Namespace) -> SearchSettings:
    overrides = parse_set(args.overrides)
    for flag, key in [
        ("num_samples", "num_samples"),
        ("max_concurrent", "max_concurrent"),
        ("workers_per_trial", "trial.workers"),
        ("gpus_per_worker", "trial.gpus_per_worker"),
        ("cpus_per_worker", "trial.cpus_per_worker"),
    ]:
        if getattr(args, flag) is not None:
            overrides[key] = getattr(args, flag)
    if args.epoch_budget is not None and args.epoch_budget < 1:
        raise SearchError(f"--epoch-budget must be at least 1 epoch, got {args.epoch_budget}")
    space = load_space(args.space, overrides)
    check_search(space)  # what would fail inside every trial: before the demo set is built or any decode
    if args.data is not None and not args.data.exists():
        raise DataError(f"--data {args.data} does not exist")
    return SearchSettings(
        space=space,
        data_dir=announce_data(args.data),
        storage=args.storage,
        name=args.name,
        resume=args.resume,
        mlflow_uri=tracking_uri(args.mlflow_uri),
        experiment=args.experiment,
        epoch_budget=args.epoch_budget,
        register_model=args.register_model,
        verbose=args.verbose,
    )


def print_summary(outcome: SearchOutcome, metric: str, mlflow_uri: str) -> None:
    print("\n=== Search finished ===")
    print(f"Best trial {outcome.best_trial_id}: {outcome.best_config}")
    print(
        f"  validation {metric} {outcome.best_val.get(metric, float('nan')):.4f} "
        f"(epoch {int(outcome.best_val['epochs_completed'])}), accuracy {outcome.best_val.get('val_accuracy', 0):.4f}"
    )
    print(
        f"  test accuracy {outcome.test['test_accuracy']:.4f}, balanced accuracy "
        f"{outcome.test['test_balanced_accuracy']:.4f}, macro-F1 {outcome.test['test_macro_f1']:.4f}"
    )
    if outcome.baseline_val is not None:
        note = " (stopped early by ASHA)" if outcome.baseline_stopped_early else ""
        gain = outcome.best_val.get(metric, 0) - outcome.baseline_val
        print(f"  report's configuration: validation {metric} {outcome.baseline_val:.4f}{note}; best is {gain:+.4f}")
    if outcome.importances:
        ranked = sorted(outcome.importances.items(), key=lambda item: -item[1])
        print("  what mattered: " + ", ".join(f"{name} {value:.2f}" for name, value in ranked))
    print(f"  ({outcome.importance_note})")
    stopped = sum(t["stopped_early"] for t in outcome.trials.values())
    failed = sum(t["status"] == "error" for t in outcome.trials.values())
    print(f"  {len(outcome.trials)} trials, {stopped} stopped early, {failed} failed")
    print(f"Results: {outcome.path}/summary; MLflow parent run {outcome.parent_run_id}")
    print(f"  {how_to_open(mlflow_uri, outcome.experiment_id)}")
    schedule = Path(outcome.path) / "summary" / "schedule.json"
    if schedule.is_file():  # a population-based search: the best trial's settings changed as it trained
        print(f"Its settings epoch by epoch: {schedule} (replay: python -m prado_dist.train --schedule {schedule})")


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    quiet_libraries(args.verbose)
    try:
        settings = settings_from_args(args)
        prepared = prepare_search(settings)  # data, storage and MLflow are checked before Ray starts
        connect(args.address, num_cpus=args.num_cpus)
        outcome = run_prepared(prepared)
    except SearchInterrupted as err:
        print(f"\n{err}", file=sys.stderr)
        return 130  # the shell's code for a command ended by Ctrl-C
    except (ConfigError, DataError, ResourceError, SearchError, TrackingError, ConnectionError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print_summary(outcome, settings.space.metric, settings.mlflow_uri)
    return 0


if __name__ == "__main__":
    sys.exit(main())
