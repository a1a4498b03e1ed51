# Two commands for a newcomer: `make demo` and `make test`. Both bootstrap .venv from nothing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The CPU build of torch that these machines carry; elsewhere pip fetches it from the index.
TORCH_CPU ?= torch==2.13.0
MODEL ?=
DEMO_OUT ?= demo-output

.PHONY: demo test test-slow lint format clean bench bench-gpu constraints image

AZURITE := tests/azurite/node_modules/.bin/azurite-blob

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH_CPU)"
	$(BIN)/python -m pip install -q --constraint constraints.txt -e ".[dev]"
	touch $(STAMP)

# Azurite, the Azure Blob server the storage tests start, at the version tests/azurite/package-lock.json pins.
$(AZURITE): tests/azurite/package.json tests/azurite/package-lock.json
	npm ci --prefix tests/azurite --no-audit --no-fund --loglevel=error
	touch $(AZURITE)

demo: $(STAMP)
	$(BIN)/python -m pipeline.demo --output $(DEMO_OUT) $(if $(MODEL),--model $(MODEL))

lint: $(STAMP)
	$(BIN)/ruff check pipeline jobs tests benchmarks
	$(BIN)/ruff format --check pipeline jobs tests benchmarks
	$(BIN)/hadolint infra/Dockerfile

format: $(STAMP)
	$(BIN)/ruff format pipeline jobs tests benchmarks
	$(BIN)/ruff check --fix pipeline jobs tests benchmarks

test: lint $(AZURITE)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP) $(AZURITE)
	$(BIN)/python -m pytest -q -m slow

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache tests/azurite/node_modules

bench: $(STAMP)
	$(BIN)/python -m benchmarks.throughput $(BENCH_ARGS)

# On a machine with an NVIDIA GPU and torch with CUDA (see benchmarks/gpu.sh).
bench-gpu:
	PYTHON=$(or $(GPU_PYTHON),python3) bash benchmarks/gpu.sh

# The versions CI installs and the image uses, from the current .venv (torch left out: see the file).
constraints:
	{ sed -n '1,3p' constraints.txt; $(BIN)/python -m pip freeze --exclude-editable | grep -viE '^(torch|neobert-pipeline)=='; } > constraints.new
	mv constraints.new constraints.txt

# On a machine with Docker: the image of infra/Dockerfile, tagged with the package version.
IMAGE ?= neobert-pipeline
image:
	docker build -f infra/Dockerfile -t $(IMAGE):$$($(PYTHON) -c "import tomllib; print(tomllib.load(open('pyproject.toml', 'rb'))['project']['version'])") .
