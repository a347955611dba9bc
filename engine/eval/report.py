"""The default run's evaluation: k-NN of the trained teacher, of a random network of the same
shape, and of raw pixels, on the same memory and queries."""

from __future__ import annotations

from torchvision import transforms as T

from dinofuse.dataloading.readers import DataError, fashion_mnist_root, open_images
from dinofuse.dataloading.torchvision_multicrop import IMAGENET_MEAN, IMAGENET_STD
from dinofuse.engine.config import Config
from dinofuse.engine.eval.knn import comparable_labels, extract_features, knn_classify


def eval_transform(crop: int, resize_ratio: float, normalize: bool = True):
    steps = [T.Resize(round(crop * resize_ratio), interpolation=T.InterpolationMode.BICUBIC),
             T.CenterCrop(crop), T.ToTensor()]
    if normalize:
        steps.append(T.Normalize(IMAGENET_MEAN, IMAGENET_STD))
    return T.Compose(steps)


def knn_datasets(cfg: Config):
    """(memory, queries) or None when there is no query set to evaluate on; a DataError when
    their labels cannot be compared (a flat, unlabelled training folder, say)."""
    if cfg.run.knn_val and cfg.data.path == "synthetic":
        raise DataError("k-NN takes the training images as its memory, and data.path="
                        "\"synthetic\" has none: unset run.knn_val (or train on images)")
    if cfg.run.knn_val:
        sets = open_images(cfg.data.path, "train"), open_images(cfg.run.knn_val, "test")
    elif fashion_mnist_root(cfg.data.path) is not None:  # its test split holds the queries
        sets = open_images(cfg.data.path, "train"), open_images(cfg.data.path, "test")
    else:
        return None
    comparable_labels(*sets, "k-NN of data.path against run.knn_val")
    return sets


class _Flatten:
    """A stand-in backbone whose 'tokens' are the raw pixels: k-NN on pixels."""

    def eval(self):
        return self

    def forward_features(self, x):
        return x.flatten(1)[:, None, :]


def knn_report(cfg: Config, teacher_backbone, random_backbone, device,
               distributed: bool = False, datasets=None, progress: bool = False) -> dict:
    """The three rows' top-1/top-5 on `datasets` (default: `knn_datasets(cfg)`); with
    `distributed`, every rank of the process group extracts a share of the features (all
    must call, each with a backbone of its own). `progress`: show each extraction's."""
    datasets = datasets if datasets is not None else knn_datasets(cfg)
    if datasets is None:
        return {}
    pixels = eval_transform(cfg.data.global_crop_size, cfg.run.knn_resize_ratio, normalize=False)
    rows = (("trained teacher", teacher_backbone), ("random init", random_backbone))
    report = {name: network_knn(cfg, backbone, datasets, device, distributed,
                                progress=f"k-NN of the {name}" if progress else None)
              for name, backbone in rows}
    report["raw pixels"] = knn_row(cfg, _Flatten(), pixels, "cls", datasets, device, distributed,
                                   progress="k-NN of the raw pixels" if progress else None)
    return report


def knn_row(cfg: Config, backbone, transform, mode: str, datasets, device,
            distributed: bool = False, progress: str | None = None) -> dict:
    """One network's top-1/top-5 on (memory, queries), with the run's k and temperature;
    `progress`: the label to show the extractions under (None: nothing shown)."""
    features = []
    for images, which in zip(datasets, ("memory", "queries")):
        features += extract_features(backbone, images, transform, device, mode=mode,
                                     distributed=distributed,
                                     progress=progress and f"{progress}, {which}")
    return knn_classify(*features, k=cfg.run.knn_k, temperature=cfg.run.knn_temperature)


def network_knn(cfg: Config, backbone, datasets, device, distributed: bool = False,
                progress: str | None = None) -> dict:
    """A network's row with the run's crops and features (the teacher's and the random
    network's; alone, what `run.knn_every_epochs` logs while training)."""
    r = cfg.run
    transform = eval_transform(cfg.data.global_crop_size, r.knn_resize_ratio)
    return knn_row(cfg, backbone, transform, r.knn_features, datasets, device, distributed,
                   progress)


def format_report(report: dict, k: int, temperature: float) -> str:
    lines = [f"k-NN (k={k}, T={temperature:g}) top-1 / top-5:"]
    lines += [f"  {name:16s} {v['top1']:6.2f}% / {v['top5']:6.2f}%" for name, v in report.items()]
    return "\n".join(lines)
