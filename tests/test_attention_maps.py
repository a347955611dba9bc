"""The CLS attention maps and their thresholded masks, as the official visualize_attention.py."""

import numpy as np
import pytest
import torch
from PIL import Image

from dinofuse.engine.eval.attention_maps import cls_attention
from dinofuse.engine.models import vit_tiny


@pytest.mark.parametrize("threshold", [0.3, 0.6, 0.9])
def test_masks_keep_the_fewest_patches_holding_the_threshold_of_the_mass(threshold):
    """Official: drop the weakest patches while their share of a head's mass stays at or below
    1 - threshold. So the kept patches hold at least `threshold`, and without the weakest of
    them less than that."""
    torch.manual_seed(0)
    backbone = vit_tiny(depth=1, patch_size=8, img_size=32)
    image = Image.fromarray((np.random.default_rng(0).random((50, 40, 3)) * 255).astype(np.uint8))
    img, attn, masks = cls_attention(backbone, image, size=32, threshold=threshold)
    assert img.size == (32, 40) and attn.shape == masks.shape == (3, 40, 32)  # 4 x 5 patches
    per_patch, kept = attn[:, ::8, ::8].reshape(3, -1), masks[:, ::8, ::8].reshape(3, -1)
    # nearest upsampling: each patch's value fills its 8 x 8 pixels
    assert torch.equal(attn, per_patch.reshape(3, 5, 4).repeat_interleave(8, 1).repeat_interleave(8, 2))
    share = per_patch / per_patch.sum(1, keepdim=True)
    for head in range(3):
        mass = share[head][kept[head]]
        assert 0 < kept[head].sum() < 20
        assert mass.sum() >= threshold - 1e-6
        assert mass.sum() - mass.min() < threshold
