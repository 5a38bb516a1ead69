"""A self-contained classifier for inference: preprocessing and softmax inside the module."""

from __future__ import annotations

import torch
from torch import nn

from prado_dist.engine.loop import InputPipeline


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
