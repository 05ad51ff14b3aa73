# Two entry points: `make demo` and `make test`. Both build .venv from nothing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export MUJOCO_GL ?= osmesa
export PYTHONUNBUFFERED := 1

.PHONY: demo test install system-deps bench lowest clean

demo: install
	$(BIN)/foresight demo --root ./foresight-data --out ./foresight-data/demo

test: install
	$(BIN)/python -m pytest -q -p no:cacheprovider --timeout=900

install: system-deps $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# torch first, as a CPU build: `pip install -e .` then keeps it (torch>=2.4 is met) instead of
# pulling PyPI's Linux wheel, a CUDA build with ~3 GB of nvidia packages. TORCH_SPEC names the CPU
# build by its local version label (+cpu), so pip can only take a CPU wheel: one its indexes or
# wheel folders already hold (this machine: /opt/wheels), else one from PyTorch's CPU index
# (TORCH_CPU_INDEX, tried second). Where no +cpu build exists (macOS, whose PyPI wheels are CPU
# only) or on a GPU machine (PyPI's Linux wheel is the CUDA build it wants), name it without the label:
#   make install TORCH_SPEC=torch==2.13.0
TORCH_SPEC ?= torch==2.13.0+cpu
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q $(TORCH_SPEC) 2>/dev/null || \
	  $(BIN)/python -m pip install -q $(TORCH_SPEC) --extra-index-url $(TORCH_CPU_INDEX)
	$(BIN)/python -m pip install -q -e ".[metaworld,s3,dev]"
	touch $(STAMP)

# Headless MuJoCo rendering needs OSMesa; Debian's own python3 needs python3-venv for .venv.
# Install what is missing when we can (root + apt), else say exactly what to run.
system-deps:
	@missing=""; \
	ldconfig -p 2>/dev/null | grep -q libOSMesa || missing="libosmesa6"; \
	$(PYTHON) -c "import ensurepip, venv" 2>/dev/null || missing="$$missing python3-venv"; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing system packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	else \
	  echo "missing system packages:$$missing; run:  sudo apt-get update && sudo apt-get install -y$$missing"; \
	  exit 1; \
	fi

# Every dependency at its declared floor (uv --resolution lowest-direct) in a venv of its own under
# /tmp, then the fast tests file by file: shows pyproject.toml's floors are versions that pass (.ci/lowest).
lowest: system-deps
	bash .ci/lowest

bench: install
	$(BIN)/python bench/bench_episode_store.py

clean:
	rm -rf $(VENV) foresight-data
