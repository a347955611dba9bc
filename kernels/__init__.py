"""Fused DINO ops: the loss with teacher centering, the teacher EMA, and the ViT's LayerNorm
(with its residual adds) and MLP bias + GELU.

CUDA tensors run the Triton kernels; CPU tensors run the same kernels under
TRITON_INTERPRET=1 (set before import), and the official math in plain PyTorch otherwise.
"""

from dinofuse.kernels.bias_gelu import bias_gelu
from dinofuse.kernels.dino_loss import DINOLoss, dino_loss
from dinofuse.kernels.ema import EMAPlan, ema_update_
from dinofuse.kernels.layer_norm import FusedLayerNorm, add_layer_norm, layer_norm
from dinofuse.kernels.reference import dino_loss_reference, ema_reference_, teacher_temp_schedule

__all__ = [
    "DINOLoss",
    "EMAPlan",
    "FusedLayerNorm",
    "add_layer_norm",
    "bias_gelu",
    "dino_loss",
    "dino_loss_reference",
    "ema_reference_",
    "ema_update_",
    "layer_norm",
    "teacher_temp_schedule",
]
