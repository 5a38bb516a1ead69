"""Tune's side of a search: the trainable, the searcher, the scheduler, the stopper and the Tuner."""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import optuna
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler
from ray.tune.search import BasicVariantGenerator, Searcher

from prado_dist.config import TrainConfig
from prado_dist.distributed import check_fits, max_concurrent_runs
from prado_dist.search.console import TrialLines
from prado_dist.search.population import population_scheduler
from prado_dist.search.results import TrialStates
from prado_dist.search.searcher import EPOCHS_COMPLETED, PruningAwareOptunaSearch
from prado_dist.search.settings import SearchError, SearchSettings
from prado_dist.search.space import SearchSpace
from prado_dist.search.storage import SearchLocation
from prado_dist.search.tracking import SearchTracker
from prado_dist.search.train_workarounds import PlacementGroupReleaser
from prado_dist.search.trial import run_trial, train_storage_path, trial_resources

logger = logging.getLogger(__name__)


def make_trainable(
    space: SearchSpace,
    location: SearchLocation,
    base_config: TrainConfig,
    verbose: bool = False,
    data_fingerprint: str | None = None,
):
    """The trial function as Tune runs it: its fixed arguments and what each trial's actor reserves."""
    resources, ray_train = space.trial.worker_resources(), space.trial.uses_ray_train
    return tune.with_resources(
        tune.with_parameters(
            run_trial,
            base_config=base_config,
            resources=resources,
            ray_train=ray_train,
            train_storage=train_storage_path(location.uri),
            metric=space.metric,
            mode=space.mode,
            verbose=verbose,
            data_fingerprint=data_fingerprint,
        ),
        trial_resources(resources, ray_train),
    )


def warn_if_population_waits(space: SearchSpace, concurrent: int) -> None:
    if space.scheduler.population_based and concurrent < space.num_samples:
        logger.warning(
            "%d of the %d members train at a time: members compare while they train, so the later ones "
            "copy from a population that has moved on; lower num_samples or give each trial less",
            concurrent,
            space.num_samples,
        )


def build_tuner(
    settings: SearchSettings,
    location: SearchLocation,
    base_config: TrainConfig,
    tracker: SearchTracker,
    data_fingerprint: str | None = None,
) -> tune.Tuner:
    """A new Tuner, or with `settings.resume` the one Tune saved (its callbacks and stopper included);
    its trials check that they train on the images of `data_fingerprint` (the driver's)."""
    space = settings.space
    trainable = make_trainable(space, location, base_config, settings.verbose, data_fingerprint)
    if settings.resume:
        if not tune.Tuner.can_restore(location.uri):
            raise SearchError(f"--resume: {location.uri} holds no Tune experiment to resume")
        return tune.Tuner.restore(location.uri, trainable, resume_unfinished=True, resume_errored=True)
    resources = space.trial.worker_resources()
    check_fits(resources, concurrent=space.max_concurrent or 1)
    concurrent = space.max_concurrent or max_concurrent_runs(resources)
    warn_if_population_waits(space, concurrent)
    return tune.Tuner(
        trainable,
        param_space=space.tune_space(),
        tune_config=tune.TuneConfig(
            metric=space.metric,
            mode=space.mode,
            search_alg=make_searcher(space, concurrent),
            scheduler=make_scheduler(space, location),
            num_samples=space.num_samples,
            max_concurrent_trials=concurrent,
            # A one-worker trial's actor trains the next trial too: torch, data and CUDA stay warm.
            # A Ray Train trial's actor owns a Train controller that must end with its trial.
            reuse_actors=not space.trial.uses_ray_train,
        ),
        run_config=run_config(settings, location, tracker),
    )


def run_config(settings: SearchSettings, location: SearchLocation, tracker: SearchTracker) -> tune.RunConfig:
    space = settings.space
    return tune.RunConfig(
        name=location.name,
        storage_path=location.parent_uri,
        failure_config=tune.FailureConfig(max_failures=settings.trial_failures),
        # The best two epochs by the space's own metric, and the latest (Tune keeps it to resume).
        # A population-based search keeps them all: a member may copy another's checkpoint after
        # the other has moved on, and Tune would otherwise have deleted it.
        checkpoint_config=tune.CheckpointConfig(
            num_to_keep=None if space.scheduler.population_based else 2,
            checkpoint_score_attribute=space.metric,
            checkpoint_score_order=space.mode,
        ),
        callbacks=[
            *([PlacementGroupReleaser()] if space.trial.uses_ray_train else []),
            TrialLines(space.metric, space.mode, space.epochs),
            TrialStates(space.num_samples),  # whether the search ran to its end (Ctrl-C)
            *([EndsOfBudget()] if settings.epoch_budget else []),
            tracker,
            *settings.callbacks,
        ],
        stop=EpochBudget(settings.epoch_budget) if settings.epoch_budget else None,
        verbose=1 if settings.verbose else 0,  # else TrialLines says what a person needs
    )


def make_scheduler(space: SearchSpace, location: SearchLocation) -> TrialScheduler:
    """ASHA on completed epochs, FIFO (no early stopping), or PBT / PB2 (population.py)."""
    if space.scheduler.population_based:
        return population_scheduler(space, location.local)
    if space.scheduler.kind == "fifo":
        return FIFOScheduler()
    return ASHAScheduler(
        time_attr=EPOCHS_COMPLETED,
        max_t=space.epochs,
        grace_period=min(space.scheduler.grace_period, space.epochs),
        reduction_factor=space.scheduler.reduction_factor,
    )


def make_searcher(space: SearchSpace, concurrent: int) -> Searcher:
    """Optuna TPE (early-stopped trials told as pruned) or Tune's random search, both seeded.

    PBT draws its first population itself and refuses a model-based searcher (Tune: "Search
    algorithms cannot be used with PopulationBasedTraining"): random, the report's point first.
    """
    if space.searcher.kind == "tpe" and not space.scheduler.population_based:
        return PruningAwareOptunaSearch(
            metric=space.metric,
            mode=space.mode,
            sampler=optuna.samplers.TPESampler(seed=space.search_seed, n_startup_trials=space.searcher.startup_trials),
            max_epochs=space.epochs,
            # The report's configuration is evaluated first: the search can only improve on it.
            points_to_evaluate=[space.baseline_point()],
        )
    # Its own limit: it creates every trial up front, and without it all of them would be pending at
    # once, each holding a trial's memory in the driver.
    return BasicVariantGenerator(
        points_to_evaluate=[space.baseline_point()], random_state=space.search_seed, max_concurrent=concurrent
    )


def searcher_description(space: SearchSpace) -> str:
    if space.scheduler.population_based:
        return (
            f"{space.scheduler.kind.upper()}, a population of {space.num_samples} drawn at random (the report's "
            f"configuration one of them), perturbed every {space.scheduler.perturbation_interval} epochs"
        )
    stopping = " without early stopping" if space.scheduler.kind == "fifo" else ""
    if space.searcher.kind == "random":
        return f"random search{stopping}"
    startup = space.searcher.startup_trials
    if startup >= space.num_samples:
        return (
            f"Optuna TPE{stopping}, but all {space.num_samples} trials are its random start-up trials "
            f"(searcher.startup_trials={startup}): lower it for TPE to model the results"
        )
    return f"Optuna TPE (the first {startup} trials random){stopping}"


class EpochBudget(tune.Stopper):
    """Stop the whole search once its trials have trained `budget` epochs in total.

    The trial whose epoch spends the budget (and any that reports before the search stops) is
    stopped alone first: Tune registers an epoch's checkpoint only after the result, on a later
    step, and stopping every trial at once dropped that last checkpoint (a comparison's best epoch
    was lost, tests/test_compare.py). The search stops when those trials have ended (`EndsOfBudget`).
    On the class, like TrialStates, because a resumed search runs the callbacks Tune pickled.
    """

    ending: ClassVar[set[str]] = set()  # trials stopped by the budget that have not ended yet

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.epochs: set[tuple[str, int]] = set()
        EpochBudget.ending = set()

    @property
    def spent(self) -> int:
        return len(self.epochs)

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        # Counted by (trial, epoch), not by call: a trial function that returns normally (no early
        # stopping) gets its last result reported a second time, and a restored trial repeats it too.
        self.epochs.add((trial_id, int(result.get(EPOCHS_COMPLETED, result.get("training_iteration", 0)))))
        if self.spent < self.budget:
            return False
        EpochBudget.ending.add(trial_id)
        return True

    def stop_all(self) -> bool:
        return self.spent >= self.budget and not EpochBudget.ending


class EndsOfBudget(tune.Callback):
    """Tells EpochBudget when a trial it stopped has ended, its last checkpoint registered."""

    def on_trial_complete(self, iteration: int, trials: list, trial, **info: Any) -> None:
        EpochBudget.ending.discard(trial.trial_id)

    def on_trial_error(self, iteration: int, trials: list, trial, **info: Any) -> None:
        EpochBudget.ending.discard(trial.trial_id)
