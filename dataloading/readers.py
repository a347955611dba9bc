"""Image sources: Fashion-MNIST IDX files (Debian's dataset-fashion-mnist), image folders
and WebDataset .tar shards.

Every source is a map-style dataset of (PIL RGB image, label). A file that cannot be decoded
raises an error naming it.
"""

from __future__ import annotations

import functools
import glob
import gzip
import io
import os
import re
import struct
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from dinofuse.dataloading import file_lists
from dinofuse.dataloading.atomic_files import renamed_into_place

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
# a WebDataset sample's image: the extensions DALI's reader is given (case-sensitive, its default)
WEBDATASET_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


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


def images_under(folder: Path, listing: dict | None = None) -> list[Path]:
    """The image files in `folder` and below, in torchvision ImageFolder's order (folder by
    folder in sorted order, then the names in each), following links to folders as it does.
    `listing`: a file_lists entry that notes each directory walked."""
    walk = sorted(os.walk(folder, followlinks=True))
    if listing is not None:
        for where, _, _ in walk:
            file_lists.walked(listing, where)
    return [Path(where) / name for where, _, names in walk
            for name in sorted(names) if Path(name).suffix.lower() in IMAGE_SUFFIXES]


class ImageFiles:
    """An ImageFolder layout (one subfolder per class) or a flat folder (label 0), listed
    once: the listing is kept (`file_lists`) and used again while the folder is unchanged."""

    def __init__(self, root: str | Path, listing: dict | None = None):
        """listing: another process's (`shared_listing`; under torchrun rank 0 lists for
        every rank), else the kept one, else a new one, kept."""
        self.root = root = image_folder(root)
        if listing is None:
            listing = file_lists.load(root)
            if listing is None:
                listing = self._list(root)
                file_lists.save(root, listing)
        listing = dict(listing)
        self.samples = [(root / rel, label) for rel, label in listing.pop("files")]
        self.listing = listing  # less its files (ImageNet's: ~150 MB more in every process)
        if not self.samples:
            raise DataError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {root}")
        self.classes = listing["classes"] or [root.name]

    def shared_listing(self) -> dict:
        """The listing with its files, for `ImageFiles(root, listing)` elsewhere."""
        cut = len(str(self.root).rstrip(os.sep)) + 1  # each path is root / its relative path
        return {**self.listing, "files": [(str(p)[cut:], label) for p, label in self.samples]}

    def keep_screen(self, bad: list[tuple[Path, str]]) -> None:
        """Keep the header screen's verdict [(path, reason)] with the listing."""
        index = {path: i for i, (path, _) in enumerate(self.samples)}
        self.listing["screen"] = [(index[path], why) for path, why in bad]
        file_lists.save(self.root, self.shared_listing())

    @staticmethod
    def _list(root: Path) -> dict:
        listing = file_lists.new_entry(root)
        file_lists.walked(listing, str(root))  # its classes
        classes = sorted(p.name for p in root.iterdir() if p.is_dir())
        if classes:
            samples = [(p, label) for label, c in enumerate(classes)
                       for p in images_under(root / c, listing)]
        else:
            samples = [(p, 0) for p in sorted(root.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]
        listing["classes"] = classes
        listing["files"] = [(str(p.relative_to(root)), label) for p, label in samples]
        return listing

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        return decode_rgb(path, path), label


# PIL's modes of a 16-bit grayscale image (a 16-bit PNG, TIFF or PGM)
SIXTEEN_BIT_GRAY = frozenset({"I;16", "I;16B", "I;16L", "I;16N"})


def decode_rgb(source, name) -> Image.Image:
    """The RGB image in `source` (a path or a file object), as the official loader's
    convert("RGB") gives it, except for 16-bit grayscale: convert clips its values at 255
    (a white image); it is scaled to 8 bits here (value / 257, rounded) as DALI decodes it.
    A DataError naming `name` if it cannot be decoded."""
    try:
        with Image.open(source) as img:
            if img.mode in SIXTEEN_BIT_GRAY:
                eight_bits = np.round(np.asarray(img, dtype=np.float64) / 257).astype(np.uint8)
                return Image.fromarray(eight_bits).convert("RGB")
            return img.convert("RGB")
    except Exception as e:
        raise DataError(f"cannot decode image {name}: {e}") from None


_BRACES = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"(-?\d+)\.\.(-?\d+)")
_WILDCARDS = re.compile(r"[*?[]")


def expand_braces(pattern: str) -> list[str]:
    """WebDataset's shard notation, expanded in order as its `braceexpand` does: a range
    `{000000..001281}` (zero-padded to the wider bound when either bound is), a list
    `{train,val}`, several of either in one pattern."""
    match = _BRACES.search(pattern)
    if match is None:
        return [pattern]
    body, head, tail = match.group(1), pattern[:match.start()], pattern[match.end():]
    numbers = _RANGE.fullmatch(body)
    if numbers:
        lo, hi = numbers.groups()
        padded = any(len(b.lstrip("-")) > 1 and b.lstrip("-").startswith("0") for b in (lo, hi))
        width = max(len(lo), len(hi)) if padded else 0
        step = 1 if int(hi) >= int(lo) else -1
        choices = [str(i).zfill(width) for i in range(int(lo), int(hi) + step, step)]
    elif "," in body:
        choices = body.split(",")
    else:  # `{x}`: no expansion in bash either
        return [head + "{" + body + "}" + t for t in expand_braces(tail)]
    return [head + c + t for c in choices for t in expand_braces(tail)]


def _shard_pattern(pattern: str) -> list[str]:
    """The shards a pattern names (braces in order, then glob wildcards sorted), every one an
    existing .tar file; a DataError naming the pattern otherwise."""
    tars = []
    for name in expand_braces(pattern):
        tars += sorted(glob.glob(name)) if _WILDCARDS.search(name) else [name]
    missing = [t for t in tars if not Path(t).is_file()]
    others = [t for t in tars if Path(t).is_file() and not t.endswith(".tar")]
    if not tars or missing or others:
        found = (f"{len(missing)} of its {len(tars)} shards are missing, {missing[0]} the first"
                 if missing else f"{others[0]} is no .tar file" if others else "no file matches")
        raise DataError(f"shard pattern {pattern}: {found}")
    return tars


def webdataset_shards(path: str | Path) -> list[str]:
    """The .tar shards named by `path` (one .tar, a folder holding .tar files and no folders,
    or a pattern: `train-{000000..001281}.tar` as WebDataset writes them, or wildcards as
    `shards/*.tar`), else []. A path that exists is never read as a pattern."""
    p = Path(path)
    if not p.exists() and (_WILDCARDS.search(str(path)) or _BRACES.search(str(path))):
        return _shard_pattern(str(path))
    if p.suffix == ".tar" and p.is_file():
        return [str(p)]
    if p.is_dir():
        tars = sorted(str(t) for t in p.glob("*.tar"))
        if tars and not any(c.is_dir() for c in p.iterdir()):
            return tars
    return []


def fresh_dali_index(tar: str | Path) -> Path | None:
    """The shard's DALI index, NAME.idx beside NAME.tar (`wds2idx NAME.tar NAME.idx`, a tool
    that comes with DALI), when there is one; a DataError when it is older than the shard
    (it would point DALI at the wrong bytes)."""
    index = Path(tar).with_suffix(".idx")
    if not index.is_file():
        return None
    if index.stat().st_mtime < Path(tar).stat().st_mtime:
        raise DataError(f"{index} is older than {tar}: make it again (`dinofuse data index "
                        f"{Path(tar).parent}`) or delete it")
    return index


def write_dali_indexes(tars: list[str], threads: int = 1) -> tuple[int, int]:
    """NAME.idx beside each shard without a fresh one, made by DALI's own `wds2idx` (its
    reader's format and sample grouping), each written whole then renamed: (written, already
    fresh). With them, neither DALI nor our reader walks the shards at each start."""
    from concurrent.futures import ThreadPoolExecutor

    try:
        from wds2idx import IndexCreator  # installed with DALI
    except ImportError:
        raise DataError("writing DALI's shard indexes needs nvidia-dali (its wds2idx)") from None

    def stale(tar: str) -> bool:
        try:
            return fresh_dali_index(tar) is None
        except DataError:  # older than its shard
            return True

    def write(tar: str) -> None:
        try:
            with renamed_into_place(Path(tar).with_suffix(".idx")) as tmp, \
                    IndexCreator(str(tar), str(tmp), verbose=False) as creator:
                creator.create_index()
        except (OSError, ValueError) as e:  # ValueError: "Webdataset Tar File empty"
            raise DataError(f"cannot index WebDataset shard {tar}: {e}") from None

    todo = [tar for tar in tars if stale(tar)]
    with ThreadPoolExecutor(max(1, threads)) as pool:  # each wds2idx runs GNU tar twice
        list(pool.map(write, todo))
    return len(todo), len(tars) - len(todo)


def read_at(path: str, offset: int, size: int) -> bytes:
    """`size` bytes of the file at `offset` (a member of a shard)."""
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(size)


class WebDatasetShards:
    """The images of WebDataset .tar shards, as the training reads them: members grouped
    into samples by their name up to the first dot of the file name, one image per sample
    (WEBDATASET_IMAGE_EXTS); samples without one are left out, as DALI's reader skips them.
    Labels: each sample's `.cls` (a class index, as in ImageNet shards) when every sample has
    one, else 0 (unlabelled, like a flat folder); read when first asked for. The members'
    places come from DALI's index beside a shard (NAME.idx) when there is one, else from one
    walk over the shard's headers; an image is then read at its offset."""

    def __init__(self, tars: list[str]):
        self.tars = list(tars)
        self.samples: list[tuple[str, str, int, int]] = []  # shard, member, offset, size
        self._labels_at: list[tuple[str, int, int] | None] = []  # shard, offset, size of .cls
        for tar in tars:
            index = fresh_dali_index(tar)
            members = self._read_dali_index(index) if index else self._walk(tar)
            images, classes = {}, {}
            for name, offset, size in members:
                folder, _, file_name = name.rpartition("/")
                stem, dot, ext = file_name.partition(".")
                key = f"{folder}/{stem}"
                if ext in WEBDATASET_IMAGE_EXTS and key not in images:
                    images[key] = (name, offset, size)
                elif ext == "cls":
                    classes[key] = (tar, offset, size)
            for key, (name, offset, size) in images.items():
                self.samples.append((tar, name, offset, size))
                self._labels_at.append(classes.get(key))
        if not self.samples:
            raise DataError(f"no images ({', '.join(WEBDATASET_IMAGE_EXTS)}) in the WebDataset "
                            f"shards {tars[0]}{f' and {len(tars) - 1} more' if len(tars) > 1 else ''}")
        self.labelled = all(at is not None for at in self._labels_at)

    @staticmethod
    def _walk(tar: str) -> list[tuple[str, int, int]]:
        """(name, offset, size) of the shard's files, from its headers."""
        try:
            with tarfile.open(tar) as archive:
                return [(m.name, m.offset_data, m.size) for m in archive if m.isfile()]
        except (tarfile.TarError, OSError) as e:
            raise DataError(f"cannot read WebDataset shard {tar}: {e}") from None

    @staticmethod
    def _read_dali_index(index: Path) -> list[tuple[str, int, int]]:
        """(name, offset, size) of the files DALI's index lists: after a "v1.x N" line, one
        line per sample of "ext offset size name" groups."""
        lines = index.read_text().splitlines()
        if not lines or not lines[0].startswith("v1."):
            raise DataError(f"{index} is not a DALI WebDataset index (wds2idx)")
        members = []
        for line in lines[1:]:
            fields = line.split()
            if len(fields) % 4:
                raise DataError(f"{index}: cannot read the line {line[:80]!r}")
            for k in range(0, len(fields), 4):
                members.append((fields[k + 3], int(fields[k + 1]), int(fields[k + 2])))
        return members

    @property
    def labels(self) -> list[int]:
        """Every sample's label (reads every .cls: for the class list; a sample's own label
        is read with its image)."""
        return [self.label(i) for i in range(len(self.samples))]

    @functools.cached_property
    def classes(self) -> list[str]:
        """The labels are class indices: the class list is their range (unlabelled: one
        class, named after the shards' folder). Reads every .cls, once."""
        if not self.labelled:
            return [Path(self.tars[0]).parent.name]
        return [str(c) for c in range(max(self.labels) + 1)]

    def label(self, i: int) -> int:
        if not self.labelled:
            return 0
        tar, offset, size = self._labels_at[i]
        text = read_at(tar, offset, size).strip()
        try:
            return int(text)
        except ValueError:
            raise DataError(f"{tar}: the .cls beside {self.samples[i][1]} holds {text[:20]!r}, "
                            "not a class index") from None

    def __len__(self) -> int:
        return len(self.samples)

    def name(self, i: int) -> str:
        tar, member, _, _ = self.samples[i]
        return f"{tar}:{member}"

    def read(self, i: int, limit: int | None = None) -> bytes:
        """Sample i's image bytes (the first `limit` of them)."""
        tar, _, offset, size = self.samples[i]
        return read_at(tar, offset, size if limit is None else min(size, limit))

    def __getitem__(self, i: int):
        return decode_rgb(io.BytesIO(self.read(i)), self.name(i)), self.label(i)


def patch_shard(shards: WebDatasetShards, tar: str, bad: set[int], out: Path) -> str:
    """A copy `out` of shard `tar` in which the image of each of its samples in `bad`
    (indices into `shards`) holds the bytes of the nearest readable image of the shard (of
    any shard, when none is left in it). Member names and order stay, so a reader sees the
    same samples. Written to a temporary name, then renamed; returns the copy's path."""
    from dinofuse.dataloading.check import DALI_FORMATS, image_problem

    mine = [i for i, sample in enumerate(shards.samples) if sample[0] == tar]
    good = [i for i in mine if i not in bad] or [i for i in range(len(shards)) if i not in bad]

    def readable_near(i: int) -> bytes:
        # the last readable one before it, else the first after it, decoded in full: the
        # screen reads headers, and a neighbour cut short, copied in, made DALI's next
        # failure name the sample patched already
        for g in [g for g in reversed(good) if g < i] + [g for g in good if g > i]:
            data = shards.read(g)
            if image_problem(data, formats=DALI_FORMATS) is None:
                return data
        raise DataError(f"no decodable image left in the shards of {tar}")

    replacement = {shards.samples[i][1]: readable_near(i) for i in mine if i in bad}
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with renamed_into_place(out) as tmp, tarfile.open(tar) as source, \
                tarfile.open(tmp, "w") as copy:
            for member in source:
                data = replacement.get(member.name) if member.isfile() else None
                if data is None:
                    copy.addfile(member, source.extractfile(member) if member.isfile() else None)
                else:
                    member.size = len(data)
                    copy.addfile(member, io.BytesIO(data))
    except (OSError, tarfile.TarError) as e:  # a full disk, say: one line naming the copy
        raise DataError(f"cannot make {out}, the patched copy of {tar}: {e}") from None
    return str(out)


def fashion_mnist_root(path: str) -> Path | None:
    """Where the Fashion-MNIST IDX files are, when `path` names them: `fashion-mnist` (the
    Debian package's folder) or a folder holding the train-*-ubyte.gz files (a copy, e.g. one
    carried to a machine without the package)."""
    if path == "fashion-mnist":
        return FASHION_MNIST_DIR
    root = Path(path)
    return root if (root / "train-images-idx3-ubyte.gz").is_file() else None


def open_images(path: str, split: str = "train"):
    """Fashion-MNIST (see `fashion_mnist_root`), WebDataset shards or a folder of images."""
    root = fashion_mnist_root(path)
    if root is not None:
        return FashionMNIST(split, root)
    tars = webdataset_shards(path)
    return WebDatasetShards(tars) if tars else ImageFiles(path)
