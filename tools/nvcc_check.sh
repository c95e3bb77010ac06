#!/usr/bin/env bash
# Compile every csrc/cuda/*.cu with nvcc (no linking, no GPU needed), so CUDA
# code never lands uncompiled. Usage: tools/nvcc_check.sh [file.cu ...]
# Env: NVCC (default nvcc), PYTHON (default python3), PYGEN_NVCC_ARCHS
# (default "80 90"), MAX_JOBS.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
NVCC=${NVCC:-nvcc}
PYTHON=${PYTHON:-python3}
archs=${PYGEN_NVCC_ARCHS:-"80 90"}
command -v "$NVCC" >/dev/null || { echo "nvcc_check: $NVCC not found, skipping"; exit 0; }
torch_inc=$("$PYTHON" -c "import torch.utils.cpp_extension as c; print(' '.join('-I'+p for p in c.include_paths()))")
gencode=""
for a in $archs; do gencode+=" -gencode arch=compute_${a},code=sm_${a}"; done
files=("$@")
[ ${#files[@]} -gt 0 ] || files=("$root"/csrc/cuda/*.cu)
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
status=0
for f in "${files[@]}"; do
  echo "nvcc_check: $f"
  if ! "$NVCC" -c "$f" -o "$out/$(basename "$f").o" -std=c++20 -O3 --expt-relaxed-constexpr \
      -DPYGEN_TORCH_EXTENSION -DPYGEN_WITH_CUDA -I"$root/csrc/include" $torch_inc -I"$root/tools/nvcc_stub" \
      $gencode -Xcudafe --diag_suppress=20012 2> "$out/log"; then
    grep -v -i "warning" "$out/log" | head -40
    status=1
  fi
done
exit $status
