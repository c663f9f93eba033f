# `make run` and `make test` do all set-up themselves (scripts/setup.sh, idempotent): llama-cpp-python built for
# this machine's accelerator (CUDA, HIP, Vulkan, Metal, else the CPU; HARNESS_BACKEND= overrides), with RPC.
CONFIG ?= configs/1b-synthetic.yaml
PY := .venv/bin/python

.PHONY: setup run test test-all test-other-host lint
setup:
	bash scripts/setup.sh

run: setup
	$(PY) -m harness run $(CONFIG)

# test: the suite less the tests marked slow (under 4 min on 2 cores); test-all: every test (what CI runs).
PYTEST_ARGS := -m "not slow"
test-all: PYTEST_ARGS :=
test test-all:
	bash scripts/setup.sh test
	$(PY) -m ruff check harness tests
	$(PY) -m pytest -q $(PYTEST_ARGS)

# the suite less the slow tests as another host (tests/hostsim/README.md): an Intel Xeon's CPU identity and an
# NVIDIA driver answering NVML beside a CPU build; CI runs it after test-all
test-other-host:
	PYTHONPATH=tests/hostsim HARNESS_CPUINFO=tests/hostsim/cpuinfo-xeon-amx.txt $(PY) -m pytest -q -m "not slow"

lint: setup
	$(PY) -m ruff check harness tests
