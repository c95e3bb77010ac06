"""``pygen demo``: sample a built-in 2-D Gaussian mixture with several samplers (issue 3, "Main job").

Plain Python driving the pygen samplers; no kernels of its own. For each sampler:

- run it on pygen's best backend for the device (``pygen._backend.resolve``: the
  compiled ``cpu``/``cuda`` kernels when built, else ``triton``/``torch``; an
  explicit ``PYGEN_BACKEND`` is honoured) and the same sampler under
  ``pygen.use_backend("torch")`` (the pure-torch reference loop, same math);
  one warm-up run each, then ``repeats`` timed runs of each, interleaved, median
  wall time (``time.perf_counter``; ``torch.cuda.synchronize`` around runs on
  CUDA); speedup = torch-loop time / best-backend time;
- count the model evaluations (NFE: ``GaussianMixture.model_fn`` callables
  count their calls; for MCMC one energy-and-gradient evaluation is one NFE);
- measure the distance of the samples to the target: the sliced Wasserstein
  distance to ``n`` exact samples (``pygen.metrics.sliced_wasserstein``) and
  the mode-weight error (``pygen.metrics.mode_weight_error``), next to their
  thresholds calibrated from exact-vs-exact samples of the same size
  (``pygen.metrics.calibrate``, 99% quantile): a sampler whose distances are
  both below them cannot be told apart from exact sampling at this ``n``.

It prints a fixed-width table, writes a PNG (``pygen.plot.density_figure``: the
exact samples and each sampler's samples over the target density contours)
and optionally JSON.

Samplers are a registry (``samplers()``) of runners
``run(mixture, n, steps, seed, device) -> (samples, nfe, steps_used)``; the
k-diffusion-compatible ones are listed only when ``pygen.kdiffusion`` imports.
"""
import dataclasses
import importlib
import json
import math
import os
import statistics
import sys
import time

import torch

__all__ = ["Sampler", "samplers", "default_samplers", "TARGETS", "run_demo", "format_table", "main_args"]

TARGETS = ("clot", "ring")

#: k-diffusion-compatible samplers from pygen.kdiffusion: name -> (default steps, quick steps)
KDIFFUSION_SAMPLERS = {
    "euler": (40, 15),
    "euler_ancestral": (100, 40),  # first-order stochastic: needs many steps (as in k-diffusion)
    "heun": (15, 8),
    "dpm_2": (15, 8),
    "dpm_2_ancestral": (20, 10),
    "lms": (25, 12),
    "dpmpp_2s_ancestral": (20, 10),
    "dpmpp_sde": (15, 8),
    "dpmpp_2m": (20, 10),
    "dpmpp_2m_sde": (30, 15),
    "dpmpp_3m_sde": (30, 15),
}
#: Karras sigmas for the k-diffusion samplers (sigma_max far above the mixtures' spread)
KD_SIGMA_MIN, KD_SIGMA_MAX = 0.002, 80.0

#: default sampler list, in table order (those not available are left out) ...
PREFERRED = ("dpmpp_2m", "heun", "dpmpp_2m_sde", "pc", "ode_heun", "hmc")
#: ... and the list used when pygen.kdiffusion is not importable
FALLBACK = ("pc", "ode_heun", "em", "ald", "hmc")

DEFAULT_N, QUICK_N = 4096, 1024
PLOT_POINTS = 2000  # samples drawn per panel
CALIBRATION_TRIALS, QUICK_CALIBRATION_TRIALS = 32, 16
DEFAULT_REPEATS, QUICK_REPEATS = 3, 1
DEFAULT_CPU_THREADS = 1


@dataclasses.dataclass(frozen=True)
class Sampler:
    """One demo sampler: ``run(mixture, n, steps, seed, device) -> (samples (n, 2), nfe, steps_used)``."""

    name: str
    description: str
    default_steps: int
    quick_steps: int
    run: object


# ---------------------------------------------------------------------------
# runners
# ---------------------------------------------------------------------------
VP_BETA_MIN, VP_BETA_MAX = 0.1, 20.0
VE_SIGMA_MIN, VE_SIGMA_MAX = 0.05, 20.0


def _vp(steps):
    from pygen import schedules

    # score_sde discretises the SDE with N = the number of steps; N >= beta_max keeps every
    # discrete beta <= 1 (the corrector's alpha = 1 - beta must not go negative).
    return schedules.VPSDE(VP_BETA_MIN, VP_BETA_MAX, max(steps, int(VP_BETA_MAX)))


def _run_pc(predictor, corrector):
    def run(mixture, n, steps, seed, device):
        from pygen import sde as S

        sde = _vp(steps)
        f = mixture.model_fn("score", sde=sde)
        x = S.pc_sample(f, sde, (n, 2), predictor=predictor, corrector=corrector, n_steps=steps, snr=0.16,
                        seed=seed, device=device)
        return x, f.nfe, steps
    return run


def _run_ode(method):
    def run(mixture, n, steps, seed, device):
        from pygen import sde as S

        sde = _vp(steps)
        f = mixture.model_fn("score", sde=sde)
        x = S.ode_sample(f, sde, (n, 2), method=method, n_steps=steps, seed=seed, device=device)
        return x, f.nfe, steps
    return run


ALD_LEVELS = 10


def _run_ald(mixture, n, steps, seed, device):
    """NCSN annealed Langevin: ``min(10, steps)`` noise levels, steps // levels updates each."""
    from pygen import schedules
    from pygen import sde as S

    levels = min(ALD_LEVELS, steps)
    each = steps // levels
    sde = schedules.VESDE(VE_SIGMA_MIN, VE_SIGMA_MAX, steps)
    f = mixture.model_fn("score", sde=sde)
    x = S.annealed_langevin(f, sde, (n, 2), n_levels=levels, n_steps_each=each, step_lr=2e-3, seed=seed,
                            device=device, denoise=True)
    return x, f.nfe, levels * each


MCMC_INIT_STD = 2.0  # chains start from N(0, 2^2 I), about the spread of the targets


def _mcmc_init(n, seed, device):
    import pygen

    return pygen.randn((n, 2), seed, 0, device=device) * MCMC_INIT_STD


def _run_ula(mixture, n, steps, seed, device):
    from pygen import mcmc

    f = mixture.model_fn("grad_log_prob")
    x = mcmc.ula(_mcmc_init(n, seed, device), f, step_size=0.02, n_steps=steps, seed=seed, stream=1)
    return x, f.nfe, steps


def _run_mala(mixture, n, steps, seed, device):
    from pygen import mcmc

    f = mixture.model_fn("energy")
    x, _ = mcmc.mala(_mcmc_init(n, seed, device), f, step_size=0.05, n_steps=steps, seed=seed, stream=1)
    return x, f.nfe, steps


HMC_LEAPFROG = 5


def _run_hmc(mixture, n, steps, seed, device):
    from pygen import mcmc

    f = mixture.model_fn("energy")
    x, _ = mcmc.hmc(_mcmc_init(n, seed, device), f, step_size=0.2, n_leapfrog=HMC_LEAPFROG, n_steps=steps,
                    seed=seed, stream=1)
    return x, f.nfe, steps


PT_REPLICAS = 5


def _run_pt(mixture, n, steps, seed, device):
    """Replica exchange (MALA moves) over 5 temperatures β = (i/4)², replica β tempering exp(-E)
    towards N(0, I), with MALA steps growing towards β = 0 (the hot replicas cross between modes)."""
    from pygen import mcmc

    f = mixture.model_fn("energy")

    def energy(x):  # replica_exchange targets exp(-β·E)·N(0, I): remove the N(0, I) factor at β = 1
        return f(x) - 0.5 * (x * x).sum(-1)

    betas = torch.linspace(0, 1, PT_REPLICAS) ** 2
    x, _ = mcmc.replica_exchange(_mcmc_init(n, seed, device) / MCMC_INIT_STD, energy, betas,
                                 step_size=0.06 + 0.6 * (1 - betas), n_steps=steps, seed=seed, stream=1, move="mala")
    return x, f.nfe, steps


def _run_kdiffusion(kd, fn_name):
    def run(mixture, n, steps, seed, device):
        import pygen

        fn = getattr(kd, fn_name)
        sigmas = kd.get_sigmas_karras(steps, KD_SIGMA_MIN, KD_SIGMA_MAX, device=device)
        x = pygen.randn((n, 2), seed, 0, device=device) * KD_SIGMA_MAX
        model = mixture.model_fn("denoiser")
        # ancestral/SDE samplers draw torch noise: seed it, without touching the caller's RNG state
        devices = [torch.device(device)] if torch.device(device).type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            out = fn(model, x, sigmas, disable=True)
        return out, model.nfe, steps
    return run


_BUILTIN = (
    Sampler("pc", "score-SDE PC: reverse-diffusion predictor + Langevin corrector (VP SDE, snr 0.16)", 100, 30,
            _run_pc("reverse_diffusion", "langevin")),
    Sampler("em", "score-SDE Euler-Maruyama predictor, no corrector (VP SDE)", 200, 60,
            _run_pc("euler_maruyama", "none")),
    Sampler("ode_heun", "probability-flow ODE, Heun (VP SDE)", 30, 12, _run_ode("heun")),
    Sampler("ode_euler", "probability-flow ODE, Euler (VP SDE)", 100, 30, _run_ode("euler")),
    Sampler("ald", "NCSN annealed Langevin, 10 levels (VE SDE, Tweedie denoise)", 200, 60, _run_ald),
    Sampler("ula", "unadjusted Langevin (MCMC, dt 0.02, chains from N(0, 4I))", 200, 60, _run_ula),
    Sampler("mala", "Metropolis-adjusted Langevin (MCMC, dt 0.05)", 200, 60, _run_mala),
    Sampler("hmc", f"Hamiltonian Monte Carlo (MCMC, {HMC_LEAPFROG} leapfrog steps of 0.2)", 50, 20, _run_hmc),
    Sampler("pt", f"replica exchange, {PT_REPLICAS} temperatures, MALA moves (MCMC)", 300, 60, _run_pt),
)


def _kdiffusion():
    """(module, None) when pygen.kdiffusion imports, else (None, reason)."""
    try:
        return importlib.import_module("pygen.kdiffusion"), None
    except ImportError as exc:
        return None, f"pygen.kdiffusion is not importable ({exc})"


def samplers():
    """{name: Sampler} of the samplers available now (k-diffusion ones only with pygen.kdiffusion)."""
    out = {}
    kd, _ = _kdiffusion()
    if kd is not None and hasattr(kd, "get_sigmas_karras"):
        for name, (steps, quick) in KDIFFUSION_SAMPLERS.items():
            if hasattr(kd, "sample_" + name):
                out[name] = Sampler(name, f"pygen.kdiffusion.sample_{name} (Karras sigmas "
                                          f"{KD_SIGMA_MIN:g}..{KD_SIGMA_MAX:g})", steps, quick,
                                    _run_kdiffusion(kd, "sample_" + name))
    for s in _BUILTIN:
        out[s.name] = s
    return out


def default_samplers(available=None):
    available = samplers() if available is None else available
    if all(name in available for name in PREFERRED):
        return list(PREFERRED)
    return [name for name in FALLBACK if name in available]


# ---------------------------------------------------------------------------
# argument checks
# ---------------------------------------------------------------------------
def _check_count(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _resolve_samplers(names, available):
    if names is None:
        return default_samplers(available)
    if isinstance(names, str):
        names = [s for s in (p.strip() for p in names.split(",")) if s]
    names = list(names)
    if not names:
        raise ValueError("samplers must name at least one sampler; valid: " + ", ".join(available))
    unknown = [s for s in names if s not in available]
    if unknown:
        msg = f"unknown sampler(s) {', '.join(repr(s) for s in unknown)}; valid: {', '.join(available)}"
        kd_missing = [s for s in unknown if s in KDIFFUSION_SAMPLERS]
        if kd_missing:
            msg += f" ({', '.join(kd_missing)}: {_kdiffusion()[1] or 'not in pygen.kdiffusion'})"
        raise ValueError(msg)
    if len(set(names)) != len(names):
        raise ValueError(f"samplers must not repeat a name, got {names}")
    return names


def _resolve_device(device):
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but torch.cuda.is_available() is False")
    return dev


def _target(name, device):
    from pygen import models

    if name == "clot":
        return models.clot(device=device)
    if name == "ring":
        return models.ring(device=device)
    raise ValueError(f"target must be one of {', '.join(TARGETS)}, got {name!r}")


# ---------------------------------------------------------------------------
# timing and measurement
# ---------------------------------------------------------------------------
def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device):
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - t0, out


def _measure(sampler, mixture, n, steps, seed, device, repeats, best, progress):
    """Median times on the best backend and the torch loop, and the best backend's (samples, nfe, steps)."""
    import pygen

    def on(backend):
        def go():
            with pygen.use_backend(backend):
                return sampler.run(mixture, n, steps, seed, device)
        return go

    impls = {best: on(best)}
    if best != "torch":
        impls["torch"] = on("torch")
    times = {k: [] for k in impls}
    results = {}
    for k, fn in impls.items():  # warm-up (kernel compilation, caches)
        if progress:
            progress(f"{sampler.name}: warm-up on {k}")
        fn()
    for r in range(repeats):
        for k, fn in impls.items():
            if progress:
                progress(f"{sampler.name}: run {r + 1}/{repeats} on {k}")
            dt, results[k] = _timed(fn, device)
            times[k].append(dt)
    med = {k: statistics.median(v) for k, v in times.items()}
    med.setdefault("torch", med[best])
    return med, results[best]


def _distances(samples, exact, mixture, seed):
    from pygen import metrics

    samples = samples.detach()
    finite = torch.isfinite(samples).all(dim=1)
    non_finite = int((~finite).sum())
    g = torch.Generator().manual_seed(seed + 3)
    sw = metrics.sliced_wasserstein(samples, exact, generator=g)
    mwe = metrics.mode_weight_error(samples, mixture)
    return sw, mwe, non_finite


# ---------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------
COLUMNS = ("sampler", "steps", "NFE", "time (ms)", "torch loop (ms)", "speedup", "SW dist", "SW thr",
           "mode err", "mode thr", "verdict")


def _num(v, fmt):
    return "nan" if v is None or not math.isfinite(v) else format(v, fmt)


def format_table(rows, thresholds):
    """The fixed-width table of ``rows`` (dicts from ``run_demo``), one line per sampler."""
    body = []
    for r in rows:
        body.append([r["sampler"], str(r["steps"]), str(r["nfe"]), _num(r["time_ms"], ",.1f"),
                     _num(r["torch_ms"], ",.1f"), _num(r["speedup"], ".2f") + "x", _num(r["sw"], ".4f"),
                     _num(thresholds["sw"], ".4f"), _num(r["mode_err"], ".4f"), _num(thresholds["mode_err"], ".4f"),
                     r["verdict"]])
    widths = [max(len(x) for x in col) for col in zip(COLUMNS, *body)]
    left = {0, len(COLUMNS) - 1}

    def fmt(line):
        return "  ".join(x.ljust(w) if i in left else x.rjust(w)
                         for i, (x, w) in enumerate(zip(line, widths))).rstrip()

    return "\n".join([fmt(COLUMNS), "  ".join("-" * w for w in widths)] + [fmt(b) for b in body])


def _verdict(sw, mwe, non_finite, thresholds):
    if non_finite:
        return f"FAIL ({non_finite} non-finite)"
    if not (math.isfinite(sw) and math.isfinite(mwe)):
        return "FAIL (nan)"
    far = []
    if sw > thresholds["sw"]:
        far.append("SW")
    if mwe > thresholds["mode_err"]:
        far.append("modes")
    return "ok" if not far else "off (" + ", ".join(far) + ")"


def _environment(device, best):
    import pygen
    from pygen import _extension

    return {
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else (
            _cpu_model() or "cpu"),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "backend": best,
        "extension": "loaded" if _extension.C is not None else str(_extension.LOAD_ERROR),
        "versions": {"pygen": pygen.__version__, "torch": torch.__version__,
                     "python": sys.version.split()[0]},
    }


def _cpu_model():
    try:
        from pygen import bench

        return bench.cpu_model()
    except Exception:  # noqa: BLE001 (best effort, for the header line only)
        return None


def run_demo(names=None, *, steps=None, n=None, device=None, out="pygen-demo.png", seed=0, target="clot",
             quick=False, repeats=None, json_path=None, file=None, progress=None, threads=None):
    """Run the demo; print the table to ``file`` (default stdout) and return the report dict.

    Args:
        names: sampler names (list or comma-separated string; default
            ``default_samplers()``).
        steps: steps for every sampler (default: each sampler's own; ``quick``
            its quick count). Must be >= 1.
        n: samples per sampler (default 4096; ``quick``: 1024); >= 2.
        device: "cpu" or "cuda" (default cuda when available).
        out: PNG path, or None for no PNG.
        seed: int >= 0: seeds the samplers, the exact samples and the calibration.
        target: "clot" (seed 000's 2-D clot) or "ring" (8 Gaussians on a circle).
        quick: smaller n, fewer steps, one timed repeat, fewer calibration trials.
        repeats: timed runs per backend (median; default 3, quick 1).
        json_path: also write the report as JSON there.
        progress: callable(str) for progress messages (e.g. printing to stderr).
        threads: torch CPU threads for the run, restored afterwards. Default on
            CPU: 1 (the demo's (n, 2) tensors are far too small to gain from
            more, and on a busy machine OpenMP regions over them cost far more
            than they save); on CUDA: torch's setting.

    Raises ValueError for unknown samplers or targets, steps < 1, n < 2, a bad
    device, before anything runs.
    """
    from pygen import _backend

    file = sys.stdout if file is None else file
    available = samplers()
    names = _resolve_samplers(names, available)
    if steps is not None:
        _check_count("steps", steps, 1)
    n = (QUICK_N if quick else DEFAULT_N) if n is None else _check_count("n", n, 2)
    seed = _check_count("seed", seed, 0)
    repeats = (QUICK_REPEATS if quick else DEFAULT_REPEATS) if repeats is None else _check_count("repeats", repeats, 1)
    if target not in TARGETS:
        raise ValueError(f"target must be one of {', '.join(TARGETS)}, got {target!r}")
    dev = _resolve_device(device)
    if threads is not None:
        _check_count("threads", threads, 1)
    best = _backend.resolve(dev)
    mixture = _target(target, dev)
    saved_threads = torch.get_num_threads()
    if threads is None and dev.type == "cpu":
        threads = DEFAULT_CPU_THREADS
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run(names, available, mixture, dev, best, n=n, steps=steps, seed=seed, target=target, quick=quick,
                    repeats=repeats, out=out, json_path=json_path, file=file, progress=progress)
    finally:
        torch.set_num_threads(saved_threads)


def _run(names, available, mixture, dev, best, *, n, steps, seed, target, quick, repeats, out, json_path, file,
         progress):
    from pygen import metrics, plot

    trials = QUICK_CALIBRATION_TRIALS if quick else CALIBRATION_TRIALS
    g = torch.Generator(device=dev).manual_seed(seed)
    exact = mixture.sample(n, g)
    gc = torch.Generator(device=dev).manual_seed(seed + 1)
    gsw = torch.Generator().manual_seed(seed + 2)
    thresholds = {
        "sw": metrics.calibrate(mixture, n, lambda a, b: metrics.sliced_wasserstein(a, b, generator=gsw),
                                trials=trials, quantile=0.99, generator=gc),
        "mode_err": metrics.calibrate(mixture, n, "mode_weight_error", trials=trials, quantile=0.99, generator=gc),
        "quantile": 0.99,
        "trials": trials,
    }

    env = _environment(dev, best)
    print(f"pygen demo: {n} samples of the 2-D '{target}' mixture ({mixture.num_components} modes) on "
          f"{env['device_name']} ({dev.type}); best backend '{best}' vs the pure-torch loop "
          f"(pygen.use_backend('torch')), torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread{'s' if torch.get_num_threads() != 1 else ''}",
          file=file, flush=True)
    if best == "torch":
        why = env["extension"] if env["extension"] != "loaded" else "selected"
        print(f"note: the best backend here is the torch reference itself ({why}): speedups are 1.00x",
              file=file, flush=True)

    rows = []
    panels = [(f"exact ({target})", exact[:PLOT_POINTS])]
    for name in names:
        s = available[name]
        st = steps if steps is not None else (s.quick_steps if quick else s.default_steps)
        med, (x, nfe, used) = _measure(s, mixture, n, st, seed, dev, repeats, best, progress)
        sw, mwe, bad = _distances(x, exact, mixture, seed)
        row = {
            "sampler": name, "description": s.description, "steps": used, "nfe": int(nfe),
            "backend": best, "time_ms": 1e3 * med[best], "torch_ms": 1e3 * med["torch"],
            "speedup": med["torch"] / med[best], "sw": sw, "mode_err": mwe, "non_finite": bad,
        }
        row["verdict"] = _verdict(sw, mwe, bad, thresholds)
        rows.append(row)
        panels.append((f"{name} ({used} steps, {int(nfe)} NFE)", x[:PLOT_POINTS]))
    print(format_table(rows, thresholds), file=file)
    print(f"\ntime: median of {repeats} run(s) after one warm-up; speedup = torch loop / {best}. "
          f"SW dist: sliced Wasserstein to {n} exact samples; mode err: max |mode weight - target weight|; "
          f"thr: 99% quantile of the same distances between two exact samples ({trials} pairs); "
          f"verdict ok = both within their thresholds.", file=file)
    if any(r["sampler"] in ("hmc", "mala", "ula") and r["verdict"] != "ok" for r in rows):
        print("note: the MCMC samplers (hmc, mala, ula) move locally and rarely cross between modes in this "
              "many steps, so their mode weights stay close to those of their starting points (replica exchange, "
              "'pt', crosses modes through its hotter replicas, at 5x the chains and 300 steps).", file=file)
    for r in rows:
        if r["non_finite"]:
            print(f"warning: {r['sampler']} produced {r['non_finite']} non-finite samples", file=file)

    report = {"schema": "pygen-demo/1", "environment": env,
              "settings": {"target": target, "n": n, "seed": seed, "quick": bool(quick), "repeats": repeats,
                           "samplers": names, "steps": steps},
              "thresholds": thresholds, "rows": rows, "png": None}
    if out is not None:
        out = os.fspath(out)
        parent = os.path.dirname(os.path.abspath(out))
        os.makedirs(parent, exist_ok=True)
        skipped = plot.density_figure(mixture, panels, out, size=240, columns=4)
        report["png"] = os.path.abspath(out)
        report["png_skipped_non_finite"] = skipped
        print(f"\nPNG: {os.path.abspath(out)} (exact samples and each sampler's first {min(n, PLOT_POINTS)} "
              f"samples over the target density contours"
              + (f"; {skipped} non-finite samples not drawn" if skipped else "") + ")", file=file)
    if json_path is not None:
        json_path = os.fspath(json_path)
        os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
        with open(json_path, "w") as f:
            json.dump(report, f, indent=2, allow_nan=True)
            f.write("\n")
        print(f"JSON: {os.path.abspath(json_path)}", file=file)
    return report


def main_args(args, file=None):
    """Run the demo from parsed ``pygen demo`` arguments (pygen/cli.py)."""
    progress = None
    if not getattr(args, "no_progress", False):
        def progress(msg):
            print(msg, file=sys.stderr, flush=True)
    return run_demo(args.samplers, steps=args.steps, n=args.n, device=args.device,
                    out=None if args.no_png else args.out, seed=args.seed, target=args.target, quick=args.quick,
                    repeats=args.repeats, json_path=args.json, file=file, progress=progress,
                    threads=getattr(args, "threads", None))
