"""Model layer: the report's three CNNs, timm transfer backbones and a BN-free test CNN in one registry."""

# Importing the model files registers their constructors with the registry.
from prado_dist.models import mobilenet, plain, resnet29, transfer, vgg
from prado_dist.models._registry import create_model, is_model, list_models, register_model, unknown_model
from prado_dist.models.transfer import TransferModel

__all__ = [
    "TransferModel",
    "create_model",
    "is_model",
    "list_models",
    "mobilenet",
    "plain",
    "register_model",
    "unknown_model",
    "resnet29",
    "transfer",
    "vgg",
]
