"""The batched tensor multi-crop against torchvision: each operation against torchvision's
own implementation of it, the crop boxes against RandomResizedCrop's, and the outputs'
shapes, dtypes, determinism and errors. (Rates of every random operation per crop type,
with the other two backends: tests/test_augmentation_statistics.py.)"""

import math

import pytest
import torch
import torchvision.transforms.functional as TF
from torchvision import transforms as T

from dinofuse.dataloading.spec import IMAGENET_MEAN, IMAGENET_STD, MultiCropSpec
from dinofuse.dataloading.tensor_multicrop import (Draws, TensorMultiCrop, blend, gaussian_blur,
                                                   luma, random_boxes, resized_crops, shift_hue)

OFF = dict(flip_p=0.0, color_jitter_p=0.0, grayscale_p=0.0, blur_p=(0.0, 0.0, 0.0), solarize_p=0.0)


def smooth_images(n, c, h, w, seed=0, lo=0.25, hi=0.75):
    """Random images in [lo, hi] (so bicubic overshoot never reaches the clamp at 0 and 1)."""
    g = torch.Generator().manual_seed(seed)
    return lo + (hi - lo) * torch.rand(n, c, h, w, generator=g)


def ks_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """The two-sample Kolmogorov-Smirnov statistic: the largest gap between the CDFs."""
    v = torch.cat([a, b]).unique()
    return ((a.view(-1, 1) <= v).float().mean(0) - (b.view(-1, 1) <= v).float().mean(0)).abs().max().item()


@pytest.mark.parametrize("scale", [(0.08, 1.0), (0.05, 0.4)])
def test_boxes_follow_random_resized_crop(scale):
    # the distribution of torchvision's get_params: area, aspect and position of 20000 boxes
    # each, two-sample KS at a 1e-5 false-alarm level (a scale range 0.02 off fails it)
    n, h, w, ratio = 20000, 40, 56, (3 / 4, 4 / 3)
    top, left, bh, bw = random_boxes(Draws(torch.Generator().manual_seed(1), n), h, w, scale, ratio)
    assert (bh >= 1).all() and (top + bh <= h).all() and (bw >= 1).all() and (left + bw <= w).all()
    torch.manual_seed(2)
    ref = torch.tensor([T.RandomResizedCrop.get_params(torch.empty(1, h, w), list(scale), list(ratio))
                        for _ in range(n)], dtype=torch.float32)
    critical = math.sqrt(-0.5 * math.log(1e-5 / 2)) * math.sqrt(2 / n)
    for name, a, b in [("area", bh * bw, ref[:, 2] * ref[:, 3]), ("aspect", bw / bh, ref[:, 3] / ref[:, 2]),
                       ("top", top, ref[:, 0]), ("left", left, ref[:, 1])]:
        assert ks_distance(a, b) < critical, (name, ks_distance(a, b), critical)


@pytest.mark.parametrize("h, w, expected", [(30, 30, (0, 0, 30, 30)), (20, 60, (0, 16, 20, 27)),
                                            (60, 20, (16, 0, 27, 20))])
def test_boxes_fall_back_to_the_centre_crop_as_torchvision(h, w, expected):
    # scales above 1 never fit: every crop is the fallback, the aspect clamped to the range
    boxes = random_boxes(Draws(torch.Generator().manual_seed(0), 5), h, w, (1.5, 2.0), (3 / 4, 4 / 3))
    ref = T.RandomResizedCrop.get_params(torch.empty(1, h, w), [1.5, 2.0], [3 / 4, 4 / 3])
    assert tuple(ref) == expected
    for got, want in zip(boxes, expected):
        assert (got == want).all(), (boxes, expected)


@pytest.mark.parametrize("flip", [False, True])
def test_resized_crop_equals_torchvision_bicubic(flip):
    # upscaling (no supersampling): torch's bicubic resize of the cropped box, except near an
    # edge of the box inside the image, where our taps read the image's pixels beyond it and
    # a resize of the cut-out box repeats the box's edge: compared where every tap is inside
    x = smooth_images(3, 3, 20, 18)
    boxes = [torch.tensor(v, dtype=torch.float32) for v in ([0, 2, 8], [1, 0, 6], [12, 16, 12], [16, 12, 12])]
    out = resized_crops(x, boxes, 24, torch.full((3,), flip))
    for k in range(3):
        top, left, h, w = (int(b[k]) for b in boxes)
        ref = TF.resized_crop(x[k], top, left, h, w, [24, 24], T.InterpolationMode.BICUBIC, antialias=False)
        ref = TF.hflip(ref) if flip else ref
        m = math.ceil(2.5 * 24 / min(h, w))  # two source pixels and a half, in output pixels
        torch.testing.assert_close(out[k][:, m:-m, m:-m], ref[:, m:-m, m:-m], atol=1e-5, rtol=0)


def test_downscaled_crops_are_antialiased():
    # white noise shrunk 4x: antialiased, each output pixel averages a 4x4 neighbourhood
    # (std ~0.25 of the input's); point-sampled bicubic keeps ~0.75 of it (aliasing)
    noise = torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    boxes = [torch.zeros(2), torch.zeros(2), torch.full((2,), 64.0), torch.full((2,), 64.0)]
    out = resized_crops(noise, boxes, 16, torch.zeros(2, dtype=torch.bool))
    assert out.shape == (2, 1, 16, 16)
    assert out.std() / noise.std() < 0.4
    torch.testing.assert_close(out.mean(), noise.mean(), atol=0.02, rtol=0)


def test_color_operations_equal_torchvision():
    # (luma weighs red 0.299 as PIL does, torchvision's tensor path 0.2989: atol 2e-4)
    x = smooth_images(4, 3, 9, 7, lo=0.0, hi=1.0)
    f = torch.tensor([0.6, 0.9, 1.2, 1.4])
    for k in range(4):
        fk = float(f[k])
        torch.testing.assert_close(blend(x, torch.zeros_like(x), f)[k], TF.adjust_brightness(x[k], fk))
        torch.testing.assert_close(blend(x, luma(x).mean((1, 2, 3), keepdim=True), f)[k],
                                   TF.adjust_contrast(x[k], fk), atol=2e-4, rtol=0)
        torch.testing.assert_close(blend(x, luma(x), f)[k], TF.adjust_saturation(x[k], fk), atol=2e-4, rtol=0)
        torch.testing.assert_close(luma(x)[k], TF.rgb_to_grayscale(x[k]), atol=2e-4, rtol=0)
    shift = torch.tensor([-0.1, -0.03, 0.05, 0.1])
    hued = shift_hue(x, shift)
    for k in range(4):
        torch.testing.assert_close(hued[k], TF.adjust_hue(x[k], float(shift[k])), atol=1e-5, rtol=0)


def test_gaussian_blur_equals_torchvision_away_from_the_edges():
    x = smooth_images(3, 2, 30, 30, lo=0.0, hi=1.0)
    sigma, radius = torch.tensor([0.3, 1.0, 2.0]), 6
    out = gaussian_blur(x, sigma, radius)
    inner = (slice(None), slice(radius, -radius), slice(radius, -radius))
    for k in range(3):
        ref = TF.gaussian_blur(x[k], [2 * radius + 1] * 2, [float(sigma[k])] * 2)
        torch.testing.assert_close(out[k][inner], ref[inner], atol=1e-6, rtol=0)
    # and the edges replicate: a constant image stays constant
    const = torch.full((1, 1, 8, 8), 0.3)
    torch.testing.assert_close(gaussian_blur(const, torch.tensor([2.0]), 6), const)


def test_crops_blur_with_a_kernel_cut_at_three_sigma_or_more(monkeypatch):
    """The crops' blur keeps the Gaussian's tails to 3 sigma of the largest sigma drawn
    (gaussian_blur itself is compared with torchvision above)."""
    from dinofuse.dataloading import tensor_multicrop

    calls = []

    def recording_blur(x, sigma, radius):
        calls.append((float(sigma.max()), radius))
        return gaussian_blur(x, sigma, radius)

    monkeypatch.setattr(tensor_multicrop, "gaussian_blur", recording_blur)
    spec = MultiCropSpec(global_crop_size=16, local_crop_size=8, local_crops_number=2,
                         blur_sigma=(1.9, 2.0))
    images = torch.randint(0, 256, (4, 3, 24, 24), dtype=torch.uint8)
    TensorMultiCrop(spec)(images, torch.Generator().manual_seed(0))
    assert len(calls) == 3  # the two global crops, then the local ones as one batch
    assert all(radius >= 3 * sigma for sigma, radius in calls)


@pytest.mark.parametrize("local_crops", [0, 6, 10])
@pytest.mark.parametrize("channels", [None, 1, 3])
def test_crops_shapes_dtypes_and_normalization(local_crops, channels):
    spec = MultiCropSpec(global_crop_size=20, local_crop_size=8, local_crops_number=local_crops)
    shape = (5, 24, 24) if channels is None else (5, channels, 24, 24)
    images = torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    for dtype in (torch.float32, torch.bfloat16):
        crops = TensorMultiCrop(spec)(images, torch.Generator().manual_seed(0), dtype)
        assert len(crops) == 2 + local_crops
        for i, c in enumerate(crops):
            size = 20 if i < 2 else 8
            assert c.shape == (5, 3, size, size) and c.dtype == dtype
            # within the normalized range of [0, 1] pixels, per channel
            mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
            std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
            px = c.float() * std + mean
            assert px.min() >= -0.01 and px.max() <= 1.01 and torch.isfinite(c).all()
            if channels in (None, 1):  # gray in, gray out: the three channels agree
                assert (px.amax(1) - px.amin(1)).max() < 0.01


def test_no_augmentation_is_the_plain_resized_crop():
    # every random operation off, a scale of exactly 1 and aspect 1: the whole image, resized
    spec = MultiCropSpec(global_crop_size=16, local_crop_size=8, local_crops_number=1,
                         global_crops_scale=(1.0, 1.0), local_crops_scale=(1.0, 1.0), ratio=(1.0, 1.0), **OFF)
    images = torch.randint(60, 200, (2, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    crops = TensorMultiCrop(spec)(images, torch.Generator().manual_seed(0))
    want = TF.normalize(images.float() / 255, IMAGENET_MEAN, IMAGENET_STD)
    torch.testing.assert_close(crops[0], want, atol=1e-5, rtol=0)
    torch.testing.assert_close(crops[1], want, atol=1e-5, rtol=0)
    assert crops[2].shape == (2, 3, 8, 8)


def test_the_same_generator_seed_gives_the_same_crops_and_another_seed_others():
    images = torch.randint(0, 256, (6, 28, 28), dtype=torch.uint8)
    aug = TensorMultiCrop(MultiCropSpec(global_crop_size=28, local_crop_size=14, local_crops_number=2))
    a, b, c = (aug(images, torch.Generator().manual_seed(s)) for s in (5, 5, 6))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not any(torch.equal(x, z) for x, z in zip(a, c))


class FixedFactors(Draws):
    """Draws whose uniform ones (the jitter's factors: brightness, contrast, saturation, hue
    in that order) are the given values; the order of the operations stays random."""

    def __init__(self, n, brightness=1.0, contrast=1.0, saturation=1.0, hue=0.0):
        super().__init__(torch.Generator().manual_seed(0), n)
        self.values = iter([brightness, contrast, saturation, hue])

    def uniform(self, lo, hi, *shape):
        return torch.full((self.n, *shape), next(self.values))


def test_jitter_applies_its_operations_in_a_random_order_per_sample():
    aug = TensorMultiCrop(MultiCropSpec())
    x = smooth_images(400, 1, 8, 8, lo=0.1, hi=0.9)
    torch.testing.assert_close(aug._jitter(x, FixedFactors(400, brightness=0.5)), x * 0.5)
    # brightness 0.5 and contrast 3 commute but for the clamp to [0, 1], which contrast
    # first reaches at pixels above ~0.67 and brightness first does not: the two orders give
    # two distinct outcomes, about half the samples each
    out = aug._jitter(x, FixedFactors(400, brightness=0.5, contrast=3.0))
    three = torch.full((400,), 3.0)
    b_then_c = blend(x * 0.5, (x * 0.5).mean((1, 2, 3), keepdim=True), three)
    c_then_b = blend(x, x.mean((1, 2, 3), keepdim=True), three) * 0.5
    first = (out - b_then_c).abs().amax((1, 2, 3)) < 1e-6
    second = (out - c_then_b).abs().amax((1, 2, 3)) < 1e-6
    assert (first ^ second).all()
    assert abs(first.float().mean().item() - 0.5) < 4.5 * math.sqrt(0.25 / 400)


def test_shares_of_a_batch_get_the_crops_of_the_whole_batch():
    """k processes with one share each cut what one process cuts from the whole batch."""
    images = torch.randint(0, 256, (12, 3, 20, 20), dtype=torch.uint8)
    aug = TensorMultiCrop(MultiCropSpec(global_crop_size=16, local_crop_size=8, local_crops_number=3))
    whole = aug(images, torch.Generator().manual_seed(9))
    for k in (2, 3):
        shares = [aug(part, torch.Generator().manual_seed(9), share=(i, k))
                  for i, part in enumerate(images.chunk(k))]
        for crop, parts in zip(whole, zip(*shares)):
            torch.testing.assert_close(torch.cat(parts), crop, atol=1e-6, rtol=0)
    alone = aug(images[4:8], torch.Generator().manual_seed(9))  # not told it is a share
    assert not torch.allclose(alone[0], whole[0][4:8])
    with pytest.raises(ValueError, match="share must be"):
        aug(images, torch.Generator(), share=(2, 2))


@pytest.mark.parametrize("images, match", [
    (torch.zeros(2, 8, 8), "uint8"),
    (torch.zeros(2, 2, 8, 8, dtype=torch.uint8), "1 or 3 channels"),
    (torch.zeros(8, dtype=torch.uint8), "uint8"),
])
def test_bad_images_are_refused_with_a_clear_error(images, match):
    with pytest.raises(ValueError, match=match):
        TensorMultiCrop()(images, torch.Generator())
