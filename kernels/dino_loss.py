"""The DINO loss with teacher centering, fused: Triton kernels, the custom op, and `DINOLoss`.

Math (official DINOLoss, `reference.dino_loss_reference`): for teacher view i and student
view v != i, the term is mean_b sum_k -q_i log p_v with q_i = softmax((t_i - c)/tau_t) and
p_v = softmax(s_v/tau_s); the loss averages the terms.

The fused form visits each student row once per pass. For student row (v, b) the target is
Q = sum_{i != v} q_i[b] and its mass is n_v = number of teacher views other than v, so

    row loss = n_v * lse(s/tau_s) - <Q, s/tau_s>
    d loss / d s = (n_v * softmax(s/tau_s) - Q) / (tau_s * n_terms * B)

Two kernels:
  1. teacher pass, one program per block of K columns and of 64 rows: reads the teacher
     once, writes each row's partial (max, sum exp) of (t - c)/tau_t for its block and the
     row block's share of the column means (the center statistic), summed in a fixed order
     -- no atomics, so the result is deterministic.
  2. student pass, one program per few student views of one image (V_BLOCK rows), ordered
     image-major so the programs that share an image's teacher rows run together: pass A
     computes the rows' logsumexp; pass B recomputes q from the teacher logits once for the
     V_BLOCK rows, writes the gradient and the rows' losses. Pass B's re-read of a row hits
     L2 only if the rows in flight fit there: at K=65536 bf16 a row is 128 KB, so a full
     GPU of resident programs (~4 per SM x 2 rows) holds ~135 MB and reads it again from
     memory; a persistent grid (`programs_per_sm`) bounds that.
     The per-row losses are summed afterwards in a fixed order.
     With few images (a small batch) the rows are also cut into column slices to fill the
     GPU: a statistics kernel writes each slice's partial logsumexp, and pass B combines
     them (the student is then read twice from memory instead of once plus L2 hits).

The gradient is produced in forward; backward only scales it by the incoming gradient, in
place, and skips even that when the incoming gradient is 1 (checked on the device).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import torch.distributed as dist
import triton
import triton.language as tl
from torch import nn

from dinofuse.kernels._runtime import check_float, new_output, next_power_of_2, runs_triton
from dinofuse.kernels.ema import ema_update_
from dinofuse.kernels.reference import (
    dino_loss_reference,
    dino_loss_student_grad,
    pair_count,
    teacher_temp_schedule,
)

# ----------------------------------------------------------------------------- kernels
# Both kernels work in base 2 (exp2/log2 are the native instructions): x2 = x * log2(e)/tau,
# and lse = ln(2) * lse2. The teacher pass and the student pass agree on that convention.

LN2 = 0.6931471805599453
LOG2E = 1.4426950408889634


@triton.jit
def _teacher_pass_kernel(
    t_ptr, t_row_stride, c_ptr, part_max_ptr, part_sum_ptr, col_sum_ptr,
    n_rows, K, t_scale, inv_rows,
    BLOCK_R: tl.constexpr, ROWS_PER_PROGRAM: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Program (column block, row block): partial softmax statistics of its rows over its
    # columns, and its rows' share of the column means (summed over row blocks afterwards).
    pid = tl.program_id(0)
    n_blocks = tl.num_programs(0)
    r_start = tl.program_id(1) * ROWS_PER_PROGRAM
    cols = pid * BLOCK_K + tl.arange(0, BLOCK_K)
    col_ok = cols < K
    center = tl.load(c_ptr + cols, mask=col_ok, other=0.0)
    col_sum = tl.zeros([BLOCK_K], dtype=tl.float32)
    for r0 in range(r_start, r_start + ROWS_PER_PROGRAM, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        row_ok = rows < n_rows
        ok = row_ok[:, None] & col_ok[None, :]
        offs = rows[:, None].to(tl.int64) * t_row_stride + cols[None, :]
        t = tl.load(t_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        col_sum += tl.sum(t, axis=0)
        x = tl.where(ok, (t - center[None, :]) * t_scale, float("-inf"))
        x_max = tl.max(x, axis=1)
        x_sum = tl.sum(tl.exp2(x - x_max[:, None]), axis=1)
        tl.store(part_max_ptr + rows * n_blocks + pid, x_max, mask=row_ok)
        tl.store(part_sum_ptr + rows * n_blocks + pid, x_sum, mask=row_ok)
    tl.store(col_sum_ptr + tl.program_id(1).to(tl.int64) * K + cols, col_sum * inv_rows,
             mask=col_ok)


@triton.jit
def _view_group(pid, B, NCROPS: tl.constexpr, V_BLOCK: tl.constexpr):
    """Program -> (image b, its views vs, which exist, their student rows). Image-major, so
    the programs that read an image's teacher rows run side by side and share them in L2."""
    N_GROUPS: tl.constexpr = (NCROPS + V_BLOCK - 1) // V_BLOCK
    b = pid // N_GROUPS
    vs = (pid % N_GROUPS) * V_BLOCK + tl.arange(0, V_BLOCK)
    return b, vs, vs < NCROPS, (vs * B + b).to(tl.int64)


@triton.jit
def _lse2_partial(row_ptrs, row_ok, k_start, k_end, scale, V: tl.constexpr, BLOCK_K: tl.constexpr,
                  STAGES: tl.constexpr):
    """Online max and sum of exp2(x * scale) over columns [k_start, k_end) of V rows.

    The sums stay per lane until the end (one cross-thread reduction per step, for the
    max, instead of two); rescaling to a new row max costs one exp2 per row, not per element.
    """
    x_max = tl.full([V], float("-inf"), tl.float32)
    lane_sum = tl.zeros([V, BLOCK_K], dtype=tl.float32)
    for k0 in tl.range(k_start, k_end, BLOCK_K, num_stages=STAGES):
        cols = k0 + tl.arange(0, BLOCK_K)
        ok = row_ok[:, None] & (cols < k_end)[None, :]
        x = tl.load(row_ptrs + cols[None, :], mask=ok, other=float("-inf")).to(tl.float32) * scale
        new_max = tl.maximum(x_max, tl.max(x, axis=1))
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)  # rows that do not exist
        lane_sum = lane_sum * tl.exp2(x_max - safe_max)[:, None] + tl.exp2(x - safe_max[:, None])
        x_max = new_max
    return x_max, tl.sum(lane_sum, axis=1)


@triton.jit
def _combine_lse2(max_ptr, sum_ptr, part_offs, row_ok, n_parts, V: tl.constexpr,
                  BLOCK_P: tl.constexpr):
    """log2-sum-exp2 of V rows from n_parts partial (max, sum) pairs at part_offs + p."""
    x_max = tl.full([V], float("-inf"), tl.float32)
    x_sum = tl.zeros([V], dtype=tl.float32)
    for p0 in range(0, n_parts, BLOCK_P):
        parts = p0 + tl.arange(0, BLOCK_P)
        ok = row_ok[:, None] & (parts < n_parts)[None, :]
        offs = part_offs[:, None] + parts[None, :]
        pm = tl.load(max_ptr + offs, mask=ok, other=float("-inf"))
        ps = tl.load(sum_ptr + offs, mask=ok, other=0.0)
        new_max = tl.maximum(x_max, tl.max(pm, axis=1))
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
        x_sum = x_sum * tl.exp2(x_max - safe_max) + tl.sum(ps * tl.exp2(pm - safe_max[:, None]), axis=1)
        x_max = new_max
    return tl.where(row_ok, x_max + tl.log2(x_sum), 0.0)


@triton.jit
def _student_stats_kernel(
    s_ptr, s_row_stride, part_max_ptr, part_sum_ptr, B, K, split_len, s_scale,
    NCROPS: tl.constexpr, V_BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr,
):
    # Split mode only: the student rows' partial logsumexp over one column slice each.
    split = tl.program_id(1)
    n_splits = tl.num_programs(1)
    b, vs, v_ok, rows = _view_group(tl.program_id(0), B, NCROPS, V_BLOCK)
    k_start = split * split_len
    x_max, x_sum = _lse2_partial(s_ptr + rows[:, None] * s_row_stride, v_ok, k_start,
                                 tl.minimum(K, k_start + split_len), s_scale, V_BLOCK, BLOCK_K,
                                 STAGES)
    tl.store(part_max_ptr + rows * n_splits + split, x_max, mask=v_ok)
    tl.store(part_sum_ptr + rows * n_splits + split, x_sum, mask=v_ok)


@triton.jit
def _student_pass_kernel(
    s_ptr, s_row_stride, t_ptr, t_row_stride, c_ptr, t_max_ptr, t_sum_ptr,
    s_max_ptr, s_sum_ptr, grad_ptr, row_loss_ptr,
    B, K, n_tblocks, split_len, s_scale, t_scale, grad_scale, loss_scale, n_groups,
    NCROPS: tl.constexpr, G: tl.constexpr, G_P2: tl.constexpr, V_BLOCK: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr, WRITE_GRAD: tl.constexpr,
    ONE_SPLIT: tl.constexpr, STAGES: tl.constexpr, PERSISTENT: tl.constexpr,
):
    # One program: V_BLOCK student views of one image, over one column slice (all of K when
    # ONE_SPLIT; then the program also computes the rows' logsumexp itself). PERSISTENT: the
    # grid has fewer programs than view groups, and each walks groups in turn (a separate
    # branch: the loop around the group costs the default launch 15 registers on sm_90).
    if PERSISTENT:
        for pid in range(tl.program_id(0), n_groups, tl.num_programs(0)):
            _student_view_group(
                pid, s_ptr, s_row_stride, t_ptr, t_row_stride, c_ptr, t_max_ptr, t_sum_ptr,
                s_max_ptr, s_sum_ptr, grad_ptr, row_loss_ptr,
                B, K, n_tblocks, split_len, s_scale, t_scale, grad_scale, loss_scale,
                NCROPS, G, G_P2, V_BLOCK, BLOCK_K, BLOCK_P, WRITE_GRAD, ONE_SPLIT, STAGES)
    else:
        _student_view_group(
            tl.program_id(0), s_ptr, s_row_stride, t_ptr, t_row_stride, c_ptr, t_max_ptr,
            t_sum_ptr, s_max_ptr, s_sum_ptr, grad_ptr, row_loss_ptr,
            B, K, n_tblocks, split_len, s_scale, t_scale, grad_scale, loss_scale,
            NCROPS, G, G_P2, V_BLOCK, BLOCK_K, BLOCK_P, WRITE_GRAD, ONE_SPLIT, STAGES)


@triton.jit
def _student_view_group(
    pid, s_ptr, s_row_stride, t_ptr, t_row_stride, c_ptr, t_max_ptr, t_sum_ptr,
    s_max_ptr, s_sum_ptr, grad_ptr, row_loss_ptr,
    B, K, n_tblocks, split_len, s_scale, t_scale, grad_scale, loss_scale,
    NCROPS: tl.constexpr, G: tl.constexpr, G_P2: tl.constexpr, V_BLOCK: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr, WRITE_GRAD: tl.constexpr,
    ONE_SPLIT: tl.constexpr, STAGES: tl.constexpr,
):
    split = tl.program_id(1)
    n_splits = tl.num_programs(1)
    b, vs, v_ok, rows = _view_group(pid, B, NCROPS, V_BLOCK)
    s_rows = s_ptr + rows[:, None] * s_row_stride
    n_targets = G - (vs < G).to(tl.float32)  # student view v learns from the global views != v

    views = tl.arange(0, G_P2)
    t_lse = _combine_lse2(t_max_ptr, t_sum_ptr, (views * B + b) * n_tblocks, views < G,
                          n_tblocks, G_P2, BLOCK_P)
    if ONE_SPLIT:  # pass A: the rows' logsumexp; pass B re-reads the rows (from L2 if it can)
        x_max, x_sum = _lse2_partial(s_rows, v_ok, 0, K, s_scale, V_BLOCK, BLOCK_K, STAGES)
        s_lse = tl.where(v_ok, x_max + tl.log2(x_sum), 0.0)
    else:
        s_lse = _combine_lse2(s_max_ptr, s_sum_ptr, rows * n_splits, v_ok, n_splits, V_BLOCK,
                              BLOCK_P)

    # Pass B: targets from the teacher, the gradient, and <Q, x2> for the loss.
    k_start = split * split_len
    k_end = tl.minimum(K, k_start + split_len)
    lane_dot = tl.zeros([V_BLOCK, BLOCK_K], dtype=tl.float32)  # reduced once, at the end
    g_rows = grad_ptr + rows[:, None] * K
    for k0 in tl.range(k_start, k_end, BLOCK_K, num_stages=STAGES):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < k_end
        ok = v_ok[:, None] & col_ok[None, :]
        x = tl.load(s_rows + cols[None, :], mask=ok, other=0.0).to(tl.float32) * s_scale
        center = tl.load(c_ptr + cols, mask=col_ok, other=0.0)
        q_target = tl.zeros([V_BLOCK, BLOCK_K], dtype=tl.float32)
        for i in tl.static_range(G):
            t_row = t_ptr + (i * B + b).to(tl.int64) * t_row_stride
            t_i = tl.load(t_row + cols, mask=col_ok, other=0.0).to(tl.float32)
            lse_i = tl.sum(tl.where(views == i, t_lse, 0.0), axis=0)
            q_i = tl.where(col_ok, tl.exp2((t_i - center) * t_scale - lse_i), 0.0)
            q_target += tl.where((vs != i)[:, None], q_i[None, :], 0.0)
        lane_dot += tl.where(ok, q_target * x, 0.0)
        if WRITE_GRAD:
            g = grad_scale * (n_targets[:, None] * tl.exp2(x - s_lse[:, None]) - q_target)
            tl.store(g_rows + cols[None, :], g.to(grad_ptr.dtype.element_ty), mask=ok)
    # Row loss in bits: n * lse2 - <Q, x2>, the lse term counted by the first slice only.
    # loss_scale = ln(2) / (pairs * B) turns it into the mean over pairs and batch.
    row_loss = tl.where(split == 0, n_targets * s_lse, 0.0) - tl.sum(lane_dot, axis=1)
    tl.store(row_loss_ptr + rows * n_splits + split, row_loss * loss_scale, mask=v_ok)


@triton.jit
def _student_image_pass_kernel(
    s_ptr, s_row_stride, t_ptr, t_row_stride, c_ptr, t_max_ptr, t_sum_ptr,
    s_max_ptr, s_sum_ptr, grad_ptr, part_loss_ptr,
    B, K, n_tblocks, split_len, s_scale, t_scale, grad_scale, loss_scale,
    NCROPS: tl.constexpr, NCROPS_P2: tl.constexpr, G: tl.constexpr, G_P2: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr, WRITE_GRAD: tl.constexpr,
    EVEN_K: tl.constexpr, STAGES: tl.constexpr,
):
    # The "image" layout: one program per (image, column slice) walks every student view of
    # its image, so the teacher probabilities cost G + (G-1)^2 exp2 per column (view 0's
    # targets also give the sum that every local view learns from) instead of G per V_BLOCK
    # rows, and the teacher and center are read once per slice. The rows' logsumexps come
    # from the statistics kernel; the program writes one partial loss.
    b = tl.program_id(0)
    split = tl.program_id(1)
    n_splits = tl.num_programs(1)
    views = tl.arange(0, G_P2)
    t_lse = _combine_lse2(t_max_ptr, t_sum_ptr, (views * B + b) * n_tblocks, views < G,
                          n_tblocks, G_P2, BLOCK_P)
    crops = tl.arange(0, NCROPS_P2)
    crop_ok = crops < NCROPS
    s_lse = _combine_lse2(s_max_ptr, s_sum_ptr, (crops * B + b).to(tl.int64) * n_splits,
                          crop_ok, n_splits, NCROPS_P2, BLOCK_P)
    n_targets = G - (crops < G).to(tl.float32)
    k_start = split * split_len
    k_end = tl.minimum(K, k_start + split_len)
    lane_dot = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k0 in tl.range(k_start, k_end, BLOCK_K, num_stages=STAGES):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < k_end
        if EVEN_K:  # every block is whole: no masks (fewer instructions per element)
            center = tl.load(c_ptr + cols)
        else:
            center = tl.load(c_ptr + cols, mask=col_ok, other=0.0)
        q_all = tl.zeros([BLOCK_K], dtype=tl.float32)  # sum of every teacher view's q
        for v in tl.static_range(NCROPS):
            if v < G:  # a global view learns from the other global views
                target = tl.zeros([BLOCK_K], dtype=tl.float32)
                for i in tl.static_range(G):
                    if i != v or v == 0:  # view 0 also computes its own q, for q_all
                        t_row = t_ptr + (i * B + b).to(tl.int64) * t_row_stride
                        if EVEN_K:
                            t_i = tl.load(t_row + cols).to(tl.float32)
                        else:
                            t_i = tl.load(t_row + cols, mask=col_ok, other=0.0).to(tl.float32)
                        lse_i = tl.sum(tl.where(views == i, t_lse, 0.0), axis=0)
                        q_i = tl.exp2((t_i - center) * t_scale - lse_i)
                        if not EVEN_K:
                            q_i = tl.where(col_ok, q_i, 0.0)
                        if i != v:
                            target += q_i
                        if v == 0:
                            q_all += q_i
            else:  # a local view learns from all of them
                target = q_all
            row = (v * B + b).to(tl.int64)
            if EVEN_K:
                x = tl.load(s_ptr + row * s_row_stride + cols).to(tl.float32) * s_scale
            else:
                x = tl.load(s_ptr + row * s_row_stride + cols, mask=col_ok,
                            other=0.0).to(tl.float32) * s_scale
            lane_dot += target * x  # target is 0 outside the row
            if WRITE_GRAD:
                lse_v = tl.sum(tl.where(crops == v, s_lse, 0.0), axis=0)
                n_v = G - 1 if v < G else G
                g = (grad_scale * (n_v * tl.exp2(x - lse_v) - target)).to(grad_ptr.dtype.element_ty)
                if EVEN_K:
                    tl.store(grad_ptr + row * K + cols, g)
                else:
                    tl.store(grad_ptr + row * K + cols, g, mask=col_ok)
    # In bits: sum over views of n_v * lse2 (counted by the first slice) - <Q_v, x2>.
    lse_terms = tl.sum(tl.where(crop_ok, n_targets * s_lse, 0.0), axis=0)
    part = tl.where(split == 0, lse_terms, 0.0) - tl.sum(lane_dot, axis=0)
    tl.store(part_loss_ptr + b * n_splits + split, part * loss_scale)


@triton.jit
def _scale_inplace_kernel(x_ptr, g_ptr, n, BLOCK: tl.constexpr):
    g = tl.load(g_ptr).to(tl.float32)
    if g != 1.0:  # the usual `loss.backward()` passes 1: then nothing to read or write
        step = tl.num_programs(0).to(tl.int64) * BLOCK  # a small grid striding over x
        for start in range(tl.program_id(0).to(tl.int64) * BLOCK, n, step):
            offs = start + tl.arange(0, BLOCK)
            ok = offs < n
            x = tl.load(x_ptr + offs, mask=ok).to(tl.float32)
            tl.store(x_ptr + offs, (x * g).to(x_ptr.dtype.element_ty), mask=ok)


# ----------------------------------------------------------------------------- launch

# Tests set this to fill every output with NaN before the kernels run, so an element the
# kernels fail to write shows up as NaN instead of passing on stale memory.
POISON_OUTPUTS = False


def _new_output(shape, *, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return new_output(shape, like, dtype, POISON_OUTPUTS)


# Teacher pass launch shape (rows_per_program a multiple of block_r); the benchmark sweeps it.
# H200 sweep at b807297, B=256 bf16: this shape 0.458 ms for the whole loss against 0.522 with
# (256, 16, 64, 4); at B=64 the same (bench/results/2026-11-27-h200-b807297/kernels.md).
TEACHER_LAUNCH = dict(block_k=1024, block_r=8, rows_per_program=64, num_warps=4)

class StudentLaunch(NamedTuple):
    """The student pass's launch shape. layout "views": a program per V_BLOCK views of one
    image (over a column slice); "image": a program per image and column slice, walking all
    its views (the statistics kernel, with V_BLOCK views per program, runs first)."""

    v_block: int
    block_k: int
    num_warps: int
    splits: int | None  # column slices per row; None picks by occupancy
    layout: str = "views"
    stages: int = 1  # >1: the main loops prefetch that many steps ahead (software pipelining:
    # asynchronous copies into shared memory, more bytes in flight per program)
    programs_per_sm: int | None = None  # "views" only: a persistent grid of this many programs
    # per SM, each walking view groups in turn. Fewer rows in flight at once, so that pass B's
    # re-read of a row can still find it in L2 (see bench/NOTES.md); None: a program per group


# H200 sweep at acd9a6a (bench/results/2026-11-29-h200-acd9a6a/kernels.md), bf16 K=65536, 10
# crops: the whole loss 0.337 ms at B=256 and 0.114 ms at B=64 with this shape, against 0.417
# and 0.137 with the views layout (2, 2048, 8, None) before. fp32 not swept.
STUDENT_LAUNCH = StudentLaunch(2, 1024, 4, None, "image", 3)
# Another launch shape (a StudentLaunch or a 4- to 6-tuple), or None for STUDENT_LAUNCH: the
# benchmark sweeps it, the tests try many.
STUDENT_LAUNCH_OVERRIDE: tuple | None = None


@functools.lru_cache(maxsize=None)
def _multiprocessors(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: any small number exercises both modes
    return torch.cuda.get_device_properties(device).multi_processor_count


def _student_launch_config(K: int, B: int, ncrops: int, device) -> tuple:
    """Views per program, columns per step, warps, column slices, slice length, layout,
    pipeline stages and the student pass's programs per slice.

    Small batches leave too few (image, view-group) programs to fill the GPU, each walking a
    whole row twice in series; then each row is cut into slices run in parallel, at the
    price of a separate statistics kernel (the student is read twice from memory).
    """
    v_block, block_k, warps, splits, layout, stages, per_sm = StudentLaunch(
        *(STUDENT_LAUNCH_OVERRIDE or STUDENT_LAUNCH))
    if layout not in ("views", "image"):
        raise ValueError(f"student launch layout must be views or image; got {layout!r}")
    if stages < 1:
        raise ValueError(f"student launch stages must be >= 1; got {stages}")
    if per_sm is not None and (layout != "views" or per_sm < 1):
        raise ValueError("student launch programs_per_sm must be None or >= 1, with the views "
                         f"layout; got {per_sm} with {layout!r}")
    v_block = min(v_block, next_power_of_2(ncrops))
    block_k = min(block_k, max(16, next_power_of_2(K) // v_block))
    programs = B * (1 if layout == "image" else triton.cdiv(ncrops, v_block))
    if splits is None:
        want = 8 * _multiprocessors(device)  # B=64, 10 crops: 4 slices (best in the H200 sweep)
        # Long rows gain from 4 slices even when the batch fills the GPU: B=256 bf16 measured
        # 0.461 ms against 0.522 unsliced (H200 sweep at b807297).
        at_least = 4 if K >= 16 * block_k else 1
        splits = max(at_least, triton.cdiv(want, programs))
    split_len = triton.cdiv(triton.cdiv(K, max(1, splits)), block_k) * block_k
    if per_sm is not None:
        programs = min(programs, per_sm * _multiprocessors(device))
    return (v_block, block_k, warps, triton.cdiv(K, split_len), split_len, layout, stages,
            programs)


def _fused_forward(student_out, teacher_out, center, num_global_crops, student_temp,
                   teacher_temp, compute_grad):
    n_student, K = student_out.shape
    n_teacher = teacher_out.shape[0]
    B = n_teacher // num_global_crops
    ncrops = n_student // B
    f32 = dict(like=student_out, dtype=torch.float32)

    t_launch = TEACHER_LAUNCH
    block_kt = min(t_launch["block_k"], next_power_of_2(K))
    n_tblocks = triton.cdiv(K, block_kt)
    rows_per_program = t_launch["rows_per_program"]  # many programs, each a short loop
    n_rblocks = triton.cdiv(n_teacher, rows_per_program)
    part_max = _new_output((n_teacher, n_tblocks), **f32)
    part_sum = _new_output((n_teacher, n_tblocks), **f32)
    col_sums = _new_output((n_rblocks, K), **f32)
    _teacher_pass_kernel[(n_tblocks, n_rblocks)](
        teacher_out, teacher_out.stride(0), center, part_max, part_sum, col_sums,
        n_teacher, K, LOG2E / teacher_temp, 1.0 / n_teacher,
        BLOCK_R=t_launch["block_r"], ROWS_PER_PROGRAM=rows_per_program, BLOCK_K=block_kt,
        num_warps=t_launch["num_warps"],
    )
    teacher_mean = col_sums[0] if n_rblocks == 1 else col_sums.sum(0)

    grad = _new_output((n_student, K) if compute_grad else (0,), like=student_out,
                       dtype=student_out.dtype)
    scale = 1.0 / (pair_count(ncrops, num_global_crops) * B)
    v_block, block_k, warps, splits, split_len, layout, stages, programs = _student_launch_config(
        K, B, ncrops, student_out.device)
    n_groups = B * triton.cdiv(ncrops, v_block)
    grid = (n_groups, splits)
    # partial losses: one per row and slice ("views"), or per image and slice ("image")
    row_loss = _new_output((B if layout == "image" else n_student, splits), **f32)
    s_max = s_sum = row_loss  # unused when one program sees a whole row
    if splits > 1 or layout == "image":
        s_max = _new_output((n_student, splits), **f32)
        s_sum = _new_output((n_student, splits), **f32)
        _student_stats_kernel[grid](
            student_out, student_out.stride(0), s_max, s_sum, B, K, split_len,
            LOG2E / student_temp, NCROPS=ncrops, V_BLOCK=v_block, BLOCK_K=block_k,
            STAGES=stages, num_warps=warps,
        )
    common = dict(G=num_global_crops, G_P2=next_power_of_2(num_global_crops), BLOCK_K=block_k,
                  BLOCK_P=min(1024, next_power_of_2(max(n_tblocks, splits))),
                  WRITE_GRAD=compute_grad, STAGES=stages, num_warps=warps)
    args = (student_out, student_out.stride(0), teacher_out, teacher_out.stride(0), center,
            part_max, part_sum, s_max, s_sum, grad)
    scalars = (B, K, n_tblocks, split_len, LOG2E / student_temp, LOG2E / teacher_temp,
               scale / student_temp, scale * LN2)
    if layout == "image":
        _student_image_pass_kernel[(B, splits)](
            *args, row_loss, *scalars, NCROPS=ncrops, NCROPS_P2=next_power_of_2(ncrops),
            EVEN_K=K % block_k == 0, **common)
    else:
        _student_pass_kernel[(programs, splits)](
            *args, row_loss, *scalars, n_groups, NCROPS=ncrops, V_BLOCK=v_block,
            ONE_SPLIT=splits == 1, PERSISTENT=programs < n_groups, **common)
    loss = row_loss.sum()
    return loss, teacher_mean, grad


def _reference_forward(student_out, teacher_out, center, num_global_crops, student_temp,
                       teacher_temp, compute_grad):
    """CPU without the interpreter: the official math (no autograd runs inside a custom op)."""
    temps = dict(num_global_crops=num_global_crops, student_temp=student_temp,
                 teacher_temp=teacher_temp)
    loss, teacher_mean = dino_loss_reference(student_out, teacher_out, center, **temps)
    grad = dino_loss_student_grad(student_out, teacher_out, center, **temps) if compute_grad \
        else student_out.new_empty((0,))
    return loss, teacher_mean, grad


# ----------------------------------------------------------------------------- custom op


def _forward(student_out, teacher_out, center, num_global_crops, student_temp, teacher_temp,
             compute_grad):
    impl = _fused_forward if runs_triton(student_out) else _reference_forward
    return impl(student_out, teacher_out, center, num_global_crops, student_temp,
                teacher_temp, compute_grad)


def _scale_grad(x: torch.Tensor, g: torch.Tensor) -> None:
    """x *= g in place, where g is a 0-d tensor; no work when g == 1 (checked on the device)."""
    if runs_triton(x):
        # A grid of a few programs per multiprocessor: when g == 1 they only read g and exit.
        block = 4096
        grid = min(triton.cdiv(x.numel(), block), 8 * _multiprocessors(x.device))
        _scale_inplace_kernel[(max(1, grid),)](x, g, x.numel(), BLOCK=block)
    else:
        x.mul_(g.to(torch.float32))


# Two doors to the same implementation. Eager code takes a plain autograd.Function, which
# skips the dispatcher layers that a torch.library op adds to every call (measurable on a
# GPU whose step is short). torch.compile takes the custom ops below, so a model that
# calls the loss traces into one graph without a break.


class _DINOLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student_out, teacher_out, center, num_global_crops, student_temp,
                teacher_temp):
        loss, teacher_mean, grad = _forward(student_out, teacher_out, center, num_global_crops,
                                            student_temp, teacher_temp, True)
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(teacher_mean)
        return loss, teacher_mean

    @staticmethod
    def backward(ctx, grad_loss, grad_mean):
        (grad,) = ctx.saved_tensors
        _scale_grad(grad, grad_loss)
        return grad, None, None, None, None, None


@torch.library.custom_op("dinofuse::dino_loss_fwd", mutates_args=())
def _dino_loss_fwd(
    student_out: torch.Tensor, teacher_out: torch.Tensor, center: torch.Tensor,
    num_global_crops: int, student_temp: float, teacher_temp: float, compute_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _forward(student_out, teacher_out, center, num_global_crops, student_temp,
                    teacher_temp, compute_grad)


@_dino_loss_fwd.register_fake
def _(student_out, teacher_out, center, num_global_crops, student_temp, teacher_temp,
      compute_grad):
    K = student_out.shape[1]
    loss = student_out.new_empty((), dtype=torch.float32)
    mean = student_out.new_empty((K,), dtype=torch.float32)
    grad = torch.empty_like(student_out, memory_format=torch.contiguous_format) if compute_grad \
        else student_out.new_empty((0,))
    return loss, mean, grad


@torch.library.custom_op("dinofuse::scale_", mutates_args=("x",))
def _scale_(x: torch.Tensor, g: torch.Tensor) -> None:
    _scale_grad(x, g)


@_scale_.register_fake
def _(x, g):
    return None


def _setup_context(ctx, inputs, output):
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.save_for_backward(output[2])


def _backward(ctx, grad_loss, grad_mean, grad_grad):
    (grad,) = ctx.saved_tensors
    torch.ops.dinofuse.scale_(grad, grad_loss)
    return grad, None, None, None, None, None, None


_dino_loss_fwd.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- public API


def _validate(student_out, teacher_out, center, num_global_crops):
    for name, t in (("student_out", student_out), ("teacher_out", teacher_out)):
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D (rows, K); got shape {tuple(t.shape)}")
        check_float(name, t)
        if t.shape[0] == 0 or t.shape[1] == 0:
            raise ValueError(f"{name} is empty: shape {tuple(t.shape)}")
    check_float("center", center, (torch.float32,))
    K = student_out.shape[1]
    if teacher_out.shape[1] != K:
        raise ValueError(f"student_out has K={K} columns but teacher_out has {teacher_out.shape[1]}")
    if center.numel() != K or center.dim() > 2 or (center.dim() == 2 and center.shape[0] != 1):
        raise ValueError(f"center must have shape ({K},) or (1, {K}); got {tuple(center.shape)}")
    if num_global_crops < 1:
        raise ValueError(f"num_global_crops must be >= 1; got {num_global_crops}")
    n_teacher, n_student = teacher_out.shape[0], student_out.shape[0]
    if n_teacher % num_global_crops:
        raise ValueError(f"teacher_out has {n_teacher} rows, not a multiple of "
                         f"num_global_crops={num_global_crops}")
    B = n_teacher // num_global_crops
    if n_student % B:
        raise ValueError(f"student_out has {n_student} rows, not a multiple of the batch size "
                         f"B={B} (teacher_out rows / num_global_crops)")
    ncrops = n_student // B
    if ncrops < num_global_crops or pair_count(ncrops, num_global_crops) == 0:
        raise ValueError(f"student_out holds {ncrops} crops of B={B}; it needs at least "
                         f"num_global_crops={num_global_crops} and at least one pair of "
                         f"different views")
    devices = {student_out.device, teacher_out.device, center.device}
    if len(devices) != 1:
        raise ValueError(f"inputs are on different devices: {sorted(map(str, devices))}")


def _unit_stride_columns(t: torch.Tensor) -> torch.Tensor:
    # The kernels take any row stride; columns must be adjacent. Other layouts are copied once.
    return t if t.stride(1) == 1 else t.contiguous()


def dino_loss(
    student_out: torch.Tensor,
    teacher_out: torch.Tensor,
    center: torch.Tensor,
    *,
    num_global_crops: int = 2,
    student_temp: float = 0.1,
    teacher_temp: float = 0.04,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused DINO loss. Returns (loss, teacher_mean), both float32.

    student_out: (ncrops*B, K), crops stacked crop-major, global crops first.
    teacher_out: (num_global_crops*B, K); no gradient flows into it.
    center: (K,) or (1, K) float32.
    teacher_mean is the batch mean of teacher_out's rows (before any all-reduce).
    """
    _validate(student_out, teacher_out, center, num_global_crops)
    if student_temp <= 0 or teacher_temp <= 0:
        raise ValueError(f"temperatures must be > 0; got student_temp={student_temp}, "
                         f"teacher_temp={teacher_temp}")
    compute_grad = torch.is_grad_enabled() and student_out.requires_grad
    args = (_unit_stride_columns(student_out), _unit_stride_columns(teacher_out.detach()),
            center.detach().reshape(-1),  # a view whenever the layout allows
            num_global_crops, float(student_temp), float(teacher_temp))
    if torch.compiler.is_compiling():
        loss, teacher_mean, _ = _dino_loss_fwd(*args, compute_grad)
    elif compute_grad:
        loss, teacher_mean = _DINOLossFunction.apply(*args)
    else:
        loss, teacher_mean, _ = _forward(*args, False)
    return loss, teacher_mean


class CenteredDINOLoss(nn.Module):
    """The center buffer and its EMA, shared by `DINOLoss` and the adapters in `compat`.

    The center statistic is all-reduced asynchronously when torch.distributed is initialized
    with more than one process; the update lands before the center's next use (the next
    forward, `state_dict`, or an explicit `apply_center_update()`), so the loss sequence is
    the one of a blocking all-reduce.
    """

    def __init__(self, center_shape: tuple[int, ...], center_momentum: float):
        super().__init__()
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(center_shape))
        self._pending_center = None  # (all-reduce work handle, summed teacher means)
        # the batch center is copied here first: at a fixed address, the EMA's cached launch
        # plan serves every step (a new plan would copy its table to the device: a sync)
        self._batch_center: torch.Tensor | None = None

    def centered_loss(self, student_out: torch.Tensor, teacher_out: torch.Tensor, *,
                      num_global_crops: int, student_temp: float, teacher_temp: float):
        """The fused loss against the current center, then the center's update."""
        self.apply_center_update()
        loss, teacher_mean = dino_loss(
            student_out, teacher_out, self.center.view(-1), num_global_crops=num_global_crops,
            student_temp=student_temp, teacher_temp=teacher_temp)
        self.update_center(teacher_mean)
        return loss

    @torch.no_grad()
    def update_center(self, teacher_mean: torch.Tensor) -> None:
        """Start the center EMA with this step's local teacher mean."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            work = dist.all_reduce(teacher_mean, async_op=True)
            self._pending_center = (work, teacher_mean)
        else:
            self._ema_center(teacher_mean)

    @torch.no_grad()
    def apply_center_update(self) -> None:
        """Wait for a pending all-reduce of the center statistic and apply the EMA."""
        if self._pending_center is None:
            return
        work, summed = self._pending_center
        self._pending_center = None
        work.wait()
        self._ema_center(summed / dist.get_world_size())

    def _ema_center(self, batch_center: torch.Tensor) -> None:
        buf = self._batch_center
        if buf is None or buf.shape != self.center.shape or buf.device != self.center.device:
            buf = self._batch_center = torch.empty_like(self.center)
        buf.copy_(batch_center.reshape_as(self.center))
        ema_update_([self.center], [buf], self.center_momentum)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        self.apply_center_update()
        super()._save_to_state_dict(destination, prefix, keep_vars)


class DINOLoss(CenteredDINOLoss):
    """Drop-in for the official `DINOLoss` (same constructor and forward), fused."""

    def __init__(self, out_dim: int, ncrops: int, warmup_teacher_temp: float,
                 teacher_temp: float, warmup_teacher_temp_epochs: int, nepochs: int,
                 student_temp: float = 0.1, center_momentum: float = 0.9,
                 num_global_crops: int = 2):
        super().__init__((1, out_dim), center_momentum)
        self.out_dim = out_dim
        self.ncrops = ncrops
        self.num_global_crops = num_global_crops
        self.student_temp = student_temp
        self.teacher_temp_schedule = teacher_temp_schedule(
            warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, nepochs)

    def teacher_temp_at(self, epoch: int) -> float:
        if not 0 <= epoch < len(self.teacher_temp_schedule):
            raise IndexError(f"epoch {epoch} is outside the teacher temperature schedule "
                             f"(0..{len(self.teacher_temp_schedule) - 1}; nepochs too small?)")
        return self.teacher_temp_schedule[epoch]

    def forward(self, student_output: torch.Tensor, teacher_output: torch.Tensor,
                epoch: int) -> torch.Tensor:
        rows = student_output.shape[0]
        expected = self.ncrops * (teacher_output.shape[0] // self.num_global_crops)
        if rows != expected:
            raise ValueError(f"student_output has {rows} rows; ncrops={self.ncrops} with "
                             f"teacher_output's batch needs {expected}")
        return self.centered_loss(student_output, teacher_output,
                                  num_global_crops=self.num_global_crops,
                                  student_temp=self.student_temp,
                                  teacher_temp=self.teacher_temp_at(epoch))
