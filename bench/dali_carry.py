"""DALI for the GPU check, carried in parts: the device tool carries at most 64 MiB a call and
DALI's wheels are 217 MiB. Installed once here (for the GPU image's Python), pruned of what
the GPU cannot use (extension modules of other Python versions, C headers) and packed with xz,
DALI, nvImageCodec and nvJPEG come to ~140 MiB: three parts, one per call, in calls right
after each other while the machine is warm (it keeps ignored files between calls).

    python -m dinofuse.bench.dali_carry pack SITE OUT_DIR [--part-mib 55] [--python 3.12]
    python -m dinofuse.bench.dali_carry unpack PARTS_DIR TARGET

`pack` writes OUT_DIR/part.1of3 ... and OUT_DIR/parts.sha256 (carry it with every part);
`unpack` installs into TARGET (a folder on PYTHONPATH) once every part listed in
parts.sha256 has arrived with its checksum, says how many are missing otherwise, and does
nothing on a second call. `make dali-parts` runs the whole preparation (README, GPU check).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import lzma
import re
import shutil
import sys
import tarfile
from pathlib import Path

SUMS = "parts.sha256"
DONE = ".dali-done"
MIB = 1 << 20


def _other_python(name: str, python: str) -> bool:
    """Extension modules built for another CPython (`x.cpython-311-...so`, `-313t-`)."""
    tag = re.search(r"\.cpython-(\d+t?)-", name)
    return tag is not None and tag.group(1) != python.replace(".", "")


def prune(site: Path, python: str) -> int:
    """Removes what the GPU image cannot use; returns the bytes removed."""
    removed = 0
    for path in sorted(site.rglob("*")):
        if not path.exists():  # inside a folder already removed
            continue
        is_headers = path.is_dir() and path.name == "include" and "nvidia" in path.parts
        if is_headers or (path.is_file() and _other_python(path.name, python)):
            files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
            removed += sum(p.stat().st_size for p in files)
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    return removed


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(MIB), b""):
            digest.update(block)
    return digest.hexdigest()


def pack(site: Path, out_dir: Path, part_mib: float = 55, python: str = "3.12") -> list[Path]:
    if not (site / "nvidia" / "dali").is_dir():
        raise SystemExit(f"{site}: no nvidia/dali inside; install DALI there first (make dali-parts)")
    removed = prune(site, python)
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in [*out_dir.glob("part.*"), out_dir / SUMS]:
        old.unlink(missing_ok=True)
    packed = io.BytesIO()
    with lzma.open(packed, "wb", preset=9) as xz, tarfile.open(fileobj=xz, mode="w") as tar:
        for path in sorted(site.rglob("*")):  # sorted and owner-free: the same bytes each time
            info = tar.gettarinfo(str(path), arcname=str(path.relative_to(site)))
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            if path.is_file() and not path.is_symlink():
                with open(path, "rb") as f:
                    tar.addfile(info, f)
            else:
                tar.addfile(info)
    data = packed.getvalue()
    count = max(1, -(-len(data) // int(part_mib * MIB)))
    size = -(-len(data) // count)  # equal parts: each call carries about the same
    parts = []
    for i in range(count):
        part = out_dir / f"part.{i + 1}of{count}"
        part.write_bytes(data[i * size:(i + 1) * size])
        parts.append(part)
    (out_dir / SUMS).write_text("".join(f"{_sha256(p)}  {p.name}\n" for p in parts))
    print(f"{site}: {removed / MIB:.1f} MiB pruned, {len(data) / MIB:.1f} MiB packed in {count} "
          f"parts of {size / MIB:.1f} MiB in {out_dir}")
    return parts


class _Joined(io.RawIOBase):
    """The parts read one after the other as one stream."""

    def __init__(self, paths):
        self._files = [open(p, "rb") for p in paths]

    def readable(self):
        return True

    def readinto(self, buffer):
        while self._files:
            n = self._files[0].readinto(buffer)
            if n:
                return n
            self._files.pop(0).close()
        return 0


def unpack(parts_dir: Path, target: Path) -> bool:
    """Installs the carried DALI into target once all parts are here; True when installed."""
    sums = parts_dir / SUMS
    if (target / DONE).is_file():
        print(f"DALI: already installed in {target}")
        return True
    if not sums.is_file():
        print(f"DALI: no {sums}: not carried")
        return False
    listed = [line.split(None, 1) for line in sums.read_text().splitlines() if line.strip()]
    missing = [name for _, name in listed if not (parts_dir / name).is_file()]
    if missing:
        print(f"DALI: {len(listed) - len(missing)} of {len(listed)} parts here "
              f"(missing: {', '.join(missing)}); installs when the rest arrive")
        return False
    corrupt = [name for digest, name in listed if _sha256(parts_dir / name) != digest]
    if corrupt:
        print(f"DALI: checksum mismatch in {', '.join(corrupt)}: not installed (carry them again)")
        return False
    target.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BufferedReader(_Joined([parts_dir / n for _, n in listed])),
                      mode="r|xz") as tar:
        tar.extractall(target, filter="data")
    (target / DONE).write_text(sums.read_text())
    print(f"DALI: {len(listed)} parts installed in {target}")
    return True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dinofuse.bench.dali_carry", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("pack", help="prune an installed DALI folder and split it into parts")
    p.add_argument("site", type=Path)
    p.add_argument("out_dir", type=Path)
    p.add_argument("--part-mib", type=float, default=55,
                   help="largest part (MiB): the device tool carries 64 MiB a call, tree included")
    p.add_argument("--python", default="3.12", help="the GPU image's Python (keeps its modules)")
    u = commands.add_parser("unpack", help="install the parts once all have arrived")
    u.add_argument("parts_dir", type=Path)
    u.add_argument("target", type=Path)
    args = parser.parse_args(argv)
    if args.command == "pack":
        pack(args.site, args.out_dir, args.part_mib, args.python)
        return 0
    unpack(args.parts_dir, args.target)
    return 0  # waiting for parts is not a failure: the GPU check goes on without DALI


if __name__ == "__main__":
    sys.exit(main())
