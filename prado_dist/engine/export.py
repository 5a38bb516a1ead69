"""A checkpoint's model after training: evaluated on one split, or as a self-contained classifier for
inference (preprocessing and softmax inside the module)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from prado_dist.data import PreparedData
from prado_dist.engine.checkpoint import checkpoint_config
from prado_dist.engine.loop import InputPipeline
from prado_dist.engine.session import TrainingRun


class PaintingClassifier(nn.Module):
    """Maps RGB images (float, 0..255, B x 3 x S x S, S = `image_size`) to painter probabilities.

    The model's own normalisation (per-image standardisation, or a backbone's mean/std) is part of
    the module, so a logged model needs nothing from prado_dist's training code to be used.
    """

    def __init__(self, model: nn.Module, pipeline: InputPipeline, classes: list[str], image_size: int) -> None:
        super().__init__()
        self.model = model.eval()
        self.pipeline = pipeline
        self.classes = list(classes)
        self.image_size = image_size

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(self.pipeline(images, train=False)).float().softmax(dim=1)


def classifier_from_checkpoint(state: dict[str, Any], data: PreparedData) -> PaintingClassifier:
    """The checkpoint's whole network on images, on the CPU (a transfer run may have trained only its
    head on cached features: the backbone comes from its pretrained weights, as in training)."""
    config = checkpoint_config(state).with_overrides({"device": "cpu"})
    run = TrainingRun(config, data)
    run.load_model_state(state["model"])
    return PaintingClassifier(run.network, run.image_pipeline, data.classes, config.image_size)


def evaluate_checkpoint(
    state: dict[str, Any], data: PreparedData, split: str = "test", device: str = "auto"
) -> tuple[dict[str, float], torch.Tensor]:
    """Metrics and confusion matrix of a checkpoint's model on one split (single process)."""
    config = checkpoint_config(state).with_overrides({"device": device})
    run = TrainingRun(config, data)
    run.load_model_state(state["model"])
    metrics, counts = run.evaluate(split)
    return metrics, counts.confusion
