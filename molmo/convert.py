"""Weight conversion: Molmo snapshots to another dtype, and to/from transformers' CLIP and Qwen2.

Everything streams tensor by tensor (in chunks where no reshaping is needed), so memory stays
near one tensor. Inputs are read with our safetensors reader; pickled `.bin` weights are refused.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path
import torch

from .checkpoint import (DTYPES, INDEX_FILE, CheckpointError, iter_chunks, read_tensor, snapshot_tensors,
                         write_snapshot)
from .config import LLMConfig, MolmoConfig, VisionConfig
from .loading import check_tensors, expected_tensors

SHARD_BYTES = 5 << 30
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")
VIT = "model.vision_backbone.image_vit."
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
    entries = _tensors(model_dir, "a Molmo snapshot")
    report = check_tensors(config, entries)
    if not report.ok:
        raise CheckpointError(f"{model_dir}: not a Molmo snapshot ({report.first_problem()})")
    return config, entries


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json")


def _copy_tokenizer(src: Path, out: Path) -> None:
    for f in TOKENIZER_FILES:
        if (src / f).is_file():
            shutil.copy2(src / f, out / f)


def _copy_side_files(src: Path, out: Path) -> None:
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith(WEIGHT_SUFFIXES) and f.name != INDEX_FILE:
            shutil.copy2(f, out / f.name)


def to_dtype(model_dir: Path, out: Path, dtype: torch.dtype, shard_bytes: int = SHARD_BYTES,
             progress: bool = True) -> list[Path]:
    """Rewrite a Molmo snapshot in `dtype`, sharded with an index; other files copied."""
    model_dir, out = Path(model_dir), Path(out)
    _, entries = _molmo_snapshot(model_dir)
    out.mkdir(parents=True, exist_ok=True)
    _copy_side_files(model_dir, out)
    cfg = _read_json(model_dir / "config.json")
    cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    bar = _progress(len(entries), f"to {cfg['torch_dtype']}", progress)

    def produce(name):
        bar.update(1)
        return (chunk for _, chunk in iter_chunks(entries[name]))

    specs = [(n, e.shape, dtype) for n, e in entries.items()]
    try:
        return write_snapshot(out, specs, produce, max_shard_bytes=shard_bytes)
    finally:
        bar.close()


# ---- transformers layouts ---------------------------------------------------------------------

def clip_names(layers: int) -> dict[str, str]:
    """Published Molmo ViT name -> CLIP (transformers) name, for the first `layers` blocks."""
    m = {
        VIT + "class_embedding": "vision_model.embeddings.class_embedding",
        VIT + "positional_embedding": "vision_model.embeddings.position_embedding.weight",
        VIT + "patch_embedding.weight": "vision_model.embeddings.patch_embedding.weight",  # conv <-> linear
    }
    for p in ("weight", "bias"):
        m[VIT + f"pre_ln.{p}"] = f"vision_model.pre_layrnorm.{p}"
        for i in range(layers):
            ours, theirs = VIT + f"transformer.resblocks.{i}.", f"vision_model.encoder.layers.{i}."
            for a, b in (("wq", "q_proj"), ("wk", "k_proj"), ("wv", "v_proj"), ("wo", "out_proj")):
                m[ours + f"attention.{a}.{p}"] = theirs + f"self_attn.{b}.{p}"
            m[ours + f"feed_forward.w1.{p}"] = theirs + f"mlp.fc1.{p}"
            m[ours + f"feed_forward.w2.{p}"] = theirs + f"mlp.fc2.{p}"
            m[ours + f"attention_norm.{p}"] = theirs + f"layer_norm1.{p}"
            m[ours + f"ffn_norm.{p}"] = theirs + f"layer_norm2.{p}"
    return m


def conv_to_linear(w: torch.Tensor) -> torch.Tensor:
    """CLIP conv [D, 3, p, p] -> bias-free linear [D, p*p*3] over pixels in (row, column, channel) order."""
    return w.permute(0, 2, 3, 1).reshape(w.shape[0], -1)


def linear_to_conv(w: torch.Tensor, patch: int) -> torch.Tensor:
    return w.reshape(w.shape[0], patch, patch, 3).permute(0, 3, 1, 2).contiguous()


def qwen2_parts(i: int) -> dict[str, list[str]]:
    """Published Molmo LLM block tensor -> the Qwen2 tensors it stacks, in row order."""
    q = f"model.layers.{i}."
    b = LLM + f"blocks.{i}."
    return {
        b + "att_proj.weight": [q + f"self_attn.{x}_proj.weight" for x in "qkv"],
        b + "att_proj.bias": [q + f"self_attn.{x}_proj.bias" for x in "qkv"],
        b + "attn_out.weight": [q + "self_attn.o_proj.weight"],
        b + "ff_proj.weight": [q + "mlp.up_proj.weight", q + "mlp.gate_proj.weight"],  # [value | gate]
        b + "ff_out.weight": [q + "mlp.down_proj.weight"],
        b + "attn_norm.weight": [q + "input_layernorm.weight"],
        b + "ff_norm.weight": [q + "post_attention_layernorm.weight"],
    }


def qwen2_names(layers: int) -> dict[str, list[str]]:
    m = {LLM + "wte.embedding": ["model.embed_tokens.weight"], LLM + "ln_f.weight": ["model.norm.weight"],
         LLM + "ff_out.weight": ["lm_head.weight"]}
    for i in range(layers):
        m.update(qwen2_parts(i))
    return m


def config_from_hf(clip_cfg: dict, qwen_cfg: dict) -> MolmoConfig:
    clip_cfg = clip_cfg.get("vision_config", clip_cfg)  # full CLIPModel configs nest it
    c = clip_cfg
    width, heads = c.get("hidden_size", 1024), c.get("num_attention_heads", 16)
    vision = VisionConfig(
        width=width, heads=heads, kv_heads=heads, head_dim=width // heads,
        layers=c.get("num_hidden_layers", 24) - 1, mlp_dim=c.get("intermediate_size", 4096),
        num_pos=(c.get("image_size", 336) // c.get("patch_size", 14)) ** 2 + 1,
        norm_eps=c.get("layer_norm_eps", 1e-5))
    if c.get("image_size", 336) != 336 or c.get("patch_size", 14) != 14:
        raise CheckpointError("the CLIP model must take 336 px images in 14 px patches")
    if c.get("hidden_act", "quick_gelu") != "quick_gelu":
        raise CheckpointError(f"CLIP hidden_act {c.get('hidden_act')!r}: Molmo uses quick_gelu")
    q = qwen_cfg
    llm = LLMConfig(
        hidden=q["hidden_size"], layers=q["num_hidden_layers"], heads=q["num_attention_heads"],
        kv_heads=q.get("num_key_value_heads", q["num_attention_heads"]), intermediate=2 * q["intermediate_size"],
        vocab=q["vocab_size"],
        rope_theta=q.get("rope_theta") or (q.get("rope_parameters") or {}).get("rope_theta", 1e6), norm_eps=q.get("rms_norm_eps", 1e-6),
        max_position_embeddings=min(q.get("max_position_embeddings", 4096), 4096))
    return MolmoConfig(vision=vision, llm=llm)


def from_hf(clip_dir: Path, qwen_dir: Path, out: Path, seed: int = 0, progress: bool = True) -> MolmoConfig:
    """A transformers CLIP ViT-L/14-336 and Qwen2 -> a Molmo snapshot to train from (fresh connector)."""
    clip_dir, qwen_dir, out = Path(clip_dir), Path(qwen_dir), Path(out)
    config = config_from_hf(_read_json(clip_dir / "config.json"), _read_json(qwen_dir / "config.json"))
    clip, qwen = _tensors(clip_dir, "CLIP"), _tensors(qwen_dir, "Qwen2")
    # Published CLIP snapshots say "vision_model.embeddings..."; transformers 5 saves "embeddings...".
    strip = "" if "vision_model.embeddings.class_embedding" in clip else "vision_model."
    vit_map = {k: v.removeprefix(strip) for k, v in clip_names(config.vision.layers).items()}
    llm_map = qwen2_names(config.llm.layers)
    for name, srcs in [(k, [v]) for k, v in vit_map.items()] + list(llm_map.items()):
        have = clip if name.startswith(VIT) else qwen
        for s in srcs:
            if s not in have:
                raise CheckpointError(f"{clip_dir if have is clip else qwen_dir}: missing tensor {s}")
    gen = torch.Generator().manual_seed(seed)
    shapes = expected_tensors(config)

    def produce(name):
        bar.update(1)
        if name in vit_map:
            t = read_tensor(clip[vit_map[name]], torch.float32)
            return conv_to_linear(t) if name.endswith("patch_embedding.weight") else t
        if name in llm_map:
            return torch.cat([read_tensor(qwen[s], torch.float32) for s in llm_map[name]])
        if name.endswith("pad_embed") or name.endswith(".bias"):
            return torch.zeros(shapes[name])
        return torch.randn(shapes[name], generator=gen) * 0.02  # new_embedding, pooling, projector

    out.mkdir(parents=True, exist_ok=True)
    bar = _progress(len(shapes), "from-hf", progress)
    try:
        write_snapshot(out, [(n, s, torch.float32) for n, s in shapes.items()], produce, SHARD_BYTES)
    finally:
        bar.close()
    (out / "config.json").write_text(json.dumps(config.to_hf(), indent=2))
    _copy_tokenizer(qwen_dir, out)
    return config


def to_hf(model_dir: Path, out: Path, progress: bool = True) -> tuple[Path, Path]:
    """A Molmo snapshot -> `out/qwen2` (Qwen2ForCausalLM) and `out/clip` (CLIPVisionModel)."""
    model_dir, out = Path(model_dir), Path(out)
    config, entries = _molmo_snapshot(model_dir)
    v, c = config.vision, config.llm
    if v.kv_heads != v.heads:
        raise CheckpointError(f"{model_dir}: a ViT with grouped key/value heads has no CLIP equivalent")
    dtype = DTYPES[entries[LLM + "ln_f.weight"].dtype]
    bar = _progress(len(entries), "to-hf", progress)

    # Qwen2: each fused Molmo tensor splits back into its parts, in row order.
    qkv_rows = [c.heads * c.head_dim, c.kv_heads * c.head_dim, c.kv_heads * c.head_dim]
    parts = {}  # qwen2 name -> (molmo name, rows before it, rows)
    for ours, theirs in qwen2_names(c.layers).items():
        full = entries[ours].shape
        rows = qkv_rows if ours.endswith(("att_proj.weight", "att_proj.bias")) else [full[0] // len(theirs)] * len(theirs)
        for k, name in enumerate(theirs):
            parts[name] = (ours, sum(rows[:k]), rows[k])

    def qwen2(name):  # read only this part's rows: they are contiguous in the file
        ours, start, rows = parts[name]
        e = entries[ours]
        row_bytes = e.nbytes // e.shape[0]
        bar.update(rows / e.shape[0])
        return read_tensor(replace(e, shape=(rows, *e.shape[1:]), offset=e.offset + start * row_bytes,
                                   nbytes=rows * row_bytes))

    qdir = out / "qwen2"
    write_snapshot(qdir, [(n, (rows, *entries[o].shape[1:]), dtype) for n, (o, _, rows) in parts.items()], qwen2,
                   SHARD_BYTES)
    (qdir / "config.json").write_text(json.dumps({
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
        "hidden_size": c.hidden, "intermediate_size": c.mlp_hidden, "num_hidden_layers": c.layers,
        "num_attention_heads": c.heads, "num_key_value_heads": c.kv_heads, "vocab_size": c.vocab,
        "rope_theta": c.rope_theta, "rms_norm_eps": c.norm_eps, "max_position_embeddings": c.max_position_embeddings,
        "tie_word_embeddings": False, "torch_dtype": str(dtype).removeprefix("torch."),
        "bos_token_id": 151643, "eos_token_id": 151643}, indent=2))
    _copy_tokenizer(model_dir, qdir)

    # CLIP: the kept layers; post_layernorm (unused by Molmo) written as the identity.
    vit = {theirs: ours for ours, theirs in clip_names(v.layers).items()}
    post = [f"vision_model.post_layernorm.{p}" for p in ("weight", "bias")]

    def clip(name):
        bar.update(1)
        if name in post:
            return torch.ones(v.width) if name.endswith("weight") else torch.zeros(v.width)
        t = read_tensor(entries[vit[name]])
        return linear_to_conv(t, v.patch_size) if name.endswith("patch_embedding.weight") else t

    conv = (v.width, 3, v.patch_size, v.patch_size)
    specs = [(n, conv if n.endswith("patch_embedding.weight") else entries[o].shape, dtype) for n, o in vit.items()]
    cdir = out / "clip"
    write_snapshot(cdir, specs + [(n, (v.width,), dtype) for n in post], clip, SHARD_BYTES)
    (cdir / "config.json").write_text(json.dumps({
        "architectures": ["CLIPVisionModel"], "model_type": "clip_vision_model", "hidden_act": "quick_gelu",
        "hidden_size": v.width, "intermediate_size": v.mlp_dim, "num_attention_heads": v.heads,
        "num_hidden_layers": v.layers, "image_size": v.image_size, "patch_size": v.patch_size,
        "layer_norm_eps": v.norm_eps, "num_channels": 3, "torch_dtype": str(dtype).removeprefix("torch.")}, indent=2))
    bar.close()
    return qdir, cdir
