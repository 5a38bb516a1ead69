"""The report's transfer-learning models: a frozen timm backbone + global pooling + one new Dense layer.

The report (section "Transfer learning"; ../shared/reference/report-facts.md) used Keras applications
with ImageNet weights, `include_top=False`, frozen, each with its own `preprocess_input`, then global
pooling (VGG19: max, the others: average) and one new Dense(5, softmax). The timm equivalents:

| name              | Keras application | timm backbone          |
|-------------------|-------------------|------------------------|
| `efficientnet_b3` | EfficientNetV2B3  | `tf_efficientnetv2_b3` |
| `resnet50v2`      | ResNet50V2        | `resnetv2_50`          |
| `mobilenetv2`     | MobileNetV2       | `mobilenetv2_100`      |
| `vgg19`           | VGG19             | `vgg19`                |

`lite0` is the same recipe on timm's `tf_efficientnet_lite0`, the one backbone whose ImageNet weights
install from the package index (issue 24; prado_dist/models/lite0_weights.py).

`timm:<name>` (through `create_model`) wraps any other timm model the same way, with average pooling.

Weights are never downloaded: `pretrained` is a local `.safetensors` / `.pth` file, "hf-cache" for
an already-populated Hugging Face cache read with the hub forced offline, or "package" for weights
that an installed Python package ships (`PACKAGE_WEIGHTS`: EfficientNet-Lite0 only).
"""

from __future__ import annotations

import os
from bisect import bisect_left
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from prado_dist.models._layers import check_num_classes, make_classifier
from prado_dist.models._registry import register_model
from prado_dist.models.lite0_weights import PACKAGE as LITE0_PACKAGE
from prado_dist.models.lite0_weights import TIMM_NAME as LITE0_TIMM_NAME
from prado_dist.models.lite0_weights import package_state_dict as lite0_package_state_dict

HF_CACHE = "hf-cache"
PACKAGE = "package"
# timm model -> (package, its weights renamed onto a full timm state dict of that model)
PACKAGE_WEIGHTS: dict[str, tuple[str, Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]]] = {
    LITE0_TIMM_NAME: (LITE0_PACKAGE, lite0_package_state_dict),
}

# report name -> (timm backbone, global pooling of the report's head)
TRANSFER_BACKBONES: dict[str, tuple[str, str]] = {
    "efficientnet_b3": ("tf_efficientnetv2_b3", "avg"),
    "resnet50v2": ("resnetv2_50", "avg"),
    "mobilenetv2": ("mobilenetv2_100", "avg"),
    "vgg19": ("vgg19", "max"),
}
# The report's recipe on backbones whose ImageNet weights install offline (pretrained="package").
OFFLINE_BACKBONES: dict[str, tuple[str, str]] = {"lite0": (LITE0_TIMM_NAME, "avg")}


# --- helpers ----------------------------------------------------------------------------------------


def export_command(timm_name: str) -> str:
    """A one-liner that writes the ImageNet weights of `timm_name` to a file this module can load."""
    return (
        'python -c "import timm, safetensors.torch as st; '
        f"m = timm.create_model('{timm_name}', pretrained=True); "
        f"st.save_file(m.state_dict(), '{timm_name}.safetensors')\""
    )


def read_weight_file(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from `.safetensors` (safetensors.torch) or `.pth`/`.pt` (torch.load, tensors only)."""
    if path.suffix == ".safetensors":
        import safetensors.torch

        return safetensors.torch.load_file(str(path))
    if path.suffix in (".pth", ".pt", ".bin"):
        state = torch.load(path, map_location="cpu", weights_only=True)
        # Training checkpoints often nest the weights; accept the two usual keys.
        for key in ("state_dict", "model"):
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
        return state
    raise ValueError(f"unsupported weight file {path}: expected a .safetensors, .pth, .pt or .bin file")


def load_backbone_weights(backbone: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Load `state_dict` into `backbone`, strict except for the ImageNet classifier's keys.

    Every backbone tensor must be present with the right shape; keys the backbone lacks are accepted
    only when they belong to the classifier (timm `pretrained_cfg["classifier"]`) or VGG's fc6/fc7
    `pre_logits`, which `include_top=False` drops as well. Anything else raises, listing the keys.
    """
    classifier = backbone.pretrained_cfg.get("classifier") or ()
    classifier_names = [classifier] if isinstance(classifier, str) else list(classifier)
    droppable = (*(f"{name}." for name in classifier_names), "pre_logits.", "head.")
    expected = backbone.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(key for key in set(state_dict) - set(expected) if not key.startswith(droppable))
    wrong_shape = sorted(
        f"{key}: file {tuple(state_dict[key].shape)} vs model {tuple(expected[key].shape)}"
        for key in set(expected) & set(state_dict)
        if state_dict[key].shape != expected[key].shape
    )
    if missing or unexpected or wrong_shape:
        labelled = {"missing": missing, "unexpected": unexpected, "wrong shape": wrong_shape}
        problems = [
            f"{label} ({len(keys)}): {keys[:10]}{' ...' if len(keys) > 10 else ''}"
            for label, keys in labelled.items()
            if keys
        ]
        raise ValueError(
            f"weights in {source} do not match timm model '{backbone.pretrained_cfg.get('architecture')}': "
            + "; ".join(problems)
        )
    backbone.load_state_dict({key: state_dict[key] for key in expected})


@contextmanager
def hub_offline() -> Iterator[None]:
    """Force huggingface_hub offline: it reads HF_HUB_OFFLINE once at import, so patch its constant too."""
    from huggingface_hub import constants

    previous_env, previous_constant = os.environ.get("HF_HUB_OFFLINE"), constants.HF_HUB_OFFLINE
    os.environ["HF_HUB_OFFLINE"] = "1"
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = previous_constant
        if previous_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = previous_env


def build_backbone(timm_name: str, pretrained: Path | str | bool | None) -> nn.Module:
    """timm model without classifier and pooling (`forward_features` gives the unpooled feature map).

    `pretrained` as timm takes it (True: timm's own weights, from the Hugging Face cache here, since
    nothing is downloaded; False: random), or a weight file, "hf-cache", "package", None.
    """
    if not timm.is_model(timm_name):
        raise ValueError(f"unknown timm model {timm_name!r}; see timm.list_models() for the available names")
    kwargs: dict[str, Any] = {"num_classes": 0, "global_pool": ""}
    if isinstance(pretrained, bool):
        pretrained = HF_CACHE if pretrained else None
    if pretrained is not None and str(pretrained) in (HF_CACHE, PACKAGE):
        pretrained = str(pretrained)  # TrainConfig.pretrained is a Path: Path("hf-cache") != "hf-cache"
    if pretrained == HF_CACHE:
        backbone = _create_from_hf_cache(timm_name, kwargs)
    else:
        backbone = timm.create_model(timm_name, pretrained=False, **kwargs)
    if isinstance(backbone, timm.models.VGG):
        # timm's VGG keeps fc6/fc7 as a 4096-wide conv MLP (`pre_logits`, ~120M parameters) that its
        # forward() runs even with num_classes=0; Keras VGG19(include_top=False) has no fc layers.
        # forward_features() is the conv stack with its final max pool (Keras "block5_pool").
        backbone.pre_logits = nn.Identity()
    if pretrained == PACKAGE:
        load_backbone_weights(backbone, package_weights(timm_name), source=f"package {PACKAGE_WEIGHTS[timm_name][0]}")
    elif pretrained is not None and pretrained != HF_CACHE:
        path = Path(pretrained).expanduser()
        load_backbone_weights(backbone, weight_file(timm_name, path), source=str(path))
    return backbone


def _create_from_hf_cache(timm_name: str, kwargs: dict[str, Any]) -> nn.Module:
    """The timm model with its pretrained weights from the local Hugging Face cache, never downloaded;
    FileNotFoundError says how to get them onto this machine."""
    from huggingface_hub import constants

    try:
        with hub_offline():
            return timm.create_model(timm_name, pretrained=True, **kwargs)
    except Exception as err:  # hub errors differ by version (LocalEntryNotFoundError, OSError, ...)
        hub_id = getattr(timm.models.get_pretrained_cfg(timm_name), "hf_hub_id", None) or timm_name
        raise FileNotFoundError(
            f"no cached pretrained weights for timm model '{timm_name}' (hub repo {hub_id}) in the "
            f"Hugging Face cache {constants.HF_HUB_CACHE}; nothing is downloaded here. On a machine "
            f"with internet run `{export_command(timm_name)}` and pass the file as pretrained=<path>, "
            f"or fill a cache there with timm.create_model('{timm_name}', pretrained=True) and copy "
            f"it to this one. ({type(err).__name__}: {err})"
        ) from err


def weight_file(timm_name: str, path: Path) -> dict[str, torch.Tensor]:
    """The state dict in `path`; FileNotFoundError says how to make such a file."""
    if not path.is_file():
        raise FileNotFoundError(
            f"pretrained weights for timm model '{timm_name}' not found: expected a file at {path} "
            f"(e.g. {timm_name}.safetensors). Weights are never downloaded here; on a machine with "
            f"internet run `{export_command(timm_name)}` and copy the file over, or use "
            f"pretrained='{HF_CACHE}' with an existing Hugging Face cache."
        )
    return read_weight_file(path)


def package_weights(timm_name: str) -> dict[str, torch.Tensor]:
    """The ImageNet weights an installed package ships for `timm_name`, under timm's names (classifier too)."""
    if timm_name not in PACKAGE_WEIGHTS:
        offline = ", ".join(f"'{name}' (model {model!r})" for model, (name, _) in OFFLINE_BACKBONES.items())
        raise ValueError(
            f"pretrained='{PACKAGE}': no installable weights for timm model '{timm_name}'; packaged weights "
            f"exist for {offline}. Pass a weight file as pretrained=PATH instead (docs/transfer.md)"
        )
    _, convert = PACKAGE_WEIGHTS[timm_name]
    # Renamed against the full model (classifier included), so that every packaged tensor is accounted
    # for; built under a forked RNG so the new head's initialisation is the same as without weights.
    with torch.random.fork_rng(devices=[]):
        target = timm.create_model(timm_name, pretrained=False).state_dict()
    return convert(target)


def backbone_stages(backbone: nn.Module) -> list[list[str]]:
    """Names of the backbone's modules grouped into stages, first to last; stages without weights dropped.

    A stage ends at each module that timm's `feature_info` taps, the one stage description every timm
    model carries (its `features_only` mode relies on it): stem + blocks up to the first tap form stage
    0, and modules after the last tap (EfficientNet's conv_head/bn2, ResNetV2's final norm) join the last
    stage. timm's `group_matcher` is not used: its granularity varies (per conv for VGG, the final norm
    alone for ResNetV2). Without `feature_info` the whole backbone is one stage.
    """
    names = [name for name, _ in backbone.named_modules() if name]
    ends: list[int] = []
    for info in getattr(backbone, "feature_info", []):
        tap = info["module"]
        inside = [i for i, name in enumerate(names) if name == tap or name.startswith(tap + ".")]
        if inside:
            ends.append(inside[-1])
    ends = sorted(set(ends)) or [len(names) - 1]
    stages: list[list[str]] = [[] for _ in ends]
    for position, name in enumerate(names):
        stages[min(bisect_left(ends, position), len(ends) - 1)].append(name)

    def has_weights(stage: list[str]) -> bool:
        return any(True for name in stage for _ in backbone.get_submodule(name).parameters(recurse=False))

    return [stage for stage in stages if has_weights(stage)]


# --- model ------------------------------------------------------------------------------------------


class TransferModel(nn.Module):
    """timm backbone (frozen except its last `unfreeze_stages` stages) + pool + dropout + new Linear.

    Frozen stages stay in eval mode even under `model.train()`, so their BatchNorm statistics never
    move: the Keras base model was called with its BN layers in inference mode as well.
    """

    def __init__(
        self,
        timm_name: str,
        num_classes: int = 5,
        image_size: int = 224,
        output_bias: Sequence[float] | None = None,
        dropout: float = 0.0,
        pretrained: Path | str | bool | None = None,
        unfreeze_stages: int = 0,
        global_pool: str = "avg",
    ) -> None:
        super().__init__()
        check_num_classes(num_classes)
        if global_pool not in ("avg", "max"):
            raise ValueError(f"global_pool must be 'avg' or 'max', got {global_pool!r}")
        self.timm_name = timm_name
        self.num_classes = num_classes
        self.image_size = image_size  # informational: global pooling accepts any input size
        self.backbone = build_backbone(timm_name, pretrained)
        self.num_features: int = self.backbone.num_features

        self.data_config: dict[str, Any] = timm.data.resolve_data_config({}, model=self.backbone)
        # The input normalisation the backbone was trained with, on 0..1 pixels (the engine applies it).
        self.pixel_mean_std: tuple[tuple[float, ...], tuple[float, ...]] = (
            tuple(self.data_config["mean"]),
            tuple(self.data_config["std"]),
        )

        self._freeze_all_but_last_stages(unfreeze_stages)

        self.global_pool = nn.AdaptiveMaxPool2d(1) if global_pool == "max" else nn.AdaptiveAvgPool2d(1)
        self.head_drop = nn.Dropout(dropout)
        self.classifier = self._make_classifier(num_classes, output_bias)
        self.train()

    def _freeze_all_but_last_stages(self, unfreeze_stages: int) -> None:
        """Freeze the backbone except its last `unfreeze_stages` stages; `frozen_modules` names the rest."""
        self.stages = backbone_stages(self.backbone)
        if not 0 <= unfreeze_stages <= len(self.stages):
            raise ValueError(
                f"unfreeze_stages must be between 0 and {len(self.stages)} (the stages of {self.timm_name}), "
                f"got {unfreeze_stages}"
            )
        self.unfreeze_stages = unfreeze_stages
        trainable_stages = self.stages[len(self.stages) - unfreeze_stages :] if unfreeze_stages else []
        trainable_modules = {name for stage in trainable_stages for name in stage}
        self.backbone.requires_grad_(False)
        for name in trainable_modules:
            self.backbone.get_submodule(name).requires_grad_(True)
        # Everything else stays in eval mode (see train()); "" is the backbone itself.
        all_modules = {name for name, _ in self.backbone.named_modules()}
        self.frozen_modules = all_modules - trainable_modules

    def _make_classifier(self, num_classes: int, output_bias: Sequence[float] | None) -> nn.Module:
        # Keras Dense default initialiser: the report's new head sets none.
        return make_classifier(self.num_features, num_classes, output_bias, init="glorot_uniform")

    def train(self, mode: bool = True) -> TransferModel:
        super().train(mode)
        # Set the flag module by module (not recursively) so a frozen container does not switch its
        # trainable children to eval mode, nor a trainable one its frozen children to train mode.
        for name, module in self.backbone.named_modules():
            module.training = mode and name not in self.frozen_modules
        return self

    def get_classifier(self) -> nn.Module:
        return self.classifier

    def reset_classifier(self, num_classes: int, output_bias: Sequence[float] | None = None) -> None:
        check_num_classes(num_classes)
        self.num_classes = num_classes
        self.classifier = self._make_classifier(num_classes, output_bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's unpooled feature map (B, num_features, H', W')."""
        return self.backbone.forward_features(x)

    def pool_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features (B, num_features): what a feature cache stores for a frozen backbone."""
        return torch.flatten(self.global_pool(self.forward_features(x)), 1)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool (unless `x` is already pooled, (B, F)), dropout, classify."""
        if x.ndim == 4:
            x = torch.flatten(self.global_pool(x), 1)
        x = self.head_drop(x)
        return x if pre_logits else self.classifier(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# --- registered constructors ------------------------------------------------------------------------


def _register_report_model(name: str, description: str) -> None:
    """Register `name` as a constructor of the report's transfer model on its timm backbone and pooling.

    One explicit signature for all of them: `create_model` checks keyword arguments against it."""
    timm_name, global_pool = {**TRANSFER_BACKBONES, **OFFLINE_BACKBONES}[name]

    def constructor(
        num_classes: int = 5,
        image_size: int = 224,
        output_bias: Sequence[float] | None = None,
        dropout: float = 0.0,
        pretrained: Path | str | bool | None = None,
        unfreeze_stages: int = 0,
    ) -> TransferModel:
        return TransferModel(
            timm_name, num_classes=num_classes, image_size=image_size, output_bias=output_bias,
            dropout=dropout, pretrained=pretrained, unfreeze_stages=unfreeze_stages, global_pool=global_pool,
        )  # fmt: skip

    constructor.__name__ = constructor.__qualname__ = name
    constructor.__doc__ = f"{description} -> timm `{timm_name}`, global {global_pool} pooling."
    register_model(name)(constructor)


_register_report_model("efficientnet_b3", "Keras EfficientNetV2B3 (the report's best model)")
_register_report_model("resnet50v2", "Keras ResNet50V2")
_register_report_model("mobilenetv2", "Keras MobileNetV2")
_register_report_model("vgg19", "Keras VGG19, its conv stack only (no fc6/fc7)")
_register_report_model("lite0", "EfficientNet-Lite0, ImageNet weights with pretrained='package'")
