# Set-up is two commands: `make demo` and `make test`. Both create .venv and install into it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch is installed first, so the project's range is already satisfied and pip
# never pulls a multi-GB CUDA wheel. On a CUDA machine: make install TORCH_SPEC=torch
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
# FAISS: the cpu extra here; on a CUDA machine: make install TORCH_SPEC=torch EXTRAS=gpu,dev
EXTRAS ?= cpu,dev
STAMP := $(VENV)/.installed

.PHONY: install demo test test-slow lint format bench clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	$(BIN)/pip install -q "$(TORCH_SPEC)" || $(BIN)/pip install -q "$(TORCH_SPEC)" --index-url $(TORCH_INDEX)
	$(BIN)/pip install -q -e ".[$(EXTRAS)]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/twostage demo --project demo-project

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/ruff check twostage tests tools
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

test-slow: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m slow

lint: $(STAMP)
	$(BIN)/ruff check twostage tests tools
	$(BIN)/ruff format --check twostage tests tools

format: $(STAMP)
	$(BIN)/ruff format twostage tests tools
	$(BIN)/ruff check --fix twostage tests tools

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python tools/bench/run_all.py

clean:
	rm -rf $(VENV) demo-project build *.egg-info
