# Two commands matter on a fresh machine: `make demo` and `make test`.
# Each first installs the system packages it needs that are missing (scripts/sysdeps.sh:
# apt-get as root or with sudo, else it stops with the command to run), then creates or
# refreshes .venv: torch is installed first and pinned (a CPU build), so that the
# package's own `torch>=2.4` never pulls a multi-GB CUDA build.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
# Tests that launch no multi-process job, need no Open MPI and take seconds, not minutes.
QUICK := not ranks and not slow and not mpi
# pytest-xdist workers: kernels compile single-threaded, so two keep two cores busy.
JOBS ?= 2

.PHONY: venv demo test test-quick bench lint clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

demo:
	scripts/sysdeps.sh cc
	$(MAKE) --no-print-directory venv
	$(PY) examples/demo.py

test:
	scripts/sysdeps.sh cc mpi opencl
	$(MAKE) --no-print-directory venv
	TESSERA_REQUIRE_OPENCL=1 $(PY) -m pytest -n $(JOBS) --dist worksteal -rs

# Keeps its compile cache in .venv between runs: the first run builds every kernel.
test-quick:
	scripts/sysdeps.sh cc
	$(MAKE) --no-print-directory venv
	TESSERA_TEST_CACHE=$(VENV)/test-cache $(PY) -m pytest -n $(JOBS) --dist worksteal -m "$(QUICK)"

# OpenBLAS (numpy's) spins ~0.1 s after each call by default, starving the next impl's
# threads in interleaved timing; 2^20 cycles (~0.4 ms) keeps its back-to-back calls hot.
bench:
	scripts/sysdeps.sh cc mpi
	$(MAKE) --no-print-directory venv
	for suite in runtime lang gemm ops comm; do \
	    OPENBLAS_THREAD_TIMEOUT=20 $(VENV)/bin/tessera bench $$suite --json bench-$$suite.json; \
	done

lint: venv
	$(VENV)/bin/ruff check src tests examples

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .ruff_cache
