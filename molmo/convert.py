"""Weight conversion: Molmo snapshots to another dtype, and to/from transformers' CLIP and the
decoder's class: Qwen2 (7B-D, 72B) or OLMo2 (7B-O).

Everything streams tensor by tensor (in chunks where no reshaping is needed), so memory stays
near one tensor. Inputs are read with our safetensors reader; pickled `.bin` weights are refused.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import replace
from pathlib import Path
import torch

from .checkpoint import (DTYPES, INDEX_FILE, CheckpointError, iter_chunks, read_tensor, snapshot_tensors,
                         write_snapshot)
from .config import MolmoConfig
from .loading import check_tensors, expected_tensors, quantize_rows, quantized_dtypes
from .model import Molmo
from .names import CLIP, OLMO2, QWEN2, our_name, rename
from .quant import check_scheme, quantization_config, replace_linears, snapshot_scheme

SHARD_BYTES = 5 << 30
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")
LLM = "model.transformer."


def _progress(total: int, desc: str, enabled: bool):
    from huggingface_hub.utils import tqdm  # progress bars as the hub download shows them

    return tqdm(total=total, desc=desc, unit="tensor", disable=not enabled)


def _tensors(folder: Path, what: str) -> dict:
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a folder ({what})")
    if not any(folder.glob("*.safetensors")) and any(folder.glob("*.bin")):
        raise CheckpointError(f"{folder}: only pickled .bin weights; convert them to safetensors first ({what})")
    return snapshot_tensors(folder)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path}: not found")
    return json.loads(path.read_text())


def _molmo_snapshot(model_dir: Path) -> tuple[MolmoConfig, dict]:
    """Config and tensor headers of a Molmo snapshot, checked: one error for the wrong layout."""
    config = MolmoConfig.from_hf(model_dir)
    scheme = snapshot_scheme(model_dir)
    if scheme:
        raise CheckpointError(f"{model_dir}: a quantized ({scheme}) snapshot; conversions read float snapshots")
    entries = _tensors(model_dir, "a Molmo snapshot")
    report = check_tensors(expected_tensors(Molmo.meta(config)), entries)
    if not report.ok:
        raise CheckpointError(f"{model_dir}: not a Molmo snapshot ({report.first_problem()})")
    return config, entries


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json")


def _copy_tokenizer(src: Path, out: Path) -> None:
    for f in TOKENIZER_FILES:
        if (src / f).is_file():
            shutil.copy2(src / f, out / f)


def copy_side_files(src: Path, out: Path) -> None:
    """Every file of a snapshot but its weights and index: config, tokenizer, preprocessor, code."""
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith(WEIGHT_SUFFIXES) and f.name != INDEX_FILE:
            shutil.copy2(f, out / f.name)


def check_output(out: Path, inputs: list[Path], overwrite: bool = False) -> Path:
    """Refuse, before anything is written, an output folder that is, contains or lies inside an
    input, or that exists with files in it (unless `overwrite`)."""
    target = Path(out).resolve()
    for i in map(lambda x: Path(x).resolve(), inputs):
        if target == i or i in target.parents or target in i.parents:
            raise CheckpointError(f"{out}: the output is, contains or lies inside the input {i}; write elsewhere")
    if target.exists() and not target.is_dir():
        raise CheckpointError(f"{out}: exists and is not a folder")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise CheckpointError(f"{out}: already exists and is not empty (--overwrite replaces it whole)")
    return target


@contextlib.contextmanager
def staged(out: Path):
    """A temporary folder beside `out`, renamed to `out` (replacing it whole) only when the block
    completes: an interrupted conversion leaves `out` absent or as it was, never half-written."""
    out = Path(out)
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out)


def _write_beside(model_dir: Path, out: Path, cfg: dict, specs, produce, shard_bytes: int, bar) -> list[Path]:
    """A snapshot written staged: the source's side files, `cfg` as config.json, the tensors of `specs`."""
    with staged(out) as tmp:
        copy_side_files(model_dir, tmp)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        try:
            files = write_snapshot(tmp, specs, produce, max_shard_bytes=shard_bytes)
        finally:
            bar.close()
    return [out / f.name for f in files]


def to_dtype(model_dir: Path, out: Path, dtype: torch.dtype, shard_bytes: int = SHARD_BYTES,
             progress: bool = True, overwrite: bool = False) -> list[Path]:
    """Rewrite a Molmo snapshot in `dtype`, sharded with an index; other files copied."""
    model_dir, out = Path(model_dir), Path(out)
    _, entries = _molmo_snapshot(model_dir)
    check_output(out, [model_dir], overwrite)
    cfg = _read_json(model_dir / "config.json")
    cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
    bar = _progress(len(entries), f"to {cfg['torch_dtype']}", progress)

    def produce(name):
        bar.update(1)
        return (chunk for _, chunk in iter_chunks(entries[name]))

    specs = [(n, e.shape, dtype) for n, e in entries.items()]
    return _write_beside(model_dir, out, cfg, specs, produce, shard_bytes, bar)


def quantize(model_dir: Path, out: Path, scheme: str, shard_bytes: int = SHARD_BYTES, progress: bool = True,
             overwrite: bool = False) -> list[Path]:
    """A Molmo snapshot with the decoder's linear layers quantized ("int8" or "int4", `molmo.quant`),
    which `Molmo.from_pretrained` loads as saved; other tensors keep their dtype, other files copied."""
    check_scheme(scheme)
    model_dir, out = Path(model_dir), Path(out)
    config, entries = _molmo_snapshot(model_dir)
    check_output(out, [model_dir], overwrite)
    meta = Molmo.meta(config)
    replace_linears(meta, scheme)
    shapes, dtypes = expected_tensors(meta, stored_quantized=True), quantized_dtypes(meta)
    cfg = _read_json(model_dir / "config.json") | {"quantization_config": quantization_config(scheme)}
    bar = _progress(len(shapes), f"to {scheme}", progress)
    layer: dict[str, torch.Tensor] = {}  # the parts of the layer being written: weight, then its scales

    def produce(name):
        bar.update(1)
        if name not in dtypes:
            return (chunk for _, chunk in iter_chunks(entries[name]))
        prefix, part = name.rsplit(".", 1)
        if part == "weight":
            layer.clear()
            layer.update(quantize_rows(entries[name], scheme))
        return layer[part]

    specs = [(n, shape, DTYPES[dtypes[n] if n in dtypes else entries[n].dtype]) for n, shape in shapes.items()]
    return _write_beside(model_dir, out, cfg, specs, produce, shard_bytes, bar)


# ---- transformers layouts ---------------------------------------------------------------------

DECODER_TABLES = {"qwen2": QWEN2, "olmo2": OLMO2}


def hf_sources(published: str, decoder: str = "qwen2") -> tuple[str, tuple[str, ...]] | None:
    """Where a published Molmo tensor comes from in transformers' layouts: ("clip" or the decoder's
    kind, the tensors it stacks in row order), or None for what neither has (connector, new_embedding)."""
    ours = our_name(published)
    for kind, table in (("clip", CLIP), (decoder, DECODER_TABLES[decoder])):
        try:
            src = rename(ours, table)
        except KeyError:
            continue
        return kind, src if isinstance(src, tuple) else (src,)
    return None


def conv_to_linear(w: torch.Tensor) -> torch.Tensor:
    """CLIP conv [D, 3, p, p] -> bias-free linear [D, p*p*3] over pixels in (row, column, channel) order."""
    return w.permute(0, 2, 3, 1).reshape(w.shape[0], -1)


def linear_to_conv(w: torch.Tensor, patch: int) -> torch.Tensor:
    return w.reshape(w.shape[0], patch, patch, 3).permute(0, 3, 1, 2).contiguous()


def from_hf(clip_dir: Path, decoder_dir: Path, out: Path, seed: int = 0, progress: bool = True,
            overwrite: bool = False) -> MolmoConfig:
    """A transformers CLIP ViT-L/14-336 and a Qwen2 or OLMo2 -> a Molmo snapshot to train from (fresh connector)."""
    clip_dir, qwen_dir, out = Path(clip_dir), Path(decoder_dir), Path(out)
    check_output(out, [clip_dir, qwen_dir], overwrite)
    config = MolmoConfig.from_clip_decoder(_read_json(clip_dir / "config.json"), _read_json(qwen_dir / "config.json"))
    kind = config.decoder_kind()
    clip, qwen = _tensors(clip_dir, "CLIP"), _tensors(qwen_dir, kind)
    # Published CLIP snapshots say "vision_model.embeddings..."; transformers 5 saves "embeddings...".
    strip = "" if "vision_model.embeddings.class_embedding" in clip else "vision_model."
    shapes = expected_tensors(Molmo.meta(config))
    sources = {}  # published name -> (file entries, source names)
    for name in shapes:
        found = hf_sources(name, kind)
        if found is None:
            continue
        have, folder = (clip, clip_dir) if found[0] == "clip" else (qwen, qwen_dir)
        srcs = [s.removeprefix(strip) if have is clip else s for s in found[1]]
        for s in srcs:
            if s not in have:
                raise CheckpointError(f"{folder}: missing tensor {s}")
        sources[name] = (have, srcs)
    gen = torch.Generator().manual_seed(seed)

    def produce(name):
        bar.update(1)
        if name in sources:
            have, srcs = sources[name]
            t = torch.cat([read_tensor(have[s], torch.float32) for s in srcs])
            return conv_to_linear(t) if name.endswith("patch_embedding.weight") else t
        if name.endswith("pad_embed") or name.endswith(".bias"):
            return torch.zeros(shapes[name])
        return torch.randn(shapes[name], generator=gen) * 0.02  # new_embedding, pooling, projector

    bar = _progress(len(shapes), "from-hf", progress)
    with staged(out) as tmp:
        try:
            write_snapshot(tmp, [(n, s, torch.float32) for n, s in shapes.items()], produce, SHARD_BYTES)
        finally:
            bar.close()
        (tmp / "config.json").write_text(json.dumps(config.to_hf(), indent=2))
        _copy_tokenizer(qwen_dir, tmp)
    return config


def to_hf(model_dir: Path, out: Path, progress: bool = True, overwrite: bool = False) -> tuple[Path, Path]:
    """A Molmo snapshot -> `out/qwen2` (Qwen2ForCausalLM; 7B-D, 72B) or `out/olmo2` (Olmo2ForCausalLM; 7B-O),
    and `out/clip` (CLIPVisionModel)."""
    model_dir, out = Path(model_dir), Path(out)
    config, entries = _molmo_snapshot(model_dir)
    check_output(out, [model_dir], overwrite)
    v, c = config.vision, config.llm
    if v.kv_heads != v.heads:
        raise CheckpointError(f"{model_dir}: a ViT with grouped key/value heads has no CLIP equivalent")
    kind = config.decoder_kind()
    dtype = DTYPES[entries[LLM + "ln_f.weight"].dtype]
    bar = _progress(len(entries), "to-hf", progress)

    # The decoder: each fused Molmo tensor splits back into its parts, in row order.
    qkv_rows = [c.heads * c.head_dim, c.kv_heads * c.head_dim, c.kv_heads * c.head_dim]
    parts, vit = {}, {}  # decoder name -> (molmo name, rows before it, rows); clip name -> molmo name
    for ours in entries:
        found = hf_sources(ours, kind)
        if found is None or found[0] == "clip":
            if found is not None:
                vit[found[1][0]] = ours
            continue
        theirs, full = found[1], entries[ours].shape
        rows = qkv_rows if len(theirs) == 3 else [full[0] // len(theirs)] * len(theirs)
        for k, name in enumerate(theirs):
            parts[name] = (ours, sum(rows[:k]), rows[k])

    def qwen2(name):  # read only this part's rows: they are contiguous in the file
        ours, start, rows = parts[name]
        e = entries[ours]
        row_bytes = e.nbytes // e.shape[0]
        bar.update(rows / e.shape[0])
        return read_tensor(replace(e, shape=(rows, *e.shape[1:]), offset=e.offset + start * row_bytes,
                                   nbytes=rows * row_bytes))

    # CLIP: the kept layers; post_layernorm (unused by Molmo) written as the identity.
    post = [f"vision_model.post_layernorm.{p}" for p in ("weight", "bias")]

    def clip(name):
        bar.update(1)
        if name in post:
            return torch.ones(v.width) if name.endswith("weight") else torch.zeros(v.width)
        t = read_tensor(entries[vit[name]])
        return linear_to_conv(t, v.patch_size) if name.endswith("patch_embedding.weight") else t

    conv = (v.width, 3, v.patch_size, v.patch_size)
    clip_specs = [(n, conv if n.endswith("patch_embedding.weight") else entries[o].shape, dtype) for n, o in vit.items()]
    clip_specs += [(n, (v.width,), dtype) for n in post]
    qwen2_specs = [(n, (rows, *entries[o].shape[1:]), dtype) for n, (o, _, rows) in parts.items()]
    dtype_name = str(dtype).removeprefix("torch.")
    with staged(out) as tmp:
        write_snapshot(tmp / kind, qwen2_specs, qwen2, SHARD_BYTES)
        (tmp / kind / "config.json").write_text(json.dumps(config.to_decoder(dtype_name), indent=2))
        _copy_tokenizer(model_dir, tmp / kind)
        write_snapshot(tmp / "clip", clip_specs, clip, SHARD_BYTES)
        (tmp / "clip" / "config.json").write_text(json.dumps(config.to_clip(dtype_name), indent=2))
    bar.close()
    return out / kind, out / "clip"
