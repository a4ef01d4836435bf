"""Vision features -> LLM embeddings: padding embeddings, 2x2 attention pooling, SwiGLU projector."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .config import MolmoConfig
from .layers import Linear
from .vision import VisionAttention


class Projector(nn.Module):
    def __init__(self, in_dim: int, hidden: int, out_dim: int):
        super().__init__()
        self.w1 = Linear(in_dim, hidden, bias=False)
        self.w2 = Linear(hidden, out_dim, bias=False)
        self.w3 = Linear(in_dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Connector(nn.Module):
    """ViT features [B, n_crops, 576, 2w] + patch masks [B, n_crops, 576] -> [B, n_crops, 144, d_model]."""

    def __init__(self, c: MolmoConfig):
        super().__init__()
        v = c.vision
        feat_dim = v.width * len(v.feature_layers)
        self.vision = v
        self.pad_embed = nn.Parameter(torch.zeros(2, feat_dim))  # rows: all padding, partly padding
        self.pool = VisionAttention(v, feat_dim)
        self.proj = Projector(v.width, c.llm.mlp_hidden, c.llm.hidden)

    def forward(self, feats: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        v = self.vision
        B, n = feats.shape[:2]
        all_pad = (masks == 0).to(feats.dtype).unsqueeze(-1)
        part_pad = ((masks < 1) & (masks != 0)).to(feats.dtype).unsqueeze(-1)
        feats = feats + self.pad_embed[0] * all_pad
        feats = feats + self.pad_embed[1] * part_pad
        feats = feats.reshape(B, n, v.grid, v.grid, -1)
        if v.grid % v.pool_size:  # pad the grid so 2x2 windows tile it
            feats = F.pad(feats, (0, 0, 0, 1, 0, 1))
        windows = rearrange(feats, "b n (h p) (w q) c -> (b n h w) (p q) c", p=v.pool_size, q=v.pool_size)
        pooled = self.pool(windows.mean(dim=1, keepdim=True), windows)  # [B*n*144, 1, width]
        pooled = pooled.reshape(B, n, v.pooled_grid**2, -1)
        return self.proj(pooled)
