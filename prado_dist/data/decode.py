"""Decoding one image file into the cache's pixels: an 8-bit RGB square of the cache's size.

Kept apart from the cache itself (cache.py), which decides what to decode and where it is stored;
`predict` decodes the images it classifies with the same function, so they match training's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

_WHITE = (255, 255, 255)
# The most pixels one image may be decoded to. Each of the decode threads holds one image at a time
# (a few bytes per pixel, more for alpha), so this bounds decoding memory (issue 21, item 11). A
# JPEG is decoded at the smallest 1/2, 1/4 or 1/8 scale still at least the cache size (Pillow's
# `draft`), so only other formats come near it: 64 MP is an 8000 x 8000 PNG or TIFF.
MAX_DECODE_PIXELS = 64 * 1024**2


class ImageRejected(Exception):
    """An image file that cannot be used; the message is the reason reported to the user."""


def decode_image(path: Path, image_size: int) -> np.ndarray:
    """Decode one file to a uint8 (image_size, image_size, 3) RGB array; `ImageRejected` if unusable.

    Resized bilinearly to a square, ignoring the aspect ratio, like the report's tf resize.
    Pillow's bilinear filter widens its support when shrinking (antialiased), unlike tf's default;
    for the Prado images this is the more faithful of the two, and the cache is decoded only once.
    """
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise ImageRejected("empty file (0 bytes)")
        with Image.open(path) as opened:
            width, height = opened.size
            if min(width, height) < 2:
                raise ImageRejected(f"degenerate image of {width}x{height} px; both sides must be >= 2 px")
            # JPEG only (a no-op elsewhere): decode at a reduced scale that still covers the cache size.
            opened.draft(None, (image_size, image_size))
            check_decode_size(path, opened.size)
            image = ImageOps.exif_transpose(opened)
            rgb = to_rgb(image, (image_size, image_size))
            return np.asarray(rgb.resize((image_size, image_size), Image.Resampling.BILINEAR), dtype=np.uint8)
    except ImageRejected:
        raise
    except Image.DecompressionBombError as err:
        limit = Image.MAX_IMAGE_PIXELS
        raise ImageRejected(f"larger than Pillow's MAX_IMAGE_PIXELS ({limit}): {err}") from err
    except UnidentifiedImageError as err:
        raise ImageRejected("not an image Pillow can read") from err
    except FileNotFoundError as err:
        raise ImageRejected("file not found") from err
    # Pillow's decoders signal corrupt or truncated input with many exception types
    # (OSError, SyntaxError, ValueError, EOFError, struct.error, ...); all mean "unusable file".
    except Exception as err:
        raise ImageRejected(f"corrupt or truncated image ({type(err).__name__}: {err})") from err


def check_decode_size(path: Path, size: tuple[int, int]) -> None:
    """`ImageRejected` naming the file when decoding it would take more than MAX_DECODE_PIXELS."""
    width, height = size
    if width * height > MAX_DECODE_PIXELS:
        raise ImageRejected(
            f"{path} would decode to {width}x{height} px ({width * height / 1e6:.1f} MP), over the limit of "
            f"{MAX_DECODE_PIXELS / 1e6:.1f} MP per image that bounds decoding memory; save it smaller or as JPEG"
        )


def to_rgb(image: Image.Image, size: tuple[int, int] | None = None) -> Image.Image:
    """An 8-bit RGB version of any Pillow image: alpha composited on white, 16/32-bit rescaled (and
    resized to `size` first, so that the rescaling works on the small image)."""
    if image.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N", "F"):
        return _high_depth_to_rgb(image, size)
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if has_alpha:
        # Paintings with transparent margins: plain convert("RGB") would expose whatever colour
        # the transparent pixels happen to hold (often black); a white page is what a viewer sees.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*_WHITE, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _high_depth_to_rgb(image: Image.Image, size: tuple[int, int] | None = None) -> Image.Image:
    # The peak of the whole image (Pillow computes it without a copy), then the rescaling on the
    # resized image: a float array of the full image took 8 bytes per pixel (issue 21, item 11).
    peak = float(image.getextrema()[1])
    if size is not None:
        image = image.resize(size, Image.Resampling.BILINEAR)
    values = np.asarray(image, dtype=np.float32)
    if image.mode == "F":
        # Float images are conventionally 0..1; anything larger is taken as already 0..255.
        full_scale = 1.0 if peak <= 1.0 else 255.0
    else:
        # Mode "I" also holds 8-bit data from some decoders; only rescale what needs it.
        full_scale = 255.0 if peak <= 255 else 65535.0 if peak <= 65535 else peak
    gray = np.clip(np.rint(values * (255.0 / full_scale)), 0, 255).astype(np.uint8)
    return Image.fromarray(gray).convert("RGB")
