"""Noise schedules: the math layer (DESIGN.md, Layers §1), in plain PyTorch.

One definition of each formula; samplers, ops and kernels take their tables
from here. Nothing in this file launches a kernel of its own (the fused
per-step coefficient table is ``pygen.ops.schedule``).

Contents
--------
Discrete beta schedules (diffusers semantics)
    ``betas(name, num_train_timesteps, beta_start, beta_end, *, max_beta)`` with
    names ``BETA_SCHEDULES``; ``betas_for_alpha_bar``;
    ``rescale_zero_terminal_snr(betas)``; ``alphas_cumprod(betas)``.
Continuous SDEs (Song et al. 2021, score_sde)
    ``VPSDE``, ``SubVPSDE``, ``VESDE``: beta(t), drift factor f(t), diffusion
    g(t), marginal mean coefficient and std, log-SNR, and the discretizations
    score_sde uses (DDPM for VP, Euler–Maruyama for sub-VP, SMLD for VE).
Sigma schedules (k-diffusion semantics)
    ``karras_sigmas``, ``exponential_sigmas``, ``polyexponential_sigmas``,
    ``vp_sigmas`` (each n sigmas, descending, then an appended 0 unless
    ``append_zero=False``), and ``sigma_schedule(name, ...)``.
Conversions between parameterisations
    ``sigmas_from_alphas_cumprod``, ``alphas_cumprod_from_sigmas``,
    ``log_snr_from_alphas_cumprod``, ``alphas_cumprod_from_log_snr``,
    ``log_snr_from_sigmas``, ``sigmas_from_log_snr``, and interpolation in a
    discrete sigma table: ``sigma_to_t``, ``t_to_sigma``.
Timestep spacings (diffusers DDIM/DDPM/EulerDiscrete ``set_timesteps``)
    ``timesteps(num_inference_steps, num_train_timesteps, spacing,
    steps_offset)`` and ``inference_sigmas`` (EulerDiscreteScheduler's sigma
    schedule, with Karras/exponential variants).
``NoiseSchedule``
    the tables of a discrete schedule kept on a target device, built like a
    diffusers scheduler config (``NoiseSchedule.from_config``).

Numerics: every table is computed on the CPU in float64 and then moved and
cast (``device=``, ``dtype=``; float64 by default), so a schedule does not
depend on the device it ends up on. Functions that take tensors compute in the
tensor's floating dtype (integers are promoted to float64) on its device.
Bad arguments raise ``ValueError``/``TypeError`` naming the argument.
"""
import math
import numbers
from collections.abc import Mapping

import torch

__all__ = [
    "BETA_SCHEDULES",
    "SIGMA_SCHEDULES",
    "TIMESTEP_SPACINGS",
    "betas",
    "betas_for_alpha_bar",
    "rescale_zero_terminal_snr",
    "alphas_cumprod",
    "SDE",
    "VPSDE",
    "SubVPSDE",
    "VESDE",
    "karras_sigmas",
    "exponential_sigmas",
    "polyexponential_sigmas",
    "vp_sigmas",
    "sigma_schedule",
    "sigmas_from_alphas_cumprod",
    "alphas_cumprod_from_sigmas",
    "log_snr_from_alphas_cumprod",
    "alphas_cumprod_from_log_snr",
    "log_snr_from_sigmas",
    "sigmas_from_log_snr",
    "sigma_to_t",
    "t_to_sigma",
    "timesteps",
    "inference_sigmas",
    "NoiseSchedule",
]

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid", "exp", "laplace")
ALPHA_TRANSFORMS = ("cosine", "exp", "laplace")
SIGMA_SCHEDULES = ("karras", "exponential", "polyexponential", "vp")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
FINAL_SIGMAS = ("zero", "sigma_min")
FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)

_F64 = torch.float64
_CPU = torch.device("cpu")


# ---------------------------------------------------------------------------
# argument checks
# ---------------------------------------------------------------------------
def _check_int(name, value, minimum=None, maximum=None):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
    return value


def _check_float(name, value, *, gt=None, ge=None, lt=None, le=None):
    """A finite real number (Python number, numpy scalar or 0-d tensor) -> float."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_complex() or value.dtype == torch.bool:
            raise TypeError(f"{name} must be a real number, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if gt is not None and not value > gt:
        raise ValueError(f"{name} must be > {gt}, got {value}")
    if ge is not None and not value >= ge:
        raise ValueError(f"{name} must be >= {ge}, got {value}")
    if lt is not None and not value < lt:
        raise ValueError(f"{name} must be < {lt}, got {value}")
    if le is not None and not value <= le:
        raise ValueError(f"{name} must be <= {le}, got {value}")
    return value


def _check_choice(name, value, choices):
    if not isinstance(value, str) or value not in choices:
        valid = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{name} must be one of {valid}; got {value!r}")
    return value


def _check_dtype(dtype, name="dtype"):
    if dtype not in FLOAT_DTYPES:
        valid = ", ".join(str(d).replace("torch.", "") for d in FLOAT_DTYPES)
        raise TypeError(f"{name} must be a floating dtype ({valid}), got {dtype}")
    return dtype


def _check_bool(name, value):
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def _finish(table, device, dtype):
    """Move a CPU float64 table to its target ``device`` and ``dtype``."""
    _check_dtype(dtype)
    return table.to(device=_CPU if device is None else device, dtype=dtype)


def _as_float(name, x):
    """Tensor (any float dtype, kept; ints/bools -> float64) or number/sequence -> float64 CPU tensor."""
    if isinstance(x, torch.Tensor):
        if x.is_complex():
            raise TypeError(f"{name} must be real, got dtype {x.dtype}")
        return x if x.is_floating_point() else x.to(_F64)
    if isinstance(x, bool):
        raise TypeError(f"{name} must be a number, sequence of numbers or tensor, got bool")
    try:
        return torch.as_tensor(x, dtype=_F64)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(f"{name} must be a number, sequence of numbers or tensor, got {type(x).__name__}") from exc


def _as_table(name, x, min_len=1):
    t = _as_float(name, x)
    if t.dim() != 1 or t.shape[0] < min_len:
        raise ValueError(f"{name} must be 1-D with at least {min_len} element(s), got shape {tuple(t.shape)}")
    return t


# ---------------------------------------------------------------------------
# discrete beta schedules (diffusers)
# ---------------------------------------------------------------------------
def _alpha_bar(t, transform):
    """alpha_bar(t) for t in [0, 1] of ``betas_for_alpha_bar`` (float64 tensor ``t``)."""
    if transform == "cosine":  # Nichol & Dhariwal (GLIDE) cosine, s = 0.008
        return torch.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    if transform == "exp":
        return torch.exp(t * -12.0)
    # "laplace": log-SNR lambda(t) = -0.5 * sign(0.5 - t) * log(1 - 2|0.5 - t| + 1e-6)
    d = 0.5 - t
    lmb = -0.5 * torch.where(d < 0, -1.0, 1.0).to(t.dtype) * torch.log(1 - 2 * d.abs() + 1e-6)
    snr = torch.exp(lmb)
    return torch.sqrt(snr / (1 + snr))


def betas_for_alpha_bar(num_train_timesteps, alpha_transform_type="cosine", max_beta=0.999, *, device=None,
                        dtype=_F64):
    """beta_i = min(1 - alpha_bar((i+1)/N) / alpha_bar(i/N), max_beta) for i = 0..N-1.

    ``alpha_transform_type``: "cosine" (GLIDE, cos((t+0.008)/1.008·π/2)²),
    "exp" (exp(-12 t)) or "laplace" — diffusers' ``betas_for_alpha_bar``.
    """
    n = _check_int("num_train_timesteps", num_train_timesteps, minimum=1)
    _check_choice("alpha_transform_type", alpha_transform_type, ALPHA_TRANSFORMS)
    max_beta = _check_float("max_beta", max_beta, gt=0.0, le=1.0)
    i = torch.arange(n, dtype=_F64)
    t1 = i / n
    t2 = (i + 1) / n
    b = 1 - _alpha_bar(t2, alpha_transform_type) / _alpha_bar(t1, alpha_transform_type)
    return _finish(torch.minimum(b, torch.tensor(max_beta, dtype=_F64)), device, dtype)


def betas(name="linear", num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, *, max_beta=0.999,
          device=None, dtype=_F64):
    """Discrete betas of the schedule ``name`` (one of ``BETA_SCHEDULES``), as diffusers builds them.

    - "linear": linspace(beta_start, beta_end, N)
    - "scaled_linear": linspace(sqrt(beta_start), sqrt(beta_end), N)² (Stable Diffusion)
    - "squaredcos_cap_v2": ``betas_for_alpha_bar(N, "cosine", max_beta)`` (beta_start/end unused)
    - "sigmoid": sigmoid(linspace(-6, 6, N)) · (beta_end - beta_start) + beta_start (GeoDiff)
    - "exp": ``betas_for_alpha_bar(N, "exp", max_beta)`` (HeunDiscreteScheduler)
    - "laplace": ``betas_for_alpha_bar(N, "laplace", max_beta)`` (DDPMScheduler)
    """
    _check_choice("name", name, BETA_SCHEDULES)
    n = _check_int("num_train_timesteps", num_train_timesteps, minimum=1)
    if name == "squaredcos_cap_v2":
        return betas_for_alpha_bar(n, "cosine", max_beta, device=device, dtype=dtype)
    if name in ("exp", "laplace"):
        return betas_for_alpha_bar(n, name, max_beta, device=device, dtype=dtype)
    beta_start = _check_float("beta_start", beta_start, ge=0.0, lt=1.0)
    beta_end = _check_float("beta_end", beta_end, ge=0.0, lt=1.0)
    if name == "linear":
        b = torch.linspace(beta_start, beta_end, n, dtype=_F64)
    elif name == "scaled_linear":
        b = torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=_F64) ** 2
    else:  # sigmoid
        b = torch.sigmoid(torch.linspace(-6, 6, n, dtype=_F64)) * (beta_end - beta_start) + beta_start
    return _finish(b, device, dtype)


def rescale_zero_terminal_snr(betas):
    """Rescale ``betas`` so the last timestep has zero SNR (Lin et al. 2023, Algorithm 1).

    sqrt(alphas_cumprod) is shifted so its last value is 0 and scaled so its
    first value is unchanged; the result's last beta is 1. Computed in the
    dtype of ``betas`` (float64 for non-tensors), on its device.
    """
    b = _as_table("betas", betas, min_len=2)
    s = torch.sqrt(torch.cumprod(1.0 - b, dim=0))
    s0, sT = s[0].clone(), s[-1].clone()
    s = (s - sT) * (s0 / (s0 - sT))
    ac = s * s
    alphas = torch.cat([ac[:1], ac[1:] / ac[:-1]])
    return 1 - alphas


def alphas_cumprod(betas):
    """alpha_bar_t = prod_{s<=t} (1 - beta_s), in the dtype of ``betas`` (float64 for non-tensors)."""
    b = _as_table("betas", betas)
    return torch.cumprod(1.0 - b, dim=0)


# ---------------------------------------------------------------------------
# parameterisations: alpha_bar <-> sigma <-> log-SNR
# (sigma is the k-diffusion / variance-exploding noise level of x / sqrt(alpha_bar))
# ---------------------------------------------------------------------------
def sigmas_from_alphas_cumprod(alphas_cumprod):
    """sigma = sqrt((1 - alpha_bar) / alpha_bar)."""
    a = _as_float("alphas_cumprod", alphas_cumprod)
    return torch.sqrt((1 - a) / a)


def alphas_cumprod_from_sigmas(sigmas):
    """alpha_bar = 1 / (1 + sigma²)."""
    s = _as_float("sigmas", sigmas)
    return 1 / (1 + s * s)


def log_snr_from_alphas_cumprod(alphas_cumprod):
    """lambda = log(alpha_bar / (1 - alpha_bar)), as log(alpha_bar) - log1p(-alpha_bar)."""
    a = _as_float("alphas_cumprod", alphas_cumprod)
    return torch.log(a) - torch.log1p(-a)


def alphas_cumprod_from_log_snr(log_snr):
    """alpha_bar = sigmoid(lambda)."""
    return torch.sigmoid(_as_float("log_snr", log_snr))


def log_snr_from_sigmas(sigmas):
    """lambda = -2 log(sigma)."""
    return -2 * torch.log(_as_float("sigmas", sigmas))


def sigmas_from_log_snr(log_snr):
    """sigma = exp(-lambda / 2)."""
    return torch.exp(-0.5 * _as_float("log_snr", log_snr))


def sigma_to_t(sigma, sigmas, quantize=False):
    """Fractional train timestep of noise level ``sigma`` in the ascending table ``sigmas``.

    k-diffusion's ``DiscreteSchedule.sigma_to_t`` (= diffusers' ``_sigma_to_t``):
    linear interpolation in log sigma between the two neighbouring table
    entries, clamped to [0, len(sigmas) - 1]. ``quantize=True`` returns the
    index (int64) of the nearest entry in log sigma instead. NaN in ``sigma``
    gives NaN (not quantized).
    """
    table = _as_table("sigmas", sigmas, min_len=2)
    s = _as_float("sigma", sigma)
    if s.device != table.device:
        raise ValueError(f"sigma must be on the device of sigmas ({table.device}), got {s.device}")
    _check_bool("quantize", quantize)
    dtype = torch.promote_types(table.dtype, s.dtype)
    log_table = torch.log(table.to(dtype))
    log_sigma = torch.log(s.to(dtype)).reshape(-1)
    dists = log_sigma - log_table[:, None]
    if quantize:
        return dists.abs().argmin(dim=0).view(s.shape)
    low_idx = dists.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=table.shape[0] - 2)
    high_idx = low_idx + 1
    low, high = log_table[low_idx], log_table[high_idx]
    w = ((low - log_sigma) / (low - high)).clamp(0, 1)
    t = (1 - w) * low_idx + w * high_idx
    return torch.where(torch.isnan(log_sigma), torch.nan, t).view(s.shape)


def t_to_sigma(t, sigmas, log_space=True):
    """Noise level at fractional train timestep ``t`` of the ascending table ``sigmas``.

    ``log_space=True``: interpolate log sigma (k-diffusion ``DiscreteSchedule.t_to_sigma``);
    ``False``: interpolate sigma itself (``np.interp``, diffusers EulerDiscreteScheduler).
    ``t`` must lie in [0, len(sigmas) - 1]; NaN in ``t`` gives NaN.
    """
    table = _as_table("sigmas", sigmas)
    tt = _as_float("t", t)
    _check_bool("log_space", log_space)
    if tt.device != table.device:
        raise ValueError(f"t must be on the device of sigmas ({table.device}), got {tt.device}")
    last = table.shape[0] - 1
    if tt.device.type != "meta" and bool(((tt < 0) | (tt > last)).any()):
        raise ValueError(f"t must lie in [0, {last}] (the sigmas table's index range)")
    nan = torch.isnan(tt)
    safe = torch.where(nan, 0.0, tt)
    low = safe.floor().long()
    high = safe.ceil().long()
    w = (safe - low).to(table.dtype)
    vals = torch.log(table) if log_space else table
    out = (1 - w) * vals[low] + w * vals[high]
    if log_space:
        out = out.exp()
    return torch.where(nan, torch.nan, out)


# ---------------------------------------------------------------------------
# sigma schedules (k-diffusion get_sigmas_*)
# ---------------------------------------------------------------------------
def _sigma_range(sigma_min, sigma_max):
    sigma_min = _check_float("sigma_min", sigma_min, gt=0.0)
    sigma_max = _check_float("sigma_max", sigma_max)
    if not sigma_max > sigma_min:
        raise ValueError(f"sigma_max must be > sigma_min ({sigma_min}), got {sigma_max}")
    return sigma_min, sigma_max


def _append_zero(sigmas, append_zero):
    _check_bool("append_zero", append_zero)
    return torch.cat([sigmas, sigmas.new_zeros(1)]) if append_zero else sigmas


def karras_sigmas(n, sigma_min, sigma_max, rho=7.0, *, append_zero=True, device=None, dtype=_F64):
    """Karras et al. (2022) eq. 5: (sigma_max^(1/rho) + i/(n-1)·(sigma_min^(1/rho) - sigma_max^(1/rho)))^rho."""
    n = _check_int("n", n, minimum=1)
    sigma_min, sigma_max = _sigma_range(sigma_min, sigma_max)
    rho = _check_float("rho", rho, gt=0.0)
    ramp = torch.linspace(0, 1, n, dtype=_F64)
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    s = (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho
    return _finish(_append_zero(s, append_zero), device, dtype)


def exponential_sigmas(n, sigma_min, sigma_max, *, append_zero=True, device=None, dtype=_F64):
    """Geometric sigmas from sigma_max down to sigma_min: exp(linspace(log sigma_max, log sigma_min, n))."""
    n = _check_int("n", n, minimum=1)
    sigma_min, sigma_max = _sigma_range(sigma_min, sigma_max)
    s = torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=_F64).exp()
    return _finish(_append_zero(s, append_zero), device, dtype)


def polyexponential_sigmas(n, sigma_min, sigma_max, rho=1.0, *, append_zero=True, device=None, dtype=_F64):
    """Polynomial in log sigma: exp(linspace(1, 0, n)^rho · (log sigma_max - log sigma_min) + log sigma_min)."""
    n = _check_int("n", n, minimum=1)
    sigma_min, sigma_max = _sigma_range(sigma_min, sigma_max)
    rho = _check_float("rho", rho, gt=0.0)
    ramp = torch.linspace(1, 0, n, dtype=_F64) ** rho
    s = torch.exp(ramp * (math.log(sigma_max) - math.log(sigma_min)) + math.log(sigma_min))
    return _finish(_append_zero(s, append_zero), device, dtype)


def vp_sigmas(n, beta_d=19.9, beta_min=0.1, eps_s=1e-3, *, append_zero=True, device=None, dtype=_F64):
    """Continuous VP noise levels at t = linspace(1, eps_s, n): sqrt(exp(beta_d t²/2 + beta_min t) - 1).

    (= ``VPSDE(beta_min, beta_min + beta_d).sigma(t)``.)
    """
    n = _check_int("n", n, minimum=1)
    beta_d = _check_float("beta_d", beta_d, ge=0.0)
    beta_min = _check_float("beta_min", beta_min, ge=0.0)
    if beta_d == 0.0 and beta_min == 0.0:
        raise ValueError("beta_d and beta_min must not both be 0 (every sigma would be 0)")
    eps_s = _check_float("eps_s", eps_s, gt=0.0, le=1.0)
    t = torch.linspace(1, eps_s, n, dtype=_F64)
    s = torch.sqrt(torch.exp(beta_d * t**2 / 2 + beta_min * t) - 1)
    return _finish(_append_zero(s, append_zero), device, dtype)


_SIGMA_FNS = {
    "karras": karras_sigmas,
    "exponential": exponential_sigmas,
    "polyexponential": polyexponential_sigmas,
    "vp": vp_sigmas,
}


def sigma_schedule(name, n, *args, **kwargs):
    """``{name}_sigmas(n, *args, **kwargs)`` for ``name`` in ``SIGMA_SCHEDULES``."""
    _check_choice("name", name, SIGMA_SCHEDULES)
    return _SIGMA_FNS[name](n, *args, **kwargs)


# ---------------------------------------------------------------------------
# timestep spacings (diffusers set_timesteps)
# ---------------------------------------------------------------------------
def timesteps(num_inference_steps, num_train_timesteps=1000, spacing="leading", steps_offset=0, *, rounded=True,
              device=None):
    """Descending inference timesteps, as diffusers' ``set_timesteps`` spaces them.

    - "leading": ``arange(n) * (N // n)`` reversed, plus ``steps_offset``.
    - "trailing": ``round(N - i·N/n) - 1`` for i = 0..n-1 (rounding half to
      even on the float64 values numpy's ``arange(N, 0, -N/n)`` produces).
    - "linspace": ``linspace(0, N - 1, n)`` reversed; rounded half to even.

    As in diffusers, ``steps_offset`` applies to "leading" only. ``rounded=True``
    returns int64 (DDIM/DDPM); ``rounded=False`` returns float64 with the
    "linspace" values left unrounded (EulerDiscreteScheduler). Exactly
    ``num_inference_steps`` values are returned: for some n (e.g. N=1000, n=61)
    diffusers' "trailing" float ``arange`` yields one extra timestep (-1);
    that spurious value is not reproduced.
    """
    N = _check_int("num_train_timesteps", num_train_timesteps, minimum=1)
    n = _check_int("num_inference_steps", num_inference_steps, minimum=1, maximum=N)
    _check_choice("spacing", spacing, TIMESTEP_SPACINGS)
    offset = _check_int("steps_offset", steps_offset)
    _check_bool("rounded", rounded)
    i = torch.arange(n, dtype=_F64)
    if spacing == "leading":
        t = (i * (N // n)).flip(0) + offset
        if t[0] > N - 1 or t[-1] < 0:
            raise ValueError(
                f"steps_offset={offset} moves the 'leading' timesteps outside [0, {N - 1}] "
                f"(they span [{int(t[-1])}, {int(t[0])}])"
            )
    elif spacing == "trailing":
        delta = (N - N / n) - N  # the step numpy's arange(N, 0, -N/n) actually takes
        t = torch.round(N + i * delta) - 1
    else:  # linspace, as numpy computes it: i * step, last value pinned to N - 1
        t = i * ((N - 1) / (n - 1)) if n > 1 else i
        if n > 1:
            t[-1] = N - 1
        t = t.flip(0)
        if rounded:
            t = torch.round(t)
    t = t.to(torch.int64) if rounded else t
    return t.to(_CPU if device is None else device)


def inference_sigmas(alphas_cumprod, num_inference_steps, spacing="linspace", steps_offset=0, *,
                     sigma_schedule=None, sigma_min=None, sigma_max=None, rho=7.0, final_sigma="zero",
                     device=None, dtype=_F64):
    """EulerDiscreteScheduler's inference schedule: ``(timesteps, sigmas)``.

    ``timesteps`` (float64, length n) are the unrounded spacings of
    ``timesteps(..., rounded=False)``; ``sigmas`` (length n + 1) interpolate the
    train sigma table sqrt((1 - alpha_bar)/alpha_bar) linearly at them. With
    ``sigma_schedule="karras"`` (``rho``) or ``"exponential"`` the n sigmas are
    replaced by that schedule between ``sigma_min``/``sigma_max`` (default: the
    interpolated sigmas' last and first values) and the timesteps are mapped
    back with ``sigma_to_t``. The appended final sigma is 0 (``final_sigma=
    "zero"``) or the train table's smallest sigma (``"sigma_min"``).
    """
    ac = _as_table("alphas_cumprod", alphas_cumprod, min_len=2).to(device=_CPU, dtype=_F64)
    N = ac.shape[0]
    if sigma_schedule is not None:
        _check_choice("sigma_schedule", sigma_schedule, ("karras", "exponential"))
    _check_choice("final_sigma", final_sigma, FINAL_SIGMAS)
    ts = timesteps(num_inference_steps, N, spacing, steps_offset, rounded=False)
    n = ts.shape[0]
    table = sigmas_from_alphas_cumprod(ac)
    s = t_to_sigma(ts, table, log_space=False)
    if sigma_schedule is not None:
        lo = s[-1].item() if sigma_min is None else sigma_min
        hi = s[0].item() if sigma_max is None else sigma_max
        if sigma_schedule == "karras":
            s = karras_sigmas(n, lo, hi, rho, append_zero=False)
        else:
            s = exponential_sigmas(n, lo, hi, append_zero=False)
        ts = sigma_to_t(s, table)
    last = table[:1] if final_sigma == "sigma_min" else table.new_zeros(1)
    s = torch.cat([s, last])
    return ts.to(_CPU if device is None else device), _finish(s, device, dtype)


# ---------------------------------------------------------------------------
# continuous SDEs (Song et al. 2021)
# ---------------------------------------------------------------------------
class SDE:
    """A linear SDE dx = f(t)·x dt + g(t) dW on t in [0, T] with Gaussian marginals.

    p_t(x_t | x_0) = N(mean_coeff(t)·x_0, marginal_std(t)²·I). Methods take
    ``t`` as a number (computed in float64 on the CPU) or a tensor (computed
    in its floating dtype, on its device) and return tensors of t's shape.
    ``N`` is the number of discretization steps of ``discretize``.
    """

    T = 1.0

    def __init__(self, N=1000):
        self.N = _check_int("N", N, minimum=1)

    def drift_coeff(self, t):
        """f(t), the drift's factor on x."""
        raise NotImplementedError

    def diffusion_coeff(self, t):
        """g(t)."""
        raise NotImplementedError

    def mean_coeff(self, t):
        """The factor on x_0 of the marginal mean at t."""
        raise NotImplementedError

    def marginal_std(self, t):
        """The marginal standard deviation at t."""
        raise NotImplementedError

    def sigma(self, t):
        """The equivalent noise level marginal_std(t) / mean_coeff(t) of x_t / mean_coeff(t)."""
        return self.marginal_std(t) / self.mean_coeff(t)

    def log_snr(self, t):
        """lambda(t) = log(mean_coeff² / marginal_std²)."""
        return -2 * torch.log(self.sigma(t))

    @property
    def prior_std(self):
        """Standard deviation of the prior N(0, prior_std²·I) at t = T."""
        raise NotImplementedError

    def discretize(self, t):
        """(f, G) of the step x_{i+1} = x_i + f·x_i + G·z at time t (f is the factor on x).

        The default is Euler–Maruyama with dt = T/N: f = f(t)·dt, G = g(t)·sqrt(dt).
        """
        dt = 1.0 / self.N
        return self.drift_coeff(t) * dt, self.diffusion_coeff(t) * math.sqrt(dt)

    def _t(self, t):
        tt = _as_float("t", t)
        if tt.device.type != "meta" and bool(((tt < 0) | (tt > self.T)).any()):
            raise ValueError(f"t must lie in [0, {self.T}]")
        return tt

    def _timestep(self, t):
        """(t, index, nan mask): the discrete index of t as score_sde takes it, (t·(N - 1) / T).long()
        (0 where t is NaN; the caller turns those outputs into NaN)."""
        t = self._t(t)
        nan = torch.isnan(t)
        return t, (torch.where(nan, 0.0, t) * (self.N - 1) / self.T).long(), nan


class VPSDE(SDE):
    """Variance preserving SDE: beta(t) = beta_min + t·(beta_max - beta_min), f = -beta/2, g = sqrt(beta).

    Marginal: mean_coeff = exp(-B(t)/2), std = sqrt(1 - exp(-B(t))) with
    B(t) = ∫_0^t beta = beta_min·t + (beta_max - beta_min)·t²/2. The discrete
    chain (DDPM) has betas linspace(beta_min/N, beta_max/N, N).
    """

    def __init__(self, beta_min=0.1, beta_max=20.0, N=1000):
        super().__init__(N)
        self.beta_min = _check_float("beta_min", beta_min, ge=0.0)
        self.beta_max = _check_float("beta_max", beta_max, gt=0.0)
        if self.beta_max < self.beta_min:
            raise ValueError(f"beta_max must be >= beta_min ({self.beta_min}), got {self.beta_max}")

    def __repr__(self):
        return f"{type(self).__name__}(beta_min={self.beta_min}, beta_max={self.beta_max}, N={self.N})"

    def beta(self, t):
        return self.beta_min + self._t(t) * (self.beta_max - self.beta_min)

    def integral_beta(self, t):
        """B(t) = ∫_0^t beta(s) ds."""
        t = self._t(t)
        return self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t * t

    def log_mean_coeff(self, t):
        return -0.5 * self.integral_beta(t)

    def drift_coeff(self, t):
        return -0.5 * self.beta(t)

    def diffusion_coeff(self, t):
        return torch.sqrt(self.beta(t))

    def mean_coeff(self, t):
        return torch.exp(self.log_mean_coeff(t))

    def marginal_std(self, t):
        return torch.sqrt(-torch.expm1(-self.integral_beta(t)))

    def sigma(self, t):
        return torch.sqrt(torch.expm1(self.integral_beta(t)))

    def log_snr(self, t):
        return -torch.log(torch.expm1(self.integral_beta(t)))

    def t_from_integral_beta(self, integral):
        """Inverse of ``integral_beta``: the t >= 0 with B(t) = integral."""
        b = _as_float("integral", integral)
        d = self.beta_max - self.beta_min
        if d == 0.0:
            return b / self.beta_min
        return 2 * b / (torch.sqrt(self.beta_min**2 + 2 * d * b) + self.beta_min)

    def t_from_sigma(self, sigma):
        """Inverse of ``sigma(t)``: the t with B(t) = log(1 + sigma²)."""
        s = _as_float("sigma", sigma)
        return self.t_from_integral_beta(torch.log1p(s * s))

    @property
    def prior_std(self):
        return 1.0

    def discrete_betas(self, *, device=None, dtype=_F64):
        """linspace(beta_min / N, beta_max / N, N) (score_sde)."""
        b = torch.linspace(self.beta_min / self.N, self.beta_max / self.N, self.N, dtype=_F64)
        return _finish(b, device, dtype)

    def discrete_alphas_cumprod(self, *, device=None, dtype=_F64):
        return _finish(alphas_cumprod(self.discrete_betas()), device, dtype)

    def discretize(self, t):
        """DDPM discretization: f = sqrt(1 - beta_i) - 1, G = sqrt(beta_i), i = (t·(N-1)/T).long()."""
        t, i, nan = self._timestep(t)
        beta = self.discrete_betas(device=t.device, dtype=t.dtype)[i]
        beta = torch.where(nan, torch.nan, beta)
        return torch.sqrt(1 - beta) - 1, torch.sqrt(beta)


class SubVPSDE(VPSDE):
    """sub-VP SDE: f = -beta(t)/2, g = sqrt(beta(t)·(1 - exp(-2·B(t)))).

    Marginal: mean_coeff = exp(-B(t)/2), std = 1 - exp(-B(t)). Discretized by
    Euler–Maruyama (score_sde's default).
    """

    def diffusion_coeff(self, t):
        return torch.sqrt(self.beta(t) * -torch.expm1(-2 * self.integral_beta(t)))

    def marginal_std(self, t):
        return -torch.expm1(-self.integral_beta(t))

    def sigma(self, t):
        """(1 - exp(-B)) / exp(-B/2) = 2·sinh(B(t)/2)."""
        return 2 * torch.sinh(0.5 * self.integral_beta(t))

    def log_snr(self, t):
        return -2 * torch.log(self.sigma(t))

    def t_from_sigma(self, sigma):
        """Inverse of ``sigma(t)``: the t with B(t) = 2·asinh(sigma/2)."""
        s = _as_float("sigma", sigma)
        return self.t_from_integral_beta(2 * torch.asinh(0.5 * s))

    def discretize(self, t):
        return SDE.discretize(self, t)


class VESDE(SDE):
    """Variance exploding SDE: sigma(t) = sigma_min·(sigma_max/sigma_min)^t, f = 0,
    g = sigma(t)·sqrt(2·log(sigma_max/sigma_min)); mean_coeff = 1, std = sigma(t).

    The discrete noise levels (SMLD/NCSN) are geometric:
    exp(linspace(log sigma_min, log sigma_max, N)).
    """

    def __init__(self, sigma_min=0.01, sigma_max=50.0, N=1000):
        super().__init__(N)
        self.sigma_min, self.sigma_max = _sigma_range(sigma_min, sigma_max)

    def __repr__(self):
        return f"VESDE(sigma_min={self.sigma_min}, sigma_max={self.sigma_max}, N={self.N})"

    def sigma(self, t):
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** self._t(t)

    def drift_coeff(self, t):
        return self._t(t) * 0.0  # 0, NaN where t is NaN

    def diffusion_coeff(self, t):
        return self.sigma(t) * math.sqrt(2 * (math.log(self.sigma_max) - math.log(self.sigma_min)))

    def mean_coeff(self, t):
        return self._t(t) * 0.0 + 1.0  # 1, NaN where t is NaN

    def marginal_std(self, t):
        return self.sigma(t)

    def t_from_sigma(self, sigma):
        """Inverse of ``sigma(t)``: log(sigma/sigma_min) / log(sigma_max/sigma_min)."""
        s = _as_float("sigma", sigma)
        return torch.log(s / self.sigma_min) / math.log(self.sigma_max / self.sigma_min)

    @property
    def prior_std(self):
        return self.sigma_max

    def discrete_sigmas(self, *, device=None, dtype=_F64):
        """exp(linspace(log sigma_min, log sigma_max, N)) (score_sde)."""
        s = torch.exp(torch.linspace(math.log(self.sigma_min), math.log(self.sigma_max), self.N, dtype=_F64))
        return _finish(s, device, dtype)

    def discretize(self, t):
        """SMLD discretization: f = 0, G = sqrt(sigma_i² - sigma_{i-1}²) (sigma_{-1} = 0)."""
        t, i, nan = self._timestep(t)
        table = self.discrete_sigmas(device=t.device, dtype=t.dtype)
        prev = torch.cat([table.new_zeros(1), table[:-1]])
        sigma, adjacent = table[i], prev[i]
        g = torch.where(nan, torch.nan, torch.sqrt(sigma * sigma - adjacent * adjacent))
        return torch.where(nan, torch.nan, torch.zeros_like(g)), g


# ---------------------------------------------------------------------------
# NoiseSchedule: the tables of a discrete schedule on a device
# ---------------------------------------------------------------------------
_CONFIG_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                "rescale_betas_zero_snr", "timestep_spacing", "steps_offset")


class NoiseSchedule:
    """The tables of a discrete diffusion schedule, kept on one device in one dtype.

    Built like a diffusers scheduler: ``NoiseSchedule(num_train_timesteps=1000,
    beta_schedule="linear", beta_start=1e-4, beta_end=0.02, ...)`` or
    ``NoiseSchedule.from_config(scheduler.config)``. All tables are computed in
    float64 on the CPU and then moved/cast once. Tables, indexed by train
    timestep t = 0..N-1:

    ``betas``, ``alphas`` (1 - betas), ``alphas_cumprod``, ``sqrt_alphas_cumprod``,
    ``sqrt_one_minus_alphas_cumprod``, ``sigmas`` (sqrt((1-ᾱ)/ᾱ), ascending in t)
    and ``log_snr`` (log(ᾱ/(1-ᾱ))).

    With ``rescale_betas_zero_snr=True`` the last alpha_bar is 0, so the last
    sigma is inf and the last log-SNR is -inf (samplers that need a finite
    value clamp it themselves, as diffusers' Euler scheduler does with 2**-24).
    ``timestep_spacing``/``steps_offset`` are the defaults of ``.timesteps()``.
    """

    TABLES = ("betas", "alphas", "alphas_cumprod", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
              "sigmas", "log_snr")

    def __init__(self, num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                 trained_betas=None, rescale_betas_zero_snr=False, timestep_spacing="leading", steps_offset=0, *,
                 device=None, dtype=_F64):
        _check_dtype(dtype)
        _check_bool("rescale_betas_zero_snr", rescale_betas_zero_snr)
        _check_choice("timestep_spacing", timestep_spacing, TIMESTEP_SPACINGS)
        steps_offset = _check_int("steps_offset", steps_offset)
        if trained_betas is not None:
            b = _as_table("trained_betas", trained_betas).detach().to(device=_CPU, dtype=_F64).clone()
            trained_betas = b.tolist()
            num_train_timesteps = b.shape[0]
        else:
            b = betas(beta_schedule, num_train_timesteps, beta_start, beta_end)
        num_train_timesteps = _check_int("num_train_timesteps", num_train_timesteps, minimum=1)
        if rescale_betas_zero_snr:
            b = rescale_zero_terminal_snr(b)
        self.config = {
            "num_train_timesteps": num_train_timesteps,
            "beta_start": beta_start,
            "beta_end": beta_end,
            "beta_schedule": beta_schedule,
            "trained_betas": trained_betas,
            "rescale_betas_zero_snr": rescale_betas_zero_snr,
            "timestep_spacing": timestep_spacing,
            "steps_offset": steps_offset,
        }
        ac = alphas_cumprod(b)
        tables = {
            "betas": b,
            "alphas": 1 - b,
            "alphas_cumprod": ac,
            "sqrt_alphas_cumprod": torch.sqrt(ac),
            "sqrt_one_minus_alphas_cumprod": torch.sqrt(1 - ac),
            "sigmas": sigmas_from_alphas_cumprod(ac),
            "log_snr": log_snr_from_alphas_cumprod(ac),
        }
        self._set_tables(tables, device, dtype)

    def _set_tables(self, tables, device, dtype):
        self.device = torch.device(_CPU if device is None else device)
        self.dtype = dtype
        for name in self.TABLES:
            setattr(self, name, tables[name].to(device=self.device, dtype=dtype))
        self._float64 = tables if tables["betas"].dtype == _F64 and tables["betas"].device == _CPU else \
            {k: v.to(device=_CPU, dtype=_F64) for k, v in tables.items()}

    @classmethod
    def from_config(cls, config, *, device=None, dtype=_F64, **overrides):
        """Build from a diffusers scheduler config (a dict/FrozenDict, or a scheduler with ``.config``).

        Reads num_train_timesteps, beta_start, beta_end, beta_schedule,
        trained_betas, rescale_betas_zero_snr, timestep_spacing and
        steps_offset; other keys (prediction_type, _class_name, ...) are
        ignored. Missing keys take diffusers' DDPM/DDIM defaults. Keyword
        ``overrides`` replace config values.
        """
        if not isinstance(config, Mapping) and isinstance(getattr(config, "config", None), Mapping):
            config = config.config
        if not isinstance(config, Mapping):
            raise TypeError(f"config must be a mapping (a diffusers scheduler config), got {type(config).__name__}")
        unknown = set(overrides) - set(_CONFIG_KEYS)
        if unknown:
            raise TypeError(f"unexpected override(s) {sorted(unknown)}; valid: {', '.join(_CONFIG_KEYS)}")
        kwargs = {k: config[k] for k in _CONFIG_KEYS if k in config and config[k] is not None}
        kwargs.update(overrides)
        return cls(**kwargs, device=device, dtype=dtype)

    def to(self, device=None, dtype=None):
        """A copy with every table on ``device`` in ``dtype`` (unchanged where None); self is not modified."""
        new = object.__new__(type(self))
        new.config = dict(self.config)
        new._set_tables(self._float64, self.device if device is None else device,
                        self.dtype if dtype is None else _check_dtype(dtype))
        return new

    @property
    def num_train_timesteps(self):
        return self.config["num_train_timesteps"]

    def __len__(self):
        return self.num_train_timesteps

    def __repr__(self):
        c = self.config
        kind = "trained_betas" if c["trained_betas"] is not None else repr(c["beta_schedule"])
        return (f"NoiseSchedule({kind}, num_train_timesteps={c['num_train_timesteps']}, "
                f"rescale_betas_zero_snr={c['rescale_betas_zero_snr']}, device={self.device}, dtype={self.dtype})")

    def timesteps(self, num_inference_steps, spacing=None, steps_offset=None, *, rounded=True):
        """``timesteps(num_inference_steps, N, spacing, steps_offset)`` on this schedule's device;
        spacing and offset default to the schedule's ``timestep_spacing``/``steps_offset``."""
        return timesteps(num_inference_steps, self.num_train_timesteps,
                         self.config["timestep_spacing"] if spacing is None else spacing,
                         self.config["steps_offset"] if steps_offset is None else steps_offset,
                         rounded=rounded, device=self.device)

    def inference_sigmas(self, num_inference_steps, spacing=None, steps_offset=None, **kwargs):
        """``inference_sigmas`` of this schedule's float64 alphas_cumprod, on its device in its dtype."""
        kwargs.setdefault("device", self.device)
        kwargs.setdefault("dtype", self.dtype)
        return inference_sigmas(self._float64["alphas_cumprod"], num_inference_steps,
                                self.config["timestep_spacing"] if spacing is None else spacing,
                                self.config["steps_offset"] if steps_offset is None else steps_offset, **kwargs)
