"""The fused DINO loss against the official math in float64.

Tolerances (stated once, used everywhere below):
- loss: |fused - ref64| <= 2e-5 * (1 + |ref64|). The kernels accumulate in fp32 over at most
  4096 columns; the reference sees the same (already rounded) low-precision inputs.
- teacher_mean: |fused - ref64| <= 1e-5 * (1 + max |teacher|) per element (fp32 sums of rows).
- gradient: ||fused - ref64|| / ||ref64|| <= 1e-5 in fp32, 1e-3 in fp16 and 8e-3 in bf16 (the
  gradient is stored in the input dtype: one rounding, 2^-11 and 2^-8 relative), and
  elementwise within 2 rounding units of that dtype plus GRAD_ELEM_RTOL times the largest
  entry (logits up to 60 after /tau_s amplify fp32 rounding in exp by about |x| ulp).
"""

import importlib
import itertools

import pytest
import torch

from dinofuse.kernels import dino_loss, dino_loss_reference

GRAD_RTOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}
# elementwise slack, relative to the largest gradient entry: exp of logits up to |s|/tau_s ~ 60
# carries ~60 ulp of relative error in fp32 (exp2.approx on a GPU adds a couple more)
GRAD_ELEM_RTOL = {torch.float32: 1e-4, torch.float16: 1e-3, torch.bfloat16: 8e-3}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def make_inputs(K, B, G, ncrops, dtype, *, scale=4.0, device="cpu"):
    student = (torch.randn(ncrops * B, K, device=device) * scale).to(dtype)
    teacher = (torch.randn(G * B, K, device=device) * scale * 0.05).to(dtype)  # (t-c)/0.04 peaked
    center = torch.randn(K, device=device) * 0.05
    return student, teacher, center


def reference64(student, teacher, center, G, **temps):
    s64 = student.detach().double().requires_grad_()
    loss, mean = dino_loss_reference(s64, teacher.double(), center.double(), num_global_crops=G,
                                     compute_dtype=torch.float64, **temps)
    loss.backward()
    return loss.detach(), mean, s64.grad


def assert_matches_reference(student, teacher, center, G, **temps):
    dtype = student.dtype
    s = student.clone().requires_grad_()
    loss, mean = dino_loss(s, teacher, center, num_global_crops=G, **temps)
    loss.backward()
    ref_loss, ref_mean, ref_grad = reference64(student, teacher, center, G, **temps)

    assert loss.dtype == torch.float32 and mean.dtype == torch.float32
    assert s.grad.dtype == dtype and s.grad.shape == student.shape
    assert torch.isfinite(loss) and torch.isfinite(mean).all() and torch.isfinite(s.grad).all()
    assert abs(loss.double() - ref_loss) <= 2e-5 * (1 + abs(ref_loss)), (loss, ref_loss)
    mean_tol = 1e-5 * (1 + teacher.double().abs().max())
    assert (mean.double() - ref_mean).abs().max() <= mean_tol
    grad = s.grad.double()
    scale = ref_grad.abs().max()
    if scale > 0:
        assert (grad - ref_grad).norm() / ref_grad.norm() <= GRAD_RTOL[dtype]
        ulp = torch.finfo(dtype).eps
        assert ((grad - ref_grad).abs() <= 2 * ulp * ref_grad.abs() + GRAD_ELEM_RTOL[dtype] * scale).all()
    else:
        assert (grad == 0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("G,ncrops", [(1, 2), (1, 4), (1, 10), (2, 2), (2, 4), (2, 10)])
@pytest.mark.parametrize("B", [1, 3, 8])
@pytest.mark.parametrize("K", [1, 7, 1000, 4096])
def test_matches_float64_reference(K, B, G, ncrops, dtype, poisoned_outputs):
    student, teacher, center = make_inputs(K, B, G, ncrops, dtype)
    assert_matches_reference(student, teacher, center, G)


@pytest.mark.parametrize("student_temp,teacher_temp", [(0.1, 0.07), (0.2, 0.04), (1.0, 1.0)])
def test_temperatures(student_temp, teacher_temp, poisoned_outputs):
    student, teacher, center = make_inputs(333, 2, 2, 5, torch.float32)
    assert_matches_reference(student, teacher, center, 2,
                             student_temp=student_temp, teacher_temp=teacher_temp)


def test_k_spanning_many_blocks(poisoned_outputs):
    # K over one student block (4096) and not a power of two: the online logsumexp and the
    # teacher's per-block partials both combine several blocks with a ragged tail.
    student, teacher, center = make_inputs(4096 * 2 + 37, 2, 2, 3, torch.float32)
    assert_matches_reference(student, teacher, center, 2)


def test_extreme_logits_stay_finite(poisoned_outputs):
    student, teacher, center = make_inputs(513, 2, 2, 4, torch.float32, scale=300.0)
    assert_matches_reference(student, teacher, center, 2)


@pytest.mark.parametrize("launch", [(1, 64, 4, 1), (4, 128, 4, 1), (8, 32, 2, 1), (16, 16, 1, 1),
                                    (1, 64, 4, 3), (2, 32, 4, 5), (4, 16, 2, 64),
                                    (2, 32, 4, 1, "image"), (1, 64, 2, 3, "image"),
                                    (4, 16, 2, 64, "image"), (2, 64, 4, None, "image"),
                                    (1, 64, 4, 1, "views", 2), (2, 32, 4, 3, "views", 3),
                                    (2, 32, 4, None, "image", 2),
                                    # persistent: 4 or 8 programs (the interpreter's "GPU"
                                    # has 4 SMs) walking 6 to 30 view groups
                                    (1, 64, 4, 1, "views", 1, 1), (2, 32, 4, 3, "views", 2, 2)])
@pytest.mark.parametrize("G,ncrops", [(1, 3), (2, 10)])
def test_every_launch_shape(launch, G, ncrops, monkeypatch, poisoned_outputs):
    # Views per program that do and do not divide the crop count (padded rows), column
    # blocks smaller than K, one slice per row and several (more than there are blocks, too):
    # the shapes the benchmark sweeps must all be right.
    monkeypatch.setattr(importlib.import_module("dinofuse.kernels.dino_loss"),
                        "STUDENT_LAUNCH_OVERRIDE", launch)
    student, teacher, center = make_inputs(300, 3, G, ncrops, torch.bfloat16)
    assert_matches_reference(student, teacher, center, G)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("G,ncrops", [(1, 2), (1, 10), (2, 2), (2, 10), (3, 5)])
@pytest.mark.parametrize("K,B", [(7, 3), (1000, 1), (4096, 3)])
def test_image_layout_matches_float64_reference(K, B, G, ncrops, dtype, monkeypatch,
                                                poisoned_outputs):
    # One program per (image, slice) walking all views; K=4096 takes the unmasked path
    # (whole 1024-column blocks), K=7 and 1000 the masked one.
    module = importlib.import_module("dinofuse.kernels.dino_loss")
    monkeypatch.setattr(module, "STUDENT_LAUNCH_OVERRIDE", (2, 1024, 4, None, "image"))
    assert module._student_launch_config(K, B, ncrops, torch.device("cpu"))[5] == "image"
    student, teacher, center = make_inputs(K, B, G, ncrops, dtype)
    assert_matches_reference(student, teacher, center, G)


def test_unknown_launch_layout_is_named(monkeypatch):
    module = importlib.import_module("dinofuse.kernels.dino_loss")
    monkeypatch.setattr(module, "STUDENT_LAUNCH_OVERRIDE", (2, 64, 4, None, "rows"))
    with pytest.raises(ValueError, match="layout must be views or image; got 'rows'"):
        dino_loss(*make_inputs(64, 2, 2, 4, torch.float32))
    monkeypatch.setattr(module, "STUDENT_LAUNCH_OVERRIDE", (2, 64, 4, None, "views", 0))
    with pytest.raises(ValueError, match="stages must be >= 1; got 0"):
        dino_loss(*make_inputs(64, 2, 2, 4, torch.float32))
    monkeypatch.setattr(module, "STUDENT_LAUNCH_OVERRIDE", (2, 64, 4, None, "image", 1, 2))
    with pytest.raises(ValueError, match="programs_per_sm must be None or >= 1, with the views "
                                         "layout; got 2 with 'image'"):
        dino_loss(*make_inputs(64, 2, 2, 4, torch.float32))


def test_long_rows_are_sliced_even_when_the_batch_fills_the_gpu(monkeypatch, poisoned_outputs):
    module = importlib.import_module("dinofuse.kernels.dino_loss")
    cpu = torch.device("cpu")
    # the default at the official size: 4 slices of 16384 columns at B=256 (H200 sweep)
    assert module._student_launch_config(65536, 256, 10, cpu)[3:5] == (4, 16384)
    assert module._student_launch_config(4096, 4096, 10, cpu)[3] == 1  # short rows: whole
    # the same rule on small shapes: 16-column blocks make 300 columns "long"; 16 images
    # fill the interpreter's "GPU" (200 columns, not long, are not sliced)
    monkeypatch.setattr(module, "STUDENT_LAUNCH_OVERRIDE", (2, 16, 2, None))
    assert module._student_launch_config(200, 16, 4, cpu)[3] == 1
    assert module._student_launch_config(300, 16, 4, cpu)[3] == 4
    student, teacher, center = make_inputs(300, 16, 2, 4, torch.float32)
    assert_matches_reference(student, teacher, center, 2)


@pytest.mark.parametrize("launch", [dict(block_k=16, block_r=4, rows_per_program=8, num_warps=1),
                                    dict(block_k=64, block_r=2, rows_per_program=2, num_warps=2)])
def test_every_teacher_launch_shape(launch, monkeypatch, poisoned_outputs):
    module = importlib.import_module("dinofuse.kernels.dino_loss")
    monkeypatch.setattr(module, "TEACHER_LAUNCH", {**module.TEACHER_LAUNCH, **launch})
    student, teacher, center = make_inputs(300, 7, 2, 3, torch.float16)
    assert_matches_reference(student, teacher, center, 2)


def test_uses_every_pair_but_self():
    # Swapping two local crops changes nothing; swapping a global crop's student view does.
    student, teacher, center = make_inputs(64, 3, 2, 4, torch.float32)
    loss, _ = dino_loss(student, teacher, center)
    swapped_local = torch.cat([student[:6], student[9:12], student[6:9]])
    assert torch.allclose(dino_loss(swapped_local, teacher, center)[0], loss, rtol=1e-6)
    swapped_global = torch.cat([student[3:6], student[:3], student[6:]])
    assert not torch.allclose(dino_loss(swapped_global, teacher, center)[0], loss, rtol=1e-3)


def test_many_teacher_rows(poisoned_outputs):
    # More teacher rows than one teacher-pass program takes (64): partial column means from
    # several row blocks, and a ragged last block.
    student, teacher, center = make_inputs(300, 37, 2, 3, torch.float32)
    assert_matches_reference(student, teacher, center, 2)


@pytest.mark.parametrize("K,B,ncrops", [(100, 2, 4), (4096, 4, 10)])
def test_gradient_scales_with_upstream_gradient(K, B, ncrops):
    # (4096, 4, 10): more elements than the scaling kernel's grid covers in one stride
    student, teacher, center = make_inputs(K, B, 2, ncrops, torch.float32)
    grads = []
    for factor in (1.0, -2.5):
        s = student.clone().requires_grad_()
        (dino_loss(s, teacher, center)[0] * factor).backward()
        grads.append(s.grad)
    torch.testing.assert_close(grads[1], grads[0] * -2.5, rtol=1e-6, atol=0)


@pytest.mark.parametrize("launch", [None, (2, 16, 2, None, "image")])
def test_no_gradient_requested(launch, monkeypatch):
    monkeypatch.setattr(importlib.import_module("dinofuse.kernels.dino_loss"),
                        "STUDENT_LAUNCH_OVERRIDE", launch)
    student, teacher, center = make_inputs(50, 2, 2, 4, torch.float32)
    with torch.no_grad():
        loss, _ = dino_loss(student.requires_grad_(), teacher, center)
    ref, _, _ = reference64(student, teacher, center, 2)
    assert abs(loss.double() - ref) <= 2e-5 * (1 + abs(ref))
    assert not loss.requires_grad


def test_center_shape_1_by_k_and_teacher_gets_no_gradient():
    student, teacher, center = make_inputs(40, 2, 2, 4, torch.float32)
    teacher = teacher.clone().requires_grad_()
    s = student.clone().requires_grad_()
    loss, mean = dino_loss(s, teacher, center.reshape(1, -1))
    loss.backward()
    assert teacher.grad is None and s.grad is not None
    assert not mean.requires_grad


@pytest.mark.parametrize("layout", ["row_strided", "transposed"])
def test_non_contiguous_inputs(layout, poisoned_outputs):
    K, B, G, ncrops = 70, 3, 2, 4
    student, teacher, center = make_inputs(K, B, G, ncrops, torch.float32)
    if layout == "row_strided":  # a column slice of wider tensors: row stride > K
        s_in = torch.cat([student, torch.randn(ncrops * B, 5)], 1)[:, :K]
        t_in = torch.cat([teacher, torch.randn(G * B, 9)], 1)[:, :K]
    else:  # column-major storage
        s_in, t_in = student.t().contiguous().t(), teacher.t().contiguous().t()
    assert not s_in.is_contiguous() and not t_in.is_contiguous()
    s = s_in.detach().requires_grad_()
    loss, mean = dino_loss(s, t_in, center)
    loss.backward()
    ref_loss, ref_mean, ref_grad = reference64(student, teacher, center, G)
    assert abs(loss.double() - ref_loss) <= 2e-5 * (1 + abs(ref_loss))
    assert (mean.double() - ref_mean).abs().max() <= 1e-6
    assert (s.grad.double() - ref_grad).norm() / ref_grad.norm() <= 1e-5


@pytest.mark.parametrize("where", ["student", "teacher"])
def test_nan_in_logits_gives_nan_loss(where):
    student, teacher, center = make_inputs(257, 2, 2, 4, torch.float32)
    (student if where == "student" else teacher)[3 if where == "student" else 1, 100] = float("nan")
    loss, _ = dino_loss(student, teacher, center)
    assert torch.isnan(loss)


@pytest.mark.parametrize("make_bad,message", [
    (lambda s, t, c: (s[:, :-1], t, c), "K=15 columns but teacher_out has 16"),
    (lambda s, t, c: (s[:-1], t, c), "not a multiple of the batch size B=3"),
    (lambda s, t, c: (s, t[:-1], c), "not a multiple of num_global_crops=2"),
    (lambda s, t, c: (s.to(torch.int32), t, c), "student_out must be one of"),
    (lambda s, t, c: (s, t.to(torch.int64), c), "teacher_out must be one of"),
    (lambda s, t, c: (s, t, c.to(torch.float16)), "center must be one of float32"),
    (lambda s, t, c: (s, t, c[:-1]), "center must have shape (16,) or (1, 16)"),
    (lambda s, t, c: (s.reshape(-1), t, c), "student_out must be 2-D"),
    (lambda s, t, c: (s[:0], t[:0], c), "is empty"),
    (lambda s, t, c: (s[:3], t, c), "needs at least num_global_crops=2"),
])
def test_bad_input_is_rejected(make_bad, message):
    student, teacher, center = make_inputs(16, 3, 2, 4, torch.float32)
    with pytest.raises((ValueError, TypeError), match=message.replace("(", r"\(").replace(")", r"\)")):
        dino_loss(*make_bad(student, teacher, center))


def test_single_view_has_no_pairs():
    student, teacher, center = make_inputs(16, 3, 1, 1, torch.float32)
    with pytest.raises(ValueError, match="at least one pair"):
        dino_loss(student, teacher, center, num_global_crops=1)


def test_bad_temperature_is_rejected():
    student, teacher, center = make_inputs(16, 3, 2, 4, torch.float32)
    with pytest.raises(ValueError, match="temperatures must be > 0"):
        dino_loss(student, teacher, center, teacher_temp=0.0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reference_path_at_full_size(dtype, reference_path):
    """Without the interpreter CPU tensors run the official math: check it at K=65536."""
    K, B, G, ncrops = 65536, 2, 2, 10
    student, teacher, center = make_inputs(K, B, G, ncrops, dtype)
    s = student.clone().requires_grad_()
    loss, mean = dino_loss(s, teacher, center)
    loss.backward()
    ref_loss, ref_mean, ref_grad = reference64(student, teacher, center, G)
    assert abs(loss.double() - ref_loss) <= 1e-4 * (1 + abs(ref_loss))
    assert (mean.double() - ref_mean).abs().max() <= 1e-5 * (1 + teacher.double().abs().max())
    assert (s.grad.double() - ref_grad).norm() / ref_grad.norm() <= GRAD_RTOL[dtype]


def test_torch_compile_traces_without_graph_break():
    K, B, ncrops = 32, 2, 4
    head = torch.nn.Linear(8, K)
    x = torch.randn(ncrops * B, 8)
    teacher, center = torch.randn(2 * B, K), torch.randn(K) * 0.1

    def step(x):
        loss, mean = dino_loss(head(x), teacher, center)
        return loss, mean

    graphs = []

    def backend(gm, example_inputs):  # record what dynamo traced, then run it with AOT eager
        graphs.append(gm)
        return torch._dynamo.backends.debugging.aot_eager(gm, example_inputs)

    compiled = torch.compile(step, fullgraph=True, backend=backend)
    loss_c, mean_c = compiled(x)
    targets = [n.target for g in graphs for n in g.graph.nodes if n.op == "call_function"]
    assert torch.ops.dinofuse.dino_loss_fwd.default in targets or \
        torch.ops.dinofuse.dino_loss_fwd in targets, targets
    loss_c.backward()
    grad_c = head.weight.grad.clone()
    head.weight.grad = None
    loss_e, mean_e = step(x)
    loss_e.backward()
    torch.testing.assert_close(loss_c, loss_e)
    torch.testing.assert_close(mean_c, mean_e)
    torch.testing.assert_close(grad_c, head.weight.grad)


def test_custom_op_schema_is_valid():
    student, teacher, center = make_inputs(9, 2, 2, 3, torch.float32)
    torch.library.opcheck(
        torch.ops.dinofuse.dino_loss_fwd.default,
        (student.requires_grad_(), teacher, center, 2, 0.1, 0.04, True),
        test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
    )


def test_grid_is_the_issue_grid():
    # Guard against the parametrization silently shrinking.
    marks = test_matches_float64_reference.pytestmark
    values = {m.args[0]: m.args[1] for m in marks if m.name == "parametrize"}
    assert values["K"] == [1, 7, 1000, 4096] and values["B"] == [1, 3, 8]
    assert set(itertools.chain(*values["G,ncrops"])) >= {1, 2, 4, 10}
