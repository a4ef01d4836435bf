"""Generation: cache vs recomputation, batching, sampling, stop strings, streaming, limits."""
import pytest
import torch

from molmo import Molmo
from molmo.generation import GenerationConfig, generate, generate_from_batch, sampling_probs, stream
from molmo.preprocess import MolmoProcessor, Tokenizer

from conftest import TOKENIZER, example_inputs


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return Molmo.from_pretrained(tiny_dir, device="cpu")


@pytest.fixture(scope="module")
def text_model(text_model_dir):
    return Molmo.from_pretrained(text_model_dir, device="cpu")


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(TOKENIZER)


def _greedy_by_recomputation(model, ex, n):
    ids = ex["input_ids"][None]
    out = []
    with torch.no_grad():
        for _ in range(n):
            logits = model(ids, ex["images"][None], ex["image_masks"][None], ex["image_input_idx"][None]).logits
            nxt = logits[0, -1].argmax()
            out.append(int(nxt))
            ids = torch.cat([ids, nxt.view(1, 1)], 1)
    return out


def test_cached_greedy_equals_full_recomputation_fp32(tiny):
    ex = example_inputs()
    got = generate(tiny, ex, max_new_tokens=12, stop_on_eos=False)
    assert got.tokens[0].tolist() == _greedy_by_recomputation(tiny, ex, 12)


def test_batched_greedy_equals_each_row_alone(tiny):
    exs = [example_inputs(0, 40, 2), example_inputs(1, 25, 1), example_inputs(2, 33, 3)]
    batch = MolmoProcessor.collate(exs)
    together = generate(tiny, batch, max_new_tokens=10, stop_on_eos=False).tokens
    for b, ex in enumerate(exs):
        alone = generate(tiny, ex, max_new_tokens=10, stop_on_eos=False).tokens[0]
        assert torch.equal(together[b], alone), b


def test_generate_from_batch_returns_prompt_then_new_tokens(tiny):
    ex = example_inputs()
    out = tiny.generate_from_batch({k: v[None] for k, v in ex.items()}, GenerationConfig(max_new_tokens=5,
                                                                                        stop_on_eos=False))
    assert out.shape == (1, 45) and torch.equal(out[0, :40], ex["input_ids"])


def test_transformers_style_generation_config_is_accepted(tiny):
    class HFConfig:  # the attributes of transformers.GenerationConfig that matter
        max_new_tokens, do_sample, temperature, top_k, top_p, stop_strings = 4, False, 1.5, 50, 1.0, None
    ex = example_inputs()
    greedy = generate(tiny, ex, max_new_tokens=4).tokens
    out = generate_from_batch(tiny, ex, HFConfig())  # do_sample False: greedy, sampling fields ignored
    assert out.shape == (1, 40 + greedy.shape[1]) and torch.equal(out[0, 40:], greedy[0])
    HFConfig.do_sample = True
    sampled = [generate_from_batch(tiny, ex, HFConfig())[0, 40:] for _ in range(3)]
    assert any(not torch.equal(s, greedy[0]) for s in sampled)  # temperature 1.5 over 3 draws


def test_seeded_sampling_is_reproducible_and_seeds_differ(tiny):
    ex = example_inputs()
    kw = dict(max_new_tokens=16, temperature=1.5, top_k=100, stop_on_eos=False)
    a = generate(tiny, ex, seed=7, **kw).tokens
    b = generate(tiny, ex, seed=7, **kw).tokens
    c = generate(tiny, ex, seed=8, **kw).tokens
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_sampling_distribution_matches_direct_computation():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, 3.0]])
    t, k, p = 0.7, 4, 0.8
    probs = sampling_probs(logits, t, k, p)
    # Direct: softmax(l / t); keep the 4 most likely; then the smallest prefix with mass >= 0.8.
    base = torch.softmax(logits[0] / t, -1)
    order = base.argsort(descending=True).tolist()[:k]
    kept, mass = [], 0.0
    top = base[order] / base[order].sum()
    for i, q in zip(order, top.tolist()):
        kept.append(i)
        mass += q
        if mass >= p:
            break
    expect = torch.zeros(6)
    expect[kept] = base[kept] / base[kept].sum()
    assert torch.allclose(probs[0], expect, atol=1e-6)
    assert torch.allclose(sampling_probs(logits, 1.0, None, None)[0], torch.softmax(logits[0], -1))


def test_sampled_frequencies_follow_the_filtered_distribution(tiny):
    logits = torch.tensor([[1.0, 0.0, -0.5, 2.0]])
    probs = sampling_probs(logits, 1.0, 3, None)
    draws = torch.multinomial(probs.expand(20000, -1), 1, replacement=True, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(draws[:, 0], minlength=4) / 20000
    assert freq[2] == 0 and torch.allclose(freq, probs[0], atol=0.02)


def _textexample_inputs(tok, text="Describe"):
    return {"input_ids": torch.tensor([tok.bos_id] + tok.encode(f" User: {text} Assistant:"))}


def test_stop_string_split_across_tokens_is_caught(text_model, tok):
    ex = _textexample_inputs(tok)
    free = generate(text_model, ex, tokenizer=tok, max_new_tokens=30, stop_on_eos=False)
    text = free.texts[0]
    # Pick a stop string straddling a token boundary: the end of token 3 and the start of token 4.
    pieces = [tok.decode(free.tokens[0, :i].tolist()) for i in range(1, 8)]
    cut = len(pieces[2])
    stop = text[cut - 2: cut + 2] if len(text) > cut + 2 else text[-3:]
    assert len(stop) >= 2
    got = generate(text_model, ex, tokenizer=tok, max_new_tokens=30, stop_on_eos=False, stop_strings=[stop])
    assert got.texts[0] == text[: text.find(stop)]
    assert got.lengths[0] < 30 and (got.tokens[0, got.lengths[0]:] == tok.eos_id).all()


def test_streaming_yields_the_same_text_in_pieces(text_model, tok):
    ex = _textexample_inputs(tok, "Hello there")
    full = generate(text_model, ex, tokenizer=tok, max_new_tokens=20).texts[0]
    pieces = list(stream(text_model, ex, tok, max_new_tokens=20))
    assert len(pieces) > 1 and "".join(pieces) == full


def test_eos_stops_a_row_and_pads_it_with_eos(tiny):
    ex = example_inputs()
    free = generate(tiny, ex, max_new_tokens=8, stop_on_eos=False).tokens[0]
    eos = int(free[2])  # pretend the third token is EOS
    got = generate(tiny, ex, max_new_tokens=8, eos_token_id=eos)
    assert got.lengths == [free.tolist().index(eos) + 1]
    assert (got.tokens[0, got.lengths[0]:] == eos).all()


def test_prompt_past_the_context_is_an_error_before_compute(tiny):
    ex = {"input_ids": torch.randint(0, 512, (4000,))}
    with pytest.raises(ValueError, match="prompt of 4000 tokens \\+ max_new_tokens 100 exceeds the context of 4096"):
        generate(tiny, ex, max_new_tokens=100)


@pytest.mark.parametrize("mode", ["autocast", "bf16"])
def test_low_precision_modes_generate_and_keep_the_first_token(tiny_dir, mode):
    ex = example_inputs()
    ref = generate(Molmo.from_pretrained(tiny_dir, device="cpu"), ex, max_new_tokens=4, stop_on_eos=False)
    model = Molmo.from_pretrained(tiny_dir, dtype=mode, device="cpu")
    out = generate(model, ex, max_new_tokens=4, stop_on_eos=False)
    assert out.tokens.shape == (1, 4) and model.mode == mode
    assert out.tokens[0, 0] == ref.tokens[0, 0]


def test_autocast_does_not_leak_out_of_the_step_iterator(tiny_dir):
    from molmo.generation import token_steps
    model = Molmo.from_pretrained(tiny_dir, dtype="autocast", device="cpu")
    steps = token_steps(model, example_inputs(), GenerationConfig(max_new_tokens=3))
    next(steps)
    assert not torch.is_autocast_enabled("cpu")
    steps.close()
    assert all(b.attn.cache is None for b in model.llm.blocks)  # cache released with the iterator


def test_readme_quick_start_and_ask_helper(text_model_dir):
    from PIL import Image

    from molmo import GenerationConfig as GC
    from molmo import Molmo as M
    from molmo import MolmoProcessor as P
    from molmo import ask

    from conftest import GOLDEN
    processor = P.from_pretrained(text_model_dir)
    model = M.from_pretrained(text_model_dir, dtype="fp32", device="cpu")
    img = Image.open(GOLDEN / "preprocess" / "tiny_80x50.png")
    inputs = processor.process(images=[img], text="Describe this image.")
    inputs = {k: v.to(model.device).unsqueeze(0) for k, v in inputs.items()}
    output = model.generate_from_batch(inputs, GC(max_new_tokens=8, stop_strings="<|endoftext|>"),
                                       tokenizer=processor.tokenizer)
    text = processor.tokenizer.decode(output[0, inputs["input_ids"].size(1):], skip_special_tokens=True)
    assert text == ask(model, processor, "Describe this image.", images=[img], max_new_tokens=8)


def test_timings_give_first_token_latency_and_the_steady_rate_after_set_up(tiny):
    t = generate(tiny, example_inputs(), max_new_tokens=12, stop_on_eos=False).timings
    assert t["prefill_s"] > 0 and t["tokens_per_s"] == pytest.approx(11 / t["decode_s"])
    assert t["steady_tokens_per_s"] > 0  # measured from the sync at step 8 to the end
    short = generate(tiny, example_inputs(), max_new_tokens=5, stop_on_eos=False).timings
    assert "steady_tokens_per_s" not in short  # no sync between the first step and the end


def test_threads_sharing_one_model_each_get_their_solo_result(tiny):
    import threading

    exs = [example_inputs(s, 30 + 5 * s, 1 + s % 2) for s in range(4)]
    solo = [generate(tiny, ex, max_new_tokens=6, stop_on_eos=False).tokens for ex in exs]
    got = [None] * 4

    def work(i):
        for _ in range(3):
            got[i] = generate(tiny, exs[i], max_new_tokens=6, stop_on_eos=False).tokens

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(g, s) for g, s in zip(got, solo))


def test_unseeded_sampling_draws_from_torch_global_generator_without_reseeding_it(tiny):
    ex = example_inputs()
    kw = dict(max_new_tokens=8, temperature=1.5, stop_on_eos=False)
    torch.manual_seed(123)
    a = generate(tiny, ex, **kw).tokens
    after = torch.rand(1)
    torch.manual_seed(123)
    b = generate(tiny, ex, **kw).tokens
    assert torch.equal(a, b) and torch.equal(torch.rand(1), after)  # the global stream continues, not reseeded


@pytest.mark.parametrize("kw, message", [
    (dict(temperature=float("nan")), "temperature must be a finite number"),
    (dict(temperature=float("inf")), "temperature must be a finite number"),
    (dict(max_new_tokens=2.5), "max_new_tokens must be an integer"),
    (dict(max_new_tokens=True), "max_new_tokens must be an integer"),
    (dict(seed=2**64), r"seed must be an integer in \[0, 2\*\*64\)"),
    (dict(seed=-1), "seed must be an integer"),
    (dict(stop_strings=""), "stop_strings must be non-empty strings"),
    (dict(stop_strings=["ok", ""]), "stop_strings must be non-empty strings"),
    (dict(top_p=float("nan")), r"top_p must lie in \(0, 1\]"),
    (dict(top_k=1.5), "top_k must be an integer"),
])
def test_bad_generation_settings_get_one_clear_error(kw, message):
    with pytest.raises(ValueError, match=message):
        GenerationConfig(**kw)


def test_no_stop_strings_and_the_largest_seed_are_accepted(tiny):
    assert GenerationConfig(stop_strings=None).stop_strings == ()
    out = generate(tiny, example_inputs(), max_new_tokens=3, temperature=1.0, seed=2**64 - 1, stop_on_eos=False)
    assert out.tokens.shape == (1, 3)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_non_finite_logits_stop_generation_naming_the_step(tiny_dir, temperature):
    model = Molmo.from_pretrained(tiny_dir, device="cpu")
    with torch.no_grad():
        model.llm.blocks[0].mlp.down.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite logits \\(NaN or Inf\\) at new token 1"):
        generate(model, example_inputs(), max_new_tokens=12, temperature=temperature)


def test_generation_packs_the_weights_once_and_keeps_its_tokens(tiny_dir):
    """The packed CPU path (molmo.layers.Linear.pack: ViT, connector, decoder) against the plain one:
    same greedy tokens; the model's state dict unchanged; a compiled step's decoder, training and .to()
    see plain weights again."""
    from molmo.layers import Linear

    model = Molmo.from_pretrained(tiny_dir, device="cpu")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ex = example_inputs(3)
    plain = _greedy_by_recomputation(model, ex, 10)  # forward calls: plain weights
    got = generate(model, ex, max_new_tokens=10, stop_on_eos=False)
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    assert all(m.packed is not None for m in linears) == model.pack_for_inference()
    assert got.tokens[0].tolist() == plain
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    if model.pack_for_inference(decoder=False):  # what generation asks for before a compiled step
        decoder = {id(m) for m in model.llm.modules()}
        assert all((m.packed is None) == (id(m) in decoder) for m in linears)
    model.set_mode("bf16")  # .to(): plain again, converted
    assert all(m.packed is None and m.weight.dtype == torch.bfloat16 for m in linears)
