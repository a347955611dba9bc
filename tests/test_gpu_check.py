"""bench/gpu_check.sh's plumbing on a machine without a GPU: stages, logs, the archive the
device tool brings back, and the closing summary."""

import os
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_runs_stages_packs_their_logs_and_summarizes(tmp_path):
    env = dict(os.environ, STAGES="cuda_tests no_such_stage", DINOFUSE_COMMIT="test123",
               GPU_CHECK_WORK=str(tmp_path / "work"), GPU_CHECK_INSTALL="0",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    env.pop("TRITON_INTERPRET", None)
    out = tmp_path / "out"
    done = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), str(out)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
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
