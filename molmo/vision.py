"""CLIP ViT encoder as Molmo runs it: pre-norm blocks, fp32 pre-LayerNorm and fp32 q/k products."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import VisionConfig
from .layers import Linear, checkpointed


def attention_fp32_qk(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Bidirectional attention on [B, H, T, D] heads with q and k in fp32 (v too unless autocast is on).

    This is how the reference runs both the ViT and the pooling attention; the output keeps v's
    original dtype. Fewer key/value heads than query heads are shared in groups.
    """
    dtype = v.dtype
    q, k = q.float(), k.float()
    if not torch.is_autocast_enabled(v.device.type):
        v = v.float()
    out = F.scaled_dot_product_attention(q, k, v, enable_gqa=q.shape[1] != k.shape[1])
    return out.to(dtype)


class VisionAttention(nn.Module):
    def __init__(self, c: VisionConfig, in_dim: int):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = c.heads, c.kv_heads, c.head_dim
        self.wq = Linear(in_dim, c.heads * c.head_dim)
        self.wk = Linear(in_dim, c.kv_heads * c.head_dim)
        self.wv = Linear(in_dim, c.kv_heads * c.head_dim)
        self.wo = Linear(c.heads * c.head_dim, c.width)

    def forward(self, x_q: torch.Tensor, x_kv: torch.Tensor) -> torch.Tensor:
        B, Tq, _ = x_q.shape
        Tk = x_kv.shape[1]
        q = self.wq(x_q).view(B, Tq, self.heads, self.head_dim).transpose(1, 2)
        k = self.wk(x_kv).view(B, Tk, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x_kv).view(B, Tk, self.kv_heads, self.head_dim).transpose(1, 2)
        out = attention_fp32_qk(q, k, v)  # [B, H, Tq, D]
        return self.wo(out.transpose(1, 2).reshape(B, Tq, -1))


class VisionMLP(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.w1 = Linear(c.width, c.mlp_dim)
        self.w2 = Linear(c.mlp_dim, c.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.w1(x)
        return self.w2(h * torch.sigmoid(1.702 * h))  # quick-GELU


class VisionBlock(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.attn_norm = nn.LayerNorm(c.width, eps=c.norm_eps)
        self.attn = VisionAttention(c, c.width)
        self.mlp_norm = nn.LayerNorm(c.width, eps=c.norm_eps)
        self.mlp = VisionMLP(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.attn_norm(x)
        x = x + self.attn(h, h)
        return x + self.mlp(self.mlp_norm(x))


class VisionEncoder(nn.Module):
    """Crops of patches [N, 576, 588] -> features [N, 576, 2 * width] from two inner blocks."""

    def __init__(self, c: VisionConfig):
        super().__init__()
        self.config = c
        self.patch_embed = Linear(c.patch_dim, c.width, bias=False)
        self.cls_token = nn.Parameter(torch.zeros(c.width))
        self.pos_embed = nn.Parameter(torch.zeros(c.num_pos, c.width))
        self.pre_norm = nn.LayerNorm(c.width, eps=c.norm_eps)
        self.blocks = nn.ModuleList(VisionBlock(c) for _ in range(c.layers))
        # Only the blocks up to the deepest feature layer need to run.
        self.n_run = max(i % c.layers for i in c.feature_layers) + 1
        self.blocks[self.n_run:].requires_grad_(False)  # never run: no gradient, no optimizer state
        self.gradient_checkpointing = False

    def positions(self, grid: int) -> torch.Tensor:
        """Positional embeddings [1 + grid^2, width], the 2-D table resized if the grid differs."""
        cls, table = self.pos_embed[:1], self.pos_embed[1:]
        n = math.isqrt(table.shape[0])
        if n != grid:
            table = table.reshape(1, n, n, -1).permute(0, 3, 1, 2)
            table = F.interpolate(table, size=(grid, grid), mode="bicubic", align_corners=False, antialias=True)
            table = table.permute(0, 2, 3, 1).reshape(grid * grid, -1)
        return torch.cat([cls, table], dim=0)

    def hidden_states(self, patches: torch.Tensor, n_blocks: int | None = None) -> list[torch.Tensor]:
        """Outputs [N, 1 + P, width] of the first `n_blocks` blocks (class token first)."""
        c = self.config
        N, P, _ = patches.shape
        x = self.patch_embed(patches)  # [N, P, width]
        cls = self.cls_token.to(x.dtype).expand(N, 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positions(math.isqrt(P)).to(x.dtype)  # [N, 1 + P, width]
        x = F.layer_norm(x.float(), (c.width,), self.pre_norm.weight.float(), self.pre_norm.bias.float(),
                         c.norm_eps).to(x.dtype)
        out = []
        for block in self.blocks[: n_blocks or c.layers]:
            x = checkpointed(block, self.gradient_checkpointing, x)
            out.append(x)
        return out

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        c = self.config
        hidden = self.hidden_states(patches, self.n_run)
        feats = torch.cat([hidden[i % c.layers] for i in c.feature_layers], dim=-1)  # [N, 1 + P, 2*width]
        real = (patches != -1).flatten(1).any(dim=1)  # crops of all -1 are batch padding
        return feats[:, 1:] * real[:, None, None]
