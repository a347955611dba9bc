import pytest

from dinofuse.engine.config import PRESETS, config_from_toml, config_to_toml, load_config

OFFICIAL = ["vit_small16_100ep", "vit_small16_300ep_boost", "vit_small8", "vit_base16", "vit_base8"]


@pytest.mark.parametrize("name", sorted(p.stem for p in PRESETS.glob("*.toml")))
def test_presets_load_and_round_trip(name):
    cfg = load_config(name)
    assert config_from_toml(config_to_toml(cfg)) == cfg


def test_official_recipes_are_there():
    assert set(OFFICIAL) <= {p.stem for p in PRESETS.glob("*.toml")}
    boost = load_config("vit_small16_300ep_boost")
    assert (boost.optim.epochs, boost.data.local_crops_number, boost.optim.teacher_temp) == (300, 10, 0.07)
    assert load_config("vit_small8").model.patch_size == 8


def test_overrides_and_their_errors():
    cfg = load_config("default", ["optim.lr=0.001", "model.attention=sdpa",
                                  "data.global_crops_scale=[0.3, 1.0]", "optim.epochs=3"])
    assert (cfg.optim.lr, cfg.model.attention, cfg.data.global_crops_scale, cfg.optim.epochs) == \
        (0.001, "sdpa", (0.3, 1.0), 3)
    with pytest.raises(ValueError, match="unknown config field optim.nope"):
        load_config("default", ["optim.nope=1"])
    with pytest.raises(ValueError, match="optim.epochs must be int"):
        load_config("default", ["optim.epochs=1.5"])
    with pytest.raises(ValueError, match="must look like section.field=value"):
        load_config("default", ["lr=1"])
    with pytest.raises(FileNotFoundError, match="presets: default"):
        load_config("nope")
