"""The fused norm ops vs their eager-PyTorch composites, forward and forward+backward.

Cases (DiT-XL/2 and Stable-Diffusion U-Net sizes):

* ``adaln_modulate``  pygen.adaln_modulate(x, shift, scale) vs
  ``F.layer_norm(x, (C,), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]``; x (B, N, C) =
  (8, 256, 1152) (DiT 256px) and (2, 1024, 1152) (DiT 512px).
* ``gated_residual``  pygen.gated_residual(x, gate, y) vs ``x + gate[:, None] * y``; same sizes.
* ``group_norm_silu`` pygen.group_norm(x, 32, w, b, silu=True) vs ``F.silu(F.group_norm(x, 32, w, b))``;
  x (2, 320, 64, 64), (2, 640, 32, 32), (2, 1280, 16, 16), NCHW and channels-last.
* ``timestep_embedding`` pygen.timestep_embedding(t, 320, True, 0) vs diffusers' get_timestep_embedding
  (B = 16; float t, so the backward is d/dt).

Passes: ``fwd`` (no autograd) and ``fwd+bwd`` (inputs require grad; one forward, then
``torch.autograd.grad`` of all inputs with a fixed upstream gradient). Implementations:
``eager`` (the composite), ``pygen`` (the device's default backend: cpu on CPU tensors, cuda on
CUDA), ``triton`` (CUDA tensors only), ``torch`` (pygen's reference; ``--reference``).
GB/s counts the bytes the fused op must move (storage-size elements: adaLN fwd read x + write y,
bwd read g, x + write dx; gated fwd 3, bwd 2 + dgate; GroupNorm as adaLN), the same for every
implementation of a case.

pytest-benchmark::

    python -m pytest benchmarks/bench_norm.py --benchmark-only
    python -m pytest benchmarks/bench_norm.py --benchmark-disable -q       # smoke: smallest shapes, one call each

Standalone runner (interleaved rounds, medians, markdown + JSON)::

    python benchmarks/bench_norm.py --device cpu --out benchmarks/results/norm-cpu-<date>
"""
import argparse
import os
import sys

import pytest
import torch
import torch.nn.functional as F

if __name__ == "__main__":  # this checkout's pygen
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pygen  # noqa: E402
from pygen import bench  # noqa: E402

OPS = ("adaln_modulate", "gated_residual", "group_norm_silu", "timestep_embedding")
SHAPES = {
    "adaln_modulate": [(8, 256, 1152), (2, 1024, 1152)],
    "gated_residual": [(8, 256, 1152), (2, 1024, 1152)],
    "group_norm_silu": [(2, 320, 64, 64), (2, 640, 32, 32), (2, 1280, 16, 16)],
    "timestep_embedding": [(16,)],
}
LAYOUTS = {"group_norm_silu": ("nchw", "cl")}
PASSES = ("fwd", "fwd+bwd")
LABELS = ("eager", "pygen", "triton", "torch")
GROUPS = 32
TEMB_DIM = 320
# storage-size elements moved per element of x by the fused op: (fwd, bwd)
_TRAFFIC = {"adaln_modulate": (2, 3), "gated_residual": (3, 2), "group_norm_silu": (2, 3)}


def _diffusers_embedding():
    try:
        from diffusers.models.embeddings import get_timestep_embedding
    except Exception:  # diffusers missing: the same formula
        import math

        def get_timestep_embedding(t, dim, flip_sin_to_cos, downscale_freq_shift):
            half = dim // 2
            e = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device)
                          / (half - downscale_freq_shift))
            a = t[:, None].float() * e[None, :]
            emb = torch.cat([torch.sin(a), torch.cos(a)], -1)
            return torch.cat([emb[:, half:], emb[:, :half]], -1) if flip_sin_to_cos else emb
    return get_timestep_embedding


def _rand(shape, dtype, device, gen, scale=1.0, shift=0.0):
    return (torch.randn(shape, generator=gen) * scale + shift).to(dtype=dtype, device=device)


def build_case(op, shape, dtype, device, layout="nchw", passes="fwd"):
    """(eager fn, pygen fn, bytes moved) for one case; fns take no arguments."""
    gen = torch.Generator().manual_seed(bench.SEED)
    grad = passes == "fwd+bwd"
    if op == "timestep_embedding":
        t = (torch.rand(shape, generator=gen) * 1000).to(device).requires_grad_(grad)
        g = _rand((shape[0], TEMB_DIM), torch.float32, device, gen)
        emb = _diffusers_embedding()

        def eager_f():
            return emb(t, TEMB_DIM, True, 0)

        def pygen_f():
            return pygen.timestep_embedding(t, TEMB_DIM, True, 0)

        inputs, nbytes = (t,), shape[0] * TEMB_DIM * 4 * (2 if grad else 1)
    else:
        x = _rand(shape, dtype, device, gen, 2.0, 0.5)
        if op == "group_norm_silu" and layout == "cl":
            x = x.contiguous(memory_format=torch.channels_last)
        c = shape[-1] if op != "group_norm_silu" else shape[1]
        if op == "adaln_modulate":
            shift = _rand((shape[0], c), dtype, device, gen)
            scale = _rand((shape[0], c), dtype, device, gen, 0.5)
            inputs = (x, shift, scale)

            def eager_f():
                return F.layer_norm(x, (c,), eps=1e-6) * (1 + scale[:, None, :]) + shift[:, None, :]

            def pygen_f():
                return pygen.adaln_modulate(x, shift, scale, eps=1e-6)
        elif op == "gated_residual":
            gate = _rand((shape[0], c), dtype, device, gen)
            y = _rand(shape, dtype, device, gen)
            inputs = (x, gate, y)

            def eager_f():
                return x + gate[:, None, :] * y

            def pygen_f():
                return pygen.gated_residual(x, gate, y)
        else:
            w = _rand((c,), dtype, device, gen, 0.2, 1.0)
            b = _rand((c,), dtype, device, gen, 0.2)
            inputs = (x, w, b)

            def eager_f():
                return F.silu(F.group_norm(x, GROUPS, w, b, 1e-5))

            def pygen_f():
                return pygen.group_norm(x, GROUPS, w, b, 1e-5, silu=True)
        for t_ in inputs:
            t_.requires_grad_(grad)
        fwd_k, bwd_k = _TRAFFIC[op]
        nbytes = x.numel() * x.element_size() * (fwd_k + (bwd_k if grad else 0))
        g = _rand(shape, dtype, device, gen)
        if op == "group_norm_silu" and layout == "cl":
            g = g.contiguous(memory_format=torch.channels_last)
    if not grad:
        return eager_f, pygen_f, nbytes

    def with_backward(f):
        def run():
            return torch.autograd.grad(f(), inputs, g)[0]
        return run

    return with_backward(eager_f), with_backward(pygen_f), nbytes


class Impl:
    """Duck-types pygen.bench.Impl (``backend`` is the label; ``context()`` forces a pygen backend)."""

    def __init__(self, label, fn, backend=None):
        self.backend, self.fn, self._pygen_backend = label, fn, backend

    def context(self):
        import contextlib

        return pygen.use_backend(self._pygen_backend) if self._pygen_backend else contextlib.nullcontext()


def build_impls(op, shape, dtype, device, layout, passes, labels=LABELS, reference=False):
    device = torch.device(device)
    eager_f, pygen_f, nbytes = build_case(op, shape, dtype, device, layout, passes)
    impls, skipped = [], {}
    status = pygen.backends()
    for label in labels:
        if label == "eager":
            impls.append(Impl("eager", eager_f))
        elif label == "pygen":
            impls.append(Impl("pygen", pygen_f))
        elif label == "triton":
            if device.type != "cuda":
                skipped["triton"] = "triton on CPU runs only under the interpreter; not a performance path"
            elif status["triton"] != "available":
                skipped["triton"] = status["triton"]
            else:
                impls.append(Impl("triton", pygen_f, "triton"))
        elif label == "torch":
            if reference:
                impls.append(Impl("torch", pygen_f, "torch"))
            else:
                skipped["torch"] = "pygen's torch reference timed only with --reference"
    return impls, skipped, nbytes


def all_cases(ops=OPS, small=False):
    out = []
    for op in ops:
        shapes = SHAPES[op][-1:] if small else SHAPES[op]
        for shape in shapes:
            for layout in LAYOUTS.get(op, ("nchw",)):
                for passes in PASSES:
                    out.append((op, shape, layout, passes))
    return out


# ---------------------------------------------------------------------------
# pytest-benchmark
# ---------------------------------------------------------------------------
def pytest_generate_tests(metafunc):
    if "norm_case" not in metafunc.fixturenames:
        return
    config = metafunc.config
    device = bench.default_device(config.getoption("--bench-device", default=None))
    dtypes = bench.select_dtypes(bench.parse_list(config.getoption("--bench-dtypes", default=None)) or ["fp32"])
    small = bool(config.getoption("benchmark_disable", default=False))
    params, ids = [], []
    for op, shape, layout, passes in all_cases(small=small):
        for dtype in dtypes:
            group = f"{op} {bench.shape_str(shape)} {layout} {bench.DTYPE_NAMES[dtype]} {passes}"
            for label in ("eager", "pygen", "triton"):
                skip = "triton is timed on CUDA tensors only" if label == "triton" and device.type != "cuda" else None
                marks = bench.benchmark_marks(device, group, skip)
                params.append(pytest.param((op, shape, layout, passes, dtype, label, device), marks=marks))
                ids.append(f"{group.replace(' ', '-')}-{label}")
    metafunc.parametrize("norm_case", params, ids=ids)


def test_norm(benchmark, request, norm_case):
    op, shape, layout, passes, dtype, label, device = norm_case
    impls, skipped, nbytes = build_impls(op, shape, dtype, device, layout, passes, labels=(label,))
    if not impls:
        pytest.skip(skipped.get(label, f"{label} not available"))
    impl = impls[0]
    rounds = request.config.getoption("--bench-rounds", default=None) or (20 if device.type == "cuda" else 5)
    benchmark.extra_info.update(op=op, shape=bench.shape_str(shape), layout=layout, passes=passes,
                                dtype=bench.DTYPE_NAMES[dtype], impl=label, bytes=nbytes,
                                device=bench.device_name(device))
    with impl.context():
        result = benchmark.pedantic(impl.fn, rounds=rounds, iterations=1, warmup_rounds=1)
    assert torch.isfinite(result).all()
    stats = getattr(benchmark, "stats", None)
    if stats is not None:
        benchmark.extra_info["GB/s"] = nbytes / stats.stats.median / 1e9


# ---------------------------------------------------------------------------
# standalone runner
# ---------------------------------------------------------------------------
TABLE_IMPLS = ("eager", "pygen", "triton", "torch")


def run_all(device, dtypes, *, ops, repeats, min_time, max_time, reference, log=print, rows=None, on_row=None):
    rows = [] if rows is None else rows
    for op, shape, layout, passes in all_cases(ops):
        for dtype in ([torch.float32] if op == "timestep_embedding" else dtypes):
            impls, skipped, nbytes = build_impls(op, shape, dtype, device, layout, passes, reference=reference)
            load = bench.ForeignLoad()
            timings = bench.measure(impls, device, warmup=2, repeats=repeats, min_time=min_time,
                                    max_time=max_time, min_repeats=3)
            row = {"op": op, "shape": bench.shape_str(shape), "layout": layout, "dtype": bench.DTYPE_NAMES[dtype],
                   "passes": passes, "bytes": nbytes, "foreign_cpu_cores": load.cores(), "impls": {},
                   "skipped": skipped}
            for impl in impls:
                t = timings[impl.backend]
                row["impls"][impl.backend] = {"ms": t.median_s * 1e3, "ms_min": t.min_s * 1e3,
                                              "GB/s": nbytes / t.median_s / 1e9, "repeats": t.repeats,
                                              "iterations": t.iterations}
                if torch.device(device).type == "cuda":
                    row["impls"][impl.backend]["host_ms"] = t.host_s * 1e3
            eager = row["impls"].get("eager")
            for v in row["impls"].values():
                v["speedup_vs_eager"] = eager["ms"] / v["ms"] if eager else None
            rows.append(row)
            log(format_row(row))
            if on_row is not None:
                on_row()
    return rows


def format_row(row):
    im = row["impls"]

    def cell(label):
        if label not in im:
            return " | "
        v = im[label]
        return f"{v['ms']:.3f} | {v['GB/s']:.1f}"

    sp = im.get("pygen", {}).get("speedup_vs_eager")
    return (f"| {row['op']} | {row['shape']} | {row['layout']} | {row['dtype']} | {row['passes']} | "
            + " | ".join(cell(lb) for lb in TABLE_IMPLS)
            + f" | {'' if sp is None else f'{sp:.2f}x'} | {row['foreign_cpu_cores']} |")


def format_markdown(report):
    env = report["environment"]
    dev = env["device"]
    lines = [f"# Norm ops (adaLN, gated residual, GroupNorm+SiLU, timestep embedding), {dev['type']}: {dev['name']}",
             "", bench.report_date_line(env), bench.report_versions_line(env), bench.report_load_line(env),
             "- eager: the PyTorch composite (F.layer_norm + modulation, x + gate·y, F.silu(F.group_norm), "
             "diffusers' get_timestep_embedding); pygen: the device's default backend; ms = median per call "
             f"(implementations interleaved, {report['settings']['repeats']} rounds at most)",
             "- fwd+bwd: forward, then torch.autograd.grad of every input; GB/s = bytes the fused op must move "
             "/ time (same count for every implementation)", "",
             "| op | shape | layout | dtype | pass | eager ms | eager GB/s | pygen ms | pygen GB/s | triton ms "
             "| triton GB/s | torch-ref ms | torch-ref GB/s | pygen speedup vs eager | other CPU use (cores) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [format_row(r) for r in report["results"]]
    lines += bench.report_skipped_lines(bench.row_skips(report["results"]))
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description="pygen's fused norm ops vs eager PyTorch, fwd and fwd+bwd")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtypes", default="fp32", help="fp32,fp16,bf16 (default fp32)")
    p.add_argument("--ops", default=None, help=f"default: {','.join(OPS)}")
    p.add_argument("--reference", action="store_true", help="also time pygen's torch reference")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--min-time", type=float, default=None, help="least seconds per timed batch")
    p.add_argument("--max-time", type=float, default=None, help="soft seconds budget per implementation")
    p.add_argument("--idle", type=float, default=0.0, help="wait for this idle CPU fraction before starting")
    p.add_argument("--idle-timeout", type=float, default=300.0, help="seconds to wait for --idle at most")
    bench.add_report_options(p)
    args = p.parse_args(argv)
    device = bench.default_device(args.device)
    dtypes = bench.select_dtypes(bench.parse_list(args.dtypes))
    ops = bench.parse_list(args.ops) or list(OPS)
    cuda = device.type == "cuda"
    min_time = args.min_time or (0.01 if cuda else 0.05)
    max_time = args.max_time or (2.0 if cuda else 3.0)
    if args.idle > 0:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import record

        record.wait_idle(args.idle, args.idle_timeout)
    if args.threads:
        torch.set_num_threads(args.threads)
    env = bench.environment(device)
    report = {"schema": "pygen-norm-1", "environment": env,
              "settings": {"repeats": args.repeats, "min_time_s": min_time, "max_time_s": max_time,
                           "dtypes": [bench.DTYPE_NAMES[d] for d in dtypes], "ops": ops, "groups": GROUPS,
                           "temb_dim": TEMB_DIM}}
    print(format_markdown(dict(report, results=[])).rstrip())
    report["results"] = []

    def write():
        return bench.write_report(report, env, format_markdown, args.out, args.note)

    run_all(device, dtypes, ops=ops, repeats=args.repeats, min_time=min_time, max_time=max_time,
            reference=args.reference, rows=report["results"], on_row=write)
    md = write()
    print(f"wrote {args.out}.json and {args.out}.md" if args.out else md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
