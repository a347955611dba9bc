"""Weighted k-NN classification on frozen features, as the official eval_knn.py.

Features are L2-normalized; for each query the k most similar memory items (cosine) vote
for their class with weight exp(similarity / T). Queries are processed in chunks so the
similarity matrix never exceeds chunk x memory (ImageNet's 1.28M memory fits on a GPU).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dinofuse.dataloading.readers import DataError, WebDatasetShards
from dinofuse.engine.checkpoint import save_atomic
from dinofuse.engine.eval.shares import dealt_rows, gather_dealt, rank_and_world
from dinofuse.engine.progress import extraction_progress

# the official eval_knn.py's --dump_features/--load_features files: one bare tensor each
FEATURE_FILES = {"train_features": "trainfeat.pth", "test_features": "testfeat.pth",
                 "train_labels": "trainlabels.pth", "test_labels": "testlabels.pth"}

EVAL_PRECISIONS = ("fp32", "bf16", "fp16")


def forward_precision(device, precision: str):
    """The feature forward's autocast. fp32 is the official evaluation's; bf16 and fp16 run
    the matmuls and attention in half precision (for speed on a GPU), and the features come
    back in fp32 either way."""
    if precision not in EVAL_PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(EVAL_PRECISIONS)}; got {precision!r}")
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(torch.device(device).type, dtype=dtype)


def by_class_index(images) -> bool:
    """Whether the labels are class indices with no names (WebDataset shards' .cls), rather
    than class names (folders, Fashion-MNIST)."""
    return isinstance(images, WebDatasetShards) and images.labelled


def labels_problem(memory, queries) -> str | None:
    """Why labels of these two sets (memory and queries, or training and validation images)
    cannot be compared, or None. Named classes must be the same list (the same index would
    name other classes). Class indices compare as they are, the queries' within the
    memory's range (a subset may lack the last classes). An index against a name goes by
    the names' sorted order (as ImageNet's shards number its folders), when both count as
    many classes (see `labels_note`). Fewer than two classes (a flat folder holds one) is
    no labelling."""
    train, val = getattr(memory, "classes", None), getattr(queries, "classes", None)
    if train is not None and val is not None:
        indexed = by_class_index(memory), by_class_index(queries)
        if all(indexed) and len(val) > len(train):
            return (f"the queries' class indices go up to {len(val) - 1}, the memory's only to "
                    f"{len(train) - 1}")
        if any(indexed) and not all(indexed) and len(train) != len(val):
            return (f"one set labels by class index (.cls), the other by class name, and they "
                    f"count {len(train)} and {len(val)} classes: the indices cannot be matched "
                    "to the names")
        if not any(indexed) and list(train) != list(val):
            return (f"the two image sets have different classes ({len(train)}: {list(train)[:5]}... "
                    f"and {len(val)}: {list(val)[:5]}...): their labels would not mean the same class")
    if train is None or len(train) < 2:
        return ("labelled images are needed: at least two classes (an ImageFolder layout, one "
                "subfolder per class)")
    return None


def labels_note(memory, queries) -> str | None:
    """How the labels are matched, when one set has class indices and the other names."""
    if by_class_index(memory) == by_class_index(queries):
        return None
    named = queries if by_class_index(memory) else memory
    return (f"labels: the shards' class index i is taken as the other set's i-th class, of "
            f"{len(named.classes)} ({named.classes[0]}, {named.classes[1]}, ...; a folder's in "
            "sorted order)")


def comparable_labels(memory, queries, context: str) -> None:
    """A DataError (after `context`) when the labels of the two sets cannot be compared;
    else how they are matched, printed on rank 0 when it needs saying."""
    problem = labels_problem(memory, queries)
    if problem is not None:
        raise DataError(f"{context}: {problem}")
    note = labels_note(memory, queries)
    if note is not None and rank_and_world()[0] == 0:
        print(note, flush=True)


@torch.no_grad()
def extract_features(backbone: nn.Module, images, transform, device, batch_size: int = 256,
                     mode: str = "cls", num_workers: int = 0, distributed: bool = False,
                     precision: str = "fp32",
                     progress: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(features, labels) of a dataset of (PIL image, label).

    mode "cls": the CLS token (official). "cls+avgpool": CLS and the mean of the patch
    tokens, each L2-normalized, concatenated (stronger for small models and short runs).
    distributed: every rank of the process group (all must call) extracts a share, and
    each gets all the features back, in order (the official eval_knn.py's split).
    precision: the forward's autocast (`forward_precision`).
    progress: a label to show rank 0's progress under (`Progress`: a line every 30 s in a
    log); None shows nothing.
    """
    rank, world = rank_and_world() if distributed else (0, 1)
    if len(images) < world:  # a rank with no image would have no features to send
        raise DataError(f"k-NN features under {world} processes need at least {world} "
                         f"images; this set has {len(images)}")
    dataset = Transformed(images, transform)
    if world > 1:
        dataset = torch.utils.data.Subset(dataset, dealt_rows(len(images), rank, world))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)
    backbone.eval()
    feats, labels = [], []
    shown = extraction_progress(len(dataset), progress or "", world,
                                enabled=progress is not None and rank == 0)
    for x, y in loader:
        with forward_precision(device, precision):
            tokens = backbone.forward_features(x.to(device))
        if mode == "cls":
            f = tokens[:, 0]
        elif mode == "cls+avgpool":
            f = torch.cat([F.normalize(tokens[:, 0], dim=-1),
                           F.normalize(tokens[:, 1:].mean(1), dim=-1)], dim=-1)
        else:
            raise ValueError(f"feature mode must be 'cls' or 'cls+avgpool'; got {mode!r}")
        feats.append(f.float())
        labels.append(y.to(device))
        shown.advance(len(y))
    shown.close()
    feats, labels = (gather_dealt(torch.cat(t), len(images), world) for t in (feats, labels))
    return F.normalize(feats, dim=-1), labels


class Transformed:
    """(transform(image), label) of a dataset of (PIL image, label)."""

    def __init__(self, images, transform):
        self.images, self.transform = images, transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        img, label = self.images[i]
        return self.transform(img), label


def dump_features(folder: str | Path, features: dict[str, torch.Tensor]) -> None:
    """The k-NN's features and labels as the official eval_knn.py dumps them (each file
    written atomically), so that either code's dump loads in the other."""
    for key, name in FEATURE_FILES.items():
        save_atomic(features[key].cpu(), Path(folder) / name)


def load_features(folder: str | Path) -> dict[str, torch.Tensor]:
    """A dump of `dump_features` or of the official --dump_features, read without unpickling
    code; features L2-normalized again (a no-op on either dump; the cosine for others)."""
    loaded = {}
    for key, name in FEATURE_FILES.items():
        path = Path(folder) / name
        if not path.is_file():
            raise DataError(f"{path}: not found (a feature dump holds "
                            f"{', '.join(FEATURE_FILES.values())})")
        try:
            value = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise DataError(f"cannot read {path}: {first}") from None
        if not isinstance(value, torch.Tensor):
            raise DataError(f"{path} holds a {type(value).__name__}, not a tensor")
        loaded[key] = value
    for split in ("train", "test"):
        feats, labels = loaded[f"{split}_features"], loaded[f"{split}_labels"]
        if feats.dim() != 2 or labels.dim() != 1 or len(feats) != len(labels) or not len(feats):
            raise DataError(f"{folder}: {FEATURE_FILES[f'{split}_features']} has shape "
                            f"{tuple(feats.shape)} and {FEATURE_FILES[f'{split}_labels']} "
                            f"{tuple(labels.shape)}: wanted (N, dim) features and N labels")
        if labels.is_floating_point() or labels.is_complex() or (labels < 0).any():
            raise DataError(f"{folder}: {FEATURE_FILES[f'{split}_labels']} must hold class "
                            f"indices (integers >= 0)")
        loaded[f"{split}_features"] = F.normalize(feats.float(), dim=-1)
        loaded[f"{split}_labels"] = labels.long()
    dims = [loaded[f"{split}_features"].shape[1] for split in ("train", "test")]
    if dims[0] != dims[1]:
        raise DataError(f"{folder}: the memory's features are {dims[0]} wide and the queries' "
                        f"{dims[1]}: not from the same network")
    return loaded


@torch.no_grad()
def knn_classify(train_features: torch.Tensor, train_labels: torch.Tensor,
                 test_features: torch.Tensor, test_labels: torch.Tensor, k: int = 20,
                 temperature: float = 0.07, num_classes: int | None = None,
                 chunk: int = 256) -> dict[str, float]:
    """Top-1 and top-5 accuracy (percent) of the weighted k-NN vote. Features L2-normalized."""
    if len(train_features) == 0 or len(test_features) == 0:
        raise ValueError("k-NN needs a non-empty memory and query set")
    num_classes = num_classes or int(max(train_labels.max(), test_labels.max())) + 1
    k = min(k, len(train_features))
    top1 = top5 = 0
    memory = train_features.t()
    for start in range(0, len(test_features), chunk):
        queries = test_features[start:start + chunk]
        targets = test_labels[start:start + chunk]
        similarity, index = (queries @ memory).topk(k, dim=1)
        votes = torch.zeros(len(queries), num_classes, device=queries.device)
        votes.scatter_add_(1, train_labels[index], (similarity / temperature).exp())
        ranked = votes.argsort(dim=1, descending=True)
        top1 += (ranked[:, 0] == targets).sum().item()
        # the official count: classes past the k-th hold no vote, so they never count
        top5 += (ranked[:, :min(5, k, num_classes)] == targets[:, None]).any(1).sum().item()
    n = len(test_features)
    return {"top1": 100.0 * top1 / n, "top5": 100.0 * top5 / n}
