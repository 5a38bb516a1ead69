"""What a training process sets up before it builds a run: its data, device, CPU threads and seeds.

Kept apart from session.py (the run itself): a Ray worker loads its node's data before building
the run, and a CLI checks a device name before it builds anything (train.py refuses an unusable
--device before training, not after it).
"""

from __future__ import annotations

import os
import random

import numpy as np
import torch

from prado_dist.config import TrainConfig
from prado_dist.data import PreparedData, prepare_data


def load_data(config: TrainConfig) -> PreparedData:
    """The decoded, split images that `config` trains on (decoded once per machine, then reused)."""
    return prepare_data(
        config.data_dir,
        config.image_size,
        cache_dir=config.cache_dir,
        test_fraction=config.test_fraction,
        val_fraction=config.val_fraction,
        split_seed=config.split_seed,
    )


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """ "auto" -> this rank's GPU when CUDA is available, else the CPU."""
    if name == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:  # torch's own message lists every device type it was built with
        raise ValueError(
            f"device {name!r} is not a PyTorch device; use auto, cpu or cuda (cuda:N for GPU N)"
            + ("" if torch.cuda.is_available() else "; no CUDA GPU is visible here, so auto means cpu")
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available; use --device cpu or auto")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def cpu_threads(local_world_size: int = 1) -> int:
    """Intra-op threads per process: Ray's OMP_NUM_THREADS when set, else the cores shared out."""
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    return max(1, (os.cpu_count() or 1) // max(1, local_world_size))
