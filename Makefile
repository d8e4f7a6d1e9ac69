# eksft-pipeline front door. Quick start on a fresh machine (CPU, embedded tiny default):
#   make install && make reproduce MODEL=tiny
#   make test
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
MODEL ?= tiny
METHODS ?= eksft
# cluster: cpu for the tiny model, the 8-GPU node otherwise (override with CLUSTER=...)
CLUSTER ?= $(if $(filter tiny,$(MODEL)),cpu,8gpu)
RUN_DIR ?= runs/$(MODEL)
DRY_RUN ?= 0
ARGS ?=
PYTEST_ARGS ?=
comma := ,
HYDRA_COMMON = model=$(MODEL) cluster=$(CLUSTER) run_dir=$(RUN_DIR) dry_run=$(if $(filter 1 true yes,$(DRY_RUN)),true,false) $(ARGS)

.PHONY: install install-gpu tiny-model reproduce report test test-fast test-long lint bench clean-runs help

# This list: every target, described by the first line of the comment above it.
help:
	@echo "eksft-pipeline make targets (variables: MODEL=$(MODEL) METHODS=$(METHODS) CLUSTER=$(CLUSTER) RUN_DIR=$(RUN_DIR) DRY_RUN=$(DRY_RUN) ARGS=...):"
	@awk '/^# /{ if (d == "") d = substr($$0, 3); next } \
	     /^[a-zA-Z][a-zA-Z0-9_.-]*:/ { split($$0, a, ":"); printf "  make %-12s %s\n", a[1], d } { d = "" }' $(firstword $(MAKEFILE_LIST))
	@echo "examples: make reproduce MODEL=tiny | make reproduce MODEL=tiny METHODS=sft,eksft | make reproduce MODEL=qwen3-8b DRY_RUN=1"
	@echo "the pipeline's own options: $(PY) -m eksft_pipeline --help"

$(STAMP): pyproject.toml scripts/constraints-cpu.txt
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c scripts/constraints-cpu.txt -e ".[dev]"
	@touch $(STAMP)

# CPU install: .venv with torch CPU 2.13.0 (scripts/constraints-cpu.txt), the package editable.
install: $(STAMP)

# GPU node: verl[vllm] brings its CUDA torch; no CPU constraints here.
install-gpu:
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -e ".[gpu,dev]"

# Build the tiny CPU model, tokenizer and data (stage=assets).
tiny-model: $(STAMP)
	$(PY) -m eksft_pipeline stage=assets model=tiny cluster=cpu run_dir=$(RUN_DIR)

# One method: stage=all (assets split sft handoff rl eval report).
# Several methods: a Hydra multirun over method=... for the training stages, then one report.
reproduce: $(STAMP)
ifeq ($(words $(subst $(comma), ,$(METHODS))),1)
	$(PY) -m eksft_pipeline stage=all method=$(METHODS) $(HYDRA_COMMON)
else
	$(PY) -m eksft_pipeline -m stage=train_eval method=$(METHODS) $(HYDRA_COMMON)
	$(PY) -m eksft_pipeline stage=report $(HYDRA_COMMON)
endif

# The report of RUN_DIR (stage=report): tables, figures, every stage's numbers.
report: $(STAMP)
	$(PY) -m eksft_pipeline stage=report $(HYDRA_COMMON)

# Everything CI runs (the tiny end-to-end run included); `long` tests are left to test-long.
test: $(STAMP)
	$(PY) -m pytest -m "not long" $(PYTEST_ARGS)

# Unit tests only: no verl/Ray run, no end-to-end run.
test-fast: $(STAMP)
	$(PY) -m pytest -m "not long and not slow and not e2e" $(PYTEST_ARGS)

# Tests longer than CI's budget (marker `long`).
test-long: $(STAMP)
	$(PY) -m pytest -m long $(PYTEST_ARGS)

# ruff over the package, scripts and tests.
lint: $(STAMP)
	$(PY) -m ruff check eksft_pipeline scripts tests

# Benchmarks: fused vs naive EKSFT head, reward throughput (ratios measured in one run).
bench: $(STAMP)
	$(PY) scripts/bench_loss.py
	$(PY) scripts/bench_reward.py

# Delete runs/ (every run directory under it).
clean-runs:
	rm -rf runs/
