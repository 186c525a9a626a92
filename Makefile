# The two commands of the README: `make demo` (set up, then run the quickstart sweep) and `make test`
# (set up, then run the whole test suite). Both create ./.venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test install lint

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) -m sweeper run search_spaces/quickstart.yaml

# Two workers, one test file each at a time (module-scoped Ray stays per file): most of the suite waits on
# processes starting and services answering, so on 2 cores this takes 12.5 minutes instead of 14.5.
test: $(VENV)/.installed
	$(PY) -m pytest -n 2 --dist loadfile

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check sweeper trainables tests benchmarks
