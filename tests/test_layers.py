"""The shared Linear: its CPU bf16 path computes what a bf16 matmul computes."""

import pytest
import torch
import torch.nn.functional as F

from molmo.layers import (MIN_ROWS, SPLIT_K, Linear, computed_once, cpu_has_bf16_math, streamed_product,
                          takes_streamed_product)


def _layer(n_in=96, n_out=80, bias=True):
    torch.manual_seed(0)
    layer = Linear(n_in, n_out, bias=bias).to(torch.bfloat16)
    return layer, torch.randn(2, MIN_ROWS, n_in).to(torch.bfloat16)


def test_many_bf16_rows_equal_the_fp32_product_of_the_bf16_values_rounded_once():
    for bias in (True, False):
        layer, x = _layer(bias=bias)
        b = None if layer.bias is None else layer.bias.float()
        exact_then_rounded = F.linear(x.double(), layer.weight.double(), None if b is None else b.double()).bfloat16()
        got = layer(x)
        assert got.dtype == torch.bfloat16 and got.shape == (2, MIN_ROWS, 80)
        # At most one bf16 rounding step from the exactly summed product, like a native bf16 kernel.
        ulp = exact_then_rounded.float().abs() * 2**-7
        assert ((got.float() - exact_then_rounded.float()).abs() <= ulp + 1e-30).all()
        if not cpu_has_bf16_math():
            assert torch.equal(got, F.linear(x.float(), layer.weight.float(), b).bfloat16())


def test_single_rows_and_fp32_take_the_plain_kernel():
    layer, x = _layer()
    row = x[:1, :1]
    assert torch.equal(layer(row), F.linear(row, layer.weight, layer.bias))
    layer32 = layer.float()
    x32 = x.float()
    assert torch.equal(layer32(x32), F.linear(x32, layer32.weight, layer32.bias))


def _fp32_layer(n_in=96, n_out=80):
    torch.manual_seed(1)
    return Linear(n_in, n_out), torch.randn(3, 5, n_in)


@pytest.mark.parametrize("rows", [(1,), (8,), (3, 5), (2, 40)])  # one row, a decode batch, prompts (PACK_ROWS 16)
def test_packed_layer_gives_the_plain_product_and_unpacks_to_the_same_parameter_bit_for_bit(rows):
    layer, _ = _fp32_layer()
    x = torch.randn(*rows, layer.in_features)
    weight, before = layer.weight, layer.weight.detach().clone()
    want = layer(x)
    layer.pack()
    assert layer.packed is not None and layer.weight.numel() == 0  # the values live once, packed
    with torch.no_grad():
        got = layer(x)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)
    assert torch.equal(layer.state_dict()["weight"], before)  # saved plain
    layer.unpack()
    assert layer.weight is weight and torch.equal(layer.weight, before)  # optimizers keep their parameter


def test_a_forward_that_needs_weight_gradients_unpacks_first():
    layer, x = _fp32_layer()
    layer.pack()
    layer(x).sum().backward()
    assert layer.packed is None and layer.weight.grad is not None and layer.weight.grad.shape == (80, 96)


def test_a_frozen_packed_layer_passes_the_gradient_of_its_input_back():
    layer, x = _fp32_layer()
    layer.requires_grad_(False)  # frozen, between trainable parts (oneDNN's packed product has no gradient)
    x.requires_grad_(True)
    (layer(x) ** 2).sum().backward()
    want = x.grad.clone()
    x.grad = None
    layer.pack()
    (layer(x) ** 2).sum().backward()
    assert layer.packed is None and x.grad is not None and torch.allclose(x.grad, want)


def test_under_autocast_a_packed_layer_computes_as_a_plain_one():
    layer, x = _fp32_layer()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = layer(x)
        layer.pack()
        got = layer(x.bfloat16())  # a bf16 input, as autocast's other products give
    assert layer.packed is None and got.dtype == torch.bfloat16
    assert torch.equal(got, want)


def test_to_and_load_state_dict_work_on_the_plain_weight():
    layer, x = _fp32_layer()
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    layer.pack()
    layer.to(torch.bfloat16)
    assert layer.packed is None and layer.weight.dtype == torch.bfloat16 and layer.weight.shape == (80, 96)
    layer.float().pack()
    layer.load_state_dict(state)
    assert layer.packed is None and torch.equal(layer.weight, state["weight"])


def test_streamed_product_is_the_linear_product_summed_in_another_order():
    torch.manual_seed(2)
    for n_in, bias in ((96, True), (4 * SPLIT_K, False)):  # one chunk; four chunks of SPLIT_K
        w, b = torch.randn(80, n_in), (torch.randn(80) if bias else None)
        for rows in (1, 8):  # the arithmetic holds for any number of rows
            x = torch.randn(rows, 1, n_in)
            want = F.linear(x.double(), w.double(), None if b is None else b.double())
            got = streamed_product(x, w, b)
            assert got.shape == (rows, 1, 80) and got.dtype == torch.float32
            assert (got.double() - want).abs().max() <= 1e-6 * want.abs().max()
            xb, wb = x.bfloat16(), w.bfloat16()  # bf16: fp32 sums of the bf16 products, rounded once
            exact = F.linear(xb.double(), wb.double(), None if b is None else b.bfloat16().double())
            got = streamed_product(xb, wb, None if b is None else b.bfloat16())
            assert got.dtype == torch.bfloat16
            assert ((got.double() - exact).abs() <= exact.abs() * 2**-7 + 1e-6 * exact.abs().max()).all()


def test_streamed_product_applies_while_compiling_to_one_row_without_gradients_or_autocast_only(monkeypatch):
    x = torch.randn(1, 16)
    with torch.no_grad():
        assert not takes_streamed_product(x)  # eager: the packed products
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    with torch.no_grad():
        assert takes_streamed_product(x) and takes_streamed_product(torch.randn(1, 1, 16))
        assert not takes_streamed_product(torch.randn(2, 16))  # more rows: the plain product
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not takes_streamed_product(x)
    assert not takes_streamed_product(x)  # gradients on


def test_computed_once_is_the_input_itself_outside_compilation():
    x = torch.randn(3, 16)
    assert computed_once(x) is x  # eager: no copy; compiled: a buffer (the compiled tests below)


def test_streamed_product_with_int8_weights_and_scales_is_the_dequantized_product():
    g = torch.Generator().manual_seed(4)
    q = torch.randint(-127, 128, (40, 2 * SPLIT_K), dtype=torch.int8, generator=g)
    scale, bias, x = torch.rand(40, generator=g), torch.randn(40, generator=g), torch.randn(3, 2 * SPLIT_K, generator=g)
    want = F.linear(x.double(), q.double() * scale.double()[:, None], bias.double())
    got = streamed_product(x, q, bias, scale)
    assert got.dtype == torch.float32 and (got.double() - want).abs().max() <= 1e-6 * want.abs().max()


@pytest.mark.slow
def test_compiled_single_row_linear_takes_the_reduction_and_matches_the_eager_layer(monkeypatch):
    import molmo.layers as layers

    torch.manual_seed(3)
    layer = Linear(2 * SPLIT_K, 48)
    taken = []
    monkeypatch.setattr(layers, "streamed_product", lambda *a: taken.append(1) or streamed_product(*a))
    step = torch.compile(lambda x: layer(F.silu(x)), fullgraph=True)
    with torch.no_grad():
        for rows in (1, 3):
            x = torch.randn(rows, 2 * SPLIT_K)
            want = layer(F.silu(x))
            got = step(x)
            assert (got - want).abs().max() <= 1e-6 * want.abs().max()
    assert taken  # traced through the reduction, not the plain kernel


@pytest.mark.slow
def test_a_single_row_linear_compiles_with_dynamic_shapes():
    torch.manual_seed(4)
    layer = Linear(96, 40)
    step = torch.compile(layer, fullgraph=True, dynamic=True)  # symbolic sizes: dynamo failed on their strides
    with torch.no_grad():
        for shape in ((1, 96), (1, 1, 96)):
            x = torch.randn(shape)
            want = layer(x)
            assert (step(x) - want).abs().max() <= 1e-6 * want.abs().max()
