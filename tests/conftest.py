import functools
import json
import os
from pathlib import Path

import pytest
import torch

from molmo.config import LLMConfig, MolmoConfig, VisionConfig
from molmo.testing import write_random_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MOLMO_SHARED", ROOT.parent / "shared"))
GOLDEN = SHARED / "golden"
GOLDEN_7B_O = SHARED / "golden-7b-o"
FACTS_7B_O = SHARED / "checkpoint-facts-7b-o"
TOKENIZER = SHARED / "tokenizer"
FACTS = SHARED / "checkpoint-facts"

torch.set_num_threads(min(2, torch.get_num_threads()))


def pytest_configure(config):
    missing = [p for p in (GOLDEN / "FORMAT.md", TOKENIZER / "tokenizer.json", FACTS / "config.json") if not p.is_file()]
    if missing:
        raise pytest.UsageError(f"{missing[0]} not found: the tests need the shared goldens, tokenizer and checkpoint "
                                f"facts. Put this repository next to shared/, or set MOLMO_SHARED=/path/to/shared.")


@functools.cache
def golden_model(folder: Path):
    """The tiny random-weight Molmo of a golden folder, fp32, loaded once per session."""
    from molmo import Molmo

    return Molmo.from_pretrained(folder / "model" / "checkpoint", dtype="fp32", device="cpu")


def golden_cases(section: str) -> list[dict]:
    return json.loads((GOLDEN / section / "cases.json").read_text())


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


# A tiny model whose vocabulary is the real tokenizer's, so text round-trips.
def example_inputs(seed=0, L=40, crops=2) -> dict:
    """A random prompt of L ids with `crops` random crops for the tiny models (ids below 512)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 512, (L,), generator=g)
    idx = torch.full((crops, 144), -100)
    idx[:, :10] = torch.randperm(L - 2, generator=g)[: crops * 10].view(crops, 10) + 1
    return {"input_ids": ids, "images": torch.randn(crops, 576, 588, generator=g),
            "image_masks": torch.rand(crops, 576, generator=g), "image_input_idx": idx}


TOKENIZER_TINY = MolmoConfig(
    vision=VisionConfig(width=32, heads=2, kv_heads=2, head_dim=16, layers=10, mlp_dim=64),
    llm=LLMConfig(hidden=32, layers=2, heads=4, kv_heads=2, intermediate=64, vocab=152064),
)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """A random tiny Molmo (small vocabulary) in the published single-file layout."""
    return write_random_checkpoint(tmp_path_factory.mktemp("tiny"), MolmoConfig.tiny(), seed=1)


@pytest.fixture(scope="session")
def text_model_dir(tmp_path_factory) -> Path:
    """A random tiny Molmo with the real tokenizer and vocabulary: a complete snapshot for the CLI."""
    folder = tmp_path_factory.mktemp("snapshot")
    write_random_checkpoint(folder, TOKENIZER_TINY, seed=2, tokenizer_dir=TOKENIZER)
    (folder / "preprocessor_config.json").write_text((FACTS / "preprocessor_config.json").read_text())
    return folder


@pytest.fixture(scope="session")
def hf_pair(tmp_path_factory):
    """A tiny transformers CLIPVisionModel and Qwen2ForCausalLM (random), saved, and converted by
    `convert.from_hf` into a Molmo snapshot: (clip model, qwen model, clip dir, qwen dir, molmo dir)."""
    transformers = pytest.importorskip("transformers")
    from molmo.convert import from_hf

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("hf")
    clip = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=11,
        image_size=336, patch_size=14, hidden_act="quick_gelu", attn_implementation="eager")).eval()
    qwen = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
        num_hidden_layers=2, vocab_size=384, rope_theta=1e6, rms_norm_eps=1e-6, max_position_embeddings=4096,
        tie_word_embeddings=False, attn_implementation="eager")).eval()
    with torch.no_grad():  # transformers zero-initialises biases; random ones test the mapping better
        for name, p in list(clip.named_parameters()) + list(qwen.named_parameters()):
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    clip.save_pretrained(root / "clip")
    qwen.save_pretrained(root / "qwen2")
    from_hf(root / "clip", root / "qwen2", root / "molmo", seed=0, progress=False)
    return clip, qwen, root / "clip", root / "qwen2", root / "molmo"


@pytest.fixture(scope="session")
def olmo_pair(tmp_path_factory, hf_pair):
    """A tiny transformers Olmo2ForCausalLM (random; the decoder class of Molmo-7B-O) converted with
    the CLIP of `hf_pair` by `convert.from_hf`: (olmo2 model, olmo2 dir, molmo dir)."""
    transformers = pytest.importorskip("transformers")
    from molmo.convert import from_hf

    torch.manual_seed(1)
    root = tmp_path_factory.mktemp("olmo")
    olmo = transformers.Olmo2ForCausalLM(transformers.Olmo2Config(
        hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=4, num_hidden_layers=2,
        vocab_size=384, rope_theta=5e5, rms_norm_eps=1e-6, max_position_embeddings=4096, tie_word_embeddings=False,
        pad_token_id=None, bos_token_id=None, eos_token_id=None, attn_implementation="eager")).eval()
    with torch.no_grad():
        for name, p in olmo.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    olmo.save_pretrained(root / "olmo2")
    from_hf(hf_pair[2], root / "olmo2", root / "molmo", seed=0, progress=False)
    return olmo, root / "olmo2", root / "molmo"
