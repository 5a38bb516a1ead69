"""The report's custom CNNs: registry, shapes, gradients, exact Keras parameter counts, Keras init/BN."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from prado_dist.models import _registry, create_model, list_models, register_model
from prado_dist.models._layers import MaxPool2dSame, he_normal_, tf_same_padding

# Keras model.summary() of the author's notebook at 224x224 and 5 classes: (trainable, total), where
# total adds the BatchNorm moving mean/variance (PyTorch: running_mean/running_var buffers).
KERAS_PARAMETER_COUNTS = {
    "vgg": (6_625_101, 6_630_525),
    "resnet29": (4_088_837, 4_107_141),
    "mobilenet": (624_853, 642_709),
}
CUSTOM_MODELS = [name for name in list_models() if name not in list_models(family="transfer")]
# The report's models; "plain" (plain_cnn) is a BN-free test network with no Keras original.
REPORT_MODELS = [name for name in CUSTOM_MODELS if name not in list_models(family="plain")]


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    running = sum(
        buffer.numel() for name, buffer in model.named_buffers() if name.endswith(("running_mean", "running_var"))
    )
    return trainable, trainable + running


def test_every_custom_model_has_reference_counts() -> None:
    assert sorted(REPORT_MODELS) == sorted(KERAS_PARAMETER_COUNTS)


@pytest.mark.parametrize("name", REPORT_MODELS)
def test_parameter_counts_match_keras(name: str) -> None:
    model = create_model(name, num_classes=5, image_size=224)
    assert parameter_counts(model) == KERAS_PARAMETER_COUNTS[name]


@pytest.mark.parametrize("name", CUSTOM_MODELS)
def test_forward_backward(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name, num_classes=5, image_size=32)
    model.train()
    x = torch.randn(2, 3, 32, 32)
    logits = model(x)
    assert logits.shape == (2, 5)
    assert torch.isfinite(logits).all()
    nn.functional.cross_entropy(logits, torch.tensor([0, 3])).backward()
    for param_name, param in model.named_parameters():
        assert param.grad is not None, f"{param_name} got no gradient"
        assert torch.isfinite(param.grad).all(), f"{param_name} has a non-finite gradient"


@pytest.mark.parametrize("name", CUSTOM_MODELS)
@pytest.mark.parametrize("image_size", [32, 33, 48])
def test_small_and_odd_image_sizes(name: str, image_size: int) -> None:
    model = create_model(name, image_size=image_size).eval()
    with torch.no_grad():
        features = model.forward_features(torch.randn(1, 3, image_size, image_size))
        logits = model.forward_head(features)
        pre_logits = model.forward_head(features, pre_logits=True)
    assert logits.shape == (1, 5)
    assert pre_logits.shape == (1, model.num_features)


def test_vgg_flatten_size_follows_image_size() -> None:
    assert create_model("vgg", image_size=224).flat_features == 100_352  # Keras summary "Flatten"
    assert create_model("vgg", image_size=64).flat_features == 4 * 4 * 512
    with pytest.raises(ValueError, match="image_size=64"):
        create_model("vgg", image_size=64).eval()(torch.randn(1, 3, 32, 32))


def test_keras_same_padding_is_asymmetric() -> None:
    assert tf_same_padding(224, 3, 2) == (0, 1)  # TensorFlow puts the extra pixel bottom/right
    assert tf_same_padding(225, 3, 2) == (1, 1)
    assert tf_same_padding(224, 3, 1) == (1, 1)
    assert tf_same_padding(224, 1, 2) == (0, 0)
    pool = MaxPool2dSame(kernel_size=3, stride=2)
    x = -torch.arange(1.0, 17.0).reshape(1, 1, 4, 4)  # all negative: zero padding would win the max
    assert pool(x).shape == (1, 1, 2, 2)
    assert pool(x)[0, 0, 1, 1] == x[0, 0, 2:, 2:].max()


def test_stem_output_sizes_match_report_tables() -> None:
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert create_model("resnet29").stem(x).shape[-2:] == (56, 56)  # 7x7/2 -> 112, pool -> 56
        assert create_model("mobilenet").stem(x).shape[-2:] == (112, 112)  # "Conv3-32", stride 2


@pytest.mark.parametrize("name", REPORT_MODELS)
def test_keras_batch_norm_settings(name: str) -> None:
    model = create_model(name, image_size=32)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert norms
    assert all(m.momentum == 0.01 and m.eps == 1e-3 for m in norms)


@pytest.mark.parametrize("name", CUSTOM_MODELS)
def test_keras_initialisation(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name, image_size=32)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert all(torch.all(m.bias == 0) for m in convs)
    # He normal on the largest dense (non-depthwise) conv: resulting std sqrt(2 / fan_in), cut at 2 sigma.
    weight = max((m.weight for m in convs if m.groups == 1), key=lambda w: w.numel()).detach()
    expected_std = math.sqrt(2.0 / weight[0].numel())
    assert weight.std().item() == pytest.approx(expected_std, rel=0.05)
    assert weight.abs().max().item() <= 2 * expected_std / 0.8796 + 1e-6


def test_he_normal_matches_keras_distribution() -> None:
    torch.manual_seed(0)
    weight = he_normal_(torch.empty(256, 128, 3, 3))
    std = math.sqrt(2.0 / (128 * 9))
    assert weight.std().item() == pytest.approx(std, rel=0.01)
    assert weight.abs().max().item() <= 2 * std / 0.87962566103423978 + 1e-7


def test_architecture_details() -> None:
    vgg = create_model("vgg", image_size=32)
    prelus = [m for m in vgg.modules() if isinstance(m, nn.PReLU)]
    assert [m.num_parameters for m in prelus] == [16, 8]
    assert all(torch.all(m.weight == 0) for m in prelus)  # Keras PReLU alpha starts at 0
    assert sum(isinstance(m, nn.AvgPool2d) for m in vgg.modules()) == 4
    mobilenet = create_model("mobilenet", image_size=32)
    assert sum(isinstance(m, nn.ReLU6) for m in mobilenet.modules()) == 2 * 12
    assert mobilenet.blocks[1].expand[0].stride == (2, 2)  # stride on the expanding 1x1 conv
    assert mobilenet.blocks[1].depthwise[0].stride == (1, 1)
    resnet = create_model("resnet29", image_size=32)
    assert len(resnet.stages) == 9
    bound = math.sqrt(6.0 / (resnet.num_features + 5))  # Glorot-uniform output layer
    assert resnet.classifier.weight.abs().max().item() <= bound


@pytest.mark.parametrize("name", CUSTOM_MODELS)
def test_output_bias_and_classifier_reset(name: str) -> None:
    output_bias = [1.2, 0.3, -0.1, -0.2, -0.5]
    model = create_model(name, image_size=32, output_bias=output_bias).eval()
    assert model.pixel_mean_std is None  # per-image standardisation, applied by the engine
    assert torch.allclose(model.get_classifier().bias, torch.tensor(output_bias))
    nn.init.zeros_(model.get_classifier().weight)
    with torch.no_grad():
        assert torch.allclose(model(torch.randn(2, 3, 32, 32)), torch.tensor(output_bias).expand(2, 5))
    with pytest.raises(ValueError, match="output_bias has 2 values"):
        create_model(name, image_size=32, output_bias=[0.0, 1.0])

    model.reset_classifier(3)
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 3)
    model.reset_classifier(0)  # timm convention: no classifier, pre-logits features out
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, model.num_features)


@pytest.mark.parametrize("name", CUSTOM_MODELS)
def test_dropout_before_classifier(name: str) -> None:
    model = create_model(name, image_size=32, dropout=0.3)
    assert isinstance(model.head_drop, nn.Dropout) and model.head_drop.p == 0.3


def test_unknown_name_lists_known_models() -> None:
    with pytest.raises(ValueError, match="unknown model 'resnet30'") as error:
        create_model("resnet30")
    for name in list_models():
        assert repr(name) in str(error.value)
    assert "timm:" in str(error.value)


def test_unexpected_argument_names_accepted_ones() -> None:
    with pytest.raises(ValueError, match=r"does not take argument\(s\) \['pretrained'\]"):
        create_model("vgg", pretrained="weights.safetensors")


def test_duplicate_registration_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_registry, "_model_constructors", dict(_registry._model_constructors))
    monkeypatch.setattr(_registry, "_model_family", dict(_registry._model_family))
    with pytest.raises(ValueError, match="already registered"):
        register_model("vgg")(lambda num_classes=5: nn.Identity())

    @register_model("tiny_test_model")
    def tiny(num_classes: int = 5) -> nn.Module:
        return nn.Linear(4, num_classes)

    assert "tiny_test_model" in list_models()
    assert create_model("tiny_test_model", num_classes=2).out_features == 2
    with pytest.raises(ValueError, match="already registered"):
        register_model("tiny_test_model")(tiny)
    with pytest.raises(ValueError, match="reserved for timm"):
        register_model("timm:resnet18")(tiny)
