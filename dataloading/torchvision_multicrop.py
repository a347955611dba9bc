"""The official DINO augmentation (DataAugmentationDINO) with torchvision and PIL.

The reference for the DALI pipeline and its fallback: 2 global crops and N local crops per
image, every probability, scale and size from a `MultiCropSpec` (dataloading/spec.py).
"""

from __future__ import annotations

import random
import warnings

import torch
from PIL import ImageFilter, ImageOps
from torchvision import transforms as T

from dinofuse.dataloading.readers import DataError
from dinofuse.dataloading.spec import IMAGENET_MEAN, IMAGENET_STD, MultiCropSpec


class RandomGaussianBlur:
    """PIL Gaussian blur with probability p and radius uniform in [radius_min, radius_max]."""

    def __init__(self, p: float, radius_min: float = 0.1, radius_max: float = 2.0):
        self.p, self.radius_min, self.radius_max = p, radius_min, radius_max

    def __call__(self, img):
        if random.random() > self.p:
            return img
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(self.radius_min, self.radius_max)))


class RandomSolarize:
    def __init__(self, p: float, threshold: int = 128):
        self.p, self.threshold = p, threshold

    def __call__(self, img):
        return ImageOps.solarize(img, self.threshold) if random.random() < self.p else img


class MultiCropAugmentation:
    def __init__(self, spec: MultiCropSpec = MultiCropSpec()):
        shared = T.Compose([
            T.RandomHorizontalFlip(p=spec.flip_p),
            T.RandomApply([T.ColorJitter(brightness=spec.brightness, contrast=spec.contrast,
                                         saturation=spec.saturation, hue=spec.hue)],
                          p=spec.color_jitter_p),
            T.RandomGrayscale(p=spec.grayscale_p),
        ])
        normalize = T.Compose([T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
        self.crops = []
        for crop in spec.crops():
            steps = [T.RandomResizedCrop(crop.size, scale=crop.scale, ratio=spec.ratio,
                                         interpolation=T.InterpolationMode.BICUBIC),
                     shared, RandomGaussianBlur(crop.blur_p, *spec.blur_sigma)]
            if crop.solarize_p > 0:
                steps.append(RandomSolarize(crop.solarize_p))
            self.crops.append(T.Compose(steps + [normalize]))

    def __call__(self, img) -> list[torch.Tensor]:
        return [crop(img) for crop in self.crops]


class SeededMultiCrop:
    """A dataset of (crops, label) whose random draws depend only on (seed, epoch, index):
    the same crops whatever the worker count, and after a resume mid-epoch."""

    def __init__(self, images, augmentation: MultiCropAugmentation, seed: int = 0,
                 skip_bad_images: bool = False):
        self.images, self.augmentation, self.seed, self.epoch = images, augmentation, seed, 0
        self.skip_bad_images = skip_bad_images

    def __len__(self) -> int:
        return len(self.images)

    def _load(self, i: int):
        """The image at i; with skip_bad_images, an undecodable one is reported (file named)
        and the next readable image takes its place, so a long run goes on."""
        for j in range(len(self.images)):
            try:
                return self.images[(i + j) % len(self.images)]
            except DataError as e:
                if not self.skip_bad_images:
                    raise
                warnings.warn(f"skipping: {e}", stacklevel=2)
        raise DataError("no readable image left")

    def __getitem__(self, i: int):
        img, label = self._load(i)
        sample_seed = hash((self.seed, self.epoch, i)) & 0x7FFFFFFF
        state = random.getstate()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed)
            random.seed(sample_seed)
            crops = self.augmentation(img)
        random.setstate(state)
        return crops, label
