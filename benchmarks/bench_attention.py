"""pygen.attention vs PyTorch SDPA backends: forward (and forward+backward) time and TFLOP/s, side by side.

Implementations, all timed in ONE run per shape (interleaved rounds, medians; pygen.bench.measure):

* ``pygen-triton``, ``pygen-cuda``, ``pygen-cpu``: ``pygen.attention`` forced onto that kernel
  (``pygen.use_backend``),
* ``pygen-auto``: ``pygen.attention`` with the default dispatch (its first call measures and caches
  the choice; that call is not timed; the choice is reported),
* ``sdpa-flash``, ``sdpa-cudnn``, ``sdpa-efficient``: ``F.scaled_dot_product_attention`` inside
  ``torch.nn.attention.sdpa_kernel(SDPBackend.*)``, ``sdpa-default`` (SDPA's own pick) and
  ``eager-math`` (``SDPBackend.MATH``: matmul, softmax, matmul in eager PyTorch).

An implementation that does not take a shape/dtype (or is not built) is listed as skipped with the
reason. FLOPs: forward 4·B·H·Sq·Sk·D (two matmuls), halved for causal; forward+backward 3.5× that
(the backward recomputes S and runs five matmuls). ``max err`` is max|out - ref| / max|ref| against
SDPA math in fp32 (a sanity check that every row timed the same math).

Shapes: the issue's four (B, H, S, D) fp16 shapes on CUDA; tiny fp32 shapes on the CPU (a smoke run:
Triton is not timed there, it only runs under the interpreter).

Standalone runner (markdown + JSON with device, versions, date via pygen.bench.write_report)::

    python benchmarks/bench_attention.py --out benchmarks/results/attention-h100-$(date +%F)   # GPU
    python benchmarks/bench_attention.py --device cpu --threads 1 --out benchmarks/results/attention-cpu-$(date +%F)
    python benchmarks/bench_attention.py --causal --modes fwd,fwd+bwd --shapes 2x8x1024x64

pytest-benchmark::

    python -m pytest benchmarks/bench_attention.py --benchmark-only
    python -m pytest benchmarks/bench_attention.py --benchmark-disable -q      # smoke: one small shape

``--compile-check 90`` compiles every Triton attention kernel configuration for sm_90 (no GPU needed,
Triton's bundled ptxas) and prints the shared memory each needs.
"""
import argparse
import contextlib
import os
import sys

import pytest
import torch
import torch.nn.functional as F

if __name__ == "__main__":  # this checkout's pygen
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pygen  # noqa: E402
from pygen import bench  # noqa: E402
from pygen.ops import attention as A  # noqa: E402

CUDA_SHAPES = ((2, 8, 1024, 64), (2, 16, 4096, 64), (2, 16, 4096, 128), (16, 8, 256, 64))
CPU_SHAPES = ((1, 2, 128, 64), (2, 4, 256, 64))
SMOKE_SHAPE = (1, 2, 64, 32)
IMPLS = ("pygen-triton", "pygen-cuda", "pygen-cpu", "pygen-auto", "sdpa-flash", "sdpa-cudnn", "sdpa-efficient",
         "sdpa-default", "eager-math")
_SDPA = {"sdpa-flash": "FLASH_ATTENTION", "sdpa-cudnn": "CUDNN_ATTENTION", "sdpa-efficient": "EFFICIENT_ATTENTION",
         "eager-math": "MATH"}
DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
MODES = ("fwd", "fwd+bwd")


def flops(shape, causal, mode):
    B, H, S, D = shape
    f = 4.0 * B * H * S * S * D * (0.5 if causal else 1.0)
    return f * (3.5 if mode == "fwd+bwd" else 1.0)


class _Impl(bench.Impl):
    """A timed callable that selects its implementation itself (no pygen.use_backend around it)."""

    def context(self):
        return contextlib.nullcontext()


def _attention_fn(impl, q, k, v, causal):
    """A function (q, k, v) -> out running ``impl``; raises if the implementation is not there."""
    if impl.startswith("pygen-") and impl != "pygen-auto":
        backend = impl.split("-", 1)[1]
        status = pygen.backends()[backend]
        if status != "available":
            raise RuntimeError(status)
        if backend == "triton" and q.device.type == "cpu":
            raise RuntimeError("triton on CPU runs only under the interpreter; not a performance path")

        def fn(q, k, v):
            with pygen.use_backend(backend):
                return pygen.attention(q, k, v, causal=causal)
        return fn
    if impl == "pygen-auto":
        return lambda q, k, v: pygen.attention(q, k, v, causal=causal)
    if impl == "sdpa-default":
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, _SDPA[impl])

    def fn(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return fn


def make_inputs(shape, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g).to(device=device, dtype=dtype) for _ in range(3)]


def build(impl, q, k, v, causal, mode):
    """A zero-argument callable for ``impl`` in ``mode`` (inputs and grad_out allocated here)."""
    fn = _attention_fn(impl, q, k, v, causal)
    if mode == "fwd":
        def call():
            with torch.no_grad():
                return fn(q, k, v)
        return call
    qg, kg, vg = (t.detach().clone().requires_grad_() for t in (q, k, v))
    go = torch.randn_like(q)

    def call():
        out = fn(qg, kg, vg)
        return torch.autograd.grad(out, (qg, kg, vg), go)
    return call


def reference_out(q, k, v, causal):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=causal)


def run_shape(shape, dtype, device, causal, mode, impls, *, repeats=7, min_time=None, max_time=None):
    """One shape: {"rows": [...], "skipped": {impl: reason}, "auto_choice": name}."""
    q, k, v = make_inputs(shape, dtype, device)
    ref = reference_out(q, k, v, causal) if mode == "fwd" else None
    timed, skipped, errs = [], {}, {}
    auto_choice = None
    for impl in impls:
        try:
            call = build(impl, q, k, v, causal, mode)
            out = call()  # probe; for pygen-auto this measures and caches the dispatcher's choice
            if impl == "pygen-auto":
                auto_choice = A.last_choice()[0]
            if ref is not None:
                errs[impl] = float((out.float() - ref).abs().max() / ref.abs().max())
        except Exception as exc:  # reported per implementation, never fatal for the run
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            skipped[impl] = f"{type(exc).__name__}: {msg[:200]}"
            continue
        timed.append(_Impl(impl, call, device.type))
    load = bench.ForeignLoad()
    cuda = device.type == "cuda"
    timings = bench.measure(timed, device, repeats=repeats, min_time=min_time or (0.05 if cuda else 0.02),
                            max_time=max_time or (2.0 if cuda else 3.0)) if timed else {}
    foreign = load.cores()
    fl = flops(shape, causal, mode)
    base = timings.get("sdpa-flash") or timings.get("sdpa-default")
    rows = []
    for impl in impls:
        if impl not in timings:
            continue
        t = timings[impl]
        rows.append({"impl": impl, "time_ms": t.median_s * 1e3, "time_ms_min": t.min_s * 1e3,
                     "tflops": fl / t.median_s / 1e12, "vs_flash": (base.median_s / t.median_s) if base else None,
                     "max_err": errs.get(impl), "iterations": t.iterations, "repeats": t.repeats})
    return {"shape": bench.shape_str(shape), "dtype": DTYPE_NAMES[dtype], "causal": causal, "mode": mode,
            "flops": fl, "rows": rows, "skipped": skipped, "auto_choice": auto_choice,
            "auto_timings_ms": {n: (None if s is None else s * 1e3) for n, s in A.last_timings.items()}
            if auto_choice else None, "foreign_cpu_cores": foreign}


# ---------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------
def format_result(res):
    title = f"### {res['mode']} (B, H, S, D) = {res['shape'].replace('x', ', ')} {res['dtype']}" + (
        " causal" if res["causal"] else "")
    lines = [title, ""]
    if res["auto_choice"]:
        lines.append(f"dispatcher choice: `{res['auto_choice']}`")
        lines.append("")
    lines += ["| implementation | time (ms) | TFLOP/s | vs SDPA flash | max err |", "|---|---:|---:|---:|---:|"]
    for r in res["rows"]:
        vs = "" if r["vs_flash"] is None else f"{r['vs_flash']:.2f}x"
        err = "" if r["max_err"] is None else f"{r['max_err']:.1e}"
        lines.append(f"| {r['impl']} | {r['time_ms']:.4g} | {r['tflops']:.4g} | {vs} | {err} |")
    for impl, why in res["skipped"].items():
        lines.append(f"| {impl} | skipped: {why} | | | |")
    return "\n".join(lines) + "\n"


def format_markdown(report):
    env = report["environment"]
    dev, v, st = env["device"], env["versions"], report["settings"]
    lines = [f"# pygen.attention vs SDPA, {dev['type']}: {dev['name']}", "",
             bench.report_date_line(env), bench.report_cpu_line(env),
             f"- torch {v['torch']}, triton {v['triton']}, pygen {v['pygen']}, python {v['python']}"
             + (f", CUDA {v['cuda']}" if v.get("cuda") else ""),
             f"- pygen backends: {env['backends']}",
             bench.report_load_line(env, "shape"),
             "- FLOPs: fwd 4·B·H·S²·D (halved when causal); fwd+bwd 3.5× fwd. Times are medians of "
             f"interleaved calibrated batches ({st['repeats']} rounds at most); CUDA: CUDA events.",
             "- max err: max|out − SDPA-math fp32| / max|SDPA-math fp32| (forward only)", ""]
    lines += [format_result(r) for r in report["results"]]
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# Triton compile check (no GPU needed)
# ---------------------------------------------------------------------------
def compile_check(capability=90):
    """Compile each Triton attention kernel and autotune config for sm_<capability>; print shared memory."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from pygen.kernels import attention as K

    target = GPUTarget("cuda", capability, 32)
    ptr = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}
    failures = 0
    kernels = ((K._attn_fwd_kernel, K._FWD_CONFIGS, K._prune_fwd), (K._attn_bwd_dkdv_kernel, K._BWD_CONFIGS,
               K._prune_bwd), (K._attn_bwd_dq_kernel, K._BWD_CONFIGS, K._prune_bwd))
    for autotuned, configs, prune in kernels:
        jit = autotuned.fn
        for d, dtype, causal in ((64, torch.float16, False), (80, torch.bfloat16, True), (128, torch.float16, True),
                                 (256, torch.float16, False), (64, torch.float32, True)):
            block_d = triton.next_power_of_2(d)
            for c in prune(configs, {"SQ_BUCKET": 4096}, BLOCK_D=block_d):
                consts = dict(D=d, BLOCK_D=block_d, CAUSAL=causal, IEEE=K._dot_mode(dtype), **c.kwargs)
                if "STORE_LSE" in jit.arg_names:
                    consts["STORE_LSE"] = True
                sig = {}
                for name in jit.arg_names:
                    if name in consts:
                        sig[name] = "constexpr"
                    elif name in ("LSE", "DELTA"):
                        sig[name] = "*fp32"
                    elif name in ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV"):
                        sig[name] = ptr[dtype]
                    elif name in ("qk_scale", "sm_scale"):
                        sig[name] = "fp32"
                    else:
                        sig[name] = "i32"
                src = ASTSource(fn=jit, signature=sig,
                                constexprs={(jit.arg_names.index(n),): val for n, val in consts.items()})
                tag = f"{jit.__name__} D={d} {DTYPE_NAMES[dtype]} causal={causal} {c}"
                try:
                    compiled = triton.compile(src, target=target,
                                              options={"num_warps": c.num_warps, "num_stages": c.num_stages})
                    print(f"ok   {tag}: shared {compiled.metadata.shared} B", flush=True)
                except Exception as exc:  # report and continue
                    failures += 1
                    print(f"FAIL {tag}: {str(exc).splitlines()[0][:300]}", flush=True)
    return failures


# ---------------------------------------------------------------------------
# pytest-benchmark
# ---------------------------------------------------------------------------
def pytest_generate_tests(metafunc):
    if "acase" not in metafunc.fixturenames:
        return
    config = metafunc.config
    device = bench.default_device(config.getoption("--bench-device", default=None))
    smoke = config.getoption("benchmark_disable", default=False)
    shapes = [SMOKE_SHAPE] if smoke else list(CUDA_SHAPES if device.type == "cuda" else CPU_SHAPES)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    params, ids = [], []
    for shape in shapes:
        for mode in MODES:
            group = f"attention {mode} {bench.shape_str(shape)} {DTYPE_NAMES[dtype]}"
            for impl in IMPLS:
                marks = bench.benchmark_marks(device, group)
                params.append(pytest.param((shape, dtype, device, mode, impl), marks=marks))
                ids.append(f"{mode}-{bench.shape_str(shape)}-{impl}")
    metafunc.parametrize("acase", params, ids=ids)


def test_attention(benchmark, acase):
    shape, dtype, device, mode, impl = acase
    q, k, v = make_inputs(shape, dtype, device)
    try:
        call = build(impl, q, k, v, False, mode)
        call()
    except Exception as exc:  # not built / not supported for this shape on this device
        pytest.skip(f"{impl}: {type(exc).__name__}: {str(exc)[:160]}")
    benchmark.extra_info.update(shape=bench.shape_str(shape), dtype=DTYPE_NAMES[dtype], mode=mode, impl=impl,
                                flops=flops(shape, False, mode))
    benchmark(call)
    stats = getattr(benchmark, "stats", None)
    if stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["tflops"] = flops(shape, False, mode) / stats.stats.median / 1e12


# ---------------------------------------------------------------------------
# standalone runner
# ---------------------------------------------------------------------------
def main(argv=None):
    p = argparse.ArgumentParser(description="pygen.attention vs SDPA backends: time and TFLOP/s")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--shapes", default=None, help="BxHxSxD list, e.g. 2x8x1024x64 (default: by device)")
    p.add_argument("--dtype", default=None, help="fp16, bf16 or fp32 (default: fp16 on CUDA, fp32 on CPU)")
    p.add_argument("--modes", default="fwd,fwd+bwd", help="fwd and/or fwd+bwd")
    p.add_argument("--causal", action="store_true", help="also time causal attention")
    p.add_argument("--impls", default=None, help=f"subset of {','.join(IMPLS)}")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--min-time", type=float, default=None, help="least seconds per timed batch")
    p.add_argument("--max-time", type=float, default=None, help="soft seconds per implementation")
    bench.add_report_options(p)
    p.add_argument("--compile-check", type=int, default=None, metavar="SM",
                   help="only compile the Triton kernels for sm_SM (e.g. 90) and exit")
    args = p.parse_args(argv)
    if args.compile_check is not None:
        return 1 if compile_check(args.compile_check) else 0
    device = bench.default_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = device.type == "cuda"
    dtype = bench.select_dtypes([args.dtype])[0] if args.dtype else (torch.float16 if cuda else torch.float32)
    shapes = ([tuple(int(x) for x in s.split("x")) for s in bench.parse_list(args.shapes)] if args.shapes
              else list(CUDA_SHAPES if cuda else CPU_SHAPES))
    modes = bench.parse_list(args.modes)
    for m in modes:
        if m not in MODES:
            raise SystemExit(f"unknown mode {m!r}; choose from {MODES}")
    impls = bench.parse_list(args.impls) or list(IMPLS)
    for i in impls:
        if i not in IMPLS:
            raise SystemExit(f"unknown implementation {i!r}; choose from {IMPLS}")
    if not cuda:
        impls = [i for i in impls if i not in ("pygen-cuda", "sdpa-cudnn", "sdpa-efficient")]
    env = bench.environment(device)
    report = {"schema": "pygen-attention-1", "environment": env,
              "settings": {"shapes": [bench.shape_str(s) for s in shapes], "dtype": DTYPE_NAMES[dtype],
                           "modes": modes, "causal": [False, True] if args.causal else [False], "impls": impls,
                           "repeats": args.repeats},
              "results": []}
    print(format_markdown(report).rstrip(), flush=True)
    for causal in report["settings"]["causal"]:
        for mode in modes:
            for shape in shapes:
                res = run_shape(shape, dtype, device, causal, mode, impls, repeats=args.repeats,
                                min_time=args.min_time, max_time=args.max_time)
                report["results"].append(res)
                print(format_result(res), flush=True)
                bench.write_report(report, env, format_markdown, args.out, args.note)
    bench.write_report(report, env, format_markdown, args.out, args.note)
    if args.out:
        print(f"wrote {args.out}.json and {args.out}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
