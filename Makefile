# `make test` and `make bench` (the README's two commands), their longer forms
# `make test-all` and `make bench-full`, `make docs`, `make install` and
# `make clean`. Every target but clean creates .venv if missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test test-all bench bench-full docs install clean

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

# The documentation site, warnings as errors; executes the notebooks; then
# checks that a page loads MathJax (and everything else) from the site itself.
docs: $(DOCS_STAMP)
	$(PY) -m sphinx -b html -W --keep-going docs docs/_build/html
	$(PY) -m pytest -q -p no:cacheprovider tests/test_docs.py -k without_a_network

# The README's test command and CI: everything but the tests marked slow
# (tests/conftest.py says which). A crashed worker ends the run at once.
test: $(STAMP)
	$(PY) -m pytest -n 2 --dist loadfile --max-worker-restart=0 -m "not slow" optax_mtl tests

# Everything, the slow tier included (about two minutes more).
test-all: $(STAMP)
	$(PY) -m pytest -n 2 --dist loadfile --max-worker-restart=0 optax_mtl tests

# The quick suite: every strategy on the built-in problems, 2 seeds, step
# time at T = 10 (at most 10 minutes on 2 cores; benchmarks/README.md).
bench: $(STAMP)
	$(PY) -m benchmarks

# The publication run behind benchmarks/RESULTS.md (5 seeds, larger
# problems, both speed models at every T; its time is in the README).
bench-full: $(STAMP)
	$(PY) -m benchmarks --suite full

clean:
	rm -rf $(VENV) bench_results .pytest_cache
