"""Ray Train layer: the engine's `TrainingRun` on data-parallel workers (DDP) with checkpoints.

Imports the engine below it; knows nothing of Ray Tune.
"""

from prado_dist.distributed.node_data import check_data_on_nodes, data_fingerprint
from prado_dist.distributed.resources import (
    ResourceError,
    WorkerResources,
    check_fits,
    check_global_batch,
    leftover_resources,
    max_concurrent_runs,
)
from prado_dist.distributed.trainer import (
    SELECTION_METRIC,
    best_checkpoint_state,
    build_trainer,
    connect,
    load_ray_checkpoint,
    run_training,
    storage_uri,
)
from prado_dist.distributed.worker import CHECKPOINT_FILE, train_loop_per_worker

__all__ = [
    "CHECKPOINT_FILE",
    "SELECTION_METRIC",
    "ResourceError",
    "WorkerResources",
    "best_checkpoint_state",
    "build_trainer",
    "check_data_on_nodes",
    "check_fits",
    "check_global_batch",
    "connect",
    "data_fingerprint",
    "leftover_resources",
    "load_ray_checkpoint",
    "max_concurrent_runs",
    "run_training",
    "storage_uri",
    "train_loop_per_worker",
]
