"""Weighted k-NN classification on frozen features, as the official eval_knn.py.

Features are L2-normalized; for each query the k most similar memory items (cosine) vote
for their class with weight exp(similarity / T). Queries are processed in chunks so the
similarity matrix never exceeds chunk x memory (ImageNet's 1.28M memory fits on a GPU).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dinofuse.engine.eval.shares import dealt_rows, gather_dealt, rank_and_world


@torch.no_grad()
def extract_features(backbone: nn.Module, images, transform, device, batch_size: int = 256,
                     mode: str = "cls", num_workers: int = 0,
                     distributed: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(features, labels) of a dataset of (PIL image, label).

    mode "cls": the CLS token (official). "cls+avgpool": CLS and the mean of the patch
    tokens, each L2-normalized, concatenated (stronger for small models and short runs).
    distributed: every rank of the process group (all must call) extracts a share, and
    each gets all the features back, in order (the official eval_knn.py's split).
    """
    rank, world = rank_and_world() if distributed else (0, 1)
    dataset = Transformed(images, transform)
    if world > 1:
        dataset = torch.utils.data.Subset(dataset, dealt_rows(len(images), rank, world))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)
    backbone.eval()
    feats, labels = [], []
    for x, y in loader:
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
