"""Antialiased bilinear resizing of uint8 RGB images: torch's `F.interpolate(x, size, mode="bilinear",
align_corners=False, antialias=True)` on float32 in [0, 1] (the reference's resize), within float32
rounding.

Shrinking by SHRINK or more (a photo to the crops' or the global view's size; on CPUs with AVX-512 any
resize), each axis is a matrix product instead: an output row mixes the input rows under its triangle
filter, whose width grows with the shrink, and torch's kernel slows with it while a product does not.
Rows are a sparse product (only the filter's taps), over a slab of input rows at a time, so the uint8
image is converted to float in pieces that stay in cache, once for all the resizes of one image
(`resize_views`: tiling's two views). Columns are a banded product, a block of output pixels at a time
over just the input pixels it reads. Other resizes keep torch's kernel. Large buffers are reused across
calls (fresh large allocations cost more in page faults than the arithmetic done in them).
"""
from __future__ import annotations

import functools
import warnings

import numpy as np
import torch
import torch.nn.functional as F

from ..layers import scratch

# From this shrink on the products beat torch's kernel, on 2 cores: with AVX-512 for any resize, enlargements
# included (`tile_image` of 640x480 8.8 -> 6.4 ms, 800x600 13.8 -> 8.9 ms), with AVX2 from 2.5x (2.5x faster
# at a 3x shrink, 2x at 6x; milder shrinks were slower there, measured with banded rows before the sparse ones).
SHRINK = 0.0 if torch.backends.cpu.get_cpu_capability().startswith("AVX512") else 2.5
COLUMNS = 16  # output pixels per column product: more read more zero weights, fewer make small products
SLAB_BYTES = 4 << 20  # float32 input rows converted at a time (at least the widest filter's taps)


def aa_weights(n_in: int, n_out: int, block: int, divide: float = 1.0) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """One axis's weights, `block` outputs at a time: [n_blocks, block, K] float32 (row i of block b
    weighs inputs start_b + k) and each block's input range (start_b, end_b). As torch's CPU kernel
    computes them in float32, step by step (scale, support, centre, first tap, tap count), each row
    normalised to sum 1, over `divide`."""
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


@functools.lru_cache(maxsize=16)
def row_slabs(n_in: int, n_outs: tuple[int, ...], divide: float, slab: int) -> list[tuple[int, int, list]]:
    """Rows of several resizes of n_in rows, `slab` input rows at a time: per slab, the input rows it
    converts (lo, hi) and per resize (o0, o1, W) or None: outputs o0:o1 = W @ rows lo:hi, W a sparse
    CSR matrix of the filter taps (`aa_weights`, over `divide`). An output belongs to the slab holding
    its last tap; a slab also converts the widest filter's rows before its own. Cached per size
    (photos of one size share them: a dataset's camera): read them, never write to them."""
    taps = [aa_weights(n_in, n, 1, divide) for n in n_outs]  # per output: [n, 1, K] weights and (first, end)
    bounds = [np.array(ranges).reshape(-1, 2) for _, ranges in taps]
    reach = max(int((b[:, 1] - b[:, 0]).max()) for b in bounds)
    slabs = []
    for s0 in range(0, n_in, slab):
        s1, lo = min(n_in, s0 + slab), max(0, s0 - reach)
        mats = []
        for (w, _), b in zip(taps, bounds):
            o = np.nonzero((b[:, 1] > s0) & (b[:, 1] <= s1))[0]
            if len(o) == 0:
                mats.append(None)
                continue
            j = b[o, :1] + np.arange(w.shape[2])  # [len(o), K] input rows under each filter
            taken = j < b[o, 1:]
            crow = np.concatenate([[0], np.cumsum(taken.sum(1))])
            cols, vals = j[taken] - lo, w[o, 0][torch.from_numpy(taken)]
            with warnings.catch_warnings():  # "sparse CSR support is in beta": mm on it is all we use
                warnings.simplefilter("ignore", UserWarning)
                mat = torch.sparse_csr_tensor(torch.from_numpy(crow).int(), torch.from_numpy(cols).int(), vals,
                                              size=(len(o), s1 - lo))  # int32 indices, as MKL reads them
            mats.append((int(o[0]), int(o[-1]) + 1, mat))
        slabs.append((lo, s1, mats))
    return slabs


def _sparse_rows(src: torch.Tensor, slabs: list, outs: list[torch.Tensor]):
    """Rows: outs[k] [n_k, C] = W_k @ src [n_in, C] over `row_slabs`; a uint8 src is converted to
    float32 a slab at a time (once for all outs), a float32 one read as it is."""
    if src.dtype != torch.float32:
        rows = scratch("slab_rows", (max(hi - lo for lo, hi, _ in slabs), src.shape[1]))
    for lo, hi, mats in slabs:
        x = src[lo:hi] if src.dtype == torch.float32 else rows[:hi - lo].copy_(src[lo:hi])  # [hi - lo, C]
        for m, out in zip(mats, outs):
            if m is not None:  # addmm with beta=0 writes out; mm would zero a temporary and copy it there
                torch.addmm(out[m[0]:m[1]], m[2], x, beta=0, out=out[m[0]:m[1]])


@functools.lru_cache(maxsize=16)
def pixel_weights(n_in: int, n_out: int, c: int) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """`aa_weights` for pixels of c channels, COLUMNS outputs at a time: W kron I_c per block,
    [n_blocks, K*c, COLUMNS*c], and the blocks' input pixel ranges. Cached like `row_slabs`."""
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


def takes_products(h: int, w: int, height: int, width: int) -> bool:
    """Whether `resize_views` takes the products for this resize (else torch's kernel, on float)."""
    # One column out of several rows: torch's kernel gives every row the first row's value, as in the reference.
    return min(h / height, w / width) >= SHRINK and not (width == 1 and height != h)


def resize_views(image: torch.Tensor, sizes: list[tuple[int, int]], divide: float = 1.0,
                 outs: list[torch.Tensor] | None = None, names: list[str] | None = None) -> list[torch.Tensor]:
    """uint8 (or float32) [h, w, C] -> one float32 [height, width * C] per (height, width) in `sizes`,
    over `divide` (255: values in [0, 1]), written into `outs` when given ([height, width * C] views
    whose rows may be longer). The resizes by products share one pass over the image's rows; intermediates
    live in scratch buffers named after `names`."""
    h, w, c = image.shape
    outs = outs or [torch.empty(height, width * c) for height, width in sizes]
    names = names or [str(i) for i in range(len(sizes))]
    products = [i for i, size in enumerate(sizes) if takes_products(h, w, *size)]
    if len(products) < len(sizes) and not (image.dtype == torch.float32 and divide == 1):
        image, divide = scratch("unit", (h, w, c)).copy_(image).div_(divide), 1  # torch's kernel reads float
    for i, (height, width) in enumerate(sizes):
        if i not in products:
            x = F.interpolate(image.permute(2, 0, 1)[None], size=(height, width), mode="bilinear",  # channels-
                              align_corners=False, antialias=True)[0]                    # last [1, C, h, w]
            outs[i].view(height, width, c).copy_(x.permute(1, 2, 0))
    if products:
        slab = max(SLAB_BYTES // (4 * w * c), 1)
        talls = [scratch(names[i] + "tall", (sizes[i][0], w * c)) for i in products]  # [height, w*C]
        _sparse_rows(image.reshape(h, w * c), row_slabs(h, tuple(sizes[i][0] for i in products), float(divide), slab),
                     talls)
        for i, tall in zip(products, talls):
            _banded_columns(tall, *pixel_weights(w, sizes[i][1], c), outs[i], c)
    return outs


def resize_aa(image: torch.Tensor, height: int, width: int, divide: float = 1.0, out: torch.Tensor | None = None,
              name: str = "") -> torch.Tensor:
    """One resize of `resize_views`: [h, w, C] -> float32 [height, width * C] over `divide`."""
    return resize_views(image, [(height, width)], divide, None if out is None else [out], [name])[0]
