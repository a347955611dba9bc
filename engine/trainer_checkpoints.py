"""The trainer's saves and resumes, mixed into `Trainer` (they read its models, optimizer,
loss, scaler and step; `engine/checkpoint.py` holds the file formats they use).

Two formats. "file": OUTPUT_DIR/checkpoint.pth, one file with full tensors (gathered on
rank 0 when sharded). "sharded": OUTPUT_DIR/checkpoints/step_N/, written by every rank
with torch.distributed.checkpoint (in the background when run.async_checkpoint), marked
COMPLETE only after all ranks finished; it loads on any number of processes.
run.checkpoint_format="auto" picks sharded when the models are sharded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import random
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from dinofuse.engine.checkpoint import (
    EXTRA,
    KEEP,
    CheckpointError,
    checkpoint_step,
    dcp_errors,
    keep_copy,
    latest_complete,
    load_file,
    mark_complete,
    open_sharded,
    prune_checkpoints,
    safe_planner,
    save_atomic,
    step_dir,
)
from dinofuse.engine.config import config_from_toml, config_to_toml
from dinofuse.engine.errors import TrainingError
from dinofuse.engine.parallel import from_rank_zero


# the run's folder itself, which a resume reads from wherever it was moved
RESUME_MAY_MOVE = {("run", "output_dir")}


class TrainerCheckpoints:
    """What a resume needs, saved atomically in either format, and loaded back into another
    number of processes (the epoch and its fraction kept when the global batch changed)."""

    def last_save(self) -> Path | None:
        """This run's newest complete save, in the format it saves in: checkpoint.pth or a
        sharded step folder."""
        if self._sharded_saves():
            return latest_complete(self.out / "checkpoints")
        path = self.out / "checkpoint.pth"
        return path if path.is_file() else None

    def keep_epoch_checkpoint(self, saved: Path) -> None:
        """run.saveckp_freq, as the official --saveckp_freq: after epochs 0, N, 2N, ...
        (counted from 0) the save just made is kept for good, as checkpoint{epoch:04}.pth
        beside checkpoint.pth, or, sharded, its step folder marked KEEP (pruning leaves it).
        Rank 0 alone; a failure is said and the run goes on (its checkpoint is saved)."""
        freq, epoch = self.cfg.run.saveckp_freq, self.step // self.iters_per_epoch - 1
        if not freq or epoch % freq or self.rank != 0:
            return
        kept = saved / KEEP if saved.is_dir() else saved.with_name(f"checkpoint{epoch:04}.pth")
        try:
            if saved.is_dir():
                kept.write_text(f"epoch {epoch}\n")
            else:
                keep_copy(saved, kept)
        except OSError as e:
            print(f"dinofuse: cannot keep {kept} ({e.strerror or e}); {saved} is saved",
                  file=sys.stderr, flush=True)

    def _sharded_saves(self) -> bool:
        fmt = self.cfg.run.checkpoint_format  # one of these three (engine/config.py's rules)
        return fmt == "sharded" or (fmt == "auto" and self.sharded)

    def _extra_state(self) -> dict:
        """Everything but the models and optimizer: small, the same on every rank."""
        rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {"dino_loss": self.loss_fn.state_dict(),
                "step": self.step, "iters_per_epoch": self.iters_per_epoch, "world": self.world,
                "scaler": self.scaler.state_dict() if self.scaler else None,
                "rng": rng, "config": config_to_toml(self.cfg)}

    def state(self) -> dict:
        """Everything a resume needs, as full (unsharded) tensors: rank 0 holds them when
        the models are sharded, so a checkpoint loads with any number of processes."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions, get_model_state_dict, get_optimizer_state_dict)

        if self.sharded:
            full = StateDictOptions(full_state_dict=True, cpu_offload=True)
            models = {"student": get_model_state_dict(self.student, options=full),
                      "teacher": get_model_state_dict(self.teacher, options=full),
                      "optimizer": get_optimizer_state_dict(self.student, self.optimizer, options=full)}
        else:  # one process: the optimizer keyed by parameter name, so that several can resume
            models = {"student": self.student.state_dict(), "teacher": self.teacher.state_dict(),
                      "optimizer": get_optimizer_state_dict(self.student, self.optimizer)}
        return {**models, **self._extra_state()}

    def _sharded_state(self) -> dict:
        """Models and optimizer as this rank's shards, keyed by parameter name (the optimizer
        too), so that DCP can load them into another number of processes."""
        from torch.distributed.checkpoint.state_dict import (
            get_model_state_dict, get_optimizer_state_dict)

        return {"student": get_model_state_dict(self.student),
                "teacher": get_model_state_dict(self.teacher),
                "optimizer": get_optimizer_state_dict(self.student, self.optimizer)}

    def save(self) -> Path:
        self.check_finite()  # never save the weights of a step whose loss was not finite
        if self._sharded_saves():
            return self._save_sharded()
        path = self.out / "checkpoint.pth"
        state = self.state()  # a collective under FSDP: every rank takes part
        # on disk before anyone goes on, and a failed write stops every rank now
        from_rank_zero(lambda: save_atomic(state, path), (CheckpointError,))
        return path

    def _save_sharded(self) -> Path:
        import torch.distributed.checkpoint as dcp

        self.finish_pending_save()
        folder = step_dir(self.out / "checkpoints", self.step)
        if self._saved_step == self.step:  # an epoch's end, then the run's: one save
            return folder  # (decided from memory: every rank decides alike)
        self._saved_step = self.step
        extra = self._extra_state()  # before the models: it settles the pending center
        if self.rank == 0:
            folder.mkdir(parents=True, exist_ok=True)
            save_atomic(extra, folder / EXTRA)
        state = self._sharded_state()
        if self.cfg.run.async_checkpoint and dist.is_initialized():
            # the background writer gets its own group: its collectives never meet training's
            if self._checkpoint_group is None:
                timeout = datetime.timedelta(seconds=self.cfg.run.collective_timeout_s)
                self._checkpoint_group = dist.new_group(backend="gloo", timeout=timeout)
            future = dcp.async_save(state, checkpoint_id=str(folder),
                                    process_group=self._checkpoint_group)
            self._pending_save = (future, folder)
        else:
            with self._sharded_write(folder):
                dcp.save(state, checkpoint_id=str(folder))
            self._mark_complete(folder)
        return folder

    def finish_pending_save(self) -> None:
        """Wait for a background save, then mark it complete once every rank finished."""
        if self._pending_save is None:
            return
        future, folder = self._pending_save
        self._pending_save = None
        with self._sharded_write(folder):
            future.result()
        self._mark_complete(folder)

    @contextlib.contextmanager
    def _sharded_write(self, folder: Path):
        """A write that failed on any rank stops every rank with one line (the folder is
        never marked complete), saying which checkpoint a resume would take."""
        try:
            with dcp_errors("write", folder):
                yield
        except CheckpointError as e:
            kept = latest_complete(folder.parent)
            kept = f"the newest complete one, {kept}, is kept" if kept else "none was complete before"
            raise CheckpointError(f"{e}; {kept}") from None

    def _mark_complete(self, folder: Path) -> None:
        if dist.is_initialized():
            dist.barrier()  # every rank's shards are on disk
        if self.rank == 0:
            mark_complete(folder, {"step": checkpoint_step(folder), "world": self.world})
            prune_checkpoints(folder.parent, self.cfg.run.keep_checkpoints)

    def _newest_checkpoint(self) -> tuple[str, Path, dict | None] | None:
        """("sharded", folder, None) or ("file", path, its contents or None) of the newest
        resumable checkpoint; the file is read only to compare with a sharded one (a tie goes
        to the sharded one), and what was read is passed on rather than read again."""
        folder = latest_complete(self.out / "checkpoints")
        path = self.out / "checkpoint.pth"
        if not path.is_file():
            return None if folder is None else ("sharded", folder, None)
        if folder is None:
            return "file", path, None
        state = load_file(path)
        if int(state.get("step", -1)) > checkpoint_step(folder):
            return "file", path, state
        return "sharded", folder, None

    def _resume(self) -> None:
        newest = self._newest_checkpoint()
        if newest is None:
            raise TrainingError(f"--resume: no checkpoint in {self.out} (neither checkpoint.pth "
                                "nor a complete checkpoints/step_*/)")
        kind, path, state = newest
        if kind == "sharded":
            extra = self._load_sharded(path)
        else:
            extra = self._load_file(path, state)
        self._restore_extra(extra)

    def _check_config(self, saved_toml: str, path: Path) -> None:
        """Another model is refused. Other settings follow the command line, as the official
        code's arguments do; each that differs from the checkpoint's is named (a resume that
        left out `--data` would otherwise train on the default dataset unsaid)."""
        saved = dataclasses.asdict(config_from_toml(saved_toml))
        now = dataclasses.asdict(self.cfg)
        changed = {f"{section}.{k}": f"{saved[section][k]!r} there, {now[section][k]!r} here"
                   for section in saved for k in saved[section]
                   if saved[section][k] != now[section][k] and (section, k) not in RESUME_MAY_MOVE}
        model = [f"{name}: {what}" for name, what in changed.items() if name.startswith("model.")]
        if model:
            raise TrainingError(f"--resume: {path} was trained with another model config "
                                f"({'; '.join(model)})")
        if changed and self.rank == 0:
            print(f"--resume: settings other than those of {path} (the command line's are "
                  f"used): {'; '.join(f'{n}: {w}' for n, w in changed.items())}", flush=True)

    def _load_file(self, path: Path, state: dict | None = None) -> dict:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions, set_model_state_dict, set_optimizer_state_dict)

        state = state if state is not None else load_file(path)
        self._check_config(state["config"], path)
        optimizer = state["optimizer"]
        if all(isinstance(k, int) for k in optimizer["state"]):  # torch's own format
            if self.sharded:
                raise TrainingError(f"--resume: {path} keeps its optimizer state in torch's "
                                    "one-process format; resume it with one process")
            self.student.load_state_dict(state["student"])
            self.teacher.load_state_dict(state["teacher"])
            self.optimizer.load_state_dict(optimizer)
            return state
        full = StateDictOptions(full_state_dict=True)  # full tensors keyed by name
        set_model_state_dict(self.student, state["student"], options=full)
        set_model_state_dict(self.teacher, state["teacher"], options=full)
        # strict=False: parameters that never stepped yet (the frozen last layer) have no state
        set_optimizer_state_dict(self.student, self.optimizer, optimizer,
                                 options=StateDictOptions(full_state_dict=True, strict=False))
        self._drop_unsaved_optimizer_state(set(optimizer["state"]))
        return state

    def _drop_unsaved_optimizer_state(self, saved_names: set[str]) -> None:
        """Loading creates optimizer state for every parameter; one that had none when saved
        (the frozen last layer) has none again, so its first real step counts as the first,
        as in an uninterrupted run."""
        for name, p in self.student.named_parameters():
            if name not in saved_names:
                self.optimizer.state.pop(p, None)

    def _load_sharded(self, folder: Path) -> dict:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            set_model_state_dict, set_optimizer_state_dict)

        extra = load_file(folder / EXTRA)
        self._check_config(extra["config"], folder)
        state = self._sharded_state()  # templates: the optimizer's state is created for all
        reader, saved = open_sharded(folder)
        with dcp_errors("read", folder):
            dcp.load(state, storage_reader=reader, planner=safe_planner(allow_partial_load=True))
        set_model_state_dict(self.student, state["student"])
        set_model_state_dict(self.teacher, state["teacher"])
        set_optimizer_state_dict(self.student, self.optimizer, state["optimizer"])
        self._drop_unsaved_optimizer_state(
            {name for name, _ in self.student.named_parameters()
             if f"optimizer.state.{name}.step" in saved})
        return extra

    def _restore_extra(self, extra: dict) -> None:
        self.loss_fn.load_state_dict(extra["dino_loss"])
        if self.scaler and extra.get("scaler"):
            self.scaler.load_state_dict(extra["scaler"])
        self.step = self._resumed_step(int(extra["step"]), extra.get("iters_per_epoch"))
        torch.set_rng_state(extra["rng"]["torch"])
        random.setstate(extra["rng"]["python"])
        if "cuda" in extra["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(extra["rng"]["cuda"])
        # the EMA plan points at the parameters, which the loads updated in place


    def _resumed_step(self, step: int, saved_per_epoch: int | None) -> int:
        """The step to continue from. With another global batch (another number of
        processes, say) an epoch has another number of steps: the epoch and the fraction of
        it done are kept (the official code, which counts epochs, keeps the epoch), so the
        schedules continue where they were, not at the same step count."""
        if not saved_per_epoch or saved_per_epoch == self.iters_per_epoch:
            return step
        epoch, within = divmod(step, saved_per_epoch)
        resumed = epoch * self.iters_per_epoch + round(within * self.iters_per_epoch / saved_per_epoch)
        if self.rank == 0:
            print(f"resuming with {self.iters_per_epoch} steps per epoch where the checkpoint "
                  f"had {saved_per_epoch} (another global batch or number of images): its step {step} (epoch "
                  f"{epoch}, {within} steps in) continues as step {resumed}", flush=True)
        return resumed
