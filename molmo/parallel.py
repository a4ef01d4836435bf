"""Tensor parallelism with torch.distributed: the decoder split over the ranks of a 1-D device mesh.

Each rank holds (`plan`):
- attention: its share of the query heads and of the key/value heads they read (with fewer key/value
  heads than ranks, each rank keeps a copy of the one its queries share); `qkv` is split by output
  rows (ColwiseParallel), `out` by input columns (RowwiseParallel: one all-reduce);
- MLP: its share of the hidden columns (`up_gate` by rows, value and gate alike; `down` by columns);
- vocabulary: its share of the embedding's text rows and of `lm_head`'s rows (logits all-gathered);
- the KV cache of its own key/value heads.
A size that does not divide by the ranks keeps its part whole (replicated); so do the ViT and the
connector (~4% of 7B-D's weights, 1% of 72B's, run once per image).
Parameters are DTensors (`parallelize_module`); each rank reads only its own slices of the snapshot
(`load_shards`). Run one process per rank (torchrun); every rank computes the same tokens.
"""
from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel, parallelize_module

from .checkpoint import read_slice
from .config import LLMConfig
from .names import published_name

Span = tuple[int, int]
TIMEOUT_S = float(os.environ.get("MOLMO_TP_TIMEOUT", 600))  # a collective waits this long for a dead rank


@dataclass(frozen=True)
class Split:
    """One rank's share: [start, end) of the query heads, key/value heads, MLP hidden columns and
    text vocabulary, or None where the part stays whole."""

    tp: int
    heads: Span | None
    kv_heads: Span | None
    mlp: Span | None
    vocab: Span | None

    def whole(self) -> list[str]:
        """The parts every rank holds whole (sizes that do not split over the ranks)."""
        return [part for part, span in (("attention", self.heads), ("MLP", self.mlp), ("vocabulary", self.vocab))
                if span is None and self.tp > 1]


def _share(n: int, tp: int, rank: int) -> Span | None:
    return (rank * n // tp, (rank + 1) * n // tp) if n % tp == 0 else None


def plan(c: LLMConfig, tp: int, rank: int) -> Split:
    """How the decoder of config `c` splits over `tp` ranks, seen from `rank`."""
    if tp < 1 or not 0 <= rank < tp:
        raise ValueError(f"rank {rank} of {tp}: not a valid tensor-parallel rank")
    heads = kv = None
    if c.kv_heads % tp == 0:  # each rank: whole groups of query heads with their key/value heads
        heads, kv = _share(c.heads, tp, rank), _share(c.kv_heads, tp, rank)
    elif tp % c.kv_heads == 0 and c.heads % tp == 0 and not c.qk_norm:  # fewer kv heads than ranks: copies
        heads = _share(c.heads, tp, rank)
        k = heads[0] // (c.heads // c.kv_heads)
        kv = (k, k + 1)
    return Split(tp, heads, kv, _share(c.mlp_hidden, tp, rank), _share(c.vocab, tp, rank))


def local_slice(name: str, c: LLMConfig, s: Split) -> tuple[list[Span], Span | None] | None:
    """The rows (ranges along dim 0) and columns (dim 1, None: all) of our parameter `name` that
    this rank holds, in the order its local tensor stacks them; None: the whole tensor."""
    d, H, KV, M = c.head_dim, c.heads, c.kv_heads, c.mlp_hidden
    part = name.rsplit(".", 2)[-2:] if name.startswith("llm.blocks.") else [name]
    if s.heads is not None:
        (h0, h1), (k0, k1) = s.heads, s.kv_heads
        q, k, v = (h0 * d, h1 * d), (H * d + k0 * d, H * d + k1 * d), ((H + KV) * d + k0 * d, (H + KV) * d + k1 * d)
        if part[0] == "qkv":
            return [q, k, v], None
        if part == ["out", "weight"]:
            return [(0, c.hidden)], q
        if part[0] in ("q_norm", "k_norm"):
            return [q if part[0] == "q_norm" else (k0 * d, k1 * d)], None
    if s.mlp is not None:
        m0, m1 = s.mlp
        if part[0] == "up_gate":
            return [(m0, m1), (M + m0, M + m1)], None
        if part == ["down", "weight"]:
            return [(0, c.hidden)], s.mlp
    if s.vocab is not None and name in ("llm.embed.base", "llm.lm_head.weight"):
        return [s.vocab], None
    return None


class VocabParallel(ParallelStyle):
    """Molmo's embedding with its text rows split over the ranks (the extra rows replicated):
    each rank looks up the ids it holds, and the partial results are all-reduced."""

    def _apply(self, module: nn.Module, mesh: DeviceMesh) -> nn.Module:
        def partition(name, m, mesh):
            for key, placement in (("base", Shard(0)), ("extra", Replicate())):
                m.register_parameter(key, nn.Parameter(distribute_tensor(getattr(m, key), mesh, [placement]),
                                                       requires_grad=getattr(m, key).requires_grad))

        def ids_in(m, inputs, mesh):
            return (DTensor.from_local(inputs[0], mesh, [Replicate()], run_check=False),)

        def embeddings_out(m, out, mesh):
            return out.redistribute(mesh, [Replicate()]).to_local()

        return distribute_module(module, mesh, partition, ids_in, embeddings_out)


def parallelize(model: nn.Module, mesh: DeviceMesh) -> Split:
    """Split a meta-device Molmo's decoder over `mesh` (see the module's docstring): layers resized
    to this rank's shares, then `parallelize_module`. Returns this rank's `Split`."""
    c = model.config.llm
    tp = mesh.size()
    s = plan(c, tp, mesh.get_local_rank())
    if s.whole() and mesh.get_local_rank() == 0:
        warnings.warn(f"tp={tp}: the {', '.join(s.whole())} of this model ({c.heads} heads, {c.kv_heads} key/value "
                      f"heads, {c.mlp_hidden} MLP columns, {c.vocab} rows) cannot be split evenly over {tp} ranks "
                      f"and stay whole on every rank", stacklevel=2)
    styles: dict[str, ParallelStyle] = {}
    for i, block in enumerate(model.llm.blocks):
        a, mlp = block.attn, block.mlp
        if s.heads is not None:
            a.heads, a.kv_heads = s.heads[1] - s.heads[0], s.kv_heads[1] - s.kv_heads[0]
            a.qkv = _meta_linear(c.hidden, tp * (a.heads + 2 * a.kv_heads) * c.head_dim, c.qkv_bias)
            a.out = _meta_linear(tp * a.heads * c.head_dim, c.hidden, False)
            if c.qk_norm:
                a.q_norm.shard(a.heads * c.head_dim, c.heads * c.head_dim, mesh.get_group())
                a.k_norm.shard(a.kv_heads * c.head_dim, c.kv_heads * c.head_dim, mesh.get_group())
            styles[f"blocks.{i}.attn.qkv"], styles[f"blocks.{i}.attn.out"] = ColwiseParallel(), RowwiseParallel()
        if s.mlp is not None:
            width = s.mlp[1] - s.mlp[0]
            mlp.up_gate = _meta_linear(c.hidden, tp * 2 * width, False)
            mlp.down = _meta_linear(tp * width, c.hidden, False)
            styles[f"blocks.{i}.mlp.up_gate"], styles[f"blocks.{i}.mlp.down"] = ColwiseParallel(), RowwiseParallel()
    if s.vocab is not None:
        styles["embed"] = VocabParallel()
        styles["lm_head"] = ColwiseParallel(output_layouts=Replicate())
    parallelize_module(model.llm, mesh, styles)
    return s


def _meta_linear(n_in: int, n_out: int, bias: bool) -> nn.Module:
    from .layers import Linear

    with torch.device("meta"):
        return Linear(n_in, n_out, bias=bias)


@torch.no_grad()
def load_shards(model: nn.Module, entries: dict, split: Split, dtype: torch.dtype, device) -> int:
    """Fill a parallelized meta-device model with this rank's slices of a snapshot's tensor `entries`
    (checked beforehand against the whole model: `loading.checked_entries`). Returns the bytes read."""
    model.to(dtype).to_empty(device=device)
    total = 0
    c = model.config.llm
    for name, p in model.named_parameters():
        local = p.to_local() if isinstance(p, DTensor) else p
        e = entries[published_name(name)]
        where = local_slice(name, c, split)
        rows, cols = where if where is not None else ([(0, e.shape[0])], None)
        staged = local if local.is_cpu else torch.empty(local.shape, dtype=local.dtype)  # via the host
        total += read_slice(e, staged, rows, cols)  # checks the values are finite
        if staged is not local:
            local.copy_(staged)
    return total


def local_numel(shape: tuple[int, ...], where: tuple[list[Span], Span | None] | None) -> int:
    """The number of values a rank holds of a tensor of `shape` given its `local_slice`."""
    if where is None:
        return math.prod(shape)
    rows, cols = where
    width = (cols[1] - cols[0]) if cols else math.prod(shape[1:])
    return sum(b - a for a, b in rows) * width


def weights_per_rank_gb(model: nn.Module, tp: int, itemsize: int = 2) -> float:
    """The weights one rank of `tp` would hold of `model` (a whole one: `Molmo.meta(config)`), in GB:
    the largest share, bf16 by default."""
    c = model.config.llm
    shares = [sum(local_numel(tuple(p.shape), local_slice(name, c, plan(c, tp, rank)))
                  for name, p in model.named_parameters()) for rank in range(tp)]
    return max(shares) * itemsize / 1e9


def tp_mesh(tp: int, device: torch.device) -> DeviceMesh:
    """The 1-D mesh of `tp` ranks: the launched processes (torchrun), with a process group set up
    here if there is none yet (NCCL on CUDA, gloo on CPU; collectives time out after TIMEOUT_S)."""
    if not isinstance(tp, int) or tp < 1:
        raise ValueError(f"tp must be a positive integer, got {tp!r}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if dist.is_initialized():
        world = dist.get_world_size()
    if tp != world:
        raise ValueError(f"tp={tp} needs {tp} processes, one per rank (torchrun --nproc-per-node {tp}); "
                         f"this run has {world}")
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        timeout = timedelta(seconds=TIMEOUT_S)
        if "MASTER_ADDR" in os.environ:
            dist.init_process_group(backend, timeout=timeout)
        else:  # one process, not launched by torchrun
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    return init_device_mesh(device.type, (tp,))


def rank_device(device: torch.device) -> torch.device:
    """This rank's device: on CUDA, the GPU of its local rank."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device
