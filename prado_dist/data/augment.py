"""Batch augmentation and standardisation, as the report's Keras preprocessing layers do them.

All functions take float tensors (B, 3, H, W) with values in 0..255 on any device and work on
the whole batch at once (no Python loop over images), so they run on the training GPU after the
uint8 batch has been copied there. Order and constants: report-facts.md, "Preprocessing".

- Training: `augment_batch` = random horizontal flip (p 0.5) -> `per_image_standardize` ->
  `pca_colour_jitter` (std 0.1) applied to the standardised image, as in the report's model.
- Evaluation: `per_image_standardize` only.

A `generator` makes the random draws reproducible; it may live on the CPU while the batch is on
the GPU (draws are made on the generator's device and then moved).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch


def augment_batch(
    x: torch.Tensor, *, flip_prob: float, pca_std: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Training preprocessing: flip, then standardise, then PCA colour jitter (report order)."""
    x = random_horizontal_flip(x, flip_prob, generator=generator)
    x = per_image_standardize(x)
    return pca_colour_jitter(x, pca_std, generator=generator)


def random_horizontal_flip(x: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Mirror each image left-right with probability `p`, independently per image."""
    _check_batch(x)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"flip probability must be in [0, 1], got {p}")
    flip = _draw(torch.rand, (x.shape[0],), generator, x.device) < p
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def per_image_standardize(x: torch.Tensor) -> torch.Tensor:
    """`tf.image.per_image_standardization`: `(x - mean) / max(std, 1/sqrt(N))` per image, N = C*H*W.

    The lower bound on the divisor keeps uniform images finite (they map to zeros).
    """
    _check_batch(x)
    if not x.is_floating_point():
        x = x.float()
    count = x[0].numel()
    # One pass for both statistics; population variance (correction 0), as tf.
    variance, mean = torch.var_mean(x.flatten(1), dim=1, correction=0)
    divisor = variance.sqrt().clamp_min(1.0 / math.sqrt(count))
    return (x - mean[:, None, None, None]) / divisor[:, None, None, None]


def pca_colour_jitter(x: torch.Tensor, std: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """AlexNet-style PCA colour augmentation as koshian2's Keras layer does it (no clipping, scale 1).

    Per image: pixels scaled so that the per-channel variances sum to C, centred, 3x3 covariance
    (n - 1 denominator) decomposed into eigenvalues S and eigenvectors U; alpha ~ N(0, std) drawn
    per image and channel; `U @ (alpha * S)` added to every pixel of the unscaled input.
    """
    _check_batch(x)
    if std < 0:
        raise ValueError(f"PCA colour jitter std must be >= 0, got {std}")
    if std == 0:
        return x
    if not x.is_floating_point():
        x = x.float()
    batch, channels = x.shape[:2]
    pixels = x.reshape(batch, channels, -1)
    # float32 at least for the statistics (half precision would lose the covariance).
    pixels = pixels.to(torch.promote_types(pixels.dtype, torch.float32))
    count = pixels.shape[-1]
    centred = pixels - pixels.mean(dim=-1, keepdim=True)
    covariance = centred @ centred.transpose(1, 2) / max(count - 1, 1)
    variance_sum = centred.square().mean(dim=-1).sum(dim=-1)  # population variances, as np.var
    # Scaling the pixels by s scales their covariance by s**2 = C / variance_sum. A uniform image
    # (variance 0) would give 0/0 in the reference; it gets no jitter instead.
    scale_squared = torch.where(variance_sum > 0, channels / variance_sum, torch.zeros_like(variance_sum))
    # eigh in float64: 3x3 matrices cost nothing, and near-equal eigenvalues stay well separated.
    eigenvalues, eigenvectors = torch.linalg.eigh((covariance * scale_squared[:, None, None]).double())
    # Largest first, as the reference's SVD orders them, so alpha[:, 0] goes with the main component.
    eigenvalues, eigenvectors = eigenvalues.flip(-1), eigenvectors.flip(-1)
    alpha = _draw(torch.randn, (batch, channels), generator, x.device).double() * std
    delta = (eigenvectors @ (alpha * eigenvalues).unsqueeze(-1)).squeeze(-1)  # (B, C): one colour per image
    return x + delta.to(x.dtype)[:, :, None, None]


def _draw(
    sample: Callable[..., torch.Tensor],
    shape: tuple[int, ...],
    generator: torch.Generator | None,
    device: torch.device,
) -> torch.Tensor:
    source = generator.device if generator is not None else device
    return sample(shape, generator=generator, device=source).to(device)


def _check_batch(x: torch.Tensor) -> None:
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"expected a batch of RGB images shaped (B, 3, H, W), got {tuple(x.shape)}")
