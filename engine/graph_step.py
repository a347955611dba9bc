"""The whole training step as one CUDA graph, replayed every iteration (`impl.cuda_graph`).

At ViT-S/16 batch 64 a step is many small kernels and the GPU waits on the host between
them (H200, b807297: SM utilization 76%, 879 images/s, against 1435 at batch 1024).
Replaying a captured graph launches them all at once. A graph replays kernels with the
arguments they were captured with, so what changes from step to step lives in device tensors
the kernels read: the learning rate (AdamW with `capturable=True` and a tensor lr), the
weight decay as the factor 1 - lr*wd that AdamW multiplies the weights by (applied to the
decaying weights just before AdamW's step, which then runs with weight_decay=0: the same
update), the EMA momentum (`ema_update_` reads a 0-d tensor), and the crops (copied into the
graph's own input tensors). What changes per epoch (the teacher temperature during its
warm-up, the last-layer freeze) and the crop shapes make the graph's key: a new key runs
WARMUP_STEPS steps eagerly (lazy set-up: Triton compiles, optimizer state, launch plans),
then captures.

On the CPU the same step runs eagerly with the same device tensors: the tests compare it
with the plain step there; a CUDA test compares the replayed graph with it.
Limits: one process (FSDP2's collectives are not captured here), bf16/fp32 (fp16's
GradScaler reads its overflow flag on the host), and the fused loss, clipping and deferred
loss check (the official ways read values on the host or rebind the center tensor).
"""

from __future__ import annotations

import torch

from dinofuse.engine.errors import TrainingError

WARMUP_STEPS = 2  # eager steps before each capture (PyTorch's docs suggest a few)

# what the graph cannot hold, as (config field, its value that is refused, why)
_REFUSED = (("impl.loss", "official", "the official loss rebinds its center tensor"),
            ("impl.clip", "official", "the official clipping reads each norm on the host"),
            ("impl.loss_check", "official", "the official check reads the loss on the host"),
            ("optim.precision", "fp16", "fp16's GradScaler reads its overflow flag on the host"))


def graph_problem(cfg, sharded: bool) -> str | None:
    """Why a captured step cannot replay this run (naming the setting), or None."""
    for field, value, why in _REFUSED:
        section, name = field.split(".")
        if getattr(getattr(cfg, section), name) == value:
            return f"{field} is {value!r} ({why})"
    if sharded:
        return "the models are sharded by FSDP2 (its collectives are not captured)"
    return None


def uses_graph(cfg, device: torch.device, sharded: bool) -> bool:
    """`impl.cuda_graph`: auto replays the step on a GPU when the run allows it; on always
    (the CPU runs the same step eagerly) and refuses by name what a graph cannot replay."""
    choice = cfg.impl.cuda_graph
    if choice == "off":
        return False
    problem = graph_problem(cfg, sharded)
    if choice == "auto":
        return device.type == "cuda" and problem is None
    if problem is not None:
        raise ValueError(f"impl.cuda_graph=on cannot run here: {problem}; set impl.cuda_graph "
                         "to auto or off")
    return True


class GraphedStep:
    """`step(crops, it, epoch) -> (loss, grad_norm)`, both 0-d device tensors."""

    def __init__(self, trainer):
        self.trainer = trainer
        device = trainer.device
        self.on_gpu = self.capture = device.type == "cuda"  # the CPU runs the step eagerly
        lr = torch.tensor(trainer.lr_schedule, dtype=torch.float64)
        wd = torch.tensor(trainer.wd_schedule, dtype=torch.float64)
        momentum = torch.tensor(trainer.momentum_schedule, dtype=torch.float64)
        # one row per iteration: lr, weight-decay factor, teacher momentum (computed in
        # float64 as the official Python floats are, then stored as the kernels read them)
        self.schedule = torch.stack([lr, 1 - lr * wd, momentum], 1).float().to(device)
        self.lr, self.decay, self.momentum = (torch.zeros((), device=device) for _ in range(3))
        self.key = None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.inputs: list[torch.Tensor] = []
        self.outputs: tuple[torch.Tensor, torch.Tensor] | None = None
        self.eager_steps = 0  # since the key last changed
        self.captures = 0
        self._side_stream = torch.cuda.Stream() if self.on_gpu else None  # for eager steps

    def bind_optimizer(self) -> None:
        """Point AdamW at the lr tensor and move its decay out (a loaded checkpoint brings
        back float hyperparameters, so this runs before each capture and eager step)."""
        optimizer = self.trainer.optimizer
        for group in optimizer.param_groups:
            group["lr"] = self.lr
            group["weight_decay"] = 0.0
            group["capturable"] = self.on_gpu
        if self.on_gpu:  # capturable AdamW keeps its step counts on the device
            for state in optimizer.state.values():
                if "step" in state and state["step"].device != self.trainer.device:
                    state["step"] = state["step"].to(self.trainer.device, torch.float32)

    def __call__(self, crops: list[torch.Tensor], it: int, epoch: int):
        torch._foreach_copy_([self.lr, self.decay, self.momentum], list(self.schedule[it].unbind()))
        key = (self.trainer.loss_fn.teacher_temp_at(epoch),
               epoch < self.trainer.cfg.optim.freeze_last_layer,
               tuple((tuple(c.shape), c.dtype) for c in crops))
        if key != self.key:
            self.key, self.graph, self.outputs, self.inputs = key, None, None, []
            self.eager_steps = 0
        if not self.capture or self.eager_steps < WARMUP_STEPS:
            self.eager_steps += 1
            return self._eager(crops, epoch)
        if self.graph is None:
            self._capture(crops, epoch)
        else:
            for static, crop in zip(self.inputs, crops):
                static.copy_(crop, non_blocking=True)
        self.graph.replay()
        return self.outputs

    def _body(self, crops, epoch):
        self.bind_optimizer()
        trainer = self.trainer
        # autocast's weight cache off: cached casts made during capture would outlive it
        loss = trainer.forward_loss(crops, epoch, autocast_cache=False)
        return loss, trainer.backward_update(loss, epoch, self.momentum, decay=self.decay)

    def _eager(self, crops, epoch):
        if not self.on_gpu:
            return self._body(crops, epoch)
        # on a side stream, as capture wants the lazy set-up done away from the main one
        side = self._side_stream
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            out = self._body(crops, epoch)
        torch.cuda.current_stream().wait_stream(side)
        return out

    def _capture(self, crops, epoch) -> None:
        self.inputs = [c.clone() for c in crops]
        self.trainer.optimizer.zero_grad(set_to_none=True)  # the graph allocates the grads
        try:
            self.graph, self.outputs = capture_graph(lambda: self._body(self.inputs, epoch))
        except torch.OutOfMemoryError:
            raise  # as the plain step would (the largest-batch search looks for it)
        except Exception as e:
            raise TrainingError(f"impl.cuda_graph: capturing the training step failed "
                                f"({type(e).__name__}: {e}); set impl.cuda_graph=off") from e
        self.captures += 1


def capture_graph(fn):
    """(graph, fn's outputs): fn's kernels recorded, not run; `graph.replay()` runs them.
    (The tests put a CPU stand-in here that replays by calling fn again.)"""
    graph = torch.cuda.CUDAGraph()
    # thread_local: CUDA calls of other threads (data loading's pinning, DALI, telemetry)
    # during the capture are theirs, not errors of the capture
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        outputs = fn()
    return graph, outputs
