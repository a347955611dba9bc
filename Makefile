# The two Quickstart commands (README): `make train` and `make test`. Both install the pinned
# dependencies into .venv first (once; again when pyproject.toml changes).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install data train test test-compat bench gpu-check dali-parts

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

# DALI for the GPU check, which carries at most 64 MiB a call: downloaded for the GPU image
# (Python 3.12), installed into .dali/site, pruned and packed into ~55 MiB parts in .dali/
# (bench/dali_carry.py). Carry .dali/part.KofN with .dali/parts.sha256 in calls right after
# each other; the GPU check installs DALI once the last part is there.
DALI_PIP := --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64
DALI_WHEELS := nvidia-dali-cuda130==2.4.0 nvidia-nvimgcodec-cu13==0.9.0.20 nvidia-nvjpeg==13.3.2.43 \
  nvidia-nvjpeg2k-cu13==0.11.0.51 nvidia-nvtiff-cu13==0.8.0.82 \
  astunparse==1.6.3 gast==0.7.0 libcst==1.9.0 makefun==1.16.0 nvtx==0.2.17 optree==0.20.0 six==1.17.0
dali-parts: install
	rm -rf .dali/site .dali/wheels && mkdir -p .dali/wheels
	$(PY) -m pip download -q $(DALI_PIP) -d .dali/wheels $(DALI_WHEELS)
	$(PY) -m pip install -q $(DALI_PIP) --no-compile --target .dali/site .dali/wheels/*.whl
	$(PY) -m dinofuse.bench.dali_carry pack .dali/site .dali
