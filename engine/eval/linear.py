"""Linear classification on frozen features, as the official eval_linear.py.

A linear layer reads the CLS tokens of the backbone's last n blocks (each through the final
norm), optionally beside the last block's mean patch token. SGD with momentum 0.9 and no
weight decay; LR = lr * batch / 256 on a cosine over the epochs (stepped once per epoch, to
0); training crops RandomResizedCrop + flip, evaluation resize + center crop; the backbone
in eval mode, without gradients. The official code reports the best top-1 over the epochs'
validations; we report it beside the last epoch's.

Deliberate differences, each an option: several learning rates train side by side, each
validation keeping the best (DINOv2's grid; one rate is the official run); `cached_features` trains on features computed once
from the evaluation crops (no augmentation: minutes instead of hours); the validation
features are computed once in every mode (the backbone is frozen, so they never change).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torchvision import transforms as T

from dinofuse.dataloading.readers import DataError
from dinofuse.dataloading.torchvision_multicrop import IMAGENET_MEAN, IMAGENET_STD
from dinofuse.engine.checkpoint import CheckpointError, load_file, save_atomic
from dinofuse.engine.eval.knn import Transformed
from dinofuse.engine.eval.report import eval_transform

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

    def __post_init__(self):
        for name in ("epochs", "batch_size", "n_last_blocks", "val_freq", "crop"):
            if getattr(self, name) < 1:
                raise ValueError(f"linear evaluation: {name} must be >= 1; got {getattr(self, name)}")
        self.lrs = tuple(float(lr) for lr in self.lrs)
        if not self.lrs or not all(lr > 0 for lr in self.lrs):
            raise ValueError(f"linear evaluation: learning rates must be > 0; got {self.lrs}")


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
    """The classes both sets share, by index; an error when their class lists differ (the
    labels would mean different classes)."""
    train, val = getattr(train_images, "classes", None), getattr(val_images, "classes", None)
    if train is not None and val is not None and list(train) != list(val):
        raise DataError(f"the training and validation images have different classes "
                        f"({len(train)}: {list(train)[:5]}... and {len(val)}: {list(val)[:5]}...): "
                        f"their labels would not mean the same class")
    if train is None or len(train) < 2:
        raise DataError("linear evaluation needs labelled training images: at least two "
                        "classes (an ImageFolder layout, one subfolder per class)")
    return list(train)


def accuracy(logits: torch.Tensor, targets: torch.Tensor, k: int) -> float:
    """Percent of rows whose target is among the k highest logits."""
    top = logits.topk(k, dim=1).indices
    return 100.0 * (top == targets[:, None]).any(dim=1).float().mean().item()


@torch.no_grad()
def compute_features(backbone, images, transform, cfg: LinearEvalConfig, device,
                     shuffle_seed: int | None = None):
    """Yields (features, labels) batches of a dataset of (PIL image, label)."""
    generator = None
    if shuffle_seed is not None:
        generator = torch.Generator().manual_seed(shuffle_seed)
    loader = torch.utils.data.DataLoader(
        Transformed(images, transform), batch_size=cfg.batch_size, shuffle=generator is not None,
        generator=generator, num_workers=cfg.workers)
    for x, y in loader:
        yield linear_features(backbone, x.to(device), cfg.n_last_blocks, cfg.avgpool), y.to(device)


def cache(batches) -> tuple[torch.Tensor, torch.Tensor]:
    features, labels = zip(*batches)
    return torch.cat(features), torch.cat(labels)


def cached_batches(features, labels, batch_size: int, seed: int | None):
    order = torch.arange(len(labels), device=labels.device)
    if seed is not None:
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed)).to(labels.device)
    for start in range(0, len(order), batch_size):
        index = order[start:start + batch_size]
        yield features[index], labels[index]


@torch.no_grad()
def validate(classifier: LinearClassifier, features: torch.Tensor, labels: torch.Tensor,
             batch_size: int = 1024) -> dict[str, float]:
    """top1 (and top5 with at least 5 classes, as the official code) and the mean loss."""
    classifier.eval()
    logits = torch.cat([classifier(features[i:i + batch_size])
                        for i in range(0, len(features), batch_size)])
    stats = {"top1": accuracy(logits, labels, 1),
             "loss": F.cross_entropy(logits, labels).item()}
    if classifier.num_labels >= 5:
        stats["top5"] = accuracy(logits, labels, 5)
    return stats


def linear_state(classifier: LinearClassifier) -> dict:
    """The classifier's weights under the official names (module.linear.*)."""
    return {OFFICIAL_PREFIX + k: v for k, v in classifier.state_dict().items()}


def load_linear_weights(classifier: LinearClassifier, path: str | Path) -> None:
    """Official linear weights (`{"state_dict": {"module.linear.weight", ...}}`), ours, or a
    bare state dict; read without unpickling code."""
    contents = load_file(path)
    state = contents.get("state_dict", contents)
    state = {k.removeprefix(OFFICIAL_PREFIX): v for k, v in state.items()}
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
                 device, output_dir: str | Path | None = None):
        self.backbone, self.cfg, self.device = backbone.eval(), cfg, torch.device(device)
        self.train_images = train_images
        self.classes = class_names(train_images, val_images)
        depth = len(backbone.blocks)
        if cfg.n_last_blocks > depth:
            raise ValueError(f"n_last_blocks={cfg.n_last_blocks} is more than the backbone's "
                             f"{depth} blocks")
        dim = feature_dim(backbone.embed_dim, cfg.n_last_blocks, cfg.avgpool)
        torch.manual_seed(cfg.seed)
        self.classifiers = nn.ModuleList(LinearClassifier(dim, len(self.classes))
                                         for _ in cfg.lrs).to(self.device)
        self.optimizer = torch.optim.SGD(
            [{"params": c.parameters(), "lr": lr * cfg.batch_size / 256}  # linear scaling
             for c, lr in zip(self.classifiers, cfg.lrs)], momentum=0.9, weight_decay=0)
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, cfg.epochs,
                                                                    eta_min=0)
        self.epoch, self.best_top1, self.picked, self.history = 0, 0.0, 0, []
        self.out = Path(output_dir) if output_dir else None
        self.val = cache(compute_features(backbone, val_images,
                                          eval_transform(cfg.crop, cfg.resize_ratio), cfg,
                                          self.device))
        self._train_cache = None

    @property
    def classifier(self) -> LinearClassifier:
        """The classifier of the learning rate the last validation picked."""
        return self.classifiers[self.picked]

    # -- data --------------------------------------------------------------------------

    def train_batches(self, epoch: int):
        cfg, seed = self.cfg, self.cfg.seed + epoch  # a new order every epoch, reproducible
        if cfg.cached_features:
            if self._train_cache is None:
                self._train_cache = cache(compute_features(
                    self.backbone, self.train_images, eval_transform(cfg.crop, cfg.resize_ratio),
                    cfg, self.device))
            return cached_batches(*self._train_cache, cfg.batch_size, seed)
        torch.manual_seed(seed)  # the crops' draws (data workers take their seeds from it)
        return compute_features(self.backbone, self.train_images, train_transform(cfg.crop),
                                cfg, self.device, shuffle_seed=seed)

    # -- the loop ------------------------------------------------------------------------

    def train_epoch(self) -> dict:
        self.classifiers.train()
        lrs = [group["lr"] for group in self.optimizer.param_groups]
        totals, count = torch.zeros(len(lrs), device=self.device), 0
        for features, labels in self.train_batches(self.epoch):
            losses = torch.stack([F.cross_entropy(c(features), labels) for c in self.classifiers])
            self.optimizer.zero_grad()
            losses.sum().backward()  # the classifiers share no parameter: each its own gradient
            self.optimizer.step()
            totals += losses.detach() * len(labels)
            count += len(labels)
        self.scheduler.step()
        losses = (totals / max(count, 1)).tolist()
        if not all(math.isfinite(v) for v in losses):
            raise ValueError(f"linear evaluation: the loss is not finite at epoch {self.epoch} "
                             f"(lr {', '.join(f'{lr:g}' for lr in lrs)}); lower --lr")
        self.epoch += 1
        return {"epoch": self.epoch, "lr": lrs, "train_loss": losses}

    def validate(self) -> dict:
        """Every classifier on the validation set; the best one's figures on top."""
        per_lr = [validate(c, *self.val) for c in self.classifiers]
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
                top5 = f", top-5 {stats['top5']:.2f}%" if "top5" in stats else ""
                grid = f" at --lr {stats['picked_lr']:g}" if len(cfg.lrs) > 1 else ""
                log(f"epoch {self.epoch}/{cfg.epochs}: loss {stats['train_loss'][self.picked]:.4f}, "
                    f"lr {stats['lr'][self.picked]:.3g}; top-1 {stats['top1']:.2f}%{top5}{grid} "
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
        if self.out is None:
            return
        save_atomic({"epoch": self.epoch, "state_dict": linear_state(self.classifier),
                     "classifiers": [linear_state(c) for c in self.classifiers],
                     "picked": self.picked, "optimizer": self.optimizer.state_dict(),
                     "scheduler": self.scheduler.state_dict(), "best_acc": self.best_top1,
                     "history": self.history, "config": asdict(self.cfg)},
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
        changed = {k: (saved[k], v) for k, v in asdict(self.cfg).items()
                   if k in saved and k not in ("workers", "val_freq") and saved[k] != v}
        if changed:
            raise CheckpointError(f"{path} was trained with other settings: " + ", ".join(
                f"{k}={old!r} there, {new!r} here" for k, (old, new) in changed.items()))
        for classifier, weights in zip(self.classifiers, state["classifiers"]):
            classifier.load_state_dict({k.removeprefix(OFFICIAL_PREFIX): v
                                        for k, v in weights.items()})
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.epoch, self.best_top1 = int(state["epoch"]), float(state["best_acc"])
        self.picked, self.history = int(state["picked"]), list(state["history"])
        return True
