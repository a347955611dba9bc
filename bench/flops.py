"""Model FLOPs of a DINO training step, counted by hand from the architecture.

Matrix products only (2 FLOPs per multiply-add), the convention of MFU figures: patch
embedding, q/k/v and output projections, the two attention products, the MLP, and the head.
Norms, softmax and activations are left out. Backward counts twice the forward. Per image:
the student runs forward + backward on every crop, the teacher forward on the global crops.
Packing the crops into one sequence changes none of this (attention stays per image).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ViTShape:
    embed_dim: int
    depth: int
    patch_size: int
    in_chans: int = 3
    mlp_ratio: float = 4.0


@dataclass(frozen=True)
class HeadShape:
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    out_dim: int = 65536
    nlayers: int = 3


def vit_forward_flops(vit: ViTShape, crop_size: int) -> int:
    """Forward FLOPs of one crop through the backbone (square crop)."""
    patches = (crop_size // vit.patch_size) ** 2
    n, d = patches + 1, vit.embed_dim  # tokens: patches + CLS
    hidden = int(d * vit.mlp_ratio)
    patch_embed = 2 * patches * (vit.in_chans * vit.patch_size ** 2) * d
    per_block = (2 * n * d * 3 * d  # qkv
                 + 2 * n * n * d  # q @ k^T, all heads together
                 + 2 * n * n * d  # attention @ v
                 + 2 * n * d * d  # output projection
                 + 2 * n * d * hidden * 2)  # MLP fc1 + fc2
    return patch_embed + vit.depth * per_block


def head_forward_flops(in_dim: int, head: HeadShape) -> int:
    """Forward FLOPs of the DINO head on one CLS feature."""
    if head.nlayers == 1:
        mlp = in_dim * head.bottleneck_dim
    else:
        mlp = (in_dim * head.hidden_dim + head.hidden_dim ** 2 * (head.nlayers - 2)
               + head.hidden_dim * head.bottleneck_dim)
    return 2 * (mlp + head.bottleneck_dim * head.out_dim)


def dino_step_flops(vit: ViTShape, head: HeadShape, *, batch: int, global_size: int = 224,
                    local_size: int = 96, local_crops: int = 10, global_crops: int = 2) -> dict:
    """FLOPs of one training step: student forward+backward on all crops, teacher forward on
    the global crops. Returns the parts and the total."""
    head_f = head_forward_flops(vit.embed_dim, head)
    glob = vit_forward_flops(vit, global_size) + head_f
    local = vit_forward_flops(vit, local_size) + head_f
    student_forward = batch * (global_crops * glob + local_crops * local)
    teacher_forward = batch * global_crops * glob
    parts = {"student_forward": student_forward, "student_backward": 2 * student_forward,
             "teacher_forward": teacher_forward}
    parts["total"] = sum(parts.values())
    return parts
