#!/usr/bin/env bash
# Which llama.cpp back end this machine's accelerator needs, for scripts/setup.sh and scripts/gpu-check.sh.
#
#   scripts/detect-backend.sh      # prints three lines: backend=cpu|cuda|hip|vulkan|metal, why=..., cmake=...
#
# HARNESS_BACKEND=cpu|cuda|hip|vulkan|metal overrides the detection (why= says so). Every build also gets
# llama.cpp's RPC back end (-DGGML_RPC=ON): its loopback server is the offload device the tests run on.
# CUDA: the compute capability of every visible NVIDIA GPU (NVML through nvidia-smi), for those architectures
# only; the compiler is the toolkit's nvcc where there is one (else setup.sh gets it from PyPI's nvidia-* wheels,
# as scripts/build-cuda-wheel.sh does). Vulkan: a loader that lists a device other than llvmpipe (a CPU) and
# headers at least 1.3.275 (the pinned llama.cpp's Vulkan back end needs vk::LayerSettingEXT; Debian 12 has
# 1.3.239), else the CPU with the reason said.
set -uo pipefail
why=""
cuda_arch=""
detect() {
  if command -v nvidia-smi >/dev/null 2>&1; then
    local caps
    if caps=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null) && [ -n "$caps" ]; then
      cuda_arch=$(echo "$caps" | tr -d ' .' | sort -u | paste -sd';')
      local name
      name=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
      why="NVIDIA GPU ($name, compute capability $(echo "$caps" | head -1 | tr -d ' ')) found by nvidia-smi"
      backend=cuda
      return
    fi
  fi
  if [ "$(uname -s)" = Darwin ] && [ "$(uname -m)" = arm64 ]; then
    why="macOS on Apple silicon"
    backend=metal
    return
  fi
  if command -v rocminfo >/dev/null 2>&1 && rocminfo 2>/dev/null | grep -q 'gfx[0-9]'; then
    why="AMD GPU ($(rocminfo | grep -o -m1 'gfx[0-9a-f]*')) found by rocminfo"
    backend=hip
    return
  fi
  if command -v vulkaninfo >/dev/null 2>&1; then
    local devs hv
    devs=$(vulkaninfo --summary 2>/dev/null | sed -n 's/^[[:space:]]*deviceName[[:space:]]*=[[:space:]]*//p' | grep -vi llvmpipe)
    if [ -n "$devs" ]; then
      hv=$(sed -n 's/^#define VK_HEADER_VERSION \([0-9]*\).*/\1/p' /usr/include/vulkan/vulkan_core.h 2>/dev/null)
      if [ -n "$hv" ] && [ "$hv" -ge 275 ]; then
        why="Vulkan device ($(echo "$devs" | head -1)) with headers 1.3.$hv"
        backend=vulkan
        return
      fi
      why="Vulkan device ($(echo "$devs" | head -1)) found, but the Vulkan headers (1.3.${hv:-none}) are older than the 1.3.275 the pinned llama.cpp needs: the CPU instead (install newer Vulkan headers, then HARNESS_BACKEND=vulkan)"
      backend=cpu
      return
    fi
  fi
  why="no GPU found (no nvidia-smi GPU, no ROCm agent, no Vulkan device but the CPU's, not Apple silicon)"
  backend=cpu
}
if [ -n "${HARNESS_BACKEND:-}" ]; then
  backend=$HARNESS_BACKEND
  case "$backend" in cpu|cuda|hip|vulkan|metal) ;; *)
    echo "detect-backend: HARNESS_BACKEND=$backend: not one of cpu, cuda, hip, vulkan, metal" >&2; exit 2 ;;
  esac
  why="HARNESS_BACKEND=$backend"
  if [ "$backend" = cuda ]; then
    cuda_arch=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | tr -d ' .' | sort -u | paste -sd';')
  fi
else
  detect
fi
cmake="-DGGML_RPC=ON"
case "$backend" in
  cuda) cmake+=" -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=${HARNESS_CUDA_ARCH:-${cuda_arch:-90}} -DGGML_CUDA_NCCL=OFF" ;;
  hip) cmake+=" -DGGML_HIP=ON" ;;
  vulkan) cmake+=" -DGGML_VULKAN=ON" ;;
  metal) cmake+=" -DGGML_METAL=ON" ;;
  cpu) ;;
esac
echo "backend=$backend"
echo "why=$why"
echo "cmake=$cmake"
