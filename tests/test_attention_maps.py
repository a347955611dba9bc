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


def test_maps_are_the_cls_query_over_the_patches():
    """Each head's map is the CLS token's attention to every patch (the official
    `attentions[0, :, 0, 1:]`), computed here from the last block's own weights: the CLS
    query against each patch's key, softmax over all tokens, on the patch grid row by row."""
    torch.manual_seed(1)
    backbone = vit_tiny(depth=2, patch_size=8, img_size=32)
    image = Image.fromarray((np.random.default_rng(1).random((40, 60, 3)) * 255).astype(np.uint8))
    seen = {}
    last = backbone.blocks[-1]
    hook = last.register_forward_pre_hook(lambda m, args: seen.setdefault("tokens", args[0]))
    img, attn, _ = cls_attention(backbone, image, size=32)
    hook.remove()
    norm = last.norm1
    x = torch.nn.functional.layer_norm(seen["tokens"][0].double(), norm.normalized_shape,
                                       norm.weight.double(), norm.bias.double(), norm.eps)
    heads, dim = 3, x.shape[-1]
    qkv = x @ last.attn.qkv.weight.double().T + last.attn.qkv.bias.double()
    q, k, _ = qkv.view(-1, 3, heads, dim // heads).unbind(1)  # (tokens, heads, d)
    scores = torch.einsum("hd,nhd->hn", q[0], k) * (dim // heads) ** -0.5
    expected = scores.softmax(-1)[:, 1:].float()  # the CLS row, without its own column
    rows, cols = img.size[1] // 8, img.size[0] // 8
    assert (rows, cols) == (4, 6)  # not square: the grid is rows of patches
    torch.testing.assert_close(attn[:, ::8, ::8], expected.view(heads, rows, cols), atol=1e-6, rtol=1e-5)
