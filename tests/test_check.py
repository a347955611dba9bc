"""The image checks: the full decode of `dinofuse data check` and the header screen the
trainer runs before DALI reads a file."""

import io

import numpy as np
from PIL import Image

from dinofuse.dataloading.check import HEADER_BYTES, check_files, check_shards, image_problem
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
