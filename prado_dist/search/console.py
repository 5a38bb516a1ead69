"""What a search prints: a line when a trial starts, after each of its epochs and when it ends, a
status line every 30 s, and none of Ray's, Optuna's or MLflow's internal noise unless asked for
(`--verbose`, which also shows Tune's own tables and result boxes)."""

from __future__ import annotations

import logging
import os
import time
import warnings
from collections import Counter
from typing import Any

from ray import tune
from ray.tune.experiment import Trial

from prado_dist.search.searcher import EPOCHS_COMPLETED

# Tune's status table shows the first four metrics of a result, so these come first.
CONSOLE_METRICS = ("val_balanced_accuracy", "val_loss", "train_loss", "val_accuracy", "epochs_completed", "lr")

# Loggers of Ray internals that report, at INFO or WARNING, things a search handles itself: worker
# processes started, actors that died at shutdown (trials Tune stopped), checkpoints written.
# Optuna announces each study, MLflow each database migration.
LIBRARY_NOISE = ("ray", "ray.tune", "ray.train", "ray.data", "ray._private", "ray.util", "optuna", "mlflow")


def console_metrics(metric: str) -> list[str]:
    """The metrics Tune shows for a search on `metric`: that metric first, then CONSOLE_METRICS."""
    return [metric, *(name for name in CONSOLE_METRICS if name != metric)]


def ordered_metrics(metrics: dict[str, Any], metric: str) -> dict[str, Any]:
    """`metrics` with console_metrics(metric) first, the order Tune's table takes its columns in."""
    first = {name: metrics[name] for name in console_metrics(metric) if name in metrics}
    return first | metrics


def quiet_libraries(verbose: bool) -> None:
    """Keep the libraries' own loggers to errors in this process, unless `verbose`."""
    for name in LIBRARY_NOISE:
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.ERROR)
    if not verbose:  # PB2's Gaussian-process fits warn about kernel bounds at most of its steps
        warnings.filterwarnings("ignore", module="sklearn")
        # Tune's newer console prints its configuration box, the results folder and a TensorBoard
        # command even at verbose=0; its older reporter (Ray 2.60 keeps both) prints nothing at 0.
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")


class TrialLines(tune.Callback):
    """One console line when a trial starts, per result, and when it ends; a status line every 30 s."""

    STATUS_EVERY_S = 30.0  # Tune's own status table's rhythm

    def __init__(self, metric: str, mode: str, epochs: int) -> None:
        self.metric, self.epochs = metric, epochs
        self._sign = 1 if mode == "max" else -1
        self._last: dict[str, dict[str, Any]] = {}
        self._best: dict[str, float] = {}
        self._started = self._last_status = time.monotonic()

    def on_trial_start(self, iteration: int, trials: list[Trial], trial: Trial, **info) -> None:
        settings = "  ".join(f"{key} {_short(value)}" for key, value in (trial.config or {}).items())
        print(f"[{trial.trial_id}] started: {settings}", flush=True)

    def on_step_end(self, iteration: int, trials: list[Trial], **info) -> None:
        if time.monotonic() - self._last_status < self.STATUS_EVERY_S:
            return
        self._last_status = time.monotonic()
        counts = Counter(trial.status.lower() for trial in trials)
        best = max(self._best.items(), key=lambda item: self._sign * item[1], default=None)
        best_text = f"; best so far [{best[0]}] {self.metric} {best[1]:.4f}" if best else ""
        elapsed = time.monotonic() - self._started
        states = ", ".join(f"{count} {state}" for state, count in sorted(counts.items()))
        print(f"-- {elapsed / 60:.1f} min: {states}{best_text}", flush=True)

    def on_trial_result(self, iteration: int, trials: list[Trial], trial: Trial, result: dict, **info) -> None:
        if self.metric not in result:
            return
        self._last[trial.trial_id] = result
        value = float(result[self.metric])
        best = self._best.get(trial.trial_id)
        self._best[trial.trial_id] = value if best is None else max(best, value, key=lambda v: self._sign * v)
        print(
            f"[{trial.trial_id}] epoch {int(result.get(EPOCHS_COMPLETED, 0))}/{self.epochs}  "
            f"{self.metric} {value:.4f}  val_loss {result.get('val_loss', float('nan')):.4f}  "
            f"train_loss {result.get('train_loss', float('nan')):.4f}  ({result.get('epoch_seconds', 0):.1f} s)",
            flush=True,
        )

    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial, **info) -> None:
        epochs = int(self._last.get(trial.trial_id, {}).get(EPOCHS_COMPLETED, 0))
        how = "finished" if epochs >= self.epochs else "stopped early"  # by ASHA or the epoch budget
        best = self._best.get(trial.trial_id)
        best_text = f", best {self.metric} {best:.4f}" if best is not None else ""
        print(f"[{trial.trial_id}] {how} after {epochs} epoch{'' if epochs == 1 else 's'}{best_text}", flush=True)

    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial, **info) -> None:
        print(f"[{trial.trial_id}] failed; its error is in {trial.path}/error.txt", flush=True)


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)
