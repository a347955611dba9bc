"""Test setup: run the Triton kernels on CPU tensors through Triton's interpreter.

`triton.jit` reads TRITON_INTERPRET when a kernel is defined, so it is set here, before any
dinofuse module is imported. Tests of the plain-PyTorch fallback switch it off per test with
the `reference_path` fixture.
"""

import importlib
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
# image folders' listings are kept in a cache folder (dataloading/file_lists.py): the tests'
# own, never the user's ~/.cache, removed at the end (subprocesses inherit it)
if "DINOFUSE_CACHE" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["DINOFUSE_CACHE"] = tempfile.mkdtemp(prefix="dinofuse-test-cache-")
    atexit.register(shutil.rmtree, os.environ["DINOFUSE_CACHE"], True)

import pytest  # noqa: E402
import torch  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _this_workers_share_of_the_cores():
    """Under pytest-xdist each worker trains with its share of the cores: the trainer sizes
    its CPU threads by the cores it may use (`engine.parallel.cpu_threads`), and two workers
    with a thread per core each left OpenMP's threads waiting on each other (the default
    recipe's 40 steps took 108 s in the suite, 17 s alone)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    cores = sorted(os.sched_getaffinity(0))
    if workers <= 1 or len(cores) <= 1:
        yield
        return
    share = set(cores[:max(1, len(cores) // workers)])
    before = torch.get_num_threads()
    torch.set_num_threads(len(share))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(os, "sched_getaffinity", lambda pid: share)
        yield
    torch.set_num_threads(before)


@pytest.fixture
def reference_path(monkeypatch):
    """CPU tensors take the plain-PyTorch reference, as they do without the interpreter."""
    from dinofuse.kernels import _runtime

    monkeypatch.setattr(_runtime, "INTERPRET", False)


@pytest.fixture
def poisoned_outputs(monkeypatch):
    """Every buffer the loss kernels write starts as NaN, so an unwritten element fails."""
    # the module, not the function of the same name that dinofuse.kernels exports
    module = importlib.import_module("dinofuse.kernels.dino_loss")
    monkeypatch.setattr(module, "POISON_OUTPUTS", True)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """Two classes of smooth synthetic images (gradients plus a blob), 20 each."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:24, 0:24] / 23.0
    for c in range(2):
        (root / f"class{c}").mkdir()
        for i in range(20):
            cy, cx = rng.uniform(0.2, 0.8, 2)
            blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 0.02)
            base = xx if c == 0 else yy
            rgb = np.stack([base, blob, 1 - base], -1) * 255 * rng.uniform(0.6, 1.0)
            Image.fromarray(rgb.astype(np.uint8)).save(root / f"class{c}" / f"{i}.png")
    return root


# A test that leaves new files in the checkout (a cache or output folder with a wrong path)
# fails the run: such files were committed once unseen (a folder named "None"). Checked by the
# process that collects the results (not the xdist workers), from `git status` before and
# after; untracked files only (a tracked file edited while the suite runs is not the tests').
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _checkout_status():
    import subprocess

    if not os.path.isdir(os.path.join(REPO, ".git")):
        return None
    done = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=REPO,
                          capture_output=True, text=True)
    if done.returncode != 0:
        return None
    return {line for line in done.stdout.splitlines() if line.startswith("??")}


def pytest_sessionstart(session):
    if not hasattr(session.config, "workerinput"):
        session.config._checkout_before = _checkout_status()


def pytest_sessionfinish(session, exitstatus):
    before = getattr(session.config, "_checkout_before", None)
    after = _checkout_status() if before is not None else None
    if after is None or after <= before:
        return
    written = "\n  ".join(sorted(after - before))
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    reporter.write_line(f"the tests changed the checkout {REPO}:\n  {written}", red=True)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED
