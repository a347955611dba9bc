"""Fit a run's length to a time budget: `dinofuse train --fit-minutes M`.

A trial trainer (same config, a scratch folder) times real training steps and one checkpoint
save on this machine, and, with `run.knn_every_epochs`, the teacher's features of a few
hundred k-NN images (the between-epoch k-NN's cost, scaled to its images); the run then gets
as many whole epochs as fit in M minutes, never more than the config's. The schedules stay
whole (warm-up, cosine to the end), where `run.max_minutes` would cut them short. The
epoch-counted lengths (LR warm-up, teacher temperature warm-up, last-layer freeze) shrink in
proportion, so that a shorter run keeps the planned run's shape. The resolved config saved
beside the run holds the fitted values.
Under several processes every rank runs the trial and takes the slowest rank's times, so all
fit the same epochs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import itertools
import math
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from dinofuse.engine.config import Config
from dinofuse.engine.parallel import use_training_threads, world
from dinofuse.engine.train import Trainer

WARMUP_STEPS = 10  # compilation, autotuning, a CUDA graph's capture: not timed
TIMED_STEPS = 30
KNN_TIMED_IMAGES = 512  # two of the k-NN's batches of 256


@dataclass
class TimeFit:
    epochs: int  # fitted
    planned_epochs: int  # the config's
    step_s: float  # one training step, measured
    save_s: float  # one checkpoint save, measured (the run saves after every epoch)
    iters_per_epoch: int
    knn_s: float = 0.0  # one between-epoch k-NN, estimated (run.knn_every_epochs)
    knn_every: int = 0

    def describe(self, minutes: float) -> str:
        per_epoch = self.iters_per_epoch * self.step_s + self.save_s
        knn = (f"; a {self.knn_s:.1f} s k-NN every {self.knn_every} epoch(s), estimated"
               if self.knn_every else "")
        return (f"fit to {minutes:g} min: {self.epochs} of {self.planned_epochs} epochs "
                f"({self.iters_per_epoch} steps of {1e3 * self.step_s:.1f} ms and a "
                f"{self.save_s:.1f} s save each, {per_epoch:.1f} s per epoch, measured{knn})")


def knn_evaluations(epochs: int, every: int, report_after: bool) -> int:
    """How many between-epoch k-NN evaluations a run of `epochs` makes: after every `every`
    epochs, but not after the last when the report after training follows (the trainer's
    rule)."""
    if not every:
        return 0
    return epochs // every - (report_after and epochs % every == 0)


def fitted_epochs(minutes: float, planned: int, iters_per_epoch: int, step_s: float,
                  save_s: float, knn_s: float = 0.0, knn_every: int = 0,
                  report_after: bool = True) -> int:
    """Whole epochs (each: its steps, then a save; and the between-epoch k-NN evaluations)
    that fit in `minutes`; 1 to `planned`."""
    per_epoch = iters_per_epoch * step_s + save_s
    epochs = max(1, min(planned, math.floor(60 * minutes / per_epoch)))
    while epochs > 1 and (epochs * per_epoch + knn_s * knn_evaluations(epochs, knn_every, report_after)
                          > 60 * minutes):
        epochs -= 1
    return epochs


def shrink_schedule(cfg: Config, epochs: int) -> Config:
    """cfg with `epochs`, its epoch-counted lengths scaled by epochs / cfg.optim.epochs."""
    o = cfg.optim
    scale = epochs / o.epochs
    optim = dataclasses.replace(
        o, epochs=epochs, warmup_epochs=o.warmup_epochs * scale,
        warmup_teacher_temp_epochs=round(o.warmup_teacher_temp_epochs * scale),
        # a frozen last layer stays frozen for at least an epoch when it was planned
        freeze_last_layer=max(min(o.freeze_last_layer, 1), round(o.freeze_last_layer * scale)))
    return dataclasses.replace(cfg, optim=optim)


@contextlib.contextmanager
def _scratch_folder(cfg: Config):
    """A folder for the trial's checkpoint: a temporary one for one process; under several,
    one inside the run's output folder, which every rank sees (a sharded save needs that)."""
    rank, size = world()
    if size == 1:
        with tempfile.TemporaryDirectory(prefix="dinofuse-fit-") as scratch:
            yield scratch
        return
    scratch = Path(cfg.run.output_dir) / "fit-trial"
    if rank == 0:
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(parents=True)
    dist.barrier()
    try:
        yield str(scratch)
    finally:
        dist.barrier()
        if rank == 0:
            shutil.rmtree(scratch, ignore_errors=True)


def measure(cfg: Config) -> tuple[float, float, int, float]:
    """Seconds per training step (TIMED_STEPS after WARMUP_STEPS) and per checkpoint save of
    a trial trainer, its steps per epoch, and seconds per between-epoch k-NN (0 without
    run.knn_every_epochs); under several processes, the slowest rank's."""
    with _scratch_folder(cfg) as scratch:
        run = dataclasses.replace(cfg.run, output_dir=scratch, knn_after_training=False)
        trial = Trainer(dataclasses.replace(cfg, run=run))
        use_training_threads(trial)
        batches = itertools.chain.from_iterable(
            (crops for crops, _ in trial.input.batches(epoch, 0)) for epoch in itertools.count())
        _steps(trial, batches, WARMUP_STEPS)
        started = time.perf_counter()
        _steps(trial, batches, TIMED_STEPS)
        step_s = (time.perf_counter() - started) / TIMED_STEPS
        started = time.perf_counter()
        trial.save()
        trial.finish_pending_save()
        save_s = time.perf_counter() - started
        knn_s = _knn_seconds(trial) if trial.knn_sets is not None else 0.0
        iters = trial.iters_per_epoch
        if dist.is_initialized():  # every rank fits the same epochs
            slowest = torch.tensor([step_s, save_s, knn_s], dtype=torch.float64, device=trial.device)
            dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
            step_s, save_s, knn_s = slowest.tolist()
        del trial, batches
    gc.collect()  # the trial's models and buffers (held in reference cycles) before the run's
    return step_s, save_s, iters, knn_s


def _knn_seconds(trial: Trainer) -> float:
    """One between-epoch k-NN of the trial's teacher, estimated: the features of the first
    KNN_TIMED_IMAGES memory images, timed (each rank its share, as there), scaled to the
    memory and queries. The forward passes are its cost; the neighbour search is small
    beside them."""
    from dinofuse.engine.eval.knn import extract_features
    from dinofuse.engine.eval.report import eval_transform

    r, (memory, queries) = trial.cfg.run, trial.knn_sets
    timed = torch.utils.data.Subset(memory, range(min(KNN_TIMED_IMAGES, len(memory))))
    backbone = trial.eval_backbone()
    transform = eval_transform(trial.cfg.data.global_crop_size, r.knn_resize_ratio)
    started = time.perf_counter()
    extract_features(backbone, timed, transform, trial.device, mode=r.knn_features,
                     distributed=trial.world > 1)
    elapsed = time.perf_counter() - started
    return elapsed * (len(memory) + len(queries)) / len(timed)


def _steps(trainer, batches, count: int) -> None:
    """`count` training steps, then wait for the device to finish them."""
    for crops in itertools.islice(batches, count):
        trainer.step %= trainer.total_steps  # a schedule shorter than the trial starts over
        trainer.train_step(crops)
    trainer.check_finite()  # reads the last loss: the host waits for its forward
    if trainer.device.type == "cuda":
        torch.cuda.synchronize(trainer.device)


def fit_to_minutes(cfg: Config, minutes: float) -> tuple[Config, TimeFit]:
    """The config with its epochs fitted to `minutes` of training on this machine."""
    if not minutes > 0:
        raise ValueError(f"--fit-minutes must be a positive number of minutes; got {minutes:g}")
    step_s, save_s, iters, knn_s = measure(cfg)
    r = cfg.run
    epochs = fitted_epochs(minutes, cfg.optim.epochs, iters, step_s, save_s, knn_s,
                           r.knn_every_epochs, r.knn_after_training)
    return shrink_schedule(cfg, epochs), TimeFit(epochs, cfg.optim.epochs, step_s, save_s, iters,
                                                 knn_s, r.knn_every_epochs)
