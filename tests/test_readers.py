"""Image sources: Fashion-MNIST's IDX files wherever they are, and image folders."""

import gzip
import struct

import numpy as np
from PIL import Image

from dinofuse.dataloading.readers import FashionMNIST, ImageFiles, open_images
from dinofuse.engine.config import load_config
from dinofuse.engine.eval.report import knn_datasets


def _write_idx(path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_a_folder_of_fashion_mnist_files_reads_as_fashion_mnist(tmp_path):
    """A copy of the IDX files (carried to a machine without Debian's package) is Fashion-MNIST:
    its train split trains, its test split holds the k-NN queries."""
    rng = np.random.default_rng(0)
    written = {}
    for prefix, n in (("train", 12), ("t10k", 5)):
        images, labels = rng.integers(0, 256, (n, 28, 28)), rng.integers(0, 10, n)
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", images)
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", labels)
        written[prefix] = images, labels
    train, test = open_images(str(tmp_path), "train"), open_images(str(tmp_path), "test")
    assert isinstance(train, FashionMNIST) and (len(train), len(test)) == (12, 5)
    image, label = test[3]
    assert image.mode == "RGB" and image.size == (28, 28) and label == written["t10k"][1][3]
    assert np.array_equal(np.asarray(image)[..., 1], written["t10k"][0][3])
    memory, queries = knn_datasets(load_config("default", [f'data.path="{tmp_path}"']))
    assert (len(memory), len(queries)) == (12, 5)


def test_a_folder_of_images_stays_an_image_folder(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", np.zeros((1, 28, 28)))  # no train split
    assert isinstance(open_images(str(tmp_path)), ImageFiles)
    assert knn_datasets(load_config("default", [f'data.path="{tmp_path}"'])) is None
