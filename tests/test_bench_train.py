"""The training benchmark: its FLOP counter against a hand count and torch's counter, and an
end-to-end run at toy sizes on CPU (baseline, ablation rows, FSDP2 on one process)."""

import json
import os
import subprocess
import sys
import types

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from dinofuse.bench.flops import HeadShape, ViTShape, dino_step_flops, head_forward_flops, vit_forward_flops
from dinofuse.bench.telemetry import GPUTelemetry
from dinofuse.engine.models import DINOHead, build_vit


def test_vit_flops_match_a_hand_count():
    # D=8, 1 block, patch 4 on an 8x8 crop: 4 patches + CLS = 5 tokens, MLP hidden 32
    patch_embed = 2 * 4 * (3 * 4 * 4) * 8  # 3072
    block = (2 * 5 * 8 * 24  # qkv: 1920
             + 2 * (2 * 5 * 5 * 8)  # q@k^T and attn@v: 800
             + 2 * 5 * 8 * 8  # proj: 640
             + 2 * 2 * 5 * 8 * 32)  # fc1 + fc2: 5120
    assert vit_forward_flops(ViTShape(embed_dim=8, depth=1, patch_size=4), 8) == patch_embed + block == 11552
    # head 8 -> 16 -> 16 -> 4, then 4 -> 10
    assert head_forward_flops(8, HeadShape(16, 4, 10, 3)) == 2 * (8 * 16 + 16 * 16 + 16 * 4 + 4 * 10)


@pytest.mark.parametrize("patch,crop", [(4, 16), (4, 8), (8, 24)])
def test_flops_match_torch_counter_on_the_real_model(patch, crop):
    torch.manual_seed(0)
    vit = build_vit("vit_tiny", patch, img_size=16, embed_dim=24, depth=2, num_heads=3,
                    attention="naive")
    head = DINOHead(24, 50, hidden_dim=32, bottleneck_dim=8)
    x = torch.randn(3, 3, crop, crop)
    with FlopCounterMode(display=False) as counter:
        head(vit(x))
    shape = ViTShape(embed_dim=24, depth=2, patch_size=patch)
    expected = 3 * (vit_forward_flops(shape, crop) + head_forward_flops(24, HeadShape(32, 8, 50, 3)))
    assert counter.get_total_flops() == expected


def test_step_flops_count_student_three_times_and_teacher_on_globals():
    vit, head = ViTShape(384, 12, 16), HeadShape()
    parts = dino_step_flops(vit, head, batch=2, local_crops=10)
    g = vit_forward_flops(vit, 224) + head_forward_flops(384, head)
    loc = vit_forward_flops(vit, 96) + head_forward_flops(384, head)
    assert parts["student_forward"] == 2 * (2 * g + 10 * loc)
    assert parts["teacher_forward"] == 2 * 2 * g
    assert parts["total"] == 3 * parts["student_forward"] + parts["teacher_forward"]
    # ViT-S/16 at 224: the 4.6 G the DINO/DeiT tables give counts multiply-adds (2 FLOPs each)
    assert 4.5e9 < vit_forward_flops(vit, 224) / 2 < 4.7e9


def test_telemetry_reports_no_gpu_instead_of_failing():
    with GPUTelemetry(device_index=None) as tel:
        pass
    assert tel.summary() == {"status": "no GPU", "samples": 0}


class FakeNVML:
    """pynvml's calls the telemetry makes, reading from a script of samples; then an error."""
    NVML_CLOCK_SM = 1

    def __init__(self, samples, init_error=None):
        self.samples, self.init_error, self.index, self.shut = list(samples), init_error, None, False

    def nvmlInit(self):
        if self.init_error:
            raise self.init_error

    def nvmlDeviceGetHandleByIndex(self, index):
        self.index = index
        return "handle"

    def nvmlDeviceGetUtilizationRates(self, handle):
        if not self.samples:
            raise RuntimeError("GPU is lost")
        self.current = self.samples.pop(0)
        return types.SimpleNamespace(gpu=self.current[0], memory=self.current[1])

    def nvmlDeviceGetPowerUsage(self, handle):
        return self.current[2]  # milliwatts

    def nvmlDeviceGetClockInfo(self, handle, clock):
        assert clock == self.NVML_CLOCK_SM
        return self.current[3]

    def nvmlDeviceGetMemoryInfo(self, handle):
        return types.SimpleNamespace(used=self.current[4] * 2 ** 20)

    def nvmlShutdown(self):
        self.shut = True


def test_telemetry_summarizes_nvml_samples_in_their_units(monkeypatch):
    """Watts from NVML's milliwatts, MiB from bytes; mean/min/max per field; the device asked
    for; a sampling error ends the sampling with its reason, never the benchmark."""
    nvml = FakeNVML([(50, 10, 300_000, 1800, 1024), (100, 30, 500_000, 1900, 3072),
                     (30, 20, 100_000, 1500, 2048)])  # means apart from medians
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with GPUTelemetry(device_index=3, period_s=0.001) as tel:
        tel._thread.join(timeout=10)  # three samples, then the error stops the thread
    summary = tel.summary()
    assert nvml.index == 3 and nvml.shut and summary["samples"] == 3
    assert summary["status"] == "sampling stopped (RuntimeError: GPU is lost)"
    assert summary["sm_util_pct"] == {"mean": 60.0, "min": 30, "max": 100}
    assert summary["mem_util_pct"] == {"mean": 20.0, "min": 10, "max": 30}
    assert summary["power_w"] == {"mean": 300.0, "min": 100.0, "max": 500.0}
    assert summary["sm_clock_mhz"] == {"mean": 1733.3, "min": 1500, "max": 1900}
    assert summary["mem_used_mib"] == {"mean": 2048.0, "min": 1024.0, "max": 3072.0}


def test_telemetry_without_nvml_says_why(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", FakeNVML([], init_error=OSError("no driver")))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with GPUTelemetry() as tel:
        pass
    assert tel.summary() == {"status": "no GPU telemetry (OSError: no driver)", "samples": 0}


TOY = ["--arch", "vit_tiny", "--embed-dim", "32", "--depth", "2", "--num-heads", "2", "--patch", "8",
       "--global-size", "32", "--local-size", "16", "--local-crops", "2", "--out-dim", "96",
       "--head-hidden-dim", "48", "--head-bottleneck-dim", "16", "--batch", "4", "--steps", "2",
       "--warmup", "1", "--device", "cpu"]


def test_benchmark_end_to_end_writes_json_markdown_and_png(tmp_path):
    # a subprocess: the FSDP2 row creates a process group that must not outlive the test
    cmd = [sys.executable, "-m", "dinofuse.engine.cli", "bench", "train", *TOY, "--ablation",
           "--fsdp", "--profile", "--target-speedup", "2.5", "--target-mfu", "35",
           "--out", str(tmp_path)]
    # the rows' plumbing, not the kernels (tested on their own): the loss and EMA take the
    # plain-PyTorch path any CPU run takes (interpreted, they made this test twice as long)
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    tag = "train-vit_tiny8-b4-synthetic"
    result = json.loads((tmp_path / f"{tag}.json").read_text())
    names = [r["name"] for r in result["rows"]]
    assert names[0].startswith("baseline") and "dinofuse" in names
    assert names[-3:] == ["dinofuse + FSDP2 (1 process)",
                          "dinofuse + packed crops + FSDP2 (1 process, blocks kept gathered)",
                          "dinofuse + packed crops + FSDP2 (1 process, blocks kept gathered, "
                          "one unit)"]
    assert all(r["status"] == "ok" for r in result["rows"][-3:])
    assert {f"baseline + {n}" for n in ("fused loss", "fused EMA", "sync-free clipping",
                                        "packed crops", "bf16 autocast",
                                        "patch embedding as one matmul")} <= set(names)
    assert "dinofuse + bf16 residual stream and LayerNorm" in names
    peak_flops = result["matmul_peak"]["tflops"] * 1e12
    for r in result["rows"]:
        assert r["status"] == "ok", r
        assert r["images_per_s"] > 0 and r["step_ms"]["p50"] > 0 and r["mfu_pct"] > 0
        assert r["telemetry"]["status"] == "no GPU"
        step_s = r["step_ms"]["mean"] / 1e3  # each figure from the timed window's mean step
        assert r["images_per_s"] == pytest.approx(r["batch"] / step_s, rel=1e-2)
        assert r["mfu_pct"] == pytest.approx(100 * result["flops_per_step"] / step_s / peak_flops,
                                             rel=1e-2)
    base = result["rows"][0]
    assert base["speedup_vs_baseline"] == pytest.approx(1.0)
    assert base["settings"]["model.attention"] == "naive" and base["attention"] == "naive"
    assert result["flops_per_step"] > 0 and result["matmul_peak"]["tflops"] > 0
    assert [t["target"] for t in result["targets"]] == ["images/s >= 2.5x baseline", "MFU >= 35.0%"]
    assert result["top_kernels_dinofuse"] and result["commit"]
    md = (tmp_path / f"{tag}.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("| ")]
    assert len([line for line in table if any(n in line for n in names)]) >= len(names)
    assert "Telemetry: no GPU." in md
    png = (tmp_path / f"{tag}.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    assert matplotlib.image.imread(tmp_path / f"{tag}.png").shape[0] > 100
    from dinofuse.bench.summary import summarize  # the GPU check's closing table

    summary = summarize(tmp_path)
    assert f"{tag} (" in summary and "dinofuse + FSDP2 (1 process):" in summary
    assert "target MFU >= 35.0%" in summary


@pytest.mark.parametrize("n", [1, 2, 5, 10, 11, 20])
def test_step_time_percentiles_are_nearest_ranks(n):
    import numpy as np

    from dinofuse.bench.train import _percentiles

    ms = torch.rand(n, generator=torch.Generator().manual_seed(n)).mul(100).tolist()
    got = _percentiles(ms)
    p50, p90 = np.percentile(ms, [50, 90], method="nearest")
    assert (got["p50"], got["p90"], got["max"]) == (p50, p90, max(ms))
    assert got["mean"] == pytest.approx(sum(ms) / n)


def test_targets_say_met_or_missed_and_by_what():
    import argparse

    from dinofuse.bench.train import Row, check_targets

    args = argparse.Namespace(target_speedup=2.5, target_mfu=35.0, target_memory_gb=20.0,
                              target_fsdp_overhead=5.0, device="cuda")
    for speedup, mfu, gib, fsdp_ips, met in ((2.6, 36.0, 18.6, 960.0, True),
                                             (2.4, 34.0, 18.7, 940.0, False)):  # 20 GB = 18.63 GiB
        ours = Row("dinofuse", {}, 64, role="dinofuse", speedup_vs_baseline=speedup,
                   mfu_pct=mfu, peak_memory_gib=gib, images_per_s=2000.0)  # graphed
        plain = Row("dinofuse without the CUDA graph", {}, 64, images_per_s=1000.0)
        fsdp = Row("dinofuse + FSDP2 (1 process)", {}, 64, images_per_s=fsdp_ips)
        targets = check_targets(args, [Row("baseline", {}, 64, role="baseline"), ours, plain, fsdp])
        overhead = round(100 * (1000.0 / fsdp_ips - 1), 1)  # 4.2% / 6.4%: against the plain step
        assert [(t["measured"], t["met"]) for t in targets] == [
            (speedup, met), (mfu, met), (gib, met), (overhead, met)]
    # on a CPU there is no graph: the dinofuse row is the plain step
    from dinofuse.bench.train import fsdp_overhead_pct, memory_targets

    assert fsdp_overhead_pct([ours, fsdp], "cpu") == pytest.approx(100 * (2000 / 940 - 1))
    assert fsdp_overhead_pct([ours, fsdp], "cuda") is None  # no plain row to compare with
    # memory over the limit: the fastest checkpointing row within it is named as well
    ours = Row("dinofuse", {}, 64, role="dinofuse", peak_memory_gib=32.3, images_per_s=344.0)
    checkpointed = [Row(f"dinofuse + activation checkpointing ({what})", {}, 64,
                        peak_memory_gib=gib, images_per_s=ips)
                    for what, gib, ips in (("every block", 7.0, 273.3), ("first 8 blocks", 16.0, 293.7),
                                           ("first 6 blocks", 20.45, 304.7))]
    targets = memory_targets(20.0, ours, [ours, *checkpointed])
    assert [(t["measured"], t["met"]) for t in targets] == [(32.3, False), (16.0, True)]
    assert "(first 8 blocks), 293.7 images/s" in targets[1]["target"]
    assert len(memory_targets(20.0, ours, [ours, checkpointed[2]])) == 1  # none fits: no row


def test_matmul_peak_counts_two_flops_per_multiply_add(monkeypatch):
    """n x n x n matmuls, timed: 2 n^3 FLOPs each (a clock that says 1 s per matmul)."""
    from dinofuse.bench import train as bench_train

    ticks = iter([0.0, 5.0])  # the CPU times 5 matmuls of 512^3
    monkeypatch.setattr(bench_train.time, "perf_counter", lambda: next(ticks))
    peak = bench_train.matmul_peak_tflops(torch.device("cpu"))
    assert (peak["size"], peak["dtype"]) == (512, "float32")
    assert peak["tflops"] == pytest.approx(2 * 512 ** 3 / 1e12)


def test_bad_batch_argument_is_named(capsys):
    from dinofuse.bench.train import main

    for bad, why in (("lots", "must be int; got 'lots', or 'max'"), ("0", "must be >= 1; got 0, or 'max'")):
        with pytest.raises(SystemExit) as exit_:
            main(["--batch", bad])
        assert exit_.value.code == 2
        assert f"argument --batch: {why}" in capsys.readouterr().err


def test_bench_config_is_the_official_recipe_at_the_given_sizes():
    from dinofuse.bench.train import DINOFUSE, bench_config, build_parser, step_flops
    from dinofuse.engine.config import Config

    cfg = bench_config(build_parser().parse_args([]), DINOFUSE, 64, "unused")
    official = Config().model
    assert (cfg.model.arch, cfg.model.embed_dim, cfg.model.patch_size) == ("vit_small", 0, 16)
    assert (cfg.model.out_dim, cfg.model.head_hidden_dim, cfg.model.head_bottleneck_dim) == \
        (official.out_dim, official.head_hidden_dim, official.head_bottleneck_dim) == (65536, 2048, 256)
    assert cfg.data.local_crops_number == 10 and cfg.optim.batch_size_per_device == 64
    # ViT-S/16, 2x224 + 10x96: ~122 GFLOP per image (student x3 on all crops, teacher on 2)
    assert 115e9 < step_flops(cfg) / 64 < 130e9


@pytest.mark.parametrize("argv,blocks", [([], []), (["--checkpointing"], [-1]),
                                         (["--checkpointing", "all,8,6"], [-1, 8, 6])])
def test_checkpointing_rows_name_their_block_counts(argv, blocks):
    from dinofuse.bench.train import build_parser, variants

    rows = [v for v in variants(build_parser().parse_args(["--device", "cpu", *argv]))
            if "impl.checkpoint_blocks" in v.settings]
    assert [v.settings["impl.checkpoint_blocks"] for v in rows] == blocks
    assert [v.name.split("(")[1] for v in rows] == \
        ["every block)" if n < 0 else f"first {n} blocks)" for n in blocks]


def test_bad_checkpointing_argument_is_named():
    from dinofuse.bench.train import build_parser, variants

    with pytest.raises(SystemExit, match="--checkpointing"):
        variants(build_parser().parse_args(["--device", "cpu", "--checkpointing", "half"]))


def test_a_batch_search_that_would_try_nothing_is_named():
    from dinofuse.bench.train import build_parser, run

    args = build_parser().parse_args(["--device", "cpu", "--batch", "max", "--max-batch-limit", "16"])
    with pytest.raises(SystemExit, match="--max-batch-limit 16 is below --max-batch-start 64"):
        run(args)


def test_dinofuse_rows_replay_the_step_as_a_cuda_graph_but_one():
    """The default ("auto") replays the step as a CUDA graph on a GPU; one ablation row turns
    it off to show what it buys; the baseline never has it."""
    from dinofuse.bench.train import build_parser, variants

    def rows(device, *flags):
        return {v.name: v.settings for v in
                variants(build_parser().parse_args(["--device", device, "--ablation", *flags]))}

    gpu = rows("cuda", "--compile")
    assert gpu["dinofuse"]["impl.cuda_graph"] == "auto"
    assert gpu["dinofuse without the CUDA graph"] == {**gpu["dinofuse"], "impl.cuda_graph": "off"}
    assert {n for n, v in gpu.items() if v["impl.cuda_graph"] == "off"} == {
        n for n in gpu if n.startswith("baseline")} | {"dinofuse without the CUDA graph"}
    best = gpu["dinofuse + packed crops + bf16 residual stream"]
    assert best["model.packed"] and best["impl.residual_dtype"] == "autocast"
    assert gpu["dinofuse + torch.compile + packed crops + bf16 residual stream"] == {
        **best, "impl.compile_blocks": True}
    assert list(gpu)[-1] == "dinofuse + torch.compile + packed crops + bf16 residual stream"
    assert "dinofuse without the CUDA graph" not in rows("cpu")  # no graph on a CPU anyway


def test_an_ablation_row_that_cannot_run_is_a_row_and_the_rest_goes_on():
    from dinofuse.bench.train import DINOFUSE, Variant, build_parser, run_variant

    args = build_parser().parse_args(TOY)
    broken = {**DINOFUSE, "optim.precision": "fp32", "impl.loss": "liger"}
    row, _ = run_variant(args, Variant("dinofuse + a broken option", broken), 4, 1.0,
                         steps=1, warmup=0)
    assert row.status.startswith("failed: ValueError: impl.loss must be one of"), row.status
    with pytest.raises(ValueError, match="impl.loss must be one of"):  # ours must run
        run_variant(args, Variant("dinofuse", broken, "dinofuse"), 4, 1.0, steps=1, warmup=0)


def test_bad_numbers_get_one_line_naming_them(capsys):
    """Through `dinofuse bench train`: a config error is one line (it was a traceback), an
    option's is argparse's, naming the option."""
    from dinofuse.engine.cli import main

    assert main(["bench", "train", "--device", "cpu", "--global-size", "100"]) == 2
    assert capsys.readouterr().err.strip() == \
        "dinofuse bench train: error: crop size 100x100 is not divisible by the patch size 16"
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "train", "--device", "cpu", "--steps", "0"])
    assert exit_.value.code == 2
    assert "argument --steps: must be >= 1; got 0" in capsys.readouterr().err


def test_the_baseline_row_runs_the_official_codes_way_and_dinofuse_its_own(tmp_path):
    """What the speedup is measured against (issue 6's list): materialized attention, one
    backbone pass per crop size, the official loss module, the per-parameter EMA loop, the
    per-parameter AdamW loop, fp16 with a GradScaler; and dinofuse's row with the fused ones."""
    from dinofuse.bench.train import BASELINE, DINOFUSE, bench_config, build_parser
    from dinofuse.engine.train import Trainer
    from dinofuse.kernels import DINOLoss, EMAPlan
    from dinofuse.kernels.reference import OfficialDINOLoss

    args = build_parser().parse_args(TOY)
    base = Trainer(bench_config(args, BASELINE, 4, str(tmp_path / "b")))
    ours = Trainer(bench_config(args, {**DINOFUSE, "optim.precision": "fp32"}, 4, str(tmp_path / "d")))
    assert {b.attn.backend for b in base.student.backbone.blocks} == {"naive"}
    assert not base.student.packed and base.cfg.impl.clip == "official"
    assert type(base.loss_fn) is OfficialDINOLoss and type(ours.loss_fn) is DINOLoss
    assert not isinstance(base.ema, EMAPlan) and isinstance(ours.ema, EMAPlan)
    assert base.optimizer.defaults["foreach"] is False and not base.optimizer.defaults["fused"]
    assert base.precision == torch.float16 and base.scaler is not None and ours.scaler is None
    assert {b.attn.backend for b in ours.student.backbone.blocks} == {"sdpa"}  # auto, on a CPU


@pytest.mark.parametrize("images,warned", [(8, True), (12, False)])
def test_dali_input_says_when_the_timed_steps_cross_an_epochs_end(tmp_path, images, warned):
    """The trainer builds DALI's graph anew each epoch: a folder shorter than the run's steps
    (here 1 warm-up + 2 timed at batch 4) times those builds too, and the run says so."""
    pytest.importorskip("nvidia.dali")
    from dinofuse.bench.data import make_jpegs

    (tmp_path / "jpegs").mkdir()
    make_jpegs(tmp_path / "jpegs", images)
    cmd = [sys.executable, "-m", "dinofuse.engine.cli", "bench", "train", *TOY,
           "--data", str(tmp_path / "jpegs"), "--data-backend", "dali", "--out", str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TRITON_INTERPRET": "0"})
    assert done.returncode == 0, done.stderr[-3000:]
    line = ("gives 2 steps per epoch at batch 4, fewer than the 3 run: the timing includes "
            "building DALI's graph for each new epoch; 12 images or more")
    assert (line in done.stderr) == warned, done.stderr[-2000:]
