# Two commands do all the set-up: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
NBVAL := --nbval --nbval-current-env --nbval-sanitize-with notebooks/nbval_sanitize.cfg

.PHONY: venv demo test notebooks clean

# torch is pinned by constraints.txt: an unpinned torch pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt "torch==2.13.0"
	$(PY) -m pip install -q -c constraints.txt -e ".[test,torch]"
	touch $@

venv: $(STAMP)

demo: $(STAMP)
	$(PY) notebooks/demo.py

# pytest's exit code 5 (nothing collected) is non-zero, so make fails on it too.
test: $(STAMP)
	$(PY) -m pytest tests notebooks/quickstart.ipynb $(NBVAL)

# Regenerate the example notebooks from notebooks/make_notebooks.py and store fresh outputs.
notebooks: $(STAMP)
	$(PY) notebooks/make_notebooks.py
	$(PY) notebooks/execute.py notebooks/quickstart.ipynb

clean:
	rm -rf $(VENV) demo-out .pytest_cache
