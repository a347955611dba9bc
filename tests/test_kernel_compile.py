"""Every Triton kernel, compiled for real GPUs here without one (sm_80 and sm_90, with the
ptxas that ships with triton): the interpreter runs code the GPU compiler may reject, and
says nothing about registers. The launches are the ones the ops make (recorded, not run)."""

import json
import os
import subprocess
import sys

import pytest

# the student pass kernel of each layout; the default launch's is compiled with machine code
STUDENT_KERNELS = {"views": "_student_pass_kernel", "image": "_student_image_pass_kernel"}


def _default_student_kernel() -> str:
    from dinofuse.kernels.dino_loss import STUDENT_LAUNCH

    return STUDENT_KERNELS[STUDENT_LAUNCH.layout]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    # one process per architecture, side by side: compiling is single-threaded, and this is
    # the suite's longest setup (122 s -> 85 s with a cold triton cache on two cores)
    env = {**os.environ, "TRITON_INTERPRET": "0"}  # compiled kernels, not interpreted ones
    outs = {arch: tmp_path_factory.mktemp(f"kernel_resources_sm{arch}") for arch in (80, 90)}
    runs = {arch: subprocess.Popen([sys.executable, "-m", "dinofuse.bench.kernel_resources",
                                    "--check", "--arch", str(arch), "--out", str(out)],
                                   env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                   text=True)
            for arch, out in outs.items()}
    rows = []
    for arch, run in runs.items():
        _, stderr = run.communicate(timeout=600)
        assert run.returncode == 0, stderr[-3000:]
        rows += json.loads((outs[arch] / "kernel_resources.json").read_text())
    return rows


def test_every_kernel_compiles_for_a100_and_h100(compiled):
    import importlib

    # the kernels the modules define (under the tests' interpreter they are not JITFunctions,
    # so find them by name)
    names = {n for m in ("dinofuse.kernels.dino_loss", "dinofuse.kernels.ema",
                         "dinofuse.kernels.layer_norm", "dinofuse.kernels.bias_gelu")
             for n in vars(importlib.import_module(m)) if n.endswith("_kernel")}
    assert names and {r["kernel"] for r in compiled} == names
    for name in names:
        assert {r["arch"] for r in compiled if r["kernel"] == name} == {"sm_80", "sm_90"}
    # the other layout's kernel ran only when a swept shape asked for it
    other, = set(STUDENT_KERNELS.values()) - {_default_student_kernel()}
    assert {r["default"] for r in compiled if r["kernel"] == other} == {False}


def test_default_launches_do_not_spill_registers(compiled):
    """At the official size no default launch spills at all; at the odd shapes a register may
    be saved across the main loop (the K=262144, B=2 student pass: one store before it, one
    load after), but no spill is ever inside a loop, where it would cost every iteration."""
    defaults = [r for r in compiled if r["default"]]
    assert {r["pointers"] for r in defaults} >= {"bf16/fp32", "fp32", "fp16/fp32"}
    official = [r for r in defaults if "K=" not in r["case"]]
    assert {r["kernel"] for r in official} >= {"_teacher_pass_kernel", _default_student_kernel(),
                                               "_ema_kernel", "_layer_norm_forward_kernel",
                                               "_layer_norm_backward_kernel",
                                               "_bias_gelu_forward_kernel",
                                               "_bias_gelu_backward_kernel"}
    spilled = [(r["case"], r["kernel"], r["arch"], r["spill_bytes"], r["spill_accesses"])
               for r in official if r["spill_bytes"] or r["spill_accesses"]]
    assert not spilled
    in_loops = [(r["case"], r["kernel"], r["arch"], r["spill_accesses_in_loops"])
                for r in defaults if r["spill_accesses_in_loops"]]
    assert not in_loops
    assert all(0 < r["registers"] <= 255 for r in compiled)


SPILLING_KERNEL = """
import json, sys
import torch
import triton
import triton.language as tl
from dinofuse.bench.kernel_resources import Launch, compile_launch

@triton.jit
def _spilling_kernel(x_ptr, y_ptr, n_blocks, N: tl.constexpr):
    # one warp carrying 3 x N/32 floats per thread through a loop: over 255 registers
    offs = tl.arange(0, N)
    acc = tl.zeros([N], dtype=tl.float32)
    for i in range(n_blocks):
        x = tl.load(x_ptr + i * N + offs)
        y = tl.exp(x - tl.max(x, axis=0))
        acc += y / tl.sum(y, axis=0) + x
    tl.store(y_ptr + offs, acc)

x = torch.zeros(4 * 8192)
launch = Launch(_spilling_kernel, (x, torch.zeros_like(x), 4), dict(N=8192, num_warps=1))
print(json.dumps(compile_launch(launch, int(sys.argv[1]))))
"""


def test_the_spill_figures_see_a_kernel_that_spills(tmp_path):
    """ptxas spills into the stack frame, which cuobjdump reports apart from LOCAL: a report
    that read LOCAL alone said 0 for every kernel, spilling or not."""
    script = tmp_path / "spilling_kernel.py"  # triton.jit reads the kernel's source file
    script.write_text(SPILLING_KERNEL)
    run = subprocess.run([sys.executable, str(script), "90"], capture_output=True, text=True,
                         env={**os.environ, "TRITON_INTERPRET": "0"}, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    row = json.loads(run.stdout.splitlines()[-1])
    assert row["spill_bytes"] >= 1024, row
    assert row["spill_accesses"] >= row["spill_accesses_in_loops"] > 0, row


def test_kernel_resources_refuses_the_interpreter():
    from dinofuse.bench import kernel_resources

    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=0"):
        with kernel_resources.recording():
            pass


def test_the_loss_streams_with_128_bit_accesses_at_the_official_size(compiled):
    """K=65536, B=256: every load and store in the loss kernels' main loops is 128-bit, as
    under triton's JIT (which marks 16-byte-aligned pointers and sizes divisible by 16).
    A compile without those marks gives one 2-byte access per element and a report that
    describes no real launch."""
    rows = [r for r in compiled if r["default"] and r["case"].startswith("loss ")
            and "K=" not in r["case"] and r["kernel"] != "_scale_inplace_kernel"]
    assert {r["kernel"] for r in rows} >= {"_teacher_pass_kernel", "_student_stats_kernel",
                                           _default_student_kernel()}
    for r in rows:
        assert r["loop_loads"] > 0 and r["loop_wide_loads"] == r["loop_loads"], r
        assert r["loop_wide_stores"] == r["loop_stores"] or r["kernel"] == "_teacher_pass_kernel", r
        assert 0 < r["instructions_per_element"] < 40, r


def test_launch_specialization_without_triton_s_own_function(monkeypatch):
    """Where triton lacks `native_specialize_impl` (other versions), the written-out rules
    give the same types and marks."""
    import builtins

    import torch
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.nvidia.compiler import CUDABackend

    from dinofuse.bench.kernel_resources import specialize

    values = [1, 16, 17, 48, 2**40, 2**40 + 1, -32, 0.5, True, False, torch.zeros(8),
              torch.zeros(9)[1:], torch.zeros(8, dtype=torch.bfloat16), torch.zeros(4, dtype=torch.int64)]
    flags = [(s, a) for s in (True, False) for a in (True, False)]
    native = [native_specialize_impl(CUDABackend, v, False, s, a) for s, a in flags for v in values]
    real_import = builtins.__import__

    def without_native(name, globals=None, locals=None, fromlist=(), level=0):
        if name == "triton._C.libtriton" and "native_specialize_impl" in (fromlist or ()):
            raise ImportError("not in this triton")
        return real_import(name, globals, locals, fromlist, level)

    monkeypatch.setattr(builtins, "__import__", without_native)
    assert [specialize(v, s, a) for s, a in flags for v in values] == native


def test_the_main_loop_is_the_longest_innermost_one():
    """A persistent program's walk over its work is a loop around the column loops: counting
    it would put the per-group setup (scalar loads) into the per-element figures."""
    from dinofuse.bench.kernel_resources import main_loop

    sass = "\n".join(f"/*{address:04x}*/ {text} ;" for address, text in [
        (0x00, "LDG.E R2, desc[UR4][R4.64]"),  # outer loop: per-group setup, a scalar load
        (0x10, "LDG.E.128 R8, desc[UR4][R6.64]"),  # inner loop 1: two instructions
        (0x20, "BRA 0x10"),
        (0x30, "LDG.E.128 R8, desc[UR4][R6.64]"),  # inner loop 2: the longest innermost
        (0x40, "MUFU.EX2 R9, R8"),
        (0x50, "STG.E.128 desc[UR4][R6.64], R8"),
        (0x60, "BRA 0x30"),
        (0x70, "BRA 0x0"),
    ])
    assert main_loop(sass) == dict(loop_instructions=4, loop_exp2=1, loop_loads=1,
                                   loop_wide_loads=1, loop_stores=1, loop_wide_stores=1)
