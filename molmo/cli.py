"""Command line: `molmo inspect`, `molmo generate`, `molmo point`, `molmo batch` (also `python -m molmo`)."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

DEFAULT_MODEL = "allenai/Molmo-7B-D-0924"


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        self.exit(2, f"{self.prog}: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="molmo", description="Molmo-7B-D: inspect checkpoints, answer questions about images.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    i = sub.add_parser("inspect", help="architecture, parameter counts and a check of the weights")
    i.add_argument("--model", required=True, type=Path, help="snapshot folder (config.json, safetensors)")
    i.add_argument("--json", action="store_true", help="end with one JSON object")

    for name, helptext in (("generate", "answer a prompt about images, streaming the text"),
                           ("point", "ask for points, draw them on the image"),
                           ("batch", "a JSONL file or a folder of images through the model: resumable, "
                                     "data-parallel under torchrun")):
        g = sub.add_parser(name, help=helptext)
        g.add_argument("--model", default=DEFAULT_MODEL, help=f"hub id or folder (default {DEFAULT_MODEL})")
        if name == "batch":
            g.add_argument("--input", required=True, type=Path,
                           help='JSONL of {"id", "image": path | [paths] | null, "prompt"}, or a folder of images')
            g.add_argument("--output", required=True, type=Path, help="JSONL of answers, in input order")
            g.add_argument("--prompt", default=None, help="the prompt of records without one")
            g.add_argument("--batch-size", type=int, default=8)
            g.add_argument("--workers", type=int, default=2, help="threads preparing images")
            g.add_argument("--resume", action="store_true", help="continue a job: skip the ids already written")
            g.add_argument("--no-progress", action="store_true")
        else:
            g.add_argument("--image", action="append", default=[], type=Path, help="image file (repeatable)")
            g.add_argument("--prompt", required=True)
        g.add_argument("--max-new-tokens", type=int, default=200)
        g.add_argument("--dtype", choices=["fp32", "autocast", "bf16"], default=None,
                       help="default: bf16 on CUDA or with --quantize, else fp32")
        g.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
        g.add_argument("--quantize", choices=["int8", "int4"], default=None,
                       help="the decoder's linear layers quantized while loading (weight-only)")
        g.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
        g.add_argument("--top-p", type=float, default=None)
        g.add_argument("--top-k", type=int, default=None)
        g.add_argument("--seed", type=int, default=None)
        g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                       help="torch.compile the decode step (faster tokens after a one-time compilation); "
                            "default: on CPU for long batch-1 answers")
        if name != "batch":
            g.add_argument("--tp", type=int, default=None,
                           help="tensor parallelism over N processes: torchrun --nproc-per-node N ... --tp N")
        g.add_argument("--json", action="store_true", help="end with one JSON object")
        if name == "point":
            g.add_argument("--out", required=True, type=Path, help="where to write the marked image")
    return p


def _inspect(a) -> int:
    from .checkpoint import FLOATS, nonfinite, snapshot_tensors
    from .config import MolmoConfig
    from .loading import check_snapshot, parameter_counts
    from .model import Molmo
    from .quant import GROUP_SIZE, replace_linears, snapshot_scheme

    config = MolmoConfig.from_hf(a.model)
    meta = Molmo.meta(config)
    counts = parameter_counts(meta)
    scheme = snapshot_scheme(a.model)
    if scheme:
        replace_linears(meta, scheme)
    v, c = config.vision, config.llm
    print(f"Molmo at {a.model}")
    print(f"  vision     ViT {v.layers} blocks, width {v.width}, {v.heads} heads x {v.head_dim}, MLP {v.mlp_dim}, "
          f"{v.grid}x{v.grid} patches of {v.patch_size}px; features of blocks {list(v.feature_layers)}")
    print(f"  connector  {v.pool_size}x{v.pool_size} attention pooling -> SwiGLU {v.width}->{c.mlp_hidden}->{c.hidden}")
    print(f"  llm        {c.layers} blocks, hidden {c.hidden}, {c.heads} heads / {c.kv_heads} KV heads x {c.head_dim}, "
          f"MLP {c.mlp_hidden}, vocab {c.vocab}+{c.extra_vocab}, rope theta {c.rope_theta:g}")
    for part in ("vision", "connector", "llm", "total"):
        print(f"  {part:<10} {counts[part]:>15,} parameters")
    result = {"model": str(a.model), "total_parameters": counts["total"],
              "parameters": {k: counts[k] for k in ("vision", "connector", "llm")}, "weights": None,
              "quantization": scheme}
    if scheme:
        print(f"  quantized  {scheme}: the decoder's linear layers (blocks, lm_head), weight-only"
              + (f", groups of {GROUP_SIZE} inputs" if scheme == "int4" else ", one scale per output channel"))
    rc = 0
    try:
        entries = snapshot_tensors(a.model)
        r = check_snapshot(meta, entries, stored_quantized=scheme is not None)
        bad_values = nonfinite(e for e in entries.values() if e.dtype in FLOATS) if r.ok else []
    except (ValueError, OSError) as e:  # no weights, or unreadable ones: the config summary still stands
        print(f"  weights    not checked: {e}")
        result["weights"] = {"checked": False, "reason": str(e)}
        rc = 1
    else:
        ok = r.ok and not bad_values
        dtypes = sorted({e.dtype for e in entries.values()})
        size_gb = sum(e.nbytes for e in entries.values()) / 1e9
        print(f"  weights    {len(entries)} tensors in {len({e.file for e in entries.values()})} file(s), "
              f"{size_gb:.3f} GB, dtype {'/'.join(dtypes)}: {'all names, shapes, dtypes and values good' if ok else 'PROBLEMS'}")
        for kind in ("missing", "unexpected", "wrong_shape", "wrong_dtype"):
            for item in getattr(r, kind):
                print(f"    {kind.replace('_', ' ')}: {item}")
        for name in bad_values:
            print(f"    non-finite values: {name}")
        result["weights"] = {"checked": True, "ok": ok, "tensors": len(entries), "dtypes": dtypes,
                             "size_gb": round(size_gb, 3),
                             "missing": r.missing, "unexpected": r.unexpected, "wrong_shape": r.wrong_shape,
                             "wrong_dtype": r.wrong_dtype, "non_finite": bad_values}
        rc = 0 if ok else 1
    if a.json:
        print(json.dumps(result))
    return rc


def _device_and_dtype(a, local_rank: int = 0) -> tuple[str, str]:
    import torch

    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    # Quantized weights: bf16 activations on CPU too (PyTorch's int8/int4 CPU kernels are scalar in fp32:
    # 6-13x slower for a token's row, with or without bf16 math); otherwise fp32 on CPU.
    bf16 = device == "cuda" or a.quantize is not None
    dtype = a.dtype or ("bf16" if bf16 else "fp32")
    return (f"cuda:{local_rank}" if device == "cuda" else device), dtype


def _generation_config(a):
    from .generation import GenerationConfig

    return GenerationConfig(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_k=a.top_k,
                            top_p=a.top_p, seed=a.seed, compile=a.compile)


def _answer(a):
    from .checkpoint import snapshot_tensors
    from .config import MolmoConfig
    from .generation import check_context, generate
    from .hub import resolve_snapshot
    from .model import Molmo
    from .preprocess import MolmoProcessor

    device, dtype = _device_and_dtype(a, int(os.environ.get("LOCAL_RANK", "0")) if a.tp else 0)
    for img in a.image:
        if not img.is_file():
            raise ValueError(f"{img}: no such image file")
    cfg = _generation_config(a)  # bad settings fail before the load
    t0 = time.perf_counter()
    folder = resolve_snapshot(a.model)
    config = MolmoConfig.from_hf(folder)  # cheap checks first: config, weight headers, tokenizer
    snapshot_tensors(folder)
    processor = MolmoProcessor.from_pretrained(folder)
    _check_tokenizer(folder, config, processor.tokenizer)
    inputs = processor.process(images=a.image or None, text=a.prompt)
    check_context(config, len(inputs["input_ids"]), a.max_new_tokens)  # before the (long) load
    model = Molmo.from_pretrained(folder, dtype=dtype, device=device, quantize=a.quantize, tp=a.tp)
    load_s = time.perf_counter() - t0

    def show(row, delta):
        sys.stdout.write(delta)
        sys.stdout.flush()

    out = generate(model, inputs, cfg, tokenizer=processor.tokenizer, on_text=show)
    sys.stdout.write("\n")
    timings = {"load_s": round(load_s, 3), **{k: round(v, 4) for k, v in out.timings.items()}}
    result = {"text": out.texts[0], "token_ids": out.tokens[0, :out.lengths[0]].tolist(),
              "prompt_tokens": len(inputs["input_ids"]), "dtype": dtype, "device": device, "timings": timings}
    return result


def _check_tokenizer(folder: Path, config, tokenizer) -> None:
    """One clear error, before the (long) load, for a tokenizer whose ids the model cannot embed."""
    rows = config.llm.embedded_ids
    if len(tokenizer) > rows:
        raise ValueError(f"{folder}: the tokenizer has {len(tokenizer):,} tokens but the model embeds {rows:,} "
                         f"(vocabulary {config.llm.vocab:,} + {config.llm.extra_vocab} extra): not this checkpoint's tokenizer")


def _generate(a) -> int:
    result = _answer(a)
    if a.json:
        print(json.dumps(result))
    return 0


def _check_output_image(out: Path, source: Path) -> None:
    from PIL import Image

    if out.is_dir():
        raise ValueError(f"--out {out}: is a folder; give a file name such as marked.png")
    if out.suffix.lower() not in Image.registered_extensions():
        raise ValueError(f"--out {out}: unknown image extension {out.suffix!r} (use .png or .jpg)")
    folder = out.parent if str(out.parent) else Path(".")
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        raise ValueError(f"--out {out}: folder {folder} does not exist or is not writable")
    if out.exists() and source.exists() and out.resolve() == source.resolve():
        raise ValueError(f"--out {out}: is the input image; choose another file")


def _point(a) -> int:
    from PIL import Image

    from .pointing import draw_points, parse_points
    from .preprocess import load_image

    if len(a.image) != 1:
        raise ValueError("point takes exactly one --image")
    _check_output_image(a.out, a.image[0])  # before the (long) load
    result = _answer(a)
    image = Image.fromarray(load_image(a.image[0]))
    points = parse_points(result["text"], image.width, image.height)
    if _rank() == 0:
        draw_points(image, points).save(a.out)
    for i, p in enumerate(points, 1):
        print(f"{i}: x={p.x:.1f} y={p.y:.1f} {p.label}")
    print(f"{len(points)} point(s) drawn on {a.out}")
    if a.json:
        result["points"] = [{"x": p.x, "y": p.y, "label": p.label} for p in points]
        print(json.dumps(result))
    return 0


def _batch(a) -> int:
    """One process, or one rank of torchrun: its share of the records, then rank 0 merges."""
    from datetime import timedelta

    import torch.distributed as dist

    from .batch import check_output, merge, read_records, run_job
    from .config import MolmoConfig
    from .hub import resolve_snapshot
    from .model import Molmo
    from .preprocess import MolmoProcessor

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device, dtype = _device_and_dtype(a, int(os.environ.get("LOCAL_RANK", 0)))
    if a.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {a.batch_size}")
    cfg = _generation_config(a)
    records = read_records(a.input, a.prompt)  # cheap checks before the (long) load
    if a.output.resolve() == a.input.resolve():
        raise ValueError(f"--output {a.output}: is the input; choose another file")
    check_output(a.output, a.resume)
    folder = resolve_snapshot(a.model)
    processor = MolmoProcessor.from_pretrained(folder)
    _check_tokenizer(folder, MolmoConfig.from_hf(folder), processor.tokenizer)
    model = Molmo.from_pretrained(folder, dtype=dtype, device=device, quantize=a.quantize)
    if world > 1:  # gloo only coordinates (the end of every rank's share); no tensors are exchanged
        dist.init_process_group("gloo", timeout=timedelta(days=7))
    try:
        counts = run_job(model, processor, records, a.output, cfg, batch_size=a.batch_size, resume=a.resume,
                         rank=rank, world=world, workers=a.workers, progress=not a.no_progress)
        every = [counts]
        if world > 1:
            every = [None] * world
            dist.all_gather_object(every, counts)
    finally:
        if world > 1:
            dist.destroy_process_group()
    if rank == 0:
        summary = merge(records, a.output)
        seconds = max(c["seconds"] for c in every)
        ran = sum(c["done"] + c["errors"] for c in every)
        summary.update(resumed=sum(c["resumed"] for c in every), seconds=seconds,
                       records_per_s=round(ran / seconds, 3) if seconds else 0.0)
        print(f"{summary['written']} of {summary['records']} records written to {a.output}, "
              f"{summary['errors']} with errors", file=sys.stderr)
        print(json.dumps(summary))
    return 0


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def main(argv=None) -> int:
    a = _parser().parse_args(argv)
    parallel = getattr(a, "tp", None) is not None
    if parallel and _rank() != 0:
        sys.stdout = open(os.devnull, "w")  # rank 0 streams and reports; every rank computes the same tokens
    try:
        return {"inspect": _inspect, "generate": _generate, "point": _point, "batch": _batch}[a.command](a)
    except (ValueError, OSError) as e:  # our errors name the file / tensor / size; one line, no traceback
        print(f"molmo: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        if not parallel:
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"molmo: error: rank {_rank()}: a collective failed (another rank died or timed out): {first}",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        if parallel:
            _close_process_group()


def _close_process_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
