"""Fashion-MNIST-shaped IDX files for tests (the layout of Debian's dataset-fashion-mnist)."""

import gzip
import struct
from pathlib import Path

import numpy as np


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def write_fashion_mnist(root: Path, train: int, test: int, size: int = 28, classes: int = 10,
                        seed: int = 0) -> dict:
    """Random images and labels as train-* and t10k-* IDX files in root; returns them by split."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    written = {}
    for prefix, n in (("train", train), ("t10k", test)):
        images, labels = rng.integers(0, 256, (n, size, size)), rng.integers(0, classes, n)
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels)
        written[prefix] = images, labels
    return written
