"""Model configuration: plain dataclasses with the Molmo-7B-D-0924 numbers spelled out."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
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
    # The OLMo decoder of Molmo-7B-O sets these three the other way.
    qkv_bias: bool = True
    qk_norm: bool = False  # attention_layer_norm: RMSNorm over the whole q and k projections
    norm_after: bool = False  # normalise each sublayer's output instead of its input

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def mlp_hidden(self) -> int:
        return self.intermediate // 2

    @property
    def embedded_ids(self) -> int:
        """Token ids the embedding takes: the vocabulary, then Molmo's extra rows."""
        return self.vocab + self.extra_vocab


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
        out = {"architectures": ["MolmoForCausalLM"], "model_type": "molmo", **_FIXED,
               **{key: getattr(c, f) for f, key in MOLMO_KEYS.items()},
               **{key: getattr(c, f) for f, key in MOLMO_FLAGS.items()}, "vocab_size": c.vocab,
               "initializer_range": 0.02, "torch_dtype": "float32", "use_cache": True}
        if self.vision != VisionConfig():
            out["vision_backbone"] = {key: getattr(self.vision, f) for key, f in _VISION_KEYS.items()}
        return out

    def decoder_kind(self) -> str:
        """"qwen2" (7B-D, 72B) or "olmo2" (7B-O): the transformers class the decoder is."""
        c = self.llm
        if (c.qkv_bias, c.qk_norm, c.norm_after) == (True, False, False):
            return "qwen2"
        if (c.qkv_bias, c.qk_norm, c.norm_after) == (False, True, True):
            return "olmo2"
        raise ConfigError(f"a decoder with qkv_bias={c.qkv_bias}, attention_layer_norm={c.qk_norm}, "
                          f"norm_after={c.norm_after} is neither Qwen2 nor OLMo2: no transformers class to convert to")

    def to_decoder(self, dtype: str = "float32") -> dict:
        """The decoder as transformers' Qwen2ForCausalLM or Olmo2ForCausalLM config (intermediate size halved)."""
        c = self.llm
        kind = self.decoder_kind()
        out = {"architectures": [{"qwen2": "Qwen2ForCausalLM", "olmo2": "Olmo2ForCausalLM"}[kind]], "model_type": kind,
               "hidden_act": "silu", **{key: getattr(c, f) for f, key in DECODER_KEYS.items()},
               "intermediate_size": c.mlp_hidden, "tie_word_embeddings": False, "torch_dtype": dtype}
        if kind == "qwen2":
            out |= {"bos_token_id": 151643, "eos_token_id": 151643}
        else:
            out |= {"attention_bias": False, "bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
        return out

    def to_clip(self, dtype: str = "float32") -> dict:
        """The ViT as transformers' CLIPVisionModel config, with Molmo's blocks (the CLIP block Molmo
        drops is not restored)."""
        v = self.vision
        return {"architectures": ["CLIPVisionModel"], "model_type": "clip_vision_model", "hidden_act": "quick_gelu",
                **{key: getattr(v, f) for f, key in CLIP_KEYS.items()}, "num_hidden_layers": v.layers,
                "num_channels": 3, "torch_dtype": dtype}

    @classmethod
    def from_clip_decoder(cls, clip: dict, decoder: dict) -> "MolmoConfig":
        """A Molmo of a transformers CLIP (its last block dropped, as Molmo does) and a Qwen2 or OLMo2."""
        c = clip.get("vision_config", clip)  # full CLIPModel configs nest it
        if c.get("image_size", 336) != 336 or c.get("patch_size", 14) != 14:
            raise ConfigError("the CLIP model must take 336 px images in 14 px patches")
        if c.get("hidden_act", "quick_gelu") != "quick_gelu":
            raise ConfigError(f"CLIP hidden_act {c.get('hidden_act')!r}: Molmo uses quick_gelu")
        v = _read(VisionConfig, CLIP_KEYS, c, "CLIP config.json")
        v = replace(v, kv_heads=v.heads, head_dim=v.width // v.heads, layers=v.layers - 1,
                    num_pos=(v.image_size // v.patch_size) ** 2 + 1)
        q = dict(decoder)
        kind = q.get("model_type", "qwen2")
        if kind not in ("qwen2", "olmo2"):
            raise ConfigError(f"decoder config.json: model_type {kind!r}; Molmo decoders are qwen2 (7B-D, 72B) or olmo2 (7B-O)")
        q.setdefault("num_key_value_heads", q.get("num_attention_heads"))
        q["rope_theta"] = q.get("rope_theta") or (q.get("rope_parameters") or {}).get("rope_theta", 1e6)
        llm = _read(LLMConfig, DECODER_KEYS, q, f"{kind} config.json")
        olmo = kind == "olmo2"
        llm = replace(llm, intermediate=2 * llm.intermediate, max_position_embeddings=min(llm.max_position_embeddings, 4096),
                      qkv_bias=not olmo, qk_norm=olmo, norm_after=olmo)
        return cls(vision=v, llm=llm)


# Our config fields and the config.json keys that carry them, per layout; both directions use these.
MOLMO_KEYS = {
    "hidden": "hidden_size", "layers": "num_hidden_layers", "heads": "num_attention_heads",
    "kv_heads": "num_key_value_heads", "intermediate": "intermediate_size", "vocab": "embedding_size",
    "rope_theta": "rope_theta", "norm_eps": "layer_norm_eps", "max_position_embeddings": "max_position_embeddings",
}
MOLMO_FLAGS = {"qkv_bias": "qkv_bias", "qk_norm": "attention_layer_norm", "norm_after": "norm_after"}
DECODER_KEYS = {**MOLMO_KEYS, "vocab": "vocab_size", "norm_eps": "rms_norm_eps"}  # Qwen2 and OLMo2 alike
CLIP_KEYS = {"width": "hidden_size", "heads": "num_attention_heads", "layers": "num_hidden_layers",
             "mlp_dim": "intermediate_size", "norm_eps": "layer_norm_eps", "image_size": "image_size",
             "patch_size": "patch_size"}


def _read(cls, keys: dict, raw: dict, where: str):
    """A config dataclass from the keys of `raw` that `keys` names; absent keys keep the defaults.
    Sizes must be positive integers, other numbers positive."""
    values = {}
    for f, k in keys.items():
        v = raw.get(k)
        if v is None:
            continue
        kind = type(getattr(cls, f))
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 and math.isfinite(v)
        if not ok or (kind is int and v != int(v)):
            raise ConfigError(f"{where}: {k} must be a positive {'integer' if kind is int else 'number'}, got {v!r}")
        values[f] = kind(v)
    return cls(**values)


# Values a Molmo config.json may carry that would change the computation; we support one each.
_FIXED = {
    "layer_norm_type": "rms",
    "clip_qkv": None,
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
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: must be a JSON object, got {type(raw).__name__}")
    for key, expected in _FIXED.items():
        if key in raw and raw[key] != expected:
            raise ConfigError(f"{where}: {key}={raw[key]!r} is not supported (Molmo uses {expected!r})")
    raw = {**raw, "embedding_size": raw.get("embedding_size") or raw.get("vocab_size"),
           "num_key_value_heads": raw.get("num_key_value_heads") or raw.get("num_attention_heads")}
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "embedding_size"):
        if raw.get(key) is None:
            raise ConfigError(f"{where}: missing key {'vocab_size' if key == 'embedding_size' else key!r}")
    llm = _read(LLMConfig, MOLMO_KEYS, raw, where)
    flags = {}
    for f, key in MOLMO_FLAGS.items():
        if key in raw:
            if not isinstance(raw[key], bool):
                raise ConfigError(f"{where}: {key} must be true or false, got {raw[key]!r}")
            flags[f] = raw[key]
    llm = replace(llm, **flags)
    vocab = llm.vocab
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
    vision = _read(VisionConfig, {f: k for k, f in _VISION_KEYS.items()}, vb, f"{where}: vision_backbone")
    if vision.heads % vision.kv_heads:
        raise ConfigError(f"{where}: image_num_heads must be a multiple of image_num_key_value_heads")
    if round((vision.num_pos - 1) ** 0.5) ** 2 != vision.num_pos - 1:
        raise ConfigError(f"{where}: image_num_pos {vision.num_pos} is not 1 + a square grid")
    return MolmoConfig(vision=vision, llm=llm)
