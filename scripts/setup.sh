#!/usr/bin/env bash
# One-time (and idempotent) set-up: a virtualenv in .venv with the harness and its dependencies.
# The first run compiles llama.cpp through llama-cpp-python (~7-10 min on 2 cores); pip caches the wheel,
# so later runs take seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
# Some virtual machines advertise AMX in CPUID but fault on its instructions (SIGILL in ggml's AMX kernels,
# seen on this project's machines). A native build would use them, so build without AMX: decode does not
# need it. Only where the compiler knows the flags.
if [ "$(uname -m)" = x86_64 ] && echo 'int main(void){return 0;}' | ${CC:-cc} -mno-amx-tile -x c -o /dev/null - 2>/dev/null; then
  export CFLAGS="${CFLAGS:-} -mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
  export CXXFLAGS="${CXXFLAGS:-} -mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
fi
.venv/bin/python -m pip install --disable-pip-version-check -q -e ".[test,cluster]"
.venv/bin/python -c "import llama_cpp, harness; print('harness ready: llama-cpp-python', llama_cpp.__version__)"
