"""Score-SDE and MCMC loops: time per loop step, eager vs CUDA graph vs pygen's torch reference.

Each case runs one whole loop of ``pygen.sde`` / ``pygen.mcmc`` with a trivial model, so the loop's
own cost dominates:

* score-SDE (VP SDE with N = 1000; the exact score of N(0, I) data, ``-x``):
  ``pc`` (Euler–Maruyama predictor + SNR Langevin corrector), ``pc-ald`` (Euler–Maruyama + ALD,
  2 corrector steps), ``annealed`` (annealed Langevin on a VE SDE, 2 updates per level),
  ``ode_heun`` (probability-flow ODE, Heun);
* MCMC (energy ``|x|²/2`` per chain, its gradient by autograd; ``ula`` takes the score ``-x``):
  ``ula``, ``mala``, ``hmc`` (3 leapfrog steps), ``pt`` (replica exchange, 3 replicas, MALA moves,
  a swap round every step).

Implementations:

* ``torch``       the loop under ``pygen.use_backend("torch")`` (pygen's plain-PyTorch reference),
* ``pygen``       the loop on the device's default backend, eager,
* ``pygen-graph`` (CUDA only) ``cuda_graph=True``: one loop step captured and replayed.

Per-step time = (T(2n) - T(n)) / n for whole calls of n and 2n loop steps (n = ``--steps``), so the
set-up, the first (warm-up) step and the capture cancel out; each call is synchronised. The whole
call at 2n steps is reported too. Rounds interleave the implementations; medians over ``--repeats``.

    python benchmarks/bench_loops.py --device cpu --out benchmarks/results/loops-cpu-2026-12-08
"""
import argparse
import os
import sys
import time
import warnings

import torch

if __name__ == "__main__":  # this checkout's pygen
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pygen  # noqa: E402
from pygen import bench  # noqa: E402
from pygen import mcmc, sde  # noqa: E402

LOOPS = ["pc", "pc-ald", "annealed", "ode_heun", "ula", "mala", "hmc", "pt"]
IMPLS = ["torch", "pygen", "pygen-graph"]
SHAPES = {1 << 14: (64, 256), 1 << 20: (1024, 1024)}  # (rows, elements per row); other sizes: (n/16, 16)


def _score(x, t):
    return -x


def _energy(x):
    return 0.5 * x.square().sum(1)


def loop_fn(name, x0, steps, cuda_graph):
    """A zero-argument callable running loop ``name`` for ``steps`` loop steps from ``x0``."""
    kw = dict(seed=1, cuda_graph=True) if cuda_graph else dict(seed=1)
    vp, ve = pygen.schedules.VPSDE(), pygen.schedules.VESDE()
    if name in ("pc", "pc-ald"):
        opts = dict(corrector="langevin") if name == "pc" else dict(corrector="ald", n_corrector_steps=2)
        return lambda: sde.pc_sample(_score, vp, x_T=x0, n_steps=steps, predictor="euler_maruyama", **opts, **kw)
    if name == "annealed":
        return lambda: sde.annealed_langevin(_score, ve, x_T=x0, n_levels=steps, n_steps_each=2, **kw)
    if name == "ode_heun":
        return lambda: sde.ode_sample(_score, vp, x_T=x0, method="heun", n_steps=steps, **kw)
    if name == "ula":
        return lambda: mcmc.ula(x0, lambda x: -x, step_size=0.1, n_steps=steps, **kw)
    if name == "mala":
        return lambda: mcmc.mala(x0, _energy, step_size=0.1, n_steps=steps, **kw)
    if name == "hmc":
        return lambda: mcmc.hmc(x0, _energy, step_size=0.1, n_leapfrog=3, n_steps=steps, **kw)
    if name == "pt":
        return lambda: mcmc.replica_exchange(x0, _energy, [0.25, 0.5, 1.0], step_size=0.1, n_steps=steps, move="mala",
                                             **kw)
    raise ValueError(f"unknown loop {name!r}; expected one of {', '.join(LOOPS)}")


def _call_time(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def measure(name, numel, impl, device, steps, repeats):
    """(per-step seconds, whole call at 2·steps seconds): medians over ``repeats`` rounds."""
    x0 = pygen.randn(SHAPES.get(numel, (max(1, numel // 16), 16)), 0, device=device)
    ctx = pygen.use_backend("torch") if impl == "torch" else torch.no_grad()
    graph = impl == "pygen-graph"
    with ctx, warnings.catch_warnings():
        if graph:  # a capture that falls back to the eager loop must not be timed as the graph
            warnings.filterwarnings("error", message="cuda_graph=True")
        short, long = loop_fn(name, x0, steps, graph), loop_fn(name, x0, 2 * steps, graph)
        short(), long()  # warm-up (lazy init, Triton/cuBLAS, allocator)
        per, whole = [], []
        for _ in range(repeats):
            a, b = _call_time(short, device), _call_time(long, device)
            per.append((b - a) / steps)
            whole.append(b)
    per.sort()
    whole.sort()
    return per[len(per) // 2], whole[len(whole) // 2]


def run_all(device, sizes, loops, impls, steps, repeats, rows, on_row=None):
    for numel in sizes:
        for name in loops:
            row = {"loop": name, "numel": numel, "steps": 2 * steps, "us_per_step": {}, "ms_per_call": {},
                   "skipped": {}, "foreign_cpu_cores": None}
            for impl in impls:
                if impl == "pygen-graph" and device.type != "cuda":
                    row["skipped"][impl] = "CUDA graphs need a CUDA device"
                    continue
                per, whole = measure(name, numel, impl, device, steps, repeats)
                row["us_per_step"][impl] = per * 1e6
                row["ms_per_call"][impl] = whole * 1e3
            rows.append(row)
            print(_row_line(row), flush=True)
            if on_row is not None:
                on_row()


def _fmt(v):
    return "" if v is None else (f"{v:.1f}" if v < 1000 else f"{v:.0f}")


def _row_line(r):
    us, ms = r["us_per_step"], r["ms_per_call"]
    base = us.get("pygen")
    ratio = lambda a: "" if a not in us or not base else f"{us[a] / base:.2f}x"  # noqa: E731
    graph = us.get("pygen-graph")
    return (f"| {r['loop']} | {r['numel']} | " + " | ".join(_fmt(us.get(i)) for i in IMPLS)
            + f" | {ratio('torch')} | {'' if graph is None or not base else f'{base / graph:.2f}x'} | "
            + " | ".join(_fmt(ms.get(i)) for i in IMPLS) + " |")


def format_markdown(report):
    env = report["environment"]
    s = report["settings"]
    lines = [f"# Score-SDE and MCMC loops, µs per loop step ({env['device']['name']})", "",
             bench.report_date_line(env), bench.report_versions_line(env),
             f"- loops of {s['steps']} steps (per-step time from calls of {s['steps'] // 2} and {s['steps']} steps), "
             f"fp32, trivial models (score -x, energy |x|²/2); medians of {s['repeats']} rounds",
             "- `torch`: pygen's torch reference backend; `pygen`: default backend, eager; `pygen-graph`: "
             "`cuda_graph=True`", "",
             "| loop | elements | torch µs/step | pygen µs/step | pygen-graph µs/step | torch / pygen | "
             "pygen / graph | torch ms/call | pygen ms/call | graph ms/call |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [_row_line(r) for r in report["results"]]
    lines += bench.report_skipped_lines(bench.row_skips(report["results"]))
    return "\n".join(lines) + "\n"


def test_loops_smoke():
    """Every loop runs on the CPU with every implementation there (a few steps)."""
    rows = []
    run_all(torch.device("cpu"), [256], LOOPS, IMPLS, 2, 1, rows)
    assert [r["loop"] for r in rows] == LOOPS
    assert all(set(r["us_per_step"]) == {"torch", "pygen"} for r in rows)


def main(argv=None):
    p = argparse.ArgumentParser(description="score-SDE and MCMC loops: time per loop step")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--sizes", default="16k", help="element counts (16k, 1M or any n)")
    p.add_argument("--loops", default=None, help=f"default: {','.join(LOOPS)}")
    p.add_argument("--impls", default=None, help=f"default: {','.join(IMPLS)}")
    p.add_argument("--steps", type=int, default=20, help="n: calls of n and 2n loop steps")
    p.add_argument("--repeats", type=int, default=5)
    bench.add_report_options(p)
    args = p.parse_args(argv)
    device = bench.default_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    env = bench.environment(device)
    report = {"schema": "pygen-loops-1", "environment": env,
              "settings": {"steps": 2 * args.steps, "repeats": args.repeats, "dtype": "fp32"}, "results": []}
    print(format_markdown(report).rstrip())

    def write():
        return bench.write_report(report, env, format_markdown, args.out, args.note)

    sizes = [bench.parse_size(v) for v in bench.parse_list(args.sizes)]
    run_all(device, sizes, bench.parse_list(args.loops) or LOOPS, bench.parse_list(args.impls) or IMPLS, args.steps,
            args.repeats, report["results"], on_row=write)
    md = write()
    print(f"wrote {args.out}.json and {args.out}.md" if args.out else md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
