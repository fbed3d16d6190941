# Set-up and entry points. `make train` and `make test` are the README's two
# commands: each creates the virtual environment on first use.
#
# TORCH picks the torch wheel installed before the project. The default is the
# CPU build (2.13.0, has torch.nn.functional.grouped_mm); a bare `torch`
# requirement would resolve to a multi-GB CUDA build. On a GPU machine use e.g.
#   make install TORCH='torch==2.13.0 --index-url https://download.pytorch.org/whl/cu130'
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
EXPERIMENT ?= mixtral_tiny
PYTEST_ARGS ?=

.PHONY: install train test bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

install: $(VENV)/.installed

train: install
	$(PY) -m moe.train +experiment=$(EXPERIMENT)

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: install
	$(PY) benchmarks/moe_layer.py

clean:
	rm -rf $(VENV) outputs runs
