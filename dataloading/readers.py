"""Image sources: Fashion-MNIST IDX files (Debian's dataset-fashion-mnist) and image folders.

Every source is a map-style dataset of (PIL RGB image, label). A file that cannot be decoded
raises an error naming it.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
from PIL import Image

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


class DataError(ValueError):
    pass


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzipped or not) as a numpy array."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataError(f"{path} is not an IDX file of unsigned bytes")
    ndim = data[3]
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise DataError(f"{path}: expected {int(np.prod(shape))} values, found {body.size}")
    return body.reshape(shape)


class FashionMNIST:
    """The train (60000) or test (10000) split as (PIL RGB 28x28 image, label)."""

    classes = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
               "Sneaker", "Bag", "Ankle boot")

    def __init__(self, split: str = "train", root: Path = FASHION_MNIST_DIR):
        prefix = {"train": "train", "test": "t10k"}[split]
        images, labels = root / f"{prefix}-images-idx3-ubyte.gz", root / f"{prefix}-labels-idx1-ubyte.gz"
        if not images.is_file() or not labels.is_file():
            raise DataError(
                f"Fashion-MNIST not found in {root} (install Debian's dataset-fashion-mnist: "
                "apt-get install dataset-fashion-mnist), or train on an image folder with "
                "data.path=/path/to/images")
        self.images, self.labels = read_idx(images), read_idx(labels).astype(np.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return Image.fromarray(self.images[i], mode="L").convert("RGB"), int(self.labels[i])

    def pixels(self) -> np.ndarray:
        return self.images


def image_folder(root: str | Path) -> Path:
    """`root` as a Path, if it is a folder; else a DataError that says what it is instead."""
    root = Path(root)
    if root.is_dir():
        return root
    if root.exists():
        raise DataError(f"{root} is a file, not a folder of images (ImageFolder layout or flat)")
    raise DataError(f"image folder not found: {root}")


class ImageFiles:
    """An ImageFolder layout (one subfolder per class) or a flat folder (label 0)."""

    def __init__(self, root: str | Path):
        root = image_folder(root)
        classes = sorted(p.name for p in root.iterdir() if p.is_dir())
        if classes:
            self.samples = [(p, label) for label, c in enumerate(classes)
                            for p in sorted((root / c).rglob("*")) if p.suffix.lower() in IMAGE_SUFFIXES]
        else:
            self.samples = [(p, 0) for p in sorted(root.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]
        if not self.samples:
            raise DataError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {root}")
        self.classes = classes or [root.name]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        try:
            with Image.open(path) as img:
                return img.convert("RGB"), label
        except Exception as e:
            raise DataError(f"cannot decode image {path}: {e}") from None


def fashion_mnist_root(path: str) -> Path | None:
    """Where the Fashion-MNIST IDX files are, when `path` names them: `fashion-mnist` (the
    Debian package's folder) or a folder holding the train-*-ubyte.gz files (a copy, e.g. one
    carried to a machine without the package)."""
    if path == "fashion-mnist":
        return FASHION_MNIST_DIR
    root = Path(path)
    return root if (root / "train-images-idx3-ubyte.gz").is_file() else None


def open_images(path: str, split: str = "train"):
    """Fashion-MNIST (see `fashion_mnist_root`) or a folder of images."""
    root = fashion_mnist_root(path)
    return FashionMNIST(split, root) if root is not None else ImageFiles(path)
