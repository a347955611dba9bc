"""Linear evaluation against the official eval_linear.py: the features it reads, the classifier,
SGD and its schedule, the official weights' layout, resume, and what it learns."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dinofuse.dataloading.readers import DataError
from dinofuse.engine.checkpoint import CheckpointError
from dinofuse.engine.eval.linear import (
    LinearClassifier,
    LinearEval,
    LinearEvalConfig,
    feature_dim,
    linear_features,
    epoch_steps,
    load_linear_weights,
    official_defaults,
    validate,
)
from dinofuse.engine.eval.report import eval_transform
from dinofuse.engine.models.vit import build_vit
from official_vit import official_vit_forward
from test_models import random_state


class Labelled(list):
    """(PIL image, label) pairs with a class list, like the readers' datasets."""

    def __init__(self, items, classes):
        super().__init__(items)
        self.classes = list(classes)


COLORS = {"red": (200, 40, 40), "green": (40, 200, 40), "blue": (40, 40, 200)}


def colored(count: int, seed: int, classes=tuple(COLORS)) -> Labelled:
    """Noisy images whose class is their color (16 px)."""
    rng = np.random.default_rng(seed)
    items = []
    for i in range(count):
        label = i % len(classes)
        pixels = np.array(COLORS[classes[label]]) + rng.normal(0, 25, (16, 16, 3))
        items.append((Image.fromarray(pixels.clip(0, 255).astype(np.uint8)), label))
    return Labelled(items, classes)


def tiny_backbone(depth=3):
    torch.manual_seed(0)
    return build_vit("vit_tiny", patch_size=4, img_size=16, embed_dim=16, depth=depth,
                     num_heads=2).eval()


def settings(**kw):
    return LinearEvalConfig(**{"epochs": 3, "batch_size": 16, "n_last_blocks": 2, "crop": 16,
                               "resize_ratio": 1.0, "cached_features": True, **kw})


@pytest.mark.parametrize("n", [1, 2, 3])
def test_intermediate_layers_are_the_official_ones(n):
    model = random_state(build_vit("vit_tiny", patch_size=8, depth=3)).eval()
    x = torch.randn(2, 3, 32, 40)
    with torch.no_grad():
        ours = model.get_intermediate_layers(x, n)
        ref = official_vit_forward(model.state_dict(), x, patch=8, heads=3, last_blocks=n)
        assert len(ours) == n
        for a, b in zip(ours, ref):
            assert (a - b).abs().max() < 1e-5
        assert torch.equal(ours[-1], model.forward_features(x))
    for bad in (0, 4):
        with pytest.raises(ValueError, match="n must be in 1..3"):
            model.get_intermediate_layers(x, bad)


def official_layout(layers, avgpool):
    """eval_linear.py's lines, verbatim in effect."""
    output = torch.cat([x[:, 0] for x in layers], dim=-1)
    if avgpool:
        output = torch.cat((output.unsqueeze(-1), torch.mean(layers[-1][:, 1:], dim=1).unsqueeze(-1)), dim=-1)
        output = output.reshape(output.shape[0], -1)
    return output


@pytest.mark.parametrize("n,avgpool", [(1, False), (1, True), (3, False), (2, True)])
def test_features_in_the_official_order(n, avgpool):
    model = random_state(tiny_backbone())
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        ours = linear_features(model, x, n, avgpool)
        layers = model.get_intermediate_layers(x, n)
    assert ours.shape == (3, feature_dim(16, n, avgpool)) and ours.dtype == torch.float32
    if n == 1 or not avgpool:  # where the official code runs
        assert torch.equal(ours, official_layout(layers, avgpool))
    else:  # it fails there; ours appends the mean patch token
        assert torch.equal(ours[:, :16 * n], official_layout(layers, False))
        assert torch.equal(ours[:, 16 * n:], layers[-1][:, 1:].mean(1))


def test_official_defaults_by_width():
    assert official_defaults(384) == {"n_last_blocks": 4, "avgpool": False}
    assert official_defaults(192) == {"n_last_blocks": 4, "avgpool": False}
    assert official_defaults(128, depth=2) == {"n_last_blocks": 2, "avgpool": False}
    assert official_defaults(768) == {"n_last_blocks": 1, "avgpool": True}
    assert feature_dim(384, 4, False) == feature_dim(768, 1, True) == 1536  # released weights


def test_classifier_init_and_flatten():
    torch.manual_seed(0)
    clf = LinearClassifier(2000, 50)
    w = clf.linear.weight
    assert abs(w.std().item() - 0.01) < 3e-4 and abs(w.mean().item()) < 3e-4
    assert torch.equal(clf.linear.bias, torch.zeros(50))
    x = torch.randn(4, 2, 1000)
    assert torch.equal(clf(x), clf.linear(x.reshape(4, 2000)))


def test_accuracy_and_validate_by_hand():
    logits = torch.tensor([[5., 4, 3, 2, 1, 0], [0, 1, 2, 3, 4, 5], [1, .5, 0, -1, -2, 9]])
    targets = torch.tensor([0, 0, 1])  # right; last of six; third of six
    clf = LinearClassifier(6, 6)
    with torch.no_grad():
        clf.linear.weight.copy_(torch.eye(6))
        clf.linear.bias.zero_()
    stats = validate(clf, logits, targets)
    assert stats["top1"] == pytest.approx(100 / 3) and stats["top5"] == pytest.approx(200 / 3)
    assert stats["loss"] == pytest.approx(F.cross_entropy(logits, targets).item())
    assert "top5" not in validate(LinearClassifier(6, 4), logits, targets % 4)  # official: < 5 classes


def test_sgd_and_the_per_epoch_cosine():
    run = LinearEval(tiny_backbone(), colored(24, 1), colored(9, 2), settings(epochs=4, lrs=[0.5],
                     batch_size=8), "cpu")
    group = run.optimizer.param_groups[0]
    assert (group["momentum"], group["weight_decay"], group["nesterov"]) == (0.9, 0, False)
    run.run(log=lambda line: None)
    base = 0.5 * 8 / 256  # linear scaling from a batch of 256
    assert [h["lr"][0] for h in run.history] == pytest.approx(
        [base * 0.5 * (1 + math.cos(math.pi * e / 4)) for e in range(4)])
    assert [h["epoch"] for h in run.history] == [1, 2, 3, 4]


def test_one_step_is_sgd_on_the_official_features():
    train = colored(12, 3)
    backbone = random_state(tiny_backbone())
    run = LinearEval(backbone, train, colored(6, 4), settings(epochs=1, lrs=[256.0], batch_size=12), "cpu")
    w0, b0 = run.classifier.linear.weight.detach().clone(), run.classifier.linear.bias.detach().clone()
    run.run(log=lambda line: None)
    # independently: the official forward on the evaluation crops, the official layout
    x = torch.stack([eval_transform(16, 1.0)(img) for img, _ in train])
    y = torch.tensor([label for _, label in train])
    with torch.no_grad():
        layers = official_vit_forward(backbone.state_dict(), x, patch=4, heads=2, last_blocks=2)
    feats = official_layout(layers, False).requires_grad_(False)
    w, b = w0.clone().requires_grad_(), b0.clone().requires_grad_()
    F.cross_entropy(feats @ w.t() + b, y).backward()
    lr = 256.0 * 12 / 256  # first step: momentum's buffer is the gradient
    assert torch.allclose(run.classifier.linear.weight, w0 - lr * w.grad, atol=1e-5)
    assert torch.allclose(run.classifier.linear.bias, b0 - lr * b.grad, atol=1e-5)


def test_it_learns_the_classes_and_reads_the_validation_labels():
    backbone = tiny_backbone()
    cfg = settings(epochs=15, lrs=[20.0])
    run = LinearEval(backbone, colored(60, 5), colored(30, 6), cfg, "cpu")
    summary = run.run(log=lambda line: None)
    assert summary["last"]["top1"] >= 90 and summary["best_top1"] >= summary["last"]["top1"]
    # the same images labelled by a shifted class list: right answers turn wrong
    shifted = colored(30, 6)
    shifted[:] = [(img, (label + 1) % 3) for img, label in shifted]
    wrong = LinearEval(backbone, colored(60, 5), shifted, cfg, "cpu")
    wrong.classifier.load_state_dict(run.classifier.state_dict())
    assert validate(wrong.classifier, *wrong.val)["top1"] <= 10


def test_augmented_epochs_are_reproducible_and_differ_by_seed():
    def weights(seed):
        run = LinearEval(tiny_backbone(), colored(20, 7), colored(6, 8),
                         settings(epochs=2, cached_features=False, seed=seed), "cpu")
        run.run(log=lambda line: None)
        return run.classifier.linear.weight.detach()

    first = weights(0)
    assert torch.equal(first, weights(0))
    assert not torch.equal(first, weights(1))  # other crops, another order, another init


def test_augmented_and_cached_training_see_different_crops():
    run = LinearEval(tiny_backbone(), colored(8, 9), colored(3, 9),
                     settings(cached_features=False, batch_size=8), "cpu")
    augmented = next(iter(run.train_batches(0)))[0]
    run.cfg.cached_features = True
    cached = next(iter(run.train_batches(0)))[0]
    assert augmented.shape == cached.shape and not torch.allclose(augmented, cached)


def test_resume_continues_exactly(tmp_path):
    cfg = settings(epochs=4, cached_features=False, lrs=(0.001, 3.0))
    whole = LinearEval(tiny_backbone(), colored(20, 10), colored(6, 11), cfg, "cpu", tmp_path / "a")
    whole.run(log=lambda line: None)

    class Killed(Exception):
        pass

    def die_at_third(line):
        if line.startswith("epoch 3/"):
            raise Killed

    first = LinearEval(tiny_backbone(), colored(20, 10), colored(6, 11), cfg, "cpu", tmp_path / "b")
    with pytest.raises(Killed):
        first.run(log=die_at_third)
    again = LinearEval(tiny_backbone(), colored(20, 10), colored(6, 11), cfg, "cpu", tmp_path / "b")
    assert again.resume() and again.epoch == 2
    again.run(log=lambda line: None)
    for a, b in zip(again.classifiers, whole.classifiers, strict=True):
        assert torch.equal(a.linear.weight, b.linear.weight)
    assert again.history == whole.history and again.picked == whole.picked
    lines = (tmp_path / "b" / "linear_log.jsonl").read_text().splitlines()
    assert len(lines) == 4
    other = LinearEval(tiny_backbone(), colored(20, 10), colored(6, 11),
                       settings(epochs=4, cached_features=False, lrs=[0.01]), "cpu", tmp_path / "b")
    saved = torch.load(tmp_path / "b" / "linear.pth", weights_only=True)
    torch.save({**saved, "world": 2}, tmp_path / "b" / "linear.pth")
    with pytest.raises(CheckpointError, match=r"other settings: processes=2 there, 1 here"):
        again.resume()
    with pytest.raises(CheckpointError, match=r"linear.pth was trained with other settings: lrs=\(0.001, 3.0\) there, \(0.01,\) here"):
        other.resume()


def test_official_weights_file_loads(tmp_path):
    run = LinearEval(tiny_backbone(), colored(12, 12), colored(9, 13), settings(), "cpu")
    torch.manual_seed(5)
    weight, bias = torch.randn(3, 32), torch.randn(3)
    path = tmp_path / "dino_linearweights.pth"
    torch.save({"epoch": 100, "state_dict": {"module.linear.weight": weight,
                                             "module.linear.bias": bias}, "best_acc": 77.0}, path)
    load_linear_weights(run.classifier, path)
    assert torch.equal(run.classifier.linear.weight, weight)
    features, labels = run.val
    expected = 100 * ((features @ weight.t() + bias).argmax(1) == labels).float().mean().item()
    assert validate(run.classifier, features, labels)["top1"] == pytest.approx(expected)
    torch.save({"state_dict": {"module.linear.weight": torch.randn(3, 64),
                               "module.linear.bias": bias}}, tmp_path / "wide.pth")
    with pytest.raises(CheckpointError, match=r"wide.pth: linear.weight has shape \(3, 64\)"):
        load_linear_weights(run.classifier, tmp_path / "wide.pth")
    torch.save({"teacher": {"cls_token": bias}}, tmp_path / "backbone.pth")
    with pytest.raises(CheckpointError, match="backbone.pth: not linear classifier weights"):
        load_linear_weights(run.classifier, tmp_path / "backbone.pth")


def test_bad_sets_are_named():
    with pytest.raises(DataError, match="different classes"):
        LinearEval(tiny_backbone(), colored(6, 1), colored(6, 1, ("red", "blue", "green")),
                   settings(), "cpu")
    with pytest.raises(DataError, match="at least two classes"):
        LinearEval(tiny_backbone(), colored(6, 1, ("red",)), colored(6, 1, ("red",)), settings(), "cpu")
    with pytest.raises(ValueError, match="n_last_blocks=4 is more than the backbone's 3 blocks"):
        LinearEval(tiny_backbone(), colored(6, 1), colored(6, 1), settings(n_last_blocks=4), "cpu")
    with pytest.raises(ValueError, match="epochs must be >= 1"):
        settings(epochs=0)


def test_learning_rates_train_side_by_side_independently():
    """Each classifier of a grid follows the run it would have had alone; validation picks
    the best one."""
    cfg = settings(epochs=3, lrs=(0.001, 30.0))
    grid = LinearEval(tiny_backbone(), colored(30, 14), colored(15, 15), cfg, "cpu")
    start = [{k: v.clone() for k, v in c.state_dict().items()} for c in grid.classifiers]
    lines = []
    grid.run(log=lines.append)
    for i, lr in enumerate(cfg.lrs):
        alone = LinearEval(tiny_backbone(), colored(30, 14), colored(15, 15),
                           settings(epochs=3, lrs=(lr,)), "cpu")
        alone.classifier.load_state_dict(start[i])
        alone.run(log=lambda line: None)
        assert torch.allclose(alone.classifier.linear.weight, grid.classifiers[i].linear.weight,
                              atol=1e-6)
    per_lr = [v["top1"] for v in grid.history[-1]["val"]]
    assert grid.picked == per_lr.index(max(per_lr)) and grid.history[-1]["top1"] == max(per_lr)
    assert grid.classifier is grid.classifiers[grid.picked]
    assert per_lr[1] > per_lr[0]  # 0.001 barely moves in 3 epochs here
    assert f"at --lr {cfg.lrs[grid.picked]:g}" in lines[-1]


@pytest.mark.parametrize("cached", [True, False])
def test_every_epoch_draws_a_new_order(cached):
    run = LinearEval(tiny_backbone(), colored(24, 16), colored(3, 16),
                     settings(cached_features=cached, batch_size=24), "cpu")
    labels = [next(iter(run.train_batches(epoch)))[1] for epoch in (0, 1, 0)]
    assert sorted(labels[0].tolist()) == sorted(labels[1].tolist())  # the whole set each time
    assert not torch.equal(labels[0], labels[1]) and torch.equal(labels[0], labels[2])


def test_epoch_steps_deal_the_global_batches_to_the_ranks():
    one = epoch_steps(7, 4, seed=3)  # one process, batch 4: the global batches
    assert [count for _, count in one] == [4, 3]
    ranks = [epoch_steps(7, 2, seed=3, rank=r, world=2) for r in range(2)]
    order = torch.cat([i for i, _ in one])
    padded = torch.cat([order, order[:1]])  # 7 -> 8: the permutation's start repeated
    for step, (start, end) in enumerate([(0, 4), (4, 8)]):
        shares = [ranks[r][step][0] for r in range(2)]
        assert all(len(share) == 2 for share in shares)  # every rank a part of every step
        assert torch.equal(torch.stack(shares, 1).flatten(), padded[start:end])
        assert ranks[0][step][1] == ranks[1][step][1] == end - start
    assert not torch.equal(order, torch.cat([i for i, _ in epoch_steps(7, 4, seed=4)]))


def test_a_diverged_learning_rate_drops_out_and_all_diverged_stops():
    """A classifier gone non-finite (as too large a rate leaves it) is never picked; the run
    stops only when every one has."""
    run = LinearEval(tiny_backbone(), colored(24, 17), colored(9, 18),
                     settings(epochs=2, lrs=(1.0, 2.0)), "cpu")
    with torch.no_grad():
        run.classifiers[1].linear.weight[0, 0] = math.inf
    run.run(log=lambda line: None)
    assert run.history[-1]["val"][1] == {"top1": 0.0, "loss": None, "diverged": True}
    assert run.picked == 0 and run.history[-1]["top1"] > 0
    assert not math.isfinite(run.history[0]["train_loss"][1])
    alone = LinearEval(tiny_backbone(), colored(24, 17), colored(9, 18),
                       settings(epochs=2, lrs=(1.0,)), "cpu")
    with torch.no_grad():
        alone.classifier.linear.bias[0] = math.nan
    with pytest.raises(ValueError, match="the loss is not finite at epoch 0 .*lower --lr"):
        alone.run(log=lambda line: None)


def test_half_precision_features_are_close_and_named_in_the_settings():
    """--precision bf16: the backbone's forward under autocast, the classifier's features
    fp32 and close to fp32's (not equal: the forward did run in bf16)."""
    backbone, images = tiny_backbone(), colored(6, 19)
    seen = []
    backbone.blocks[-1].attn.qkv.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    runs = {p: LinearEval(backbone, images, images, settings(precision=p), "cpu")
            for p in ("fp32", "bf16")}
    assert seen == [torch.float32, torch.bfloat16]  # one validation batch each
    fp32, bf16 = (runs[p].val[0] for p in ("fp32", "bf16"))
    assert bf16.dtype == torch.float32 and not torch.equal(fp32, bf16)
    torch.testing.assert_close(bf16, fp32, atol=0.1, rtol=0.05)
    assert torch.equal(runs["fp32"].val[1], runs["bf16"].val[1])
    with pytest.raises(ValueError, match="precision must be one of fp32, bf16, fp16; got 'half'"):
        settings(precision="half")


def test_more_processes_than_images_is_named(monkeypatch):
    """A rank dealt no image would have no features to send; the error names the set."""
    from dinofuse.engine.eval import linear

    monkeypatch.setattr(linear, "rank_and_world", lambda: (0, 4))
    with pytest.raises(DataError, match="under 4 processes needs at least 4 validation images; "
                       "the set has 3"):
        LinearEval(tiny_backbone(), colored(6, 1), colored(3, 1), settings(), "cpu")
    with pytest.raises(DataError, match="at least 4 training images; the set has 2"):
        LinearEval(tiny_backbone(), colored(2, 1), colored(6, 1), settings(), "cpu")
