"""`dinofuse data check DIR`: find the files a run would fail on, before the run."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image

from dinofuse.dataloading.readers import IMAGE_SUFFIXES, DataError, image_folder


def image_problem(path: Path) -> str | None:
    """Why `path` cannot be decoded to RGB (None: it can). Decodes the whole image: a
    truncated JPEG only fails there."""
    try:
        if path.stat().st_size == 0:
            return "empty file"
        with Image.open(path) as img:
            img.load()
            img.convert("RGB")
    except Exception as e:
        return str(e) or type(e).__name__
    return None


def check_files(paths, threads: int = 1) -> tuple[int, list[tuple[Path, str]]]:
    """(number readable, [(path, reason)] for the unreadable ones), decoding in `threads`."""
    paths = [Path(p) for p in paths]
    with ThreadPoolExecutor(max(1, threads)) as pool:
        problems = list(pool.map(image_problem, paths))
    bad = [(p, why) for p, why in zip(paths, problems) if why is not None]
    return len(paths) - len(bad), bad


def check_images(root: str | Path, threads: int = 0) -> tuple[int, list[tuple[Path, str]]]:
    """(number of readable images, [(path, reason)] for the unreadable ones) in a folder.

    Every file with an image suffix is fully decoded, so this reads the whole dataset once.
    """
    root = image_folder(root)
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    good, bad = check_files(paths, threads or os.cpu_count() or 1)
    if good == 0 and not bad:
        raise DataError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {root}")
    return good, bad
