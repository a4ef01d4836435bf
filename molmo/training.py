"""Fine-tuning: freezing, LoRA targets, AdamW with warm-up and cosine decay, exact loss over
accumulated and data-parallel batches, resumable checkpoints, and the published-layout output.

One optimizer step sees a global batch of `batch_size * grad_accum` records. Its loss is the
reference's loss over that whole batch (weights summed over every micro-batch and every rank),
so one process, gradient accumulation and FSDP2 across processes all compute the same update.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch
import torch.distributed as dist
from torch import nn

from .data import epoch_order
from .model import Molmo

PARTS = ("vision", "connector", "llm")
# peft LoRA targets: the decoder's linear layers (module names end with these).
LORA_TARGETS = ("qkv", "out", "up_gate", "down")


def freeze(model: Molmo, parts: Iterable[str]) -> None:
    """Stop gradients for whole parts ("vision", "connector", "llm"); they get no optimizer state."""
    for part in parts:
        if part not in PARTS:
            raise ValueError(f"cannot freeze {part!r}: parts are {', '.join(PARTS)}")
        getattr(model, part).requires_grad_(False)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def add_lora(model: Molmo, rank: int, alpha: float | None = None, targets: Iterable[str] = LORA_TARGETS):
    """Wrap the model with peft LoRA adapters on `targets` (see LORA_TARGETS); the base is frozen."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ImportError('LoRA needs peft: pip install -e ".[train]" (or pip install peft)') from None
    config = LoraConfig(r=rank, lora_alpha=alpha or 2 * rank, target_modules=list(targets), lora_dropout=0.0)
    model.pack_for_inference(enabled=False)  # peft reads the plain weights
    return get_peft_model(model, config)


def unwrap(model: nn.Module) -> Molmo:
    """The Molmo inside a peft wrapper (adapters still attached), or the model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def merged(model: nn.Module) -> Molmo:
    """The Molmo inside a peft wrapper with its LoRA adapters merged into the weights; or the model."""
    unwrap(model).pack_for_inference(enabled=False)  # merging adds into the plain weights
    return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model


def schedule(optimizer: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over `warmup` steps, then cosine decay to zero at `total`."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@dataclass(frozen=True)
class Plan:
    """Which records each step reads: a global batch of `batch_size` rows per micro-step,
    `grad_accum` micro-steps, rows dealt to the ranks in turn."""

    n_records: int
    batch_size: int
    grad_accum: int = 1
    seed: int = 0
    world: int = 1
    rank: int = 0

    def __post_init__(self):
        if self.batch_size % self.world:
            raise ValueError(f"batch size {self.batch_size} does not split over {self.world} processes")

    @property
    def records_per_step(self) -> int:
        return self.batch_size * self.grad_accum

    def micro_batches(self, step: int) -> list[list[int]]:
        """This rank's record indices for each micro-step of optimizer step `step` (0-based)."""
        start = step * self.records_per_step
        picked = [self._index(start + k) for k in range(self.records_per_step)]
        return [picked[m * self.batch_size:(m + 1) * self.batch_size][self.rank::self.world]
                for m in range(self.grad_accum)]

    def _index(self, k: int) -> int:
        epoch, i = divmod(k, self.n_records)
        return epoch_order(self.n_records, self.seed, epoch)[i]


def _all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(x)
    return x


def train_step(model: nn.Module, batches: list[dict[str, torch.Tensor]], z_loss_scale: float | None = None,
               world: int = 1) -> torch.Tensor:
    """Forward and backward over this rank's micro-batches of one step; returns the global loss.

    Each micro-batch's loss is re-weighted from its own token weight to that of the whole global
    batch (all micro-batches, all ranks); `world` undoes FSDP's averaging of gradients over ranks.
    """
    device = next(model.parameters()).device
    if world > 1:  # every rank must run the same modules (FSDP gathers their weights together)
        batches = [with_blank_image(b, unwrap(model).config.vision) for b in batches]
    local = torch.stack([b["loss_masks"].clamp(min=0).sum() for b in batches]).to(device)
    total = _all_reduce_sum(local.sum().clone()).clamp(min=1)
    loss_sum = torch.zeros((), device=device)
    for b, w in zip(batches, local):
        b = {k: v.to(device) for k, v in b.items()}
        loss = model(**b, z_loss_scale=z_loss_scale, return_logits=False).loss * (w.clamp(min=1) / total)
        (loss * world).backward()
        loss_sum += loss.detach()
    return _all_reduce_sum(loss_sum)


def with_blank_image(batch: dict[str, torch.Tensor], v) -> dict[str, torch.Tensor]:
    """A text-only batch with one crop of batch padding (all -1, feeding no token) added: the
    vision modules run and contribute exactly nothing."""
    if "images" in batch:
        return batch
    B = batch["input_ids"].shape[0]
    return {**batch, "images": torch.full((B, 1, v.grid**2, v.patch_dim), -1.0),
            "image_masks": torch.full((B, 1, v.grid**2), -1.0),
            "image_input_idx": torch.full((B, 1, v.pooled_grid**2), -1, dtype=torch.long)}


def clip_and_step(model: nn.Module, optimizer, scheduler, max_norm: float | None) -> float | None:
    norm = None
    if max_norm:
        norm = torch.nn.utils.clip_grad_norm_(trainable_parameters(model), max_norm)
        norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return norm


# Resumable checkpoints: trainable weights and optimizer through torch.distributed.checkpoint
# (sharded under FSDP2), the step and scheduler beside them; written to a temporary folder and
# renamed into place, so a kill leaves the previous checkpoint whole.
CKPT = "checkpoint"


def _options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=True, strict=False)


def _is_main() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def save_checkpoint(out: Path, model: nn.Module, optimizer, scheduler, step: int, extra: dict | None = None) -> Path:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    out = Path(out)
    final, tmp = out / CKPT, out / f"{CKPT}.tmp"
    if _is_main():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    msd, osd = get_state_dict(model, optimizer, options=_options())
    with warnings.catch_warnings():  # one process without a process group is a supported case
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=tmp)
    if _is_main():
        state = {"step": step, "scheduler": scheduler.state_dict(), **(extra or {})}
        torch.save(state, tmp / "trainer.pt")
        old = out / f"{CKPT}.old"
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def load_checkpoint(out: Path, model: nn.Module, optimizer, scheduler) -> dict | None:
    """Restore the last checkpoint under `out` (None if there is none); returns its trainer state."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    folder = Path(out) / CKPT
    if not (folder / "trainer.pt").is_file():
        return None
    msd, osd = get_state_dict(model, optimizer, options=_options())
    state = {"model": msd, "optim": osd}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=folder)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=_options())
    trainer = torch.load(folder / "trainer.pt", weights_only=True)
    scheduler.load_state_dict(trainer["scheduler"])
    return trainer


def full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter as a whole CPU tensor (gathered from the ranks under FSDP2: a collective)."""
    out = {}
    for name, p in model.named_parameters():
        t = p.detach()
        out[name] = (t.full_tensor() if hasattr(t, "full_tensor") else t).cpu()
    return out


def save_snapshot(model: Molmo, out: Path, source: Path, state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the files of a Molmo snapshot in the published layout into `out`: safetensors under the
    published names, and the source snapshot's config, tokenizer, preprocessor and code files. A model
    with quantized weights writes a quantized snapshot (the weights' stored form, `quantization_config`).

    Everything is written to a temporary folder first, then moved in (the weights' index last);
    other folders in `out` (the training checkpoint) stay."""
    from .checkpoint import INDEX_FILE, write_snapshot
    from .convert import SHARD_BYTES, copy_side_files
    from .loading import quantized_tensors
    from .names import published_name
    from .quant import QuantLinear, quantization_config

    out, source = Path(out), Path(source)
    state = state if state is not None else full_state(model)
    names = {published_name(n): t for n, t in state.items()}
    quantized, read_back = quantized_tensors(model)
    schemes = {m.scheme for m in model.modules() if isinstance(m, QuantLinear)}  # quantize_model: one scheme
    tmp = out / ".snapshot.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write_snapshot(tmp, [(n, tuple(t.shape), t.dtype) for n, t in names.items()] + quantized,
                   lambda n: names[n] if n in names else read_back(n), max_shard_bytes=SHARD_BYTES)
    copy_side_files(source, tmp)
    config = json.loads((tmp / "config.json").read_text()) if (tmp / "config.json").is_file() else model.config.to_hf()
    config["torch_dtype"] = str(next(iter(state.values())).dtype).removeprefix("torch.")
    config.pop("quantization_config", None)  # the source's says nothing of these weights
    if schemes:
        config["quantization_config"] = quantization_config(*schemes)
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    for f in out.iterdir():  # weights of an earlier snapshot here would mix with the new ones
        if f.is_file() and (f.name.endswith(".safetensors") or f.name == INDEX_FILE):
            f.unlink()
    for f in sorted(tmp.iterdir(), key=lambda f: f.name == INDEX_FILE):
        os.replace(f, out / f.name)
    tmp.rmdir()
    return out


__all__ = ["PARTS", "LORA_TARGETS", "Plan", "freeze", "trainable_parameters", "add_lora", "unwrap", "merged",
           "schedule", "train_step", "clip_and_step", "save_checkpoint", "load_checkpoint", "full_state",
           "save_snapshot"]
