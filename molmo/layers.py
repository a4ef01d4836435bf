"""The linear layer every stage uses: nn.Linear, with a faster bf16 path on CPUs without bf16 math."""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

MIN_ROWS = 64  # below this (decoding), reading bf16 weights beats converting them


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
    sums are fp32 in either case, and it is ~5x faster there (prefill). Single rows keep bf16."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.is_cpu and x.dtype == self.weight.dtype == torch.bfloat16
                and x.numel() >= MIN_ROWS * x.shape[-1] and not cpu_has_bf16_math()):
            bias = None if self.bias is None else self.bias.float()
            return F.linear(x.float(), self.weight.float(), bias).to(torch.bfloat16)
        return super().forward(x)


def checkpointed(block: nn.Module, enabled: bool, *args):
    """block(*args), recomputing its activations in the backward pass when `enabled` and gradients
    are on (activation checkpointing): the same gradients, a fraction of the memory."""
    if enabled and torch.is_grad_enabled():
        return checkpoint(block, *args, use_reentrant=False)
    return block(*args)
