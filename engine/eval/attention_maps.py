"""Self-attention maps of the CLS token, as the official visualize_attention.py.

For each head of the last block: the CLS token's attention to every patch, on the patch grid,
upsampled to pixels (nearest, by the patch size); optionally the mask of the smallest set of
patches holding `threshold` of that head's attention mass.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms as T

from dinofuse.dataloading.torchvision_multicrop import IMAGENET_MEAN, IMAGENET_STD


@torch.no_grad()
def cls_attention(backbone, image: Image.Image, size: int, threshold: float | None = None):
    """(image resized so both sides are multiples of the patch, attention (heads, H, W),
    masks (heads, H, W) bool or None)."""
    patch = backbone.patch_size
    img = T.Resize(size, interpolation=T.InterpolationMode.BICUBIC)(image.convert("RGB"))
    w, h = img.size[0] - img.size[0] % patch, img.size[1] - img.size[1] % patch
    if w == 0 or h == 0:
        raise ValueError(f"image {image.size} is smaller than one {patch}-pixel patch after resizing")
    img = img.crop((0, 0, w, h))
    x = T.Compose([T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])(img)[None]
    x = x.to(next(backbone.parameters()).device)
    backbone.eval()
    attn = backbone.get_last_selfattention(x)[0, :, 0, 1:].float()  # (heads, patches)
    heads, rows, cols = attn.shape[0], h // patch, w // patch
    masks = None
    if threshold is not None:
        values, order = attn.sort(dim=1)
        mass = (values / values.sum(dim=1, keepdim=True)).cumsum(dim=1)
        keep_sorted = mass > (1 - threshold)
        masks = torch.empty_like(keep_sorted).scatter_(1, order, keep_sorted)
        masks = _upsample(masks.reshape(heads, rows, cols).float(), patch) > 0.5
    return img, _upsample(attn.reshape(heads, rows, cols), patch), masks


def _upsample(maps: torch.Tensor, patch: int) -> torch.Tensor:
    return F.interpolate(maps[None], scale_factor=patch, mode="nearest")[0].cpu()


def _to_png(values: np.ndarray) -> Image.Image:
    lo, hi = float(values.min()), float(values.max())
    scaled = (values - lo) / (hi - lo) if hi > lo else np.zeros_like(values)
    return Image.fromarray((scaled * 255).astype(np.uint8))


def save_attention_maps(img: Image.Image, attn: torch.Tensor, masks, out_dir: str | Path) -> list[Path]:
    """attn-head{i}.png per head, mask-head{i}.png when thresholded, and overlay.png: the
    image and every head's map side by side."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    tiles = [img]
    for i, head in enumerate(attn.numpy()):
        tile = _to_png(head)
        tile.save(out / f"attn-head{i}.png")
        written.append(out / f"attn-head{i}.png")
        tiles.append(Image.blend(img.convert("L").convert("RGB"), tile.convert("RGB"), 0.6))
        if masks is not None:
            Image.fromarray(masks[i].numpy().astype(np.uint8) * 255).save(out / f"mask-head{i}.png")
            written.append(out / f"mask-head{i}.png")
    grid = Image.new("RGB", (img.width * len(tiles), img.height))
    for j, tile in enumerate(tiles):
        grid.paste(tile, (j * img.width, 0))
    grid.save(out / "overlay.png")
    return written + [out / "overlay.png"]
