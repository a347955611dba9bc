"""Run configuration: dataclasses, TOML presets (engine/configs/), dotted overrides.

    cfg = load_config("default", ["optim.lr=0.001", "model.arch=vit_tiny"])

Every field can be overridden as `section.field=value` (values parsed as TOML, falling back
to a plain string). `save_config` writes the resolved config next to a run.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

PRESETS = Path(__file__).parent / "configs"


@dataclass
class ModelConfig:
    arch: str = "vit_small"
    patch_size: int = 16
    img_size: int = 224  # the size the position embedding is stored at (the global crop)
    in_chans: int = 3
    embed_dim: int = 0  # 0: the architecture's own; set with depth/num_heads for small models
    depth: int = 0
    num_heads: int = 0
    drop_path_rate: float = 0.1
    attention: str = "auto"  # auto | xformers | sdpa | naive
    packed: bool = False  # all crops in one sequence (DINOv2) instead of one pass per size
    out_dim: int = 65536
    head_hidden_dim: int = 2048
    head_bottleneck_dim: int = 256
    head_nlayers: int = 3
    use_bn_in_head: bool = False
    norm_last_layer: bool = True


@dataclass
class DataConfig:
    path: str = "fashion-mnist"  # "fashion-mnist" (Debian's IDX files), an image folder,
    # WebDataset .tar shards, or "synthetic" (random crops made on the device once: timing)
    backend: str = "auto"  # auto: dali for image folders and shards when installed, else
    # torchvision (PIL, the official code); Fashion-MNIST's IDX files: tensor (batched crops
    # on the training device) | torchvision | dali | tensor
    skip_bad_images: bool = False  # report undecodable files and go on (else: stop, naming them)
    screen_images: bool = True  # DALI: read each image's header with PIL before DALI reads the
    # file (~35 us per image, each rank its share, at start): DALI 2.4 was seen to crash the
    # process (segfault) on some malformed files after reporting them; these are found first
    global_crop_size: int = 224
    local_crop_size: int = 96
    global_crops_scale: tuple[float, float] = (0.4, 1.0)
    local_crops_scale: tuple[float, float] = (0.05, 0.4)
    local_crops_number: int = 8
    blur_radius: tuple[float, float] = (0.1, 2.0)  # PIL Gaussian blur, in pixels of the crop
    dali_color: str = "torchvision"  # DALI's color jitter: torchvision (the official contrast
    # and hue, a random order per image) | dali (color_twist's own: contrast towards 128, hue
    # in YIQ, one fixed order; faster on a CPU)
    num_workers: int = 2
    shuffle_buffer: int = 1024  # DALI on WebDataset shards: after the shards' order is shuffled
    # (each epoch), samples are drawn at random from the next this many (encoded, in host
    # memory); raise it for shards written class by class
    jpeg_fancy_upsampling: bool = True  # DALI on a GPU: nvJPEG interpolates a JPEG's chroma
    # as libjpeg-turbo does (PIL: the official loader; DALI's CPU decoder); false: nvJPEG's own


@dataclass
class OptimConfig:
    batch_size_per_device: int = 64
    epochs: int = 100
    lr: float = 0.0005  # at batch 256; scaled linearly with the total batch
    min_lr: float = 1e-6
    warmup_epochs: float = 10.0
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    momentum_teacher: float = 0.996
    clip_grad: float = 3.0  # 0 disables
    clip_mode: str = "per_param"  # per_param (official) | global
    freeze_last_layer: int = 1
    warmup_teacher_temp: float = 0.04
    teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: int = 0
    student_temp: float = 0.1
    center_momentum: float = 0.9
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp16 | fp32


@dataclass
class ImplConfig:
    """How each part of the step runs. The math is the same either way; "official" runs the
    official code's way (the benchmark's baseline and ablations, bench/train.py)."""

    loss: str = "fused"  # fused (one Triton op) | official (a Python loop over crop pairs)
    ema: str = "fused"  # fused (one launch) | official (a per-parameter loop)
    clip: str = "fused"  # fused (norms on the device) | official (per parameter, host syncs)
    optimizer: str = "auto"  # AdamW: auto (fused on CUDA, torch's default on CPU) | fused
    # (one kernel) | foreach | official (a per-parameter loop, the official code's)
    compile_blocks: bool = False  # torch.compile each transformer block
    checkpoint_blocks: int = 0  # activation checkpointing: the first N blocks keep only their
    # input and recompute the rest in backward (memory for compute); -1 (or true) = every block
    fsdp: str = "auto"  # auto (FSDP2 when world > 1) | always (also on one process)
    fsdp_unit_blocks: int = 1  # FSDP2: consecutive transformer blocks per unit (one
    # all-gather and one reduce-scatter for them: fewer collectives and hooks on the host,
    # more weights gathered at once); 0 = every block in the root's unit
    reshard_after_forward: bool = True  # FSDP2, student: free blocks' and head's gathered
    reshard_root_after_forward: bool = False  # weights after forward; the same for the root
    # (embeddings, final norm). The teacher always reshards (the EMA updates its shards).
    reduce_dtype: str = "fp32"  # FSDP2 gradient reduction under bf16: fp32 | bf16
    patch_embedding: str = "matmul"  # matmul (one GEMM over the flattened patches) | conv
    # (the official stride-p convolution; same weights and math)
    residual_dtype: str = "fp32"  # under bf16/fp16 autocast, the residual stream and the
    # LayerNorms: fp32 (the official code's, autocast's LayerNorm) | autocast (its dtype,
    # half the bytes; the kernel's statistics stay fp32)
    layer_norm: str = "auto"  # the ViT's LayerNorms: auto (dinofuse.kernels.layer_norm on
    # CUDA, one pass each way, bf16 written straight for the next matmul; torch's where
    # torch.compile generates its own) | fused (ours wherever Triton runs) | torch
    bias_gelu: str = "auto"  # the MLP's fc1 bias and GELU: auto (dinofuse.kernels.bias_gelu
    # on CUDA: the bias gradient summed in GELU's backward pass; torch's under torch.compile)
    # | fused | torch
    cuda_graph: str = "auto"  # capture the whole step in one CUDA graph and replay it
    # (engine/graph_step.py): auto (on a GPU when the run allows it: one process, bf16/fp32,
    # the fused loss, clipping and loss check) | on (the same step eagerly on a CPU; refuses
    # what a graph cannot replay, by name) | off. true/false: on/off (an earlier switch)
    loss_check: str = "deferred"  # the non-finite loss check: deferred (each step's loss is
    # read during the next step or before a save: no host sync) | official (read right after
    # the forward, as the official code does: the host waits for the GPU every step)


@dataclass
class RunConfig:
    output_dir: str = "runs/default"
    seed: int = 0
    # a fresh run's starting weights (an official DINO checkpoint or backbone, a timm export,
    # or ours, as `dinofuse knn --checkpoint` reads them): its teacher's backbone, and head
    # when of this shape, in both networks
    init_from: str = ""
    device: str = "auto"
    cpu_threads: int = 0  # training threads on a CPU; 0 = the cores less one per data worker
    max_minutes: float = 0.0  # stop (and checkpoint) after this wall time; 0 = no limit
    save_every_steps: int = 0  # 0 = at the end of each epoch only
    checkpoint_format: str = "auto"  # auto (sharded when the models are) | sharded | file
    async_checkpoint: bool = True  # sharded: write in the background (DCP async_save)
    keep_checkpoints: int = 2  # sharded: complete checkpoints kept (older ones deleted)
    saveckp_freq: int = 20  # the official --saveckp_freq: also keep the checkpoint of epochs
    # 0, N, 2N, ... (counted from 0, as checkpoint{epoch:04}.pth; sharded: never pruned); 0 = none
    collective_timeout_s: float = 600.0  # a dead or stuck rank ends the job after this
    log_every_steps: int = 10
    knn_after_training: bool = True
    knn_every_epochs: int = 0  # also the teacher's k-NN every this many epochs while training
    # (OUTPUT_DIR/knn_log.jsonl, TensorBoard); 0 = only after training
    knn_k: int = 20
    knn_temperature: float = 0.07
    knn_features: str = "cls"  # cls (official) | cls+avgpool
    knn_val: str = ""  # query images; "" = Fashion-MNIST's test split when training on it
    knn_resize_ratio: float = 256 / 224  # eval: resize to crop x ratio, then center crop


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    impl: ImplConfig = field(default_factory=ImplConfig)
    run: RunConfig = field(default_factory=RunConfig)


def _parse_value(text: str):
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


# Fields that were switches once: configs saved by then (and true/false) still load.
_FORMER_SWITCHES = {("impl", "checkpoint_blocks"): {True: -1, False: 0},
                    ("impl", "cuda_graph"): {True: "on", False: "off"}}


# The values a numeric field may take, as (test, what the error says it must be): caught where
# the value is set, naming the field, instead of as a division by zero or a silent empty run.
AT_LEAST_1 = (lambda v: v >= 1, ">= 1")
NON_NEGATIVE = (lambda v: v >= 0, ">= 0")
POSITIVE = (lambda v: v > 0, "> 0")
FRACTION = (lambda v: 0 <= v <= 1, "in [0, 1]")
CROP_SCALE = (lambda v: 0 < v[0] <= v[1] <= 1, "[low, high] with 0 < low <= high <= 1")
RADIUS_RANGE = (lambda v: 0 <= v[0] <= v[1], "[low, high] with 0 <= low <= high")


def one_of(*choices: str) -> tuple:
    """A rule for a text field with fixed choices (a typo would otherwise fall to a default
    branch and train silently with something else)."""
    return (lambda v: v in choices, "one of " + ", ".join(choices))


_RULES = {
    "model": dict(patch_size=AT_LEAST_1, img_size=AT_LEAST_1, in_chans=AT_LEAST_1,
                  embed_dim=NON_NEGATIVE, depth=NON_NEGATIVE, num_heads=NON_NEGATIVE,
                  drop_path_rate=(lambda v: 0 <= v < 1, "in [0, 1)"), out_dim=AT_LEAST_1,
                  head_hidden_dim=AT_LEAST_1, head_bottleneck_dim=AT_LEAST_1,
                  head_nlayers=AT_LEAST_1),
    "data": dict(global_crop_size=AT_LEAST_1, local_crop_size=AT_LEAST_1,
                 global_crops_scale=CROP_SCALE, local_crops_scale=CROP_SCALE,
                 local_crops_number=NON_NEGATIVE, blur_radius=RADIUS_RANGE,
                 num_workers=NON_NEGATIVE, shuffle_buffer=AT_LEAST_1),
    "optim": dict(batch_size_per_device=AT_LEAST_1, epochs=AT_LEAST_1, lr=NON_NEGATIVE,
                  min_lr=NON_NEGATIVE, warmup_epochs=NON_NEGATIVE, weight_decay=NON_NEGATIVE,
                  weight_decay_end=NON_NEGATIVE, momentum_teacher=FRACTION,
                  clip_grad=NON_NEGATIVE, freeze_last_layer=NON_NEGATIVE,
                  warmup_teacher_temp=POSITIVE, teacher_temp=POSITIVE,
                  warmup_teacher_temp_epochs=NON_NEGATIVE, student_temp=POSITIVE,
                  center_momentum=FRACTION, precision=one_of("auto", "bf16", "fp16", "fp32"),
                  clip_mode=one_of("per_param", "global")),
    "impl": dict(checkpoint_blocks=(lambda v: v >= -1,
                                    "a block count >= 0, or -1 for every block"),
                 cuda_graph=one_of("auto", "on", "off"), fsdp_unit_blocks=NON_NEGATIVE),
    "run": dict(cpu_threads=NON_NEGATIVE, max_minutes=NON_NEGATIVE,
                save_every_steps=NON_NEGATIVE, keep_checkpoints=AT_LEAST_1,
                saveckp_freq=NON_NEGATIVE,
                collective_timeout_s=POSITIVE, log_every_steps=AT_LEAST_1, knn_k=AT_LEAST_1,
                knn_every_epochs=NON_NEGATIVE, knn_features=one_of("cls", "cls+avgpool"),
                checkpoint_format=one_of("auto", "sharded", "file"),
                knn_temperature=POSITIVE, knn_resize_ratio=POSITIVE),
}


def cli_number(kind: type, rule: tuple):
    """An argparse type for a command-line number held to one of the range rules above."""
    test, what = rule

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {kind.__name__}; got {text!r}") from None
        if not test(value):
            raise argparse.ArgumentTypeError(f"must be {what}; got {text}")
        return value

    return parse


# the command lines' numbers (dinofuse, dinofuse bench train), under the same rules
COUNT_ARG = cli_number(int, NON_NEGATIVE)
POSITIVE_INT_ARG = cli_number(int, AT_LEAST_1)
POSITIVE_FLOAT_ARG = cli_number(float, POSITIVE)
NON_NEGATIVE_FLOAT_ARG = cli_number(float, NON_NEGATIVE)


def _coerce(section: str, name: str, value, current):
    if isinstance(value, bool) and (section, name) in _FORMER_SWITCHES:
        value = _FORMER_SWITCHES[section, name][value]
    if isinstance(current, tuple):
        if not isinstance(value, (list, tuple)) or len(value) != len(current) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            raise ValueError(f"{section}.{name} must be {len(current)} numbers; got {value!r}")
        value = tuple(float(v) for v in value)
    elif isinstance(current, bool) and not isinstance(value, bool):
        raise ValueError(f"{section}.{name} must be true or false; got {value!r}")
    elif isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    elif type(value) is not type(current):
        raise ValueError(f"{section}.{name} must be {type(current).__name__}; got {value!r}")
    _check_range(section, name, value)
    return value


def _check_range(section: str, name: str, value) -> None:
    test, what = _RULES.get(section, {}).get(name, (None, ""))
    if test is not None and not test(value):
        raise ValueError(f"{section}.{name} must be {what}; got {value!r}")


def check_ranges(cfg: Config) -> None:
    """The range rules over a whole config, for one built in Python (fields set directly, not
    through `apply_overrides`), and the warmups within the run."""
    for section, rules in _RULES.items():
        for name in rules:
            _check_range(section, name, getattr(getattr(cfg, section), name))
    o = cfg.optim
    for name in ("warmup_epochs", "warmup_teacher_temp_epochs"):
        # the official schedules fail on these (a negative length); run as they are, the LR or
        # the teacher temperature would stop short of its value (a preset's 10-epoch warmup
        # left in a 5-epoch try)
        if getattr(o, name) > o.epochs:
            raise ValueError(f"optim.{name}={getattr(o, name):g} is longer than the run "
                             f"(optim.epochs={o.epochs}); set it to at most {o.epochs}")


def apply_overrides(cfg: Config, values: dict) -> Config:
    """Set fields from a nested dict {section: {field: value}}; unknown names are errors."""
    for section, fields in values.items():
        if not hasattr(cfg, section) or not isinstance(fields, dict):
            raise ValueError(f"unknown config section {section!r}; sections: "
                             f"{', '.join(f.name for f in dataclasses.fields(cfg))}")
        target = getattr(cfg, section)
        for name, value in fields.items():
            if not hasattr(target, name):
                near = difflib.get_close_matches(name, [f.name for f in dataclasses.fields(target)])
                raise ValueError(f"unknown config field {section}.{name}"
                                 + (f"; did you mean {section}.{near[0]}?" if near else ""))
            setattr(target, name, _coerce(section, name, value, getattr(target, name)))
    return cfg


def load_config(preset: str | Path = "default", overrides: list[str] = ()) -> Config:
    """A preset name (engine/configs/NAME.toml) or a TOML path, then `a.b=value` overrides."""
    path = Path(preset)
    if not path.suffix:
        path = PRESETS / f"{preset}.toml"
    if not path.is_file():
        names = ", ".join(sorted(p.stem for p in PRESETS.glob("*.toml")))
        raise FileNotFoundError(f"config {preset!r} not found; presets: {names}, or a .toml path")
    try:  # the file's own errors name the file: a typo there is not on the command line
        cfg = apply_overrides(Config(), tomllib.loads(path.read_text()))
    except ValueError as e:  # TOMLDecodeError is one too
        raise ValueError(f"config {path}: {e}") from None
    return with_overrides(cfg, overrides)


def with_overrides(cfg: Config, overrides: list[str] = ()) -> Config:
    """`cfg` with `section.field=value` overrides applied (Config() holds the official values)."""
    nested: dict = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or "." not in key:
            raise ValueError(f"override {item!r} must look like section.field=value")
        section, name = key.split(".", 1)
        nested.setdefault(section, {})[name] = _parse_value(text)
    return apply_overrides(cfg, nested)


def toml_value(v) -> str:
    """`v` as a TOML value (strings: JSON's escapes, which TOML reads alike, any path)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False).replace("\x7f", "\\u007f")  # TOML wants DEL escaped
    return repr(v)


def config_to_toml(cfg: Config) -> str:
    lines = []
    for section in dataclasses.fields(cfg):
        lines.append(f"[{section.name}]")
        for f in dataclasses.fields(getattr(cfg, section.name)):
            lines.append(f"{f.name} = {toml_value(getattr(getattr(cfg, section.name), f.name))}")
        lines.append("")
    return "\n".join(lines)


def config_from_toml(text: str) -> Config:
    return apply_overrides(Config(), tomllib.loads(text))


# how a run's features are evaluated: what an export of its weights keeps of its config
EVALUATION_FIELDS = {"data": ("global_crop_size",),
                     "run": ("knn_k", "knn_temperature", "knn_features", "knn_resize_ratio")}


def weights_config(text: str) -> str:
    """What an exported backbone keeps of its run's config (TOML): the model, and how its
    features are evaluated; no paths or settings of the machine it trained on."""
    cfg, kept = config_from_toml(text), Config()
    kept.model = cfg.model
    for section, names in EVALUATION_FIELDS.items():
        for name in names:
            setattr(getattr(kept, section), name, getattr(getattr(cfg, section), name))
    return config_to_toml(kept)


def save_config(cfg: Config, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(config_to_toml(cfg))
