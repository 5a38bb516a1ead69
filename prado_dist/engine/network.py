"""The model and optimiser that a `TrainConfig` describes, laid out for the device a run trains on.

session.py calls `create_model` itself (with `model_kwargs`) and then `place_network`; the
optimiser and its schedule come from `build_optimisation`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from prado_dist.config import TrainConfig
from prado_dist.data import output_bias
from prado_dist.engine.schedule import exponential_decay_after


def model_kwargs(config: TrainConfig, train_counts: list[int]) -> dict[str, Any]:
    """The keyword arguments of `create_model` that `config` sets (the rest keep the model's defaults)."""
    kwargs: dict[str, Any] = {"image_size": config.image_size}
    if config.output_bias:
        kwargs["output_bias"] = output_bias(train_counts).tolist()
    if config.dropout:
        kwargs["dropout"] = config.dropout
    if config.pretrained is not None:
        kwargs["pretrained"] = config.pretrained
    if config.unfreeze_stages:
        kwargs["unfreeze_stages"] = config.unfreeze_stages
    return kwargs


def place_network(model: nn.Module, bn_momentum: float | None, device: torch.device, world_size: int) -> nn.Module:
    """`model` on `device`, in the memory layout and BatchNorm (momentum, synchronised) it trains with."""
    if bn_momentum is not None:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.momentum = bn_momentum
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)  # faster convolutions on tensor cores
        if world_size > 1:
            # BatchNorm statistics over the whole global batch, as in one process (the report's
            # 32 images), not over each GPU's shard. SyncBatchNorm exists for GPUs only: on the
            # CPU every worker normalises its own shard (docs/distributed.md).
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def build_optimisation(config: TrainConfig, model: nn.Module):
    """Adam over `model`'s trainable parameters and the report's learning-rate schedule."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    # Keras Adam defaults (report): beta1 0.9, beta2 0.999, epsilon 1e-7.
    optimizer = torch.optim.Adam(
        trainable, lr=config.lr, betas=(0.9, 0.999), eps=1e-7, weight_decay=config.weight_decay
    )
    return optimizer, exponential_decay_after(optimizer, config.decay_start, config.decay)
