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
# `make test` runs on TEST_WORKERS pytest-xdist workers (0: in this process). One worker takes every test that
# starts a Ray (the session's or its own), in order; the others take the rest (tests/conftest.py).
TEST_WORKERS ?= 2

.PHONY: install train test test-slow cascade bench clean

# pip installs torch (TORCH: pip finds the CPU build on this machine's disk, and honours --index-url) and uv;
# uv installs the project, pip and the ~190 other packages: it downloads and unpacks in parallel (13 s from an
# empty cache against pip's 36 s from a warm one, measured here), and keeps the torch already installed, which
# every requirement admits. The environment is made without pip and the system's pip installs into it
# (`pip --python`, pip >= 22.3): ensurepip's copy of pip and its upgrade cost 8-11 s more (measured, two rounds
# each); where the system has no such pip, the environment gets its own first. Neither pip nor uv byte-compiles
# the installed modules (--no-compile, uv's default): Python writes the byte code of the modules actually
# imported on first use, unless PYTHONDONTWRITEBYTECODE is set, so the targets that run Python clear it (some CI
# images set it).
PIP_FLAGS := --quiet --no-compile
export PYTHONDONTWRITEBYTECODE :=

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv --without-pip $(VENV)
	if $(PYTHON) -m pip --python $(PY) --version >/dev/null 2>&1; then pip="$(PYTHON) -m pip --python $(PY)"; \
	else $(PY) -m ensurepip --default-pip >/dev/null && pip="$(PY) -m pip"; fi && \
	$$pip install $(PIP_FLAGS) $(TORCH) && $$pip install $(PIP_FLAGS) uv
	$(VENV)/bin/uv pip install --quiet --python $(PY) pip -e '.[dev]'
	touch $@

install: $(VENV)/.installed

train: install
	$(PY) -m moe.train +experiment=$(EXPERIMENT)

# `make test`: every component, each through at least one real Ray, Serve and CLI run (the README's command,
# CI's). `make test-slow`: the long end-to-end drills marked `extended` (fault matrices through the CLI, resume
# and restart chains, every layout and preset); run it before closing an issue that touches training or serving.
test: install
	$(PY) -m pytest -q -m "not extended" -n $(TEST_WORKERS) --dist loadgroup $(PYTEST_ARGS)

test-slow: install
	$(PY) -m pytest -q -m extended $(PYTEST_ARGS)

# `make cascade`: the cascade's large tier, then its small tier distilled from it on the same prepared data, then
# the evaluation on the tiers' greedy next tokens (docs/cascade.md) and the router to serve. Measured on a 2-core
# CPU: large tier about 1 h, small tier 19 min (7.5 min without its teacher), evaluation 7 min, calibration
# 2 min (docs/results/cascade_tiny_base.md). Each step resumes or repeats safely.
SMALL_TIER := runs/mixtral_tiny_distilled/checkpoints/step_00000300
LARGE_TIER := runs/mixtral_base/checkpoints/step_00001000
cascade: install
	$(PY) -m moe.train +experiment=mixtral_base trainer.resume=auto
	$(PY) -m moe.train +experiment=mixtral_tiny name=mixtral_tiny_distilled trainer.distill.teacher=$(LARGE_TIER) \
		trainer.resume=auto
	$(PY) -m cascade.evaluate small=$(SMALL_TIER) large=$(LARGE_TIER) output=runs/cascade/eval metric=next_token
	$(PY) -m cascade.calibrate small=$(SMALL_TIER) large=$(LARGE_TIER) out=runs/cascade/tiny_base metric=next_token

bench: install
	$(PY) benchmarks/moe_layer.py

clean:
	rm -rf $(VENV) outputs runs
