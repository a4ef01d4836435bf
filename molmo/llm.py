"""Qwen2 decoder in Molmo's layout: fused biased qkv, rotate-half rotary in fp32, GQA, SwiGLU.

Shapes as in `molmo.model`: B rows, T tokens in this call, S key columns (the cache's when set
up), H query heads, KV key/value heads, d head dim.
"""
from __future__ import annotations

import torch
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from torch import nn

from .config import LLMConfig
from .layers import Linear, checkpointed


def positions_and_mask(input_ids: torch.Tensor, extra: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions [B, L] (padding -1 does not advance them) and a causal bool mask [B, 1, S, S] over
    the L prompt columns and `extra` columns of new tokens after them (S = L + extra).

    Padding keys are masked out, as in the reference: a padding query sees the real tokens before
    it, and a row with no real token at all sees every column (the reference's uniform softmax).
    """
    B, L = input_ids.shape
    dev = input_ids.device
    valid = input_ids != -1
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
    keys = torch.cat([valid, torch.ones(B, extra, dtype=torch.bool, device=dev)], 1)
    S = L + extra
    mask = torch.ones(S, S, dtype=torch.bool, device=dev).tril() & keys[:, None, :]  # [B, S, S]
    mask |= ~mask.any(-1, keepdim=True)
    return positions, mask.unsqueeze(1)


def prompt_mask(input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | None:
    """The prompt's [B, 1, L, L] part of `mask`, or None (plain causal, the fused attention
    kernels' fast path) when no row is padded."""
    L = input_ids.shape[1]
    return mask[:, :, :L, :L] if bool((input_ids == -1).any()) else None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.group, self.full_dim = None, dim

    def shard(self, local_dim: int, full_dim: int, group) -> None:
        """Normalise this rank's `local_dim` features of a vector of `full_dim` split over the ranks
        of `group` (tensor parallelism): the sum of squares is all-reduced."""
        self.weight = nn.Parameter(torch.ones(local_dim, device=self.weight.device))
        self.group, self.full_dim = group, full_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):  # statistics in fp32, whatever the mode
            h = x.float()
            if self.group is None:
                ms = h.pow(2).mean(-1, keepdim=True)
            else:
                ms = funcol.all_reduce(h.pow(2).sum(-1, keepdim=True), "sum", self.group) / self.full_dim
            h = h * torch.rsqrt(ms + self.eps)
        return self.weight * h.to(x.dtype)


def rotary_tables(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [B, 1, T, head_dim] in fp32 for integer positions [B, T] (rotate-half layout)."""
    with torch.autocast(positions.device.type, enabled=False):
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float) / head_dim)
        freqs = positions.float()[..., None] * inv_freq  # [B, T, head_dim / 2]
        angles = torch.cat([freqs, freqs], dim=-1).unsqueeze(1)
        return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    h = x.float()
    x1, x2 = h.chunk(2, dim=-1)
    return (h * cos + torch.cat([-x2, x1], dim=-1) * sin).to(x.dtype)


class KVCache(nn.Module):
    """Preallocated keys and values [B, kv_heads, max_len, head_dim] (buffers, never saved),
    written in place by column."""

    def __init__(self, batch: int, max_len: int, kv_heads: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch, kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [B, kv_heads, T, head_dim] into columns slots [T]; return the whole cache."""
        self.k.index_copy_(2, slots, k.to(self.k.dtype))
        self.v.index_copy_(2, slots, v.to(self.v.dtype))
        return self.k, self.v

    def reset(self) -> None:
        self.k.zero_()
        self.v.zero_()


class Attention(nn.Module):
    def __init__(self, c: LLMConfig):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = c.heads, c.kv_heads, c.head_dim
        self.qkv = Linear(c.hidden, (c.heads + 2 * c.kv_heads) * c.head_dim, bias=c.qkv_bias)
        self.out = Linear(c.heads * c.head_dim, c.hidden, bias=False)
        self.cache: KVCache | None = None

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, T, hidden] -> [q | k | v] [B, T, (H + 2 KV) d]."""
        return self.qkv(x)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                slots: torch.Tensor | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        H, KV, d = self.heads, self.kv_heads, self.head_dim
        qkv = self.project(x).view(B, T, H + 2 * KV, d).transpose(1, 2)  # [B, H + 2 KV, T, d]
        qk = apply_rotary(qkv[:, : H + KV], cos, sin)  # queries and keys rotated together
        q, k, v = qk[:, :H], qk[:, H:], qkv[:, H + KV :]
        if self.cache is not None:
            k, v = self.cache.update(slots, k, v)
            S = T if mask is None else mask.shape[-1]  # keys this call may see
            k, v = k[:, :, :S], v[:, :, :S]
        o = attend(q, k.to(q.dtype), v.to(q.dtype), mask)  # [B, H, T, d]
        return self.out(o.transpose(1, 2).reshape(B, T, -1))


class QKNormAttention(Attention):
    """7B-O's attention: RMSNorm over the whole q and the whole k projections, before rotary."""

    def __init__(self, c: LLMConfig):
        super().__init__(c)
        self.q_norm = RMSNorm(c.heads * c.head_dim, c.norm_eps)
        self.k_norm = RMSNorm(c.kv_heads * c.head_dim, c.norm_eps)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).split([self.q_norm.weight.shape[0], self.k_norm.weight.shape[0],
                                     self.k_norm.weight.shape[0]], dim=-1)
        return torch.cat([self.q_norm(q).to(q.dtype), self.k_norm(k).to(k.dtype), v], dim=-1)  # dtypes as projected


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Grouped-query attention: q [B, H, T, d], k and v [B, KV, S, d] -> [B, H, T, d].

    mask: bool [B, 1, T, S], or None for plain causal attention over T == S tokens (the fused
    kernels' fast path: a prompt without padding).
    """
    B, H, T, d = q.shape
    G = H // k.shape[1]
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=G > 1)
    if T == 1:  # one new token: each key/value head's G query heads act as G queries, no copies of k, v
        qg = q.reshape(B, -1, G, d)  # [B, KV, G, d]
        if q.device.type == "cpu":
            return F.scaled_dot_product_attention(qg, k, v, attn_mask=mask).reshape(B, H, 1, d)
        return attend_by_matmuls(qg, k, v, mask).reshape(B, H, 1, d)
    if G > 1:  # masked kernels take equal head counts
        k, v = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def attend_by_matmuls(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked attention as two batched matmuls and an fp32 softmax, for a few queries [B, KV, G, d]
    (GPU decoding: a fused kernel would run one thread block per key/value head; these fill it)."""
    scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5  # [B, KV, G, S]
    p = scores.float().masked_fill(~mask, float("-inf")).softmax(-1).to(v.dtype)
    return p @ v


class MLP(nn.Module):
    def __init__(self, c: LLMConfig):
        super().__init__()
        self.up_gate = Linear(c.hidden, c.intermediate, bias=False)  # [value | gate]
        self.down = Linear(c.mlp_hidden, c.hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.up_gate(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * value)


class Block(nn.Module):
    def __init__(self, c: LLMConfig):
        super().__init__()
        self.attn_norm = RMSNorm(c.hidden, c.norm_eps)
        self.attn = (QKNormAttention if c.qk_norm else Attention)(c)
        self.mlp_norm = RMSNorm(c.hidden, c.norm_eps)
        self.mlp = MLP(c)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                slots: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, slots)
        return x + self.mlp(self.mlp_norm(x))


class NormAfterBlock(Block):
    """7B-O's block: each sublayer's output is normalised before the residual add."""

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                slots: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn_norm(self.attn(x, cos, sin, mask, slots))
        return x + self.mlp_norm(self.mlp(x))


class Embedding(nn.Module):
    """The text table followed by Molmo's extra rows; id -1 (padding) embeds as id 0."""

    def __init__(self, c: LLMConfig):
        super().__init__()
        self.base = nn.Parameter(torch.zeros(c.vocab, c.hidden))
        self.extra = nn.Parameter(torch.zeros(c.extra_vocab, c.hidden))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        n = self.base.shape[0]
        ids = ids.clamp(min=0)
        base = F.embedding(ids.clamp(max=n - 1), self.base)
        extra = F.embedding((ids - n).clamp(min=0), self.extra)
        return torch.where((ids >= n).unsqueeze(-1), extra, base)


class Decoder(nn.Module):
    def __init__(self, c: LLMConfig):
        super().__init__()
        self.config = c
        self.embed = Embedding(c)
        block = NormAfterBlock if c.norm_after else Block  # the block's shape is chosen here, once
        self.blocks = nn.ModuleList(block(c) for _ in range(c.layers))
        self.norm = RMSNorm(c.hidden, c.norm_eps)
        self.lm_head = Linear(c.hidden, c.vocab, bias=False)
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None,
                slots: torch.Tensor | None = None, hidden_states: list | None = None, run_block=None) -> torch.Tensor:
        """Embeddings [B, T, hidden] at positions [B, T] -> hidden states [B, T, hidden] (before `norm`).

        mask: bool [B, 1, T, S], True where a query may attend to a key, or None for plain causal
        attention. With a KV cache set up, slots [T] are the cache columns this call writes and S
        (T without a mask) the cache columns it reads. `hidden_states`, if a list, receives the
        input of every block. `run_block(block, x, cos, sin, mask, slots)`, if given, runs each block
        (generation passes a compiled one).
        """
        cos, sin = rotary_tables(positions, self.config.head_dim, self.config.rope_theta)
        for block in self.blocks:
            if hidden_states is not None:
                hidden_states.append(x)
            if run_block is not None:
                x = run_block(block, x, cos, sin, mask, slots)
            else:
                x = checkpointed(block, self.gradient_checkpointing, x, cos, sin, mask, slots)
        return x

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Hidden states [..., d] -> logits [..., V] (the final norm, then the head)."""
        return self.lm_head(self.norm(h))

    def setup_cache(self, batch: int, max_len: int, dtype, device) -> None:
        """A KV cache of `max_len` columns on every attention layer (until `clear_cache`)."""
        for block in self.blocks:  # a tensor-parallel rank: its own key/value heads
            a = block.attn
            a.cache = KVCache(batch, max_len, a.kv_heads, a.head_dim, dtype, device)

    def clear_cache(self) -> None:
        for block in self.blocks:
            block.attn.cache = None
