# Fresh machine: `make run` (set up + sample the built-in model), `make test` (set up + test suite).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup run latency test test-fast bench clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(BIN)/specdit generate --model $(or $(MODEL),mnist-dit) --sampler speculative --drafter $(or $(DRAFTER),x0) \
		--verify block --draft-length auto --cfg-scale 1.5 --steps 250 --num-samples 16 --batch-size 1 --out outputs/run

latency: $(STAMP)  ## latency and throughput tables, ddpm at 1..all cores (quiet machine, ~45 min): docs/latency/
	$(BIN)/python benchmarks/latency_tables.py --reruns 8 --out docs/latency

test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=15

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

bench: $(STAMP)
	$(BIN)/specdit bench --model gmm-2d --steps 250 --num-samples 2000 --threads 1 --markdown

clean:
	rm -rf $(VENV) outputs .pytest_cache
