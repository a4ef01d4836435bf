"""Published Molmo checkpoint -> our modules: every name, shape and dtype checked, then filled in
place on a model built on the meta device (names: `molmo.names`)."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .checkpoint import DTYPES, FLOATS, CheckpointError, iter_chunks, read_into, require_finite, snapshot_tensors
from .names import published_name
from .quant import QuantLinear, quantize_tensor, stored_shapes

def expected_tensors(model: nn.Module, stored_quantized: bool = False) -> dict[str, tuple[int, ...]]:
    """Published tensor name -> shape, for a checkpoint of this model (build it on the meta device).
    A quantized model's linear layers expect float weights, or with `stored_quantized` their
    quantized form (`quantized_dtypes` gives its dtypes)."""
    want = {published_name(n): tuple(p.shape) for n, p in model.named_parameters()}
    for name, m in _quantized(model):
        if stored_quantized:
            want.update({n: shape for n, (shape, _) in _stored(name, m).items()})
        else:
            want[published_name(f"{name}.weight")] = (m.out_features, m.in_features)
    return want


def quantized_dtypes(model: nn.Module) -> dict[str, str]:
    """Published name -> safetensors dtype of the tensors of a saved quantized snapshot."""
    return {n: dtype for name, m in _quantized(model) for n, (_, dtype) in _stored(name, m).items()}


def _quantized(model: nn.Module) -> list[tuple[str, QuantLinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLinear)]


def _stored(name: str, m: QuantLinear) -> dict[str, tuple[tuple[int, ...], str]]:
    """Published name -> (shape, dtype) of each tensor a quantized layer is saved as."""
    return {_prefix(name) + k: v for k, v in stored_shapes(m.scheme, m.out_features, m.in_features).items()}


def quantized_tensors(model: nn.Module) -> tuple[list[tuple[str, tuple[int, ...], torch.dtype]], Callable]:
    """What a quantized snapshot holds of the model's quantized layers: (published name, shape, dtype) of
    each stored tensor, and a function name -> that tensor (CPU), read back from its layer one layer at
    a time (`QuantLinear.stored`), so that no second copy of the weights builds up."""
    specs, owner = [], {}
    for name, m in _quantized(model):
        for part, (shape, dtype) in stored_shapes(m.scheme, m.out_features, m.in_features).items():
            owner[_prefix(name) + part] = (m, part)
            specs.append((_prefix(name) + part, shape, DTYPES[dtype]))
    held: dict = {}  # the last layer read back: {layer: its stored form}

    def tensor(n: str) -> torch.Tensor:
        m, part = owner[n]
        if m not in held:
            held.clear()
            held[m] = m.stored()
        return held[m][part]
    return specs, tensor


def _prefix(name: str) -> str:
    """The published name of a layer's weight, less "weight": its stored tensors' names are this + part."""
    return published_name(f"{name}.weight").removesuffix("weight")


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Parameters per part (vision, connector, llm) and in total (a meta-device model will do)."""
    counts = {part: sum(p.numel() for p in getattr(model, part).parameters())
              for part in ("vision", "connector", "llm")}
    counts["total"] = sum(counts.values())
    return counts


@dataclass
class CheckReport:
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    wrong_shape: list[str] = field(default_factory=list)
    wrong_dtype: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.wrong_shape or self.wrong_dtype)

    def first_problem(self) -> str:
        for kind, items in (("missing tensor", self.missing), ("unexpected tensor", self.unexpected),
                            ("wrong shape", self.wrong_shape), ("wrong dtype", self.wrong_dtype)):
            if items:
                more = f" (and {len(items) - 1} more)" if len(items) > 1 else ""
                return f"{kind}: {items[0]}{more}"
        return "ok"


def check_tensors(want: dict[str, tuple[int, ...]], entries: dict, dtypes: dict[str, str] | None = None) -> CheckReport:
    """Compare a snapshot's headers with `expected_tensors`: names, shapes, and float dtypes (or the
    exact ones named in `dtypes`)."""
    r = CheckReport()
    r.missing = [n for n in want if n not in entries]
    r.unexpected = [f"{n} in {entries[n].file.name}" for n in entries if n not in want]
    for n, shape in want.items():
        e = entries.get(n)
        if e is None:
            continue
        if e.shape != shape:
            r.wrong_shape.append(f"{n} in {e.file.name}: {list(e.shape)}, expected {list(shape)}")
        exact = (dtypes or {}).get(n)
        if exact is not None and e.dtype != exact:
            r.wrong_dtype.append(f"{n} in {e.file.name}: {e.dtype}, expected {exact}")
        elif exact is None and e.dtype not in FLOATS:
            r.wrong_dtype.append(f"{n} in {e.file.name}: {e.dtype}, expected a float type (F32, BF16, F16)")
    return r


def check_snapshot(model: nn.Module, entries: dict, stored_quantized: bool = False) -> CheckReport:
    """Every name, shape and dtype of a snapshot's headers against what `model` expects."""
    return check_tensors(expected_tensors(model, stored_quantized), entries,
                         quantized_dtypes(model) if stored_quantized else None)


def checked_entries(model: nn.Module, folder: str | Path, stored_quantized: bool = False) -> dict:
    """The snapshot's tensor entries, after checking every name, shape and dtype against `model`
    (one CheckpointError naming the first problem)."""
    entries = snapshot_tensors(Path(folder))
    report = check_snapshot(model, entries, stored_quantized)
    if not report.ok:
        raise CheckpointError(f"{folder}: {report.first_problem()}")
    return entries


def load_weights(model: nn.Module, folder: str | Path, dtype: torch.dtype = torch.float32, device="cpu",
                 stored_quantized: bool = False) -> nn.Module:
    """Fill every parameter of a meta-device `model` from the snapshot in `folder`, converting as it
    reads; every name, shape and dtype is checked first. The QuantLinear layers of a quantized model
    take their stored quantized form, or float weights quantized one tensor at a time as they load."""
    entries = checked_entries(model, folder, stored_quantized)
    for name, param in list(model.named_parameters()):
        dest = _read(entries[published_name(name)], dtype, device)
        module_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(module_name), attr, nn.Parameter(dest, requires_grad=param.requires_grad))
    for name, m in _quantized(model):
        if stored_quantized:
            m.set_weights({n.rpartition(".")[2]: _read(entries[n], DTYPES[d], device)
                           for n, (_, d) in _stored(name, m).items()})
        else:
            m.set_weights(quantize_rows(entries[published_name(f"{name}.weight")], m.scheme, device))
        m.to(dtype)  # scales in the model's dtype, as the kernels take them
    return model.eval()


def quantize_rows(entry, scheme: str, device="cpu", chunk_bytes: int = 64 << 20) -> dict[str, torch.Tensor]:
    """Quantize a float weight [out, in] as it is read, a block of rows at a time (every scale
    belongs to one row), into preallocated results: memory beyond them stays at about one block."""
    out_f, in_f = entry.shape
    itemsize = DTYPES[entry.dtype].itemsize
    result = {k: torch.empty(shape, dtype=DTYPES[d], device=device)
              for k, (shape, d) in stored_shapes(scheme, out_f, in_f).items()}
    for start, chunk in iter_chunks(entry, max(1, chunk_bytes // (in_f * itemsize)) * in_f * itemsize):
        rows = chunk.view(-1, in_f).to(device, torch.float32)
        require_finite(entry, rows)
        first = start // in_f
        for k, t in quantize_tensor(scheme, rows).items():
            result[k][first:first + len(t)] = t
    return result


def _read(entry, dtype: torch.dtype, device) -> torch.Tensor:
    dest = torch.empty(entry.shape, dtype=dtype, device=device)
    return read_into(entry, dest)
