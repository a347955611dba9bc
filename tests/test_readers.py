"""Image sources: Fashion-MNIST's IDX files wherever they are, and image folders."""

import gzip
import struct

import numpy as np
import pytest
from PIL import Image

from dinofuse.dataloading.readers import DataError, FashionMNIST, ImageFiles, open_images, read_idx
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


def test_idx_files_of_another_type_or_length_are_refused(tmp_path):
    """Only unsigned-byte IDX files (type 0x08) whose body holds exactly the header's count."""
    ints = tmp_path / "ints.idx"  # type 0x0C: 32-bit integers
    ints.write_bytes(bytes([0, 0, 0x0C, 1]) + struct.pack(">I", 2) + bytes(8))
    with pytest.raises(DataError, match=rf"{ints} is not an IDX file of unsigned bytes"):
        read_idx(ints)
    for name, extra in (("short", -1), ("long", 1)):
        path = tmp_path / f"{name}.idx.gz"
        with gzip.open(path, "wb") as f:
            f.write(bytes([0, 0, 0x08, 2]) + struct.pack(">2I", 3, 4) + bytes(12 + extra))
        with pytest.raises(DataError, match=rf"{path}: expected 12 values, found {12 + extra}"):
            read_idx(path)


def test_image_folders_find_nested_files_and_any_suffix_case(tmp_path):
    """ImageFolder: every image below a class folder, at any depth; a flat folder and the
    class folders alike accept upper-case suffixes (.JPG, .PNG)."""
    for rel in ("cat/a.png", "cat/more/b.JPG", "dog/c.jpeg", "dog/notes.txt"):
        (tmp_path / "tree" / rel).parent.mkdir(parents=True, exist_ok=True)
        if rel.endswith("txt"):
            (tmp_path / "tree" / rel).write_text("not an image")
        else:
            Image.new("RGB", (4, 4)).save(tmp_path / "tree" / rel, format="PNG")
    tree = ImageFiles(tmp_path / "tree")
    assert tree.classes == ["cat", "dog"]
    assert [(p.relative_to(tmp_path / "tree").as_posix(), label) for p, label in tree.samples] == \
        [("cat/a.png", 0), ("cat/more/b.JPG", 0), ("dog/c.jpeg", 1)]
    (tmp_path / "flat").mkdir()
    for name in ("x.PNG", "y.jpg"):
        Image.new("RGB", (4, 4)).save(tmp_path / "flat" / name, format="PNG")
    assert [p.name for p, _ in ImageFiles(tmp_path / "flat").samples] == ["x.PNG", "y.jpg"]
