"""Checkpoint layouts: our parameter names against the published Molmo, CLIP, Qwen2 and OLMo2 names.

Each table is a flat list of rows (ours, theirs): a row maps a name or a name prefix ("." at the
end), "{i}" standing for a block number. In QWEN2 and OLMO2 a fused tensor of ours lists the tensors it
stacks, in row order. `rename` maps through a table either way; every reverse is derived.
"""
from __future__ import annotations

import functools
import re

Row = tuple[str, "str | tuple[str, ...]"]

MOLMO: list[Row] = [
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
    ("llm.blocks.{i}.attn.q_norm.", "model.transformer.blocks.{i}.q_norm."),  # 7B-O
    ("llm.blocks.{i}.attn.k_norm.", "model.transformer.blocks.{i}.k_norm."),
    ("llm.blocks.{i}.mlp_norm.", "model.transformer.blocks.{i}.ff_norm."),
    ("llm.blocks.{i}.mlp.up_gate.", "model.transformer.blocks.{i}.ff_proj."),
    ("llm.blocks.{i}.mlp.down.", "model.transformer.blocks.{i}.ff_out."),
    ("llm.norm.", "model.transformer.ln_f."),
    ("llm.lm_head.", "model.transformer.ff_out."),
]

# transformers' CLIPVisionModel (its patch embedding is a conv: see convert.conv_to_linear).
CLIP: list[Row] = [
    ("vision.cls_token", "vision_model.embeddings.class_embedding"),
    ("vision.pos_embed", "vision_model.embeddings.position_embedding.weight"),
    ("vision.patch_embed.weight", "vision_model.embeddings.patch_embedding.weight"),
    ("vision.pre_norm.", "vision_model.pre_layrnorm."),
    ("vision.blocks.{i}.attn.wq.", "vision_model.encoder.layers.{i}.self_attn.q_proj."),
    ("vision.blocks.{i}.attn.wk.", "vision_model.encoder.layers.{i}.self_attn.k_proj."),
    ("vision.blocks.{i}.attn.wv.", "vision_model.encoder.layers.{i}.self_attn.v_proj."),
    ("vision.blocks.{i}.attn.wo.", "vision_model.encoder.layers.{i}.self_attn.out_proj."),
    ("vision.blocks.{i}.mlp.w1.", "vision_model.encoder.layers.{i}.mlp.fc1."),
    ("vision.blocks.{i}.mlp.w2.", "vision_model.encoder.layers.{i}.mlp.fc2."),
    ("vision.blocks.{i}.attn_norm.", "vision_model.encoder.layers.{i}.layer_norm1."),
    ("vision.blocks.{i}.mlp_norm.", "vision_model.encoder.layers.{i}.layer_norm2."),
]

# transformers' Qwen2ForCausalLM. Our fused qkv stacks q, k, v; up_gate stacks [value | gate].
QWEN2: list[Row] = [
    ("llm.embed.base", "model.embed_tokens.weight"),
    ("llm.blocks.{i}.attn.qkv.", ("model.layers.{i}.self_attn.q_proj.", "model.layers.{i}.self_attn.k_proj.",
                                  "model.layers.{i}.self_attn.v_proj.")),
    ("llm.blocks.{i}.attn.out.", "model.layers.{i}.self_attn.o_proj."),
    ("llm.blocks.{i}.mlp.up_gate.", ("model.layers.{i}.mlp.up_proj.", "model.layers.{i}.mlp.gate_proj.")),
    ("llm.blocks.{i}.mlp.down.", "model.layers.{i}.mlp.down_proj."),
    ("llm.blocks.{i}.attn_norm.", "model.layers.{i}.input_layernorm."),
    ("llm.blocks.{i}.mlp_norm.", "model.layers.{i}.post_attention_layernorm."),
    ("llm.norm.", "model.norm."),
    ("llm.lm_head.", "lm_head."),
]


# transformers' Olmo2ForCausalLM, the decoder of Molmo-7B-O: Qwen2's names, its two norms applied to
# the sublayers' outputs instead of their inputs, and norms over the whole q and k projections.
_NORMS_AFTER = {"llm.blocks.{i}.attn_norm.": "model.layers.{i}.post_attention_layernorm.",
                "llm.blocks.{i}.mlp_norm.": "model.layers.{i}.post_feedforward_layernorm."}
OLMO2: list[Row] = [(ours, _NORMS_AFTER.get(ours, theirs)) for ours, theirs in QWEN2] + [
    ("llm.blocks.{i}.attn.q_norm.", "model.layers.{i}.self_attn.q_norm."),
    ("llm.blocks.{i}.attn.k_norm.", "model.layers.{i}.self_attn.k_norm."),
]


@functools.cache
def _pattern(prefix: str) -> re.Pattern:
    return re.compile(re.escape(prefix).replace(r"\{i\}", r"(?P<i>\d+)"))


def rename(name: str, table: list[Row], reverse: bool = False) -> str | tuple[str, ...]:
    """Map `name` through the first matching row of `table` (reverse: from their side to ours).

    Returns a tuple for a fused row (QWEN2, forward); raises KeyError for a name no row covers."""
    for ours, theirs in table:
        sources = (theirs if isinstance(theirs, tuple) else (theirs,)) if reverse else (ours,)
        for src in sources:
            m = _pattern(src).match(name)
            if m:
                dst = ours if reverse else theirs
                fill = m.groupdict().get("i") or ""
                rest = name[m.end():]
                if isinstance(dst, tuple):
                    return tuple(d.replace("{i}", fill) + rest for d in dst)
                return dst.replace("{i}", fill) + rest
    raise KeyError(name)


def published_name(ours: str) -> str:
    """Our parameter name -> the published Molmo checkpoint's tensor name."""
    return rename(ours, MOLMO)


def our_name(published: str) -> str:
    return rename(published, MOLMO, reverse=True)
