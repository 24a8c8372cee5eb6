# The two commands of the README. Each sets up its own virtual environment first.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup test bench compile-report lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml CMakeLists.txt scripts/setup_env.sh
	VENV=$(VENV) scripts/setup_env.sh
	touch $@

# The whole test suite (CPU: Triton interpreter + gloo; GPU: compiled kernels).
test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

# The main job until the trainer lands: the kernel benchmark (small CPU shapes without a GPU).
bench: setup
	$(PY) -m eurocore.benchmarks $(BENCH_ARGS)

compile-report: setup
	$(PY) -m eurocore.benchmarks compile

lint: setup
	$(PY) -m ruff check .

clean:
	rm -rf build $(VENV) .pytest_cache .ruff_cache
