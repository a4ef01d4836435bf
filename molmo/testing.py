"""Random-weight Molmo checkpoints in the published layout, for tests and benchmarks."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch

from .checkpoint import write_snapshot
from .config import MolmoConfig
from .loading import expected_tensors
from .model import Molmo
from .names import published_name


def random_tensor(name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Values that keep activations in a sane range: norms near 1, weights ~ 1/sqrt(fan_in)."""
    x = torch.randn(shape, generator=gen, device=gen.device)
    if name.endswith(("norm.weight", "ln.weight", "ln_f.weight")):
        return 1 + 0.1 * x
    if len(shape) == 1 or name.endswith(("embedding", "new_embedding", "pad_embed")):
        return 0.5 * x
    return x / math.sqrt(shape[-1])


def random_model(config: MolmoConfig, seed: int = 0, dtype=torch.float32, device="cpu") -> Molmo:
    """A Molmo with random weights, built directly in memory on `device` (no checkpoint)."""
    gen = torch.Generator(device).manual_seed(seed)
    model = Molmo.meta(config)
    for name, p in list(model.named_parameters()):
        t = random_tensor(published_name(name), tuple(p.shape), gen).to(dtype=dtype)
        module, _, attr = name.rpartition(".")
        setattr(model.get_submodule(module), attr, torch.nn.Parameter(t, requires_grad=p.requires_grad))
    return model.eval()


def write_random_checkpoint(folder: str | Path, config: MolmoConfig, seed: int = 0, dtype=torch.float32,
                            max_shard_bytes: int | None = None, tokenizer_dir: str | Path | None = None) -> Path:
    """Write config.json and random weights (one file, or shards past `max_shard_bytes`)."""
    folder = Path(folder)
    gen = torch.Generator().manual_seed(seed)
    shapes = expected_tensors(Molmo.meta(config))
    specs = [(n, s, dtype) for n, s in shapes.items()]
    write_snapshot(folder, specs, lambda n: random_tensor(n, shapes[n], gen), max_shard_bytes=max_shard_bytes)
    (folder / "config.json").write_text(json.dumps(config.to_hf(), indent=2))
    if tokenizer_dir is not None:
        for f in Path(tokenizer_dir).iterdir():
            if f.is_file():
                shutil.copy2(f, folder / f.name)
    return folder
