#!/usr/bin/env python
"""Benchmarks; each prints a JSON object as its last line.

  --workload load        write a 7B-D-sized fp32 checkpoint (sparse, on disk) and load it into bf16:
                         load time and peak RSS (target <= 17.5 GB); --quantize int8|int4: quantized
                         while loading (target: the model's size + 1 GB)
  --workload convert     to-dtype bf16 of that checkpoint: time, peak RSS, and the time to just read
                         and write the same bytes
  --workload preprocess  median ms to preprocess 1920x1080 and 4000x3000 RGB photos
  --workload mid         random weights: real ViT-L, a Qwen2-0.5B-sized LLM; one 640x480 image,
                         max_crops 1, 12 prompt tokens, 128 new tokens greedy (--dtype fp32|bf16), the
                         median of 3 runs; the bound: the read-only bandwidth (a pass over a buffer the
                         size of the weights) over the bytes of weights a token reads; batch_decode: 8
                         text prompts of the same length decoded together against one, 3 rounds in
                         turn, median rates (--batch-rows N; 0: not)
  --workload train       full fine-tuning steps (AdamW, fp32) of the mid model, batch 2, each row one
                         640x480 image (max_crops 1) and a 64-token answer (--gradient-checkpointing):
                         step time, and the activation memory: the peak RSS of the timed steps'
                         forward and backward passes less the resting process (weights, optimizer
                         state) and the gradients; and the forward pass's peak over the resting state
                         --size full --lora-rank R: the 7B-D, one 13-crop image, a 256-token answer
  --workload batch       the batch job (`molmo batch`) on the mid model: records/s at batch sizes 1, 4
                         and 8 against `generate` called per record, same 16 records (one in four with
                         a 640x480 image, max_crops 1), 32 new tokens greedy; and whether the answers agree;
                         --size full: the 7B-D, 64 records each with a 13-crop 1920x1080 image, batch 1, 8, 32
  --workload quant       the mid model in bf16, int8 and int4 (same random weights): last-position logits
                         relative error and top-1 agreement over 64 teacher-forced positions against bf16,
                         and decode tokens/s of each (64 new tokens, 3 rounds of the three in turn,
                         median rates and each round's ratios; --compile: compiled steps);
                         bf16_vs_fp32: the same measures of bf16 against fp32, the scale of rounding
                         errors on this model
  --workload steps       the mid model's compiled CPU decode step two ways, interleaved in one process
                         (this VM's speed drifts between runs): one graph with the blocks as a nested
                         region (the default) against a graph per block; median tokens/s over --repeat
                         pairs of 128-token answers, the pairs the default won, whether the tokens agree
                         (--dtype fp32|bf16, --quantize int8|int4)
  --workload full        the full 7B-D with random weights (CUDA): batch-1 decode and time to first
                         token with a 13-crop image (--dtype bf16 by default); --batch-rows 16:
                         also 16 text prompts decoded together against one
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from molmo.config import LLMConfig, MolmoConfig  # noqa: E402

MOLMO_IDS = {"<im_start>": 152064, "<im_end>": 152065, "<im_patch>": 152066, "<im_col>": 152067}
DECODE_RUNS = 3  # timed generations per decode rate, the median reported
BATCH_ROUNDS = 3  # rounds of one row then all rows together, the median rates reported
MID = MolmoConfig(llm=LLMConfig(hidden=896, layers=24, heads=14, kv_heads=2, intermediate=9728, vocab=152064))


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KB -> GB


def copy_bandwidth_gb_s(device="cpu") -> float:
    """STREAM-style copy bandwidth: bytes read plus bytes written per second, 512 MB buffers."""
    x = torch.ones(128 << 20, device=device)
    y = torch.empty_like(x)
    for _ in range(2):
        y.copy_(x)
    _sync(device)
    t = time.perf_counter()
    for _ in range(5):
        y.copy_(x)
    _sync(device)
    return 2 * x.numel() * 4 * 5 / (time.perf_counter() - t) / 1e9


def read_bandwidth_gb_s(nbytes: int, device="cpu") -> float:
    """Read-only bandwidth: a sum over a buffer of at least `nbytes` (the weights one token reads), the
    fastest of five passes (what the machine can do; on a shared one the average moves with its load)."""
    x = torch.ones(max(nbytes, 256 << 20) // 4, device=device)
    x.sum()
    best = float("inf")
    for _ in range(5):
        _sync(device)
        t = time.perf_counter()
        x.sum()
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return x.numel() * 4 / best / 1e9


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def synthetic_7b(folder: Path) -> Path:
    """The published 7B-D layout (fp32, ~5 GB shards) as sparse files: the bytes are holes."""
    from molmo.checkpoint import write_snapshot
    from molmo.loading import expected_tensors
    from molmo.model import Molmo

    config = MolmoConfig()
    if not (folder / "model.safetensors.index.json").is_file():
        shapes = expected_tensors(Molmo.meta(config))
        write_snapshot(folder, [(n, s, torch.float32) for n, s in shapes.items()], None, max_shard_bytes=5 << 30)
        (folder / "config.json").write_text(json.dumps(config.to_hf(), indent=2))
    return folder


def _child(code: str) -> dict:
    """Run code in a fresh interpreter so its peak RSS is its own; it prints one JSON line."""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(r.stderr.strip().splitlines()[-1] if r.stderr.strip() else "child failed")
    return json.loads(r.stdout.strip().splitlines()[-1])


def bench_load(a) -> dict:
    folder = synthetic_7b(Path(a.dir))
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    if a.tp:
        return _bench_load_tp(a, folder, size)
    out = _child(f"""
import json, resource, time, sys
sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
from molmo import Molmo
t = time.perf_counter()
m = Molmo.from_pretrained({str(folder)!r}, dtype="bf16", device="cpu", quantize={a.quantize!r})
dt = time.perf_counter() - t
n = sum(p.numel() for p in m.parameters())
model_gb = sum(t.numel() * t.element_size() for t in m.state_dict().values()) / 1e9
print(json.dumps({{"load_s": dt, "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
                  "model_gb": model_gb}}))""")
    target = 17.5 if a.quantize is None else round(out["model_gb"] + 1, 2)  # quantized: its size + 1 GB
    return {"workload": "load", "quantize": a.quantize, "checkpoint_gb": round(size / 1e9, 2), **out,
            "target_peak_rss_gb": target}


TP_LOAD = """
import json, resource, sys, time
import torch.distributed as dist
from molmo import Molmo
t = time.perf_counter()
m = Molmo.from_pretrained(sys.argv[1], dtype="bf16", device="cpu", tp=int(sys.argv[2]))
mine = {"load_s": time.perf_counter() - t, "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
        "bytes_read_gb": m.bytes_read / 1e9,
        "held_gb": sum(p.to_local().nbytes if hasattr(p, "to_local") else p.nbytes for p in m.parameters()) / 1e9}
every = [None] * dist.get_world_size()
dist.all_gather_object(every, mine)
if dist.get_rank() == 0:
    print(json.dumps(every))
dist.destroy_process_group()
"""


def _bench_load_tp(a, folder: Path, size: int) -> dict:
    """Tensor-parallel loading in bf16: torchrun with --tp processes; the peak RSS of each rank."""
    script = Path(a.dir) / "tp_load.py"
    script.write_text(TP_LOAD)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(a.tp), str(script),
                        str(folder), str(a.tp)], capture_output=True, text=True, env=env)
    if r.returncode:
        raise RuntimeError(r.stderr.strip().splitlines()[-1] if r.stderr.strip() else "torchrun failed")
    ranks = json.loads(r.stdout.strip().splitlines()[-1])
    weights_gb = size / 2 / 1e9  # the fp32 checkpoint held in bf16
    return {"workload": "load", "tp": a.tp, "checkpoint_gb": round(size / 1e9, 2), "weights_bf16_gb": round(weights_gb, 2),
            "ranks": [{k: round(v, 3) for k, v in x.items()} for x in ranks],
            "max_peak_rss_gb": round(max(x["peak_rss_gb"] for x in ranks), 3),
            "max_read_fraction": round(max(x["bytes_read_gb"] for x in ranks) * 1e9 / size, 3)}


def bench_convert(a) -> dict:
    src = synthetic_7b(Path(a.dir))
    out_dir = Path(a.dir + "-bf16")
    shutil.rmtree(out_dir, ignore_errors=True)
    conv = _child(f"""
import json, resource, time, sys, torch
sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
from molmo.convert import to_dtype
t = time.perf_counter()
to_dtype({str(src)!r}, {str(out_dir)!r}, torch.bfloat16, progress=False)
print(json.dumps({{"convert_s": time.perf_counter() - t,
                  "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6}}))""")
    written = sum(f.stat().st_size for f in out_dir.glob("*.safetensors"))
    shutil.rmtree(out_dir)
    # Baseline: read every source byte and write as many bytes as the output has, 64 MB at a time.
    t = time.perf_counter()
    buf = bytearray(64 << 20)
    target = out_dir.with_name(out_dir.name + "-raw")
    left = written
    with open(target, "wb") as w:
        for f in sorted(src.glob("*.safetensors")):
            with open(f, "rb") as r:
                while n := r.readinto(buf):
                    if left > 0:
                        w.write(memoryview(buf)[:min(n // 2, left)])
                        left -= min(n // 2, left)
    raw = time.perf_counter() - t  # neither side syncs to disk: the same page-cache conditions
    target.unlink()
    return {"workload": "convert", **conv, "raw_read_write_s": raw, "ratio_to_raw": conv["convert_s"] / raw,
            "bytes_written_gb": written / 1e9, "targets": {"peak_rss_gb": 2.0, "ratio_to_raw": 1.5}}


def bench_preprocess(a) -> dict:
    from molmo.preprocess.tiling import ImageConfig, tile_image

    reference = None
    if a.reference_code:  # the official numpy pipeline, same images, same process
        from live_parity import _install_standins, load_reference

        stood_in = _install_standins()
        processor = load_reference(Path(a.reference_code)).image.MolmoImageProcessor()
        reference = {"resize": "torch stand-in" if "tensorflow" in stood_in else "tensorflow"}

        def official(img):
            processor.multimodal_preprocess(
                images=[img], tokens=np.array([1, 2], dtype=np.int32), image_idx=[-1], sequence_length=1536,
                image_patch_token_id=MOLMO_IDS["<im_patch>"], image_col_token_id=MOLMO_IDS["<im_col>"],
                image_start_token_id=MOLMO_IDS["<im_start>"], image_end_token_id=MOLMO_IDS["<im_end>"])

    def median_ms(fn, img):
        fn(img)
        times = []
        for _ in range(a.repeat):
            t = time.perf_counter()
            fn(img)
            times.append(time.perf_counter() - t)
        return round(statistics.median(times) * 1000, 2)

    rng = np.random.default_rng(0)
    out = {}
    for w, h in ((1920, 1080), (4000, 3000)):
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        out[f"{w}x{h}"] = median_ms(lambda x: tile_image(x, ImageConfig(), MOLMO_IDS), img)
        if reference is not None:
            reference[f"{w}x{h}"] = median_ms(official, img)
    result = {"workload": "preprocess", "threads": torch.get_num_threads()}
    if reference is not None:
        result["reference_ms"] = reference
        result["speedup"] = {k: round(reference[k] / v, 2) for k, v in out.items()}
    return result | {"preprocess_ms": out}


def _image_inputs(h: int, w: int, max_crops: int, n_prompt: int, seed: int = 0) -> dict:
    from molmo.preprocess.tiling import ImageConfig, tile_image

    rng = np.random.default_rng(seed)
    t = tile_image(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), ImageConfig(max_crops=max_crops), MOLMO_IDS)
    prompt = rng.integers(0, 150_000, n_prompt)
    ids = np.concatenate([[151643], t.tokens, prompt])
    idx = np.where(t.patch_pos >= 0, t.patch_pos + 1, t.patch_pos)
    return {"input_ids": torch.from_numpy(ids), "images": t.patches, "image_masks": t.masks,
            "image_input_idx": torch.from_numpy(idx)}


def _decode_bench(model, inputs, n_new: int, device, compile: bool | None = None, runs: int = 1,
                  warmup: bool = True) -> dict:
    """Timings of the median of `runs` generations (by tokens/s; this VM's speed drifts between runs)
    after a warm-up run of the same length (which compiles the step when compile is True, or None and
    generation chooses to: the same cache size, so the timed runs reuse it; `warmup=False`: done before);
    plus "compiled" (the step the timed runs took), "warmup_s" (that first run, compilation included)
    and "tokens" (the median run's)."""
    from molmo.decoding import compiles
    from molmo.generation import GenerationConfig, generate

    cfg = GenerationConfig(max_new_tokens=n_new, stop_on_eos=False, compile=compile)
    t = time.perf_counter()
    if warmup:
        generate(model, inputs, cfg)
        _sync(device)
    warmup_s = time.perf_counter() - t
    outs = sorted((generate(model, inputs, cfg) for _ in range(runs)), key=lambda o: o.timings["tokens_per_s"])
    out = outs[len(outs) // 2]
    return out.timings | {"compiled": compiles(model, cfg, len(out.tokens)), "warmup_s": warmup_s, "tokens": out.tokens}


def _batch_decode(model, rows: int, prompt_tokens: int, n_new: int, device, compile: bool | None) -> dict | None:
    """`rows` text prompts decoded together against the first one alone (same lengths, no padding; each
    on the path generation takes for its batch size, `_decode_bench`): tokens/s over all rows, the
    speedup, and whether the first row's greedy tokens agree. None for fewer than 2 rows."""
    if rows < 2:
        return None
    vocab = min(150_000, model.config.llm.vocab)  # plain text tokens, no special ones
    ids = torch.from_numpy(np.random.default_rng(1).integers(0, vocab, (rows, prompt_tokens)))
    rates, first = {1: [], rows: []}, {}
    for rep in range(BATCH_ROUNDS):  # one row and all rows in turn: a drift in the VM's speed hits both
        for n in (1, rows):
            t = _decode_bench(model, {"input_ids": ids[:n]}, n_new, device, compile, warmup=rep == 0)
            rates[n].append(n * t.get("steady_tokens_per_s", t["tokens_per_s"]))
            first[n] = t["tokens"][0].cpu()
    rate = {n: statistics.median(r) for n, r in rates.items()}
    return {"rows": rows, "prompt_tokens": prompt_tokens, "rounds": BATCH_ROUNDS,
            "tok_s": {str(n): round(r, 2) for n, r in rate.items()}, "speedup": round(rate[rows] / rate[1], 2),
            "speedups": [round(b / a, 2) for a, b in zip(rates[1], rates[rows])],
            "first_row_same_tokens": bool(torch.equal(first[1], first[rows]))}


def bench_mid(a) -> dict:
    from molmo.testing import random_model

    device = a.device
    mode = a.dtype or "fp32"
    model = random_model(MID, dtype=torch.bfloat16 if mode == "bf16" else torch.float32, device=device)
    model.mode = mode
    inputs = _image_inputs(480, 640, 1, 12)
    llm = model.llm
    per_token = sum(p.numel() * p.element_size() for n, p in llm.named_parameters() if not n.startswith("embed"))
    timings = _decode_bench(model, inputs, a.new_tokens or 128, device, a.compile, runs=DECODE_RUNS)
    rows = 8 if a.batch_rows is None else a.batch_rows
    batch = _batch_decode(model, rows, len(inputs["input_ids"]), a.new_tokens or 128, device, a.compile)
    reference = _reference_mid(a, model, inputs, mode) if a.reference_code else None
    bw = copy_bandwidth_gb_s(device)
    read = read_bandwidth_gb_s(per_token, device)
    bound = read * 1e9 / per_token
    return {"workload": "mid", "dtype": mode, "device": device, "prompt_tokens": len(inputs["input_ids"]),
            "prefill_s": round(timings["prefill_s"], 3), "decode_tok_s": round(timings["tokens_per_s"], 2),
            "weight_gb_per_token": round(per_token / 1e9, 3), "copy_bandwidth_gb_s": round(bw, 2),
            "read_bandwidth_gb_s": round(read, 2), "bound_tok_s": round(bound, 2),
            "compiled": timings["compiled"], "warmup_s": round(timings["warmup_s"], 1),
            "fraction_of_bound": round(timings["tokens_per_s"] / bound, 3), "batch_decode": batch,
            "reference": reference}  # the official code, timed in this run with --reference-code


def _reference_mid(a, model, inputs, mode) -> dict:
    """The official code on the same weights and inputs, timed here (needs transformers < 4.50)."""
    from transformers import GenerationConfig

    from live_parity import _install_standins, load_reference
    from molmo.names import published_name

    _install_standins()
    ref = load_reference(Path(a.reference_code))
    rm = ref.modeling.MolmoForCausalLM(ref.config.MolmoConfig(**MID.to_hf()))
    rm.load_state_dict({published_name(n): p.float() for n, p in model.state_dict().items()}, strict=True)
    rm = rm.eval().to(torch.bfloat16 if mode == "bf16" else torch.float32)
    batch = {k: v[None] for k, v in inputs.items()}
    if mode == "bf16":
        batch["images"] = batch["images"].to(torch.bfloat16)

    def run(n):
        cfg = GenerationConfig(max_new_tokens=n, do_sample=False, use_cache=True, eos_token_id=None)
        t = time.perf_counter()
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "autocast"):
            rm.generate_from_batch(batch, cfg)
        return time.perf_counter() - t

    run(2)  # warm-up
    first, full = run(1), run(128)
    return {"measured_here": True, "prefill_s": round(first, 3), "decode_tok_s": round(127 / (full - first), 2)}


def bench_batch(a) -> dict:
    import tempfile

    from PIL import Image

    from molmo.batch import read_records, run_job
    from molmo.generation import GenerationConfig, generate
    from molmo.preprocess import ImageConfig, MolmoProcessor, Tokenizer
    from molmo.testing import random_model

    full = a.size == "full"  # the 7B-D, every record a 13-crop 1920x1080 image, 64 records, batches up to 32
    mode = a.dtype or ("bf16" if full else "fp32")
    model = random_model(MolmoConfig() if full else MID, dtype=torch.bfloat16 if mode == "bf16" else torch.float32,
                         device=a.device)
    model.mode = mode
    processor = MolmoProcessor(Tokenizer(a.tokenizer), ImageConfig(max_crops=12 if full else 1))
    cfg = GenerationConfig(max_new_tokens=a.new_tokens or 32)
    words = "the quick brown fox jumps over the lazy dog while a small cat watches".split()
    folder = Path(tempfile.mkdtemp(prefix="molmo-bench-batch-"))
    rng = np.random.default_rng(0)
    h, w = (1080, 1920) if full else (480, 640)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / "photo.png")
    rows = [{"id": i, "image": "photo.png" if full or i % 4 == 0 else None,
             "prompt": "Describe " + " ".join(words[:3 + (5 * i) % 11])} for i in range(64 if full else 16)]
    (folder / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    records = read_records(folder / "in.jsonl")
    generate(model, processor.process(text="warm up"), cfg, tokenizer=processor.tokenizer)

    t = time.perf_counter()
    alone = {r.id: generate(model, processor.process(images=r.images or None, text=r.prompt), cfg,
                            tokenizer=processor.tokenizer).texts[0] for r in records}
    base = len(records) / (time.perf_counter() - t)
    out = {"workload": "batch", "dtype": mode, "device": a.device, "records": len(records),
           "new_tokens": cfg.max_new_tokens, "generate_per_record_records_s": round(base, 3)}
    for bs in (1, 8, 32) if full else (1, 4, 8):
        path = folder / f"out-{bs}.jsonl"
        counts = run_job(model, processor, records, path, cfg, batch_size=bs, progress=False)
        rate = counts["records"] / counts["seconds"]
        same = all(json.loads(x)["text"] == alone[json.loads(x)["id"]] for x in path.read_text().splitlines())
        out[f"batch_{bs}"] = {"records_s": round(rate, 3), "speedup": round(rate / base, 2), "same_answers": same}
    shutil.rmtree(folder)
    return out


def bench_quant(a) -> dict:
    """int8 and int4 against the unquantized model on the mid model, activations in bf16 (default) or
    fp32 (--dtype): last-position logits, teacher-forced top-1, prefill time and decode rate."""
    from molmo.quant import quantize_model
    from molmo.testing import random_model

    mode = a.dtype or "bf16"
    if mode not in ("bf16", "fp32"):
        raise ValueError("quant: --dtype bf16 or fp32 (the activations)")
    inputs = _image_inputs(480, 640, 1, 64)
    batch = {k: v[None] for k, v in inputs.items()}
    n_new = a.new_tokens or 64
    out = {"workload": "quant", "device": a.device, "dtype": mode, "compiled": {}, "decode_tok_s": {},
           "prefill_s": {}, "logits_rel_err": {}, "top1_agreement": {}}
    models = {}
    for scheme in (mode, "int8", "int4"):
        model = random_model(MID, dtype=torch.bfloat16 if mode == "bf16" else torch.float32, device=a.device)
        model.mode = mode  # the same weights each time (seed 0)
        if scheme != mode:
            quantize_model(model, scheme)
        with torch.no_grad():
            logits = model(**{k: v.to(a.device) for k, v in batch.items()}).logits[0, -64:].float()  # [64, V]
        if scheme == mode:
            ref = logits
        else:
            out["logits_rel_err"][scheme], out["top1_agreement"][scheme] = _agreement(logits, ref)
        timings = _decode_bench(model, inputs, n_new, a.device, a.compile)  # warms up (compiles) too
        out["compiled"][scheme] = timings["compiled"]
        out["prefill_s"][scheme] = round(timings["prefill_s"], 2)
        models[scheme] = model
    rates = {scheme: [] for scheme in models}
    for _ in range(DECODE_RUNS):  # the three in turn: a drift in the VM's speed hits each of them
        for scheme, model in models.items():
            rates[scheme].append(_decode_bench(model, inputs, n_new, a.device, a.compile, warmup=False)["tokens_per_s"])
    del models, model
    gc.collect()
    out["decode_tok_s"] = {scheme: round(statistics.median(r), 2) for scheme, r in rates.items()}
    out["speedup"] = {s: round(out["decode_tok_s"][s] / out["decode_tok_s"][mode], 2) for s in ("int8", "int4")}
    out["speedups"] = {s: [round(x / b, 2) for x, b in zip(rates[s], rates[mode])] for s in ("int8", "int4")}
    if mode == "bf16":  # the scale of these errors on this model: bf16's own distance from fp32, same measures
        fp32 = random_model(MID, dtype=torch.float32, device=a.device)
        with torch.no_grad():
            exact = fp32(**{k: v.to(a.device) for k, v in batch.items()}).logits[0, -64:].float()
        out["bf16_vs_fp32"] = dict(zip(("logits_rel_err", "top1_agreement"), _agreement(ref, exact)))
    return out


def bench_steps(a) -> dict:
    from molmo import decoding
    from molmo.generation import GenerationConfig, generate
    from molmo.quant import quantize_model
    from molmo.testing import random_model

    mode = a.dtype or "bf16"
    model = random_model(MID, dtype=torch.bfloat16 if mode == "bf16" else torch.float32)
    model.mode = mode
    if a.quantize:
        quantize_model(model, a.quantize)
    inputs = _image_inputs(480, 640, 1, 12)
    cfg = GenerationConfig(max_new_tokens=a.new_tokens or 128, stop_on_eos=False, compile=True)
    kinds = {"regions": decoding.compiled_decode_one(model), "blockwise": decoding._compiled_step("blockwise")}
    out = {"workload": "steps", "dtype": mode, "quantize": a.quantize, "first_s": {}, "tok_s": {k: [] for k in kinds}}
    tokens, chosen = {}, decoding.compiled_decode_one
    try:
        for rep in range(a.repeat + 1):  # the first round compiles
            for kind, step in kinds.items():
                decoding.compiled_decode_one = lambda model, batch, step=step: step
                t = time.perf_counter()
                gen = generate(model, inputs, cfg)
                if rep == 0:
                    out["first_s"][kind], tokens[kind] = round(time.perf_counter() - t, 1), gen.tokens
                else:
                    out["tok_s"][kind].append(round(gen.timings["tokens_per_s"], 2))
    finally:
        decoding.compiled_decode_one = chosen
    r, b = out["tok_s"]["regions"], out["tok_s"]["blockwise"]
    out["median_tok_s"] = {"regions": statistics.median(r), "blockwise": statistics.median(b)}
    out["ratio"] = round(statistics.median(r) / statistics.median(b), 3)
    out["regions_won"] = f"{sum(x > y for x, y in zip(r, b))}/{len(r)}"
    out["same_tokens"] = bool(torch.equal(tokens["regions"], tokens["blockwise"]))
    return out


def _agreement(logits: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """[positions, V] against a reference: the last position's relative error, the top-1 agreement."""
    return (round(float((logits[-1] - ref[-1]).norm() / ref[-1].norm()), 4),
            round(float((logits.argmax(-1) == ref.argmax(-1)).float().mean()), 3))


def bench_full(a) -> dict:
    from molmo.generation import generate
    from molmo.testing import random_model

    device = a.device
    mode = a.dtype or "bf16"
    model = random_model(MolmoConfig(), dtype=torch.bfloat16 if mode == "bf16" else torch.float32, device=device)
    model.mode = mode
    if a.quantize:
        from molmo.quant import quantize_model

        quantize_model(model, a.quantize)
    inputs = _image_inputs(1080, 1920, 12, 12)  # 1 global + 12 crops
    n_crops = inputs["images"].shape[0]
    per_token = sum(t.numel() * t.element_size() for n, t in model.llm.state_dict().items() if not n.startswith("embed"))
    timings = _decode_bench(model, inputs, a.new_tokens or 128, device, a.compile)
    ttft = [generate(model, inputs, max_new_tokens=1).timings["prefill_s"] for _ in range(5)]
    images, masks = (inputs[k][None].to(device) for k in ("images", "image_masks"))
    vision = []
    with torch.no_grad(), model.precision():
        for _ in range(5):
            _sync(device)
            t = time.perf_counter()
            model.image_features(images, masks)
            _sync(device)
            vision.append(time.perf_counter() - t)
    hbm = a.hbm_gb_s or copy_bandwidth_gb_s(device)
    bound = hbm * 1e9 / per_token
    rate = timings.get("steady_tokens_per_s", timings["tokens_per_s"])
    batch = _batch_decode(model, a.batch_rows or 0, len(inputs["input_ids"]), a.new_tokens or 128, device, a.compile)
    return {"workload": "full", "dtype": mode, "quantize": a.quantize, "device": device, "compiled": timings["compiled"], "crops": n_crops,
            "prompt_tokens": len(inputs["input_ids"]), "ttft_s": round(statistics.median(ttft), 4),
            "ttft_runs_s": [round(t, 4) for t in ttft], "vision_connector_s": round(statistics.median(vision), 4),
            "decode_tok_s": round(rate, 1), "decode_tok_s_with_setup": round(timings["tokens_per_s"], 1),
            "new_tokens": a.new_tokens or 128, "weight_gb_per_token": round(per_token / 1e9, 2),
            "bandwidth_gb_s": round(hbm, 1), "bandwidth_bound_tok_s": round(bound, 1),
            "fraction_of_bound": round(rate / bound, 3), "batch_decode": batch}


def current_rss_gb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 1e9


def _resting_memory_gb(device) -> float:
    gc.collect()
    if str(device).startswith("cuda"):
        return torch.cuda.memory_allocated() / 1e9
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap pages back, so RSS is what is in use
    return current_rss_gb()


class _PeakMemory:
    """The peak of GPU memory allocated, or of the process RSS sampled every millisecond, in a block."""

    def __init__(self, device):
        self.cuda = str(device).startswith("cuda")
        self.peak_gb = 0.0

    def __enter__(self):
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        else:
            self.stop = threading.Event()
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self):
        while not self.stop.wait(0.001):
            self.peak_gb = max(self.peak_gb, current_rss_gb())

    def __exit__(self, *exc):
        if self.cuda:
            self.peak_gb = torch.cuda.max_memory_allocated() / 1e9
        else:
            self.stop.set()
            self.thread.join()
            self.peak_gb = max(self.peak_gb, current_rss_gb())


def bench_train(a) -> dict:
    """Fine-tuning steps on random weights: the mid model (CPU) or the full 7B-D (--size full, CUDA)."""
    from molmo.data import collate
    from molmo.testing import random_model
    from molmo.training import add_lora

    torch.manual_seed(0)
    full = a.size == "full"
    mode = a.dtype or ("bf16" if full else "fp32")
    model = random_model(MolmoConfig() if full else MID, seed=0, device=a.device,
                         dtype=torch.bfloat16 if mode == "bf16" else torch.float32).train()
    model.mode = mode
    model.set_gradient_checkpointing(a.gradient_checkpointing)
    if a.lora_rank:
        model = add_lora(model, a.lora_rank)
    rows = []
    h, w, crops, answer_len, batch_size = (1080, 1920, 12, 256, 1) if full else (480, 640, 1, 64, 2)
    for seed in range(batch_size):
        ex = _image_inputs(h, w, crops, 12, seed=seed)
        answer = torch.from_numpy(np.random.default_rng(seed).integers(0, 150_000, answer_len))
        ids = torch.cat([ex["input_ids"], answer, torch.tensor([151643])])
        weights = torch.zeros(len(ids) - 1)
        weights[len(ex["input_ids"]) - 1:] = 1  # the answer and its end-of-text token
        rows.append({**ex, "input_ids": ids[:-1], "labels": ids[1:], "loss_masks": weights})
    batch = collate(rows)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, foreach=False)
    if not a.device.startswith("cuda"):  # freed buffers of 1 MB and more go back to the OS at once, so
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # RSS follows live memory (M_MMAP_THRESHOLD)
    times, resting, peak, forward_peak = [], 0.0, 0.0, 0.0
    for step in range(a.steps):
        if step == 1:  # weights and optimizer state now exist, gradients were freed: the resting state
            resting = _resting_memory_gb(a.device)
        t = time.perf_counter()
        with _PeakMemory(a.device) as fwd:  # what the forward pass keeps for the backward one
            loss = model(**{k: v.to(a.device) for k, v in batch.items()}, return_logits=False).loss
        with _PeakMemory(a.device) as bwd:
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(a.device)
        times.append(time.perf_counter() - t)
        if step:
            peak, forward_peak = max(peak, fwd.peak_gb, bwd.peak_gb), max(forward_peak, fwd.peak_gb)
    weights_gb = sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9
    grads_gb = sum(p.numel() * p.element_size() for p in params) / 1e9
    optim_gb = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
                   if isinstance(t, torch.Tensor)) / 1e9
    out = {"workload": "train", "size": a.size, "dtype": mode, "device": a.device, "lora_rank": a.lora_rank,
           "gradient_checkpointing": a.gradient_checkpointing, "batch": batch_size,
           "tokens_per_row": batch["input_ids"].shape[1], "crops_per_row": batch["images"].shape[1],
           "loss": round(float(loss.detach()), 4), "step_s": round(statistics.median(times[1:] or times), 3),
           "step_runs_s": [round(t, 3) for t in times], "weights_gb": round(weights_gb, 2),
           "grads_gb": round(grads_gb, 3), "optimizer_gb": round(optim_gb, 3)}
    # Activations, as the issue defines them: the peak of the timed forward and backward passes above the
    # resting state, less the gradients; and what the forward pass alone holds above the resting state.
    out |= {"peak_gb": round(peak, 2), "resting_gb": round(resting, 2),
            "activation_gb": round(peak - resting - grads_gb, 2),
            "forward_activation_gb": round(forward_peak - resting, 2),
            "memory": "GPU memory allocated" if a.device.startswith("cuda") else "process RSS"}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", required=True, choices=["load", "convert", "preprocess", "mid", "full", "train", "batch", "quant", "steps"])
    p.add_argument("--dtype", choices=["fp32", "autocast", "bf16"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dir", default="/tmp/molmo-bench-7b", help="where the synthetic 7B checkpoint lives")
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--new-tokens", type=int, default=None, help="mid, full: 128 by default; batch: 32")
    p.add_argument("--tokenizer", default=str(Path(__file__).resolve().parents[2] / "shared" / "tokenizer"),
                   help="batch: folder of tokenizer.json")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="mid, full, quant: torch.compile the decode step, or not (default: as generation decides)")
    p.add_argument("--hbm-gb-s", type=float, default=None, help="bandwidth for the bound (default: measured copy)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="train: activation checkpointing")
    p.add_argument("--steps", type=int, default=3, help="train: optimizer steps (the first is not timed)")
    p.add_argument("--size", choices=["mid", "full"], default="mid", help="train, batch: the mid model or the full 7B-D")
    p.add_argument("--lora-rank", type=int, default=0, help="train: LoRA adapters of this rank (0: all weights)")
    p.add_argument("--quantize", choices=["int8", "int4"], help="load: quantize while loading; full, steps: quantize the decoder")
    p.add_argument("--tp", type=int, default=None, help="load: tensor parallelism over this many processes (torchrun)")
    p.add_argument("--batch-rows", type=int, default=None,
                   help="mid, full: also decode this many text prompts together against one (mid: 8 by default; 0: not)")
    p.add_argument("--reference-code", help="mid: also time the official code (folder of its .py files)")
    a = p.parse_args(argv)
    fn = {"load": bench_load, "convert": bench_convert, "preprocess": bench_preprocess, "mid": bench_mid,
          "full": bench_full, "train": bench_train, "batch": bench_batch, "quant": bench_quant,
          "steps": bench_steps}[a.workload]
    result = fn(a)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
