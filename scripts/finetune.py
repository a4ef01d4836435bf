#!/usr/bin/env python
"""Fine-tune Molmo on JSON-lines records; the result is a Molmo snapshot in the published layout.

    python scripts/finetune.py --model DIR --data train.jsonl --out DIR [--lora-rank 8 | --full] \\
        [--freeze vision,connector] [--steps N | --epochs E] [--lr 1e-4] [--batch-size B] [--grad-accum K] \\
        [--dtype fp32|autocast|bf16] [--gradient-checkpointing] [--save-every N] [--resume] [--seed S]
    torchrun --nproc-per-node 2 scripts/finetune.py ... --fsdp      # FSDP2, data parallel

Records: {"image": path | [paths] | null, "question": ..., "answer": ...} or
{"image": ..., "messages": [user, assistant, ...]} (image paths relative to the data file).
A bad record stops the run before training with one line naming it, or is counted and skipped
with --skip-bad. The last line printed is JSON: initial_loss, final_loss, steps, examples,
tokens_per_s, peak_rss_gb, out.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from molmo import Molmo  # noqa: E402
from molmo.checkpoint import CheckpointError  # noqa: E402
from molmo.convert import check_output  # noqa: E402
from molmo.config import ConfigError  # noqa: E402
from molmo.data import Dataset, RecordError  # noqa: E402
from molmo.hub import resolve_snapshot  # noqa: E402
from molmo.preprocess import MolmoProcessor  # noqa: E402
from molmo import training  # noqa: E402


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def parse_args(argv=None):
    p = _Parser(prog="finetune.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="Molmo snapshot folder or hub id")
    p.add_argument("--data", required=True, type=Path, help="JSON-lines records")
    p.add_argument("--out", required=True, type=Path, help="output snapshot folder (checkpoints in OUT/checkpoint)")
    kind = p.add_mutually_exclusive_group()
    kind.add_argument("--lora-rank", type=int, default=8, help="LoRA rank (default 8) on the decoder's linear layers")
    kind.add_argument("--full", action="store_true", help="train every (unfrozen) weight instead of LoRA adapters")
    p.add_argument("--freeze", default="", help="parts to freeze: vision,connector,llm")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, help="optimizer steps")
    length.add_argument("--epochs", type=float, help="passes over the data (default 1)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--warmup", type=int, help="warm-up steps (default: 5%% of the steps)")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (0: off)")
    p.add_argument("--batch-size", type=int, default=1, help="records per micro-step, over all processes")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-steps per optimizer step")
    p.add_argument("--dtype", choices=["fp32", "autocast", "bf16"], default="fp32")
    p.add_argument("--device", help="default: cuda when available (the process's local rank under torchrun)")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--z-loss", type=float, help="z-loss scale (the reference's softmax_auxiliary_loss)")
    p.add_argument("--save-every", type=int, default=0, help="write a resumable checkpoint every N steps")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    p.add_argument("--skip-bad", action="store_true", help="skip and count bad records instead of stopping")
    p.add_argument("--max-len", type=int, help="longest sequence (default: the model's context)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fsdp", action="store_true", help="FSDP2 across the processes of torchrun")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    for name in ("batch_size", "grad_accum", "lora_rank"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if a.steps is not None and a.steps < 1 or a.epochs is not None and a.epochs <= 0:
        p.error("--steps and --epochs must be positive")
    if a.fsdp and not a.full:
        p.error("--fsdp trains all weights: add --full (LoRA adapters are not sharded)")
    return a


def setup_distributed(a) -> tuple[int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(a.device or (f"cuda:{local}" if torch.cuda.is_available() else "cpu"))
    if a.fsdp or world > 1:
        import torch.distributed as dist

        if not a.fsdp:
            raise SystemExit("finetune.py: error: several processes need --fsdp")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return world, rank, device


def shard(model: torch.nn.Module, device: torch.device, world: int) -> None:
    """FSDP2: every ViT and decoder block its own unit, the rest in the root's."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world,))
    inner = training.unwrap(model)
    for block in [*inner.vision.blocks, *inner.llm.blocks]:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)


def main(argv=None) -> int:
    a = parse_args(argv)
    world, rank, device = setup_distributed(a)
    torch.manual_seed(a.seed)
    say = print if rank == 0 else (lambda *x, **k: None)
    try:
        folder = resolve_snapshot(a.model)
        check_output(a.out, [folder], overwrite=True)  # may exist (--resume), never over the model
        processor = MolmoProcessor.from_pretrained(folder)
        model = Molmo.from_pretrained(folder, dtype=a.dtype, device=device)
        data = Dataset(a.data, processor, a.max_len or model.config.llm.max_position_embeddings, skip_bad=a.skip_bad)
        training.freeze(model, [p for p in a.freeze.split(",") if p])
        plan = training.Plan(len(data), a.batch_size, a.grad_accum, a.seed, world, rank)
    except (CheckpointError, ConfigError, RecordError, FileNotFoundError, ValueError) as e:
        print(f"finetune.py: error: {e}", file=sys.stderr)
        return 2
    for err in data.errors:
        say(f"skipped: {err}", file=sys.stderr)
    model.train()
    model.set_gradient_checkpointing(a.gradient_checkpointing)
    if not a.full:
        try:
            model = training.add_lora(model, a.lora_rank)
        except ImportError as e:
            print(f"finetune.py: error: {e}", file=sys.stderr)
            return 2
    if a.fsdp:
        shard(model, device, world)
    params = training.trainable_parameters(model)
    if not params:
        print("finetune.py: error: nothing to train (every part frozen)", file=sys.stderr)
        return 2
    steps = a.steps or max(1, math.ceil((a.epochs or 1) * len(data) / plan.records_per_step))
    optimizer = torch.optim.AdamW(params, lr=a.lr, weight_decay=a.weight_decay)
    scheduler = training.schedule(optimizer, a.warmup if a.warmup is not None else max(1, steps // 20), steps)
    a.out.mkdir(parents=True, exist_ok=True)
    start, initial, loss = 0, None, None
    if a.resume:
        state = training.load_checkpoint(a.out, model, optimizer, scheduler)
        if state is not None:
            start, initial, loss = state["step"], state.get("initial_loss"), state.get("final_loss")
            say(f"resumed at step {start} of {steps}", file=sys.stderr)
    from huggingface_hub.utils import tqdm

    bar = tqdm(total=steps, initial=start, desc="fine-tuning", unit="step", disable=a.no_progress or rank != 0)
    tokens, t0 = 0, time.perf_counter()
    for step in range(start, steps):
        batches = [data.batch(ix) for ix in plan.micro_batches(step)]
        tokens += sum(int((b["input_ids"] != -1).sum()) for b in batches)
        loss = float(training.train_step(model, batches, a.z_loss, world if a.fsdp else 1))
        initial = loss if initial is None else initial
        training.clip_and_step(model, optimizer, scheduler, a.max_grad_norm)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
        if a.save_every and (step + 1) % a.save_every == 0 and step + 1 < steps:
            training.save_checkpoint(a.out, model, optimizer, scheduler, step + 1, {"initial_loss": initial})
    bar.close()
    elapsed = time.perf_counter() - t0
    training.save_checkpoint(a.out, model, optimizer, scheduler, steps, {"initial_loss": initial, "final_loss": loss})
    final = training.merged(model)
    state = training.full_state(final)  # a collective under FSDP2
    if rank == 0:
        training.save_snapshot(final, a.out, folder, state)
    result = {"initial_loss": initial, "final_loss": loss, "steps": steps, "examples": len(data),
              "skipped": data.skipped, "tokens_per_s": tokens * world / elapsed if elapsed > 0 else 0.0,
              "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, "out": str(a.out)}
    say(json.dumps(result))
    if a.fsdp:
        import torch.distributed as dist

        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
