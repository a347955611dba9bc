"""Files written whole or not at all: written under a temporary name beside their place, then
renamed over it (a rename within a folder is atomic), so a reader sees the old file or the
whole new one, never half of one, whatever stops the writer."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


@contextlib.contextmanager
def renamed_into_place(path: str | Path):
    """A temporary path beside `path` to write to; renamed over `path` when the block ends
    without an error, removed when it raises."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
