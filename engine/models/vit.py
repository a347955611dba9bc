"""Vision Transformer as DINO trains it, with timm's parameter names and building blocks.

- Parameter names are those of the official DINO ViT and timm's `VisionTransformer`
  (`cls_token`, `pos_embed`, `patch_embed.proj`, `blocks.i.{norm1,attn.qkv,attn.proj,norm2,
  mlp.fc1,mlp.fc2}`, `norm`), so state dicts move between the three unchanged.
- The position embedding is resized for other crop sizes with the official formula (bicubic,
  `scale_factor` with the +0.1 offset), which is what official weights expect.
- Attention backends: xformers' memory-efficient attention (CUDA), torch's
  `scaled_dot_product_attention`, and the official materialized softmax ("naive", also the
  only one that can return the attention map).
- Packed sequences: several images of different sizes in one token sequence, attention kept
  within each image (xformers `BlockDiagonalMask`; per-size groups for the other backends).
"""

from __future__ import annotations

import functools
import math
import os
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from timm.layers import DropPath as TimmDropPath
from timm.layers import Mlp as TimmMlp
from timm.layers import trunc_normal_
from timm.layers import PatchEmbed as TimmPatchEmbed
from torch import nn

from dinofuse.kernels.bias_gelu import bias_gelu
from dinofuse.kernels.layer_norm import FusedLayerNorm

ATTENTION_BACKENDS = ("auto", "xformers", "sdpa", "naive")
PATCH_EMBEDDINGS = ("matmul", "conv")
RESIDUAL_DTYPES = ("fp32", "autocast")
LAYER_NORM_KERNELS = ("auto", "fused", "torch")
BIAS_GELU_KERNELS = ("auto", "fused", "torch")

# Packed layout: ((count, length), ...): `count` consecutive sequences of `length` tokens each.
SeqLens = tuple[tuple[int, int], ...]


@functools.cache
def _xformers_ops():
    try:
        import xformers.ops as xops
    except Exception:  # not installed, or built for another torch: fall back
        return None
    return xops


@functools.cache
def xformers_problem() -> str | None:
    """Why xformers cannot run attention here, or None when it can. Importing is not enough:
    a wheel built for another torch imports but its compiled extension does not load, so try
    a tiny packed forward and backward. If that fails only for want of the extension,
    xformers' operators that run torch's own kernels are let through and tried again (see
    `enable_xformers_torch_kernels`; DINOFUSE_XFORMERS_TORCH_KERNELS=0 turns that off)."""
    ops = _xformers_ops()
    if ops is None:
        return "xformers is not importable"
    if not torch.cuda.is_available():
        return "no CUDA device"
    problem = _try_xformers(ops, torch.device("cuda"))
    if problem is not None and os.environ.get("DINOFUSE_XFORMERS_TORCH_KERNELS", "1") != "0" \
            and enable_xformers_torch_kernels():
        problem = _try_xformers(ops, torch.device("cuda"))
        if problem is not None:
            enable_xformers_torch_kernels(False)  # no help: leave xformers as it was
        else:
            warnings.warn("xformers' compiled extension was built for another torch and does not "
                          f"load under torch {torch.__version__}: attention runs through xformers' "
                          "operators on torch's own kernels (FlashAttention-2 / memory-efficient)",
                          stacklevel=2)
    return problem


def _try_xformers(ops, device: torch.device) -> str | None:
    """None if xformers runs a packed (block-diagonal) attention forward and backward here.
    (The first forward may come under no_grad or inference mode, e.g. the teacher's: the
    probe's backward must not fail for that.)"""
    try:
        with torch.inference_mode(False), torch.enable_grad():
            q = torch.zeros(1, 3, 2, 64, device=device, dtype=torch.float16, requires_grad=True)
            bias = ops.fmha.BlockDiagonalMask.from_seqlens([1, 2], device=device)
            ops.memory_efficient_attention(q, q, q, attn_bias=bias).sum().backward()
    except Exception as e:
        first_line = (str(e).strip().splitlines() or [""])[0]
        return f"xformers is installed but cannot run on this GPU ({type(e).__name__}: {first_line})"
    return None


def enable_xformers_torch_kernels(enabled: bool = True) -> bool:
    """xformers' wheels are built against one torch; under another, its compiled extension
    does not load and every operator reports "xFormers wasn't build with CUDA support", even
    the ones that only call torch's own kernels and need nothing from the extension (fa2F-pt
    and fa2B-pt: torch's FlashAttention-2; cutlassF-pt and cutlassB-pt: torch's
    memory-efficient attention). Lift that one gate (the extension's own operators stay out:
    their other checks still say they were not built; enabled=False puts the gate back).
    Returns whether anything changed."""
    try:
        from xformers import _cpp_lib
        from xformers.ops.fmha import common
    except Exception:
        return False
    if _cpp_lib._build_metadata is not None or getattr(common, "_built_with_cuda", enabled) == enabled:
        return False
    common._built_with_cuda = enabled
    return True


@functools.cache
def _warn_fallback(reason: str) -> None:
    warnings.warn(f"attention='auto' uses torch SDPA: {reason}", stacklevel=3)


def resolve_attention(requested: str, device: torch.device) -> str:
    """The backend that will run: "auto" is xformers on CUDA when it works, else SDPA."""
    if requested not in ATTENTION_BACKENDS:
        raise ValueError(f"attention must be one of {', '.join(ATTENTION_BACKENDS)}; got {requested!r}")
    if requested == "auto":
        if device.type != "cuda":
            return "sdpa"
        problem = xformers_problem()
        if problem is None:
            return "xformers"
        if _xformers_ops() is not None:  # installed but broken: say so once
            _warn_fallback(problem)
        return "sdpa"
    if requested == "xformers" and (device.type != "cuda" or xformers_problem() is not None):
        reason = "no CUDA device" if device.type != "cuda" else xformers_problem()
        raise ValueError(f"attention='xformers' cannot run: {reason}; use 'auto' to fall back "
                           "to torch SDPA")
    return requested


@functools.lru_cache(maxsize=64)
def _block_diagonal_mask(seqlens: SeqLens, device: torch.device):
    """Built once per layout and device (never inside a CUDA graph capture: the capture reuses
    the mask of the eager warm-up steps). The device is the inputs': xformers' default is
    the current CUDA device, not the one the tokens are on."""
    lengths = [length for count, length in seqlens for _ in range(count)]
    return _xformers_ops().fmha.BlockDiagonalMask.from_seqlens(lengths, device=device)


def _naive_attention(q, k, v, scale):
    """The official materialized attention. q, k, v: (B, H, N, d). Returns (out, attn)."""
    attn = (q * scale) @ k.transpose(-2, -1)
    attn = attn.softmax(dim=-1)
    return attn @ v, attn


def _grouped(fn, q, k, v, seqlens: SeqLens | None):
    """Run `fn` on (B, H, N, d) tensors, per image when the sequence is packed (B == 1)."""
    if seqlens is None:
        return fn(q, k, v)
    outs, start = [], 0
    H, d = q.shape[1], q.shape[3]
    for count, length in seqlens:
        end = start + count * length
        parts = [t[0, :, start:end].reshape(H, count, length, d).transpose(0, 1) for t in (q, k, v)]
        out = fn(*parts)  # (count, H, length, d)
        outs.append(out.transpose(0, 1).reshape(1, H, count * length, d))
        start = end
    return torch.cat(outs, dim=2)


class PatchEmbed(TimmPatchEmbed):
    """timm's patch embedding (the same `proj` convolution weights), computed by default as
    one matmul over the flattened patches: a convolution whose stride is its kernel is
    exactly that, and cuDNN's choice for it was a slow non-tensor-core kernel on an H200
    (4% of a ViT-S/16 step). `as_matmul=False` runs the convolution (the official way)."""

    as_matmul = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.as_matmul:
            return super().forward(x)
        B, C, H, W = x.shape
        ph, pw = self.patch_size
        if torch.is_autocast_enabled(x.device.type):  # copy the patches in the matmul's dtype
            x = x.to(torch.get_autocast_dtype(x.device.type))
        patches = (x.reshape(B, C, H // ph, ph, W // pw, pw).permute(0, 2, 4, 1, 3, 5)
                   .reshape(B, (H // ph) * (W // pw), C * ph * pw))
        weight = self.proj.weight.reshape(self.proj.out_channels, -1)  # (D, C*ph*pw), same order
        return self.norm(F.linear(patches, weight, self.proj.bias))


class LayerNorm(FusedLayerNorm):
    """nn.LayerNorm's parameters and math, run by torch's kernel or by ours
    (`dinofuse.kernels.layer_norm`: one pass each way, the output written in the dtype the
    next matmul reads). `kernel`: "auto" (ours on CUDA, not under torch.compile, whose own
    generated kernels fuse the norm with its neighbours), "fused" (ours wherever Triton runs),
    "torch". `feeds_matmul`: the output only feeds a linear layer, which under autocast casts
    it anyway, so ours writes that dtype at once. With `low_precision`, under autocast the
    norm runs in the autocast dtype (statistics in fp32) instead of autocast's fp32, which
    reads and writes twice the bytes and adds a cast before the next matmul."""

    low_precision = False
    feeds_matmul = False
    kernel = "auto"

    def runs_fused(self, x: torch.Tensor) -> bool:
        return self.kernel != "torch" and not torch.compiler.is_compiling() and (
            self.kernel == "fused" or x.device.type == "cuda")

    def add_forward(self, x: torch.Tensor, branch: torch.Tensor, scale: torch.Tensor | None):
        """(x + branch * scale[row], this norm of it) in one pass of our kernel each way (a
        residual add and the norm after it: the sum is read once, and in backward the
        stream's gradient and the branch's come out of the norm's pass)."""
        return self.fused_add_forward(x, branch, scale, self.feeds_matmul or self.low_precision)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device = x.device.type
        if self.runs_fused(x):
            return self.fused_forward(x, self.feeds_matmul or self.low_precision)
        if not (self.low_precision and torch.is_autocast_enabled(device)):
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        dtype = torch.get_autocast_dtype(device)
        with torch.autocast(device, enabled=False):
            return F.layer_norm(x.to(dtype), self.normalized_shape, self.weight.to(dtype),
                                self.bias.to(dtype), self.eps)


def split_qkv(qkv: torch.Tensor, num_heads: int):
    """q, k, v as (B, N, H, d) views of the qkv projection's (B, N, 3 * H * d) output.

    In backward, unbind's stack of the three gradients lands in the qkv layout at once. The
    official `permute(2, 0, 3, 1, 4).unbind(0)` gives the same views, but its backward stacks
    into (3, B, H, N, d) and then copies that once more into the qkv layout (a profiled
    ViT-S/16 step on an H200 spent 4% of its time in that stack alone).
    """
    B, N, C3 = qkv.shape
    return qkv.reshape(B, N, 3, num_heads, C3 // (3 * num_heads)).unbind(2)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, backend: str = "auto"):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed dim {dim} is not divisible by {num_heads} heads")
        if backend not in ATTENTION_BACKENDS:  # whether it can run is decided at forward
            raise ValueError(f"attention must be one of {', '.join(ATTENTION_BACKENDS)}; "
                             f"got {backend!r}")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.backend = backend
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, seqlens: SeqLens | None = None,
                return_attention: bool = False):
        B, N, C = x.shape
        q, k, v = split_qkv(self.qkv(x), self.num_heads)
        if return_attention:
            backend = "naive"
        elif self.backend != "auto" and torch.compiler.is_compiling():
            # checked in eager runs; traced, the check's cached probe of xformers would be
            # traced too (H200, acd9a6a: a graph break in every compiled block)
            backend = self.backend
        else:
            backend = resolve_attention(self.backend, x.device)
        attn = None
        if backend == "xformers":  # (B, N, H, d) layout, block-diagonal bias when packed
            bias = _block_diagonal_mask(seqlens, x.device) if seqlens is not None else None
            out = _xformers_ops().memory_efficient_attention(q, k, v, attn_bias=bias, scale=self.scale)
        else:
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, N, d)
            if backend == "naive" and seqlens is None:
                out, attn = _naive_attention(q, k, v, self.scale)
            elif backend == "naive":
                if return_attention:
                    raise ValueError("attention maps are returned for unpacked inputs only")
                out = _grouped(lambda *t: _naive_attention(*t, self.scale)[0], q, k, v, seqlens)
            else:
                out = _grouped(lambda *t: F.scaled_dot_product_attention(*t, scale=self.scale),
                               q, k, v, seqlens)
            out = out.transpose(1, 2)
        return self.proj(out.reshape(B, N, C)), attn


class Mlp(TimmMlp):
    """timm's MLP (fc1, GELU, fc2: the official names). `kernel` "auto" (ours on CUDA),
    "fused", "torch": ours runs fc1 without its bias and adds it in
    `dinofuse.kernels.bias_gelu` with the GELU, whose backward sums the bias gradient in
    the same pass (no column reduction over fc1's whole output gradient). Under
    torch.compile that op is torch's math, which Inductor fuses itself."""

    kernel = "auto"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel == "torch" or (self.kernel == "auto" and x.device.type != "cuda"):
            return super().forward(x)
        a = F.linear(x, self.fc1.weight)  # under autocast: the autocast dtype
        with torch.autocast(x.device.type, enabled=False):
            h = bias_gelu(a, self.fc1.bias, a.dtype)
        return self.fc2(h)


class DropPath(TimmDropPath):
    """timm's stochastic depth: a whole sample's branch dropped, the kept ones scaled by
    1/keep. Eager runs of unpacked batches are timm's, draws included.

    Packed sequences (`seqlens`): the batch is one sequence of many images, so one draw per
    image, spread over its tokens (a draw per packed sequence would drop every image's branch
    at once, which is not the official regularization).

    Under torch.compile the keep probability is read from a buffer: dynamo guards on a float
    attribute's value, so twelve blocks with twelve rates compiled twelve times over, hit its
    recompile limit after eight and ran the rest eagerly (H200, acd9a6a). With the rate a
    tensor the blocks share one graph."""

    def __init__(self, drop_prob: float):
        super().__init__(drop_prob)
        self.register_buffer("keep_prob", torch.tensor(1.0 - drop_prob), persistent=False)

    def forward(self, x: torch.Tensor, seqlens: SeqLens | None = None) -> torch.Tensor:
        compiling = torch.compiler.is_compiling()
        if seqlens is None and not compiling:
            return super().forward(x)
        if not self.training or (not compiling and self.drop_prob == 0.0):
            return x
        return x * self._factors(x, seqlens, compiling)

    def row_scales(self, x: torch.Tensor, seqlens: SeqLens | None = None) -> torch.Tensor | None:
        """The factors this forward would multiply x by, one per token row (fp32; for
        `add_layer_norm`), drawn as the forward draws them; None when nothing is dropped."""
        if not self.training or self.drop_prob == 0.0:
            return None
        factors = self._factors(x, seqlens, compiling=False)
        return factors.expand(*x.shape[:-1], 1).reshape(-1).float()

    def _factors(self, x: torch.Tensor, seqlens: SeqLens | None, compiling: bool) -> torch.Tensor:
        """0 or 1/keep per image, shaped to multiply x: (B, 1, ..) or, packed, (1, tokens, 1)."""
        if seqlens is None:
            return self._scales((x.shape[0],) + (1,) * (x.ndim - 1), x, compiling)
        counts = [count for count, _ in seqlens]
        scales = self._scales((sum(counts),), x, compiling).split(counts)
        per_token = torch.cat([s[:, None].expand(count, length).reshape(-1)
                               for s, (count, length) in zip(scales, seqlens)])
        return per_token.view(1, -1, *(1,) * (x.ndim - 2))

    def _scales(self, shape, x: torch.Tensor, compiling: bool) -> torch.Tensor:
        """One draw per sample: 1/keep where kept, 0 where dropped (timm's formula)."""
        if compiling:
            keep = self.keep_prob.to(x.dtype)
            return (torch.rand(shape, device=x.device) < self.keep_prob).to(x.dtype) / keep
        keep = 1.0 - self.drop_prob
        kept = x.new_empty(shape).bernoulli_(keep)
        return kept.div_(keep) if keep > 0.0 and self.scale_by_keep else kept


class Block(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=True, drop_path=0.0,
                 attention="auto"):
        super().__init__()
        self.norm1 = LayerNorm(dim, eps=1e-6)
        self.norm1.feeds_matmul = True  # the qkv projection
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, backend=attention)
        self.drop_path = DropPath(drop_path)  # at 0 too (eager: x itself), one type for compile
        self.norm2 = LayerNorm(dim, eps=1e-6)
        self.norm2.feeds_matmul = True  # the MLP's first layer
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)

    def forward(self, x, seqlens: SeqLens | None = None, return_attention: bool = False,
                branch: torch.Tensor | None = None, branch_scale: torch.Tensor | None = None,
                chain: bool = False):
        """(x after the block, its attention map when `return_attention`, else None).

        chain=True, where our norms run (`VisionTransformer.forward_tokens`): both residual
        adds happen inside norm kernels. x is then the stream before this block less the
        previous block's MLP branch (`branch`, times drop path's `branch_scale` per row),
        which norm1's kernel adds; the result is (the stream after this block's attention
        residual, this block's MLP branch, its factors) for the next norm to add. A keyword
        of forward, not a method of its own: FSDP2's and torch.compile's hooks run on calls."""
        if chain and branch is not None:
            x, h = self.norm1.add_forward(x, branch, branch_scale)
        else:
            h = self.norm1(x)
        y, attn = self.attn(h, seqlens, return_attention)
        if self.norm2.runs_fused(x):  # the residual add inside the norm's kernel
            x, h = self.norm2.add_forward(x, y, self.drop_path.row_scales(y, seqlens))
        else:
            x = x + self.drop_path(y, seqlens)  # per image, packed or not
            h = self.norm2(x)
        z = self.mlp(h)
        if chain:
            return x, z, self.drop_path.row_scales(z, seqlens)
        return x + self.drop_path(z, seqlens), attn


class VisionTransformer(nn.Module):
    """DINO's ViT: the output is the CLS token after the final LayerNorm."""

    checkpoint_blocks = 0  # activation checkpointing of the first N blocks, -1 = all (trainer)

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3,
                 embed_dim: int = 768, depth: int = 12, num_heads: int = 12,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, drop_path_rate: float = 0.0,
                 attention: str = "auto", patch_embedding: str = "matmul",
                 residual_dtype: str = "fp32", layer_norm: str = "auto", bias_gelu: str = "auto"):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not divisible by patch_size {patch_size}")
        for name, value, choices in (("patch_embedding", patch_embedding, PATCH_EMBEDDINGS),
                                     ("residual_dtype", residual_dtype, RESIDUAL_DTYPES),
                                     ("layer_norm", layer_norm, LAYER_NORM_KERNELS),
                                     ("bias_gelu", bias_gelu, BIAS_GELU_KERNELS)):
            if value not in choices:
                raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")
        self.patch_size = patch_size
        # Under autocast the official residual stream is fp32 (the position embedding is) and
        # autocast runs LayerNorm in fp32; "autocast" keeps both in the autocast dtype, as
        # FSDP2's bf16 parameters (DINOv2's setup) do for the stream.
        self.residual_dtype = residual_dtype
        self.embed_dim = self.num_features = embed_dim
        self.patch_embed = PatchEmbed(img_size=img_size, patch_size=patch_size, in_chans=in_chans,
                                      embed_dim=embed_dim, strict_img_size=False)
        self.patch_embed.as_matmul = patch_embedding == "matmul"
        num_patches = (img_size // patch_size) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
        rates = torch.linspace(0, drop_path_rate, depth).tolist()  # stochastic depth rises with depth
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, rates[i], attention) for i in range(depth))
        self.norm = LayerNorm(embed_dim, eps=1e-6)
        for m in self.modules():
            if isinstance(m, LayerNorm):
                m.low_precision = residual_dtype == "autocast"
                m.kernel = layer_norm
            elif isinstance(m, Mlp):
                m.kernel = bias_gelu
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        self.apply(_init_weights)

    @property
    def attention(self) -> str:
        return self.blocks[0].attn.backend

    def fix_attention_backend(self, device: torch.device) -> str:
        """Decide "auto" once for `device` and store the result in every block, so that the
        forward has no choice left to make (torch.compile then traces no probing code)."""
        backend = resolve_attention(self.attention, device)
        for block in self.blocks:
            block.attn.backend = backend
        return backend

    def interpolate_pos_encoding(self, height: int, width: int) -> torch.Tensor:
        """Position embedding for an image of height x width pixels (official formula)."""
        rows, cols = height // self.patch_size, width // self.patch_size
        if rows * cols == self.pos_embed.shape[1] - 1 and rows == cols:
            return self.pos_embed
        return resize_pos_embed(self.pos_embed, rows, cols)

    def prepare_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> tokens (B, 1 + patches, D) with CLS and position."""
        if x.dim() != 4:
            raise ValueError(f"expected images of shape (B, C, H, W); got {tuple(x.shape)}")
        B, _, H, W = x.shape
        if H % self.patch_size or W % self.patch_size:
            raise ValueError(f"crop size {H}x{W} is not divisible by the patch size {self.patch_size}")
        tokens = self.patch_embed(x)
        tokens = torch.cat((self.cls_token.expand(B, -1, -1), tokens), dim=1)
        tokens = tokens + self.interpolate_pos_encoding(H, W)
        if self.residual_dtype == "autocast" and torch.is_autocast_enabled(x.device.type):
            tokens = tokens.to(torch.get_autocast_dtype(x.device.type))
        return tokens

    def forward_tokens(self, tokens: torch.Tensor, seqlens: SeqLens | None = None) -> torch.Tensor:
        n = self.checkpoint_blocks
        recomputed = (len(self.blocks) if n < 0 else n) if torch.is_grad_enabled() else 0
        if self.norm.runs_fused(tokens) and len(self.blocks):
            return self._forward_tokens_chained(tokens, seqlens, recomputed)
        for i, block in enumerate(self.blocks):
            if i < recomputed:  # keep only the block's input; recompute the rest in backward
                tokens, _ = torch.utils.checkpoint.checkpoint(block, tokens, seqlens,
                                                              use_reentrant=False)
            else:
                tokens, _ = block(tokens, seqlens)
        return self.norm(tokens)

    def _forward_tokens_chained(self, tokens, seqlens, recomputed: int) -> torch.Tensor:
        """The blocks with every residual add inside our norm kernels: each block's MLP
        branch is added by the next block's norm1 (the last by the final norm)."""
        branch = scale = None
        for i, block in enumerate(self.blocks):
            if i < recomputed:  # keep only the block's inputs; recompute the rest in backward
                tokens, branch, scale = torch.utils.checkpoint.checkpoint(
                    block, tokens, seqlens, False, branch, scale, True, use_reentrant=False)
            else:
                tokens, branch, scale = block(tokens, seqlens, branch=branch, branch_scale=scale,
                                              chain=True)
        return self.norm.add_forward(tokens, branch, scale)[1]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """All tokens after the final norm: (B, 1 + patches, D)."""
        return self.forward_tokens(self.prepare_tokens(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)[:, 0]

    def get_intermediate_layers(self, x: torch.Tensor, n: int = 1) -> list[torch.Tensor]:
        """The tokens after each of the last `n` blocks, each through the final norm (the
        official method of the same name; the linear evaluation reads their CLS tokens)."""
        if not 1 <= n <= len(self.blocks):
            raise ValueError(f"n must be in 1..{len(self.blocks)} (the depth); got {n}")
        tokens, outputs = self.prepare_tokens(x), []
        for i, block in enumerate(self.blocks):
            tokens, _ = block(tokens)
            if i >= len(self.blocks) - n:
                outputs.append(self.norm(tokens))
        return outputs

    def forward_packed(self, groups: Sequence[torch.Tensor]) -> torch.Tensor:
        """CLS outputs of several image batches of different sizes, run as one sequence.

        `groups` are (n_i, C, H_i, W_i) batches; the result is (sum n_i, D) in that order,
        equal to concatenating `forward(g)` for each group.
        """
        tokens = [self.prepare_tokens(g) for g in groups]
        seqlens = tuple((t.shape[0], t.shape[1]) for t in tokens)
        packed = torch.cat([t.reshape(1, -1, t.shape[-1]) for t in tokens], dim=1)
        out = self.forward_tokens(packed, seqlens)[0]
        cls_index, start = [], 0
        for count, length in seqlens:
            cls_index.append(torch.arange(count, device=out.device) * length + start)
            start += count * length
        return out[torch.cat(cls_index)]

    @torch.no_grad()
    def get_last_selfattention(self, x: torch.Tensor) -> torch.Tensor:
        """Attention of the last block, (B, heads, tokens, tokens), materialized."""
        tokens = self.prepare_tokens(x)
        for block in self.blocks[:-1]:
            tokens, _ = block(tokens)
        _, attn = self.blocks[-1](tokens, return_attention=True)
        return attn


def resize_pos_embed(pos_embed: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """A (1, 1 + side^2, D) position embedding (CLS first) resized to a rows x cols patch
    grid as the official ViT's forward does: bicubic, scale factors (count + 0.1) / side."""
    side = math.isqrt(pos_embed.shape[1] - 1)
    grid = pos_embed[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
    # +0.1 keeps floor(side * factor) from rounding below the wanted count
    grid = F.interpolate(grid.float(), scale_factor=((rows + 0.1) / side, (cols + 0.1) / side),
                         mode="bicubic")
    if grid.shape[-2:] != (rows, cols):
        raise RuntimeError(f"position-embedding resize gave {tuple(grid.shape[-2:])}, "
                           f"wanted {(rows, cols)}")
    grid = grid.to(pos_embed.dtype).permute(0, 2, 3, 1).reshape(1, rows * cols, -1)
    return torch.cat((pos_embed[:, :1], grid), dim=1)


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


ARCHS = {
    "vit_tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "vit_small": dict(embed_dim=384, depth=12, num_heads=6),
    "vit_base": dict(embed_dim=768, depth=12, num_heads=12),
    "vit_large": dict(embed_dim=1024, depth=24, num_heads=16),
}


def build_vit(arch: str, patch_size: int = 16, **kwargs) -> VisionTransformer:
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHS)}")
    return VisionTransformer(patch_size=patch_size, **{**ARCHS[arch], **kwargs})


def vit_tiny(patch_size: int = 16, **kwargs) -> VisionTransformer:
    return build_vit("vit_tiny", patch_size, **kwargs)


def vit_small(patch_size: int = 16, **kwargs) -> VisionTransformer:
    return build_vit("vit_small", patch_size, **kwargs)


def vit_base(patch_size: int = 16, **kwargs) -> VisionTransformer:
    return build_vit("vit_base", patch_size, **kwargs)


def vit_large(patch_size: int = 16, **kwargs) -> VisionTransformer:
    return build_vit("vit_large", patch_size, **kwargs)
