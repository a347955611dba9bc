"""The official DINO augmentation (DataAugmentationDINO) with torchvision and PIL.

The reference for the DALI pipeline and its fallback: 2 global crops and N local crops per
image, every probability, scale and size from the arguments.
"""

from __future__ import annotations

import random

import torch
from PIL import ImageFilter, ImageOps
from torchvision import transforms as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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
    def __init__(self, global_crops_scale=(0.4, 1.0), local_crops_scale=(0.05, 0.4),
                 local_crops_number: int = 8, global_crop_size: int = 224, local_crop_size: int = 96,
                 flip_p: float = 0.5, color_jitter_p: float = 0.8, grayscale_p: float = 0.2,
                 blur_p=(1.0, 0.1, 0.5), solarize_p: float = 0.2, blur_radius=(0.1, 2.0)):
        shared = T.Compose([
            T.RandomHorizontalFlip(p=flip_p),
            T.RandomApply([T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)],
                          p=color_jitter_p),
            T.RandomGrayscale(p=grayscale_p),
        ])
        normalize = T.Compose([T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
        bicubic = T.InterpolationMode.BICUBIC
        global_crop = T.RandomResizedCrop(global_crop_size, scale=global_crops_scale, interpolation=bicubic)
        self.global_1 = T.Compose([global_crop, shared, RandomGaussianBlur(blur_p[0], *blur_radius),
                                   normalize])
        self.global_2 = T.Compose([global_crop, shared, RandomGaussianBlur(blur_p[1], *blur_radius),
                                   RandomSolarize(solarize_p), normalize])
        self.local = T.Compose([
            T.RandomResizedCrop(local_crop_size, scale=local_crops_scale, interpolation=bicubic),
            shared, RandomGaussianBlur(blur_p[2], *blur_radius), normalize])
        self.local_crops_number = local_crops_number

    def __call__(self, img) -> list[torch.Tensor]:
        crops = [self.global_1(img), self.global_2(img)]
        crops += [self.local(img) for _ in range(self.local_crops_number)]
        return crops


class SeededMultiCrop:
    """A dataset of (crops, label) whose random draws depend only on (seed, epoch, index):
    the same crops whatever the worker count, and after a resume mid-epoch."""

    def __init__(self, images, augmentation: MultiCropAugmentation, seed: int = 0):
        self.images, self.augmentation, self.seed, self.epoch = images, augmentation, seed, 0

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        img, label = self.images[i]
        sample_seed = hash((self.seed, self.epoch, i)) & 0x7FFFFFFF
        state = random.getstate()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed)
            random.seed(sample_seed)
            crops = self.augmentation(img)
        random.setstate(state)
        return crops, label
