# The two commands of the README: `make demo` (the main job) and `make test` (the suite).
# Each builds its own virtual environment on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch that this workplace keeps on disk; set TORCH_SPEC for another build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test gpu-test tiny-model clean

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev,triton]"
	touch $@

demo: $(VENV)/.installed
	$(PY) examples/train_demo.py $(ARGS)

test: $(VENV)/.installed
	$(PY) -m pytest -q tests $(ARGS)

tiny-model: $(VENV)/.installed
	$(PY) scripts/make_tiny_model.py

clean:
	rm -rf $(VENV) runs .pytest_cache
