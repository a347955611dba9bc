import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dinofuse.dataloading.readers import DataError
from dinofuse.engine.eval.knn import knn_classify


def official_knn(train_features, train_labels, test_features, test_labels, k, T, num_classes):
    """The official eval_knn.knn_classifier in one chunk: (top-1, top-5)."""
    similarity = torch.mm(test_features, train_features.t())
    distances, indices = similarity.topk(k, largest=True, sorted=True)
    candidates = train_labels.view(1, -1).expand(len(test_labels), -1)
    retrieved_neighbors = torch.gather(candidates, 1, indices)
    one_hot = torch.zeros(len(test_labels) * k, num_classes)
    one_hot.scatter_(1, retrieved_neighbors.view(-1, 1), 1)
    weights = distances.clone().div_(T).exp_()
    probs = torch.sum(torch.mul(one_hot.view(len(test_labels), -1, num_classes),
                                weights.view(len(test_labels), -1, 1)), 1)
    _, predictions = probs.sort(1, True)
    correct = predictions.eq(test_labels.view(-1, 1))
    top5 = correct.narrow(1, 0, min(5, k)).sum().item()  # official: top-5 means nothing at k < 5
    return 100.0 * correct[:, 0].float().mean().item(), 100.0 * top5 / len(test_labels)


def test_matches_official_knn_in_chunks():
    torch.manual_seed(3)
    centers = torch.randn(7, 32)
    train_y, test_y = torch.randint(0, 7, (900,)), torch.randint(0, 7, (301,))
    # noisy enough that the top-5 stays under 100% (45-56% top-1, 81-95% top-5)
    train = F.normalize(centers[train_y] + torch.randn(900, 32) * 3.0, dim=1)
    test = F.normalize(centers[test_y] + torch.randn(301, 32) * 3.0, dim=1)
    for k in (1, 3, 10, 20):
        ours = knn_classify(train, train_y, test, test_y, k=k, temperature=0.07, chunk=64)
        top1, top5 = official_knn(train, train_y, test, test_y, k, 0.07, 7)
        assert ours["top1"] == pytest.approx(top1, abs=1e-4)
        assert ours["top5"] == pytest.approx(top5, abs=1e-4)
        assert 30 < ours["top1"] <= ours["top5"] <= 100


def test_features_from_worker_processes_are_those_of_the_main_process(tmp_path):
    """`dinofuse knn --workers N` decodes and resizes in N processes: same features, same
    order, same labels as in-process (per image, not only the accuracy they give)."""
    import numpy as np
    from PIL import Image

    from dinofuse.dataloading.readers import open_images
    from dinofuse.engine.eval.knn import extract_features
    from dinofuse.engine.eval.report import eval_transform
    from dinofuse.engine.models import vit_tiny

    rng = np.random.default_rng(0)
    for c in range(3):
        (tmp_path / f"c{c}").mkdir()
        for i in range(5):
            Image.fromarray((rng.random((40, 30, 3)) * 255).astype(np.uint8)).save(
                tmp_path / f"c{c}" / f"{i}.png")
    torch.manual_seed(0)
    backbone = vit_tiny(depth=1, patch_size=8, img_size=32)
    images, transform = open_images(str(tmp_path), "train"), eval_transform(32, 1.0)
    features = [extract_features(backbone, images, transform, torch.device("cpu"), batch_size=4,
                                 num_workers=workers) for workers in (0, 2)]
    assert features[0][0].shape == (15, 192)
    # cosine similarity: unit rows (the CLS token itself is far from unit length)
    torch.testing.assert_close(features[0][0].norm(dim=1), torch.ones(15))
    assert torch.equal(features[0][1], torch.arange(3).repeat_interleave(5))
    assert torch.equal(features[0][0], features[1][0]) and torch.equal(features[0][1], features[1][1])


def test_eval_transform_is_the_official_one():
    """eval_knn.py: resize 256 (bicubic), center crop 224, ImageNet normalization."""
    import numpy as np
    from PIL import Image
    from torchvision import transforms as T

    from dinofuse.engine.eval.report import eval_transform

    image = Image.fromarray((np.random.default_rng(0).random((300, 400, 3)) * 255).astype(np.uint8))
    official = T.Compose([T.Resize(256, interpolation=3), T.CenterCrop(224), T.ToTensor(),
                          T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    assert torch.equal(eval_transform(224, 256 / 224)(image), official(image))


def test_the_report_names_the_k_and_temperature_it_ran_with():
    from dinofuse.engine.eval.report import format_report

    text = format_report({"trained teacher": {"top1": 80.5, "top5": 99.25}}, k=10, temperature=0.1)
    assert text.splitlines() == ["k-NN (k=10, T=0.1) top-1 / top-5:",
                                 "  trained teacher   80.50% /  99.25%"]


def test_the_report_rows_are_the_teacher_the_random_network_and_raw_pixels(tmp_path):
    """Each row from its own features, with the configured k, temperature and feature mode:
    the trained teacher's, the random network's, and the raw pixels in [0, 1] (not
    normalized: ImageNet's per-channel shift would move every cosine similarity)."""
    from fashion_mnist_files import write_fashion_mnist

    from dinofuse.engine.config import load_config
    from dinofuse.engine.eval.knn import knn_classify
    from dinofuse.engine.eval.report import knn_report
    from dinofuse.engine.models import vit_tiny

    write_fashion_mnist(tmp_path, train=40, test=12, size=16, classes=3)
    cfg = load_config("default", [f'data.path="{tmp_path}"', "data.global_crop_size=16",
                                  "run.knn_k=5", "run.knn_temperature=0.5", "run.knn_resize_ratio=1.0",
                                  'run.knn_features="cls+avgpool"'])
    torch.manual_seed(0)
    teacher, random_net = (vit_tiny(depth=1, patch_size=8, img_size=16) for _ in range(2))
    report = knn_report(cfg, teacher, random_net, torch.device("cpu"))
    assert list(report) == ["trained teacher", "random init", "raw pixels"]

    def images(split):
        from dinofuse.dataloading.readers import open_images

        data = open_images(str(tmp_path), split)
        x = torch.stack([torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1)
                         for img, _ in data])
        return x, torch.tensor([label for _, label in data])

    (train_x, train_y), (test_x, test_y) = images("train"), images("test")
    mean, std = torch.tensor([0.485, 0.456, 0.406])[:, None, None], torch.tensor([0.229, 0.224, 0.225])[:, None, None]

    def features(x, backbone=None):
        if backbone is None:
            return F.normalize(x.flatten(1), dim=-1)
        with torch.no_grad():
            tokens = backbone.eval().forward_features((x - mean) / std)
        f = torch.cat([F.normalize(tokens[:, 0], dim=-1),
                       F.normalize(tokens[:, 1:].mean(1), dim=-1)], -1)
        return F.normalize(f, dim=-1)

    for name, backbone in (("trained teacher", teacher), ("random init", random_net), ("raw pixels", None)):
        want = knn_classify(features(train_x, backbone), train_y, features(test_x, backbone), test_y,
                            k=5, temperature=0.5)
        assert report[name] == pytest.approx(want), name
    assert report["trained teacher"] != report["random init"]


def _noise_images(count: int, seed: int = 0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [(Image.fromarray((rng.random((32, 32, 3)) * 255).astype(np.uint8)), i % 2)
            for i in range(count)]


def test_half_precision_features_run_under_autocast_and_stay_close():
    """--precision bf16/fp16: the forward's matmuls in that dtype (seen inside the network),
    the features fp32, unit length and close to fp32's, but not fp32's own."""
    from dinofuse.engine.eval.knn import extract_features
    from dinofuse.engine.eval.report import eval_transform
    from dinofuse.engine.models import vit_tiny

    torch.manual_seed(0)
    backbone = vit_tiny(depth=2, patch_size=8, img_size=32)
    images, transform = _noise_images(6), eval_transform(32, 1.0)
    seen = []
    backbone.blocks[0].mlp.fc1.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    reference, labels = extract_features(backbone, images, transform, "cpu", batch_size=4)
    assert seen == [torch.float32] * 2
    for precision, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        seen.clear()
        features, same_labels = extract_features(backbone, images, transform, "cpu",
                                                 batch_size=4, precision=precision)
        assert seen == [dtype] * 2 and features.dtype == torch.float32
        assert torch.equal(same_labels, labels)
        torch.testing.assert_close(features.norm(dim=1), torch.ones(6))
        cosine = (features * reference).sum(1)
        assert cosine.min() > 0.99 and not torch.equal(features, reference)
    with pytest.raises(ValueError, match="precision must be one of fp32, bf16, fp16; got 'fp64'"):
        extract_features(backbone, images, transform, "cpu", precision="fp64")


def test_more_processes_than_images_is_named(monkeypatch):
    """A rank dealt no image would fail in the gather; the error names the counts instead."""
    from dinofuse.dataloading.readers import DataError
    from dinofuse.engine.eval import knn
    from dinofuse.engine.eval.report import eval_transform
    from dinofuse.engine.models import vit_tiny

    monkeypatch.setattr(knn, "rank_and_world", lambda: (0, 3))
    backbone = vit_tiny(depth=1, patch_size=8, img_size=32)
    with pytest.raises(DataError, match="under 3 processes need at least 3 images; this set has 2"):
        knn.extract_features(backbone, _noise_images(2), eval_transform(32, 1.0), "cpu",
                             distributed=True)


def test_class_indices_compare_as_indices_and_against_names_by_sorted_order(tmp_path):
    """Shards label by class index (.cls): two such sets compare index to index, a query
    set may lack the last classes (a subset) but not hold more; against a folder's names,
    the i-th sorted name when both count as many classes, which is said."""
    from dinofuse.dataloading.readers import ImageFiles, WebDatasetShards
    from dinofuse.engine.eval.knn import comparable_labels, labels_note, labels_problem
    from test_readers import encoded, write_shard

    def shards(name, labels):
        members = [m for i, label in enumerate(labels)
                   for m in ((f"{i}.jpg", encoded(i)), (f"{i}.cls", b"%d" % label))]
        return WebDatasetShards([write_shard(tmp_path / f"{name}.tar", members)])

    def folder(name, classes):
        for c in classes:
            (tmp_path / name / c).mkdir(parents=True)
            (tmp_path / name / c / "0.jpg").write_bytes(encoded(0))
        return ImageFiles(tmp_path / name)

    three, two = shards("three", [0, 1, 2, 2]), shards("two", [1, 0])
    assert labels_problem(three, two) is None and labels_note(three, two) is None
    assert labels_problem(two, three) == "the queries' class indices go up to 2, the memory's only to 1"
    names = folder("names", ["b", "a", "c"])
    for memory, queries in ((three, names), (names, three)):
        assert labels_problem(memory, queries) is None
        assert labels_note(memory, queries) == ("labels: the shards' class index i is taken as "
                                                "the other set's i-th class, of 3 (a, b, ...; a "
                                                "folder's in sorted order)")
    assert "count 2 and 3 classes" in labels_problem(two, names)
    assert "different classes" in labels_problem(names, folder("other", ["a", "b", "d"]))
    with pytest.raises(DataError, match="^--val: the queries' class indices"):
        comparable_labels(two, three, "--val")
