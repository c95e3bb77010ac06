"""Training losses: ``pygen.losses`` (issue 6): diffusion, denoising score matching, VAE, EBM.

Every loss here is an ordinary differentiable function: call ``.backward()`` on
what it returns. The per-element work runs in pygen's fused ops
(``pygen/ops/loss.py``): the diffusion and score-matching losses are one fused
weighted-MSE op with a fused backward, and the VAE's reparameterization and its
KL term are one fused op. The samplers the EBM loss needs are ``pygen.mcmc``'s.

Noise of the diffusion / score-matching losses: eps = ``pygen.randn(x0.shape,
seed, stream)``, always the same numbers, but where it lives depends on the
backend. On the GPU backends (Triton, CUDA; memory-bound) it is drawn inside the
``q_sample`` kernel and regenerated inside the loss kernel and its backward: it
is never kept for the backward pass. On the CPU backends (cpu, torch;
compute-bound, where a Philox pass costs more than reading a tensor) with
float32/float64 data it is drawn once and passed to both ops (measured: a
quarter to a third less time per step); float16/bfloat16 data always use the
in-kernel eps (an fp32 value, which a stored fp16/bf16 eps would round).

Diffusion (DDPM / v-prediction / rectified flow)::

    loss = pygen.losses.diffusion_loss(unet, x0, noise_scheduler, prediction_type="eps",
                                       weighting="min_snr", seed=seed, stream=step)
    loss.backward()

Denoising score matching (NCSN)::

    loss = pygen.losses.dsm_loss(score_net, x, sigmas, seed=seed, stream=step)

VAE::

    z, kl = pygen.losses.vae_reparameterize(mu, logvar, seed=seed, stream=step)
    loss = pygen.losses.elbo(x, decoder(z), kl=kl, likelihood="bernoulli")   # -ELBO, nats per example

Energy-based models::

    buffer = pygen.losses.ReplayBuffer(10000, (2,), init="uniform", low=-4, high=4)
    loss = pygen.losses.contrastive_divergence_step(energy, x, buffer, n_steps=20, step_size=1e-2,
                                                    seed=seed, stream=step)
    loss = pygen.losses.nce_loss(log_p_model, x, x_noise, log_q)

Randomness. No global RNG state is read or changed when a ``seed`` is given
(``seed=None`` draws one int from torch's default CPU generator, so
``torch.manual_seed`` makes a run reproducible). Everything a call draws is
pygen's counter-based noise: a result depends only on ``(seed, stream)`` and the
row, never on the backend or the launch geometry. For a training loop pass a
fixed seed and the step number as ``stream``. The streams used, with
``LANE = 3·2**62`` (the lane above ``pygen.mcmc``'s move/accept/swap lanes):

- ``diffusion_loss``/``dsm_loss``: eps = ``pygen.randn(x0.shape, seed, stream)``
  (the noise of ``pygen.q_sample(x0, t, table, seed=seed, stream=stream)``); a
  sampled t or sigma uses one normal per row, ``z = pygen.randn((B,), seed,
  stream + LANE)``, turned into a uniform ``u = Φ(z)`` (Φ the standard normal
  CDF, computed in float64).
- ``contrastive_divergence_step``: with ``base = stream·2**32`` (so that
  consecutive ``stream`` values never share noise), Langevin step i uses stream
  ``base + i`` (``pygen.mcmc.ula``'s move lane) and the replay buffer draws use
  ``base + LANE + k``, k = 0, 1, 2.

A per-row ``seed`` tensor (one int64 seed per batch row) makes a row's noise
and timestep independent of the batch it is in (not for the replay buffer).

NaN. A non-finite loss is never masked: NaN in the model output or the data
propagates into the returned loss. ``check_nan=True`` additionally raises
``FloatingPointError`` naming the offending rows (and their t); ``"warn"``
warns instead. Both read the per-row losses on the host (a device sync), so
they are off by default.
"""
import math
import numbers
import warnings
import weakref

import torch
import torch.nn.functional as F

from pygen import _backend
from pygen import mcmc as _mcmc
from pygen.ops._common import (
    STORAGE_DTYPES, check_like, check_real, check_stream, check_tensor, contiguous, split_seed, to_signed64,
)
from pygen.ops.forward import INTERPOLATIONS, _check_t, q_sample_launch
from pygen.ops.random import randn, randn_checked
from pygen.schedules import NoiseSchedule

__all__ = [
    "diffusion_loss", "diffusion_loss_coefficients", "dsm_loss", "vae_reparameterize", "kl_normal", "elbo",
    "ReplayBuffer", "contrastive_divergence_step", "nce_loss",
    "PREDICTION_TYPES", "WEIGHTINGS", "REDUCTIONS", "LIKELIHOODS", "FLOW_TIME_SAMPLINGS", "LANE",
]

PREDICTION_TYPES = ("eps", "v", "x0", "flow")
WEIGHTINGS = ("uniform", "min_snr", "snr", "edm")
REDUCTIONS = ("mean", "sum", "none")
LIKELIHOODS = ("gaussian", "bernoulli")
FLOW_TIME_SAMPLINGS = ("uniform", "logit_normal")
#: stream offset of the timestep / replay-buffer draws (above pygen.mcmc's three lanes)
LANE = 3 << 62
_STREAM_SHIFT = 32  # contrastive_divergence_step: base stream = stream << 32
_LOG_2PI = math.log(2.0 * math.pi)


# ---------------------------------------------------------------------------
# fused ops (pygen/ops/loss.py)
# ---------------------------------------------------------------------------
def _loss_ops():
    from pygen.ops import loss

    return loss


def _fused_mse(out, x0, coeffs, noise, seed, stream):
    """Per-row fused weighted MSE (pygen.ops.loss.fused_diffusion_mse): eps given, or regenerated from seed."""
    if noise is not None:
        return _loss_ops().fused_diffusion_mse(out, x0, coeffs, noise=noise)
    return _loss_ops().fused_diffusion_mse(out, x0, coeffs, seed=seed, stream=stream)


# ---------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------
def _choice(name, value, choices):
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"unknown {name} {value!r}; expected one of: {', '.join(repr(c) for c in choices)}")
    return value


def _check_callable(name, fn):
    if not callable(fn):
        raise TypeError(f"{name} must be callable, got {type(fn).__name__}")


def _model_kwargs(model_kwargs):
    """``model_kwargs`` as a dict: {} for None."""
    if model_kwargs is None:
        return {}
    if not isinstance(model_kwargs, dict):
        raise TypeError(f"model_kwargs must be a dict or None, got {type(model_kwargs).__name__}")
    return model_kwargs


def _noise_and_seed(noise, x, x_name, seed):
    """The training losses' noise arguments: (noise checked like x and made contiguous, or None;
    the seed, drawn when None; the int seed and per-row seeds of ``split_seed`` for x's rows)."""
    if noise is not None:
        check_like("noise", noise, x_name, x)
        noise = contiguous(noise)
    seed = _draw_seed(seed)
    seed_i, row_seeds = split_seed(seed, x.shape[0], x.device)
    return noise, seed, seed_i, row_seeds


def _table_rows(table, t, batch, seed_i, row_seeds, stream, device):
    """(table on ``device`` in its float dtype, each row's index into it): the given t, range-checked,
    or indices drawn uniformly from the rows' noise stream."""
    table = _table_on(table, device, torch.float64 if table.dtype == torch.float64 else torch.float32)
    n = table.shape[0]
    if t is None:
        return table, _sample_rows(n, batch, seed_i, row_seeds, stream, device)
    return table, _check_t(t, batch, n, device)


_THRESHOLDS = {}  # (n, device) -> float32 thresholds of _sample_rows


def _t_thresholds(n, device):
    """float32 (n - 1,) on ``device``: entry k - 1 is the smallest float32 z with ⌊Φ(z)·n⌋ >= k
    (Φ in float64), so that the number of entries <= z is min(⌊Φ(z)·n⌋, n - 1) for every float32 z.
    Made once per (n, device) on the host by bisection over the float32 values (in their order as
    integers: 32 halvings), so the search gives exactly the float64 formula's indices."""
    key = (n, device)
    thr = _THRESHOLDS.get(key)
    if thr is not None:
        return thr
    k = torch.arange(1, n, dtype=torch.int64)

    def as_float(m):  # the float32 whose order key is m (int64; negative floats: keys below 0)
        return torch.where(m >= 0, m, -(m + 1) - (1 << 31)).to(torch.int32).view(torch.float32)

    def reaches(m):
        return (torch.special.ndtr(as_float(m).to(torch.float64)) * n).to(torch.int64) >= k

    inf_key = int(torch.tensor(math.inf, dtype=torch.float32).view(torch.int32))
    lo = torch.full_like(k, -inf_key - 1)  # -inf: Φ = 0, below every level k >= 1
    hi = torch.full_like(k, inf_key)       # +inf: Φ = 1, level n
    while bool((hi - lo > 1).any()):
        mid = torch.div(lo + hi, 2, rounding_mode="floor")
        up = reaches(mid)
        hi, lo = torch.where(up, mid, hi), torch.where(up, lo, mid)
    if len(_THRESHOLDS) >= _MEMO_SIZE:
        _THRESHOLDS.clear()
    thr = _THRESHOLDS[key] = as_float(hi).to(device)
    return thr


def _sample_rows(n, batch, seed_i, row_seeds, stream, device):
    """One uniform index in [0, n) per row: ⌊Φ(z)·n⌋ (at most n - 1) for z = pygen.randn((batch,), seed,
    stream + LANE), as one search of z among the level thresholds of ``_t_thresholds`` (two device ops:
    the normal and the search; the same indices as computing Φ(z) in float64)."""
    z = randn_checked((batch,), seed_i, to_signed64(stream + LANE), row_seeds, device, torch.float32)
    if n == 1:
        return torch.zeros(batch, dtype=torch.int64, device=device)
    if (n, device) not in _THRESHOLDS and _capturing(device):  # (no host-to-device copy while capturing)
        return torch.clamp((torch.special.ndtr(z.to(torch.float64)) * n).to(torch.int64), max=n - 1)
    return torch.searchsorted(_t_thresholds(n, device), z, right=True)


def _capturing(device):
    """Whether a CUDA graph is being captured on ``device``'s current stream: set-up tables are then
    neither made (a host-to-device copy) nor cached (memory of the graph's pool)."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _draw_seed(seed):
    """``seed``, or (None) a fresh 62-bit int from torch's default CPU generator (no device sync)."""
    if seed is None:
        return int(torch.randint(0, 1 << 62, (1,), dtype=torch.int64))
    return seed


def _rows_view(c, ndim):
    return c.reshape((-1,) + (1,) * (ndim - 1))


def _row_uniforms(batch, seed_i, row_seeds, stream, device):
    """(u, z): one uniform u = Φ(z) in [0, 1] (float64) per row, z = pygen.randn((batch,), seed, stream + LANE)."""
    z = randn_checked((batch,), seed_i, to_signed64(stream + LANE), row_seeds, device, torch.float32).to(torch.float64)
    return torch.special.ndtr(z), z


def _reduce(rows, reduction):
    if reduction == "mean":
        return rows.mean()
    if reduction == "sum":
        return rows.sum()
    return rows


def _check_nan(fn, rows, check_nan, t=None):
    """Report non-finite per-row losses (host sync; only when asked)."""
    if check_nan is False or check_nan is None:
        return
    bad = ~torch.isfinite(rows.detach())
    if not bool(bad.any()):
        return
    idx = torch.nonzero(bad).flatten().tolist()
    shown = idx[:16]
    msg = f"{fn}: non-finite loss (NaN/inf) in {len(idx)} of {rows.shape[0]} rows: {shown}"
    if len(idx) > len(shown):
        msg += " ..."
    if t is not None:
        msg += f" (t = {t.detach()[shown].tolist()})"
    if check_nan == "warn":
        warnings.warn(msg, RuntimeWarning, stacklevel=3)
    else:
        raise FloatingPointError(msg)


def _check_options(reduction, check_nan):
    _choice("reduction", reduction, REDUCTIONS)
    if check_nan not in (False, True, None, "warn"):
        raise ValueError(f"check_nan must be False, True or 'warn', got {check_nan!r}")


def _model_output(name, out, like):
    """The model's output tensor (diffusers ``.sample`` / tuple outputs unwrapped), checked against ``like``."""
    if not isinstance(out, torch.Tensor):
        if hasattr(out, "sample") and isinstance(out.sample, torch.Tensor):  # diffusers UNet2DOutput & co.
            out = out.sample
        elif isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
            out = out[0]
        else:
            raise TypeError(f"{name} must return a tensor, got {type(out).__name__}")
    if out.shape != like.shape:
        raise ValueError(f"{name} output has shape {tuple(out.shape)}, expected the shape of the input "
                         f"{tuple(like.shape)}")
    if out.device != like.device:
        raise ValueError(f"{name} output is on {out.device}, expected {like.device}")
    if not out.is_floating_point():
        raise TypeError(f"{name} output must be floating point, got {out.dtype}")
    if out.dtype != like.dtype:  # e.g. a bf16 output under autocast on fp32 data (autograd casts the gradient back)
        out = out.to(like.dtype)
    return contiguous(out)


def _shared_noise(x, noise, seed_i, row_seeds, stream):
    """The noise both ops use: the given one; on the compute-bound backends (torch, cpu) and fp32/fp64
    storage, ``pygen.randn(x.shape, seed, stream)`` drawn once (one Philox pass instead of three: q_sample,
    the loss and its backward; the same numbers the kernels would regenerate); else None (each kernel
    regenerates eps: on the GPU recomputing is cheaper than storing and re-reading it)."""
    if noise is not None or x.dtype not in (torch.float32, torch.float64):
        return noise
    if _backend.resolve(x.device) not in ("torch", "cpu"):
        return None
    return randn_checked(tuple(x.shape), seed_i, stream, row_seeds, x.device, x.dtype)  # (seed split by the caller)


def _noised(x0, t, table, noise, seed_i, row_seeds, stream, interpolation):
    """x_t of ``pygen.q_sample`` (a·x0 + s·eps, eps given or drawn in the kernel) without its host-side
    range check of t (a device sync on CUDA): t here is sampled in range or was checked by the caller."""
    return q_sample_launch(x0, t, table, noise, seed_i, stream, row_seeds, INTERPOLATIONS[interpolation], 0)[0]


# Small memo tables keyed by id(table), holding a weak reference to tell a live table from a new object
# that reuses the id (tensors cannot be dict keys by value; WeakKeyDictionary would compare them with ==).
_MEMO_SIZE = 32
_TABLE_CACHE = {}  # id -> (weakref, key, table copy on the training device/dtype)
_CHECKED = {}  # id -> (weakref, key): CPU tables whose values were checked


def _memo_get(memo, table, key):
    entry = memo.get(id(table))
    if entry is not None and entry[0]() is table and entry[1] == key:
        return entry
    return None


def _memo_put(memo, table, key, *value):
    if len(memo) >= _MEMO_SIZE:
        memo.clear()
    memo[id(table)] = (weakref.ref(table), key) + value


def _table_on(table, device, dtype):
    """``table`` on ``device`` in ``dtype``: a copy made once per table version and kept."""
    if table.device == device and table.dtype == dtype:
        return contiguous(table)
    key = (device, dtype, table._version)
    entry = _memo_get(_TABLE_CACHE, table, key)
    if entry is not None:
        return entry[2]
    moved = table.detach().to(device=device, dtype=dtype).contiguous()
    _memo_put(_TABLE_CACHE, table, key, moved)
    return moved


def _check_table(name, table, lo, hi, what):
    check_tensor(name, table, dtypes=(torch.float32, torch.float64, torch.float16, torch.bfloat16))
    if table.dim() != 1 or table.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty 1-D table, got shape {tuple(table.shape)}")
    if table.device.type == "cpu" and _memo_get(_CHECKED, table, (table._version, lo, hi)) is None:  # no sync
        bad = ~((table >= lo) & (table <= hi))
        if bool(bad.any()):
            i = int(torch.nonzero(bad)[0])
            raise ValueError(f"{name} must hold {what} in [{lo}, {hi}], got {float(table[i])} at index {i}")
        _memo_put(_CHECKED, table, (table._version, lo, hi))
    return table


_DEFAULT_SCHEDULES = {}


def _vp_table(schedule):
    """alphas_cumprod of a NoiseSchedule / 1-D tensor / diffusers scheduler (None: diffusers' DDPM default)."""
    if schedule is None:
        schedule = _DEFAULT_SCHEDULES.get("ddpm")
        if schedule is None:
            schedule = _DEFAULT_SCHEDULES["ddpm"] = NoiseSchedule()
    if isinstance(schedule, NoiseSchedule):
        table = schedule.alphas_cumprod
    elif isinstance(schedule, torch.Tensor):
        table = schedule
    elif isinstance(getattr(schedule, "alphas_cumprod", None), torch.Tensor):  # a diffusers scheduler
        table = schedule.alphas_cumprod
    else:
        raise TypeError("schedule must be a pygen.schedules.NoiseSchedule, a 1-D alphas_cumprod tensor or a "
                        f"diffusers scheduler (with .alphas_cumprod), got {type(schedule).__name__}")
    return _check_table("schedule (alphas_cumprod)", table, 0.0, 1.0, "alphas_cumprod values")


# ---------------------------------------------------------------------------
# diffusion losses
# ---------------------------------------------------------------------------
def diffusion_loss_coefficients(a, s, prediction_type="eps", weighting="uniform", *, min_snr_gamma=5.0,
                                sigma_data=0.5):
    """The (B, 4) fused-loss coefficients ``[m, ca, cb, w]`` of each row, from its a, s.

    ``a``, ``s`` (B,): x_t = a·x0 + s·eps (VP: a = sqrt(ᾱ), s = sqrt(1-ᾱ); flow: a = 1-σ, s = σ).
    Row loss = w · mean_i (m·out_i - ca·x0_i - cb·eps_i)², i.e. target = ca·x0 + cb·eps:

    ==========  =========  ===============
    prediction  target     (m, ca, cb)
    ==========  =========  ===============
    eps         eps        (1, 0, 1)
    x0          x0         (1, 1, 0)
    v           a·eps-s·x0 (1, -s, a)
    flow        eps - x0   (1, -1, 1)
    ==========  =========  ===============

    ``w`` is the weighting (see ``diffusion_loss``). Pure torch on a's device,
    no host sync; a and s in float32/float64 (the result has their dtype).
    """
    one = torch.ones_like(a)
    zero = torch.zeros_like(a)
    if prediction_type == "eps":
        m, ca, cb = one, zero, one
    elif prediction_type == "x0":
        m, ca, cb = one, one, zero
    elif prediction_type == "v":
        m, ca, cb = one, -s, a
    else:
        m, ca, cb = one, -one, one
    w = _weights(a, s, prediction_type, weighting, min_snr_gamma, sigma_data)
    return torch.stack([m, ca, cb, w], dim=1)


def _weights(a, s, prediction_type, weighting, gamma, sigma_data):
    """Per-row loss weight in the prediction's own space (module-level docstring of diffusion_loss)."""
    if weighting == "uniform":
        return torch.ones_like(a)
    a2, s2 = a * a, s * s
    sd2 = sigma_data * sigma_data
    if prediction_type == "eps":  # x0 error = (s/a)·eps error
        if weighting == "snr":
            return torch.ones_like(a)
        if weighting == "min_snr":
            return torch.clamp(gamma * s2 / a2, max=1.0)  # min(SNR, γ)/SNR; a = 0 -> inf -> 1
        return (s2 + sd2 * a2) / (a2 * sd2)
    if prediction_type == "x0":  # x0 error = x0-prediction error
        if weighting == "snr":
            return a2 / s2
        if weighting == "min_snr":
            return torch.clamp(a2 / s2, max=gamma)  # s = 0 -> inf -> γ
        return (s2 + sd2 * a2) / (s2 * sd2)
    # v (VP, a² + s² = 1) and flow: x0 error = s·(prediction error)
    if weighting == "snr":
        return a2
    if weighting == "min_snr":
        return torch.minimum(a2, gamma * s2)  # min(SNR, γ)/(SNR + 1) for v
    return (s2 + sd2 * a2) / sd2


def _flow_sigmas(batch, seed_i, row_seeds, stream, device, sampling, logit_mean, logit_std):
    u, z = _row_uniforms(batch, seed_i, row_seeds, stream, device)
    if sampling == "uniform":
        return u
    return torch.sigmoid(logit_mean + logit_std * z)


def _check_sigma_rows(t, batch, device):
    """A given continuous flow time: one sigma in [0, 1] per row (float tensor) or a float for all rows."""
    if isinstance(t, bool):
        raise TypeError("t must be a float in [0, 1] or a 1-D float tensor of sigmas, got bool")
    if isinstance(t, numbers.Real):
        t = float(t)
        if not 0.0 <= t <= 1.0:
            raise ValueError(f"t (the flow sigma) must be in [0, 1], got {t}")
        return torch.full((batch,), t, dtype=torch.float64, device=device)
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"t must be a float or a 1-D float tensor of sigmas in [0, 1], got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError("with prediction_type='flow' and no sigma table, t must hold float sigmas in [0, 1], "
                        f"got dtype {t.dtype} (pass schedule=<sigma table> to index one with int t)")
    if t.dim() != 1 or t.shape[0] != batch:
        raise ValueError(f"t must be 1-D with one sigma per batch row (length {batch}), got shape {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"t must be on the device of x0 ({device}), got {t.device}")
    if batch and t.device.type == "cpu":  # a device t is not read on the host (no sync per step)
        lo, hi = (float(v) for v in torch.aminmax(t))
        if not (lo >= 0.0 and hi <= 1.0):
            raise ValueError(f"t (the flow sigma) must be in [0, 1], got values in [{lo}, {hi}]")
    return t


_COEFF_CACHE = {}  # id(table) -> (weakref, key, coefficient table, model-time table)


def _coefficient_table(table, qtable, prediction_type, weighting, gamma, sigma_data, acc, model_dtype):
    """diffusion_loss's (N, 4) coefficient rows of every timestep of ``table`` (``qtable``: the table on
    the training device in float32/float64) and, for a flow sigma table, the model's time of every
    timestep (the sigma in the data's dtype); computed once per table version and setting, then only
    gathered (the same values as computing them per row: the same elementwise ops). The cache is per
    table object and version: change a table with torch's in-place ops (which bump its version), not
    through ``.data`` or NumPy. Not cached: a table that requires grad while grad is enabled (its rows
    are then differentiable, made per call as the table's gradient needs), or one first seen while a
    CUDA graph is being captured."""
    flow = prediction_type == "flow"
    key = (qtable.device, table._version, prediction_type, weighting, gamma, sigma_data, acc,
           model_dtype if flow else None)
    cache = not ((table.requires_grad and torch.is_grad_enabled()) or _capturing(qtable.device))
    entry = _memo_get(_COEFF_CACHE, table, key) if cache else None
    if entry is not None:
        return entry[2], entry[3]
    level = qtable.to(qtable.dtype if qtable.dtype == torch.float64 else torch.float32)
    if flow:
        a, s = 1.0 - level, level
    else:
        a, s = level.sqrt(), (1.0 - level).sqrt()
    coeffs = diffusion_loss_coefficients(a, s, prediction_type, weighting, min_snr_gamma=gamma,
                                         sigma_data=sigma_data).to(acc).contiguous()
    model_t = level.to(model_dtype) if flow else None
    if cache:  # (no autograd graph here: a table that requires grad is cached only with grad disabled)
        _memo_put(_COEFF_CACHE, table, key, coeffs, model_t)
    return coeffs, model_t


def diffusion_loss(model, x0, schedule=None, prediction_type="eps", weighting="uniform", t=None, seed=None, *,
                   stream=0, noise=None, min_snr_gamma=5.0, sigma_data=0.5, flow_time_sampling="uniform",
                   logit_mean=0.0, logit_std=1.0, reduction="mean", check_nan=False, model_kwargs=None):
    r"""The denoising diffusion training loss, one call per step:

    1. sample a timestep per row (unless ``t`` is given), on the device, from ``seed``;
    2. ``x_t = a_t·x0 + s_t·eps`` with eps = ``pygen.randn(x0.shape, seed, stream)`` drawn in
       the kernel (``pygen.q_sample``'s op);
    3. ``out = model(x_t, t)``;
    4. the weighted MSE ``w_t · mean_i (out_i - target_i)²`` per row, in one fused op whose
       backward writes d loss / d out directly; on the GPU eps is regenerated there from
       (seed, stream), never stored for the backward (module docstring: the CPU policy).

    The default (``prediction_type="eps"``, ``weighting="uniform"``) is DDPM's simple loss
    (Ho et al. 2020)

    .. math:: L = \mathbb{E}_{t, x_0, \epsilon} \| \epsilon - \epsilon_\theta(\sqrt{\bar\alpha_t} x_0
              + \sqrt{1 - \bar\alpha_t}\,\epsilon, t) \|^2

    with the squared norm taken as a mean over elements (``F.mse_loss``).

    Args:
        model: ``model(x_t, t, **model_kwargs)`` -> a tensor of x0's shape (a diffusers
            output with ``.sample``, or a tuple whose first item is the tensor, is unwrapped;
            another dtype is cast to x0's). For eps/v/x0, ``t`` is the int64 train timestep
            per row (diffusers' ``unet(sample, timestep)``); for flow it is the float sigma
            per row in [0, 1] in x0's dtype (diffusers' FlowMatch convention without the
            ×1000, as ``pygen.sample(..., prediction_type="flow")`` calls the model).
        x0: clean data (B, ...), float32/float16/bfloat16/float64.
        schedule: for eps/v/x0 (interpolation "vp": a = sqrt(ᾱ_t), s = sqrt(1 - ᾱ_t)): a
            ``pygen.schedules.NoiseSchedule``, a 1-D ``alphas_cumprod`` tensor, or a diffusers
            scheduler (anything with an ``.alphas_cumprod`` tensor); None = diffusers' DDPM
            default (1000 linear betas 1e-4..0.02). t is an int in [0, len(table)).
            For flow (rectified flow, x_t = (1 - σ)·x0 + σ·eps): None (continuous σ in
            [0, 1], sampled by ``flow_time_sampling``) or a 1-D table of sigmas in [0, 1]
            indexed by an int t. A table on another device is copied once (and cached).
        prediction_type: what the model predicts, i.e. the regression target:
            ``"eps"`` (eps), ``"x0"`` (x0), ``"v"`` (a·eps - s·x0, Salimans & Ho 2022),
            ``"flow"`` (the velocity eps - x0).
        weighting: per-row loss weight w_t. ``"uniform"``: w = 1 (plain MSE on the
            prediction). The others are defined as a weight λ on the x0-space error
            ``‖x̂0 - x0‖²`` and expressed for the prediction: with x̂0's error = c·(prediction
            error), c = s/a (eps), 1 (x0), s (v and flow), w = λ·c². With SNR = a²/s²:

            - ``"snr"``: λ = SNR -> w = 1 (eps), SNR (x0), a² (v, flow);
            - ``"min_snr"`` (Min-SNR-γ, Hang et al. 2023): λ = min(SNR, γ) -> w = min(SNR, γ)/SNR
              (eps), min(SNR, γ) (x0), min(SNR, γ)/(SNR + 1) (v), min(a², γ·s²) (flow);
              γ = ``min_snr_gamma``;
            - ``"edm"`` (Karras et al. 2022): λ(σ) = (σ² + σ_d²)/(σ·σ_d)² with the
              equivalent VE noise level σ = s/a and σ_d = ``sigma_data`` -> w =
              (s² + σ_d² a²)/(a² σ_d²) (eps), (s² + σ_d² a²)/(s² σ_d²) (x0),
              (s² + σ_d² a²)/σ_d² (v, flow). Only EDM's loss weight: not its
              preconditioning nor its log-normal σ sampling.

            Weights that are infinite at a noise-free or pure-noise row (e.g. "snr" for
            x0-prediction at ᾱ = 1) make that row's loss infinite: pick the weighting for
            the schedule's range.
        t: None (sampled per row, uniformly over [0, N) for a table, by
            ``flow_time_sampling`` for continuous flow), or given: an int / 1-D int tensor
            of train timesteps (a table), or a float / 1-D float tensor of sigmas in [0, 1]
            (continuous flow). Out of range raises ``ValueError``.
        seed: int, or a 1-D int64 tensor of per-row seeds; None draws one from torch's
            default CPU generator. The noise is ``pygen.randn(x0.shape, seed, stream)``;
            a sampled t uses ``stream + LANE`` (module docstring).
        stream: 64-bit stream id (e.g. the training step).
        noise: an explicit eps (x0's shape/dtype) instead of the in-kernel draw.
        min_snr_gamma: γ of ``"min_snr"`` (> 0, default 5).
        sigma_data: σ_d of ``"edm"`` (> 0, default 0.5).
        flow_time_sampling: continuous flow only: ``"uniform"`` σ ~ U(0, 1) (rectified
            flow, Liu et al. 2022) or ``"logit_normal"`` σ = sigmoid(m + s·z), z ~ N(0, 1)
            (Esser et al. 2024, SD3), m = ``logit_mean``, s = ``logit_std``.
        reduction: ``"mean"`` over rows (each row is already a mean over its elements),
            ``"sum"`` over rows, or ``"none"``: the (B,) per-row losses.
        check_nan: False; True raises ``FloatingPointError`` naming the non-finite rows and
            their t; ``"warn"`` warns (both sync with the device). NaN always propagates.
        model_kwargs: extra keyword arguments for the model (e.g. ``encoder_hidden_states``).

    Returns the loss (0-d, or (B,) with ``reduction="none"``) in float32 (float64 for
    float64 x0), differentiable w.r.t. the model's output (hence its parameters).

    The sampled t costs no host sync; a given t is range-checked on the host (skipped while a
    CUDA graph is being captured), as ``pygen.q_sample`` does.
    """
    _check_callable("model", model)
    check_tensor("x0", x0, ndim_min=1)
    _choice("prediction_type", prediction_type, PREDICTION_TYPES)
    _choice("weighting", weighting, WEIGHTINGS)
    _check_options(reduction, check_nan)
    gamma = check_real("min_snr_gamma", min_snr_gamma, gt=0.0)
    sigma_data = check_real("sigma_data", sigma_data, gt=0.0)
    stream = check_stream(stream)
    model_kwargs = _model_kwargs(model_kwargs)
    device, batch = x0.device, x0.shape[0]
    acc = _acc_dtype(x0.dtype)
    noise, seed, seed_i, row_seeds = _noise_and_seed(noise, x0, "x0", seed)
    x0 = contiguous(x0)

    flow = prediction_type == "flow"
    if flow:
        _choice("flow_time_sampling", flow_time_sampling, FLOW_TIME_SAMPLINGS)
        logit_mean = check_real("logit_mean", logit_mean)
        logit_std = check_real("logit_std", logit_std, gt=0.0)
        if schedule is not None and not isinstance(schedule, torch.Tensor):
            raise TypeError("prediction_type='flow' takes schedule=None (continuous sigma) or a 1-D tensor of "
                            f"sigmas in [0, 1], got {type(schedule).__name__}")
    table = None
    if not flow:
        table = _vp_table(schedule)
    elif schedule is not None:
        table = _check_table("schedule (sigmas)", schedule, 0.0, 1.0, "flow sigmas")

    if table is not None:
        # per-table set-up, made once (the coefficient rows of every timestep): a call then costs the t
        # draw and search, one gather of the coefficients, q_sample, the model and the fused loss
        qtable, t_idx = _table_rows(table, t, batch, seed_i, row_seeds, stream, device)
        coeff_table, model_t_table = _coefficient_table(table, qtable, prediction_type, weighting, gamma, sigma_data,
                                                        acc, x0.dtype)
        coeffs = coeff_table.index_select(0, t_idx)
        model_t = t_idx if not flow else model_t_table.index_select(0, t_idx)
        q_rows = t_idx
    else:  # continuous flow: a per-row sigma table indexed by the row number
        if t is None:
            t_idx = _flow_sigmas(batch, seed_i, row_seeds, stream, device, flow_time_sampling, logit_mean, logit_std)
        else:
            t_idx = _check_sigma_rows(t, batch, device)
        level = t_idx.to(torch.float64 if acc == torch.float64 or t_idx.dtype == torch.float64 else torch.float32)
        coeffs = diffusion_loss_coefficients(1.0 - level, level, prediction_type, weighting, min_snr_gamma=gamma,
                                             sigma_data=sigma_data).to(acc)
        qtable, q_rows, model_t = contiguous(level), torch.arange(batch, device=device), t_idx.to(x0.dtype)

    with torch.no_grad():
        eps = _shared_noise(x0, noise, seed_i, row_seeds, stream)
        x_t = _noised(x0, q_rows, qtable, eps, seed_i, row_seeds, stream, "flow" if flow else "vp")
    out = _model_output("model", model(x_t, model_t, **model_kwargs), x0)
    rows = _fused_mse(out, x0, coeffs, eps, seed, stream)
    _check_nan("diffusion_loss", rows, check_nan, t_idx)
    return _reduce(rows, reduction)


def dsm_loss(score_model, x, sigmas, t=None, seed=None, *, stream=0, noise=None, reduction="mean",
             check_nan=False, model_kwargs=None):
    r"""Denoising score matching across noise levels (NCSN, Song & Ermon 2019), σ²-weighted.

    For each row a level σ = ``sigmas[t]`` (t uniform over the table unless given), the
    perturbed point x̃ = x + σ·eps and the score target ∇ log N(x̃; x, σ²I) = -eps/σ. With
    the weighting λ(σ) = σ² (which makes every level's term O(1)):

    .. math:: \ell = \tfrac12 \lambda(\sigma)\,\mathrm{mean}_i\,(s_\theta(\tilde x, \sigma)_i + \epsilon_i/\sigma)^2
              = \tfrac12\,\mathrm{mean}_i\,(\sigma\,s_\theta(\tilde x, \sigma)_i + \epsilon_i)^2

    i.e. the fused loss with (m, ca, cb, w) = (σ, 0, -1, 1/2). The norm is a mean over the
    D elements of a row (NCSN's reference code sums: multiply by D to compare).

    Args:
        score_model: ``score_model(x̃, sigma, **model_kwargs)`` -> the score, x's shape;
            ``sigma`` is the (B,) noise level of each row in x's dtype (k-diffusion style).
        x: data (B, ...), float32/float16/bfloat16/float64.
        sigmas: 1-D float tensor of positive noise levels (e.g. NCSN's geometric sequence
            from σ_1 = 1..50 down to 0.01); copied to x's device once if elsewhere.
        t: None (uniform over the levels) or an int / 1-D int tensor of level indices.
        seed, stream, noise, reduction, check_nan, model_kwargs: as in ``diffusion_loss``
            (eps = ``pygen.randn(x.shape, seed, stream)``).

    x̃ is formed by ``pygen.q_sample``'s flow interpolation with τ = σ/(1 + σ), scaled by
    (1 + σ): x̃ = x + σ·eps up to float rounding.
    """
    _check_callable("score_model", score_model)
    check_tensor("x", x, ndim_min=1)
    _check_options(reduction, check_nan)
    stream = check_stream(stream)
    model_kwargs = _model_kwargs(model_kwargs)
    if not isinstance(sigmas, torch.Tensor):
        raise TypeError(f"sigmas must be a 1-D float tensor of noise levels, got {type(sigmas).__name__}")
    _check_table("sigmas", sigmas, 0.0, math.inf, "noise levels")
    if sigmas.device.type == "cpu" and bool((sigmas == 0).any()):
        raise ValueError("sigmas must be positive (the score target -eps/sigma is undefined at sigma = 0)")
    device, batch = x.device, x.shape[0]
    acc = _acc_dtype(x.dtype)
    noise, seed, seed_i, row_seeds = _noise_and_seed(noise, x, "x", seed)
    x = contiguous(x)
    table, t_idx = _table_rows(sigmas, t, batch, seed_i, row_seeds, stream, device)
    sig = table[t_idx]
    cdt = torch.float64 if (sig.dtype == torch.float64 or acc == torch.float64) else torch.float32
    sig = sig.to(cdt)
    tau = sig / (1.0 + sig)
    rows_t = torch.arange(batch, device=device)
    with torch.no_grad():
        eps = _shared_noise(x, noise, seed_i, row_seeds, stream)
        xs = _noised(x, rows_t, contiguous(tau), eps, seed_i, row_seeds, stream, "flow")
        xs = (xs.to(acc) * _rows_view(1.0 + sig, x.dim()).to(acc)).to(x.dtype)
    out = _model_output("score_model", score_model(xs, sig.to(x.dtype), **model_kwargs), x)
    zero = torch.zeros_like(sig)
    coeffs = torch.stack([sig, zero, zero - 1.0, zero + 0.5], dim=1).to(acc)
    rows = _fused_mse(out, x, coeffs, eps, seed, stream)
    _check_nan("dsm_loss", rows, check_nan, t_idx)
    return _reduce(rows, reduction)


# ---------------------------------------------------------------------------
# VAE
# ---------------------------------------------------------------------------
def vae_reparameterize(mu, logvar, seed=None, stream=0, *, noise=None):
    r"""Fused reparameterization and KL: ``(z, kl_rows)``, both differentiable.

    z = mu + exp(logvar/2)·eps with eps = ``pygen.randn(mu.shape, seed, stream)`` drawn in
    the kernel (or the given ``noise``), and the analytic KL of q = N(mu, diag(exp(logvar)))
    to the prior N(0, I), summed over each row's elements:

    .. math:: \mathrm{KL}_b = \tfrac12 \sum_i \left(\mu_{bi}^2 + e^{\ell_{bi}} - 1 - \ell_{bi}\right),
              \quad \ell = \mathrm{logvar}

    Args:
        mu, logvar: (B, ...) tensors of the same shape, dtype and device.
        seed: int or per-row int64 tensor (None: one from torch's default CPU generator).
        stream: 64-bit stream id. noise: an explicit eps (mu's shape/dtype).

    Returns ``z`` (mu's shape/dtype) and ``kl_rows`` (B,) (float32; float64 for float64 mu).
    """
    check_tensor("mu", mu, ndim_min=1)
    check_tensor("logvar", logvar, ndim_min=1)
    if logvar.shape != mu.shape:
        raise ValueError(f"mu and logvar must have the same shape, got mu {tuple(mu.shape)} and logvar "
                         f"{tuple(logvar.shape)}")
    check_like("logvar", logvar, "mu", mu)
    stream = check_stream(stream)
    if noise is not None:  # (a seed as well is an error: the op says so)
        check_like("noise", noise, "mu", mu)
        return _loss_ops().reparameterize_kl(contiguous(mu), contiguous(logvar), seed, stream,
                                             noise=contiguous(noise))
    seed = _draw_seed(seed)
    split_seed(seed, mu.shape[0], mu.device)  # validate here, with the argument's name
    return _loss_ops().reparameterize_kl(contiguous(mu), contiguous(logvar), seed, stream)


def kl_normal(mu, logvar):
    """Analytic KL(N(mu, diag(exp(logvar))) || N(0, I)) per row (B,), plain differentiable torch."""
    acc = _acc_dtype(mu.dtype)
    m, lv = mu.to(acc), logvar.to(acc)
    return (0.5 * (m * m + lv.exp() - 1.0 - lv)).reshape(mu.shape[0], -1).sum(1)


def elbo(x, x_recon, mu=None, logvar=None, likelihood="gaussian", *, kl=None, sigma=1.0, beta=1.0,
         reduction="mean"):
    r"""The VAE loss: the **negative** ELBO (a quantity to minimise), in nats per example.

    .. math:: -\mathrm{ELBO}(x) = -\log p(x \mid z) + \beta\,\mathrm{KL}(q(z \mid x) \,\|\, N(0, I))

    with the reconstruction term summed over the elements of each row:

    - ``"gaussian"``: p(x|z) = N(x; x_recon, σ²I):
      -log p = ‖x - x_recon‖²/(2σ²) + (D/2)·log(2πσ²) (the constant is included, so with
      β = 1 the value is a true bound on -log p(x));
    - ``"bernoulli"``: ``x_recon`` are logits, x in [0, 1]:
      -log p = Σ BCE_with_logits(x_recon, x) (exact for binary x; for intensities in
      between it is the usual relaxation, not a normalised density).

    Args:
        x: data (B, ...). x_recon: the decoder output (mean or logits), x's shape.
        mu, logvar: the encoder's posterior (same shape as each other); used for the
            analytic KL unless ``kl`` is given (then they may be None).
        kl: per-row KL (B,) already computed, e.g. ``vae_reparameterize``'s fused ``kl_rows``.
        sigma: the Gaussian likelihood's std (> 0). beta: KL weight (β-VAE; >= 0).
        reduction: ``"mean"`` over rows, ``"sum"``, or ``"none"`` (B,).

    Returns the loss in float32 (float64 for float64 x).
    """
    check_tensor("x", x, ndim_min=1)
    check_tensor("x_recon", x_recon, ndim_min=1)
    if x_recon.shape != x.shape:
        raise ValueError(f"x_recon must have x's shape {tuple(x.shape)}, got {tuple(x_recon.shape)}")
    if x_recon.device != x.device:
        raise ValueError(f"x_recon must be on x's device ({x.device}), got {x_recon.device}")
    _choice("likelihood", likelihood, LIKELIHOODS)
    _choice("reduction", reduction, REDUCTIONS)
    sigma = check_real("sigma", sigma, gt=0.0)
    beta = check_real("beta", beta, ge=0.0)
    batch = x.shape[0]
    acc = _acc_dtype(torch.promote_types(x.dtype, x_recon.dtype))
    if (mu is None) != (logvar is None):
        raise ValueError("pass both mu and logvar (or neither, with kl=)")
    if mu is not None:
        check_tensor("mu", mu, ndim_min=1)
        check_tensor("logvar", logvar, ndim_min=1)
        if mu.shape != logvar.shape:
            raise ValueError(f"mu and logvar must have the same shape, got mu {tuple(mu.shape)} and logvar "
                             f"{tuple(logvar.shape)}")
        if mu.shape[0] != batch:
            raise ValueError(f"mu must have one row per example of x ({batch}), got shape {tuple(mu.shape)}")
    if kl is None:
        if mu is None:
            raise ValueError("elbo needs the KL term: pass mu and logvar, or kl=")
        kl = kl_normal(mu, logvar)
    else:
        check_tensor("kl", kl)
        if kl.shape != (batch,):
            raise ValueError(f"kl must be the per-row KL, shape ({batch},), got {tuple(kl.shape)}")
    xa, ra = x.to(acc), x_recon.to(acc)
    if likelihood == "gaussian":
        d = x[0].numel()
        nll = (xa - ra).square().reshape(batch, -1).sum(1) / (2.0 * sigma * sigma) \
            + 0.5 * d * (_LOG_2PI + 2.0 * math.log(sigma))
    else:
        nll = F.binary_cross_entropy_with_logits(ra, xa, reduction="none").reshape(batch, -1).sum(1)
    rows = nll + beta * kl.to(acc)
    return _reduce(rows, reduction)


# ---------------------------------------------------------------------------
# energy-based models
# ---------------------------------------------------------------------------
_BUFFER_INITS = ("uniform", "noise")


class ReplayBuffer:
    """A persistent buffer of negative samples for EBM training (Du & Mordatch 2019), on the device.

    ``ReplayBuffer(capacity, shape, reinit_prob=0.05, init="uniform", low=-1, high=1, scale=1,
    seed=0, device=None, dtype=torch.float32)`` holds ``capacity`` samples of ``shape``,
    filled at construction from ``init``:

    - ``"uniform"``: each coordinate uniform in [low, high] (u = Φ(z), z pygen's normals);
    - ``"noise"``: each coordinate N(0, scale²).

    ``sample(n, seed, stream)`` -> ``(x, idx)``: n distinct slots chosen uniformly (the n
    largest of ``pygen.randn((capacity,), seed, stream)``), each replaced with probability
    ``reinit_prob`` by a fresh ``init`` draw (streams ``stream + 1`` and ``stream + 2``).
    ``update(idx, x)`` writes the chains back. Everything stays on the device and is a
    function of (seed, stream): no host sync, no global RNG.
    """

    def __init__(self, capacity, shape, *, reinit_prob=0.05, init="uniform", low=-1.0, high=1.0, scale=1.0,
                 seed=0, device=None, dtype=torch.float32):
        if isinstance(capacity, bool) or not isinstance(capacity, numbers.Integral) or capacity < 1:
            raise ValueError(f"capacity must be an int >= 1, got {capacity!r}")
        if isinstance(shape, numbers.Integral) and not isinstance(shape, bool):
            shape = (int(shape),)
        try:
            shape = tuple(int(s) for s in shape)
        except TypeError:
            raise TypeError(f"shape must be a tuple of ints, got {shape!r}") from None
        if any(s < 1 for s in shape):
            raise ValueError(f"shape must have positive sizes, got {shape}")
        self.reinit_prob = check_real("reinit_prob", reinit_prob, ge=0.0)
        if self.reinit_prob > 1.0:
            raise ValueError(f"reinit_prob must be in [0, 1], got {reinit_prob}")
        self.init = _choice("init", init, _BUFFER_INITS)
        self.low, self.high = check_real("low", low), check_real("high", high)
        if not self.high > self.low:
            raise ValueError(f"high must be > low, got low={low}, high={high}")
        self.scale = check_real("scale", scale, gt=0.0)
        if dtype not in STORAGE_DTYPES:
            raise TypeError(f"dtype must be one of float32, float16, bfloat16, float64, got {dtype}")
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        self.capacity, self.shape, self.dtype = int(capacity), shape, dtype
        self.device = torch.device("cpu" if device is None else device)
        self.data = self.init_samples(self.capacity, seed, LANE)

    def __len__(self):
        return self.capacity

    def __repr__(self):
        return (f"ReplayBuffer(capacity={self.capacity}, shape={self.shape}, reinit_prob={self.reinit_prob}, "
                f"init={self.init!r}, device={self.device}, dtype={self.dtype})")

    def init_samples(self, n, seed, stream):
        """n fresh samples from ``init``: a function of (seed, stream)."""
        z = randn((n,) + self.shape, seed, stream, device=self.device, dtype=torch.float32)
        if self.init == "uniform":
            z = self.low + (self.high - self.low) * torch.special.ndtr(z)
        else:
            z = self.scale * z
        return z.to(self.dtype)

    def sample(self, n, seed, stream=0):
        """``(x, idx)``: n samples (n <= capacity) from distinct slots, some re-initialised."""
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or not 1 <= n <= self.capacity:
            raise ValueError(f"n must be an int in [1, capacity={self.capacity}], got {n!r}")
        stream = check_stream(stream)
        keys = randn((self.capacity,), seed, stream, device=self.device)
        idx = torch.topk(keys, int(n), sorted=False).indices
        x = self.data[idx]
        if self.reinit_prob > 0.0:
            u = torch.special.ndtr(randn((int(n),), seed, to_signed64(stream + 1), device=self.device))
            fresh = self.init_samples(int(n), seed, to_signed64(stream + 2))
            x = torch.where(_rows_view(u < self.reinit_prob, x.dim()), fresh, x)
        return x, idx

    def update(self, idx, x):
        """Write ``x`` (n, *shape) into slots ``idx`` (n,)."""
        if x.shape != (idx.shape[0],) + self.shape:
            raise ValueError(f"x must have shape {(idx.shape[0],) + self.shape}, got {tuple(x.shape)}")
        self.data.index_copy_(0, idx, x.detach().to(device=self.device, dtype=self.dtype))

    def state_dict(self):
        return {"data": self.data}

    def load_state_dict(self, state):
        data = state["data"]
        if data.shape != self.data.shape:
            raise ValueError(f"state data must have shape {tuple(self.data.shape)}, got {tuple(data.shape)}")
        self.data.copy_(data)


def _energies(energy, x, name):
    e = energy(x)
    if not isinstance(e, torch.Tensor):
        raise TypeError(f"energy must return a tensor, got {type(e).__name__}")
    if e.shape != (x.shape[0],):
        raise ValueError(f"energy must return one energy per row, shape ({x.shape[0]},), got {tuple(e.shape)} "
                         f"for the {name} samples")
    return e


def contrastive_divergence_step(energy, x_data, buffer, *, n_steps, step_size, seed, stream=0, alpha=0.0,
                                n_negative=None, clamp=None, return_samples=False):
    r"""One persistent contrastive-divergence loss (the EBM maximum-likelihood gradient).

    For p_θ(x) ∝ exp(-E_θ(x)), ∇_θ(-log p_θ(x)) = ∇_θ E_θ(x) - E_{p_θ}[∇_θ E_θ], so

    .. math:: L = \mathrm{mean}\,E_\theta(x^+) - \mathrm{mean}\,E_\theta(x^-)
              + \alpha\,(\mathrm{mean}\,E_\theta(x^+)^2 + \mathrm{mean}\,E_\theta(x^-)^2)

    with x⁺ the data (positive phase) and x⁻ detached samples of the model (negative
    phase): short-run Langevin (``pygen.mcmc.ula``, x ← x - (dt/2)·∇E(x) + sqrt(dt)·z, for
    ``n_steps``) started from the persistent ``buffer`` (a ``ReplayBuffer``), whose slots
    are then overwritten with the chains' ends. α > 0 adds Du & Mordatch's energy-magnitude
    regulariser.

    Args:
        energy: ``energy(x)`` -> (B,) energies (a module; its parameters get the gradient).
        x_data: a batch of data (B, *buffer.shape).
        buffer: ``ReplayBuffer`` on x_data's device.
        n_steps, step_size: Langevin steps and dt (float, or one per chain).
        seed: int. stream: the training step (module docstring: base = stream·2**32).
        alpha: regulariser weight (>= 0).
        n_negative: negative chains (default B, at most the buffer's capacity).
        clamp: optional (lo, hi): clamp the negative samples after Langevin.
        return_samples: also return x⁻.

    Returns the loss (0-d; float32, float64 for float64 energies, computed in that dtype from
    the energies), or ``(loss, x_neg)``. Energies are not detached: call
    ``loss.backward()`` to get ∇_θ. Langevin itself leaves the parameters' ``.grad`` alone.
    """
    _check_callable("energy", energy)
    check_tensor("x_data", x_data, ndim_min=1)
    if not isinstance(buffer, ReplayBuffer):
        raise TypeError(f"buffer must be a pygen.losses.ReplayBuffer, got {type(buffer).__name__}")
    if tuple(x_data.shape[1:]) != buffer.shape:
        raise ValueError(f"x_data rows must have the buffer's shape {buffer.shape}, got {tuple(x_data.shape[1:])}")
    if x_data.device != buffer.device:
        raise ValueError(f"x_data must be on the buffer's device ({buffer.device}), got {x_data.device}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    stream = check_stream(stream)
    alpha = check_real("alpha", alpha, ge=0.0)
    n_neg = x_data.shape[0] if n_negative is None else n_negative
    if clamp is not None:
        lo, hi = clamp
        lo, hi = check_real("clamp[0]", lo), check_real("clamp[1]", hi)
    base = to_signed64(stream << _STREAM_SHIFT)
    x_init, idx = buffer.sample(n_neg, seed, to_signed64(base + LANE))
    x_neg = _mcmc.ula(x_init.to(x_data.dtype), energy_fn=lambda x: _energies(energy, x, "negative"),
                      step_size=step_size, n_steps=n_steps, seed=seed, stream=base)
    if clamp is not None:
        x_neg = x_neg.clamp(lo, hi)
    buffer.update(idx, x_neg)
    x_neg = x_neg.detach()
    # the means and their difference in fp32 (fp64 for fp64 energies): in fp16/bf16 the two means, each
    # large next to their difference, would lose the loss's digits to cancellation
    e_pos = _energies(energy, x_data, "data")
    e_neg = _energies(energy, x_neg, "negative")
    acc = _acc_dtype(torch.promote_types(e_pos.dtype, e_neg.dtype))
    e_pos, e_neg = e_pos.to(acc), e_neg.to(acc)
    loss = e_pos.mean() - e_neg.mean()
    if alpha > 0.0:
        loss = loss + alpha * (e_pos.square().mean() + e_neg.square().mean())
    return (loss, x_neg) if return_samples else loss


def nce_loss(log_p_model, x_data, x_noise, log_q, nu=None):
    r"""Noise-contrastive estimation (Gutmann & Hyvärinen 2010, 2012): a logistic loss.

    With ν = T_noise/T_data (default: the ratio of the sample counts) and
    G(x) = log p_m(x) - log q(x) - log ν, the probability that x is data is σ(G(x)), and

    .. math:: L = -\mathrm{mean}_{x \in \mathrm{data}} \log\sigma(G(x))
              - \nu\,\mathrm{mean}_{y \in \mathrm{noise}} \log\sigma(-G(y))

    (-J of Gutmann & Hyvärinen, per data sample). ``log_p_model`` must be a *normalised*
    model up to a learned constant: the caller includes the log-normaliser as a learnable
    parameter c, e.g. ``log_p_model = lambda x: -energy(x) - c`` with ``c`` an
    ``nn.Parameter``; NCE then estimates c = log Z along with θ.

    Args:
        log_p_model: ``x -> (N,)`` model log-density (called once on data and noise stacked).
        x_data: (T_data, ...) data. x_noise: (T_noise, ...) samples of q.
        log_q: ``x -> (N,)`` log-density of the noise distribution q.
        nu: the noise-to-data ratio in the loss (default T_noise/T_data).
    """
    _check_callable("log_p_model", log_p_model)
    _check_callable("log_q", log_q)
    check_tensor("x_data", x_data, ndim_min=1)
    check_tensor("x_noise", x_noise, ndim_min=1)
    if x_noise.shape[1:] != x_data.shape[1:]:
        raise ValueError(f"x_noise rows must have x_data's row shape {tuple(x_data.shape[1:])}, "
                         f"got {tuple(x_noise.shape[1:])}")
    nd, nn_ = x_data.shape[0], x_noise.shape[0]
    if nd < 1 or nn_ < 1:
        raise ValueError("x_data and x_noise must each hold at least one sample")
    nu = nn_ / nd if nu is None else check_real("nu", nu, gt=0.0)
    x = torch.cat([x_data, x_noise.to(x_data.dtype)])
    lp, lq = log_p_model(x), log_q(x)
    for name, v in (("log_p_model", lp), ("log_q", lq)):
        if not isinstance(v, torch.Tensor) or v.shape != (nd + nn_,):
            raise ValueError(f"{name} must return one log-density per sample, shape ({nd + nn_},), got "
                             f"{tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__}")
    g = lp - lq - math.log(nu)
    return -(F.logsigmoid(g[:nd]).mean() + nu * F.logsigmoid(-g[nd:]).mean())
