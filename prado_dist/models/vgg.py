"""The report's VGG-like CNN (report section 2, Figure 2.1), reproduced layer for layer.

Source: the author's Keras notebook (`janphiliprichter/PradoImageClassification`, `AMD_Project.ipynb`,
model "VGG"), summarised in ../shared/reference/report-facts.md. Ten convolutions in four blocks, each
conv with a bias, followed by BatchNormalization and ReLU; 3x3 convs "same", 1x1 convs "valid"; each
block ends in a 2x2 *average* pool. Flatten, then Dense 16 -> BN -> PReLU -> Dense 8 -> BN -> PReLU ->
Dense(num_classes). Keras prints 6,625,101 trainable / 6,630,525 total parameters at 224x224 and 5
classes; `tests/test_models.py` checks both numbers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from prado_dist.models._layers import (
    ConvBnAct,
    batch_norm_1d,
    check_num_classes,
    init_he_normal_,
    make_classifier,
)
from prado_dist.models._registry import register_model

POOL = "pool"

# (channels, kernel size) per convolution; POOL = 2x2/2 average pooling (report Figure 2.1).
VGG_LAYERS: list[tuple[int, int] | str] = [
    (64, 3), (64, 3), POOL,
    (128, 3), (128, 3), POOL,
    (256, 3), (256, 3), (256, 1), POOL,
    (512, 3), (512, 3), (512, 1), POOL,
]  # fmt: skip
VGG_DENSE_UNITS: tuple[int, ...] = (16, 8)  # Dense -> BN -> PReLU layers before the output layer


# --- blocks -----------------------------------------------------------------------------------------


class DenseBnPReLU(nn.Sequential):
    """Dense(units, He-normal) -> BatchNormalization -> PReLU with one slope per unit (Keras PReLU)."""

    def __init__(self, in_features: int, units: int) -> None:
        dense = nn.Linear(in_features, units)
        init_he_normal_(dense)
        prelu = nn.PReLU(num_parameters=units)
        # Keras PReLU starts its slopes at 0 (alpha_initializer="zeros"), PyTorch at 0.25.
        nn.init.zeros_(prelu.weight)
        super().__init__(dense, batch_norm_1d(units), prelu)


def conv_blocks(layers: Sequence[tuple[int, int] | str], in_channels: int) -> tuple[nn.Sequential, int]:
    """The convolutional part, one ConvBnAct per (channels, kernel size) and a 2x2/2 average pool per
    POOL, in order; also the channels of its output."""
    features: list[nn.Module] = []
    channels = in_channels
    for layer in layers:
        if layer == POOL:
            features.append(nn.AvgPool2d(kernel_size=2, stride=2))
        else:
            out_channels, kernel_size = layer
            features.append(ConvBnAct(channels, out_channels, kernel_size))
            channels = out_channels
    return nn.Sequential(*features), channels


def dense_blocks(in_features: int, dense_units: Sequence[int]) -> nn.Sequential:
    """Dense -> BN -> PReLU layers of `dense_units` widths, between the flatten and the classifier."""
    hidden: list[nn.Module] = []
    width = in_features
    for units in dense_units:
        hidden.append(DenseBnPReLU(width, units))
        width = units
    return nn.Sequential(*hidden)


# --- model ------------------------------------------------------------------------------------------


class VGG(nn.Module):
    """VGG-like CNN with a flatten head; its flatten size, hence its weights, depend on `image_size`."""

    pixel_mean_std = None  # input preprocessing is per-image standardisation (applied by the engine)

    def __init__(
        self,
        layers: Sequence[tuple[int, int] | str] = tuple(VGG_LAYERS),
        dense_units: Sequence[int] = VGG_DENSE_UNITS,
        num_classes: int = 5,
        image_size: int = 224,
        output_bias: Sequence[float] | None = None,
        dropout: float = 0.0,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        check_num_classes(num_classes)
        num_pools = sum(layer == POOL for layer in layers)
        if image_size < 2**num_pools:
            raise ValueError(f"image_size must be >= {2**num_pools} ({num_pools} poolings), got {image_size}")
        self.num_classes = num_classes
        self.image_size = image_size

        self.features, channels = conv_blocks(layers, in_channels)

        # Each "valid" 2x2/2 pool floors the size, and floor(floor(n/2)/2) == floor(n/4): the flattened
        # map is (image_size // 16)**2 * 512 = 14*14*512 = 100,352 at 224 (Keras summary, "Flatten").
        self.flat_features = (image_size // 2**num_pools) ** 2 * channels
        self.hidden = dense_blocks(self.flat_features, dense_units)
        width = dense_units[-1] if dense_units else self.flat_features
        self.num_features = width  # input width of the classifier (timm convention)
        self.head_drop = nn.Dropout(dropout)
        self.classifier = make_classifier(width, num_classes, output_bias)

    def get_classifier(self) -> nn.Module:
        return self.classifier

    def reset_classifier(self, num_classes: int, output_bias: Sequence[float] | None = None) -> None:
        check_num_classes(num_classes)
        self.num_classes = num_classes
        self.classifier = make_classifier(self.num_features, num_classes, output_bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = torch.flatten(x, 1)
        if x.shape[1] != self.flat_features:
            raise ValueError(
                f"this VGG was built for image_size={self.image_size} ({self.flat_features} flattened "
                f"features) but got {x.shape[1]}; build it with the image size you feed it"
            )
        x = self.head_drop(self.hidden(x))
        return x if pre_logits else self.classifier(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# --- registered constructors ------------------------------------------------------------------------


@register_model("vgg")
def vgg(
    num_classes: int = 5,
    image_size: int = 224,
    output_bias: Sequence[float] | None = None,
    dropout: float = 0.0,
) -> VGG:
    """The report's VGG-like model (6,625,101 trainable parameters at 224 px, 5 classes)."""
    return VGG(VGG_LAYERS, VGG_DENSE_UNITS, num_classes, image_size, output_bias, dropout)
