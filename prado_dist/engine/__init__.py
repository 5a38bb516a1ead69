"""Training engine: the report's recipe as plain PyTorch, with no Ray imports.

`TrainingRun` (session.py) builds a run from a `TrainConfig`, with its model and optimiser
(network.py), loaders (loaders.py) and device (process.py); `train_one_epoch` / `evaluate`
(loop.py) are the loops; metrics.py turns summed counts into metrics; checkpoint.py saves
weights-only-loadable checkpoints; schedule.py is the report's learning-rate schedule and a run's
settings over epochs as a replayable record.
"""

from prado_dist.engine.checkpoint import CheckpointError, checkpoint_config, load_checkpoint, save_checkpoint
from prado_dist.engine.export import evaluate_checkpoint
from prado_dist.engine.loop import InputPipeline, NonFiniteLossError, evaluate, train_one_epoch
from prado_dist.engine.metrics import Counts, metrics_from_counts
from prado_dist.engine.process import load_data, resolve_device
from prado_dist.engine.schedule import config_from_schedule, exponential_decay_after, schedule_record
from prado_dist.engine.session import TrainingRun, unwrap

__all__ = [
    "CheckpointError",
    "Counts",
    "InputPipeline",
    "NonFiniteLossError",
    "TrainingRun",
    "evaluate",
    "checkpoint_config",
    "config_from_schedule",
    "evaluate_checkpoint",
    "exponential_decay_after",
    "load_checkpoint",
    "load_data",
    "metrics_from_counts",
    "resolve_device",
    "save_checkpoint",
    "schedule_record",
    "train_one_epoch",
    "unwrap",
]
