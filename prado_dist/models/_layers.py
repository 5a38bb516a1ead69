"""Keras-equivalent building blocks shared by the report's three custom CNNs.

The report's models were written in TensorFlow 2.15 / Keras (../shared/reference/report-facts.md).
Reproducing them in PyTorch needs three Keras conventions that PyTorch does not share:

* "same" padding: TensorFlow pads a strided convolution or pooling *asymmetrically* (the extra row and
  column go to the bottom/right), PyTorch's `padding=` is symmetric. Stride-1 odd kernels are symmetric
  in both, so only strided layers need the explicit `F.pad` below.
* BatchNormalization defaults: Keras momentum 0.99 weights the *old* statistics, PyTorch's momentum
  weights the *new* batch, so Keras 0.99 == PyTorch 0.01; Keras epsilon is 1e-3 (PyTorch 1e-5).
* Initialisers: the notebook passes `kernel_initializer="HeNormal"` and Keras biases default to zeros;
  PyTorch's default is Kaiming-uniform(a=sqrt(5)) weights and uniform biases.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

# Keras BatchNormalization(momentum=0.99, epsilon=1e-3) in PyTorch's convention (see module docstring).
BN_MOMENTUM = 0.01
BN_EPS = 1e-3

# Keras' TruncatedNormal cuts at two standard deviations; the surviving part of a unit normal has
# standard deviation 0.8796..., so Keras divides by it to make the *resulting* std the requested one
# (keras/initializers/initializers.py, VarianceScaling, distribution="truncated_normal").
_TRUNCATED_NORMAL_STD_CORRECTION = 0.87962566103423978


# --- helpers ----------------------------------------------------------------------------------------


def he_normal_(weight: torch.Tensor) -> torch.Tensor:
    """Keras `HeNormal`: truncated normal with resulting std sqrt(2 / fan_in), cut at +-2 sigma."""
    fan_in = weight[0].numel()  # in_channels/groups * kh * kw for a conv, in_features for a Linear
    std = math.sqrt(2.0 / fan_in) / _TRUNCATED_NORMAL_STD_CORRECTION
    # Same distribution as nn.init.trunc_normal_(std=std, a=-2std, b=2std) (rejection sampling, as
    # TensorFlow does), but redrawing only the rejected ~4.6% per round: torch 2.14's version redraws
    # the whole tensor each round, 20x slower (0.4 s vs 0.02 s for 4M weights on this machine's CPU).
    with torch.no_grad():
        flat = weight.view(-1).normal_(0.0, std)
        rejected = torch.nonzero(flat.abs() > 2.0 * std).squeeze(1)
        while rejected.numel():
            redrawn = torch.empty(rejected.numel(), dtype=flat.dtype, device=flat.device).normal_(0.0, std)
            flat[rejected] = redrawn
            rejected = rejected[redrawn.abs() > 2.0 * std]
    return weight


def glorot_uniform_(weight: torch.Tensor) -> torch.Tensor:
    """Keras `GlorotUniform` (the Keras default): U(+-sqrt(6 / (fan_in + fan_out))).

    PyTorch's xavier_uniform_ computes the same fan_in + fan_out as Keras for Linear, Conv2d and the
    depthwise Conv2d (Keras: 9*C + 9*1, PyTorch: 9*1 + 9*C), so it is used directly.
    """
    return nn.init.xavier_uniform_(weight)


def init_he_normal_(layer: nn.Conv2d | nn.Linear) -> None:
    """He-normal weights, zero bias: the notebook's setting for every custom conv and dense layer."""
    he_normal_(layer.weight)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)


def batch_norm_2d(channels: int) -> nn.BatchNorm2d:
    """BatchNorm2d with the Keras defaults the report trained with."""
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


def batch_norm_1d(features: int) -> nn.BatchNorm1d:
    """BatchNorm1d (after a Dense layer) with the Keras defaults the report trained with."""
    return nn.BatchNorm1d(features, eps=BN_EPS, momentum=BN_MOMENTUM)


def tf_same_padding(size: int, kernel_size: int, stride: int) -> tuple[int, int]:
    """(before, after) padding of one spatial dimension for TensorFlow's "same" padding.

    TensorFlow keeps ceil(size / stride) outputs and puts the odd padding pixel *after* the input
    (tensorflow/python/ops/nn_ops.py, "same" padding); e.g. a 3x3/2 conv on 224 pixels pads (0, 1).
    """
    remainder = size % stride
    total = max(kernel_size - (stride if remainder == 0 else remainder), 0)
    return total // 2, total - total // 2


def pad_same(x: torch.Tensor, kernel_size: int, stride: int, value: float = 0.0) -> torch.Tensor:
    """Pad an NCHW tensor the way TensorFlow's "same" padding would for this kernel and stride."""
    top, bottom = tf_same_padding(x.shape[-2], kernel_size, stride)
    left, right = tf_same_padding(x.shape[-1], kernel_size, stride)
    if top == bottom == left == right == 0:
        return x
    return F.pad(x, (left, right, top, bottom), value=value)


def make_classifier(
    in_features: int,
    num_classes: int,
    output_bias: Sequence[float] | None,
    init: str = "he_normal",
) -> nn.Module:
    """The output Dense layer; `output_bias` sets its bias (the report's class-prior bias).

    `num_classes=0` gives an Identity, the timm convention for "no classifier" (pooled features out).
    """
    if num_classes == 0:
        return nn.Identity()
    classifier = nn.Linear(in_features, num_classes)
    if init == "he_normal":
        he_normal_(classifier.weight)
    elif init == "glorot_uniform":
        glorot_uniform_(classifier.weight)
    else:
        raise ValueError(f"unknown initialiser {init!r}; accepted: 'he_normal', 'glorot_uniform'")
    nn.init.zeros_(classifier.bias)
    if output_bias is not None:
        bias = torch.as_tensor(output_bias, dtype=classifier.bias.dtype).flatten()
        if bias.numel() != num_classes:
            raise ValueError(
                f"output_bias has {bias.numel()} values but the model has num_classes={num_classes}; "
                "give one bias per class (e.g. log class frequencies)"
            )
        with torch.no_grad():
            classifier.bias.copy_(bias)
    return classifier


def check_num_classes(num_classes: int) -> None:
    """Reject a negative class count with a message instead of a cryptic nn.Linear error."""
    if num_classes < 0:
        raise ValueError(f"num_classes must be >= 0 (0 = no classifier), got {num_classes}")


# --- blocks -----------------------------------------------------------------------------------------


class Conv2dSame(nn.Conv2d):
    """Conv2d with Keras "same" padding and a bias (Keras `use_bias=True`), He-normal initialised.

    Stride 1: the symmetric `padding=k // 2` equals TensorFlow's and costs nothing extra. Strided
    kernels larger than 1 pad explicitly in `forward` (asymmetric, depends on the input size).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1) -> None:
        self.pad_in_forward = stride > 1 and kernel_size > 1
        padding = 0 if self.pad_in_forward else (kernel_size - 1) // 2
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=True)
        init_he_normal_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad_in_forward:
            x = pad_same(x, self.kernel_size[0], self.stride[0])
        return super().forward(x)


class MaxPool2dSame(nn.MaxPool2d):
    """Keras `MaxPooling2D(padding="same")`: pads with -inf so padding never wins the max."""

    def __init__(self, kernel_size: int, stride: int) -> None:
        super().__init__(kernel_size, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(pad_same(x, self.kernel_size, self.stride, value=float("-inf")))


class ConvBnAct(nn.Sequential):
    """Conv2D("same", bias) -> BatchNormalization -> activation, the unit all three models stack."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        groups: int = 1,
        act_layer: type[nn.Module] | None = nn.ReLU,
    ) -> None:
        layers: list[nn.Module] = [
            Conv2dSame(in_channels, out_channels, kernel_size, stride, groups),
            batch_norm_2d(out_channels),
        ]
        if act_layer is not None:
            layers.append(act_layer())
        super().__init__(*layers)


class GlobalPoolHead(nn.Module):
    """The timm-style head interface of the models ending in global pooling -> dropout -> Dense.

    Subclasses build their body, then call `build_head`, and define `forward_features`;
    `classifier_init` is the Keras initialiser of their output layer.
    """

    classifier_init = "he_normal"

    def __init__(self, num_classes: int, image_size: int) -> None:
        super().__init__()
        check_num_classes(num_classes)
        self.num_classes = num_classes
        self.image_size = image_size  # informational: global pooling makes the weights size-independent

    def build_head(self, num_features: int, dropout: float, output_bias: Sequence[float] | None) -> None:
        """Global average pooling -> dropout -> Dense over the body's `num_features` channels.

        Called last in `__init__`: the classifier is initialised after the body, as in Keras."""
        self.num_features = num_features
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.head_drop = nn.Dropout(dropout)
        self.reset_classifier(self.num_classes, output_bias)

    def get_classifier(self) -> nn.Module:
        return self.classifier

    def reset_classifier(self, num_classes: int, output_bias: Sequence[float] | None = None) -> None:
        check_num_classes(num_classes)
        self.num_classes = num_classes
        self.classifier = make_classifier(self.num_features, num_classes, output_bias, init=self.classifier_init)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(torch.flatten(self.global_pool(x), 1))
        return x if pre_logits else self.classifier(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
