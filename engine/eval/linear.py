"""Linear classification on frozen features, as the official eval_linear.py.

A linear layer reads the CLS tokens of the backbone's last n blocks (each through the final
norm), optionally beside the last block's mean patch token. SGD with momentum 0.9 and no
weight decay; LR = lr * batch / 256 on a cosine over the epochs (stepped once per epoch, to
0); training crops RandomResizedCrop + flip, evaluation resize + center crop; the backbone
in eval mode, without gradients. The official code reports the best top-1 over the epochs'
validations; we report it beside the last epoch's.

Deliberate differences, each an option: several learning rates train side by side, each
validation keeping the best (DINOv2's grid; one rate is the official run; a rate that
diverges drops out); `cached_features` trains on features computed once from the evaluation
crops (no augmentation: minutes instead of hours); the validation features are computed
once in every mode (the backbone is frozen, so they never change).

Under torchrun each process takes a share of every global batch (batch_size per process,
the LR scaled by the global batch as the official DistributedDataParallel run) and of the
validation set; gradients and counts are summed with all_reduce, so N processes train the
classifiers one process would with N times the batch.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torchvision import transforms as T

from dinofuse.dataloading.readers import DataError
from dinofuse.dataloading.torchvision_multicrop import IMAGENET_MEAN, IMAGENET_STD
from dinofuse.engine.checkpoint import CheckpointError, load_file, save_atomic
from dinofuse.engine.eval.knn import (
    EVAL_PRECISIONS,
    Transformed,
    comparable_labels,
    forward_precision,
)
from dinofuse.engine.eval.report import eval_transform
from dinofuse.engine.eval.shares import dealt_rows, gather_dealt, rank_and_world
from dinofuse.engine.progress import Progress, extraction_progress

OFFICIAL_PREFIX = "module."  # the official weights were saved from DistributedDataParallel


@dataclass
class LinearEvalConfig:
    epochs: int = 100
    lrs: tuple[float, ...] = (0.001,)  # for a batch of 256, scaled linearly; one classifier each
    batch_size: int = 128
    n_last_blocks: int = 4  # official: 4 for ViT-S, 1 with avgpool for ViT-B
    avgpool: bool = False
    val_freq: int = 1  # validate every this many epochs, and after the last
    crop: int = 224
    resize_ratio: float = 256 / 224
    cached_features: bool = False
    workers: int = 0
    seed: int = 0
    precision: str = "fp32"  # the backbone's forward: fp32 (official) | bf16 | fp16 (autocast)

    def __post_init__(self):
        for name in ("epochs", "batch_size", "n_last_blocks", "val_freq", "crop"):
            if getattr(self, name) < 1:
                raise ValueError(f"linear evaluation: {name} must be >= 1; got {getattr(self, name)}")
        self.lrs = tuple(float(lr) for lr in self.lrs)
        if not self.lrs or not all(lr > 0 for lr in self.lrs):
            raise ValueError(f"linear evaluation: learning rates must be > 0; got {self.lrs}")
        if self.precision not in EVAL_PRECISIONS:
            raise ValueError(f"linear evaluation: precision must be one of "
                             f"{', '.join(EVAL_PRECISIONS)}; got {self.precision!r}")


def official_defaults(embed_dim: int, depth: int = 12) -> dict:
    """n_last_blocks and avgpool as the official README uses them: the CLS tokens of the
    last 4 blocks for ViT-S (and smaller; all blocks of a shallower one), the last CLS token
    and the mean patch token for ViT-B and larger."""
    if embed_dim < 768:
        return {"n_last_blocks": min(4, depth), "avgpool": False}
    return {"n_last_blocks": 1, "avgpool": True}


def feature_dim(embed_dim: int, n_last_blocks: int, avgpool: bool) -> int:
    return embed_dim * (n_last_blocks + int(avgpool))


def linear_features(backbone: nn.Module, images: torch.Tensor, n_last_blocks: int,
                    avgpool: bool) -> torch.Tensor:
    """(B, feature_dim) float32: the features the classifier reads, in the official order."""
    layers = backbone.get_intermediate_layers(images, n_last_blocks)
    features = torch.cat([tokens[:, 0] for tokens in layers], dim=-1)
    if avgpool:
        patches = layers[-1][:, 1:].mean(dim=1)
        if n_last_blocks == 1:
            # the official stack-and-reshape interleaves CLS and mean value by value; kept so
            # released linear weights (ViT-B: one block with avgpool) apply as trained
            features = torch.stack((features, patches), dim=-1).flatten(1)
        else:  # the official code fails here; DINOv2 appends the mean
            features = torch.cat((features, patches), dim=-1)
    return features.float()


class LinearClassifier(nn.Module):
    """The official classifier: one linear layer, weights N(0, 0.01), bias 0."""

    def __init__(self, dim: int, num_labels: int):
        super().__init__()
        self.num_labels = num_labels
        self.linear = nn.Linear(dim, num_labels)
        self.linear.weight.data.normal_(mean=0.0, std=0.01)
        self.linear.bias.data.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1))


def train_transform(crop: int):
    """The official training crops (RandomResizedCrop's default scale and interpolation)."""
    return T.Compose([T.RandomResizedCrop(crop), T.RandomHorizontalFlip(), T.ToTensor(),
                      T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def class_names(train_images, val_images) -> list:
    """The classes both sets share, by index; an error when their labels cannot be compared."""
    comparable_labels(train_images, val_images, "linear evaluation")
    return list(train_images.classes)


def epoch_steps(n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1):
    """This rank's share of each step: [(dataset indices, the step's global count)].

    One permutation per epoch, the same on every rank, padded to a multiple of the world by
    repeating its start (as DistributedSampler does), cut into global batches of
    batch_size x world, each dealt round-robin: every rank has a part of every step, and the
    ranks together take the steps one process would take with the global batch."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    order = torch.cat([order, order.repeat(world)[:-n % world]])
    size = batch_size * world
    return [(order[s:s + size][rank::world], len(order[s:s + size]))
            for s in range(0, len(order), size)]


@torch.no_grad()
def compute_features(backbone, images, transform, cfg: LinearEvalConfig, device,
                     batches: list | None = None, progress: Progress | None = None):
    """Yields (features, labels) for each list of dataset indices in `batches` (default: the
    dataset in order, batch_size at a time); `progress` is told the images done."""
    if batches is None:
        batches = [range(s, min(s + cfg.batch_size, len(images)))
                   for s in range(0, len(images), cfg.batch_size)]
    loader = torch.utils.data.DataLoader(
        Transformed(images, transform), batch_sampler=[list(b) for b in batches],
        num_workers=cfg.workers)
    for x, y in loader:
        with forward_precision(device, cfg.precision):
            features = linear_features(backbone, x.to(device), cfg.n_last_blocks, cfg.avgpool)
        if progress is not None:
            progress.advance(len(y))
        yield features, y.to(device)
    if progress is not None:
        progress.close()


def cache(batches) -> tuple[torch.Tensor, torch.Tensor]:
    features, labels = zip(*batches)
    return torch.cat(features), torch.cat(labels)


@torch.no_grad()
def validation_sums(classifier: LinearClassifier, features: torch.Tensor, labels: torch.Tensor,
                    batch_size: int = 1024) -> torch.Tensor:
    """(rows, top-1 hits, top-5 hits, loss sum): what ranks add up."""
    classifier.eval()
    logits = torch.cat([classifier(features[i:i + batch_size])
                        for i in range(0, len(features), batch_size)])
    hits = [(logits.topk(min(k, logits.shape[1]), dim=1).indices == labels[:, None]).any(1).sum()
            for k in (1, 5)]
    return torch.stack([torch.tensor(float(len(labels)), device=logits.device), hits[0].float(),
                        hits[1].float(), F.cross_entropy(logits, labels, reduction="sum")])


def stats_from_sums(sums: torch.Tensor, num_labels: int) -> dict[str, float]:
    """top1 (and top5 with at least 5 classes, as the official code) and the mean loss."""
    rows, top1, top5, loss = sums.tolist()
    stats = {"top1": 100.0 * top1 / rows, "loss": loss / rows}
    if num_labels >= 5:
        stats["top5"] = 100.0 * top5 / rows
    return stats


def validate(classifier: LinearClassifier, features: torch.Tensor,
             labels: torch.Tensor) -> dict[str, float]:
    """One process's validation of a classifier on features."""
    return stats_from_sums(validation_sums(classifier, features, labels), classifier.num_labels)


def linear_state(classifier: LinearClassifier) -> dict:
    """The classifier's weights under the official names (module.linear.*)."""
    return {OFFICIAL_PREFIX + k: v for k, v in classifier.state_dict().items()}


def without_prefix(state: dict) -> dict:
    """linear_state's names back to the classifier's own."""
    return {k.removeprefix(OFFICIAL_PREFIX): v for k, v in state.items()}


def describe_accuracy(stats: dict) -> str:
    top5 = f", top-5 {stats['top5']:.2f}%" if "top5" in stats else ""
    return f"top-1 {stats['top1']:.2f}%{top5}"


def load_linear_weights(classifier: LinearClassifier, path: str | Path) -> None:
    """Official linear weights (`{"state_dict": {"module.linear.weight", ...}}`), ours, or a
    bare state dict; read without unpickling code."""
    contents = load_file(path)
    state = without_prefix(contents.get("state_dict", contents))
    expected = classifier.state_dict()
    if set(state) != set(expected):
        raise CheckpointError(f"{path}: not linear classifier weights (keys {sorted(state)[:4]}, "
                              f"expected {sorted(expected)})")
    for name, value in state.items():
        if tuple(value.shape) != tuple(expected[name].shape):
            raise CheckpointError(
                f"{path}: {name} has shape {tuple(value.shape)}, but these features give "
                f"{tuple(expected[name].shape)} (choose --n-last-blocks/--avgpool and the "
                f"classes of the weights)")
    classifier.load_state_dict(state)


class LinearEval:
    """The official protocol over (PIL image, label) datasets on a frozen backbone.

    Several learning rates train side by side, one classifier each, on the same features
    (the backbone's forward, the expensive part, runs once for all); each validation picks
    the best, as DINOv2's evaluation does. With one learning rate this is the official run.

    With `output_dir`, each epoch ends with an atomic checkpoint (linear.pth: the picked
    classifier under the official names, every classifier, optimizer, scheduler, best top-1,
    history) and a line of linear_log.jsonl; `resume` continues from linear.pth.
    """

    def __init__(self, backbone: nn.Module, train_images, val_images, cfg: LinearEvalConfig,
                 device, output_dir: str | Path | None = None, progress: bool = False):
        """progress: show rank 0's feature extractions (`Progress`)."""
        self.backbone, self.cfg, self.device = backbone.eval(), cfg, torch.device(device)
        self.rank, self.world = rank_and_world()
        self.progress = progress and self.rank == 0
        self.train_images = train_images
        self.classes = class_names(train_images, val_images)
        for name, images in (("training", train_images), ("validation", val_images)):
            if len(images) < self.world:  # a rank with no image would have nothing to send
                raise DataError(f"linear evaluation under {self.world} processes needs at least "
                                f"{self.world} {name} images; the set has {len(images)}")
        depth = len(backbone.blocks)
        if cfg.n_last_blocks > depth:
            raise ValueError(f"n_last_blocks={cfg.n_last_blocks} is more than the backbone's "
                             f"{depth} blocks")
        dim = feature_dim(backbone.embed_dim, cfg.n_last_blocks, cfg.avgpool)
        torch.manual_seed(cfg.seed)
        self.classifiers = nn.ModuleList(LinearClassifier(dim, len(self.classes))
                                         for _ in cfg.lrs).to(self.device)
        self.optimizer = torch.optim.SGD(
            [{"params": c.parameters(), "lr": lr * cfg.batch_size * self.world / 256}  # linear scaling
             for c, lr in zip(self.classifiers, cfg.lrs)], momentum=0.9, weight_decay=0)
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, cfg.epochs,
                                                                    eta_min=0)
        self.epoch, self.best_top1, self.picked, self.history = 0, 0.0, 0, []
        self.out = Path(output_dir) if output_dir else None
        val_batches = self.dealt(len(val_images))  # each rank a share
        self.val = cache(compute_features(backbone, val_images,
                                          eval_transform(cfg.crop, cfg.resize_ratio), cfg,
                                          self.device, val_batches,
                                          self.shown(val_batches, "features of --val")))
        self._train_cache = None

    def shown(self, batches: list, label: str, leave: bool = True) -> Progress | None:
        """The progress over these batches' images (a line every 30 s in a log)."""
        if not self.progress:
            return None
        return extraction_progress(sum(len(b) for b in batches), f"linear: {label}", self.world,
                                   enabled=True, leave=leave)

    def dealt(self, n: int) -> list:
        """This rank's rows (i % world == rank) in batches."""
        mine = list(dealt_rows(n, self.rank, self.world))
        return [mine[s:s + self.cfg.batch_size] for s in range(0, len(mine), self.cfg.batch_size)]

    @property
    def classifier(self) -> LinearClassifier:
        """The classifier of the learning rate the last validation picked."""
        return self.classifiers[self.picked]

    # -- data --------------------------------------------------------------------------

    def train_batches(self, epoch: int):
        """This rank's (features, labels, the step's global count) for each step."""
        cfg = self.cfg
        steps = epoch_steps(len(self.train_images), cfg.batch_size, cfg.seed + epoch,
                            self.rank, self.world)  # a new order every epoch, reproducible
        if cfg.cached_features:
            if self._train_cache is None:  # every rank holds all: any row may be its share
                n = len(self.train_images)
                mine = self.dealt(n)
                local = cache(compute_features(
                    self.backbone, self.train_images, eval_transform(cfg.crop, cfg.resize_ratio),
                    cfg, self.device, mine, self.shown(mine, "features of --train")))
                self._train_cache = tuple(gather_dealt(t, n, self.world) for t in local)
            features, labels = self._train_cache
            steps = [(i.to(labels.device), count) for i, count in steps]
            return ((features[i], labels[i], count) for i, count in steps)
        # the crops' draws, a stream per rank (data workers take their seeds from it)
        torch.manual_seed((cfg.seed + epoch) * self.world + self.rank)
        mine = [i.tolist() for i, _ in steps]
        batches = compute_features(self.backbone, self.train_images, train_transform(cfg.crop),
                                   cfg, self.device, mine,
                                   self.shown(mine, f"epoch {epoch + 1}/{cfg.epochs}", leave=False))
        return ((f, y, count) for (f, y), (_, count) in zip(batches, steps))

    # -- the loop ------------------------------------------------------------------------

    def train_epoch(self) -> dict:
        self.classifiers.train()
        lrs = [group["lr"] for group in self.optimizer.param_groups]
        sums = torch.zeros(len(lrs) + 1, device=self.device)  # loss sums, rows
        for features, labels, count in self.train_batches(self.epoch):
            losses = torch.stack([F.cross_entropy(c(features), labels, reduction="sum")
                                  for c in self.classifiers])
            self.optimizer.zero_grad()
            # the classifiers share no parameter: each its own gradient; divided by the
            # step's global count, the ranks' gradients add up to the global batch's mean
            (losses.sum() / count).backward()
            self.all_reduce_gradients()
            self.optimizer.step()
            sums += torch.cat([losses.detach(), sums.new_tensor([len(labels)])])
        self.scheduler.step()
        if self.world > 1:
            dist.all_reduce(sums)
        losses = (sums[:-1] / sums[-1].clamp(min=1)).tolist()
        if not any(math.isfinite(v) for v in losses):  # one that diverged alone drops out
            raise ValueError(f"linear evaluation: the loss is not finite at epoch {self.epoch} "
                             f"(lr {', '.join(f'{lr:g}' for lr in lrs)}); lower --lr")
        self.epoch += 1
        return {"epoch": self.epoch, "lr": lrs, "train_loss": losses}

    def all_reduce_gradients(self) -> None:
        if self.world == 1:
            return
        grads = [p.grad for p in self.classifiers.parameters()]
        flat = torch.cat([g.flatten() for g in grads])  # one collective for the whole grid
        dist.all_reduce(flat)
        for g, part in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(part.view_as(g))

    def evaluate(self, classifier: LinearClassifier) -> dict[str, float]:
        """A classifier on the whole validation set (the ranks' shares added up)."""
        sums = validation_sums(classifier, *self.val)
        if self.world > 1:
            dist.all_reduce(sums)
        return stats_from_sums(sums, classifier.num_labels)

    def validate(self) -> dict:
        """Every classifier on the validation set; the best one's figures on top."""
        per_lr = [self.evaluate(c) if all(p.isfinite().all() for p in c.parameters())
                  else {"top1": 0.0, "loss": None, "diverged": True} for c in self.classifiers]
        self.picked = max(range(len(per_lr)), key=lambda i: per_lr[i]["top1"])
        return {**per_lr[self.picked], "picked_lr": self.cfg.lrs[self.picked], "val": per_lr}

    def run(self, log: Callable[[str], None] = print) -> dict:
        """Trains the remaining epochs; the summary: last and best validation."""
        cfg = self.cfg
        while self.epoch < cfg.epochs:
            stats = self.train_epoch()
            if self.epoch % cfg.val_freq == 0 or self.epoch == cfg.epochs:
                stats.update(self.validate())
                self.best_top1 = max(self.best_top1, stats["top1"])
                grid = f" at --lr {stats['picked_lr']:g}" if len(cfg.lrs) > 1 else ""
                log(f"epoch {self.epoch}/{cfg.epochs}: loss {stats['train_loss'][self.picked]:.4f}, "
                    f"lr {stats['lr'][self.picked]:.3g}; {describe_accuracy(stats)}{grid} "
                    f"(best {self.best_top1:.2f}%)")
            self.history.append(stats)
            self.save()
        return self.summary()

    def summary(self) -> dict:
        last = next((h for h in reversed(self.history) if "top1" in h), None)
        return {"epochs": self.epoch, "last": last, "best_top1": self.best_top1,
                "config": asdict(self.cfg), "classes": len(self.classes)}

    # -- checkpoints ----------------------------------------------------------------------

    def save(self) -> None:
        if self.out is None or self.rank != 0:
            return
        save_atomic({"epoch": self.epoch, "state_dict": linear_state(self.classifier),
                     "classifiers": [linear_state(c) for c in self.classifiers],
                     "picked": self.picked, "optimizer": self.optimizer.state_dict(),
                     "scheduler": self.scheduler.state_dict(), "best_acc": self.best_top1,
                     "history": self.history, "config": asdict(self.cfg), "world": self.world},
                    self.out / "linear.pth")
        with open(self.out / "linear_log.jsonl", "a") as f:
            f.write(json.dumps(self.history[-1]) + "\n")

    def resume(self) -> bool:
        """Continue from output_dir/linear.pth when there is one; False when there is none."""
        path = None if self.out is None else self.out / "linear.pth"
        if path is None or not path.is_file():
            return False
        state = load_file(path)
        saved = state.get("config", {})
        now = {**asdict(self.cfg), "processes": self.world}
        saved = {**saved, "processes": state.get("world", 1)}
        changed = {k: (saved[k], v) for k, v in now.items()
                   if k in saved and k not in ("workers", "val_freq") and saved[k] != v}
        if changed:
            raise CheckpointError(f"{path} was trained with other settings: " + ", ".join(
                f"{k}={old!r} there, {new!r} here" for k, (old, new) in changed.items()))
        for classifier, weights in zip(self.classifiers, state["classifiers"]):
            classifier.load_state_dict(without_prefix(weights))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.epoch, self.best_top1 = int(state["epoch"]), float(state["best_acc"])
        self.picked, self.history = int(state["picked"]), list(state["history"])
        return True
