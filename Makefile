# The two commands of the README: `make demo` (the main job) and `make test` (the suite).
# Each builds its own virtual environment on first use.
#
# `make test` runs the suite on the newest transformers / PEFT releases, `make test-floor` on the
# oldest we support; CI (.ci/run) runs both. To move an end, change its pins here and in README.md.
PYTHON ?= python3
# The CPU build of torch that this workplace keeps on disk; set TORCH_SPEC for another build.
TORCH_SPEC ?= torch==2.13.0
NEWEST_SPEC ?= transformers==5.25.0 peft==0.22.0
# TRL's SFTTrainer is tested at the floor only: TRL 1.16 holds transformers below 5.25.
FLOOR_SPEC ?= transformers==5.17.0 peft==0.21.0
VENV ?= .venv
FLOOR_VENV ?= .venv-floor
PY := $(VENV)/bin/python
FLOOR_PY := $(FLOOR_VENV)/bin/python

.PHONY: demo test test-floor tiny-model clean

$(VENV)/.installed: setup.cfg pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test,triton]" $(NEWEST_SPEC)
	touch $@

$(FLOOR_VENV)/.installed: setup.cfg pyproject.toml Makefile
	$(PYTHON) -m venv $(FLOOR_VENV)
	$(FLOOR_PY) -m pip install -q --upgrade pip
	$(FLOOR_PY) -m pip install -q "$(TORCH_SPEC)"
	$(FLOOR_PY) -m pip install -q -e ".[test,trl,triton]" $(FLOOR_SPEC)
	touch $@

demo: $(VENV)/.installed
	$(PY) examples/train_demo.py $(ARGS)

test: $(VENV)/.installed
	$(PY) -m pytest -q tests $(ARGS)

test-floor: $(FLOOR_VENV)/.installed
	$(FLOOR_PY) -m pytest -q tests $(ARGS)

tiny-model: $(VENV)/.installed
	$(PY) scripts/make_tiny_model.py

clean:
	rm -rf $(VENV) $(FLOOR_VENV) runs .pytest_cache
