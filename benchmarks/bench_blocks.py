"""Attention blocks (issue 5 targets): pygen vs eager PyTorch / stock diffusers, side by side in one run.

Cases (same weights and inputs for every implementation of a case):

* ``dit_block``: one adaLN-Zero DiT block forward, x (B, N, C), c (B, C).
    - ``eager``: ``pygen.nn.reference.EagerDiTBlock``, the DiT reference block in eager PyTorch
      (LayerNorm, modulate, qkv Linear, heads permuted to (B, H, N, D),
      ``F.scaled_dot_product_attention``, transpose back, proj, gate * y + x, MLP with GELU(tanh));
      what DiT's models.py does with timm's fused attention.
    - ``pygen``: ``pygen.nn.DiTBlock`` (fused adaLN modulate and gated residual, attention in (B, N, H, D)).
    Target (GPU): pygen >= 1.3x eager at DiT-XL/2-like sizes (C 1152, 16 heads, N 256, B 8).
* ``unet_attention``: the U-Net spatial attention block, x (B, C, H, W): diffusers ``Attention`` with
  ``norm_num_groups=32, residual_connection=True`` (the UNet mid-block / VAE attention).
    - ``eager``: with diffusers' stock ``AttnProcessor2_0``.
    - ``pygen``: the same module with ``pygen.diffusers.AttnProcessor``.
    - ``pygen.nn``: ``pygen.nn.UNetAttentionBlock.from_diffusers`` of the same module.
    - ``eager-fused`` / ``pygen-fused``: the module after diffusers' ``fuse_projections()`` (one
      ``to_qkv`` GEMM) with ``FusedAttnProcessor2_0`` / ``pygen.diffusers.AttnProcessor``.
    Target (GPU): pygen >= 1.3x stock at C 512, 32x32 tokens.

Default sizes: GPU as the targets (bf16 and fp16); CPU smaller (fp32): DiT C 384, 6 heads, N 256, B 2;
U-Net C 128, 2 heads of 64, 16x16, B 2. Modes: ``fwd`` (under ``torch.no_grad``) and ``fwd+bwd``
(``backward`` into every parameter and the input). TFLOP/s count the matmul FLOPs of the block
(projections, MLP, QK^T and PV); fwd+bwd counts 3x the forward. Timing: ``pygen.bench.measure``
(calibrated batches, implementations interleaved in rounds, medians; CUDA events on the GPU), so
the speedups are measured side by side.

pygen.attention's dispatcher measures its candidates once per shape and caches the pick in
``$PYGEN_CACHE_DIR/attention.json``; the picks used are listed under the table. A cache written before
the extension was (re)built can hold stale picks (e.g. ``torch`` from before a CPU kernel existed):
record with a fresh ``PYGEN_CACHE_DIR``.

pytest-benchmark::

    python -m pytest benchmarks/bench_blocks.py --benchmark-only
    python -m pytest benchmarks/bench_blocks.py --benchmark-disable -q      # smoke run

Standalone (markdown + JSON)::

    PYGEN_CACHE_DIR=$(mktemp -d) python benchmarks/bench_blocks.py --device cpu --out benchmarks/results/blocks-cpu-DATE
    python benchmarks/bench_blocks.py --device cuda --dtypes bf16,fp16 --modes fwd,fwd+bwd --out ...
"""
import argparse
import contextlib
import copy
import dataclasses
import os
import sys

import pytest
import torch

if __name__ == "__main__":  # this checkout's pygen
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pygen  # noqa: E402,F401
import pygen.nn as pnn  # noqa: E402
from pygen import bench  # noqa: E402
from pygen.nn.reference import EagerDiTBlock  # noqa: E402

try:
    import diffusers  # noqa: F401
    from diffusers.models import attention_processor as _ap

    import pygen.diffusers as PD
    DIFFUSERS = None
except ImportError as exc:  # the U-Net case needs diffusers
    _ap = PD = None
    DIFFUSERS = f"diffusers is not installed ({exc})"

CASES = ("dit_block", "unet_attention")
MODES = ("fwd", "fwd+bwd")
# per device type: the case's size parameters
SIZES = {
    "dit_block": {"cuda": dict(hidden=1152, heads=16, tokens=256, batch=8),
                  "cpu": dict(hidden=384, heads=6, tokens=256, batch=2)},
    "unet_attention": {"cuda": dict(channels=512, head_dim=64, side=32, batch=4),
                       "cpu": dict(channels=128, head_dim=64, side=16, batch=2)},
}
SMOKE_SIZES = {"dit_block": dict(hidden=64, heads=2, tokens=16, batch=2),
               "unet_attention": dict(channels=64, head_dim=32, side=4, batch=2)}
DEFAULT_DTYPES = {"cuda": (torch.bfloat16, torch.float16), "cpu": (torch.float32,)}
DEFAULT_MODES = {"cuda": ("fwd", "fwd+bwd"), "cpu": ("fwd",)}


# ---------------------------------------------------------------------------
# cases
# ---------------------------------------------------------------------------
@dataclasses.dataclass
class BlockImpl(bench.Impl):
    """An implementation that picks its own path (no backend override around it)."""

    def context(self):
        return contextlib.nullcontext()


@dataclasses.dataclass
class BlockCase:
    case: str
    size: dict
    dtype: torch.dtype
    mode: str
    device: torch.device
    impls: list  # [BlockImpl], eager first
    outputs: dict  # impl -> one forward output (for the agreement check)
    flops: float  # per call
    skipped: dict

    @property
    def label(self):
        return ", ".join(f"{k} {v}" for k, v in self.size.items())


def _randomize_(module, gen, std=0.02):
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * std)  # adaLN-Zero starts at 0: make the gates non-zero
    return module


def _callable(module_call, inputs, gout, mode):
    """A zero-argument call of ``module_call(*inputs)`` in ``mode``."""
    if mode == "fwd":
        def fwd():
            with torch.no_grad():
                return module_call(*inputs)
        return fwd

    def fwd_bwd():
        out = module_call(*inputs)
        out.backward(gout)
        return out
    return fwd_bwd


def dit_flops(hidden, heads, tokens, batch, mlp_ratio=4.0):
    t = batch * tokens
    gemm = 2 * t * hidden * (3 * hidden + hidden + 2 * int(hidden * mlp_ratio)) + 2 * batch * hidden * 6 * hidden
    attn = 4 * batch * tokens * tokens * hidden
    return gemm + attn


def unet_flops(channels, side, batch):
    s = side * side
    return 2 * batch * s * channels * channels * 4 + 4 * batch * s * s * channels


def build_dit(size, dtype, device, mode):
    hidden, heads, tokens, batch = size["hidden"], size["heads"], size["tokens"], size["batch"]
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    block = _randomize_(pnn.DiTBlock(hidden, heads), gen)
    eager = EagerDiTBlock(hidden, heads)
    eager.load_state_dict(block.state_dict(), strict=True)
    block, eager = block.to(device, dtype), eager.to(device, dtype)
    x = torch.randn(batch, tokens, hidden, generator=gen).to(device, dtype)
    c = torch.randn(batch, hidden, generator=gen).to(device, dtype)
    gout = torch.randn(batch, tokens, hidden, generator=gen).to(device, dtype)
    if mode == "fwd+bwd":
        x.requires_grad_()
    impls = {"eager": eager, "pygen": block}
    fns = {k: _callable(m, (x, c), gout, mode) for k, m in impls.items()}
    with torch.no_grad():
        outputs = {k: m(x, c).float() for k, m in impls.items()}
    flops = dit_flops(hidden, heads, tokens, batch) * (3 if mode == "fwd+bwd" else 1)
    return fns, outputs, flops, {}


def build_unet(size, dtype, device, mode):
    if DIFFUSERS is not None:
        return {}, {}, 0.0, {k: DIFFUSERS for k in UNET_IMPLS}
    channels, head_dim, side, batch = size["channels"], size["head_dim"], size["side"], size["batch"]
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    stock = _ap.Attention(channels, heads=channels // head_dim, dim_head=head_dim, norm_num_groups=32,
                          residual_connection=True, bias=True, eps=1e-6)
    _randomize_(stock, gen)
    stock.set_processor(_ap.AttnProcessor2_0())
    ours = copy.deepcopy(stock)
    ours.set_processor(PD.AttnProcessor())
    block = pnn.UNetAttentionBlock.from_diffusers(stock)
    stock_fused = copy.deepcopy(stock)  # after diffusers' fuse_projections (one to_qkv GEMM)
    stock_fused.fuse_projections()
    stock_fused.set_processor(_ap.FusedAttnProcessor2_0())
    ours_fused = copy.deepcopy(stock_fused)
    ours_fused.set_processor(PD.AttnProcessor())
    stock, ours, block, stock_fused, ours_fused = (m.to(device, dtype)
                                                   for m in (stock, ours, block, stock_fused, ours_fused))
    x = torch.randn(batch, channels, side, side, generator=gen).to(device, dtype)
    gout = torch.randn(x.shape, generator=gen).to(device, dtype)
    if mode == "fwd+bwd":
        x.requires_grad_()
    impls = {"eager": stock, "pygen": ours, "pygen.nn": block, "eager-fused": stock_fused, "pygen-fused": ours_fused}
    fns = {k: _callable(m, (x,), gout, mode) for k, m in impls.items()}
    with torch.no_grad():
        outputs = {k: m(x).float() for k, m in impls.items()}
    flops = unet_flops(channels, side, batch) * (3 if mode == "fwd+bwd" else 1)
    return fns, outputs, flops, {}


BUILDERS = {"dit_block": build_dit, "unet_attention": build_unet}
UNET_IMPLS = ("eager", "pygen", "pygen.nn", "eager-fused", "pygen-fused")


def build_case(case, dtype, device, mode, size=None):
    device = torch.device(device)
    size = dict(size or SIZES[case][device.type])
    fns, outputs, flops, skipped = BUILDERS[case](size, dtype, device, mode)
    impls = [BlockImpl(name, fn, device.type) for name, fn in fns.items()]
    return BlockCase(case, size, dtype, mode, device, impls, outputs, flops, skipped)


def rel_diff(case, name):
    """max |impl - eager| / max |eager| of one forward."""
    ref = case.outputs.get("eager")
    out = case.outputs.get(name)
    if ref is None or out is None:
        return None
    return float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-12))


def run_case(case, **timing):
    load = bench.ForeignLoad()
    timings = bench.measure(case.impls, case.device, **timing)
    foreign = load.cores()
    eager = timings["eager"].median_s if "eager" in timings else None
    rows = []
    for impl in case.impls:
        t = timings[impl.backend]
        row = {"case": case.case, "size": case.label, "dtype": bench.DTYPE_NAMES[case.dtype], "mode": case.mode,
               "impl": impl.backend, "time_ms": t.median_s * 1e3, "time_ms_min": t.min_s * 1e3,
               "tflops": case.flops / t.median_s / 1e12, "speedup_vs_eager": eager / t.median_s if eager else None,
               "rel_diff_vs_eager": rel_diff(case, impl.backend), "iterations": t.iterations,
               "repeats": t.repeats, "foreign_cpu_cores": foreign}
        if case.device.type == "cuda":
            row["host_ms"] = t.host_s * 1e3
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------
# pytest-benchmark
# ---------------------------------------------------------------------------
def pytest_generate_tests(metafunc):
    if "block_case" not in metafunc.fixturenames:
        return
    config = metafunc.config
    device = bench.default_device(config.getoption("--bench-device", default=None))
    smoke = config.getoption("benchmark_disable", default=False)
    dtypes = DEFAULT_DTYPES[device.type]
    params, ids = [], []
    for case in CASES:
        for dtype in dtypes:
            for mode in DEFAULT_MODES[device.type]:
                impls = UNET_IMPLS if case == "unet_attention" else ("eager", "pygen")
                for impl in impls:
                    marks = bench.benchmark_marks(device, f"{case} {bench.DTYPE_NAMES[dtype]} {mode}",
                                                  DIFFUSERS if case == "unet_attention" else None)
                    params.append(pytest.param((case, dtype, mode, impl, device, smoke), marks=marks))
                    ids.append(f"{case}-{bench.DTYPE_NAMES[dtype]}-{mode}-{impl}")
    metafunc.parametrize("block_case", params, ids=ids)


_CACHE = {}


def test_block(benchmark, request, block_case):
    case_name, dtype, mode, impl_name, device, smoke = block_case
    key = (case_name, dtype, mode, device, smoke)
    if key not in _CACHE:
        _CACHE.clear()
        _CACHE[key] = build_case(case_name, dtype, device, mode, SMOKE_SIZES[case_name] if smoke else None)
    case = _CACHE[key]
    impl = next(i for i in case.impls if i.backend == impl_name)
    diff = rel_diff(case, impl_name)
    assert diff is not None and diff < (1e-3 if dtype == torch.float32 else 3e-2), diff
    cuda = device.type == "cuda"
    rounds = request.config.getoption("--bench-rounds", default=None) or (20 if cuda else 5)
    iterations, _ = bench.calibrate(impl, device, warmup=3 if cuda else 1, min_time=0.005 if cuda else 0.02)
    benchmark.extra_info.update(case=case_name, size=case.label, dtype=bench.DTYPE_NAMES[dtype], mode=mode,
                                impl=impl_name, device=bench.device_name(device), flops=case.flops)
    benchmark.pedantic(impl.fn, rounds=rounds, iterations=iterations, warmup_rounds=1)
    stats = getattr(benchmark, "stats", None)
    if stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["tflops"] = case.flops / stats.stats.median / 1e12


# ---------------------------------------------------------------------------
# standalone runner
# ---------------------------------------------------------------------------
def format_row(row):
    sp = row["speedup_vs_eager"]
    rd = row["rel_diff_vs_eager"]
    return (f"| {row['case']} | {row['size']} | {row['dtype']} | {row['mode']} | {row['impl']} | "
            f"{row['time_ms']:.3f} | {row['tflops']:.3f} | {'' if sp is None else f'**{sp:.2f}x**'} | "
            f"{'' if rd is None else f'{rd:.1e}'} | {row['foreign_cpu_cores']} |")


def format_markdown(report):
    env = report["environment"]
    dev, v, st = env["device"], env["versions"], report["settings"]
    lines = [f"# Attention blocks: pygen vs eager PyTorch / stock diffusers, {dev['type']}: {dev['name']}", "",
             bench.report_date_line(env), bench.report_cpu_line(env),
             f"- torch {v['torch']}, diffusers {st['diffusers']}, triton {v['triton']}, pygen {v['pygen']}, "
             f"python {v['python']}",
             f"- pygen backends: {env['backends']}",
             bench.report_load_line(env),
             "- dit_block: eager = the DiT reference block (LayerNorm, modulate, SDPA on permuted heads, gate*y+x); "
             "pygen = pygen.nn.DiTBlock, same weights",
             "- unet_attention: diffusers Attention(norm_num_groups, residual_connection=True); eager = stock "
             "AttnProcessor2_0; pygen = pygen.diffusers.AttnProcessor; pygen.nn = pygen.nn.UNetAttentionBlock; "
             "eager-fused / pygen-fused: the same layer after diffusers' fuse_projections() (one to_qkv GEMM) with "
             "FusedAttnProcessor2_0 / pygen.diffusers.AttnProcessor",
             "- time = median per call over interleaved rounds; TFLOP/s = block matmul FLOPs / time (fwd+bwd: 3x fwd); "
             "speedup = eager time / this time; rel. diff = max|out - eager| / max|eager| of one forward",
             "", "| case | size | dtype | mode | impl | ms | TFLOP/s | speedup | rel. diff | other CPU use (cores) |",
             "|---|---|---|---|---|---:|---:|---:|---:|---:|"]
    lines += [format_row(r) for r in report["results"]]
    if report.get("attention_choices"):
        lines += ["", "pygen.attention dispatcher choices (device, dtype, layout, B, H, Sq, Sk, D, causal, grad -> "
                  "implementation): " + "; ".join(f"{k} -> {v}" for k, v in report["attention_choices"].items())]
    lines += bench.report_skipped_lines(report.get("skipped"))
    return "\n".join(lines) + "\n"


def attention_choices():
    """{key: implementation} that pygen.attention's dispatcher has chosen in this process."""
    try:
        from pygen.ops import attention as A

        return {"|".join(str(x) for x in key[1:]): name for key, name in A.cached_choices().items()}
    except (ImportError, AttributeError):
        return {}


def _parse_size(text, keys):
    vals = [int(v) for v in text.split(",")]
    if len(vals) != len(keys):
        raise SystemExit(f"expected {len(keys)} comma-separated ints ({', '.join(keys)}), got {text!r}")
    return dict(zip(keys, vals))


def main(argv=None):
    p = argparse.ArgumentParser(description="DiT block and U-Net attention block: pygen vs eager / stock diffusers")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--cases", default=None, help=f"comma-separated, from {', '.join(CASES)} (default: all)")
    p.add_argument("--dtypes", default=None, help="fp32,fp16,bf16 (default: cuda bf16,fp16; cpu fp32)")
    p.add_argument("--modes", default=None, help="fwd,fwd+bwd (default: cuda both; cpu fwd)")
    p.add_argument("--dit", default=None, help="hidden,heads,tokens,batch (default by device)")
    p.add_argument("--unet", default=None, help="channels,head_dim,side,batch (default by device)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--min-time", type=float, default=None, help="least seconds per timed batch")
    bench.add_report_options(p)
    args = p.parse_args(argv)
    device = bench.default_device(args.device)
    cuda = device.type == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    cases = bench.parse_list(args.cases) or list(CASES)
    for c in cases:
        if c not in CASES:
            raise SystemExit(f"unknown case {c!r}; choose from {', '.join(CASES)}")
    dtypes = bench.select_dtypes(bench.parse_list(args.dtypes)) if args.dtypes else list(DEFAULT_DTYPES[device.type])
    modes = bench.parse_list(args.modes) or list(DEFAULT_MODES[device.type])
    sizes = {"dit_block": _parse_size(args.dit, ("hidden", "heads", "tokens", "batch")) if args.dit else None,
             "unet_attention": _parse_size(args.unet, ("channels", "head_dim", "side", "batch")) if args.unet else None}
    min_time = args.min_time or (0.01 if cuda else 0.05)
    env = bench.environment(device)
    report = {"schema": "pygen-blocks-1", "environment": env,
              "settings": {"diffusers": getattr(sys.modules.get("diffusers"), "__version__", None),
                           "repeats": args.repeats, "min_time_s": min_time, "modes": modes,
                           "dtypes": [bench.DTYPE_NAMES[d] for d in dtypes],
                           "sizes": {c: sizes[c] or SIZES[c][device.type] for c in cases}},
              "results": [], "skipped": []}
    print(format_markdown(report).rstrip(), flush=True)
    for case_name in cases:
        for dtype in dtypes:
            for mode in modes:
                case = build_case(case_name, dtype, device, mode, sizes[case_name])
                for impl, reason in case.skipped.items():
                    report["skipped"].append(f"{case_name} {impl}: {reason}")
                if not case.impls:
                    continue
                rows = run_case(case, repeats=args.repeats, min_time=min_time, warmup=3 if cuda else 1,
                                max_time=10.0 if cuda else 30.0)
                report["results"] += rows
                report["attention_choices"] = attention_choices()
                for r in rows:
                    print(format_row(r), flush=True)
                bench.write_report(report, env, format_markdown, args.out, args.note)
                del case
                if cuda:
                    torch.cuda.empty_cache()
    bench.write_report(report, env, format_markdown, args.out, args.note)
    if args.out:
        print(f"wrote {args.out}.json and {args.out}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
