"""The fused EMA against the float64 formula, to fp32 rounding.

Bound: |fused - ref64| <= 4 * eps32 * (|teacher| + |student|) per element. The kernel rounds
m to fp32 and computes m*t + (1-m)*s in fp32: a handful of roundings of terms no larger than
|t| and |s|.
"""

import pytest
import torch

from dinofuse.kernels import ema_reference_, ema_update_
from dinofuse.kernels import ema as ema_module

SIZES = [1, 3, 1023, 1024, 1025, 16383, 16384, 16385, 40000, 7 * 11 * 13]
EPS32 = torch.finfo(torch.float32).eps


def make_params(student_dtype, sizes=SIZES):
    shapes = [(n,) if i % 2 else (n, 1) for i, n in enumerate(sizes)]
    teacher = [torch.randn(s) for s in shapes]
    student = [torch.randn(s).to(student_dtype) for s in shapes]
    return teacher, student


def assert_ema_exact(before, student, after, m):
    for t0, s, t1 in zip(before, student, after):
        ref = m * t0.double() + (1 - m) * s.double()
        bound = 4 * EPS32 * (t0.double().abs() + s.double().abs())
        assert t1.dtype == torch.float32
        assert ((t1.double() - ref).abs() <= bound).all()


@pytest.mark.parametrize("student_dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("momentum_kind", ["float", "tensor"])
@pytest.mark.parametrize("m", [0.996, 0.5, 0.0, 1.0])
def test_matches_formula(student_dtype, momentum_kind, m):
    teacher, student = make_params(student_dtype)
    before = [t.clone() for t in teacher]
    momentum = m if momentum_kind == "float" else torch.tensor(m)
    ema_update_(teacher, student, momentum)
    m32 = float(torch.tensor(m, dtype=torch.float32))
    assert_ema_exact(before, student, teacher, m32)


def test_mixed_student_dtypes_and_parameters():
    teacher_mod, student_mod = torch.nn.Linear(37, 5), torch.nn.Linear(37, 5).to(torch.bfloat16)
    extra_t, extra_s = make_params(torch.float32, [3, 16385])
    teacher = list(teacher_mod.parameters()) + extra_t
    student = list(student_mod.parameters()) + extra_s
    before = [t.detach().clone() for t in teacher]
    ema_update_(teacher, student, 0.9)
    assert_ema_exact(before, student, [t.detach() for t in teacher], 0.9)
    assert teacher_mod.weight.grad is None


def test_non_contiguous_and_empty_tensors():
    # a transposed teacher, then a transposed student beside a contiguous teacher
    teacher = [torch.randn(8, 6).t(), torch.randn(0), torch.randn(5), torch.randn(4, 9)]
    student = [torch.randn(6, 8), torch.randn(0), torch.randn(5), torch.randn(9, 4).t()]
    before = [t.clone() for t in teacher]
    ema_update_(teacher, student, 0.7)
    assert_ema_exact(before, student, teacher, float(torch.tensor(0.7)))


def test_writes_stay_inside_each_tensor():
    """Teachers laid end to end in one buffer, a guard element after each: the kernel's
    last chunk of a tensor must not write its neighbour (separate allocations would hide
    that in the allocator's padding)."""
    sizes = [1, 3, 1023, 1025, 4097, 7 * 11 * 13]
    teacher_buf = torch.randn(sum(sizes) + len(sizes))
    student_buf = torch.randn(sum(sizes) + len(sizes))
    teacher, student, guards, start = [], [], [], 0
    for n in sizes:
        teacher.append(teacher_buf[start:start + n])
        student.append(student_buf[start:start + n])
        guards.append(start + n)
        start += n + 1
    guard_values = teacher_buf[guards].clone()
    before = [t.clone() for t in teacher]
    ema_update_(teacher, student, 0.5)
    assert_ema_exact(before, student, teacher, 0.5)
    assert torch.equal(teacher_buf[guards], guard_values)


def test_plans_of_views_of_one_storage_differ_by_length():
    """Views that start at the same address but end elsewhere need their own plan."""
    teacher_buf, student_buf = torch.randn(5000), torch.randn(5000)
    ema_update_([teacher_buf[:10]], [student_buf[:10]], 0.5)
    before = teacher_buf.clone()
    ema_update_([teacher_buf[:5000]], [student_buf[:5000]], 0.5)
    assert_ema_exact([before], [student_buf], [teacher_buf], 0.5)


def test_table_cache_follows_new_values_and_new_tensors():
    teacher, student = make_params(torch.float32, [100, 20000])
    for step in range(3):
        before = [t.clone() for t in teacher]
        for s in student:
            s.normal_()
        ema_update_(teacher, student, 0.99)
        assert_ema_exact(before, student, teacher, float(torch.tensor(0.99)))
    other_t, other_s = make_params(torch.float32, [7])
    before = [t.clone() for t in other_t]
    ema_update_(other_t, other_s, 0.5)
    assert_ema_exact(before, other_s, other_t, 0.5)
    assert len(ema_module._plans) <= ema_module._PLAN_CACHE_SIZE


def test_prepared_plan_and_parameter_iterators():
    teacher_mod, student_mod = torch.nn.Linear(300, 7), torch.nn.Linear(300, 7)
    plan = ema_module.EMAPlan(teacher_mod.parameters(), student_mod.parameters())
    for m in (0.9, torch.tensor(0.5)):
        before = [t.detach().clone() for t in teacher_mod.parameters()]
        plan(m)
        assert_ema_exact(before, list(student_mod.parameters()),
                         [t.detach() for t in teacher_mod.parameters()], float(m))
    ema_update_(teacher_mod.parameters(), student_mod.parameters(), 0.5)  # iterators too
    # the modules themselves: their parameters (a BatchNorm's buffers left as they are)
    teacher_mod, student_mod = (torch.nn.Sequential(torch.nn.Linear(300, 7), torch.nn.BatchNorm1d(7))
                                for _ in range(2))
    student_mod[1].running_mean.fill_(3.0)
    before = [t.detach().clone() for t in teacher_mod.parameters()]
    ema_update_(teacher_mod, student_mod, 0.25)
    assert_ema_exact(before, list(student_mod.parameters()),
                     [t.detach() for t in teacher_mod.parameters()], 0.25)
    assert torch.equal(teacher_mod[1].running_mean, torch.zeros(7))


def test_reference_path(reference_path):
    teacher, student = make_params(torch.bfloat16)
    expected = [t.clone() for t in teacher]
    ema_reference_(expected, student, 0.996)
    ema_update_(teacher, student, 0.996)
    for t, e in zip(teacher, expected):
        assert torch.equal(t, e)


@pytest.mark.parametrize("teacher,student,momentum,message", [
    ([torch.randn(3)], [torch.randn(4)], 0.9, "teacher shape"),
    ([torch.randn(3)], [], 0.9, "1 teacher tensors and 0 student"),
    ([torch.randn(3).half()], [torch.randn(3)], 0.9, "teacher tensor 0 must be one of float32"),
    ([torch.randn(3)], [torch.arange(3)], 0.9, "student tensor 0 must be one of"),
    ([torch.randn(3)], [torch.randn(3)], 1.5, r"momentum must be in \[0, 1\]"),
    ([torch.randn(3)], [torch.randn(3)], torch.ones(2), "1-element float tensor"),
    ([torch.randn(3)], [torch.randn(3)], torch.tensor(1), "1-element float tensor"),
    (torch.randn(3, 2), [torch.randn(2)] * 3, 0.9,
     r"teacher_params must be a sequence of tensors \(or a module\); got one tensor of shape"),
    ([torch.randn(2)] * 3, torch.randn(3, 2), 0.9, "student_params must be a sequence"),
])
def test_bad_input_is_rejected(teacher, student, momentum, message):
    with pytest.raises((ValueError, TypeError), match=message):
        ema_update_(teacher, student, momentum)
