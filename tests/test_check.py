"""The image checks: the full decode of `dinofuse data check` and the header screen the
trainer runs before DALI reads a file."""

import io

import numpy as np
from PIL import Image

from dinofuse.dataloading.check import (
    DALI_FORMATS,
    HEADER_BYTES,
    check_files,
    check_images,
    check_shards,
    image_problem,
)
from dinofuse.dataloading.readers import WebDatasetShards
from test_readers import write_shard


def jpeg(icc: bytes | None = None) -> bytes:
    buf = io.BytesIO()
    pixels = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(buf, "JPEG", **({"icc_profile": icc} if icc else {}))
    return buf.getvalue()


def test_the_screen_reads_headers_and_the_check_decodes(tmp_path):
    """The screen flags what has no readable header (empty, text, bytes that are no JPEG
    after the first marker) and passes a body cut short, which only the full decode finds."""
    good = jpeg()
    files = {"good.jpg": good, "empty.jpg": b"", "text.jpg": b"<html>not found</html>",
             "marker.jpg": b"\xff\xd8\xff\xe0" + b"not a JPEG" * 5, "body.jpg": good[: len(good) * 7 // 10]}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    paths = [tmp_path / name for name in files]
    _, screened = check_files(paths, threads=2, decode=False)
    assert sorted(p.name for p, _ in screened) == ["empty.jpg", "marker.jpg", "text.jpg"]
    _, decoded = check_files(paths, threads=2)
    assert sorted(p.name for p, _ in decoded) == ["body.jpg", "empty.jpg", "marker.jpg", "text.jpg"]
    assert image_problem(good[:2000], decode=False) is None  # the header is all it reads
    assert image_problem(good[:2000]) is not None


def test_the_shard_screen_reads_a_long_header_whole(tmp_path):
    """A member's first HEADER_BYTES hold most headers; one with a larger ICC profile is read
    whole rather than flagged, and one cut inside its header is flagged."""
    long_header = jpeg(icc=bytes(3 * HEADER_BYTES // 2))
    assert image_problem(long_header[:HEADER_BYTES], decode=False) is not None  # needs more
    tar = write_shard(tmp_path / "s.tar", [("0.jpg", jpeg()), ("1.jpg", long_header),
                                           ("2.jpg", long_header[: HEADER_BYTES + 100])])
    shards = WebDatasetShards([tar])
    good, bad = check_shards(shards, threads=2, decode=False)
    assert good == 2 and [i for i, _ in bad] == [2]
    assert check_shards(shards, threads=1, indices=range(2), decode=False) == (2, [])


def encoded_as(fmt: str, **save) -> bytes:
    buf = io.BytesIO()
    pixels = (np.random.default_rng(1).random((24, 32, 3)) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(buf, fmt, **save)
    return buf.getvalue()


# PIL opens these whatever the file's name; DALI 2.4 cannot decode them
NOT_FOR_DALI = {"GIF": encoded_as("GIF"), "ICO": encoded_as("ICO"), "TGA": encoded_as("TGA")}
# and these it decodes (PPM: PIL's name for every netpbm; MPO: a camera's multi-picture JPEG)
FOR_DALI = {"JPEG": jpeg(), "PNG": encoded_as("PNG"), "TIFF": encoded_as("TIFF"),
            "BMP": encoded_as("BMP"), "PPM": encoded_as("PPM"), "WEBP": encoded_as("WEBP"),
            "MPO": encoded_as("MPO", save_all=True, append_images=[Image.new("RGB", (8, 8))])}


def test_the_screen_flags_formats_dali_cannot_decode(tmp_path):
    """A GIF named .png decodes with PIL (the torchvision path's reader) and not with DALI,
    which names no image when it fails: with DALI's formats, the screen and the full check
    list it, saying which format it is; without, they pass it."""
    assert set(FOR_DALI) == set(DALI_FORMATS) - {"JPEG2000"}  # PIL here writes no JPEG 2000
    for fmt, data in {**FOR_DALI, **NOT_FOR_DALI}.items():
        assert Image.open(io.BytesIO(data)).format == fmt
        for decode in (False, True):
            assert image_problem(data, decode) is None, fmt
            why = image_problem(data, decode, DALI_FORMATS)
            assert (why is None) == (fmt in FOR_DALI), fmt
        if fmt in NOT_FOR_DALI:
            assert why.startswith(f"a {fmt} image: DALI cannot decode it")
    names = {"a.png": NOT_FOR_DALI["GIF"], "b.jpg": jpeg(), "c.jpg": NOT_FOR_DALI["TGA"]}
    for name, data in names.items():
        (tmp_path / name).write_bytes(data)
    paths = sorted(tmp_path.iterdir())
    for decode in (False, True):
        assert check_files(paths, 2, decode) == (3, [])
        good, bad = check_files(paths, 2, decode, DALI_FORMATS)
        assert good == 1 and [p.name for p, _ in bad] == ["a.png", "c.jpg"]
    good, bad = check_images(tmp_path)  # `dinofuse data check`: DALI is the default reader
    assert good == 1 and [p.name for p, _ in bad] == ["a.png", "c.jpg"]
    tar = write_shard(tmp_path / "s.tar", [(f"{i}.jpg", data) for i, data in enumerate(names.values())])
    for decode in (False, True):
        good, bad = check_shards(WebDatasetShards([tar]), 2, decode=decode, formats=DALI_FORMATS)
        assert good == 1 and [i for i, _ in bad] == [0, 2]
    good, bad = check_images(tmp_path / "s.tar")
    assert good == 1 and [name.split(":")[1] for name, _ in bad] == ["0.jpg", "2.jpg"]
