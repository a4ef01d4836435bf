import json

import pytest

from molmo.config import ConfigError, MolmoConfig
from molmo.loading import expected_tensors, parameter_counts
from molmo.model import Molmo

from conftest import FACTS, GOLDEN


def test_published_7b_config_has_exact_parameter_counts_per_part():
    counts = parameter_counts(Molmo.meta(MolmoConfig.from_hf(FACTS)))
    assert counts == {"vision": 290_909_184, "connector": 114_040_832, "llm": 7_616_075_264,
                      "total": 8_021_025_280}


def test_published_7b_tensor_names_and_shapes_equal_tensors_json():
    facts = json.loads((FACTS / "tensors.json").read_text())
    ours = expected_tensors(Molmo.meta(MolmoConfig.from_hf(FACTS)))
    assert ours == {k: tuple(v) for k, v in facts["tensors"].items()}
    assert sum(__import__("math").prod(s) for s in ours.values()) == facts["total_parameters"]


def test_defaults_are_the_published_7b_numbers():
    assert MolmoConfig.from_hf(FACTS) == MolmoConfig()


def test_vision_backbone_override_is_read():
    cfg = MolmoConfig.from_hf(GOLDEN / "model" / "checkpoint")
    assert (cfg.vision.width, cfg.vision.heads, cfg.vision.head_dim, cfg.vision.layers, cfg.vision.mlp_dim) == \
        (64, 4, 16, 10, 128)
    assert (cfg.llm.hidden, cfg.llm.vocab, cfg.llm.kv_heads) == (64, 512, 2)


def test_to_hf_round_trips_through_from_hf():
    for cfg in (MolmoConfig(), MolmoConfig.tiny()):
        assert MolmoConfig.from_hf(cfg.to_hf()) == cfg


@pytest.mark.parametrize("key,value", [("layer_norm_type", "default"), ("clip_qkv", 8.0), ("weight_tying", True),
                                       ("norm_after", "yes"), ("attention_layer_norm", 1), ("qkv_bias", None)])
def test_unsupported_config_values_raise_naming_the_key(tmp_path, key, value):
    raw = MolmoConfig.tiny().to_hf() | {key: value}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match=key):
        MolmoConfig.from_hf(tmp_path)


def test_missing_config_and_missing_key_raise_clearly(tmp_path):
    with pytest.raises(ConfigError, match="config.json not found"):
        MolmoConfig.from_hf(tmp_path)
    raw = MolmoConfig.tiny().to_hf()
    del raw["hidden_size"]
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match="hidden_size"):
        MolmoConfig.from_hf(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not readable JSON"):
        MolmoConfig.from_hf(tmp_path)


@pytest.mark.parametrize("edit, message", [
    (lambda raw: [raw], "must be a JSON object, got list"),
    (lambda raw: {**raw, "num_attention_heads": 0}, "num_attention_heads must be a positive integer, got 0"),
    (lambda raw: {**raw, "hidden_size": 64.5}, "hidden_size must be a positive integer, got 64.5"),
    (lambda raw: {**raw, "num_hidden_layers": "2"}, "num_hidden_layers must be a positive integer, got '2'"),
    (lambda raw: {**raw, "vision_backbone": {"image_num_heads": 0}}, "image_num_heads must be a positive integer"),
])
def test_malformed_config_values_name_the_file_and_key(tmp_path, edit, message):
    (tmp_path / "config.json").write_text(json.dumps(edit(MolmoConfig.tiny().to_hf())))
    with pytest.raises(ConfigError, match=f"config.json.*{message}"):
        MolmoConfig.from_hf(tmp_path)


def test_7b_o_config_sets_the_olmo_decoder_options_and_has_its_published_size():
    from conftest import FACTS_7B_O

    cfg = MolmoConfig.from_hf(FACTS_7B_O)
    c = cfg.llm
    assert (c.qkv_bias, c.qk_norm, c.norm_after) == (False, True, True)
    assert (c.hidden, c.layers, c.heads, c.kv_heads, c.vocab, c.rope_theta) == (4096, 32, 32, 32, 100352, 5e5)
    assert parameter_counts(Molmo.meta(cfg))["total"] == 7_665_032_192
    assert MolmoConfig.from_hf(cfg.to_hf()) == cfg
    names = expected_tensors(Molmo.meta(cfg))
    assert names["model.transformer.blocks.0.q_norm.weight"] == (4096,)
    assert names["model.transformer.blocks.0.k_norm.weight"] == (4096,)
    assert "model.transformer.blocks.0.att_proj.bias" not in names


def test_72b_config_has_its_published_size():
    from conftest import SHARED

    assert parameter_counts(Molmo.meta(MolmoConfig.from_hf(SHARED / "checkpoint-facts-72b")))["total"] == 73_308_285_952
