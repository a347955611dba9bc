"""The fused bias + GELU against the float64 formula: output, the input's and the bias's
gradients, over odd widths (not a multiple of the column block), one row, more rows than
the backward's programs, every dtype and output dtype, with poisoned outputs.

Bounds (per element), with u = a + bias in float64: h within one unit in the last place of
its dtype (the interpreter truncates to bf16; subnormals' spacing where the value is tiny)
plus 16 eps32 (|u| + 1) (fp32 arithmetic and erf); da within one unit of a's dtype plus
16 eps32 |dh| (|u| + 1); the bias gradient, an
fp32 sum over the rows of the unrounded da, within 8 sqrt(rows) eps32 sum|da| + one unit of
the bias's dtype + the rows' sum of da's own arithmetic bound.
"""

import importlib
import math

import pytest
import torch
import torch.nn.functional as F

from dinofuse.kernels import bias_gelu

EPS32 = torch.finfo(torch.float32).eps
module = importlib.import_module("dinofuse.kernels.bias_gelu")


@pytest.fixture(autouse=True)
def poisoned(monkeypatch):
    monkeypatch.setattr(module, "POISON_OUTPUTS", True)


def unit(dtype, ref):
    """One unit in the last place of `dtype` at each value of `ref`, subnormals included
    (fp16 rounds GELU's tails, ~1e-8, to its subnormal spacing of 6e-8)."""
    info = torch.finfo(dtype)
    return info.eps * ref.abs() + info.tiny * info.eps


def check(a, bias, out_dtype=None):
    a = a.detach().requires_grad_()
    if bias is not None:
        bias = bias.detach().requires_grad_()
    h = bias_gelu(a, bias, out_dtype)
    assert h.dtype == (out_dtype or a.dtype) and h.shape == a.shape
    dh = torch.randn(a.shape, device=a.device).to(h.dtype)
    h.backward(dh)
    u64 = a.detach().double() + (0 if bias is None else bias.detach().double())
    u64.requires_grad_()
    h64 = F.gelu(u64)
    h64.backward(dh.double())
    arith = 16 * EPS32 * (u64.detach().abs() + 1)
    bound_h = unit(h.dtype, h64.detach()) + arith
    assert (h.double() - h64.detach()).abs().le(bound_h).all(), (h.double() - h64).abs().max()
    da64 = u64.grad
    bound_da = unit(a.dtype, da64) + arith * dh.double().abs()
    assert a.grad.dtype == a.dtype
    assert (a.grad.double() - da64).abs().le(bound_da).all(), (a.grad.double() - da64).abs().max()
    if bias is not None:
        N = a.shape[-1]
        rows = a.numel() // N
        da_rows, arith_rows = da64.reshape(rows, N), (arith * dh.double().abs()).reshape(rows, N)
        db64 = da_rows.sum(0)
        bound = (torch.finfo(bias.dtype).eps * db64.abs() + 8 * math.sqrt(rows) * EPS32 * da_rows.abs().sum(0)
                 + arith_rows.sum(0))
        assert bias.grad.dtype == bias.dtype
        assert (bias.grad.double() - db64).abs().le(bound).all(), (bias.grad.double() - db64).abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(1, 300), (7, 37), (3, 5, 512), (61, 260)], ids=str)
def test_matches_float64_reference(shape, dtype):
    a = (torch.randn(shape) * 2).to(dtype)
    check(a, torch.randn(shape[-1]))


@pytest.mark.parametrize("a_dtype,bias_dtype,out_dtype", [
    (torch.bfloat16, torch.float32, torch.bfloat16),  # under autocast: bf16 matmul, fp32 bias
    (torch.float32, torch.float32, torch.bfloat16),
    (torch.bfloat16, torch.bfloat16, torch.float32)], ids=str)
def test_mixed_dtypes(a_dtype, bias_dtype, out_dtype):
    check((torch.randn(9, 100) * 3).to(a_dtype), torch.randn(100).to(bias_dtype), out_dtype)


def test_without_bias_and_with_extreme_inputs():
    check(torch.randn(4, 33), None)
    a = torch.tensor([[-40.0, -8.0, -1e-3, 0.0, 1e-3, 8.0, 40.0, 3.0]])
    check(a, torch.zeros(8))


def test_no_rows_and_bad_arguments():
    a = torch.randn(0, 16, requires_grad=True)
    b = torch.randn(16, requires_grad=True)
    bias_gelu(a, b).sum().backward()
    assert torch.equal(b.grad, torch.zeros(16)) and a.grad.shape == (0, 16)
    with pytest.raises(ValueError, match=r"bias must have shape \(16,\)"):
        bias_gelu(torch.randn(2, 16), torch.randn(15))
    with pytest.raises(TypeError, match="a must be one of"):
        bias_gelu(torch.randn(2, 16).double())


def test_reference_path_without_the_interpreter(reference_path):
    a, b = torch.randn(4, 12).bfloat16(), torch.randn(12)
    assert torch.equal(bias_gelu(a, b, torch.float32), F.gelu(a.float() + b))
