"""Model configuration: plain dataclasses with the Molmo-7B-D-0924 numbers spelled out."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path


class ConfigError(ValueError):
    """A config.json that is missing, unreadable, or asks for something Molmo checkpoints never use."""


@dataclass(frozen=True)
class VisionConfig:
    """CLIP ViT-L/14-336 as Molmo uses it (23 of its 24 blocks)."""

    width: int = 1024  # image_emb_dim
    heads: int = 16
    kv_heads: int = 16
    head_dim: int = 64
    layers: int = 23
    mlp_dim: int = 4096
    num_pos: int = 577  # class token + 24 x 24 grid
    norm_eps: float = 1e-5
    image_size: int = 336
    patch_size: int = 14
    feature_layers: tuple[int, int] = (-2, -9)  # blocks whose outputs feed the connector
    pool_size: int = 2  # 2x2 patches -> one pooled token

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size  # 24

    @property
    def patch_dim(self) -> int:
        return self.patch_size * self.patch_size * 3  # 588

    @property
    def pooled_grid(self) -> int:
        return (self.grid + self.pool_size - 1) // self.pool_size  # 12


@dataclass(frozen=True)
class LLMConfig:
    """Qwen2-7B, in the sizes Molmo's config.json names."""

    hidden: int = 3584
    layers: int = 28
    heads: int = 28
    kv_heads: int = 4
    intermediate: int = 37888  # ff_proj width: value and gate halves together
    vocab: int = 152064  # rows of wte.embedding and of the output head
    extra_vocab: int = 128  # rows of wte.new_embedding (Molmo's image tokens)
    rope_theta: float = 1_000_000.0
    norm_eps: float = 1e-6
    max_position_embeddings: int = 4096

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def mlp_hidden(self) -> int:
        return self.intermediate // 2


@dataclass(frozen=True)
class MolmoConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)

    @classmethod
    def from_hf(cls, source: str | Path | dict) -> "MolmoConfig":
        """Read a snapshot's config.json (a folder, the file itself, or its parsed dict)."""
        if isinstance(source, dict):
            raw, where = source, "config.json"
        else:
            path = Path(source)
            path = path / "config.json" if path.is_dir() else path
            where = str(path)
            if not path.is_file():
                raise ConfigError(f"{where}: config.json not found")
            try:
                raw = json.loads(path.read_text())
            except (OSError, ValueError) as e:
                raise ConfigError(f"{where}: not readable JSON ({e})") from None
        return _from_dict(raw, where)

    @classmethod
    def tiny(cls) -> "MolmoConfig":
        """A few-MB model with the real wiring, for tests."""
        return cls(
            vision=VisionConfig(width=32, heads=2, kv_heads=2, head_dim=16, layers=10, mlp_dim=64),
            llm=LLMConfig(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=192, vocab=512),
        )

    def to_hf(self) -> dict:
        """The published config.json keys (plus `vision_backbone` when the ViT is not CLIP-L)."""
        c = self.llm
        out = {
            "architectures": ["MolmoForCausalLM"],
            "model_type": "molmo",
            "attention_layer_norm": False,
            "clip_qkv": None,
            "embedding_size": c.vocab,
            "vocab_size": c.vocab,
            "hidden_size": c.hidden,
            "initializer_range": 0.02,
            "intermediate_size": c.intermediate,
            "layer_norm_eps": c.norm_eps,
            "layer_norm_type": "rms",
            "max_position_embeddings": c.max_position_embeddings,
            "norm_after": False,
            "num_attention_heads": c.heads,
            "num_hidden_layers": c.layers,
            "num_key_value_heads": c.kv_heads,
            "qkv_bias": True,
            "rope_theta": c.rope_theta,
            "tie_word_embeddings": False,
            "torch_dtype": "float32",
            "use_cache": True,
            "use_position_ids": True,
            "weight_tying": False,
        }
        v = self.vision
        if v != VisionConfig():
            out["vision_backbone"] = {
                "image_emb_dim": v.width, "image_num_heads": v.heads,
                "image_num_key_value_heads": v.kv_heads, "image_head_dim": v.head_dim,
                "image_num_layers": v.layers, "image_mlp_dim": v.mlp_dim,
                "image_num_pos": v.num_pos, "image_norm_eps": v.norm_eps,
            }
        return out


# Values a Molmo config.json may carry that would change the computation; we support one each.
_FIXED = {
    "layer_norm_type": "rms",
    "attention_layer_norm": False,
    "norm_after": False,
    "clip_qkv": None,
    "qkv_bias": True,
    "weight_tying": False,
    "tie_word_embeddings": False,
    "use_position_ids": True,
}
_VISION_KEYS = {
    "image_emb_dim": "width", "image_num_heads": "heads", "image_num_key_value_heads": "kv_heads",
    "image_head_dim": "head_dim", "image_num_layers": "layers", "image_mlp_dim": "mlp_dim",
    "image_num_pos": "num_pos", "image_norm_eps": "norm_eps",
}


def _from_dict(raw: dict, where: str) -> MolmoConfig:
    for key, expected in _FIXED.items():
        if key in raw and raw[key] != expected:
            raise ConfigError(f"{where}: {key}={raw[key]!r} is not supported (Molmo uses {expected!r})")
    try:
        vocab = raw.get("embedding_size") or raw["vocab_size"]
        llm = LLMConfig(
            hidden=int(raw["hidden_size"]),
            layers=int(raw["num_hidden_layers"]),
            heads=int(raw["num_attention_heads"]),
            kv_heads=int(raw.get("num_key_value_heads") or raw["num_attention_heads"]),
            intermediate=int(raw["intermediate_size"]),
            vocab=int(vocab),
            rope_theta=float(raw.get("rope_theta", 1e6)),
            norm_eps=float(raw.get("layer_norm_eps", 1e-6)),
            max_position_embeddings=int(raw.get("max_position_embeddings", 4096)),
        )
    except KeyError as e:
        raise ConfigError(f"{where}: missing key {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: bad value ({e})") from None
    if raw.get("vocab_size", vocab) > vocab:
        raise ConfigError(f"{where}: vocab_size {raw['vocab_size']} exceeds embedding_size {vocab}")
    if llm.hidden % llm.heads or llm.heads % llm.kv_heads or llm.intermediate % 2:
        raise ConfigError(f"{where}: hidden_size/heads/kv_heads/intermediate_size do not divide evenly")

    vb = raw.get("vision_backbone") or {}
    if not isinstance(vb, dict):
        raise ConfigError(f"{where}: vision_backbone must be an object")
    unknown = sorted(set(vb) - set(_VISION_KEYS))
    if unknown:
        raise ConfigError(f"{where}: vision_backbone has unsupported keys {unknown}")
    vision = VisionConfig(**{_VISION_KEYS[k]: type(getattr(VisionConfig, _VISION_KEYS[k]))(v) for k, v in vb.items()})
    if vision.heads % vision.kv_heads:
        raise ConfigError(f"{where}: image_num_heads must be a multiple of image_num_key_value_heads")
    if round((vision.num_pos - 1) ** 0.5) ** 2 != vision.num_pos - 1:
        raise ConfigError(f"{where}: image_num_pos {vision.num_pos} is not 1 + a square grid")
    return MolmoConfig(vision=vision, llm=llm)
