"""The kernel benchmark's launch-shape sweep, with its clock replaced (CPU): every shape gets
a row, the module's launch defaults come back, and the pair of the fastest student and the
fastest teacher shapes is timed together."""

import importlib

import torch

from dinofuse.bench import kernels as bench
from dinofuse.bench.cases import LossCase


def test_sweep_times_the_fastest_pair_together_and_restores_the_defaults(monkeypatch):
    loss_mod = importlib.import_module("dinofuse.kernels.dino_loss")
    default_teacher = dict(loss_mod.TEACHER_LAUNCH)
    fast_student, fast_teacher = bench.STUDENT_SWEEP[3], bench.TEACHER_SWEEP[2]
    seen = []

    def fake_measure(fn, device, reps):  # faster when a chosen shape is active
        student, teacher = loss_mod.STUDENT_LAUNCH_OVERRIDE, dict(loss_mod.TEACHER_LAUNCH)
        seen.append((student, teacher))
        ms = 1.0 - 0.2 * (student == fast_student) - 0.1 * (teacher == {**default_teacher, **fast_teacher})
        return dict(ms=ms, kernel_ms=ms, peak_mb=0.0, kernels_us={})

    monkeypatch.setattr(bench, "measure", fake_measure)
    case = LossCase(2, torch.float32, K=64, ncrops=4)
    rows = bench.sweep_loss(case, torch.device("cpu"), copy_bw=1.0, reps=1)
    assert len(rows) == len(bench.STUDENT_SWEEP) + len(bench.TEACHER_SWEEP) + 1
    pair = rows[-1]
    assert pair["variant"] == "fused fastest pair: " + bench._label(fast_student, fast_teacher)[6:]
    assert pair["kernel_ms"] == 0.7 and seen[-1] == (fast_student, {**default_teacher, **fast_teacher})
    assert rows[0]["variant"] == f"fused V,BK,warps,splits={bench.STUDENT_SWEEP[0]}"
    assert loss_mod.STUDENT_LAUNCH_OVERRIDE is None and loss_mod.TEACHER_LAUNCH == default_teacher



def test_layer_norm_sweep_runs_each_launch_shape_and_restores_the_defaults(monkeypatch):
    """Each shape is active while its row is measured (and runs: the op under the
    interpreter here), and the module's defaults come back."""
    from dinofuse.bench.cases import LayerNormCase

    ln_mod = importlib.import_module("dinofuse.kernels.layer_norm")
    default = (ln_mod.BLOCK_ROWS, ln_mod.BACKWARD_PROGRAMS_PER_SM)
    seen = []

    def checked_measure(fn, device, reps):
        seen.append((ln_mod.BLOCK_ROWS, ln_mod.BACKWARD_PROGRAMS_PER_SM))
        fn()
        return dict(ms=1.0, kernel_ms=1.0, peak_mb=0.0, kernels_us={})

    monkeypatch.setattr(bench, "measure", checked_measure)
    case = LayerNormCase(24, out_dtype=torch.float32, rows=37)
    rows = bench.sweep_layer_norm(case, torch.device("cpu"), copy_bw=1.0, reps=1)
    assert seen == [(s["BLOCK_ROWS"], s["BACKWARD_PROGRAMS_PER_SM"]) for s in bench.LAYER_NORM_SWEEP]
    assert rows[0]["variant"] == "fused block_rows=4,backward_programs_per_sm=4"
    assert len({r["variant"] for r in rows}) == len(bench.LAYER_NORM_SWEEP)
    assert (ln_mod.BLOCK_ROWS, ln_mod.BACKWARD_PROGRAMS_PER_SM) == default
