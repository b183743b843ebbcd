# Two commands matter on a fresh machine: `make demo` and `make test`.
# Each creates or refreshes .venv: torch is installed first and pinned (a CPU build),
# so that the package's own `torch>=2.4` never pulls a multi-GB CUDA build.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: venv demo test bench lint clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: venv
	$(PY) examples/demo.py

test: venv
	$(PY) -m pytest

# OpenBLAS (numpy's) spins ~0.1 s after each call by default, starving the next impl's
# threads in interleaved timing; 2^20 cycles (~0.4 ms) keeps its back-to-back calls hot.
bench: venv
	for suite in runtime lang gemm comm; do \
	    OPENBLAS_THREAD_TIMEOUT=20 $(VENV)/bin/tessera bench $$suite --json bench-$$suite.json; \
	done

lint: venv
	$(VENV)/bin/ruff check src tests examples

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .ruff_cache
