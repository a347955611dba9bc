"""The official multi-crop augmentation as batched tensor operations, on any device.

For datasets held in memory as one uint8 tensor (Fashion-MNIST): the whole batch is cut
into 2+N crops by a few batched calls on the training device, so a GPU run needs no data
workers and no PIL. Every draw is per sample and per crop, from the same `MultiCropSpec`
as the torchvision reference and DALI, in the reference's order: random resized crop,
horizontal flip, color jitter (its four operations in a random order per sample), grayscale,
Gaussian blur, solarization, normalization.

Where the pixels differ from PIL's (the distributions do not; tests check them):
- resampling is bicubic through `grid_sample` (a = -0.75, as torch's bicubic; PIL's is
  -0.5), antialiased on downscaling by supersampling: each output pixel averages s x s
  samples, s = the image's side over the crop's (at most 4), fixed per crop type so that
  no step waits for the device to say how large its boxes came out;
- the Gaussian blur is an exact separable kernel (PIL approximates it with box blurs);
- values stay float in [0, 1] between steps (PIL rounds to 8 bits after each).
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F

from dinofuse.dataloading.spec import IMAGENET_MEAN, IMAGENET_STD, CropSpec, MultiCropSpec

CROP_ATTEMPTS = 10  # torchvision's RandomResizedCrop tries 10 boxes, then a center crop
MAX_SUPERSAMPLE = 4


def luma(x: torch.Tensor) -> torch.Tensor:
    """ITU-R 601-2 luma (PIL's "L" conversion) of (n, 3, h, w) as (n, 1, h, w)."""
    r, g, b = x.unbind(1)
    return (0.299 * r + 0.587 * g + 0.114 * b).unsqueeze(1)


class Draws:
    """Per-sample random numbers for `copies` crops of each of n images from one generator.
    With share=(i, k) they are drawn for k shares of n images and share i's rows kept: k
    processes cutting one share each get exactly the crops one process cuts from the whole
    batch. Rows run copy-major: row c * n + j is copy c of image j."""

    def __init__(self, generator: torch.Generator, n: int, share: tuple[int, int] = (0, 1),
                 copies: int = 1):
        index, count = share
        if not 0 <= index < count:
            raise ValueError(f"share must be (index, count) with 0 <= index < count; got {share}")
        self.generator, self.n, self.count, self.copies = generator, n, count, copies
        self.rows = slice(index * n, (index + 1) * n)

    def rand(self, *shape: int) -> torch.Tensor:
        g = self.generator
        u = torch.rand(self.copies, self.n * self.count, *shape, device=g.device, generator=g)
        return u[:, self.rows].reshape(self.copies * self.n, *shape)

    def coin(self, p: float) -> torch.Tensor:
        return self.rand() < p

    def uniform(self, lo: float, hi: float, *shape: int) -> torch.Tensor:
        return lo + (hi - lo) * self.rand(*shape)


def random_boxes(draws: Draws, height: int, width: int, scale, ratio):
    """torchvision's RandomResizedCrop.get_params for a batch at once: (top, left, h, w)."""
    area = height * width * draws.uniform(*scale, CROP_ATTEMPTS)
    aspect = draws.uniform(math.log(ratio[0]), math.log(ratio[1]), CROP_ATTEMPTS).exp()
    w = (area * aspect).sqrt().round()
    h = (area / aspect).sqrt().round()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.int().argmax(1, keepdim=True)  # the first box that fits
    w, h = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0]
    # none fits: the whole image, its aspect clamped to the range, centred
    in_ratio = width / height
    if in_ratio < ratio[0]:
        fw, fh = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        fw, fh = round(height * ratio[1]), height
    else:
        fw, fh = width, height
    found = fits.any(1)
    w = torch.where(found, w, torch.full_like(w, fw))
    h = torch.where(found, h, torch.full_like(h, fh))
    u = draws.rand(2)
    top = torch.where(found, (u[:, 0] * (height - h + 1)).floor(), ((height - h) // 2))
    left = torch.where(found, (u[:, 1] * (width - w + 1)).floor(), ((width - w) // 2))
    return top, left, h, w


def resized_crops(images: torch.Tensor, boxes, size: int, flip: torch.Tensor) -> torch.Tensor:
    """Each image's box resampled to size x size (bicubic), mirrored where `flip`."""
    n, _, height, width = images.shape
    top, left, h, w = boxes
    # grid_sample's coordinates run -1..1 over the image's pixel edges (align_corners=False)
    sx = torch.where(flip, -w, w) / width
    theta = torch.zeros(n, 2, 3, device=images.device, dtype=images.dtype)
    theta[:, 0, 0], theta[:, 0, 2] = sx, (2 * left + w) / width - 1
    theta[:, 1, 1], theta[:, 1, 2] = h / height, (2 * top + h) / height - 1
    s = min(MAX_SUPERSAMPLE, max(1, math.ceil(max(height, width) / size)))
    grid = F.affine_grid(theta, [n, images.shape[1], size * s, size * s], align_corners=False)
    out = F.grid_sample(images, grid, mode="bicubic", padding_mode="border", align_corners=False)
    return (F.avg_pool2d(out, s) if s > 1 else out).clamp_(0, 1)


def _rgb_to_hsv(x: torch.Tensor):
    r, g, b = x.unbind(1)
    maxc, minc = x.amax(1), x.amin(1)
    delta = maxc - minc
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    hue = torch.where(maxc == r, (g - b) / safe,
                      torch.where(maxc == g, 2 + (b - r) / safe, 4 + (r - g) / safe))
    hue = torch.where(delta > 0, (hue / 6) % 1, torch.zeros_like(hue))
    sat = torch.where(maxc > 0, delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc)),
                      torch.zeros_like(maxc))
    return hue, sat, maxc


def _hsv_to_rgb(hue, sat, val):
    # each channel from the distance of its hue point (r: 5, g: 3, b: 1 sixths)
    points = torch.arange(5, 0, -2, device=hue.device, dtype=hue.dtype).view(1, 3, 1, 1)
    k = (points + hue.unsqueeze(1) * 6) % 6
    ramp = torch.clamp(torch.minimum(k, 4 - k), 0, 1)
    return val.unsqueeze(1) * (1 - sat.unsqueeze(1) * ramp)


def shift_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    hue, sat, val = _rgb_to_hsv(x)
    return _hsv_to_rgb((hue + shift.view(-1, 1, 1)) % 1, sat, val)


def blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """factor * x + (1 - factor) * other, clamped to [0, 1] (PIL's ImageEnhance)."""
    f = factor.view(-1, 1, 1, 1)
    return (f * x + (1 - f) * other).clamp_(0, 1)


class TensorMultiCrop:
    """`MultiCropSpec`'s 2 + N crops of a batch of uint8 images, (n, H, W) or (n, C, H, W)
    with C 1 or 3, every crop (n, 3, size, size) float, normalized with ImageNet's mean and
    std. One-channel images stay one channel until the normalization: saturation, hue and
    grayscale leave a gray image unchanged, so they are skipped there."""

    def __init__(self, spec: MultiCropSpec = MultiCropSpec()):
        self.spec = spec
        self._mean_std: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, images: torch.Tensor, generator: torch.Generator,
                 dtype: torch.dtype = torch.float32, share: tuple[int, int] = (0, 1)) -> list[torch.Tensor]:
        """share=(i, k): these images are share i of k of a batch whose draws `generator`
        makes (see `Draws`): each rank of k cuts its share as one process would."""
        if images.dtype != torch.uint8 or images.dim() not in (3, 4):
            raise ValueError(f"images must be uint8 (n, H, W) or (n, C, H, W); got "
                             f"{images.dtype} {tuple(images.shape)}")
        x = (images.unsqueeze(1) if images.dim() == 3 else images).float().div_(255)
        if x.shape[1] not in (1, 3):
            raise ValueError(f"images must have 1 or 3 channels; got {x.shape[1]}")
        crops = []
        # the local crops share one spec: cut as one batch of copies (fewer, larger calls)
        for crop, group in itertools.groupby(self.spec.crops()):
            copies = len(list(group))
            draws = Draws(generator, x.shape[0], share, copies)
            out = self._crop(x.repeat(copies, 1, 1, 1) if copies > 1 else x, crop, draws)
            crops += out.to(dtype).chunk(copies)
        return crops

    def _crop(self, x: torch.Tensor, crop: CropSpec, draws: Draws) -> torch.Tensor:
        s = self.spec
        boxes = random_boxes(draws, x.shape[2], x.shape[3], crop.scale, s.ratio)
        out = resized_crops(x, boxes, crop.size, draws.coin(s.flip_p))
        if s.color_jitter_p > 0:  # (like every step below: no work when turned off)
            out = torch.where(draws.coin(s.color_jitter_p).view(-1, 1, 1, 1), self._jitter(out, draws), out)
        if s.grayscale_p > 0 and out.shape[1] == 3:
            out = torch.where(draws.coin(s.grayscale_p).view(-1, 1, 1, 1), luma(out).expand_as(out), out)
        if crop.blur_p > 0:
            sigma = draws.uniform(*s.blur_sigma)
            blurred = gaussian_blur(out, sigma, radius=math.ceil(3 * s.blur_sigma[1]))
            out = torch.where(draws.coin(crop.blur_p).view(-1, 1, 1, 1), blurred, out)
        if crop.solarize_p > 0:
            solarize = draws.coin(crop.solarize_p).view(-1, 1, 1, 1) & (out >= 128 / 255)
            out = torch.where(solarize, 1 - out, out)
        mean, std = self._normalization(x.device)
        return (out - mean) / std  # a gray image broadcasts to 3 channels here

    def _normalization(self, device: torch.device):
        if device not in self._mean_std:  # copied to the device once, not per batch
            self._mean_std[device] = tuple(torch.tensor(v, device=device).view(1, 3, 1, 1)
                                           for v in (IMAGENET_MEAN, IMAGENET_STD))
        return self._mean_std[device]

    def _jitter(self, x: torch.Tensor, draws: Draws) -> torch.Tensor:
        """torchvision's ColorJitter: brightness, contrast, saturation and hue, each with its
        factor, in a random order per sample."""
        s = self.spec
        factors = [draws.uniform(max(0.0, 1 - s.brightness), 1 + s.brightness),
                   draws.uniform(max(0.0, 1 - s.contrast), 1 + s.contrast),
                   draws.uniform(max(0.0, 1 - s.saturation), 1 + s.saturation),
                   draws.uniform(-s.hue, s.hue)]
        order = draws.rand(4).argsort(1)
        gray = x.shape[1] == 1

        def apply(op: int, y: torch.Tensor) -> torch.Tensor:
            f = factors[op]
            if op == 0:
                return blend(y, torch.zeros_like(y), f)
            lum = y if gray else luma(y)
            if op == 1:
                return blend(y, lum.mean((1, 2, 3), keepdim=True), f)
            if op == 2:
                return blend(y, lum, f)
            return shift_hue(y, f)

        ops = (0, 1) if gray else (0, 1, 2, 3)
        for slot in range(4):
            for op in ops:
                turn = (order[:, slot] == op).view(-1, 1, 1, 1)
                x = torch.where(turn, apply(op, x), x)
        return x


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """Each image blurred with its own sigma (pixels; the kernel cut at `radius`, which
    should be >= 3 sigma): separable, edges replicated."""
    n, c, h, w = x.shape
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (t / sigma.view(-1, 1).to(x.dtype)) ** 2)
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (n*c, taps)
    y = x.reshape(1, n * c, h, w)
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="replicate"), kernel.view(n * c, 1, 1, -1),
                 groups=n * c)
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="replicate"), kernel.view(n * c, 1, -1, 1),
                 groups=n * c)
    return y.view(n, c, h, w)
