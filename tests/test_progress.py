"""Progress shown where stderr is a file: lines, so often, with the time left."""

import sys

from dinofuse.engine import progress
from dinofuse.engine.progress import Progress


def test_lines_so_often_with_the_time_left_and_the_time_it_took(capsys, monkeypatch):
    ticks = iter(range(0, 1000, 10))  # a clock that moves 10 s per reading
    monkeypatch.setattr(progress.time, "perf_counter", lambda: float(next(ticks)))
    shown = Progress(10, "features of --val, image ", unit="image", every_s=30)
    for done in range(1, 11):  # one reading each: at 10 s, 20 s, ... 100 s
        shown.update(done)
    shown.close()
    assert capsys.readouterr().err.splitlines() == [
        "features of --val, image 3/10: 0:01:10 left",
        "features of --val, image 6/10: 0:00:40 left",
        "features of --val, image 9/10: 0:00:10 left",
        "features of --val, image 10/10: done in 0:01:40"]


def test_nothing_when_disabled_and_a_bar_on_a_terminal(capsys, monkeypatch):
    shown = Progress(3, "step ", enabled=False)
    shown.update(3, {"loss": "1.0"})
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    shown = Progress(3, "step ", initial=1, unit="step")
    shown.update(3, {"loss": "1.0"})
    shown.close()
    err = capsys.readouterr().err
    assert "\r" in err and "3/3" in err and "loss=1.0" in err and "3/3:" not in err


def test_a_bar_that_goes_when_done_leaves_no_last_line(capsys, monkeypatch):
    """An epoch's progress (linear evaluation): its own line follows, so no "done in"."""
    ticks = iter(range(0, 1000, 20))
    monkeypatch.setattr(progress.time, "perf_counter", lambda: float(next(ticks)))
    shown = Progress(4, "linear: epoch 1/9, image ", every_s=50, leave=False)
    for done in range(1, 5):  # at 20, 40, 60 and 80 s
        shown.update(done)
    assert capsys.readouterr().err.splitlines() == ["linear: epoch 1/9, image 3/4: 0:00:20 left"]
