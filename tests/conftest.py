"""Test setup: run the Triton kernels on CPU tensors through Triton's interpreter.

`triton.jit` reads TRITON_INTERPRET when a kernel is defined, so it is set here, before any
dinofuse module is imported. Tests of the plain-PyTorch fallback switch it off per test with
the `reference_path` fixture.
"""

import importlib
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


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
