# Everything a user or CI needs runs from here; each target sets up the
# virtualenv first, so a fresh clone needs only Python 3.11+ and make.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: install test unit integration demo bench docs lint dist release-tools clean regenerate-plugin-cache

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip 'setuptools>=77' wheel
	$(BIN)/python -m pip install --quiet -e '.[test]'
	$(MAKE) --no-print-directory regenerate-plugin-cache
	touch $(STAMP)

# twistd and the worker find plugins through twisted.plugin, which caches
# what it found in dropin.cache files; building them once here saves every
# later start the scan (and matters for read-only installs).
regenerate-plugin-cache:
	$(BIN)/python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))"
	$(BIN)/python -c "import taskbroker.plugins as p; from twisted.plugin import getPlugins; from taskbroker.interfaces import ITaskHandler; list(getPlugins(ITaskHandler, p))"

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

unit: $(STAMP)
	$(BIN)/python -m pytest tests/unit $(PYTEST_ARGS)

integration: $(STAMP)
	$(BIN)/python -m pytest tests/integration $(PYTEST_ARGS)

demo: $(STAMP)
	$(BIN)/python -m taskbroker.demo

# The benchmark suite (benchmarks/, `python -m benchmarks --help`): real
# daemons on default settings, the storage-less floor, and Celery and RQ
# where Redis answers (in bench-results/.venv-compare, made on first use).
# Prints the table and writes bench-results/latest.json and latest.txt.
# BENCH_ARGS passes options, e.g. make bench BENCH_ARGS="--only latency".
BENCH_ARGS ?=

bench: $(STAMP)
	$(BIN)/python -m benchmarks $(BENCH_ARGS)

# One run of smaller workloads, for development (about a minute).
.PHONY: bench-quick
bench-quick: $(STAMP)
	$(BIN)/python -m benchmarks --quick $(BENCH_ARGS)

# The docs build needs Sphinx (the "docs" extra); the tests never do.
# -W turns every warning into an error, so a broken reference or a
# docstring autodoc cannot render fails the build.
DOCS_STAMP := $(VENV)/.docs-stamp

$(DOCS_STAMP): $(STAMP) setup.cfg
	$(BIN)/python -m pip install --quiet -e '.[docs]'
	touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)
	$(BIN)/python -m sphinx -W --keep-going -b html docs docs/_build/html

# ruff's rules, mypy, and ruff's formatting (checked, never applied here),
# all configured in pyproject.toml; the tools are the "lint" extra.  The
# format check comes last, so that the other two report first; it names
# each file it would change (ruff format --diff shows how).
LINT_STAMP := $(VENV)/.lint-stamp

$(LINT_STAMP): $(STAMP) setup.cfg
	$(BIN)/python -m pip install --quiet -e '.[lint]'
	touch $(LINT_STAMP)

lint: $(LINT_STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/ruff format --check --output-format concise .

# The sdist and the wheel in dist/, checked by twine ("release" extra).
# .ci/wheel-check goes further: it installs the wheel in a virtualenv of
# its own and runs a task with it.
RELEASE_STAMP := $(VENV)/.release-stamp

$(RELEASE_STAMP): $(STAMP) setup.cfg
	$(BIN)/python -m pip install --quiet -e '.[release]'
	touch $(RELEASE_STAMP)

release-tools: $(RELEASE_STAMP)

dist: $(RELEASE_STAMP)
	rm -rf dist
	$(BIN)/python -m build --outdir dist .
	$(BIN)/python -m twine check --strict dist/*

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .hypothesis demo-run
	find . -name dropin.cache -delete
