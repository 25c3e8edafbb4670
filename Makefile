# omnipeft: the two set-up commands are `make demo` and `make test` (see README.md).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-omnipeft
export PYTHONUNBUFFERED := 1

.PHONY: setup demo test lint format bench clean demo-core \
	demo-vision demo-diffusion demo-audio demo-medical demo-nlp

setup: $(STAMP)

# Re-install whenever the dependency list changes; pip takes the pinned torch/torchvision
# wheels from the machine's local index and the rest from the package registry.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip setuptools wheel
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

# The main job: the vision pipeline end to end on a VTAB-format task built from real
# scanned digits (scikit-learn), LoRA on a small ViT, through the LightningCLI.
demo: setup
	$(PY) -m vision.demo

# One demo per domain, each end to end on data the project generates; demo-core shows the
# core API alone (inject, report, save/load, merge) on a small ViT.
demo-vision: setup
	$(PY) -m vision.demo
demo-core: setup
	$(PY) -m core.demo --backbone vit
demo-diffusion: setup
	$(PY) -m diffusion.demo
demo-audio: setup
	$(PY) -m audio.demo
demo-medical: setup
	$(PY) -m medical.demo --out runs/medical_demo
demo-nlp: setup
	$(PY) -m nlp.demo

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: setup
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

test: lint
	$(PY) -m pytest

bench: setup
	$(PY) -m bench --markdown bench/results.md

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache
