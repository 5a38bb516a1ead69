"""Transfer-learning models: offline builds, frozen backbones, stage unfreezing, local weight files.

Backbones are built with random weights (nothing is downloaded); inputs are 64 px, batch 2.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
from torch import nn

from prado_dist.models import TransferModel, create_model, list_models
from prado_dist.models.transfer import OFFLINE_BACKBONES, TRANSFER_BACKBONES

REPORT_BACKBONES = list_models(family="transfer")
BACKBONES = {**TRANSFER_BACKBONES, **OFFLINE_BACKBONES}  # registered name -> (timm model, pooling)


@pytest.fixture(autouse=True)
def offline_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No network, and an empty Hugging Face cache, so a test can never pick up or fetch real weights."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def backbone_state(model: TransferModel) -> dict[str, torch.Tensor]:
    return {key: value.clone() for key, value in model.backbone.state_dict().items()}


def train_step(model: nn.Module, x: torch.Tensor) -> None:
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    nn.functional.cross_entropy(model(x), torch.tensor([0, 1])).backward()
    optimizer.step()


def test_report_backbones_are_registered() -> None:
    assert sorted(REPORT_BACKBONES) == sorted(BACKBONES)


@pytest.mark.parametrize("name", REPORT_BACKBONES)
def test_frozen_backbone_trains_only_the_head(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name, num_classes=5, output_bias=[0.5, 0.0, 0.0, 0.0, -0.5])
    timm_name, pool = BACKBONES[name]
    assert model.timm_name == timm_name
    assert isinstance(model.global_pool, nn.AdaptiveMaxPool2d if pool == "max" else nn.AdaptiveAvgPool2d)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["classifier.weight", "classifier.bias"]
    assert model.classifier.bias.tolist() == [0.5, 0.0, 0.0, 0.0, -0.5]
    mean, std = model.pixel_mean_std
    assert len(mean) == len(std) == 3 and all(0 < s <= 1 for s in std)
    assert {"input_size", "interpolation"} <= set(model.data_config)

    before_backbone, before_head = backbone_state(model), model.classifier.weight.detach().clone()
    x = torch.randn(2, 3, 64, 64)
    train_step(model, x)
    assert not model.backbone.training  # frozen: BatchNorm in inference mode even under model.train()
    after = model.backbone.state_dict()
    unchanged = [key for key in before_backbone if torch.equal(before_backbone[key], after[key])]
    assert unchanged == list(before_backbone)  # weights *and* BN running statistics
    assert not torch.equal(before_head, model.classifier.weight)

    model.eval()
    with torch.no_grad():
        logits = model(x)
        pooled = model.pool_features(x)
        assert logits.shape == (2, 5) and torch.isfinite(logits).all()
        assert pooled.shape == (2, model.num_features)
        # Cached pooled features go straight through the head.
        assert torch.allclose(model.forward_head(pooled), logits, atol=1e-5)
        assert torch.allclose(model.forward_head(model.forward_features(x), pre_logits=True), pooled)


def test_vgg19_has_no_fully_connected_layers() -> None:
    model = create_model("vgg19")
    assert not [name for name, _ in model.named_parameters() if "pre_logits" in name]
    assert model.num_features == 512
    assert sum(p.numel() for p in model.backbone.parameters()) == 20_024_384  # Keras VGG19 include_top=False


@pytest.mark.parametrize("name", REPORT_BACKBONES)
def test_unfreeze_last_stage(name: str) -> None:
    model = create_model(name, unfreeze_stages=1)
    trainable = [n for n, p in model.backbone.named_parameters() if p.requires_grad]
    frozen = [n for n, p in model.backbone.named_parameters() if not p.requires_grad]
    assert trainable and frozen
    names = [n for n, _ in model.backbone.named_parameters()]
    assert names[-len(trainable) :] == trainable  # the trainable part is the network's end
    model.train()
    for module_name, norm in model.backbone.named_modules():
        if not isinstance(norm, nn.modules.batchnorm._BatchNorm):
            continue
        assert norm.training == norm.weight.requires_grad, module_name
    with pytest.raises(ValueError, match="unfreeze_stages must be between 0 and"):
        create_model(name, unfreeze_stages=len(model.stages) + 1)


def test_unfrozen_stage_statistics_update_frozen_ones_do_not() -> None:
    torch.manual_seed(0)
    model = create_model("mobilenetv2", unfreeze_stages=1)
    before = backbone_state(model)
    train_step(model, torch.randn(2, 3, 64, 64))
    after = model.backbone.state_dict()
    for key, value in before.items():
        if key.endswith("running_mean"):
            module = model.backbone.get_submodule(key.rpartition(".")[0])
            assert torch.equal(value, after[key]) != module.weight.requires_grad, key


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_weight_file_round_trip(tmp_path: Path, suffix: str) -> None:
    torch.manual_seed(1)
    # Weights saved from a full ImageNet timm model, classifier included, as the export command does.
    source = timm.create_model("mobilenetv2_100", pretrained=False)
    path = tmp_path / f"mobilenetv2_100{suffix}"
    if suffix == ".safetensors":
        safetensors.torch.save_file(source.state_dict(), str(path))
    else:
        torch.save(source.state_dict(), path)
    model = create_model("mobilenetv2", pretrained=path)
    expected = source.state_dict()
    for key, value in model.backbone.state_dict().items():
        assert torch.equal(value, expected[key]), key


def test_mismatched_weight_file_lists_keys(tmp_path: Path) -> None:
    path = tmp_path / "resnet18.safetensors"
    safetensors.torch.save_file(timm.create_model("resnet18").state_dict(), str(path))
    with pytest.raises(ValueError, match=r"do not match timm model 'mobilenetv2_100': missing \(\d+\)"):
        create_model("mobilenetv2", pretrained=path)


def test_missing_weight_file_explains_how_to_get_it(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as error:
        create_model("efficientnet_b3", pretrained=tmp_path / "absent.safetensors")
    message = str(error.value)
    assert "tf_efficientnetv2_b3" in message and "absent.safetensors" in message
    assert "timm.create_model('tf_efficientnetv2_b3', pretrained=True)" in message


def test_hf_cache_is_offline_and_explains_missing_weights() -> None:
    with pytest.raises(FileNotFoundError, match="no cached pretrained weights") as error:
        create_model("mobilenetv2", pretrained="hf-cache")
    assert "'mobilenetv2_100'" in str(error.value)


def test_hf_cache_loads_cached_weights(offline_hub: Path) -> None:
    torch.manual_seed(2)
    source = timm.create_model("mobilenetv2_100", pretrained=False)
    # The Hugging Face cache layout: models--<org>--<repo>/refs/main -> snapshots/<commit>/<file>.
    repo = offline_hub / "models--timm--mobilenetv2_100.ra_in1k"
    commit = "0" * 40
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    safetensors.torch.save_file(source.state_dict(), str(repo / "snapshots" / commit / "model.safetensors"))
    model = create_model("mobilenetv2", pretrained="hf-cache")
    assert torch.equal(model.backbone.conv_stem.weight, source.conv_stem.weight)


def test_any_timm_model_through_prefix() -> None:
    model = create_model("timm:resnet18", num_classes=3, dropout=0.2)
    assert isinstance(model, TransferModel) and model.timm_name == "resnet18"
    assert model.head_drop.p == 0.2
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 3)
    model.reset_classifier(0)
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 512)
    with pytest.raises(ValueError, match="unknown timm model 'not_a_model'"):
        create_model("timm:not_a_model")
    with pytest.raises(ValueError, match=r"does not take argument\(s\) \['colour'\]"):
        create_model("timm:resnet18", colour=True)


def test_pretrained_takes_timms_booleans(offline_hub: Path) -> None:
    # As a timm user writes it: False for random weights, on every model, the custom CNNs included.
    for name in ("mobilenetv2", "resnet29", "timm:resnet18"):
        assert isinstance(create_model(name, pretrained=False), torch.nn.Module)
    # True: timm's own weights, which come from the Hugging Face cache here (nothing is downloaded).
    with pytest.raises(FileNotFoundError, match="no cached pretrained weights"):
        create_model("mobilenetv2", pretrained=True)
    torch.manual_seed(3)
    source = timm.create_model("mobilenetv2_100", pretrained=False)
    snapshot = offline_hub / "models--timm--mobilenetv2_100.ra_in1k" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    safetensors.torch.save_file(source.state_dict(), str(snapshot / "model.safetensors"))
    assert torch.equal(create_model("mobilenetv2", pretrained=True).backbone.conv_stem.weight, source.conv_stem.weight)
    with pytest.raises(ValueError, match="does not take argument"):
        create_model("resnet29", pretrained=True)  # a custom CNN has no pretrained weights
