# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist
DEMO_OUT ?= runs/demo

.PHONY: demo test test-slow test-flower lint data clean bench

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev,flower]'
	touch $@

data:
	@if [ -f $(FMNIST)/train-images-idx3-ubyte.gz ] || [ -n "$$PRISMFL_DATA_ROOT" ]; then \
		echo "FashionMNIST: found"; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		echo "FashionMNIST: installing the Debian package dataset-fashion-mnist"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null; \
	else \
		echo "FashionMNIST not found. Install it with 'sudo apt-get install dataset-fashion-mnist', or put the"; \
		echo "four IDX files in a folder and set PRISMFL_DATA_ROOT=/that/folder (or data.root in the config)."; \
		exit 2; \
	fi

demo: $(STAMP) data
	rm -rf $(DEMO_OUT)
	$(BIN)/prismfl train --config configs/fmnist-noniid.toml --out $(DEMO_OUT)
	# train-on-synthetic with 10,000 generated images to keep the demo near 10 minutes (docs/results.md uses 60,000)
	$(BIN)/prismfl evaluate $(DEMO_OUT) --synthetic 10000 --out $(DEMO_OUT)/quality.json
	@echo "demo done: see $(DEMO_OUT)/samples.png, $(DEMO_OUT)/curves.png, $(DEMO_OUT)/quality.json"

test: $(STAMP) data
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q

test-slow: $(STAMP) data
	$(BIN)/python -m pytest -q -m slow

# Flower for real: simulation engine, SuperLink + SuperNodes on loopback (insecure, TLS, faults); ~5 minutes
test-flower: $(STAMP) data
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -m slow tests/test_flower_engine.py

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

bench: $(STAMP) data
	$(BIN)/python benchmarks/steps.py

clean:
	rm -rf $(VENV) runs .pytest_cache
