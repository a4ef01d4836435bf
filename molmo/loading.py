"""Published Molmo checkpoint -> our modules: every name, shape and dtype checked, then filled in
place on a model built on the meta device (names: `molmo.names`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .checkpoint import DTYPES, CheckpointError, read_into, snapshot_tensors
from .names import published_name

def expected_tensors(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Published tensor name -> shape, for a checkpoint of this model (build it on the meta device)."""
    return {published_name(n): tuple(p.shape) for n, p in model.named_parameters()}


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


def check_tensors(want: dict[str, tuple[int, ...]], entries: dict) -> CheckReport:
    """Compare a snapshot's headers with `expected_tensors`: names, shapes and float dtypes."""
    r = CheckReport()
    r.missing = [n for n in want if n not in entries]
    r.unexpected = [f"{n} in {entries[n].file.name}" for n in entries if n not in want]
    for n, shape in want.items():
        e = entries.get(n)
        if e is None:
            continue
        if e.shape != shape:
            r.wrong_shape.append(f"{n} in {e.file.name}: {list(e.shape)}, expected {list(shape)}")
        if e.dtype not in DTYPES:
            r.wrong_dtype.append(f"{n} in {e.file.name}: {e.dtype}, expected a float type (F32, BF16, F16)")
    return r


def load_weights(model: nn.Module, folder: str | Path, dtype: torch.dtype = torch.float32, device="cpu") -> nn.Module:
    """Fill every parameter of a meta-device `model` from the snapshot in `folder`, converting as it
    reads; every name, shape and dtype is checked first."""
    folder = Path(folder)
    entries = snapshot_tensors(folder)
    report = check_tensors(expected_tensors(model), entries)
    if not report.ok:
        raise CheckpointError(f"{folder}: {report.first_problem()}")
    for name, param in list(model.named_parameters()):
        dest = torch.empty(param.shape, dtype=dtype, device=device)
        entry = entries[published_name(name)]
        read_into(entry, dest)
        if not bool(dest.isfinite().all()):
            raise CheckpointError(f"{entry.file}: tensor {entry.name} holds non-finite values (NaN or Inf)")
        module_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(module_name), attr, nn.Parameter(dest, requires_grad=param.requires_grad))
    return model.eval()
