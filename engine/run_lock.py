"""One training run per output folder: an advisory lock held while a trainer trains.

Two runs writing one folder (a job requeued while the old one still runs, a command
launched twice) would save over each other and prune each other's sharded checkpoints.
The lock is `flock` on OUTPUT_DIR/.dinofuse.lock: the kernel drops it when the process
ends, however it ends, so a crash leaves no stale lock behind. On a file system without
flock the run goes on unlocked.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path

LOCK_NAME = ".dinofuse.lock"


class RunLock:
    def __init__(self, folder: str | Path):
        self.path = Path(folder) / LOCK_NAME
        self._fd: int | None = None
        self.stamp: str | None = None  # what this holder wrote in the file

    def acquire(self) -> str | None:
        """Take the lock: None when this process holds it now, else who holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 300).decode(errors="replace").strip()
            os.close(fd)
            return holder or "another process"
        except OSError:  # no flock on this file system: unlocked, as before
            os.close(fd)
            return None
        os.ftruncate(fd, 0)
        self.stamp = (f"pid {os.getpid()} on {socket.gethostname()}, since "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S')}")
        os.write(fd, self.stamp.encode())
        self._fd = fd
        return None

    def written_by(self, stamp: str) -> bool:
        """Whether the lock file here is the one whose holder wrote `stamp` (another process,
        another node: whether this folder is the holder's)."""
        try:
            return self.path.read_text(errors="replace").strip() == stamp
        except OSError:
            return False

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
