"""A generated stand-in for the Prado dataset, in the Kaggle layout, for tests and demos.

`python -m prado_dist.data demo --out DIR` writes `DIR/prado.csv` and `DIR/images/<uuid>.jpg`:
five generated "painters" with the report's class imbalance (1,080 : 446 : 326 : 290 : 222,
report-facts.md) scaled to the requested number of images. The real images need a
download (`python -m prado_dist.data fetch`); this set needs nothing and takes seconds.

The painters differ in *style*, which is what the report's CNNs are meant to pick up:
brush-stroke direction, length and width, the scale of the paint texture, the composition
(horizon line, where the dark or light masses sit) and, only weakly, the palette. Every image is
heavily randomised (background colours, stroke counts, jittered palettes, brightness and
contrast), so the mean colour of an image says little about its painter while a small CNN
learns the classes (tests/test_data_demo.py measures both). Stroke orientations are chosen to
be invariant under a horizontal flip (horizontal, vertical, diagonal in both senses, or
random), because the report's training flips images horizontally.

Everything is drawn from `numpy.random.Generator`s seeded from `seed`, so the same arguments give
byte-identical files.
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import sys
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from filelock import FileLock
from PIL import Image

from prado_dist.data.cache import default_cache_dir
from prado_dist.data.sources import CLASSES, PRADO_AUTHORS, PRADO_CSV

# Images per painter in the report (report-facts.md), in CLASSES order.
REPORT_CLASS_COUNTS: tuple[int, ...] = (1080, 446, 326, 290, 222)
DEMO_VERSION = "v1"  # bump when the generator's output changes, so old caches are not reused
DEMO_URL = "https://demo.invalid"
JPEG_QUALITY = 90


@dataclass(frozen=True)
class PainterStyle:
    """How one generated painter paints. Lengths and widths are fractions of the image side."""

    stroke_angle: float | None  # degrees, 0 = horizontal; None = every layer its own direction
    diagonal: bool  # angle is +-stroke_angle, sign drawn per layer: survives horizontal flips
    angle_jitter: float  # degrees, std per stroke layer
    stroke_length: float
    stroke_width: float
    strokes_per_layer: tuple[int, int]  # uniform range, at 128 px
    texture_sigma: float  # px at 128 px: blur of the paint-grain noise, i.e. its scale
    horizon: float | None  # fraction of the height; None = no landscape split
    mass_centre: tuple[float, float] | None  # (x, y) fractions; None = no mass
    hue: float  # centre of the painter's own hues; only half of the colours use it


STYLES: dict[str, PainterStyle] = {
    # Dark, loose portraits: short thick dabs in every direction, coarse grain, central mass.
    "goya": PainterStyle(None, False, 0.0, 0.10, 0.035, (25, 60), 3.0, None, (0.5, 0.45), 0.07),
    # Tapestry cartoons: long thin horizontal strokes, fine grain, a high horizon, figures low left.
    "bayeu": PainterStyle(0.0, False, 8.0, 0.32, 0.012, (12, 30), 0.8, 0.38, (0.3, 0.75), 0.55),
    # Landscapes: short diagonal dabs, very coarse grain, a low horizon.
    "haes": PainterStyle(45.0, True, 8.0, 0.09, 0.018, (40, 90), 5.0, 0.62, None, 0.30),
    # Vertical strokes of medium length, fine grain, a mass in the upper half.
    "pizarro": PainterStyle(90.0, False, 8.0, 0.22, 0.014, (15, 40), 0.8, None, (0.5, 0.3), 0.12),
    # Long diagonal sweeps, smooth grain, a mass low in the picture.
    "ribera": PainterStyle(45.0, True, 8.0, 0.36, 0.022, (8, 20), 2.0, None, (0.5, 0.65), 0.0),
}


def class_counts(images: int) -> list[int]:
    """The report's class imbalance scaled to `images` (largest remainders; sums to `images`)."""
    if images < len(CLASSES):
        raise ValueError(f"need at least {len(CLASSES)} images (one per painter), got {images}")
    total = sum(REPORT_CLASS_COUNTS)
    exact = [images * count / total for count in REPORT_CLASS_COUNTS]
    counts = [max(1, int(value)) for value in exact]
    by_remainder = sorted(range(len(exact)), key=lambda c: exact[c] - int(exact[c]), reverse=True)
    for c in by_remainder[: images - sum(counts)]:
        counts[c] += 1
    while sum(counts) > images:  # only when the max(1, .) floor overshot
        counts[counts.index(max(counts))] -= 1
    return counts


def _hsv_to_rgb(hue: np.ndarray, saturation: np.ndarray, value: np.ndarray) -> np.ndarray:
    """Vectorised HSV -> RGB in [0, 1]; inputs broadcast together, RGB on the last axis."""
    hue = np.mod(hue, 1.0)
    k = np.mod(np.array([5.0, 3.0, 1.0]) + hue[..., None] * 6.0, 6.0)
    return value[..., None] - value[..., None] * saturation[..., None] * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)


class _Canvas:
    """Frequency-domain helpers shared by all images of one size."""

    def __init__(self, size: int) -> None:
        self.size = size
        coords = np.arange(size, dtype=np.float64)
        # Offsets from the origin with wrap-around, for kernels used in circular convolution.
        wrapped = np.where(coords < size / 2, coords, coords - size)
        self.dx = wrapped[None, :]
        self.dy = wrapped[:, None]
        self.y = (coords[:, None] + 0.5) / size
        self.x = (coords[None, :] + 0.5) / size
        fy = np.fft.fftfreq(size)[:, None]
        fx = np.fft.rfftfreq(size)[None, :]
        self.frequency_squared = fx**2 + fy**2

    def convolve(self, image: np.ndarray, kernel: np.ndarray) -> np.ndarray:
        shape = (self.size, self.size)
        return np.fft.irfft2(np.fft.rfft2(image) * np.fft.rfft2(kernel), s=shape)

    def stroke_kernel(self, angle_degrees: float, length: float, width: float) -> np.ndarray:
        """One brush stroke centred on the origin: a soft-ended line of the given length/width."""
        theta = np.deg2rad(angle_degrees)
        along = self.dx * np.cos(theta) + self.dy * np.sin(theta)
        across = -self.dx * np.sin(theta) + self.dy * np.cos(theta)
        profile = np.exp(-0.5 * (across / width) ** 2)
        ends = 1.0 / (1.0 + np.exp((np.abs(along) - length / 2) / 0.8))
        return profile * ends

    def grain(self, rng: np.random.Generator, sigma: float) -> np.ndarray:
        """Gaussian-blurred white noise with unit std: paint texture at scale `sigma` px."""
        noise = rng.standard_normal((self.size, self.size))
        blur = np.exp(-2.0 * (np.pi * sigma) ** 2 * self.frequency_squared)
        field = np.fft.irfft2(np.fft.rfft2(noise) * blur, s=(self.size, self.size))
        return field / (field.std() + 1e-8)


def _random_colour(rng: np.random.Generator, hue_centre: float | None) -> np.ndarray:
    # Half of all colours ignore the painter's hue, and the rest scatter widely around it: the
    # hue distributions of the painters overlap, so colour alone is a weak cue.
    if hue_centre is None or rng.random() < 0.5:
        hue = rng.random()
    else:
        hue = hue_centre + rng.normal(0.0, 0.08)
    return _hsv_to_rgb(np.array(hue), np.array(rng.uniform(0.15, 0.8)), np.array(rng.uniform(0.15, 0.95)))


def _render_painting(style: PainterStyle, rng: np.random.Generator, canvas: _Canvas) -> np.ndarray:
    """One generated painting as a (size, size, 3) uint8 array."""
    # The steps draw from `rng` one after the other: their order fixes the pictures of a seed.
    image = _paint_background(style, rng, canvas)
    if style.mass_centre is not None:
        image = _paint_mass(image, style.mass_centre, rng, canvas)
    for _ in range(int(rng.integers(2, 5))):
        image = _paint_stroke_layer(image, style, rng, canvas)
    return _finish_surface(image, style, rng, canvas)


def _paint_background(style: PainterStyle, rng: np.random.Generator, canvas: _Canvas) -> np.ndarray:
    """Two random colours split at the horizon, or a random vertical gradient (float32 RGB)."""
    size = canvas.size
    top, bottom = _random_colour(rng, None), _random_colour(rng, None)
    if style.horizon is not None:
        horizon = style.horizon + rng.normal(0.0, 0.05)
        blend = 1.0 / (1.0 + np.exp(-(canvas.y - horizon) / 0.01))
    else:
        blend = canvas.y * rng.uniform(0.0, 1.0)
    image = top * (1.0 - blend[..., None]) + bottom * blend[..., None]
    # float32 from here on: the per-pixel compositing dominates the run time.
    return np.broadcast_to(image, (size, size, 3)).astype(np.float32)


def _paint_mass(
    image: np.ndarray, mass_centre: tuple[float, float], rng: np.random.Generator, canvas: _Canvas
) -> np.ndarray:
    """Composition: a soft dark or light mass where the painter puts the subject."""
    cx = mass_centre[0] + rng.normal(0.0, 0.06)
    cy = mass_centre[1] + rng.normal(0.0, 0.06)
    rx, ry = rng.uniform(0.12, 0.25), rng.uniform(0.15, 0.3)
    distance = ((canvas.x - cx) / rx) ** 2 + ((canvas.y - cy) / ry) ** 2
    alpha = (rng.uniform(0.5, 0.9) * np.exp(-(distance**2))).astype(np.float32)
    tone = rng.uniform(0.0, 0.2) if rng.random() < 0.7 else rng.uniform(0.75, 1.0)
    mass_colour = np.clip(tone + rng.normal(0.0, 0.08, 3), 0.0, 1.0).astype(np.float32)
    return image * (1.0 - alpha[..., None]) + mass_colour * alpha[..., None]


def _paint_stroke_layer(
    image: np.ndarray, style: PainterStyle, rng: np.random.Generator, canvas: _Canvas
) -> np.ndarray:
    """One layer of brush strokes of one colour and one direction, painted over `image`."""
    size = canvas.size
    scale = size / 128.0  # styles are tuned at 128 px
    if style.stroke_angle is None:
        angle = rng.uniform(0.0, 180.0)
    else:
        sign = rng.choice((-1.0, 1.0)) if style.diagonal else 1.0
        angle = sign * style.stroke_angle + rng.normal(0.0, style.angle_jitter)
    length = style.stroke_length * size * rng.uniform(0.7, 1.3)
    width = max(0.6, style.stroke_width * size * rng.uniform(0.8, 1.2))
    count = int(rng.integers(*style.strokes_per_layer) * scale**2 * rng.uniform(0.5, 1.0))
    impulses = np.zeros((size, size))
    rows, cols = rng.integers(0, size, count), rng.integers(0, size, count)
    np.add.at(impulses, (rows, cols), rng.uniform(0.6, 1.0, count))
    strokes = canvas.convolve(impulses, canvas.stroke_kernel(angle, length, width))
    coverage = np.clip(strokes, 0.0, 1.0).astype(np.float32)
    colour = _random_colour(rng, style.hue).astype(np.float32)
    return image * (1.0 - coverage[..., None]) + colour * coverage[..., None]


def _finish_surface(image: np.ndarray, style: PainterStyle, rng: np.random.Generator, canvas: _Canvas) -> np.ndarray:
    """Paint grain at the painter's texture scale, then random brightness and contrast; uint8."""
    scale = canvas.size / 128.0  # styles are tuned at 128 px
    grain = canvas.grain(rng, style.texture_sigma * scale)
    image = image * (1.0 + rng.uniform(0.06, 0.14) * grain[..., None].astype(np.float32))
    mean = image.mean()
    image = (image - mean) * rng.uniform(0.7, 1.3) + mean * rng.uniform(0.6, 1.4)
    return np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)


def make_demo_dataset(out_dir: Path, images: int = 600, seed: int = 0, size: int = 128) -> Path:
    """Write the generated dataset to `out_dir` (prado.csv + images/) and return `out_dir`."""
    if size < 16:
        raise ValueError(f"size must be at least 16 px, got {size}")
    out_dir = Path(out_dir)
    image_dir = out_dir / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    master = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(CLASSES)), class_counts(images))
    master.shuffle(labels)
    canvas = _Canvas(size)
    rows = []
    for index, label in enumerate(labels):
        painter = CLASSES[int(label)]
        # One generator per image, seeded by (seed, index): an image does not depend on how many
        # were drawn before it.
        rng = np.random.default_rng([seed, index])
        name = str(uuid.UUID(bytes=rng.bytes(16), version=4))
        pixels = _render_painting(STYLES[painter], rng, canvas)
        Image.fromarray(pixels).save(image_dir / f"{name}.jpg", "JPEG", quality=JPEG_QUALITY)
        rows.append(
            {
                "work_url": f"{DEMO_URL}/obra/{name}",
                "work_image_url": f"{DEMO_URL}/images/{name}.jpg",
                "author": PRADO_AUTHORS[painter],
                "work_title": f"Generated {painter} study {index}",
            }
        )
    with open(out_dir / PRADO_CSV, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return out_dir


def demo_data_dir(cache_root: Path | None = None) -> Path:
    """The default demo dataset, built on first use into the cache folder and reused after.

    Safe under concurrency (several Ray workers may ask at once): a file lock serialises the
    build, which goes to a temporary folder renamed into place, so the folder, once it exists,
    is complete.
    """
    images, seed = 600, 0
    root = Path(cache_root) if cache_root is not None else default_cache_dir()
    name = f"demo-{DEMO_VERSION}-{images}-{seed}"
    target = root / name
    if target.is_dir():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f"{name}.lock")):
        if target.is_dir():  # built by someone else while we waited for the lock
            return target
        for stale in root.glob(f"{name}.tmp-*"):  # a killed build's leftovers; we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        building = Path(tempfile.mkdtemp(prefix=f"{name}.tmp-", dir=root))
        try:
            make_demo_dataset(building, images=images, seed=seed)
            os.replace(building, target)
        except BaseException:
            shutil.rmtree(building, ignore_errors=True)
            raise
    message = (
        f"Built the generated demo dataset ({images} images) in {target}. For the real "
        "Prado images run `python -m prado_dist.data fetch --csv prado.csv --out DIR`."
    )
    print(message, file=sys.stderr)
    return target


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `demo` sub-command's flags."""
    parser.add_argument("--out", type=Path, required=True, help="folder to write prado.csv and images/ to")
    parser.add_argument("--images", type=int, default=600, help="number of images (default 600)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--size", type=int, default=128, help="image side in pixels (default 128)")


def announce_data(data: Path | None) -> Path | None:
    """`data` unchanged; without it, say that the built-in demo set is used and how to get real data.

    The demo set stays `None` in the config: every machine (every Ray node) builds it for itself.
    """
    if data is None:
        print(
            f"No --data given: using the generated demo paintings in {demo_data_dir()} (not real paintings).\n"
            "For the Prado images: python -m prado_dist.data fetch --csv prado.csv --out DIR, then --data DIR.",
            flush=True,
        )
    return data


def main(args: argparse.Namespace) -> int:
    """Run `demo`."""
    out = make_demo_dataset(args.out, images=args.images, seed=args.seed, size=args.size)
    counts = ", ".join(f"{c} {n}" for c, n in zip(CLASSES, class_counts(args.images), strict=True))
    print(f"wrote {args.images} generated images ({counts}) to {out}")
    return 0


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="python -m prado_dist.data.demo", description=__doc__)
    add_arguments(_parser)
    sys.exit(main(_parser.parse_args()))
