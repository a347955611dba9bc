"""The fused LayerNorm against the float64 formula: output, input gradient, weight and bias
gradients, across odd widths, one row, many rows, every dtype and output dtype, with every
output buffer poisoned (NaN) so an unwritten element fails.

Bounds (per element), with x_hat = (x - mean) * rstd and g = dy * w in float64. x_hat itself
is off by up to e = 8 * sqrt(D) * eps32 * (1 + rstd * max|x|) in fp32 (the mean's rounding
scales with |x|, not with the spread: inherent to fp32, torch's kernel has it too).
- y: one unit in the last place of the output dtype (Triton's interpreter truncates fp32 to
  bf16 where a GPU rounds to nearest), plus e * (|w| * (|x_hat| + 1) + |b|).
- dx: one unit of x's dtype plus e * rstd * (|g| + mean|g * x_hat| + (|x_hat| + 1) * mean|g|).
- dw, db: one unit of the parameter's dtype plus fp32 sums over the rows,
  (8 * sqrt(rows) * eps32 + e) * sum|dy| * (|x_hat| + 1) (db: sum|dy| * 8 * sqrt(rows) * eps32).
"""

import importlib
import math

import pytest
import torch
import torch.nn.functional as F

from dinofuse.kernels import FusedLayerNorm, add_layer_norm, layer_norm

# the module, not the function of the same name that dinofuse.kernels exports
layer_norm_module = importlib.import_module("dinofuse.kernels.layer_norm")

EPS32 = torch.finfo(torch.float32).eps
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def poisoned(monkeypatch):
    monkeypatch.setattr(layer_norm_module, "POISON_OUTPUTS", True)


def reference(x, w, b, dy, eps):
    x64 = x.detach().double().requires_grad_()
    w64 = None if w is None else w.detach().double().requires_grad_()
    b64 = None if b is None else b.detach().double().requires_grad_()
    y64 = F.layer_norm(x64, (x.shape[-1],), w64, b64, eps)
    y64.backward(dy.double())
    mean = x64.detach().mean(-1, keepdim=True)
    rstd = (x64.detach().var(-1, unbiased=False, keepdim=True) + eps).rsqrt()
    x_hat = (x64.detach() - mean) * rstd
    return y64.detach(), x64.grad, None if w is None else w64.grad, None if b is None else b64.grad, x_hat, rstd


def check(x, w, b, eps, out_dtype, dy_scale=1.0):
    x = x.detach().requires_grad_()
    for p in (w, b):
        if p is not None:
            p.requires_grad_()
    y = layer_norm(x, w, b, eps, out_dtype)
    assert y.dtype == (out_dtype or x.dtype) and y.shape == x.shape
    dy = (torch.randn(x.shape, device=x.device) * dy_scale).to(y.dtype)
    y.backward(dy)
    assert_norm(x, y, dy, x.grad, w, b, eps)


def assert_norm(x, y, dy, grad_x, w, b, eps, ds=None):
    """The norm of `x` (what the kernel normalized), its input gradient `grad_x` (plus `ds`
    when given: a residual sum's gradient from downstream) and w.grad, b.grad within the
    bounds above. Returns the float64 input gradient and its bound."""
    y64, dx64, dw64, db64, x_hat, rstd = reference(x, w, b, dy, eps)
    D = x.shape[-1]
    rows = x.numel() // D
    w64 = torch.ones(D, dtype=torch.float64, device=x.device) if w is None else w.detach().double()
    b64 = torch.zeros(D, dtype=torch.float64, device=x.device) if b is None else b.detach().double()
    x_max = x.detach().double().abs().amax(-1, keepdim=True)
    e = 8 * math.sqrt(D) * EPS32 * (1 + rstd * x_max)
    bound_y = torch.finfo(y.dtype).eps * y64.abs() + e * (w64.abs() * (x_hat.abs() + 1) + b64.abs())
    assert (y.double() - y64).abs().le(bound_y).all(), (y.double() - y64).abs().max()
    g = dy.double() * w64
    mean_g = g.abs().mean(-1, keepdim=True)
    spread = (g * x_hat).abs().mean(-1, keepdim=True)
    bound_dx = e * rstd * (g.abs() + spread + (x_hat.abs() + 1) * mean_g)
    if ds is not None:  # one fp32 addition more
        dx64 = dx64 + ds.double()
        bound_dx = bound_dx + EPS32 * ds.double().abs()
    bound_dx = bound_dx + torch.finfo(grad_x.dtype).eps * dx64.abs()
    assert grad_x.dtype == x.dtype
    assert (grad_x.double() - dx64).abs().le(bound_dx).all(), (grad_x.double() - dx64).abs().max()
    dy_rows = dy.double().reshape(rows, D)
    x_hat_rows, e_rows = x_hat.reshape(rows, D), e.reshape(rows, 1)
    sum_eps = 8 * math.sqrt(rows) * EPS32
    if w is not None:
        bound = (torch.finfo(w.dtype).eps * dw64.abs()
                 + ((sum_eps + e_rows) * dy_rows.abs() * (x_hat_rows.abs() + 1)).sum(0))
        assert w.grad.dtype == w.dtype
        assert (w.grad.double() - dw64).abs().le(bound).all(), (w.grad.double() - dw64).abs().max()
    if b is not None:
        bound = torch.finfo(b.dtype).eps * db64.abs() + sum_eps * dy_rows.abs().sum(0)
        assert b.grad.dtype == b.dtype
        assert (b.grad.double() - db64).abs().le(bound).all(), (b.grad.double() - db64).abs().max()
    return dx64, bound_dx


def check_add(x, r, scale, w, b, eps, out_dtype, with_ds=True):
    """add_layer_norm: s = x + r * scale[row] to one rounding in x's dtype (after an fp32
    product and sum: 2 eps32 of the terms); the norm of the s it stored within the norm's
    bounds; x's gradient = ds + the norm's part; r's = that times scale, rounded to r's
    dtype."""
    x, r = x.detach().requires_grad_(), r.detach().requires_grad_()
    for p in (w, b):
        if p is not None:
            p.requires_grad_()
    s, y = add_layer_norm(x, r, w, b, eps, out_dtype, scale)
    assert s.dtype == x.dtype and y.dtype == (out_dtype or x.dtype) and s.shape == y.shape == x.shape
    rows_scale = 1.0 if scale is None else scale.double().reshape(*x.shape[:-1], 1)
    branch64 = r.detach().double() * rows_scale
    s64 = x.detach().double() + branch64
    bound_s = torch.finfo(x.dtype).eps * s64.abs() + 2 * EPS32 * (x.detach().double().abs() + branch64.abs())
    assert (s.double() - s64).abs().le(bound_s).all(), (s.double() - s64).abs().max()
    dy = torch.randn(x.shape, device=x.device).to(y.dtype)
    ds = torch.randn(x.shape, device=x.device).to(s.dtype) if with_ds else None
    torch.autograd.backward([y, s] if with_ds else [y], [dy, ds] if with_ds else [dy])
    dx64, bound_dx = assert_norm(s.detach(), y, dy, x.grad, w, b, eps, ds=ds)
    dr64 = dx64 * rows_scale
    bound_dr = torch.finfo(r.dtype).eps * dr64.abs() + bound_dx * (rows_scale.abs() if scale is not None else 1.0)
    assert r.grad.dtype == r.dtype
    assert (r.grad.double() - dr64).abs().le(bound_dr).all(), (r.grad.double() - dr64).abs().max()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 384), (7, 37), (3, 5, 100), (130, 64), (2, 1, 1)], ids=str)
def test_matches_float64_reference(shape, dtype):
    x = (torch.randn(shape) * 3 + 1.5).to(dtype)
    D = shape[-1]
    w, b = torch.randn(D) + 1, torch.randn(D)
    check(x, w, b, 1e-6, None)


@pytest.mark.parametrize("x_dtype,out_dtype", [(torch.float32, torch.bfloat16),
                                               (torch.float32, torch.float16),
                                               (torch.bfloat16, torch.float32)], ids=str)
def test_output_dtype_differs_from_the_input(x_dtype, out_dtype):
    """The case it exists for: an fp32 residual stream in, bf16 for the next matmul out."""
    check(torch.randn(21, 48).to(x_dtype), torch.randn(48), torch.randn(48), 1e-6, out_dtype)


@pytest.mark.parametrize("affine", ["none", "weight only", "bf16 parameters"])
def test_without_or_with_low_precision_parameters(affine):
    x = torch.randn(9, 40)
    if affine == "none":
        check(x, None, None, 1e-5, None)
    elif affine == "weight only":
        check(x, torch.randn(40), None, 1e-5, None)
    else:
        check(x.bfloat16(), torch.randn(40).bfloat16(), torch.randn(40).bfloat16(), 1e-5, None)


def test_many_rows_per_backward_program_and_large_offsets_of_the_mean():
    """More rows than programs (each walks several row blocks and carries its partial sums),
    and rows far from zero: the variance must be taken around the mean, not as E[x^2]-E[x]^2."""
    x = torch.randn(4 * 37 + 3, 24) * 0.01 + 100.0
    check(x, torch.randn(24), torch.randn(24), 1e-6, None)


def test_non_contiguous_input_and_gradient():
    x = torch.randn(40, 6).t()  # (6, 40), strided
    w, b = torch.randn(40), torch.randn(40)
    x = x.detach().requires_grad_()
    y = layer_norm(x, w, b, 1e-6)
    dy = torch.randn(40, 6).t()
    y.backward(dy)
    y64, dx64, *_ = reference(x, w, b, dy, 1e-6)
    assert torch.allclose(y.double(), y64, atol=1e-5) and torch.allclose(x.grad.double(), dx64, atol=1e-4)


def test_no_rows():
    x = torch.randn(0, 16, requires_grad=True)
    w = torch.randn(16, requires_grad=True)
    y = layer_norm(x, w, None)
    y.sum().backward()
    assert y.shape == (0, 16) and x.grad.shape == (0, 16) and torch.equal(w.grad, torch.zeros(16))


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match=r"weight must have shape \(8,\)"):
        layer_norm(torch.randn(2, 8), torch.randn(7))
    with pytest.raises(TypeError, match="x must be one of"):
        layer_norm(torch.randn(2, 8).double())
    with pytest.raises(TypeError, match="out_dtype must be"):
        layer_norm(torch.randn(2, 8), out_dtype=torch.int32)


def test_module_is_nn_layernorm_with_autocast_output_dtypes():
    torch_ln = torch.nn.LayerNorm(32, eps=1e-6)
    torch.nn.init.normal_(torch_ln.weight)
    torch.nn.init.normal_(torch_ln.bias)
    fused = FusedLayerNorm(32, eps=1e-6)
    fused.load_state_dict(torch_ln.state_dict())
    x = torch.randn(3, 5, 32)
    assert torch.allclose(fused(x), torch_ln(x), atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = torch_ln(x)
        assert expected.dtype == torch.float32  # autocast's LayerNorm: fp32 out
        out = fused(x)
        assert out.dtype == torch.float32 and torch.allclose(out, expected, atol=1e-5)
        fused.out_autocast_dtype = True
        out = fused(x)
        assert out.dtype == torch.bfloat16
        # within one bf16 unit (the interpreter truncates where a GPU rounds to nearest)
        assert (out.float() - expected).abs().le(2 ** -7 * expected.abs() + 1e-5).all()
    with pytest.raises(ValueError, match="last dimension only"):
        FusedLayerNorm((5, 32))(x)


def test_reference_path_without_the_interpreter(reference_path):
    """CPU tensors without the interpreter take torch's layer norm in fp32: the same math."""
    x, w, b = torch.randn(4, 12, requires_grad=True), torch.randn(12), torch.randn(12)
    y = layer_norm(x, w, b, 1e-6, torch.bfloat16)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, F.layer_norm(x, (12,), w, b, 1e-6).bfloat16())


def test_torch_compile_traces_the_op_without_a_graph_break():
    """A compiled model calling layer_norm gets the torch.library op (one graph, fullgraph),
    with the eager outputs and gradients."""
    w, b = torch.randn(24, requires_grad=True), torch.randn(24, requires_grad=True)
    x = torch.randn(3, 5, 24, requires_grad=True)

    def model(x):
        return (layer_norm(x * 2, w, b, 1e-6, torch.bfloat16).float() ** 2).sum()

    graphs = []

    def backend(gm, example_inputs):  # record what dynamo traced, then run it with AOT eager
        graphs.append(gm)
        return torch._dynamo.backends.debugging.aot_eager(gm, example_inputs)

    torch._dynamo.reset()
    try:
        compiled = torch.compile(model, fullgraph=True, backend=backend)(x)
        compiled.backward()
    finally:
        torch._dynamo.reset()
    targets = {n.target for g in graphs for n in g.graph.nodes if n.op == "call_function"}
    assert torch.ops.dinofuse.layer_norm_fwd.default in targets or \
        torch.ops.dinofuse.layer_norm_fwd in targets, targets
    grads = [t.grad.clone() for t in (x, w, b)]
    for t in (x, w, b):
        t.grad = None
    model(x).backward()
    torch.testing.assert_close(compiled, model(x))
    for got, t in zip(grads, (x, w, b)):
        torch.testing.assert_close(got, t.grad)


@pytest.mark.parametrize("affine", [True, False])
def test_custom_ops_schemas_are_valid(affine):
    x = torch.randn(4, 6, requires_grad=True)
    w, b = (torch.randn(6, requires_grad=True), torch.randn(6, requires_grad=True)) if affine \
        else (None, None)
    torch.library.opcheck(torch.ops.dinofuse.layer_norm_fwd.default, (x, w, b, 1e-5, torch.bfloat16),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    y, mean, rstd = torch.ops.dinofuse.layer_norm_fwd(x, w, b, 1e-5, torch.float32)
    torch.library.opcheck(torch.ops.dinofuse.layer_norm_bwd.default,
                          (torch.randn(4, 6), x.detach(), w, b, mean, rstd, affine, affine),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("x_dtype,r_dtype,out_dtype", [
    (torch.float32, torch.bfloat16, torch.bfloat16),  # fp32 stream, bf16 branch (autocast)
    (torch.bfloat16, torch.bfloat16, torch.bfloat16),  # the bf16 stream
    (torch.float32, torch.float32, torch.float32),
    (torch.float16, torch.float32, torch.float16),
], ids=str)
@pytest.mark.parametrize("shape", [(7, 37), (2, 5, 48), (1, 1, 16)], ids=str)
@pytest.mark.parametrize("scaled", [False, True])
def test_add_layer_norm_matches_float64_reference(shape, x_dtype, r_dtype, out_dtype, scaled):
    x = (torch.randn(shape) * 2 + 0.5).to(x_dtype)
    r = torch.randn(shape).to(r_dtype)
    rows = x.numel() // shape[-1]
    # stochastic depth's factors: 0 (dropped) or 1/keep per sample, one per row here
    scale = (torch.rand(rows) < 0.7).float() / 0.7 if scaled else None
    D = shape[-1]
    check_add(x, r, scale, torch.randn(D) + 1, torch.randn(D), 1e-6, out_dtype)


def test_add_layer_norm_without_a_downstream_gradient_or_parameters():
    """Only the norm used (no gradient reaches the sum from downstream), no weight or bias,
    more rows than backward programs, factors in a strided view."""
    x, r = torch.randn(4 * 37 + 3, 24), torch.randn(4 * 37 + 3, 24)
    check_add(x, r, None, None, None, 1e-5, None, with_ds=False)
    strided = torch.rand(2 * (4 * 37 + 3)).mul(3)[::2]
    check_add(x, r, strided, torch.randn(24), None, 1e-5, None, with_ds=False)


def test_add_layer_norm_is_the_sum_then_the_norm_without_the_interpreter(reference_path):
    x, r = torch.randn(3, 4, 8), torch.randn(3, 4, 8).bfloat16()
    w, b, scale = torch.randn(8), torch.randn(8), torch.tensor([0.0, 2.0, 2.0] * 4)
    s, y = add_layer_norm(x, r, w, b, 1e-6, torch.bfloat16, scale)
    expected = x + r * scale.reshape(3, 4, 1).bfloat16()
    assert s.dtype == torch.float32 and torch.equal(s, expected)
    assert torch.equal(y, F.layer_norm(expected, (8,), w, b, 1e-6).bfloat16())


def test_add_layer_norm_names_bad_arguments():
    x = torch.randn(2, 3, 8)
    with pytest.raises(ValueError, match=r"residual must have x's shape \(2, 3, 8\)"):
        add_layer_norm(x, torch.randn(2, 8))
    with pytest.raises(ValueError, match=r"scale must have one value per row, shape \(6,\)"):
        add_layer_norm(x, torch.randn(2, 3, 8), scale=torch.ones(2))
    with pytest.raises(ValueError, match=r"weight must have shape \(8,\)"):
        add_layer_norm(x, torch.randn(2, 3, 8), torch.randn(3))
