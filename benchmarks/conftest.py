"""pytest-benchmark suites of the pygen ops (cases and timing helpers: pygen/bench.py).

Run from the repository root:

    python -m pytest benchmarks/ --benchmark-only                  # all ops, default sizes/dtypes
    python -m pytest benchmarks/bench_step.py --benchmark-only --bench-sizes 2^22 --bench-dtypes fp32

Each case (op, size, dtype) is timed for the eager-PyTorch composite of the
same math (backend ``eager``) and for every available pygen backend (cuda,
triton, cpu, torch reference); pytest-benchmark groups them per case, so the
relative column of its table is the ratio to the fastest in the group.
``extra_info`` holds the bytes moved and the effective GB/s. Triton is not
timed on CPU tensors (it only runs under the interpreter there).

On CUDA the benchmark timer synchronises the device, and each round runs a
calibrated number of calls, so per-call times exclude the sync.

Files named ``bench_*.py`` are collected here (the repository's test
discovery, ``tests/test_*.py``, does not pick them up).

Options: --bench-device cpu|cuda, --bench-sizes 2^16,2^22, --bench-dtypes
fp32,bf16, --bench-backends eager,cpu, --bench-rounds N, --bench-min-time S.
"""

import pytest
import torch

from pygen import bench


def pytest_addoption(parser):
    group = parser.getgroup("pygen benchmarks")
    group.addoption("--bench-device", choices=("cpu", "cuda"), default=None,
                    help="device (default: cuda if available, else cpu)")
    group.addoption("--bench-sizes", default=None,
                    help="element counts, e.g. 2^16,2^22 (default cpu: 2^16,2^20,2^22; cuda: 2^16,2^20,2^24,2^26)")
    group.addoption("--bench-dtypes", default=None, help="fp32,fp16,bf16 (default: all)")
    group.addoption("--bench-backends", default=None,
                    help="implementations to time: eager and pygen backends (default: all available)")
    group.addoption("--bench-rounds", type=int, default=None, help="timed rounds per benchmark")
    group.addoption("--bench-min-time", type=float, default=None, help="least seconds per round")


def pytest_collect_file(file_path, parent):
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def bench_device(config):
    return bench.default_device(config.getoption("--bench-device"))


def bench_sizes(config, device, default=None):
    text = config.getoption("--bench-sizes")
    if text:
        return [bench.parse_size(s) for s in bench.parse_list(text)]
    if default is not None:
        return list(default)
    return list(bench.CUDA_SIZES if device.type == "cuda" else bench.CPU_SIZES)


def bench_backends(config, device):
    """[(backend, skip reason or None)] with eager first."""
    wanted = bench.parse_list(config.getoption("--bench-backends"))
    run, skipped = bench.pygen_backends_for(device)
    out = [("eager", None)] + [(b, None) for b in run] + list(skipped.items())
    return [(b, r) for b, r in out if not wanted or b in wanted]


def pytest_generate_tests(metafunc):
    """Parametrize ``bench_params`` with (op, numel, dtype, backend) from the module's ``OPS``."""
    if "bench_params" not in metafunc.fixturenames:
        return
    config = metafunc.config
    device = bench_device(config)
    sizes = bench_sizes(config, device, getattr(metafunc.module, "SIZES", {}).get(device.type))
    dtypes = bench.select_dtypes(bench.parse_list(config.getoption("--bench-dtypes")))
    params, ids = [], []
    for op in metafunc.module.OPS:
        reason = bench.not_implemented_reason(op)
        for numel in sizes:
            for dtype in dtypes:
                for backend, skip in bench_backends(config, device):
                    if op == "copy" and backend != "eager":
                        continue  # a baseline: there is no pygen copy
                    if skip is None and reason is not None and backend != "eager":
                        skip = reason
                    marks = [pytest.mark.skip(reason=skip)] if skip else []
                    if device.type == "cuda":
                        marks.append(pytest.mark.cuda)
                    params.append(pytest.param((op, numel, dtype, backend, device), marks=marks))
                    ids.append(f"{op}-{bench.shape_str(bench.shape_for(numel))}-{bench.DTYPE_NAMES[dtype]}-{backend}")
    metafunc.parametrize("bench_params", params, ids=ids)


def pytest_collection_modifyitems(config, items):
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is None or "bench_params" not in callspec.params:
            continue
        op, numel, dtype, _, device = callspec.params["bench_params"]
        group = f"{op} {bench.shape_str(bench.shape_for(numel))} {bench.DTYPE_NAMES[dtype]}"
        kwargs = {"group": group, "disable_gc": True}
        if device.type == "cuda":
            kwargs["timer"] = bench.cuda_sync_timer
        item.add_marker(pytest.mark.benchmark(**kwargs))


_CASE_CACHE = {}


def get_case(op, numel, dtype, device):
    """Build the case once for all its backends (inputs allocated once); keep only the latest."""
    key = (op, numel, dtype, device)
    if key not in _CASE_CACHE:
        _CASE_CACHE.clear()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        _CASE_CACHE[key] = bench.probe(bench.build_case(op, numel, dtype, device))
    return _CASE_CACHE[key]


@pytest.fixture
def run_case(benchmark, request):
    """``run_case(bench_params)``: time one implementation of one case with pytest-benchmark."""
    config = request.config

    def run(params):
        op, numel, dtype, backend, device = params
        case = get_case(op, numel, dtype, device)
        impl = case.impl(backend)
        if impl is None:
            pytest.skip(case.skipped.get(backend, f"{backend} not available"))
        cuda = device.type == "cuda"
        min_time = config.getoption("--bench-min-time") or (0.005 if cuda else 0.02)
        rounds = config.getoption("--bench-rounds") or (20 if cuda else 7)
        iterations, _ = bench.calibrate(impl, device, warmup=5 if cuda else 2, min_time=min_time)
        benchmark.extra_info.update(op=op, shape=bench.shape_str(case.shape), dtype=bench.DTYPE_NAMES[dtype],
                                    backend=backend, device=bench.device_name(device), bytes=case.bytes)
        with impl.context():
            benchmark.pedantic(impl.fn, rounds=rounds, iterations=iterations, warmup_rounds=1)
        stats = getattr(benchmark, "stats", None)
        if stats is not None:  # None under --benchmark-disable
            median = stats.stats.median
            benchmark.extra_info["time_us"] = median * 1e6
            benchmark.extra_info["gbps"] = case.bytes / median / 1e9
        return case

    return run
