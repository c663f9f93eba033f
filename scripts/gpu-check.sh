#!/usr/bin/env bash
# GPU check, in one command: build llama-cpp-python with CUDA for this machine's GPU, offline, and measure the
# 12 quants of the shape-faithful Llama 3.2 1B on it (configs/1b-synthetic-gpu.yaml).
#
#   scripts/gpu-check.sh OUT_DIR                       # on a machine with an NVIDIA GPU and the CUDA toolkit
#   GPU_CHECK_DRY_RUN=1 scripts/gpu-check.sh OUT_DIR   # anywhere: stages 1-2 without compiling
#
# Needs no network: an NVIDIA GPU (nvidia-smi), the CUDA toolkit (nvcc), cmake >= 3.21, ninja, a C/C++ compiler,
# and a Python 3.10+ whose packages include the harness's compiled dependencies (numpy, pandas, matplotlib,
# psutil, PyYAML, jinja2, requests, huggingface_hub). Everything else comes from vendor/gpu-bundle/, which
# scripts/prepare-gpu-bundle.sh makes where PyPI is reachable (with the device tool: carry ["vendor/gpu-bundle"]).
#
# Stages (wall time of each: printed, and in OUT_DIR/stages.tsv):
#   1 detect   GPU, compute capability, driver, nvcc, cmake, ninja, cores
#   2 build    venv seeing the base Python's packages; bundled wheels for what is missing; the harness (editable);
#              llama-cpp-python from the pruned source package, with CUDA for this GPU's architecture only.
#              Reused when the venv already holds such a build (a second call on the same machine).
#   3 verify   llama_supports_gpu_offload() must be True
#   4 run      python -m harness run configs/1b-synthetic-gpu.yaml, then python -m harness report; every record
#              must say device=cuda
#   5 collect  environment and logs, packed into OUT_DIR/gpu-check.tar.gz
# OUT_DIR ends with at most 8 files (what the device tool returns): gpu-check.log (all output), stages.tsv,
# records.jsonl, env.json, summary.csv, report.md, contexts.jsonl (the memory test) or batched.jsonl (a serving
# config's batched test: give it GPU_CHECK_CONTEXTS_CONFIG= too), and gpu-check.tar.gz (results/, report/,
# contexts/ (tg at depth), logs/, env/). The run writes outside OUT_DIR; records.jsonl, contexts.jsonl,
# batched.jsonl and env.json are copied into OUT_DIR every few seconds while it runs, so a call killed at its
# limit (no exit trap then) still brings back every record measured by then.
#
# Environment:
#   GPU_CHECK_DRY_RUN=1    stage 1, then stage 2 without compiling llama.cpp; exits 3 where there is no GPU
#   PYTHON                 the base interpreter (default python3)
#   GPU_CHECK_VENV         the venv (default build/gpu-venv)
#   GPU_CHECK_CACHE        where the synthetic models are built (default /tmp/harness-gpu-cache, ~10 GB; the run
#                          builds them as everywhere: llama.cpp's recipe and blocks, tiled, ~1 min for the 12)
#   GPU_CHECK_CONFIG       default configs/1b-synthetic-gpu.yaml
#   GPU_CHECK_QUANTS       comma-separated quants to measure instead of the config's 12
#   GPU_CHECK_CUDA_ARCH    CUDA architecture(s) to build for instead of the detected ones (e.g. 90)
#   GPU_CHECK_CMAKE_ARGS   more cmake arguments for the llama.cpp build
#   GPU_CHECK_LIMIT_S      the time limit of the call this runs in (the device tool's timeout_s, or the device
#                          time left where that is less; default 600): the deadline is 30 s before it
#   GPU_CHECK_DEADLINE_S   budget for the whole script (default GPU_CHECK_LIMIT_S - 30): stage 4 is interrupted
#                          (records kept) so that stage 5 always runs
#   GPU_CHECK_BUNDLE       default vendor/gpu-bundle
#   GPU_CHECK_BUILD=1      compile llama-cpp-python here even where the bundle holds a prebuilt CUDA wheel
#                          (vendor/gpu-bundle/cuda/, from scripts/build-cuda-wheel.sh) for this GPU
#   GPU_CHECK_CONTEXTS_CONFIG  the context sweep run after the main one (default
#                          configs/1b-synthetic-gpu-contexts.yaml; empty: none); GPU_CHECK_CONTEXTS_RESERVE_S
#                          (default 150) is kept for it out of the main run's time
#
# Exit status: 0 all measured on the GPU; 1 a quant failed, was not measured in time, or ran off the GPU;
# 2 usage; 3 no NVIDIA GPU; 4 a tool, package or the bundle is missing; 5 the build failed; 6 the build
# cannot offload to the GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD

if [ $# -ne 1 ] || [ "${1#-}" != "$1" ]; then
  echo "usage: [GPU_CHECK_DRY_RUN=1] $0 OUT_DIR" >&2
  exit 2
fi
OUT_DIR=$1
mkdir -p "$OUT_DIR" || exit 2
OUT_DIR=$(cd "$OUT_DIR" && pwd)
if [ -n "$(ls -A "$OUT_DIR")" ]; then
  echo "gpu-check: $OUT_DIR is not empty: give a new or empty folder" >&2
  exit 2
fi

DRY=${GPU_CHECK_DRY_RUN:-0}
[ "$DRY" = 0 ] || DRY=1
PY=${PYTHON:-python3}
VENV=${GPU_CHECK_VENV:-build/gpu-venv}
case "$VENV" in /*) ;; *) VENV=$REPO/$VENV ;; esac
VPY=$VENV/bin/python
CACHE=${GPU_CHECK_CACHE:-/tmp/harness-gpu-cache}
CONFIG=${GPU_CHECK_CONFIG:-configs/1b-synthetic-gpu.yaml}
BUNDLE=${GPU_CHECK_BUNDLE:-vendor/gpu-bundle}
case "$BUNDLE" in /*) ;; *) BUNDLE=$REPO/$BUNDLE ;; esac
LIMIT_S=${GPU_CHECK_LIMIT_S:-600}
DEADLINE_S=${GPU_CHECK_DEADLINE_S:-$((LIMIT_S - 30))}
VER=$(sed -n 's/.*"llama-cpp-python==\([0-9][0-9.]*\)".*/\1/p' pyproject.toml | head -1)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")
mkdir -p "$WORK/logs" "$WORK/env"

# All output goes to the terminal and to OUT_DIR/gpu-check.log as it happens (a killed run keeps its log).
exec > >(tee -a "$OUT_DIR/gpu-check.log") 2>&1
TEE_PID=$!

now() { date +%s.%N; }
T0=$(now)
elapsed() { awk -v a="$T0" -v b="$(now)" 'BEGIN { printf "%.0f", b - a }'; }
STAGE=""
STAGE_T=0
RC=0
printf 'stage\tname\tstatus\twall_s\n' >"$OUT_DIR/stages.tsv"

begin() { # N NAME
  STAGE="$1 $2"
  STAGE_T=$(now)
  echo
  echo "=== stage $1: $2 ($(date -u +%H:%M:%SZ), +$(elapsed) s)"
}
end() { # STATUS: ok | skipped | failed | interrupted | dry-run ...
  local dt
  dt=$(awk -v a="$STAGE_T" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }')
  printf '%s\t%s\t%s\n' "${STAGE// /$'\t'}" "$1" "$dt" >>"$OUT_DIR/stages.tsv"
  echo "=== stage ${STAGE%% *} ${STAGE#* }: $1 in $dt s"
  STAGE=""
}
die() { # CODE MESSAGE: the one loud line, then stage 5 runs from the exit trap
  RC=$1
  shift
  echo
  echo "gpu-check: FAILED: $*"
  exit "$RC"
}
# The run's own folder is outside OUT_DIR; its records are copied in as they come (whole files: copied, then
# renamed), so that a call killed at its limit, when no exit trap runs, still brings back what was measured.
RES=$WORK/results
mirror() {
  local f
  for f in records.jsonl contexts.jsonl batched.jsonl env.json; do
    if [ -f "$RES/$f" ] && ! cmp -s "$RES/$f" "$OUT_DIR/$f"; then
      cp "$RES/$f" "$OUT_DIR/.$f.part" && mv "$OUT_DIR/.$f.part" "$OUT_DIR/$f"
    fi
  done
}
MIRROR_PID=""
# Stage 5 runs from the exit trap, also after a failure.
collect() {
  COLLECTED=1
  begin 5 collect
  {
    echo "utc: $(date -u +%Y-%m-%dT%H:%M:%SZ)"; uname -a
    echo "harness commit: $(git rev-parse HEAD 2>/dev/null) $(git status --porcelain 2>/dev/null | wc -l) changed files"
    echo "dry run: $DRY; arch: ${ARCH:-}; CMAKE_ARGS: ${CMAKE_ARGS:-}"
  } >"$WORK/env/summary.txt"
  command -v nvidia-smi >/dev/null && nvidia-smi -q >"$WORK/env/nvidia-smi.txt" 2>&1
  command -v nvidia-smi >/dev/null && nvidia-smi >>"$WORK/env/summary.txt" 2>&1
  [ -z "${NVCC:-}" ] || "$NVCC" --version >"$WORK/env/nvcc.txt" 2>&1
  { cmake --version; ninja --version; "${CXX:-c++}" --version; } >"$WORK/env/tools.txt" 2>&1
  lscpu >"$WORK/env/lscpu.txt" 2>&1
  { free -h; df -h; } >"$WORK/env/memory-disk.txt" 2>&1
  [ -x "$VPY" ] && "$VPY" -m pip list >"$WORK/env/pip-list.txt" 2>&1
  cp "$OUT_DIR/stages.tsv" "$WORK/env/" 2>/dev/null
  mirror
  [ -d "$WORK/report" ] && cp "$WORK/report/summary.csv" "$WORK/report/report.md" "$OUT_DIR/" 2>/dev/null
  local parts=(-C "$WORK")
  for d in results report contexts logs env; do [ -d "$WORK/$d" ] && parts+=("$d"); done
  tar -czf "$OUT_DIR/gpu-check.tar.gz" "${parts[@]}" || echo "could not pack gpu-check.tar.gz"
  echo "packed: gpu-check.tar.gz ($(du -h "$OUT_DIR/gpu-check.tar.gz" | cut -f1)); in $OUT_DIR: $(cd "$OUT_DIR" && ls | tr '\n' ' ')"
  end ok
}
# Stages 1-2 of a dry run, or a failure, still end with stage 5 (collect), from here.
COLLECTED=0
BPID=""
on_exit() {
  local rc=$?
  [ "$RC" != 0 ] || RC=$rc
  # what this script started and left running, after a failure or an interrupt
  [ -z "$BPID" ] || kill -- "-$BPID" 2>/dev/null
  [ -z "$MIRROR_PID" ] || kill "$MIRROR_PID" 2>/dev/null
  [ -z "$STAGE" ] || end "failed (exit $RC)"
  [ "$COLLECTED" = 1 ] || collect
  echo
  echo "stages (wall seconds):"
  column -t -s $'\t' "$OUT_DIR/stages.tsv" 2>/dev/null || cat "$OUT_DIR/stages.tsv"
  echo "gpu-check: exit $RC, total $(elapsed) s; files in $OUT_DIR"
  rm -rf "$WORK"
  exec >&- 2>&-  # let tee write the log's end before the command returns
  wait "$TEE_PID" 2>/dev/null
  exit "$RC"
}
trap on_exit EXIT
trap 'die 130 "interrupted"' INT TERM

# ---------------------------------------------------------------------------------------------------------------
begin 1 detect
echo "deadline: $DEADLINE_S s after the start (GPU_CHECK_LIMIT_S=$LIMIT_S less 30 s, unless GPU_CHECK_DEADLINE_S)"
GPU_OK=0
GPU_WHY=""
if ! command -v nvidia-smi >/dev/null 2>&1; then
  GPU_WHY="nvidia-smi is not installed"
elif ! q=$(nvidia-smi --query-gpu=name,compute_cap,memory.total,driver_version --format=csv,noheader 2>&1); then
  GPU_WHY="nvidia-smi failed: $(echo "$q" | head -1)"
elif [ -z "$q" ]; then
  GPU_WHY="nvidia-smi lists no GPU"
else
  GPU_OK=1
  echo "GPU: $q"
  # the set-up's own detection (scripts/detect-backend.sh): compute capability 9.0 -> CUDA architecture 90;
  # several different GPUs -> "86;90"
  DETECT=$(HARNESS_BACKEND=cuda bash scripts/detect-backend.sh)
  ARCH=$(echo "$DETECT" | sed -n 's/.*-DCMAKE_CUDA_ARCHITECTURES=\([^ ]*\).*/\1/p')
fi
if [ "$GPU_OK" = 0 ]; then
  echo "no NVIDIA GPU: $GPU_WHY"
fi
ARCH=${GPU_CHECK_CUDA_ARCH:-${ARCH:-}}
[ -z "$ARCH" ] || echo "CUDA architecture(s) to build for: $ARCH"
MISSING=()
NVCC=${CUDACXX:-}
for c in "${CUDA_HOME:-}/bin/nvcc" /usr/local/cuda/bin/nvcc "$(command -v nvcc)"; do
  [ -n "$NVCC" ] || { [ -x "$c" ] && [ -f "$c" ] && NVCC=$c; }
done
LIB_ARGS=""
if [ -n "$NVCC" ]; then
  echo "nvcc: $NVCC ($("$NVCC" --version | sed -n 's/.*release \([0-9.]*\).*/\1/p'))"
  # ggml-cuda links cuBLAS, cuBLASLt and the driver's libcuda: the toolkit's (its stub for libcuda), else what
  # pip's nvidia-* wheels put beside the base Python's packages, else what the loader knows.
  CUDA_ROOT=$(cd "$(dirname "$(readlink -f "$NVCC")")/.." && pwd)
  SITES=$("$PY" -c 'import site; print(" ".join(site.getsitepackages()))' 2>/dev/null)
  for lib in cublas cublasLt cuda; do
    var=CUDA_${lib}_LIBRARY
    [ "$lib" = cuda ] && var=CUDA_cuda_driver_LIBRARY
    if ls "$CUDA_ROOT"/{lib64,lib64/stubs,targets/*/lib,targets/*/lib/stubs}/"lib$lib.so" >/dev/null 2>&1; then
      continue
    fi
    f=""
    for sp in $SITES; do
      [ -n "$f" ] || f=$(find "$sp/nvidia" -name "lib$lib.so*" 2>/dev/null | sort | head -1)
    done
    [ -n "$f" ] || f=$(ldconfig -p 2>/dev/null | awk -v n="lib$lib.so" 'index($1, n) == 1 { print $NF; exit }')
    if [ -n "$f" ]; then
      echo "lib$lib.so: not in $CUDA_ROOT; using $f"
      LIB_ARGS+=" -D$var=$f"
      if [ "$lib" = cublas ] && ! ls "$CUDA_ROOT"/{include,targets/*/include}/cublas_v2.h >/dev/null 2>&1; then
        h=$(find "$(dirname "$f")/.." -name cublas_v2.h 2>/dev/null | head -1)
        if [ -n "$h" ]; then LIB_ARGS+=" -DCMAKE_CUDA_FLAGS=-I$(dirname "$h")"; else MISSING+=("cublas_v2.h"); fi
      fi
    else
      MISSING+=("lib$lib.so (neither in $CUDA_ROOT, nor in an nvidia-* wheel, nor known to ldconfig)")
    fi
  done
else
  MISSING+=("nvcc (the CUDA toolkit)")
fi
if command -v cmake >/dev/null; then
  CMV=$(cmake --version | sed -n '1s/.* \([0-9][0-9.]*\).*/\1/p')
  echo "cmake: $CMV"
  printf '%s\n3.21\n' "$CMV" | sort -V -C && MISSING+=("cmake >= 3.21 (found $CMV)")
else
  MISSING+=("cmake >= 3.21")
fi
if command -v ninja >/dev/null; then echo "ninja: $(ninja --version)"; else MISSING+=(ninja); fi
if command -v "${CXX:-c++}" >/dev/null; then echo "c++: $("${CXX:-c++}" --version | head -1)"; else MISSING+=("a C++ compiler"); fi
NPROC=$(nproc)
echo "cores: $NPROC; memory: $(awk '/MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo);" \
  "free in $(dirname "$CACHE"): $(df -h --output=avail "$(dirname "$CACHE")" | tail -1 | tr -d ' ')"
echo "python: $PY ($("$PY" -c 'import sys; print(sys.version.split()[0], sys.prefix)' 2>&1))"
[ "${#MISSING[@]}" = 0 ] || echo "missing: ${MISSING[*]}"
if [ "$DRY" = 0 ]; then
  [ "$GPU_OK" = 1 ] || die 3 "no NVIDIA GPU on this machine ($GPU_WHY): this check needs one." \
    "GPU_CHECK_DRY_RUN=1 checks the rest without one."
  if [ "${#MISSING[@]}" != 0 ]; then
    if ls "$BUNDLE"/cuda/llama_cpp_python-* >/dev/null 2>&1 && [ "${GPU_CHECK_BUILD:-0}" = 0 ]; then
      echo "(a compile would need them; the prebuilt CUDA wheel in $BUNDLE/cuda does not)"
    else
      die 4 "missing: ${MISSING[*]}"
    fi
  fi
  end ok
else
  end "ok (dry run$([ "$GPU_OK" = 1 ] || echo ', no GPU'))"
fi

# ---------------------------------------------------------------------------------------------------------------
begin 2 build
SDIST=$BUNDLE/llama_cpp_python-$VER.tar.gz
WHEELS=$BUNDLE/wheels
{ [ -f "$SDIST" ] || ls "$BUNDLE"/cuda/llama_cpp_python-"$VER"-* >/dev/null 2>&1; } && [ -d "$WHEELS" ] || die 4 "no $SDIST or $WHEELS: run scripts/prepare-gpu-bundle.sh" \
  "where PyPI is reachable, and bring vendor/gpu-bundle along (device tool: carry [\"vendor/gpu-bundle\"])"
if [ -f "$BUNDLE/MANIFEST.txt" ]; then
  want=$(awk -v f="llama_cpp_python-$VER.tar.gz" '$3 == f { print $1 }' "$BUNDLE/MANIFEST.txt")
  [ -z "$want" ] || [ ! -f "$SDIST" ] || [ "$(sha256sum "$SDIST" | cut -c1-64)" = "$want" ] ||
    die 4 "$SDIST does not match MANIFEST.txt"
fi
# The venv sees the base interpreter's packages (PyTorch images ship numpy, pandas, ...). When that interpreter
# is itself a venv, --system-site-packages alone would show the venv's base instead: a .pth adds its own
# site-packages (after the venv's, so what is installed here wins).
if [ ! -x "$VPY" ]; then
  "$PY" -m venv --system-site-packages "$VENV" >"$WORK/logs/venv.log" 2>&1 ||
    "$PY" -m venv --system-site-packages --without-pip "$VENV" >>"$WORK/logs/venv.log" 2>&1 ||
    { cat "$WORK/logs/venv.log"; die 4 "$PY cannot make a venv"; }
fi
"$PY" -c 'import site; print("\n".join(site.getsitepackages()))' \
  >"$("$VPY" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')/_gpu_check_base.pth" ||
  die 4 "cannot read $PY's site-packages"
if ! "$VPY" -m pip --version >/dev/null 2>&1; then  # a venv without ensurepip: pip from its own wheel
  pipwhl=$(ls "$WHEELS"/pip-*.whl | head -1)
  "$VPY" "$pipwhl/pip" install -q --no-index "$pipwhl" || die 4 "cannot install pip into $VENV"
fi
PIP=("$VPY" -m pip --disable-pip-version-check --no-input)
echo "venv: $VENV (python $("$VPY" -c 'import sys; print(sys.version.split()[0])'), pip $("${PIP[@]}" --version | cut -d' ' -f2))"
# Only what is missing or too old is installed; the rest stays the base's. The build back end and setuptools
# must be here because the builds below run with --no-build-isolation (no index to fetch them from).
REQS=("scikit-build-core>=0.9.2" "setuptools>=68" "wheel" "gguf>=0.17" "diskcache>=5.6.1" "nvidia-ml-py>=12.0"
      "tqdm>=4.60" "typing-extensions>=4.5.0")
if ! "${PIP[@]}" install --no-index --find-links "$WHEELS" \
    "${REQS[@]}" >"$WORK/logs/pip-wheels.log" 2>&1; then
  tail -20 "$WORK/logs/pip-wheels.log"
  die 4 "the bundled wheels do not install (log above)"
fi
grep -E '^Successfully installed' "$WORK/logs/pip-wheels.log" || echo "bundled wheels: all already there"
if ! "${PIP[@]}" install -q --no-index --no-deps --no-build-isolation -e . \
    >"$WORK/logs/pip-harness.log" 2>&1; then
  tail -20 "$WORK/logs/pip-harness.log"
  die 4 "the harness does not install (log above)"
fi
# Every runtime need of the harness but llama-cpp-python (built next), with the version pyproject.toml asks for.
if ! "$VPY" - <<'EOF'
import importlib.metadata as md
import sys

from packaging.requirements import Requirement

found, bad = [], []
for text in md.requires("harness") or []:
    req = Requirement(text)
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue  # the test extra
    if req.name == "llama-cpp-python":
        continue
    try:
        v = md.version(req.name)
    except md.PackageNotFoundError:
        bad.append(f"{req} (missing)")
        continue
    if req.specifier.contains(v, prereleases=True):
        found.append(f"{req.name} {v}")
    else:
        bad.append(f"{req} (found {v})")
print("harness needs:", ", ".join(found))
if bad:
    print("not on this machine and not in vendor/gpu-bundle/wheels:", "; ".join(bad))
    sys.exit(1)
EOF
then
  die 4 "packages the harness needs are missing (line above): bundle them (scripts/prepare-gpu-bundle.sh)"
fi

# One architecture, no tools/tests/examples/server, no mtmd (multimodal: the harness never loads it), no NCCL
# (one GPU), flash-attention vector kernels for the f16 KV cache only (the harness's). CPU part: native, but
# without AMX, as scripts/setup.sh (some virtual machines advertise AMX and fault on it).
CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=${ARCH:-<none>} -DCMAKE_CUDA_COMPILER=$NVCC"
CMAKE_ARGS+=" -DGGML_CUDA_FA_ALL_QUANTS=OFF -DGGML_CUDA_FA_QUANTS=f16-f16 -DGGML_CUDA_NCCL=OFF -DLLAVA_BUILD=OFF"
CMAKE_ARGS+=" -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF"
CMAKE_ARGS+=" -DLLAMA_BUILD_APP=OFF -DLLAMA_OPENSSL=OFF -DGGML_RPC=ON$LIB_ARGS ${GPU_CHECK_CMAKE_ARGS:-}"
export CMAKE_ARGS CMAKE_GENERATOR=Ninja CMAKE_BUILD_PARALLEL_LEVEL=$NPROC
AMX_OFF="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
if [ "$DRY" = 1 ]; then
  : # a dry run compiles nothing, not even the probe below
elif [ "$(uname -m)" = x86_64 ] && echo 'int main(void){return 0;}' | ${CC:-cc} -mno-amx-tile -x c -o /dev/null - 2>/dev/null; then
  export CFLAGS="${CFLAGS:-} $AMX_OFF" CXXFLAGS="${CXXFLAGS:-} $AMX_OFF"
fi
STAMP=$VENV/.llama-cpp-python-$VER-cuda-${ARCH//;/_}
# A CUDA build made where there are cores to spare (scripts/build-cuda-wheel.sh, into vendor/gpu-bundle/cuda/)
# is installed instead of compiling here, when it was built for this GPU's architecture (GPU_CHECK_BUILD=1
# compiles all the same). Its libraries link CUDA's runtime and cuBLAS of its CUDA major version: where the
# loader does not know them, they are looked up in the toolkit and in the base Python's nvidia-* packages and
# put on LD_LIBRARY_PATH (for the checks below and the run).
PREBUILT=""
for w in "$BUNDLE"/cuda/llama_cpp_python-"$VER"-*.whl "$BUNDLE"/cuda/llama_cpp_python-"$VER"-*.tar.xz; do
  [ -f "$w" ] || continue
  warch=$(sed -n 's/^cuda_architectures: *//p' "$BUNDLE/cuda/BUILD-INFO.txt" 2>/dev/null)
  if [ "${GPU_CHECK_BUILD:-0}" = 1 ]; then
    echo "prebuilt $(basename "$w") ignored (GPU_CHECK_BUILD=1)"
  elif ! grep -q '^links: libcuda.so.1' "$BUNDLE/cuda/BUILD-INFO.txt" 2>/dev/null; then
    # builds linked against an empty driver stub do not name libcuda.so.1 and cannot load: undefined cuMemCreate
    echo "prebuilt $(basename "$w") is not checked to link the driver's libcuda.so.1 (BUILD-INFO.txt): compiling instead"
  elif [ -n "$ARCH" ] && [ "$warch" = "$ARCH" ]; then
    PREBUILT=$w
    echo "prebuilt CUDA build: $(basename "$w") ($(du -h "$w" | cut -f1)); $(grep -E '^(cuda|built|llama)' "$BUNDLE/cuda/BUILD-INFO.txt" | paste -sd';')"
  else
    echo "prebuilt $(basename "$w") is for CUDA architectures '$warch', this GPU needs '$ARCH': compiling instead"
  fi
done
cuda_libs_path() {  # add to LD_LIBRARY_PATH the folders of the CUDA libraries the installed build cannot find
  local so missing lib dir cands=() sp
  # the installed package's libraries found without importing it: the import is what fails where libcudart or
  # libcublas are not on the loader's path, the one case this function is for
  so=$("$VPY" -c 'import importlib.util as u, os, glob; s = u.find_spec("llama_cpp"); print(" ".join(glob.glob(os.path.join(os.path.dirname(s.origin), "lib", "libggml-cuda*.so*"))) if s else "")' 2>/dev/null) || return 0
  [ -n "$so" ] || return 0
  [ -n "${CUDA_ROOT:-}" ] && cands+=("$CUDA_ROOT"/lib64 "$CUDA_ROOT"/targets/*/lib)
  cands+=(/usr/local/cuda/lib64 /usr/local/cuda/targets/*/lib)
  for sp in $("$PY" -c 'import site; print(" ".join(site.getsitepackages()))' 2>/dev/null); do
    cands+=("$sp"/nvidia/*/lib "$sp"/nvidia/cu*/lib)
  done
  # shellcheck disable=SC2086
  missing=$(ldd $so 2>/dev/null | awk '/not found/ { print $1 }' | sort -u)
  for lib in $missing; do
    for dir in "${cands[@]}"; do
      if [ -e "$dir/$lib" ]; then
        case ":${LD_LIBRARY_PATH:-}:" in *":$dir:"*) ;; *) export LD_LIBRARY_PATH="$dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" ;; esac
        echo "  $lib: $dir"
        break
      fi
    done
  done
  # shellcheck disable=SC2086
  missing=$(ldd $so 2>/dev/null | awk '/not found/ { print $1 }' | sort -u | paste -sd' ')
  [ -z "$missing" ] || echo "  still not found: $missing"
}
cuda_libs_path
if [ "$DRY" = 1 ]; then
  echo "dry run: not compiling llama-cpp-python $VER ($(du -h "$SDIST" | cut -f1) pruned source package);" \
    "it would build on $NPROC cores with CMAKE_ARGS=$CMAKE_ARGS and, where the compiler takes them," \
    "CFLAGS/CXXFLAGS+=$AMX_OFF"
  end "ok (dry run: no compile)"
elif [ -f "$STAMP" ] && "$VPY" -c 'import llama_cpp, sys; sys.exit(not llama_cpp.llama_supports_gpu_offload())' 2>/dev/null; then
  echo "llama-cpp-python $VER with CUDA for $ARCH already built in $VENV: reused"
  end "ok (reused)"
elif [ -n "$PREBUILT" ]; then
  if [ "${PREBUILT%.tar.xz}" != "$PREBUILT" ]; then
    # the installed package itself (llama_cpp/ with its libraries as symlinks, and its dist-info), packed by
    # scripts/build-cuda-wheel.sh: a wheel cannot hold symlinks and would carry libggml-cuda.so three times
    PURE=$("$VPY" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
    rm -rf "$PURE/llama_cpp" "$PURE"/llama_cpp_python-*.dist-info
    tar -xJf "$PREBUILT" -C "$PURE" || die 5 "cannot unpack $PREBUILT"
  else
    "${PIP[@]}" install -q --no-index --no-deps --force-reinstall "$PREBUILT" >"$WORK/logs/pip-prebuilt.log" 2>&1 ||
      { tail -20 "$WORK/logs/pip-prebuilt.log"; die 5 "the prebuilt CUDA wheel does not install (log above)"; }
  fi
  echo "installed $(basename "$PREBUILT"); CUDA libraries it needs from outside the loader's path:"
  cuda_libs_path
  touch "$STAMP"
  end "ok (prebuilt)"
else
  echo "building llama-cpp-python $VER on $NPROC cores: CMAKE_ARGS=$CMAKE_ARGS CFLAGS=${CFLAGS:-}"
  BLOG=$WORK/logs/build-llama-cpp-python.log
  # Source and build folders at fixed places under build/ (ignored): a second call on the same machine, after
  # a build cut short, compiles only what is left.
  SRCDIR=$REPO/build/gpu-llama-cpp-python/src
  if [ "$(cat "$SRCDIR/.sdist-sha256" 2>/dev/null)" != "$(sha256sum "$SDIST" | cut -c1-64)" ]; then
    rm -rf "$SRCDIR"
    mkdir -p "$SRCDIR"
    tar xzf "$SDIST" -C "$SRCDIR" --strip-components=1 || die 5 "cannot unpack $SDIST"
    sha256sum "$SDIST" | cut -c1-64 >"$SRCDIR/.sdist-sha256"
  fi
  # its own process group (setsid), so that an interrupted check stops ninja and nvcc too (on_exit)
  setsid -w "${PIP[@]}" install -v --no-index --no-deps --no-build-isolation --ignore-installed --no-cache-dir \
    --config-settings=build-dir="$REPO/build/gpu-llama-cpp-python/build" "$SRCDIR" >"$BLOG" 2>&1 &
  BPID=$!
  while kill -0 "$BPID" 2>/dev/null; do  # a progress line a minute: ninja's [done/total]
    sleep 5
    if [ $(( $(elapsed) % 60 )) -lt 5 ]; then
      echo "  +$(elapsed) s: $(grep -oE '^\[[0-9]+/[0-9]+\]' "$BLOG" | tail -1) $(grep -cE '^\[[0-9]+/[0-9]+\]' "$BLOG") steps"
    fi
  done
  wait "$BPID"
  brc=$?
  BPID=""
  if [ "$brc" != 0 ]; then
    grep -nE 'error|Error|FAILED' "$BLOG" | head -20
    tail -40 "$BLOG"
    die 5 "llama-cpp-python did not build (above: its first errors and the log's end)"
  fi
  grep -E 'CMAKE_CUDA_ARCHITECTURES=|CUDA Toolkit found|Using CUDA architectures|Successfully installed' "$BLOG" | head -5
  touch "$STAMP"
  end ok
fi

# ---------------------------------------------------------------------------------------------------------------
if [ "$DRY" = 1 ]; then
  if [ "$GPU_OK" = 0 ]; then
    die 3 "no NVIDIA GPU on this machine ($GPU_WHY): dry run of stages 1-2 done, without compiling;" \
      "stages 3-4 need a GPU"
  fi
  [ "${#MISSING[@]}" = 0 ] || die 4 "missing: ${MISSING[*]}"
  echo "gpu-check: dry run done: GPU found; run without GPU_CHECK_DRY_RUN to build and measure"
  exit 0
fi

begin 3 verify
if ! "$VPY" - "$VENV" <<'EOF'
import os
import sys

import llama_cpp

where = os.path.dirname(llama_cpp.__file__)
print(f"llama-cpp-python {llama_cpp.__version__} from {where}")
print("lib:", " ".join(sorted(os.listdir(os.path.join(where, "lib")))))
print("system info:", llama_cpp.llama_print_system_info().decode(errors="replace").strip())
ok = bool(llama_cpp.llama_supports_gpu_offload())
print("llama_supports_gpu_offload():", ok)
if not os.path.realpath(where).startswith(os.path.realpath(sys.argv[1])):
    print(f"not the build in {sys.argv[1]}")
    ok = False
sys.exit(0 if ok else 1)
EOF
then
  die 6 "this llama-cpp-python cannot offload to the GPU (llama_supports_gpu_offload() is False):" \
    "a CPU number must never pass for a GPU one; see the build log in gpu-check.tar.gz"
fi
end ok

# ---------------------------------------------------------------------------------------------------------------
begin 4 run
CTX_CONFIG=${GPU_CHECK_CONTEXTS_CONFIG-configs/1b-synthetic-gpu-contexts.yaml}
CTX_RESERVE=0
[ -z "$CTX_CONFIG" ] || CTX_RESERVE=${GPU_CHECK_CONTEXTS_RESERVE_S:-150}
# 45 s for a slow stop (15 s), the report and stage 5; the context sweep's reserve (it gets what is left)
left=$((DEADLINE_S - $(elapsed) - 45 - CTX_RESERVE))
if [ "$left" -lt 60 ]; then
  end "skipped (${left} s left of GPU_CHECK_DEADLINE_S=$DEADLINE_S)"
  die 1 "no time left to measure"
fi
args=(run "$CONFIG" --out "$RES" --cache-dir "$CACHE" --no-report --no-progress)
[ -z "${GPU_CHECK_QUANTS:-}" ] || args+=(--quants "$GPU_CHECK_QUANTS")
echo "python -m harness ${args[*]} (interrupted after $left s)"
( while sleep 5; do mirror; done ) &
MIRROR_PID=$!
# SIGINT: the harness stops cleanly (exit 130) with every record measured so far written
timeout -s INT -k 15 "$left" env PYTHONUNBUFFERED=1 "$VPY" -m harness "${args[@]}" 2>&1 | tee "$WORK/logs/run.log"
run_rc=${PIPESTATUS[0]}
kill "$MIRROR_PID" 2>/dev/null
MIRROR_PID=""
mirror
case "$run_rc" in 124|137) run_rc=130 ;; esac  # timeout's own codes: the deadline, then KILL 15 s later
echo "harness run: exit $run_rc"
if [ -f "$RES/records.jsonl" ]; then
  "$VPY" - "$RES" "$CONFIG" "${GPU_CHECK_QUANTS:-}" <<'EOF' || { [ "$run_rc" != 0 ] || run_rc=1; }
import collections
import json
import os
import sys

from harness import config

cfg = config.load(sys.argv[2], {"quants": sys.argv[3]} if sys.argv[3] else None)
by = collections.defaultdict(collections.Counter)
for name in ("records.jsonl", "batched.jsonl"):  # a serving config's records are all batched
    path = os.path.join(sys.argv[1], name)
    for line in open(path) if os.path.exists(path) else ():
        if line.strip():
            r = json.loads(line)
            by[r["quant"]][r["device"] if r["status"] == "ok" else "error"] += 1
bad = []
for q in cfg.quants:
    c = by.get(q)
    if not c:
        bad.append(f"{q}: not measured")
    elif set(c) != {"cuda"}:
        bad.append(f"{q}: {dict(c)}")
print(f"records: {sum(sum(c.values()) for c in by.values())}, by quant and device:",
      "; ".join(f"{q} {dict(c)}" for q, c in by.items()))
if bad:
    print("NOT all on the GPU:", "; ".join(bad))
sys.exit(1 if bad else 0)
EOF
else
  echo "no records"
  [ "$run_rc" != 0 ] || run_rc=1
fi
if [ "$(elapsed)" -gt $((DEADLINE_S - 25)) ]; then
  echo "no time left for the report: python -m harness report results/ after unpacking gpu-check.tar.gz"
elif [ -d "$RES" ] && "$VPY" -c "import harness.report" 2>/dev/null; then
  "$VPY" -m harness report "$RES" --out "$WORK/report" >"$WORK/logs/report.log" 2>&1 ||
    { tail -5 "$WORK/logs/report.log"; echo "report failed (records intact)"; }
fi
if [ -n "$CTX_CONFIG" ]; then  # speed along the context axis: tg at depth (its own results folder)
  cleft=$((DEADLINE_S - $(elapsed) - 30))
  if [ "$cleft" -lt 45 ]; then
    echo "context sweep ($CTX_CONFIG) skipped: $cleft s left of GPU_CHECK_DEADLINE_S"
  else
    cargs=(run "$CTX_CONFIG" --out "$WORK/contexts" --cache-dir "$CACHE" --no-report --no-progress)
    echo "python -m harness ${cargs[*]} (interrupted after $cleft s)"
    timeout -s INT -k 15 "$cleft" env PYTHONUNBUFFERED=1 "$VPY" -m harness "${cargs[@]}" 2>&1 |
      tee "$WORK/logs/contexts-run.log"
    echo "context sweep: exit ${PIPESTATUS[0]}"
  fi
fi
case "$run_rc" in
  0) end ok ;;
  130) end interrupted; RC=1; echo "gpu-check: FAILED: the run was interrupted at the deadline (GPU_CHECK_DEADLINE_S)" ;;
  *) end failed; RC=1; echo "gpu-check: FAILED: some quants failed or did not run on the GPU (above)" ;;
esac

exit "$RC"
