# Two commands set up and exercise everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

export NO_ALBUMENTATIONS_UPDATE := 1
export PYTHONUNBUFFERED := 1

.PHONY: install demo test test-fast bench clean-demo

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip>=24" "setuptools<81" wheel

# Reinstall only when the dependency list changes.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# The whole chain on the embedded demo world: download it, bootstrap the scorer model (a short CLIP run
# on the world's pretraining pool, exported: the demo's stand-in for a pretrained tag), build the
# dataset with rule- and model-based curation and its mix, train DALIP (tiny config, CPU, a few
# minutes), then zero-shot on the demo's held-out species. Reruns skip what is done.
demo: $(STAMP)
	$(VENV)/bin/plantmix build pipelines/demo.yaml --out builds/demo --until hashes
	$(VENV)/bin/dalip train --config configs/dalip-scorer.yaml --resume latest
	$(VENV)/bin/dalip export runs/scorer --out builds/demo/scorer
	$(VENV)/bin/plantmix build pipelines/demo.yaml --out builds/demo
	$(VENV)/bin/dalip train --config configs/dalip-demo.yaml --resume latest
	$(VENV)/bin/dalip eval runs/demo --config configs/dalip-demo-eval.yaml

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

clean-demo:
	rm -rf builds/demo runs/demo runs/scorer
