"""Score-SDE samplers (Song et al. 2021, score_sde): predictors, correctors, the PC loop and the
probability-flow ODE, on top of the fused ops.

Convention: ``score_fn(x, t)`` returns grad log p_t(x), with ``t`` a per-row tensor of shape
(B,) on x's device (e.g. ``pygen.models.GaussianMixture.model_fn("score", sde=sde)``);
``sde`` is a ``pygen.schedules`` ``VPSDE``, ``SubVPSDE`` or ``VESDE``. Step functions take the
loop time ``t`` as a Python float and return the new ``x``.

What is fused
-------------
Every predictor and ODE update is one ``pygen.sampler_step`` launch: its coefficient table
(x_next = a·x + b·score + s·z, plus one history slot for Heun) is built once per loop on the
CPU in float64 from the SDE's closed forms and moved to the device once, the step index lives
on the device (``advance=True``), and the noise z is drawn in the kernel
(``pygen.randn(x.shape, seed, stream + i)``). Annealed Langevin and the ALD corrector are
``sampler_step`` launches too (rows x + dt/2·score + sqrt(dt)·z, one per update). Each
SNR-corrector iteration is one fused ``langevin_snr_step`` op (pygen/ops/langevin.py): a device
reduction of the per-row norms of the score and of z = pygen.randn(x.shape, seed, stream) (z
regenerated in the kernels, never stored), the step size computed on the device into a (B,)
tensor from 4·alpha_i·snr² read from a device table at the corrector's step index, then the
update: no ``.item()`` and no host sync anywhere in the loops.

Predictors (time grid ``t_i``, i = 0..N-1; ``grid="score_sde"``: t = linspace(T, eps, N) and
dt = -1/N as in score_sde; ``grid="uniform"``: t_i from linspace(T, eps, N+1), dt = t_{i+1} - t_i)

- ``"euler_maruyama"``: x_mean = x + (f(t)·x - g(t)²·score)·dt, x = x_mean + g(t)·sqrt(-dt)·z.
  VP and VE use ``pygen.step_coefficients``' "euler_maruyama_vp"/"_ve" kinds, with levels
  (t_0, t_0 + dt_0, t_1, t_1 + dt_1, ...) so that row 2i is exactly score_sde's step i;
  sub-VP (no fused kind) takes the same formula from its f and g.
- ``"reverse_diffusion"``: (F, G) = sde.discretize(t); x_mean = x - F·x + G²·score, x = x_mean + G·z.
- ``"ancestral"``: VP: x_mean = (x + beta_i·score)/sqrt(1 - beta_i), x = x_mean + sqrt(beta_i)·z;
  VE: x_mean = x + (sigma_i² - sigma_{i-1}²)·score,
  x = x_mean + sqrt(sigma_{i-1}²·(sigma_i² - sigma_{i-1}²)/sigma_i²)·z (sigma_{-1} = 0);
  i = (t·(N - 1)/T).long() into the SDE's discrete tables (sub-VP: not defined, ValueError).
- ``"none"``: no predictor.

Correctors (alpha = 1 - beta_i for VP/sub-VP, 1 for VE; i as above)

- ``"langevin"``: for each of ``n_steps``: z ~ N(0, I); step = 2·alpha·(snr·|z|/|score|)²,
  x = x + step·score + sqrt(2·step)·z. ``norm="batch"`` (score_sde): |.| is the batch mean of
  the per-row norms; ``norm="row"``: each row's own norms.
- ``"ald"`` (score_sde's AnnealedLangevinDynamics): step = 2·alpha·(snr·std(t))², same update.
- ``"none"``.

``pc_sample`` runs, for i = 0..N-1: corrector then predictor at t_i; with ``denoise=True`` the
last predictor step returns x_mean (no noise), as score_sde does.

``annealed_langevin`` is NCSN's sampler (seed 001): for levels sigma_1 > ... > sigma_L,
step_i = step_lr·sigma_i²/sigma_L², and M steps x = x + step_i·score + sqrt(2·step_i)·z each.

``ode_sample``: the probability-flow ODE dx/dt = f(t)·x - g(t)²·score/2 from T to eps on
t = linspace(T, eps, N+1), by Euler or Heun (Heun: two fused launches per step, the first also
storing x + dt/2·drift_1 in a history slot; the second adds dt/2·drift_2 to it).

CUDA graphs: ``ode_sample``, ``annealed_langevin`` and ``pc_sample`` take ``cuda_graph=True``:
one loop step (pc: its corrector iterations and its predictor step; the others: one score call +
fused update) is captured once and replayed. Every per-step value (the time, the table row, the
SNR corrector's 4·alpha_i·snr², the noise stream) is read from step indices that live on the
device and are advanced by the fused launches themselves, so the eager loop and the replays run
the same launches.

Noise streams (with ``stream`` = s): the prior uses s, predictor step i uses s + 1 + i,
corrector iteration j of loop step i uses s + 1 + N + i·n_corrector_steps + j.
"""
import math
import numbers
import warnings

import torch

from pygen import _backend
from pygen import schedules as _schedules
from pygen.ops._common import check_int as _check_int
from pygen.ops._common import check_like, check_stream, split_seed
from pygen.ops.langevin import run_langevin_snr_step
from pygen.ops.random import randn
from pygen.ops.schedule import COL_A, COL_B, COL_CM, COL_HD, COL_HIST, COL_HX, COL_S, COL_SLOT, step_coefficients
from pygen.ops.step import sampler_step
from pygen.samplers.program import StepGraphs
from pygen.samplers.program import graph_device as _graph_device

__all__ = [
    "PREDICTORS",
    "CORRECTORS",
    "ODE_METHODS",
    "time_grid",
    "euler_maruyama_step",
    "reverse_diffusion_step",
    "ancestral_step",
    "langevin_corrector",
    "annealed_langevin_corrector",
    "ode_euler_step",
    "ode_heun_step",
    "pc_sample",
    "annealed_langevin",
    "ode_sample",
]

PREDICTORS = ("euler_maruyama", "reverse_diffusion", "ancestral", "none")
CORRECTORS = ("langevin", "ald", "none")
ODE_METHODS = ("euler", "heun")
GRIDS = ("score_sde", "uniform")
NORMS = ("batch", "row")

_F64 = torch.float64


# ---------------------------------------------------------------------------
# argument checks
# ---------------------------------------------------------------------------
def _check_sde(sde):
    if not isinstance(sde, (_schedules.VPSDE, _schedules.VESDE)):
        raise TypeError(f"sde must be a pygen.schedules VPSDE, SubVPSDE or VESDE, got {type(sde).__name__}")
    return sde


def _check_pos(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return value


def _check_choice(name, value, choices):
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(repr(c) for c in choices)}; got {value!r}")
    return value


def _check_time(name, t, sde):
    if isinstance(t, bool) or not isinstance(t, numbers.Real):
        raise TypeError(f"{name} must be a real number (the loop time), got {type(t).__name__}")
    t = float(t)
    if not 0.0 <= t <= sde.T:
        raise ValueError(f"{name} must lie in [0, {sde.T}], got {t}")
    return t


def _check_eps(eps, sde):
    eps = _check_pos("eps", eps)
    if not eps < sde.T:
        raise ValueError(f"eps must be < T = {sde.T}, got {eps}")
    return eps


def _check_callback(callback):
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable or None, got {type(callback).__name__}")


def _acc(x):
    return _F64 if x.dtype == _F64 else torch.float32


def _is_subvp(sde):
    return isinstance(sde, _schedules.SubVPSDE)


def _is_vp(sde):
    return isinstance(sde, _schedules.VPSDE) and not _is_subvp(sde)


# ---------------------------------------------------------------------------
# time grids and coefficient tables (CPU float64, then one move to the device)
# ---------------------------------------------------------------------------
def time_grid(sde, n_steps, eps=1e-3, grid="score_sde"):
    """(times, dts): float64 CPU tensors of the N loop times and their steps dt (< 0).

    "score_sde": times = linspace(T, eps, N), dt = -1/N each (score_sde's PC loop);
    "uniform": times = linspace(T, eps, N+1)[:-1], dt = the grid spacing (ends exactly at eps).
    """
    _check_sde(sde)
    n = _check_int("n_steps", n_steps, 1)
    eps = _check_eps(eps, sde)
    _check_choice("grid", grid, GRIDS)
    if grid == "score_sde":
        times = torch.linspace(sde.T, eps, n, dtype=_F64)
        return times, torch.full((n,), -1.0 / n, dtype=_F64)
    levels = torch.linspace(sde.T, eps, n + 1, dtype=_F64)
    return levels[:-1].clone(), levels[1:] - levels[:-1]


def _f_g2(sde, t):
    """f(t) (drift factor on x) and g(t)² at float64 CPU times t."""
    g = sde.diffusion_coeff(t)
    return sde.drift_coeff(t), g * g


def _index(sde, t):
    """score_sde's discrete index (t·(N - 1)/T).long()."""
    return (t * (sde.N - 1) / sde.T).long()


def _blank(n, width=COL_HIST):
    cols = torch.zeros(n, width, dtype=_F64)
    cols[:, COL_SLOT] = -1.0
    cols[:, COL_CM] = 1.0  # d = model_out = the score
    return cols


def _em_table(levels, sde):
    if _is_vp(sde):
        return step_coefficients(levels, "euler_maruyama_vp", prediction="score", beta_min=sde.beta_min,
                                 beta_max=sde.beta_max)
    return step_coefficients(levels, "euler_maruyama_ve", prediction="score", sigma_min=sde.sigma_min,
                             sigma_max=sde.sigma_max)


def _predictor_table(name, sde, times, dts):
    """(N, 8) float64 CPU table of sampler_step for predictor ``name`` at ``times``."""
    n = times.shape[0]
    if name == "euler_maruyama":
        if _is_subvp(sde):
            f, g2 = _f_g2(sde, times)
            cols = _blank(n)
            cols[:, COL_A] = 1 + f * dts
            cols[:, COL_B] = -g2 * dts
            cols[:, COL_S] = torch.sqrt(g2 * -dts)
            return cols
        levels = torch.stack([times, times + dts], dim=1).reshape(-1)
        # A float64 setup table on the host, computed once: the torch path, whatever backend runs the
        # loop (a forced triton/cuda backend cannot take these CPU tensors).
        with _backend.use_backend("torch"):
            table = _em_table(levels, sde)
        return table[0::2].to(_F64).clone()
    cols = _blank(n)
    if name == "reverse_diffusion":
        fd, G = sde.discretize(times)
        cols[:, COL_A] = 1 - fd
        cols[:, COL_B] = G * G
        cols[:, COL_S] = G
        return cols
    # ancestral
    i = _index(sde, times)
    if _is_vp(sde):
        beta = sde.discrete_betas()[i]
        cols[:, COL_A] = 1 / torch.sqrt(1 - beta)
        cols[:, COL_B] = beta / torch.sqrt(1 - beta)
        cols[:, COL_S] = torch.sqrt(beta)
        return cols
    table = sde.discrete_sigmas()
    sigma = table[i]
    adj = torch.where(i == 0, torch.zeros_like(sigma), table[(i - 1).clamp(min=0)])
    diff = sigma * sigma - adj * adj
    cols[:, COL_A] = 1.0
    cols[:, COL_B] = diff
    cols[:, COL_S] = torch.sqrt(adj * adj * diff / (sigma * sigma))
    return cols


def _check_predictor(name, sde):
    _check_choice("predictor", name, PREDICTORS)
    if name == "ancestral" and _is_subvp(sde):
        raise ValueError("predictor 'ancestral' is defined for VPSDE and VESDE only (score_sde), not SubVPSDE")
    return name


def _ode_table(method, sde, times, dts):
    """Euler: (N, 8) rows; Heun: (2N, 9) rows (stage 1, stage 2 per step), float64 CPU."""
    n = times.shape[0]
    f1, g1 = _f_g2(sde, times)
    if method == "euler":
        cols = _blank(n)
        cols[:, COL_A] = 1 + f1 * dts
        cols[:, COL_B] = -0.5 * g1 * dts
        return cols
    f2, g2 = _f_g2(sde, times + dts)
    cols = _blank(2 * n, COL_HIST + 1)
    s1, s2 = cols[0::2], cols[1::2]
    s1[:, COL_A] = 1 + f1 * dts  # x_e = x + dt·drift_1
    s1[:, COL_B] = -0.5 * g1 * dts
    s1[:, COL_HX] = 1 + 0.5 * f1 * dts  # history = x + dt/2·drift_1
    s1[:, COL_HD] = -0.25 * g1 * dts
    s1[:, COL_SLOT] = 0.0
    s2[:, COL_A] = 0.5 * f2 * dts  # x_next = history + dt/2·drift_2(x_e)
    s2[:, COL_B] = -0.25 * g2 * dts
    s2[:, COL_HIST] = 1.0
    cols[0::2], cols[1::2] = s1, s2
    return cols


def _to_device(table, x):
    return table.to(device=x.device, dtype=_acc(x))


def _row_times(times, x):
    """Per-loop-step (B,) time views: times moved once, then t_i = times_dev[i].expand(B)."""
    return times.to(device=x.device, dtype=_acc(x))


def _alpha(sde, t):
    """score_sde's corrector alpha: 1 - beta_i (VP, sub-VP), 1 (VE); float64 CPU tensor of t's shape."""
    if isinstance(sde, _schedules.VPSDE):
        return 1 - sde.discrete_betas()[_index(sde, t)]
    return torch.ones_like(t)


# ---------------------------------------------------------------------------
# corrector programs (ALD, annealed Langevin, SNR Langevin) on device step indices
# ---------------------------------------------------------------------------
def _langevin_rows(dts, repeat):
    """float64 sampler_step rows of the Langevin update x + dt/2·score + sqrt(dt)·z, each dt repeated
    ``repeat`` times (row r: iteration r % repeat at level r // repeat)."""
    dts = dts.repeat_interleave(repeat)
    cols = _blank(dts.shape[0])
    cols[:, COL_A] = 1.0
    cols[:, COL_B] = 0.5 * dts
    cols[:, COL_S] = torch.sqrt(dts)
    return cols


def _corrector(corrector, score_fn, x, ks, repeat, seed, stream, norm):
    """``correct(t, noise=None)``: one corrector iteration on the contiguous ``x``, in place, with the score
    at the (B,) times ``t`` (``correct.index``: the iteration counter). Iteration r (a step index held
    on the device and advanced by the fused launch) draws its noise from stream ``stream + r`` (or takes
    ``noise``) and uses level r // ``repeat`` of ``ks``: 'ald' one sampler_step with the rows
    ``_langevin_rows(ks, repeat)`` (ks = the Langevin dt per level); 'langevin' one langevin_snr_step
    with k = ks[r // repeat] (= 4·alpha·snr²) read from a device table. Nothing is read from the host
    per iteration, so the same launches replay in a CUDA graph."""
    idx = torch.zeros(1, dtype=torch.int64, device=x.device)
    if corrector == "ald":
        table = _to_device(_langevin_rows(ks, repeat), x)

        def correct(t, noise=None):  # (noise: a given z instead of the in-kernel draw)
            grad = score_fn(x, t)
            check_like("score_fn(x, t)", grad, "x", x)
            sampler_step(x, grad, table, idx, noise=noise, seed=seed, stream=stream, advance=True, out=x)
        correct.index = idx
        return correct
    k_table = _to_device(ks.repeat_interleave(repeat), x)
    seed_i, row_seeds = split_seed(seed, x.shape[0], x.device)
    step = torch.empty(x.shape[0], dtype=_acc(x), device=x.device)
    backend, batch_norm = _backend.resolve(x.device), norm == "batch"

    def correct(t, noise=None):
        grad = score_fn(x, t)
        check_like("score_fn(x, t)", grad, "x", x)
        run_langevin_snr_step(backend, x, grad.contiguous(), noise, x, step, seed_i, stream, row_seeds, 1.0,
                              batch_norm, k_table, idx)
    correct.index = idx
    return correct


# ---------------------------------------------------------------------------
# single steps (for tests and custom loops; each one fused launch for the update)
# ---------------------------------------------------------------------------
def _t_rows(t, x):
    return torch.full((x.shape[0],), t, dtype=_acc(x), device=x.device)


def _check_x(x):
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 1 or x.shape[0] < 1:
        raise TypeError("x must be a floating tensor with a batch dimension of size >= 1")


def _one_step(table, score_fn, x, t, seed, stream, noise, denoise):
    if denoise:
        table = table.clone()
        table[:, COL_S] = 0.0
    table = _to_device(table, x)
    score = score_fn(x, _t_rows(t, x))
    check_like("score_fn(x, t)", score, "x", x)
    idx = torch.zeros(1, dtype=torch.int64, device=x.device)
    if noise is None and denoise:
        noise = score  # s = 0: no noise term, nothing to draw
    if noise is None:
        return sampler_step(x, score, table, idx, seed=seed, stream=stream)
    return sampler_step(x, score, table, idx, noise=noise)


def euler_maruyama_step(score_fn, sde, x, t, dt=None, *, seed=0, stream=0, noise=None, denoise=False):
    """Euler–Maruyama step of the reverse SDE at time ``t`` with step ``dt`` (< 0; default -1/N).

    Returns x_mean + g·sqrt(-dt)·z, or x_mean with ``denoise=True``. ``noise``: a given z;
    else z = pygen.randn(x.shape, seed, stream).
    """
    _check_sde(sde)
    _check_x(x)
    t = _check_time("t", t, sde)
    dt = -1.0 / sde.N if dt is None else float(dt)
    if not dt < 0:
        raise ValueError(f"dt must be < 0 (reverse time), got {dt}")
    table = _predictor_table("euler_maruyama", sde, torch.tensor([t], dtype=_F64), torch.tensor([dt], dtype=_F64))
    return _one_step(table, score_fn, x, t, seed, stream, noise, denoise)


def reverse_diffusion_step(score_fn, sde, x, t, *, seed=0, stream=0, noise=None, denoise=False):
    """score_sde's ReverseDiffusionPredictor at time ``t`` (see the module docstring)."""
    _check_sde(sde)
    _check_x(x)
    t = _check_time("t", t, sde)
    table = _predictor_table("reverse_diffusion", sde, torch.tensor([t], dtype=_F64), None)
    return _one_step(table, score_fn, x, t, seed, stream, noise, denoise)


def ancestral_step(score_fn, sde, x, t, *, seed=0, stream=0, noise=None, denoise=False):
    """score_sde's AncestralSamplingPredictor at time ``t`` (VPSDE or VESDE)."""
    _check_sde(sde)
    _check_predictor("ancestral", sde)
    _check_x(x)
    t = _check_time("t", t, sde)
    table = _predictor_table("ancestral", sde, torch.tensor([t], dtype=_F64), None)
    return _one_step(table, score_fn, x, t, seed, stream, noise, denoise)


def _check_noise_stack(noise, n_steps, x):
    if noise is None:
        return None
    if not isinstance(noise, torch.Tensor) or tuple(noise.shape) != (n_steps,) + tuple(x.shape):
        raise ValueError(f"noise must be a tensor of shape {(n_steps,) + tuple(x.shape)} (one z per corrector step)")
    check_like("noise[0]", noise[0], "x", x)
    return noise.contiguous()


def langevin_corrector(score_fn, sde, x, t, *, snr=0.16, n_steps=1, seed=0, stream=0, noise=None, norm="batch"):
    """score_sde's LangevinCorrector: ``n_steps`` SNR-scaled Langevin steps at time ``t``.

    Iteration j draws z = pygen.randn(x.shape, seed, stream + j) (or takes noise[j]).
    """
    _check_sde(sde)
    _check_x(x)
    t = _check_time("t", t, sde)
    snr = _check_pos("snr", snr)
    n_steps = _check_int("n_steps", n_steps, 1)
    _check_choice("norm", norm, NORMS)
    noise = _check_noise_stack(noise, n_steps, x)
    stream = check_stream(stream)
    ks = 4.0 * _alpha(sde, torch.tensor([t], dtype=_F64)) * snr * snr
    rows = _t_rows(t, x)
    x = x.clone(memory_format=torch.contiguous_format)
    correct = _corrector("langevin", score_fn, x, ks, n_steps, seed, stream, norm)
    for j in range(n_steps):
        correct(rows, None if noise is None else noise[j])
    return x


def annealed_langevin_corrector(score_fn, sde, x, t, *, snr=0.16, n_steps=1, seed=0, stream=0, noise=None):
    """score_sde's AnnealedLangevinDynamics corrector: step = 2·alpha·(snr·std(t))²."""
    _check_sde(sde)
    _check_x(x)
    t = _check_time("t", t, sde)
    snr = _check_pos("snr", snr)
    n_steps = _check_int("n_steps", n_steps, 1)
    noise = _check_noise_stack(noise, n_steps, x)
    stream = check_stream(stream)
    dts = _ald_dt(sde, torch.tensor([t], dtype=_F64), snr)
    rows = _t_rows(t, x)
    x = x.clone(memory_format=torch.contiguous_format)
    correct = _corrector("ald", score_fn, x, dts, n_steps, seed, stream, None)
    for j in range(n_steps):
        correct(rows, None if noise is None else noise[j])
    return x


def _ald_dt(sde, times, snr):
    """Langevin dt (= 2·step) of the ALD corrector at float64 CPU times."""
    std = sde.marginal_std(times)
    return 4.0 * _alpha(sde, times) * (snr * std) ** 2


def ode_euler_step(score_fn, sde, x, t, dt):
    """Euler step of the probability-flow ODE: x + (f·x - g²·score/2)·dt."""
    return _ode_step("euler", score_fn, sde, x, t, dt)


def ode_heun_step(score_fn, sde, x, t, dt):
    """Heun step of the probability-flow ODE (2 score evaluations: at t and at t + dt)."""
    return _ode_step("heun", score_fn, sde, x, t, dt)


def _ode_step(method, score_fn, sde, x, t, dt):
    _check_sde(sde)
    _check_x(x)
    t = _check_time("t", t, sde)
    dt = float(dt)
    _check_time("t + dt", t + dt, sde)
    table = _ode_table(method, sde, torch.tensor([t], dtype=_F64), torch.tensor([dt], dtype=_F64))
    return _ode_run(method, score_fn, x.clone(memory_format=torch.contiguous_format), _to_device(table, x),
                    torch.tensor([t], dtype=_F64), torch.tensor([dt], dtype=_F64), None)


def _ode_run(method, score_fn, x, table, times, dts, callback, cuda_graph=False):
    """Run the ODE loop in place on the contiguous ``x`` (one fused launch per score evaluation; Heun:
    two per step, the model time of launch r read from an interleaved table of t_i and t_i + dt_i)."""
    idx = torch.zeros(1, dtype=torch.int64, device=x.device)
    per = 2 if method == "heun" else 1
    t_dev = _row_times(times if per == 1 else torch.stack([times, times + dts], 1).reshape(-1), x)
    hist = torch.zeros((1,) + tuple(x.shape), dtype=x.dtype, device=x.device) if method == "heun" else None

    def launch(t):
        s = score_fn(x, t)
        check_like("score_fn(x, t)", s, "x", x)
        sampler_step(x, s, table, idx, history=hist, noise=s, advance=True, out=x)

    _graph_loop(launch, t_dev, idx, x, times.shape[0], per, callback, cuda_graph)
    return x


def _graph_loop(launch, t_dev, idx, x, n, per, callback, cuda_graph):
    """``n`` loop steps of ``per`` launches each; ``launch(t)`` rewrites ``x`` in place, with ``t`` the (B,)
    model time of launch r: a view of ``t_dev[r]`` eagerly, or ``t_dev[idx]`` read on the device while
    ``cuda_graph=True`` captures and replays the launch (``StepGraphs``: the first launch runs as the
    warm-up and is captured, the others replay it; ``idx`` is advanced by the launch's fused steps, so
    ``t_dev[idx]`` at the start of launch r is the time of launch r). ``callback(i, x)`` after each step
    gets a copy of ``x`` (the next step rewrites it), unless it is pygen.sample's progress bar alone."""
    b = x.shape[0]
    views = list(t_dev.unbind(0))
    graphs = StepGraphs(cuda_graph and _graph_device(x))  # (a CPU tensor: one warning, the eager loop)
    copy = callback is not None and getattr(callback, "needs_state", True)

    def launch_at_device_step():
        launch(t_dev.index_select(0, idx).expand(b))

    for i in range(n):
        for r in range(i * per, (i + 1) * per):
            if graphs.enabled:
                graphs("launch", launch_at_device_step)
            else:
                launch(views[r].expand(b))
        if callback is not None:
            callback(i, x.clone() if copy else x)
# ---------------------------------------------------------------------------
# loops
# ---------------------------------------------------------------------------
def _init(sde, shape, x_T, seed, stream, device, dtype):
    if x_T is not None:
        _check_x(x_T)
        return x_T.clone(memory_format=torch.contiguous_format)
    if isinstance(shape, torch.Size):
        shape = tuple(shape)
    if not isinstance(shape, (tuple, list)) or len(shape) < 1 or not all(
            isinstance(s, numbers.Integral) and not isinstance(s, bool) and s >= 1 for s in shape):
        raise ValueError(f"shape must be a non-empty tuple of positive ints, got {shape!r}")
    if device is None and isinstance(seed, torch.Tensor):
        device = seed.device
    x = randn(tuple(shape), seed, stream, device=device, dtype=dtype)
    return x.mul_(sde.prior_std)


def pc_sample(score_fn, sde, shape=None, *, predictor="reverse_diffusion", corrector="langevin", n_steps=None,
              snr=0.16, n_corrector_steps=1, eps=1e-3, seed=0, stream=0, denoise=True, x_T=None, grid="score_sde",
              norm="batch", device=None, dtype=torch.float32, callback=None, cuda_graph=False):
    """score_sde's predictor-corrector sampler.

    Starts from x_T (or sde.prior_std·pygen.randn(shape, seed, stream)); for each loop time
    t_i of ``time_grid(sde, n_steps, eps, grid)`` (``n_steps`` defaults to sde.N) runs the
    corrector (``n_corrector_steps`` iterations) and then the predictor. ``callback(i, x)``
    is called after each step. Returns the samples (x_mean of the last predictor step when
    ``denoise``).

    ``cuda_graph=True`` (CUDA tensors): one loop step (the corrector's score calls and fused updates,
    then the predictor's) is captured once and replayed per step; the times, table rows, corrector
    step constants and noise streams are read from device step indices.
    """
    _check_sde(sde)
    _check_predictor(predictor, sde)
    _check_choice("corrector", corrector, CORRECTORS)
    n_steps = sde.N if n_steps is None else _check_int("n_steps", n_steps, 1)
    if predictor in ("reverse_diffusion", "ancestral") and _is_vp(sde) and sde.beta_max / sde.N > 1.0:
        raise ValueError(f"predictor {predictor!r} needs the discrete betas beta_max/N <= 1, got "
                         f"{sde.beta_max}/{sde.N}: build the SDE with a larger N (and as many loop steps)")
    if predictor in ("reverse_diffusion", "ancestral") and n_steps != sde.N:
        warnings.warn(f"predictor {predictor!r} discretises the SDE with its own N (sde.N = {sde.N}), as score_sde "
                      f"does, but the loop takes n_steps = {n_steps}: each step then covers only part of its "
                      "interval and the samples are wrong; build the SDE with N = n_steps", stacklevel=2)
    times, dts = time_grid(sde, n_steps, eps, grid)
    n = times.shape[0]
    snr = _check_pos("snr", snr)
    n_corr = _check_int("n_corrector_steps", n_corrector_steps, 1)
    _check_choice("norm", norm, NORMS)
    if not isinstance(denoise, bool):
        raise TypeError(f"denoise must be a bool, got {type(denoise).__name__}")
    _check_callback(callback)
    stream = check_stream(stream)
    x = _init(sde, shape, x_T, seed, stream, device, dtype)
    if isinstance(seed, torch.Tensor):
        split_seed(seed, x.shape[0], x.device)  # validates per-row seeds
    t_dev = _row_times(times, x)
    if predictor != "none":
        table = _predictor_table(predictor, sde, times, dts)
        if denoise:
            table[-1, COL_S] = 0.0
        table = _to_device(table, x)
        idx = torch.zeros(1, dtype=torch.int64, device=x.device)
    if corrector == "langevin":
        alpha = _alpha(sde, times)
        if bool((alpha < 0).any()):
            raise ValueError(f"the Langevin corrector needs alpha = 1 - beta_i >= 0, but this SDE's discrete betas "
                             f"reach {float(1 - alpha.min()):.3g} (sde.N = {sde.N} is too small for its beta_max); "
                             "use a larger N or corrector='ald'/'none'")
        correct = _corrector(corrector, score_fn, x, 4.0 * alpha * snr * snr, n_corr, seed,
                             check_stream(stream + 1 + n), norm)
    elif corrector == "ald":
        correct = _corrector(corrector, score_fn, x, _ald_dt(sde, times, snr), n_corr, seed,
                             check_stream(stream + 1 + n), norm)
    if not isinstance(cuda_graph, bool):
        raise TypeError(f"cuda_graph must be a bool, got {type(cuda_graph).__name__}")
    if predictor == "none":
        # the loop step's time comes from a loop counter (a graph reads it on the device)
        idx = torch.zeros(1, dtype=torch.int64, device=x.device)
        cuda_graph = cuda_graph and corrector != "none"  # (nothing to capture)

    def launch(t):  # one loop step on x in place: the corrector iterations, then the fused predictor step
        for _ in range(n_corr if corrector != "none" else 0):
            correct(t)
        if predictor != "none":
            s = score_fn(x, t)
            check_like("score_fn(x, t)", s, "x", x)
            sampler_step(x, s, table, idx, seed=seed, stream=stream + 1, advance=True, out=x)
        elif cuda_graph:
            idx.add_(1)

    # (x from _init: a contiguous buffer that every step, captured or not, rewrites)
    _graph_loop(launch, t_dev, idx, x, n, 1, callback, cuda_graph)
    return x


def annealed_langevin(score_fn, sde, shape=None, *, n_levels=10, n_steps_each=100, step_lr=2e-5, eps=1e-3, seed=0,
                      stream=0, denoise=False, x_T=None, device=None, dtype=torch.float32, callback=None,
                      cuda_graph=False):
    """NCSN annealed Langevin dynamics (seed 001).

    Levels: t_i = linspace(T, eps, n_levels), sigma_i = sde.marginal_std(t_i) (the VE sigma);
    step_i = step_lr·sigma_i²/sigma_L²; at each level ``n_steps_each`` updates
    x = x + step_i·score(x, t_i) + sqrt(2·step_i)·z (one fused ``sampler_step`` each, its row
    and noise stream stream + 1 + i·n_steps_each + m read from a device index, z drawn in the
    kernel). ``callback(i, x)`` after each level. ``denoise=True`` ends with Tweedie's
    x = (x + sigma_L²·score(x, t_L)) / mean_coeff(t_L).
    ``cuda_graph=True`` (CUDA tensors): one score call + update captured once and replayed.
    """
    _check_sde(sde)
    n_levels = _check_int("n_levels", n_levels, 1)
    m = _check_int("n_steps_each", n_steps_each, 1)
    step_lr = _check_pos("step_lr", step_lr)
    eps = _check_eps(eps, sde)
    if not isinstance(denoise, bool):
        raise TypeError(f"denoise must be a bool, got {type(denoise).__name__}")
    _check_callback(callback)
    stream = check_stream(stream)
    if not isinstance(cuda_graph, bool):
        raise TypeError(f"cuda_graph must be a bool, got {type(cuda_graph).__name__}")
    x = _init(sde, shape, x_T, seed, stream, device, dtype)
    times = torch.linspace(sde.T, eps, n_levels, dtype=_F64)
    sig = sde.marginal_std(times)
    correct = _corrector("ald", score_fn, x, 2.0 * step_lr * (sig / sig[-1]) ** 2, m, seed, check_stream(stream + 1),
                         None)
    t_dev = _row_times(times, x)
    # update r = i·m + k reads its time from the per-update table at the corrector's own device index
    _graph_loop(correct, t_dev.repeat_interleave(m), correct.index, x, n_levels, m, callback, cuda_graph)
    b = x.shape[0]
    if denoise:
        s = score_fn(x, t_dev[-1].expand(b))
        check_like("score_fn(x, t)", s, "x", x)
        x = ((x.to(_acc(x)) + float(sig[-1]) ** 2 * s.to(_acc(x))) / float(sde.mean_coeff(times[-1]))).to(x.dtype)
    return x


def ode_sample(score_fn, sde, shape=None, *, method="heun", n_steps=100, eps=1e-3, seed=0, stream=0, x_T=None,
               device=None, dtype=torch.float32, callback=None, cuda_graph=False):
    """Probability-flow ODE from T to eps on linspace(T, eps, n_steps + 1) by Euler or Heun.

    Starts from x_T or sde.prior_std·pygen.randn(shape, seed, stream); deterministic afterwards.
    ``cuda_graph=True`` (CUDA tensors): one score call + fused step captured once and replayed per
    evaluation (the time and the table row read from the device step index).
    """
    _check_sde(sde)
    _check_choice("method", method, ODE_METHODS)
    times, dts = time_grid(sde, n_steps, eps, "uniform")
    _check_callback(callback)
    stream = check_stream(stream)
    x = _init(sde, shape, x_T, seed, stream, device, dtype)
    if not isinstance(cuda_graph, bool):
        raise TypeError(f"cuda_graph must be a bool, got {type(cuda_graph).__name__}")
    return _ode_run(method, score_fn, x, _to_device(_ode_table(method, sde, times, dts), x), times, dts, callback,
                    cuda_graph)
