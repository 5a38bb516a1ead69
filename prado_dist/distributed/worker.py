"""The per-worker training function that Ray Train runs on every worker.

It is a thin shell around the engine's `TrainingRun`: Ray supplies the rank, the device and
DDP (`prepare_model`), restores the latest checkpoint after a failure, and receives every
epoch's metrics and checkpoint through `ray.train.report`.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch.distributed as dist

from prado_dist.config import TrainConfig
from prado_dist.engine import TrainingRun, load_checkpoint, load_data, save_checkpoint
from prado_dist.engine.reporting import epoch_line

CHECKPOINT_FILE = "checkpoint.pt"


def _gather(value: str) -> list[str]:
    """`value` from every rank (a single-element list without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [value]
    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def quiet_ray_report_log() -> None:
    """Ray Train logs every report with all its metrics at INFO; rank 0's epoch line is enough."""
    from ray.train.v2._internal.execution import context as train_context

    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train entry point; `loop_config["config"]` is the `TrainConfig` to train."""
    quiet_ray_report_log()
    config: TrainConfig = loop_config["config"]  # pickled by Ray: pydantic models travel as objects
    context = ray.train.get_context()
    rank = context.get_world_rank()
    run = TrainingRun(
        config,
        load_data(config),  # this node's decoded cache, built once under a lock if missing
        rank=rank,
        world_size=context.get_world_size(),
        local_rank=context.get_local_rank(),
        device=ray.train.torch.get_device(),
        # DDP with gloo on CPU, NCCL on GPU; a single worker is left unwrapped.
        wrap_model=ray.train.torch.prepare_model,
    )
    placement = _placement(run)
    checkpoint = _starting_checkpoint(loop_config)
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            run.load_state_dict(load_checkpoint(Path(directory) / CHECKPOINT_FILE, map_location=run.device))

    def report(epoch: int, metrics: dict[str, float], run: TrainingRun) -> None:
        if rank == 0 and loop_config.get("epoch_lines", True):  # a search prints its own line per result
            print(epoch_line(metrics, config.epochs), flush=True)
        # Every rank must call report; only rank 0 writes the (identical) state as a checkpoint.
        with tempfile.TemporaryDirectory() as directory:
            reported = None
            if rank == 0:
                save_checkpoint(Path(directory) / CHECKPOINT_FILE, run.state_dict(epoch))
                reported = ray.train.Checkpoint.from_directory(directory)
            ray.train.report({**metrics, **placement}, checkpoint=reported)

    if run.history and run.start_epoch >= config.epochs:
        _report_last_epoch_again(run, checkpoint, rank, placement)
        return
    run.fit(on_epoch_end=report)


def _placement(run: TrainingRun) -> dict[str, str]:
    """Reported with every epoch: the Ray nodes this run's workers train on (multi-node placement is
    visible), each rank's device, and the placement group. Collective: every rank calls it."""
    node_ids = ",".join(sorted(set(_gather(ray.get_runtime_context().get_node_id()))))
    devices = ",".join(_gather(str(run.device)))  # rank order: where each worker trains (e.g. "cuda:0,cuda:0")
    placement_group = ray.util.get_current_placement_group()
    # Reported so that whoever stops this run early can free its placement group (see
    # prado_dist.search.train_workarounds.PlacementGroupReleaser).
    placement_group_id = placement_group.id.hex() if placement_group is not None else ""
    return {"node_ids": node_ids, "devices": devices, "placement_group_id": placement_group_id}


def _starting_checkpoint(loop_config: dict[str, Any]) -> ray.train.Checkpoint | None:
    """The checkpoint to continue from, if any.

    Train V2 takes a starting checkpoint through the loop's config (its trainers no longer accept
    resume_from_checkpoint); the run's own latest checkpoint, after a worker failure, comes first.
    """
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None and loop_config.get("resume_from"):
        checkpoint = ray.train.Checkpoint(loop_config["resume_from"])
    return checkpoint


def _report_last_epoch_again(
    run: TrainingRun, checkpoint: ray.train.Checkpoint, rank: int, placement: dict[str, str]
) -> None:
    """A run restored after its last epoch (it had finished when its driver was killed) reports the
    final epoch again, so that whoever waits for this run (a Tune trial) gets its metrics, with its
    checkpoint, which also carries the history of the epochs reported before the kill."""
    with checkpoint.as_directory() as directory:
        reported = ray.train.Checkpoint.from_directory(directory) if rank == 0 else None
        ray.train.report({**run.history[-1], **placement}, checkpoint=reported)
