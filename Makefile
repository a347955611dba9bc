# The two Quickstart commands (README): `make train` and `make test`. Both install the pinned
# dependencies into .venv first (once; again when pyproject.toml changes).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install data train test test-compat bench gpu-check

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

# The main job: the default DINO run (Fashion-MNIST, ~5 minutes on 2 CPU cores), then k-NN.
# Each `make train` is a new run in its own folder (a run's folder is never trained over).
train: install data
	$(VENV)/bin/dinofuse train --output-dir runs/default-$$(date +%Y%m%d-%H%M%S)

# CPU tests: the Triton kernels run under Triton's interpreter on CPU tensors. Two workers
# (pytest-xdist), one per core of the CI machine: the interpreter is single-threaded Python.
# A file's tests stay on one worker, so its module fixtures run once.
test: install data
	TRITON_INTERPRET=1 $(PY) -m pytest -n 2 --dist loadfile

# The same suite on the GPU machines' versions (torch 2.11, triton 3.6), in its own venv:
# ~4.7 GB of downloads (PyPI's torch is the CUDA build). numpy stays below 2.4, whose scalar
# conversion triton 3.6's interpreter trips over (the compiled kernels are unaffected).
COMPAT_VENV ?= .venv-compat
test-compat: data
	[ -x $(COMPAT_VENV)/bin/python ] || $(PYTHON) -m venv $(COMPAT_VENV)
	$(COMPAT_VENV)/bin/pip install -q torch==2.11.0 torchvision==0.26.0 triton==3.6.0 numpy==2.3.5 \
	  timm==1.0.31 nvidia-dali-cuda130==2.4.0 nvidia-ml-py==13.615.71 safetensors==0.8.0 \
	  tensorboard==2.21.0 tqdm==4.70.1 matplotlib==3.11.2 pytest==9.2.0 pytest-benchmark==5.3.1 \
	  pytest-xdist==3.8.0
	$(COMPAT_VENV)/bin/pip install -q --no-deps xformers==0.0.35
	$(COMPAT_VENV)/bin/pip install -q --no-deps --no-build-isolation -e .
	TRITON_INTERPRET=1 $(COMPAT_VENV)/bin/python -m pytest -n 2 --dist loadfile

# The kernel benchmark (GPU if present, else the CPU rows).
bench: install
	$(PY) -m dinofuse.bench.kernels --out bench/out

# On a GPU machine: CUDA tests + benchmark into OUT (see README "GPU check").
gpu-check:
	bash bench/gpu_check.sh $(OUT)
