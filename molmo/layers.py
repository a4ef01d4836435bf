"""The linear layer every stage uses: nn.Linear, with a faster bf16 path on CPUs without bf16 math,
weights packed in oneDNN's layout for CPU inference (`Linear.pack`), and single-row CPU products written
as reductions in compiled decode steps (`streamed_product`)."""
from __future__ import annotations

import functools
import math
import threading

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

MIN_ROWS = 64  # below this (decoding), reading bf16 weights beats converting them
PACK_ROWS = 16  # packed weights take oneDNN's layout for this many rows: in fp32 the products of 8 rows run
# 1.4x and a prompt's 1.25x as fast as in its one-row layout, a single row's ~10% slower (bf16: no change)
SPLIT_K = 1024  # a compiled single-row CPU product sums over input chunks of at most this many features
SCRATCH_MAX = 64 << 20  # elements (256 MB of float32) a scratch buffer keeps between calls

_scratch = threading.local()


def scratch(name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """A float32 CPU buffer reused across calls, per thread and name: fresh large allocations cost more
    in page faults than the arithmetic done in them. Only for intermediates that never leave the caller."""
    n = math.prod(shape)
    buf = getattr(_scratch, name, None)
    if buf is None or buf.numel() < n:
        buf = torch.empty(n, dtype=torch.float32)
        if n <= SCRATCH_MAX:
            setattr(_scratch, name, buf)
    return buf[:n].view(shape)


@functools.cache
def cpu_has_bf16_math() -> bool:
    """Whether oneDNN has native bf16 matrix instructions here (AVX512-BF16, AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # unknown: keep torch's own kernels
        return True


class Linear(nn.Linear):
    """nn.Linear. On a CPU without bf16 instructions, a bf16 product of many rows runs as an fp32
    product of the same bf16 values, rounded back to bf16: the products are exact in fp32 and the
    sums are fp32 in either case, and it is ~5x faster there (prefill). Single rows keep bf16.

    `pack()` moves the weight's values into oneDNN's blocked layout (`self.packed`; the parameter
    keeps its identity with an empty storage, so nothing is held twice): one- and few-row products
    then stream the weight about twice as fast as torch's default on CPU (decoding), and fp32 products of
    many rows run ~1.3x as fast (prompts, the ViT). Anything that needs the plain weight gets it back
    first: a forward that needs a gradient (of its input too: a frozen layer in the backward path), runs
    under autocast or in another dtype, `.to()`, saving, loading, `unpack()`."""

    packed: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (takes_streamed_product(x) and x.dtype == self.weight.dtype
                and type(self.weight) is nn.Parameter):  # not a distributed (tensor-parallel) weight
            return streamed_product(x, self.weight, self.bias)
        if self.packed is not None:
            grad = torch.is_grad_enabled() and any(
                t is not None and t.requires_grad for t in (x, self.weight, self.bias))
            if x.dtype == self.packed.dtype and not torch.is_autocast_enabled(x.device.type) and not grad:
                return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [None], "")
            # gradients (oneDNN's packed product has none: it would drop them), autocast or another dtype:
            self.unpack()  # the plain weight, as before packing
        if (x.is_cpu and x.dtype == self.weight.dtype == torch.bfloat16
                and x.numel() >= MIN_ROWS * x.shape[-1] and not cpu_has_bf16_math()):
            bias = None if self.bias is None else self.bias.float()
            return F.linear(x.float(), self.weight.float(), bias).to(torch.bfloat16)
        return super().forward(x)

    def pack(self) -> None:
        if self.packed is None:
            self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), PACK_ROWS)
            self.weight.data = torch.empty(0, dtype=self.weight.dtype)

    def unpack(self) -> None:
        if self.packed is not None:
            self.weight.data = self.packed.to_dense()
            self.packed = None

    def _apply(self, fn, recurse=True):  # .to(), .cuda(), .bfloat16() convert the plain weight
        self.unpack()
        return super()._apply(fn, recurse)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.packed is not None:
            destination[prefix + "weight"] = self.packed.to_dense()

    def _load_from_state_dict(self, *args, **kwargs):
        self.unpack()
        super()._load_from_state_dict(*args, **kwargs)


def computed_once(x: torch.Tensor) -> torch.Tensor:
    """x; while compiling, computed into a buffer of its own inside the fused kernel (inductor's
    `force_stride_order`, registered whenever dynamo traces): a product's input (a norm, SiLU) is then
    computed once, not once per output feature inside the product's loop (71 ms a bf16 step against 48)."""
    if not torch.compiler.is_compiling() or not all(isinstance(n, int) for n in x.shape):
        return x  # eager, or dynamic shapes: the op takes fixed strides (and dynamo fails on symbolic ones)
    contiguous = [math.prod(x.shape[i + 1:]) for i in range(x.dim())]
    return torch.ops.prims.inductor_force_stride_order(x, contiguous)


def takes_streamed_product(x: torch.Tensor) -> bool:
    """Whether a product of x is computed as `streamed_product`: while compiling, one row (batch-1
    decoding) on CPU, no autocast, no gradients. With more rows inductor's loop falls behind the plain
    product; eager, oneDNN's packed products are faster than the reduction."""
    return (torch.compiler.is_compiling() and x.is_cpu and x.numel() == x.shape[-1]
            and not torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu"))


def streamed_product(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None,
                     scale: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ w [N, K].T (times a per-output `scale` [N], plus bias) as an fp32 sum of products over
    chunks of K, rounded once to x's dtype: the linear layer's arithmetic in another order (w may be
    int8, with its scale: the quantized product). Under torch.compile on CPU a single row's product
    becomes one vectorized loop that streams the weight, ~1.3-1.5x the pace of oneDNN's packed
    single-row products (decoding); chunks give long rows (the MLP's down projection) work for both
    cores."""
    N, K = w.shape
    lead = x.shape[:-1]
    rows = computed_once(x.reshape(-1, K))  # [M, K]
    if w.dtype == torch.int8 and rows.dtype != torch.float32:  # the rounded row in fp32, once, not once per
        rows = computed_once(rows.float())  # output feature: int8's loop is bound by its arithmetic (1.09-1.25x)
    s = 1
    while K % (2 * s) == 0 and K // s > SPLIT_K:
        s *= 2
    parts = (w.view(N, 1, s, K // s).float() * rows.view(1, -1, s, K // s).float()).sum(-1)  # [N, M, s]
    out = parts.sum(-1).t()  # [M, N]
    if scale is not None:
        out = out * scale.float()
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype).reshape(*lead, N)


def can_pack(module: nn.Module) -> bool:
    """Whether packing (`Linear.pack`) would speed up `module`'s products: CPU weights, fp32, or bf16 where
    the CPU has bf16 math (oneDNN's bf16 products are slow without it)."""
    w = next((m.weight for m in module.modules() if isinstance(m, Linear)), None)
    if w is None or w.device.type != "cpu" or hasattr(w, "to_local"):  # none, not on CPU, or a DTensor
        return False
    return w.dtype == torch.float32 or (w.dtype == torch.bfloat16 and cpu_has_bf16_math())


def checkpointed(block: nn.Module, enabled: bool, *args):
    """block(*args), recomputing its activations in the backward pass when `enabled` and gradients
    are on (activation checkpointing): the same gradients, a fraction of the memory."""
    if enabled and torch.is_grad_enabled():
        return checkpoint(block, *args, use_reentrant=False)
    return block(*args)
