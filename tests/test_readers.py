"""Image sources: Fashion-MNIST's IDX files wherever they are, image folders and WebDataset
shards."""

import gzip
import io
from pathlib import Path
import struct
import tarfile

import numpy as np
import pytest
from PIL import Image

from dinofuse.dataloading.readers import (
    DataError,
    FashionMNIST,
    ImageFiles,
    WebDatasetShards,
    expand_braces,
    open_images,
    read_idx,
    webdataset_shards,
    write_dali_indexes,
)
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


def test_image_folders_list_what_torchvisions_image_folder_lists_in_its_order(tmp_path):
    """The official loader's samples, in its order (a folder's own files before its
    subfolders'), links to folders followed: a subset made of links to the real folders."""
    from torchvision.datasets import ImageFolder

    for rel in ("real/x/1.jpg", "real/x/0.jpg", "set/c0/z.jpg", "set/c0/a/1.jpg", "set/c0/a/b/0.PNG",
                "set/c0/0_.tif", "set/c2/notes.txt", "set/c2/k.webp"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")  # listed, not read
    (tmp_path / "set" / "c0" / "linked").symlink_to(tmp_path / "real" / "x")
    (tmp_path / "set" / "c1").symlink_to(tmp_path / "real" / "x")
    ours = ImageFiles(tmp_path / "set")
    official = ImageFolder(str(tmp_path / "set"), loader=lambda path: path)
    assert [(str(p), label) for p, label in ours.samples] == official.samples
    assert ours.classes == official.classes == ["c0", "c1", "c2"]
    assert [p.relative_to(tmp_path / "set").as_posix() for p, _ in ours.samples[:6]] == \
        ["c0/0_.tif", "c0/z.jpg", "c0/a/1.jpg", "c0/a/b/0.PNG", "c0/linked/0.jpg", "c0/linked/1.jpg"]


def write_shard(path, members):
    """A .tar of (member name, bytes), in that order."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def encoded(seed, fmt="JPEG"):
    buf = io.BytesIO()
    rng = np.random.default_rng(seed)
    Image.fromarray((rng.random((12, 10 + seed, 3)) * 255).astype(np.uint8)).save(buf, fmt)
    return buf.getvalue()


def test_webdataset_shards_hold_the_samples_dalis_reader_reads(tmp_path):
    """Members group into samples by their name up to the first dot of the file name; a
    sample's first image is its image; samples without one, other extensions (".seg.jpg")
    and upper-case ones (DALI's are case-sensitive) are left out: the same samples, in the
    same order, as the training's DALI reader yields."""
    members = [("x/0001.jpg", encoded(1)), ("x/0001.cls", b"1"), ("0002.cls", b"2"),
               ("0003.seg.jpg", encoded(3)), ("0004.JPG", encoded(4)),
               ("0005.png", encoded(5, "PNG")), ("y.z/0006.webp", encoded(6, "WEBP")),
               ("0007.jpeg", encoded(7)), ("0007.png", encoded(8, "PNG"))]
    tar = write_shard(tmp_path / "edge.tar", members)
    shards = WebDatasetShards([tar])
    expected = ["x/0001.jpg", "0005.png", "y.z/0006.webp", "0007.jpeg"]
    assert [shards.name(i) for i in range(len(shards))] == [f"{tar}:{n}" for n in expected]
    by_name = dict(members)
    for i, name in enumerate(expected):
        assert shards.read(i) == by_name[name]
        image, label = shards[i]
        assert image.mode == "RGB" and image.size == Image.open(io.BytesIO(by_name[name])).size
        assert label == 0  # not every sample has a .cls: unlabelled
    assert shards.classes == [tmp_path.name]
    try:
        from nvidia.dali import fn, pipeline_def
    except ImportError:
        return

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def reader():
        return fn.readers.webdataset(paths=[tar], ext=["jpg;jpeg;png;webp"], name="r",
                                     missing_component_behavior="skip")

    pipe = reader()
    pipe.build()
    read = [np.asarray(pipe.run()[0][0]).tobytes() for _ in range(pipe.epoch_size("r"))]
    assert read == [shards.read(i) for i in range(len(shards))]


def test_webdataset_labels_are_the_cls_class_indices(tmp_path):
    tars = [write_shard(tmp_path / f"s{k}.tar", [m for i in range(3) for m in (
        (f"{k}{i}.jpg", encoded(i)), (f"{k}{i}.cls", f" {2 * i + k}\n".encode()))])
        for k in range(2)]
    shards = open_images(str(tmp_path))
    assert isinstance(shards, WebDatasetShards)
    assert [shards[i][1] for i in range(6)] == [0, 2, 4, 1, 3, 5]
    assert shards.classes == [str(c) for c in range(6)]
    assert len(open_images(tars[1])) == 3  # one .tar alone


@pytest.mark.parametrize("members,message", [
    ([("a.jpg", b"x"), ("a.cls", b"cat")], r"s.tar: the .cls beside a.jpg holds b'cat', not a "
                                           "class index"),
    ([("a.cls", b"1"), ("b.txt", b"x")], r"no images \(jpg, jpeg, png, webp\) in the WebDataset shards .*s.tar"),
    (None, r"cannot read WebDataset shard .*s.tar"),
])
def test_broken_shards_are_named(tmp_path, members, message):
    if members is None:
        (tmp_path / "s.tar").write_text("not a tar archive " * 40)
    else:
        write_shard(tmp_path / "s.tar", members)
    with pytest.raises(DataError, match=message):
        open_images(str(tmp_path / "s.tar")).labels  # labels: read when first asked for


def test_dalis_index_beside_a_shard_gives_the_same_samples(tmp_path):
    """NAME.idx (wds2idx, DALI's tool) replaces the walk over the shard's headers: the same
    samples, offsets and labels. An index older than its shard, or not an index, is named."""
    import os
    import subprocess
    import sys

    wds2idx = Path(sys.executable).parent / "wds2idx"
    if not wds2idx.is_file():
        pytest.skip("needs DALI's wds2idx")
    members = [("x/0001.jpg", encoded(1)), ("x/0001.cls", b"1"), ("0002.cls", b"2"),
               ("0003.seg.jpg", encoded(3)), ("y.z/0006.png", encoded(6, "PNG")),
               ("y.z/0006.cls", b"0"), ("0007.jpeg", encoded(7)), ("0007.cls", b"4")]
    tar = write_shard(tmp_path / "s.tar", members)
    walked = WebDatasetShards([tar])
    subprocess.run([str(wds2idx), tar, str(tmp_path / "s.idx")], check=True, capture_output=True)
    indexed = WebDatasetShards([tar])
    assert indexed.samples == walked.samples and len(indexed) == 3
    assert indexed.labels == walked.labels == [1, 0, 4]
    os.utime(tmp_path / "s.idx", (0, 0))  # older than the shard
    with pytest.raises(DataError, match=r"s.idx is older than .*s.tar: make it again"):
        WebDatasetShards([tar])
    (tmp_path / "s.idx").write_text("not an index\n")
    with pytest.raises(DataError, match=r"s.idx is not a DALI WebDataset index"):
        WebDatasetShards([tar])


def test_dinofuse_data_index_writes_dalis_indexes_once(tmp_path, capsys):
    """`dinofuse data index DIR`: wds2idx's own index beside each shard without a fresh one
    (the bytes its command writes), read back as the same samples; fresh ones are left, a
    stale one is made again, an empty shard is named and leaves no partial file."""
    import os
    import subprocess
    import sys

    from dinofuse.engine.cli import main

    wds2idx = Path(sys.executable).parent / "wds2idx"
    if not wds2idx.is_file():
        pytest.skip("needs DALI's wds2idx")
    shards = tmp_path / "shards"
    shards.mkdir()
    tars = [write_shard(shards / f"{n}.tar", [m for i in (1, 2) for m in
                                              ((f"{n}{i}.jpg", encoded(i)), (f"{n}{i}.cls", b"%d" % i))])
            for n in "ab"]
    walked = WebDatasetShards(tars)
    assert main(["data", "index", str(shards)]) == 0
    assert capsys.readouterr().out == f"wrote 2 index(es) beside the shards in {shards}; 0 already fresh\n"
    for tar in tars:
        subprocess.run([str(wds2idx), tar, str(tmp_path / "by_hand.idx")], check=True, capture_output=True)
        assert Path(tar).with_suffix(".idx").read_bytes() == (tmp_path / "by_hand.idx").read_bytes()
    assert WebDatasetShards(tars).samples == walked.samples
    os.utime(shards / "b.idx", (0, 0))  # older than its shard
    assert write_dali_indexes(tars) == (1, 1)
    assert WebDatasetShards(tars).samples == walked.samples
    empty = write_shard(tmp_path / "empty.tar", [])
    with pytest.raises(DataError, match=r"cannot index WebDataset shard .*empty.tar"):
        write_dali_indexes([empty])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["by_hand.idx", "empty.tar", "shards"]
    assert main(["data", "index", str(tmp_path / "shards" / "a.idx")]) == 2
    assert "no WebDataset shards in" in capsys.readouterr().err
    os.utime(shards / "a.idx", (0, 0))
    assert main(["data", "index", f"{shards}/{{a,b}}.tar"]) == 0  # a pattern, as WebDataset's
    assert capsys.readouterr().out.startswith("wrote 1 index(es)")


@pytest.mark.parametrize("pattern, names", [
    ("s-{000..003}.tar", ["s-000.tar", "s-001.tar", "s-002.tar", "s-003.tar"]),
    ("s-{8..11}.tar", ["s-8.tar", "s-9.tar", "s-10.tar", "s-11.tar"]),  # no padding asked
    ("s-{1..010}", [f"s-{i:03d}" for i in range(1, 11)]),  # the wider bound's width
    ("s-{3..1}", ["s-3", "s-2", "s-1"]),
    ("{train,val}-{0..1}.tar", ["train-0.tar", "train-1.tar", "val-0.tar", "val-1.tar"]),
    ("a{b}c-{0..1}", ["a{b}c-0", "a{b}c-1"]),  # one word in braces stays, as in bash
    ("plain.tar", ["plain.tar"]),
])
def test_expand_braces_is_webdatasets_shard_notation(pattern, names):
    assert expand_braces(pattern) == names


def test_shards_named_by_a_pattern(tmp_path):
    """`train-{0000..0002}.tar` (WebDataset's notation) and `*.tar` name the shards, in the
    braces' order, wildcards sorted; a pattern naming a missing shard, a file that is no
    shard, or nothing is an error naming the pattern; a path that exists is taken as it is."""
    tars = [write_shard(tmp_path / f"train-{i:04d}.tar", [("a.jpg", encoded(i))]) for i in range(3)]
    write_shard(tmp_path / "val-0000.tar", [("a.jpg", encoded(9))])
    assert webdataset_shards(f"{tmp_path}/train-{{0000..0002}}.tar") == tars
    assert webdataset_shards(f"{tmp_path}/train-{{0002..0000}}.tar") == tars[::-1]
    assert webdataset_shards(f"{tmp_path}/train-*.tar") == tars
    assert webdataset_shards(f"{tmp_path}/{{train-000[01],val-0000}}.tar") == \
        tars[:2] + [str(tmp_path / "val-0000.tar")]
    assert len(open_images(f"{tmp_path}/train-{{0000..0001}}.tar")) == 2
    with pytest.raises(DataError, match=r"train-\{0000\.\.0004\}\.tar: 2 of its 5 shards are "
                       r"missing, .*train-0003.tar the first"):
        webdataset_shards(f"{tmp_path}/train-{{0000..0004}}.tar")
    (tmp_path / "notes.txt").write_text("")
    with pytest.raises(DataError, match=r"notes.txt is no .tar file"):
        webdataset_shards(f"{tmp_path}/*.t*")
    with pytest.raises(DataError, match=r"\*\.tgz: no file matches"):
        webdataset_shards(f"{tmp_path}/*.tgz")
    odd = write_shard(tmp_path / "odd[1]{0..1}.tar", [("a.jpg", encoded(1))])
    assert webdataset_shards(odd) == [odd]


def sixteen_bit_gray_png() -> tuple[bytes, np.ndarray]:
    """A 16-bit grayscale PNG over the whole range, and its values."""
    values = (np.random.default_rng(4).random((9, 13)) * 65535).astype(np.uint16)
    values[0, :3] = [0, 128, 65535]  # the ends, and a value that rounds to 0
    buf = io.BytesIO()
    Image.fromarray(values).save(buf, "PNG")
    return buf.getvalue(), values


def test_sixteen_bit_grayscale_is_scaled_to_eight_bits_not_clipped():
    """PIL's convert("RGB") (the official loader's) clips a 16-bit gray at 255: nearly all
    white. Our reader scales it (value / 257, rounded) as DALI does; 8-bit images are
    convert's."""
    from dinofuse.dataloading.readers import decode_rgb

    data, values = sixteen_bit_gray_png()
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    assert (np.asarray(Image.open(io.BytesIO(data)).convert("RGB")) == 255).mean() > 0.9
    rgb = np.asarray(decode_rgb(io.BytesIO(data), "x.png"))
    assert rgb.shape == (9, 13, 3) and rgb.dtype == np.uint8
    expected = np.floor(values / 257 + 0.5).astype(np.uint8)
    for c in range(3):
        np.testing.assert_array_equal(rgb[:, :, c], expected)
    assert list(rgb[0, :3, 0]) == [0, 0, 255]
    eight = encoded(2, "PNG")
    assert np.array_equal(np.asarray(decode_rgb(io.BytesIO(eight), "y.png")),
                          np.asarray(Image.open(io.BytesIO(eight)).convert("RGB")))


def test_a_patched_shard_copy_that_cannot_be_made_is_named(tmp_path):
    """A full disk or a bad folder while copying a shard: one line naming the copy (it was
    a traceback, under torchrun on rank 0 alone)."""
    from dinofuse.dataloading.readers import DataError, WebDatasetShards, patch_shard

    tar = write_shard(tmp_path / "a.tar", [("x.jpg", encoded(0)), ("y.jpg", encoded(1))])
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    with pytest.raises(DataError, match=r"^cannot make .*not-a-folder/a\.tar, the patched copy "
                                        r"of .*a\.tar: "):
        patch_shard(WebDatasetShards([tar]), tar, {0}, blocker / "a.tar")


def test_a_patched_sample_holds_the_nearest_image_that_decodes(tmp_path):
    """A bad sample takes the bytes of the nearest image before it (else after it) that
    decodes in full. The screen reads headers only: a neighbour cut short was copied in, and
    DALI's next failure named the sample patched already (the run stopped: "every image
    decodes with PIL")."""
    from dinofuse.dataloading.readers import WebDatasetShards, patch_shard

    cut = encoded(3)[:200]  # a JPEG cut short: its header reads
    tar = write_shard(tmp_path / "a.tar", [("a.jpg", encoded(0)), ("b.jpg", encoded(1)),
                                           ("c.jpg", cut), ("d.jpg", cut), ("e.jpg", encoded(4))])
    shards = WebDatasetShards([tar])
    copy = WebDatasetShards([patch_shard(shards, tar, {3}, tmp_path / "out" / "a.tar")])
    assert [copy.read(i) for i in range(5)] == [encoded(0), encoded(1), cut, encoded(1), encoded(4)]
    first = write_shard(tmp_path / "b.tar", [("a.jpg", cut), ("b.jpg", cut), ("c.jpg", encoded(2))])
    shards = WebDatasetShards([first])
    copy = WebDatasetShards([patch_shard(shards, first, {0}, tmp_path / "out" / "b.tar")])
    assert copy.read(0) == encoded(2)  # none before it: the first after it that decodes
