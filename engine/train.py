"""The DINO training loop: a step you can read top to bottom.

    trainer = Trainer(load_config("default")); trainer.fit()

Per iteration: set lr / weight decay from the schedules, teacher forward on the global crops,
student forward on all crops, fused DINO loss, backward, gradient clipping, last-layer
freeze, AdamW step, fused EMA of the teacher (`impl.cuda_graph`: that step captured once
and replayed, `graph_step.GraphedStep`). One process or several under torchrun (FSDP2,
applied in `parallel.parallelize`); the batches come from `inputs.TrainingInput`.
Checkpoints (`trainer_checkpoints.py`, mixed into the Trainer) are atomic and hold everything
a resume needs (models, optimizer, center, step, RNG, data position); a non-finite loss stops
the run with the step named and the last good checkpoint untouched.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from dinofuse.engine.checkpoint import (
    EXTRA,
    CheckpointError,
    init_weights,
    is_sharded_checkpoint,
    latest_complete,
    load_file,
    read_sharded,
    run_has_checkpoint,
)
from dinofuse.engine.clipping import clip_gradients, clip_gradients_official
from dinofuse.engine.config import Config, check_ranges, config_from_toml, save_config
from dinofuse.engine.errors import TrainingError
from dinofuse.engine.graph_step import GraphedStep, uses_graph
from dinofuse.engine.inputs import TrainingInput
from dinofuse.engine.models import (
    DINOHead,
    MultiCropWrapper,
    build_vit,
    cancel_last_layer_gradients,
)
from dinofuse.engine.models.vit import (
    BIAS_GELU_KERNELS,
    LAYER_NORM_KERNELS,
    PATCH_EMBEDDINGS,
    RESIDUAL_DTYPES,
)
from dinofuse.engine.parallel import DeviceValue, parallelize, world
from dinofuse.engine.progress import Progress
from dinofuse.engine.run_lock import RunLock
from dinofuse.engine.schedules import cosine_schedule
from dinofuse.engine.trainer_checkpoints import TrainerCheckpoints
from dinofuse.kernels import DINOLoss, EMAPlan
from dinofuse.kernels.dino_loss import CenteredDINOLoss
from dinofuse.kernels.reference import OfficialDINOLoss, ema_reference_

STOP_REASONS = ("time", "signal")  # why a run may stop early, in the order they are voted
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)  # SIGINT: Ctrl-C

IMPL_CHOICES = {"loss": ("fused", "official"), "ema": ("fused", "official"),
                "clip": ("fused", "official"), "fsdp": ("auto", "always"),
                "optimizer": ("auto", "fused", "foreach", "official"),
                "reduce_dtype": ("fp32", "bf16"), "loss_check": ("deferred", "official"),
                "patch_embedding": PATCH_EMBEDDINGS, "residual_dtype": RESIDUAL_DTYPES,
                "layer_norm": LAYER_NORM_KERNELS, "bias_gelu": BIAS_GELU_KERNELS}


def pick_device(name: str, field: str = "run.device") -> torch.device:
    """The device `name` says ("auto": CUDA when there is one), with its index: "cuda" is
    this process's current device (torchrun's processes each set their own, LOCAL_RANK), so
    what needs an index (DALI's device_id, NVML, memory statistics) gets that GPU, not GPU 0.
    A name that is no device, or a CUDA device this machine lacks, is an error naming `field`."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"{field} must be auto, cpu, cuda or cuda:N; got {name!r}") from None
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"{field}={name!r}, but torch sees {torch.cuda.device_count()} CUDA "
                         f"device(s) here; use \"auto\" or \"cpu\"")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def check_fresh_start(out: Path) -> None:
    """A run that does not resume must not start in an earlier run's folder: its first save
    would overwrite that run's checkpoint."""
    if run_has_checkpoint(out):
        raise TrainingError(f"{out} holds a checkpoint of an earlier run: pass --resume "
                            f"(or --auto-resume) to continue it, or choose another "
                            f"run.output_dir (--output-dir)")


def output_dir_problem(out: Path, error: OSError, field: str = "run.output_dir") -> str:
    return f"{field} {out}: cannot write there ({error.strerror or error})"


def make_output_dir(out: Path, field: str = "run.output_dir") -> None:
    """An output folder made before the work whose results go there: one that cannot be (a
    path through a file, a read-only disk) is a one-line error naming `field` first."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise TrainingError(output_dir_problem(out, e, field)) from None


class JsonLines:
    """A JSON record per line appended to `path` (when `enabled`: one rank writes). A write
    that fails (a full disk) is said once and the run goes on without this log: a full disk
    stops a run at its next checkpoint save, which every rank takes part in, with the last
    checkpoint kept; a failure here alone would stop one rank and leave the others waiting."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path, self.file = path, None
        if enabled:
            self._attempt(lambda: setattr(self, "file", open(path, "a")))

    def write(self, record: dict) -> None:
        if self.file is not None:
            self._attempt(lambda: (self.file.write(json.dumps(record) + "\n"), self.file.flush()))

    def _attempt(self, action) -> None:
        try:
            action()
        except OSError as e:
            print(f"dinofuse: cannot write {self.path} ({e.strerror or e}); training goes on "
                  "without it", file=sys.stderr, flush=True)
            self.close()

    def close(self) -> None:
        file, self.file = self.file, None
        if file is not None:
            with contextlib.suppress(OSError):  # what it still buffered is lost with the disk
                file.close()

    def __enter__(self) -> JsonLines:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def build_backbone(cfg: Config, drop_path_rate: float) -> nn.Module:
    m = cfg.model
    sizes = {k: v for k, v in (("embed_dim", m.embed_dim), ("depth", m.depth),
                               ("num_heads", m.num_heads)) if v}
    return build_vit(m.arch, m.patch_size, img_size=m.img_size, in_chans=m.in_chans,
                     drop_path_rate=drop_path_rate, attention=m.attention,
                     patch_embedding=cfg.impl.patch_embedding,
                     residual_dtype=cfg.impl.residual_dtype, layer_norm=cfg.impl.layer_norm,
                     bias_gelu=cfg.impl.bias_gelu, **sizes)


def build_student_teacher(cfg: Config) -> tuple[MultiCropWrapper, MultiCropWrapper]:
    """The teacher is the student's architecture without drop path, starting from its weights."""
    m = cfg.model

    def wrapper(drop_path_rate):
        backbone = build_backbone(cfg, drop_path_rate)
        head = DINOHead(backbone.embed_dim, m.out_dim, use_bn=m.use_bn_in_head,
                        norm_last_layer=m.norm_last_layer, nlayers=m.head_nlayers,
                        hidden_dim=m.head_hidden_dim, bottleneck_dim=m.head_bottleneck_dim)
        return MultiCropWrapper(backbone, head, packed=m.packed)

    student, teacher = wrapper(m.drop_path_rate), wrapper(0.0)
    teacher.load_state_dict(student.state_dict())
    for p in teacher.parameters():
        p.requires_grad = False
    return student, teacher


def read_checkpoint(checkpoint: str, which: str = "teacher") -> dict:
    """A checkpoint's contents: a file (ours, official, or bare weights), a sharded step
    folder (checkpoints/step_N), or a run folder (its newest complete checkpoint). Sharded
    ones are consolidated on this CPU process: no GPU or process group needed."""
    path = Path(checkpoint)
    if path.is_dir() and not is_sharded_checkpoint(path):
        newest = latest_complete(path / "checkpoints")
        if newest is None and (path / "checkpoint.pth").is_file():
            return load_file(path / "checkpoint.pth")
        if newest is None:
            raise CheckpointError(f"{path}: no checkpoint.pth and no complete checkpoints/step_*/")
        path = newest
    if not is_sharded_checkpoint(path):
        return load_file(path)
    extra = load_file(path / EXTRA)
    cfg = config_from_toml(extra["config"])
    student, teacher = build_student_teacher(cfg)
    template = {which: (teacher if which == "teacher" else student).state_dict()}
    return {**read_sharded(path, template), "config": extra["config"]}


def param_groups(model: nn.Module) -> list[dict]:
    """Official groups: weight decay on weights only; biases and 1-D parameters get none."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if name.endswith(".bias") or p.dim() == 1 else decay).append(p)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


class StepLog:
    """One step's numbers. The loss and the gradient norm may still be on the device
    (`DeviceValue`): reading them waits for the step's work, so nothing here forces a sync."""

    def __init__(self, step: int, epoch: int, loss, lr: float, wd: float, momentum: float,
                 teacher_temp: float, grad_norm, images_per_s: float = 0.0):
        self.step, self.epoch, self.lr, self.wd = step, epoch, lr, wd
        self.momentum, self.teacher_temp, self.images_per_s = momentum, teacher_temp, images_per_s
        self._loss, self._grad_norm = loss, grad_norm

    @property
    def loss(self) -> float:
        return float(self._loss)

    @property
    def grad_norm(self) -> float:
        return float(self._grad_norm)

    def __repr__(self) -> str:
        return f"StepLog(step={self.step}, loss={self._loss!r}, lr={self.lr:.3g})"

    def as_dict(self) -> dict:
        return dict(step=self.step, epoch=self.epoch, loss=self.loss, lr=self.lr, wd=self.wd,
                    momentum=self.momentum, teacher_temp=self.teacher_temp,
                    grad_norm=self.grad_norm, images_per_s=self.images_per_s)


class Trainer(TrainerCheckpoints):
    def __init__(self, cfg: Config, resume: bool | str = False):
        """resume: True (a checkpoint must exist), "auto" (if one exists), False."""
        self.cfg = cfg
        self.device = pick_device(cfg.run.device)
        self.out = Path(cfg.run.output_dir)
        self.rank, self.world = world()
        torch.manual_seed(cfg.run.seed)
        random.seed(cfg.run.seed)
        # as the official code: convolutions (impl.patch_embedding="conv") get cuDNN's
        # fastest algorithm for each input shape, chosen on first use
        torch.backends.cudnn.benchmark = True

        o = cfg.optim
        check_ranges(cfg)
        for name, choices in IMPL_CHOICES.items():
            if getattr(cfg.impl, name) not in choices:
                raise ValueError(f"impl.{name} must be one of {', '.join(choices)}; "
                                 f"got {getattr(cfg.impl, name)!r}")
        self.precision = self._precision()
        self.input = TrainingInput(cfg, self.device, self.rank, self.world, self.precision,
                                   save_progress=self.save)
        self.ncrops, self.iters_per_epoch = self.input.ncrops, self.input.iters_per_epoch

        if resume == "auto":
            resume = run_has_checkpoint(self.out)
        self.student, self.teacher = build_student_teacher(cfg)
        if cfg.run.init_from and not resume:  # (a resume's weights are its checkpoint's)
            try:
                loaded = init_weights(self.student, self.teacher,
                                      read_checkpoint(cfg.run.init_from), cfg.run.init_from)
            except CheckpointError as e:
                raise CheckpointError(f"run.init_from: {e}") from None
            if self.rank == 0:
                print(f"run.init_from: {loaded} from {cfg.run.init_from}", flush=True)
        self.student.to(self.device)
        self.teacher.to(self.device)
        self.sharded = self.world > 1 or cfg.impl.fsdp == "always"
        self._apply_impl(cfg.impl)
        # fused: one kernel for all parameters; on FSDP2's DTensors also far less host work
        # than the per-parameter loop (~7x, CPU measurement). On CPU "auto" keeps torch's
        # default: the fused CPU kernel's threads compete with the data workers there.
        choice = cfg.impl.optimizer
        if choice == "auto":
            choice = "fused" if self.device.type == "cuda" else "torch"
        adamw = {"fused": dict(fused=True), "foreach": dict(foreach=True),
                 "official": dict(foreach=False), "torch": {}}[choice]
        graphed = uses_graph(cfg, self.device, self.sharded)
        if graphed and self.device.type == "cuda":
            adamw["capturable"] = True  # its step counts on the device, lr read from a tensor
        self.optimizer = torch.optim.AdamW(param_groups(self.student), **adamw)
        loss_cls = DINOLoss if cfg.impl.loss == "fused" else OfficialDINOLoss
        self.loss_fn = loss_cls(cfg.model.out_dim, self.ncrops, o.warmup_teacher_temp,
                                o.teacher_temp, o.warmup_teacher_temp_epochs, o.epochs,
                                o.student_temp, o.center_momentum).to(self.device)
        if cfg.impl.ema == "fused":
            self.ema = EMAPlan(list(self.teacher.parameters()), list(self.student.parameters()))
        else:
            teacher_params, student_params = list(self.teacher.parameters()), list(self.student.parameters())
            self.ema = lambda m: ema_reference_(teacher_params, student_params, m)

        self.global_batch = o.batch_size_per_device * self.world  # the images of one step
        n = self.iters_per_epoch
        self.lr_schedule = cosine_schedule(o.lr * self.global_batch / 256, o.min_lr, o.epochs, n, o.warmup_epochs)
        self.wd_schedule = cosine_schedule(o.weight_decay, o.weight_decay_end, o.epochs, n)
        self.momentum_schedule = cosine_schedule(o.momentum_teacher, 1.0, o.epochs, n)
        self.total_steps = o.epochs * n
        self.graphed = GraphedStep(self) if graphed else None

        self._unchecked: StepLog | None = None  # the last step whose loss was not read yet
        self._clear_stop()
        self.scaler = torch.amp.GradScaler(self.device.type) if self.precision == torch.float16 else None
        self.step = 0
        self._pending_save = None  # (future, folder) of a background sharded save
        self._checkpoint_group = None
        self._saved_step = None
        self.knn_sets = None  # run.knn_every_epochs: (memory, queries), opened once
        if cfg.run.knn_every_epochs:  # checked now, not at the end of the first epoch
            from dinofuse.engine.eval.report import knn_datasets

            self.knn_sets = knn_datasets(cfg)
            if self.knn_sets is None:
                raise TrainingError("run.knn_every_epochs needs query images: set "
                                    "run.knn_val=DIR (Fashion-MNIST brings its test split)")
        if resume:
            self._resume()
        else:
            check_fresh_start(self.out)

    # ------------------------------------------------------------------ one step

    def _apply_impl(self, impl) -> None:
        if impl.fsdp == "always" and not dist.is_initialized():
            raise TrainingError("impl.fsdp=\"always\" needs a process group: run under torchrun, "
                                "or call dinofuse.engine.parallel.init_distributed(force=True)")
        param_dtype = self.precision if self.precision == torch.bfloat16 else None
        for model in (self.student, self.teacher):
            model.backbone.fix_attention_backend(self.device)
            parallelize(model, impl, shard=self.sharded, param_dtype=param_dtype,
                        is_teacher=model is self.teacher)

    def _precision(self) -> torch.dtype | None:
        p = self.cfg.optim.precision
        if p == "auto":
            return torch.bfloat16 if self.device.type == "cuda" else None
        return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[p]

    def _autocast(self, cache: bool = True):
        if self.precision is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.precision, cache_enabled=cache)

    def train_step(self, crops: list[torch.Tensor]) -> StepLog:
        it = self.step
        epoch = it // self.iters_per_epoch
        crops = [c.to(self.device, non_blocking=True) for c in crops]
        if self.graphed is not None:  # the whole step replayed from one CUDA graph
            loss, grad_norm = self.graphed(crops, it, epoch)
            log = self._log_and_check(it, epoch, loss)
        else:
            for i, group in enumerate(self.optimizer.param_groups):
                group["lr"] = self.lr_schedule[it]
                if i == 0:  # only the weights decay
                    group["weight_decay"] = self.wd_schedule[it]
            loss = self.forward_loss(crops, epoch)
            log = self._log_and_check(it, epoch, loss)
            grad_norm = self.backward_update(loss, epoch, self.momentum_schedule[it])
        self.step += 1
        # the norm is global already (sharded gradients were summed over ranks)
        log._grad_norm = grad_norm if isinstance(grad_norm, float) else \
            DeviceValue(grad_norm, mean_over_ranks=False)
        return log

    def _log_and_check(self, it: int, epoch: int, loss: torch.Tensor) -> StepLog:
        """The step's log, its loss the mean over ranks (so every rank stops together), read
        without waiting: the previous step's loss is checked now (its forward finished long
        ago), this one's during the next step or before a save. "official" reads it now,
        after the forward, as the official code does: a sync per step."""
        votes = tuple(self._stop_asked[r] for r in STOP_REASONS)
        log = StepLog(it, epoch, DeviceValue(loss, flags=votes), self.lr_schedule[it], self.wd_schedule[it],
                      self.momentum_schedule[it], self.loss_fn.teacher_temp_at(epoch), 0.0)
        if self.cfg.impl.loss_check == "official":  # nothing is ever left unchecked then
            self._check_finite(log)
        else:
            previous, self._unchecked = self._unchecked, log
            if previous is not None:
                self._check_finite(previous)
        return log

    def forward_loss(self, crops: list[torch.Tensor], epoch: int,
                     autocast_cache: bool = True) -> torch.Tensor:
        with self._autocast(autocast_cache):
            with torch.no_grad():  # no gradient anyway; this skips autograd's and FSDP2's
                teacher_out = self.teacher(crops[:2])  # bookkeeping (and shares eval's graphs)
            student_out = self.student(crops)
        return self.loss_fn(student_out, teacher_out, epoch)

    def backward_update(self, loss: torch.Tensor, epoch: int, momentum: float | torch.Tensor,
                        decay: torch.Tensor | None = None) -> torch.Tensor | float:
        """Backward, clipping, last-layer freeze, AdamW, EMA; returns the gradient norm.
        decay: AdamW's weight-decay factor (1 - lr*wd) as a device tensor, applied here to
        the decaying weights when the optimizer's own weight decay is 0 (a captured graph)."""
        o = self.cfg.optim
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        if self.cfg.impl.clip == "official" and o.clip_mode == "per_param":
            grad_norm = clip_gradients_official(self.student, o.clip_grad)
        else:
            grad_norm = clip_gradients(self.student, o.clip_grad, o.clip_mode)
        cancel_last_layer_gradients(self.student, epoch, o.freeze_last_layer)
        if decay is not None:  # AdamW skips parameters without a gradient, decay included
            decaying = [p for p in self.optimizer.param_groups[0]["params"] if p.grad is not None]
            if decaying:
                with torch.no_grad():
                    torch._foreach_mul_(decaying, decay)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.ema(momentum)
        return grad_norm

    def check_finite(self) -> None:
        """Stop on a non-finite loss of the last step not yet checked (waits for its forward)."""
        log, self._unchecked = self._unchecked, None
        if log is not None:
            self._check_finite(log)

    def _check_finite(self, log: StepLog) -> None:
        if not math.isfinite(log.loss):
            self._settle_collectives()
            raise TrainingError(f"loss is {log.loss} at step {log.step} (epoch {log.epoch}); "
                                f"stopping. The last good checkpoint is kept in {self.out}")
        for reason, voted in zip(STOP_REASONS, log._loss.votes):
            if voted and self.stopping != "signal":  # a signal's stop outranks the time limit's
                self.stopping = reason

    def _clear_stop(self) -> None:
        # A stop asked of this process (the time limit, a signal), voted in each step's loss
        # all-reduce; `stopping` is what the ranks agreed, read a step later on every rank.
        self._stop_asked: dict[str, bool] = dict.fromkeys(STOP_REASONS, False)
        self._signal_name: str | None = None
        self.stopping: str | None = None

    def ask_to_stop(self, reason: str) -> None:
        """Stop, with a checkpoint, after a step every rank agrees on: the next step carries
        this rank's vote in its loss all-reduce, the one after reads it on every rank and is
        the last. reason: "time" (run.max_minutes: the run then ends as if complete) or
        "signal" (fit raises TrainingError once the checkpoint is saved)."""
        if reason not in STOP_REASONS:
            raise ValueError(f"a stop's reason is one of {', '.join(STOP_REASONS)}; got {reason!r}")
        self._stop_asked[reason] = True

    @contextlib.contextmanager
    def _stop_on_signals(self):
        """SIGTERM (torchrun's and SLURM's stop, preemption), SIGUSR1 (SLURM's advance
        notice, `--signal=USR1@120`) and SIGINT (Ctrl-C) ask for a stop at the next agreed
        step, with a checkpoint. A second signal meets the handler that was there before (by
        default: the process ends at once; Ctrl-C's KeyboardInterrupt)."""
        if threading.current_thread() is not threading.main_thread():
            yield  # signal handlers can only be set from the main thread
            return
        previous = {}

        def handler(signum, frame):
            self._signal_name = signal.Signals(signum).name
            signal.signal(signum, previous[signum])
            self.ask_to_stop("signal")
            if signum == signal.SIGINT and self.rank == 0:  # a person waits: say what comes
                # (os.write: a print could meet the progress bar's own write to stderr)
                os.write(2, b"\ndinofuse: Ctrl-C: stopping in a step or two, with a "
                            b"checkpoint; Ctrl-C again to quit at once\n")

        for sig in STOP_SIGNALS:
            previous[sig] = signal.signal(sig, handler)
        try:
            yield
        finally:
            for sig, old in previous.items():
                if signal.getsignal(sig) is handler:
                    signal.signal(sig, old)

    def _settle_collectives(self) -> None:
        """Wait for the all-reduces still in flight (this step's loss and center statistic).
        A non-finite loss stops every rank at the same step (the loss is the mean over ranks),
        so these complete. Left unwaited, they outlive the error until the interpreter's
        teardown (the suspect of a gloo abort at exit, seen once in the 2-process tests)."""
        if isinstance(self.loss_fn, CenteredDINOLoss):
            self.loss_fn.apply_center_update()
        if self._unchecked is not None:
            _ = self._unchecked.loss  # reading it waits for its all-reduce

    # ------------------------------------------------------------------ the loop

    def fit(self, max_steps: int = 0, progress: bool = True) -> list[StepLog]:
        """Train to the end of the schedule (or max_steps / run.max_minutes); returns the logs.
        The output folder is this run's alone while it trains (`engine/run_lock.py`)."""
        lock = self._lock_output_folder()
        try:
            return self._fit(max_steps, progress)
        finally:
            lock.release()

    def _lock_output_folder(self) -> RunLock:
        """Rank 0 takes the folder's lock and writes the resolved config there; every rank
        stops together, in one line, when another run holds it or the folder is unwritable."""
        lock = RunLock(self.out)
        problem = None
        if self.rank == 0:
            try:
                holder = lock.acquire()
                if holder is None:
                    save_config(self.cfg, self.out / "config.toml")
                else:
                    problem = (f"{self.out} is in use by another training run ({holder}): wait "
                               f"for it to end or stop it, or choose another run.output_dir "
                               f"(--output-dir)")
            except OSError as e:
                lock.release()
                problem = output_dir_problem(self.out, e)
        if dist.is_initialized():
            box = [problem, lock.stamp]
            dist.broadcast_object_list(box, src=0)
            problem, stamp = box
            if problem is None and stamp is not None:
                problem = self._unshared_output_dir(RunLock(self.out).written_by(stamp))
        if problem is not None:
            lock.release()
            raise TrainingError(problem)
        return lock

    def _unshared_output_dir(self, sees_rank_0s: bool) -> str | None:
        """Every rank must see one folder (rank 0 writes the checkpoint file and the sharded
        folders' marks, every rank reads them to resume): a folder on each node's own disk is
        refused at the start, on every rank, naming a process that does not see rank 0's."""
        seen = [None] * self.world
        dist.all_gather_object(seen, (sees_rank_0s, socket.gethostname()))
        blind = [(rank, host) for rank, (sees, host) in enumerate(seen) if not sees]
        if not blind:
            return None
        rank, host = blind[0]
        more = f" (and {len(blind) - 1} more)" if len(blind) > 1 else ""
        return (f"run.output_dir {self.out} is not one folder for every process: rank {rank} on "
                f"{host}{more} does not see rank 0's files there; put it on storage that every "
                f"node mounts")

    def _fit(self, max_steps: int, progress: bool) -> list[StepLog]:
        cfg = self.cfg
        main = self.rank == 0  # one process writes the logs
        logs: list[StepLog] = []
        started, last_time, last_step = time.perf_counter(), time.perf_counter(), self.step
        first_step = self.step
        stop_at = self.total_steps if not max_steps else min(self.total_steps, self.step + max_steps)
        bar = Progress(stop_at, "step ", initial=self.step, unit="step", enabled=progress and main)
        board = _tensorboard(self.out / "tensorboard") if main else None
        deadline = started + 60 * cfg.run.max_minutes if cfg.run.max_minutes else math.inf
        self._clear_stop()  # each fit asks afresh
        with JsonLines(self.out / "log.jsonl", main) as log_file, self._stop_on_signals():
            while self.step < stop_at and not self.stopping:
                before = self.step
                for crops, _ in self.input.batches(*divmod(self.step, self.iters_per_epoch)):
                    log = self.train_step(crops)
                    logs.append(log)
                    now = time.perf_counter()
                    if self.step % cfg.run.log_every_steps == 0 or self.step == stop_at:
                        log.images_per_s = ((self.step - last_step) * self.global_batch
                                            / (now - last_time))  # every process's
                        last_time, last_step = now, self.step
                        log_file.write(log.as_dict())
                        bar.update(self.step, {"loss": f"{log.loss:.4f}", "lr": f"{log.lr:.2e}",
                                               "images/s": f"{log.images_per_s:.0f}"})
                        if board is not None:
                            for key, value in log.as_dict().items():
                                if key not in ("step", "epoch"):
                                    board.add_scalar(f"train/{key}", value, log.step)
                    if cfg.run.save_every_steps and self.step % cfg.run.save_every_steps == 0:
                        self.save()
                    if now > deadline:  # every rank stops at the step they agree on
                        self.ask_to_stop("time")
                    if self.step >= stop_at or self.stopping:
                        break
                if self.step == before:  # asking again would ask forever
                    raise TrainingError("the input ({}) gave no batch for epoch {} from its step "
                                        "{}".format(self.input.backend,
                                                    *divmod(self.step, self.iters_per_epoch)))
                if self.step % self.iters_per_epoch == 0:
                    self.keep_epoch_checkpoint(self.save())  # an epoch ended
                    self._knn_between_epochs(board)
        bar.close()
        if board is not None:
            board.close()
        if self.step != first_step or self.last_save() is None:  # (a finished run resumed:
            self.save()  # its checkpoint holds this state already; a big one is not rewritten)
        self.finish_pending_save()
        if self.stopping == "signal":
            by = self._signal_name or "a signal to another rank"
            raise TrainingError(f"stopped at step {self.step} by {by}; checkpoint saved in "
                                f"{self.out}: relaunch with --resume (or --auto-resume) to go on")
        return logs

    def _knn_between_epochs(self, board) -> None:
        """run.knn_every_epochs: the teacher's k-NN at the end of every that many epochs (not
        after the last when the report after training comes), every rank extracting a share;
        rank 0 logs it to knn_log.jsonl and TensorBoard and shows it."""
        r, epoch = self.cfg.run, self.step // self.iters_per_epoch
        last = self.step >= self.total_steps
        if not r.knn_every_epochs or epoch % r.knn_every_epochs or self.stopping \
                or (last and r.knn_after_training):
            return
        from dinofuse.engine.eval.report import network_knn

        backbone = self.eval_backbone()
        mode = backbone.training  # unsharded, it is the teacher's own: left as it was
        # the data loaders draw their seeds from the global generators: training must go on
        # with the draws it would have had without the evaluation
        states = (torch.get_rng_state(), random.getstate(),
                  torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
        try:
            acc = network_knn(self.cfg, backbone, self.knn_sets, self.device,
                              distributed=self.world > 1)
        finally:
            backbone.train(mode)
            torch.set_rng_state(states[0])
            random.setstate(states[1])
            if states[2] is not None:
                torch.cuda.set_rng_state_all(states[2])
        if self.rank != 0:
            return
        record = {"step": self.step, "epoch": epoch, "knn_top1": acc["top1"], "knn_top5": acc["top5"]}
        with JsonLines(self.out / "knn_log.jsonl") as knn_log:
            knn_log.write(record)
        if board is not None:
            board.add_scalar("eval/knn_top1", acc["top1"], self.step)
            board.add_scalar("eval/knn_top5", acc["top5"], self.step)
        # `epoch` counts the epochs done (log.jsonl's epoch of the steps before is one less)
        print(f"after epoch {epoch} of {self.cfg.optim.epochs} (step {self.step}): k-NN "
              f"(k={r.knn_k}) of the teacher: top-1 {acc['top1']:.2f}%, top-5 {acc['top5']:.2f}%",
              file=sys.stderr, flush=True)

    # ------------------------------------------------------------------ evaluation

    def eval_backbone(self) -> nn.Module:
        """The teacher's backbone for evaluation on this rank alone: itself, or, when FSDP2
        shards it, an unsharded copy (whose forward needs no other rank). A collective then:
        every rank calls."""
        if not self.sharded:
            return self.teacher.backbone
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(self.teacher, options=StateDictOptions(full_state_dict=True))
        backbone = build_backbone(self.cfg, 0.0)
        backbone.load_state_dict({k.removeprefix("backbone."): v for k, v in full.items()
                                  if k.startswith("backbone.")})
        return backbone.to(self.device).eval()


def _tensorboard(path: Path):
    """A TensorBoard writer, or None where the tensorboard package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(path))


if __name__ == "__main__":  # torchrun --nproc_per_node=N -m dinofuse.engine.train [train args]
    import sys

    from dinofuse.engine.cli import main

    sys.exit(main(["train", *sys.argv[1:]]))
