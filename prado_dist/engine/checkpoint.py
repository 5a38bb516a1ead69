"""Checkpoints as plain dicts of tensors and numbers, loadable with `torch.load(weights_only=True)`.

Nothing in a checkpoint needs unpickling of arbitrary objects: the config is stored as its JSON
dump, so a foreign or tampered file cannot run code when loaded.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from prado_dist.config import TrainConfig

CHECKPOINT_FORMAT = 1


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, or not a prado_dist checkpoint."""


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write `state` atomically: a crash mid-write leaves the previous file intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {**state, "format": CHECKPOINT_FORMAT}
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            torch.save(payload, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except OSError as err:  # disk full, quota, read-only: say which file, and that nothing was lost
        Path(temporary).unlink(missing_ok=True)
        raise OSError(
            err.errno, f"{err.strerror or err} while writing checkpoint (any previous one is unchanged)", str(path)
        ) from err
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by `save_checkpoint`; refuse anything else with a clear message."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # truncated zip, pickle with foreign classes, random bytes ...
        raise CheckpointError(
            f"cannot read checkpoint {path}: {type(err).__name__}: {str(err).splitlines()[0][:200]}. "
            "The file is truncated, corrupt, or not a prado_dist checkpoint (only weights-only "
            "checkpoints are loaded; arbitrary pickled objects are refused)."
        ) from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT or "model" not in state:
        raise CheckpointError(
            f"{path} is not a prado_dist checkpoint (expected a dict with 'format'={CHECKPOINT_FORMAT} "
            "and 'model'); was it written by another program?"
        )
    return state


def checkpoint_config(state: dict[str, Any]) -> TrainConfig:
    """The `TrainConfig` a checkpoint was trained with (stored as JSON: checkpoints hold plain types
    only, so that they load with `weights_only=True`)."""
    return TrainConfig.model_validate_json(state["config"])
