"""Turning what a user hands us (path, PIL image, array) into an RGB uint8 array, or one clear error."""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, ImageStat, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 100_000_000  # a 100-megapixel photo passes; decompression bombs do not


class ImageError(ValueError):
    """An image that cannot be used: unreadable, empty, too large, or of the wrong dtype or shape."""


def _composite(image: Image.Image) -> Image.Image:
    """Paste a transparent image onto black if it is bright (grayscale mean > 127), else onto white."""
    rgba = image.convert("RGBA")
    bright = ImageStat.Stat(rgba.convert("L")).mean[0] > 127
    out = Image.new("RGB", rgba.size, (0, 0, 0) if bright else (255, 255, 255))
    out.paste(rgba, (0, 0), rgba)
    return out


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (image.mode == "P" and "transparency" in image.info)


def _to_8_bits(image: Image.Image) -> Image.Image:
    """A 16-bit, 32-bit integer or float grayscale image scaled to 8 bits by its full range: 0..65535
    for 16-bit modes (and 32-bit ones whose values fit them), else the image's own min..max."""
    a = np.asarray(image, dtype=np.float64)
    if image.mode.startswith("I;16") or (image.mode == "I" and a.min() >= 0 and a.max() <= 65535):
        lo, hi = 0.0, 65535.0
    else:
        finite = a[np.isfinite(a)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    scaled = np.nan_to_num((a - lo) / (hi - lo) if hi > lo else np.zeros_like(a), nan=0.0)
    return Image.fromarray(np.round(np.clip(scaled, 0, 1) * 255).astype(np.uint8), "L")


def _from_pil(image: Image.Image, where: str, max_pixels: int) -> np.ndarray:
    try:
        w, h = image.size
        if w == 0 or h == 0:
            raise ImageError(f"{where}: image has zero size ({w}x{h})")
        if w * h > max_pixels:
            raise ImageError(f"{where}: {w}x{h} is over the pixel limit of {max_pixels:,} (raise max_pixels to allow it)")
        image = ImageOps.exif_transpose(image)  # the same photo the same way up, however it is passed
        if image.mode.startswith("I") or image.mode == "F":
            image = _to_8_bits(image)
        image = _composite(image) if _has_alpha(image) else image.convert("RGB")
        return np.asarray(image, dtype=np.uint8)
    except ValueError as e:  # e.g. an image closed by the caller
        if isinstance(e, ImageError):
            raise
        raise ImageError(f"{where}: unusable image ({e})") from None


def _open(path: Path, max_pixels: int) -> np.ndarray:
    if not path.is_file():
        raise ImageError(f"{path}: no such image file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None  # our own limit applies below
            try:
                with Image.open(path) as img:
                    w, h = img.size
                    if w * h > max_pixels:
                        raise ImageError(f"{path}: {w}x{h} is over the pixel limit of {max_pixels:,}")
                    img.load()
                    return _from_pil(img, str(path), max_pixels)
            finally:
                Image.MAX_IMAGE_PIXELS = saved
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not an image file (format not recognised)") from None
    except (OSError, SyntaxError, ValueError) as e:
        if isinstance(e, ImageError):
            raise
        raise ImageError(f"{path}: corrupt or truncated image ({e})") from None


def _from_array(a: np.ndarray, max_pixels: int) -> np.ndarray:
    if a.dtype != np.uint8:
        raise ImageError(f"image array must be uint8, got {a.dtype}")
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3 or a.shape[2] not in (1, 3, 4):
        raise ImageError(f"image array must be [H, W], [H, W, 3] or [H, W, 4], got shape {list(a.shape)}")
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise ImageError(f"image array has zero size ({a.shape[1]}x{a.shape[0]})")
    if a.shape[2] == 3:
        if a.shape[0] * a.shape[1] > max_pixels:
            raise ImageError(f"image array {a.shape[1]}x{a.shape[0]} is over the pixel limit of {max_pixels:,}")
        return np.ascontiguousarray(a)
    mode = {1: "L", 4: "RGBA"}[a.shape[2]]
    return _from_pil(Image.fromarray(a[:, :, 0] if mode == "L" else a, mode), "image array", max_pixels)


def load_image(image, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """A path, PIL image or uint8 array -> RGB uint8 array [H, W, 3].

    EXIF orientation is applied (files and PIL images alike; arrays carry none); 16-bit, 32-bit and
    float images are scaled to 8 bits by their full range; transparent images are composited (see
    SPEC.md); other modes are converted to RGB.
    """
    if isinstance(image, str) and "://" in image:
        raise ImageError(f"{image}: URLs are not fetched; download the image and pass its path")
    if isinstance(image, (str, os.PathLike)):
        return _open(Path(image), max_pixels)
    if isinstance(image, Image.Image):
        return _from_pil(image, "image", max_pixels)
    if isinstance(image, np.ndarray):
        return _from_array(image, max_pixels)
    raise ImageError(f"unsupported image type {type(image).__name__}: pass a path, PIL image or uint8 array")
