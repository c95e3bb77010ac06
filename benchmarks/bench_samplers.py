"""Sampler loops: pygen.kdiffusion vs k-diffusion vs pygen's torch reference, per model evaluation.

Each case runs a whole sampler (``sample_<name>(model, x, sigmas, disable=True)``)
with a trivial denoiser, so the sampler's own cost dominates, and reports the
time per model evaluation (total / NFE). Implementations:

* ``kdiffusion``  k-diffusion's ``sampling.sample_<name>`` (noise: its default ``torch.randn_like``),
* ``pygen``       ``pygen.kdiffusion.sample_<name>`` on the device's default backend (noise: in-kernel Philox),
* ``torch``       the same under ``pygen.use_backend("torch")`` (pygen's plain-PyTorch reference loop),
* ``pygen+ns``    pygen with ``noise_sampler=default_noise_sampler(x)`` (k-diffusion's noise), for the samplers
  whose k-diffusion default noise is ``torch.randn_like`` (euler_ancestral, dpm_2_ancestral, dpmpp_2s_ancestral),
* ``pygen-loop``  the bare coefficient program (``StepProgram``: model call + fused step, no sampler API
  around it), the floor of pygen's loop; ``noop`` model cases only,
* ``pygen-graph`` (CUDA only) one model call + one fused step captured in a CUDA graph; a sampler run
  is ``NFE`` replays (the step advances the device row index, so the same graph replays every step).
* ``pygen-graph-loop`` (CUDA only) the whole sampler run captured as one CUDA graph; one replay per run
  (the per-step device cost with no host work between steps).

Models: ``trivial`` = ``x / (1 + sigma**2)`` (broadcast per batch row); ``noop`` = returns a preallocated
tensor (the Python-to-kernel overhead of the loop alone; 1x4x64x64 only).

Sizes (fp32): 1x4x64x64 (16k elements: per-step overhead), 16x4x128x128 (1M) and 16x4x256x256 (4M:
bandwidth). ``--bench-sizes`` takes element counts (16k, 1M, 4M or any n: shape (n,)).

pytest-benchmark (groups per sampler, size and model)::

    python -m pytest benchmarks/bench_samplers.py --benchmark-only
    python -m pytest benchmarks/bench_samplers.py --benchmark-disable -q     # smoke: 16k only, one call each

Standalone runner (interleaved rounds, medians, markdown + JSON)::

    python benchmarks/bench_samplers.py --device cpu --out benchmarks/results/samplers-cpu-2026-11-23
"""
import argparse
import contextlib
import importlib.util
import os
import sys
import types

import pytest
import torch

if __name__ == "__main__":  # this checkout's pygen
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pygen  # noqa: E402
from pygen import bench  # noqa: E402
from pygen import kdiffusion as PK  # noqa: E402

SAMPLERS = ["euler", "heun", "dpm_2", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_3m_sde", "euler_ancestral", "dpm_2_ancestral",
            "dpmpp_2s_ancestral", "dpmpp_sde", "lms"]  # all 11 of k-diffusion's that pygen.kdiffusion provides
SHAPES = {1 << 14: (1, 4, 64, 64), 1 << 20: (16, 4, 128, 128), 1 << 22: (16, 4, 256, 256)}
DEFAULT_SIZES = (1 << 14, 1 << 20, 1 << 22)
STEPS = 20  # sigmas: Karras, 20 steps (+ the final 0)
SIGMA_MIN, SIGMA_MAX = 0.0292, 14.6146  # SD-like range
# where pygen+ns (k-diffusion's default noise sampler, torch.randn_like) is also timed
NS_SAMPLERS = ("euler_ancestral", "dpm_2_ancestral", "dpmpp_2s_ancestral")
NOOP_NUMEL = 1 << 14


# ---------------------------------------------------------------------------
# k-diffusion (its sampling module without the package __init__, as tests/conftest.py does)
# ---------------------------------------------------------------------------
_KD = {}


def load_kdiffusion():
    """k-diffusion's ``sampling`` module, or raise ImportError saying what is missing."""
    if "mod" in _KD:
        return _KD["mod"]
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("k-diffusion is not installed (pip install k-diffusion --no-deps)")
    for dep in ("scipy", "torchdiffeq", "torchsde", "tqdm"):
        importlib.import_module(dep)
    name = "_pygen_bench_kd"
    pkg_dir = spec.submodule_search_locations[0]
    pkg = types.ModuleType(name)
    pkg.__path__ = [pkg_dir]
    utils = types.ModuleType(name + ".utils")
    utils.append_dims = lambda x, n: x[(...,) + (None,) * (n - x.ndim)]
    pkg.utils = utils
    sys.modules[name], sys.modules[name + ".utils"] = pkg, utils
    sub = importlib.util.spec_from_file_location(name + ".sampling", os.path.join(pkg_dir, "sampling.py"))
    mod = importlib.util.module_from_spec(sub)
    sys.modules[name + ".sampling"] = mod
    sub.loader.exec_module(mod)
    _KD["mod"] = mod
    return mod


def kdiffusion_reason():
    try:
        load_kdiffusion()
    except Exception as exc:  # not installed, or a dependency missing
        return f"k-diffusion unavailable ({type(exc).__name__}: {exc})"
    return None


# ---------------------------------------------------------------------------
# cases
# ---------------------------------------------------------------------------
def shape_of(numel):
    return SHAPES.get(numel, (numel,))


def trivial_model(x, sigma):
    """A denoiser costing one elementwise pass: x / (1 + sigma^2), sigma per batch row."""
    return x * (1.0 / (1.0 + sigma * sigma)).view((-1,) + (1,) * (x.dim() - 1))


class Impl:
    """Duck-types pygen.bench.Impl (``backend`` is the label; ``context()`` forces a pygen backend)."""

    def __init__(self, label, fn, backend=None, nfe=None):
        self.backend, self.fn, self._pygen_backend, self.nfe = label, fn, backend, nfe

    def context(self):
        return pygen.use_backend(self._pygen_backend) if self._pygen_backend else contextlib.nullcontext()


def _counting(model):
    calls = [0]

    def m(x, s, **kw):
        calls[0] += 1
        return model(x, s, **kw)

    return m, calls


def _plan(name, sig):
    """pygen.kdiffusion's coefficient program for ``name`` with its default arguments (private API)."""
    inf = float("inf")
    return {
        "euler": lambda: PK._plan_euler(sig, 0.0, 0.0, inf, 1.0),
        "heun": lambda: PK._plan_heun(sig, 0.0, 0.0, inf, 1.0),
        "dpm_2": lambda: PK._plan_dpm_2(sig, 0.0, 0.0, inf, 1.0),
        "dpm_2_ancestral": lambda: PK._plan_dpm_2_ancestral(sig, 1.0, 1.0),
        "dpmpp_2s_ancestral": lambda: PK._plan_dpmpp_2s_ancestral(sig, 1.0, 1.0),
        "dpmpp_sde": lambda: PK._plan_dpmpp_sde(sig, 1.0, 1.0, 0.5, True),
        "dpmpp_2m": lambda: PK._plan_dpmpp_2m(sig),
        "dpmpp_2m_sde": lambda: PK._plan_dpmpp_2m_sde(sig, 1.0, 1.0, "midpoint"),
        "dpmpp_3m_sde": lambda: PK._plan_dpmpp_3m_sde(sig, 1.0, 1.0),
        "euler_ancestral": lambda: PK._plan_euler_ancestral(sig, 1.0, 1.0),
        "lms": lambda: PK._plan_lms(sig, 4),
    }[name]()


def _program(name, x, sigmas):
    """(StepProgram, per-row model sigmas (K, batch), K) for the bare loop / CUDA graph."""
    from pygen.samplers.program import StepProgram

    sig = sigmas.detach().to("cpu", torch.float64).tolist()
    plan = _plan(name, sig)
    prog = StepProgram(torch.tensor(plan.rows, dtype=torch.float64), x, seed=bench.SEED, stream=1)
    call_in = torch.tensor(plan.call_sigmas, dtype=torch.float32, device=x.device)[:, None].expand(
        -1, x.shape[0]).contiguous()
    return prog, call_in, len(plan.rows)


def _bare_loop(name, model, x0, sigmas):
    """The coefficient program run directly: per row, model call + fused step in place."""
    prog, call_in, k = _program(name, x0, sigmas)
    rows = list(call_in.unbind(0))  # per-evaluation model sigmas as views, made once
    x = x0.clone()

    def run():
        prog.reset()
        x.copy_(x0)
        for i in range(k):
            prog.step(x, model(x, rows[i]), x)
        return x

    return run, k


def _captured(fn, warmup):
    """A CUDA graph of ``fn``, after ``warmup`` ran on a side stream (allocations and lazy init stay
    out of the capture); a failed capture raises. GPU-only code path."""
    from pygen.samplers.program import capture_step

    return capture_step(warmup, fn, fallback=False)


def _graph_loop(name, model, x0, sigmas):
    """CUDA only: one model call + one fused step captured once; a run = reset + K replays.

    GPU-only code path (not exercised on CPU-only machines). The model reads its sigma from the
    device row index (``call_in[prog.index]``), so the same graph serves every row.
    """
    prog, call_in, k = _program(name, x0, sigmas)
    x = x0.clone()

    def one_step():
        prog.step(x, model(x, call_in.index_select(0, prog.index).view(-1)), x)

    def warmup():
        for _ in range(2):
            prog.reset()
            one_step()
        prog.reset()
        x.copy_(x0)

    graph = _captured(one_step, warmup)

    def run():
        prog.reset()
        x.copy_(x0)
        for _ in range(k):
            graph.replay()
        return x

    return run, k


def _whole_graph(name, model, x0, sigmas):
    """CUDA only: the whole sampler run (the bare loop: reset, K model calls + fused steps) captured
    as one graph; a run is one replay, so ms/step is the device time per step with no per-step host
    work at all. Each captured model call reads its own row of ``call_in`` (a fixed view), so the only
    kernels per step are the model's, the fused step and its index increment. GPU-only code path."""
    loop, k = _bare_loop(name, model, x0, sigmas)
    out = []
    graph = _captured(loop, lambda: out.append(loop()))

    def run():
        graph.replay()
        return out[0]

    return run, k


def build_impls(name, numel, device, model_kind="trivial", labels=None, count_nfe=False, reference=True):
    """([Impl], {label: reason skipped}) for one case; ``count_nfe`` checks the NFE with one counted run each."""
    device = torch.device(device)
    shape = shape_of(numel)
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=gen) * SIGMA_MAX).to(device)
    sigmas = PK.get_sigmas_karras(STEPS, SIGMA_MIN, SIGMA_MAX, device=device)
    if model_kind == "noop":
        d = torch.randn(shape, generator=gen).to(device)

        def model(x, s, **kw):
            return d
    else:
        model = trivial_model
    impls, skipped = [], {}

    def add(label, fn, backend=None, nfe=None):
        if labels is not None and label not in labels:
            return
        impls.append(Impl(label, fn, backend, nfe))

    kd_reason = kdiffusion_reason()
    if kd_reason is None:
        kd = getattr(load_kdiffusion(), "sample_" + name)
        add("kdiffusion", lambda: kd(model, x, sigmas, disable=True))
    else:
        skipped["kdiffusion"] = kd_reason
    pg = getattr(PK, "sample_" + name)
    add("pygen", lambda: pg(model, x, sigmas, disable=True))
    if model_kind != "noop":
        if not reference:
            skipped["torch"] = "torch reference timed at the sizes of --ref-sizes only"
        elif pygen.backends().get("torch") == "available":
            add("torch", lambda: pg(model, x, sigmas, disable=True), backend="torch")
        if name in NS_SAMPLERS:
            add("pygen+ns", lambda: pg(model, x, sigmas, disable=True, noise_sampler=PK.default_noise_sampler(x)))
    else:
        try:
            fn, k = _bare_loop(name, model, x, sigmas)
            add("pygen-loop", fn, nfe=k)
        except Exception as exc:  # private API changed
            skipped["pygen-loop"] = f"{type(exc).__name__}: {exc}"
    if device.type == "cuda":
        try:
            fn, k = _graph_loop(name, model, x, sigmas)
            add("pygen-graph", fn, nfe=k)
        except Exception as exc:
            skipped["pygen-graph"] = f"{type(exc).__name__}: {exc}"
        try:
            fn, k = _whole_graph(name, model, x, sigmas)
            add("pygen-graph-loop", fn, nfe=k)
        except Exception as exc:
            skipped["pygen-graph-loop"] = f"{type(exc).__name__}: {exc}"
    else:
        skipped["pygen-graph"] = skipped["pygen-graph-loop"] = "CUDA graphs need a CUDA device"
    nfe = len(_plan(name, sigmas.detach().to("cpu", torch.float64).tolist()).rows)  # one model call per row
    for impl in impls:
        if impl.nfe is None:
            impl.nfe = nfe
    if count_nfe:  # check it: count the model calls of one run of each implementation
        for impl in impls:
            if impl.backend in ("pygen-loop", "pygen-graph", "pygen-graph-loop"):
                continue
            counted, calls = _counting(model)
            f = kd if impl.backend == "kdiffusion" else pg
            kw = {"noise_sampler": PK.default_noise_sampler(x)} if impl.backend == "pygen+ns" else {}
            with impl.context():
                f(counted, x, sigmas, disable=True, **kw)
            if calls[0] != nfe:
                raise AssertionError(f"{name} {impl.backend}: {calls[0]} model calls, expected {nfe}")
    return impls, skipped


# ---------------------------------------------------------------------------
# pytest-benchmark
# ---------------------------------------------------------------------------
LABELS = ("kdiffusion", "pygen", "torch", "pygen+ns", "pygen-loop", "pygen-graph", "pygen-graph-loop")


def pytest_generate_tests(metafunc):
    if "sampler_case" not in metafunc.fixturenames:
        return
    config = metafunc.config
    device = bench.default_device(config.getoption("--bench-device", default=None))
    text = config.getoption("--bench-sizes", default=None)
    if text:
        sizes = [bench.parse_size(s) for s in bench.parse_list(text)]
    elif config.getoption("benchmark_disable", default=False):
        sizes = [1 << 14]  # smoke mode: the small size only
    else:
        sizes = list(DEFAULT_SIZES)
    params, ids = [], []
    for model_kind in ("trivial", "noop"):
        for numel in sizes:
            if model_kind == "noop" and numel != NOOP_NUMEL:
                continue
            for name in SAMPLERS:
                labels = ["kdiffusion", "pygen"]
                labels += ["pygen-loop"] if model_kind == "noop" else ["torch"]
                labels += ["pygen+ns"] if model_kind == "trivial" and name in NS_SAMPLERS else []
                labels += ["pygen-graph", "pygen-graph-loop"]
                group = f"{name} {bench.shape_str(shape_of(numel))} {model_kind}"
                for label in labels:
                    cpu_graph = label.startswith("pygen-graph") and device.type != "cuda"
                    marks = bench.benchmark_marks(device, group,
                                                  "CUDA graphs need a CUDA device" if cpu_graph else None)
                    params.append(pytest.param((name, numel, model_kind, label, device), marks=marks))
                    ids.append(f"{name}-{bench.shape_str(shape_of(numel))}-{model_kind}-{label}")
    metafunc.parametrize("sampler_case", params, ids=ids)


_CACHE = {}


def test_sampler(benchmark, request, sampler_case):
    name, numel, model_kind, label, device = sampler_case
    key = (name, numel, model_kind, device)
    if key not in _CACHE:
        _CACHE.clear()
        _CACHE[key] = build_impls(name, numel, device, model_kind)
    impls, skipped = _CACHE[key]
    impl = next((i for i in impls if i.backend == label), None)
    if impl is None:
        pytest.skip(skipped.get(label, f"{label} not available"))
    rounds = request.config.getoption("--bench-rounds", default=None) or (20 if device.type == "cuda" else 5)
    benchmark.extra_info.update(sampler=name, shape=bench.shape_str(shape_of(numel)), model=model_kind,
                                impl=label, nfe=impl.nfe, device=bench.device_name(device))
    with impl.context():
        result = benchmark.pedantic(impl.fn, rounds=rounds, iterations=1, warmup_rounds=1)
    assert torch.isfinite(result).all()
    stats = getattr(benchmark, "stats", None)
    if stats is not None:
        benchmark.extra_info["us_per_step"] = stats.stats.median / impl.nfe * 1e6


# ---------------------------------------------------------------------------
# standalone runner
# ---------------------------------------------------------------------------
def _fmt_ms(t):
    return "" if t is None else f"{t * 1e3:.3f}"


def run_all(device, sizes, samplers, *, repeats, min_time, max_time, ref_sizes=None, log=print, rows=None,
            on_row=None, models=("trivial", "noop")):
    rows = [] if rows is None else rows
    cases = [("trivial", n) for n in sizes] if "trivial" in models else []
    if "noop" in models and NOOP_NUMEL in sizes:  # right after the trivial model at the same size
        at = next((i + 1 for i, c in enumerate(cases) if c[1] == NOOP_NUMEL), 0)
        cases.insert(at, ("noop", NOOP_NUMEL))
    for model_kind, numel in cases:
        for name in samplers:
            impls, skipped = build_impls(name, numel, device, model_kind, count_nfe=True,
                                          reference=ref_sizes is None or numel in ref_sizes)
            load = bench.ForeignLoad()
            timings = bench.measure(impls, device, warmup=1, repeats=repeats, min_time=min_time,
                                    max_time=max_time, min_repeats=3)
            foreign = load.cores()
            row = {"sampler": name, "shape": bench.shape_str(shape_of(numel)), "numel": numel,
                   "model": model_kind, "steps": STEPS, "foreign_cpu_cores": foreign,
                   "impls": {}, "skipped": skipped}
            for impl in impls:
                t = timings[impl.backend]
                row["impls"][impl.backend] = {"nfe": impl.nfe, "ms_per_run": t.median_s * 1e3,
                                              "ms_per_step": t.median_s / impl.nfe * 1e3,
                                              "ms_per_step_min": t.min_s / impl.nfe * 1e3,
                                              "repeats": t.repeats, "iterations": t.iterations}
                if device.type == "cuda":
                    row["impls"][impl.backend]["host_ms_per_step"] = t.host_s / impl.nfe * 1e3
            kd = row["impls"].get("kdiffusion")
            for v in row["impls"].values():
                v["speedup_vs_kdiffusion"] = kd["ms_per_step"] / v["ms_per_step"] if kd else None
            rows.append(row)
            log(format_row(row))
            if on_row is not None:
                on_row()  # partial results survive an interrupted run
    return rows


TABLE_IMPLS = ("kdiffusion", "pygen", "torch", "pygen+ns", "pygen-loop", "pygen-graph", "pygen-graph-loop")


def format_row(row):
    im = row["impls"]

    def ms(label):
        return _fmt_ms(im[label]["ms_per_step"] * 1e-3) if label in im else ""

    nfe = next(iter(im.values()))["nfe"] if im else ""
    sp = im.get("pygen", {}).get("speedup_vs_kdiffusion")
    return (f"| {row['sampler']} | {row['shape']} | {row['model']} | {row['steps']} | {nfe} | "
            + " | ".join(ms(lb) for lb in TABLE_IMPLS)
            + f" | {'' if sp is None else f'{sp:.2f}x'} | {row['foreign_cpu_cores']} |")


def format_markdown(report):
    env = report["environment"]
    dev = env["device"]
    lines = [f"# Sampler loops, {dev['type']}: {dev['name']}", "",
             bench.report_date_line(env), bench.report_versions_line(env), bench.report_load_line(env),
             f"- {report['settings']['steps']} Karras steps (sigma {SIGMA_MIN}..{SIGMA_MAX}), fp32, disable=True "
             "(no tqdm bar); model `trivial` = x / (1 + sigma^2), `noop` = returns a preallocated tensor",
             "- ms/step = median time of a whole sampler run / NFE (model evaluations); implementations "
             f"interleaved in rounds ({report['settings']['repeats']} at most), medians",
             "- noise: pygen draws it in the kernel (Philox); k-diffusion uses its defaults: torch.randn_like, and a "
             "torchsde Brownian tree (BrownianTreeNoiseSampler) in dpmpp_sde / dpmpp_2m_sde / dpmpp_3m_sde; "
             "`pygen+ns` = pygen with noise_sampler=default_noise_sampler(x) (k-diffusion's noise)",
             "- `pygen-loop`: the bare coefficient program (model + StepProgram.step), no sampler API around it; "
             "`pygen-graph`: one model call + step captured once, replayed per step from Python; "
             "`pygen-graph-loop`: the whole run captured as one graph, one replay per run",
             "", "| sampler | shape | model | steps | NFE | k-diffusion ms/step | pygen ms/step | torch-ref ms/step "
             "| pygen+ns ms/step | pygen-loop ms/step | pygen-graph ms/step | pygen-graph-loop ms/step "
             "| pygen speedup vs k-diffusion | other CPU use (cores) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [format_row(r) for r in report["results"]]
    lines += bench.report_skipped_lines(bench.row_skips(report["results"]))
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description="pygen.kdiffusion vs k-diffusion: time per model evaluation")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--sizes", default=None, help="element counts (default 16k,1M,4M)")
    p.add_argument("--ref-sizes", default="16k",
                   help="sizes at which the (slow) torch reference loop is timed; 'all' for every size")
    p.add_argument("--models", default="trivial,noop", help="trivial, noop (noop runs at 16k only)")
    p.add_argument("--samplers", default=None, help=f"default: {','.join(SAMPLERS)}")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--min-time", type=float, default=None, help="least seconds per timed batch")
    p.add_argument("--max-time", type=float, default=None, help="soft seconds budget per implementation")
    p.add_argument("--idle", type=float, default=0.0, help="wait for this idle CPU fraction before starting")
    bench.add_report_options(p)
    args = p.parse_args(argv)
    device = bench.default_device(args.device)
    sizes = [bench.parse_size(s) for s in bench.parse_list(args.sizes)] if args.sizes else list(DEFAULT_SIZES)
    samplers = bench.parse_list(args.samplers) or SAMPLERS
    ref_sizes = None if args.ref_sizes == "all" else [bench.parse_size(v) for v in bench.parse_list(args.ref_sizes)]
    cuda = device.type == "cuda"
    min_time = args.min_time or (0.01 if cuda else 0.05)
    max_time = args.max_time or (2.0 if cuda else 6.0)
    if args.idle > 0:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import record

        record.wait_idle(args.idle, 120)
    if args.threads:
        torch.set_num_threads(args.threads)
    env = bench.environment(device)
    report = {"schema": "pygen-samplers-1", "environment": env,
              "settings": {"steps": STEPS, "sigma_min": SIGMA_MIN, "sigma_max": SIGMA_MAX, "dtype": "fp32",
                           "repeats": args.repeats, "min_time_s": min_time, "max_time_s": max_time,
                           "samplers": samplers, "sizes": sizes, "ref_sizes": ref_sizes or sizes}}
    print(format_markdown(dict(report, results=[])).rstrip())
    report["results"] = []

    def write():
        return bench.write_report(report, env, format_markdown, args.out, args.note)

    run_all(device, sizes, samplers, repeats=args.repeats, min_time=min_time, max_time=max_time,
            ref_sizes=ref_sizes, rows=report["results"], on_row=write, models=bench.parse_list(args.models))
    md = write()
    print(f"wrote {args.out}.json and {args.out}.md" if args.out else md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
