"""Weight-only int8 / int4: round-trip error bounds, the kernels against the dequantized product,
quantizing while loading against a saved quantized snapshot, and bad quantized files."""
import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from molmo import Molmo
from molmo.checkpoint import CheckpointError
from molmo.config import LLMConfig, MolmoConfig, VisionConfig
from molmo.convert import quantize
from molmo.generation import generate
from molmo.layers import MIN_ROWS, cpu_has_bf16_math, streamed_product
from molmo.quant import (GROUP_SIZE, QuantLinear, dequantize, int4_cpu_block, quantize_int4, quantize_int8,
                         unpack_int4)
from molmo.testing import write_random_checkpoint

from conftest import FACTS, ROOT, rel

# Input sizes divisible by the int4 group size (64): hidden 128, MLP hidden 128.
QUANT_TINY = MolmoConfig(
    vision=VisionConfig(width=32, heads=2, kv_heads=2, head_dim=16, layers=10, mlp_dim=64),
    llm=LLMConfig(hidden=128, layers=2, heads=4, kv_heads=2, intermediate=256, vocab=512),
)


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory):
    return write_random_checkpoint(tmp_path_factory.mktemp("q") / "m", QUANT_TINY, seed=3)


@pytest.fixture(scope="module")
def saved(snapshot, tmp_path_factory):
    root = tmp_path_factory.mktemp("saved")
    return {s: quantize(snapshot, root / s, s, progress=False) and root / s for s in ("int8", "int4")}


def test_int8_round_trip_error_is_at_most_half_a_step_per_output_channel():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 200, generator=g) * torch.rand(96, 1, generator=g) * 3
    t = quantize_int8(w)
    assert t["weight"].dtype == torch.int8 and t["weight"].abs().max() <= 127
    err = (dequantize("int8", t) - w).abs()
    assert (err <= t["weight_scale"][:, None] / 2 * (1 + 1e-5)).all()


def test_int4_round_trip_error_is_at_most_half_a_step_per_group_and_packing_is_lossless():
    w = torch.randn(48, 4 * GROUP_SIZE, generator=torch.Generator().manual_seed(0)) * 2 + 0.5
    t = quantize_int4(w)
    assert t["weight"].dtype == torch.uint8 and t["weight"].shape == (48, 2 * GROUP_SIZE)
    q = unpack_int4(t["weight"])
    assert q.max() <= 15 and torch.equal(q[:, 0::2] | (q[:, 1::2] << 4), t["weight"])
    step = t["weight_scale"].repeat_interleave(GROUP_SIZE, 1)
    assert ((dequantize("int4", t) - w).abs() <= step / 2 * (1 + 1e-4) + 1e-6).all()


@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_linear_equals_the_dequantized_product(scheme, dtype):
    torch.manual_seed(0)
    w, b = torch.randn(160, 2 * GROUP_SIZE) / 10, torch.randn(160)
    layer = QuantLinear(scheme, w.shape[1], w.shape[0], bias=True)
    stored = quantize_int8(w) if scheme == "int8" else quantize_int4(w)
    layer.set_weights(stored)
    layer.bias = torch.nn.Parameter(b.to(dtype), requires_grad=False)
    for rows in (1, 5, MIN_ROWS):  # a token's rows (the kernels); a prompt's (on CPU: the dequantized product)
        x = torch.randn(2, rows, w.shape[1]).to(dtype)
        want = x.float() @ dequantize(scheme, stored).T + b.to(dtype).float()
        got = layer(x)
        assert got.shape == (2, rows, 160) and got.dtype == dtype
        assert rel(got, want) <= (1e-6 if dtype == torch.float32 else 1e-2)


@pytest.mark.skipif(not cpu_has_bf16_math(), reason="bf16 prompts on int8 weights take the kernel without bf16 math")
def test_int8_prompt_rows_in_bf16_take_the_bf16_dequantized_product_and_agree_with_the_kernel(monkeypatch):
    torch.manual_seed(4)
    w = torch.randn(160, 2 * GROUP_SIZE) / 10
    stored = quantize_int8(w)
    layer = QuantLinear("int8", w.shape[1], w.shape[0], bias=False)
    layer.set_weights(stored)
    layer.to(torch.bfloat16)
    taken = []
    product = layer._dequantized_product
    monkeypatch.setattr(layer, "_dequantized_product", lambda x: taken.append(x.dtype) or product(x))
    x = torch.randn(MIN_ROWS, w.shape[1]).bfloat16()
    kernel = torch._weight_int8pack_mm(x, layer.weight, layer.weight_scale)
    got = layer(x)
    assert taken == [torch.bfloat16] and got.dtype == torch.bfloat16
    assert rel(got, kernel) <= 1e-2 and rel(got, x.float() @ dequantize("int8", stored).T) <= 1e-2
    layer(x[:MIN_ROWS - 1])  # fewer rows: the kernel
    assert taken == [torch.bfloat16]


@pytest.mark.slow
def test_compiled_int8_linear_of_one_row_takes_the_reduction_and_equals_the_dequantized_product(monkeypatch):
    import molmo.quant as quant

    torch.manual_seed(5)
    w, b = torch.randn(96, 4 * GROUP_SIZE) / 10, torch.randn(96)
    stored = quantize_int8(w)
    layer = QuantLinear("int8", w.shape[1], w.shape[0], bias=True)
    layer.set_weights(stored)
    layer.bias = torch.nn.Parameter(b, requires_grad=False)
    taken = []
    monkeypatch.setattr(quant, "streamed_product", lambda *a: taken.append(1) or streamed_product(*a))
    step = torch.compile(layer, fullgraph=True)
    with torch.no_grad():
        for rows in (1, 4):
            x = torch.randn(rows, 1, w.shape[1])
            assert rel(step(x), x @ dequantize("int8", stored).T + b) <= 1e-6
        layer.bfloat16()  # bf16 rows (converted to fp32 once in the loop): fp32 sums of the exact products
        x = torch.randn(1, 1, w.shape[1]).bfloat16()
        scale = stored["weight_scale"].bfloat16().double()
        want = (x.double() @ stored["weight"].double().T) * scale + b.bfloat16().double()
        got = step(x)
        assert got.dtype == torch.bfloat16 and ((got.double() - want).abs() <= want.abs() * 2**-7 + 1e-3).all()
    assert taken


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_weights_read_back_from_the_kernel_layout_equal_the_stored_form_dequantized(monkeypatch, scheme):
    torch.manual_seed(1)
    w = torch.randn(192, 3 * GROUP_SIZE)
    stored = quantize_int8(w) if scheme == "int8" else quantize_int4(w)
    layer = QuantLinear(scheme, w.shape[1], w.shape[0], bias=False)
    layer.set_weights(stored)
    if scheme == "int4":
        assert int4_cpu_block() in (32, 64)  # the layouts of PyTorch's AVX2 and AVX-512 kernels
    want = dequantize(scheme, stored)
    assert torch.equal(layer.dequantized(), want)
    assert torch.equal(layer.dequantized(64, 128, out=torch.empty(200 * 192)), want[64:128])
    back = layer.stored()
    assert back.keys() == stored.keys() and all(torch.equal(back[k], stored[k]) for k in stored)
    if scheme == "int4":  # mid-block, or a layout the probe does not know: refused, not misread
        with pytest.raises(ValueError, match="blocks of 64 rows"):
            layer.dequantized(32, 96)
        monkeypatch.setattr(layer, "_cpu_layout_known", lambda: False)
        with pytest.raises(ValueError, match="cannot be read back"):
            layer.stored()


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_prompt_rows_multiply_the_dequantized_weight_in_blocks_with_the_same_product_and_gradient(monkeypatch, scheme):
    import molmo.quant

    torch.manual_seed(2)
    w = torch.randn(192, 2 * GROUP_SIZE) / 10
    layer = QuantLinear(scheme, w.shape[1], w.shape[0], bias=False)
    layer.set_weights(quantize_int8(w) if scheme == "int8" else quantize_int4(w))
    for kernel in ("_weight_int8pack_mm", "_weight_int4pack_mm_for_cpu"):  # not called for a prompt's rows
        monkeypatch.setattr(torch, kernel, None)
    x = torch.randn(MIN_ROWS, w.shape[1], requires_grad=True)
    whole = layer(x)
    (g_whole,) = torch.autograd.grad(whole.square().sum(), x)
    monkeypatch.setattr(molmo.quant, "DEQUANT_ELEMENTS", 64 * w.shape[1])  # three blocks of 64 channels
    split = layer(x)
    (g_split,) = torch.autograd.grad(split.square().sum(), x)
    assert torch.equal(split, whole) and rel(g_split, g_whole) <= 1e-6  # the blocks' gradients add in another order
    with torch.no_grad():  # the shared buffer
        assert torch.equal(layer(x), whole)


def test_chunked_quantizing_while_reading_equals_quantizing_the_whole_tensor(snapshot):
    from molmo.checkpoint import snapshot_tensors
    from molmo.loading import quantize_rows

    entry = snapshot_tensors(snapshot)["model.transformer.ff_out.weight"]
    whole = load_file(str(snapshot / "model.safetensors"))["model.transformer.ff_out.weight"]
    for scheme, fn in (("int8", quantize_int8), ("int4", quantize_int4)):
        got, want = quantize_rows(entry, scheme, chunk_bytes=3 * 128 * 4), fn(whole)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_saved_quantized_snapshot_loads_bit_for_bit_as_quantizing_while_loading(snapshot, saved, scheme):
    direct = Molmo.from_pretrained(snapshot, quantize=scheme)
    loaded = Molmo.from_pretrained(saved[scheme])
    assert direct.quantization == loaded.quantization == scheme
    a, b = direct.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert sum(isinstance(m, QuantLinear) for m in loaded.modules()) == 2 * 4 + 1  # 4 a block, and lm_head
    ids = torch.randint(0, 512, (2, 30))
    with torch.no_grad():
        assert torch.equal(direct(ids).logits, loaded(ids).logits)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_decoding_with_the_cache_equals_the_uncached_forward(saved, scheme):
    model = Molmo.from_pretrained(saved[scheme])
    ids = torch.randint(0, 512, (1, 12))
    out = generate(model, {"input_ids": ids}, max_new_tokens=6, stop_on_eos=False)
    seq = torch.cat([ids, out.tokens], 1)
    with torch.no_grad():
        logits = model(seq).logits
    assert torch.equal(logits[0, 11:-1].argmax(-1), out.tokens[0])


def float_model_holding_the_dequantized_weights(snapshot, scheme: str) -> Molmo:
    from molmo.quant import quantizable

    model = Molmo.from_pretrained(snapshot)
    with torch.no_grad():
        for name in quantizable(model):
            w = model.get_submodule(name).weight
            w.copy_(dequantize(scheme, quantize_int8(w) if scheme == "int8" else quantize_int4(w)))
    return model


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_model_equals_the_float_model_holding_the_dequantized_weights(snapshot, scheme):
    quantized = Molmo.from_pretrained(snapshot, quantize=scheme)
    float_model = float_model_holding_the_dequantized_weights(snapshot, scheme)
    with torch.no_grad():
        ids = torch.randint(0, 512, (1, 40))
        want, got = float_model(ids).logits, quantized(ids).logits
    assert rel(got, want) <= 1e-5
    assert rel(got, Molmo.from_pretrained(snapshot)(ids).logits.detach()) > 1e-3  # and it did quantize


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_gradients_pass_through_a_frozen_quantized_decoder_as_through_the_dequantized_weights(snapshot, scheme):
    quantized = Molmo.from_pretrained(snapshot, quantize=scheme)
    float_model = float_model_holding_the_dequantized_weights(snapshot, scheme)
    ids = torch.randint(0, 512, (1, 10))  # fewer rows than a prompt's: the kernels have no backward
    grads = []
    for model in (float_model, quantized):
        model.requires_grad_(False).llm.embed.requires_grad_(True)  # e.g. the parts before the decoder
        model(ids, labels=ids).loss.backward()
        grads.append(model.llm.embed.base.grad)
    assert grads[0].abs().sum() > 0 and rel(grads[1], grads[0]) <= 1e-5


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_a_quantized_layer_passes_gradients_for_any_rows_in_bf16_and_refuses_a_kernel_without_backward(monkeypatch, scheme):
    torch.manual_seed(6)
    w = torch.randn(128, 2 * GROUP_SIZE) / 10
    stored = quantize_int8(w) if scheme == "int8" else quantize_int4(w)
    layer = QuantLinear(scheme, w.shape[1], w.shape[0], bias=False)
    layer.set_weights(stored)
    layer.to(torch.bfloat16)
    for rows in (1, 3, MIN_ROWS + 1):
        x = torch.randn(rows, w.shape[1]).bfloat16().requires_grad_()
        (g,) = torch.autograd.grad(layer(x).float().sum(), x)
        assert rel(g, dequantize(scheme, stored).sum(0).expand_as(g)) <= 1e-2
    if scheme == "int4":  # a packed layout only the kernel reads: one clear error, not autograd's
        monkeypatch.setattr(layer, "_cpu_layout_known", lambda: False)
        with pytest.raises(RuntimeError, match="int4 weights on cpu: PyTorch's kernel has no backward"):
            layer(torch.randn(3, w.shape[1]).bfloat16().requires_grad_())


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_a_compiled_forward_passes_gradients_through_a_quantized_layer(scheme):
    torch.manual_seed(7)
    w = torch.randn(128, 2 * GROUP_SIZE) / 10
    stored = quantize_int8(w) if scheme == "int8" else quantize_int4(w)
    layer = QuantLinear(scheme, w.shape[1], w.shape[0], bias=False)
    layer.set_weights(stored)
    x = torch.randn(5, w.shape[1], requires_grad=True)
    torch.compile(lambda x: layer(x).sum(), fullgraph=True)(x).backward()
    assert rel(x.grad, dequantize(scheme, stored).sum(0).expand_as(x)) <= 1e-6


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_a_quantized_model_saves_a_quantized_snapshot_that_loads_back_bit_for_bit(monkeypatch, snapshot, saved, scheme,
                                                                                    tmp_path):
    from molmo.quant import quantization_config
    from molmo.training import save_snapshot

    model = Molmo.from_pretrained(snapshot, quantize=scheme)
    with torch.no_grad():
        model.vision.blocks[0].attn.wq.weight.add_(1.0)  # fine-tuned in front of the frozen quantized decoder
    read_back = []
    stored = QuantLinear.stored
    monkeypatch.setattr(QuantLinear, "stored", lambda self: read_back.append(self) or stored(self))
    save_snapshot(model, tmp_path / "out", snapshot)
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert read_back == layers  # each layer read back once, in turn: one layer's stored form held at a time
    assert json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"] == quantization_config(scheme)
    written, converted = load_file(tmp_path / "out" / "model.safetensors"), load_file(saved[scheme] / "model.safetensors")
    assert written.keys() == converted.keys()
    assert all(torch.equal(written[n], t) for n, t in converted.items() if "vision" not in n)  # as the converter's
    back = Molmo.from_pretrained(tmp_path / "out")
    want = model.state_dict()
    assert all(torch.equal(t, want[n]) for n, t in back.state_dict().items())

    float_model = Molmo.from_pretrained(snapshot)  # a quantized source's config entry does not follow float weights
    save_snapshot(float_model, tmp_path / "float", saved[scheme])
    assert "quantization_config" not in json.loads((tmp_path / "float" / "config.json").read_text())
    assert isinstance(Molmo.from_pretrained(tmp_path / "float").llm.lm_head, torch.nn.Linear)


def test_loading_quantized_weights_with_fp32_activations_on_cpu_warns_and_bf16_does_not(snapshot, saved):
    import warnings

    with pytest.warns(UserWarning, match="scalar in fp32"):
        Molmo.from_pretrained(snapshot, quantize="int8")
    with pytest.warns(UserWarning, match="int4 weights with fp32"):
        Molmo.from_pretrained(saved["int4"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Molmo.from_pretrained(saved["int8"], dtype="bf16")


def test_bad_quantized_snapshots_get_one_clear_error(snapshot, saved, tmp_path):
    bad = shutil.copytree(saved["int8"], tmp_path / "missing")
    tensors = load_file(str(bad / "model.safetensors"))
    gone = "model.transformer.blocks.1.ff_out.weight_scale"
    save_file({k: v for k, v in tensors.items() if k != gone}, str(bad / "model.safetensors"))
    with pytest.raises(CheckpointError, match=f"missing tensor: {gone}"):
        Molmo.from_pretrained(bad)
    wrong = shutil.copytree(saved["int8"], tmp_path / "dtype")
    name = "model.transformer.blocks.0.att_proj.weight"
    save_file(tensors | {name: tensors[name].float()}, str(wrong / "model.safetensors"))
    with pytest.raises(CheckpointError, match=f"wrong dtype: {name} in model.safetensors: F32, expected I8"):
        Molmo.from_pretrained(wrong)
    with pytest.raises(ValueError, match="quantized int8; it cannot load as int4"):
        Molmo.from_pretrained(saved["int8"], quantize="int4")
    foreign = shutil.copytree(snapshot, tmp_path / "bnb")
    cfg = json.loads((foreign / "config.json").read_text())
    (foreign / "config.json").write_text(json.dumps(cfg | {"quantization_config": {"quant_method": "bitsandbytes"}}))
    with pytest.raises(ValueError, match="quant_method 'bitsandbytes'"):
        Molmo.from_pretrained(foreign)
    with pytest.raises(ValueError, match="quantize must be one of int8, int4"):
        Molmo.from_pretrained(snapshot, quantize="nf4")
    with pytest.raises(CheckpointError, match=r"a quantized \(int8\) snapshot; conversions read float"):
        quantize(saved["int8"], tmp_path / "again", "int8", progress=False)


def test_7b_d_int4_groups_divide_every_decoder_input_size():
    from molmo.quant import quantizable, replace_linears

    meta = Molmo.meta(MolmoConfig.from_hf(FACTS))
    assert len(replace_linears(meta, "int4")) == 28 * 4 + 1 == len(quantizable(Molmo.meta(MolmoConfig.from_hf(FACTS))))


@pytest.mark.slow
def test_quantizing_while_loading_never_holds_a_whole_float_tensor(tmp_path):
    big = MolmoConfig(vision=QUANT_TINY.vision, llm=LLMConfig(hidden=512, layers=1, heads=4, kv_heads=2,
                                                              intermediate=1024, vocab=152064))
    write_random_checkpoint(tmp_path / "m", big, seed=0)  # lm_head + embedding: 2 x 311 MB in fp32
    code = f"""
import resource, torch, json
from molmo import Molmo
torch.ones(1) @ torch.ones(1)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
m = Molmo.from_pretrained({str(tmp_path / 'm')!r}, quantize="int8")
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
size = sum(t.numel() * t.element_size() for t in m.state_dict().values())
print(json.dumps({{"peak": peak - before, "size": size}}))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    # the model's size (fp32 embeddings 311 MB + int8 lm_head 78 MB + small) plus under one 311 MB fp32 tensor
    assert got["peak"] < got["size"] + 200e6, got


@pytest.mark.slow
def test_inspect_shows_the_scheme_and_size_and_generate_takes_quantize(saved, text_model_dir):
    r = subprocess.run([sys.executable, "-m", "molmo", "inspect", "--model", str(saved["int4"]), "--json"],
                       capture_output=True, text=True, timeout=300)
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert r.returncode == 0 and out["quantization"] == "int4" and out["weights"]["ok"], r.stdout
    assert "quantized  int4" in r.stdout and out["weights"]["size_gb"] > 0
    r = subprocess.run([sys.executable, "-m", "molmo", "generate", "--model", str(text_model_dir), "--prompt", "Hi",
                        "--max-new-tokens", "3", "--quantize", "int8", "--json"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and len(json.loads(r.stdout.strip().splitlines()[-1])["token_ids"]) == 3, r.stderr


def test_quantizing_a_model_in_memory_equals_quantizing_while_loading(snapshot):
    from molmo.quant import quantize_model

    for scheme in ("int8", "int4"):
        a = quantize_model(Molmo.from_pretrained(snapshot), scheme).state_dict()
        b = Molmo.from_pretrained(snapshot, quantize=scheme).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_compiled_decode_step_gives_the_eager_tokens_in_one_graph(saved, scheme):
    # fp32 activations: the compiled step's sums differ from the eager ones only in their order, which
    # cannot flip a greedy choice here (in bf16, one rounding of a logit can).
    with pytest.warns(UserWarning, match="slower"):
        model = Molmo.from_pretrained(saved[scheme], dtype="fp32")
    ids = torch.randint(0, 512, (1, 10), generator=torch.Generator().manual_seed(1))  # one row: one graph
    eager = generate(model, {"input_ids": ids}, max_new_tokens=6, stop_on_eos=False).tokens
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = generate(model, {"input_ids": ids}, max_new_tokens=6, stop_on_eos=False, compile=True).tokens
    assert torch.equal(eager, compiled)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert graphs == 1  # the whole step
