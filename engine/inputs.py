"""The trainer's input: batches of 2+N crops from synthetic tensors, DALI, batched tensor
operations or torchvision.

`TrainingInput` picks the source from the config (data.path, data.backend), gives this
rank its share of every epoch, and knows the epoch's length. Image folders and WebDataset
shards go through DALI when it is installed (`data.backend="auto"`); Fashion-MNIST's IDX
files, held in memory, are cut into crops on the training device by batched tensor
operations; "synthetic" crops are made once on the device.
"""

from __future__ import annotations

import itertools
import re
import shlex
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from dinofuse.dataloading.check import DALI_FORMATS
from dinofuse.dataloading.dali_multicrop import available as dali_available, shard_indexes
from dinofuse.dataloading import file_lists
from dinofuse.dataloading.readers import (
    DataError,
    ImageFiles,
    WebDatasetShards,
    open_images,
    webdataset_shards,
)
from dinofuse.dataloading.spec import MultiCropSpec
from dinofuse.dataloading.tensor_multicrop import TensorMultiCrop
from dinofuse.dataloading.torchvision_multicrop import MultiCropAugmentation, SeededMultiCrop
from dinofuse.engine.config import Config
from dinofuse.engine.errors import TrainingError
from dinofuse.engine.parallel import from_rank_zero

BACKENDS = ("auto", "torchvision", "dali", "tensor")
DALI_ONLY = "DALI cannot decode it; PIL can"  # the reason for an image only DALI fails on
SYNTHETIC_STEPS_PER_EPOCH = 100  # data.path="synthetic": the schedules' epoch length


def multicrop_spec(d) -> MultiCropSpec:
    """The augmentation spec of a DataConfig (the official values for what it leaves out)."""
    return MultiCropSpec(global_crop_size=d.global_crop_size, local_crop_size=d.local_crop_size,
                         global_crops_scale=d.global_crops_scale,
                         local_crops_scale=d.local_crops_scale,
                         local_crops_number=d.local_crops_number, blur_sigma=d.blur_radius,
                         dali_color=d.dali_color)


def synthetic_crops(spec: MultiCropSpec, batch: int, in_chans: int, device: torch.device,
                    seed: int) -> list[torch.Tensor]:
    """Normalized-image-like random crops, made once on the device (timing without data)."""
    g = torch.Generator(device=device).manual_seed(seed)
    sizes = [spec.global_crop_size] * 2 + [spec.local_crop_size] * spec.local_crops_number
    return [torch.randn(batch, in_chans, s, s, generator=g, device=device) for s in sizes]


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The epoch's permutation of n items, drawn from (seed, epoch) alone."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


class EpochSampler(torch.utils.data.Sampler):
    """A seeded permutation per epoch, cut to whole global batches (batch_size x world);
    rank r takes the r-th slice of each, so every image is seen once per epoch across ranks
    and the ranks together see what one process with the global batch would. Starts at any
    batch (resume)."""

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        self.n, self.batch_size, self.seed, self.rank, self.world = n, batch_size, seed, rank, world
        self.epoch, self.start_batch = 0, 0

    def batches(self) -> int:
        return self.n // (self.batch_size * self.world)

    def __len__(self) -> int:
        return (self.batches() - self.start_batch) * self.batch_size

    def _shares(self) -> torch.Tensor:
        """The epoch's order as (batch, rank, place in the rank's batch)."""
        order = epoch_permutation(self.n, self.seed, self.epoch)
        order = order[: self.batches() * self.batch_size * self.world]
        return order.view(self.batches(), self.world, self.batch_size)

    def __iter__(self):
        return iter(self._shares()[self.start_batch:, self.rank].reshape(-1).tolist())


def leave_ctrl_c_to_training(worker_id: int) -> None:
    """A data worker ignores Ctrl-C (the terminal sends SIGINT to every process of the job):
    the training process stops at the next step with a checkpoint, and needs its workers
    until then; they end with it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def data_worker_died(error: RuntimeError, out: Path | None = None) -> TrainingError | None:
    """The one-line stop for torch's report of a dead DataLoader worker, else None."""
    first = (str(error).strip().splitlines() or [""])[0]
    if "DataLoader worker" not in first:
        return None
    where = f" from the last checkpoint in {out}" if out is not None else ""
    return TrainingError(f"a data worker died ({first}): lower data.num_workers or the memory "
                         f"it needs, then go on with --resume{where}")


def dali_said(error: Exception) -> str:
    """The cause in a DALI pipeline error: what follows "encountered:" (before that, the
    pipeline definition's traceback), without its closing boilerplate."""
    text = str(error).split("encountered:")[-1]
    lines = [line.strip() for line in text.splitlines()
             if line.strip() and "pipeline object is no longer valid" not in line]
    return " ".join(lines) or type(error).__name__


class TrainingInput:
    def __init__(self, cfg: Config, device: torch.device, rank: int, world: int,
                 precision: torch.dtype | None, save_progress: Callable[[], object]):
        """save_progress: called before stopping on undecodable images (one process), so
        that a resume loses nothing."""
        self.cfg, self.device, self.rank, self.world = cfg, device, rank, world
        self.precision, self.save_progress = precision, save_progress
        d, o = cfg.data, cfg.optim
        if d.backend not in BACKENDS:
            raise ValueError(f"data.backend must be one of {', '.join(BACKENDS)}; got {d.backend!r}")
        self.ncrops = 2 + d.local_crops_number
        self.dataset = self.sampler = self.dali = self.synthetic = self.shards = None
        self.backend = "synthetic"
        self.dali_samples: list = []  # the files DALI reads (image folders; screened)
        self.dali_tars: list = []  # the shards DALI reads (some maybe patched copies)
        self.patched: set[int] = set()  # shards: the bad samples patched in copies
        self.patch_rounds = 0
        self.dali_unread: int | None = None  # the epoch of a DALI graph not read from yet
        tars = webdataset_shards(d.path)
        if d.path == "synthetic":
            self.synthetic = synthetic_crops(multicrop_spec(d), o.batch_size_per_device,
                                             cfg.model.in_chans, self.device, cfg.run.seed + self.rank)
            self.iters_per_epoch = SYNTHETIC_STEPS_PER_EPOCH
        elif tars and (d.backend == "dali" or d.backend == "auto" and dali_available()):
            # WebDataset shards through DALI: the epoch length is its reader's. (Otherwise
            # they are a dataset like a folder: PIL reads each image at its offset.)
            if not dali_available():
                raise ValueError("data.backend=\"dali\" needs nvidia-dali installed; "
                                 "data.backend=\"torchvision\" reads shards with PIL")
            self.backend = "dali"
            self.shards = WebDatasetShards(tars)  # indexed: the screen's and recovery's view
            if rank == 0 and not shard_indexes(tars):
                print(f"dinofuse: the shards in {d.path} have no DALI index (NAME.idx): DALI "
                      "and the screen walk every shard on every rank at each start; "
                      f"`dinofuse data index {shlex.quote(d.path)}` writes them once", file=sys.stderr)
            self.dali_tars = self._screened_shards()
            self.dali = self._dali_loader(0)
            self.iters_per_epoch = len(self.dali)
        else:
            images = self._open_images(d.path)
            if len(images) < o.batch_size_per_device * self.world:
                raise TrainingError(f"{d.path} has {len(images)} images, fewer than one batch "
                                    f"of {o.batch_size_per_device} x {self.world} processes")
            self.backend = d.backend if d.backend != "auto" else self._auto_backend(images)
            self.dataset = SeededMultiCrop(images, MultiCropAugmentation(multicrop_spec(d)),
                                           seed=cfg.run.seed, skip_bad_images=d.skip_bad_images)
            self.sampler = EpochSampler(len(images), o.batch_size_per_device, cfg.run.seed,
                                        self.rank, self.world)
            self.iters_per_epoch = self.sampler.batches()
            if self.backend == "dali":
                self.dali_samples = self._screened_files(images)
                self.dali = self._dali_loader(0)
            if self.backend == "tensor":
                self._hold_on_device(images)
        if self.iters_per_epoch == 0:
            raise TrainingError(f"{d.path}: not one full batch of {o.batch_size_per_device} per epoch")

    def _open_images(self, path: str):
        """The training images, listed once: rank 0 lists an image folder (and keeps the
        listing, `file_lists`) and sends it to the other ranks, which walk nothing: every
        rank has the same files in the same order (DALI cuts each epoch among them by
        position), whether or not the nodes share a cache folder. An error is every rank's."""
        if not (self.world > 1 and dist.is_available() and dist.is_initialized()):
            return open_images(path, "train")
        images, error = None, None
        if self.rank == 0:
            try:
                images = open_images(path, "train")
            except Exception as e:  # the others must not wait for a listing that never comes
                error = e
        box = [None if error is None else str(error),
               images.shared_listing() if isinstance(images, ImageFiles) else None]
        dist.broadcast_object_list(box, src=0)
        if error is not None:
            raise error
        if box[0] is not None:
            raise DataError(box[0])
        if images is not None:
            return images
        return ImageFiles(path, box[1]) if box[1] is not None else open_images(path, "train")

    @staticmethod
    def _auto_backend(images) -> str:
        if getattr(images, "samples", None) is not None:  # image files
            return "dali" if dali_available() else "torchvision"
        # in memory: batched crops in the training process. On the 2-core CPU too: the default
        # run took 4 min 47 s in all (285 images/s) against 6 min 42 s (190) with the PIL
        # reference in a worker process beside one training thread
        return "tensor"

    @property
    def data_workers(self) -> int:
        """Processes or threads that keep a core busy with data beside the training step."""
        return self.cfg.data.num_workers if self.backend in ("torchvision", "dali") else 0

    def _hold_on_device(self, images) -> None:
        """The whole dataset as one uint8 tensor on the training device (Fashion-MNIST's
        60000 x 28 x 28 is 47 MB), cut into crops there batch by batch."""
        pixels = getattr(images, "pixels", None)
        if pixels is None:
            held = "WebDataset shards" if isinstance(images, WebDatasetShards) else "image files"
            raise ValueError(f"data.backend=\"tensor\" needs a dataset held in memory "
                             f"(Fashion-MNIST's IDX files); {self.cfg.data.path} holds {held}: "
                             "use data.backend=\"dali\" or \"torchvision\"")
        self.pixels = torch.from_numpy(pixels().copy()).to(self.device)
        self.labels = torch.from_numpy(images.labels).to(self.device)
        self.multicrop = TensorMultiCrop(multicrop_spec(self.cfg.data))

    def _dali_loader(self, epoch: int):
        """The DALI graph of one epoch, this rank's share of it (decoding on the GPU when
        training there). Each epoch has a graph of its own, seeded from (run.seed, epoch),
        over an order drawn from the same: a folder's files in the EpochSampler's order (the
        torchvision backend's), the shards in a permutation. So a run resumed anywhere reads
        the images and cuts the crops the uninterrupted run would have."""
        from dinofuse.dataloading.dali_multicrop import DALIMultiCropLoader, build_pipeline

        self.dali = None  # the last epoch's graph goes first (its buffers, on a GPU)
        seed = self.cfg.run.seed
        samples, tars, share, draws = [], [], (self.rank, self.world), (seed, epoch)
        if self.dali_samples:  # this rank's files alone (a world-th of the names to pass)
            sampler = EpochSampler(len(self.dali_samples), self.cfg.optim.batch_size_per_device,
                                   seed, self.rank, self.world)
            sampler.epoch = epoch
            samples = [self.dali_samples[i] for i in sampler]
            # one shard of its own, so its draws are seeded by rank here (else by shard)
            share, draws = (0, 1), (seed, epoch, self.rank)
        else:
            tars = [self.dali_tars[i] for i in epoch_permutation(len(self.dali_tars), seed, epoch)]
        device_id = (self.device.index or 0) if self.device.type == "cuda" else None
        pipe = build_pipeline([str(p) for p, _ in samples], [label for _, label in samples],
                              multicrop_spec(self.cfg.data),
                              batch_size=self.cfg.optim.batch_size_per_device,
                              device_id=device_id, num_threads=max(1, self.cfg.data.num_workers),
                              seed=hash(draws) & 0x7FFF_FFFF, shard_id=share[0],
                              num_shards=share[1], tars=tars, shuffle_each_epoch=False,
                              fancy_upsampling=self.cfg.data.jpeg_fancy_upsampling,
                              shuffle_buffer=self.cfg.data.shuffle_buffer)
        self.dali_unread = epoch
        return DALIMultiCropLoader(pipe, self.ncrops, dtype=self.crop_dtype)

    @property
    def crop_dtype(self) -> torch.dtype:
        # bf16 training on a GPU takes bf16 crops (autocast casts them there anyway)
        bf16 = self.device.type == "cuda" and self.precision == torch.bfloat16
        return torch.bfloat16 if bf16 else torch.float32

    def batches(self, epoch: int, start_batch: int):
        """(crops, labels) of `epoch` from batch `start_batch` on (resume)."""
        if self.synthetic is not None:
            return itertools.repeat((self.synthetic, None), self.iters_per_epoch - start_batch)
        if self.dali is not None:
            return self._dali_batches(epoch, start_batch)
        self.dataset.epoch = epoch
        self.sampler.epoch, self.sampler.start_batch = epoch, start_batch
        if self.backend == "tensor":
            return self._tensor_batches(epoch, start_batch)
        return self._worker_batches(torch.utils.data.DataLoader(
            self.dataset, batch_size=self.cfg.optim.batch_size_per_device, sampler=self.sampler,
            num_workers=self.cfg.data.num_workers, drop_last=True,
            pin_memory=self.device.type == "cuda", generator=torch.Generator(),
            persistent_workers=False, worker_init_fn=leave_ctrl_c_to_training))

    def _tensor_batches(self, epoch: int, start_batch: int):
        """The epoch's batches cut on the device. The draws of a batch depend only on (seed,
        epoch, batch): a resume mid-epoch continues with the same crops, and the ranks
        together cut the crops that one process with the global batch would."""
        b = self.cfg.optim.batch_size_per_device
        order = torch.tensor(list(self.sampler), dtype=torch.long)
        if self.device.type == "cuda":
            order = order.pin_memory()  # so the copy below does not wait
        order = order.to(self.device, non_blocking=True)
        for k, batch in enumerate(order.split(b), start=start_batch):
            g = torch.Generator(device=self.device)
            g.manual_seed(hash((self.cfg.run.seed, epoch, k)) & 0x7FFF_FFFF_FFFF_FFFF)
            crops = self.multicrop(self.pixels[batch], g, self.crop_dtype, share=(self.rank, self.world))
            yield crops, self.labels[batch]

    def _worker_batches(self, loader):
        """The loader's batches. A worker that dies (the kernel's OOM killer, a crash in a
        decoder) surfaces between two steps: on one process the progress is saved first, then
        the run stops with one line instead of torch's traceback."""
        try:
            yield from loader
        except RuntimeError as e:
            died = data_worker_died(e)
            if died is None:
                raise
            if self.world == 1:
                self.save_progress()
            raise died from None

    def _dali_batches(self, epoch: int, start_batch: int):
        """DALI's batches of `epoch` from `start_batch` on, from the epoch's own graph (the
        batches before `start_batch` are run and dropped: DALI's draws cannot be skipped,
        and the rest must be the uninterrupted run's). A failed decode is traced to its
        file(s); the epoch goes on from the same batch in a graph without them."""
        done = start_batch
        while True:
            if self.dali_unread != epoch:
                self.dali = self._dali_loader(epoch)
            self.dali_unread = None
            try:
                for batch in itertools.islice(iter(self.dali), done, None):
                    done += 1
                    yield batch
                return
            except RuntimeError as e:
                if "decoders.image" not in str(e) or not (self.dali_samples or self.shards):
                    raise
                self._recover_from_decode_error(e)  # or stop, naming them

    def _screened(self, items: list, check) -> list:
        """[(item, reason)] for the items `check` ([item] -> [(item, reason)]) finds bad,
        the same list on every rank. Each rank checks a world-th of them and the lists are
        gathered: with DALI every rank reads every image over the epochs (each epoch's order
        deals them out anew), so each must know all of them."""
        bad = check(items[self.rank::self.world])
        if self.world > 1 and dist.is_available() and dist.is_initialized():
            gathered = [None] * self.world
            dist.all_gather_object(gathered, bad)
            bad = sorted(itertools.chain.from_iterable(gathered), key=lambda b: str(b[0]))
        return bad

    def _screened_files(self, images) -> list:
        """The folder's (path, label) samples for DALI after the header screen
        (data.screen_images): a bad file stops the run, naming it, or is replaced
        (data.skip_bad_images) before DALI ever reads it."""
        from dinofuse.dataloading.check import check_files

        samples = getattr(images, "samples", None)
        if samples is None:
            raise ValueError("data.backend=\"dali\" reads image files: point data.path at an "
                             "image folder, or use data.backend=\"torchvision\"")
        if not self.cfg.data.screen_images:
            return samples
        listing = getattr(images, "listing", None)
        if listing is not None and listing.get("screen") is not None:  # screened at a start before
            # the files it found bad are read again: one mended in place changes no directory
            kept = [samples[i][0] for i, _ in listing["screen"]]
            bad = check_files(kept, self.threads, False, DALI_FORMATS)[1] if kept else []
            if len(bad) != len(kept) and self.rank == 0:
                images.keep_screen(bad)
        else:
            bad = self._screened([p for p, _ in samples], lambda paths: check_files(
                paths, self.threads, False, DALI_FORMATS)[1])
            if listing is not None and self.rank == 0:  # kept with the listing
                images.keep_screen(bad)
        return self._with_neighbours(samples, bad, save=False) if bad else samples

    def _screened_shards(self) -> list[str]:
        """The shards for DALI after the header screen of their samples
        (data.screen_images): patched copies where a bad image was replaced."""
        from dinofuse.dataloading.check import check_shards

        if not self.cfg.data.screen_images:
            return list(self.shards.tars)
        tars = list(self.shards.tars)
        bad = file_lists.shard_screen(tars)  # screened at a start before
        if bad is None:
            started = time.time_ns()
            bad = self._screened(list(range(len(self.shards))), lambda indices: check_shards(
                self.shards, self.threads, indices, False, DALI_FORMATS)[1])
            if self.rank == 0:
                file_lists.keep_shard_screen(tars, bad, started)
        return self._patched_shards(bad, save=False)

    @property
    def threads(self) -> int:
        return max(1, self.cfg.data.num_workers)

    def _stop_or_report(self, bad: list[tuple[object, str]], save: bool) -> None:
        """Stop the run naming the bad images [(name, reason)] (data.skip_bad_images=false;
        after saving the progress when `save`, on one process), or report each one skipped."""
        listed = "; ".join(f"{name} ({why})" for name, why in bad)
        if not self.cfg.data.skip_bad_images:
            if save and self.world == 1:
                self.save_progress()  # keep the progress made so far
            raise TrainingError(f"undecodable image(s) in {self.cfg.data.path}: {listed}. Set "
                                "data.skip_bad_images=true to skip them, or remove them "
                                "(`dinofuse data check DIR` lists every one)"
                                + ("; the run can go on with --resume" if save else ""))
        for name, why in bad if save or self.rank == 0 else ():  # the screen's: one list
            print(f"dinofuse: skipping undecodable image {name} ({why})", file=sys.stderr,
                  flush=True)

    def _with_neighbours(self, samples: list, bad: list, save: bool) -> list:
        """`samples` with a readable neighbour in each bad file's place (or a stop). Replacing
        rather than removing keeps every rank's share, and so the steps per epoch."""
        self._stop_or_report(bad, save)
        bad_paths = {str(p) for p, _ in bad}
        good = [s for s in samples if str(s[0]) not in bad_paths]
        if not good:
            raise TrainingError(f"no decodable image left in {self.cfg.data.path}")
        return [s if str(s[0]) not in bad_paths else good[i % len(good)]
                for i, s in enumerate(samples)]

    def _patched_shards(self, bad: list[tuple[int, str]], save: bool) -> list[str]:
        """The shards with each bad sample's image (and every one patched before) replaced
        by a readable image of the same shard: copies of the affected shards under
        OUTPUT_DIR/patched_shards/ (the data itself is never written), the rest as they are.
        Member names stay, so DALI sees the same samples in the same order. The start's
        screen finds the same images on every rank: rank 0 writes one copy for all
        (screened/); a rank that meets a bad image later patches alone (rank<r>/round<k>/)."""
        if bad:
            self._stop_or_report([(self.shards.name(i), why) for i, why in bad], save)
            self.patched.update(i for i, _ in bad)
        if not self.patched:
            return list(self.shards.tars)
        patched = Path(self.cfg.run.output_dir) / "patched_shards"
        if not save:
            return from_rank_zero(lambda: self._patch(patched / "screened"), (DataError,))
        # a new folder each time: DALI keeps a file it read mapped by its path, so a copy
        # written over an earlier one's path would still be read as the earlier one
        self.patch_rounds += 1
        return self._patch(patched / f"rank{self.rank}" / f"round{self.patch_rounds}")

    def _patch(self, folder: Path) -> list[str]:
        from dinofuse.dataloading.readers import patch_shard

        affected = {self.shards.samples[i][0] for i in self.patched}
        # each copy named after its place in the list too: shards of several folders may
        # share a file name
        return [patch_shard(self.shards, tar, self.patched, folder / f"{k:06d}-{Path(tar).name}")
                if tar in affected else tar for k, tar in enumerate(self.shards.tars)]

    def _recover_from_decode_error(self, error: RuntimeError) -> None:
        """Stop naming the image DALI failed on (data.skip_bad_images=false), or put a
        readable image in its place for the graph built next. DALI 2.4 names it ("Failed to
        decode sample #N : SOURCE"); otherwise every image is decoded again with PIL to
        find it. Images patched or replaced before are not blamed again."""
        named = [m.strip() for m in re.findall(r"Failed to decode sample #\d+ : (.+)", str(error))]
        bad = self._bad_shard_samples(named) if self.shards is not None else self._bad_files(named)
        if not bad:
            raise TrainingError(f"DALI failed to decode an image in {self.cfg.data.path}, but "
                                "every image decodes with PIL, in a format DALI reads; DALI "
                                f"said: {dali_said(error)}")
        if self.shards is not None:
            self.dali_tars = self._patched_shards(bad, save=True)
        else:
            self.dali_samples = self._with_neighbours(self.dali_samples, bad, save=True)

    def _bad_shard_samples(self, named: list[str]) -> list[tuple[int, str]]:
        """[(sample index, reason)] of the shard images DALI named, else of every image PIL
        cannot decode; those patched before left out."""
        from dinofuse.dataloading.check import check_shards, image_problem

        # DALI's source is "shard.tar:offset:member", the shard maybe a patched copy
        where = {(tar, member): i for i, (tar, member, _, _) in enumerate(self.shards.samples)}
        original = dict(zip(self.dali_tars, self.shards.tars))
        found = [where.get((original.get(m[1], m[1]), m[3])) for m in
                 (re.fullmatch(r"(.*):(\d+):(.*)", source) for source in named) if m]
        if found and None not in found:
            bad = [(i, image_problem(self.shards.read(i), formats=DALI_FORMATS) or DALI_ONLY)
                   for i in found]
        else:
            bad = check_shards(self.shards, self.threads, formats=DALI_FORMATS)[1]
        return [(i, why) for i, why in bad if i not in self.patched]

    def _bad_files(self, named: list[str]) -> list[tuple[Path, str]]:
        """[(path, reason)] of the files DALI named, else of every file PIL cannot decode
        (the bad files replaced before are gone from the samples)."""
        from dinofuse.dataloading.check import check_files, image_problem

        paths = {str(p) for p, _ in self.dali_samples}
        if named and all(source in paths for source in named):
            return [(Path(source), image_problem(Path(source), formats=DALI_FORMATS) or DALI_ONLY)
                    for source in dict.fromkeys(named)]
        return check_files([p for p, _ in self.dali_samples], self.threads,
                           formats=DALI_FORMATS)[1]
