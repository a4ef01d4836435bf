"""The shared Linear: its CPU bf16 path computes what a bf16 matmul computes."""
import torch
import torch.nn.functional as F

from molmo.layers import MIN_ROWS, Linear, cpu_has_bf16_math


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


def test_packed_layer_gives_the_plain_product_and_unpacks_to_the_same_parameter_bit_for_bit():
    layer, x = _fp32_layer()
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
