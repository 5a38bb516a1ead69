"""A small BN-free CNN for exact data-parallel equivalence checks and smoke runs; not from the report.

BatchNorm normalises each worker's shard of the batch with that shard's own statistics (on the CPU,
where SyncBatchNorm is unavailable), so a W-worker run of the report's models legitimately differs
from a single process even with identical data. Without BatchNorm, and with data-parallel gradient
averaging over equal shards, W workers compute the gradient of the global batch: the two runs agree
to floating-point rounding (tests/test_distributed.py checks it). The network is also cheap enough
for end-to-end smoke runs on a CPU: 3x3 convs with ReLU, global average pool, Dense.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from prado_dist.models._layers import GlobalPoolHead, init_he_normal_
from prado_dist.models._registry import register_model

# (output channels, stride) of each 3x3 conv + ReLU, in order.
PLAIN_LAYERS: list[tuple[int, int]] = [(16, 2), (32, 2), (64, 2)]


# --- model ------------------------------------------------------------------------------------------


class PlainCNN(GlobalPoolHead):
    """3x3 conv -> ReLU layers (no BatchNorm) -> global average pool -> dropout -> Dense."""

    pixel_mean_std = None  # input preprocessing is per-image standardisation (applied by the engine)

    def __init__(
        self,
        layers: Sequence[tuple[int, int]] = tuple(PLAIN_LAYERS),
        num_classes: int = 5,
        image_size: int = 224,
        output_bias: Sequence[float] | None = None,
        dropout: float = 0.0,
        in_channels: int = 3,
    ) -> None:
        super().__init__(num_classes, image_size)
        modules: list[nn.Module] = []
        channels = in_channels
        for out_channels, stride in layers:
            conv = nn.Conv2d(channels, out_channels, 3, stride, padding=1)
            init_he_normal_(conv)
            modules += [conv, nn.ReLU()]
            channels = out_channels
        self.features = nn.Sequential(*modules)
        self.build_head(channels, dropout, output_bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


# --- registered constructors ------------------------------------------------------------------------


@register_model("plain_cnn")
def plain_cnn(
    num_classes: int = 5,
    image_size: int = 224,
    output_bias: Sequence[float] | None = None,
    dropout: float = 0.0,
) -> PlainCNN:
    """Three 3x3/2 conv + ReLU layers (16, 32, 64 channels), no BatchNorm; 23,909 parameters at 5 classes."""
    return PlainCNN(PLAIN_LAYERS, num_classes, image_size, output_bias, dropout)
