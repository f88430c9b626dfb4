# emu: `make demo` runs the miniature end to end; `make test` runs the fast tests. Both install first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO ?= outputs/demo$(if $(filter-out mini,$(SCALE)),_$(SCALE))
SCALE ?= mini

.PHONY: install test test-all rehearsal lint format demo ablations generality preference bench gpu-check gpu-wheels gpu-rehearsal gpu-stack clean

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

rehearsal: install  ## every paper-scale experiment, shrunk, on 2 CPU processes with a kill and a resume (slow)
	$(PY) -m pytest -m slow tests/test_rehearsal.py -x

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# The miniature end to end (emu/demo): every stage through the real entry points, then outputs/demo/REPORT.md.
# Finished stages are skipped and an interrupted run resumes; FORCE=1 reruns everything.
demo: install  ## the whole recipe in miniature (SCALE=mini|tiny|gpu; FORCE=1 starts over; JOBS=1 one step at a time)
	$(PY) -m emu.demo --scale $(SCALE) --out $(DEMO) $(if $(FORCE),--force) $(if $(JOBS),--jobs $(JOBS))

# The paper's ablations in miniature (emu/demo/ablations.py) on top of the demo, which runs (or is skipped) first:
# fewer curated images, as many random ones, no human passes, other training lengths and seeds -> $(DEMO)/ABLATIONS.md.
# Finished arms are skipped; FORCE=1 reruns the ablations (not the demo).
ablations: install  ## the ablations on top of the demo (SCALE=mini|tiny|gpu; FORCE=1 reruns them)
	$(PY) -m emu.demo --scale $(SCALE) --out $(DEMO) $(if $(JOBS),--jobs $(JOBS))
	$(PY) -m emu.demo --ablations --scale $(SCALE) --out $(DEMO) $(if $(FORCE),--force) $(if $(JOBS),--jobs $(JOBS))

# Quality-tuning other architectures (emu/demo/generality.py) on top of the demo, which runs (or is skipped) first: a
# diffusion transformer trained by rectified flow, a pixel-space U-Net and a masked generative transformer, each
# pre-trained, quality-tuned and evaluated against its own pre-trained model -> $(DEMO)/GENERALITY.md. Finished arms are skipped; FORCE=1 reruns them.
generality: install  ## other architectures quality-tuned on top of the demo (SCALE=mini|tiny|gpu; FORCE=1 reruns)
	$(PY) -m emu.demo --scale $(SCALE) --out $(DEMO) $(if $(JOBS),--jobs $(JOBS))
	$(PY) -m emu.demo --generality --scale $(SCALE) --out $(DEMO) $(if $(FORCE),--force) $(if $(JOBS),--jobs $(JOBS))

# Beyond quality-tuning (emu/demo/preference.py) on top of the demo, which runs (or is skipped) first: Diffusion-DPO
# from simulated votes in the annotation app's pair task at several budgets, Diffusion-KTO from the curation's human
# labels, quality-tuning on fewer curated images and quality-tuning followed by DPO, each evaluated against the
# pre-trained model with the human judgments it used -> $(DEMO)/PREFERENCE.md. Finished arms are skipped.
preference: install  ## DPO / KTO vs quality-tuning per human judgment, on top of the demo (SCALE=...; FORCE=1 reruns)
	$(PY) -m emu.demo --scale $(SCALE) --out $(DEMO) $(if $(JOBS),--jobs $(JOBS))
	$(PY) -m emu.demo --preference --scale $(SCALE) --out $(DEMO) $(if $(FORCE),--force) $(if $(JOBS),--jobs $(JOBS))

# The CPU benchmarks (each about a minute on 2 cores); the GPU commands are in each script's docstring.
bench: install  ## data pipeline, U-Net and autoencoder training step vs diffusers, sampling s/image
	$(PY) bench/data_throughput.py data=haystack data.num_workers=2 batches=50
	$(PY) bench/unet_step.py --config mini --device cpu --steps 5 --rounds 7
	$(PY) bench/autoencoder_step.py --config mini --device cpu --steps 5 --rounds 7
	$(PY) bench/sampling.py --config mini --device cpu --repeats 3
	@if [ -d $(DEMO)/autoencoder_16ch/export ]; then $(PY) bench/stage1_step.py $(STAGE1_SHARDS) data.num_workers=1; \
	else echo "bench/stage1_step.py skipped: it needs the demo's models (make demo)"; fi
	@if [ -f $(DEMO)/latents/precompute.json ]; then $(PY) bench/stage1_step.py $(STAGE1_LATENTS) data.num_workers=1; \
	else echo "bench/stage1_step.py on precomputed latents skipped: it needs the demo's latents (make demo)"; fi

# One prepared GPU check (bench/gpu_check.py), unattended, within GPU_CHECK_BUDGET minutes: make install (timed here:
# ~0 s on an installed tree), the gpu tests, U-Net and autoencoder training steps vs diffusers (ratio, MFU, memory),
# sampling s/image at 1024px, stage 1 under FSDP (2.8B U-Net, sharded checkpoint, resume) -> gpu_check.{json,md}.
# Without CUDA the same steps run on tiny configs on CPU (a dry run, about a minute).
GPU_CHECK_OUT ?= outputs/gpu_check
GPU_CHECK_BUDGET ?= 8
GPU_CHECK_DEVICE ?= auto
# On a lent GPU machine with no network (no make, its own Python): bench/gpu_remote.sh with the wheels of
# `make gpu-wheels`; docs/benchmarks.md has the two device calls, ready to paste.
gpu-check:  ## GPU check in GPU_CHECK_BUDGET minutes -> $(GPU_CHECK_OUT) (GPU_CHECK_DEVICE=auto|cuda|cpu)
	@start=$$(date +%s); $(MAKE) --no-print-directory install || exit $$?; end=$$(date +%s); \
	$(PY) bench/gpu_check.py --out $(GPU_CHECK_OUT) --budget-min $(GPU_CHECK_BUDGET) --device $(GPU_CHECK_DEVICE) \
		--install-seconds $$((end - start))

# The wheels a lent GPU machine lacks (bench/gpu_machine/wheels.txt) -> .whl/ (git-ignored), for the device tool to
# carry; needs the package index, prints the total (at most 16 MiB).
gpu-wheels: install  ## wheels of what the GPU machine lacks -> .whl/
	$(PY) bench/gpu_wheels.py --dest .whl

# The GPU machine's run rehearsed here: its package set only (borrowed from FROM, default .venv), the wheels, no
# network, bench/gpu_remote.sh (CPU dry run) -> outputs/gpu_rehearsal/; fails unless every step is ok.
FROM ?= $(VENV)
gpu-rehearsal: install gpu-wheels  ## rehearse bench/gpu_remote.sh offline on the GPU machine's packages
	$(PY) bench/gpu_rehearsal.py --from $(FROM) --out outputs/gpu_rehearsal

# A venv with the GPU machine's versions (bench/gpu_machine/packages.txt: Python 3.12, torch 2.11, torchvision 0.26,
# lightning 2.6.6, transformers 5.17, ...) and the rest of requirements*.txt: `make gpu-rehearsal FROM=.venv-gpu`
# rehearses on those versions, `.venv-gpu/bin/python -m pytest` runs the suite on them (downloads ~3 GB: CUDA torch).
GPU_STACK := .venv-gpu
GPU_PYTHON ?= python3.12
gpu-stack:  ## a venv of the GPU machine's versions -> .venv-gpu (GPU_PYTHON=a Python 3.12)
	$(GPU_PYTHON) -m venv $(GPU_STACK)
	grep -E '^[^#]+==' bench/gpu_machine/packages.txt | grep -v '^python==' > $(GPU_STACK)/constraints.txt
	grep -vE '^(torch|torchvision)==' requirements.txt > $(GPU_STACK)/requirements.txt
	$(GPU_STACK)/bin/pip install --quiet --upgrade pip
	$(GPU_STACK)/bin/pip install --quiet -c $(GPU_STACK)/constraints.txt torch torchvision \
		-r $(GPU_STACK)/requirements.txt -r requirements-dev.txt
	$(GPU_STACK)/bin/pip install --quiet --no-deps -e .

# Stage 1 of the demo on its corpus's shards, and on the latents + text embeddings the demo precomputes
# (emu/diffusion/precompute.py, <demo>/latents): what bench/stage1_step.py times.
STAGE1 := experiment=mini/stage1_pretrain paths.demo_dir=$(DEMO) '~data.source.n_train' '~data.source.n_val'
STAGE1_SHARDS := $(STAGE1) data=webdataset 'data.source.shards=$(DEMO)/haystack/*.tar'
STAGE1_LATENTS := $(STAGE1) data=latents 'data.source.shards=$(DEMO)/latents/train/*.tar'

clean:
	rm -rf outputs .pytest_cache .ruff_cache
