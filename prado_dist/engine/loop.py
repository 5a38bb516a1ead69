"""One epoch of training and one pass of evaluation, with explicit arguments.

The loops are written for a plain process and stay correct under data parallelism: every
per-sample quantity is summed (see metrics.py) and reduced across ranks when a process group is
initialised. Nothing here imports Ray.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader

from prado_dist.data import pca_colour_jitter, per_image_standardize, random_horizontal_flip
from prado_dist.engine.metrics import Counts, metrics_from_counts


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite: the run is stopped instead of producing garbage."""


@dataclass(frozen=True)
class InputPipeline:
    """How uint8 batches become model input: augmentation (training only) and normalisation.

    `pixel_mean_std` None means the report's per-image standardisation (custom CNNs); a pair of
    RGB tuples (0..1 scale) is a pretrained backbone's own normalisation (timm's data config).
    """

    flip_prob: float = 0.5
    pca_std: float = 0.1
    pixel_mean_std: tuple[tuple[float, ...], tuple[float, ...]] | None = None

    def __call__(self, images: torch.Tensor, *, train: bool, generator: torch.Generator | None = None) -> torch.Tensor:
        x = images.float()
        if train:
            x = random_horizontal_flip(x, self.flip_prob, generator=generator)
        x = self._normalise(x)
        if train and self.pca_std > 0:
            x = pca_colour_jitter(x, self.pca_std, generator=generator)
        return x

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        if self.pixel_mean_std is None:
            return per_image_standardize(x)
        mean, std = (torch.tensor(v, device=x.device).view(1, -1, 1, 1) * 255.0 for v in self.pixel_mean_std)
        return (x - mean) / std


def weighted_cross_entropy(
    weights: torch.Tensor | None, label_smoothing: float = 0.0
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Per-sample losses (reduction 'none'), scaled by the class weight of each sample's label.

    Keras applies `class_weight` as a sample weight and divides by the batch size, not by the sum
    of the weights; summing these per-sample losses and dividing by the batch size reproduces it,
    and keeps data-parallel gradients equal to the single-process gradient of the global batch.
    """
    criterion = nn.CrossEntropyLoss(reduction="none", label_smoothing=label_smoothing)

    def loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        per_sample = criterion(logits.float(), labels)
        return per_sample * weights[labels] if weights is not None else per_sample

    return loss


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    pipeline: InputPipeline,
    *,
    device: torch.device,
    epoch: int,
    classes: list[str],
    generator: torch.Generator | None = None,
    autocast_dtype: torch.dtype | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> dict[str, float]:
    """Train for one pass over `loader`; returns train loss/accuracy and throughput, summed over ranks."""
    model.train()
    counts = Counts.zeros(len(classes))
    started = time.perf_counter()
    for step, (images, labels) in enumerate(loader):
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        inputs = pipeline(images, train=True, generator=generator)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits = model(inputs)
        per_sample = loss_fn(logits, labels)
        loss = per_sample.mean()
        loss_value = loss.item()
        _check_finite(loss_value, epoch, step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        counts.add(logits.detach(), labels, float(per_sample.detach().sum()))
        if on_step is not None:
            on_step(step, loss_value)
    return _training_metrics(counts.all_reduced(), classes, time.perf_counter() - started)


def _check_finite(loss_value: float, epoch: int, step: int) -> None:
    """Stop at the first step whose loss is NaN or infinite: every step after it would be wasted."""
    if not math.isfinite(loss_value):
        raise NonFiniteLossError(
            f"training loss became {loss_value} at epoch {epoch}, step {step}; lower the learning "
            "rate (--lr) or check the input data"
        )


def _training_metrics(counts: Counts, classes: list[str], seconds: float) -> dict[str, float]:
    """The epoch's train loss/accuracy from the counts of all ranks, and its throughput."""
    metrics = metrics_from_counts(counts, classes, prefix="train_")
    keep = ("train_loss", "train_accuracy", "train_balanced_accuracy")
    metrics = {key: metrics[key] for key in keep}
    metrics.update(epoch_seconds=seconds, images_per_second=counts.samples / max(seconds, 1e-9))
    return metrics


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    pipeline: InputPipeline,
    *,
    device: torch.device,
    classes: list[str],
    prefix: str = "val_",
    autocast_dtype: torch.dtype | None = None,
) -> tuple[dict[str, float], Counts]:
    """Metrics over the whole split (each rank evaluates its own shard; counts are summed)."""
    model.eval()
    counts = Counts.zeros(len(classes))
    for images, labels in loader:
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits = model(pipeline(images, train=False))
        counts.add(logits, labels, float(loss_fn(logits, labels).sum()))
    counts = counts.all_reduced()
    return metrics_from_counts(counts, classes, prefix=prefix), counts
