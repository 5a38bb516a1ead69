"""Model registry: names -> constructors, after timm `models/_registry.py` and `_factory.py`.

Each model family registers thin constructors with `@register_model`; `create_model` resolves a
registered name, or `timm:<name>` for any timm model (wrapped in the report's transfer-learning head).
"""

from __future__ import annotations

import difflib
import functools
import inspect
from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

TIMM_PREFIX = "timm:"

ModelConstructor = TypeVar("ModelConstructor", bound=Callable[..., nn.Module])

_model_constructors: dict[str, Callable[..., nn.Module]] = {}
_model_family: dict[str, str] = {}  # name -> family module ("vgg", "resnet29", "transfer", ...)


def register_model(name: str) -> Callable[[ModelConstructor], ModelConstructor]:
    """Decorator registering a model constructor under `name`; registering a name twice raises."""

    def decorator(constructor: ModelConstructor) -> ModelConstructor:
        if name.startswith(TIMM_PREFIX):
            raise ValueError(f"model names may not start with {TIMM_PREFIX!r} (reserved for timm): {name!r}")
        if name in _model_constructors:
            existing = _model_constructors[name]
            raise ValueError(f"model {name!r} is already registered by {existing.__module__}.{existing.__qualname__}")
        _model_constructors[name] = constructor
        _model_family[name] = constructor.__module__.rpartition(".")[2]
        return constructor

    return decorator


def list_models(family: str | None = None) -> list[str]:
    """Sorted registered names; `family` keeps one model file's names (e.g. "transfer", "vgg")."""
    return sorted(name for name in _model_constructors if family is None or _model_family[name] == family)


def is_model(name: str) -> bool:
    """Whether `create_model(name)` can resolve `name`: a registered name, or `timm:<name>` for a model
    timm has (`timm.is_model`, which also takes a pretrained tag such as `resnet50.a1_in1k`)."""
    if name in _model_constructors:
        return True
    if not name.startswith(TIMM_PREFIX) or len(name) == len(TIMM_PREFIX):
        return False
    import timm  # here, not at module top: only timm: names need it

    return timm.is_model(name[len(TIMM_PREFIX) :])


def unknown_model(name: str) -> str:
    """Why `name` is not a model, with what is accepted (for errors; `is_model(name)` is False)."""
    known = f"known models: {list_models()}, or '{TIMM_PREFIX}<name>' for a timm model"
    if not name.startswith(TIMM_PREFIX) or len(name) == len(TIMM_PREFIX):
        return f"unknown model {name!r}; {known}"
    import timm

    timm_name = name[len(TIMM_PREFIX) :]
    similar = difflib.get_close_matches(timm_name, timm.list_models(), n=5)
    hint = f"; similar: {similar}" if similar else ""
    return f"timm has no model {timm_name!r} (timm.list_models() names them{hint})"


def create_model(name: str, num_classes: int = 5, **kwargs: Any) -> nn.Module:
    """Build model `name` with `num_classes` outputs.

    `name` is a registered name (`list_models()`) or `timm:<timm model name>`, which builds that timm
    backbone with the transfer-learning head (`prado_dist.models.transfer.TransferModel`). Keyword
    arguments go to the constructor; one it does not take raises `ValueError` naming those it takes.
    As in timm, `pretrained=False` is accepted by every model, and `pretrained=True` by those with weights.
    """
    constructor: Callable[..., nn.Module]
    if name.startswith(TIMM_PREFIX) and len(name) > len(TIMM_PREFIX):
        # Imported here, not at module top: transfer.py itself imports this registry to register.
        from prado_dist.models.transfer import TransferModel

        constructor = functools.partial(TransferModel, name[len(TIMM_PREFIX) :])
    elif name in _model_constructors:
        constructor = _model_constructors[name]
    else:
        raise ValueError(
            f"unknown model {name!r}; known models: {list_models()}, or '{TIMM_PREFIX}<name>' for any "
            "timm model (timm.list_models())"
        )
    parameters = inspect.signature(constructor).parameters
    if "pretrained" not in parameters and kwargs.get("pretrained") is False:
        del kwargs["pretrained"]  # timm's way of saying "random weights", which a custom CNN always has
    unexpected = sorted(set(kwargs) - set(parameters))
    if unexpected:
        accepted = [p for p in parameters if p != "num_classes"]
        raise ValueError(f"model {name!r} does not take argument(s) {unexpected}; it takes {accepted}")
    return constructor(num_classes=num_classes, **kwargs)
