"""pytest-benchmark twin of `python -m dinofuse.bench.kernels`, for side-by-side tables:

    pytest bench/test_bench_kernels.py --benchmark-enable --benchmark-group-by=param:case

Same cases as the script (bench/cases.py): official sizes on a GPU, one reduced size on the
CPU. Not part of the test suite (testpaths = tests). On CUDA each round synchronizes, so the
times are wall times of complete calls; the script's GPU-kernel times come from a profiler.
"""

import pytest
import torch

from dinofuse.bench.cases import (
    EmaCase,
    LayerNormCase,
    LossCase,
    fused_loss,
    layer_norm_step,
    loss_step,
    official_loss,
)

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
LOSS_CASES = ([LossCase(b, d) for b in (256, 64) for d in (torch.bfloat16, torch.float32)]
              if CUDA else [LossCase(4, torch.float32)])
EMA_CASES = [EmaCase("vit_small16+head"), EmaCase("vit_base16+head")] if CUDA \
    else [EmaCase("vit_small16+head")]
LAYER_NORM_CASES = ([LayerNormCase(384), LayerNormCase(768), LayerNormCase(384, torch.bfloat16),
                     LayerNormCase(384, residual=True)]
                    if CUDA else [LayerNormCase(384, out_dtype=torch.float32, rows=2048),
                                  LayerNormCase(384, out_dtype=torch.float32, rows=2048, residual=True)])


def _run(benchmark, fn):
    def call():
        fn()
        if CUDA:
            torch.cuda.synchronize()

    call()  # warm-up: compiles
    benchmark.pedantic(call, rounds=20, warmup_rounds=2)


@pytest.mark.parametrize("case", LOSS_CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("variant", ["fused", "official eager", "torch.compile(official)"])
def test_loss(benchmark, case, variant):
    if variant != "official eager" and not CUDA:
        pytest.skip("fused kernels and compile rows are timed on a GPU")
    fn = {"fused": fused_loss, "official eager": official_loss,
          "torch.compile(official)": torch.compile(official_loss, dynamic=False)}[variant]
    s, t, c = case.inputs(DEVICE)
    step = loss_step(fn)
    benchmark.extra_info.update(case=case.name, floor_bytes=case.floor_bytes())
    _run(benchmark, lambda: step(s, t, c))


@pytest.mark.parametrize("case", EMA_CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("variant", ["fused", "fused (momentum tensor)", "official per-param loop",
                                     "_foreach_mul_+_foreach_add_", "_foreach_lerp_"])
def test_ema(benchmark, case, variant):
    if variant.startswith("fused") and not CUDA:
        pytest.skip("the fused EMA is timed on a GPU")
    teacher, student = case.inputs(DEVICE)
    fn = case.variants(teacher, student, DEVICE)[variant]
    benchmark.extra_info.update(case=case.name, floor_bytes=case.floor_bytes())
    _run(benchmark, lambda: fn(teacher, student))


@pytest.mark.parametrize("case", LAYER_NORM_CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("variant", ["fused", "torch (autocast's way)", "torch.compile(torch)"])
def test_layer_norm(benchmark, case, variant):
    if variant != "torch (autocast's way)" and not CUDA:
        pytest.skip("the fused kernel and compile rows are timed on a GPU")
    args, grads = case.inputs(DEVICE)
    step = layer_norm_step(case.variants()[variant])
    benchmark.extra_info.update(case=case.name, floor_bytes=case.floor_bytes())
    _run(benchmark, lambda: step(args, grads))
