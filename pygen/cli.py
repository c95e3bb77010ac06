"""The ``pygen`` command line: ``pygen demo``, ``pygen bench`` and ``pygen info``.

``pygen demo`` samples a built-in 2-D Gaussian mixture with several samplers on
the best backend next to the pure-torch loop, prints a table (sampler, steps,
NFE, time, speedup, distance to the target) and writes a PNG (pygen/demo.py).

``pygen bench`` times every op on every available pygen backend next to the
eager-PyTorch composite of the same math (cases and timing: pygen/bench.py),
prints a table (op, shape, dtype, backend, time, effective GB/s, speedup over
eager torch) and writes the results as JSON (and optionally markdown).
``pygen info`` prints versions, the device and ``pygen.backends()``.
"""
import argparse
import json
import os
import re
import sys
import tempfile

__all__ = ["main"]


# ---------------------------------------------------------------------------
# progress
# ---------------------------------------------------------------------------
class _Counter:
    """Progress on stderr without tqdm: one ``[i/n] what`` line per step."""

    def __init__(self, total, enabled):
        self.total, self.i, self.enabled = total, 0, enabled

    def set_description(self, text):
        self.text = text
        if self.enabled:
            print(f"[{self.i + 1}/{self.total}] {text}", file=sys.stderr, flush=True)

    def update(self, n=1):
        self.i += n

    def close(self):
        if self.enabled:
            print(f"[{self.i}/{self.total}] done", file=sys.stderr, flush=True)


def _progress(total, enabled):
    """tqdm on an interactive stderr when installed, else ``[i/n]`` lines (readable in CI logs)."""
    if enabled and sys.stderr.isatty():
        try:
            from tqdm import tqdm
        except ImportError:
            pass
        else:
            return tqdm(total=total, file=sys.stderr, unit="case", dynamic_ncols=True, leave=False)
    return _Counter(total, enabled)


# ---------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------
def _fmt_time(us):
    return f"{us:,.1f}" if us < 1e5 else f"{us:,.0f}"


def _table_rows(rows, cuda):
    has_copy = any("copy_fraction" in r for r in rows)
    header = ["op", "shape", "dtype", "backend", "time (µs)"]
    if cuda:
        header.append("host (µs)")
    header += ["GB/s", "speedup vs eager"]
    if has_copy:
        header.append("% of copy")
    body = []
    for r in rows:
        line = [r["op"], r["shape"], r["dtype"], r["backend"], _fmt_time(r["time_us"])]
        if cuda:
            line.append(_fmt_time(r["host_us"]))
        line += [f"{r['gbps']:,.1f}", f"{r['speedup_vs_eager']:.2f}x"]
        if has_copy:
            line.append(f"{100 * r['copy_fraction']:.0f}%" if "copy_fraction" in r else "")
        body.append(line)
    return header, body


def format_table(rows, cuda=False):
    header, body = _table_rows(rows, cuda)
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body)]
    left = {0, 1, 2, 3}

    def fmt(line):
        return "  ".join(str(x).ljust(w) if i in left else str(x).rjust(w) for i, (x, w) in enumerate(zip(line, widths)))

    out = [fmt(header), "  ".join("-" * w for w in widths)]
    prev = None
    for r, line in zip(rows, body):
        key = (r["op"], r["shape"], r["dtype"])
        if prev is not None and key[0] != prev[0]:
            out.append("")
        prev = key
        out.append(fmt(line))
    return "\n".join(out)


def format_skipped(skipped, all_ops=None):
    """One line per (backend, reason), naming the ops it covers ("all ops" when it is every op)."""
    groups = {}
    for s in skipped:
        ops = groups.setdefault((s["backend"], s["reason"]), [])
        if s["op"] not in ops:
            ops.append(s["op"])
    lines = []
    for (backend, reason), ops in groups.items():
        what = "all ops" if all_ops and set(ops) >= set(all_ops) else ", ".join(ops)
        lines.append(f"  {backend} ({what}): {reason}")
    return lines


def format_markdown(report):
    env = report["environment"]
    dev, ver = env["device"], env["versions"]
    cuda = dev["type"] == "cuda"
    lines = [
        f"# pygen bench — {dev['type'].upper()} ({dev['name']})",
        "",
        f"- date: {env['date']}",
        f"- device: {dev['type']} — {dev['name']}; {dev['cpu_count']} CPU cores "
        f"({dev['cpu_model']}), torch threads {dev['torch_threads']}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in ver.items())
        + (f" (source commit {env['git_commit']})" if env.get("git_commit") else ""),
        "- backends: " + "; ".join(f"{k}: {v}" for k, v in env["backends"].items()),
        f"- settings: {json.dumps(report['settings'])}",
        f"- other processes' CPU use during the run: {env.get('foreign_cpu_cores', '?')} cores on average; "
        f"load average (1 min) at start / end: {env.get('loadavg_1m', '?')} / {env.get('loadavg_1m_end', '?')} "
        f"(other work on the machine slows CPU timings)",
        "- time = median per call; GB/s = element bytes the fused op reads + writes / time "
        "(same byte count for every implementation); speedup = eager time / time, measured side by side.",
        "",
    ]
    header, body = _table_rows(report["results"], cuda)
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join("---" if i < 4 else "---:" for i in range(len(header))) + "|")
    for line in body:
        lines.append("| " + " | ".join(str(x) for x in line) + " |")
    if report["skipped"]:
        lines += ["", "Skipped:", ""]
        lines += ["-" + s[1:] for s in format_skipped(report["skipped"], report["settings"]["ops"])]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------
# paths
# ---------------------------------------------------------------------------
def _is_checkout(path):
    pyproject = os.path.join(path, "pyproject.toml")
    if not (os.path.isdir(os.path.join(path, "benchmarks")) and os.path.isfile(pyproject)):
        return False
    try:
        with open(pyproject, encoding="utf-8") as f:
            return re.search(r'^name\s*=\s*"pygen"', f.read(), re.M) is not None
    except OSError:
        return False


def checkout_root():
    """The pygen source checkout the cwd is in (the cwd or a parent of it), or None."""
    cand = os.getcwd()
    while True:
        if _is_checkout(cand):
            return cand
        parent = os.path.dirname(cand)
        if parent == cand:
            return None
        cand = parent


def _device_slug(env):
    dev = env["device"]
    if dev["type"] == "cpu":
        return "cpu"
    return "cuda-" + re.sub(r"[^a-z0-9]+", "-", dev["name"].lower()).strip("-")


def default_json_path(env, quick=False):
    """<checkout>/benchmarks/results/bench-<device>-<date>.json when the cwd is in a pygen source
    checkout, else ./pygen-bench-<device>-<date>.json. A --quick run gets a "-quick" suffix (git
    ignores those), so it never overwrites a recorded full run."""
    name = f"bench-{_device_slug(env)}-{env['date'][:10]}{'-quick' if quick else ''}.json"
    root = checkout_root()
    if root is not None:
        return os.path.join(root, "benchmarks", "results", name)
    return os.path.join(os.getcwd(), "pygen-" + name)


def _write_text(path, text, what):
    """Write ``text`` to ``path`` (creating directories); fall back to the cwd, then the temp dir."""
    candidates = [path, os.path.join(os.getcwd(), os.path.basename(path)),
                  os.path.join(tempfile.gettempdir(), os.path.basename(path))]
    last = None
    for cand in candidates:
        try:
            parent = os.path.dirname(os.path.abspath(cand))
            os.makedirs(parent, exist_ok=True)
            with open(cand, "w", encoding="utf-8") as f:
                f.write(text)
        except OSError as exc:
            last = exc
            print(f"pygen bench: cannot write {what} to {cand}: {exc}", file=sys.stderr)
            continue
        return cand
    print(f"pygen bench: {what} not written ({last})", file=sys.stderr)
    return None


# ---------------------------------------------------------------------------
# commands
# ---------------------------------------------------------------------------
def _cmd_bench(args):
    import torch

    from pygen import bench

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        print("pygen bench: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    try:
        ops = bench.select_ops(bench.parse_list(args.ops))
        dtypes = bench.select_dtypes(bench.parse_list(args.dtypes) or (["fp32"] if args.quick else None))
        if args.sizes:
            sizes = [bench.parse_size(s) for s in bench.parse_list(args.sizes)]
        elif args.quick:
            sizes = list(bench.QUICK_CUDA_SIZES if cuda else bench.QUICK_CPU_SIZES)
        else:
            sizes = list(bench.CUDA_SIZES if cuda else bench.CPU_SIZES)
        backends = bench.parse_list(args.backends)
        if backends:
            bad = [b for b in backends if b not in bench.PYGEN_BACKENDS]
            if bad:
                raise ValueError(f"unknown backend(s) {bad}; choose from {', '.join(bench.PYGEN_BACKENDS)}")
        if any(s <= 0 for s in sizes):
            raise ValueError("sizes must be positive")
    except ValueError as exc:
        print(f"pygen bench: {exc}", file=sys.stderr)
        return 2
    include_reference = not args.quick or (backends is not None and "torch" in backends)
    timing = dict(
        warmup=args.warmup if args.warmup is not None else (5 if cuda else 2),
        repeats=args.repeats if args.repeats is not None else (5 if args.quick else 9),
        min_time=args.min_time if args.min_time is not None else (0.01 if args.quick else 0.05),
        max_time=args.max_time if args.max_time is not None else (1.0 if args.quick else 3.0),
    )
    env = bench.environment(device)
    settings = {
        "quick": args.quick,
        "ops": ops,
        "sizes": sizes,
        "dtypes": [bench.DTYPE_NAMES[d] for d in dtypes],
        "backends": backends or "all available",
        **timing,
    }
    plan = [(op, n, dt) for op in ops for n in sizes for dt in dtypes]
    foreign = bench.ForeignLoad()
    results, skipped = [], []
    bar = _progress(len(plan), not args.no_progress)
    try:
        for op, n, dt in plan:
            bar.set_description(f"{op} {bench.shape_str(bench.shape_for(n))} {bench.DTYPE_NAMES[dt]}")
            case = bench.build_case(op, n, dt, device, backends=backends, include_reference=include_reference)
            results += bench.run_case(case, **timing)
            skipped += bench.skipped_rows(case)
            del case
            bar.update(1)
    finally:
        bar.close()
    bench.add_copy_fraction(results)
    if hasattr(os, "getloadavg"):
        env["loadavg_1m_end"] = round(os.getloadavg()[0], 2)
    env["foreign_cpu_cores"] = foreign.cores()
    report = {"schema": "pygen-bench/1", "environment": env, "settings": settings,
              "results": results, "skipped": skipped}

    dev = env["device"]
    print(f"pygen bench on {dev['type']} ({dev['name']}, {dev['cpu_count']} CPU cores, "
          f"torch {env['versions']['torch']}, pygen {env['versions']['pygen']}, {env['date'][:10]})")
    print(format_table(results, cuda))
    if env.get("foreign_cpu_cores"):
        print(f"\nnote: other processes used {env['foreign_cpu_cores']} CPU cores on average during the run")
    if skipped:
        print("\nskipped:")
        print("\n".join(format_skipped(skipped, ops)))
    if not args.no_json:
        path = _write_text(args.json or default_json_path(env, quick=args.quick), json.dumps(report, indent=2) + "\n", "JSON")
        if path:
            print(f"\nJSON: {path}")
    if args.markdown:
        path = _write_text(args.markdown, format_markdown(report), "markdown")
        if path:
            print(f"markdown: {path}")
    return 0


def _cmd_info(args):
    import torch

    import pygen
    from pygen import _extension, bench

    info = {
        "versions": bench.versions(),
        "cpu": {"model": bench.cpu_model(), "count": os.cpu_count(), "torch_threads": torch.get_num_threads()},
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available() else [],
        "extension": "loaded" if _extension.C is not None else _extension.LOAD_ERROR,
        "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
        "backends": pygen.backends(),
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"pygen {info['versions']['pygen']}")
    for k, v in info["versions"].items():
        if k != "pygen":
            print(f"  {k:8s} {v}")
    print(f"CPU: {info['cpu']['model']} ({info['cpu']['count']} cores, torch threads {info['cpu']['torch_threads']})")
    print("CUDA devices: " + (", ".join(info["cuda_devices"]) or "none"))
    print(f"extension pygen._C: {info['extension']}")
    print("backends:")
    for name, status in info["backends"].items():
        print(f"  {name:7s} {status}")
    return 0


def _cmd_demo(args):
    from pygen import demo

    try:
        demo.main_args(args)
    except ValueError as exc:
        print(f"pygen demo: error: {exc}", file=sys.stderr)
        return 2
    return 0


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _add_demo_parser(sub):
    from pygen.demo import DEFAULT_N, FALLBACK, PREFERRED, QUICK_N, TARGETS

    d = sub.add_parser("demo", help="sample the built-in 2-D mixture with several samplers; table + PNG",
                       description="Sample a built-in 2-D Gaussian mixture with several samplers on pygen's best "
                                   "backend and on the pure-torch loop; print sampler, steps, NFE, time, speedup "
                                   "and distance to the target (with thresholds calibrated from exact samples), "
                                   "and write a PNG of the samples over the target density contours.")
    d.add_argument("--samplers", default=None,
                   help="comma-separated sampler names (default: " + ",".join(PREFERRED) + " when "
                        "pygen.kdiffusion is available, else " + ",".join(FALLBACK) + "); "
                        "an unknown name lists the valid ones")
    d.add_argument("--steps", type=_positive_int, default=None,
                   help="steps for every sampler (default: each sampler's own)")
    d.add_argument("--n", type=_positive_int, default=None,
                   help=f"samples per sampler (default {DEFAULT_N}; --quick: {QUICK_N})")
    d.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="device (default: cuda if available, else cpu)")
    d.add_argument("--target", choices=TARGETS, default="clot",
                   help="the mixture: clot (7 unequal blobs, seed 000) or ring (8 Gaussians on a circle)")
    d.add_argument("--out", metavar="PATH.png", default="pygen-demo.png", help="PNG path (default: ./pygen-demo.png)")
    d.add_argument("--no-png", action="store_true", help="do not write the PNG")
    d.add_argument("--seed", type=int, default=0, help="seed of the samplers, exact samples and calibration")
    d.add_argument("--json", metavar="PATH", default=None, help="also write the results as JSON")
    d.add_argument("--repeats", type=_positive_int, default=None,
                   help="timed runs per backend after one warm-up (median; default 3, --quick 1)")
    d.add_argument("--threads", type=_positive_int, default=None,
                   help="torch CPU threads (default on CPU: 1, the demo's tensors are too small to gain from more; "
                        "on CUDA: torch's default)")
    d.add_argument("--quick", action="store_true",
                   help=f"smaller and faster: n={QUICK_N}, fewer steps, one timed run")
    d.add_argument("--no-progress", action="store_true", help="no progress output on stderr")
    d.set_defaults(func=_cmd_demo)


def build_parser():
    parser = argparse.ArgumentParser(prog="pygen", description="pygen: fused kernels for generative-model math")
    sub = parser.add_subparsers(dest="command", metavar="{demo,bench,info}")
    sub.required = True
    _add_demo_parser(sub)

    b = sub.add_parser("bench", help="time every op on every backend next to eager PyTorch",
                       description="Time pygen ops on every available backend next to the eager-PyTorch "
                                   "composite of the same math; print a table and write JSON.")
    b.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="device to benchmark (default: cuda if available, else cpu)")
    b.add_argument("--ops", action="append", default=None,
                   help="comma-separated ops or families (default: all): " + ", ".join(_op_names()))
    b.add_argument("--dtypes", action="append", default=None,
                   help="comma-separated dtypes: fp32, fp16, bf16 (default: all; --quick: fp32)")
    b.add_argument("--sizes", action="append", default=None,
                   help="comma-separated element counts, e.g. 2^20,2^22 or 4M "
                        "(default cpu: 2^16,2^20,2^22; cuda: 2^16,2^20,2^24,2^26)")
    b.add_argument("--backends", action="append", default=None,
                   help="comma-separated pygen backends to time (cuda, triton, cpu, torch); eager torch always runs")
    b.add_argument("--quick", action="store_true",
                   help="small subset: fp32, two sizes, no torch-reference timing (well under a minute)")
    b.add_argument("--json", metavar="PATH", default=None,
                   help="where to write JSON (default: benchmarks/results/bench-<device>-<date>.json in a "
                        "source checkout, else ./pygen-bench-<device>-<date>.json; --quick adds -quick)")
    b.add_argument("--no-json", action="store_true", help="do not write JSON")
    b.add_argument("--markdown", metavar="PATH", default=None, help="also write a markdown report")
    b.add_argument("--repeats", type=int, default=None, help="timed batches per implementation (median)")
    b.add_argument("--warmup", type=int, default=None, help="warm-up calls per implementation")
    b.add_argument("--min-time", type=float, default=None, help="least seconds per timed batch")
    b.add_argument("--max-time", type=float, default=None, help="soft time budget per implementation (s)")
    b.add_argument("--no-progress", action="store_true", help="no progress output on stderr")
    b.set_defaults(func=_cmd_bench)

    i = sub.add_parser("info", help="print versions, devices and pygen.backends()")
    i.add_argument("--json", action="store_true", help="print as JSON")
    i.set_defaults(func=_cmd_info)
    return parser


def _op_names():
    from pygen.bench import OPS

    return list(OPS)


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("repeats", "warmup"):
        v = getattr(args, name, None)
        if v is not None and v < (1 if name == "repeats" else 0):
            parser.error(f"--{name} must be {'>= 1' if name == 'repeats' else '>= 0'}")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
