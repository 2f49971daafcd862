#!/usr/bin/env bash
# Locates NVRTC (the CUDA runtime compiler) and the CUDA headers the kernels include
# (cuda_fp16.h, cuda_bf16.h), and prints the two variables build.rs reads:
#
#   DEEPCUT_NVRTC_LIB     path of libnvrtc.so.*
#   DEEPCUT_CUDA_INCLUDE  folder holding cuda_bf16.h
#
# Usage:   eval "$(scripts/nvrtc-env.sh)"            # then cargo build
#          scripts/nvrtc-env.sh --install             # pip-installs the CUDA 12 wheels first
#
# build.rs searches the same places itself, in the same order, so sourcing this is only
# needed to point a build at a particular NVRTC or to see which one a build will use:
#   1. DEEPCUT_NVRTC_LIB / DEEPCUT_CUDA_INCLUDE already set
#   2. a CUDA toolkit: $CUDA_PATH, $CUDA_HOME, /usr/local/cuda
#   3. the PyPI wheels nvidia-cuda-nvrtc-cu12 (library) + nvidia-cuda-runtime-cu12 (headers)
#   4. the CUDA 13 wheel layout (nvidia/cu13), as PyTorch cu13 installs it
# No GPU and no driver are needed: NVRTC compiles, it does not run anything.
set -euo pipefail

if [ "${1:-}" = "--install" ]; then
    python3 -m pip install --quiet --disable-pip-version-check nvidia-cuda-nvrtc-cu12 nvidia-cuda-runtime-cu12 >&2
fi

lib="${DEEPCUT_NVRTC_LIB:-}"
inc="${DEEPCUT_CUDA_INCLUDE:-}"

first_match() { for f in "$@"; do [ -e "$f" ] && { echo "$f"; return 0; }; done; return 1; }

if [ -z "$lib" ] || [ -z "$inc" ]; then
    for root in "${CUDA_PATH:-}" "${CUDA_HOME:-}" /usr/local/cuda; do
        [ -n "$root" ] && [ -d "$root" ] || continue
        l=$(first_match "$root"/lib64/libnvrtc.so "$root"/lib64/libnvrtc.so.* "$root"/lib/libnvrtc.so \
            "$root"/targets/x86_64-linux/lib/libnvrtc.so 2>/dev/null || true)
        if [ -n "$l" ] && [ -e "$root/include/cuda_bf16.h" ]; then
            lib="${lib:-$l}"; inc="${inc:-$root/include}"; break
        fi
    done
fi

if [ -z "$lib" ] || [ -z "$inc" ]; then
    nv=$(python3 -c 'import nvidia, os; print(os.pathsep.join(nvidia.__path__))' 2>/dev/null || true)
    IFS=: read -r -a roots <<<"$nv"
    for root in "${roots[@]}"; do
        l=$(first_match "$root"/cuda_nvrtc/lib/libnvrtc.so.12 2>/dev/null || true)
        if [ -n "$l" ] && [ -e "$root/cuda_runtime/include/cuda_bf16.h" ]; then
            lib="${lib:-$l}"; inc="${inc:-$root/cuda_runtime/include}"; break
        fi
        l=$(first_match "$root"/cu13/lib/libnvrtc.so.13 2>/dev/null || true)
        if [ -n "$l" ] && [ -e "$root/cu13/include/cuda_bf16.h" ]; then
            lib="${lib:-$l}"; inc="${inc:-$root/cu13/include}"; break
        fi
    done
fi

if [ -z "$lib" ] || [ -z "$inc" ]; then
    echo "nvrtc-env: no NVRTC found (no CUDA toolkit, no nvidia-cuda-nvrtc-cu12 wheel);" >&2
    echo "  install with: python3 -m pip install nvidia-cuda-nvrtc-cu12 nvidia-cuda-runtime-cu12" >&2
    exit 1
fi
echo "export DEEPCUT_NVRTC_LIB='$lib'"
echo "export DEEPCUT_CUDA_INCLUDE='$inc'"
