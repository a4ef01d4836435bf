"""Weight-only quantization of the decoder's linear layers: int8 and int4, on PyTorch's own kernels.

- int8: one scale per output channel, w ~ q * scale (q in -127..127).
- int4: groups of GROUP_SIZE inputs per output channel, w ~ (q - 8) * scale + zero (q in 0..15,
  scale and zero in bf16), PyTorch's packed int4 layout (its `_weight_int4pack_mm` kernels).
Stored in a snapshot device-independently (`X.weight` int8 [out, in], or uint8 [out, in/2] with two
4-bit values per byte, the low nibble first; `X.weight_scale`, `X.weight_zero` [out, in/group] for
int4), with `quantization_config` in config.json naming the scheme; packed for the kernel when loaded.
Embeddings, norms, biases, the ViT and the connector keep the model's dtype.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .layers import MIN_ROWS, cpu_has_bf16_math, scratch, streamed_product, takes_streamed_product

SCHEMES = ("int8", "int4")
GROUP_SIZE = 64  # int4: inputs sharing a scale and zero
DEQUANT_ELEMENTS = 1 << 24  # fp32 weights dequantized at a time for a prompt's rows on CPU (64 MB, kept)
QUANT_METHOD = "molmo"  # config.json's quantization_config.quant_method: other readers refuse it by name


def check_scheme(scheme: str | None) -> str | None:
    if scheme is not None and scheme not in SCHEMES:
        raise ValueError(f"quantize must be one of {', '.join(SCHEMES)} (or None), got {scheme!r}")
    return scheme


def snapshot_scheme(folder: Path) -> str | None:
    """The scheme a snapshot's config.json names in `quantization_config` (None: not quantized);
    one clear error for another quantizer's (bitsandbytes, AWQ, ...) or a malformed entry."""
    where = Path(folder) / "config.json"
    q = json.loads(where.read_text()).get("quantization_config")
    if q is None:
        return None
    method = q.get("quant_method") if isinstance(q, dict) else None
    if method != QUANT_METHOD:
        raise ValueError(f"{where}: quantization_config names quant_method {method!r}; molmo reads its own "
                         f"({QUANT_METHOD!r}, written by convert_weights.py quantize) and unquantized snapshots")
    scheme = {8: "int8", 4: "int4"}.get(q.get("bits"))
    if scheme is None or (scheme == "int4" and q.get("group_size") != GROUP_SIZE):
        raise ValueError(f"{where}: quantization_config {q} is not one molmo reads (bits 8, or bits 4 with "
                         f"group_size {GROUP_SIZE})")
    return scheme


def quantization_config(scheme: str) -> dict:
    """The config.json entry of a saved quantized snapshot."""
    out = {"quant_method": QUANT_METHOD, "bits": 8 if scheme == "int8" else 4,
           "modules": "decoder linear layers (blocks and lm_head)"}
    return out | ({"group_size": GROUP_SIZE} if scheme == "int4" else {})


def quantize_int8(w: torch.Tensor) -> dict[str, torch.Tensor]:
    """w [out, in] float -> {"weight": int8 [out, in], "weight_scale": fp32 [out]}."""
    w = w.float()
    scale = w.abs().amax(1).clamp(min=1e-12) / 127
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return {"weight": q, "weight_scale": scale}


def quantize_int4(w: torch.Tensor, group: int = GROUP_SIZE) -> dict[str, torch.Tensor]:
    """w [out, in] float -> {"weight": uint8 [out, in/2] (two 4-bit values per byte, low first),
    "weight_scale", "weight_zero": bf16 [out, in/group]}: w ~ (q - 8) * scale + zero, per group."""
    out_f, in_f = w.shape
    g = w.float().reshape(out_f, in_f // group, group)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / 15).clamp(min=1e-12).to(torch.bfloat16)
    zero = (lo + 8 * scale.float()).to(torch.bfloat16)  # the value of q = 8
    q = torch.round((g - zero.float()[..., None]) / scale.float()[..., None] + 8).clamp(0, 15)
    q = q.to(torch.uint8).reshape(out_f, in_f)
    return {"weight": q[:, 0::2] | (q[:, 1::2] << 4), "weight_scale": scale, "weight_zero": zero}


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [out, in/2] -> the 4-bit values, uint8 [out, in]."""
    return torch.stack([packed & 15, packed >> 4], -1).flatten(-2)


def dequantize(scheme: str, t: dict[str, torch.Tensor]) -> torch.Tensor:
    """The float weight [out, in] (fp32) a quantized one stands for."""
    if scheme == "int8":
        return t["weight"].float() * t["weight_scale"][:, None]
    q = unpack_int4(t["weight"]).float()
    out_f, in_f = q.shape
    groups = t["weight_scale"].shape[1]
    q = q.reshape(out_f, groups, in_f // groups)
    scale, zero = t["weight_scale"].float()[..., None], t["weight_zero"].float()[..., None]
    return ((q - 8) * scale + zero).reshape(out_f, in_f)


def stored_shapes(scheme: str, out_f: int, in_f: int) -> dict[str, tuple[tuple[int, ...], str]]:
    """Suffix ("weight", ...) -> (shape, safetensors dtype) of one quantized layer in a snapshot."""
    if scheme == "int8":
        return {"weight": ((out_f, in_f), "I8"), "weight_scale": ((out_f,), "F32")}
    groups = in_f // GROUP_SIZE
    return {"weight": ((out_f, in_f // 2), "U8"), "weight_scale": ((out_f, groups), "BF16"),
            "weight_zero": ((out_f, groups), "BF16")}


class QuantLinear(nn.Module):
    """A linear layer with quantized weights: x [..., in] (bf16 or fp32) -> [..., out] in x's dtype.

    Holds its weights in the kernel's form only: int8 `weight` [out, in] and `weight_scale` [out];
    int4 `packed` (PyTorch's int4 layout for this device) and `scale_zero` [in/group, out, 2]; the
    scales in the model's dtype (`module.to(dtype)` converts them, as it converts biases).
    On CPU a prompt's rows in fp32 (or bf16 without bf16 math) multiply the dequantized weight instead.
    """

    def __init__(self, scheme: str, in_features: int, out_features: int, bias: bool):
        super().__init__()
        if scheme == "int4" and (in_features % GROUP_SIZE or out_features % 16):
            raise ValueError(f"int4 needs input sizes divisible by {GROUP_SIZE} and output sizes by 16, "
                             f"got a layer of {in_features} -> {out_features}")
        self.scheme, self.in_features, self.out_features = scheme, in_features, out_features
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        names = ("weight", "weight_scale") if scheme == "int8" else ("packed", "scale_zero")
        for name in names:
            self.register_buffer(name, torch.empty(0))  # filled by `set_weights`

    def set_weights(self, stored: dict[str, torch.Tensor]) -> None:
        """Take the stored form (see the module docstring) and pack it for this device's kernel."""
        if self.scheme == "int8":
            self.weight, self.weight_scale = stored["weight"], stored["weight_scale"]
            return
        self.scale_zero = torch.stack([stored["weight_scale"], stored["weight_zero"]], -1).transpose(0, 1).contiguous()
        w = stored["weight"]
        if w.is_cuda:  # tinygemm's tiled layout, from values packed high nibble first
            q = unpack_int4(w)  # [out, in] values 0..15
            self.packed = torch._convert_weight_to_int4pack((q[:, 0::2] << 4) | q[:, 1::2], 8)
        else:  # the CPU layout packs blocks of 64 rows alone: a few thousand rows at a time bound the int32 copy
            self.packed = torch.empty_like(w)
            for i in range(0, len(w), 4096):
                self.packed[i:i + 4096] = torch._convert_weight_to_int4pack_for_cpu(unpack_int4(w[i:i + 4096]).int(), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])  # [N, in]
        backward = passes_gradient(x2)  # PyTorch's int8/int4 kernels have no backward
        dtype = self._dequantized_dtype(x2, backward)
        if dtype is not None:
            y = self._dequantized_product(x2.to(dtype)).to(x.dtype)
        elif backward and not (x.is_cuda and self.scheme == "int8"):
            raise RuntimeError(f"{self.scheme} weights on {x.device.type}: PyTorch's kernel has no backward, so no "
                               "gradient passes through this layer; fine-tune the unquantized model")
        elif self.scheme == "int8" and takes_streamed_product(x2):
            return streamed_product(x, self.weight, self.bias, self.weight_scale)  # 1.5-2x the kernel's pace
        elif self.scheme == "int8":
            if x.is_cuda:  # the per-channel scale factors out of the product
                y = F.linear(x2, self.weight.to(x.dtype)) * self.weight_scale.to(x.dtype)
            else:
                y = torch._weight_int8pack_mm(x2, self.weight, _as(self.weight_scale, x.dtype))
        elif x.is_cuda:
            y = torch._weight_int4pack_mm(x2.to(torch.bfloat16), self.packed, GROUP_SIZE,
                                          _as(self.scale_zero, torch.bfloat16)).to(x.dtype)
        elif torch.compiler.is_compiling() and hasattr(torch.ops.quantized, "int4mm_packed_weight_cpu"):
            # the op inductor lowers it to, with the group size as a tensor of the graph's own: inductor's
            # lowering makes it a constant, which fails in a nested compile region
            group = torch.full((), GROUP_SIZE, dtype=torch.int64)
            y = torch.ops.quantized.int4mm_packed_weight_cpu(x2, self.packed, group, _as(self.scale_zero, x.dtype))
        else:
            y = torch._weight_int4pack_mm_for_cpu(x2, self.packed, GROUP_SIZE, _as(self.scale_zero, x.dtype))
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)

    def _dequantized_dtype(self, x: torch.Tensor, backward: bool) -> torch.dtype | None:
        """The dtype in which x [N, in] multiplies the dequantized weight, or None for the kernels. On CPU,
        for a prompt's rows: fp32 for fp32 rows and for bf16 ones without bf16 math (as `molmo.layers.Linear`
        does then); bf16 for bf16 rows on int8 weights (~2.6x the int8 kernel's pace for a prompt; the int4
        kernel is as fast as this). Rows that need a gradient take it too, however few: a frozen quantized
        decoder passes gradients back to the parts before it (the ViT, the connector, their adapters)."""
        if not x.is_cpu or ((torch.compiler.is_compiling() or len(x) < MIN_ROWS) and not backward):
            return None  # compiled steps and a token's rows: the kernels
        if self.scheme == "int4" and not self._cpu_layout_known():
            return None  # only the kernel reads the layout
        if x.dtype == torch.float32 or not cpu_has_bf16_math():
            return torch.float32
        return torch.bfloat16 if self.scheme == "int8" or backward else None

    def _cpu_layout_known(self) -> bool:
        block = int4_cpu_block()
        return self.packed.is_cpu and block is not None and self.out_features % block == 0

    def _dequantized_product(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, in] @ the dequantized weight in x's dtype (fp32, or bf16: the weight rounded to bf16), a
        block of output channels at a time. PyTorch's int8/int4 CPU kernels run fp32 activations ~20x slower
        than this for a prompt's rows (and bf16 ones 1.3-1.6x slower where the CPU lacks bf16 math)."""
        step = max(64, DEQUANT_ELEMENTS // self.in_features // 64 * 64)
        grad = passes_gradient(x)  # autograd keeps each block: no shared buffer then
        buf = None if grad else scratch("dequantized", (min(step, self.out_features) * self.in_features,))
        parts = [x @ self.dequantized(o, o + step, out=buf).to(x.dtype).T
                 for o in range(0, self.out_features, step)]
        return parts[0] if len(parts) == 1 else torch.cat(parts, 1)

    def dequantized(self, start: int = 0, end: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """The fp32 weight [end - start, in] of output channels start..end (on CPU; int4: start a multiple
        of 64), as `dequantize` gives it from the stored form (int4: read back from PyTorch's packed
        layout); written into the front of the flat buffer `out` when given."""
        end = min(end or self.out_features, self.out_features)
        rows = end - start
        n = rows * self.in_features
        w = (torch.empty(n, dtype=torch.float32) if out is None else out[:n]).view(rows, -1)
        if self.scheme == "int8":
            return torch.mul(self.weight[start:end], self.weight_scale[start:end, None].float(), out=w)
        w.copy_(self.int4_values(start, end))
        scale, zero = self.scale_zero[:, start:end].float().unbind(-1)  # [in/group, rows] each
        g = w.view(rows, -1, GROUP_SIZE)
        return g.sub_(8).mul_(scale.T[..., None]).add_(zero.T[..., None]).view(rows, -1)

    def int4_values(self, start: int = 0, end: int | None = None) -> torch.Tensor:
        """The 4-bit values [end - start, in] (uint8, 0..15) of int4 output channels start..end, read back
        from PyTorch's packed CPU layout in blocks of 64 rows."""
        end = min(end or self.out_features, self.out_features)
        if not self._cpu_layout_known():
            raise ValueError(f"int4 weights in PyTorch's {self.packed.device.type} layout cannot be read back (only "
                             "the CPU layouts of its AVX2 and AVX-512 kernels)")
        if start % 64:
            raise ValueError(f"int4 weights read back from the CPU layout in blocks of 64 rows, not from row {start}")
        packed = self.packed[start:end].view(-1, self.in_features, int4_cpu_block() // 2)  # [blocks, in, block/2]
        return torch.cat([packed & 15, packed >> 4], -1).transpose(1, 2).reshape(end - start, -1)

    def stored(self) -> dict[str, torch.Tensor]:
        """The weights in a quantized snapshot's stored form (the module docstring's), on CPU: what
        `set_weights` takes and `convert_weights.py quantize` writes."""
        if self.scheme == "int8":
            return {"weight": self.weight.cpu(), "weight_scale": self.weight_scale.float().cpu()}
        q = self.int4_values()
        scale, zero = self.scale_zero.transpose(0, 1).bfloat16().unbind(-1)  # [out, in/group] each
        return {"weight": q[:, 0::2] | (q[:, 1::2] << 4), "weight_scale": scale.contiguous(),
                "weight_zero": zero.contiguous()}


@functools.cache
@torch.compiler.assume_constant_result  # a compiled forward reads the answer, not the probe
def int4_cpu_block() -> int | None:
    """Rows per block of PyTorch's packed int4 CPU layout on this machine (its kernels pick it by CPU:
    32 with AVX2, 64 with AVX-512), found by packing a probe: within a block each input column holds
    block/2 bytes, row j in the low nibble of byte j and row j + block/2 in the high one. None when
    the layout is neither (then only the kernel reads it)."""
    q = torch.randint(0, 16, (128, 128), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    try:
        packed = torch._convert_weight_to_int4pack_for_cpu(q, 1)
    except RuntimeError:  # no int4 CPU kernel in this build
        return None
    for block in (32, 64):
        p = packed.view(-1, 128, block // 2)
        if torch.equal(torch.cat([p & 15, p >> 4], -1).transpose(1, 2).reshape(128, 128).int(), q):
            return block
    return None


def passes_gradient(x: torch.Tensor) -> bool:
    """Whether a product of x must pass a gradient back to x (the weights here never take one)."""
    return torch.is_grad_enabled() and x.requires_grad


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Scales in the activations' dtype; loading already stores them so (a cast here would also
    keep torch.compile from lowering the kernel)."""
    return t if t.dtype == dtype else t.to(dtype)


def quantizable(model: nn.Module) -> list[str]:
    """Names of the decoder's linear layers that quantization replaces (blocks and lm_head)."""
    return [n for n, m in model.named_modules()
            if n.startswith("llm.") and isinstance(m, nn.Linear) and not n.startswith("llm.embed")]


def replace_linears(model: nn.Module, scheme: str) -> list[str]:
    """Swap the decoder's linear layers of a meta-device model for QuantLinear; -> their names."""
    names = quantizable(model)
    for name in names:
        old = model.get_submodule(name)
        parent, _, attr = name.rpartition(".")
        with torch.device("meta"):
            new = QuantLinear(scheme, old.in_features, old.out_features, old.bias is not None)
        setattr(model.get_submodule(parent), attr, new)
    return names


def quantize_tensor(scheme: str, w: torch.Tensor) -> dict[str, torch.Tensor]:
    return quantize_int8(w) if scheme == "int8" else quantize_int4(w)


@torch.no_grad()
def quantize_model(model: nn.Module, scheme: str) -> nn.Module:
    """Quantize an in-memory model's decoder linear layers in place (e.g. after fine-tuning)."""
    check_scheme(scheme)
    for name in quantizable(model):
        old = model.get_submodule(name)
        getattr(old, "unpack", lambda: None)()  # plain weights, if generation packed them (`molmo.layers.Linear.pack`)
        parent, _, attr = name.rpartition(".")
        with torch.device("meta"):
            new = QuantLinear(scheme, old.in_features, old.out_features, old.bias is not None)
        if old.bias is not None:
            new.bias = nn.Parameter(old.bias.detach(), requires_grad=False)
        new.set_weights(quantize_tensor(scheme, old.weight.detach()))
        new.to(old.weight.dtype)  # scales in the model's dtype
        setattr(model.get_submodule(parent), attr, new)
    return model
