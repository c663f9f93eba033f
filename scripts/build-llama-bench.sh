#!/usr/bin/env bash
# Build llama.cpp's tools (llama-bench, llama-perplexity) from the sources inside the pinned llama-cpp-python
# source package, with the same flags scripts/setup.sh gives the wheel: llama-bench for benchmarks/vs_llama_bench.py,
# llama-perplexity for the quality test's agreement check (tests/test_quality.py). Output: build/llama-bench/bin.
#   TARGETS="llama-perplexity" scripts/build-llama-bench.sh    # default: llama-bench llama-perplexity
set -euo pipefail
cd "$(dirname "$0")/.."
VER=$(.venv/bin/python -c "import importlib.metadata as m; print(m.version('llama-cpp-python'))")
SRC=build/llama-cpp-python-src
mkdir -p "$SRC"
[ -f "$SRC/llama_cpp_python-$VER.tar.gz" ] || .venv/bin/pip download -q --no-deps --no-binary :all: -d "$SRC" "llama-cpp-python==$VER"
[ -d "$SRC/llama_cpp_python-$VER" ] || tar xzf "$SRC/llama_cpp_python-$VER.tar.gz" -C "$SRC"
FLAGS=""
if [ "$(uname -m)" = x86_64 ] && echo 'int main(void){return 0;}' | ${CC:-cc} -mno-amx-tile -x c -o /dev/null - 2>/dev/null; then
  FLAGS="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
fi
B=${BUILD_DIR:-build/llama-bench}  # setup.sh test keeps it under ~/.cache/harness: a second build is a no-op
CFLAGS="$FLAGS" CXXFLAGS="$FLAGS" cmake -S "$SRC/llama_cpp_python-$VER/vendor/llama.cpp" -B "$B" \
  -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF \
  -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF "$@"
# shellcheck disable=SC2086
cmake --build "$B" --target ${TARGETS:-llama-bench llama-perplexity} -j"$(nproc)"
echo "built: $(ls "$B"/bin/ | grep -v '^lib' | tr '\n' ' ')in $B/bin"
