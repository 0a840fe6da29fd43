# Fresh machine: `make demo` or `make test`; each sets up .venv first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
SUITE  ?= smoke
FAISS  ?= cpu  # or gpu: faiss-gpu-cu12 instead of faiss-cpu (the extras exclude each other)
ARGS   ?=

.PHONY: setup test test-fast demo suite report status bench bench-gpu clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[test,$(strip $(FAISS))]'
	touch $@

test: setup
	$(BIN)/python -m pytest -q -ra $(ARGS)

# the inner loop: everything but the slow and the SLURM tests (a few minutes on 2 cores)
test-fast: setup
	$(BIN)/python -m pytest -q -ra -m "not slow and not slurm" $(ARGS)

demo: setup
	$(BIN)/python run_suite.py run demo --executor local --jobs 2 $(ARGS)

suite: setup
	$(BIN)/python run_suite.py run $(SUITE) $(ARGS)

status: setup
	$(BIN)/python run_suite.py status $(SUITE)

report: setup
	$(BIN)/python run_suite.py report $(SUITE) $(ARGS)

bench: setup
	$(BIN)/python benchmarks/run_all.py $(ARGS)

bench-gpu: setup
	$(BIN)/python benchmarks/bench_gpu.py $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
