# Two commands do all the set-up: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
NBVAL := --nbval --nbval-current-env --nbval-sanitize-with notebooks/nbval_sanitize.cfg

.PHONY: venv demo test notebooks clean truss-reference

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

# The real truss (0.18.36) in a venv of its own, from ../shared/truss_reference: tests validate
# every export with it. Required when that reference is there (CI), skipped with a note otherwise.
TRUSS_SETUP := ../shared/truss_reference/setup.sh

truss-reference:
	@if [ -x $(TRUSS_SETUP) ]; then $(TRUSS_SETUP) >/dev/null; else echo "note: $(TRUSS_SETUP) not found; truss checks will be skipped"; fi

# pytest's exit code 5 (nothing collected) is non-zero, so make fails on it too.
test: $(STAMP) truss-reference
	KM_REQUIRE_TRUSS=$$([ -x $(TRUSS_SETUP) ] && echo 1) $(PY) -m pytest tests notebooks/quickstart.ipynb notebooks/streaming.ipynb $(NBVAL)

# Regenerate the example notebooks from notebooks/make_notebooks.py and store fresh outputs.
notebooks: $(STAMP)
	$(PY) notebooks/make_notebooks.py
	$(PY) notebooks/execute.py notebooks/quickstart.ipynb notebooks/streaming.ipynb

clean:
	rm -rf $(VENV) demo-out .pytest_cache
