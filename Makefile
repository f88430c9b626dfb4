# emu: `make demo` runs the miniature end to end; `make test` runs the fast tests. Both install first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO ?= outputs/demo$(if $(filter-out mini,$(SCALE)),_$(SCALE))
SCALE ?= mini

.PHONY: install test test-all lint format demo bench clean

install: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -r requirements.txt -r requirements-dev.txt
	$(VENV)/bin/pip install --quiet --no-deps -e .
	touch $(STAMP)

test: install  ## fast tests (< 10 min on 2 cores)
	$(PY) -m pytest

test-all: install  ## everything, slow tests included
	$(PY) -m pytest -m "not gpu"

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# The miniature end to end (emu/demo): every stage through the real entry points, then outputs/demo/REPORT.md.
# Finished stages are skipped and an interrupted run resumes; FORCE=1 reruns everything.
demo: install  ## the whole recipe in miniature (SCALE=mini|tiny|gpu; FORCE=1 starts over)
	$(PY) -m emu.demo --scale $(SCALE) --out $(DEMO) $(if $(FORCE),--force)

# The CPU benchmarks (each about a minute on 2 cores); the GPU commands are in each script's docstring.
bench: install  ## data pipeline, U-Net and autoencoder training step vs diffusers, sampling s/image
	$(PY) bench/data_throughput.py data=haystack data.num_workers=2 batches=50
	$(PY) bench/unet_step.py --config mini --device cpu --steps 5 --rounds 7
	$(PY) bench/autoencoder_step.py --config mini --device cpu --steps 5 --rounds 7
	$(PY) bench/sampling.py --config mini --device cpu --repeats 3

clean:
	rm -rf outputs .pytest_cache .ruff_cache
