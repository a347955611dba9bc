"""Kernel benchmark: the fused DINO loss, EMA and LayerNorm against the official code paths, side by side.

    python -m dinofuse.bench.kernels [--out DIR] [--quick]

Loss (K=65536, 10 crops, B=64 and 256, fp32 and bf16; forward + backward): fused op, the
official eager math, torch.compile of the official math. EMA (ViT-S/16 and ViT-B/16 with a
DINO head): fused op (float and tensor momentum), the official per-parameter loop,
_foreach_mul_ + _foreach_add_, _foreach_lerp_. LayerNorm (a ViT-S/16 step's tokens at
widths 384 and 768, fp32 in and bf16 out as under autocast, and bf16 in and out; forward +
backward; and with a block's residual add before it): fused op, torch's layer norm in fp32
then the cast, torch.compile of that. Each row reports the median time, the
bytes floor over that time (GB/s), that as a share of the copy bandwidth measured in the same
run, and peak extra memory. Writes kernels.json and kernels.md into --out.
On a machine without CUDA it runs the CPU-capable rows and lists what it skipped.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import json
import statistics
import time
from pathlib import Path

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
from dinofuse.bench.meta import run_metadata, write_results
from dinofuse.kernels import ema_update_


def _time_ms(fn, device, reps: int) -> float:
    """Median milliseconds; CUDA events via triton's do_bench (it flushes L2 between runs)."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=reps, return_mode="median"))
    fn()
    times = []
    for _ in range(max(3, reps // 20)):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _peak_extra_mb(fn, device) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def _kernel_us(fn, device, calls: int = 10) -> dict[str, float]:
    """GPU microseconds of one call per kernel (torch.profiler): free of the host's launch
    overhead that the wall time includes when the GPU waits for the CPU."""
    if device.type != "cuda":
        return {}
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    return {e.key[:80]: round(e.self_device_time_total / calls, 2)
            for e in prof.key_averages() if e.self_device_time_total > 0}


def measure(fn, device, reps) -> dict:
    fn()  # warm-up (compiles)
    kernels = _kernel_us(fn, device)
    return dict(ms=_time_ms(fn, device, reps), kernels_us=kernels,
                kernel_ms=sum(kernels.values()) / 1e3 if kernels else None,
                peak_mb=_peak_extra_mb(fn, device))


def copy_bandwidth_gbs(device) -> float:
    """Device copy bandwidth, counting bytes read plus written."""
    n = (1 << 29) if device.type == "cuda" else (1 << 25)
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    ms = _time_ms(lambda: dst.copy_(src), device, reps=100)
    return 2 * src.numel() * 4 / ms / 1e6


def _row(case, variant, m: dict, floor_bytes, copy_bw):
    """Floor GB/s and % of copy bandwidth use the GPU kernel time where measured."""
    ms = m["kernel_ms"] or m["ms"]
    gbs = floor_bytes / ms / 1e6
    rnd = lambda v, n: None if v is None else round(v, n)  # noqa: E731
    return dict(case=case, variant=variant, ms=rnd(m["ms"], 4), kernel_ms=rnd(m["kernel_ms"], 4),
                floor_ms=round(floor_bytes / copy_bw / 1e6, 4), floor_gbs=round(gbs, 1),
                pct_copy_bw=round(100 * gbs / copy_bw, 1), peak_extra_mb=rnd(m["peak_mb"], 1),
                **({"kernels_us": m["kernels_us"]} if variant.startswith("fused") else {}))


def bench_loss(case: LossCase, device, copy_bw, reps, skipped, compile_ok=True):
    rows = []
    s, t, c = case.inputs(device)
    variants = {"fused": loss_step(fused_loss), "official eager": loss_step(official_loss)}
    if device.type != "cuda":
        skipped.append(f"{case.name}: fused Triton kernel (needs CUDA; on CPU the op runs the "
                       "official math, already timed as 'official eager')")
        del variants["fused"]
    if compile_ok:
        torch._dynamo.reset()
        variants["torch.compile(official)"] = loss_step(torch.compile(official_loss, dynamic=False))
    elif device.type != "cuda":
        skipped.append(f"{case.name}: torch.compile(official) (skipped on CPU: compile time)")
    # sanity: the fused loss agrees with the official math on these inputs
    with torch.no_grad():
        ref = official_loss(s.float(), t, c)
        check = {"official_loss": float(ref)}
        if "fused" in variants:
            check["fused_rel_err"] = abs(float(fused_loss(s, t, c)) - float(ref)) / abs(float(ref))
    for name, step in variants.items():
        m = measure(functools.partial(step, s, t, c), device, reps)  # s, t, c: deleted below
        rows.append(_row(case.name, name, m, case.floor_bytes(), copy_bw))
    del s, t, c
    return rows, check


def bench_ema(case: EmaCase, device, copy_bw, reps, skipped):
    rows = []
    teacher, student = case.inputs(device)
    for name, fn in case.variants(teacher, student, device).items():
        if device.type != "cuda" and name.startswith("fused"):
            skipped.append(f"{case.name}: {name} (Triton kernel needs CUDA; on CPU it is the "
                           "official loop)")
            continue
        m = measure(lambda: fn(teacher, student), device, reps)
        rows.append(_row(case.name, name, m, case.floor_bytes(), copy_bw))
    return rows


def bench_layer_norm(case: LayerNormCase, device, copy_bw, reps, skipped, compile_ok=True):
    args, grads = case.inputs(device)
    rows = []
    for name, fn in case.variants().items():
        if name == "fused" and device.type != "cuda":
            skipped.append(f"{case.name}: fused (Triton kernel needs CUDA)")
            continue
        if name.startswith("torch.compile") and not compile_ok:
            skipped.append(f"{case.name}: {name} (skipped: compile time)")
            continue
        m = measure(functools.partial(layer_norm_step(fn), args, grads), device, reps)
        rows.append(_row(case.name, name, m, case.floor_bytes(), copy_bw))
    return rows


# (V_BLOCK, BLOCK_K, warps, splits[, layout, stages, programs per SM]):
# kernels.dino_loss.StudentLaunch. The "views" shapes that led the H200 sweep at b807297,
# then the "image" layout (the fastest at acd9a6a, pipelined: now the default).
STUDENT_SWEEP = [(2, 2048, 8, None),  # the default until acd9a6a
                 (1, 2048, 8, 1), (2, 2048, 8, 1), (2, 2048, 8, 4), (1, 2048, 8, 4),
                 (2, 1024, 4, 4), (2, 1024, 4, None, "image"), (2, 512, 4, None, "image"),
                 (2, 2048, 8, None, "image"), (2, 1024, 8, 8, "image"), (1, 2048, 8, None, "image"),
                 # software-pipelined main loops (asynchronous copies, 24-61 KB of shared
                 # memory on sm_90): more bytes in flight per program
                 (2, 2048, 8, None, "views", 3), (2, 1024, 4, None, "image", 3),
                 (2, 2048, 8, None, "image", 2),
                 # around the default since acd9a6a (the row above): deeper pipeline, one
                 # view per statistics program, more slices, wider steps
                 (2, 1024, 4, None, "image", 4), (1, 1024, 4, None, "image", 3),
                 (2, 1024, 4, 8, "image", 3), (2, 2048, 8, None, "image", 3),
                 # persistent, whole rows: few rows in flight (132 SMs x programs x views x
                 # 128 KB at K=65536 bf16: 17-34 MB), so pass B's re-read may hit L2 and the
                 # student come from memory once (the 1.5x floor target needs that)
                 (1, 2048, 8, 1, "views", 1, 2), (1, 4096, 16, 1, "views", 2, 1),
                 (2, 2048, 8, 1, "views", 3, 1), (1, 8192, 16, 1, "views", 1, 1)]
# The default first; then shapes with fewer registers per thread (sm_90, as triton's JIT
# compiles them: the default 128, these 56-80; `python -m dinofuse.bench.kernel_resources`).
TEACHER_SWEEP = [dict(block_k=1024, block_r=8, rows_per_program=64, num_warps=4),
                 dict(block_k=1024, block_r=4, rows_per_program=64, num_warps=8),
                 dict(block_k=1024, block_r=2, rows_per_program=64, num_warps=4),
                 dict(block_k=2048, block_r=2, rows_per_program=64, num_warps=8),
                 dict(block_k=2048, block_r=4, rows_per_program=32, num_warps=8)]
EMA_SWEEP = [dict(chunk=16384, block=1024, num_warps=4), dict(chunk=65536, block=2048, num_warps=8),
             dict(chunk=4096, block=1024, num_warps=4), dict(chunk=32768, block=4096, num_warps=8)]

# The LayerNorm's rows per program step (forward and backward; the warps follow: ~16 elements
# per thread) and backward programs per SM (each sums its rows' weight and bias gradients).
LAYER_NORM_SWEEP = [dict(BLOCK_ROWS=4, BACKWARD_PROGRAMS_PER_SM=4), dict(BLOCK_ROWS=2, BACKWARD_PROGRAMS_PER_SM=4),
                    dict(BLOCK_ROWS=8, BACKWARD_PROGRAMS_PER_SM=4), dict(BLOCK_ROWS=4, BACKWARD_PROGRAMS_PER_SM=8),
                    dict(BLOCK_ROWS=1, BACKWARD_PROGRAMS_PER_SM=8), dict(BLOCK_ROWS=4, BACKWARD_PROGRAMS_PER_SM=2)]


@contextlib.contextmanager
def loss_launch(student=None, teacher: dict | None = None):
    """The fused loss under a student launch shape and/or teacher launch shape; the module's
    defaults come back afterwards."""
    loss_mod = importlib.import_module("dinofuse.kernels.dino_loss")
    saved_student, saved_teacher = loss_mod.STUDENT_LAUNCH_OVERRIDE, dict(loss_mod.TEACHER_LAUNCH)
    if student is not None:
        loss_mod.STUDENT_LAUNCH_OVERRIDE = student
    loss_mod.TEACHER_LAUNCH.update(teacher or {})
    try:
        yield
    finally:
        loss_mod.STUDENT_LAUNCH_OVERRIDE = saved_student
        loss_mod.TEACHER_LAUNCH.clear()
        loss_mod.TEACHER_LAUNCH.update(saved_teacher)


def _label(student=None, teacher: dict | None = None) -> str:
    parts = []
    if student is not None:
        names = ("V", "BK", "warps", "splits", "layout", "stages")[:len(student)]
        parts.append(f"{','.join(names)}={tuple(student)}")
    if teacher:
        parts.append("teacher " + ",".join(f"{k}={v}" for k, v in teacher.items()))
    return "fused " + " + ".join(parts)


def sweep_loss(case: LossCase, device, copy_bw, reps) -> list[dict]:
    """Each student launch shape, each teacher launch shape, then the fastest of each
    together (the sweep times them apart; the default should come from the pair)."""
    step = loss_step(fused_loss)
    s, t, c = case.inputs(device)

    def row(student=None, teacher=None):
        with loss_launch(student, teacher):
            m = measure(lambda: step(s, t, c), device, reps)
        return _row(case.name, _label(student, teacher), m, case.floor_bytes(), copy_bw)

    def fastest(rows, shapes):
        return min(zip(rows, shapes), key=lambda pair: pair[0]["kernel_ms"] or pair[0]["ms"])[1]

    students = [row(student=shape) for shape in STUDENT_SWEEP]
    teachers = [row(teacher=shape) for shape in TEACHER_SWEEP]
    both = row(fastest(students, STUDENT_SWEEP), fastest(teachers, TEACHER_SWEEP))
    both["variant"] = both["variant"].replace("fused ", "fused fastest pair: ", 1)
    return students + teachers + [both]


def sweep_layer_norm(case: LayerNormCase, device, copy_bw, reps) -> list[dict]:
    ln_mod = importlib.import_module("dinofuse.kernels.layer_norm")
    args, grads = case.inputs(device)
    step = layer_norm_step(case.variants()["fused"])
    default = {k: getattr(ln_mod, k) for k in LAYER_NORM_SWEEP[0]}
    rows = []
    for launch in LAYER_NORM_SWEEP:
        try:
            for k, v in launch.items():
                setattr(ln_mod, k, v)
            m = measure(lambda: step(args, grads), device, reps)
        finally:
            for k, v in default.items():
                setattr(ln_mod, k, v)
        label = ",".join(f"{k.lower()}={v}" for k, v in launch.items())
        rows.append(_row(case.name, f"fused {label}", m, case.floor_bytes(), copy_bw))
    return rows


def sweep_launch_shapes(loss_cases: list[LossCase], ema_case: EmaCase, device, copy_bw, reps,
                        layer_norm_cases: list[LayerNormCase] = ()):
    """The fused ops under each launch shape, to choose the defaults from measurements."""
    ema_mod = importlib.import_module("dinofuse.kernels.ema")
    rows = []
    for case in layer_norm_cases:  # short: before the loss sweep, which a time limit may cut
        rows += sweep_layer_norm(case, device, copy_bw, reps)
    for loss_case in loss_cases:
        rows += sweep_loss(loss_case, device, copy_bw, reps)
    teacher, student = ema_case.inputs(device)
    default = dict(ema_mod.LAUNCH)
    for launch in EMA_SWEEP:
        ema_mod.LAUNCH.update(launch)
        try:
            ema_mod._plans.clear()  # a plan holds the chunk size it was built with
            m = measure(lambda: ema_update_(teacher, student, 0.996), device, reps)
            label = ",".join(f"{k}={v}" for k, v in launch.items())
            rows.append(_row(ema_case.name, f"fused {label}", m, ema_case.floor_bytes(), copy_bw))
        finally:
            ema_mod.LAUNCH.update(default)
            ema_mod._plans.clear()
    return rows


def host_overhead_us(device) -> dict:
    """CPU time per call of each piece, timed without waiting for the GPU: where the wall
    time goes when it exceeds the GPU time."""
    if device.type != "cuda":
        return {}
    import importlib

    loss_mod = importlib.import_module("dinofuse.kernels.dino_loss")
    s, t, c = LossCase(64, torch.bfloat16).inputs(device)
    tiny = LossCase(1, torch.float32, K=16, ncrops=3).inputs(device)
    x, g = torch.empty(1, device=device), torch.ones((), device=device)
    step = loss_step(fused_loss)

    def no_grad_loss():
        with torch.no_grad():
            fused_loss(s, t, c)

    pieces = {
        "fused loss forward+backward, B=64 bf16": lambda: step(s, t, c),
        "fused loss forward only (no grad), B=64 bf16": no_grad_loss,
        "fused loss forward+backward, B=1 K=16": lambda: step(*tiny),
        "custom op dino_loss_fwd, B=1 K=16": lambda: torch.ops.dinofuse.dino_loss_fwd(
            tiny[0].detach(), tiny[1], tiny[2], 2, 0.1, 0.04, False),
        "one Triton launch (scale kernel, g=1)": lambda: loss_mod._scale_grad(x, g),
        "torch.empty": lambda: torch.empty(16, device=device),
        "torch.sum of 16 floats": lambda: x.sum(),
    }
    out = {}
    for name, fn in pieces.items():
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(20):
            fn()
        out[name] = round((time.perf_counter() - t0) / 20 * 1e6, 1)
        torch.cuda.synchronize()
    return out


def _ratios(rows):
    """Each variant's time over the fused op's time on the same case (GPU kernel time where
    measured, else wall time)."""
    key = lambda r: r["kernel_ms"] or r["ms"]  # noqa: E731
    fused = {r["case"]: key(r) for r in rows if r["variant"] == "fused"}
    for r in rows:
        if r["case"] in fused:
            r["x_of_fused_time"] = round(key(r) / fused[r["case"]], 2)
    return rows


def markdown(result) -> str:
    lines = [f"# Kernel benchmark — {result['device']}", "",
             f"date {result['date']}, commit {result['commit']}, torch {result['torch']}, "
             f"triton {result['triton']}; measured copy bandwidth "
             f"{result['copy_bandwidth_gbs']:.0f} GB/s (read + write).", "",
             "wall ms: median time of a call as the host sees it (CUDA events around it; it "
             "includes launch overhead when the GPU waits for the CPU). GPU ms: the sum of the "
             "call's kernel durations (torch.profiler). floor ms: the bytes floor (each input "
             "read once, each output written once) over the copy bandwidth. GB/s and % copy BW: "
             "floor bytes over GPU ms (wall ms on CPU). time / fused: GPU ms over the fused "
             "op's.", "",
             "| case | variant | wall ms | GPU ms | floor ms | floor GB/s | % copy BW | "
             "time / fused | peak extra MiB |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    na = lambda v: "n/a" if v is None else v  # noqa: E731
    for r in result["rows"]:
        lines.append(f"| {r['case']} | {r['variant']} | {r['ms']} | {na(r['kernel_ms'])} | "
                     f"{r['floor_ms']} | {r['floor_gbs']} | {r['pct_copy_bw']} | "
                     f"{r.get('x_of_fused_time', '')} | {na(r['peak_extra_mb'])} |")
    if result["skipped"]:
        lines += ["", "Skipped:"] + [f"- {s}" for s in result["skipped"]]
    if result.get("host_overhead_us"):
        lines += ["", "Host (CPU) time per call, not waiting for the GPU, in microseconds:", ""]
        lines += [f"- {k}: {v}" for k, v in result["host_overhead_us"].items()]
    lines += ["", "Correctness checks on the benchmark inputs:", "```",
              json.dumps(result["checks"], indent=1), "```"]
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("bench/out"), help="output folder")
    ap.add_argument("--quick", action="store_true", help="fewer repetitions and cases")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile rows")
    ap.add_argument("--sweep", action="store_true",
                    help="also time the fused ops under each launch shape (GPU only)")
    ap.add_argument("--compile-budget-s", type=float, default=300.0,
                    help="stop adding torch.compile rows once compiling took this long")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    reps = 30 if args.quick else 100

    skipped: list[str] = []
    copy_bw = copy_bandwidth_gbs(device)
    if cuda:
        # the target case (B=256 bf16) first, so a time budget cuts the others
        loss_cases = [LossCase(b, d) for b in (256, 64) for d in (torch.bfloat16, torch.float32)]
        ema_cases = [EmaCase("vit_small16+head"), EmaCase("vit_base16+head"),
                     EmaCase("vit_base16+head", torch.bfloat16)]
        layer_norm_cases = [LayerNormCase(384), LayerNormCase(768),
                            LayerNormCase(384, torch.bfloat16, torch.bfloat16),
                            LayerNormCase(384, residual=True)]
    else:
        skipped.append("loss at B=64/256 (CPU: one reduced case B=4 instead)")
        loss_cases = [LossCase(4, torch.float32)]
        ema_cases = [EmaCase("vit_small16+head")]
        skipped.append("EMA ViT-B/16 and bf16-student rows (CPU)")
        layer_norm_cases = [LayerNormCase(384, out_dtype=torch.float32, rows=2048),
                            LayerNormCase(384, out_dtype=torch.float32, rows=2048, residual=True)]
        skipped.append("LayerNorm at a ViT-S/16 step's size and bf16 (CPU: 2048 rows in fp32)")
    if args.quick and cuda:
        loss_cases = loss_cases[:1]
    rows, checks = [], {}
    started = time.perf_counter()
    for case in loss_cases:
        compile_ok = cuda and not args.no_compile
        if compile_ok and time.perf_counter() - started > args.compile_budget_s:
            compile_ok = False
            skipped.append(f"{case.name}: torch.compile(official) (over --compile-budget-s)")
        r, check = bench_loss(case, device, copy_bw, reps, skipped, compile_ok=compile_ok)
        rows += r
        checks[case.name] = check
        print(f"done: {case.name}", flush=True)
    for case in ema_cases:
        rows += bench_ema(case, device, copy_bw, reps, skipped)
        print(f"done: {case.name}", flush=True)
    for case in layer_norm_cases:
        rows += bench_layer_norm(case, device, copy_bw, reps, skipped, compile_ok=cuda and not args.no_compile)
        print(f"done: {case.name}", flush=True)
    host_us = host_overhead_us(device)
    if args.sweep and cuda:
        rows += sweep_launch_shapes([loss_cases[0], loss_cases[2]], ema_cases[1], device, copy_bw,
                                    reps, layer_norm_cases[:2])
        print("done: launch-shape sweep", flush=True)

    result = dict(
        **run_metadata(device),
        copy_bandwidth_gbs=round(copy_bw, 1), rows=_ratios(rows), skipped=skipped, checks=checks,
        host_overhead_us=host_us,
    )
    md = markdown(result)
    write_results(args.out, "kernels", result, md)
    print(md)
    return result


if __name__ == "__main__":
    main()
