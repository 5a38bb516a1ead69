"""Model layer: the report's three CNNs and timm transfer-learning backbones behind one registry."""

# Importing the model files registers their constructors with the registry.
from prado_dist.models import mobilenet, resnet29, transfer, vgg
from prado_dist.models._registry import create_model, is_model, list_models, register_model
from prado_dist.models.transfer import TransferModel

__all__ = [
    "TransferModel",
    "create_model",
    "is_model",
    "list_models",
    "mobilenet",
    "register_model",
    "resnet29",
    "transfer",
    "vgg",
]
