"""Tiling against the reference's recorded outputs, and its invariants over many sizes."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from molmo.preprocess import ImageConfig, MolmoProcessor, Tokenizer, select_tiling, tile_image

from conftest import GOLDEN, TOKENIZER, golden_cases

IDS = {"<im_start>": 1, "<im_end>": 2, "<im_patch>": 3, "<im_col>": 4}


@pytest.fixture(scope="module")
def processor():
    return MolmoProcessor(Tokenizer(TOKENIZER))


@pytest.mark.parametrize("case", golden_cases("preprocess"), ids=lambda c: c["name"])
def test_processor_matches_reference(processor, case):
    ref = load_file(str(GOLDEN / "preprocess" / f"{case['name']}.safetensors"))
    got = processor.process(images=GOLDEN / "preprocess" / case["image"], text=case["prompt"],
                            **case["processor_kwargs"])
    assert torch.equal(got["input_ids"], ref["input_ids"])
    assert torch.equal(got["image_input_idx"], ref["image_input_idx"])
    assert (got["image_masks"] - ref["image_masks"]).abs().max() <= 1e-6
    assert (got["images"] - ref["images"]).abs().max() <= 1e-4
    assert got["images"].shape[0] == case["n_crops"] and got["input_ids"].shape[0] == case["n_tokens"]


def test_tiling_choice_prefers_least_upscaling_then_least_downscaling():
    assert select_tiling(224, 224, 224, 12) == (1, 1)
    assert select_tiling(224, 448, 224, 12) == (1, 2)
    assert select_tiling(10_000, 10_000, 224, 12) == (3, 3)  # 3x3 downscales least among <= 12 crops
    assert select_tiling(-50, 300, 224, 12) == (1, 1)  # negative: every (1, j) ties, the first wins


def _check_layout(h, w, max_crops, margins):
    cfg = ImageConfig(max_crops=max_crops, overlap_margins=margins)
    out = tile_image(np.zeros((h, w, 3), dtype=np.uint8), cfg, IDS)
    n_crops = out.patches.shape[0]
    assert 2 <= n_crops <= max_crops + 1
    assert out.patches.shape[1:] == (576, 588) and out.masks.shape == (n_crops, 576)
    assert out.patch_pos.shape == (n_crops, 144)
    patch_positions = np.flatnonzero(out.tokens == IDS["<im_patch>"])
    fed = out.patch_pos[out.patch_pos >= 0]
    assert sorted(fed.tolist()) == patch_positions.tolist()  # every <im_patch> fed exactly once
    # Dropped pooled tokens are exactly the overlap margins of the tiled crops. The tiled block's
    # grid (its <im_col> count and row width) gives the crop rows and columns.
    lm, rm = margins
    tiled = out.tokens[1 + 12 * 13 + 1 + 1:-1]
    H = int((tiled == IDS["<im_col>"]).sum())
    W = len(tiled) // H - 1
    wp = 24 - lm - rm
    rows, cols = (2 * H - lm - rm) // wp, (2 * W - lm - rm) // wp
    assert rows * cols == n_crops - 1
    kept_rows = [(12 if rows == 1 else (wp + (lm if r == 0 else 0) + (rm if r == rows - 1 else 0) + 1) // 2)
                 for r in range(rows)]
    kept_cols = [(12 if cols == 1 else (wp + (lm if c == 0 else 0) + (rm if c == cols - 1 else 0) + 1) // 2)
                 for c in range(cols)]
    for r in range(rows):
        for c in range(cols):
            assert (out.patch_pos[1 + r * cols + c] >= 0).sum() == kept_rows[r] * kept_cols[c]
    assert (out.patch_pos[0] >= 0).all()  # the global view keeps everything


@settings(max_examples=60, deadline=None, derandomize=True)
@given(side=st.integers(1, 4000), ratio=st.floats(1 / 30, 30), max_crops=st.integers(1, 12),
       margins=st.sampled_from([(0, 0), (2, 2), (4, 4)]))
def test_every_patch_token_fed_once_and_only_margins_dropped(side, ratio, max_crops, margins):
    h = max(1, min(4000, int(side * ratio))) if ratio > 1 else side
    w = side if ratio > 1 else max(1, min(4000, int(side / ratio)))
    _check_layout(h, w, max_crops, margins)


@pytest.mark.parametrize("h,w,margins", [(1, 1, (4, 4)), (1, 30, (4, 4)), (4000, 4000, (4, 4)),
                                         (30, 900, (4, 4)), (133, 4000, (4, 4)), (4000, 2029, (2, 2))])
def test_layout_at_the_edges_of_the_size_range(h, w, margins):
    _check_layout(h, w, 12, margins)


def test_patches_are_row_column_channel_and_normalised():
    img = np.random.default_rng(0).integers(0, 256, (336, 336, 3), dtype=np.uint8)
    out = tile_image(img, ImageConfig(max_crops=1), IDS)
    glob = out.patches[0].reshape(24, 24, 14, 14, 3)
    mean, std = torch.tensor(ImageConfig().mean), torch.tensor(ImageConfig().std)
    expect = (torch.from_numpy(img[14:28, 28:42]).float() / 255 - mean) / std  # patch (1, 2), no resize
    assert torch.allclose(glob[1, 2], expect, atol=1e-5)


def test_masks_are_real_pixel_fractions_shifted_by_one_crop():
    h, w = 100, 700  # wide: padding above and below inside every crop
    out = tile_image(np.zeros((h, w, 3), dtype=np.uint8), ImageConfig(), IDS)
    rows, cols = select_tiling(h - 112, w - 112, 224, 12)
    H, W = rows * 224 + 112, cols * 224 + 112
    scale = min(np.float32(H) / np.float32(h), np.float32(W) / np.float32(w))
    nh, nw = int(np.float32(h) * scale), int(np.float32(w) * scale)
    top, left = (H - nh) // 2, (W - nw) // 2
    expect = []
    for r in range(rows):
        for c in range(cols):
            y = r * 224 + np.arange(24)[:, None] * 14
            x = c * 224 + np.arange(24)[None, :] * 14
            oy = np.clip(np.minimum(y + 14, top + nh) - np.maximum(y, top), 0, 14)
            ox = np.clip(np.minimum(x + 14, left + nw) - np.maximum(x, left), 0, 14)
            expect.append((oy * ox / 196).reshape(-1))
    expect.append(np.full(576, -1.0))  # the reference pairs crop k+1's mask with crop k, -1 last
    assert np.allclose(out.masks.numpy(), np.stack(expect), atol=1e-6)


@pytest.mark.parametrize("kw,msg", [({"max_crops": 0}, "max_crops"), ({"overlap_margins": (3, 3)}, "even"),
                                    ({"overlap_margins": (12, 12)}, "leave no patches")])
def test_bad_settings_raise_one_clear_error(kw, msg):
    with pytest.raises(ValueError, match=msg):
        ImageConfig().override(**kw)


def test_huge_max_crops_is_refused_at_once_and_large_ones_choose_fast():
    import time

    from molmo.preprocess.tiling import MAX_CROPS, ImageConfig, select_tiling

    t = time.perf_counter()
    with pytest.raises(ValueError, match=f"max_crops must be an integer in \\[1, {MAX_CROPS}\\]"):
        ImageConfig(max_crops=100_000)
    got = select_tiling(50_000, 3_000, 224, MAX_CROPS)
    assert time.perf_counter() - t < 1.0
    # SPEC.md's rule, directly: candidates by (i * j, i); the least upscaling, else the least downscaling
    cands = sorted(((i, j) for i in range(1, 257) for j in range(1, 257) if i * j <= 256), key=lambda c: (c[0] * c[1], c[0]))
    scales = [min(np.float32(i * 224) / np.float32(50_000), np.float32(j * 224) / np.float32(3_000)) for i, j in cands]
    up = [k for k, sc in enumerate(scales) if sc >= 1]
    want = cands[min(up, key=lambda k: scales[k])] if up else cands[max(range(len(cands)), key=lambda k: scales[k])]
    assert got == want


def test_preprocessor_config_that_is_not_json_is_named(tmp_path):
    from molmo.preprocess.tiling import ImageConfig

    (tmp_path / "preprocessor_config.json").write_text("{oops")
    with pytest.raises(ValueError, match="preprocessor_config.json: not a valid preprocessor config"):
        ImageConfig.from_hf(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="preprocessor_config.json: not a valid preprocessor config"):
        ImageConfig.from_hf(tmp_path)
