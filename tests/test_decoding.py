"""The decode step: compiled (one graph, its blocks one nested region) against eager, the automatic
choice to compile, and decoding on eagerly when compiling fails."""
import dataclasses
import warnings

import pytest
import torch

import molmo.decoding as decoding
from molmo import Molmo, MolmoConfig
from molmo.generation import GenerationConfig, generate
from molmo.testing import random_model

from conftest import example_inputs


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return Molmo.from_pretrained(tiny_dir, device="cpu")


@pytest.mark.slow
def test_compiled_decode_step_gives_the_eager_tokens_in_one_graph(tiny):
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()  # reset() keeps the counts of compilations in earlier tests
    assert len(tiny.llm.blocks) > 1
    exs = [example_inputs(3, 40, 2), example_inputs(4, 52, 1)]  # both fit one 256-column cache: one compilation
    for ex in exs:
        eager = generate(tiny, ex, max_new_tokens=8, stop_on_eos=False, compile=False).tokens
        compiled = generate(tiny, ex, max_new_tokens=8, stop_on_eos=False, compile=True).tokens
        assert torch.equal(compiled, eager)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1  # the whole step


@pytest.mark.slow
def test_compiled_steps_of_one_row_then_of_two_give_the_eager_tokens(tiny):
    torch._dynamo.reset()  # one row: one graph whose blocks are a nested region; then two: a graph per block
    two = [example_inputs(5, 40, 1), example_inputs(6, 40, 1)]
    rows = {k: torch.stack([two[0][k], two[1][k]]) for k in two[0]}
    for ex in [example_inputs(3, 40, 1), example_inputs(4, 300, 1), rows]:
        eager = generate(tiny, ex, max_new_tokens=4, stop_on_eos=False, compile=False).tokens
        assert torch.equal(generate(tiny, ex, max_new_tokens=4, stop_on_eos=False, compile=True).tokens, eager)


@pytest.mark.slow
def test_compiled_decode_step_traces_one_block_for_all():
    captured = []
    for layers in (2, 6):
        c = MolmoConfig.tiny()
        model = random_model(dataclasses.replace(c, llm=dataclasses.replace(c.llm, layers=layers)))
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        generate(model, example_inputs(3, 40, 2), max_new_tokens=3, stop_on_eos=False, compile=True)
        captured.append(torch._dynamo.utils.counters["stats"]["calls_captured"])
    block_ops = 15  # norms, products, rotary, cache writes, attention: more than this many calls a block
    assert captured[1] - captured[0] < 2 * block_ops, captured  # 4 more blocks: a region call each, not their ops


@pytest.mark.slow
def test_compiled_functions_keep_more_variants_than_dynamos_default_of_eight():
    torch._dynamo.reset()
    add = decoding._compiled(lambda x: x + 1)
    dtypes = (torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.int64, torch.int32, torch.int16,
              torch.int8, torch.uint8, torch.complex64)  # a graph each (fullgraph: past the limit dynamo raises)
    for dtype in dtypes:
        assert torch.equal(add(torch.zeros(3, dtype=dtype)), torch.ones(3, dtype=dtype))


def test_automatic_compile_takes_cpu_batch_one_answers_long_enough_or_after_a_compiled_one(tiny, monkeypatch):
    monkeypatch.setattr(tiny, "compiled_decoding", None, raising=False)
    # (from the layers' sizes: an earlier generation may have packed the weights, leaving them empty)
    linear_bytes = sum(m.in_features * m.out_features * 4 for m in tiny.llm.modules() if isinstance(m, torch.nn.Linear))
    monkeypatch.setattr(decoding, "AUTO_COMPILE_BYTES", linear_bytes * 9)  # 10 new tokens and more
    cfg = GenerationConfig  # compile=None by default
    assert cfg().compile is None
    assert decoding.compiles(tiny, cfg(max_new_tokens=10), 1)
    assert not decoding.compiles(tiny, cfg(max_new_tokens=9), 1)
    assert not decoding.compiles(tiny, cfg(max_new_tokens=100), 2)  # more rows: eager packed products
    assert decoding.compiles(tiny, cfg(max_new_tokens=2, compile=True), 2)  # an explicit choice wins
    assert not decoding.compiles(tiny, cfg(max_new_tokens=100, compile=False), 1)

    used = []  # the compiled step, recorded instead of compiled (test_compiled_decode_step... compiles it)
    monkeypatch.setattr(decoding, "compiled_decode_one",
                        lambda model, batch: lambda *a: used.append(model.device.type) or decoding.decode_one(*a))
    ex = example_inputs(5)
    eager = generate(tiny, ex, max_new_tokens=10, stop_on_eos=False, compile=False).tokens
    assert torch.equal(generate(tiny, ex, max_new_tokens=10, stop_on_eos=False).tokens, eager)
    assert used == ["cpu"] * 9 and tiny.compiled_decoding
    generate(tiny, ex, max_new_tokens=3, stop_on_eos=False)  # short, but the model compiled before
    assert len(used) == 11


def test_automatic_compile_decodes_eagerly_with_one_warning_when_compiling_fails(tiny, monkeypatch):
    def no_compiler(*args):
        raise RuntimeError("InductorError: no C++ compiler found\n(details)")

    monkeypatch.setattr(tiny, "compiled_decoding", None, raising=False)
    monkeypatch.setattr(decoding, "AUTO_COMPILE_BYTES", 0)
    monkeypatch.setattr(decoding, "compiled_decode_one", lambda model, batch: no_compiler)
    ex = example_inputs(6)
    eager = generate(tiny, ex, max_new_tokens=6, stop_on_eos=False, compile=False).tokens
    with pytest.warns(UserWarning, match="decoding eagerly: compiling the decode step failed: InductorError"):
        auto = generate(tiny, ex, max_new_tokens=6, stop_on_eos=False).tokens
    assert torch.equal(auto, eager) and tiny.compiled_decoding is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second attempt, no second warning
        assert torch.equal(generate(tiny, ex, max_new_tokens=6, stop_on_eos=False).tokens, eager)
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler"):  # asked for explicitly: the error
        generate(tiny, ex, max_new_tokens=6, stop_on_eos=False, compile=True)
