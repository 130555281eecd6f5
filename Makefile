# Everything a fresh machine needs, in one place. `make bench` and `make test`
# set up .venv on first use (torch, dependencies, the C++ engine) and then run.
PYTHON ?= python3
# The torch to build against. The default is the CPU wheel this project is
# developed with; use e.g. TORCH="torch==2.13.0 --index-url <your CUDA index>" for GPUs.
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.chopgrad-installed
BUILD := build
SOURCES := setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h)

.PHONY: install test pytest ctest bench acceptance bench-full memory-scaling clean

install: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python $(SOURCES)
	$(BIN)/pip install --quiet $(TORCH) "setuptools>=77" ninja pybind11 cmake
	$(BIN)/pip install --quiet --no-build-isolation -e ".[test,triton]"
	touch $@

# The C++ engine's own test, built with CMake against the libtorch inside the torch wheel.
ctest: $(STAMP)
	$(BIN)/cmake -S . -B $(BUILD) -DCMAKE_PREFIX_PATH="$$($(BIN)/python -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')" > /dev/null
	$(BIN)/cmake --build $(BUILD) -j2
	$(BIN)/ctest --test-dir $(BUILD) --output-on-failure

pytest: $(STAMP)
	$(BIN)/python -m pytest -q

test: ctest pytest

# The main job: pixel-loss training-step benchmark on the built-in default model,
# then the project's acceptance bars on its results (a failed bar is reported, and
# does not fail the benchmark run; `make acceptance` alone exits 1 on it).
bench: $(STAMP)
	$(BIN)/chopgrad bench --quick --out bench_out
	-$(BIN)/python benchmarks/acceptance.py bench_out/results.json

acceptance: $(STAMP)
	$(BIN)/python benchmarks/acceptance.py bench_out/results.json

bench-full: $(STAMP)
	$(BIN)/chopgrad bench --out bench_out

memory-scaling: $(STAMP)
	$(BIN)/python benchmarks/memory_scaling.py --results benchmarks/RESULTS.md

clean:
	rm -rf $(BUILD) bench_out chopgrad/_C*.so *.egg-info
