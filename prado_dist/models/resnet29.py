"""The report's ResNet29 (report section 3, Figure 3.2 and its architecture table), reproduced exactly.

Source: the author's Keras notebook (`janphiliprichter/PradoImageClassification`, `AMD_Project.ipynb`,
`three_layer_identity_block` / `three_layer_projection_block`, after AarohiSingla/ResNet50), summarised
in ../shared/reference/report-facts.md. A ResNet-50-style bottleneck network cut to three stages
(1 stem conv + 9 blocks x 3 convs + the output layer = 29 weight layers), with two departures from
He et al. (2016) that the notebook makes and this file keeps:

* a ReLU after the block's last BatchNorm *before* the residual add (then another ReLU after it);
* every convolution has a bias (Keras `use_bias=True` default), although BatchNorm follows it.

Keras prints 4,088,837 trainable / 4,107,141 total parameters at 5 classes; the tests check both.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from prado_dist.models._layers import (
    ConvBnAct,
    GlobalPoolHead,
    MaxPool2dSame,
    batch_norm_2d,
    init_he_normal_,
)
from prado_dist.models._registry import register_model

# (filters f, blocks, stride of the first block) per stage; the first block of a stage is a projection
# block (1x1 conv shortcut to 4f), the others identity blocks (report architecture table).
RESNET29_STAGES: list[tuple[int, int, int]] = [(64, 3, 1), (128, 4, 2), (256, 2, 2)]
BOTTLENECK_EXPANSION = 4  # the last 1x1 conv widens to 4f, as in ResNet-50
STEM_CHANNELS = 64


# --- blocks -----------------------------------------------------------------------------------------


class Bottleneck(nn.Module):
    """1x1 f (stride) -> 3x3 f -> 1x1 4f, each conv + BN + ReLU; add the shortcut; ReLU.

    `projection=True` is the notebook's projection block: the stride sits on the first 1x1 conv and the
    shortcut is a 1x1 conv to 4f with the same stride, followed by BatchNorm (no ReLU).
    """

    def __init__(self, in_channels: int, filters: int, stride: int = 1, projection: bool = False) -> None:
        super().__init__()
        out_channels = filters * BOTTLENECK_EXPANSION
        if not projection and (stride != 1 or in_channels != out_channels):
            raise ValueError(
                f"an identity block needs stride 1 and in_channels == 4*filters, got stride={stride}, "
                f"in_channels={in_channels}, filters={filters}; use projection=True"
            )
        self.conv1 = ConvBnAct(in_channels, filters, 1, stride)
        self.conv2 = ConvBnAct(filters, filters, 3)
        # The notebook applies ReLU here, before the add ("ReLU3_{stage}"), unlike He et al. (2016).
        self.conv3 = ConvBnAct(filters, out_channels, 1)
        self.shortcut = ConvBnAct(in_channels, out_channels, 1, stride, act_layer=None) if projection else nn.Identity()
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv3(self.conv2(self.conv1(x))) + self.shortcut(x))


# --- model ------------------------------------------------------------------------------------------


class ResNet29(GlobalPoolHead):
    """Stem (zero-pad 3, 7x7/2 conv, BN, ReLU, 3x3/2 "same" max pool) -> bottleneck stages -> GAP -> Dense."""

    pixel_mean_std = None  # input preprocessing is per-image standardisation (applied by the engine)
    classifier_init = "glorot_uniform"  # the report's ResNet29 output layer keeps Keras' default

    def __init__(
        self,
        stages: Sequence[tuple[int, int, int]] = tuple(RESNET29_STAGES),
        num_classes: int = 5,
        image_size: int = 224,
        output_bias: Sequence[float] | None = None,
        dropout: float = 0.0,
        in_channels: int = 3,
    ) -> None:
        super().__init__(num_classes, image_size)

        stem_conv = nn.Conv2d(in_channels, STEM_CHANNELS, kernel_size=7, stride=2, padding=0)
        init_he_normal_(stem_conv)
        self.stem = nn.Sequential(
            nn.ZeroPad2d(3),  # notebook: ZeroPadding2D((3, 3)) then a "valid" 7x7/2 conv: 224 -> 112
            stem_conv,
            batch_norm_2d(STEM_CHANNELS),
            nn.ReLU(),
            MaxPool2dSame(kernel_size=3, stride=2),  # 112 -> 56
        )

        blocks: list[nn.Module] = []
        channels = STEM_CHANNELS
        for filters, num_blocks, stride in stages:
            blocks.append(Bottleneck(channels, filters, stride, projection=True))
            channels = filters * BOTTLENECK_EXPANSION
            blocks.extend(Bottleneck(channels, filters) for _ in range(num_blocks - 1))
        self.stages = nn.Sequential(*blocks)

        self.build_head(channels, dropout, output_bias)  # classifier: Glorot uniform (classifier_init)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))


# --- registered constructors ------------------------------------------------------------------------


@register_model("resnet29")
def resnet29(
    num_classes: int = 5,
    image_size: int = 224,
    output_bias: Sequence[float] | None = None,
    dropout: float = 0.0,
) -> ResNet29:
    """The report's ResNet29 (4,088,837 trainable parameters at 5 classes)."""
    return ResNet29(RESNET29_STAGES, num_classes, image_size, output_bias, dropout)
