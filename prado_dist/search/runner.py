"""A whole search: Optuna TPE + ASHA (or PBT) over Tune trials, recorded in MLflow, then a final test.

Order of work: validate everything that can be validated (space, data, storage, MLflow) and decode
the images before Ray starts (`prepare_search`); open the MLflow parent run and run the Tuner (new,
or restored with `resume=True`); when every trial has ended, evaluate the best trial's best
checkpoint once on the test split and log the summary to the parent run (`run_prepared`). A search
interrupted by Ctrl-C tests nothing and leaves its parent run KILLED, to be resumed.
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from mlflow.entities import Param
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from ray import tune

from prado_dist.config import TrainConfig
from prado_dist.data import PreparedData
from prado_dist.distributed import check_data_on_nodes
from prado_dist.engine import load_data
from prado_dist.search.importance import parameter_importances
from prado_dist.search.mlflow_experiment import connect, dataset_input, git_commit
from prado_dist.search.population import record_population
from prado_dist.search.report import log_outcome
from prado_dist.search.results import (
    SearchOutcome,
    TrialStates,
    interrupted,
    repair_mlflow_records,
    summarise,
    summarise_trials,
)
from prado_dist.search.settings import SearchError, SearchInterrupted, SearchSettings
from prado_dist.search.storage import (
    SearchLocation,
    check_resume_matches,
    check_storage_writable,
    locate,
    read_state,
    write_state,
)
from prado_dist.search.tracking import SearchTracker
from prado_dist.search.tuner import build_tuner, make_trainable, searcher_description

logger = logging.getLogger(__name__)


@dataclass
class PreparedSearch:
    """Everything checked and set up before Ray is involved: data, storage, MLflow."""

    settings: SearchSettings
    base_config: TrainConfig
    data: PreparedData
    location: SearchLocation
    client: Any
    experiment_id: str
    tags: dict[str, str]  # on the parent run and every child run


def prepare_search(settings: SearchSettings) -> PreparedSearch:
    """Validate the search's folder, MLflow and data, and decode the images once.

    Runs before Ray starts, so a typo or an unreachable server costs seconds, not a cluster; it writes
    nothing a failed start would leave behind but the search's (empty) folder.
    """
    space = settings.space
    base_config = search_base_config(settings)
    location = locate(settings)
    if settings.resume and not tune.Tuner.can_restore(location.uri):
        raise SearchError(f"--resume: {location.uri} holds no Tune experiment to resume (did it start?)")
    check_resume_matches(settings, read_state(location))
    check_storage_writable(location.local)
    client, experiment_id = connect(settings.mlflow_uri, settings.experiment or space.name)
    data = load_data(base_config)  # decode once, in the driver, before any trial
    tags = {
        "space": space.name,
        "model": space.model,
        "dataset_fingerprint": data.fingerprint,
        "git_commit": git_commit(),
    }
    return PreparedSearch(settings, base_config, data, location, client, experiment_id, tags)


def search_base_config(settings: SearchSettings) -> TrainConfig:
    """The settings every trial starts from. `data_dir` absolute: a trial runs in its own folder
    (Tune changes into it), and on other nodes."""
    data_dir = Path(settings.data_dir).resolve() if settings.data_dir is not None else None
    return settings.space.base_config(data_dir=data_dir)


def run_search(settings: SearchSettings) -> SearchOutcome:
    """Prepare and run (or resume) a search on the connected Ray cluster."""
    return run_prepared(prepare_search(settings))


def run_prepared(prepared: PreparedSearch) -> SearchOutcome:
    """Run (or resume) a prepared search; raises SearchInterrupted when Ctrl-C stopped it."""
    settings, space, location = prepared.settings, prepared.settings.space, prepared.location
    base = prepared.base_config
    if nodes := check_data_on_nodes(base.data_dir, base.image_size, prepared.data.fingerprint):
        print(f"The images are the same on the {nodes} other node(s) of the cluster.", flush=True)
    parent_id = open_parent_run(prepared)
    tracker = SearchTracker(
        settings.mlflow_uri,
        prepared.experiment_id,
        parent_id,
        prepared.tags,
        space.epochs,
        location.local / "mlflow_pending.jsonl",
    )
    print(
        f"Search {location.name}: {space.num_samples} trials of {space.model} ({space.epochs} epochs) by "
        f"{searcher_description(space)}, metric {space.metric} ({space.mode}); storage {location.uri}; "
        f"MLflow {settings.mlflow_uri} experiment {settings.experiment or space.name!r}, parent run {parent_id}",
        flush=True,
    )
    try:
        try:
            tuner = build_tuner(settings, location, base, tracker, prepared.data.fingerprint)
        except Exception as err:  # refused before any trial started (e.g. resources that can never fit)
            end_failed_start(prepared, parent_id, err)
            raise
        TrialStates.unfinished = 0  # a search from before TrialStates existed restores without it
        results = tuner.fit()
        return end_search(prepared, parent_id, tracker, results)
    finally:
        # Also when the search fails or is interrupted: MLflow records still unwritten are listed.
        tracker.records.close()


def open_parent_run(prepared: PreparedSearch) -> str:
    """The search's MLflow parent run: continued on resume, created otherwise (with the state file)."""
    settings, location, client = prepared.settings, prepared.location, prepared.client
    state = read_state(location)
    if settings.resume and state:
        client.update_run(state["parent_run_id"], status="RUNNING")
        return state["parent_run_id"]
    tags = {**prepared.tags, "storage": location.uri}
    if settings.parent_run_id:
        tags[MLFLOW_PARENT_RUN_ID] = settings.parent_run_id
    run = client.create_run(prepared.experiment_id, run_name=location.name, tags=tags)
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
    client.log_inputs(run.info.run_id, [dataset_input(prepared.data, settings.data_dir)])
    write_state(location, run.info.run_id, prepared.experiment_id, settings)
    return run.info.run_id


def end_failed_start(prepared: PreparedSearch, parent_id: str, err: Exception) -> None:
    """A search refused before Tune saved any state: its parent run FAILED with the reason, and the
    state file removed, so that the same --name can be used again once the cause is fixed."""
    with contextlib.suppress(Exception):
        prepared.client.set_tag(parent_id, "error", str(err)[:4000])
        prepared.client.set_terminated(parent_id, status="FAILED")
    if not prepared.settings.resume and not tune.Tuner.can_restore(prepared.location.uri):
        prepared.location.state_file.unlink(missing_ok=True)


def end_search(prepared: PreparedSearch, parent_id: str, tracker: SearchTracker, results) -> SearchOutcome:
    """Interrupted: parent run KILLED, nothing tested. Ended: the best checkpoint tested, all recorded."""
    settings, space, location = prepared.settings, prepared.settings.space, prepared.location
    repair_mlflow_records(tracker, results, space.metric)
    trials = summarise_trials(results, space)
    if interrupted(trials, settings.epoch_budget):
        with contextlib.suppress(Exception):  # MLflow down: the parent run stays RUNNING until resumed
            prepared.client.set_terminated(parent_id, status="KILLED")
        raise SearchInterrupted(
            f"search {location.name} was interrupted with {TrialStates.unfinished} trial(s) unfinished; nothing "
            f"was tested. Continue it with: --resume --name {location.name} (and the same --storage and --set)"
        )
    outcome = summarise(results, space, prepared.data, location.local, parent_id, trials)
    outcome.experiment_id = prepared.experiment_id
    importances = parameter_importances(outcome.trials, space)
    outcome.importances, outcome.importance_note = importances.values, importances.note
    if space.scheduler.population_based:
        best = (outcome.best_trial_id, outcome.best_state)
        record_population(prepared.client, tracker, space, location.local, best, parent_id)
    log_outcome(prepared.client, outcome, prepared.data, location, space, settings.register_model)
    return outcome


def finished_outcome(settings: SearchSettings) -> SearchOutcome:
    """The outcome of a search that ran to its end (`settings.name` in `settings.storage`), read back
    from its storage: nothing trains and nothing is logged; the best checkpoint is tested again.
    For a comparison or a bench that goes on after the searches it ran."""
    location = locate(replace(settings, resume=True))
    state = read_state(location)
    if not location.summary_file.is_file() or state is None:
        raise SearchError(f"{location.uri} holds no finished search (no summary/summary.json); resume it instead")
    base_config = search_base_config(settings)
    # Restored only to read its results: get_results() without fit() runs no trial.
    tuner = tune.Tuner.restore(location.uri, make_trainable(settings.space, location, base_config))
    data = load_data(base_config)
    outcome = summarise(tuner.get_results(), settings.space, data, location.local, state["parent_run_id"])
    outcome.experiment_id = state["experiment_id"]
    return outcome
