# emu: `make demo` runs the miniature end to end; `make test` runs the fast tests. Both install first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO := outputs/demo
DEMO_CORPUS ?= 20000

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

# The miniature end to end, as far as the recipe is built so far. Stages whose outputs exist are skipped.
demo: install
	@test -f $(DEMO)/haystack/haystack.json || $(PY) -m emu.data.haystack --n $(DEMO_CORPUS) --seed 0 \
		--out $(DEMO)/haystack --workers 2
	$(PY) bench/data_throughput.py data=webdataset "data.source.shards=$(DEMO)/haystack/*.tar" \
		data.num_workers=2 batches=50 grid=$(DEMO)/haystack/first_batch.png
	@test -f $(DEMO)/judge/checkpoints/last.ckpt || $(PY) train.py experiment=mini/judge hydra.run.dir=$(DEMO)/judge
	@test -f $(DEMO)/autoencoder_16ch/export/config.json || $(PY) train.py experiment=mini/autoencoder \
		hydra.run.dir=$(DEMO)/autoencoder_16ch
	@test -f $(DEMO)/autoencoder_4ch/export/config.json || $(PY) train.py experiment=mini/autoencoder_4ch \
		hydra.run.dir=$(DEMO)/autoencoder_4ch
	$(PY) -m emu.evaluation.reconstruction $(DEMO)/autoencoder_16ch/export $(DEMO)/autoencoder_4ch/export \
		--haystack 512 --photos --out $(DEMO)/autoencoder_eval.json
	@test -f $(DEMO)/clip/export/config.json || $(PY) train.py experiment=mini/clip hydra.run.dir=$(DEMO)/clip
	@test -f $(DEMO)/t5/config.json || $(PY) -m emu.text.mini_t5 --out $(DEMO)/t5
	@test -f $(DEMO)/stage1/checkpoints/last.ckpt || $(PY) train.py experiment=mini/stage1_pretrain \
		hydra.run.dir=$(DEMO)/stage1
	@test -f $(DEMO)/prompts_heldout.txt || $(PY) -m emu.data.haystack --captions --n 64 --start 1000000 \
		--out $(DEMO)/prompts_heldout.txt
	@test -f $(DEMO)/stage1/samples/grid.png || $(PY) sample.py ckpt=$(DEMO)/stage1/checkpoints/last.ckpt \
		prompts=$(DEMO)/prompts_heldout.txt out=$(DEMO)/stage1/samples hydra.run.dir=$(DEMO)/stage1/samples
	$(PY) -m emu.evaluation.prompt_following $(DEMO)/stage1/samples --clip $(DEMO)/clip/export
	@test -f $(DEMO)/aesthetic.safetensors || $(PY) -m emu.curation.aesthetic --clip $(DEMO)/clip/export \
		--out $(DEMO)/aesthetic.safetensors
	$(PY) curate.py hydra.run.dir=$(DEMO)/curate
	@test -f $(DEMO)/stage2/checkpoints/last.ckpt || $(PY) train.py experiment=mini/stage2_quality_tune \
		hydra.run.dir=$(DEMO)/stage2
	@test -f $(DEMO)/stage2/samples/grid.png || $(PY) sample.py ckpt=$(DEMO)/stage2/checkpoints/select/best.ckpt \
		prompts=$(DEMO)/prompts_heldout.txt out=$(DEMO)/stage2/samples hydra.run.dir=$(DEMO)/stage2/samples
	@test -f $(DEMO)/eval/metrics.json || $(PY) eval.py a=$(DEMO)/stage2/checkpoints/select/best.ckpt \
		b=$(DEMO)/stage1/checkpoints/last.ckpt name_a=quality_tuned name_b=pretrained prompts=haystack:256 \
		clip=$(DEMO)/clip/export aesthetic=$(DEMO)/aesthetic.safetensors judge=pixel \
		fid.reference=haystack_needles:1024 out=$(DEMO)/eval hydra.run.dir=$(DEMO)/eval
	@echo "demo outputs in $(DEMO)/"

bench: install
	$(PY) bench/data_throughput.py data=haystack data.num_workers=2 batches=50

clean:
	rm -rf outputs .pytest_cache .ruff_cache
