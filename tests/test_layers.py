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
