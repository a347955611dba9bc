"""Where a fused op runs: Triton on CUDA, Triton's interpreter on CPU, or the reference."""

from __future__ import annotations

import os

import torch
from torch.distributed.tensor import DTensor

# `triton.jit` reads TRITON_INTERPRET when a kernel is defined, so the choice is made once,
# at import: set the variable before importing dinofuse.kernels.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def runs_triton(tensor: torch.Tensor) -> bool:
    """True when `tensor`'s device runs our Triton kernels (CUDA, or CPU under the interpreter)."""
    if tensor.device.type == "cuda":
        return True
    return INTERPRET and tensor.device.type == "cpu"


def next_power_of_2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_float(name: str, tensor: torch.Tensor, dtypes=FLOAT_DTYPES) -> None:
    if tensor.dtype not in dtypes:
        allowed = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"{name} must be one of {allowed}; got {tensor.dtype}")


def local_shard(t: torch.Tensor) -> torch.Tensor:
    """The local shard of an FSDP2 DTensor (no communication), else the tensor itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def new_output(shape, like: torch.Tensor, dtype: torch.dtype, poison: bool = False) -> torch.Tensor:
    """A kernel's output buffer on `like`'s device; NaN-filled when `poison` (the tests set
    it, so an element a kernel fails to write shows up instead of passing on stale memory)."""
    if poison:
        return torch.full(shape, float("nan"), dtype=dtype, device=like.device)
    return torch.empty(shape, dtype=dtype, device=like.device)


def multiprocessors(device: torch.device) -> int | None:
    """The CUDA device's SM count; None elsewhere (the interpreter)."""
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).multi_processor_count


def row_split(n_rows: int, block_rows: int, programs_per_sm: int, device: torch.device,
              col_blocks: int = 1, elsewhere: int = 4) -> tuple[int, int]:
    """(programs, rows per program) for a backward that walks its rows in blocks and keeps
    per-program partial sums of a parameter's gradient: `programs_per_sm` per SM shared by
    `col_blocks` column blocks on CUDA, `elsewhere` programs under the interpreter (few, each
    walking many rows); rows per program a whole number of blocks, so no row is summed twice."""
    sms = multiprocessors(device)
    wanted = max(1, sms * programs_per_sm // col_blocks) if sms else elsewhere
    programs = max(1, min(wanted, _cdiv(n_rows, block_rows)))
    rows_per_program = _cdiv(_cdiv(n_rows, programs), block_rows) * block_rows
    return _cdiv(n_rows, rows_per_program), rows_per_program


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)
