"""Baselines: copy bandwidth (x.copy_(y)) and Python-to-launch overhead per call.

The copy at the largest size (2^26 elements on GPU) is the bandwidth ceiling
that the step's effective GB/s is compared with. The overhead benchmarks call
each op many times on small tensors (<= 1M elements) without synchronising
between calls: on a GPU the host time per call is the Python-to-launch
overhead (as long as the kernels are shorter than the launches).
"""
import time

import pytest
import torch

from pygen import bench

OPS = ["copy"]

CALLS = 200  # calls per overhead round


def test_copy(run_case, bench_params):
    run_case(bench_params)


_OVERHEAD_SIZES = {"cuda": (1 << 10, 1 << 16, 1 << 20), "cpu": (1 << 10,)}


def _overhead_params():
    params = []
    for op in bench.OPS:
        if op == "copy":
            continue
        for device in ("cpu", "cuda"):
            for numel in _OVERHEAD_SIZES[device]:
                marks = [pytest.mark.cuda] if device == "cuda" else []
                params.append(pytest.param(op, device, numel, marks=marks, id=f"{op}-{device}-{numel}"))
    return params


@pytest.mark.parametrize("op,device,numel", _overhead_params())
def test_launch_overhead(benchmark, request, op, device, numel):
    """Host time per call, ``CALLS`` calls per round, fp32, the default backend for the device."""
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    wanted = request.config.getoption("--bench-device")
    if wanted is not None and wanted != device.type:
        pytest.skip(f"--bench-device {wanted}")
    case = bench.probe(bench.build_case(op, numel, torch.float32, device, include_reference=False))
    impl = next((i for i in case.impls if i.backend not in ("eager", "torch")), None)
    if impl is None:
        reason = bench.not_implemented_reason(op) or next(
            (r for b, r in case.skipped.items() if b in ("cuda", "cpu")), "no compiled or Triton backend available")
        pytest.skip(reason)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn = impl.fn

    def calls():
        for _ in range(CALLS):
            fn()

    benchmark.group = f"overhead {device.type} {numel}"
    benchmark.extra_info.update(op=op, backend=impl.backend, calls_per_round=CALLS)
    with impl.context():
        for _ in range(3):
            fn()
        sync()
        benchmark.pedantic(calls, setup=sync, rounds=20, iterations=1, warmup_rounds=1)
    stats = getattr(benchmark, "stats", None)
    if stats is not None:
        benchmark.extra_info["host_us_per_call"] = stats.stats.median / CALLS * 1e6
    # eager torch composite for comparison, same protocol (median of 5 rounds after a warm-up)
    eager = case.impl("eager").fn
    times = []
    for r in range(6):
        sync()
        t0 = time.perf_counter()
        for _ in range(CALLS):
            eager()
        if r:
            times.append((time.perf_counter() - t0) / CALLS * 1e6)
    sync()
    benchmark.extra_info["eager_host_us_per_call"] = sorted(times)[len(times) // 2]
