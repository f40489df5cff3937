#!/usr/bin/env bash
# nvcc check of the CUDA code, without a GPU and without a CUDA build of torch (.ci/run runs
# it when nvcc is installed). Headers alone prove little (a template nobody instantiates is
# barely parsed), so this compiles translation units that instantiate the code:
#   - every csrc/cuda/*.cu that includes no torch header: kernel instantiations (one small
#     .cu per kernel template and dtype/head dim, FlashAttention's layout) and build_info.cu;
#   - every csrc/cuda/nvcc_check/*.cu: check-only instantiations, e.g. params.cu, which passes
#     each struct of include/memory3/params.h to a kernel;
#   each for sm_80 and sm_90a;
#   - every torch-facing launcher (csrc/cuda/*.cu that includes torch) against the headers of
#     the installed torch, even a CPU wheel (it ships the ATen/c10 CUDA headers; the one
#     header its build generates, c10/cuda/impl/cuda_cmake_macros.h, is supplied here when
#     missing): compile to .o only, for sm_90a (their device code is a few small kernels), so
#     launcher API mistakes show without a GPU. MEMORY3_SKIP_LAUNCHERS=1 skips this part.
# It also fails when a .cuh is instantiated by no .cu, or when a header of include/memory3/
# includes torch, or params.h a compiler vector extension. Units compile in parallel (nproc).
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC=${NVCC:-nvcc}
JOBS=${JOBS:-$(nproc)}
ARCHS=(-gencode=arch=compute_80,code=sm_80 -gencode=arch=compute_90a,code=sm_90a)
FLAGS=(-std=c++17 -O1 --expt-relaxed-constexpr -Icsrc/include)
if CUTLASS=$(python3 third_party/find_cutlass.py 2>/dev/null); then
  FLAGS+=(-I"$CUTLASS/include" -DMEMORY3_HAVE_CUTLASS)
fi

fail() { echo "check_cuda_sources: $*" >&2; exit 1; }

if grep -lE '#include <(torch|ATen|c10)/' csrc/include/memory3/*; then fail "headers above include torch"; fi
if grep -nE 'vector_size|#include "memory3/(cpu_|numeric)' csrc/include/memory3/params.h; then
  fail "params.h must stay free of vector extensions and CPU headers"
fi

sources=()
launchers=()
for source in csrc/cuda/*.cu csrc/cuda/nvcc_check/*.cu; do
  [ -e "$source" ] || continue
  if grep -qE '#include <(torch|ATen|c10)/' "$source"; then launchers+=("$source"); else sources+=("$source"); fi
done
for header in csrc/include/memory3/*.cuh; do
  [ -e "$header" ] || continue
  name=$(basename "$header")
  grep -lqF "memory3/$name\"" "${sources[@]}" || fail "$header is instantiated by no torch-free .cu in csrc/cuda/"
done

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# Runs "$@" in the background, at most JOBS at a time; `finish` waits for all and fails on any.
pids=()
run_job() {
  while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n || true; done
  "$@" &
  pids+=($!)
}
compile() {  # compile LOG SOURCE FLAGS...
  local log=$1 source=$2
  shift 2
  if "$NVCC" "$@" -c "$source" -o "$tmp/$(basename "$source").o" >"$log" 2>&1; then
    echo "nvcc ok: $source"
  else
    echo "nvcc FAILED: $source" >&2
    cat "$log" >&2
    return 1
  fi
}
finish() {
  local failed=0
  for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
  pids=()
  [ "$failed" -eq 0 ] || fail "compile errors above"
}

for source in "${sources[@]}"; do
  run_job compile "$tmp/$(basename "$source").log" "$source" "${FLAGS[@]}" "${ARCHS[@]}"
done
finish
echo "nvcc compiled ${#sources[@]} torch-free CUDA translation units for sm_80 and sm_90a"

if [ "${MEMORY3_SKIP_LAUNCHERS:-0}" = 1 ] || [ ${#launchers[@]} -eq 0 ]; then exit 0; fi
torch_include=$(python3 -c "import os, torch; print(os.path.join(os.path.dirname(torch.__file__), 'include'))")
mkdir -p "$tmp/stub/c10/cuda/impl"
if [ ! -e "$torch_include/c10/cuda/impl/cuda_cmake_macros.h" ]; then
  printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' >"$tmp/stub/c10/cuda/impl/cuda_cmake_macros.h"
fi
abi=$(python3 -c "import torch; print(int(torch.compiled_with_cxx11_abi()))")
LAUNCHER_FLAGS=("${FLAGS[@]}" -Icsrc -I"$tmp/stub" -I"$torch_include" -I"$torch_include/torch/csrc/api/include"
  -D_GLIBCXX_USE_CXX11_ABI="$abi" -DMEMORY3_WITH_CUDA -Xcompiler -Wno-c++20-extensions -diag-suppress 3306
  -gencode=arch=compute_90a,code=sm_90a)
for source in "${launchers[@]}"; do
  run_job compile "$tmp/$(basename "$source").log" "$source" "${LAUNCHER_FLAGS[@]}"
done
finish
echo "nvcc compiled ${#launchers[@]} torch-facing CUDA launchers against $(python3 -c 'import torch; print(torch.__version__)') headers (sm_90a, no link)"
