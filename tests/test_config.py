import pytest

from dinofuse.engine.config import PRESETS, check_ranges, config_from_toml, config_to_toml, load_config

OFFICIAL = ["vit_small16_100ep", "vit_small16_300ep_boost", "vit_small8", "vit_base16", "vit_base8"]


@pytest.mark.parametrize("name", sorted(p.stem for p in PRESETS.glob("*.toml")))
def test_presets_load_and_round_trip(name):
    cfg = load_config(name)
    assert config_from_toml(config_to_toml(cfg)) == cfg


def test_strings_round_trip_whatever_they_hold():
    path = 'C:\\data\\"quoted" folder\\'  # backslashes and double quotes
    cfg = load_config("default", [f"data.path='{path}'"])
    assert cfg.data.path == path
    assert config_from_toml(config_to_toml(cfg)) == cfg


def test_configs_saved_when_checkpointing_was_a_switch_still_load():
    for value, blocks in (("true", -1), ("false", 0)):  # -1: every block
        assert load_config("default", [f"impl.checkpoint_blocks={value}"]).impl.checkpoint_blocks == blocks
    for value, choice in (("true", "on"), ("false", "off")):  # so was the CUDA graph
        assert load_config("default", [f"impl.cuda_graph={value}"]).impl.cuda_graph == choice
    assert load_config("default").impl.cuda_graph == "auto"


def test_official_recipes_are_there():
    assert set(OFFICIAL) <= {p.stem for p in PRESETS.glob("*.toml")}
    boost = load_config("vit_small16_300ep_boost")
    assert (boost.optim.epochs, boost.data.local_crops_number, boost.optim.teacher_temp) == (300, 10, 0.07)
    assert load_config("vit_small8").model.patch_size == 8


def test_defaults_are_the_official_code_defaults():
    """Config() and MultiCropSpec() hold main_dino.py's defaults (../shared/dino-spec.md): the
    presets only name what differs, so a drifted default changes every recipe at once."""
    from dinofuse.dataloading.spec import MultiCropSpec
    from dinofuse.engine.config import Config

    c = Config()
    official = [
        (c.model, dict(patch_size=16, drop_path_rate=0.1, out_dim=65536, head_hidden_dim=2048,
                       head_bottleneck_dim=256, head_nlayers=3, use_bn_in_head=False,
                       norm_last_layer=True)),
        (c.data, dict(global_crop_size=224, local_crop_size=96, global_crops_scale=(0.4, 1.0),
                      local_crops_scale=(0.05, 0.4), local_crops_number=8, blur_radius=(0.1, 2.0))),
        (c.optim, dict(batch_size_per_device=64, epochs=100, lr=0.0005, min_lr=1e-6,
                       warmup_epochs=10, weight_decay=0.04, weight_decay_end=0.4,
                       momentum_teacher=0.996, clip_grad=3.0, clip_mode="per_param",
                       freeze_last_layer=1, warmup_teacher_temp=0.04, teacher_temp=0.04,
                       warmup_teacher_temp_epochs=0, student_temp=0.1, center_momentum=0.9)),
        (c.run, dict(knn_k=20, knn_temperature=0.07, knn_features="cls", knn_resize_ratio=256 / 224)),
        (MultiCropSpec(), dict(global_crop_size=224, local_crop_size=96, global_crops_scale=(0.4, 1.0),
                               local_crops_scale=(0.05, 0.4), local_crops_number=8,
                               ratio=(3 / 4, 4 / 3), flip_p=0.5, color_jitter_p=0.8, brightness=0.4,
                               contrast=0.4, saturation=0.2, hue=0.1, grayscale_p=0.2,
                               blur_sigma=(0.1, 2.0), blur_p=(1.0, 0.1, 0.5), solarize_p=0.2)),
    ]
    for section, values in official:
        assert {k: getattr(section, k) for k in values} == values, type(section).__name__
    crops = MultiCropSpec().crops()  # blur 1.0 / 0.1 / 0.5, solarization on the second only
    assert [(c.blur_p, c.solarize_p) for c in crops[:3]] == [(1.0, 0.0), (0.1, 0.2), (0.5, 0.0)]


def test_overrides_and_their_errors():
    cfg = load_config("default", ["optim.lr=0.001", "model.attention=sdpa",
                                  "data.global_crops_scale=[0.3, 1.0]", "optim.epochs=3"])
    assert (cfg.optim.lr, cfg.model.attention, cfg.data.global_crops_scale, cfg.optim.epochs) == \
        (0.001, "sdpa", (0.3, 1.0), 3)
    with pytest.raises(ValueError, match="unknown config field optim.nope$"):
        load_config("default", ["optim.nope=1"])
    with pytest.raises(ValueError, match=r"unknown config field data.global_crop_scale; did you "
                                         r"mean data.global_crops_scale\?$"):
        load_config("default", ["data.global_crop_scale=[0.4, 1]"])
    with pytest.raises(ValueError, match="optim.epochs must be int"):
        load_config("default", ["optim.epochs=1.5"])
    with pytest.raises(ValueError, match="must look like section.field=value"):
        load_config("default", ["lr=1"])
    with pytest.raises(FileNotFoundError, match="presets: default"):
        load_config("nope")


@pytest.mark.parametrize("override,message", [
    ("optim.batch_size_per_device=0", "optim.batch_size_per_device must be >= 1; got 0"),
    ("optim.batch_size_per_device=-4", "optim.batch_size_per_device must be >= 1; got -4"),
    ("optim.epochs=0", "optim.epochs must be >= 1; got 0"),
    ("model.patch_size=0", "model.patch_size must be >= 1; got 0"),
    ("model.drop_path_rate=1.0", r"model.drop_path_rate must be in \[0, 1\); got 1.0"),
    ("data.local_crops_number=-1", "data.local_crops_number must be >= 0; got -1"),
    ("optim.student_temp=0", "optim.student_temp must be > 0; got 0.0"),
    ("optim.momentum_teacher=1.5", r"optim.momentum_teacher must be in \[0, 1\]; got 1.5"),
    ("optim.lr=-0.1", "optim.lr must be >= 0; got -0.1"),
    ("run.log_every_steps=0", "run.log_every_steps must be >= 1; got 0"),
    ("data.global_crops_scale=[0.9, 0.4]", r"data.global_crops_scale must be \[low, high\] with "
                                           r"0 < low <= high <= 1; got \(0.9, 0.4\)"),
    ("data.local_crops_scale=[0.0, 0.4]", "data.local_crops_scale must be"),
    ("data.blur_radius=[-1, 2]", r"data.blur_radius must be \[low, high\] with 0 <= low"),
    ("data.global_crops_scale=[0.4]", "data.global_crops_scale must be 2 numbers; got"),
    ('data.global_crops_scale=["a", 1]', "data.global_crops_scale must be 2 numbers; got"),
    ("impl.checkpoint_blocks=-2", "impl.checkpoint_blocks must be a block count >= 0, or -1"),
    ('impl.cuda_graph="yes"', "impl.cuda_graph must be one of auto, on, off; got 'yes'"),
])
def test_values_out_of_range_are_named(override, message):
    """Caught where the value is set: before, a batch of 0 died in a division, a negative batch
    or 0 epochs ran no step and said nothing, -1 local crops failed inside the loss."""
    with pytest.raises(ValueError, match=message):
        load_config("default", [override])


def test_the_edges_of_each_range_are_allowed():
    cfg = load_config("default", ["optim.lr=0", "data.local_crops_number=0", "optim.clip_grad=0",
                                  "optim.momentum_teacher=1", "data.global_crops_scale=[1, 1]",
                                  "data.blur_radius=[0, 0]", "impl.checkpoint_blocks=-1",
                                  "run.max_minutes=0", "model.drop_path_rate=0", "optim.epochs=3",
                                  "optim.warmup_epochs=3", "optim.warmup_teacher_temp_epochs=3"])
    assert cfg.data.global_crops_scale == (1.0, 1.0) and cfg.impl.checkpoint_blocks == -1
    check_ranges(cfg)


@pytest.mark.parametrize("name,value", [("warmup_epochs", 3.5), ("warmup_teacher_temp_epochs", 4)])
def test_a_warmup_longer_than_the_run_is_named(name, value):
    """The official schedules fail on it; run as it is, the LR (or the teacher temperature)
    would never reach its value: a preset's 10-epoch warmup left in a 5-epoch try."""
    cfg = load_config("default", ["optim.epochs=3", f"optim.{name}={value}"])
    with pytest.raises(ValueError, match=rf"^optim.{name}={value:g} is longer than the run "
                                         rf"\(optim.epochs=3\); set it to at most 3$"):
        check_ranges(cfg)


def test_a_config_built_in_python_is_checked_too():
    cfg = load_config("default")
    cfg.optim.epochs = 0  # set directly: no override parsing on the way
    with pytest.raises(ValueError, match="optim.epochs must be >= 1; got 0"):
        check_ranges(cfg)


def test_a_config_file_s_errors_name_the_file(tmp_path):
    (tmp_path / "broken.toml").write_text("[optim]\nlr = \n")
    with pytest.raises(ValueError, match=r"config .*broken.toml: Invalid value \(at line 2"):
        load_config(tmp_path / "broken.toml")
    (tmp_path / "typo.toml").write_text("[optim]\nlrr = 1\n")
    with pytest.raises(ValueError, match="config .*typo.toml: unknown config field optim.lrr"):
        load_config(tmp_path / "typo.toml")
    (tmp_path / "range.toml").write_text("[optim]\nepochs = 0\n")
    with pytest.raises(ValueError, match="config .*range.toml: optim.epochs must be >= 1"):
        load_config(tmp_path / "range.toml")


def test_every_numeric_field_has_a_range_rule():
    """A field added without a rule would take any number again (the seed is any integer)."""
    import dataclasses

    from dinofuse.engine.config import _RULES, Config

    cfg = Config()
    unruled = {f"{section.name}.{f.name}" for section in dataclasses.fields(cfg)
               for f in dataclasses.fields(getattr(cfg, section.name))
               if isinstance(value := getattr(getattr(cfg, section.name), f.name), (int, float, tuple))
               and not isinstance(value, bool) and f.name not in _RULES.get(section.name, {})}
    assert unruled == {"run.seed"}
