"""Per-iteration schedules, as the official `cosine_scheduler`: one value per iteration."""

from __future__ import annotations

import math


def cosine_schedule(base: float, final: float, epochs: int, iters_per_epoch: int,
                    warmup_epochs: float = 0, start_warmup: float = 0.0) -> list[float]:
    """Linear warmup from start_warmup to base, then final + (base - final)(1 + cos(pi i/N))/2.

    The warmup length is warmup_epochs * iters_per_epoch iterations (rounded down, as the
    official code's integer product); the cosine covers the remaining iterations.
    """
    total = epochs * iters_per_epoch
    warmup_iters = min(int(warmup_epochs * iters_per_epoch), total)
    warm = _linspace(start_warmup, base, warmup_iters)
    n = total - warmup_iters
    cosine = [final + 0.5 * (base - final) * (1 + math.cos(math.pi * i / n)) for i in range(n)]
    return warm + cosine


def _linspace(start: float, stop: float, num: int) -> list[float]:
    """numpy.linspace's float64 arithmetic, for bit-identical schedules without numpy."""
    if num <= 1:
        return [float(start)] * num
    step = (stop - start) / (num - 1)
    values = [i * step + start for i in range(num)]
    values[-1] = float(stop)
    return values
