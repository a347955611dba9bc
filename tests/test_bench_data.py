"""The data-pipeline benchmark runs end to end at a toy size and writes its JSON."""

import json

import pytest

pytest.importorskip("nvidia.dali")


def test_data_benchmark_smoke(tmp_path):
    from dinofuse.bench.data import main

    result = main(["--out", str(tmp_path), "--images", "48", "--batch", "8", "--local-crops", "2",
                   "--threads", "1", "--breakdown", "--hw-decoder-load", "0.9"])
    saved = json.loads((tmp_path / "data.json").read_text())
    assert saved == result
    assert saved["torchvision_images_per_s"] > 0 and saved["dali_images_per_s"] > 0
    assert saved["mean_jpeg_kb"] > 50  # ImageNet-like sizes, not tiny smooth files
    assert set(saved["dali_breakdown_images_per_s"]) == {"decode + 2 crops, no augmentation",
                                                        "2 global crops, augmented",
                                                        "all crops, DALI's own contrast and hue"}
    assert all(v > 0 for v in saved["dali_breakdown_images_per_s"].values())
    # the hardware decoder's share is a GPU row: said skipped here, not timed as if it mattered
    assert saved["dali_hw_decoder_load_images_per_s"] == "skipped: no GPU (mixed decoding only)"


def test_the_hardware_decoder_share_reaches_the_decoder(monkeypatch):
    """On a GPU the share goes to decoders.image, and the chroma upsampling (libjpeg-turbo's
    by default, as PIL decodes); on the CPU decoder both are left out."""
    import nvidia.dali.fn as fn
    import nvidia.dali.pipeline

    from dinofuse.dataloading.dali_multicrop import build_pipeline
    from dinofuse.dataloading.spec import MultiCropSpec

    seen = []
    decode = fn.decoders.image

    @nvidia.dali.pipeline.do_not_convert
    def recording(*args, **kwargs):
        seen.append((kwargs["device"], kwargs.get("hw_decoder_load"),
                     kwargs.get("jpeg_fancy_upsampling")))
        return decode(*args, **kwargs)

    monkeypatch.setattr(fn.decoders, "image", recording)
    spec = MultiCropSpec(local_crops_number=0)
    for device_id in (None, 0):  # a GPU graph is only defined here, never built
        build_pipeline(["a.jpg"], [0], spec, batch_size=1, device_id=device_id, hw_decoder_load=0.9)
    build_pipeline(["a.jpg"], [0], spec, batch_size=1, device_id=0, fancy_upsampling=False)
    assert seen == [("cpu", None, None), ("mixed", 0.9, True), ("mixed", None, False)]


def test_breakdown_graphs_switch_off_one_part_each():
    from dinofuse.bench.data import breakdown_specs
    from dinofuse.dataloading.spec import MultiCropSpec

    full = MultiCropSpec(local_crops_number=10)
    plain, globals_only, own_color = breakdown_specs(full).values()
    assert own_color.crops() == full.crops() and own_color.dali_color == "dali"
    assert [c.size for c in plain.crops()] == [224, 224] and plain.flip_p == 0
    assert all(c.blur_p == 0 and c.solarize_p == 0 for c in plain.crops())
    assert plain.color_jitter_p == plain.grayscale_p == 0
    assert globals_only.crops() == full.crops()[:2] and globals_only.color_jitter_p == 0.8


def test_images_per_second_counts_what_follows_the_first_batch(monkeypatch):
    """The first batch (workers starting, first decode) is neither counted nor timed; the
    rate is the images after it over the time after it."""
    import itertools

    import torch

    from dinofuse.bench import data

    clock = itertools.chain([10.0, 13.0], itertools.repeat(20.0))
    monkeypatch.setattr(data.time, "perf_counter", lambda: next(clock))
    batches = [([torch.zeros(n, 3, 4, 4)], None) for n in (5, 8, 8, 8)]
    assert data._images_per_s(batches) == 24 / 3.0
    with pytest.raises(ValueError, match="one batch only"):
        data._images_per_s(batches[:1])
