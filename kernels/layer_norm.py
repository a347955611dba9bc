"""LayerNorm, fused: statistics in fp32, output written straight in the dtype the next matmul
reads, and a backward that computes the input gradient and the weight and bias gradients in
one pass over the rows.

Why: under bf16 autocast the ViT's residual stream is fp32 and autocast runs LayerNorm in
fp32, so torch reads fp32, writes fp32, and the next linear layer casts that to bf16 (a
read and a write more). Its backward runs two kernels, one of them a column reduction for
the weight and bias gradients that alone took 8% of a ViT-S/16 step on an H200 (profile at
acd9a6a, bench/results/). Here the forward reads x once and writes bf16 once; the backward
reads x and dy once and writes dx once, each program keeping fp32 partial sums of the weight
and bias gradients over its rows (summed afterwards over a few hundred programs).

`layer_norm(x, weight, bias, eps, out_dtype=None)` over the last dimension; `weight` and
`bias` may be None. The math is torch's (`F.layer_norm`, biased variance).
`add_layer_norm(x, branch, ..., scale=None)`: a residual add and the norm after it in the
same passes (s = x + branch * scale[row]; returns s and its norm), as a transformer block
runs them; the backward adds the stream's gradient from downstream and writes the branch's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from dinofuse.kernels._runtime import (
    FLOAT_DTYPES,
    check_float,
    new_output,
    next_power_of_2,
    row_split,
    runs_triton,
)

# Rows per loop step (program-wide), and how many programs share the backward's rows: the
# partial weight/bias gradients are (programs, D) fp32, summed once at the end.
BLOCK_ROWS = 4
BACKWARD_PROGRAMS_PER_SM = 4
POISON_OUTPUTS = False  # tests: every output starts as NaN, so an unwritten element fails


@triton.jit
def _layer_norm_forward_kernel(
    x_ptr, r_ptr, scale_ptr, s_ptr, w_ptr, b_ptr, y_ptr, mean_ptr, rstd_ptr, n_rows, D, eps,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, HAS_SCALE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < n_rows
    col_ok = cols < D
    ok = row_ok[:, None] & col_ok[None, :]
    offs = rows.to(tl.int64)[:, None] * D + cols[None, :]
    x = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:  # s = x + r * scale[row], stored in s's dtype; the norm reads it as stored
        r = tl.load(r_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        if HAS_SCALE:
            r = r * tl.load(scale_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[:, None]
        summed = (x + r).to(s_ptr.dtype.element_ty)
        tl.store(s_ptr + offs, summed, mask=ok)
        x = summed.to(tl.float32)
    mean = tl.sum(x, axis=1) / D
    centered = tl.where(ok, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, axis=1) / D + eps)
    y = centered * rstd[:, None]
    if HAS_WEIGHT:
        y = y * tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        y = y + tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=ok)
    tl.store(mean_ptr + rows, mean, mask=row_ok)
    tl.store(rstd_ptr + rows, rstd, mask=row_ok)


@triton.jit
def _layer_norm_backward_kernel(
    x_ptr, w_ptr, dy_ptr, ds_ptr, scale_ptr, mean_ptr, rstd_ptr, dx_ptr, dr_ptr,
    dw_partial_ptr, db_partial_ptr, n_rows, D, rows_per_program,
    HAS_WEIGHT: tl.constexpr, WANT_DW: tl.constexpr, WANT_DB: tl.constexpr,
    HAS_DS: tl.constexpr, WANT_DR: tl.constexpr, HAS_SCALE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # with a residual sum s = x + r * scale normalized: x_ptr holds s, ds is the gradient
    # reaching s from the residual stream downstream; dx = ds + the norm's part, dr = dx * scale
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < D
    if HAS_WEIGHT:
        w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_D,), dtype=tl.float32)
    db = tl.zeros((BLOCK_D,), dtype=tl.float32)
    first = pid * rows_per_program
    for start in range(first, first + rows_per_program, BLOCK_R):
        rows = start + tl.arange(0, BLOCK_R)
        row_ok = rows < n_rows
        ok = row_ok[:, None] & col_ok[None, :]
        offs = rows.to(tl.int64)[:, None] * D + cols[None, :]
        x = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + rows, mask=row_ok, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
        x_hat = tl.where(ok, (x - mean[:, None]) * rstd[:, None], 0.0)
        if HAS_WEIGHT:
            g = dy * w[None, :]
        else:
            g = dy
        # d/dx of (x - mean) * rstd: subtract g's mean and its projection on x_hat
        c_hat = tl.sum(g * x_hat, axis=1) / D
        c_one = tl.sum(g, axis=1) / D
        dx = (g - x_hat * c_hat[:, None] - c_one[:, None]) * rstd[:, None]
        if HAS_DS:
            dx += tl.load(ds_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=ok)
        if WANT_DR:
            dr = dx
            if HAS_SCALE:
                dr = dx * tl.load(scale_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[:, None]
            tl.store(dr_ptr + offs, dr.to(dr_ptr.dtype.element_ty), mask=ok)
        if WANT_DW:
            dw += tl.sum(dy * x_hat, axis=0)
        if WANT_DB:
            db += tl.sum(dy, axis=0)
    if WANT_DW:
        tl.store(dw_partial_ptr + pid * D + cols, dw, mask=col_ok)
    if WANT_DB:
        tl.store(db_partial_ptr + pid * D + cols, db, mask=col_ok)


def _new(shape, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return new_output(shape, like, dtype, POISON_OUTPUTS)


def _or(tensor, placeholder):
    """A pointer argument the kernel will not touch (its flag is off): any tensor will do."""
    return placeholder if tensor is None else tensor


def _block_d(D: int) -> int:
    return max(16, next_power_of_2(D))


def _warps(block_d: int) -> int:
    # ~16 elements of each row block per thread: the backward holds five such tiles (x, dy,
    # x_hat, dy * w, dx); at 32 it took 154 registers (sm_90), a third of the SM's warps
    return min(16, max(1, BLOCK_ROWS * block_d // 512))


def _rows(t: torch.Tensor | None, D: int) -> torch.Tensor | None:
    return None if t is None else t.reshape(-1, D).contiguous()


def _launch_forward(x, weight, bias, eps: float, out_dtype: torch.dtype, residual=None, scale=None):
    """(s, y, mean, rstd): with `residual`, s = x + residual * scale[row] in x's dtype and y its
    norm (else s is None and y the norm of x); y in out_dtype; each row's mean and 1/std in
    fp32 for the backward."""
    D = x.shape[-1]
    x2, r2 = _rows(x, D), _rows(residual, D)
    n_rows = x2.shape[0]
    s = _new((n_rows, D), x2, x.dtype) if residual is not None else None
    y = _new((n_rows, D), x2, out_dtype)
    mean = _new((n_rows,), x2, torch.float32)
    rstd = _new((n_rows,), x2, torch.float32)
    block_d = _block_d(D)
    if n_rows:
        _layer_norm_forward_kernel[(triton.cdiv(n_rows, BLOCK_ROWS),)](
            x2, _or(r2, x2), _or(scale, x2), _or(s, x2), _or(weight, x2), _or(bias, x2), y,
            mean, rstd, n_rows, D, eps,
            HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
            HAS_RESIDUAL=residual is not None, HAS_SCALE=scale is not None,
            BLOCK_R=BLOCK_ROWS, BLOCK_D=block_d, num_warps=_warps(block_d))
    s = None if s is None else s.reshape(x.shape)
    return s, y.reshape(x.shape), mean, rstd


def _forward(x, weight, bias, eps: float, out_dtype: torch.dtype):
    """y (x's shape, out_dtype), and each row's mean and 1/std (fp32) for the backward."""
    return _launch_forward(x, weight, bias, eps, out_dtype)[1:]


def _backward(dy, x, weight, mean, rstd, w_dtype, b_dtype, ds=None, scale=None, r_dtype=None):
    """dx (x's shape and dtype), and the weight and bias gradients in w_dtype and b_dtype
    (None: not wanted). For a residual sum (x: the sum s): `ds` the gradient reaching s from
    downstream, added to dx; with `r_dtype`, also dr = dx * scale[row] in that dtype."""
    D = x.shape[-1]
    x2 = x.reshape(-1, D).contiguous()
    n_rows = x2.shape[0]
    if not n_rows:  # no rows: zero gradients for the parameters, as torch gives
        zeros = [None if d is None else torch.zeros(D, dtype=d, device=x.device)
                 for d in (w_dtype, b_dtype)]
        dr = None if r_dtype is None else torch.zeros_like(x, dtype=r_dtype)
        return torch.zeros_like(x), *zeros, dr
    dy2, ds2 = _rows(dy, D), _rows(ds, D)
    want_dw, want_db = w_dtype is not None, b_dtype is not None
    programs, rows_per_program = row_split(n_rows, BLOCK_ROWS, BACKWARD_PROGRAMS_PER_SM, x2.device)
    dx = _new((n_rows, D), x2, x.dtype)
    dr = _new((n_rows, D), x2, r_dtype) if r_dtype is not None else None
    dw_partial = _new((programs, D), x2, torch.float32) if want_dw else None
    db_partial = _new((programs, D), x2, torch.float32) if want_db else None
    block_d = _block_d(D)
    _layer_norm_backward_kernel[(programs,)](
        x2, _or(weight, x2), dy2, _or(ds2, dx), _or(scale, dx), mean, rstd, dx, _or(dr, dx),
        _or(dw_partial, dx), _or(db_partial, dx), n_rows, D, rows_per_program,
        HAS_WEIGHT=weight is not None, WANT_DW=want_dw, WANT_DB=want_db,
        HAS_DS=ds is not None, WANT_DR=dr is not None, HAS_SCALE=scale is not None,
        BLOCK_R=BLOCK_ROWS, BLOCK_D=block_d, num_warps=_warps(block_d))
    dw = dw_partial.sum(0).to(w_dtype) if want_dw else None
    db = db_partial.sum(0).to(b_dtype) if want_db else None
    dr = None if dr is None else dr.reshape(x.shape)
    return dx.reshape(x.shape), dw, db, dr


def _wanted_dtypes(weight, bias, needs_weight_grad: bool, needs_bias_grad: bool):
    return (weight.dtype if weight is not None and needs_weight_grad else None,
            bias.dtype if bias is not None and needs_bias_grad else None)


# Two doors to the same implementation, as for the loss (kernels/dino_loss.py): eager code
# takes the autograd.Function (no dispatcher layers per call); torch.compile takes the
# custom ops, so a compiled model that calls layer_norm traces it without a graph break.


class LayerNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps, out_dtype):
        y, mean, rstd = _forward(x, weight, bias, eps, out_dtype)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        dtypes = _wanted_dtypes(weight, bias, *ctx.needs_input_grad[1:3])
        dx, dw, db, _ = _backward(dy, x, weight, mean, rstd, *dtypes)
        return dx, dw, db, None, None


@torch.library.custom_op("dinofuse::layer_norm_fwd", mutates_args=())
def _layer_norm_fwd(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                    eps: float, out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _forward(x, weight, bias, eps, out_dtype)


@_layer_norm_fwd.register_fake
def _(x, weight, bias, eps, out_dtype):
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return (torch.empty_like(x, dtype=out_dtype, memory_format=torch.contiguous_format),
            x.new_empty((rows,), dtype=torch.float32), x.new_empty((rows,), dtype=torch.float32))


@torch.library.custom_op("dinofuse::layer_norm_bwd", mutates_args=())
def _layer_norm_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None,
                    bias: torch.Tensor | None, mean: torch.Tensor, rstd: torch.Tensor,
                    want_dw: bool, want_db: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dtypes = _wanted_dtypes(weight, bias, want_dw, want_db)
    dx, dw, db, _ = _backward(dy, x, weight, mean, rstd, *dtypes)
    # an op returns tensors: "no gradient" is an empty one (each its own: outputs may not alias)
    return dx, x.new_empty((0,)) if dw is None else dw, x.new_empty((0,)) if db is None else db


@_layer_norm_bwd.register_fake
def _(dy, x, weight, bias, mean, rstd, want_dw, want_db):
    def grad(p, wanted):
        return torch.empty_like(p) if p is not None and wanted else x.new_empty((0,))

    return (torch.empty_like(x, memory_format=torch.contiguous_format), grad(weight, want_dw),
            grad(bias, want_db))


def _setup_context(ctx, inputs, output):
    x, weight, bias, _, _ = inputs
    _, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.save_for_backward(x, weight, bias, mean, rstd)


def _op_backward(ctx, dy, _grad_mean, _grad_rstd):
    x, weight, bias, mean, rstd = ctx.saved_tensors
    want_dw = weight is not None and ctx.needs_input_grad[1]
    want_db = bias is not None and ctx.needs_input_grad[2]
    dx, dw, db = torch.ops.dinofuse.layer_norm_bwd(dy, x, weight, bias, mean, rstd, want_dw, want_db)
    return dx, dw if want_dw else None, db if want_db else None, None, None


_layer_norm_fwd.register_autograd(_op_backward, setup_context=_setup_context)


def _checked(x, weight, bias, out_dtype) -> torch.dtype:
    """The output dtype (None: x's), after checking the arguments; errors name them."""
    check_float("x", x)
    out_dtype = x.dtype if out_dtype is None else out_dtype
    if out_dtype not in FLOAT_DTYPES:
        raise TypeError(f"out_dtype must be float32, bfloat16 or float16; got {out_dtype}")
    D = x.shape[-1]
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and p.shape != (D,):
            raise ValueError(f"{name} must have shape ({D},) for inputs of last dimension {D}; "
                             f"got {tuple(p.shape)}")
    return out_dtype


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
               eps: float = 1e-5, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """LayerNorm over the last dimension, output in `out_dtype` (default: x's dtype).

    Triton on CUDA (and on CPU under TRITON_INTERPRET=1); elsewhere torch's layer_norm in fp32
    cast to `out_dtype`, which is the same math.
    """
    out_dtype = _checked(x, weight, bias, out_dtype)
    D = x.shape[-1]
    if not runs_triton(x):
        fp32 = (None if p is None else p.float() for p in (weight, bias))
        return F.layer_norm(x.float(), (D,), *fp32, eps).to(out_dtype)
    if torch.compiler.is_compiling():
        return torch.ops.dinofuse.layer_norm_fwd(x, weight, bias, eps, out_dtype)[0]
    return LayerNormFunction.apply(x, weight, bias, eps, out_dtype)


class AddLayerNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, weight, bias, scale, eps, out_dtype):
        s, y, mean, rstd = _launch_forward(x, weight, bias, eps, out_dtype, residual, scale)
        ctx.save_for_backward(s, weight, bias, scale, mean, rstd)
        ctx.residual_dtype = residual.dtype
        ctx.set_materialize_grads(False)  # no gradient from downstream: none read (not zeros)
        return s, y

    @staticmethod
    def backward(ctx, ds, dy):
        s, weight, bias, scale, mean, rstd = ctx.saved_tensors
        if dy is None:  # the norm unused: its part of the gradient is 0
            dy = torch.zeros_like(s)
        dtypes = _wanted_dtypes(weight, bias, *ctx.needs_input_grad[2:4])
        r_dtype = ctx.residual_dtype if ctx.needs_input_grad[1] else None
        dx, dw, db, dr = _backward(dy, s, weight, mean, rstd, *dtypes, ds=ds, scale=scale,
                                   r_dtype=r_dtype)
        return dx, dr, dw, db, None, None, None


def add_layer_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None = None,
                   bias: torch.Tensor | None = None, eps: float = 1e-5,
                   out_dtype: torch.dtype | None = None, scale: torch.Tensor | None = None):
    """(s, LayerNorm(s)) with s = x + residual * scale[row], in one pass each way.

    A transformer block's `x = x + drop_path(branch); h = norm(x)`: `scale` holds one factor
    per row of the flattened leading dimensions (stochastic depth's 0 or 1/keep per sample,
    spread over its tokens), None for 1. s is in x's dtype (the residual stream's), the norm
    in `out_dtype` (default x's). The backward adds the gradient reaching s from downstream
    to the norm's, and gives the branch its gradient in its own dtype. Triton where the ops
    run it (not under torch.compile, which fuses this sum and norm itself); else the same
    math in torch.
    """
    out_dtype = _checked(x, weight, bias, out_dtype)
    check_float("residual", residual)
    if residual.shape != x.shape:
        raise ValueError(f"residual must have x's shape {tuple(x.shape)}; got {tuple(residual.shape)}")
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if scale is not None and scale.shape != (rows,):
        raise ValueError(f"scale must have one value per row, shape ({rows},); got {tuple(scale.shape)}")
    if not runs_triton(x) or torch.compiler.is_compiling():
        branch = residual if scale is None else residual * scale.reshape(*x.shape[:-1], 1).to(residual.dtype)
        s = (x + branch).to(x.dtype)
        return s, layer_norm(s, weight, bias, eps, out_dtype)
    scale = None if scale is None else scale.contiguous()  # the kernels read it row by row
    return AddLayerNormFunction.apply(x, residual, weight, bias, scale, eps, out_dtype)


class FusedLayerNorm(torch.nn.LayerNorm):
    """nn.LayerNorm (same parameters, same state dict) running the fused op. Under autocast
    it writes fp32, as autocast's LayerNorm does, or with `out_autocast_dtype` the autocast
    dtype (for a layer whose output only feeds matmuls, which would cast it anyway)."""

    def __init__(self, *args, out_autocast_dtype: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.out_autocast_dtype = out_autocast_dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fused_forward(x, self.out_autocast_dtype)

    def fused_forward(self, x: torch.Tensor, out_autocast_dtype: bool) -> torch.Tensor:
        out_dtype = self._output_dtype(x, out_autocast_dtype)
        with torch.autocast(x.device.type, enabled=False):
            return layer_norm(x, self.weight, self.bias, self.eps, out_dtype)

    def fused_add_forward(self, x: torch.Tensor, residual: torch.Tensor, scale: torch.Tensor | None,
                          out_autocast_dtype: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + residual * scale[row], this norm of it): `add_layer_norm` with this layer's
        parameters."""
        out_dtype = self._output_dtype(x, out_autocast_dtype)
        with torch.autocast(x.device.type, enabled=False):
            return add_layer_norm(x, residual, self.weight, self.bias, self.eps, out_dtype, scale)

    def _output_dtype(self, x: torch.Tensor, out_autocast_dtype: bool) -> torch.dtype:
        if len(self.normalized_shape) != 1:
            raise ValueError(f"FusedLayerNorm normalizes the last dimension only; "
                             f"got normalized_shape {tuple(self.normalized_shape)}")
        device = x.device.type
        if not torch.is_autocast_enabled(device):
            return x.dtype
        return torch.get_autocast_dtype(device) if out_autocast_dtype else torch.float32
