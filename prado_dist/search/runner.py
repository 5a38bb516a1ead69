"""A whole search: Optuna TPE + ASHA over Tune trials, recorded in MLflow, then a final test.

Order of work: validate everything that can be validated (space, data, resources, MLflow) before
any trial starts; run the Tuner (new, or restored with `resume=True`); evaluate the best trial's
best checkpoint once on the test split; log the summary to the MLflow parent run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from unittest import mock

import mlflow
import optuna
import ray
import ray.train
import torch
from mlflow.entities import Metric, Param, RunTag
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler
from ray.tune.search import BasicVariantGenerator, Searcher

from prado_dist.config import TrainConfig
from prado_dist.data import PreparedData
from prado_dist.distributed import check_fits, load_ray_checkpoint, max_concurrent_runs, storage_uri
from prado_dist.engine import TrainingRun, checkpoint_config, evaluate_checkpoint, load_data
from prado_dist.engine.export import PaintingClassifier
from prado_dist.engine.reporting import (
    ParameterAxis,
    plot_confusion,
    plot_parameter_effects,
    plot_trial_curves,
    write_confusion_csv,
)
from prado_dist.search.console import TrialLines
from prado_dist.search.population import population_scheduler, record_population
from prado_dist.search.searcher import EPOCHS_COMPLETED, PruningAwareOptunaSearch
from prado_dist.search.space import Choice, LogUniform, SearchSpace
from prado_dist.search.tracking import EndedTrial, SearchTracker, connect, git_commit
from prado_dist.search.train_workarounds import PlacementGroupReleaser
from prado_dist.search.trial import run_trial, train_storage_path, trial_resources

logger = logging.getLogger(__name__)
STATE_FILE = "prado_search.json"  # next to Tune's own state: the MLflow parent run of the search


class SearchError(RuntimeError):
    """A search that cannot start or resume; the message says why and what to do."""


@dataclass
class SearchSettings:
    space: SearchSpace
    data_dir: Path | None  # None: the generated demo set, built on each machine that needs it
    storage: str = "runs"
    name: str | None = None  # default: <space>-<time>; with resume: the newest <space>-* run
    resume: bool = False
    mlflow_uri: str = "sqlite:///mlflow.db"
    experiment: str | None = None  # default: the space name
    trial_failures: int = 2  # each trial restarts from its checkpoint up to this many times
    # Baselines for comparisons (bench/search_efficiency.py): "random" search, no early stopping.
    algorithm: str = "tpe"  # "tpe" (Optuna) or "random" (Tune's random sampling)
    early_stopping: bool = True  # ASHA; False runs every trial to the full budget
    epoch_budget: int | None = None  # stop the search once trials have trained this many epochs
    verbose: bool = False  # Tune's tables and result boxes, and the libraries' INFO logs
    callbacks: list[tune.Callback] = field(default_factory=list)  # more Tune callbacks (benches, tests)


@dataclass
class SearchOutcome:
    path: Path
    parent_run_id: str
    best_config: dict[str, Any]
    best_trial_id: str
    best_val: dict[str, float]
    test: dict[str, float]
    baseline_val: float | None
    baseline_stopped_early: bool
    trials: dict[str, dict[str, Any]] = field(default_factory=dict)  # id -> {config, status, best, epochs}


# --- setting up -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SearchLocation:
    """Where Ray writes the search (`uri`: a local path or s3://...) and this machine's own folder."""

    uri: str
    local: Path

    @property
    def name(self) -> str:
        return self.uri.rstrip("/").rsplit("/", 1)[-1]

    @property
    def parent_uri(self) -> str:
        return self.uri.rstrip("/").rsplit("/", 1)[0]


def locate(settings: SearchSettings) -> SearchLocation:
    """The search folder: --name, the newest <space>-* when resuming, else <space>-<time>."""
    root = storage_uri(settings.storage)
    remote = "://" in root
    if settings.name:
        name = settings.name
        if not settings.resume:
            refuse_existing_search(root, name, remote)
    elif settings.resume:
        if remote:
            raise SearchError("--resume with a remote --storage needs --name (the search to continue)")
        # Only searches Tune can restore: a start that failed (MLflow down, resources refused) leaves a
        # folder without Tune state, which must not hide the search before it.
        candidates = sorted(
            (path for path in Path(root).glob(f"{settings.space.name}-*") if tune.Tuner.can_restore(str(path))),
            key=lambda path: path.stat().st_mtime,
        )
        if not candidates:
            raise SearchError(f"--resume: no earlier search of space {settings.space.name!r} under {root}")
        name = candidates[-1].name
    else:
        base = f"{settings.space.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        name = claim_new_folder(Path("runs").resolve() if remote else Path(root), base)
    uri = f"{root.rstrip('/')}/{name}"
    # With remote storage the driver keeps its own records (MLflow state, summary) under ./runs.
    local = Path("runs").resolve() / name if remote else Path(uri)
    return SearchLocation(uri, local)


def refuse_existing_search(root: str, name: str, remote: bool) -> None:
    """A new search must not write into an earlier one's folder: Tune would mix both experiments'
    state and the MLflow parent run would no longer match the trials under it."""
    uri = f"{root.rstrip('/')}/{name}"
    folder = Path(uri)
    if tune.Tuner.can_restore(uri) or (not remote and folder.is_dir() and any(folder.iterdir())):
        raise SearchError(
            f"a search named {name!r} already exists in {root}; pass --resume to continue it, "
            "or another --name (or none: a new SPACE-TIME name is chosen)"
        )


def claim_new_folder(parent: Path, base: str) -> str:
    """`base`, else `base-2`, `base-3`, ...: the first name whose folder this call creates.

    Default names have one-second resolution; two searches started in the same second into the same
    storage would otherwise share one folder. `mkdir` is atomic, so each gets its own.
    """
    for attempt in range(1, 1000):
        name = base if attempt == 1 else f"{base}-{attempt}"
        try:
            (parent / name).mkdir(parents=True)
        except FileExistsError:
            continue
        except OSError as err:
            raise SearchError(f"storage {parent} is not writable: {err}; pass a writable --storage") from None
        return name
    raise SearchError(f"storage {parent}: no free search name {base}-N; pass --name")


def check_storage_writable(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise SearchError(f"storage {path} is not writable: {err}; pass a writable --storage") from None


def make_trainable(space: SearchSpace, location: SearchLocation, base_config: TrainConfig, verbose: bool = False):
    """The trial function as Tune runs it: its fixed arguments and what each trial's actor reserves."""
    resources, ray_train = space.trial.worker_resources(), space.trial.uses_ray_train
    trainable = tune.with_resources(
        tune.with_parameters(
            run_trial,
            base_config=base_config,
            resources=resources,
            ray_train=ray_train,
            train_storage=train_storage_path(location.uri),
            metric=space.metric,
            mode=space.mode,
            verbose=verbose,
        ),
        trial_resources(resources, ray_train),
    )
    return trainable


def build_tuner(
    settings: SearchSettings, location: SearchLocation, base_config: TrainConfig, tracker: SearchTracker
) -> tune.Tuner:
    space = settings.space
    resources = space.trial.worker_resources()
    trainable = make_trainable(space, location, base_config, settings.verbose)
    if settings.resume:
        if not tune.Tuner.can_restore(location.uri):
            raise SearchError(f"--resume: {location.uri} holds no Tune experiment to resume")
        return tune.Tuner.restore(location.uri, trainable, resume_unfinished=True, resume_errored=True)
    check_fits(resources, concurrent=space.max_concurrent or 1)
    concurrent = space.max_concurrent or max_concurrent_runs(resources)
    population_based = space.scheduler.population_based
    # PBT draws its first population itself and refuses a model-based searcher (Tune: "Search
    # algorithms cannot be used with PopulationBasedTraining"): random, the report's point first.
    searcher = make_searcher("random" if population_based else settings.algorithm, space, concurrent)
    scheduler = make_scheduler(space, settings.early_stopping, location)
    if population_based and concurrent < space.num_samples:
        logger.warning(
            "%d of the %d members train at a time: members compare while they train, so the later ones "
            "copy from a population that has moved on; lower num_samples or give each trial less",
            concurrent,
            space.num_samples,
        )
    return tune.Tuner(
        trainable,
        param_space=space.tune_space(),
        tune_config=tune.TuneConfig(
            metric=space.metric,
            mode=space.mode,
            search_alg=searcher,
            scheduler=scheduler,
            num_samples=space.num_samples,
            max_concurrent_trials=concurrent,
            # A one-worker trial's actor trains the next trial too: torch, data and CUDA stay warm.
            # A Ray Train trial's actor owns a Train controller that must end with its trial.
            reuse_actors=not space.trial.uses_ray_train,
        ),
        run_config=tune.RunConfig(
            name=location.name,
            storage_path=location.parent_uri,
            failure_config=tune.FailureConfig(max_failures=settings.trial_failures),
            # The best two epochs by the space's own metric, and the latest (Tune keeps it to resume).
            # A population-based search keeps them all: a member may copy another's checkpoint after
            # the other has moved on, and Tune would otherwise have deleted it.
            checkpoint_config=tune.CheckpointConfig(
                num_to_keep=None if population_based else 2,
                checkpoint_score_attribute=space.metric,
                checkpoint_score_order=space.mode,
            ),
            callbacks=[
                *([PlacementGroupReleaser()] if space.trial.uses_ray_train else []),
                TrialLines(space.metric, space.mode, space.epochs),
                tracker,
                *settings.callbacks,
            ],
            stop=EpochBudget(settings.epoch_budget) if settings.epoch_budget else None,
            verbose=1 if settings.verbose else 0,  # else TrialLines says what a person needs
        ),
    )


def make_scheduler(space: SearchSpace, early_stopping: bool, location: SearchLocation) -> TrialScheduler:
    """ASHA on completed epochs (FIFO without early stopping), or PBT / PB2 (population.py)."""
    if space.scheduler.population_based:
        return population_scheduler(space, location.local)
    if not early_stopping:
        return FIFOScheduler()
    return ASHAScheduler(
        time_attr=EPOCHS_COMPLETED,
        max_t=space.epochs,
        grace_period=min(space.scheduler.grace_period, space.epochs),
        reduction_factor=space.scheduler.reduction_factor,
    )


def make_searcher(algorithm: str, space: SearchSpace, concurrent: int) -> Searcher:
    """Optuna TPE (early-stopped trials told as pruned) or Tune's random search, both seeded."""
    if algorithm == "tpe":
        return PruningAwareOptunaSearch(
            metric=space.metric,
            mode=space.mode,
            sampler=optuna.samplers.TPESampler(seed=space.search_seed, n_startup_trials=space.searcher.startup_trials),
            max_epochs=space.epochs,
            # The report's configuration is evaluated first: the search can only improve on it.
            points_to_evaluate=[space.baseline_point()],
        )
    if algorithm == "random":
        # Its own limit: it creates every trial up front, and a trial driver reserves no CPU, so
        # without it all trials would start at once and wait for workers, each holding memory.
        return BasicVariantGenerator(
            points_to_evaluate=[space.baseline_point()], random_state=space.search_seed, max_concurrent=concurrent
        )
    raise SearchError(f"unknown search algorithm {algorithm!r}; use 'tpe' or 'random'")


class EpochBudget(tune.Stopper):
    """Stop the whole search once its trials have trained `budget` epochs in total."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.epochs: set[tuple[str, int]] = set()

    @property
    def spent(self) -> int:
        return len(self.epochs)

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        # Counted by (trial, epoch), not by call: a trial function that returns normally (no early
        # stopping) gets its last result reported a second time, and a restored trial repeats it too.
        self.epochs.add((trial_id, int(result.get(EPOCHS_COMPLETED, result.get("training_iteration", 0)))))
        return False

    def stop_all(self) -> bool:
        return self.spent >= self.budget


def parent_run(
    settings: SearchSettings, location: SearchLocation, client, experiment_id: str, tags: dict[str, str]
) -> str:
    """The search's MLflow parent run: continued on resume, created otherwise."""
    state_file = location.local / STATE_FILE
    if settings.resume and state_file.is_file():
        run_id = json.loads(state_file.read_text())["parent_run_id"]
        client.update_run(run_id, status="RUNNING")
        return run_id
    run = client.create_run(experiment_id, run_name=location.name, tags=tags)
    space = settings.space
    params = {
        "space": space.name,
        "model": space.model,
        "num_samples": space.num_samples,
        "metric": space.metric,
        "mode": space.mode,
        **{f"fixed.{k}": v for k, v in space.fixed.items()},
        **{f"search.{k}": json.dumps(v.model_dump()) for k, v in space.params.items()},
    }
    client.log_batch(run.info.run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])
    client.log_dict(run.info.run_id, space.model_dump(mode="json"), "search_space.json")
    state_file.write_text(json.dumps({"parent_run_id": run.info.run_id, "experiment_id": experiment_id}))
    return run.info.run_id


# --- the run ------------------------------------------------------------------------------------------
@dataclass
class PreparedSearch:
    """Everything checked and set up before Ray is involved: data, storage, MLflow."""

    settings: SearchSettings
    base_config: TrainConfig
    data: PreparedData
    location: SearchLocation
    client: Any
    experiment_id: str
    parent_run_id: str
    tracker: SearchTracker


def prepare_search(settings: SearchSettings) -> PreparedSearch:
    """Validate data, storage and MLflow, decode the images once and open the MLflow parent run.

    Runs before Ray starts, so a typo or an unreachable server costs seconds, not a cluster.
    """
    space = settings.space
    base_config = space.base_config(data_dir=settings.data_dir)
    location = locate(settings)
    check_storage_writable(location.local)
    experiment = settings.experiment or space.name
    client, experiment_id = connect(settings.mlflow_uri, experiment)
    data = load_data(base_config)  # decode once, in the driver, before any trial
    tags = {
        "space": space.name,
        "model": space.model,
        "dataset_fingerprint": data.fingerprint,
        "git_commit": git_commit(),
    }
    parent_id = parent_run(settings, location, client, experiment_id, {**tags, "storage": location.uri})
    tracker = SearchTracker(
        settings.mlflow_uri, experiment_id, parent_id, tags, space.epochs, location.local / "mlflow_pending.jsonl"
    )
    return PreparedSearch(settings, base_config, data, location, client, experiment_id, parent_id, tracker)


def run_search(search: SearchSettings | PreparedSearch) -> SearchOutcome:
    """Run (or resume) a search on the connected Ray cluster; settings are prepared first if needed."""
    prepared = search if isinstance(search, PreparedSearch) else prepare_search(search)
    settings, space, location = prepared.settings, prepared.settings.space, prepared.location
    print(
        f"Search {location.name}: {space.num_samples} trials of {space.model} ({space.epochs} epochs) by "
        f"{searcher_description(settings)}, metric {space.metric} ({space.mode}); storage {location.uri}; "
        f"MLflow {settings.mlflow_uri} experiment {settings.experiment or space.name!r}, "
        f"parent run {prepared.parent_run_id}",
        flush=True,
    )
    try:
        try:
            tuner = build_tuner(settings, location, prepared.base_config, prepared.tracker)
        except Exception as err:  # refused before any trial started (e.g. resources that can never fit)
            with contextlib.suppress(Exception):
                prepared.client.set_tag(prepared.parent_run_id, "error", str(err)[:4000])
                prepared.client.set_terminated(prepared.parent_run_id, status="FAILED")
            raise
        results = tuner.fit()
        repair_mlflow_records(prepared.tracker, results, space.metric)
        outcome = summarise(results, space, prepared.data, location.local, prepared.parent_run_id)
        if space.scheduler.population_based:
            best = (outcome.best_trial_id, outcome._state)  # type: ignore[attr-defined]
            record_population(prepared.client, prepared.tracker, space, location.local, best, prepared.parent_run_id)
        log_outcome(prepared.client, outcome, prepared.data, location.local, space)
    finally:
        # Also when the search fails or is interrupted: MLflow records still unwritten are listed.
        prepared.tracker.records.close()
    return outcome


def summary_file(search_folder: Path) -> Path:
    """The summary a search writes into its folder when it ends (see log_outcome)."""
    return search_folder / "summary" / "summary.json"


def finished_search_outcome(settings: SearchSettings) -> SearchOutcome:
    """The outcome of a search that ran to its end (`settings.name` in `settings.storage`), read back
    from its storage: nothing trains and nothing is logged; the best checkpoint is evaluated on the
    test split again. For benches that lost their own results after the searches had finished.
    """
    location = locate(replace(settings, resume=True))
    if not summary_file(location.local).is_file():
        raise SearchError(f"{location.uri} holds no finished search (no summary/summary.json); resume it instead")
    base_config = settings.space.base_config(data_dir=settings.data_dir)
    # Restored only to read its results: get_results() without fit() runs no trial.
    tuner = tune.Tuner.restore(location.uri, make_trainable(settings.space, location, base_config))
    parent_id = json.loads((location.local / STATE_FILE).read_text())["parent_run_id"]
    return summarise(tuner.get_results(), settings.space, load_data(base_config), location.local, parent_id)


def searcher_description(settings: SearchSettings) -> str:
    space = settings.space
    if space.scheduler.population_based:
        return (
            f"{space.scheduler.kind.upper()}, a population of {space.num_samples} drawn at random (the report's "
            f"configuration one of them), perturbed every {space.scheduler.perturbation_interval} epochs"
        )
    if settings.algorithm != "tpe":
        return "random search"
    startup = space.searcher.startup_trials
    if startup >= space.num_samples:
        return (
            f"Optuna TPE, but all {space.num_samples} trials are its random start-up trials "
            f"(searcher.startup_trials={startup}): lower it for TPE to model the results"
        )
    return f"Optuna TPE (the first {startup} trials random)"


def _error_line(error: BaseException | None) -> str | None:
    """Why a trial failed, in one line: the error type and the last line of its message, which for a
    worker's failure names the worker's exception (`...NonFiniteLossError: training loss became nan ...`)."""
    if error is None:
        return None
    while error.__cause__ is not None:
        error = error.__cause__
    return f"{type(error).__name__}: {str(error).strip().splitlines()[-1] if str(error).strip() else ''}"[:500]


def repair_mlflow_records(tracker: SearchTracker, results, metric: str) -> None:
    """Fill what MLflow lacks from Tune's results (records a killed driver never wrote, trials that
    ended while it was gone); if MLflow is still unreachable, the search goes on without."""
    tracker.records.flush()
    added, known = 0, set()
    try:
        for result in results:
            if result.config is None:  # never started: a search-wide stop came first
                continue
            trial_id = result_trial_id(result)
            known.add(trial_id)
            ended = EndedTrial(trial_id, dict(result.config), trial_history(result), _error_line(result.error))
            added += tracker.reconcile(ended, metric)
        if lost := tracker.remove_lost_trials(known):
            logger.warning("%d trial(s) started just before the driver was killed were not resumed by Tune", lost)
    except Exception as err:
        logger.warning("could not check the trials' MLflow records against Tune's results (%s)", err)
        return
    if added:
        logger.warning("%d epochs missing from MLflow were written from Tune's results", added)


def result_trial_id(result) -> str:
    """Tune's trial id of a `Result` (the folder name for a trial that never reported)."""
    return (result.metrics or {}).get("trial_id") or Path(result.path).name


def trial_history(result) -> list[dict[str, Any]]:
    """One row per epoch the trial trained, in order.

    Tune starts a restored trial's result files afresh: after `--resume`, a trial interrupted after
    epoch 2 lists only epoch 3 (measured in tests/test_search.py). The earlier epochs are taken from
    the history that the trial's checkpoints carry.
    """
    frame = result.metrics_dataframe
    rows = [] if frame is None else frame.to_dict("records")
    first = min((int(row[EPOCHS_COMPLETED]) for row in rows if EPOCHS_COMPLETED in row), default=1)
    return (_epochs_from_checkpoint(result, before=first) + rows) if first > 1 else rows


def _epochs_from_checkpoint(result, before: int) -> list[dict[str, Any]]:
    """The epochs before `before` from the history in the trial's newest checkpoint that still exists."""
    newest_first = [result.checkpoint, *(checkpoint for checkpoint, _ in reversed(result.best_checkpoints or []))]
    for checkpoint in newest_first:
        if checkpoint is None:
            continue
        try:
            history = load_ray_checkpoint(checkpoint)["history"]
        except Exception as err:  # storage unreachable, or a checkpoint pruned meanwhile
            logger.debug("checkpoint %s: %s", checkpoint, err)
            continue
        return [dict(entry) for entry in history if int(entry.get(EPOCHS_COMPLETED, 0)) < before]
    logger.warning("the epochs before %d of a resumed trial are in MLflow and its Tune logs only", before)
    return []


def best_checkpoint(results, space: SearchSpace) -> tuple[str, dict[str, Any], Any]:
    """(trial id, metrics, checkpoint) of the best kept checkpoint of any trial by the space's metric."""
    sign = 1 if space.mode == "max" else -1
    candidates = [
        (sign * metrics[space.metric], result_trial_id(result), metrics, checkpoint)
        for result in results
        for checkpoint, metrics in (result.best_checkpoints or [])
        if space.metric in metrics
    ]
    if not candidates:
        errors = [str(r.error)[:300] for r in results if r.error]
        raise SearchError(f"no trial produced a checkpoint; errors: {errors or 'none reported'}")
    _, trial_id, metrics, checkpoint = max(candidates, key=lambda candidate: candidate[0])
    return trial_id, metrics, checkpoint


def summarise(results, space: SearchSpace, data: PreparedData, path: Path, parent_id: str) -> SearchOutcome:
    """Best trial and its best checkpoint, evaluated once on the test split; the baseline's score."""
    sign = 1 if space.mode == "max" else -1
    trials: dict[str, dict[str, Any]] = {}
    for result in results:
        rows = [row for row in trial_history(result) if space.metric in row]
        trial_id = result_trial_id(result)
        epochs = max((int(row[EPOCHS_COMPLETED]) for row in rows), default=0)
        best_row = max(rows, key=lambda row: sign * row[space.metric], default=None)
        trials[trial_id] = {
            "config": dict(result.config or {}),  # None for a trial a search-wide stop never started
            "status": "error" if result.error else "ok",
            "error": _error_line(result.error),
            "epochs": epochs,
            "best": best_row[space.metric] if best_row else None,
            "stopped_early": epochs < space.epochs,
            "curve": [(int(row[EPOCHS_COMPLETED]), float(row[space.metric])) for row in rows],
            "timestamps": [float(row.get("timestamp", 0)) for row in rows],
            "first_report_s": float(rows[0]["time_total_s"]) if rows and "time_total_s" in rows[0] else None,
            "first_epoch_s": float(rows[0]["epoch_seconds"]) if rows else None,
            "devices": str(rows[-1].get("devices", "")) if rows else "",  # each worker's, e.g. "cuda:0"
        }
    best_id, best_row, checkpoint = best_checkpoint(results, space)
    state = load_ray_checkpoint(checkpoint)  # local or remote storage
    test_metrics, confusion = evaluate_checkpoint(state, data, "test")
    baseline = space.baseline_point()
    baseline_trial = next(
        (t for t in trials.values() if all(t["config"].get(k) == v for k, v in baseline.items())), None
    )
    outcome = SearchOutcome(
        path=path,
        parent_run_id=parent_id,
        best_config=trials[best_id]["config"],
        best_trial_id=best_id,
        best_val={k: float(v) for k, v in best_row.items() if k.startswith("val_") and isinstance(v, int | float)},
        test=test_metrics,
        baseline_val=baseline_trial["best"] if baseline_trial else None,
        baseline_stopped_early=bool(baseline_trial and baseline_trial["stopped_early"]),
        trials=trials,
    )
    outcome.best_val["epochs_completed"] = float(best_row[EPOCHS_COMPLETED])
    outcome._state = state  # type: ignore[attr-defined]  # the best checkpoint, for logging the model
    outcome._confusion = confusion  # type: ignore[attr-defined]
    return outcome


def log_outcome(client, outcome: SearchOutcome, data: PreparedData, path: Path, space: SearchSpace) -> None:
    """Best config and metrics, test metrics, figures and the best model on the parent run."""
    run_id = outcome.parent_run_id
    artifacts = summary_file(path).parent
    artifacts.mkdir(exist_ok=True)
    confusion = outcome._confusion  # type: ignore[attr-defined]
    plot_confusion(
        confusion,
        data.classes,
        artifacts / "test_confusion_matrix.png",
        title=f"best trial {outcome.best_trial_id}: test split",
    )
    write_confusion_csv(confusion, data.classes, artifacts / "test_confusion_matrix.csv")
    curves = {trial_id: trial["curve"] for trial_id, trial in outcome.trials.items()}
    plot_trial_curves(curves, space.metric, artifacts / "trial_curves.png", highlight=[outcome.best_trial_id])
    plot_parameter_effects(
        outcome.trials, parameter_axes(space), space.metric, artifacts / "parameter_effects.png", outcome.best_trial_id
    )
    summary = {
        "best_trial": outcome.best_trial_id,
        "best_config": outcome.best_config,
        "best_val": outcome.best_val,
        "test": outcome.test,
        "baseline_val": outcome.baseline_val,
        "trials": outcome.trials,
    }
    summary_file(path).write_text(json.dumps(summary, indent=2, default=str))
    metrics = [Metric(f"best_{k}", v, int(time.time() * 1000), 0) for k, v in outcome.best_val.items()]
    metrics += [Metric(k, float(v), int(time.time() * 1000), 0) for k, v in outcome.test.items()]
    if outcome.baseline_val is not None:
        metrics.append(Metric(f"baseline_{space.metric}", float(outcome.baseline_val), int(time.time() * 1000), 0))
    params = [Param(f"best.{k}", str(v)) for k, v in outcome.best_config.items()]
    params.append(Param("best.trial_id", outcome.best_trial_id))
    try:
        client.log_batch(run_id, metrics=metrics, params=params, tags=[RunTag("best_trial_id", outcome.best_trial_id)])
        client.log_artifacts(run_id, str(artifacts))
        log_best_model(client.tracking_uri, run_id, outcome, data)
        client.set_terminated(run_id, status="FINISHED")
    except Exception as err:
        logger.warning("could not record the search summary in MLflow (%s); it is in %s", err, artifacts)


def parameter_axes(space: SearchSpace) -> dict[str, ParameterAxis]:
    """How each searched parameter is plotted: as it is drawn (log-uniform on a log axis)."""
    return {
        name: ParameterAxis(categories=tuple(spec.values))
        if isinstance(spec, Choice)
        else ParameterAxis(log=isinstance(spec, LogUniform), limits=(spec.low, spec.high))
        for name, spec in space.params.items()
    }


def log_best_model(uri: str, run_id: str, outcome: SearchOutcome, data: PreparedData) -> None:
    """The best checkpoint as an MLflow PyTorch model with an input signature (see predict.py)."""
    from mlflow.environment_variables import MLFLOW_DEFAULT_PREDICTION_DEVICE
    from mlflow.models import infer_signature

    state = outcome._state  # type: ignore[attr-defined]
    train_config = checkpoint_config(state).with_overrides({"device": "cpu"})
    run = TrainingRun(train_config, data)
    # The whole network on images (a transfer run may have trained its head on cached features).
    run.load_model_state(state["model"])
    classifier = PaintingClassifier(run.network, run.image_pipeline, data.classes, train_config.image_size)
    # MLflow 3 saves the model with torch.export ("pt2"), which fixes a dimension of size 1: an example
    # of 2 images keeps the batch dimension dynamic, so the logged model takes any number of images.
    example = torch.from_numpy(data.images[data.splits["test"][:2]].transpose(0, 3, 1, 2).copy()).float()
    signature = infer_signature(example.numpy(), classifier(example).numpy())
    mlflow.set_tracking_uri(uri)
    # The exported program holds CPU weights, which torch.export cannot move; MLflow checks the input
    # example by loading the model on the GPU when there is one, and fails. Checked on the CPU instead.
    on_cpu = {MLFLOW_DEFAULT_PREDICTION_DEVICE.name: MLFLOW_DEFAULT_PREDICTION_DEVICE.get() or "cpu"}
    with mlflow.start_run(run_id=run_id), mock.patch.dict(os.environ, on_cpu):
        mlflow.pytorch.log_model(
            classifier,
            name="model",
            signature=signature,
            input_example=example.numpy(),
            # The exported program needs only torch to load. Stating it skips MLflow's inference
            # of requirements, a subprocess that re-imports the model: 6-7 s of every search here.
            pip_requirements=mlflow.pytorch.get_default_pip_requirements(),
            metadata={"classes": list(data.classes), "image_size": train_config.image_size},
        )


def leftover_resources() -> dict[str, Any]:
    """What a finished search may have left behind in the Ray cluster (for tests and benches)."""
    from ray.util import placement_group_table

    groups = [pg for pg, info in placement_group_table().items() if info.get("state") != "REMOVED"]
    return {"placement_groups": groups, "available": ray.available_resources(), "total": ray.cluster_resources()}
