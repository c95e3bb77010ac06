"""``pygen.sample``: one entry point for every pygen sampler.

::

    x0 = pygen.sample(unet, (16, 4, 64, 64), sampler="dpmpp_2m", steps=25,
                      schedule=pygen.schedules.NoiseSchedule(beta_schedule="scaled_linear",
                                                             beta_start=0.00085, beta_end=0.012),
                      prediction_type="eps", seed=0, cuda_graph=True)

Families (``SAMPLERS``):

- diffusion samplers — the eleven k-diffusion ones (``pygen.kdiffusion``) plus ``"ddim"``
  (= ancestral Euler with ``eta``, default 0: exactly DDIM in sigma space) and ``"ddpm"``
  (eta = 1: the DDPM posterior). They run in k-diffusion's sigma space on a ``sigma_schedule``
  ("karras" (default), "exponential", "polyexponential") of ``steps`` levels from the
  schedule's sigma_max down to sigma_min, then 0. The model, by ``prediction_type``:

  - ``"eps"``, ``"x0"``, ``"v"``: diffusers convention ``model(x_t, t)`` on the discrete
    ``schedule`` (a ``pygen.schedules.NoiseSchedule``, default: diffusers' DDPM linear
    betas), x_t = sqrt(abar)·x0 + sqrt(1-abar)·eps, t a fractional timestep per row
    (log-sigma interpolation, as k-diffusion's ``DiscreteEpsDDPMDenoiser``);
  - ``"flow"``: ``model(x_t, t)`` -> velocity eps - x0 for x_t = (1-t)·x0 + t·eps, t in [0, 1]
    (diffusers FlowMatch); the loop starts at ``t_max`` (default 0.999);
  - ``"denoiser"``: k-diffusion ``model(x, sigma)`` -> x0.

  The conversion of the model output to the denoised x0 is folded into the fused step's
  (cx, cm) columns, and the input scale c_in into the whole row: the loop's state is the
  model's input y = c_in·x itself (``_scaled_state_rows``), so a model evaluation costs the
  model and one fused step (one launch; ``callback`` still gets x). The state is written in
  place unless the model or a callback kept a reference to it; so a model must not modify its
  input in place (it is the loop's state, not a temporary). ``cuda_graph=True`` captures
  exactly that once (the step index, the timestep lookup and the in-kernel noise all read
  device state) and replays it for every model evaluation (every replay writes the captured
  state buffer: the callback gets a copy); a model that cannot be captured falls back to eager
  with one warning.
- score-SDE samplers (``pygen.sde``; ``schedule`` a VPSDE/SubVPSDE/VESDE, default VPSDE(); for
  the reverse-diffusion and ancestral predictors the SDE is re-discretised with N = ``steps``):
  ``"pc"`` (options predictor=, corrector=, snr=, n_corrector_steps=, ...), ``"ode_euler"``,
  ``"ode_heun"``, ``"annealed_langevin"``. The model: ``"score"`` ``model(x, t)`` -> grad log
  p_t, ``"eps"`` -> eps-prediction, ``"x0"`` -> x0-prediction. ``cuda_graph=True`` captures one
  loop step (``"pc"``: the corrector iterations and the predictor; the ODEs and annealed
  Langevin: one score call + fused update) and replays it: the times, the table rows, the
  corrector's step constants and the noise streams are all read from step indices on the
  device.
- MCMC (``pygen.mcmc``): ``"ula"`` (``"score"`` or ``"energy"`` model), ``"mala"``, ``"hmc"``,
  ``"replica_exchange"`` (``"energy"`` model ``E(x)`` -> (rows,)); ``steps`` = MCMC steps,
  options step_size= (required), n_leapfrog=, betas=, ... as in ``pygen.mcmc``. The chains start
  at the initial noise; only the samples are returned (for replica exchange: the largest-beta
  replica); call ``pygen.mcmc`` directly for acceptance and swap rates. ``cuda_graph=True``
  captures one step (the energy, its autograd gradient, the move and the accept/reject;
  replica exchange: also each parity's swap round) and replays it, the noise streams read from
  device step counters.

``x_T_or_shape``: the initial standard-normal noise (scaled here by the sampler's initial
sigma / prior std), or a shape, in which case it is ``pygen.randn(shape, seed, 0)``.
``seed``: int or one int64 seed per row (a row's result then does not depend on its batch,
for row-local samplers). ``progress`` shows a tqdm bar. Returns the samples.
"""
import numbers

import torch

from pygen import kdiffusion as _K
from pygen import schedules as _schedules
from pygen.ops._common import check_like
from pygen.ops.random import randn
from pygen.ops.schedule import COL_A, COL_B, COL_CM, COL_CX, COL_HIST, COL_HX, COL_S
from pygen.samplers.program import StepProgram, capture_step, check_model_out
from pygen.samplers.program import graph_device as _graph_device

__all__ = ["sample", "SAMPLERS", "DIFFUSION_SAMPLERS", "SDE_SAMPLERS", "MCMC_SAMPLERS", "PREDICTION_TYPES",
           "StepProgram"]

DIFFUSION_SAMPLERS = tuple(_K.SAMPLERS) + ("ddim", "ddpm")
SDE_SAMPLERS = ("pc", "ode_euler", "ode_heun", "annealed_langevin")
MCMC_SAMPLERS = ("ula", "mala", "hmc", "replica_exchange")
SAMPLERS = DIFFUSION_SAMPLERS + SDE_SAMPLERS + MCMC_SAMPLERS
PREDICTION_TYPES = ("eps", "x0", "v", "flow", "denoiser", "score", "energy")
SIGMA_SCHEDULES = ("karras", "exponential", "polyexponential")


def _choice(name, value, choices):
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"unknown {name} {value!r}; expected one of: {', '.join(choices)}")
    return value


def _initial_noise(x_T_or_shape, seed, device, dtype):
    if isinstance(x_T_or_shape, torch.Tensor):
        _K._check_x(x_T_or_shape)
        return x_T_or_shape.contiguous()
    shape = tuple(x_T_or_shape) if isinstance(x_T_or_shape, (tuple, list, torch.Size)) else None
    if not shape or not all(isinstance(s, numbers.Integral) and not isinstance(s, bool) and s >= 1 for s in shape):
        raise ValueError(f"x_T_or_shape must be a tensor or a non-empty shape of positive ints, got {x_T_or_shape!r}")
    if device is None and isinstance(seed, torch.Tensor):
        device = seed.device
    return randn(shape, seed, 0, device=device, dtype=dtype)


def _progress(total, enabled):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total)


def sample(model, x_T_or_shape, sampler="dpmpp_2m", steps=25, schedule=None, prediction_type="eps", seed=0,
           cuda_graph=False, progress=True, *, device=None, dtype=torch.float32, callback=None, **options):
    """Sample with any pygen sampler (see the module docstring for the conventions).

    Args:
        model: the network (convention set by ``prediction_type``).
        x_T_or_shape: initial standard-normal noise, or the shape to draw it for.
        sampler: a name in ``pygen.samplers.SAMPLERS``.
        steps: sampling steps (noise levels for diffusion samplers, loop steps for SDEs,
            levels for annealed Langevin, MCMC steps), >= 1.
        schedule: ``pygen.schedules.NoiseSchedule`` (diffusion, eps/x0/v) or a SDE (score-SDE).
        prediction_type: one of ``PREDICTION_TYPES`` valid for the family.
        seed: int or per-row int64 tensor; all noise is pygen's counter-based noise.
        cuda_graph: capture model + fused step once and replay it (CUDA tensors; every sampler).
        progress: show a tqdm progress bar.
        device, dtype: of the initial noise when a shape is given.
        callback: ``callback(i, x)`` after each step (diffusion: after each model evaluation's step).
        **options: sampler options (eta, s_noise, s_churn, order, solver_type, r, sigma_schedule,
            sigma_min, sigma_max, rho, t_max, sigmas; SDE and MCMC options).
    """
    _choice("sampler", sampler, SAMPLERS)
    _choice("prediction_type", prediction_type, PREDICTION_TYPES)
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    if not callable(model):
        raise TypeError(f"model must be callable, got {type(model).__name__}")
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable or None, got {type(callback).__name__}")
    eps = _initial_noise(x_T_or_shape, seed, device, dtype)
    if sampler in DIFFUSION_SAMPLERS:
        return _sample_diffusion(model, eps, sampler, int(steps), schedule, prediction_type, seed, cuda_graph,
                                 progress, callback, options)
    if sampler in SDE_SAMPLERS:
        return _sample_sde(model, eps, sampler, int(steps), schedule, prediction_type, seed, progress, callback,
                           options, bool(cuda_graph))
    return _sample_mcmc(model, eps, sampler, int(steps), prediction_type, seed, progress, callback, options,
                        bool(cuda_graph))


# ---------------------------------------------------------------------------
# diffusion samplers (sigma space, fused coefficient programs)
# ---------------------------------------------------------------------------
def _plan(sampler, sig, opts):
    """The k-diffusion coefficient program of ``sampler`` (the plan functions validate their options)."""
    take = opts.pop
    if sampler in ("euler", "heun", "dpm_2"):
        args = (take("s_churn", 0.0), take("s_tmin", 0.0), take("s_tmax", float("inf")), take("s_noise", 1.0))
        return getattr(_K, "_plan_" + sampler)(sig, *args)
    if sampler in ("euler_ancestral", "dpm_2_ancestral", "dpmpp_2s_ancestral", "ddim", "ddpm"):
        eta = take("eta", {"ddim": 0.0, "ddpm": 1.0}.get(sampler, 1.0))
        name = "euler_ancestral" if sampler in ("ddim", "ddpm") else sampler
        return getattr(_K, "_plan_" + name)(sig, eta, take("s_noise", 1.0))
    if sampler == "lms":
        return _K._plan_lms(sig, take("order", 4))
    if sampler == "dpmpp_2m":
        return _K._plan_dpmpp_2m(sig)
    eta, s_noise = take("eta", 1.0), take("s_noise", 1.0)
    if sampler == "dpmpp_sde":
        return _K._plan_dpmpp_sde(sig, eta, s_noise, take("r", 0.5), True)
    if sampler == "dpmpp_2m_sde":
        return _K._plan_dpmpp_2m_sde(sig, eta, s_noise, take("solver_type", "midpoint"))
    return _K._plan_dpmpp_3m_sde(sig, eta, s_noise)


def _sigma_grid(steps, prediction_type, schedule, opts):
    """Host float64 list of decreasing sigmas (steps levels, then 0) and the VP sigma table (or None)."""
    given = opts.pop("sigmas", None)
    kind = _choice("sigma_schedule", opts.pop("sigma_schedule", "karras"), SIGMA_SCHEDULES)
    rho = opts.pop("rho", 7.0 if kind == "karras" else 1.0)
    table = None
    if prediction_type in ("eps", "x0", "v"):
        if schedule is None:
            schedule = _schedules.NoiseSchedule()
        if not isinstance(schedule, _schedules.NoiseSchedule):
            raise TypeError(f"schedule must be a pygen.schedules.NoiseSchedule for prediction_type "
                            f"{prediction_type!r}, got {type(schedule).__name__}")
        table = schedule._float64["sigmas"]
        lo, hi = float(table[0]), float(table[-1])
    elif prediction_type == "flow":
        t_max = _K._check_real("t_max", opts.pop("t_max", 0.999), gt=0.0)
        t_min = _K._check_real("t_min", opts.pop("t_min", 1e-3), gt=0.0)
        if not t_min < t_max < 1.0:
            raise ValueError(f"need 0 < t_min < t_max < 1 for flow models, got t_min={t_min}, t_max={t_max}")
        lo, hi = t_min / (1 - t_min), t_max / (1 - t_max)
    elif prediction_type == "denoiser":
        lo, hi = 0.002, 80.0
    else:
        raise ValueError(f"prediction_type {prediction_type!r} is not valid for the diffusion samplers; use one of "
                         "'eps', 'x0', 'v', 'flow', 'denoiser'")
    lo = _K._check_real("sigma_min", opts.pop("sigma_min", lo), gt=0.0)
    hi = _K._check_real("sigma_max", opts.pop("sigma_max", hi), gt=lo)
    if given is not None:
        return _K._host_sigmas(given), table
    if kind == "karras":
        sig = _schedules.karras_sigmas(steps, lo, hi, rho)
    elif kind == "exponential":
        sig = _schedules.exponential_sigmas(steps, lo, hi)
    else:
        sig = _schedules.polyexponential_sigmas(steps, lo, hi, rho)
    return _K._host_sigmas(sig), table


def _conversions(prediction_type, call_sigmas, table):
    """Per model evaluation: input scale c_in, model time t, and (cx, cm) with x0 = cx·x + cm·out."""
    s = torch.tensor(call_sigmas, dtype=torch.float64)
    one = torch.ones_like(s)
    if prediction_type == "denoiser":
        return one, s, torch.zeros_like(s), one
    if prediction_type == "flow":
        c_in = 1 / (1 + s)
        return c_in, s / (1 + s), c_in, -s / (1 + s)
    c_in = torch.rsqrt(s * s + 1)
    t = _schedules.sigma_to_t(s, table)
    if prediction_type == "eps":
        return c_in, t, one, -s
    if prediction_type == "x0":
        return c_in, t, torch.zeros_like(s), one
    return c_in, t, c_in * c_in, -s * c_in  # v


def _scaled_state_rows(rows, c_in):
    """The table rewritten for the loop state y_k = c_k·x_k (the model's input) instead of x_k.

    Row k of ``rows`` maps x_k to x_{k+1}: d = cx·x + cm·out, x_{k+1} = a·x + b·d + Σ hist_j·h_j + s·z,
    h[slot] = hx·x + hd·d. With x_k = y_k / c_k and y_{k+1} = c_{k+1}·x_{k+1} (c_K = 1 after the last
    evaluation, so the final state is x itself) every term stays linear: cx and hx are divided by c_k,
    a is multiplied by c_{k+1}/c_k, and b, s and the history weights by c_{k+1}; the history (slots of x
    and d) and d itself are unchanged. The loop then hands y_k to the model as it is: no input-scaling
    launch per model evaluation."""
    c = c_in.to(torch.float64)
    c_next = torch.cat([c[1:], c.new_ones(1)])
    rows = rows.clone()
    rows[:, COL_CX] /= c
    rows[:, COL_HX] /= c
    rows[:, COL_A] *= c_next / c
    rows[:, COL_B] *= c_next
    rows[:, COL_S] *= c_next
    rows[:, COL_HIST:] *= c_next[:, None]
    return rows


def _sample_diffusion(model, eps, sampler, steps, schedule, prediction_type, seed, cuda_graph, progress, callback,
                      options):
    opts = dict(options)
    sig, table = _sigma_grid(steps, prediction_type, schedule, opts)
    plan = _plan(sampler, sig, opts)
    if opts:
        raise TypeError(f"unexpected option(s) for sampler {sampler!r}: {', '.join(sorted(opts))}")
    c_in, t, cx, cm = _conversions(prediction_type, plan.call_sigmas, table)
    rows = torch.tensor(plan.rows, dtype=torch.float64)
    rows[:, COL_CX], rows[:, COL_CM] = cx, cm
    # The loop state is the model's input y = c_in·x (for a denoiser c_in = 1 and y = x): the input
    # scale is folded into the table, so a model evaluation costs the model and one fused step.
    scaled = prediction_type != "denoiser"
    if scaled:
        rows = _scaled_state_rows(rows, c_in)
    x = eps * sig[0] if prediction_type != "flow" else eps * (1 + sig[0])
    x = plan.churn_start(x, seed).contiguous()
    prog = StepProgram(rows, x, seed=seed, stream=1)
    dev = dict(device=x.device, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
    y = (x * float(c_in[0])).to(x.dtype) if scaled else x
    t_dev = t.to(**dev)[:, None].expand(-1, x.shape[0]).contiguous()
    t_rows = list(t_dev.unbind(0))  # per-evaluation model times as views, made once
    # the callback's x_{k+1} = y_{k+1} / c_{k+1} (1 after the last evaluation)
    inv_c = (1 / torch.cat([c_in[1:], c_in.new_ones(1)])).to(**dev) if scaled and callback is not None else None
    num = prog.num_rows
    bar = _progress(num, progress)
    dtype = x.dtype
    cuda_graph = bool(cuda_graph) and _graph_device(x)  # (a CPU tensor: one warning, the eager loop)
    state = [y]
    del x, y  # only state[0] refers to the loop state now: step 0 can write it in place

    def launch(k, inplace=False):  # eager: the model gets the state itself; the step writes the next one
        y = state[0]
        out = check_model_out(model(y, t_rows[k]), y)
        del y  # (only state[0] refers to it now, unless the model or a callback kept it)
        # a tensor the model or a callback kept is never written afterwards: the step writes y in
        # place only when nothing else refers to it (as pygen.kdiffusion's loop), else a new tensor
        # (``inplace``: the CUDA-graph warm-up, whose buffer the graph then reuses at every replay)
        dst = state[0] if inplace or _K._unobserved(state[0]) else torch.empty_like(out)
        state[0] = prog.step(state[0], out, dst)

    try:
        # _capture runs evaluation 0 itself (its warm-up), captured or not: the loop starts at 1 then.
        graph = _capture(model, state, prog, t_dev, launch) if cuda_graph else None
        for k in range(num):
            if cuda_graph and k == 0:
                pass
            elif graph is not None:
                graph.replay()
            else:
                launch(k)
            if bar is not None:
                bar.update(1)
            if callback is not None:  # x itself; a copy of the graph's buffer, which the next replay rewrites
                cur = state[0]
                if inv_c is not None:
                    cur = (cur * inv_c[k]).to(dtype)
                elif graph is not None:
                    cur = cur.clone()
                callback(k, cur)
                del cur  # (a reference here would make the state look observed at the next step)

    finally:
        if bar is not None:
            bar.close()
    return state[0]


def _capture(model, state, prog, t_dev, launch):
    """Run model evaluation 0 eagerly (warm-up), then capture one evaluation reading the row index
    from the device (the state written in place); None (with one warning) if the model cannot be
    captured."""
    def step():
        y = state[0]
        t = t_dev.index_select(0, prog.index)[0]
        out = check_model_out(model(y, t), y)
        prog.step(y, out, y)

    # (the warm-up writes in place: no allocation on the side stream, the graph keeps this buffer)
    return capture_step(lambda: launch(0, inplace=True), step)


# ---------------------------------------------------------------------------
# score-SDE samplers and MCMC: thin adapters over pygen.sde and pygen.mcmc
# ---------------------------------------------------------------------------
def _score_fn(model, prediction_type, sde):
    if prediction_type not in ("score", "eps", "x0"):
        raise ValueError(f"prediction_type {prediction_type!r} is not valid for the score-SDE samplers; use "
                         "'score', 'eps' or 'x0'")

    def call(x, t):
        # the model output is checked as it comes, before any conversion to a score, whose
        # broadcasting would hide a (1, ...) or (B, 1) output (a metadata check: no sync)
        return check_like("model(x, t)", model(x, t), "x", x)

    if prediction_type == "score":
        return call

    def view(v, x):
        return v.to(x.dtype).view((-1,) + (1,) * (x.dim() - 1))

    if prediction_type == "eps":
        def score(x, t):
            return -call(x, t) / view(sde.marginal_std(t), x)
    else:
        def score(x, t):
            std = view(sde.marginal_std(t), x)
            return (view(sde.mean_coeff(t), x) * call(x, t) - x) / (std * std)
    return score


def _bar_callback(bar, callback):
    if bar is None and callback is None:
        return None

    def cb(*args):
        if bar is not None:
            bar.update(1)
        if callback is not None:
            if len(args) == 1 and isinstance(args[0], dict):
                callback(args[0]["i"], args[0]["x"])
            else:
                callback(*args)
    cb.needs_state = callback is not None  # (a bar alone: the loops need not copy their state for it)
    return cb


def _sample_sde(model, eps, sampler, steps, schedule, prediction_type, seed, progress, callback, options,
                cuda_graph=False):
    from pygen import sde as _sde

    sde = _schedules.VPSDE() if schedule is None else schedule
    if not isinstance(sde, (_schedules.VPSDE, _schedules.VESDE)):
        raise TypeError(f"schedule must be a pygen.schedules VPSDE, SubVPSDE or VESDE for {sampler!r}, "
                        f"got {type(sde).__name__}")
    predictor = options.get("predictor", "reverse_diffusion")
    if sampler == "pc" and predictor in ("reverse_diffusion", "ancestral") and sde.N != steps:
        # score_sde discretises these predictors with N = the number of loop steps
        sde = (type(sde)(sde.beta_min, sde.beta_max, steps) if isinstance(sde, _schedules.VPSDE)
               else type(sde)(sde.sigma_min, sde.sigma_max, steps))
    score = _score_fn(model, prediction_type, sde)
    x_T = (eps.to(torch.float64 if eps.dtype == torch.float64 else torch.float32) * sde.prior_std).to(eps.dtype)
    bar = _progress(steps, progress)
    try:
        cb = _bar_callback(bar, callback)
        if sampler == "pc":
            return _sde.pc_sample(score, sde, x_T=x_T, n_steps=steps, seed=seed, callback=cb, cuda_graph=cuda_graph,
                                  **options)
        if sampler == "annealed_langevin":
            return _sde.annealed_langevin(score, sde, x_T=x_T, n_levels=steps, seed=seed, callback=cb,
                                          cuda_graph=cuda_graph, **options)
        return _sde.ode_sample(score, sde, x_T=x_T, method=sampler[4:], n_steps=steps, seed=seed, callback=cb,
                               cuda_graph=cuda_graph, **options)
    finally:
        if bar is not None:
            bar.close()


def _sample_mcmc(model, x, sampler, steps, prediction_type, seed, progress, callback, options, cuda_graph=False):
    from pygen import mcmc as _mcmc

    if prediction_type not in ("energy", "score") or (prediction_type == "score" and sampler != "ula"):
        want = "'energy' or 'score'" if sampler == "ula" else "'energy'"
        raise ValueError(f"prediction_type {prediction_type!r} is not valid for {sampler!r}; use {want}")
    if "step_size" not in options:
        raise TypeError(f"sampler {sampler!r} needs the option step_size=")
    bar = _progress(steps, progress)
    try:
        kw = dict(n_steps=steps, seed=seed, callback=_bar_callback(bar, callback), cuda_graph=cuda_graph)
        if sampler == "ula":
            fn = dict(score_fn=model) if prediction_type == "score" else dict(energy_fn=model)
            return _mcmc.ula(x, **kw, **fn, **options)
        if sampler == "replica_exchange":
            opts = dict(options)
            betas = opts.pop("betas", None)
            if betas is None:
                raise TypeError("sampler 'replica_exchange' needs the option betas= (a ladder in [0, 1])")
            return _mcmc.replica_exchange(x, model, betas, **kw, **opts)[0]
        return getattr(_mcmc, sampler)(x, model, **kw, **options)[0]
    finally:
        if bar is not None:
            bar.close()
