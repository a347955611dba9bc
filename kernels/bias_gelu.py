"""The MLP's bias and GELU, fused with the bias gradient: h = GELU(a + bias) forward (exact,
erf-based GELU as nn.GELU), and in backward da = dh * GELU'(a + bias) with the bias gradient
summed in the same pass.

Why: the first MLP layer is the widest activation of a ViT block (4 x the width). Torch adds
the bias in the matmul, runs GELU as a kernel of its own, and in backward runs GELU's
backward and then a column reduction over the whole gradient for the bias (the profile of a
ViT-S/16 step at acd9a6a spent 6.5% of the GPU time in such bias reductions). Here the
matmul runs without its bias; this op reads a once and writes h once forward, reads dh and a
once and writes da once backward, each program keeping fp32 partial sums of the bias
gradient over its rows (summed once at the end).

`bias_gelu(a, bias, out_dtype=None)` over the last dimension of `a`; `bias` may be None.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from dinofuse.kernels._runtime import FLOAT_DTYPES, check_float, new_output, row_split, runs_triton

# A program's tile: BLOCK_ROWS rows x BLOCK_COLS columns; backward programs per SM, split
# over the column blocks (each keeps the bias gradient's partial sums of its rows).
BLOCK_ROWS = 8
BLOCK_COLS = 256
BACKWARD_PROGRAMS_PER_SM = 8
POISON_OUTPUTS = False  # tests: every output starts as NaN, so an unwritten element fails


@triton.jit
def _bias_gelu_forward_kernel(a_ptr, b_ptr, h_ptr, n_rows, N, HAS_BIAS: tl.constexpr,
                              BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < N
    ok = (rows < n_rows)[:, None] & col_ok[None, :]
    offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
    u = tl.load(a_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    if HAS_BIAS:
        u += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    h = 0.5 * u * (1.0 + tl.math.erf(u * 0.7071067811865476))  # u * Phi(u); 0.707.. = 1/sqrt(2)
    tl.store(h_ptr + offs, h.to(h_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _bias_gelu_backward_kernel(a_ptr, b_ptr, dh_ptr, da_ptr, db_partial_ptr, n_rows, N,
                               rows_per_program, HAS_BIAS: tl.constexpr, WANT_DB: tl.constexpr,
                               BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < N
    if HAS_BIAS:
        bias = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    db = tl.zeros((BLOCK_C,), dtype=tl.float32)
    first = pid * rows_per_program
    for start in range(first, first + rows_per_program, BLOCK_R):
        rows = start + tl.arange(0, BLOCK_R)
        ok = (rows < n_rows)[:, None] & col_ok[None, :]
        offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
        u = tl.load(a_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        if HAS_BIAS:
            u += bias[None, :]
        dh = tl.load(dh_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        # GELU'(u) = Phi(u) + u * phi(u); 0.3989.. = 1/sqrt(2 pi)
        slope = 0.5 * (1.0 + tl.math.erf(u * 0.7071067811865476)) \
            + u * 0.3989422804014327 * tl.exp(-0.5 * u * u)
        da = dh * slope
        tl.store(da_ptr + offs, da.to(da_ptr.dtype.element_ty), mask=ok)
        if WANT_DB:
            db += tl.sum(da, axis=0)
    if WANT_DB:
        tl.store(db_partial_ptr + pid * N + cols, db, mask=col_ok)


def _new(shape, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return new_output(shape, like, dtype, POISON_OUTPUTS)


def _forward(a, bias, out_dtype):
    N = a.shape[-1]
    a2 = a.reshape(-1, N).contiguous()
    n_rows = a2.shape[0]
    h = _new((n_rows, N), a2, out_dtype)
    if n_rows and N:
        grid = (triton.cdiv(n_rows, BLOCK_ROWS), triton.cdiv(N, BLOCK_COLS))
        _bias_gelu_forward_kernel[grid](a2, a2 if bias is None else bias, h, n_rows, N,
                                        HAS_BIAS=bias is not None, BLOCK_R=BLOCK_ROWS,
                                        BLOCK_C=BLOCK_COLS, num_warps=4)
    return h.reshape(a.shape)


def _backward(dh, a, bias, want_db: bool):
    N = a.shape[-1]
    a2 = a.reshape(-1, N).contiguous()
    n_rows = a2.shape[0]
    if not n_rows or not N:
        db = torch.zeros(N, dtype=bias.dtype, device=a.device) if want_db else None
        return torch.zeros_like(a), db
    dh2 = dh.reshape(n_rows, N).contiguous()
    col_blocks = triton.cdiv(N, BLOCK_COLS)
    programs, rows_per_program = row_split(n_rows, BLOCK_ROWS, BACKWARD_PROGRAMS_PER_SM, a.device,
                                           col_blocks, elsewhere=3)
    da = _new((n_rows, N), a2, a.dtype)
    db_partial = _new((programs, N), a2, torch.float32) if want_db else da
    _bias_gelu_backward_kernel[(programs, col_blocks)](
        a2, a2 if bias is None else bias, dh2, da, db_partial, n_rows, N, rows_per_program,
        HAS_BIAS=bias is not None, WANT_DB=want_db, BLOCK_R=BLOCK_ROWS, BLOCK_C=BLOCK_COLS,
        num_warps=4)
    db = db_partial.sum(0).to(bias.dtype) if want_db else None
    return da.reshape(a.shape), db


class BiasGELUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, bias, out_dtype):
        ctx.save_for_backward(a, bias)
        return _forward(a, bias, out_dtype)

    @staticmethod
    def backward(ctx, dh):
        a, bias = ctx.saved_tensors
        da, db = _backward(dh, a, bias, bias is not None and ctx.needs_input_grad[1])
        return da, db, None


def bias_gelu(a: torch.Tensor, bias: torch.Tensor | None = None,
              out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """GELU(a + bias) (the exact, erf-based GELU of nn.GELU), in `out_dtype` (default a's);
    the gradient of a comes back in a's dtype, the bias's in its own. Triton where the ops
    run it (not under torch.compile, which fuses this itself); else the same math in torch."""
    check_float("a", a)
    out_dtype = a.dtype if out_dtype is None else out_dtype
    if out_dtype not in FLOAT_DTYPES:
        raise TypeError(f"out_dtype must be float32, bfloat16 or float16; got {out_dtype}")
    if bias is not None:
        check_float("bias", bias)
        if bias.shape != (a.shape[-1],):
            raise ValueError(f"bias must have shape ({a.shape[-1]},) for inputs of last dimension "
                             f"{a.shape[-1]}; got {tuple(bias.shape)}")
    if not runs_triton(a) or torch.compiler.is_compiling():
        u = a.float() if bias is None else a.float() + bias.float()
        return F.gelu(u).to(out_dtype)
    return BiasGELUFunction.apply(a, bias, out_dtype)
