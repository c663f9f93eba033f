#!/usr/bin/env bash
# Build llama-cpp-python with CUDA on a machine WITHOUT a GPU, for scripts/gpu-check.sh to install on one.
#
#   scripts/build-cuda-wheel.sh            # -> vendor/gpu-bundle/cuda/llama_cpp_python-<pin>-cuda<arch>.tar.xz
#                                          #    + BUILD-INFO.txt
#
# Why: the GPU machine is lent for minutes; compiling ggml's CUDA back end there (286 build steps, 144 of them
# nvcc) costs most of them. Here it runs on spare cores instead (about 25-30 minutes on 2), with CUDA's compiler
# from PyPI's nvidia-* wheels: no toolkit install, no GPU, no driver needed to compile.
#
# Environment:
#   CUDA_ARCHS      CUDA architectures to build for (default 90: H100 and H200)
#   CUDA_VERSION    the nvidia-* wheels' version (default 13.0.88: CUDA 13.0, which driver 580 runs; a newer
#                   minor would still run there, but 13.0 is what that driver ships)
#   CUDA_VENV       where those wheels go (default /tmp/harness-cuda-<version>)
#   JOBS            parallel build jobs (default: all cores)
# The CPU part is built for AVX2 (no -march=native: the GPU machine's CPU is not this one's).
# The wheel links libcudart.so.13, libcublas.so.13 and libcublasLt.so.13 dynamically (the GPU machine's toolkit
# or PyTorch's nvidia-* packages provide them; gpu-check.sh finds them) and the driver's libcuda.so.1.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
ARCHS=${CUDA_ARCHS:-90}
CV=${CUDA_VERSION:-13.0.88}
CUDA_VENV=${CUDA_VENV:-/tmp/harness-cuda-$CV}
JOBS=${JOBS:-$(nproc)}
VER=$(sed -n 's/.*"llama-cpp-python==\([0-9][0-9.]*\)".*/\1/p' pyproject.toml | head -1)
OUT=vendor/gpu-bundle/cuda
SRC=build/gpu-bundle-src
BUILD=$REPO/build/cuda-wheel
mkdir -p "$SRC" "$BUILD" "$OUT"
t0=$(date +%s)

# A build kept from an earlier run on this machine (outside the work tree, which a new session lays anew):
# reused when it is for this pin and these architectures (FORCE=1 rebuilds).
KEEP=${HARNESS_CACHE:-$HOME/.cache/harness}/cuda-builds
TARBALL=llama_cpp_python-$VER-cuda${ARCHS//;/_}.tar.xz
if [ "${FORCE:-0}" != 1 ] && [ -f "$KEEP/$TARBALL" ] && [ -f "$KEEP/BUILD-INFO.txt" ] &&
   grep -q "^cuda_architectures: $ARCHS\$" "$KEEP/BUILD-INFO.txt" && grep -q "^links: libcuda.so.1" "$KEEP/BUILD-INFO.txt"; then
  cp "$KEEP/$TARBALL" "$KEEP/BUILD-INFO.txt" "$OUT/"
  echo "reused the build kept in $KEEP:"
  cat "$OUT/BUILD-INFO.txt"
  exit 0
fi

major=${CV%%.*}
if [ ! -x "$CUDA_VENV/bin/python" ]; then python3 -m venv "$CUDA_VENV"; fi
# cuBLAS and the runtime: any 13.x links the same sonames; the compiler pieces at the chosen version
"$CUDA_VENV/bin/pip" install -q --disable-pip-version-check "nvidia-cuda-nvcc==$CV" "nvidia-cuda-crt==$CV" \
  "nvidia-nvvm==$CV" "nvidia-cuda-runtime~=${CV%.*}.0" "nvidia-cuda-cccl~=${CV%.*}.0" "nvidia-cublas~=$major.0"
C=$("$CUDA_VENV/bin/python" -c 'import nvidia, os; print(os.path.join(nvidia.__path__[0], "cu'"$major"'"))')
[ -x "$C/bin/nvcc" ] || { echo "build-cuda-wheel: no nvcc in $C" >&2; exit 1; }
# The wheels' layout lacks what a toolkit install has: lib64, unversioned .so names for the linker, and the
# driver stub (libcuda.so.1 exporting the driver API, each call failing: scripts/cuda-driver-stub.sh). ggml-cuda
# calls the driver API itself (its virtual-memory pool), so the stub must export those functions: an empty one
# is dropped by the linker and the library then fails to load on a GPU machine too (undefined cuMemCreate).
ln -sfn lib "$C/lib64"
for l in cublas cublasLt cudart; do ln -sf "lib$l.so.$major" "$C/lib/lib$l.so"; done
if ! nm -D "$C/lib/stubs/libcuda.so" 2>/dev/null | grep ' T cuMemCreate$' >/dev/null; then  # not -q: pipefail
  bash scripts/cuda-driver-stub.sh "$C/include" "$C/lib/stubs/libcuda.so"
fi
echo "nvcc: $("$C/bin/nvcc" --version | sed -n 's/.*release \([0-9.]*\).*/\1/p') at $C"

if [ ! -f "$SRC/llama_cpp_python-$VER.tar.gz" ]; then
  python3 -m pip download -q --disable-pip-version-check --no-deps --no-binary :all: -d "$SRC" "llama-cpp-python==$VER"
fi
export PATH=$C/bin:$PATH CUDACXX=$C/bin/nvcc CMAKE_GENERATOR=Ninja CMAKE_BUILD_PARALLEL_LEVEL=$JOBS
CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=$ARCHS -DCMAKE_CUDA_COMPILER=$C/bin/nvcc -DCUDAToolkit_ROOT=$C"
CMAKE_ARGS+=" -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON"
CMAKE_ARGS+=" -DGGML_CUDA_NCCL=OFF -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF"
CMAKE_ARGS+=" -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_OPENSSL=OFF -DGGML_RPC=ON"
export CMAKE_ARGS
rm -f "$BUILD"/llama_cpp_python-*.whl
python3 -m pip wheel -v --no-deps --disable-pip-version-check -w "$BUILD" \
  --config-settings=build-dir="$BUILD/build" "$SRC/llama_cpp_python-$VER.tar.gz" >"$BUILD/build.log" 2>&1 ||
  { tail -30 "$BUILD/build.log"; echo "build-cuda-wheel: the build failed (log: $BUILD/build.log)" >&2; exit 1; }
whl=$(ls "$BUILD"/llama_cpp_python-"$VER"-*.whl)
# The wheel holds each library three times (symlinks become copies in a zip): ~260 MB for one architecture,
# past what the device tool carries (64 MiB). Carried instead: the package as installed, its libraries as
# symlinks, xz-packed (~40 MB); gpu-check.sh unpacks it into its venv.
SLIM=$BUILD/slim
rm -rf "$SLIM"
mkdir -p "$SLIM"
python3 -m zipfile -e "$whl" "$SLIM"
# ggml-cuda must name the driver's library, or its driver API symbols resolve nowhere when it loads
if ! readelf -d "$SLIM"/llama_cpp/lib/libggml-cuda.so | grep 'NEEDED.*\[libcuda\.so\.1\]' >/dev/null; then
  echo "build-cuda-wheel: libggml-cuda.so does not link libcuda.so.1 (is the driver stub at $C/lib/stubs right?)" >&2
  exit 1
fi
(
  cd "$SLIM/llama_cpp/lib"
  for full in lib*.so.*.*; do  # libggml-cuda.so.0.25.3 -> libggml-cuda.so.0 -> libggml-cuda.so
    soname=${full%.*.*}
    base=${soname%.*}
    rm -f "$soname" "$base"
    ln -s "$full" "$soname"
    ln -s "$soname" "$base"
  done
)
rm -f "$OUT"/llama_cpp_python-*
tar -C "$SLIM" -cf - llama_cpp "llama_cpp_python-$VER.dist-info" | xz -T"$JOBS" -9 >"$OUT/$TARBALL"
{
  echo "llama_cpp_python: $VER"
  echo "cuda_architectures: $ARCHS"
  echo "cuda: $CV (nvidia-cuda-nvcc from PyPI)"
  echo "built: $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(uname -m), $(nproc) cores, in $(( $(date +%s) - t0 )) s"
  echo "cmake_args: $CMAKE_ARGS"
  echo "features: $(grep -oE 'GGML_CUDA_USE_GRAPHS|GGML_CUDA_FA_[A-Z0-9_]+=1' "$BUILD/build.log" | sort -u | paste -sd' ')"
  echo "links: libcuda.so.1 (readelf: NEEDED by libggml-cuda.so)"
  echo "sha256: $(sha256sum "$OUT/$TARBALL" | cut -c1-64)  $TARBALL"
} >"$OUT/BUILD-INFO.txt"
cat "$OUT/BUILD-INFO.txt"
mkdir -p "$KEEP" && cp "$OUT/$TARBALL" "$OUT/BUILD-INFO.txt" "$KEEP/"  # for a later session on this machine
echo "package: $OUT/$TARBALL ($(du -h "$OUT/$TARBALL" | cut -f1)); kept in $KEEP"
