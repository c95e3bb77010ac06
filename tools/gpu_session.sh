#!/usr/bin/env bash
# What a session with a lent GPU runs, in stages that each fit one device call (<= 10 minutes).
#
#   tools/gpu_session.sh build      # pygen._C with the CUDA kernels, in place (sm_90 by default)
#   tools/gpu_session.sh test       # every `cuda`-marked test, log under $OUT
#   tools/gpu_session.sh sanitize   # compute-sanitizer memcheck/racecheck over tools/op_smoke.py
#   tools/gpu_session.sh bench      # the GPU figures (bench1 + bench2), reports packed in $OUT/bench-results-*.tgz
#   tools/gpu_session.sh bench1     # samplers, SDE/MCMC loops, diffusers schedulers, pygen bench (issues 3, 4)
#   tools/gpu_session.sh bench2     # attention, blocks, losses, norm (issues 5, 6)
#   tools/gpu_session.sh all        # build test sanitize (bench is long: its own call)
#   tools/gpu_session.sh priority   # one call (<= ~9 min) for a 15-minute device budget: build, the
#                                   # cuda-marked tests, and the headline figure of each issue (3-6)
#   tools/gpu_session.sh suite      # the whole test suite on the GPU (Triton compiled, not interpreted)
#   tools/gpu_session.sh prebuilt   # use .gpubuild/_C*.so (a build an earlier call sent back) instead of building
#
# Written for the device tool's machines (see /work/.library/device/): python3 there holds
# torch (+cu130), triton, pytest and pytest-benchmark but no diffusers / k-diffusion / torchsde;
# the tests that need those skip unless their wheels are carried (device README, ".whl").
# The in-place build survives between calls only while the machine stays warm (30 s), so `build` also
# copies the extension to $OUT: put it in .gpubuild/ here, carry ".gpubuild" and start with `prebuilt`
# while csrc/ is unchanged. Wheels carried in .whl/ (device README) are installed to /tmp/site first.
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
JOBS=${JOBS:-12}
# SKIP_WHEELS=1: a second stage on a warm machine (or one running beside another) reuses /tmp/site.
if [ -z "${SKIP_WHEELS:-}" ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
[ -d /tmp/site ] && export PYTHONPATH="$PYTHONPATH:/tmp/site"

info() {
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  "$PY" -c 'import torch, triton, pygen; print("torch", torch.__version__, "cuda", torch.version.cuda, "| triton", triton.__version__); print("pygen backends:", pygen.backends())'
}

build() {
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
  "$PY" setup.py -q build_ext --inplace 2>&1 | tee "$OUT/build.log" | grep -E "pygen setup|error" || true
  "$PY" -c 'import pygen, sys; b = pygen.backends(); print(b); sys.exit(b["cuda"] != "available")' || status=1
  strip --strip-unneeded -o "$OUT/$(basename pygen/_C*.so)" pygen/_C*.so && ls -la "$OUT"/_C*.so
}

prebuilt() {
  cp .gpubuild/_C*.so pygen/ || { echo "gpu_session: no .gpubuild/_C*.so"; build; return; }
  "$PY" -c 'import pygen, sys; b = pygen.backends(); print(b); sys.exit(b["cuda"] != "available")' || build
}

suite() {
  # Everything, Triton on the GPU: first listed autotune config only (PYGEN_TRITON_AUTOTUNE=0).
  local extra=()
  "$PY" -c 'import xdist' 2>/dev/null && extra+=(-n "$JOBS")
  "$PY" -c 'import pytest_timeout' 2>/dev/null && extra+=(--timeout 240)
  # SUITE_K selects (pytest -k), e.g. "cuda or triton" for the GPU-backend tests alone.
  [ -n "${SUITE_K:-}" ] && extra+=(-k "$SUITE_K")
  PYGEN_TRITON_AUTOTUNE=0 PYGEN_FAILLOG="$OUT/failures.log" PYTHONPATH="$ROOT/tools:$PYTHONPATH" \
    timeout "${SUITE_TIMEOUT:-420}" "$PY" -m pytest tests -q -p no:cacheprovider -p pytest_faillog \
    --import-mode=append -rfE --tb=short "${extra[@]}" > "$OUT/test-suite.log" 2>&1
  [ $? -eq 0 ] || status=1
  grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/test-suite.log" | cut -c1-220 | tail -60
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

bench_one() {  # name timeout command...: one suite, its log under $OUT/results, the table's tail printed
  local name=$1 limit=$2 rc
  shift 2
  echo "== $name"
  timeout "$limit" "$@" > "$OUT/results/$name.log" 2>&1
  rc=$?
  [ $rc -eq 0 ] || { echo "   $name: exit $rc"; status=1; }
  grep -E "^\|" "$OUT/results/$name.log" | cut -c1-200 | tail -n "${BENCH_TAIL:-16}"
}

bench_pack() {  # at most 8 files come back from a device call: one archive
  tar czf "$OUT/bench-results-$1.tgz" -C "$OUT" results && rm -rf "$OUT/results"
}

bench1() {  # issue 3 + 4 figures: sampler loops (eager, bare loop, CUDA graph), diffusers schedulers
  local d
  d=$(date -u +%Y-%m-%d)
  mkdir -p "$OUT/results"
  bench_one samplers 150 "$PY" benchmarks/bench_samplers.py --device cuda --repeats 5 --max-time 1 \
    --samplers euler,heun,dpmpp_2m,euler_ancestral,dpmpp_2m_sde \
    --out "$OUT/results/samplers-cuda-$d"
  bench_one diffusers 150 "$PY" benchmarks/bench_diffusers.py --device cuda --rounds 5 --max-time 5 \
    --out "$OUT/results/diffusers-cuda-$d"
  bench_one loops 90 "$PY" benchmarks/bench_loops.py --device cuda --sizes 16k,1M --repeats 5 \
    --out "$OUT/results/loops-cuda-$d"
  bench_one pygen-bench 60 "$PY" -m pygen.cli bench --device cuda --quick
  bench_pack 1
}

bench2() {  # issue 5 + 6 figures: attention, DiT / U-Net blocks, norm ops, losses
  local d
  d=$(date -u +%Y-%m-%d)
  mkdir -p "$OUT/results"
  bench_one attention 220 "$PY" benchmarks/bench_attention.py --device cuda --causal --repeats 5 --max-time 1 \
    --impls pygen-triton,pygen-cuda,pygen-auto,sdpa-flash,sdpa-cudnn,sdpa-efficient,sdpa-default \
    --out "$OUT/results/attention-cuda-$d"
  bench_one blocks 100 "$PY" benchmarks/bench_blocks.py --device cuda --repeats 5 --out "$OUT/results/blocks-cuda-$d"
  bench_one losses 70 "$PY" benchmarks/bench_losses.py --device cuda --dtypes fp32,bf16 --repeats 9 --max-time 5 \
    --out "$OUT/results/losses-cuda-$d"
  bench_one norm 70 "$PY" benchmarks/bench_norm.py --device cuda --dtypes bf16,fp32 --repeats 5 --max-time 2 \
    --out "$OUT/results/norm-cuda-$d"
  bench_pack 2
}

bench() { bench1; bench2; }

priority() {  # the most a single device call can show when the whole budget is ~15 minutes
  local d
  d=$(date -u +%Y-%m-%d)
  build
  echo "== cuda-marked tests"
  timeout 150 "$PY" -m pytest -m cuda tests -q -x -p no:cacheprovider > "$OUT/test-cuda.log" 2>&1 || status=1
  grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/test-cuda.log" | cut -c1-200 | tail -20
  mkdir -p "$OUT/results"
  BENCH_TAIL=8 bench_one samplers 45 "$PY" benchmarks/bench_samplers.py --device cuda --repeats 3 --max-time 0.5 \
    --sizes 16k --samplers euler,dpmpp_2m --out "$OUT/results/samplers-cuda-$d-priority"
  BENCH_TAIL=12 bench_one diffusers 50 "$PY" benchmarks/bench_diffusers.py --device cuda --rounds 3 --max-time 2 \
    --shapes 1x4x64x64 --no-pipeline --out "$OUT/results/diffusers-cuda-$d-priority"
  BENCH_TAIL=8 bench_one blocks 55 "$PY" benchmarks/bench_blocks.py --device cuda --cases dit_block,unet_attention \
    --dtypes bf16 --modes fwd --repeats 3 --out "$OUT/results/blocks-cuda-$d-priority"
  BENCH_TAIL=6 bench_one losses 30 "$PY" benchmarks/bench_losses.py --device cuda --dtypes fp32 --repeats 5 \
    --max-time 2 --out "$OUT/results/losses-cuda-$d-priority"
  BENCH_TAIL=8 bench_one loops 30 "$PY" benchmarks/bench_loops.py --device cuda --sizes 16k --repeats 3 \
    --impls pygen,pygen-graph --out "$OUT/results/loops-cuda-$d-priority"
  bench_pack priority
}

info
for stage in "${@:-all}"; do
  case $stage in
    build) build ;;
    test) run_tests ;;
    sanitize) sanitize ;;
    bench) bench ;;
    bench1) bench1 ;;
    bench2) bench2 ;;
    prebuilt) prebuilt ;;
    suite) suite ;;
    all) build; run_tests; sanitize ;;
    priority) priority ;;
    *) echo "gpu_session: unknown stage $stage (build|test|sanitize|bench|bench1|bench2|suite|prebuilt|all|priority)"; exit 2 ;;
  esac
done
echo "gpu_session: exit $status; logs and reports in $OUT"
exit $status
