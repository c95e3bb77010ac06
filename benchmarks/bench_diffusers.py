"""pygen.diffusers fused schedulers vs their stock diffusers twins: per-step cost, and a whole pipeline loop.

Per-step cases (no model): for every class in ``pygen.diffusers.SCHEDULERS`` (default config), plus
DPMSolverMultistepScheduler with ``use_karras_sigmas=True`` and EulerAncestralDiscreteScheduler with a
seeded ``generator``, one timed run is a whole denoising loop::

    for t in s.timesteps:
        x = s.step(model_output, t, s.scale_model_input(x, t)).prev_sample   # (FlowMatch: no scale_model_input)

with a precomputed ``model_output`` tensor, 50 inference steps (the issue's baseline). ``set_timesteps``
runs before every timed loop and is not timed (each round starts from a fresh ``set_timesteps``).
ms/step = loop time / number of ``step`` calls (``len(timesteps)``; Heun: 2*50-1). Shapes 1x4x64x64
and 16x4x128x128, fp32 (and fp16 on CUDA). Stock and fused are interleaved in rounds; medians.

Pipeline case: ``DDIMPipeline`` with a tiny ``UNet2DModel`` built from a config (no download), 50 steps,
the same generator, stock ``DDIMScheduler`` vs ``pygen.diffusers.DDIMScheduler`` (assigned after the
pipeline is built: ``DDIMPipeline.__init__`` converts its scheduler). On CUDA also ``fused-graph``: the
UNet + fused step captured in a CUDA graph after two eager warm-up steps (as in
tests/test_diffusers_compile.py), the remaining steps replayed (capture not timed; GPU only, untested
on CPU-only machines).

pytest-benchmark::

    python -m pytest benchmarks/bench_diffusers.py --benchmark-only
    python -m pytest benchmarks/bench_diffusers.py --benchmark-disable -q     # smoke: small shape, few steps

Standalone runner (interleaved rounds, medians, markdown + JSON)::

    python benchmarks/bench_diffusers.py --device cpu --threads 1 --out benchmarks/results/diffusers-cpu-2026-11-23
"""
import argparse
import os
import statistics
import sys
import time

import pytest
import torch

if __name__ == "__main__":  # this checkout's pygen
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

diffusers = pytest.importorskip("diffusers") if __name__ != "__main__" else __import__("diffusers")

import pygen  # noqa: E402,F401
import pygen.diffusers as PD  # noqa: E402
from pygen import bench  # noqa: E402

STEPS = 50
SHAPES = ((1, 4, 64, 64), (16, 4, 128, 128))
SMOKE_STEPS = 4
# (label, class name, config overrides, pass a seeded generator to step)
CASES = [(name, name, {}, False) for name in PD.SCHEDULERS] + [
    ("DPMSolverMultistepScheduler+karras", "DPMSolverMultistepScheduler", {"use_karras_sigmas": True}, False),
    ("EulerAncestralDiscreteScheduler+generator", "EulerAncestralDiscreteScheduler", {}, True),
]
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16"}
PIPE_LABEL = "DDIMPipeline (tiny UNet2DModel)"
PIPE_SAMPLE = 32


# ---------------------------------------------------------------------------
# cases
# ---------------------------------------------------------------------------
def make_schedulers(cls_name, overrides):
    stock = getattr(diffusers, cls_name)(**overrides)
    fused = PD.SCHEDULERS[cls_name].from_config(stock.config)
    assert isinstance(fused, PD.FusedSchedulerMixin) and not isinstance(stock, PD.FusedSchedulerMixin)
    return stock, fused


class Loop:
    """One scheduler's denoising loop: ``reset()`` (untimed: set_timesteps, reseed) then ``run()``."""

    def __init__(self, sched, x0, model_output, steps, use_generator):
        self.s, self.x0, self.mo, self.steps = sched, x0, model_output, steps
        self.gen = torch.Generator(x0.device) if use_generator else None
        self.scale = hasattr(sched, "scale_model_input")
        self.reset()
        self.nsteps = len(self.s.timesteps)

    def reset(self):
        torch.manual_seed(0)  # pygen's in-kernel Philox key is drawn from torch's RNG at set_timesteps
        self.s.set_timesteps(self.steps, device=self.x0.device)
        if self.gen is not None:
            self.gen.manual_seed(0)

    def run(self):
        s, mo = self.s, self.mo
        kw = {"generator": self.gen} if self.gen is not None else {}
        x = self.x0
        for t in s.timesteps:
            if self.scale:
                s.scale_model_input(x, t)
            x = s.step(mo, t, x, **kw).prev_sample
        return x


def make_step_loops(label, shape, dtype, device, steps=STEPS):
    _, cls_name, overrides, use_gen = next(c for c in CASES if c[0] == label)
    stock, fused = make_schedulers(cls_name, overrides)
    g = torch.Generator().manual_seed(0)
    x0 = (torch.randn(shape, generator=g) * float(getattr(stock, "init_noise_sigma", 1.0))).to(device, dtype)
    mo = (torch.randn(shape, generator=g) * 0.5).to(device, dtype)
    return {"stock": Loop(stock, x0, mo, steps, use_gen), "fused": Loop(fused, x0, mo, steps, use_gen)}


def tiny_unet(device, dtype=torch.float32):
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=PIPE_SAMPLE, in_channels=3, out_channels=3, layers_per_block=1,
        block_out_channels=(32, 64), norm_num_groups=8,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
    return unet.to(device, dtype).eval()


class PipeRun:
    """``pipe(...)`` with a reseeded generator; ``reset`` does nothing (set_timesteps is inside the call)."""

    def __init__(self, pipe, device, steps):
        self.pipe, self.device, self.steps = pipe, device, steps
        self.gen = torch.Generator(device)
        self.nsteps = steps

    def reset(self):
        self.gen.manual_seed(0)

    @torch.no_grad()
    def run(self):
        return self.pipe(batch_size=1, generator=self.gen, num_inference_steps=self.steps, eta=0.0,
                         output_type="np", return_dict=False)[0]


class GraphRun:
    """CUDA only: tiny UNet + fused DDIM step, 2 eager warm-up steps, then one captured model+step
    replayed for the remaining steps. ``reset`` (untimed) re-runs set_timesteps, the warm-up and the
    capture; ``run`` times the replays only. ms/step = replay time / replayed steps."""

    WARMUP = 2

    def __init__(self, unet, sched, device, steps):
        self.unet, self.s, self.device, self.steps = unet, sched, device, steps
        g = torch.Generator().manual_seed(0)
        self.x0 = torch.randn((1, 3, PIPE_SAMPLE, PIPE_SAMPLE), generator=g).to(device)
        self.nsteps = steps - self.WARMUP

    @torch.no_grad()
    def reset(self):
        s = self.s
        torch.manual_seed(0)
        s.set_timesteps(self.steps, device=self.device)
        x = self.x0.clone()
        for t in s.timesteps[:self.WARMUP]:
            x = s.step(self.unet(s.scale_model_input(x, t), t).sample, t, x).prev_sample
        self.static_x = x.clone()
        self.static_t = s.timesteps[self.WARMUP].clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(side), torch.cuda.graph(self.graph):
            xi = s.scale_model_input(self.static_x, self.static_t)
            self.static_out = s.step(self.unet(xi, self.static_t).sample, self.static_t, self.static_x).prev_sample
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()

    def run(self):
        for t in self.s.timesteps[self.WARMUP:]:
            self.static_t.copy_(t)
            self.graph.replay()  # the fused step advances its device step index
            self.static_x.copy_(self.static_out)
        return self.static_x


def make_pipe_runs(device, steps=STEPS, graph=None):
    unet = tiny_unet(device)
    stock_pipe = diffusers.DDIMPipeline(unet=unet, scheduler=diffusers.DDIMScheduler())
    fused_pipe = diffusers.DDIMPipeline(unet=unet, scheduler=diffusers.DDIMScheduler())
    fused_pipe.scheduler = PD.DDIMScheduler.from_config(stock_pipe.scheduler.config)  # after __init__
    for p in (stock_pipe, fused_pipe):
        p.set_progress_bar_config(disable=True)
    runs = {"stock": PipeRun(stock_pipe, device, steps), "fused": PipeRun(fused_pipe, device, steps)}
    if graph is None:
        graph = torch.device(device).type == "cuda"
    if graph:
        runs["fused-graph"] = GraphRun(unet, PD.DDIMScheduler.from_config(stock_pipe.scheduler.config),
                                       device, steps)
    return runs


# ---------------------------------------------------------------------------
# timing: interleaved rounds, each a fresh reset (untimed) then one timed run
# ---------------------------------------------------------------------------
def time_runs(runs, device, *, rounds, warmup=1, max_time=None):
    cuda = torch.device(device).type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for r in runs.values():
        for _ in range(warmup):
            r.reset()
            r.run()
    samples = {k: [] for k in runs}
    t_start = time.perf_counter()
    for i in range(rounds):
        for k, r in runs.items():
            r.reset()
            sync()
            t0 = time.perf_counter()
            r.run()
            sync()
            samples[k].append(time.perf_counter() - t0)
        if max_time is not None and i >= 2 and time.perf_counter() - t_start > max_time:
            break
    return samples


def summarize(runs, samples):
    out = {}
    for k, r in runs.items():
        s = samples[k]
        med = statistics.median(s)
        out[k] = {"steps": r.nsteps, "ms_per_loop": med * 1e3, "ms_per_step": med / r.nsteps * 1e3,
                  "ms_per_step_min": min(s) / r.nsteps * 1e3, "rounds": len(s)}
    st = out.get("stock")
    for v in out.values():
        v["ratio_stock_over_this"] = st["ms_per_step"] / v["ms_per_step"] if st else None
    return out


def final_diff(runs):
    """max |stock - fused| / max |stock| of one loop each (same seeds): a check that both do the same work."""
    outs = {}
    for k in ("stock", "fused"):
        runs[k].reset()
        y = runs[k].run()
        outs[k] = torch.as_tensor(y).float()
    ref = outs["stock"]
    return float((outs["fused"] - ref).abs().max() / ref.abs().max().clamp_min(1e-12))


# ---------------------------------------------------------------------------
# pytest-benchmark
# ---------------------------------------------------------------------------
def pytest_generate_tests(metafunc):
    if "dcase" not in metafunc.fixturenames:
        return
    config = metafunc.config
    device = bench.default_device(config.getoption("--bench-device", default=None))
    smoke = config.getoption("benchmark_disable", default=False)
    shapes = SHAPES[:1] if smoke else SHAPES
    dtypes = [torch.float32] + ([torch.float16] if device.type == "cuda" else [])
    params, ids = [], []

    def add(case, group, label, marks=()):
        marks = bench.benchmark_marks(device, group, marks=marks)
        params.append(pytest.param(case + (device,), marks=marks))
        ids.append(f"{group.replace(' ', '-')}-{label}")

    for shape in shapes:
        for dtype in dtypes:
            for label, *_ in CASES:
                group = f"{label} {bench.shape_str(shape)} {DTYPE_NAMES[dtype]}"
                for impl in ("stock", "fused"):
                    add(("step", label, shape, dtype, impl), group, impl)
    for impl in ("stock", "fused", "fused-graph"):
        marks = [] if device.type == "cuda" or impl != "fused-graph" else [
            pytest.mark.skip(reason="CUDA graphs need a CUDA device")]
        add(("pipe", PIPE_LABEL, None, torch.float32, impl), "DDIMPipeline tiny-UNet fp32", impl, marks)
    metafunc.parametrize("dcase", params, ids=ids)


_CACHE = {}


def test_diffusers(benchmark, request, dcase):
    kind, label, shape, dtype, impl, device = dcase
    smoke = request.config.getoption("benchmark_disable", default=False)
    steps = SMOKE_STEPS if smoke else STEPS
    key = (kind, label, shape, dtype, device, steps)
    if key not in _CACHE:
        _CACHE.clear()
        _CACHE[key] = (make_step_loops(label, shape, dtype, device, steps) if kind == "step"
                       else make_pipe_runs(device, steps))
    runs = _CACHE[key]
    r = runs[impl]
    rounds = request.config.getoption("--bench-rounds", default=None) or (20 if device.type == "cuda" else 5)
    benchmark.extra_info.update(case=label, shape=bench.shape_str(shape) if shape else "1x3x32x32",
                                dtype=DTYPE_NAMES[dtype], impl=impl, steps=r.nsteps, device=bench.device_name(device))
    result = benchmark.pedantic(r.run, setup=r.reset, rounds=rounds, iterations=1, warmup_rounds=0)
    assert torch.isfinite(torch.as_tensor(result)).all()
    stats = getattr(benchmark, "stats", None)
    if stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["us_per_step"] = stats.stats.median / r.nsteps * 1e6


# ---------------------------------------------------------------------------
# standalone runner
# ---------------------------------------------------------------------------
def format_row(row):
    im = row["impls"]

    def ms(k):
        return f"{im[k]['ms_per_step'] * 1e3:.1f}" if k in im else ""

    ratio = im["fused"]["ratio_stock_over_this"]
    graph = im.get("fused-graph", {}).get("ratio_stock_over_this")
    return (f"| {row['case']} | {row['shape']} | {row['dtype']} | {im['stock']['steps']} | {ms('stock')} | "
            f"{ms('fused')} | **{ratio:.2f}x** | {ms('fused-graph')} | {'' if graph is None else f'{graph:.2f}x'} | "
            f"{row['rel_diff']:.1e} | {row['foreign_cpu_cores']} |")


def format_markdown(report):
    env = report["environment"]
    dev, v, st = env["device"], env["versions"], report["settings"]
    lines = [f"# pygen.diffusers vs stock diffusers, {dev['type']}: {dev['name']}", "",
             bench.report_date_line(env), bench.report_cpu_line(env),
             f"- torch {v['torch']}, diffusers {st['diffusers']}, triton {v['triton']}, pygen {v['pygen']}, "
             f"python {v['python']}",
             bench.report_load_line(env),
             f"- {st['steps']} inference steps, default configs; per step = `scale_model_input` + `step` with a "
             "precomputed model_output (no model); `set_timesteps` before every timed loop, not timed; "
             f"stock and fused interleaved, {st['rounds']} rounds at most, medians; µs/step = loop / step calls",
             "- ratio = stock / fused time per step (> 1: fused is faster)",
             "- rel. diff = max|fused - stock| / max|stock| after one loop, same seeds (DDPM: no generator, "
             "so stock draws torch.randn and fused in-kernel Philox: different noise, not a numerics check)",
             f"- pipeline: {PIPE_LABEL}, 1x3x{PIPE_SAMPLE}x{PIPE_SAMPLE}, whole `pipe(...)` call "
             "(includes set_timesteps, UNet and postprocessing)",
             "", "| case | shape | dtype | steps | stock µs/step | fused µs/step | ratio | fused-graph µs/step "
             "| graph ratio | rel. diff | other CPU use (cores) |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [format_row(r) for r in report["results"]]
    lines += bench.report_skipped_lines(report.get("skipped"))
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description="pygen.diffusers fused schedulers vs stock diffusers: time per step")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--cases", default=None, help="labels (default: all, then the pipeline)")
    p.add_argument("--shapes", default=None, help="e.g. 1x4x64x64,16x4x128x128")
    p.add_argument("--no-pipeline", action="store_true")
    p.add_argument("--steps", type=int, default=STEPS)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--max-time", type=float, default=None, help="soft seconds per case (>= 3 rounds)")
    bench.add_report_options(p)
    args = p.parse_args(argv)
    device = bench.default_device(args.device)
    cuda = device.type == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    labels = bench.parse_list(args.cases) or [c[0] for c in CASES]
    shapes = ([tuple(int(d) for d in s.split("x")) for s in bench.parse_list(args.shapes)]
              if args.shapes else list(SHAPES))
    dtypes = [torch.float32] + ([torch.float16] if cuda else [])
    max_time = args.max_time or (5.0 if cuda else 20.0)
    env = bench.environment(device)
    report = {"schema": "pygen-diffusers-1", "environment": env,
              "settings": {"steps": args.steps, "rounds": args.rounds, "max_time_s": max_time,
                           "diffusers": diffusers.__version__, "shapes": [bench.shape_str(s) for s in shapes],
                           "dtypes": [DTYPE_NAMES[d] for d in dtypes]},
              "results": [], "skipped": [] if cuda else ["fused-graph: CUDA graphs need a CUDA device"]}
    print(format_markdown(report).rstrip(), flush=True)

    def write():
        return bench.write_report(report, env, format_markdown, args.out, args.note)

    jobs = [("step", label, shape, dtype) for shape in shapes for dtype in dtypes for label in labels]
    if not args.no_pipeline:
        jobs.append(("pipe", PIPE_LABEL, (1, 3, PIPE_SAMPLE, PIPE_SAMPLE), torch.float32))
    for kind, label, shape, dtype in jobs:
        runs = (make_step_loops(label, shape, dtype, device, args.steps) if kind == "step"
                else make_pipe_runs(device, args.steps))
        rel = final_diff(runs)
        load = bench.ForeignLoad()
        samples = time_runs(runs, device, rounds=args.rounds, max_time=max_time)
        row = {"kind": kind, "case": label, "shape": bench.shape_str(shape), "dtype": DTYPE_NAMES[dtype],
               "foreign_cpu_cores": load.cores(), "rel_diff": rel, "impls": summarize(runs, samples),
               "samples_ms": {k: [s * 1e3 for s in v] for k, v in samples.items()}}
        report["results"].append(row)
        print(format_row(row), flush=True)
        write()
        del runs
    write()
    print(f"wrote {args.out}.json and {args.out}.md" if args.out else "")
    return 0


if __name__ == "__main__":
    sys.exit(main())
