"""The kernel benchmark's figures against what they are computed from: the bytes floors by
hand count, the EMA cases' shapes against the models we train, floor GB/s, % of the copy
bandwidth and the ratios to the fused op, and the script end to end at its CPU size."""

import json

import pytest
import torch

from dinofuse.bench import kernels as bench
from dinofuse.bench.cases import EMA_MODELS, EmaCase, LossCase
from dinofuse.engine.models import vit_base, vit_small
from dinofuse.engine.models.head import DINOHead


@pytest.mark.parametrize("dtype,item", [(torch.float32, 4), (torch.bfloat16, 2)])
def test_loss_floor_reads_student_and_teacher_once_and_writes_the_gradient(dtype, item):
    case = LossCase(3, dtype, K=1000, ncrops=6)
    student, teacher = 6 * 3 * 1000 * item, 2 * 3 * 1000 * item
    assert case.floor_bytes() == student + teacher + student


@pytest.mark.parametrize("model,build,dim", [("vit_small16+head", vit_small, 384),
                                             ("vit_base16+head", vit_base, 768)])
def test_ema_cases_are_the_models_we_train(model, build, dim):
    """The EMA rows' tensors: a ViT/16 at 224 px and its DINO head at K=65536, in the order
    `parameters()` gives them (the order the trainer's EMA walks)."""
    modules = (build(patch_size=16), DINOHead(dim, 65536))
    shapes = [tuple(p.shape) for m in modules for p in m.parameters()]
    assert [tuple(s) for s in EMA_MODELS[model]] == shapes
    for dtype, item in ((torch.float32, 4), (torch.bfloat16, 2)):  # read T and S, write T
        assert EmaCase(model, dtype).floor_bytes() == sum(map(_numel, shapes)) * (4 + item + 4)


def _numel(shape):
    return torch.Size(shape).numel()


def test_row_figures_and_ratios():
    """floor ms = floor bytes over the copy bandwidth; floor GB/s = floor bytes over the GPU
    time (the wall time where there is none); % copy BW = the two bandwidths' ratio; time /
    fused = each variant over the fused op on the same case."""
    gpu = dict(ms=3.0, kernel_ms=2.0, peak_mb=1.5, kernels_us={"k": 2000.0})
    wall = dict(ms=8.0, kernel_ms=None, peak_mb=None, kernels_us={})
    rows = [bench._row("a", "fused", gpu, 4e9, 4000.0), bench._row("a", "official eager", wall, 4e9, 4000.0),
            bench._row("b", "official eager", wall, 4e9, 4000.0)]
    fused, eager, alone = bench._ratios(rows)
    assert (fused["floor_ms"], fused["floor_gbs"], fused["pct_copy_bw"]) == (1.0, 2000.0, 50.0)
    assert (eager["floor_gbs"], eager["pct_copy_bw"]) == (500.0, 12.5)
    assert fused["kernels_us"] == {"k": 2000.0} and "kernels_us" not in eager
    assert (fused["x_of_fused_time"], eager["x_of_fused_time"]) == (1.0, 4.0)
    assert "x_of_fused_time" not in alone  # no fused row on its case: no ratio


def test_copy_bandwidth_counts_bytes_read_and_written(monkeypatch):
    monkeypatch.setattr(bench, "_time_ms", lambda fn, device, reps: 2.0)
    n = 1 << 25  # the CPU size
    assert bench.copy_bandwidth_gbs(torch.device("cpu")) == pytest.approx(2 * n * 4 / 2.0 / 1e6)


def test_kernel_benchmark_runs_on_the_cpu(tmp_path):
    """`python -m dinofuse.bench.kernels` end to end at its CPU size: every row timed, the
    fused rows named as skipped (no CUDA), the JSON and Markdown written."""
    result = bench.main(["--quick", "--no-compile", "--out", str(tmp_path)])
    assert {r["variant"] for r in result["rows"]} >= {"official eager"}
    assert all(r["ms"] > 0 for r in result["rows"])
    assert any("fused Triton kernel (needs CUDA" in s for s in result["skipped"])
    (check,) = result["checks"].values()
    assert check["official_loss"] > 0
    assert json.loads((tmp_path / "kernels.json").read_text())["rows"] == result["rows"]
    assert "official eager" in (tmp_path / "kernels.md").read_text()
