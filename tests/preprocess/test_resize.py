"""The banded-product resize against torch's antialiased bilinear interpolation (the reference's resize)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from molmo.preprocess import resize
from molmo.preprocess.resize import resize_aa


def torch_resize(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """What the reference does: uint8 -> [0, 1] float32, F.interpolate(antialias=True) -> [height, width, C]."""
    x = (image.float() / 255).permute(2, 0, 1)[None]
    return F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False, antialias=True)[0].permute(1, 2, 0)


SIZES = [  # shrinking by SHRINK or more takes the products, the rest torch's kernel
    ((3000, 4000), (1000, 1333)),  # photo to the tiled size: shrink by 3
    ((3000, 4000), (252, 336)),  # to the global view: shrink by 12
    ((1080, 1920), (567, 1008)),
    ((300, 400), (1000, 1333)),  # enlarge
    ((37, 53), (37, 53)),  # same size
    ((37, 53), (100, 7)),  # enlarge one axis, shrink the other
    ((1, 500), (1, 336)),  # one row
    ((500, 1), (336, 1)),  # one column: torch's kernel repeats the first row there, and so must we
    ((7, 1), (3, 1)),
    ((4000, 3), (336, 1)),  # the same, shrinking both axes enough for the banded products
    ((3, 4000), (1, 336)),
    ((336, 2), (336, 1)),
    ((5, 7), (3, 3)),
    ((1, 1), (1, 1)),
]


@pytest.mark.parametrize("shrink", [0.0, 2.5], ids=["products for any resize (AVX-512)", "from 2.5x (AVX2)"])
@pytest.mark.parametrize("src,dst", SIZES, ids=lambda s: "x".join(map(str, s)))
def test_resize_equals_torch_antialiased_bilinear_within_float32_rounding(src, dst, shrink, monkeypatch):
    monkeypatch.setattr(resize, "SHRINK", shrink)  # each CPU's choice of path, on any CPU
    image = torch.from_numpy(np.random.default_rng(sum(src + dst)).integers(0, 256, (*src, 3), dtype=np.uint8))
    got = resize_aa(image, *dst, divide=255).view(*dst, 3)
    assert (got - torch_resize(image, *dst)).abs().max() <= 1e-6  # FORMAT.md allows 1e-4 after normalising


def test_resize_writes_into_a_view_with_longer_rows_and_nothing_around_it():
    image = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (90, 120, 3), dtype=np.uint8))
    canvas = torch.full((50, 70 * 3), -7.0)
    inside = canvas[5:5 + 40, 3 * 6:3 * (6 + 53)]
    resize_aa(image, 40, 53, divide=255, out=inside)
    assert (inside.view(40, 53, 3) - torch_resize(image, 40, 53)).abs().max() <= 1e-6
    inside.fill_(-7.0)
    assert bool((canvas == -7.0).all())


@pytest.mark.parametrize("dst", [(20, 10), (40, 30)], ids=["banded", "torch's kernel"])
def test_resize_of_a_float_image_matches_the_uint8_one(dst, monkeypatch):
    monkeypatch.setattr(resize, "SHRINK", 2.5)  # 64x48 -> 40x30 (1.6x) takes torch's kernel
    image = torch.from_numpy(np.random.default_rng(2).integers(0, 256, (64, 48, 3), dtype=np.uint8))
    assert torch.allclose(resize_aa(image.float(), *dst), resize_aa(image, *dst), atol=1e-4)


def test_resizes_of_one_size_share_their_weights_and_give_the_same_pixels(monkeypatch):
    monkeypatch.setattr(resize, "SHRINK", 1.0)  # the products, whose weights are cached
    resize.row_slabs.cache_clear()
    resize.pixel_weights.cache_clear()
    image = torch.from_numpy(np.random.default_rng(3).integers(0, 256, (200, 300, 3), dtype=np.uint8))
    first = resize_aa(image, 60, 80, divide=255).clone()
    again = resize_aa(image, 60, 80, divide=255)
    assert resize.pixel_weights.cache_info().hits == 1 and resize.row_slabs.cache_info().hits == 1
    assert torch.equal(first, again)
    assert (again.view(60, 80, 3) - torch_resize(image, 60, 80)).abs().max() <= 1e-6


def test_resize_views_share_one_rows_pass_and_each_equals_torch(monkeypatch):
    monkeypatch.setattr(resize, "SHRINK", 2.5)  # two views by products (3x, 8x) and one for torch's kernel (1.2x)
    image = torch.from_numpy(np.random.default_rng(4).integers(0, 256, (400, 300, 3), dtype=np.uint8))
    sizes = [(133, 100), (50, 37), (333, 250)]
    outs = resize.resize_views(image, sizes, divide=255)
    for (height, width), got in zip(sizes, outs):
        assert (got.view(height, width, 3) - torch_resize(image, height, width)).abs().max() <= 1e-6


@pytest.mark.parametrize("slab_rows", [1, 7, 1000], ids=["one row", "fewer rows than a filter", "all rows"])
def test_row_slabs_of_any_height_give_torchs_pixels(slab_rows, monkeypatch):
    monkeypatch.setattr(resize, "SHRINK", 1.0)
    monkeypatch.setattr(resize, "SLAB_BYTES", slab_rows * 4 * 90 * 3)  # rows of 90 pixels
    image = torch.from_numpy(np.random.default_rng(5).integers(0, 256, (300, 90, 3), dtype=np.uint8))
    sizes = [(100, 45), (21, 30)]  # filters of 7 and 31 rows
    for (height, width), got in zip(sizes, resize.resize_views(image, sizes, divide=255)):
        assert (got.view(height, width, 3) - torch_resize(image, height, width)).abs().max() <= 1e-6
