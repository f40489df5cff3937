#!/usr/bin/env bash
# Compiles the torch-free CUDA code with nvcc for every target architecture, without a GPU
# and without a CUDA build of torch: each csrc/include/memory3/*.cuh in a translation unit
# of its own, and each csrc/cuda/*.cu that includes no torch header. Catches syntax and
# template errors before a GPU ever sees the code. Used by .ci/run when nvcc is present.
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC=${NVCC:-nvcc}
ARCHS=(-gencode=arch=compute_80,code=sm_80 -gencode=arch=compute_90a,code=sm_90a)
FLAGS=(-std=c++17 -O1 --expt-relaxed-constexpr -Icsrc/include "${ARCHS[@]}")
if CUTLASS=$(python3 third_party/find_cutlass.py 2>/dev/null); then
  FLAGS+=(-I"$CUTLASS/include" -DMEMORY3_HAVE_CUTLASS)
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
count=0
for header in csrc/include/memory3/*.cuh; do
  [ -e "$header" ] || continue
  name=$(basename "$header" .cuh)
  echo "#include \"memory3/$name.cuh\"" > "$tmp/$name.cu"
  echo "nvcc: $header"
  "$NVCC" "${FLAGS[@]}" -c "$tmp/$name.cu" -o "$tmp/$name.o"
  count=$((count + 1))
done
for source in csrc/cuda/*.cu; do
  [ -e "$source" ] || continue
  if grep -qE '#include <(torch|ATen|c10)/' "$source"; then continue; fi
  echo "nvcc: $source"
  "$NVCC" "${FLAGS[@]}" -c "$source" -o "$tmp/$(basename "$source").o"
  count=$((count + 1))
done
echo "nvcc compiled $count torch-free CUDA sources for sm_80 and sm_90a"
