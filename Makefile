# The two Quickstart commands (README): `make train` and `make test`. Both install the pinned
# dependencies into .venv first (once; again when pyproject.toml changes).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install data train test bench gpu-check

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade -e '.[test]'
	touch $@

install: $(VENV)/.installed

# Debian's dataset-fashion-mnist for the default run, where apt is there and we are root;
# otherwise `dinofuse train` says how to point data.path at an image folder.
FASHION_MNIST := /usr/share/datasets/fashion-mnist
data:
	@if [ ! -d $(FASHION_MNIST) ] && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q dataset-fashion-mnist || \
	  (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q dataset-fashion-mnist) || \
	  echo "could not install dataset-fashion-mnist; train with --data DIR"; fi

# The main job: the default DINO run (Fashion-MNIST, ~7.5 minutes on 2 CPU cores), then k-NN.
train: install data
	$(VENV)/bin/dinofuse train

# CPU tests: the Triton kernels run under Triton's interpreter on CPU tensors.
test: install data
	TRITON_INTERPRET=1 $(PY) -m pytest

# The kernel benchmark (GPU if present, else the CPU rows).
bench: install
	$(PY) -m dinofuse.bench.kernels --out bench/out

# On a GPU machine: CUDA tests + benchmark into OUT (see README "GPU check").
gpu-check:
	bash bench/gpu_check.sh $(OUT)
