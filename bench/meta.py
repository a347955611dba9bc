"""What every benchmark result records about where and on what code it was measured."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from pathlib import Path

import torch


def git_commit() -> str:
    if os.environ.get("DINOFUSE_COMMIT"):  # set by gpu_check.sh where the copy has no .git
        return os.environ["DINOFUSE_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, cwd=Path(__file__).parent, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()})"


def run_metadata(device: torch.device) -> dict:
    import triton

    return dict(device=device_name(device),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                commit=git_commit(), torch=torch.__version__, triton=triton.__version__)


def write_results(out: Path, stem: str, result, markdown: str | None = None) -> list[Path]:
    """OUT/STEM.json (and OUT/STEM.md when given a table); the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{stem}.json"]
    paths[0].write_text(json.dumps(result, indent=1) + "\n")
    if markdown is not None:
        paths.append(out / f"{stem}.md")
        paths[1].write_text(markdown)
    return paths
