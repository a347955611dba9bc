"""Benchmark cases shared by the kernel benchmark script and its pytest-benchmark twin.

Each case builds fresh random inputs and returns the callables that compete on them, so
every variant runs on the same data in the same process.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

import torch.nn.functional as F

from dinofuse.kernels import (
    EMAPlan,
    dino_loss,
    dino_loss_reference,
    ema_reference_,
    add_layer_norm,
    ema_update_,
    layer_norm,
)

OUT_DIM = 65536
NCROPS = 10
NUM_GLOBAL = 2


# ----------------------------------------------------------------------------- loss


@dataclass
class LossCase:
    batch: int
    dtype: torch.dtype
    K: int = OUT_DIM
    ncrops: int = NCROPS

    @property
    def name(self) -> str:
        return f"loss B={self.batch} K={self.K} crops={self.ncrops} {str(self.dtype)[6:]}"

    def floor_bytes(self) -> int:
        """Read student and teacher once, write the gradient once."""
        item = torch.empty((), dtype=self.dtype).element_size()
        student = self.ncrops * self.batch * self.K * item
        teacher = NUM_GLOBAL * self.batch * self.K * item
        return 2 * student + teacher

    def inputs(self, device):
        s = (torch.randn(self.ncrops * self.batch, self.K, device=device) * 4).to(self.dtype)
        t = (torch.randn(NUM_GLOBAL * self.batch, self.K, device=device) * 0.2).to(self.dtype)
        c = torch.randn(self.K, device=device) * 0.05
        return s.requires_grad_(), t, c


def official_loss(s, t, c):
    return dino_loss_reference(s, t, c, num_global_crops=NUM_GLOBAL)[0]


def fused_loss(s, t, c):
    return dino_loss(s, t, c, num_global_crops=NUM_GLOBAL)[0]


def loss_step(loss_fn) -> Callable:
    """Forward and backward, leaving the gradient in s.grad (cleared first)."""

    def step(s, t, c):
        s.grad = None
        loss_fn(s, t, c).backward()

    return step


# ----------------------------------------------------------------------------- EMA


def vit_param_shapes(dim: int, depth: int = 12, patch: int = 16, tokens: int = 197):
    """Parameter shapes of a timm/DINO ViT, in its named order."""
    shapes = [(1, 1, dim), (1, tokens, dim), (dim, 3, patch, patch), (dim,)]
    for _ in range(depth):
        shapes += [(dim,), (dim,), (3 * dim, dim), (3 * dim,), (dim, dim), (dim,),
                   (dim,), (dim,), (4 * dim, dim), (4 * dim,), (dim, 4 * dim), (dim,)]
    return shapes + [(dim,), (dim,)]


def dino_head_param_shapes(in_dim: int, out_dim: int = OUT_DIM, hidden: int = 2048,
                           bottleneck: int = 256):
    return [(hidden, in_dim), (hidden,), (hidden, hidden), (hidden,), (bottleneck, hidden),
            (bottleneck,), (out_dim, bottleneck), (out_dim, 1)]  # weight_v, weight_g


EMA_MODELS = {
    "vit_small16+head": vit_param_shapes(384) + dino_head_param_shapes(384),
    "vit_base16+head": vit_param_shapes(768) + dino_head_param_shapes(768),
}


@dataclass
class EmaCase:
    model: str
    student_dtype: torch.dtype = torch.float32

    @property
    def name(self) -> str:
        return f"ema {self.model} student {str(self.student_dtype)[6:]}"

    def numel(self) -> int:
        return sum(torch.Size(s).numel() for s in EMA_MODELS[self.model])

    def floor_bytes(self) -> int:
        """Read teacher and student once, write the teacher once."""
        s_item = torch.empty((), dtype=self.student_dtype).element_size()
        return self.numel() * (4 + s_item + 4)

    def inputs(self, device):
        shapes = EMA_MODELS[self.model]
        teacher = [torch.randn(s, device=device) for s in shapes]
        student = [torch.randn(s, device=device).to(self.student_dtype) for s in shapes]
        return teacher, student

    def variants(self, teacher, student, device) -> dict[str, Callable]:
        m = 0.996
        m_dev = torch.tensor(m, device=device)
        plan = EMAPlan(teacher, student) if device.type == "cuda" else None
        out = {
            "fused": lambda T, S: ema_update_(T, S, m),
            "fused (momentum tensor)": lambda T, S: ema_update_(T, S, m_dev),
            "fused (prepared EMAPlan)": lambda T, S: plan(m),
            "official per-param loop": lambda T, S: ema_reference_(T, S, m),
        }
        if self.student_dtype == torch.float32:  # torch's foreach ops want one dtype
            out["_foreach_mul_+_foreach_add_"] = _foreach_mul_add
            out["_foreach_lerp_"] = lambda T, S: torch._foreach_lerp_(T, S, 1 - m)
        return out


def _foreach_mul_add(T, S, m=0.996):
    torch._foreach_mul_(T, m)
    torch._foreach_add_(T, S, alpha=1 - m)


# ----------------------------------------------------------------------------- LayerNorm


@dataclass
class LayerNormCase:
    """A ViT's LayerNorm over a step's tokens (ViT-S/16, batch 64, 2x224 + 10x96 crops: 64 x
    764 tokens), forward and backward; under autocast the fp32 residual stream in, bf16 out.
    `residual`: a block's residual add before its second norm (s = x + branch * drop path's
    factor per row, then the norm of s; a bf16 branch, as the attention's projection gives)."""

    dim: int
    dtype: torch.dtype = torch.float32
    out_dtype: torch.dtype = torch.bfloat16
    rows: int = 64 * (2 * 197 + 10 * 37)
    residual: bool = False

    @property
    def name(self) -> str:
        return (f"layer_norm{' + residual add' if self.residual else ''} rows={self.rows} "
                f"D={self.dim} {str(self.dtype)[6:]}->{str(self.out_dtype)[6:]}")

    def floor_bytes(self) -> int:
        """Forward: read x, write y; backward: read x and dy, write dx (and 8 bytes of
        statistics per row each way). With the residual add also: read the branch and write
        s forward; read ds and write the branch's gradient backward."""
        x = torch.empty((), dtype=self.dtype).element_size()
        y = torch.empty((), dtype=self.out_dtype).element_size()
        extra = 2 * (x + 2) if self.residual else 0  # a bf16 branch
        return self.rows * (self.dim * (3 * x + 2 * y + extra) + 16)

    def inputs(self, device):
        """(arguments, output gradients) of one call."""
        def randn(dtype, scale=1.0, shift=0.0):
            return (torch.randn(self.rows, self.dim, device=device) * scale + shift).to(dtype)

        x = randn(self.dtype, 2, 0.5).requires_grad_()
        w = (torch.randn(self.dim, device=device) + 1).requires_grad_()
        b = torch.randn(self.dim, device=device).requires_grad_()
        dy = randn(self.out_dtype)
        if not self.residual:
            return (x, w, b), (dy,)
        branch = randn(torch.bfloat16).requires_grad_()
        keep = 0.9  # drop path's factors at ViT-S's last-block rate, one per row here
        scale = (torch.rand(self.rows, device=device) < keep).float() / keep
        return (x, branch, scale, w, b), (randn(self.dtype), dy)

    def variants(self) -> dict[str, Callable]:
        out_dtype = self.out_dtype

        def torch_autocast(x, w, b):  # autocast's LayerNorm in fp32, then the matmul's cast
            return F.layer_norm(x.float(), (x.shape[-1],), w, b, 1e-6).to(out_dtype)

        def torch_add(x, branch, scale, w, b):  # x + drop_path(branch), then the norm
            s = x + branch * scale[:, None].to(branch.dtype)
            return s, torch_autocast(s, w, b)

        if self.residual:
            return {"fused": lambda x, r, scale, w, b: add_layer_norm(x, r, w, b, 1e-6, out_dtype, scale),
                    "torch (autocast's way)": torch_add,
                    "torch.compile(torch)": torch.compile(torch_add, dynamic=False)}
        return {"fused": lambda x, w, b: layer_norm(x, w, b, 1e-6, out_dtype),
                "torch (autocast's way)": torch_autocast,
                "torch.compile(torch)": torch.compile(torch_autocast, dynamic=False)}


def layer_norm_step(fn) -> Callable:
    """Forward and backward of `fn(*args)` with the given output gradients."""
    def step(args, grads):
        for t in args:
            t.grad = None
        outs = fn(*args)
        torch.autograd.backward(outs if isinstance(outs, tuple) else (outs,), grads)

    return step
