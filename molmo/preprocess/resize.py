"""Antialiased bilinear resizing of uint8 RGB images: torch's
`F.interpolate(x, size, mode="bilinear", align_corners=False, antialias=True)` on float32 in [0, 1]
(the reference's resize), within float32 rounding.

Shrinking by SHRINK or more (a photo to the crops' or the global view's size), each axis is a matrix
product with a band of weights instead: an output row mixes the input rows under its triangle filter,
whose width grows with the shrink, and torch's kernel slows with it while a product does not. The
product runs a block of outputs at a time over just the inputs the block reads, so the uint8 image is
converted to float in small pieces, never whole. Milder shrinks and enlargements keep torch's kernel.
Large buffers are reused across calls (fresh large allocations cost more in page faults than the
arithmetic done in them).
"""
from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F

from ..layers import scratch

# From this shrink on the banded products beat torch's kernel, on 2 cores: with AVX-512 from any shrink
# (1920x1080 tiled, a 1.4-1.9x shrink: 24 -> 20 ms for the whole `tile_image`), with AVX2 from 2.5x
# (2.5x faster at a 3x shrink, 2x at 6x; milder shrinks were slower there).
SHRINK = 1.0 if torch.backends.cpu.get_cpu_capability().startswith("AVX512") else 2.5
ROWS, COLUMNS = 8, 16  # outputs per product along each axis: more read more zero weights, fewer make small products


@functools.lru_cache(maxsize=16)  # photos of one size share them (a dataset's camera): ~0.5 ms a view
def aa_weights(n_in: int, n_out: int, block: int, divide: float = 1.0) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """One axis's weights, `block` outputs at a time: [n_blocks, block, K] float32 (row i of block b
    weighs inputs start_b + k) and each block's input range (start_b, end_b). As torch's CPU kernel
    computes them in float32, step by step (scale, support, centre, first tap, tap count), each row
    normalised to sum 1, over `divide`. Cached: read them, never write to them."""
    f32 = np.float32
    scale = f32(n_in) / f32(n_out)
    support = scale if scale >= 1 else f32(1)  # the triangle's half-width, widened when shrinking
    inv = f32(1 / float(scale)) if scale >= 1 else f32(1)
    centre = (float(scale) * (np.arange(n_out) + 0.5)).astype(f32)
    first = np.maximum(((centre - support).astype(np.float64) + 0.5).astype(np.int64), 0)
    end = np.minimum(((centre + support).astype(np.float64) + 0.5).astype(np.int64), n_in)
    end = np.minimum(end, first + int(np.ceil(support)) * 2 + 1)

    n_blocks = -(-n_out // block)
    rows = np.minimum(np.arange(n_blocks * block), n_out - 1).reshape(n_blocks, block)  # last block repeats
    starts, ends = first[rows[:, 0]], end[rows[:, -1]]
    j = starts[:, None, None] + np.arange(int((ends - starts).max()))  # [n_blocks, 1, K] input rows
    x = ((j - centre[rows][..., None]).astype(f32).astype(np.float64) + 0.5) * float(inv)
    w = np.maximum(f32(1) - np.abs(x.astype(f32)), f32(0))
    w = np.where((j >= first[rows][..., None]) & (j < end[rows][..., None]), w, f32(0))
    w = w / w.sum(-1, keepdims=True, dtype=f32) / f32(divide)
    return torch.from_numpy(w.astype(f32)), [(int(a), int(b)) for a, b in zip(starts, ends)]


def _banded_rows(src: torch.Tensor, weights: torch.Tensor, ranges: list[tuple[int, int]], out: torch.Tensor):
    """Rows: out [n_out, C] = W @ src [n_in, C] for a banded W (`aa_weights`); a uint8 src is converted
    to float32 a block of rows at a time, a float32 one read as it is."""
    block = weights.shape[1]
    if src.dtype != torch.float32:
        rows = scratch("band_rows", (max(b - a for a, b in ranges), src.shape[1]))
    for i, (a, b) in enumerate(ranges):
        o0, o1 = i * block, min((i + 1) * block, len(out))
        part = src[a:b] if src.dtype == torch.float32 else rows[:b - a].copy_(src[a:b])
        torch.mm(weights[i, :o1 - o0, :b - a], part, out=out[o0:o1])
    return out


@functools.lru_cache(maxsize=16)
def pixel_weights(n_in: int, n_out: int, c: int) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """`aa_weights` for pixels of c channels, COLUMNS outputs at a time: W kron I_c per block,
    [n_blocks, K*c, COLUMNS*c], and the blocks' input pixel ranges. Cached like them."""
    weights, ranges = aa_weights(n_in, n_out, COLUMNS)
    return torch.einsum("nbk,ij->nkibj", weights, torch.eye(c)).flatten(3).flatten(1, 2), ranges


def _banded_columns(src: torch.Tensor, per_pixel: torch.Tensor, ranges: list[tuple[int, int]], out: torch.Tensor,
                    c: int):
    """Columns of pixels of c channels: out [H, n_out * c] = src [H, n_in * c] @ per_pixel blocks
    (`pixel_weights`), a block of output pixels at a time from the input pixels it reads; out may be a
    view with longer rows."""
    block = per_pixel.shape[2] // c
    n_out = out.shape[1] // c
    for i, (a, b) in enumerate(ranges):
        o0, o1 = i * block, min((i + 1) * block, n_out)
        torch.mm(src[:, c * a:c * b], per_pixel[i, :c * (b - a), :c * (o1 - o0)], out=out[:, c * o0:c * o1])
    return out


def banded(h: int, w: int, height: int, width: int) -> bool:
    """Whether `resize_aa` takes the banded products for this resize (else torch's kernel, on float)."""
    # One column out of several rows: torch's kernel gives every row the first row's value, as in the reference.
    return min(h / height, w / width) >= SHRINK and not (width == 1 and height != h)


def resize_aa(image: torch.Tensor, height: int, width: int, divide: float = 1.0, out: torch.Tensor | None = None,
              name: str = "") -> torch.Tensor:
    """uint8 (or float32) [h, w, C] -> float32 [height, width * C] over `divide` (255: values in [0, 1]),
    written into `out` when given (a [height, width * C] view whose rows may be longer); intermediates
    in scratch buffers named after `name`."""
    h, w, c = image.shape
    if out is None:
        out = torch.empty(height, width * c)
    if not banded(h, w, height, width):
        x = image if image.dtype == torch.float32 and divide == 1 else (
            scratch("unit", (h, w, c)).copy_(image).div_(divide))
        x = F.interpolate(x.permute(2, 0, 1)[None], size=(height, width), mode="bilinear",  # channels-last [1, C, h, w]
                          align_corners=False, antialias=True)[0]
        out.view(height, width, c).copy_(x.permute(1, 2, 0))
        return out
    tall = scratch(name + "tall", (height, w * c))
    _banded_rows(image.reshape(h, w * c), *aa_weights(h, height, ROWS, divide), tall)  # [height, w*C]
    return _banded_columns(tall, *pixel_weights(w, width, c), out, c)
