#!/usr/bin/env python
"""The table `gpu_check.sh` prints last, with the targets beside the figures.

  python scripts/gpu_summary.py OUT SHARED

OUT holds the check's outputs (NAME.txt: a benchmark's JSON on its last line, parity's summary line);
SHARED the checkpoint-facts folders (for the weights per GPU under tensor parallelism). A missing or
failed step shows as '?' or its error, never stops the table.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def last_line(out: Path, name: str) -> str:
    try:
        return (out / f"{name}.txt").read_text().strip().splitlines()[-1]
    except (OSError, IndexError) as e:
        return f"no result ({e.__class__.__name__})"


def last_json(out: Path, name: str) -> dict:
    try:
        result = json.loads(last_line(out, name))
    except ValueError:
        return {}
    return result if isinstance(result, dict) else {}


def weights_per_gpu(shared: Path) -> list[tuple[str, str]]:
    """What --tp N holds per GPU: bf16 weights, the ViT and connector replicated."""
    try:
        from molmo.config import MolmoConfig
        from molmo.model import Molmo
        from molmo.parallel import weights_per_rank_gb

        rows = []
        for name, folder, tps in (("7B-D", "checkpoint-facts", (1, 2)), ("72B", "checkpoint-facts-72b", (1, 2, 4, 8))):
            c = Molmo.meta(MolmoConfig.from_hf(shared / folder))
            per_gpu = " / ".join(f"{weights_per_rank_gb(c, tp):.1f} GB" for tp in tps)
            rows.append((f"{name}: bf16 weights per GPU at --tp " + "/".join(map(str, tps)),
                         per_gpu + " (plus KV cache, activations)"))
        return rows
    except Exception as e:  # the table still prints
        return [("weights per GPU under --tp", f"not computed: {e}")]


def table(out: Path, shared: Path) -> list[tuple[str, str]]:
    rows = [("parity (CUDA, fp32/autocast/bf16)", last_line(out, "parity")),
            ("parity, tensor-parallel path --tp 1", last_line(out, "parity_tp1")),
            ("parity, compiled decode step", last_line(out, "parity_compiled"))]
    rows += weights_per_gpu(shared)
    for name, label, target in (("bench_full", "default path: eager + CUDA graph", "target >= 0.80"),
                                ("bench_full_compiled", "compiled + CUDA graph", "0.74 on 5155599")):
        r = last_json(out, name)
        rows += [(f"7B-D bf16, {label}", ""),
                 ("  time to first token, 13 crops", f"{r.get('ttft_s', '?')} s (vision+connector "
                                                     f"{r.get('vision_connector_s', '?')} s; target <= 0.060)"),
                 ("  batch-1 decode", f"{r.get('decode_tok_s', '?')} tok/s ({r.get('decode_tok_s_with_setup', '?')} "
                                      "with the graph set-up)"),
                 ("  HBM bound (measured copy bandwidth)", f"{r.get('bandwidth_bound_tok_s', '?')} tok/s "
                                                           f"at {r.get('bandwidth_gb_s', '?')} GB/s"),
                 ("  fraction of bound", f"{r.get('fraction_of_bound', '?')} ({target})")]
    full = last_json(out, "bench_full")
    batch = full.get("batch_decode") or {}
    rows.append(("7B-D bf16, 16 rows decoded together (default path)",
                 f"{batch.get('speedup', '?')}x the batch-1 tokens/s (target >= 12x; tok/s {batch.get('tok_s', '?')})"))
    for scheme, target in (("int8", ""), ("int4", "; target >= 2x")):
        r = last_json(out, f"bench_full_{scheme}")
        ratio = "?"
        if "decode_tok_s" in r and full.get("decode_tok_s"):
            ratio = round(r["decode_tok_s"] / full["decode_tok_s"], 2)
        rows.append((f"7B-D {scheme} weights, batch-1 decode",
                     f"{r.get('decode_tok_s', '?')} tok/s ({ratio}x bf16{target}; "
                     f"{r.get('weight_gb_per_token', '?')} GB per token)"))
    r = last_json(out, "batch_full")
    rows.append(("batch job, 7B-D bf16, 13-crop images (target: >= 15x at batch 32)",
                 " ".join(f"b{b}: {r.get(f'batch_{b}', {}).get('speedup', '?')}x" for b in (1, 8, 32))))
    for name, label in (("train_lora", "LoRA r=8 + checkpointing (target: fits 24 GB)"),
                        ("train_full", "all weights, AdamW")):
        r = last_json(out, name)
        rows.append((f"7B-D bf16 fine-tuning step, {label}", f"{r.get('step_s', '?')} s, peak {r.get('peak_gb', '?')} "
                                                            f"GB (activations {r.get('activation_gb', '?')} GB)"))
    return rows


def main(argv: list[str]) -> int:
    rows = table(Path(argv[0]), Path(argv[1]))
    w = max(len(a) for a, _ in rows)
    print("\n" + "\n".join(f"{a:<{w}}  {b}" for a, b in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
