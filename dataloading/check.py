"""Find the images a run would fail on: `dinofuse data check DIR` (every image decoded), and
the header screen the trainer runs before DALI reads a file (cheap: no pixel decoded)."""

from __future__ import annotations

import io
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image

from dinofuse.dataloading.readers import (
    IMAGE_SUFFIXES,
    DataError,
    WebDatasetShards,
    image_folder,
    images_under,
    webdataset_shards,
)
from dinofuse.dataloading.spec import SHUFFLE_BUFFER

# what the screen reads of a shard's member first; PIL's header parse needs more only when
# the metadata segments (EXIF, ICC profiles) are larger, and then it reads the whole member
HEADER_BYTES = 1 << 16

# the formats DALI 2.4's decoder (nvImageCodec) reads, as PIL names them (PPM: any netpbm;
# MPO: a camera's multi-picture JPEG). PIL opens more (GIF, ICO, TGA, ...) under any file
# name; DALI fails on those with a message that names no image ("nvImageCodec failure")
DALI_FORMATS = frozenset({"JPEG", "MPO", "JPEG2000", "PNG", "TIFF", "BMP", "PPM", "WEBP"})


def image_problem(source, decode: bool = True, formats: frozenset | None = None) -> str | None:
    """Why `source` (a path, or an image's bytes) cannot be read as an RGB image (None: it
    can). decode=True decodes every pixel: a truncated JPEG only fails there. decode=False
    reads the header alone (format and size): the screen, which finds what DALI 2.4's CPU
    decoder was seen to crash the process on after reporting it (a text file named .jpg,
    bytes that are no JPEG after its first marker), at ~35 us per image here. `formats`:
    the formats the reader decodes (DALI_FORMATS), any other is a problem too."""
    try:
        if (len(source) if isinstance(source, bytes) else source.stat().st_size) == 0:
            return "empty file"
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
            if formats is not None and img.format not in formats:
                return f"a {img.format} image: DALI cannot decode it, data.backend=\"torchvision\" can"
            if decode:
                img.load()
                img.convert("RGB")
    except Exception as e:
        return str(e) or type(e).__name__
    return None


def find_problems(items, problem, threads: int) -> list[tuple[object, str]]:
    """[(item, reason)] for the items `problem` finds a reason for, in `threads` threads."""
    items = list(items)
    with ThreadPoolExecutor(max(1, threads)) as pool:
        reasons = list(pool.map(problem, items))
    return [(item, why) for item, why in zip(items, reasons) if why is not None]


def check_files(paths, threads: int = 1, decode: bool = True,
                formats: frozenset | None = None) -> tuple[int, list[tuple[Path, str]]]:
    """(number readable, [(path, reason)] for the unreadable ones)."""
    paths = [Path(p) for p in paths]
    bad = find_problems(paths, lambda p: image_problem(p, decode, formats), threads)
    return len(paths) - len(bad), bad


def check_shards(shards: WebDatasetShards, threads: int, indices=None, decode: bool = True,
                 formats: frozenset | None = None) -> tuple[int, list[tuple[int, str]]]:
    """check_files for samples of WebDataset shards (all, or `indices`): (number readable,
    [(sample index, reason)]). decode=False screens headers, reading a member's first
    HEADER_BYTES only (all of it when its header is longer)."""
    indices = range(len(shards)) if indices is None else indices

    def problem(i):
        try:
            if decode:
                return image_problem(shards.read(i), formats=formats)
            head = shards.read(i, HEADER_BYTES)
            why = image_problem(head, False, formats)
            if why is not None and len(head) == HEADER_BYTES:  # the header may go on
                why = image_problem(shards.read(i), False, formats)
            return why
        except OSError as e:
            return str(e)

    bad = find_problems(indices, problem, threads)
    return len(indices) - len(bad), bad


def check_images(root: str | Path, threads: int = 0, shards: WebDatasetShards | None = None
                 ) -> tuple[int, list[tuple[Path | str, str]]]:
    """(number of readable images, [(path, reason)] for the unreadable ones) in a folder, or
    in WebDataset shards (a .tar, or a folder of them; named shard.tar:member; `shards`:
    those of `root`, already opened).

    Every image is fully decoded, so this reads the whole dataset once. An image in a format
    that PIL reads and DALI does not (GIF, ICO, ...) is listed too: DALI is the default reader.
    """
    threads = threads or os.cpu_count() or 1
    tars = webdataset_shards(root) if shards is None else shards.tars
    if tars:
        shards = shards or WebDatasetShards(tars)
        good, bad = check_shards(shards, threads, formats=DALI_FORMATS)
        return good, [(shards.name(i), why) for i, why in bad]
    root = image_folder(root)
    paths = images_under(root)
    good, bad = check_files(paths, threads, formats=DALI_FORMATS)
    if good == 0 and not bad:
        raise DataError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {root}")
    return good, bad


def class_order_note(shards: WebDatasetShards, window: int = SHUFFLE_BUFFER) -> str | None:
    """A note when labelled WebDataset shards hold their samples class by class, else None.
    DALI's reader shuffles the shards' order and draws samples from a window of the next
    `window` read: shards written from a sorted listing then give batches of few classes
    (the official sampler's batches span the whole data set). Measured as the classes that
    `window` samples in a row span, against the same labels in a shuffled order."""
    import random

    if not shards.labelled or len(shards) <= window:
        return None
    labels = shards.labels
    mixed = labels[:]
    random.Random(0).shuffle(mixed)

    def classes_per_window(order: list[int]) -> float:
        spans = [len(set(order[i:i + window])) for i in range(0, len(order) - window + 1, window)]
        return sum(spans) / len(spans)

    stored, shuffled = classes_per_window(labels), classes_per_window(mixed)
    if stored >= shuffled / 2:
        return None
    return (f"note: the shards hold their samples class by class: {window} samples in a row "
            f"span {stored:.1f} classes on average ({shuffled:.1f} in a shuffled order). The "
            f"DALI reader shuffles the shards' order and draws from a window of "
            f"data.shuffle_buffer={window} samples, so batches would span few classes: write "
            f"the shards from a shuffled list, or raise data.shuffle_buffer")
