"""One Tune trial: the engine trains inside the trial's own actor, or a Ray Train run trains it.

A one-worker trial (the default of every space) runs the engine's `TrainingRun` inside its Tune
trial actor, which reserves the trial's CPUs and GPU fraction itself; Tune reuses the actor for the
next trial, so torch stays imported, the decoded data mapped and a GPU's CUDA context warm. Nested
Ray Train runs cost every trial three processes and 20-60 s of start-up on 2 cores (issue 20;
bench/README.md, trial_cycle.py). Data-parallel trials (`trial.workers` >= 2, or `trial.ray_train:
always`) are Ray Train runs, whose reports reach Tune with their checkpoints. Either way every epoch
is reported to Tune with a checkpoint, and a retried or resumed trial continues from the newest one.
"""

from __future__ import annotations

import tempfile
import threading
import uuid
from pathlib import Path
from typing import Any

import ray
import ray.train
from ray import tune
from ray.util.queue import Queue

from prado_dist.config import TrainConfig
from prado_dist.data import DataError, PreparedData
from prado_dist.distributed import CHECKPOINT_FILE, WorkerResources, build_trainer
from prado_dist.engine import TrainingRun, load_checkpoint, load_data, save_checkpoint
from prado_dist.search.console import ordered_metrics, quiet_libraries

# A trial that runs Ray Train only waits on its controller: it reserves no CPU (the workers need
# them; see bench/README.md, "Ray on a 2-CPU machine"), but Tune needs a non-empty request.
RAY_TRAIN_DRIVER_RESOURCES = tune.PlacementGroupFactory([{"memory": 64 * 1024**2}])


def trial_resources(resources: WorkerResources, ray_train: bool) -> tune.PlacementGroupFactory:
    """What Tune reserves for each trial's actor: the one worker's share, or a Ray Train trial's sliver."""
    if ray_train:
        return RAY_TRAIN_DRIVER_RESOURCES
    return tune.PlacementGroupFactory([resources.per_worker()])


def run_trial(
    params: dict[str, Any],
    *,
    base_config: TrainConfig,
    resources: WorkerResources,
    ray_train: bool,
    train_storage: str,
    metric: str,
    mode: str = "max",
    verbose: bool = False,
    data_fingerprint: str | None = None,
) -> None:
    """Tune's trial function: `base_config` with `params` applied; `data_fingerprint` is that of
    the images the driver decoded, which a one-worker trial checks its node's against."""
    quiet_libraries(verbose)  # e.g. a line per checkpoint written, forwarded to the driver's console
    config = base_config.with_overrides(params)
    if ray_train:
        train_with_ray_train(config, resources, train_storage, metric, mode)
    else:
        train_in_actor(config, metric, data_fingerprint)


# --- one worker: the engine in this actor ----------------------------------------------------------
_decoded: dict[tuple, PreparedData] = {}  # survives between the trials of a reused actor


def trial_data(config: TrainConfig) -> PreparedData:
    """The decoded split images of `config`, opened once per actor (a memory map of the cache)."""
    fields = ("data_dir", "image_size", "cache_dir", "test_fraction", "val_fraction", "split_seed")
    key = tuple(getattr(config, name) for name in fields)
    if key not in _decoded:
        _decoded.clear()  # another dataset or size: the previous one is not needed again
        _decoded[key] = load_data(config)
    return _decoded[key]


def require_driver_data(data: PreparedData, expected: str | None, config: TrainConfig) -> None:
    """Refuse to train on other images than the driver's: the search's start-up check asked every
    node (prado_dist/distributed/node_data.py), but a node an autoscaler adds later is checked here."""
    if expected is not None and data.fingerprint != expected:
        where = config.data_dir or "the generated demo set"
        raise DataError(
            f"node {ray.util.get_node_ip_address()}: the images of {where} here are not the driver's (fingerprint "
            f"{data.fingerprint[:12]}, the driver's {expected[:12]}); every node needs the same files at the same path"
        )


def train_in_actor(config: TrainConfig, metric: str, data_fingerprint: str | None = None) -> None:
    """Train `config` here, reporting each epoch to Tune with its checkpoint.

    A new `TrainingRun` per trial: seeds, model, BatchNorm settings, optimiser and EMA copy are built
    from this trial's config alone, so nothing of the actor's previous trial carries over (feature
    caches are keyed by the backbone's weights).
    """
    data = trial_data(config)
    require_driver_data(data, data_fingerprint, config)
    run = TrainingRun(config, data)
    placement = {"node_ids": ray.get_runtime_context().get_node_id(), "devices": str(run.device)}
    restored = tune.get_checkpoint()
    if restored is not None:
        with restored.as_directory() as directory:
            run.load_state_dict(load_checkpoint(Path(directory) / CHECKPOINT_FILE, map_location=run.device))

    def report(epoch: int, metrics: dict[str, float], run: TrainingRun) -> None:
        with tempfile.TemporaryDirectory() as directory:
            save_checkpoint(Path(directory) / CHECKPOINT_FILE, run.state_dict(epoch))
            tune.report(
                ordered_metrics({**metrics, **placement}, metric), checkpoint=tune.Checkpoint.from_directory(directory)
            )

    if restored is not None and run.start_epoch >= config.epochs:
        # Restored after its last epoch (the driver was killed before Tune saw the trial end): report
        # that epoch again, so that the trial ends with its metrics and checkpoint.
        tune.report(ordered_metrics({**run.history[-1], **placement}, metric), checkpoint=restored)
        return
    run.fit(on_epoch_end=report)


# --- data-parallel: a Ray Train run ----------------------------------------------------------------
def train_with_ray_train(
    config: TrainConfig, resources: WorkerResources, train_storage: str, metric: str, mode: str
) -> None:
    """Run `config` as a Ray Train run and hand each of its reports to Tune, checkpoint included.

    Train's callbacks run in its controller actor, where `tune.report` cannot be called; they pass
    each report through a queue to this function, which reports it. The run is named per attempt and
    starts from Tune's checkpoint, so a retried, resumed (or, in population-based training, cloned)
    trial continues from what Tune holds rather than from the Train run's own folder.
    """
    reports = Queue(actor_options={"num_cpus": 0})
    restored = tune.get_checkpoint()
    trainer = build_trainer(
        config,
        resources,
        storage=train_storage,
        name=f"trial-{tune.get_context().get_trial_id()}-{uuid.uuid4().hex[:8]}",
        max_failures=0,  # a failed trial is retried by Tune (the search's FailureConfig)
        selection=(metric, mode),
        resume_from=restored.path if restored is not None else None,
        epoch_lines=False,  # the search prints one line per result (console.TrialLines)
        callbacks=[ForwardToTune(reports)],
    )
    outcome: dict[str, BaseException] = {}

    def fit() -> None:
        try:
            trainer.fit()
        except BaseException as err:  # re-raised in the trial's own thread below
            outcome["error"] = err
        finally:
            reports.put(None)

    threading.Thread(target=fit, name="ray-train-fit", daemon=True).start()
    while (item := reports.get()) is not None:
        metrics, checkpoint = item
        tune.report(ordered_metrics(metrics, metric), checkpoint=checkpoint)
    if "error" in outcome:
        raise outcome["error"]


class ForwardToTune(ray.train.UserCallback):
    """Ray Train callback: each report's rank-0 metrics and persisted checkpoint, onto `queue`."""

    def __init__(self, queue: Queue) -> None:
        self.queue = queue

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        self.queue.put((dict(metrics[0]), checkpoint))


def train_storage_path(search_dir: Path | str) -> str:
    """Where a search's Ray Train runs write their own checkpoints (data-parallel trials only)."""
    return f"{str(search_dir).rstrip('/')}/train"
