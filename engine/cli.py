"""The `dinofuse` command: train, knn, linear, attention-maps, export, data check, data index.

    dinofuse train [--config NAME|FILE] [--data DIR] [--resume] [--fit-minutes M] [section.field=value ...]
    dinofuse knn --checkpoint CKPT --train DIR --val DIR [--k 10 20 100 200] [--arch A] [--which W] [--precision P] [--dump-features D]
    dinofuse knn --load-features D [--k 10 20 100 200] [--temperature T]
    dinofuse linear --checkpoint CKPT --train DIR --val DIR [--epochs 100] [--cached-features] [--output-dir D] [--precision P]
    dinofuse attention-maps --checkpoint CKPT --image FILE [--output-dir DIR] [--threshold 0.6] [--arch A]
    dinofuse export --checkpoint CKPT|STEP_DIR|RUN_DIR --out teacher.safetensors|teacher.pth
    dinofuse data check DIR|SHARDS (exit status 1 when some image cannot be decoded)
    dinofuse data index SHARDS (DALI's NAME.idx beside each WebDataset shard without one)
    dinofuse bench train [--arch vit_small --patch 16 --batch 64 --baseline --ablation ...]

Bad input ends with one line naming what is wrong (exit status 2), not a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import torch

from dinofuse.dataloading.readers import DataError
from dinofuse.engine.checkpoint import (
    CheckpointError,
    backbone_state,
    export_backbone,
    load_weights,
    model_config_for,
    run_has_checkpoint,
    timm_call,
)
from dinofuse.engine.config import (
    COUNT_ARG,
    POSITIVE_FLOAT_ARG,
    POSITIVE_INT_ARG,
    Config,
    cli_number,
    config_from_toml,
    load_config,
    toml_value,
    weights_config,
)
from dinofuse.engine.eval.knn import EVAL_PRECISIONS
from dinofuse.engine.inputs import data_worker_died
from dinofuse.engine.parallel import init_distributed, use_training_threads
from dinofuse.engine.time_budget import fit_to_minutes
from dinofuse.engine.train import (
    TrainingError,
    Trainer,
    build_backbone,
    check_fresh_start,
    make_output_dir,
    pick_device,
    read_checkpoint,
)

USER_ERRORS = (DataError, CheckpointError, TrainingError, ValueError, FileNotFoundError,
               KeyError)


def _train(args) -> None:
    overrides = list(args.overrides)
    for item in overrides:  # `--data shards/*.tar` unquoted: the shell made it many paths
        if "=" not in item and os.path.exists(item):
            raise DataError(f"{item} is a path, not a section.field=value override: --data "
                            "takes one path (a folder, a .tar, or a quoted pattern such as "
                            "'shards/*.tar' or 'shards/train-{000000..000146}.tar')")
    if args.data:
        overrides.append(f"data.path={toml_value(args.data)}")
    if args.output_dir:
        overrides.append(f"run.output_dir={toml_value(args.output_dir)}")
    cfg = load_config(args.config, overrides)
    # joins torchrun's process group when WORLD_SIZE > 1 (impl.fsdp="always": a group of one
    # process without torchrun)
    rank, world = init_distributed(timeout_s=cfg.run.collective_timeout_s,
                                   force=cfg.impl.fsdp == "always")
    resume = "auto" if args.auto_resume else args.resume
    make_output_dir(Path(cfg.run.output_dir))  # these, before a --fit-minutes trial
    if not resume:
        check_fresh_start(Path(cfg.run.output_dir))
    if args.fit_minutes is not None:
        cfg = _fit_to_minutes(cfg, args.fit_minutes, resume, rank)
    trainer = Trainer(cfg, resume=resume)
    use_training_threads(trainer)  # on a CPU each data worker gets a core of its own
    try:
        logs = trainer.fit(max_steps=args.max_steps, progress=not args.quiet)
    except TrainingError:
        raise
    except RuntimeError as e:  # a data worker died, or (several processes) a collective failed
        died = data_worker_died(e, trainer.out)  # announced in the middle of a step
        if died is not None:
            raise died from None
        if world == 1:
            raise
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise TrainingError(
            f"rank {rank}: a collective operation failed, so another rank died or hung "
            f"(collective timeout {cfg.run.collective_timeout_s:g} s): {first}. Relaunch the "
            f"same command with --resume (or --auto-resume) to continue from the last complete "
            f"checkpoint in {trainer.out}") from None
    if logs and rank == 0:
        print(f"trained {len(logs)} steps to step {trainer.step}; loss {logs[0].loss:.4f} -> "
              f"{logs[-1].loss:.4f}; checkpoint {trainer.last_save()}")
    elif rank == 0 and trainer.step >= trainer.total_steps:  # a resume of a finished run
        print(f"nothing to train: {trainer.last_save()} is at step {trainer.step}, the end of "
              f"its {cfg.optim.epochs} epochs (raise optim.epochs to train on)")
    if cfg.run.knn_after_training:
        _report_after_training(cfg, trainer, rank, world, progress=not args.quiet)


def _report_after_training(cfg: Config, trainer: Trainer, rank: int, world: int,
                           progress: bool) -> None:
    """The k-NN report of the trained teacher, a random network and raw pixels; skipped with
    the reason (the training is done and saved) when there is nothing to compare."""
    from dinofuse.engine.eval.report import format_report, knn_datasets, knn_report

    try:  # those of run.knn_every_epochs, opened at the start, else opened now
        datasets = trainer.knn_sets or knn_datasets(cfg)
    except DataError as e:
        datasets, reason = None, str(e)
    else:
        reason = "no query images (set run.knn_val=DIR)"
    if datasets is None:  # before the teacher is gathered: nothing to evaluate it on
        if rank == 0:
            print(f"k-NN skipped: {reason}")
        return
    # under torchrun every rank extracts a share of the features, with its own copy of the
    # (otherwise sharded) teacher
    report = knn_report(cfg, trainer.eval_backbone(), random_backbone(cfg, trainer.device),
                        trainer.device, distributed=world > 1, datasets=datasets,
                        progress=progress)
    if rank == 0:
        (trainer.out / "knn.json").write_text(json.dumps(report, indent=1) + "\n")
        print(format_report(report, cfg.run.knn_k, cfg.run.knn_temperature))


def random_backbone(cfg: Config, device) -> torch.nn.Module:
    """The k-NN report's random-initialization row: the same network on every run of a
    config (seeded, apart from the training's own seed)."""
    torch.manual_seed(cfg.run.seed + 1)
    return build_backbone(cfg, 0.0).to(device)


def _fit_to_minutes(cfg, minutes: float, resume, rank: int):
    """cfg fitted to `minutes`; a resumed fitted run keeps the epochs it was fitted to (a
    second fit would change its schedules midway): those of the config.toml beside it."""
    out = Path(cfg.run.output_dir)
    if resume and run_has_checkpoint(out):
        fitted = config_from_toml((out / "config.toml").read_text()).optim
        if rank == 0:
            print(f"--fit-minutes: resuming, with the {fitted.epochs} epochs fitted at the "
                  f"start ({out / 'config.toml'})", flush=True)
        return dataclasses.replace(cfg, optim=fitted)
    cfg, fit = fit_to_minutes(cfg, minutes)
    if rank == 0:
        print(fit.describe(minutes), flush=True)
    return cfg


def _load_backbone(checkpoint: str, device, arch: str | None = None, which: str = "teacher"):
    """The teacher's (or student's) backbone. Our checkpoints rebuild their own model; other
    weights (official DINO checkpoints, released backbones) get the ViT their shapes describe
    (`model_config_for`), evaluated at the official 224-pixel crop."""
    contents = read_checkpoint(checkpoint, which)
    weights = backbone_state(contents, which, checkpoint)
    if "config" in contents:
        cfg = config_from_toml(contents["config"])
    else:
        cfg = Config(model=model_config_for(weights, contents, arch))
    backbone = build_backbone(cfg, 0.0)
    load_weights(backbone, weights, checkpoint)
    return backbone.to(device).eval(), cfg


def _knn_features(args) -> dict[str, torch.Tensor] | None:
    """The memory's and the queries' features and labels (None on ranks other than 0):
    extracted (under torchrun each process a share), or read from --load-features."""
    from dinofuse.dataloading.readers import open_images
    from dinofuse.engine.eval.knn import (
        comparable_labels,
        dump_features,
        extract_features,
        load_features,
    )
    from dinofuse.engine.eval.report import eval_transform

    sources = ("checkpoint", "train", "val")
    given = [name for name in sources if getattr(args, name)]
    if args.load_features:
        if given or args.dump_features:
            raise ValueError(f"--load-features replaces --checkpoint, --train and --val; got "
                             f"{', '.join('--' + n for n in given or ['dump_features'])}")
        if init_distributed()[0] != 0:
            return None
        device = pick_device(args.device, "--device")  # the vote there, as after extracting
        _knn_protocol(args, Config().run)
        return {k: v.to(device) for k, v in load_features(args.load_features).items()}
    missing = [f"--{name}" for name in sources if name not in given]
    if missing:
        raise ValueError(f"{', '.join(missing)} required (or --load-features DIR)")
    if args.dump_features:  # now, not after the extraction
        make_output_dir(Path(args.dump_features), "--dump-features")
    rank, _ = init_distributed()  # under torchrun: each process extracts a share
    device = pick_device(args.device, "--device")
    sets = {split: open_images(folder, split)
            for split, folder in (("train", args.train), ("test", args.val))}
    comparable_labels(sets["train"], sets["test"], f"--train {args.train} and --val {args.val}")
    backbone, cfg = _load_backbone(args.checkpoint, device, args.arch, args.which)
    crop = args.crop or cfg.data.global_crop_size
    _knn_protocol(args, cfg.run)
    if rank == 0:
        print(f"k-NN of {args.checkpoint} ({args.which}): {args.features} features of "
              f"{crop}-px center crops (short side resized to {round(crop * args.resize_ratio)}), "
              f"T={args.temperature:g}", flush=True)
    transform = eval_transform(crop, args.resize_ratio)
    options = dict(batch_size=args.batch_size, mode=args.features, num_workers=args.workers,
                   distributed=True, precision=args.precision)
    features = {}
    for (split, images), option in zip(sets.items(), ("--train", "--val")):
        features[f"{split}_features"], features[f"{split}_labels"] = extract_features(
            backbone, images, transform, device, progress=f"features of {option}", **options)
    if rank != 0:  # the vote needs no second copy
        return None
    if args.dump_features:
        dump_features(args.dump_features, features)
        print(f"wrote the features and labels to {args.dump_features}")
    return features


def _knn_protocol(args, run) -> None:
    """Fills the features, resize ratio and temperature not given on the command line from
    the run's config, so `dinofuse knn` repeats the report after training (official
    checkpoints get the official protocol: Config's defaults)."""
    for arg, field in (("features", "knn_features"), ("resize_ratio", "knn_resize_ratio"),
                       ("temperature", "knn_temperature")):
        if getattr(args, arg) is None:
            setattr(args, arg, getattr(run, field))


def _knn(args) -> None:
    from dinofuse.engine.eval.knn import knn_classify

    features = _knn_features(args)
    if features is None:
        return
    for k in args.k:
        acc = knn_classify(features["train_features"], features["train_labels"],
                           features["test_features"], features["test_labels"], k=k,
                           temperature=args.temperature)
        print(f"{k}-NN: top-1 {acc['top1']:.2f}%, top-5 {acc['top5']:.2f}%")


def _linear_settings(args, backbone, cfg):
    from dinofuse.engine.eval.linear import LinearEvalConfig, official_defaults

    features = official_defaults(backbone.embed_dim, len(backbone.blocks))
    if args.n_last_blocks:
        features["n_last_blocks"] = args.n_last_blocks
    if args.avgpool is not None:
        features["avgpool"] = args.avgpool
    return LinearEvalConfig(
        epochs=args.epochs, lrs=args.lr, batch_size=args.batch_size, val_freq=args.val_freq,
        crop=args.crop or cfg.data.global_crop_size, resize_ratio=args.resize_ratio,
        cached_features=args.cached_features, workers=args.workers, seed=args.seed,
        precision=args.precision, **features)


def _linear(args) -> None:
    from dinofuse.dataloading.readers import open_images
    from dinofuse.engine.eval.linear import LinearEval, describe_accuracy, load_linear_weights

    saved = Path(args.output_dir or ".") / "linear.pth"
    if args.resume and not args.output_dir:
        raise ValueError("--resume needs the --output-dir that holds linear.pth")
    if args.output_dir and saved.is_file() and not (args.resume or args.evaluate):
        raise ValueError(f"{saved} exists: pass --resume to continue it, or another --output-dir")
    if args.output_dir:  # now, not after the training
        make_output_dir(Path(args.output_dir), "--output-dir")
    rank, _ = init_distributed()  # under torchrun: each process a share of every batch
    device = pick_device(args.device, "--device")
    backbone, cfg = _load_backbone(args.checkpoint, device, args.arch, args.which)
    if args.random_init:  # the baseline row: the same network, untrained
        backbone = random_backbone(cfg, device).eval()
    settings = _linear_settings(args, backbone, cfg)

    def say(line: str) -> None:
        if rank == 0:
            print(line, flush=True)

    say(f"linear evaluation: CLS of the last {settings.n_last_blocks} block(s)"
        f"{' + mean patch token' if settings.avgpool else ''}, {settings.epochs} epochs, "
        f"{'cached features' if settings.cached_features else 'augmented crops'}")
    run = LinearEval(backbone, open_images(args.train, "train"), open_images(args.val, "test"),
                     settings, device, output_dir=args.output_dir, progress=True)
    if args.evaluate:
        load_linear_weights(run.classifier, args.evaluate)
        say(f"linear ({args.evaluate}): {describe_accuracy(run.evaluate(run.classifier))}")
        return
    if args.resume and run.resume():
        say(f"resumed at epoch {run.epoch} from {run.out / 'linear.pth'}")
    summary = run.run(log=say)
    if run.out is not None and rank == 0:
        (run.out / "linear.json").write_text(json.dumps(summary, indent=1) + "\n")
    last = summary["last"]
    grid = f" at --lr {last['picked_lr']:g}" if len(settings.lrs) > 1 else ""
    say(f"linear: top-1 {last['top1']:.2f}%{grid} after {summary['epochs']} epochs; best "
        f"{summary['best_top1']:.2f}% (the official script's figure: the best validation)")


def _attention_maps(args) -> None:
    from dinofuse.dataloading.readers import decode_rgb
    from dinofuse.engine.eval.attention_maps import cls_attention, save_attention_maps

    path = Path(args.image)
    if not path.is_file():
        raise DataError(f"image not found: {path}")
    make_output_dir(Path(args.out), "--output-dir")
    backbone, cfg = _load_backbone(args.checkpoint, pick_device(args.device, "--device"),
                                   args.arch, args.which)
    image = decode_rgb(path, path)
    img, attn, masks = cls_attention(backbone, image, args.size or cfg.data.global_crop_size,
                                     args.threshold)
    written = save_attention_maps(img, attn, masks, args.out)
    print(f"wrote {len(written)} files to {args.out}")


def _export(args) -> None:
    contents = read_checkpoint(args.checkpoint, args.which)
    state = backbone_state(contents, args.which, args.checkpoint)
    config = contents.get("config")
    out = export_backbone(state, args.out, weights_config(config) if isinstance(config, str) else None)
    print(f"wrote {out} ({len(state)} tensors)")
    try:  # how to load it: the ViT of our config, or the one official weights describe
        model = (config_from_toml(contents["config"]).model if "config" in contents
                 else model_config_for(state, contents))
    except CheckpointError as e:
        print(f"(no timm call: {e})")
    else:
        print(f"in timm: {timm_call(model, out)}")


def _data_check(args) -> int:
    from dinofuse.dataloading.check import check_images, class_order_note
    from dinofuse.dataloading.readers import WebDatasetShards, webdataset_shards

    tars = webdataset_shards(args.dir)
    shards = WebDatasetShards(tars) if tars else None  # listed once for both
    good, bad = check_images(args.dir, shards=shards)
    for path, reason in bad:
        print(f"{path}: {reason}")
    print(f"{good} images readable, {len(bad)} unreadable in {args.dir}")
    note = class_order_note(shards) if shards is not None else None
    if note:
        print(note)
    return 1 if bad else 0


def _data_index(args) -> None:
    from dinofuse.dataloading.readers import webdataset_shards, write_dali_indexes

    tars = webdataset_shards(args.dir)
    if not tars:
        raise DataError(f"no WebDataset shards in {args.dir} (a .tar, a folder holding "
                        ".tar files and no folders, or a pattern: 'train-{000..099}.tar')")
    written, fresh = write_dali_indexes(tars, args.threads)
    print(f"wrote {written} index(es) beside the shards in {args.dir}; {fresh} already fresh")


def _bench_train(args) -> None:
    from dinofuse.bench.train import main as bench_train

    bench_train(args.bench_args)


CHECKPOINT_MODELS = ("teacher", "student")  # --which
MASS_FRACTION = cli_number(float, (lambda v: 0 < v <= 1, "in (0, 1]"))

PRECISION_HELP = ("the backbone's forward: fp32 (the official evaluation's) or bf16/fp16 "
                  "autocast (faster on a GPU; features slightly different)")
ARCH_HELP = ("for weights without a dinofuse config: the architecture (default: the official "
             "checkpoint's args.arch, else the one as wide as the weights)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dinofuse", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train DINO (default: a small run on Fashion-MNIST)")
    train.add_argument("--config", default="default", help="preset name or .toml path")
    train.add_argument("--data", help="image folder (ImageFolder layout or flat), WebDataset "
                       "shards (a .tar, a folder of them, or a quoted pattern such as "
                       "'train-{000000..001281}.tar'), fashion-mnist, or a folder of "
                       "Fashion-MNIST's IDX files")
    train.add_argument("--output-dir")
    train.add_argument("--resume", action="store_true",
                       help="continue from the newest complete checkpoint in OUTPUT_DIR")
    train.add_argument("--auto-resume", action="store_true",
                       help="resume when OUTPUT_DIR has a checkpoint, else start (torchrun restarts)")
    train.add_argument("--max-steps", type=COUNT_ARG, default=0, help="stop after this many steps")
    train.add_argument("--fit-minutes", type=float, metavar="M",
                       help="as many epochs as fit in M minutes here (timed by a short trial; "
                       "at most optim.epochs), with the whole schedules scaled to them")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.add_argument("overrides", nargs="*", help="section.field=value")
    train.set_defaults(fn=_train)

    knn = sub.add_parser("knn", help="weighted k-NN of a checkpoint's teacher")
    knn.add_argument("--checkpoint")
    knn.add_argument("--train", help="memory images (folder or fashion-mnist)")
    knn.add_argument("--val", help="query images (folder or fashion-mnist)")
    knn.add_argument("--dump-features", metavar="DIR", help="also save the features and labels "
                     "(the official eval_knn's trainfeat.pth, testfeat.pth, ...)")
    knn.add_argument("--load-features", metavar="DIR", help="vote on saved features (ours or "
                     "the official dump) instead of --checkpoint, --train and --val")
    knn.add_argument("--k", type=POSITIVE_INT_ARG, nargs="+", default=[10, 20, 100, 200])
    # these three default to the checkpoint's run.knn_* (official checkpoints: the official
    # cls, 256/224, 0.07), so the command repeats the report printed after training
    knn.add_argument("--temperature", type=POSITIVE_FLOAT_ARG,
                     help="default: the run's run.knn_temperature (official: 0.07)")
    knn.add_argument("--features", choices=["cls", "cls+avgpool"],
                     help="default: the run's run.knn_features (official: cls)")
    knn.add_argument("--crop", type=COUNT_ARG, default=0, help="default: the global crop size")
    knn.add_argument("--resize-ratio", type=POSITIVE_FLOAT_ARG,
                     help="default: the run's run.knn_resize_ratio (official: 256/224)")
    knn.add_argument("--batch-size", type=POSITIVE_INT_ARG, default=256)
    knn.add_argument("--workers", type=COUNT_ARG, default=min(8, os.cpu_count() or 1),
                     help="processes decoding and resizing images beside the forward passes")
    knn.add_argument("--precision", default="fp32", choices=EVAL_PRECISIONS,
                     help=PRECISION_HELP)
    knn.add_argument("--device", default="auto")
    knn.add_argument("--arch", help=ARCH_HELP)
    knn.add_argument("--which", default="teacher", choices=CHECKPOINT_MODELS,
                     help="the checkpoint's model to evaluate (official eval_knn's --checkpoint_key)")
    knn.set_defaults(fn=_knn)

    linear = sub.add_parser("linear", help="linear classifier on a checkpoint's frozen features "
                            "(official eval_linear)")
    linear.add_argument("--checkpoint", required=True)
    linear.add_argument("--train", required=True, help="labelled training images (class "
                        "folders or fashion-mnist)")
    linear.add_argument("--val", required=True, help="labelled validation images, same classes")
    linear.add_argument("--epochs", type=POSITIVE_INT_ARG, default=100)
    linear.add_argument("--lr", type=POSITIVE_FLOAT_ARG, nargs="+", default=[0.001],
                        help="for a batch of 256, scaled linearly with --batch-size; several "
                        "train side by side on the same features, the best one reported")
    linear.add_argument("--batch-size", type=POSITIVE_INT_ARG, default=128)
    linear.add_argument("--n-last-blocks", type=POSITIVE_INT_ARG, default=0,
                        help="CLS tokens of this many last blocks (default: 4 below ViT-B's "
                        "width, else 1)")
    linear.add_argument("--avgpool", action=argparse.BooleanOptionalAction, default=None,
                        help="add the last block's mean patch token (default: from ViT-B's width)")
    linear.add_argument("--val-freq", type=POSITIVE_INT_ARG, default=1)
    linear.add_argument("--cached-features", action="store_true",
                        help="train on features of the evaluation crops computed once (no "
                        "augmentation; not the official protocol, much faster)")
    linear.add_argument("--crop", type=COUNT_ARG, default=0, help="default: the global crop size")
    linear.add_argument("--resize-ratio", type=POSITIVE_FLOAT_ARG, default=256 / 224)
    linear.add_argument("--workers", type=COUNT_ARG, default=min(8, os.cpu_count() or 1))
    linear.add_argument("--seed", type=int, default=0)
    linear.add_argument("--output-dir", help="per-epoch checkpoint linear.pth, linear_log.jsonl, "
                        "linear.json")
    linear.add_argument("--resume", action="store_true", help="continue from OUTPUT_DIR/linear.pth")
    linear.add_argument("--evaluate", metavar="WEIGHTS",
                        help="only validate these linear weights (official or ours)")
    linear.add_argument("--random-init", action="store_true",
                        help="the checkpoint's network at random initialization (a baseline)")
    linear.add_argument("--precision", default="fp32", choices=EVAL_PRECISIONS,
                        help=PRECISION_HELP)
    linear.add_argument("--device", default="auto")
    linear.add_argument("--arch", help=ARCH_HELP)
    linear.add_argument("--which", default="teacher", choices=CHECKPOINT_MODELS)
    linear.set_defaults(fn=_linear)

    maps = sub.add_parser("attention-maps", help="CLS self-attention of each head, as PNGs")
    maps.add_argument("--checkpoint", required=True)
    maps.add_argument("--image", required=True)
    maps.add_argument("--out", "--output-dir", dest="out", default="attention-maps",
                      help="the folder for the PNGs (default: ./attention-maps)")
    maps.add_argument("--size", type=COUNT_ARG, default=0, help="resize the short side (default: global crop)")
    maps.add_argument("--threshold", type=MASS_FRACTION, default=None, help="keep this fraction of the mass")
    maps.add_argument("--device", default="auto")
    maps.add_argument("--arch", help=ARCH_HELP)
    maps.add_argument("--which", default="teacher", choices=CHECKPOINT_MODELS)
    maps.set_defaults(fn=_attention_maps)

    data = sub.add_parser("data", help="dataset tools")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    check = data_sub.add_parser("check", help="decode every image; list the unreadable ones")
    check.add_argument("dir", help="an image folder, or WebDataset shards (a .tar or a folder of them)")
    check.set_defaults(fn=_data_check)
    index = data_sub.add_parser("index", help="write DALI's index beside each WebDataset shard")
    index.add_argument("dir", help="WebDataset shards: a .tar or a folder of them")
    index.add_argument("--threads", type=POSITIVE_INT_ARG, default=os.cpu_count() or 1)
    index.set_defaults(fn=_data_index)

    export = sub.add_parser("export", help="the teacher backbone as timm-loadable weights")
    export.add_argument("--checkpoint", required=True,
                        help="checkpoint.pth, a sharded checkpoints/step_N folder, or a run folder")
    export.add_argument("--out", required=True, help="*.safetensors or *.pth")
    export.add_argument("--which", default="teacher", choices=CHECKPOINT_MODELS)
    export.set_defaults(fn=_export)

    bench = sub.add_parser("bench", help="benchmarks (bench/)")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    bench_train = bench_sub.add_parser(
        "train", add_help=False, help="training throughput, MFU, memory, telemetry; "
        "baseline and ablation (dinofuse bench train --help)")
    bench_train.add_argument("bench_args", nargs=argparse.REMAINDER)
    bench_train.set_defaults(fn=_bench_train)
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """The parsed command line, where train's section.field=value overrides may also come
    after its options (`--max-steps 2 run.seed=1`): argparse collects a positional list
    only once, and would call a second run of them unrecognized."""
    args, extra = parser.parse_known_args(argv)
    if getattr(args, "command", None) == "train":
        args.overrides += [a for a in extra if not a.startswith("-")]
        extra = [a for a in extra if a.startswith("-")]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def tell_torchrun(line: str) -> None:
    """Under torchrun, also write the line where torchrun looks for a process's error (the
    file its TORCHELASTIC_ERROR_FILE names): its closing summary then names the cause
    instead of "error_file: <N/A>" and a link, below every rank's traceback-free line."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        try:
            Path(path).write_text(json.dumps({"message": line, "timestamp": int(time.time())}))
        except OSError:  # the line is on stderr already
            pass


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:2] == ["bench", "train"]:  # its own parser takes every option that follows
        command, args = "bench train", argparse.Namespace(fn=_bench_train, bench_args=argv[2:])
    else:
        args = parse_args(build_parser(), argv)
        command = args.command
    finished = False
    try:
        code = args.fn(args) or 0
        finished = True
        return code
    except USER_ERRORS as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        line = f"dinofuse {command}: error: {message}"
        print(line, file=sys.stderr)
        tell_torchrun(line)
        return 2
    except KeyboardInterrupt:  # a second Ctrl-C in training, or one in any other command
        print(f"\ndinofuse {command}: interrupted (Ctrl-C); what was saved before is kept",
              file=sys.stderr)
        return 130  # the shell's code for a stop by SIGINT
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            if finished:  # every rank is here: gloo's teardown was seen to abort a rank
                dist.barrier()  # ("terminate called without an active exception") that left first
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
