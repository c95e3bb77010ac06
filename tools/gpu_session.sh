#!/usr/bin/env bash
# What a session with a lent GPU runs, in stages that each fit one device call (<= 10 minutes).
#
#   tools/gpu_session.sh build      # pygen._C with the CUDA kernels, in place (sm_90 by default)
#   tools/gpu_session.sh test       # every `cuda`-marked test, log under $OUT
#   tools/gpu_session.sh sanitize   # compute-sanitizer memcheck/racecheck over tools/op_smoke.py
#   tools/gpu_session.sh bench      # the GPU figures: pygen bench + the benchmark suites, reports under $OUT
#   tools/gpu_session.sh all        # build test sanitize (bench is long: its own call)
#
# Written for the device tool's machines (see /work/.library/device/): python3 there holds
# torch (+cu130), triton, pytest and pytest-benchmark but no diffusers / k-diffusion / torchsde;
# the tests that need those skip unless their wheels are carried (device README, ".whl").
# The in-place build survives between calls while the machine stays warm (pygen/_C*.so is ignored
# by git, so pass nothing in carry); a fresh machine needs `build` again (~1-2 min with 16 jobs).
# Env: TORCH_CUDA_ARCH_LIST (default 9.0), MAX_JOBS (default 16), OUT (default ./gpu-out).
# Copy what comes back from $OUT into benchmarks/results/ with the device, versions and date.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
OUT=${OUT:-$ROOT/gpu-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET PYGEN_BACKEND
status=0

info() {
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  "$PY" -c 'import torch, triton, pygen; print("torch", torch.__version__, "cuda", torch.version.cuda, "| triton", triton.__version__); print("pygen backends:", pygen.backends())'
}

build() {
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
  "$PY" setup.py -q build_ext --inplace 2>&1 | tee "$OUT/build.log" | grep -E "pygen setup|error" || true
  "$PY" -c 'import pygen, sys; b = pygen.backends(); print(b); sys.exit(b["cuda"] != "available")' || status=1
}

run_tests() {
  "$PY" -m pytest -m cuda tests -q -p no:cacheprovider 2>&1 | tee "$OUT/test-cuda.log" | tail -25
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
}

sanitize() {
  local tool backend
  for backend in cuda triton; do
    for tool in memcheck racecheck; do
      [ "$backend" = triton ] && [ "$tool" = racecheck ] && continue
      echo "== compute-sanitizer --tool $tool, backend $backend"
      compute-sanitizer --tool "$tool" --error-exitcode 1 --print-limit 20 \
        "$PY" tools/op_smoke.py --device cuda --backend "$backend" --dtype float16 \
        > "$OUT/sanitize-$tool-$backend.log" 2>&1 || status=1
      tail -4 "$OUT/sanitize-$tool-$backend.log"
    done
  done
  compute-sanitizer --tool initcheck --error-exitcode 1 "$PY" tools/op_smoke.py --device cuda --backend cuda \
    --dtype bfloat16 > "$OUT/sanitize-initcheck-cuda.log" 2>&1 || status=1
  tail -3 "$OUT/sanitize-initcheck-cuda.log"
}

bench() {
  local d
  d=$(date -u +%Y-%m-%d)
  "$PY" -m pygen.cli bench --device cuda --quick > "$OUT/pygen-bench-cuda-$d.txt" 2>&1 || status=1
  "$PY" benchmarks/bench_attention.py --device cuda --causal --out "$OUT/attention-cuda-$d" || status=1
  "$PY" benchmarks/bench_blocks.py --device cuda --out "$OUT/blocks-cuda-$d" || status=1
  "$PY" benchmarks/bench_losses.py --device cuda --dtypes fp32,bf16 --out "$OUT/losses-cuda-$d" || status=1
  "$PY" benchmarks/bench_samplers.py --device cuda --out "$OUT/samplers-cuda-$d" || status=1
  "$PY" benchmarks/bench_norm.py --device cuda --dtypes bf16,fp32 --out "$OUT/norm-cuda-$d" || status=1
}

info
for stage in "${@:-all}"; do
  case $stage in
    build) build ;;
    test) run_tests ;;
    sanitize) sanitize ;;
    bench) bench ;;
    all) build; run_tests; sanitize ;;
    *) echo "gpu_session: unknown stage $stage (build|test|sanitize|bench|all)"; exit 2 ;;
  esac
done
echo "gpu_session: exit $status; logs and reports in $OUT"
exit $status
