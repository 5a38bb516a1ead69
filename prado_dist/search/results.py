"""What a search found, read from Tune's results: each trial's history, the best checkpoint (tested
once on the test split), the report's configuration's score, and whether the search ran to its end."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from ray import tune
from ray.tune.experiment import Trial

from prado_dist.data import PreparedData
from prado_dist.distributed import load_ray_checkpoint
from prado_dist.engine import evaluate_checkpoint
from prado_dist.search.searcher import EPOCHS_COMPLETED
from prado_dist.search.settings import SearchError
from prado_dist.search.space import SearchSpace
from prado_dist.search.tracking import EndedTrial, SearchTracker

logger = logging.getLogger(__name__)


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
    best_state: dict[str, Any] = field(default_factory=dict, repr=False)  # the best checkpoint, for the model
    confusion: torch.Tensor | None = field(default=None, repr=False)  # of the test split
    importances: dict[str, float] = field(default_factory=dict)  # searched setting -> fANOVA importance
    importance_note: str = ""  # what the importances rest on, or why there are none
    experiment_id: str = ""  # the MLflow experiment of the parent run


# --- did it end? -----------------------------------------------------------------------------------
class TrialStates(tune.Callback):
    """How many trials were still to run when Tune's loop last stepped.

    `Tuner.fit()` returns normally after Ctrl-C, and its cleanup marks the trials it stops as
    TERMINATED, so the results cannot tell an interrupted search from a finished one; the state just
    before is kept here. On the class, because a resumed search runs the callbacks Tune pickled.
    """

    unfinished: ClassVar[int] = 0

    def __init__(self, num_samples: int) -> None:
        self.num_samples = num_samples

    def setup(self, **info: Any) -> None:
        TrialStates.unfinished = self.num_samples

    def on_step_end(self, iteration: int, trials: list[Trial], **info: Any) -> None:
        running = sum(trial.status not in (Trial.TERMINATED, Trial.ERROR) for trial in trials)
        TrialStates.unfinished = running + max(0, self.num_samples - len(trials))


def interrupted(outcome_trials: dict[str, dict[str, Any]], epoch_budget: int | None) -> bool:
    """Trials were left to run, and not because the search's epoch budget was spent."""
    if epoch_budget is not None and sum(trial["epochs"] for trial in outcome_trials.values()) >= epoch_budget:
        return False
    return TrialStates.unfinished > 0


# --- each trial --------------------------------------------------------------------------------------
def result_trial_id(result) -> str:
    """Tune's trial id of a `Result` (the folder name for a trial that never reported)."""
    return (result.metrics or {}).get("trial_id") or Path(result.path).name


def error_line(error: BaseException | None) -> str | None:
    """Why a trial failed, in one line: the error type and the last line of its message, which for a
    worker's failure names the worker's exception (`...NonFiniteLossError: training loss became nan ...`)."""
    if error is None:
        return None
    while error.__cause__ is not None:
        error = error.__cause__
    return f"{type(error).__name__}: {str(error).strip().splitlines()[-1] if str(error).strip() else ''}"[:500]


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


def trial_summary(result, space: SearchSpace) -> dict[str, Any]:
    """A trial as the summary, the figures and the console show it."""
    sign = 1 if space.mode == "max" else -1
    rows = [row for row in trial_history(result) if space.metric in row]
    epochs = max((int(row[EPOCHS_COMPLETED]) for row in rows), default=0)
    best_row = max(rows, key=lambda row: sign * row[space.metric], default=None)
    return {
        "config": dict(result.config or {}),  # None for a trial a search-wide stop never started
        "status": "error" if result.error else "ok",
        "error": error_line(result.error),
        "epochs": epochs,
        "best": best_row[space.metric] if best_row else None,
        "stopped_early": epochs < space.epochs,
        "curve": [(int(row[EPOCHS_COMPLETED]), float(row[space.metric])) for row in rows],
        "timestamps": [float(row.get("timestamp", 0)) for row in rows],
        "first_report_s": float(rows[0]["time_total_s"]) if rows and "time_total_s" in rows[0] else None,
        "first_epoch_s": float(rows[0]["epoch_seconds"]) if rows else None,
        "images_per_second": [float(row["images_per_second"]) for row in rows if "images_per_second" in row],
        "devices": str(rows[-1].get("devices", "")) if rows else "",  # each worker's, e.g. "cuda:0"
    }


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
            ended = EndedTrial(trial_id, dict(result.config), trial_history(result), error_line(result.error))
            added += tracker.reconcile(ended, metric)
        if lost := tracker.remove_lost_trials(known):
            logger.warning("%d trial(s) started just before the driver was killed were not resumed by Tune", lost)
    except Exception as err:
        logger.warning("could not check the trials' MLflow records against Tune's results (%s)", err)
        return
    if added:
        logger.warning("%d epochs missing from MLflow were written from Tune's results", added)


# --- the search --------------------------------------------------------------------------------------
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


def summarise_trials(results, space: SearchSpace) -> dict[str, dict[str, Any]]:
    return {result_trial_id(result): trial_summary(result, space) for result in results}


def summarise(
    results, space: SearchSpace, data: PreparedData, path: Path, parent_id: str, trials: dict | None = None
) -> SearchOutcome:
    """Best trial and its best checkpoint, evaluated once on the test split; the baseline's score."""
    trials = trials if trials is not None else summarise_trials(results, space)
    best_id, best_row, checkpoint = best_checkpoint(results, space)
    state = load_ray_checkpoint(checkpoint)  # local or remote storage
    test_metrics, confusion = evaluate_checkpoint(state, data, "test")
    baseline = space.baseline_point()
    baseline_trial = next(
        (t for t in trials.values() if all(t["config"].get(k) == v for k, v in baseline.items())), None
    )
    best_val = {k: float(v) for k, v in best_row.items() if k.startswith("val_") and isinstance(v, int | float)}
    best_val["epochs_completed"] = float(best_row[EPOCHS_COMPLETED])
    return SearchOutcome(
        path=path,
        parent_run_id=parent_id,
        best_config=trials[best_id]["config"],
        best_trial_id=best_id,
        best_val=best_val,
        test=test_metrics,
        baseline_val=baseline_trial["best"] if baseline_trial else None,
        baseline_stopped_early=bool(baseline_trial and baseline_trial["stopped_early"]),
        trials=trials,
        best_state=state,
        confusion=confusion,
    )
