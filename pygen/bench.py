"""Benchmark cases and the timing runner behind ``pygen bench`` and benchmarks/.

Every benchmarked op is a *case*: one op variant at one shape, dtype and
device, with its inputs allocated once, and one zero-argument callable per
implementation:

* ``eager``  the eager-PyTorch composite of the same math (what a user writes
  without pygen; noise from ``torch.randn`` with a ``torch.Generator``),
* ``cuda`` / ``triton`` / ``cpu`` / ``torch``: the public pygen op on that
  backend (forced with ``pygen.use_backend`` unless it is the device's
  default, so the default dispatch path is what gets timed; ``torch`` is
  pygen's plain-PyTorch reference, the spec, not a performance path).

Op variants (``OPS``): ``randn``, ``q_sample`` (noise given), ``q_sample+rng``
(noise drawn in the kernel and returned), ``reparameterize``,
``reparameterize+rng``, ``langevin_step``, ``langevin_step+rng``,
``ddim_step`` (``pygen.sampler_step`` with DDIM coefficients, eta=0, no noise),
``ddim_step+rng`` (eta=1: noise drawn in the kernel) and ``copy`` (``x.copy_(y)``,
the bandwidth baseline). An op whose pygen API is not on this build stays
defined and is reported as skipped with the reason.

Triton is not timed on CPU tensors (it only runs under the interpreter
there); on CUDA it is.

Timing (``measure``): a few warm-up calls (two for implementations slower
than 0.25 s a call), then each implementation's batch
size is calibrated so one batch lasts at least ``min_time``; the batches of
all implementations of a case are then interleaved (``eager``, ``cpu``,
``torch``, ``eager``, ...) for ``repeats`` rounds and the median time per call
is reported, so ratios are measured side by side in the same run. On the CPU
a batch is timed with ``time.perf_counter``; on CUDA with CUDA events around
the batch, and the host time of the batch (perf_counter, no synchronisation
inside) is reported as the Python-to-launch time per call. Inputs are
allocated before timing; the timed region calls the op and nothing else
(no ``.item()``, no synchronisation, garbage collection off).

Effective bandwidth counts the element bytes that the fused op must read and
write (``Case.bytes``), for every implementation alike, so GB/s columns are
comparable within a case (eager torch moves more bytes than it is credited
with: that is the point of fusing).
"""
import contextlib
import dataclasses
import datetime
import gc
import math
import os
import platform
import re
import time

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

# op name -> (pygen API it needs, what it computes)
OPS = {
    "randn": ("randn", "standard normals: pygen.randn vs torch.randn(generator=g)"),
    "q_sample": ("q_sample", "x_t = sqrt(ab[t]) x0 + sqrt(1-ab[t]) noise, noise given"),
    "q_sample+rng": ("q_sample", "q_sample drawing the noise (returned) in the kernel"),
    "reparameterize": ("reparameterize", "z = mu + exp(logvar/2) noise, noise given"),
    "reparameterize+rng": ("reparameterize", "reparameterize drawing the noise in the kernel"),
    "langevin_step": ("langevin_step", "x + dt/2 score + sqrt(dt) noise, noise given"),
    "langevin_step+rng": ("langevin_step", "langevin_step drawing the noise in the kernel"),
    "ddim_step": ("sampler_step", "DDIM step (eps prediction, eta=0), coefficients from a device table"),
    "ddim_step+rng": ("sampler_step", "DDIM step with eta=1, noise drawn in the kernel"),
    "copy": (None, "x.copy_(y): the copy-bandwidth baseline"),
}

# Element bytes read + written per element by the fused op (in units of the storage size).
_TRAFFIC = {
    "randn": 1,  # write
    "q_sample": 3,  # read x0, noise; write x_t
    "q_sample+rng": 3,  # read x0; write x_t, noise
    "reparameterize": 4,  # read mu, logvar, noise; write z
    "reparameterize+rng": 4,  # read mu, logvar; write z, noise (the op returns the noise for autograd)
    "langevin_step": 4,  # read x, score, noise; write x'
    "langevin_step+rng": 3,  # read x, score; write x'
    "ddim_step": 3,  # read x, eps; write x'
    "ddim_step+rng": 3,  # read x, eps; write x'
    "copy": 2,  # read y; write x
}

PYGEN_BACKENDS = ("cuda", "triton", "cpu", "torch")
CPU_SIZES = (1 << 16, 1 << 20, 1 << 22)
CUDA_SIZES = (1 << 16, 1 << 20, 1 << 24, 1 << 26)
QUICK_CPU_SIZES = (1 << 16, 1 << 22)
QUICK_CUDA_SIZES = (1 << 16, 1 << 26)

SEED = 1234
NUM_TRAIN_TIMESTEPS = 1000
DDIM_STEPS = 50


# ---------------------------------------------------------------------------
# parsing helpers (shared by the CLI and benchmarks/conftest.py)
# ---------------------------------------------------------------------------
def parse_size(text):
    """``"4194304"``, ``"2^22"``, ``"2**22"``, ``"4M"``, ``"64k"`` -> int."""
    s = str(text).strip().lower().replace("_", "")
    m = re.fullmatch(r"2(\^|\*\*)(\d+)", s)
    if m:
        return 1 << int(m.group(2))
    m = re.fullmatch(r"(\d+)([km]?)", s)
    if m:
        return int(m.group(1)) * {"": 1, "k": 1 << 10, "m": 1 << 20}[m.group(2)]
    raise ValueError(f"size must be an int, 2^k, or a number with k/M, got {text!r}")


def parse_list(text):
    if text is None:
        return None
    if isinstance(text, (list, tuple)):
        items = []
        for t in text:
            items += parse_list(t)
        return items
    return [t.strip() for t in str(text).split(",") if t.strip()]


def select_ops(names):
    """Op names from ``names`` (an op, or a family like ``q_sample`` = both variants)."""
    if not names:
        return list(OPS)
    chosen = []
    for name in names:
        matches = [op for op in OPS if op == name or op.split("+")[0] == name]
        if not matches:
            raise ValueError(f"unknown op {name!r}; choose from {', '.join(OPS)}")
        chosen += [m for m in matches if m not in chosen]
    return chosen


def select_dtypes(names):
    if not names:
        return list(DTYPES.values())
    out = []
    for n in names:
        key = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "half": "fp16"}.get(n, n)
        if key not in DTYPES:
            raise ValueError(f"unknown dtype {n!r}; choose from {', '.join(DTYPES)}")
        out.append(DTYPES[key])
    return out


def shape_for(numel):
    """A (batch, features) shape with ``numel`` elements: batch 16 (fewer when tiny)."""
    batch = 16 if numel >= 1 << 12 else max(1, min(4, numel))
    while numel % batch:
        batch -= 1
    return (batch, numel // batch)


def shape_str(shape):
    return "x".join(str(s) for s in shape)


# ---------------------------------------------------------------------------
# environment
# ---------------------------------------------------------------------------
def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def write_report(report, env, format_markdown, out=None, note=None):
    """Finish ``env`` (load at the end, most foreign CPU use of any result), render the report with
    ``format_markdown`` (``note`` under its title) and, with ``out``, write ``out``.json/.md."""
    import json

    if hasattr(os, "getloadavg"):
        env["loadavg_1m_end"] = round(os.getloadavg()[0], 2)
    env["foreign_cpu_cores_max"] = max([r["foreign_cpu_cores"] or 0.0 for r in report["results"]] or [0.0])
    md = format_markdown(report)
    if note:
        title, body = md.split("\n", 1)
        md = f"{title}\n\n{note}\n{body}"
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)) or ".", exist_ok=True)
        with open(out + ".json", "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
        with open(out + ".md", "w") as f:
            f.write(md)
    return md


# Pieces of the benchmark scripts' markdown reports (benchmarks/bench_*.py format_markdown).
def report_date_line(env):
    return f"- date: {env['date']}; git commit: {env.get('git_commit', 'unknown')}"


def report_versions_line(env):
    """torch / triton / pygen / python versions and the thread count."""
    v, dev = env["versions"], env["device"]
    return (f"- torch {v['torch']}, triton {v['triton']}, pygen {v['pygen']}, python {v['python']}; "
            f"torch threads {dev['torch_threads']} of {dev['cpu_count']} CPUs")


def report_cpu_line(env):
    dev = env["device"]
    return f"- CPU: {dev['cpu_model']}, {dev['cpu_count']} CPUs; torch threads {dev['torch_threads']}"


def report_load_line(env, unit="case"):
    """Load average at start and end, and the worst other-process CPU use during one ``unit``."""
    return (f"- load average (1 min) at start {env.get('loadavg_1m')}, at end {env.get('loadavg_1m_end')}; "
            f"worst other-process CPU use during a {unit}: {env.get('foreign_cpu_cores_max')} cores")


def report_skipped_lines(skipped):
    """The report's closing ``Skipped: ...`` line (after a blank one) for reasons ``skipped``; [] when none."""
    return ["", "Skipped: " + "; ".join(skipped)] if skipped else []


def row_skips(rows):
    """The distinct ``impl: reason`` entries of the result rows' ``skipped`` dicts, sorted."""
    return sorted({f"{k}: {v}" for r in rows for k, v in r["skipped"].items()})


def add_report_options(parser):
    """The command-line options every benchmark script has: --threads, --out, --note."""
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--out", default=None, help="output path without extension (.json and .md)")
    parser.add_argument("--note", default=None, help="a line added to the markdown")


def benchmark_marks(device, group, skip=None, marks=()):
    """pytest marks of one pytest-benchmark case: ``marks``, then a skip with reason ``skip`` (if
    given), on CUDA the ``cuda`` mark, and the benchmark mark (``group``, GC off, on CUDA the
    synchronising timer)."""
    import pytest

    kw = {"group": group, "disable_gc": True}
    marks = list(marks)
    if skip:
        marks.append(pytest.mark.skip(reason=skip))
    if device.type == "cuda":
        kw["timer"] = cuda_sync_timer
        marks.append(pytest.mark.cuda)
    marks.append(pytest.mark.benchmark(**kw))
    return marks


def default_device(name=None):
    """``name`` as a torch.device, or cuda when available, else cpu."""
    return torch.device(name if name is not None else ("cuda" if torch.cuda.is_available() else "cpu"))


def cuda_sync_timer():
    """A pytest-benchmark timer that waits for the GPU before reading the clock."""
    torch.cuda.synchronize()
    return time.perf_counter()


def device_name(device):
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model()


def versions():
    import sys

    out = {"python": sys.version.split()[0], "torch": torch.__version__}
    try:
        import triton

        out["triton"] = triton.__version__
    except Exception as exc:  # not installed or broken
        out["triton"] = f"unavailable ({type(exc).__name__})"
    try:
        import pygen

        out["pygen"] = pygen.__version__
    except Exception as exc:
        out["pygen"] = f"unavailable ({exc})"
    if torch.version.cuda:
        out["cuda"] = torch.version.cuda
    return out


def _git_commit():
    """``git describe``-style commit of the pygen source checkout that is imported, if any."""
    import subprocess

    import pygen

    root = os.path.dirname(os.path.dirname(os.path.abspath(pygen.__file__)))
    if not os.path.exists(os.path.join(root, ".git")):
        return None
    try:
        out = subprocess.run(["git", "-C", root, "describe", "--always", "--dirty"], capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def environment(device):
    """Device, versions, date and CPU count, for the JSON and markdown reports."""
    import pygen

    device = torch.device(device)
    env = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": {
            "type": device.type,
            "name": device_name(device),
            "cpu_model": cpu_model(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
        },
        "platform": platform.platform(),
        "versions": versions(),
        "backends": pygen.backends(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
    }
    commit = _git_commit()
    if commit:
        env["git_commit"] = commit
    if hasattr(os, "getloadavg"):  # other work on the machine skews CPU timings: record it
        env["loadavg_1m"] = round(os.getloadavg()[0], 2)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["device"]["memory_gib"] = round(props.total_memory / 2**30, 1)
        env["device"]["capability"] = f"{props.major}.{props.minor}"
    return env


class ForeignLoad:
    """CPU time that *other* processes used while a run was going on, in cores (Linux only).

    Busy jiffies of the whole machine (/proc/stat) minus this process's CPU time
    (os.times), over the wall time. CPU timings on a shared machine are only
    meaningful when this is near 0.
    """

    def __init__(self):
        self.start = self._sample()

    @staticmethod
    def _sample():
        try:
            with open("/proc/stat") as f:
                fields = [int(v) for v in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        busy = (sum(fields[:8]) - fields[3] - fields[4]) / ticks  # minus idle, iowait
        t = os.times()
        return busy, t.user + t.system, time.perf_counter()

    def cores(self):
        end = self._sample()
        if self.start is None or end is None:
            return None
        busy, own, wall = (e - s for e, s in zip(end, self.start))
        return round(max(0.0, busy - own) / max(wall, 1e-9), 2)


def pygen_backends_for(device, include_reference=True):
    """(backends to time, {backend: reason skipped}) for tensors on ``device``."""
    import pygen

    device = torch.device(device)
    status = pygen.backends()
    run, skipped = [], {}
    for name in PYGEN_BACKENDS:
        if name == "torch" and not include_reference and run:
            skipped[name] = "reference not timed in quick runs (add it with --backends torch)"
            continue
        if name == "cuda" and device.type != "cuda":
            continue  # a CUDA backend simply does not apply to CPU tensors
        if name == "cpu" and device.type != "cpu":
            continue
        if name == "triton" and device.type == "cpu":
            skipped[name] = "triton on CPU runs only under the interpreter; not a performance path"
            continue
        if status.get(name) != "available":
            skipped[name] = status.get(name, "unknown backend")
            continue
        run.append(name)
    return run, skipped


# ---------------------------------------------------------------------------
# cases
# ---------------------------------------------------------------------------
@dataclasses.dataclass
class Impl:
    backend: str  # "eager" or a pygen backend
    fn: object  # zero-argument callable
    device_type: str = "cpu"

    def context(self):
        """Where ``fn`` runs on ``backend``: nothing to do for eager torch, nor for the device's
        default backend (so the default per-call dispatch path is what gets timed)."""
        if self.backend == "eager":
            return contextlib.nullcontext()
        import pygen
        from pygen import _backend

        if _backend.requested() is None and _backend.default_backend(self.device_type) == self.backend:
            return contextlib.nullcontext()
        return pygen.use_backend(self.backend)


@dataclasses.dataclass
class Case:
    op: str
    shape: tuple
    dtype: torch.dtype
    device: torch.device
    impls: list  # [Impl], eager first
    skipped: dict  # backend -> reason

    @property
    def numel(self):
        return math.prod(self.shape)

    @property
    def bytes(self):
        return _TRAFFIC[self.op] * self.numel * torch.empty((), dtype=self.dtype).element_size()

    def impl(self, backend):
        """The ``Impl`` for ``backend``, or None (see ``skipped``)."""
        return next((i for i in self.impls if i.backend == backend), None)

    @property
    def key(self):
        return (self.op, shape_str(self.shape), DTYPE_NAMES.get(self.dtype, str(self.dtype)))


def not_implemented_reason(op):
    """None if ``op``'s pygen API exists on this build, else why it is skipped."""
    api = OPS[op][0]
    if api is None:
        return None
    import pygen

    if not callable(getattr(pygen, api, None)):
        return f"pygen.{api} is not implemented on this build"
    if op.startswith("ddim_step") and not callable(getattr(pygen, "step_coefficients", None)):
        return "pygen.step_coefficients is not implemented on this build"
    return None


def _alphas_cumprod(device):
    """Linear betas 1e-4..0.02 over 1000 steps (DDPM), cumulative product, fp32."""
    betas = torch.linspace(1e-4, 0.02, NUM_TRAIN_TIMESTEPS, dtype=torch.float64)
    return torch.cumprod(1.0 - betas, 0).to(device=device, dtype=torch.float32)


def _inputs(shape, dtype, device, n, gen):
    return [torch.randn(shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype) for _ in range(n)]


def _bview(v, ndim):
    return v.view((-1,) + (1,) * (ndim - 1))


def _build_fns(op, shape, dtype, device):
    """(eager_fn, pygen_fn) for ``op``; pygen_fn is None for baselines."""
    import pygen

    gen_cpu = torch.Generator().manual_seed(0)
    g = torch.Generator(device=device).manual_seed(SEED)  # eager noise
    batch, ndim = shape[0], len(shape)

    if op == "copy":
        x, y = _inputs(shape, dtype, device, 2, gen_cpu)
        return (lambda: x.copy_(y)), None

    if op == "randn":
        return (lambda: torch.randn(shape, generator=g, device=device, dtype=dtype),
                lambda: pygen.randn(shape, SEED, 0, device=device, dtype=dtype))

    if op.startswith("q_sample"):
        (x0,) = _inputs(shape, dtype, device, 1, gen_cpu)
        table = _alphas_cumprod(device)
        t = torch.randint(0, NUM_TRAIN_TIMESTEPS, (batch,), generator=gen_cpu).to(device)
        table_s = table.to(dtype)  # diffusers' add_noise casts the table to the sample dtype

        def eager_math(noise):
            ab = _bview(table_s[t], ndim)
            return ab.sqrt() * x0 + (1 - ab).sqrt() * noise

        if op == "q_sample":
            (noise,) = _inputs(shape, dtype, device, 1, gen_cpu)
            return (lambda: eager_math(noise)), (lambda: pygen.q_sample(x0, t, table, noise=noise))

        def eager_rng():
            noise = torch.randn(shape, generator=g, device=device, dtype=dtype)
            return eager_math(noise), noise

        return eager_rng, (lambda: pygen.q_sample(x0, t, table, seed=SEED, stream=0))

    if op.startswith("reparameterize"):
        mu, logvar = _inputs(shape, dtype, device, 2, gen_cpu)
        logvar.mul_(0.5)
        if op == "reparameterize":
            (noise,) = _inputs(shape, dtype, device, 1, gen_cpu)
            return (lambda: mu + torch.exp(0.5 * logvar) * noise,
                    lambda: pygen.reparameterize(mu, logvar, noise=noise))

        def eager_rng():
            noise = torch.randn(shape, generator=g, device=device, dtype=dtype)
            return mu + torch.exp(0.5 * logvar) * noise, noise

        return eager_rng, (lambda: pygen.reparameterize(mu, logvar, SEED, 0, return_noise=True))

    if op.startswith("langevin_step"):
        x, score = _inputs(shape, dtype, device, 2, gen_cpu)
        dt = 1e-3
        half_dt, sqrt_dt = 0.5 * dt, math.sqrt(dt)
        if op == "langevin_step":
            (noise,) = _inputs(shape, dtype, device, 1, gen_cpu)
            return (lambda: x + half_dt * score + sqrt_dt * noise,
                    lambda: pygen.langevin_step(x, score, dt, noise=noise))

        def eager_rng():
            noise = torch.randn(shape, generator=g, device=device, dtype=dtype)
            return x + half_dt * score + sqrt_dt * noise

        return eager_rng, (lambda: pygen.langevin_step(x, score, dt, SEED, 0))

    if op.startswith("ddim_step"):
        return _build_ddim(op, shape, dtype, device, gen_cpu, g)

    raise ValueError(f"unknown op {op!r}")


def _build_ddim(op, shape, dtype, device, gen_cpu, g):
    import inspect

    import pygen

    eta = 1.0 if op.endswith("+rng") else 0.0
    x, eps = _inputs(shape, dtype, device, 2, gen_cpu)
    ac = _alphas_cumprod(device)
    step = NUM_TRAIN_TIMESTEPS // DDIM_STEPS
    timesteps = torch.arange(NUM_TRAIN_TIMESTEPS - step, -1, -step, device=device)  # 980 .. 0
    # alphas_cumprod at the sampler's timesteps (descending t), then 1.0 after the last step:
    # the N+1 levels of pygen.step_coefficients(kind="ddim"), and the eager table.
    table = torch.cat([ac[timesteps], torch.ones(1, device=device)])
    # Eager: a_t / a_prev gathered from the device table at a device step index (0-dim, so
    # the gathered scalars do not promote fp16/bf16 samples to fp32).
    idx = torch.tensor(DDIM_STEPS // 2, device=device)
    idx_next = idx + 1

    def eager():
        a_t, a_prev = table[idx], table[idx_next]
        pred_x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        if eta == 0.0:
            return a_prev.sqrt() * pred_x0 + (1 - a_prev).sqrt() * eps
        sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()
        noise = torch.randn(shape, generator=g, device=device, dtype=dtype)
        return a_prev.sqrt() * pred_x0 + (1 - a_prev - sigma * sigma).sqrt() * eps + sigma * noise

    if not callable(getattr(pygen, "sampler_step", None)) or not callable(getattr(pygen, "step_coefficients", None)):
        return eager, None  # reported as not implemented by the caller
    coeffs = pygen.step_coefficients(table, "ddim", prediction="eps", eta=eta)
    step_index = torch.tensor([DDIM_STEPS // 2], dtype=torch.int64, device=device)
    kwargs = {}
    try:
        params = inspect.signature(pygen.sampler_step).parameters
    except (TypeError, ValueError):
        params = {}
    if "out" in params:
        out = torch.empty_like(x)  # the allocation-free hot path; x stays unchanged between calls
        kwargs["out"] = out
    if eta:
        kwargs.update(seed=SEED, stream=0)

    def pg():
        return pygen.sampler_step(x, eps, coeffs, step_index, **kwargs)

    return eager, pg


def build_case(op, numel, dtype, device, backends=None, include_reference=True):
    """A ``Case`` with inputs allocated; ``backends`` restricts the pygen backends."""
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}")
    device = torch.device(device)
    shape = shape_for(numel)
    run, skipped = pygen_backends_for(device, include_reference)
    if backends is not None:
        for b in list(run):
            if b not in backends:
                run.remove(b)
        skipped = {b: r for b, r in skipped.items() if b in backends}
    eager, pg = _build_fns(op, shape, dtype, device)
    impls = [Impl("eager", eager)]
    reason = not_implemented_reason(op)
    if OPS[op][0] is not None:
        if reason is not None or pg is None:
            for b in run:
                skipped[b] = reason or "not implemented on this build"
        else:
            impls += [Impl(b, pg, device.type) for b in run]
    return Case(op, shape, dtype, device, impls, skipped)


# ---------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------
@dataclasses.dataclass
class Timing:
    median_s: float  # device time per call (median over repeats)
    min_s: float
    host_s: float  # host (Python-to-launch) time per call, median; == median_s on CPU
    iterations: int  # calls per timed batch
    repeats: int


def _time_batch(fn, n, cuda):
    """(device seconds, host seconds) for ``n`` calls of ``fn``."""
    if cuda:
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        h0 = time.perf_counter()
        for _ in range(n):
            fn()
        h1 = time.perf_counter()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) * 1e-3, h1 - h0
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    dt = time.perf_counter() - t0
    return dt, dt


def calibrate(impl, device, *, warmup=2, min_time=0.02, max_iterations=1 << 20):
    """Warm ``impl`` up; (calls per batch so a batch lasts >= ``min_time``, seconds of such a batch)."""
    cuda = torch.device(device).type == "cuda"
    with impl.context():
        for i in range(warmup):
            t, _ = _time_batch(impl.fn, 1, cuda)
            # Slow (the reference on CPU): a second slow call ends warm-up and calibration. Not the
            # first call, which may include one-time costs such as compiling a Triton kernel.
            if i >= 1 and t > max(0.25, 10 * min_time):
                return 1, t
        if cuda:
            torch.cuda.synchronize()
        n = 1
        while True:
            t, _ = _time_batch(impl.fn, n, cuda)
            if t >= min_time or n >= max_iterations:
                break
            grow = min_time / max(t, 1e-9) * 1.2
            n = min(max_iterations, max(n * 2, int(n * min(grow, 100.0))))
    return n, max(t, 1e-9)


def measure(impls, device, *, warmup=2, repeats=7, min_time=0.02, max_time=2.0, min_repeats=3):
    """Median time per call of each ``Impl`` in ``impls`` (interleaved); {backend: Timing}.

    ``min_time``: the least duration of one timed batch (calls are batched to
    reach it); ``max_time``: soft budget per implementation, which lowers the
    repeats (never below ``min_repeats``) for slow implementations.
    """
    cuda = torch.device(device).type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    plan = {}
    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        for impl in impls:
            n, per_batch = calibrate(impl, device, warmup=warmup, min_time=min_time)
            reps = max(min_repeats, min(repeats, int(max_time / per_batch)))
            plan[impl.backend] = (n, reps)
        samples = {impl.backend: [] for impl in impls}
        host = {impl.backend: [] for impl in impls}
        for r in range(max(reps for _, reps in plan.values())):
            for impl in impls:
                n, reps = plan[impl.backend]
                if r >= reps:
                    continue
                with impl.context():
                    sync()
                    t, h = _time_batch(impl.fn, n, cuda)
                samples[impl.backend].append(t / n)
                host[impl.backend].append(h / n)
    finally:
        if gc_was_enabled:
            gc.enable()
    out = {}
    for impl in impls:
        s = sorted(samples[impl.backend])
        out[impl.backend] = Timing(_median(s), s[0], _median(sorted(host[impl.backend])), *plan[impl.backend])
    return out


def _median(sorted_values):
    n = len(sorted_values)
    mid = n // 2
    return sorted_values[mid] if n % 2 else 0.5 * (sorted_values[mid - 1] + sorted_values[mid])


def probe(case):
    """Call each pygen implementation once; move failing ones to ``case.skipped``."""
    kept = []
    for impl in case.impls:
        if impl.backend == "eager":
            kept.append(impl)
            continue
        try:
            with impl.context():
                impl.fn()
        except Exception as exc:  # reported per backend, never fatal for the run
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            what = "not implemented on this build" if isinstance(exc, (NotImplementedError, AttributeError)) \
                else "failed on this build"
            case.skipped[impl.backend] = f"{what} ({type(exc).__name__}: {msg[:160]})"
            continue
        kept.append(impl)
    case.impls = kept
    return case


def run_case(case, **timing):
    """Time ``case``; a list of result rows (dicts), eager first."""
    probe(case)
    timings = measure(case.impls, case.device, **timing)
    eager = timings["eager"].median_s
    op, shape, dtype = case.key
    rows = []
    for impl in case.impls:
        t = timings[impl.backend]
        row = {
            "op": op,
            "shape": shape,
            "numel": case.numel,
            "dtype": dtype,
            "backend": impl.backend,
            "time_us": t.median_s * 1e6,
            "time_us_min": t.min_s * 1e6,
            "gbps": case.bytes / t.median_s / 1e9,
            "speedup_vs_eager": eager / t.median_s,
            "bytes": case.bytes,
            "iterations": t.iterations,
            "repeats": t.repeats,
        }
        if case.device.type == "cuda":
            row["host_us"] = t.host_s * 1e6
        rows.append(row)
    return rows


def skipped_rows(case):
    op, shape, dtype = case.key
    return [{"op": op, "shape": shape, "dtype": dtype, "backend": b, "reason": r} for b, r in case.skipped.items()]


def add_copy_fraction(rows):
    """Give each row ``copy_fraction``: its GB/s over the copy baseline's (same numel, dtype)."""
    copy = {(r["numel"], r["dtype"]): r["gbps"] for r in rows if r["op"] == "copy"}
    for r in rows:
        base = copy.get((r["numel"], r["dtype"]))
        if base:
            r["copy_fraction"] = r["gbps"] / base
    return rows
