#!/usr/bin/env python
"""Convert Molmo weights.

  to-dtype --model DIR --out DIR --dtype bf16|fp16     a Molmo snapshot in another dtype, sharded
  from-hf  --clip DIR --decoder DIR --out DIR [--seed S]  CLIP ViT-L/14-336 + Qwen2 or OLMo2 -> a Molmo to train from
  to-hf    --model DIR --out DIR                          Molmo -> out/qwen2 or out/olmo2 + out/clip
  quantize --bits 8|4 IN OUT                              the decoder's linear layers in int8 or int4
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from molmo import convert  # noqa: E402


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def main(argv=None) -> int:
    p = _Parser(prog="convert_weights.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    t = sub.add_parser("to-dtype", help="rewrite a Molmo snapshot in bf16 or fp16, streaming tensor by tensor")
    t.add_argument("--model", required=True, type=Path)
    t.add_argument("--out", required=True, type=Path)
    t.add_argument("--dtype", required=True, choices=["bf16", "fp16"])
    t.add_argument("--shard-gb", type=float, default=5.0, help="largest shard size (GB)")
    f = sub.add_parser("from-hf", help="CLIP (CLIPVisionModel or CLIPModel) + Qwen2 or OLMo2 -> Molmo layout")
    f.add_argument("--clip", required=True, type=Path)
    f.add_argument("--decoder", "--qwen2", dest="decoder", required=True, type=Path,
                   help="a transformers Qwen2ForCausalLM (7B-D, 72B) or Olmo2ForCausalLM (7B-O) folder")
    f.add_argument("--out", required=True, type=Path)
    f.add_argument("--seed", type=int, default=0, help="seed of the freshly initialised connector")
    h = sub.add_parser("to-hf", help="Molmo -> transformers CLIPVisionModel and Qwen2ForCausalLM (7B-D, 72B) "
                                     "or Olmo2ForCausalLM (7B-O) folders")
    h.add_argument("--model", required=True, type=Path)
    h.add_argument("--out", required=True, type=Path)
    q = sub.add_parser("quantize", help="a Molmo snapshot with the decoder's linear layers in int8 (per output "
                                        "channel) or int4 (groups of 64 inputs), loaded as saved")
    q.add_argument("--bits", required=True, type=int, choices=[8, 4])
    q.add_argument("model", type=Path)
    q.add_argument("out", type=Path)
    q.add_argument("--shard-gb", type=float, default=5.0, help="largest shard size (GB)")
    for s in (t, f, h, q):
        s.add_argument("--no-progress", action="store_true")
        s.add_argument("--overwrite", action="store_true", help="replace an existing output folder whole")
    a = p.parse_args(argv)
    progress = not a.no_progress
    try:
        if a.command == "to-dtype":
            dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[a.dtype]
            files = convert.to_dtype(a.model, a.out, dtype, int(a.shard_gb * (1 << 30)), progress=progress,
                                     overwrite=a.overwrite)
            print(f"wrote {len(files)} shard(s) to {a.out}")
        elif a.command == "from-hf":
            cfg = convert.from_hf(a.clip, a.decoder, a.out, seed=a.seed, progress=progress, overwrite=a.overwrite)
            print(f"wrote a Molmo snapshot ({cfg.vision.layers} ViT blocks, {cfg.llm.layers} LLM blocks) to {a.out}")
        elif a.command == "quantize":
            files = convert.quantize(a.model, a.out, f"int{a.bits}", int(a.shard_gb * (1 << 30)), progress=progress,
                                     overwrite=a.overwrite)
            print(f"wrote {len(files)} shard(s) of int{a.bits} weights to {a.out}")
        else:
            qdir, cdir = convert.to_hf(a.model, a.out, progress=progress, overwrite=a.overwrite)
            print(f"wrote {qdir} and {cdir}")
    except (ValueError, OSError, KeyError) as e:
        print(f"convert_weights.py: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"convert_weights.py: interrupted; {a.out} was left as it was", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
