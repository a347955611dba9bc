"""`dinofuse data check DIR`: find the files a run would fail on, before the run."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from dinofuse.dataloading.readers import IMAGE_SUFFIXES, DataError


def check_images(root: str | Path) -> tuple[int, list[tuple[Path, str]]]:
    """(number of readable images, [(path, reason)] for the unreadable ones).

    Every file with an image suffix is fully decoded (a truncated JPEG only fails there),
    so this reads the whole dataset once.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder not found: {root}")
    good, bad = 0, []
    for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
        try:
            if path.stat().st_size == 0:
                raise ValueError("empty file")
            with Image.open(path) as img:
                img.load()
                img.convert("RGB")
            good += 1
        except Exception as e:
            bad.append((path, str(e) or type(e).__name__))
    if good == 0 and not bad:
        raise DataError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {root}")
    return good, bad
