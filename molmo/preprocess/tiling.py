"""Multi-crop tiling: resize-and-pad, the tiling choice, overlapping crops, patches and token layout."""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from ..layers import scratch
from .resize import resize_views

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


MAX_CROPS = 256  # each crop adds at least 64 tokens: 256 crops are 4x the 4096-token context


@dataclass(frozen=True)
class ImageConfig:
    """The `preprocessor_config.json` fields, with the 7B-D values."""

    max_crops: int = 12
    overlap_margins: tuple[int, int] = (4, 4)  # patches dropped at the (left/top, right/bottom) of crops
    crop_size: int = 336  # base_image_input_size
    patch_size: int = 14
    tokens_per_side: int = 12  # image_token_length_h / _w
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD

    def __post_init__(self):
        lm, rm = self.overlap_margins
        if not (isinstance(self.max_crops, int) and 1 <= self.max_crops <= MAX_CROPS):
            raise ValueError(f"max_crops must be an integer in [1, {MAX_CROPS}] (more crops than any Molmo "
                             f"context holds), got {self.max_crops!r}")
        if lm < 0 or rm < 0 or lm % 2 or rm % 2:
            raise ValueError(f"overlap_margins must be even and >= 0 (2x2 pooling), got {tuple(self.overlap_margins)}")
        if lm + rm >= self.patches_per_crop:
            raise ValueError(f"overlap_margins {tuple(self.overlap_margins)} leave no patches in a crop")
        if (self.patches_per_crop + 1) // 2 != self.tokens_per_side:
            raise ValueError("crop_size / patch_size must pool 2x2 into tokens_per_side tokens")

    @property
    def patches_per_crop(self) -> int:
        return self.crop_size // self.patch_size  # 24

    @property
    def window_patches(self) -> int:
        return self.patches_per_crop - sum(self.overlap_margins)  # 16: patches each crop contributes

    @classmethod
    def from_hf(cls, folder: str | Path) -> "ImageConfig":
        """Read `preprocessor_config.json` from a snapshot (defaults when the file is absent)."""
        path = Path(folder) / "preprocessor_config.json"
        if not path.is_file():
            return cls()
        try:
            raw = json.loads(path.read_text())
            size = raw.get("base_image_input_size", [336, 336])
            return cls(
                max_crops=int(raw.get("max_crops", 12)),
                overlap_margins=tuple(raw.get("overlap_margins", (4, 4))),
                crop_size=int(size[0] if isinstance(size, (list, tuple)) else size),
                patch_size=int(raw.get("image_patch_size", 14)),
                tokens_per_side=int(raw.get("image_token_length_h", 12)),
                mean=tuple(raw.get("image_mean", CLIP_MEAN)),
                std=tuple(raw.get("image_std", CLIP_STD)),
            )
        except (ValueError, TypeError, AttributeError) as e:  # not JSON, not an object, or a bad value
            raise ValueError(f"{path}: not a valid preprocessor config ({e})") from None

    def override(self, **kwargs) -> "ImageConfig":
        kwargs = {k: tuple(v) if k == "overlap_margins" else v for k, v in kwargs.items() if v is not None}
        return replace(self, **kwargs)


def as_tensor(image: np.ndarray) -> torch.Tensor:
    """The uint8 array [H, W, 3] as a tensor, without a copy."""
    with warnings.catch_warnings():  # PIL's arrays are read-only; we only read them
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(image)


def select_tiling(h: int, w: int, window: int, max_crops: int) -> tuple[int, int]:
    """(rows, cols) of crops: the least upscaling that fits, else the least downscaling (float32 math)."""
    per_row = max_crops // np.arange(1, max_crops + 1)  # candidates i x j with i * j <= max_crops: ~n log n
    i = np.repeat(np.arange(1, max_crops + 1), per_row)
    j = np.arange(len(i)) - np.repeat(np.cumsum(per_row) - per_row, per_row) + 1
    order = np.lexsort((i, i * j))  # by (i * j, i)
    cands = np.stack([i[order], j[order]], axis=1)
    res = cands.astype(np.float32) * np.float32(window)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = (res / np.array([h, w], dtype=np.float32)).min(axis=1)
    k = int(np.argmax(scale)) if np.all(scale < 1) else int(np.argmin(np.where(scale < 1, np.float32(10e9), scale)))
    return int(cands[k, 0]), int(cands[k, 1])


def fit(h: int, w: int, height: int, width: int) -> tuple[int, int]:
    """The size of an h x w image resized to fit height x width, keeping its aspect."""
    scale = min(np.float32(height) / np.float32(h), np.float32(width) / np.float32(w))
    # The reference truncates float32(h) * scale; at least one pixel survives very thin images.
    return max(1, int(np.float32(h) * scale)), max(1, int(np.float32(w) * scale))


def resize_and_pad(image: torch.Tensor, views: list[tuple[int, int]], cfg: ImageConfig,
                   names: list[str]) -> list[tuple[torch.Tensor, tuple[int, int, int, int]]]:
    """uint8 [h, w, 3] -> per (height, width) view: the image in [0, 1], resized to fit, normalised and
    padded to [height, width, 3] (a scratch buffer named after the view: copy what you keep), and the
    resized image's place in it, (top, left, rows, cols). The views share one pass over the image."""
    sizes = [fit(*image.shape[:2], height, width) for height, width in views]
    canvases, insides = [], []
    for (height, width), (nh, nw), name in zip(views, sizes, names):
        top, left = (height - nh) // 2, (width - nw) // 2
        canvases.append((scratch(name, (height, width, 3)), (top, left, nh, nw)))
        insides.append(canvases[-1][0].view(height, width * 3)[top:top + nh, 3 * left:3 * (left + nw)])
    resize_views(image, sizes, divide=255, outs=insides, names=names)  # into [nh, nw * 3] views
    for (height, width), (out, (top, left, nh, nw)), inside in zip(views, canvases, insides):
        # Per-channel constants repeated along a row of pixels: a row-long operand keeps the passes below
        # vectorized (broadcasting 3 values over each pixel took 8x as long).
        mean = torch.tensor(cfg.mean, dtype=torch.float32).repeat(width)  # [width * 3]
        std = torch.tensor(cfg.std, dtype=torch.float32).repeat(width)
        pad = (torch.zeros_like(mean) - mean).div_(std)  # a row of padding pixels (0) normalised like the image
        rows = out.view(height, width * 3)
        rows[:top] = pad
        rows[top + nh:] = pad
        rows[top:top + nh, :3 * left] = pad[:3 * left]
        rows[top:top + nh, 3 * (left + nw):] = pad[3 * (left + nw):]
        inside.clamp_(0, 1).sub_(mean[:3 * nw]).div_(std[:3 * nw])
    return canvases


def real_fraction(rows: int, cols: int, stride: int, place: tuple[int, int, int, int], cfg: ImageConfig) -> torch.Tensor:
    """Per crop patch, the fraction of its pixels inside the resized image: [rows * cols, (S/p)^2]."""
    top, left, nh, nw = place
    p, g = cfg.patch_size, cfg.crop_size // cfg.patch_size

    def inside(n: int, start: int, size: int) -> torch.Tensor:  # [n, g]: pixels per patch line inside
        first = torch.arange(n)[:, None] * stride + torch.arange(g)[None, :] * p
        return ((first + p).clamp(max=start + size) - first.clamp(min=start)).clamp(min=0)

    count = inside(rows, top, nh)[:, None, :, None] * inside(cols, left, nw)[None, :, None, :]  # [r, c, g, g]
    return count.reshape(rows * cols, g * g).float() / (p * p)


def crops_to_patches(img: torch.Tensor, rows: int, cols: int, stride: int, cfg: ImageConfig,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """[H, W, C] -> [rows * cols, (S/p)^2, p*p*C]: S-pixel crops every `stride` pixels, cut into patches
    with pixels in (row, column, channel) order, in one copy (into `out` when given)."""
    H, W, C = img.shape
    p, g = cfg.patch_size, cfg.crop_size // cfg.patch_size
    s = img.stride()
    view = img.as_strided((rows, cols, g, g, p, p, C),
                          (stride * s[0], stride * s[1], p * s[0], p * s[1], s[0], s[1], s[2]))
    if out is None:
        return view.reshape(rows * cols, g * g, p * p * C)
    out.view(rows, cols, g, g, p, p, C).copy_(view)
    return out


def crop_windows(n: int, cfg: ImageConfig) -> list[tuple[int, int]]:
    """For each of n crops along one axis: (first kept pooled token, number kept) in its pooled grid."""
    lm, rm = cfg.overlap_margins
    out = []
    for i in range(n):
        patches = cfg.window_patches + (lm if i == 0 else 0) + (rm if i == n - 1 else 0)
        out.append((0 if i == 0 else lm // 2, (patches + 1) // 2))
    return out


@dataclass
class ImageInputs:
    tokens: np.ndarray  # int64 [n_tokens]: the image's token block
    patches: torch.Tensor  # float32 [n_crops, patches, pixels]: global view first
    patch_pos: np.ndarray  # int64 [n_crops, tokens_per_crop]: offset in `tokens` fed, -100 if dropped
    masks: torch.Tensor  # float32 [n_crops, patches]: real-pixel fraction, shifted one crop (see SPEC.md)


def tile_image(image: np.ndarray, cfg: ImageConfig, ids: dict[str, int]) -> ImageInputs:
    """One RGB uint8 image [H, W, 3] -> its crops, token block and the pooled-token positions."""
    T, P = cfg.tokens_per_side, cfg.patch_size
    lm, rm = cfg.overlap_margins
    margin_px, window_px = (lm + rm) * P, cfg.window_patches * P
    src = as_tensor(image)  # [H, W, 3]
    rows, cols = select_tiling(image.shape[0] - margin_px, image.shape[1] - margin_px, window_px, cfg.max_crops)

    g2 = (cfg.crop_size // P) ** 2
    patches = torch.empty(1 + rows * cols, g2, P * P * 3)  # global view first, then the crops
    views = ((cfg.crop_size, cfg.crop_size), (rows * window_px + margin_px, cols * window_px + margin_px))
    (glob, _), (big, place) = resize_and_pad(src, views, cfg, ["global", "tiled"])
    crops_to_patches(glob, 1, 1, 0, cfg, out=patches[:1])
    crops_to_patches(big, rows, cols, window_px, cfg, out=patches[1:])
    crop_masks = real_fraction(rows, cols, window_px, place, cfg)  # [n, patches]
    masks = torch.cat([crop_masks, torch.full_like(crop_masks[:1], -1)])  # the reference's shift

    # Token block: global view, then the tiled view's pooled tokens in raster order over the image.
    gh, gw = rows * cfg.window_patches + lm + rm, cols * cfg.window_patches + lm + rm
    H, W = (gh + 1) // 2, (gw + 1) // 2
    def block(h, w):
        grid = np.full((h, w + 1), ids["<im_patch>"], dtype=np.int64)
        grid[:, -1] = ids["<im_col>"]
        return np.concatenate([[ids["<im_start>"]], grid.ravel(), [ids["<im_end>"]]])
    tokens = np.concatenate([block(T, T), block(H, W)])

    patch_pos = np.full((1 + rows * cols, T, T), -100, dtype=np.int64)
    patch_pos[0] = 1 + np.arange(T)[:, None] * (T + 1) + np.arange(T)[None, :]
    tiled0 = 1 + T * (T + 1) + 1 + 1  # first pooled token of the tiled block
    ys, xs = crop_windows(rows, cfg), crop_windows(cols, cfg)
    row0 = np.cumsum([0] + [n for _, n in ys])
    col0 = np.cumsum([0] + [n for _, n in xs])
    for r, (y0, ny) in enumerate(ys):
        for c, (x0, nx) in enumerate(xs):
            gr = row0[r] + np.arange(ny)[:, None]
            gc = col0[c] + np.arange(nx)[None, :]
            patch_pos[1 + r * cols + c, y0:y0 + ny, x0:x0 + nx] = tiled0 + gr * (W + 1) + gc
    return ImageInputs(tokens, patches, patch_pos.reshape(1 + rows * cols, T * T), masks)
