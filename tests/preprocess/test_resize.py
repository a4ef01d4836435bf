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


SIZES = [  # shrinking by SHRINK or more takes the banded products, the rest torch's kernel
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


@pytest.mark.parametrize("shrink", [1.0, 2.5], ids=["banded from any shrink (AVX-512)", "from 2.5x (AVX2)"])
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
    monkeypatch.setattr(resize, "SHRINK", 1.0)  # the banded products, whose weights are cached
    resize.aa_weights.cache_clear()
    resize.pixel_weights.cache_clear()
    image = torch.from_numpy(np.random.default_rng(3).integers(0, 256, (200, 300, 3), dtype=np.uint8))
    first = resize_aa(image, 60, 80, divide=255).clone()
    again = resize_aa(image, 60, 80, divide=255)
    assert resize.pixel_weights.cache_info().hits == 1 and resize.aa_weights.cache_info().hits == 1
    assert torch.equal(first, again)
    assert (again.view(60, 80, 3) - torch_resize(image, 60, 80)).abs().max() <= 1e-6
