# Two commands do all the set-up: `make demo` and `make test`; `make check` is the one-minute inner loop.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
NOTEBOOKS := notebooks/quickstart.ipynb notebooks/streaming.ipynb notebooks/wine_pipeline.ipynb \
	notebooks/embeddings.ipynb notebooks/tiny_gpt.ipynb notebooks/openai_chat.ipynb
# A run fails if it leaves anything in its temp dir (`make test`: in /tmp, the home directory or the repository
# either). PYTEST_ARGS adds pytest options. `make test` runs on three processes (TEST_PROCESSES="-n 3 --dist
# loadgroup": all the Ray tests in one of them, all the browser tests in one, as tests/conftest.py groups them). The
# Ray tests mostly wait (on Ray's starts and timeouts), so a third process on this 2-core machine uses the CPU they
# leave: 480 tests in 549 s against 618 s with two (benchmarks/README.md); `make test TEST_PROCESSES=` runs them one
# after another.
TEST_PROCESSES ?= -n 3 --dist loadgroup
PYTEST := $(PY) -m pytest $(PYTEST_ARGS)
# The tiers: tests/conftest.py marks tests by what they need; `make check` leaves these out.
CHECK_MARKS := not (ray or browser or truss_ref or package or gallery or slow)

# This machine and CI set PYTHONDONTWRITEBYTECODE: then a module the set-up's warm-up (below) did not import would be
# compiled again by every process that imports it. Python writes its .pyc once instead (atomically: processes may
# race).
unexport PYTHONDONTWRITEBYTECODE

.PHONY: venv demo check test notebooks clean truss-reference browser-deps lab

# torch is pinned by constraints.txt: an unpinned torch pulls a multi-GB CUDA build.
# Installing the project also builds the JupyterLab extension (jlpm, npm registry only).
# uv installs, from the package sources pip is configured with (.ci/uv_pip.py): pip took 4 min 10 s on a fresh
# clone, for the same versions; pip does it where uv cannot be had. The .pyc files of the modules a run imports are
# written (.ci/warm_bytecode.py, 17 s): without them every kernel, server and Ray process compiled torch,
# transformers and FastAPI again (a fresh clone's suite took 924 s instead of 574 s), and writing all of the venv's,
# as pip does, took 45 s. .ci/install_venv.py installs the dependencies first (6 s), then builds the project (about
# 30 s, mostly on one core) beside that warm-up: a fresh clone's venv in 52 s, where the install then the warm-up
# took 61 s.
EXTENSION_SOURCES := extension/package.json extension/yarn.lock extension/.yarnrc.yml extension/tsconfig.json \
	extension/install.json $(wildcard extension/src/*.ts extension/style/* extension/schema/*)
$(STAMP): pyproject.toml constraints.txt .ci/install_venv.py .ci/uv_pip.py .ci/warm_bytecode.py $(EXTENSION_SOURCES)
	$(PYTHON) -m venv $(VENV)
	$(PY) .ci/install_venv.py $(PY) test,serve,ray,examples -c constraints.txt "torch==2.13.0"
	touch $@

venv: $(STAMP)

demo: $(STAMP)
	$(PY) notebooks/demo.py

# The real truss (0.18.36) in a venv of its own, from ../shared/truss_reference: tests validate
# every export with it. Required when that reference is there (CI), skipped with a note otherwise.
TRUSS_SETUP := ../shared/truss_reference/setup.sh

truss-reference:
	@if [ -x $(TRUSS_SETUP) ]; then $(TRUSS_SETUP) >/dev/null; else echo "note: $(TRUSS_SETUP) not found; truss checks will be skipped"; fi

# The browser tests drive Debian's Chromium with Playwright (never `playwright install`).
browser-deps:
	@if [ ! -x /usr/bin/chromium ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "note: /usr/bin/chromium missing and not root: browser tests will be skipped"; fi; fi

# The inner loop: no JupyterLab, Chromium, Ray, package build, Truss reference or gallery (about a minute).
# Pick another slice with pytest's -m, e.g. `.venv/bin/python -m pytest tests -m "ray and not slow"`.
check: $(STAMP)
	$(PYTEST) tests -m "$(CHECK_MARKS)" -n 2 --check-leftovers=tmpdir -q

# Everything: the extension's unit tests, then every test (the gallery notebooks run once, in test_gallery.py,
# their outputs compared with the saved ones). pytest's exit code 5 (nothing collected) fails make too.
test: $(STAMP) truss-reference browser-deps
	cd extension && PATH=$(CURDIR)/$(VENV)/bin:$$PATH jlpm test
	KM_REQUIRE_TRUSS=$$([ -x $(TRUSS_SETUP) ] && echo 1) KM_REQUIRE_BROWSER=$$([ -x /usr/bin/chromium ] && echo 1) \
	  $(PYTEST) $(TEST_PROCESSES) tests --check-leftovers=all --durations=15

# Open the quickstart in JupyterLab (the demo itself stays headless).
lab: $(STAMP)
	$(VENV)/bin/jupyter lab notebooks/quickstart.ipynb

# Regenerate the example notebooks from notebooks/make_notebooks.py and store fresh outputs.
notebooks: $(STAMP)
	$(PY) notebooks/make_notebooks.py
	$(PY) notebooks/execute.py $(NOTEBOOKS)

clean:
	rm -rf $(VENV) demo-out .pytest_cache

# Refresh docs/*.png on purpose (a live stream with its Stop button, the Model panel with a secret row and a real
# export path, narrow and in both themes, a notebook reopened without a kernel); the tests write theirs to a temp dir.
docs-screenshots: $(STAMP) browser-deps
	KM_DOCS_SCREENSHOTS=$(CURDIR)/docs $(PY) -m pytest tests/test_extension.py -p no:cacheprovider \
	  -k "views_saved or live_stream or 250_px"
