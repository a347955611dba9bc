"""Plant known bugs one at a time and check that the tests covering each one fail.

    .venv/bin/python tests/plant_bugs.py          # every bug (about 18 minutes on 2 cores)
    .venv/bin/python tests/plant_bugs.py 3 17     # some, by number
    .venv/bin/python tests/plant_bugs.py --list

A test that passes with its code broken cannot fail: a defect. Each bug is an exact
replacement of one piece of source in a copy of the tree (the checkout is never touched),
then its tests run there (kernels interpreted). The exit status is 1 when a bug passed.
Not part of `make test`: a bug whose replacement no longer matches the source fails here
by name, so update this list with the code it plants into.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("engine", "kernels", "dataloading", "bench")  # dinofuse.<name> = <name>/


class Bug(NamedTuple):
    file: str
    right: str
    wrong: str
    tests: list[str]  # under tests/, with pytest's ::selectors


BUGS = [
    Bug('bench/flops.py',
        '+ 2 * n * n * d  # attention @ v',
        '+ n * n * d  # attention @ v',
        ['test_bench_train.py']),
    Bug('bench/flops.py',
        '"student_backward": 2 * student_forward',
        '"student_backward": student_forward',
        ['test_bench_train.py']),
    Bug('dataloading/check.py',
        'return "empty file"',
        'return None',
        ['test_cli.py']),
    Bug('dataloading/dali_multicrop.py',
        'common = dict(random_shuffle=True, shard_id=shard_id,',
        'common = dict(random_shuffle=True, shard_id=0,',
        ['test_dali_multicrop.py']),
    Bug('dataloading/dali_multicrop.py',
        'hue = _uniform(-spec.hue, spec.hue)  # turns',
        'hue = _uniform(-spec.hue / 2, spec.hue / 2)  # turns',
        ['test_augmentation_statistics.py']),
    Bug('dataloading/dali_multicrop.py',
        '+ blue_max * ((r - g) / safe + 4) + shift * 6',
        '+ blue_max * ((r - g) / safe + 4) + shift * 3',
        ['test_augmentation_statistics.py']),
    Bug('dataloading/dali_multicrop.py',
        'mean + factor * (x - mean)',
        '128 + factor * (x - 128)',
        ['test_augmentation_statistics.py']),
    Bug('dataloading/dali_multicrop.py',
        'own = spec.dali_color == "dali"',
        'own = True',
        ['test_augmentation_statistics.py']),
    Bug('dataloading/dali_multicrop.py',
        'saturation=_uniform(max(0.0, 1 - spec.saturation), 1 + spec.saturation),',
        'saturation=_uniform(max(0.0, 1 - spec.contrast), 1 + spec.contrast),',
        ['test_augmentation_statistics.py']),
    Bug('dataloading/tensor_multicrop.py',
        'draws.uniform(-s.hue, s.hue)]',
        'draws.uniform(-s.hue / 2, s.hue / 2)]',
        ['test_augmentation_statistics.py']),
    Bug('dataloading/dali_multicrop.py',
        'high = out >= 128',
        'high = out >= 100',
        ['test_augmentation_statistics.py']),
    Bug('dataloading/dali_multicrop.py',
        'if fn.random.coin_flip(probability=spec.grayscale_p, dtype=types.BOOL):',
        'if fn.random.coin_flip(probability=spec.color_jitter_p, dtype=types.BOOL):',
        ['test_augmentation_statistics.py', 'test_dali_multicrop.py']),
    Bug('dataloading/dali_multicrop.py',
        'random_area=list(crop.scale)',
        'random_area=[crop.scale[0], 1.0]',
        ['test_augmentation_statistics.py']),
    Bug('dataloading/dali_multicrop.py',
        'random_aspect_ratio=list(spec.ratio)',
        'random_aspect_ratio=[0.5, 2.0]',
        ['test_augmentation_statistics.py', 'test_dali_multicrop.py']),
    Bug('dataloading/spec.py',
        'hue: float = 0.1',
        'hue: float = 0.2',
        ['test_config.py']),
    Bug('dataloading/spec.py',
        'CropSpec(g, self.global_crops_scale, self.blur_p[0]),',
        'CropSpec(g, self.global_crops_scale, self.blur_p[0], self.solarize_p),',
        ['test_augmentation_statistics.py']),
    Bug('dataloading/tensor_multicrop.py',
        '(out >= 128 / 255)',
        '(out >= 150 / 255)',
        ['test_augmentation_statistics.py']),
    Bug('dataloading/torchvision_multicrop.py',
        'threshold: int = 128',
        'threshold: int = 200',
        ['test_augmentation_statistics.py']),
    Bug('dataloading/torchvision_multicrop.py',
        'if random.random() > self.p:',
        'if random.random() > self.p / 2:',
        ['test_augmentation_statistics.py']),
    Bug('engine/checkpoint.py',
        'OFFICIAL_PREFIXES = ("module.", "backbone.")',
        'OFFICIAL_PREFIXES = ("module.",)',
        ['test_checkpoint.py']),
    Bug('engine/checkpoint.py',
        'if not done and s < newest:',
        'if not done:',
        ['test_checkpoint.py::test_pruning_keeps_the_newest_complete_ones_and_any_save_after_them']),
    Bug('engine/checkpoint.py',
        'for s, d in complete[:-keep]:',
        'for s, d in complete[:1 - keep]:',
        ['test_checkpoint.py', 'test_distributed.py']),
    Bug('engine/checkpoint.py',
        'raise pickle.UnpicklingError(f"{module}.{name} is not allowed in checkpoint metadata")',
        'return super().find_class(module, name)',
        ['test_checkpoint.py']),
    Bug('engine/checkpoint.py',
        'checked = torch.load(value, weights_only=True)',
        'checked = torch.load(value, weights_only=False)',
        ['test_checkpoint.py']),
    Bug('engine/checkpoint.py',
        'if not (folder / COMPLETE).is_file():',
        'if False:',
        ['test_checkpoint.py', 'test_distributed.py']),
    Bug('engine/cli.py',
        'open_images(args.val, "test")',
        'open_images(args.train, "test")',
        ['test_cli.py::test_knn_attention_maps_and_export']),
    Bug('engine/clipping.py',
        'coefs = (clip / (norms + 1e-6)).clamp(max=1.0)',
        'coefs = (clip / (norms + 1e-6)).clamp(max=2.0)',
        ['test_train.py', 'test_graph_step.py']),
    Bug('engine/clipping.py',
        'coef = (clip / (norms.norm(2) + 1e-6)).clamp(max=1.0)',
        'coef = (clip / (norms.sum() + 1e-6)).clamp(max=1.0)',
        ['test_train.py', 'test_graph_step.py']),
    Bug('engine/clipping.py',
        'if clip > 0 and coef < 1:',
        'if clip > 0 and coef < 0.5:',
        ['test_train.py::test_gradient_clipping_matches_the_official_and_torch_versions']),
    Bug('engine/eval/attention_maps.py',
        'keep_sorted = mass > (1 - threshold)',
        'keep_sorted = mass > threshold',
        ['test_attention_maps.py']),
    Bug('engine/eval/knn.py',
        '(similarity / temperature).exp()',
        '(similarity * temperature).exp()',
        ['test_knn.py']),
    Bug('engine/eval/knn.py',
        'ranked[:, :min(5, k, num_classes)]',
        'ranked[:, :min(4, k, num_classes)]',
        ['test_knn.py']),
    Bug('engine/eval/knn.py',
        'return F.normalize(torch.cat(feats), dim=-1), torch.cat(labels)',
        'return torch.cat(feats), torch.cat(labels)',
        ['test_knn.py', 'test_cli.py']),
    Bug('engine/eval/report.py',
        'T.Resize(round(crop * resize_ratio), interpolation=T.InterpolationMode.BICUBIC)',
        'T.Resize(round(crop * resize_ratio), interpolation=T.InterpolationMode.BILINEAR)',
        ['test_knn.py', 'test_cli.py']),
    Bug('engine/graph_step.py',
        'torch.stack([lr, 1 - lr * wd, momentum], 1)',
        'torch.stack([lr, 1 - 0 * wd, momentum], 1)',
        ['test_graph_step.py']),
    Bug('engine/graph_step.py',
        'group["weight_decay"] = 0.0',
        'group["weight_decay"] = group["weight_decay"]',
        ['test_graph_step.py']),
    Bug('engine/graph_step.py',
        'epoch < self.trainer.cfg.optim.freeze_last_layer,',
        'False,',
        ['test_graph_step.py::test_the_last_layer_unfreezing_alone_makes_a_new_capture']),
    Bug('engine/inputs.py',
        '[:, self.rank]',
        '[:, 0]',
        ['test_inputs.py']),
    Bug('engine/inputs.py',
        'manual_seed(self.seed * 100_003 + self.epoch)',
        'manual_seed(self.seed * 100_003)',
        ['test_inputs.py']),
    Bug('engine/models/head.py',
        'if epoch >= freeze_epochs:',
        'if epoch > freeze_epochs:',
        ['test_models.py', 'test_train.py']),
    Bug('engine/models/head.py',
        'x = F.normalize(x, dim=-1, p=2)',
        'x = F.normalize(x, dim=0, p=2)',
        ['test_models.py']),
    Bug('engine/models/head.py',
        'trunc_normal_(m.weight, std=0.02)',
        'trunc_normal_(m.weight, std=0.01)',
        ['test_models.py']),
    Bug('engine/models/vit.py',
        'scale_factor=((rows + 0.1) / side, (cols + 0.1) / side)',
        'scale_factor=((rows + 0.4) / side, (cols + 0.4) / side)',
        ['test_models.py']),
    Bug('engine/models/vit.py',
        'scale_factor=((rows + 0.1) / side, (cols + 0.1) / side)',
        'scale_factor=((cols + 0.1) / side, (rows + 0.1) / side), recompute_scale_factor=False, size=None',
        ['test_models.py']),
    Bug('engine/models/vit.py',
        'self.norm1 = LayerNorm(dim, eps=1e-6)',
        'self.norm1 = LayerNorm(dim, eps=1e-5)',
        ['test_models.py']),
    Bug('engine/parallel.py',
        'reshard_after_forward=impl.reshard_after_forward or is_teacher,',
        'reshard_after_forward=impl.reshard_after_forward,',
        ['test_distributed.py']),
    Bug('engine/schedules.py',
        'math.cos(math.pi * i / n)',
        'math.cos(math.pi * (i + 1) / n)',
        ['test_schedules.py']),
    Bug('engine/time_budget.py',
        'math.floor(60 * minutes / per_epoch)',
        'math.ceil(60 * minutes / per_epoch)',
        ['test_time_budget.py']),
    Bug('engine/time_budget.py',
        'warmup_teacher_temp_epochs=round(o.warmup_teacher_temp_epochs * scale),',
        'warmup_teacher_temp_epochs=o.warmup_teacher_temp_epochs,',
        ['test_time_budget.py']),
    Bug('engine/time_budget.py',
        'freeze_last_layer=max(min(o.freeze_last_layer, 1), round(o.freeze_last_layer * scale)))',
        'freeze_last_layer=round(o.freeze_last_layer * scale))',
        ['test_time_budget.py']),
    Bug('engine/time_budget.py',
        'per_epoch = iters_per_epoch * step_s + save_s\n    return',
        'per_epoch = iters_per_epoch * step_s\n    return',
        ['test_time_budget.py']),
    Bug('engine/train.py',
        'decaying = [p for p in self.optimizer.param_groups[0]["params"] if p.grad is not None]',
        'decaying = [p for p in self.optimizer.param_groups[1]["params"] if p.grad is not None]',
        ['test_graph_step.py']),
    Bug('engine/train.py',
        'if voted and self.stopping != "signal":',
        'if voted and self.stopping != "time":',
        ['test_train.py::test_a_signal_outranks_a_time_limit_voted_after_it']),
    Bug('engine/train.py',
        'name.endswith(".bias") or p.dim() == 1',
        'name.endswith(".bias")',
        ['test_train.py::test_one_step_equals_reference_math']),
    Bug('engine/train.py',
        'o.lr * total_batch / 256',
        'o.lr * total_batch / 128',
        ['test_train.py']),
    Bug('engine/train.py',
        'wrapper(m.drop_path_rate), wrapper(0.0)',
        'wrapper(m.drop_path_rate), wrapper(m.drop_path_rate)',
        ['test_train.py::test_teacher_starts_as_student_copy_without_gradients_or_drop_path']),
    Bug('engine/train.py',
        'cosine_schedule(o.momentum_teacher, 1.0, o.epochs, n)',
        'cosine_schedule(o.momentum_teacher, 0.999, o.epochs, n)',
        ['test_train.py::test_schedules_are_the_official_ones']),
    Bug('engine/train.py',
        'cosine_schedule(o.weight_decay, o.weight_decay_end, o.epochs, n)',
        'cosine_schedule(o.weight_decay_end, o.weight_decay, o.epochs, n)',
        ['test_train.py::test_one_step_equals_reference_math']),
    Bug('engine/train.py',
        'cancel_last_layer_gradients(self.student, epoch, o.freeze_last_layer)',
        'cancel_last_layer_gradients(self.student, epoch + 1, o.freeze_last_layer)',
        ['test_train.py::test_one_step_equals_reference_math']),
    Bug('kernels/dino_loss.py',
        'self._ema_center(summed / dist.get_world_size())',
        'self._ema_center(summed)',
        ['test_distributed.py']),
    Bug('kernels/dino_loss.py',
        'ema_update_([self.center], [buf], self.center_momentum)',
        'ema_update_([self.center], [buf], 1 - self.center_momentum)',
        ['test_dino_loss_module.py']),
    Bug('kernels/dino_loss.py',
        'q_target += tl.where((vs != i)[:, None], q_i[None, :], 0.0)',
        'q_target += tl.where((vs != i + 1)[:, None], q_i[None, :], 0.0)',
        ['test_dino_loss.py']),
    Bug('kernels/dino_loss.py',
        'n_targets = G - (vs < G).to(tl.float32)',
        'n_targets = G - (vs < 1).to(tl.float32)',
        ['test_dino_loss.py']),
    Bug('kernels/dino_loss.py',
        'x = tl.where(ok, (t - center[None, :]) * t_scale, float("-inf"))',
        'x = tl.where(ok, t * t_scale, float("-inf"))',
        ['test_dino_loss.py']),
    Bug('kernels/reference.py',
        'warm = [float(warmup_teacher_temp)]',
        'warm = [float(teacher_temp)]',
        ['test_dino_loss_module.py']),
]


def copy_of_the_tree(where: Path) -> tuple[Path, Path]:
    """(a copy of the checkout's files, a folder importing `dinofuse.*` from that copy)."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.splitlines()
    tree = where / "tree"
    for name in listed:
        if (ROOT / name).is_file():
            (tree / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, tree / name)
    imports = where / "imports"
    (imports / "dinofuse").mkdir(parents=True)
    for name in PACKAGES:  # ahead of the editable install's finder on sys.path
        (imports / "dinofuse" / name).symlink_to(tree / name)
    return tree, imports


def plant(bug: Bug, tree: Path, imports: Path) -> tuple[bool, str]:
    """(whether a test failed, pytest's last line and first failures)."""
    path = tree / bug.file
    source = path.read_text()
    if source.count(bug.right) != 1:
        raise SystemExit(f"{bug.file}: {bug.right!r} occurs {source.count(bug.right)} times, "
                         "not once: update the bug to the code")
    path.write_text(source.replace(bug.right, bug.wrong))
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(imports))
    try:
        run = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                              *(f"tests/{t}" for t in bug.tests)],
                             cwd=tree, env=env, capture_output=True, text=True)
    finally:
        path.write_text(source)
    lines = run.stdout.strip().splitlines()
    failures = [line for line in lines if line.startswith(("FAILED", "ERROR"))][:2]
    return run.returncode != 0, " ".join(lines[-1:] + failures)


def main(argv: list[str]) -> int:
    if argv == ["--list"]:
        for i, bug in enumerate(BUGS):
            print(f"{i:3d} {bug.file}: {bug.right!r} -> {bug.wrong!r}")
        return 0
    chosen = [int(a) for a in argv] or range(len(BUGS))
    passed = []
    with tempfile.TemporaryDirectory(prefix="dinofuse-bugs-") as where:
        tree, imports = copy_of_the_tree(Path(where))
        for i in chosen:
            bug, started = BUGS[i], time.perf_counter()
            caught, summary = plant(bug, tree, imports)
            verdict = "caught" if caught else "PASSED UNNOTICED"
            print(f"{i:3d} {verdict} ({time.perf_counter() - started:.0f} s) {bug.file}: "
                  f"{bug.right!r} -> {bug.wrong!r}: {summary}", flush=True)
            if not caught:
                passed.append(i)
    if passed:
        print(f"{len(passed)} bug(s) passed their tests: {passed}")
    return 1 if passed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
