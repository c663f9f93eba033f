#!/usr/bin/env bash
# Make vendor/gpu-bundle/: what scripts/gpu-check.sh needs on a GPU machine that has CUDA but no network.
# Run it where PyPI is reachable; it builds nothing (--check runs cmake's configure step only).
#
#   scripts/prepare-gpu-bundle.sh           # make the bundle
#   scripts/prepare-gpu-bundle.sh --check   # and prove the pruned source still configures (cmake only, no build)
#
# The bundle holds
#   llama_cpp_python-<pin>.tar.gz  the pinned source package, pruned to what a CUDA + CPU build reads: ~4 MiB
#                                  (the original's 73 MiB are mostly git history, vocab files and docs)
#   wheels/                        pure-Python wheels the GPU machine may lack: the build back end for
#                                  --no-build-isolation (scikit-build-core and its needs), setuptools, wheel, pip,
#                                  and the harness's pure dependencies (gguf, diskcache, nvidia-ml-py, tqdm, ...)
#   MANIFEST.txt                   names, sizes and sha256 of the above
# The device tool carries at most 64 MiB (working tree and carried paths together): the sizes are printed last.
#
# Environment: PYTHON (default .venv/bin/python, else python3), GPU_BUNDLE (default vendor/gpu-bundle),
# GPU_BUNDLE_PYTHON_VERSION (the GPU machine's Python for wheel selection; default 3.12, the device image's).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
CHECK=0
for a in "$@"; do
  case "$a" in
    --check) CHECK=1 ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "usage: $0 [--check]" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
BUNDLE=${GPU_BUNDLE:-vendor/gpu-bundle}
PYVER=${GPU_BUNDLE_PYTHON_VERSION:-3.12}
VER=$(sed -n 's/.*"llama-cpp-python==\([0-9][0-9.]*\)".*/\1/p' pyproject.toml | head -1)
[ -n "$VER" ] || { echo "prepare-gpu-bundle: no llama-cpp-python==X pin in pyproject.toml" >&2; exit 1; }
NAME=llama_cpp_python-$VER
SRC=build/gpu-bundle-src  # download cache and unpacked trees (ignored)
mkdir -p "$SRC" "$BUNDLE"
mib() { awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }

# --- (a) the source package, pruned ------------------------------------------------------------------------
# scripts/build-llama-bench.sh keeps the same file in build/llama-cpp-python-src/
if [ ! -f "$SRC/$NAME.tar.gz" ] && [ -f "build/llama-cpp-python-src/$NAME.tar.gz" ]; then
  cp "build/llama-cpp-python-src/$NAME.tar.gz" "$SRC/"
fi
if [ ! -f "$SRC/$NAME.tar.gz" ]; then
  echo "downloading the source package of llama-cpp-python==$VER"
  "$PY" -m pip download -q --disable-pip-version-check --no-deps --no-binary :all: -d "$SRC" "llama-cpp-python==$VER"
fi
rm -rf "$SRC/orig" "$SRC/pruned"
mkdir -p "$SRC/orig" "$SRC/pruned"
tar xzf "$SRC/$NAME.tar.gz" -C "$SRC/orig"
tar xzf "$SRC/$NAME.tar.gz" -C "$SRC/pruned"
P=$SRC/pruned/$NAME
L=$P/vendor/llama.cpp
[ -f "$P/CMakeLists.txt" ] && [ -f "$L/CMakeLists.txt" ] || { echo "prepare-gpu-bundle: unexpected layout in $NAME.tar.gz" >&2; exit 1; }

# What a build reads: llama-cpp-python's CMakeLists.txt adds vendor/llama.cpp (which, as a sub-project, adds
# ggml, src, vendor and common; tests, tools, examples, server and app default to off there) and
# vendor/llama.cpp/tools/mtmd (LLAVA_BUILD, on by default). Everything else is documentation, Python conversion
# scripts, vocab files for llama.cpp's own tests, CI, and the sources of GPU back ends other than CUDA.
rm -rf "$P"/{docs,examples,tests,docker,scripts,mkdocs.yml,.github}
# .git (~38 MiB of packed history) is read only by cmake, for the build's commit and number
# (cmake/build-info.cmake: `git rev-parse --short HEAD`, `git rev-list --count HEAD`) and ggml's dirty flag
# (ggml/CMakeLists.txt: `git diff-index --quiet HEAD -- .`). A stand-in repository holding the HEAD commit and
# its trees, no file contents, answers all three as the original does, in ~150 KiB.
gitstate() { echo "$(git -C "$1" rev-parse --short HEAD) $(git -C "$1" rev-list --count HEAD)" \
  "dirty=$(git -C "$1" diff-index --quiet HEAD -- . >/dev/null 2>&1; echo $?)"; }
if command -v git >/dev/null && sha=$(git -C "$L" rev-parse HEAD 2>/dev/null); then
  want=$(gitstate "$SRC/orig/$NAME/vendor/llama.cpp")
  git -C "$L" cat-file commit HEAD >"$REPO/$SRC/head.commit"
  git -C "$L" rev-list --objects --no-object-names HEAD |
    git -C "$L" cat-file --batch-check='%(objecttype) %(objectname)' | awk '$1 == "tree" { print $2 }' |
    git -C "$L" pack-objects -q --stdout >"$REPO/$SRC/trees.pack"
  rm -rf "$P/.git" "$L/.git"
  git init -q "$L"
  rm -rf "$L/.git/hooks"
  echo "$sha" >"$L/.git/HEAD"
  echo "$sha" >"$L/.git/shallow"
  git -C "$L" hash-object -t commit -w "$REPO/$SRC/head.commit" >/dev/null
  git -C "$L" index-pack --stdin <"$REPO/$SRC/trees.pack" >/dev/null
  git -C "$L" read-tree --empty  # an index: common/CMakeLists.txt watches .git/index (and warns without one)
  got=$(gitstate "$L")
  [ "$got" = "$want" ] || { echo "prepare-gpu-bundle: stand-in .git says $got, the original $want" >&2; exit 1; }
else
  echo "prepare-gpu-bundle: no git here: the build will say commit 'unknown'" >&2
  rm -rf "$P/.git" "$L/.git"
fi
rm -rf "$L"/{.devops,.github,app,benches,ci,conversion,docs,examples,gguf-py,grammars,media,models,pocs}
rm -rf "$L"/{requirements,scripts,skills,tests,requirements.txt,flake.nix,build-xcframework.sh}
rm -f "$L"/convert_*.py
# tools/: only tools/mtmd (and the folder's CMakeLists.txt) is read; its sample media are for its tests
find "$L/tools" -mindepth 1 -maxdepth 1 ! -name mtmd ! -name CMakeLists.txt -exec rm -rf {} +
rm -f "$L"/tools/mtmd/test-*.{jpeg,mp3,mp4}
# ggml back ends: keep the CPU and CUDA ones (and BLAS, RPC: small, and off unless asked for). ggml-hip and
# ggml-musa compile ggml-cuda's sources, never the other way round.
for d in "$L"/ggml/src/ggml-*/; do
  case "$(basename "$d")" in
    ggml-cpu|ggml-cuda|ggml-blas|ggml-rpc) ;;
    *) rm -rf "$d" ;;
  esac
done
mkdir -p "$BUNDLE"
rm -f "$BUNDLE"/llama_cpp_python-*.tar.gz
# Same top-level folder and file name as the original, so pip reads name and version as usual.
tar -C "$SRC/pruned" --sort=name --owner=0 --group=0 --numeric-owner --mtime='2000-01-01 00:00Z' \
  -cf - "$NAME" | gzip -9n >"$BUNDLE/$NAME.tar.gz"
orig_b=$(stat -c %s "$SRC/$NAME.tar.gz")
pruned_b=$(stat -c %s "$BUNDLE/$NAME.tar.gz")
echo "source package: $(mib "$orig_b") -> pruned $(mib "$pruned_b") ($BUNDLE/$NAME.tar.gz;" \
  "unpacked $(du -sh "$SRC/orig/$NAME" | cut -f1) -> $(du -sh "$P" | cut -f1))"

# --- (b) wheels ----------------------------------------------------------------------------------------------
# Pure-Python only (py3-none-any), so they install on whichever Python the GPU machine has. Versions: the ones
# this checkout's .venv runs, where it has them, so the GPU run uses what the CPU runs use.
pinned() {  # NAME [FALLBACK-SPEC]: NAME==<version in $PY's environment>, else NAME<FALLBACK-SPEC>
  local v
  v=$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1" 2>/dev/null) || v=""
  if [ -n "$v" ]; then echo "$1==$v"; else echo "$1${2:-}"; fi
}
W=$BUNDLE/wheels
rm -rf "$W"
mkdir -p "$W"
dl() { "$PY" -m pip download -q --disable-pip-version-check --only-binary :all: --python-version "$PYVER" \
  --implementation py --abi none --platform any -d "$W" "$@"; }
# The build back end of llama-cpp-python (pyproject: scikit-build-core[pyproject]>=0.9.2) with its needs;
# --no-build-isolation uses what is installed, so it must be there.
dl "scikit-build-core>=0.9.2" "packaging" "pathspec"
# tomli and exceptiongroup: scikit-build-core's needs on a Python older than 3.11
dl --no-deps "tomli" "exceptiongroup"
# The harness's own build (setuptools>=68, wheel), and pip itself for a venv made without ensurepip.
dl --no-deps "setuptools>=68" "wheel" "pip"
# Runtime needs that are pure Python (gguf's numpy/pyyaml/requests/tqdm and llama-cpp-python's numpy/jinja2
# are on the GPU image; numpy, pandas, matplotlib, psutil, PyYAML, MarkupSafe are not pure: not bundled).
dl --no-deps "$(pinned gguf '>=0.17')" "$(pinned diskcache '>=5.6.1')" "$(pinned nvidia-ml-py '>=12.0')" \
  "$(pinned tqdm '>=4.60')" "$(pinned typing_extensions '>=4.5.0')"
for f in "$W"/*; do
  case "$f" in
    *-none-any.whl) ;;
    *) echo "prepare-gpu-bundle: not a pure wheel, dropped: $(basename "$f")" >&2; rm -f "$f" ;;
  esac
done

# --- manifest and sizes -----------------------------------------------------------------------------------------
(
  cd "$BUNDLE"
  echo "# vendor/gpu-bundle, made by scripts/prepare-gpu-bundle.sh on $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "# source: llama-cpp-python==$VER from PyPI ($(mib "$orig_b")), pruned for a CUDA + CPU build"
  find . -type f ! -name "MANIFEST.txt*" | sort | while read -r f; do
    printf '%s  %10d  %s\n' "$(sha256sum "$f" | cut -c1-64)" "$(stat -c %s "$f")" "${f#./}"
  done
) >"$BUNDLE/MANIFEST.txt.new"
mv "$BUNDLE/MANIFEST.txt.new" "$BUNDLE/MANIFEST.txt"
echo "wheels ($(find "$W" -name '*.whl' | wc -l)):" $(cd "$W" && ls)

bundle_b=$(find "$BUNDLE" -type f -printf '%s\n' | awk '{ s += $1 } END { print s + 0 }')
# What the device tool sends without being told: tracked files and untracked files git does not ignore.
tree_b=$(git ls-files -z -co --exclude-standard | xargs -0 -r stat -c %s -- 2>/dev/null | awk '{ s += $1 } END { print s + 0 }')
total_b=$((bundle_b + tree_b))
limit_b=$((64 * 1048576))
echo "bundle $(mib "$bundle_b") + working tree $(mib "$tree_b") = $(mib "$total_b") of the device tool's 64 MiB" \
  "(carry: [\"$BUNDLE\"])"
if [ "$total_b" -gt "$limit_b" ]; then
  echo "prepare-gpu-bundle: over the 64 MiB the device tool carries" >&2
  exit 1
fi

# --- --check: configure (never build) the pruned tree, and compare its build graph with the original's ----------
if [ "$CHECK" = 1 ]; then
  NVCC=${CUDACXX:-}
  [ -n "$NVCC" ] || { [ -x /usr/local/cuda/bin/nvcc ] && NVCC=/usr/local/cuda/bin/nvcc; } || NVCC=$(command -v nvcc || true)
  [ -x "$NVCC" ] || { echo "prepare-gpu-bundle --check: needs nvcc (configure only)" >&2; exit 1; }
  GEN=(); command -v ninja >/dev/null && GEN=(-G Ninja)
  CUDA=(-DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DCMAKE_CUDA_COMPILER="$NVCC" -DGGML_CUDA_NCCL=OFF
        -DLLAMA_OPENSSL=OFF)
  # A configure needs the libraries ggml-cuda links to exist, not to work: where this machine's toolkit lacks
  # them (cuBLAS, the driver's libcuda), empty stand-ins let cmake generate the build, which is never run here.
  for lib in cublas cublasLt cuda; do
    cmake_var=CUDA_${lib}_LIBRARY
    [ "$lib" = cuda ] && cmake_var=CUDA_cuda_driver_LIBRARY
    if ! ldconfig -p 2>/dev/null | grep -q "lib$lib\.so" &&
       [ -z "$(ls "$(dirname "$(readlink -f "$NVCC")")"/../{lib,lib64,lib64/stubs}/lib$lib.so* 2>/dev/null)" ]; then
      mkdir -p "$REPO/$SRC/stub-lib"
      : >"$REPO/$SRC/stub-lib/lib$lib.so"
      CUDA+=(-D"$cmake_var=$REPO/$SRC/stub-lib/lib$lib.so")
      echo "configure: no lib$lib.so on this machine: configuring against an empty stand-in (nothing is linked)"
    fi
  done
  objects() { # BUILD_DIR: the object files its build would compile
    if [ -f "$1/build.ninja" ]; then ninja -C "$1" -t targets all | sed -n 's/^\([^:]*\.o\): .*/\1/p'
    else grep -rhoE '[^ ]+\.(c|cpp|cu)\.o' "$1" --include=build.make; fi | sort -u
  }
  configure() { # NAME SOURCE ARGS...: cmake configure into $SRC/cfg-NAME, log to $SRC/cfg-NAME.log
    local name=$1 src=$2; shift 2
    rm -rf "$SRC/cfg-$name"
    if cmake -S "$src" -B "$SRC/cfg-$name" "${GEN[@]}" "$@" >"$SRC/cfg-$name.log" 2>&1; then
      echo "configure $name: ok ($(objects "$SRC/cfg-$name" | wc -l) objects to compile)"
    else
      tail -30 "$SRC/cfg-$name.log" >&2
      echo "configure $name: FAILED (log: $SRC/cfg-$name.log)" >&2
      return 1
    fi
  }
  # As scikit-build-core configures llama-cpp-python's top-level CMakeLists.txt (Release, SKBUILD_* set).
  skb() {
    echo -DCMAKE_BUILD_TYPE=Release -DSKBUILD=2 -DSKBUILD_PROJECT_NAME=llama_cpp_python \
      -DSKBUILD_PROJECT_VERSION="$VER" -DSKBUILD_PLATLIB_DIR="$REPO/$SRC/skb-platlib" \
      -DSKBUILD_DATA_DIR="$REPO/$SRC/skb-data" -DCMAKE_INSTALL_PREFIX="$REPO/$SRC/skb-prefix"; }
  ok=1
  # 1. llama.cpp alone, as a top-level project with what it would build on its own turned off
  configure llama.cpp-pruned "$L" "${CUDA[@]}" -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_MTMD=ON || ok=0
  # 2. llama-cpp-python's own CMakeLists.txt with its defaults (mtmd included), pruned and original
  # shellcheck disable=SC2046
  configure pkg-pruned "$P" $(skb) "${CUDA[@]}" || ok=0
  # shellcheck disable=SC2046
  configure pkg-orig "$SRC/orig/$NAME" $(skb) "${CUDA[@]}" || ok=0
  # 3. the flags scripts/gpu-check.sh builds with
  # shellcheck disable=SC2046
  configure pkg-gpu-check "$P" $(skb) "${CUDA[@]}" -DGGML_CUDA_FA_ALL_QUANTS=OFF -DGGML_CUDA_FA_QUANTS=f16-f16 \
    -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF \
    -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF || ok=0
  if [ "$ok" = 1 ]; then
    if diff <(objects "$SRC/cfg-pkg-orig") <(objects "$SRC/cfg-pkg-pruned") >"$SRC/cfg-diff.txt"; then
      echo "build graph: the pruned package compiles the same $(objects "$SRC/cfg-pkg-orig" | wc -l) objects as the original"
    else
      echo "prepare-gpu-bundle --check: the pruned package's build differs from the original's:" >&2
      head -20 "$SRC/cfg-diff.txt" >&2
      ok=0
    fi
    echo "gpu-check's flags: $(objects "$SRC/cfg-pkg-gpu-check" | wc -l) objects," \
      "$(objects "$SRC/cfg-pkg-gpu-check" | grep -c '\.cu\.o$') of them CUDA"
  fi
  [ "$ok" = 1 ] || exit 1
fi
