"""Sizing Ray resources deliberately, and refusing requests that can never be scheduled.

Ray queues a request that does not fit the cluster forever (Train V2 eventually raises a
WorkerGroupStartupTimeoutError); checking the request against `ray.cluster_resources()` first
turns that into an immediate error that says what was asked and what exists.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass

import ray

logger = logging.getLogger(__name__)
AUTOSCALING_ENV = "PRADO_DIST_AUTOSCALING"  # set on autoscaling clusters: missing nodes are added on demand


class ResourceError(ValueError):
    """A resource request that the Ray cluster cannot satisfy."""


@dataclass(frozen=True)
class WorkerResources:
    """What one Ray Train run asks for: `workers` processes, each with these CPUs/GPUs."""

    workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ResourceError(f"workers must be >= 1, got {self.workers}")
        if self.cpus_per_worker <= 0:
            raise ResourceError(f"cpus per worker must be > 0, got {self.cpus_per_worker}")
        if self.gpus_per_worker < 0:
            raise ResourceError(f"gpus per worker must be >= 0, got {self.gpus_per_worker}")
        if self.gpus_per_worker > 1 and not float(self.gpus_per_worker).is_integer():
            raise ResourceError(f"more than one GPU per worker must be a whole number, got {self.gpus_per_worker}")

    @property
    def use_gpu(self) -> bool:
        return self.gpus_per_worker > 0

    def per_worker(self) -> dict[str, float]:
        resources = {"CPU": self.cpus_per_worker}
        if self.use_gpu:
            resources["GPU"] = self.gpus_per_worker
        return resources

    @property
    def total_cpus(self) -> float:
        return self.workers * self.cpus_per_worker

    @property
    def total_gpus(self) -> float:
        return self.workers * self.gpus_per_worker


def check_global_batch(batch_size: int, workers: int) -> None:
    """Raise `ResourceError` unless the global batch splits evenly over `workers`.

    Without this check the engine refuses the batch inside every worker, after Ray has started them,
    and Ray Train retries that deterministic error `max_failures` times before giving up.
    """
    if batch_size % workers:
        lower, upper = batch_size // workers * workers, (batch_size // workers + 1) * workers
        suggestion = f"{lower} or {upper}" if lower else f"{upper}"
        raise ResourceError(
            f"the global batch size {batch_size} does not split evenly over {workers} workers (each worker "
            f"trains on batch_size / workers images per step); use a multiple of {workers}, e.g. {suggestion}, "
            "or another number of workers"
        )


# Ray Train's controller polls its workers every 2 s (Ray's default) and only then notices that a
# run has finished or passes an epoch's result on to Tune, so every run ended up to 2 s late and
# ASHA's stop reached a short trial an epoch late. Measured on 2 cores: the quickstart's search took
# 0.94x the time at 0.5 s (bench/trial_cycle.py, median of 3 each), and ASHA stopped 3 of its 6
# trials in every run, against 2 in two of three runs at 2 s. Polling costs one small call per
# worker. Clusters keep Ray's default: their epochs take minutes.
HEALTH_CHECK_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
LOCAL_HEALTH_CHECK_INTERVAL_S = 0.5


def local_ray_init_kwargs(num_cpus: int | None = None) -> dict:
    """Arguments for starting a local Ray instance sized to this machine.

    Logical CPUs are counted as the machine's cores (at least 2, so that one trial driver and one
    worker always fit); the driver of a trial reserves almost nothing (see prado_dist.search).
    Ray Train's controller polls faster than on a cluster, unless RAY_TRAIN_HEALTH_CHECK_INTERVAL_S
    is set already (see HEALTH_CHECK_ENV).
    """
    cpus = num_cpus if num_cpus is not None else max(2, os.cpu_count() or 1)
    interval = os.environ.get(HEALTH_CHECK_ENV, str(LOCAL_HEALTH_CHECK_INTERVAL_S))
    return {
        "num_cpus": cpus,
        "include_dashboard": False,
        "log_to_driver": True,
        "runtime_env": {"env_vars": {HEALTH_CHECK_ENV: interval}},
    }


def check_fits(request: WorkerResources, concurrent: int = 1) -> None:
    """Raise `ResourceError` unless `concurrent` runs of `request` fit the connected cluster."""
    available = ray.cluster_resources()
    cpus, gpus = available.get("CPU", 0.0), available.get("GPU", 0.0)
    problems = []
    if request.total_cpus * concurrent > cpus + 1e-9:
        problems.append(
            f"{concurrent} x {request.workers} workers x {request.cpus_per_worker} CPUs = "
            f"{request.total_cpus * concurrent:g} CPUs, but the cluster has {cpus:g}"
        )
    if request.total_gpus * concurrent > gpus + 1e-9:
        problems.append(
            f"{concurrent} x {request.workers} workers x {request.gpus_per_worker} GPUs = "
            f"{request.total_gpus * concurrent:g} GPUs, but the cluster has {gpus:g}"
        )
    if problems and os.environ.get(AUTOSCALING_ENV):
        # An autoscaling cluster (clusters/*.yaml set this) starts GPU nodes when trials ask for them.
        logger.warning("not in the cluster yet, left to the autoscaler: %s", "; ".join(problems))
        return
    if problems:
        raise ResourceError(
            "the requested resources can never be scheduled: "
            + "; ".join(problems)
            + ". Lower --workers / --cpus-per-worker / --gpus-per-worker / --max-concurrent, or add nodes."
        )


def max_concurrent_runs(request: WorkerResources) -> int:
    """How many runs of `request` fit the cluster at once (at least 1 after `check_fits`)."""
    available = ray.cluster_resources()
    limits = [math.floor(available.get("CPU", 0.0) / request.total_cpus + 1e-9)]
    if request.use_gpu:
        limits.append(math.floor(available.get("GPU", 0.0) / request.total_gpus + 1e-9))
    concurrent = max(1, min(limits))
    if os.environ.get(AUTOSCALING_ENV):
        # Only the nodes up now are counted; nodes the autoscaler would add for more trials are not.
        logger.warning(
            "autoscaling cluster: %d run(s) at once fit the nodes running now; pass --max-concurrent K "
            "to let the autoscaler add nodes for K",
            concurrent,
        )
    return concurrent


def leftover_resources() -> dict:
    """What a finished search or run may have left behind in the Ray cluster (for tests and benches)."""
    from ray.util import placement_group_table

    groups = [pg for pg, info in placement_group_table().items() if info.get("state") != "REMOVED"]
    return {"placement_groups": groups, "available": ray.available_resources(), "total": ray.cluster_resources()}
