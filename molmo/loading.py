"""Published Molmo checkpoint <-> our modules: one name table, full checks, meta-device loading."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checkpoint import DTYPES, CheckpointError, read_into, snapshot_tensors
from .config import MolmoConfig
from .model import Molmo

# (our name, published name); "{i}" stands for a block number. Every tensor maps through one row.
NAME_TABLE = [
    ("vision.patch_embed.weight", "model.vision_backbone.image_vit.patch_embedding.weight"),
    ("vision.cls_token", "model.vision_backbone.image_vit.class_embedding"),
    ("vision.pos_embed", "model.vision_backbone.image_vit.positional_embedding"),
    ("vision.pre_norm.", "model.vision_backbone.image_vit.pre_ln."),
    ("vision.blocks.{i}.attn_norm.", "model.vision_backbone.image_vit.transformer.resblocks.{i}.attention_norm."),
    ("vision.blocks.{i}.attn.", "model.vision_backbone.image_vit.transformer.resblocks.{i}.attention."),
    ("vision.blocks.{i}.mlp_norm.", "model.vision_backbone.image_vit.transformer.resblocks.{i}.ffn_norm."),
    ("vision.blocks.{i}.mlp.", "model.vision_backbone.image_vit.transformer.resblocks.{i}.feed_forward."),
    ("connector.pad_embed", "model.vision_backbone.pad_embed"),
    ("connector.pool.", "model.vision_backbone.image_pooling_2d."),
    ("connector.proj.", "model.vision_backbone.image_projector."),
    ("llm.embed.base", "model.transformer.wte.embedding"),
    ("llm.embed.extra", "model.transformer.wte.new_embedding"),
    ("llm.blocks.{i}.attn_norm.", "model.transformer.blocks.{i}.attn_norm."),
    ("llm.blocks.{i}.attn.qkv.", "model.transformer.blocks.{i}.att_proj."),
    ("llm.blocks.{i}.attn.out.", "model.transformer.blocks.{i}.attn_out."),
    ("llm.blocks.{i}.mlp_norm.", "model.transformer.blocks.{i}.ff_norm."),
    ("llm.blocks.{i}.mlp.up_gate.", "model.transformer.blocks.{i}.ff_proj."),
    ("llm.blocks.{i}.mlp.down.", "model.transformer.blocks.{i}.ff_out."),
    ("llm.norm.", "model.transformer.ln_f."),
    ("llm.lm_head.", "model.transformer.ff_out."),
]


def _rename(name: str, forward: bool) -> str:
    for ours, theirs in NAME_TABLE:
        src, dst = (ours, theirs) if forward else (theirs, ours)
        m = re.match(re.escape(src).replace(r"\{i\}", r"(?P<i>\d+)"), name)
        if m:
            return dst.replace("{i}", m.groupdict().get("i") or "") + name[m.end():]
    raise KeyError(name)


def published_name(ours: str) -> str:
    return _rename(ours, forward=True)


def our_name(published: str) -> str:
    return _rename(published, forward=False)


def build_meta(config: MolmoConfig) -> Molmo:
    with torch.device("meta"):
        return Molmo(config)


def expected_tensors(config: MolmoConfig) -> dict[str, tuple[int, ...]]:
    """Published tensor name -> shape, for a checkpoint of this config."""
    return {published_name(n): tuple(p.shape) for n, p in build_meta(config).named_parameters()}


def parameter_counts(config: MolmoConfig) -> dict[str, int]:
    """Parameters per part (vision, connector, llm) and in total, computed on the meta device."""
    model = build_meta(config)
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


def check_tensors(config: MolmoConfig, entries: dict) -> CheckReport:
    """Compare a snapshot's headers with what the config needs: names, shapes and float dtypes."""
    want = expected_tensors(config)
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


def load_model(folder: str | Path, dtype: torch.dtype = torch.float32, device="cpu") -> Molmo:
    """Build on the meta device, then fill every parameter from the snapshot, converting as it reads."""
    folder = Path(folder)
    config = MolmoConfig.from_hf(folder)
    entries = snapshot_tensors(folder)
    report = check_tensors(config, entries)
    if not report.ok:
        raise CheckpointError(f"{folder}: {report.first_problem()}")
    model = build_meta(config)
    for name, param in list(model.named_parameters()):
        dest = torch.empty(param.shape, dtype=dtype, device=device)
        read_into(entries[published_name(name)], dest)
        module_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(module_name), attr, torch.nn.Parameter(dest, requires_grad=param.requires_grad))
    return model.eval()


HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.model"]


def resolve_snapshot(path_or_id: str | Path, revision: str | None = None) -> Path:
    """A local folder as is; otherwise a hub id fetched (weights, configs, tokenizer; no code) into the HF cache."""
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return path
    name = str(path_or_id)
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise CheckpointError(f"{name}: not a model folder or a hub id like allenai/Molmo-7B-D-0924")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=name, revision=revision, allow_patterns=HUB_FILES))
    except Exception as e:  # network, auth or missing repo: one line, naming the id
        raise CheckpointError(f"{name}: could not download from the hub ({type(e).__name__}: {e})") from None
