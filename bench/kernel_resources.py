"""Compile the fused ops' Triton kernels for NVIDIA GPUs without one, and report what the
compiler gives each kernel: registers per thread, spilled bytes, shared memory, and for its
main loop the instructions per element, exp2s and how many accesses are 128-bit.

Spills: ptxas puts spilled registers in the thread's stack frame (cuobjdump's STACK), not in
its LOCAL figure (static local arrays, which triton does not declare), and reaches them with
STL/LDL instructions. The report counts both the bytes (stack + local) and those instructions.

The Triton interpreter (how the CPU tests run the kernels) is plain Python: it accepts code
that the GPU compiler rejects (a module-level float inside a kernel was caught only on a
GPU once), and it says nothing about registers. Here each launch the ops would make at a
given size is recorded instead of run, then compiled ahead of time for sm_80 (A100) and
sm_90 (H100/H200) with the compiler that ships with triton (ptxas included); cuobjdump reads
the resources from the binary.

    TRITON_INTERPRET=0 python -m dinofuse.bench.kernel_resources [--arch 80,90] [--out DIR]

Must run with TRITON_INTERPRET unset or 0 (the kernels must be compiled objects).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from dinofuse.bench.meta import write_results

LOSS = importlib.import_module("dinofuse.kernels.dino_loss")
EMA = importlib.import_module("dinofuse.kernels.ema")
LAYER_NORM = importlib.import_module("dinofuse.kernels.layer_norm")
BIAS_GELU = importlib.import_module("dinofuse.kernels.bias_gelu")
RUNTIME = importlib.import_module("dinofuse.kernels._runtime")
multiprocessors = RUNTIME.multiprocessors
H100_SMS = 132  # the backward's row split as an H100 would make it (its program count)


@dataclass
class Launch:
    """One kernel launch as the op would make it: the kernel, its arguments, launch options."""

    kernel: object  # a triton JITFunction
    args: tuple
    kwargs: dict

    @property
    def name(self) -> str:
        return self.kernel.__name__

    def signature(self) -> tuple[dict, dict, dict, dict]:
        """(argument types, constexpr values, divisibility attributes, launch options) for
        triton.compile, specialized as triton's JIT specializes a launch: pointers aligned to
        16 bytes and integers divisible by 16 are marked so (what lets loads and stores
        vectorize), integers equal to 1 become constants. Without the marks every load
        compiles to one scalar access per element, and the report describes no real launch."""
        from triton.backends.nvidia.compiler import CUDABackend

        options = {k: self.kwargs[k] for k in ("num_warps", "num_stages") if k in self.kwargs}
        values = dict(zip((p.name for p in self.kernel.params), self.args))
        values.update({k: v for k, v in self.kwargs.items() if k not in options})
        types, constants, attrs = {}, {}, {}
        for i, p in enumerate(self.kernel.params):
            v = values[p.name]
            if p.is_constexpr:
                types[p.name], constants[p.name] = "constexpr", v
                continue
            if not isinstance(v, (torch.Tensor, bool, int, float)):
                raise TypeError(f"{self.name}: argument {p.name} of type {type(v).__name__}")
            kind, desc = specialize(v, not p.do_not_specialize, not p.do_not_specialize_on_alignment)
            if kind == "constexpr":  # an integer 1
                types[p.name], constants[p.name] = "constexpr", desc
                continue
            types[p.name] = kind
            if desc:
                attrs[(i,)] = CUDABackend.parse_attr(desc)
        return types, constants, attrs, options


def specialize(value, specialize: bool, align: bool) -> tuple[str, object]:
    """(type, marks) of one argument as triton's JIT specializes it: its own function where
    this triton has it, else the same rules written out (pointers aligned to 16 bytes and
    integers divisible by 16 get "D", an integer 1 becomes a constant)."""
    try:
        from triton._C.libtriton import native_specialize_impl
        from triton.backends.nvidia.compiler import CUDABackend

        return native_specialize_impl(CUDABackend, value, False, specialize, align)
    except ImportError:
        pass
    if isinstance(value, bool):
        return "u1", None
    if isinstance(value, torch.Tensor):
        kind = "*" + {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
                      torch.int64: "i64", torch.int32: "i32"}[value.dtype]
        divisible = value.data_ptr() % 16 == 0
    elif isinstance(value, int):
        if specialize and value == 1:
            return "constexpr", 1
        kind, divisible = ("i32" if -2**31 <= value < 2**31 else "i64"), value % 16 == 0
    else:
        return "fp32", None
    if not specialize:
        return kind, None
    return kind, "D" if align and divisible else ""


class _Recorder:
    """Stands in for a kernel: `kernel[grid](*args, **kwargs)` records instead of launching."""

    def __init__(self, kernel, launches: list[Launch]):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append(Launch(self.kernel, args, kwargs))


@contextlib.contextmanager
def recording():
    """Inside, the fused ops run on CPU tensors and record their kernel launches (no math
    happens: outputs hold garbage)."""
    from triton.runtime.jit import JITFunction

    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("kernel_resources compiles the kernels: run it with TRITON_INTERPRET=0")
    launches: list[Launch] = []
    saved = {}
    for module in (LOSS, EMA, LAYER_NORM, BIAS_GELU):
        saved[module, "runs_triton"] = module.runs_triton
        module.runs_triton = lambda t: True
        for name, obj in vars(module).items():
            if isinstance(obj, JITFunction) and name.endswith("_kernel"):
                saved[module, name] = obj
                setattr(module, name, _Recorder(obj, launches))
    EMA._plans.clear()  # a cached plan would skip its launches' recording
    try:
        yield launches
    finally:
        for (module, name), obj in saved.items():
            setattr(module, name, obj)
        EMA._plans.clear()


_compiled: dict[str, tuple[dict, bytes, dict]] = {}  # a signature compiles once per process


def compile_launch(launch: Launch, arch: int, machine_code: bool = True) -> dict:
    """Compile one launch for sm_<arch>; its registers, spill bytes (stack frame and local
    memory), shared memory and, with `machine_code` (a disassembly, about a second per
    kernel), the STL/LDL instructions that reach the spills and the main-loop counts
    (`main_loop`)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    types, constants, attrs, options = launch.signature()
    key = repr((launch.name, sorted(types.items()), sorted(map(str, constants.items())),
                sorted(attrs), sorted(options.items()), arch))
    if key not in _compiled:
        compiled = triton.compile(ASTSource(launch.kernel, types, constants, attrs),
                                  target=GPUTarget("cuda", arch, 32), options=options)
        pointers = sorted({t[1:] for t in types.values() if t.startswith("*")})
        row = dict(kernel=launch.name, arch=f"sm_{arch}", num_warps=options.get("num_warps", 4),
                   pointers="/".join(pointers), constants={k: str(v) for k, v in constants.items()},
                   **resource_usage(compiled.asm["cubin"]))
        # triton's shared memory is dynamic (pipelined loops, reductions): not in the binary
        row["shared_bytes"] = max(row["shared_bytes"], compiled.metadata.shared)
        _compiled[key] = row, compiled.asm["cubin"], constants
    row, cubin, constants = _compiled[key]
    if machine_code and "loop_instructions" not in row:
        sass = _cuobjdump(cubin, "-sass")
        row.update(spill_accesses(sass))
        loop = main_loop(sass)
        elements = ELEMENTS_PER_ITERATION.get(launch.name)
        if elements is not None and loop["loop_instructions"]:
            per_thread = elements(constants) / (32 * row["num_warps"])
            loop["instructions_per_element"] = round(loop["loop_instructions"] / per_thread, 2)
        row.update(loop)
    return dict(row)


# Elements of the main array one main-loop iteration handles per program (per thread: over
# 32 x num_warps): what turns the loop's instruction count into instructions per element.
ELEMENTS_PER_ITERATION = {
    "_student_stats_kernel": lambda c: c["V_BLOCK"] * c["BLOCK_K"],
    "_student_pass_kernel": lambda c: c["V_BLOCK"] * c["BLOCK_K"],
    "_student_image_pass_kernel": lambda c: c["NCROPS"] * c["BLOCK_K"],  # student elements
    "_teacher_pass_kernel": lambda c: c["BLOCK_R"] * c["BLOCK_K"],
    "_scale_inplace_kernel": lambda c: c["BLOCK"],
    "_ema_kernel": lambda c: c["BLOCK"],
}


def _code(sass: str) -> list[tuple[int, str]]:
    """(address, instruction) pairs of cuobjdump's SASS listing."""
    return [(int(a, 16), text.strip()) for a, text in
            re.findall(r"/\*([0-9a-f]{4,6})\*/\s+([^;]*);", sass)]


def _opcode(text: str) -> str:
    return text.split()[1] if text.startswith("@") else text.split()[0]  # past a predicate


def _loops(code: list[tuple[int, str]]) -> set[tuple[int, int]]:
    """Each loop as the span (first, last address) of a backward branch."""
    loops = set()
    for address, text in code:
        target = re.search(r"\bBRA\s+(?:`\(.*?\)\s*)?0x([0-9a-f]+)", text)
        if target and int(target.group(1), 16) < address:
            loops.add((int(target.group(1), 16), address))
    return loops


def main_loop(sass: str) -> dict:
    """The longest innermost loop of the kernel's machine code (a backward branch's span
    holding no other loop; an outer loop, such as a persistent program's walk over its
    work, would count its setup as per-element work): its instructions, exp2s (MUFU.EX2),
    and global loads/stores with how many are 128-bit (vectorized; scalar accesses cost
    one instruction per element)."""
    code = _code(sass)
    loops = _loops(code)
    innermost = [(a, b) for a, b in loops
                 if not any(a <= c and d <= b and (c, d) != (a, b) for c, d in loops)]
    best = max(innermost, key=lambda span: span[1] - span[0], default=(0, -1))
    opcodes = [_opcode(text) for address, text in code if best[0] <= address <= best[1]]
    return dict(loop_instructions=len(opcodes),
                loop_exp2=sum(o.startswith("MUFU.EX2") for o in opcodes),
                loop_loads=len(loads := [o for o in opcodes  # LDGSTS: asynchronous copies
                                         if o.startswith("LDG") and o != "LDGDEPBAR"]),
                loop_wide_loads=sum(o.endswith(".128") for o in loads),
                loop_stores=sum(o.startswith("STG") for o in opcodes),
                loop_wide_stores=sum(o.startswith("STG") and o.endswith(".128") for o in opcodes))


def spill_accesses(sass: str) -> dict:
    """The STL/LDL instructions (stores to and loads from the stack frame, where ptxas puts
    spilled registers): in the whole kernel, and inside any loop (a cost per iteration, where
    a register saved across a loop costs one store and one load per program)."""
    code = _code(sass)
    loops = _loops(code)
    spills = [a for a, text in code if _opcode(text).split(".")[0] in ("STL", "LDL")]
    return dict(spill_accesses=len(spills),
                spill_accesses_in_loops=sum(any(lo <= a <= hi for lo, hi in loops) for a in spills))


def _cuobjdump(cubin: bytes, flag: str) -> str:
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([str(tool), flag, f.name], check=True, capture_output=True,
                              text=True).stdout


def resource_usage(cubin: bytes) -> dict:
    text = _cuobjdump(cubin, "--dump-resource-usage")
    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", text)
    if not found:
        raise RuntimeError(f"cuobjdump gave no resource line:\n{text}")
    regs, stack, shared, local = map(int, found.groups())
    return dict(registers=regs, shared_bytes=shared, spill_bytes=stack + local)


def loss_launches(K: int, B: int, ncrops: int, G: int, dtype: torch.dtype,
                  student_launch=None) -> list[Launch]:
    """The loss's launches (forward with gradient, then a backward scale) at this size."""
    student = torch.zeros(ncrops * B, K, dtype=dtype, requires_grad=True)
    teacher = torch.zeros(G * B, K, dtype=dtype)
    center = torch.zeros(K)
    old = LOSS.STUDENT_LAUNCH_OVERRIDE
    LOSS.STUDENT_LAUNCH_OVERRIDE = student_launch
    try:
        with recording() as launches:
            loss, _ = LOSS.dino_loss(student, teacher, center, num_global_crops=G)
            loss.backward(torch.tensor(2.0))
    finally:
        LOSS.STUDENT_LAUNCH_OVERRIDE = old
    return launches


def ema_launches(student_dtype: torch.dtype, tensor_momentum: bool) -> list[Launch]:
    teacher = [torch.zeros(n) for n in (1, 1000, 70000)]
    student = [torch.zeros(n, dtype=student_dtype) for n in (1, 1000, 70000)]
    momentum = torch.tensor(0.996) if tensor_momentum else 0.996
    with recording() as launches:
        EMA.ema_update_(teacher, student, momentum)
    return launches


def layer_norm_launches(rows: int, D: int, dtype: torch.dtype, out_dtype: torch.dtype,
                        affine: bool = True, branch: torch.dtype | None = None) -> list[Launch]:
    """The LayerNorm's forward and backward launches (backward: as many programs as an H100's
    SMs ask for); with `branch` (its dtype), the residual add before it, with drop path's
    factors, as a block's second norm runs."""
    x = torch.zeros(rows, D, dtype=dtype, requires_grad=True)
    weight = torch.ones(D, requires_grad=True) if affine else None
    bias = torch.zeros(D, requires_grad=True) if affine else None
    try:
        RUNTIME.multiprocessors = lambda device: H100_SMS
        with recording() as launches:
            if branch is None:
                y = LAYER_NORM.layer_norm(x, weight, bias, 1e-6, out_dtype)
                y.backward(torch.zeros(rows, D, dtype=out_dtype))
            else:
                r = torch.zeros(rows, D, dtype=branch, requires_grad=True)
                s, y = LAYER_NORM.add_layer_norm(x, r, weight, bias, 1e-6, out_dtype, torch.ones(rows))
                torch.autograd.backward([s, y], [torch.zeros_like(s), torch.zeros_like(y)])
    finally:
        RUNTIME.multiprocessors = multiprocessors
    return launches


def _layer_norm_rows(archs, cases) -> list[dict]:
    return [dict(case=f"layer_norm D={D} {_name(dtype)}->{_name(out)}"
                      + (f" + {_name(branch)} branch" if branch else ""),
                 student_launch="-", default=True, **compile_launch(launch, arch))
            for D, dtype, out, affine, branch in cases
            for launch in layer_norm_launches(64 * 764, D, dtype, out, affine, branch)
            for arch in archs]


# ViT-S/B/L widths: the fp32 residual stream into bf16 (autocast), the bf16 stream, and a
# block's residual add with its second norm
LAYER_NORM_CASES = [(384, torch.float32, torch.bfloat16, True, None),
                    (768, torch.float32, torch.bfloat16, True, None),
                    (1024, torch.float32, torch.bfloat16, True, None),
                    (384, torch.bfloat16, torch.bfloat16, True, None),
                    (384, torch.float32, torch.bfloat16, True, torch.bfloat16),
                    (768, torch.bfloat16, torch.bfloat16, True, torch.bfloat16)]


def bias_gelu_launches(rows: int, N: int, dtype: torch.dtype) -> list[Launch]:
    a = torch.zeros(rows, N, dtype=dtype, requires_grad=True)
    bias = torch.zeros(N, requires_grad=True)
    try:
        RUNTIME.multiprocessors = lambda device: H100_SMS
        with recording() as launches:
            BIAS_GELU.bias_gelu(a, bias).backward(torch.zeros(rows, N, dtype=dtype))
    finally:
        RUNTIME.multiprocessors = multiprocessors
    return launches


def _bias_gelu_rows(archs) -> list[dict]:
    return [dict(case=f"bias_gelu N={N} {_name(dtype)}", student_launch="-", default=True,
                 **compile_launch(launch, arch))
            for N, dtype in ((1536, torch.bfloat16), (3072, torch.float32))
            for launch in bias_gelu_launches(64 * 764, N, dtype) for arch in archs]


def report(archs=(80, 90), sweep: bool = True) -> list[dict]:
    """Every kernel at the official size (K=65536, 10 crops, B=256 and 64), bf16 and fp32,
    the default launch shapes and (sweep) the benchmark's; the EMA for both student dtypes."""
    rows = []
    for B in (256, 64):
        for dtype in (torch.bfloat16, torch.float32):
            rows += _loss_rows(f"loss B={B} {_name(dtype)}", (65536, B, 10, 2, dtype), archs, sweep)
    return _unique(rows + _ema_rows(archs) + _layer_norm_rows(archs, LAYER_NORM_CASES)
                   + _bias_gelu_rows(archs))


def check(archs=(80, 90)) -> list[dict]:
    """What the tests compile: the default launches over dtypes and odd shapes (K not a power
    of two, batch 1, one global crop, the largest K), every swept launch shape once (not
    disassembled: the tests look at the default launches' machine code), the EMA."""
    rows = []
    for dtype in (torch.bfloat16, torch.float32, torch.float16):
        rows += _loss_rows(f"loss {_name(dtype)}", (65536, 256, 10, 2, dtype), archs, False)
    for shape in ((1000, 1, 4, 1, torch.bfloat16), (262144, 2, 4, 2, torch.bfloat16),
                  (4097, 3, 12, 2, torch.float16)):
        rows += _loss_rows(f"loss K={shape[0]} B={shape[1]}", shape, archs, False)
    rows += _loss_rows("loss sweep", (65536, 64, 10, 2, torch.bfloat16), archs, True,
                       machine_code=False)
    odd = [(37, torch.float16, torch.float16, False, None), (100, torch.float32, torch.float32, True, None)]
    return _unique(rows + _ema_rows(archs) + _layer_norm_rows(archs, LAYER_NORM_CASES + odd)
                   + _bias_gelu_rows(archs))


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _loss_rows(case: str, shape: tuple, archs, sweep: bool, machine_code: bool = True) -> list[dict]:
    """The default launches (with their machine code), and (sweep) the benchmark's shapes
    (with theirs where `machine_code`)."""
    from dinofuse.bench.kernels import STUDENT_SWEEP, TEACHER_SWEEP

    def rows_for(student_launch, label):
        default = label == "default"
        return [dict(case=case, student_launch=label, default=default,
                     **compile_launch(launch, arch, machine_code or default))
                for launch in loss_launches(*shape, student_launch) for arch in archs]

    rows = rows_for(None, "default")
    if sweep:
        for launch in STUDENT_SWEEP:
            rows += rows_for(launch, str(launch))
        default_teacher = dict(LOSS.TEACHER_LAUNCH)
        try:
            for teacher in TEACHER_SWEEP:
                LOSS.TEACHER_LAUNCH.update(teacher)
                rows += [r for r in rows_for(None, f"teacher {teacher}")
                         if r["kernel"] == "_teacher_pass_kernel"]
        finally:
            LOSS.TEACHER_LAUNCH.update(default_teacher)
    return rows


def _ema_rows(archs) -> list[dict]:
    return [dict(case=f"ema student {_name(dtype)}", student_launch="-", default=True,
                 **compile_launch(launch, arch))
            for dtype in (torch.float32, torch.bfloat16) for on_device in (False, True)
            for launch in ema_launches(dtype, on_device) for arch in archs]


def _unique(rows: list[dict]) -> list[dict]:
    seen, out = set(), []
    for r in rows:
        key = json.dumps({k: v for k, v in r.items() if k not in ("case", "student_launch", "default")},
                         sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out


def markdown(rows: list[dict]) -> str:
    lines = ["| case | student launch | kernel | pointers | arch | warps | registers | spill bytes "
             "(STL/LDL; in loops) | shared bytes | main loop: instructions | per element | exp2 "
             "| loads (128-bit) | stores (128-bit) |",
             "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        m = {k: r.get(k, "-") for k in MACHINE_CODE_FIELDS}  # "-": not disassembled
        lines.append(f"| {r['case']} | {r['student_launch']} | {r['kernel']} | {r['pointers']} | "
                     f"{r['arch']} | {r['num_warps']} | {r['registers']} | {r['spill_bytes']} "
                     f"({m['spill_accesses']}; {m['spill_accesses_in_loops']}) | "
                     f"{r['shared_bytes']} | {m['loop_instructions']} | "
                     f"{m['instructions_per_element']} | {m['loop_exp2']} | "
                     f"{m['loop_loads']} ({m['loop_wide_loads']}) | "
                     f"{m['loop_stores']} ({m['loop_wide_stores']}) |")
    return "\n".join(lines) + "\n"


MACHINE_CODE_FIELDS = ("spill_accesses", "spill_accesses_in_loops", "loop_instructions",
                       "instructions_per_element", "loop_exp2", "loop_loads", "loop_wide_loads",
                       "loop_stores", "loop_wide_stores")


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="80,90", help="compute capabilities, comma-separated")
    ap.add_argument("--no-sweep", action="store_true", help="only the default launch shapes")
    ap.add_argument("--check", action="store_true",
                    help="the tests' set: defaults over dtypes and odd shapes, each swept shape once")
    ap.add_argument("--out", type=Path, default=Path("bench/out"))
    args = ap.parse_args(argv)
    archs = tuple(int(a) for a in args.arch.split(","))
    rows = check(archs) if args.check else report(archs, sweep=not args.no_sweep)
    md = markdown(rows)
    write_results(args.out, "kernel_resources", rows, md)
    print(md)
    return rows


if __name__ == "__main__":
    main()
