"""Image sources: Fashion-MNIST's IDX files wherever they are, and image folders."""

import numpy as np
from PIL import Image

from dinofuse.dataloading.readers import FashionMNIST, ImageFiles, open_images
from dinofuse.engine.config import load_config
from dinofuse.engine.eval.report import knn_datasets
from fashion_mnist_files import write_fashion_mnist, write_idx


def test_a_folder_of_fashion_mnist_files_reads_as_fashion_mnist(tmp_path):
    """A copy of the IDX files (carried to a machine without Debian's package) is Fashion-MNIST:
    its train split trains, its test split holds the k-NN queries."""
    written = write_fashion_mnist(tmp_path, train=12, test=5)
    train, test = open_images(str(tmp_path), "train"), open_images(str(tmp_path), "test")
    assert isinstance(train, FashionMNIST) and (len(train), len(test)) == (12, 5)
    image, label = test[3]
    assert image.mode == "RGB" and image.size == (28, 28) and label == written["t10k"][1][3]
    assert np.array_equal(np.asarray(image)[..., 1], written["t10k"][0][3])
    memory, queries = knn_datasets(load_config("default", [f'data.path="{tmp_path}"']))
    assert (len(memory), len(queries)) == (12, 5)


def test_a_folder_of_images_stays_an_image_folder(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", np.zeros((1, 28, 28)))  # no train split
    assert isinstance(open_images(str(tmp_path)), ImageFiles)
    assert knn_datasets(load_config("default", [f'data.path="{tmp_path}"'])) is None
