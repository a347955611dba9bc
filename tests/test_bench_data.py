"""The data-pipeline benchmark runs end to end at a toy size and writes its JSON."""

import json

import pytest

pytest.importorskip("nvidia.dali")


def test_data_benchmark_smoke(tmp_path):
    from dinofuse.bench.data import main

    result = main(["--out", str(tmp_path), "--images", "48", "--batch", "8", "--local-crops", "2",
                   "--threads", "1"])
    saved = json.loads((tmp_path / "data.json").read_text())
    assert saved == result
    assert saved["torchvision_images_per_s"] > 0 and saved["dali_images_per_s"] > 0
    assert saved["mean_jpeg_kb"] > 50  # ImageNet-like sizes, not tiny smooth files
