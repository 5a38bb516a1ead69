"""Driver-side checks of a search: what would otherwise fail inside every trial, found before any
image is decoded or Ray starts (issue 21, item 6).

A setting that a trial refuses fails that trial three times (Tune's retries) and then the next
trial the same way, while the search's MLflow parent run waits. The space itself checks what
belongs to it (every searched value is a valid setting, space.py); this module checks the settings
against each other and against the driver's machine: the global batch against the workers of a
trial, and the pretrained weight file. (`device` needs no check: trials train where Ray puts them.)
"""

from __future__ import annotations

from pathlib import Path

from prado_dist.config import ConfigError, TrainConfig
from prado_dist.distributed import check_global_batch
from prado_dist.models.lite0_weights import package_weight_file
from prado_dist.models.transfer import HF_CACHE, OFFLINE_BACKBONES, PACKAGE
from prado_dist.search.space import Choice, IntUniform, SearchSpace


def check_search(space: SearchSpace) -> None:
    """Raise `ConfigError` or `ResourceError` for a setting no trial of `space` could run with."""
    base = space.base_config()
    check_batches(space)
    check_pretrained(base)


def check_batches(space: SearchSpace) -> None:
    """Every global batch a trial can get must split evenly over the trial's workers."""
    workers = space.trial.workers
    spec = space.params.get("batch_size")
    if isinstance(spec, Choice):
        batches = [int(value) for value in spec.values]
    elif isinstance(spec, IntUniform):
        batches = list(range(spec.low, spec.high + 1))
    else:
        batches = [space.base_config().batch_size]
    for batch in batches:
        if spec is not None and batch % workers:
            raise ConfigError(
                f"batch_size: the searched {spec.model_dump(exclude={'distribution'})} draws {batch}, which does "
                f"not split evenly over {workers} workers per trial; search a choice of multiples of {workers}"
            )
        check_global_batch(batch, workers)


def check_pretrained(config: TrainConfig) -> None:
    """A `pretrained` weight file must exist here (the driver), or the package that ships the weights
    be installed; nothing is downloaded."""
    if config.pretrained is None or str(config.pretrained) == HF_CACHE:
        return
    if str(config.pretrained) == PACKAGE:  # weights an installed package ships: that it is installed
        if config.model not in OFFLINE_BACKBONES:
            raise ConfigError(
                f"pretrained={PACKAGE}: no package ships weights of {config.model}; it is there for "
                f"{', '.join(sorted(OFFLINE_BACKBONES))}. Pass a weight file as pretrained=PATH (docs/transfer.md)"
            )
        try:
            package_weight_file()
        except ImportError as err:
            raise ConfigError(str(err)) from None
        return
    path = Path(config.pretrained).expanduser()
    if not path.is_file():
        raise ConfigError(
            f"pretrained={config.pretrained}: no such file{' (it is a folder)' if path.is_dir() else ''}; pass "
            f"the path of a local .safetensors or .pth weight file of {config.model} (docs/transfer.md: how to "
            f"export one), or '{HF_CACHE}' for an existing Hugging Face cache"
        )
