"""Image folders listed once: the listing, and the header screen's verdict on its files, kept
in a cache file and used again while no directory of the folder has changed. WebDataset
shards: the header screen's verdict on their samples, kept while every shard keeps its size
and time.

Listing ImageNet (1.28M files in 1000 folders) costs seconds on a local disk and minutes on
a network file system, at every start, on every rank; the header screen opens every file. A
folder's entry holds its classes, its files (relative paths and labels, in ImageFolder's
order), each directory walked with its modification time, and, once a run screened them,
the files the screen found bad. It is valid while every directory still has that time: a
file added, removed or renamed anywhere changes the time of its directory. (A file rewritten
in place changes no directory: `dinofuse data check` still reads everything.) A directory
changed within `RACY_S` seconds before the listing is not trusted (a change in the same
clock tick leaves its time as it was), and such a listing is not kept.

Where: $DINOFUSE_CACHE, else $XDG_CACHE_HOME/dinofuse, else ~/.cache/dinofuse;
DINOFUSE_CACHE="" keeps nothing. A cache that cannot be read or written is passed over.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import time
from pathlib import Path

from dinofuse.dataloading.atomic_files import renamed_into_place

FORMAT = 1
RACY_S = 2.0


def cache_folder() -> Path | None:
    """The folder of the cache files, or None when DINOFUSE_CACHE is set empty."""
    chosen = os.environ.get("DINOFUSE_CACHE")
    if chosen is not None:
        return Path(chosen) if chosen else None
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "dinofuse"


def _kept(kind: str, paths: list[Path]) -> Path | None:
    """The cache file of an entry of `kind` about these paths (by their resolved names)."""
    folder = cache_folder()
    if folder is None:
        return None
    key = hashlib.sha256("\n".join(str(Path(p).resolve()) for p in paths).encode())
    return folder / kind / f"{key.hexdigest()[:24]}.json.gz"


def _entry_path(root: Path) -> Path | None:
    return _kept("image-folders", [root])


def _mtime_ns(path: Path) -> int | None:
    try:
        return os.stat(path).st_mtime_ns  # a link to a folder: the folder's time
    except OSError:
        return None


def _read(path: Path | None) -> dict | None:
    """A kept entry of this format, or None (none kept, unreadable, another format)."""
    if path is None or not path.is_file():
        return None
    try:
        with gzip.open(path, "rt") as f:
            entry = json.load(f)
    except (OSError, ValueError, EOFError):
        return None
    return entry if isinstance(entry, dict) and entry.get("format") == FORMAT else None


def load(root: Path) -> dict | None:
    """The folder's entry, if there is one and no directory it walked has changed since."""
    entry = _read(_entry_path(root))
    if entry is None or entry.get("root") != str(root.resolve()):
        return None
    for where, mtime in entry["dirs"]:
        if _mtime_ns(Path(where)) != mtime:
            return None
    return entry


def save(root: Path, entry: dict) -> None:
    """Keep the entry (written whole, then renamed); a listing made while its folder was
    changing is not kept."""
    path = _entry_path(root)
    if path is None:
        return
    if not entry["dirs"] or max(m for _, m in entry["dirs"]) > entry["listed_ns"] - RACY_S * 1e9:
        return
    _write(path, entry)


def _write(path: Path, entry: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with renamed_into_place(path) as tmp, gzip.open(tmp, "wt") as f:
            json.dump(entry, f)
    except OSError:  # a cache folder that cannot be written: the next start does the work again
        pass


def new_entry(root: Path) -> dict:
    """An entry to fill: its time is taken before anything is listed."""
    return {"format": FORMAT, "root": str(root.resolve()), "listed_ns": time.time_ns(),
            "dirs": [], "classes": [], "files": [], "screen": None}


def walked(entry: dict, where: str) -> None:
    """Note a directory the listing walked (its absolute path), with its time now."""
    mtime = _mtime_ns(Path(where))
    if mtime is not None:
        entry["dirs"].append((os.path.abspath(where), mtime))


def _shards_entry_path(tars: list[str]) -> Path | None:
    return _kept("shard-screens", tars)


def _shard_stamps(tars: list[str]) -> list | None:
    try:
        stats = [os.stat(t) for t in tars]
    except OSError:
        return None
    return [(st.st_size, st.st_mtime_ns) for st in stats]


def shard_screen(tars: list[str]) -> list | None:
    """The screen's verdict [(sample, reason)] on these shards, kept from an earlier start,
    if every shard still has the size and time it had then."""
    entry, stamps = _read(_shards_entry_path(tars)), _shard_stamps(tars)
    if entry is None or stamps is None or [tuple(s) for s in entry["stamps"]] != stamps:
        return None
    return [(int(i), why) for i, why in entry["bad"]]


def keep_shard_screen(tars: list[str], bad: list, started_ns: int) -> None:
    """Keep the verdict of a screen that started at `started_ns` (shards written within
    RACY_S seconds before it are not trusted: not kept)."""
    path, stamps = _shards_entry_path(tars), _shard_stamps(tars)
    if path is None or not stamps or max(m for _, m in stamps) > started_ns - RACY_S * 1e9:
        return
    _write(path, {"format": FORMAT, "stamps": stamps, "bad": [(int(i), why) for i, why in bad]})
