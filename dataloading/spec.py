"""The multi-crop augmentation as data: one spec read by the torchvision and DALI backends."""

from __future__ import annotations

from dataclasses import dataclass

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DALI_COLOR = ("torchvision", "dali")  # the DALI color jitter's contrast and hue formulas


@dataclass(frozen=True)
class CropSpec:
    size: int
    scale: tuple[float, float]
    blur_p: float
    solarize_p: float = 0.0


# DALI's WebDataset reader draws samples at random from this many read ahead (its initial_fill
# default; data.shuffle_buffer)
SHUFFLE_BUFFER = 1024


@dataclass(frozen=True)
class MultiCropSpec:
    """The official DataAugmentationDINO, every probability and size a field."""

    global_crop_size: int = 224
    local_crop_size: int = 96
    global_crops_scale: tuple[float, float] = (0.4, 1.0)
    local_crops_scale: tuple[float, float] = (0.05, 0.4)
    local_crops_number: int = 8
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # aspect range of the random resized crop
    flip_p: float = 0.5
    color_jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_p: float = 0.2
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_p: tuple[float, float, float] = (1.0, 0.1, 0.5)  # global 1, global 2, local
    solarize_p: float = 0.2  # second global crop only
    # DALI only: "torchvision" (the official formulas for contrast and hue, written with
    # DALI's arithmetic) | "dali" (color_twist's: contrast towards a fixed 128, hue rotated
    # in YIQ; about twice as fast on a CPU)
    dali_color: str = "torchvision"

    def __post_init__(self):
        # checked here, where every backend's spec is made: named on any run, DALI or not
        if self.dali_color not in DALI_COLOR:
            raise ValueError(f"data.dali_color must be one of {', '.join(DALI_COLOR)}; "
                             f"got {self.dali_color!r}")

    def crops(self) -> list[CropSpec]:
        g, loc = self.global_crop_size, self.local_crop_size
        return ([CropSpec(g, self.global_crops_scale, self.blur_p[0]),
                 CropSpec(g, self.global_crops_scale, self.blur_p[1], self.solarize_p)]
                + [CropSpec(loc, self.local_crops_scale, self.blur_p[2])] * self.local_crops_number)
