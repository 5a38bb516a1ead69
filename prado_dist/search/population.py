"""Population-based search: Tune's PBT or PB2 over the SCHEDULABLE settings, and what it leaves behind.

Members train side by side; every `perturbation_interval` epochs the weakest copy a strong member's
latest checkpoint (weights, optimiser moments, schedule position, BatchNorm and EMA state) and go on
with its settings perturbed (the engine applies them to the copied state: TrainingRun.load_state_dict).
Every such exploit is appended to `exploits.jsonl` in the search folder and printed; when the search
ends, `record_population` writes the lineage table, the winner's per-epoch settings as
`summary/schedule.json` (replayed by `python -m prado_dist.train --schedule`) and a plot of them.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any

from ray.tune.schedulers import PopulationBasedTraining
from ray.tune.schedulers.pb2 import PB2

from prado_dist.engine import checkpoint_config, schedule_record
from prado_dist.search.searcher import EPOCHS_COMPLETED
from prado_dist.search.space import Choice, IntUniform, SearchSpace

logger = logging.getLogger(__name__)
EXPLOITS_FILE = "exploits.jsonl"


class WithinBounds:
    """PBT's explore step multiplies a value by 0.8 or 1.2 without looking at its range, and PB2 proposes
    floats for integer settings: kept inside the space's bounds (and whole) here, so that a perturbed
    member is still a valid configuration."""

    def __init__(self, bounds: dict[str, tuple[float, float]], integers: set[str]) -> None:
        self.bounds, self.integers = bounds, integers

    def __call__(self, config: dict[str, Any]) -> dict[str, Any]:
        kept = dict(config)
        for key, (low, high) in self.bounds.items():
            if key in kept:
                value = min(max(kept[key], low), high)
                kept[key] = int(round(value)) if key in self.integers else float(value)
        return kept


class RecordedExploits:
    """Each exploit of Tune's PBT or PB2 appended to `folder/exploits.jsonl` and printed.

    Tune tells no callback who copied whom; `_exploit` is the one place that knows both trials, so it
    is extended here (a private method of ray.tune.schedulers.PopulationBasedTraining, and its
    `_trial_state`, Ray 2.60; PB2 inherits both). The first thing to check when upgrading Ray.
    """

    def __init__(self, *args: Any, folder: Path, params: list[str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.folder, self.params = Path(folder), params

    def _exploit(self, tune_controller, trial, trial_to_clone) -> None:
        # The scheduler's own record of each trial's newest result: `trial.last_result` is updated
        # after the scheduler has decided, and the copied checkpoint is that of the donor's newest result.
        epoch = int(self._trial_state[trial].last_result.get(EPOCHS_COMPLETED, 0))
        copied_epoch = int(self._trial_state[trial_to_clone].last_result.get(EPOCHS_COMPLETED, 0))
        super()._exploit(tune_controller, trial, trial_to_clone)
        changes = {key: [trial_to_clone.config.get(key), trial.config.get(key)] for key in self.params}
        event = {
            "trial": trial.trial_id,
            "epoch": epoch,
            "copied": trial_to_clone.trial_id,
            "copied_epoch": copied_epoch,
            "changes": changes,
        }
        self.folder.mkdir(parents=True, exist_ok=True)
        with (self.folder / EXPLOITS_FILE).open("a") as file:
            file.write(json.dumps(event) + "\n")
        print(f"[{trial.trial_id}] after epoch {epoch}: {describe_exploit(event)}", flush=True)


class RecordedPBT(RecordedExploits, PopulationBasedTraining):
    pass


class RecordedPB2(RecordedExploits, PB2):
    pass


def describe_exploit(event: dict[str, Any]) -> str:
    changed = ", ".join(
        f"{key} {_short(old)} -> {_short(new)}" for key, (old, new) in event["changes"].items() if old != new
    )
    return f"copies [{event['copied']}] at its epoch {event['copied_epoch']}, then {changed or 'the same settings'}"


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def population_scheduler(space: SearchSpace, folder: Path) -> PopulationBasedTraining:
    """PBT or PB2 on completed epochs, as the space's `scheduler` section says (metric and mode: Tune's)."""
    settings = space.scheduler
    common = {
        "time_attr": EPOCHS_COMPLETED,
        "perturbation_interval": settings.perturbation_interval,
        "quantile_fraction": settings.quantile_fraction,
        "log_config": False,  # exploits.jsonl records them, with trial ids rather than tags
        "folder": folder,
        "params": list(space.params),
    }
    bounds = {key: (spec.low, spec.high) for key, spec in space.params.items() if not isinstance(spec, Choice)}
    integers = {key for key, spec in space.params.items() if isinstance(spec, IntUniform)}
    common["custom_explore_fn"] = WithinBounds(bounds, integers)
    if settings.kind == "pb2":
        return RecordedPB2(hyperparam_bounds={key: list(low_high) for key, low_high in bounds.items()}, **common)
    domains = space.tune_space()
    mutations = {key: spec.values if isinstance(spec, Choice) else domains[key] for key, spec in space.params.items()}
    return RecordedPBT(hyperparam_mutations=mutations, resample_probability=settings.resample_probability, **common)


# --- what a population-based search leaves behind --------------------------------------------------
def read_exploits(folder: Path) -> list[dict[str, Any]]:
    """The exploits recorded in `folder`, in order (once each: a resumed search may log one again).

    A member can copy twice after the same epoch of its own: Tune hands it the donor's perturbation
    time, so the epoch after an early copy may be due again; the donor's epoch tells the two apart."""
    path = Path(folder) / EXPLOITS_FILE
    if not path.is_file():
        return []
    events, seen = [], set()
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        event = json.loads(line)
        key = (event["trial"], event["epoch"], event["copied"], event["copied_epoch"])
        if key not in seen:
            seen.add(key)
            events.append(event)
    return events


def write_lineage(events: list[dict[str, Any]], path: Path) -> Path:
    """One row per exploit: who copied whom, after which epochs, and the settings it went on with."""
    params = sorted({key for event in events for key in event["changes"]})
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["trial", "after_epoch", "copied", "copied_epoch", *(f"{key}_from" for key in params), *params])
        for event in events:
            changes = event["changes"]
            writer.writerow(
                [event["trial"], event["epoch"], event["copied"], event["copied_epoch"]]
                + [changes.get(key, [None, None])[0] for key in params]
                + [changes.get(key, [None, None])[1] for key in params]
            )
    return path


def winning_schedule(state: dict[str, Any], trial_id: str, metric: str) -> dict[str, Any]:
    """The per-epoch settings the chosen checkpoint was trained with, through every copy it descends from."""
    return schedule_record(
        checkpoint_config(state), state.get("settings_history", []), trial=trial_id, selected_by=metric
    )


def plot_schedule(schedule: dict[str, Any], path: Path) -> Path:
    """The winner's settings over epochs, one panel per setting that the search varied."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = schedule["epochs"]
    keys = [key for key in schedule.get("searched", []) if any(key in row for row in rows)] or ["lr"]
    figure, axes = plt.subplots(len(keys), 1, figsize=(7.0, 1.9 * len(keys) + 0.6), sharex=True, squeeze=False)
    epochs = [int(row["epoch"]) + 1 for row in rows]
    for axis, key in zip(axes[:, 0], keys, strict=True):
        axis.step(epochs, [row.get(key) for row in rows], where="post", marker="o", markersize=3)
        axis.set_ylabel(key)
        axis.grid(alpha=0.3)
        if key in ("lr", "weight_decay") and all(row.get(key, 0) > 0 for row in rows):
            axis.set_yscale("log")
    axes[-1, 0].set_xlabel("epoch")
    axes[0, 0].set_title(f"schedule of trial {schedule.get('trial')} (selected by {schedule.get('selected_by')})")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def record_population(
    client, tracker, space: SearchSpace, folder: Path, best: tuple[str, dict[str, Any]], parent_run_id: str
) -> None:
    """The lineage table and the schedule of the best checkpoint (`best`: its trial id and state), as JSON
    and plot, into `folder/summary`; each exploit as a tag on the child run of the member that copied."""
    artifacts = folder / "summary"
    artifacts.mkdir(parents=True, exist_ok=True)
    events = read_exploits(folder)
    write_lineage(events, artifacts / "lineage.csv")
    schedule = winning_schedule(best[1], best[0], space.metric)
    schedule["searched"] = list(space.params)
    (artifacts / "schedule.json").write_text(json.dumps(schedule, indent=2))
    plot_schedule(schedule, artifacts / "schedule.png")
    try:
        copies: dict[str, int] = {}
        for event in events:
            copies[event["trial"]] = number = copies.get(event["trial"], 0) + 1
            run_id = tracker.child_run_of(event["trial"])
            if run_id is not None:
                text = f"after epoch {event['epoch']}: {describe_exploit(event)}"
                client.set_tag(run_id, f"pbt.copy_{number:02d}", text[:5000])
        client.set_tag(parent_run_id, "pbt.exploits", str(len(events)))
    except Exception as err:  # the files above hold the same record
        logger.warning("could not tag the exploits in MLflow (%s); they are in %s", err, artifacts / "lineage.csv")
