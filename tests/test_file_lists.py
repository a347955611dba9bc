"""Image folders listed once (dataloading/file_lists.py): the kept listing is the one a walk
gives, is used again while no directory changed, and is dropped when one did."""

import os
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dinofuse.dataloading import file_lists, readers
from dinofuse.dataloading.readers import ImageFiles
from test_inputs import training_input


def image(path: Path, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray((rng.random((20, 20, 3)) * 255).astype(np.uint8)).save(path)


def at_rest(root: Path) -> None:
    """Every directory under `root` dated an hour back, as a dataset that nobody writes."""
    hour_ago = time.time_ns() - 3600 * 10**9
    for where, _, _ in os.walk(root, followlinks=True):
        os.utime(where, ns=(hour_ago, hour_ago))


def walked(monkeypatch) -> list:
    """Records each walk the reader makes."""
    walks, real = [], os.walk
    monkeypatch.setattr(readers.os, "walk", lambda *a, **k: walks.append(a[0]) or real(*a, **k))
    return walks


def test_a_folder_is_listed_once_until_a_directory_changes(tmp_path, monkeypatch):
    root = tmp_path / "images"
    for i, rel in enumerate(["b/1.png", "b/deep/2.png", "a/3.jpg", "a/0.png"]):
        image(root / rel, i)
    (tmp_path / "elsewhere").mkdir()
    image(tmp_path / "elsewhere" / "9.png", 9)
    (root / "b" / "linked").symlink_to(tmp_path / "elsewhere")
    at_rest(root)
    at_rest(tmp_path / "elsewhere")
    walks = walked(monkeypatch)
    first = ImageFiles(root)
    assert walks and [p.relative_to(root).as_posix() for p, _ in first.samples] == [
        "a/0.png", "a/3.jpg", "b/1.png", "b/deep/2.png", "b/linked/9.png"]
    walks.clear()
    again = ImageFiles(root)  # from the kept listing: no walk
    assert walks == [] and again.samples == first.samples and again.classes == ["a", "b"]

    def listed_afresh():
        kept_in = str(file_lists.cache_folder())  # read before it is switched off
        monkeypatch.setenv("DINOFUSE_CACHE", "")
        try:
            return ImageFiles(root).samples
        finally:
            monkeypatch.setenv("DINOFUSE_CACHE", kept_in)

    # a file added deep down, in a linked folder, a class added: each is seen
    for change in (lambda: image(root / "b" / "deep" / "5.png", 5),
                   lambda: image(tmp_path / "elsewhere" / "8.png", 8),
                   lambda: image(root / "c" / "7.png", 7)):
        at_rest(root)
        at_rest(tmp_path / "elsewhere")
        ImageFiles(root)  # listed and kept
        walks.clear()
        ImageFiles(root)
        assert walks == []
        change()
        changed = ImageFiles(root)
        assert walks and changed.samples == listed_afresh()
    assert [label for _, label in changed.samples][-1] == 2
    # changed moments ago: walked, and not kept (a change in the same clock tick would not show)
    assert file_lists.load(root) is None
    walks.clear()
    ImageFiles(root)
    assert walks


def test_without_a_usable_cache_folders_are_listed_each_time(tmp_path, monkeypatch):
    root = tmp_path / "images"
    image(root / "c" / "0.png")
    at_rest(root)
    blocked = tmp_path / "a_file"
    blocked.write_text("")
    walks = walked(monkeypatch)
    for setting in ("", str(blocked / "cache")):  # none asked for; one that cannot be made
        monkeypatch.setenv("DINOFUSE_CACHE", setting)
        assert [p.name for p, _ in ImageFiles(root).samples] == ["0.png"]
        assert [p.name for p, _ in ImageFiles(root).samples] == ["0.png"]
    assert len(walks) == 4


def test_the_header_screen_is_kept_with_the_listing(tmp_path, monkeypatch, capsys):
    """DALI's header screen opens every file at each start; its verdict is kept with the
    listing: the next start replaces the same bad file without opening any."""
    pytest.importorskip("nvidia.dali")
    from dinofuse.dataloading import check

    root = tmp_path / "images"
    for i in range(12):
        image(root / f"{i:02d}.png", i)
    (root / "05.png").write_bytes(b"not an image")
    at_rest(root)
    first = training_input(root, 'data.backend="dali"', "data.skip_bad_images=true")
    assert capsys.readouterr().err.count("skipping undecodable image") == 1
    checked, real = [], check.check_files
    monkeypatch.setattr(check, "check_files",
                        lambda paths, *a, **k: checked.append(list(paths)) or real(paths, *a, **k))
    again = training_input(root, 'data.backend="dali"', "data.skip_bad_images=true")
    assert checked == [[root / "05.png"]]  # the bad file alone is read again
    assert again.dali_samples == first.dali_samples
    assert str(root / "05.png") not in {str(p) for p, _ in again.dali_samples}
    assert "skipping undecodable image" in capsys.readouterr().err
    image(root / "05.png", 5)  # mended in place (no rename: the folder's time stays)
    mended = training_input(root, 'data.backend="dali"', "data.skip_bad_images=true")
    assert str(root / "05.png") in {str(p) for p, _ in mended.dali_samples}
    assert "skipping" not in capsys.readouterr().err
    checked.clear()
    training_input(root, 'data.backend="dali"', "data.skip_bad_images=true")
    assert checked == []  # the verdict kept is now "none bad"


def test_the_shard_screen_is_kept_while_the_shards_are_unchanged(tmp_path, monkeypatch, capsys):
    """WebDataset shards: the screen's verdict is kept while every shard has its size and
    time; the next start patches the same bad sample without reading a header, and a shard
    written again is screened again."""
    pytest.importorskip("nvidia.dali")
    from dinofuse.dataloading import check
    from test_readers import encoded, write_shard

    shards = tmp_path / "shards"
    shards.mkdir()
    members = [[(f"{s}{i:02d}.jpg", encoded(10 * s + i)) for i in range(8)] for s in range(2)]
    members[1][3] = ("103.jpg", b"not an image")
    hour_ago = time.time_ns() - 3600 * 10**9

    def write(s, when=hour_ago):
        os.utime(write_shard(shards / f"{s}.tar", members[s]), ns=(when, when))

    for s in range(2):
        write(s)
    first = training_input(shards, 'data.backend="dali"', "data.skip_bad_images=true",
                           'run.output_dir="' + str(tmp_path / "run") + '"')
    assert capsys.readouterr().err.count("skipping undecodable image") == 1
    real = check.check_shards
    monkeypatch.setattr(check, "check_shards", lambda *a, **k: pytest.fail("screened again"))
    again = training_input(shards, 'data.backend="dali"', "data.skip_bad_images=true",
                           'run.output_dir="' + str(tmp_path / "run") + '"')
    assert again.patched == first.patched == {11}
    assert "1.tar:103.jpg" in capsys.readouterr().err
    members[0][5] = ("005.jpg", b"no image here")  # shard 0 written again (tar pads it to
    write(0, hour_ago + 10**9)  # the same size: its time tells)
    screened = []
    monkeypatch.setattr(check, "check_shards", lambda *a, **k: screened.append(1) or real(*a, **k))
    assert training_input(shards, 'data.backend="dali"', "data.skip_bad_images=true",
                          'run.output_dir="' + str(tmp_path / "run") + '"').patched == {5, 11}
    assert screened
