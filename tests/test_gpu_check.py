"""bench/gpu_check.sh's plumbing on a machine without a GPU: stages, logs, the archive the
device tool brings back, and the closing summary."""

import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run_gpu_check(tmp_path, stages: str, **env_extra) -> Path:
    env = dict(os.environ, STAGES=stages, DINOFUSE_COMMIT="test123",
               GPU_CHECK_WORK=str(tmp_path / "work"), GPU_CHECK_INSTALL="0",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    env.update(env_extra)
    env.pop("TRITON_INTERPRET", None)
    out = tmp_path / "out"
    done = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), str(out)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return out


def test_gpu_check_runs_stages_packs_their_logs_and_summarizes(tmp_path):
    out = _run_gpu_check(tmp_path, "cuda_tests no_such_stage")
    with tarfile.open(out / "results.tgz") as tar:
        names = {Path(n).name for n in tar.getnames()}
        env_txt = tar.extractfile("./env.txt").read().decode()
        log = tar.extractfile("./cuda_tests.log").read().decode()
    assert {"env.txt", "stages.txt", "cuda_tests.log"} <= names
    assert "commit test123" in env_txt and "torch" in env_txt
    assert "skipped" in log  # no CUDA here: every CUDA test skips, none fails
    stages = (out / "stages.txt").read_text()
    first, second = stages.splitlines()  # a fresh work folder: this run's stages only
    assert first.startswith("stage cuda_tests: exit 0 in ") and second == "unknown stage no_such_stage"
    assert "stage cuda_tests: exit 0" in (out / "summary.txt").read_text()


def test_the_default_runs_gpu_preset_stage_trains_evaluates_and_reports(tmp_path):
    """The stage for issue 3's GPU preset, at toy size on the CPU: it trains from a carried
    copy of Fashion-MNIST's IDX files, keeps the checkpoints out of the archive, and the
    summary prints the k-NN of the trained, random and pixel rows."""
    from fashion_mnist_files import write_fashion_mnist

    data = tmp_path / "fmnist"
    write_fashion_mnist(data, train=16, test=6, classes=3, seed=1)
    tiny = ("model.embed_dim=32 model.depth=1 model.num_heads=2 model.out_dim=64 "
            "model.head_hidden_dim=32 data.num_workers=0 data.local_crops_number=2 "
            "optim.batch_size_per_device=8 optim.epochs=1 optim.warmup_epochs=0 "
            "optim.warmup_teacher_temp_epochs=0 run.device=\"cpu\"")
    # twice, as a retry on a warm machine would: the second run starts afresh
    out = _run_gpu_check(tmp_path, "train_default_gpu train_default_gpu", FASHION_MNIST=str(data),
                         PRESET_OVERRIDES=tiny)
    assert (out / "stages.txt").read_text().count("stage train_default_gpu: exit 0") == 2
    with tarfile.open(out / "results.tgz") as tar:
        names = {n.lstrip("./") for n in tar.getnames()}
    assert {"default_gpu/knn.json", "default_gpu/log.jsonl", "default_gpu/config.toml"} <= names
    assert not any(n.endswith((".pth", ".distcp")) for n in names)
    summary = (out / "summary.txt").read_text()
    assert re.search(r"default run's GPU preset \(Fashion-MNIST, 2 steps \(epoch 0 of 1\), \d+ img/s\), "
                     r"k-NN top-1: trained teacher ", summary) and "raw pixels" in summary


def test_summary_names_the_fastest_swept_shape_and_the_data_breakdown(tmp_path):
    import json

    from dinofuse.bench.summary import summarize

    case = "loss B=256 K=65536 crops=10 bfloat16"
    rows = [dict(case=case, variant="fused", ms=0.6, kernel_ms=0.52, floor_ms=0.17),
            dict(case=case, variant="fused V,BK,warps,splits=(2, 2048, 8, 4)", ms=0.5, kernel_ms=0.46),
            dict(case=case, variant="fused teacher block_k=1024", ms=0.5, kernel_ms=0.48),
            dict(case="ema x", variant="fused chunk=1", ms=0.1, kernel_ms=0.01),
            dict(case="layer_norm D=384", variant="fused", ms=0.2, kernel_ms=0.08, floor_ms=0.04),
            dict(case="layer_norm D=384", variant="torch.compile(torch)", ms=0.2, kernel_ms=0.1),
            dict(case="layer_norm D=384", variant="fused block_rows=2,backward_programs_per_sm=4",
                 ms=0.2, kernel_ms=0.07)]
    (tmp_path / "kernels.json").write_text(json.dumps(dict(device="GPU", copy_bandwidth_gbs=1.0,
                                                           rows=rows)))
    (tmp_path / "data.json").write_text(json.dumps(dict(
        device="GPU", crops="2x224 + 10x96", dali_images_per_s=2.0, torchvision_images_per_s=1.0,
        dali_over_torchvision=2.0, dali_breakdown_images_per_s={"decode only": 9.0})))
    text = summarize(tmp_path)
    assert f"{case} | fastest swept: 0.460 ms (fused V,BK,warps,splits=(2, 2048, 8, 4))" in text
    assert "ema x | fastest" not in text
    assert "layer_norm D=384 | fused: 0.080 ms, 2.00x floor" in text
    assert "layer_norm D=384 | torch.compile(torch): 0.100 ms" in text
    assert "layer_norm D=384 | fastest swept: 0.070 ms (fused block_rows=2" in text
    assert "DALI decode only: 9.0 img/s" in text


def test_every_training_stage_of_the_gpu_check_parses():
    """A typo in a stage's arguments would cost a GPU call: parse each `dinofuse bench train`
    command line of bench/gpu_check.sh here (and its variants), as the GPU would."""
    import re
    import shlex

    from dinofuse.bench.train import build_parser, variants

    script = (ROOT / "bench" / "gpu_check.sh").read_text().replace("\\\n", " ")
    commands = re.findall(r'"\$\{train\[@\]\}"([^;]*);;', script)
    assert len(commands) >= 6
    for command in commands:
        argv = shlex.split(command.replace("$arch", "vit_small").replace("$patch", "8")
                           .replace('"$(nproc)"', "16"))
        args = build_parser().parse_args([*argv, "--device", "cpu"])
        assert variants(args), command


def _fake_dali_site(site: Path) -> None:
    """The layout `pip install --target` gives DALI: a package, extension modules for several
    Pythons, C headers; a marker module so an import shows which copy was found."""
    dali = site / "nvidia" / "dali"
    (dali / "include" / "dali").mkdir(parents=True)
    (site / "nvidia" / "__init__.py").write_text("")
    (dali / "__init__.py").write_text("__version__ = 'carried-in-parts'\n")
    (dali / "include" / "dali" / "pipeline.h").write_text("// header\n" * 100)
    for tag in ("310", "311", "312", "313t"):
        (dali / f"backend_impl.cpython-{tag}-x86_64-linux-gnu.so").write_bytes(tag.encode() * 999)
    (dali / "libdali.so").write_bytes(os.urandom(150_000))  # incompressible: several parts


def test_dali_parts_prune_other_pythons_and_install_only_once_all_arrived(tmp_path, capsys):
    from dinofuse.bench.dali_carry import main

    site, parts, target = tmp_path / "site", tmp_path / "parts", tmp_path / "target"
    _fake_dali_site(site)
    main(["pack", str(site), str(parts), "--part-mib", "0.06", "--python", "3.12"])
    names = sorted(p.name for p in parts.glob("part.*"))
    assert names == ["part.1of3", "part.2of3", "part.3of3"]
    sizes = [(parts / n).stat().st_size for n in names]
    # equal parts: ceil(total / 3) bytes each, the last short by at most 2
    assert max(sizes) - min(sizes) < len(sizes) and max(sizes) <= 0.06 * 2**20
    # arrivals one part per call: nothing installed until the last
    held = tmp_path / "held"
    held.mkdir()
    for name in names[1:]:
        (parts / name).rename(held / name)
    main(["unpack", str(parts), str(target)])
    assert "1 of 3 parts here (missing: part.2of3, part.3of3)" in capsys.readouterr().out
    assert not (target / "nvidia").exists()
    # a part damaged on the way: refused, named
    (held / "part.2of3").rename(parts / "part.2of3")
    (held / "part.3of3").write_bytes(b"x")
    (held / "part.3of3").rename(parts / "part.3of3")
    main(["unpack", str(parts), str(target)])
    assert "checksum mismatch in part.3of3" in capsys.readouterr().out
    assert not (target / "nvidia").exists()
    # all there: installed, pruned of the other Pythons' modules and the headers
    main(["pack", str(site), str(parts), "--part-mib", "0.06"])
    main(["unpack", str(parts), str(target)])
    assert "3 parts installed" in capsys.readouterr().out
    dali = target / "nvidia" / "dali"
    assert sorted(p.name for p in dali.iterdir()) == [
        "__init__.py", "backend_impl.cpython-312-x86_64-linux-gnu.so", "libdali.so"]
    assert (dali / "libdali.so").read_bytes() == (site / "nvidia/dali/libdali.so").read_bytes()
    main(["unpack", str(parts), str(target)])
    assert "already installed" in capsys.readouterr().out


def test_gpu_check_installs_carried_dali_parts_before_the_version_report(tmp_path):
    from dinofuse.bench.dali_carry import main

    _fake_dali_site(tmp_path / "site")
    main(["pack", str(tmp_path / "site"), str(tmp_path / "parts"), "--part-mib", "0.06"])
    out = _run_gpu_check(tmp_path, "no_such_stage", GPU_CHECK_INSTALL="1", GPU_CHECK_SITE=str(tmp_path / "target"),
                         WHEELS=str(tmp_path / "no-wheels"), DALI_PARTS=str(tmp_path / "parts"))
    assert "DALI: 3 parts installed" in (out / "stages.txt").read_text()
    with tarfile.open(out / "results.tgz") as tar:
        assert "nvidia.dali carried-in-parts" in tar.extractfile("./env.txt").read().decode()


def test_the_dali_cuda_tests_stage_runs_only_dalis_tests(tmp_path):
    out = _run_gpu_check(tmp_path, "cuda_tests_dali")
    assert "stage cuda_tests_dali: exit 0" in (out / "stages.txt").read_text()
    with tarfile.open(out / "results.tgz") as tar:
        log = tar.extractfile("./cuda_tests_dali.log").read().decode()
    skipped = int(re.search(r"(\d+) skipped", log).group(1))
    assert 2 <= skipped and re.search(r"\d+ deselected", log)  # DALI's tests, no others
