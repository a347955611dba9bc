# The two Quickstart commands (README): `make bench` and `make test`. Both install the pinned
# dependencies into .venv first (once; again when pyproject.toml changes).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install test bench gpu-check

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade -e '.[test]'
	touch $@

install: $(VENV)/.installed

# CPU tests: the Triton kernels run under Triton's interpreter on CPU tensors.
test: install
	TRITON_INTERPRET=1 $(PY) -m pytest

# The main job until the trainer exists: the kernel benchmark (GPU if present, else CPU rows).
bench: install
	$(PY) -m dinofuse.bench.kernels --out bench/out

# On a GPU machine: CUDA tests + benchmark into OUT (see README "GPU check").
gpu-check:
	bash bench/gpu_check.sh $(OUT)
