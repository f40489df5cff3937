#!/usr/bin/env bash
# nvcc check of the CUDA code, without a GPU and without a CUDA build of torch (.ci/run runs
# it when nvcc is installed). Headers alone prove little (a template nobody instantiates is
# barely parsed), so this compiles translation units that instantiate the code:
#   - every csrc/cuda/*.cu that includes no torch header: kernel instantiations (one small
#     .cu per kernel template and dtype/head dim, FlashAttention's layout) and build_info.cu;
#   - every csrc/cuda/nvcc_check/*.cu: check-only instantiations, e.g. params.cu, which passes
#     each struct of include/memory3/params.h to a kernel;
# each for sm_80 and sm_90a. It also fails when a .cuh is instantiated by no .cu, or when a
# header of include/memory3/ includes torch, or params.h a compiler vector extension.
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC=${NVCC:-nvcc}
ARCHS=(-gencode=arch=compute_80,code=sm_80 -gencode=arch=compute_90a,code=sm_90a)
FLAGS=(-std=c++17 -O1 --expt-relaxed-constexpr -Icsrc/include "${ARCHS[@]}")
if CUTLASS=$(python3 third_party/find_cutlass.py 2>/dev/null); then
  FLAGS+=(-I"$CUTLASS/include" -DMEMORY3_HAVE_CUTLASS)
fi

fail() { echo "check_cuda_sources: $*" >&2; exit 1; }

if grep -lE '#include <(torch|ATen|c10)/' csrc/include/memory3/*; then fail "headers above include torch"; fi
if grep -nE 'vector_size|#include "memory3/(cpu_|numeric)' csrc/include/memory3/params.h; then
  fail "params.h must stay free of vector extensions and CPU headers"
fi

sources=()
for source in csrc/cuda/*.cu csrc/cuda/nvcc_check/*.cu; do
  [ -e "$source" ] || continue
  grep -qE '#include <(torch|ATen|c10)/' "$source" || sources+=("$source")
done
for header in csrc/include/memory3/*.cuh; do
  [ -e "$header" ] || continue
  name=$(basename "$header")
  grep -lqF "memory3/$name\"" "${sources[@]}" || fail "$header is instantiated by no torch-free .cu in csrc/cuda/"
done

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for source in "${sources[@]}"; do
  echo "nvcc: $source"
  "$NVCC" "${FLAGS[@]}" -c "$source" -o "$tmp/$(basename "$source").o"
done
echo "nvcc compiled ${#sources[@]} CUDA translation units for sm_80 and sm_90a"
