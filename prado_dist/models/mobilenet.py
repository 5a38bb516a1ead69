"""The report's MobileNetV2-like CNN (report section 4, Figure 4.4), reproduced exactly.

Source: the author's Keras notebook (`janphiliprichter/PradoImageClassification`, `AMD_Project.ipynb`,
`bottleneck_block`), summarised in ../shared/reference/report-facts.md. It differs from Sandler et al.
(2018) in ways this file keeps on purpose:

* the stride sits on the *expanding* 1x1 conv, not on the depthwise 3x3 conv;
* the expansion is 6 x the block's *output* channels f (not its input channels);
* when a stride-1 block changes the channel count, the shortcut is a plain 1x1 conv (bias, no BN);
* the head is a 1x1 conv to 160 channels -> BN -> ReLU -> global average pool -> Dense;
* every conv has a bias (Keras default).

Keras prints 624,853 trainable / 642,709 total parameters at 5 classes; the tests check both.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from prado_dist.models._layers import (
    ConvBnAct,
    GlobalPoolHead,
    glorot_uniform_,
    init_he_normal_,
)
from prado_dist.models._registry import register_model

# (output channels f, stride s) of each inverted-residual block, in order (report Figure 4.4 rows
# "Bottleneck" with c, n, s expanded to one entry per block).
MOBILENET_BLOCKS: list[tuple[int, int]] = [
    (16, 1),
    (24, 2), (24, 1),
    (32, 2), (32, 1),
    (64, 2), (64, 1), (64, 1), (64, 1),
    (96, 1), (96, 1), (96, 1),
]  # fmt: skip
EXPANSION = 6  # report Figure 4.4, t = 6
STEM_CHANNELS = 32  # "Conv3-32", stride 2
HEAD_CHANNELS = 160  # "Conv1-160"


# --- blocks -----------------------------------------------------------------------------------------


class InvertedResidual(nn.Module):
    """1x1 expand to 6f (stride s) -> BN -> ReLU6 -> 3x3 depthwise -> BN -> ReLU6 -> 1x1 to f -> BN.

    The residual add happens only for s = 1 (report section 4.3); a channel change then goes through
    a plain 1x1 conv on the shortcut, as the notebook does (`Conv_Dim_{stage}`).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int = EXPANSION) -> None:
        super().__init__()
        hidden = out_channels * expansion
        self.expand = ConvBnAct(in_channels, hidden, 1, stride, act_layer=nn.ReLU6)
        self.depthwise = ConvBnAct(hidden, hidden, 3, groups=hidden, act_layer=nn.ReLU6)
        # Keras' DepthwiseConv2D ignores the notebook's kernel_initializer="HeNormal" (its kernel uses
        # `depthwise_initializer`, default "glorot_uniform"), so the depthwise kernel starts Glorot-uniform.
        glorot_uniform_(self.depthwise[0].weight)
        self.project = ConvBnAct(hidden, out_channels, 1, act_layer=None)  # linear bottleneck
        self.has_residual = stride == 1
        self.shortcut: nn.Module = nn.Identity()
        if self.has_residual and in_channels != out_channels:
            self.shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1)
            init_he_normal_(self.shortcut)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(self.depthwise(self.expand(x)))
        return out + self.shortcut(x) if self.has_residual else out


# --- model ------------------------------------------------------------------------------------------


class MobileNet(GlobalPoolHead):
    """Stem 3x3/2 conv -> inverted-residual blocks -> 1x1 conv 160 -> GAP -> Dense."""

    pixel_mean_std = None  # input preprocessing is per-image standardisation (applied by the engine)

    def __init__(
        self,
        blocks: Sequence[tuple[int, int]] = tuple(MOBILENET_BLOCKS),
        num_classes: int = 5,
        image_size: int = 224,
        output_bias: Sequence[float] | None = None,
        dropout: float = 0.0,
        in_channels: int = 3,
    ) -> None:
        super().__init__(num_classes, image_size)

        # "same" padding: the report's table gives 112x112 after this stride-2 conv (Keras pads (0, 1)).
        self.stem = ConvBnAct(in_channels, STEM_CHANNELS, 3, stride=2)
        layers: list[nn.Module] = []
        channels = STEM_CHANNELS
        for out_channels, stride in blocks:
            layers.append(InvertedResidual(channels, out_channels, stride))
            channels = out_channels
        self.blocks = nn.Sequential(*layers)
        self.conv_head = ConvBnAct(channels, HEAD_CHANNELS, 1)  # ReLU, not ReLU6 (notebook)

        self.build_head(HEAD_CHANNELS, dropout, output_bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_head(self.blocks(self.stem(x)))


# --- registered constructors ------------------------------------------------------------------------


@register_model("mobilenet")
def mobilenet(
    num_classes: int = 5,
    image_size: int = 224,
    output_bias: Sequence[float] | None = None,
    dropout: float = 0.0,
) -> MobileNet:
    """The report's MobileNetV2-like model (624,853 trainable parameters at 5 classes)."""
    return MobileNet(MOBILENET_BLOCKS, num_classes, image_size, output_bias, dropout)
