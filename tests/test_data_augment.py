"""Batch augmentation against the report's formulas, and the class-imbalance remedies."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from prado_dist.data.augment import (
    augment_batch,
    pca_colour_jitter,
    per_image_standardize,
    random_horizontal_flip,
)
from prado_dist.data.imbalance import class_weights, output_bias

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")),
]


def paintings(batch: int = 4, size: int = 12, seed: int = 0) -> torch.Tensor:
    """Images in 0..255 whose channels are correlated (like paintings) but not degenerate."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.rand(batch, 1, size, size, generator=generator) * 200
    colour = torch.rand(batch, 3, size, size, generator=generator) * 55
    return base + colour


def seeded(seed: int = 1) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_per_image_standardize_matches_tf_formula() -> None:
    x = paintings()
    x[2] = 77.0  # a uniform image: std 0, so the divisor is 1/sqrt(N) and the result is 0
    expected = []
    for image in x.double().numpy():
        adjusted_std = max(image.std(), 1.0 / np.sqrt(image.size))
        expected.append((image - image.mean()) / adjusted_std)
    result = per_image_standardize(x)
    assert result.dtype == torch.float32
    np.testing.assert_allclose(result.numpy(), np.stack(expected), atol=1e-5)
    assert torch.all(result[2] == 0)
    as_bytes = x.round().to(torch.uint8)  # integer input is accepted and treated as float
    np.testing.assert_allclose(
        per_image_standardize(as_bytes).numpy(), per_image_standardize(x.round()).numpy(), atol=1e-6
    )


def test_per_image_standardize_exports_with_any_batch_size() -> None:
    # The logged MLflow model is a torch.export program: a Python int taken from the batch size
    # (`len(x)`) would fix the batch dimension to the example's, and other batch sizes would fail.
    class Standardize(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return per_image_standardize(x)

    program = torch.export.export(Standardize(), (paintings()[:2],), dynamic_shapes=[{0: torch.export.Dim("batch")}])
    for batch in (1, 5):
        x = paintings(batch=batch)
        torch.testing.assert_close(program.module()(x), per_image_standardize(x))


def test_random_horizontal_flip() -> None:
    x = paintings(batch=64)
    assert torch.equal(random_horizontal_flip(x, 0.0), x)
    assert torch.equal(random_horizontal_flip(x, 1.0), x.flip(-1))
    flipped = random_horizontal_flip(x, 0.5, generator=seeded())
    assert torch.equal(flipped, random_horizontal_flip(x, 0.5, generator=seeded()))
    was_flipped = [torch.equal(out, image.flip(-1)) for out, image in zip(flipped, x, strict=True)]
    assert all(flip or torch.equal(out, image) for flip, out, image in zip(was_flipped, flipped, x, strict=True))
    assert 16 < sum(was_flipped) < 48
    with pytest.raises(ValueError, match=r"flip probability must be in \[0, 1\]"):
        random_horizontal_flip(x, 1.5)


def koshian2_eigen(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues and eigenvectors exactly as koshian2's numpy reference computes them."""
    pixels = image.reshape(3, -1).T.astype(np.float64)
    pixels = pixels * np.sqrt(3.0 / np.sum(np.var(pixels, axis=0)))
    pixels = pixels - pixels.mean(axis=0)
    covariance = pixels.T @ pixels / (len(pixels) - 1)
    vectors, values, _ = np.linalg.svd(covariance)
    return values, vectors


@pytest.mark.parametrize("device", DEVICES)
def test_pca_colour_jitter_is_the_koshian2_formula(device: str) -> None:
    # float64, so that `result - x` recovers the small components' deltas (~1e-3) exactly.
    x = paintings().double().to(device)
    assert pca_colour_jitter(x, 0.0) is x
    std = 0.1
    delta = (pca_colour_jitter(x, std, generator=seeded(3)) - x).double().cpu()
    alpha = torch.randn(len(x), 3, generator=seeded(3)).double() * std  # the layer's own draw
    for image, image_delta, image_alpha in zip(x.cpu().numpy(), delta.numpy(), alpha.numpy(), strict=True):
        colour = image_delta[:, 0, 0]
        np.testing.assert_allclose(image_delta, np.broadcast_to(colour[:, None, None], image_delta.shape), atol=1e-9)
        values, vectors = koshian2_eigen(image)
        # delta = U @ (alpha * S): its coordinate along eigenvector i is alpha_i * S_i (up to the
        # eigenvector's sign, which no decomposition fixes).
        np.testing.assert_allclose(np.abs(vectors.T @ colour), np.abs(image_alpha * values), rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(values.sum(), 3.0 * image[0].size / (image[0].size - 1))


def test_pca_colour_jitter_scales_linearly_with_std() -> None:
    x = paintings()
    small = pca_colour_jitter(x, 0.1, generator=seeded(5)) - x
    large = pca_colour_jitter(x, 0.3, generator=seeded(5)) - x
    np.testing.assert_allclose(large.numpy(), 3.0 * small.numpy(), rtol=1e-3, atol=1e-4)
    assert small.abs().max() > 0


def test_pca_colour_jitter_edge_cases() -> None:
    uniform = torch.full((2, 3, 5, 5), 100.0)
    assert torch.equal(pca_colour_jitter(uniform, 0.1, generator=seeded()), uniform)  # no NaN
    half = paintings().half()
    assert pca_colour_jitter(half, 0.1).dtype == torch.float16
    with pytest.raises(ValueError, match="std must be >= 0"):
        pca_colour_jitter(paintings(), -0.1)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        pca_colour_jitter(torch.zeros(3, 8, 8), 0.1)


@pytest.mark.parametrize("device", DEVICES)
def test_augment_batch_is_flip_then_standardize_then_pca(device: str) -> None:
    x = paintings(batch=8).to(device)
    result = augment_batch(x, flip_prob=0.5, pca_std=0.1, generator=seeded(9))
    generator = seeded(9)
    expected = pca_colour_jitter(
        per_image_standardize(random_horizontal_flip(x, 0.5, generator=generator)), 0.1, generator=generator
    )
    assert result.device == x.device
    torch.testing.assert_close(result, expected)
    # Evaluation is standardisation alone, which is augment_batch with both augmentations off.
    torch.testing.assert_close(augment_batch(x, flip_prob=0.0, pca_std=0.0), per_image_standardize(x))


# --- class imbalance --------------------------------------------------------------------------

REPORT_COUNTS = (1080, 446, 326, 290, 222)


def test_class_weights_match_the_report() -> None:
    weights = class_weights(REPORT_COUNTS)
    np.testing.assert_allclose(weights, [0.438, 1.060, 1.450, 1.630, 2.130], atol=1e-3)
    # Balanced: every class contributes the same total weight n / |C|.
    np.testing.assert_allclose(weights * np.array(REPORT_COUNTS), sum(REPORT_COUNTS) / 5)


def test_output_bias_gives_the_class_frequencies() -> None:
    bias = output_bias(REPORT_COUNTS)
    frequencies = np.array(REPORT_COUNTS) / sum(REPORT_COUNTS)
    np.testing.assert_allclose(torch.softmax(torch.from_numpy(bias), 0).numpy(), frequencies)
    assert abs(bias.mean()) < 1e-12


@pytest.mark.parametrize("counts", [(), (3, 0), [[1, 2]]])
def test_imbalance_rejects_bad_counts(counts) -> None:
    with pytest.raises(ValueError, match="positive numbers"):
        class_weights(counts)
    with pytest.raises(ValueError, match="positive numbers"):
        output_bias(counts)
