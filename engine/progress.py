"""Progress of long work, shown by one process: tqdm's bar on a terminal; where stderr is a
file (a SLURM log, `2> log`) plain lines instead, since a bar redrawn with carriage returns
grows into one endless line there."""

from __future__ import annotations

import datetime
import sys
import time


class Progress:
    """`update(done, fields)` after each unit of work (`done` counted from the start of the
    whole job, `initial` of them before this one). On a terminal the bar moves and shows the
    fields; elsewhere a line "LABEL done/total: fields, T left" is printed, at most every
    `every_s` seconds (0: at every update), and at the last unit "..., done in T".
    `leave=False`: the bar goes when done, and no last line is printed (one of many, an
    epoch's, whose own line follows)."""

    def __init__(self, total: int, label: str, *, initial: int = 0, unit: str = "it",
                 enabled: bool = True, every_s: float = 0.0, leave: bool = True):
        self.bar = None
        if enabled and sys.stderr.isatty():
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, initial=initial, unit=unit, dynamic_ncols=True,
                                desc=label.rstrip(" :,") or None, leave=leave)
            except ImportError:
                pass
        self.lines = enabled and self.bar is None
        self.total, self.label, self.every_s, self.leave = total, label, every_s, leave
        self.first = self.last = initial
        # (the clock is read only for the lines: the training's own readings time its steps)
        self.started = self.said = time.perf_counter() if self.lines else 0.0

    def update(self, done: int, fields: dict[str, str] | None = None) -> None:
        if self.bar is not None:
            self.bar.update(done - self.last)
            if fields:
                self.bar.set_postfix(fields)
        elif self.lines:
            now = time.perf_counter()
            if now - self.said >= self.every_s or done >= self.total and self.leave:
                spent = now - self.started
                if done >= self.total:
                    when = f"done in {datetime.timedelta(seconds=round(spent))}"
                else:
                    per_unit = spent / max(1, done - self.first)
                    when = f"{datetime.timedelta(seconds=round(per_unit * (self.total - done)))} left"
                shown = [f"{name} {value}" for name, value in (fields or {}).items()]
                print(f"{self.label}{done}/{self.total}: {', '.join([*shown, when])}",
                      file=sys.stderr, flush=True)
                self.said = now
        self.last = done

    def advance(self, units: int, fields: dict[str, str] | None = None) -> None:
        self.update(self.last + units, fields)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def extraction_progress(images: int, label: str, world: int, enabled: bool,
                        leave: bool = True) -> Progress:
    """A feature extraction's progress over rank 0's share of `images` (a line every 30 s in
    a log)."""
    share = " (rank 0's share)" if world > 1 else ""
    return Progress(images, f"{label}{share}, image ", unit="image", enabled=enabled,
                    every_s=30.0, leave=leave)
