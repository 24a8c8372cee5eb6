# The commands of the README. Each sets up its own virtual environment first.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup train test bench compile-report lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml CMakeLists.txt scripts/setup_env.sh
	VENV=$(VENV) scripts/setup_env.sh
	touch $@

# The main job: train the tiny model with TP=2 and sequence parallelism on 2 processes
# (gloo on the CPU, NCCL/RCCL on GPUs), loss falling toward the data's entropy floor.
train: setup
	$(VENV)/bin/torchrun --nproc-per-node 2 -m eurocore.train --tp 2 --sequence-parallel $(TRAIN_ARGS)

# The whole test suite (CPU: Triton interpreter + gloo; GPU: compiled kernels).
test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

# The kernel benchmark (small CPU shapes without a GPU).
bench: setup
	$(PY) -m eurocore.benchmarks $(BENCH_ARGS)

compile-report: setup
	$(PY) -m eurocore.benchmarks compile

lint: setup
	$(PY) -m ruff check .

clean:
	rm -rf build $(VENV) .pytest_cache .ruff_cache
