"""The decoder against transformers' Qwen2ForCausalLM, and its cache against full recomputation."""
import torch

from molmo import Molmo
from molmo.model import positions_and_mask

from conftest import rel


def test_logits_match_qwen2_for_causal_lm(hf_pair):
    _, qwen, _, _, molmo_dir = hf_pair
    model = Molmo.from_pretrained(molmo_dir, device="cpu")
    ids = torch.randint(0, 384, (2, 37))
    with torch.no_grad():
        ref = qwen(input_ids=ids).logits
        ours = model(ids).logits
    assert rel(ours, ref) <= 1e-5


def test_right_padding_does_not_change_real_positions(hf_pair):
    _, qwen, _, _, molmo_dir = hf_pair
    model = Molmo.from_pretrained(molmo_dir, device="cpu")
    ids = torch.randint(0, 384, (1, 20))
    padded = torch.cat([ids, torch.full((1, 5), -1)], 1)
    with torch.no_grad():
        assert rel(model(padded).logits[:, :20], qwen(input_ids=ids).logits) <= 1e-5


def test_extra_embedding_rows_serve_ids_past_the_vocabulary(hf_pair):
    model = Molmo.from_pretrained(hf_pair[4], device="cpu")
    emb = model.llm.embed(torch.tensor([[0, 383, 384, 511, -1]]))[0]
    assert torch.equal(emb[1], model.llm.embed.base[383])
    assert torch.equal(emb[2], model.llm.embed.extra[0]) and torch.equal(emb[3], model.llm.embed.extra[127])
    assert torch.equal(emb[4], model.llm.embed.base[0])  # padding embeds as id 0


def test_positions_skip_padding_and_mask_hides_padding_keys_as_the_reference():
    ids = torch.tensor([[5, 6, -1, -1], [5, 6, 7, 8], [-1, -1, -1, -1]])
    pos, mask = positions_and_mask(ids)
    assert pos.tolist() == [[0, 1, 1, 1], [0, 1, 2, 3], [0, 0, 0, 0]]
    # a padding query sees the real tokens before it and no padding key, itself included
    assert mask[0, 0, 3].tolist() == [True, True, False, False] and mask[0, 0, 1].tolist() == [True, True, False, False]
    assert mask[1, 0].equal(torch.ones(4, 4, dtype=torch.bool).tril())
    assert mask[2].all()  # nothing real: every column, as the reference's uniform softmax


def test_decode_attention_by_matmuls_equals_grouped_sdpa():
    import torch.nn.functional as F

    from molmo.llm import attend_by_matmuls

    g = torch.Generator().manual_seed(0)
    B, KV, G, S, d = 2, 2, 3, 11, 16
    q, k, v = (torch.randn(B, n, m, d, generator=g) for n, m in ((KV * G, 1), (KV, S), (KV, S)))
    mask = torch.rand(B, 1, 1, S, generator=g) > 0.3
    mask[..., 0] = True
    want = F.scaled_dot_product_attention(q, k.repeat_interleave(G, 1), v.repeat_interleave(G, 1), attn_mask=mask)
    got = attend_by_matmuls(q.reshape(B, KV, G, d), k, v, mask).reshape(B, KV * G, 1, d)
    assert torch.allclose(got, want, atol=1e-6)


def test_kv_cache_is_a_module_of_unsaved_buffers_written_by_column():
    from molmo.llm import KVCache

    cache = KVCache(2, 8, 3, 4, torch.float32, "cpu")
    assert dict(cache.named_buffers()).keys() == {"k", "v"} and cache.state_dict() == {}
    k, v = torch.randn(2, 3, 2, 4), torch.randn(2, 3, 2, 4)
    K, V = cache.update(torch.tensor([5, 6]), k, v)
    assert torch.equal(K[:, :, 5:7], k) and torch.equal(V[:, :, 5:7], v) and K[:, :, :5].abs().sum() == 0
    assert cache.to(torch.bfloat16).k.dtype == torch.bfloat16
    cache.reset()
    assert cache.k.abs().sum() == 0 and cache.v.abs().sum() == 0


def test_setup_cache_leaves_the_state_dict_alone_and_clear_cache_removes_it():
    from molmo.config import MolmoConfig
    from molmo.testing import random_model

    model = random_model(MolmoConfig.tiny(), seed=0)
    keys = set(model.state_dict())
    model.llm.setup_cache(1, 16, torch.float32, "cpu")
    assert set(model.state_dict()) == keys and all(b.attn.cache.k.shape == (1, 2, 16, 16) for b in model.llm.blocks)
    model.llm.clear_cache()
    assert all(b.attn.cache is None for b in model.llm.blocks)


def test_7b_o_decoder_matches_olmo2_for_causal_lm(olmo_pair):
    """The OLMo decoder options (q/k norms over whole projections, norms after each sublayer, no qkv
    bias, full multi-head attention) against transformers' Olmo2, which has exactly these."""
    olmo, _, molmo_dir = olmo_pair
    model = Molmo.from_pretrained(molmo_dir, device="cpu")
    c = model.config.llm
    assert (c.qkv_bias, c.qk_norm, c.norm_after, c.kv_heads) == (False, True, True, c.heads)
    ids = torch.randint(0, 384, (2, 29))
    padded = torch.cat([ids[:1, :20], torch.full((1, 9), -1)], 1)
    with torch.no_grad():
        assert rel(model(ids).logits, olmo(input_ids=ids).logits) <= 1e-5
        assert rel(model(padded).logits[:, :20], olmo(input_ids=ids[:1, :20]).logits) <= 1e-5
