"""DINO's multi-crop augmentation as one DALI graph: decode once, cut 2 + N crops.

On a GPU (`device_id` set) JPEGs decode with nvJPEG (`device="mixed"`) and every crop
operator runs on the GPU; without one (`device_id=None`) the same graph runs on the CPU,
which is how the tests run it. Work that a coin flip turns off (color jitter, grayscale,
blur, solarize) is skipped with DALI's conditionals rather than computed and blended.

Readers: file lists (image folders) and WebDataset tar shards; sharded per rank; per-crop
random draws; NCHW float output through DALI's PyTorch iterator.

The color jitter draws its order per sample as torchvision's ColorJitter does, but clips
to 0-255 once for brightness and saturation together (one `color_twist`) where PIL clips
after each.
"""

from __future__ import annotations

from collections.abc import Sequence

from dinofuse.dataloading.readers import WEBDATASET_IMAGE_EXTS, fresh_dali_index
from dinofuse.dataloading.spec import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    SHUFFLE_BUFFER,
    CropSpec,
    MultiCropSpec,
)

IMAGENET_MEAN_255 = [255 * m for m in IMAGENET_MEAN]
IMAGENET_STD_255 = [255 * s for s in IMAGENET_STD]


def available() -> bool:
    """Whether DALI is installed (imported only when a pipeline is built)."""
    import importlib.util

    try:
        return importlib.util.find_spec("nvidia.dali") is not None
    except ModuleNotFoundError:  # no `nvidia` namespace at all
        return False


def _uniform(lo: float, hi: float):
    """A per-sample uniform draw in [lo, hi], or the constant when the range is empty (a
    jitter of 0, as torchvision allows: DALI refuses the range [1, 1))."""
    import nvidia.dali.fn as fn

    return fn.random.uniform(range=[lo, hi]) if hi > lo else float(lo)


def _luma(r, g, b):
    return 0.299 * r + 0.587 * g + 0.114 * b  # torchvision's (and PIL's) grayscale


def _contrast(image, factor):
    """torchvision's adjust_contrast on an HWC uint8 image: a blend with the mean of the
    image's grayscale."""
    import nvidia.dali.fn as fn
    import nvidia.dali.math as dmath
    import nvidia.dali.types as types

    x = fn.cast(image, dtype=types.FLOAT)
    mean = fn.reductions.mean(_luma(x[:, :, 0], x[:, :, 1], x[:, :, 2]))
    out = fn.cast(dmath.clamp(mean + factor * (x - mean), 0.0, 255.0) + 0.5, dtype=types.UINT8)
    return fn.reshape(out, layout="HWC")  # arithmetic drops the layout, the branches need it


def _hue_shift(image, shift):
    """torchvision's adjust_hue on an HWC uint8 image: the HSV hue plus `shift` turns, with
    saturation and value kept."""
    import nvidia.dali.fn as fn
    import nvidia.dali.math as dmath
    import nvidia.dali.types as types

    x = fn.cast(image, dtype=types.FLOAT)
    r, g, b = x[:, :, 0], x[:, :, 1], x[:, :, 2]
    value = dmath.max(dmath.max(r, g), b)
    chroma = value - dmath.min(dmath.min(r, g), b)
    safe = chroma + (chroma == 0)  # gray pixels: any hue, chroma 0 keeps them gray
    red_max, green_max = value == r, (value == g) & (value != r)
    blue_max = (value != r) & (value != g)
    sixths = (red_max * ((g - b) / safe) + green_max * ((b - r) / safe + 2)
              + blue_max * ((r - g) / safe + 4) + shift * 6)

    def channel(point):  # back to RGB: r, g and b sit at 5, 3 and 1 sixths
        k = sixths + point
        k = k - dmath.floor(k / 6) * 6
        return value - chroma * dmath.clamp(dmath.min(k, 4 - k), 0.0, 1.0)

    rgb = fn.stack(channel(5), channel(3), channel(1), axis=2)
    return fn.reshape(fn.cast(rgb + 0.5, dtype=types.UINT8), layout="HWC")


def _before_hue():
    """Per sample, whether saturation and whether contrast come before the hue, as in a random
    order of the four (three keys against the hue's: each before it half the time, both a
    third of the time)."""
    import nvidia.dali.fn as fn

    hue_key = fn.random.uniform(range=[0.0, 1.0])
    return tuple(fn.random.uniform(range=[0.0, 1.0]) < hue_key for _ in range(2))


def _color_jitter(image, spec: MultiCropSpec, device: str):
    """torchvision's ColorJitter: brightness, contrast, saturation and hue, in a random order
    per sample. Brightness commutes with the other three and saturation with contrast (each
    is a blend with a gray that the others scale alike; up to clipping between them), so the
    order that matters is where saturation and contrast fall around the hue."""
    import nvidia.dali.fn as fn

    brightness = _uniform(max(0.0, 1 - spec.brightness), 1 + spec.brightness)
    saturation = _uniform(max(0.0, 1 - spec.saturation), 1 + spec.saturation)
    contrast = _uniform(max(0.0, 1 - spec.contrast), 1 + spec.contrast)
    hue = _uniform(-spec.hue, spec.hue)  # turns
    if spec.dali_color == "dali":  # color_twist's own contrast (towards 128), hue (YIQ), order
        return fn.color_twist(image, device=device, brightness=brightness, saturation=saturation,
                              contrast=contrast, hue=hue * 360)  # degrees

    # color_twist's brightness and saturation are torchvision's (a scale; a blend with the
    # luma); its contrast and hue are not: those two are written here
    def twist(x):
        return fn.color_twist(x, device=device, brightness=brightness, saturation=saturation)

    def blend(x):
        return _contrast(x, contrast) if spec.contrast > 0 else x

    if spec.hue == 0:
        return blend(twist(image))
    saturation_first, contrast_first = _before_hue()
    # a Python condition, not a per-sample one: without contrast, no split of the batch
    # around a no-op (DALI's conditionals split and merge the samples at each `if`)
    contrast_around_hue = spec.contrast > 0
    out = image
    if saturation_first:
        out = twist(out)
    if contrast_around_hue:
        if contrast_first:
            out = blend(out)
    out = _hue_shift(out, hue)
    if not saturation_first:
        out = twist(out)
    if contrast_around_hue:
        if not contrast_first:
            out = blend(out)
    return out


def _one_crop(image, crop: CropSpec, spec: MultiCropSpec, device: str):
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types

    out = fn.random_resized_crop(image, device=device, size=[crop.size, crop.size],
                                 random_area=list(crop.scale), random_aspect_ratio=list(spec.ratio),
                                 interp_type=types.INTERP_CUBIC)
    out = fn.flip(out, device=device,
                  horizontal=fn.random.coin_flip(probability=spec.flip_p, dtype=types.INT32))
    if fn.random.coin_flip(probability=spec.color_jitter_p, dtype=types.BOOL):
        out = _color_jitter(out, spec, device)
    if fn.random.coin_flip(probability=spec.grayscale_p, dtype=types.BOOL):
        out = fn.hsv(out, device=device, saturation=0.0)
    if crop.blur_p > 0 and fn.random.coin_flip(probability=crop.blur_p, dtype=types.BOOL):
        out = fn.gaussian_blur(out, device=device, sigma=_uniform(*spec.blur_sigma))
    if crop.solarize_p > 0 and fn.random.coin_flip(probability=crop.solarize_p, dtype=types.BOOL):
        high = out >= 128  # PIL's solarize: invert every value at or above the threshold
        out = fn.cast(high * (255 - out) + (out < 128) * out, dtype=types.UINT8)
    return fn.crop_mirror_normalize(out, device=device, dtype=types.FLOAT, output_layout="CHW",
                                    mean=IMAGENET_MEAN_255, std=IMAGENET_STD_255)


WEBDATASET_IMAGE_EXT = ";".join(WEBDATASET_IMAGE_EXTS)  # the shard reader's set, one output


def shard_indexes(tars: Sequence[str]) -> dict:
    """DALI's `index_paths` argument when every shard has its index beside it, else none."""
    indexes = [fresh_dali_index(tar) for tar in tars]
    return {"index_paths": [str(i) for i in indexes]} if all(indexes) else {}


def decode_images(encoded, gpu: bool, hw_decoder_load: float | None = None,
                  fancy_upsampling: bool = True):
    """The images in `encoded` as RGB, as `readers.decode_rgb` gives them (the official
    loader, PIL's convert("RGB")): the EXIF orientation is not applied (DALI's default would
    turn them). On a GPU, `fancy_upsampling` has nvJPEG interpolate a JPEG's subsampled
    chroma as libjpeg-turbo does (PIL, DALI's CPU decoder); off, nvJPEG's default."""
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types

    gpu_only = {}
    if gpu:
        gpu_only["jpeg_fancy_upsampling"] = fancy_upsampling
        if hw_decoder_load is not None:
            gpu_only["hw_decoder_load"] = hw_decoder_load
    return fn.decoders.image(encoded, device="mixed" if gpu else "cpu", output_type=types.RGB,
                             adjust_orientation=False, **gpu_only)


def build_pipeline(files: Sequence[str], labels: Sequence[int], spec: MultiCropSpec, *,
                   batch_size: int, device_id: int | None = None, num_threads: int = 2,
                   seed: int = 0, shard_id: int = 0, num_shards: int = 1,
                   tars: Sequence[str] = (), hw_decoder_load: float | None = None,
                   fancy_upsampling: bool = True, shuffle_buffer: int = SHUFFLE_BUFFER,
                   shuffle_each_epoch: bool = True):
    """A DALI pipeline yielding (crop_0, ..., crop_{2+N-1}, labels) per batch.

    Images come from `files` (with `labels`) or, when `tars` is given, from WebDataset
    shards (one image per sample key, any of jpg/jpeg/png/webp; labels are 0: DINO trains
    without them), with their DALI indexes (NAME.idx) when every shard has one (else DALI
    walks every shard at the start, on every rank). Each epoch is a new permutation of the
    whole, split among the `num_shards` ranks, as the official DistributedSampler's: of the
    files, or of the shards' order, the samples then drawn at random from the next
    `shuffle_buffer` read.
    `hw_decoder_load`: on a GPU, the share of JPEGs given to its hardware decoder (A100,
    H100), the rest to nvJPEG's CUDA decoder; None keeps DALI's default (0.65).
    `fancy_upsampling`: see `decode_images` (GPU only).
    `shuffle_each_epoch=False`: the files, or the shards, are read in the order given, the
    same each pass (the shards' samples still drawn from the window): for one graph per
    epoch over an order drawn outside, as the trainer builds them (exact resumes).
    """
    from nvidia.dali import pipeline_def
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types

    if not files and not tars:
        raise ValueError("the DALI pipeline got no files")
    gpu = device_id is not None
    # (random_shuffle alone draws from a window over a list shuffled once with a fixed seed,
    # and reads shards one after another in their order: shards written class by class gave
    # batches of one class, and a folder's rank saw the same neighbours every epoch)
    common = dict(shuffle_after_epoch=shuffle_each_epoch,
                  shard_id=shard_id, num_shards=num_shards, pad_last_batch=True, seed=seed,
                  name="reader")
    if shuffle_each_epoch:  # (DALI warns of the seed without the shuffle)
        common["shuffle_after_epoch_seed"] = seed & 0x7FFF_FFFF
    else:  # (else each pass moves every rank to the next rank's part)
        common["stick_to_shard"] = True

    # each shard its own draws: with one seed everywhere, the i-th sample of every rank got
    # the same crops, flips and jitters (a world-th of the global batch's draws were distinct)
    draws_seed = seed if shard_id == 0 else hash((seed, shard_id)) & 0x7FFF_FFFF

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id,
                  seed=draws_seed, enable_conditionals=True, exec_dynamic=True)
    def multicrop():
        if tars:
            encoded = fn.readers.webdataset(paths=list(tars), ext=[WEBDATASET_IMAGE_EXT],
                                            missing_component_behavior="skip",
                                            random_shuffle=True, initial_fill=shuffle_buffer,
                                            **shard_indexes(tars), **common)
            label = fn.cast(encoded.shape()[0] * 0, dtype=types.INT32)
        else:
            encoded, label = fn.readers.file(files=list(files), labels=list(labels), **common)
        image = decode_images(encoded, gpu, hw_decoder_load, fancy_upsampling)
        crops = [_one_crop(image, c, spec, "gpu" if gpu else "cpu") for c in spec.crops()]
        return (*crops, label)

    return multicrop()


class DALIMultiCropLoader:
    """Batches of ([crop tensors], labels) through DALI's PyTorch iterator; one epoch per
    pass, every shard the same number of steps (the last partial batch is dropped)."""

    def __init__(self, pipeline, ncrops: int, dtype=None):
        """dtype: the crops' torch dtype (None: DALI's float32). DALI has no bfloat16, so a
        bf16 run's crops are cast on the device after the graph (half the bytes held)."""
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        self.ncrops, self.dtype = ncrops, dtype
        names = [f"crop{i}" for i in range(ncrops)] + ["label"]
        self.iterator = DALIGenericIterator(pipeline, names, reader_name="reader",
                                            last_batch_policy=LastBatchPolicy.DROP,
                                            auto_reset=True,
                                            # decode errors surface while iterating, where
                                            # the trainer can trace them to their files
                                            prepare_first_batch=False)

    def __len__(self) -> int:
        return len(self.iterator)

    def __iter__(self):
        for (batch,) in self.iterator:
            crops = [batch[f"crop{i}"] for i in range(self.ncrops)]
            if self.dtype is not None:
                crops = [c.to(self.dtype) for c in crops]
            yield crops, batch["label"].reshape(-1).long()
