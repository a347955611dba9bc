"""impl.cuda_graph on the CPU: the step a graph captures (schedules read from device tensors,
weight decay outside AdamW, momentum as a tensor) trains like the plain step, and the
capture bookkeeping (warm-up, re-capture per epoch, the crops copied into the graph's
inputs) works with a stand-in graph that replays by running the step again.
The real capture is in tests/test_cuda.py."""

from __future__ import annotations


import pytest
import torch

from dinofuse.engine import graph_step
from dinofuse.engine.errors import TrainingError
from dinofuse.engine.graph_step import WARMUP_STEPS, uses_graph
from dinofuse.engine.train import Trainer
from dinofuse.kernels import _runtime
from test_train import make_cfg

# batches of 8 of the 40 images: 5 steps per epoch, the last layer unfreezes at step 5
RUN = ("optim.batch_size_per_device=8", "optim.warmup_teacher_temp_epochs=1",
       "optim.warmup_teacher_temp=0.03")
STEPS = 8


@pytest.fixture(scope="module", autouse=True)
def _plain_pytorch_ops():
    """The loss and EMA take their plain-PyTorch path: these tests check the step around them
    (the kernels with the momentum on the device are in test_ema); interpreted, they made
    this file take ~3 times as long."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_runtime, "INTERPRET", False)
        yield


class ReplayByRunning:
    """A CUDA graph's CPU twin: replay runs the captured function again and writes its
    results into the outputs returned at capture, as a replay writes into static memory.
    A capture records the work without doing it: here it is done at capture, and the
    first replay (which would do it) does nothing."""

    def __init__(self, fn):
        self.fn, self.outputs = fn, fn()
        self.done_at_capture = True

    def replay(self):
        if self.done_at_capture:
            self.done_at_capture = False
            return
        for static, new in zip(self.outputs, self.fn()):
            if isinstance(static, torch.Tensor):
                static.copy_(new)


def stand_in_capture(fn):
    graph = ReplayByRunning(fn)
    return graph, graph.outputs


def fit(image_folder, path, *extra, max_steps=STEPS, resume=False):
    trainer = Trainer(make_cfg(image_folder, path, *RUN, *extra), resume=resume)
    return trainer, trainer.fit(max_steps=max_steps, progress=False)


def initial_weights(image_folder, path) -> dict[str, torch.Tensor]:
    trainer = Trainer(make_cfg(image_folder, path))
    return {f"{model} {name}": p.detach().clone()
            for model in ("student", "teacher")
            for name, p in getattr(trainer, model).named_parameters()}


def assert_same_training(a: Trainer, logs_a, b: Trainer, logs_b, start: dict):
    """The same losses, and weights whose difference is tiny next to how far the steps moved
    them: schedules read as float32 from the device differ from the Python floats in the last
    bits. Rounding at the weights' own size is allowed too: the teacher barely moves, and its
    EMA with the momentum as a tensor rounds 1 - m in float32, not float64. The key bias is
    left out: its exact gradient is zero (softmax ignores a shift of every key's score for a
    query), so Adam turns rounding noise there into full steps, and it changes no output."""
    assert [log.step for log in logs_a] == [log.step for log in logs_b]
    assert [log.loss for log in logs_b] == pytest.approx([log.loss for log in logs_a], rel=1e-5)
    assert [log.grad_norm for log in logs_b] == pytest.approx([log.grad_norm for log in logs_a],
                                                              rel=1e-4)
    for model in ("student", "teacher"):
        for (name, p), q in zip(getattr(a, model).named_parameters(),
                                getattr(b, model).parameters()):
            p0 = start[f"{model} {name}"]
            if name.endswith("attn.qkv.bias"):
                keys = slice(p.shape[0] // 3, 2 * p.shape[0] // 3)
                p, q, p0 = (t.detach().clone() for t in (p, q, p0))
                for t in (p, q, p0):
                    t[keys] = 0.0
            moved = (p - p0).norm()
            assert (q - p).norm() <= 2e-4 * moved + 1e-6 * p0.norm() + 1e-9, \
                (model, name, (q - p).norm(), moved)
    torch.testing.assert_close(b.loss_fn.center, a.loss_fn.center, rtol=1e-4, atol=1e-7)


@pytest.fixture(scope="module")
def plain_run(image_folder, tmp_path_factory):
    """(trainer, logs, initial weights) of the plain step over STEPS steps."""
    path = tmp_path_factory.mktemp("plain")
    start = initial_weights(image_folder, path / "start")
    trainer, logs = fit(image_folder, path / "run")
    return trainer, logs, start


def test_the_graphed_step_trains_like_the_plain_step(image_folder, tmp_path, plain_run):
    """Across the epoch where the last layer unfreezes and the teacher temperature steps."""
    plain, plain_logs, start = plain_run
    graphed, graphed_logs = fit(image_folder, tmp_path / "graphed", "impl.cuda_graph=on")
    assert graphed.graphed is not None and graphed.graphed.captures == 0  # eager on the CPU
    assert_same_training(plain, plain_logs, graphed, graphed_logs, start)


def test_captured_steps_replay_with_new_crops_and_recapture_per_epoch(image_folder, tmp_path,
                                                                       monkeypatch, plain_run):
    monkeypatch.setattr(graph_step, "capture_graph", stand_in_capture)
    plain, plain_logs, start = plain_run
    trainer = Trainer(make_cfg(image_folder, tmp_path / "graphed", "impl.cuda_graph=on", *RUN))
    trainer.graphed.capture = True
    logs = trainer.fit(max_steps=STEPS, progress=False)
    # epoch 0 and epoch 1 (new temperature, last layer trained): warm-up then one capture each
    assert trainer.graphed.captures == 2
    assert trainer.graphed.eager_steps == WARMUP_STEPS
    assert_same_training(plain, plain_logs, trainer, logs, start)


def test_the_last_layer_unfreezing_alone_makes_a_new_capture(image_folder, tmp_path, monkeypatch):
    """With the teacher temperature constant, only the freeze changes at epoch 1: a graph kept
    from epoch 0 would keep the last layer frozen for the rest of the run."""
    monkeypatch.setattr(graph_step, "capture_graph", stand_in_capture)
    constant = "optim.warmup_teacher_temp_epochs=0"
    start = initial_weights(image_folder, tmp_path / "start")
    plain, plain_logs = fit(image_folder, tmp_path / "plain", constant)
    trainer = Trainer(make_cfg(image_folder, tmp_path / "graphed", *RUN, constant, "impl.cuda_graph=on"))
    trainer.graphed.capture = True
    logs = trainer.fit(max_steps=STEPS, progress=False)
    assert trainer.graphed.captures == 2
    assert_same_training(plain, plain_logs, trainer, logs, start)


@pytest.mark.parametrize("first,then", [("true", "false"), ("false", "true")])
def test_a_graphed_run_and_a_plain_run_resume_each_other(image_folder, tmp_path, first, then,
                                                         plain_run):
    whole, whole_logs, start = plain_run
    _, head = fit(image_folder, tmp_path / "split", f"impl.cuda_graph={first}", max_steps=4)
    resumed, tail = fit(image_folder, tmp_path / "split", f"impl.cuda_graph={then}", resume=True,
                        max_steps=STEPS - 4)
    assert_same_training(whole, whole_logs, resumed, head + tail, start)


@pytest.mark.parametrize("override,field", [
    ('impl.loss="official"', "impl.loss"), ('impl.clip="official"', "impl.clip"),
    ('impl.loss_check="official"', "impl.loss_check"), ('optim.precision="fp16"', "optim.precision"),
])
def test_what_a_graph_cannot_replay_is_refused_by_name(image_folder, tmp_path, override, field):
    for on in ('impl.cuda_graph="on"', "impl.cuda_graph=true"):  # true: the former switch
        with pytest.raises(ValueError, match=f"impl.cuda_graph=on cannot run here: {field} is"):
            Trainer(make_cfg(image_folder, tmp_path, on, override))


def test_sharded_models_are_refused(image_folder, tmp_path):
    cfg = make_cfg(image_folder, tmp_path, 'impl.cuda_graph="on"')
    with pytest.raises(ValueError, match="sharded by FSDP2"):
        uses_graph(cfg, torch.device("cpu"), sharded=True)


@pytest.mark.parametrize("choice", ["auto", "on", "off"])
def test_auto_replays_the_step_on_a_gpu_where_a_graph_can(image_folder, tmp_path, choice):
    """(No GPU needed: the choice is made from the device's type.)"""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    cfg = make_cfg(image_folder, tmp_path, f'impl.cuda_graph="{choice}"')
    assert uses_graph(cfg, cuda, sharded=False) == (choice != "off")
    assert uses_graph(cfg, cpu, sharded=False) == (choice == "on")  # on: eagerly on the CPU
    if choice == "auto":  # what a graph cannot replay: the plain step, no error
        assert not uses_graph(cfg, cuda, sharded=True)
        for override in ('impl.loss="official"', 'impl.clip="official"',
                         'impl.loss_check="official"', 'optim.precision="fp16"'):
            assert not uses_graph(make_cfg(image_folder, tmp_path, override), cuda, sharded=False)
    assert Trainer(cfg).graphed is not None if choice == "on" else Trainer(cfg).graphed is None


@pytest.mark.parametrize("error,raised", [(torch.OutOfMemoryError, torch.OutOfMemoryError),
                                          (RuntimeError, TrainingError)])
def test_a_failed_capture_names_the_setting_and_an_out_of_memory_stays_one(
        image_folder, tmp_path, monkeypatch, error, raised):
    """Running out of memory while capturing is what the plain step would raise (the
    benchmark's largest-batch search looks for it); anything else says how to turn it off."""
    def failing_capture(fn):
        raise error("while capturing")

    monkeypatch.setattr(graph_step, "capture_graph", failing_capture)
    trainer = Trainer(make_cfg(image_folder, tmp_path, *RUN, 'impl.cuda_graph="on"'))
    trainer.graphed.capture = True
    with pytest.raises(raised, match="impl.cuda_graph=off" if raised is TrainingError else "while"):
        trainer.fit(max_steps=WARMUP_STEPS + 1, progress=False)
