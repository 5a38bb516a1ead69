"""MLflow records of a search: one parent run per search, one nested child run per trial.

Written from the Tune driver (a `tune.Callback`), never from training workers, so a cluster's
MLflow server can listen on the head node only. MLflow being unreachable never stops training:
each record that fails is kept and retried with the next event, and whatever is still missing at
the end is written to `mlflow_pending.jsonl` in the search folder and named in a warning.
Connecting to the experiment and describing the search are mlflow_experiment.py's part.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME
from ray import tune
from ray.tune.experiment import Trial

logger = logging.getLogger(__name__)


def numeric_metrics(result: dict[str, Any]) -> dict[str, float]:
    return {
        key: float(value)
        for key, value in result.items()
        if isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and key
        not in {
            "epoch",
            "epochs_completed",
            "training_iteration",
            "timestamp",
            "time_total_s",
            "time_this_iter_s",
            "pid",
            "time_since_restore",
            "iterations_since_restore",
        }
    }


# MLflow's answers that no retry changes (a changed param value, a deleted run, no permission): such a
# record is reported, listed and skipped; anything else (no answer, a timeout, a 5xx) is an outage.
PERMANENT_REFUSALS = {
    "INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST", "PERMISSION_DENIED",
    "BAD_REQUEST", "INVALID_STATE",
}  # fmt: skip
MAX_PENDING = 10_000  # records kept in memory through an outage; later ones are listed in the file at once
SLOW_FAILURE_S = 2.0  # a failure that took this long is a hung server, not a refused connection ...
RETRY_AFTER_SLOW_S = 30.0  # ... so the records wait this long before the next try, not each Tune event


def is_refusal(err: Exception) -> bool:
    return isinstance(err, MlflowException) and err.error_code in PERMANENT_REFUSALS


class RecordQueue:
    """MLflow writes that are retried until they succeed, in order; nothing is dropped silently.

    An outage keeps the records (at most MAX_PENDING; the rest are listed in `pending_file` at once)
    and retries them with the next record, or after RETRY_AFTER_SLOW_S when the server hangs rather
    than refuses. A permanent refusal is named once, listed, and skipped: it holds back nothing."""

    def __init__(self, pending_file: Path) -> None:
        self.pending: list[tuple[str, Callable[[], Any]]] = []
        self.pending_file = pending_file
        self._warned = self._warned_full = False
        self._retry_at = 0.0

    def submit(self, description: str, write: Callable[[], Any]) -> Any:
        self.flush()
        if self.pending:  # keep order: later records wait behind earlier failed ones
            self._keep(description, write)
            return None
        return self._try(description, write)

    def _try(self, description: str, write: Callable[[], Any]) -> Any:
        started = time.monotonic()
        try:
            return write()
        except Exception as err:
            if is_refusal(err):
                self._refused(description, err)
            else:
                self._outage(err, started)
                self._keep(description, write)
            return None

    def _keep(self, description: str, write: Callable[[], Any]) -> None:
        if len(self.pending) < MAX_PENDING:
            self.pending.append((description, write))
            return
        self._list([{"record": description}])
        if not self._warned_full:
            logger.warning(
                "%d MLflow records wait already; the next ones are listed in %s", MAX_PENDING, self.pending_file
            )
            self._warned_full = True

    def _outage(self, err: Exception, started: float) -> None:
        if not self._warned:
            logger.warning("MLflow unreachable (%s); training continues, records are kept and retried", err)
            self._warned = True
        if time.monotonic() - started >= SLOW_FAILURE_S:
            self._retry_at = time.monotonic() + RETRY_AFTER_SLOW_S

    def _refused(self, description: str, err: Exception) -> None:
        logger.warning(
            "MLflow refused the %s for good (%s); skipped, listed in %s", description, err, self.pending_file
        )
        self._list([{"record": description, "refused": str(err)[:500]}])

    def _list(self, entries: list[dict[str, str]]) -> None:
        # Appended: a resumed search must not erase what an earlier driver could not write.
        with open(self.pending_file, "a", encoding="utf-8") as handle:
            handle.write("".join(json.dumps(entry) + "\n" for entry in entries))

    def flush(self, force: bool = False) -> None:
        if not force and time.monotonic() < self._retry_at:
            return  # a hung server: not before RETRY_AFTER_SLOW_S
        while self.pending:
            description, write = self.pending[0]
            started = time.monotonic()
            try:
                write()
            except Exception as err:
                if not is_refusal(err):
                    self._outage(err, started)
                    return
                self._refused(description, err)
            self.pending.pop(0)
            if not self.pending:
                logger.warning("MLflow reachable again: all delayed records written")
                self._warned = self._warned_full = False

    def close(self) -> list[str]:
        """Flush; what still cannot be written is listed in `pending_file` and returned."""
        self.flush(force=True)
        missing = [description for description, _ in self.pending]
        if missing:
            self._list([{"record": m} for m in missing])
            self.pending.clear()  # listed once, even if close() is called again
            logger.warning("%d MLflow records could not be written; listed in %s", len(missing), self.pending_file)
        return missing


class SearchTracker(tune.Callback):
    """Mirrors a Tune search into MLflow as a parent run with one child run per trial."""

    def __init__(
        self,
        uri: str,
        experiment_id: str,
        parent_run_id: str,
        tags: dict[str, str],
        max_epochs: int,
        pending_file: Path,
    ) -> None:
        self.uri = uri
        self.pending_file = pending_file
        self.client = MlflowClient(tracking_uri=uri)
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.tags = tags
        self.max_epochs = max_epochs
        self.records = RecordQueue(pending_file)
        self.child_runs: dict[str, str] = {}
        self.last_epoch: dict[str, int] = {}

    # Tune pickles callbacks with the experiment state; the client and queue are rebuilt on restore.
    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "client": None, "records": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.client = MlflowClient(tracking_uri=self.uri)
        self.records = RecordQueue(self.pending_file)

    def child_run(self, trial: Trial) -> str:
        return self._child_run(trial.trial_id, trial.config)

    def _child_run(self, trial_id: str, config: dict[str, Any]) -> str:
        """The trial's child run, created once (also across a resumed search: found by its tag)."""
        if trial_id in self.child_runs:
            return self.child_runs[trial_id]
        existing = self._find_child(trial_id)
        logged: dict[str, str] = {}
        if existing is not None:
            run_id, logged = existing.info.run_id, existing.data.params
        else:
            tags = {
                **self.tags,
                MLFLOW_PARENT_RUN_ID: self.parent_run_id,
                "trial_id": trial_id,
                MLFLOW_RUN_NAME: f"trial-{trial_id}",
            }
            run_id = self.client.create_run(self.experiment_id, tags=tags).info.run_id
        # Also when the run was found: a retried write may have created it and then failed before
        # logging the params. Only those missing: MLflow refuses a changed value, and in a
        # population-based search a member's settings change (its exploits are tagged instead).
        params = [Param(key, str(value)) for key, value in sorted(config.items()) if key not in logged]
        self.client.log_batch(run_id, params=params)
        self.child_runs[trial_id] = run_id
        return run_id

    def child_run_of(self, trial_id: str) -> str | None:
        """The child run of a trial that has one (None: it never started)."""
        if trial_id not in self.child_runs:
            found = self._find_child(trial_id)
            if found is None:
                return None
            self.child_runs[trial_id] = found.info.run_id
        return self.child_runs[trial_id]

    def _find_child(self, trial_id: str):
        query = f"tags.trial_id = '{trial_id}' and tags.`{MLFLOW_PARENT_RUN_ID}` = '{self.parent_run_id}'"
        found = self.client.search_runs([self.experiment_id], filter_string=query, max_results=1)
        return found[0] if found else None

    def on_trial_start(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        self.records.submit(f"child run of trial {trial.trial_id}", lambda: self.child_run(trial))

    def on_trial_result(self, iteration: int, trials: list[Trial], trial: Trial, result: dict, **info: Any) -> None:
        epoch = int(result.get("epochs_completed", iteration))
        self.last_epoch[trial.trial_id] = epoch
        metrics = numeric_metrics(result)
        timestamp = int(result.get("timestamp", 0) * 1000)
        # Where the trial trains, for comparing runs in the MLflow UI ("cuda:0", "cpu,cpu", ...).
        tags = [RunTag("devices", str(result["devices"]))] if result.get("devices") else []

        def write() -> None:
            run_id = self.child_run(trial)
            batch = [Metric(key, value, timestamp, epoch) for key, value in metrics.items()]
            self.client.log_batch(run_id, metrics=batch, tags=tags)

        self.records.submit(f"epoch {epoch} metrics of trial {trial.trial_id}", write)

    def _end_tags(self, epochs: int, status: str, error: str | None) -> list[RunTag]:
        tags = [
            RunTag("epochs_completed", str(epochs)),
            RunTag("stopped_early", str(status == "FINISHED" and epochs < self.max_epochs).lower()),
        ]
        if error:
            tags.append(RunTag("error", error[:4000]))
        return tags

    def _finish(self, trial: Trial, status: str, error: str | None = None) -> None:
        tags = self._end_tags(self.last_epoch.get(trial.trial_id, 0), status, error)

        def write() -> None:
            run_id = self.child_run(trial)
            self.client.log_batch(run_id, tags=tags)
            self.client.set_terminated(run_id, status=status)

        self.records.submit(f"end of trial {trial.trial_id} ({status})", write)

    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        self._finish(trial, "FINISHED")

    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        error_file = getattr(trial, "error_file", None)
        self._finish(trial, "FAILED", error=_read(error_file) if error_file else "trial failed")

    def on_experiment_end(self, trials: list[Trial], **info: Any) -> None:
        self.records.flush()

    def reconcile(self, trial: EndedTrial, metric: str) -> int:
        """Write what MLflow lacks of an ended trial, from Tune's own results; returns the epochs added.

        The callbacks write as results arrive, but a driver killed while MLflow was down loses the
        records it still held, and a trial can end while the driver is gone. Tune's result files have
        them all, so a finished (or resumed and finished) search repairs its MLflow records here.
        """
        run_id = self._child_run(trial.trial_id, trial.config)
        logged = {point.step for point in self.client.get_metric_history(run_id, metric)}
        missing = [row for row in trial.rows if metric in row and int(row["epochs_completed"]) not in logged]
        for row in missing:
            stamp, epoch = int(row.get("timestamp", 0) * 1000), int(row["epochs_completed"])
            batch = [Metric(key, value, stamp, epoch) for key, value in numeric_metrics(row).items()]
            self.client.log_batch(run_id, metrics=batch)
        if self.client.get_run(run_id).info.status == "RUNNING":
            epochs = max((int(row["epochs_completed"]) for row in trial.rows), default=0)
            status = "FAILED" if trial.error else "FINISHED"
            self.client.log_batch(run_id, tags=self._end_tags(epochs, status, trial.error))
            self.client.set_terminated(run_id, status=status)
        return len(missing)

    def remove_lost_trials(self, known: set[str]) -> int:
        """Delete child runs of trials that Tune's state does not hold; returns how many.

        A trial started moments before the driver was killed exists in MLflow but not in Tune's last
        experiment snapshot, so `--resume` never continues it (Tune starts a new trial instead). Its
        child run is tagged, ended as KILLED and deleted (MLflow keeps deleted runs restorable).
        """
        query = f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{self.parent_run_id}'"
        lost = [
            run
            for run in self.client.search_runs([self.experiment_id], filter_string=query, max_results=10_000)
            if run.data.tags.get("trial_id") not in known
        ]
        for run in lost:
            self.client.set_tag(
                run.info.run_id, "lost", "started just before the driver was killed; not in Tune's state"
            )
            self.client.set_terminated(run.info.run_id, status="KILLED")
            self.client.delete_run(run.info.run_id)
        return len(lost)


@dataclass(frozen=True)
class EndedTrial:
    """What Tune's results hold about one trial of a search that has ended."""

    trial_id: str
    config: dict[str, Any]
    rows: list[dict[str, Any]]  # one per reported epoch, as in `Result.metrics_dataframe`
    error: str | None = None


def _read(path: str) -> str:
    try:
        return Path(path).read_text()[-4000:]
    except OSError:
        return path
