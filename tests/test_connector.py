"""The connector against a direct, window-by-window computation of SPEC.md's description."""
import torch
import torch.nn.functional as F

from molmo.config import MolmoConfig
from molmo.testing import random_model

from conftest import rel


def direct(connector, feats, masks):
    """pad_embed by mask value, then for each crop and each 2x2 window (row-major): attention with the
    mean of its 4 patches as the query, then the SwiGLU projector."""
    v = connector.vision
    pool, proj = connector.pool, connector.proj
    out = torch.empty(*feats.shape[:2], v.pooled_grid ** 2, proj.w2.out_features)
    for b in range(feats.shape[0]):
        for n in range(feats.shape[1]):
            x = feats[b, n].clone()
            for p in range(x.shape[0]):
                m = float(masks[b, n, p])
                if m == 0:
                    x[p] += connector.pad_embed[0]
                elif m < 1:
                    x[p] += connector.pad_embed[1]
            grid = x.view(v.grid, v.grid, -1)
            for r in range(v.pooled_grid):
                for c in range(v.pooled_grid):
                    win = grid[2 * r:2 * r + 2, 2 * c:2 * c + 2].reshape(4, -1)  # patches row-major
                    q = pool.wq(win.mean(0, keepdim=True)).view(1, v.heads, v.head_dim).transpose(0, 1)
                    k = pool.wk(win).view(4, v.heads, v.head_dim).transpose(0, 1)
                    val = pool.wv(win).view(4, v.heads, v.head_dim).transpose(0, 1)
                    att = (q @ k.transpose(1, 2) / v.head_dim ** 0.5).softmax(-1) @ val  # [heads, 1, d]
                    pooled = pool.wo(att.transpose(0, 1).reshape(1, -1))
                    out[b, n, r * v.pooled_grid + c] = proj.w2(F.silu(proj.w1(pooled)) * proj.w3(pooled))[0]
    return out


def test_connector_equals_the_window_by_window_computation():
    model = random_model(MolmoConfig.tiny(), seed=4)
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(2, 2, 576, 64, generator=g)
    masks = torch.ones(2, 2, 576)
    masks[0, 0, :100] = 0  # all padding
    masks[0, 1, 50:80] = 0.5  # partly padding
    masks[1, 1] = -1  # the reference's shifted last crop
    with torch.no_grad():
        got = model.connector(feats, masks)
        want = direct(model.connector, feats, masks)
    assert got.shape == (2, 2, 144, 64) and rel(got, want) < 1e-5


def test_pad_embeddings_follow_the_mask_values():
    model = random_model(MolmoConfig.tiny(), seed=5)
    feats = torch.zeros(1, 3, 576, 64)
    masks = torch.stack([torch.zeros(576), torch.full((576,), 0.5), torch.ones(576)])[None]
    with torch.no_grad():
        out = model.connector(feats, masks)
        for k, row in ((0, 0), (1, 1)):  # all padding -> row 0; partly -> row 1
            one = model.connector(feats[:, :1] + model.connector.pad_embed[row], torch.ones(1, 1, 576))
            assert rel(out[:, k], one[:, 0]) < 1e-6
        assert rel(out[:, 2], model.connector(feats[:, :1], torch.ones(1, 1, 576))[:, 0]) < 1e-6
