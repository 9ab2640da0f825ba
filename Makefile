# Two commands: `make test` and `make bench`. Both create .venv if missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test test-fast bench docs install clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

DOCS_STAMP := $(VENV)/.installed-docs

$(DOCS_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e ".[dev,docs]"
	touch $(DOCS_STAMP)

# The documentation site, warnings as errors; executes the notebooks.
docs: $(DOCS_STAMP)
	$(PY) -m sphinx -b html -W --keep-going docs docs/_build/html

test: $(STAMP)
	$(PY) -m pytest -n 2 --dist loadfile optax_mtl tests

# The inner loop: everything but the tests marked slow (tests/conftest.py).
test-fast: $(STAMP)
	$(PY) -m pytest -n 2 --dist loadfile -m "not slow" optax_mtl tests

bench: $(STAMP)
	$(PY) -m benchmarks

clean:
	rm -rf $(VENV) bench_results .pytest_cache
