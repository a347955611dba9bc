"""Models: the ViT backbone, the DINO head and the multi-crop wrapper."""

from dinofuse.engine.models.head import DINOHead, WeightNormLinear, cancel_last_layer_gradients
from dinofuse.engine.models.multicrop import MultiCropWrapper, resolution_groups
from dinofuse.engine.models.vit import (
    ARCHS,
    ATTENTION_BACKENDS,
    VisionTransformer,
    build_vit,
    resolve_attention,
    vit_base,
    vit_large,
    vit_small,
    vit_tiny,
)

__all__ = [
    "ARCHS", "ATTENTION_BACKENDS", "DINOHead", "MultiCropWrapper", "VisionTransformer",
    "WeightNormLinear", "build_vit", "cancel_last_layer_gradients", "resolution_groups",
    "resolve_attention", "vit_base", "vit_large", "vit_small", "vit_tiny",
]
