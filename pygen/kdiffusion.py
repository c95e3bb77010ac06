"""k-diffusion-compatible samplers on pygen's fused step: ``pygen.kdiffusion``.

Drop-in replacements for the sampler functions and helpers of k-diffusion
0.1.1.post1's ``k_diffusion/sampling.py``, with the same names, signatures and
semantics::

    from pygen import kdiffusion as K          # instead of k_diffusion.sampling
    sigmas = K.get_sigmas_karras(25, 0.002, 80.0, device="cuda")
    x = K.sample_dpmpp_2m(denoiser, x_T, sigmas, extra_args={...}, callback=cb, disable=True)

The model is a denoiser ``D(x, sigma * s_in, **extra_args)`` (``s_in`` = ones
of the batch size); ``callback`` gets k-diffusion's dict
``{'x', 'i', 'sigma', 'sigma_hat', 'denoised'}`` once per step; ``disable``
turns the tqdm bar off; ``s_churn, s_tmin, s_tmax, s_noise, eta, r, order,
solver_type`` mean what they mean there.

How it runs
-----------
Each sampler is a coefficient program: at set-up the sigmas are read once
(one host copy, as k-diffusion's own ``sample_lms`` does) and every model
evaluation gets one row of a float64 table (moved to the device once) in the
form of the fused step (csrc/include/pygen/step.h)::

    x_next = a·x + b·D + Σ_j hist_j·h_j + s·z,     h[slot] = hx·x + hd·D

with D the denoiser output. Two-stage methods (Heun, DPM-2, DPM++(2S), DPM++
SDE) keep what their second stage needs of the first in a history slot;
multistep methods (LMS, DPM++(2M), 2M/3M SDE) keep earlier denoised values or
derivatives in a ring of slots. So every model evaluation is followed by
exactly one fused launch; the row index lives on the device, nothing is read
back to the host inside the loop. As in k-diffusion, no tensor is written once
it has been handed out: a launch writes into an earlier ``x`` only when nothing
refers to it any more (no Python or weak reference, view, kept storage or
autograd node besides the loop's own; else into a fresh tensor), so the caller's
``x`` and every ``x`` a model, wrapper or callback received and kept stay as they
were.

The model's sigma is ``sigma_k * s_in`` exactly as k-diffusion passes it: x's
dtype (type promotion of a 0-d sigmas element times the 1-D x-dtype ``s_in``),
x's device, shape ``(B,)``, sigma_k computed from the sigmas tensor with
k-diffusion's expressions (same value to the last ulp); these rows are built
once per program, device and dtype, and never written.

Programs are cached: a call with the same sampler, arguments and sigma values
as a recent one (the usual case: one schedule, many batches) reuses its table
and model-sigma rows already on the device, so its set-up is the sigma read,
the step index and the history buffer; the last 32 programs are kept.

Noise
-----
- ``noise_sampler`` given: all noise comes from it, called with the same
  arguments and in the same order as k-diffusion, and passed to the fused step.
  To reproduce k-diffusion's default ``torch.randn_like`` noise, pass
  ``noise_sampler=default_noise_sampler(x)``.
- Otherwise the noise is drawn inside the fused step: Philox with a key taken
  once from torch's global RNG (``default_seed()``, so ``torch.manual_seed``
  makes runs reproducible), stream ``1 + k`` for the launch after model
  evaluation ``k`` (``pygen.randn(x.shape, seed, 1 + k)`` exactly). The
  s_churn noise of step 0 (Euler, Heun, DPM-2) uses stream 0; the churn noise
  of step i > 0 is drawn by the last launch of step i - 1.
- ``sample_dpmpp_sde`` draws two correlated noises per step: increments of
  one Brownian path over [sigma(s), sigma] and [sigma_next, sigma] (k-diffusion
  uses a Brownian tree for this). Without a noise sampler pygen draws exactly
  that joint law in the kernel: z_a in stage 1, z_b in stage 2, the second
  noise being (sqrt(L1)·z_a + sqrt(L2)·z_b)/sqrt(L1 + L2) with L1, L2 the two
  sub-interval lengths (z_a is folded into stage 2 through its output, so no
  extra buffer or launch is needed). 2M/3M SDE steps use disjoint intervals,
  i.e. independent normals, which is what a Brownian tree gives on the grid.
- ``BrownianTreeNoiseSampler`` is a counter-based Brownian tree with
  k-diffusion's interface (its values are pygen's own, not torchsde's).
"""
import functools
import math
import numbers
import sys
import weakref

import torch

from pygen.ops.random import randn
from pygen.ops.schedule import COL_A, COL_B, COL_CM, COL_HD, COL_HIST, COL_HX, COL_S, COL_SLOT
from pygen.samplers.program import StepProgram, check_model_out

__all__ = [
    "append_zero",
    "get_sigmas_karras",
    "get_sigmas_exponential",
    "get_sigmas_polyexponential",
    "get_sigmas_vp",
    "to_d",
    "get_ancestral_step",
    "default_noise_sampler",
    "default_seed",
    "BrownianTreeNoiseSampler",
    "linear_multistep_coeff",
    "sample_euler",
    "sample_euler_ancestral",
    "sample_heun",
    "sample_dpm_2",
    "sample_dpm_2_ancestral",
    "sample_lms",
    "sample_dpmpp_2s_ancestral",
    "sample_dpmpp_sde",
    "sample_dpmpp_2m",
    "sample_dpmpp_2m_sde",
    "sample_dpmpp_3m_sde",
    "SAMPLERS",
]


# ---------------------------------------------------------------------------
# helpers with k-diffusion's names and numerics
# ---------------------------------------------------------------------------
def append_zero(x):
    """``x`` with a trailing 0 appended."""
    return torch.cat([x, x.new_zeros([1])])


def get_sigmas_karras(n, sigma_min, sigma_max, rho=7., device='cpu'):
    """Karras et al. (2022) schedule: (max^(1/rho) + ramp·(min^(1/rho) - max^(1/rho)))^rho, then 0."""
    ramp = torch.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return append_zero((hi + ramp * (lo - hi)) ** rho).to(device)


def get_sigmas_exponential(n, sigma_min, sigma_max, device='cpu'):
    """Sigmas evenly spaced in log sigma from sigma_max to sigma_min, then 0."""
    return append_zero(torch.linspace(math.log(sigma_max), math.log(sigma_min), n, device=device).exp())


def get_sigmas_polyexponential(n, sigma_min, sigma_max, rho=1., device='cpu'):
    """Sigmas polynomial (degree rho) in log sigma, then 0."""
    ramp = torch.linspace(1, 0, n, device=device) ** rho
    return append_zero(torch.exp(ramp * (math.log(sigma_max) - math.log(sigma_min)) + math.log(sigma_min)))


def get_sigmas_vp(n, beta_d=19.9, beta_min=0.1, eps_s=1e-3, device='cpu'):
    """Sigmas of the continuous VP SDE at t = linspace(1, eps_s, n), then 0."""
    t = torch.linspace(1, eps_s, n, device=device)
    return append_zero(torch.sqrt(torch.exp(beta_d * t ** 2 / 2 + beta_min * t) - 1))


def _append_dims(v, ndim):
    if v.dim() > ndim:
        raise ValueError(f"sigma has {v.dim()} dims but x has only {ndim}")
    return v[(...,) + (None,) * (ndim - v.dim())]


def to_d(x, sigma, denoised):
    """The Karras ODE derivative (x - denoised) / sigma."""
    return (x - denoised) / _append_dims(sigma, x.dim())


def get_ancestral_step(sigma_from, sigma_to, eta=1.):
    """(sigma_down, sigma_up) of an ancestral step from sigma_from to sigma_to."""
    if not eta:
        return sigma_to, 0.
    sigma_up = min(sigma_to, eta * (sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2) / sigma_from ** 2) ** 0.5)
    sigma_down = (sigma_to ** 2 - sigma_up ** 2) ** 0.5
    return sigma_down, sigma_up


def default_noise_sampler(x):
    """k-diffusion's default: fresh ``torch.randn_like(x)`` at every call (torch's global RNG)."""
    return lambda sigma, sigma_next: torch.randn_like(x)


def default_seed():
    """The Philox key of in-kernel noise when no noise sampler is given: one draw from torch's
    global RNG (``torch.randint(0, 2**63 - 1, ())``), so ``torch.manual_seed`` fixes it."""
    return int(torch.randint(0, 2 ** 63 - 1, ()).item())


class BrownianTreeNoiseSampler:
    """Brownian-path noise with k-diffusion's interface, on pygen's counter-based noise.

    ``sampler(sigma, sigma_next)`` returns (W(t1) - W(t0)) / sqrt(|t1 - t0|) with t = transform(sigma),
    signed as k-diffusion's (W(sigma_next) - W(sigma) for a sorted interval), for one Brownian path W
    on [transform(sigma_min), transform(sigma_max)] fixed by ``seed``: increments over disjoint
    intervals are independent N(0, 1)·sqrt(length), over nested ones correlated as a Brownian
    path's, whatever the order of the queries.

    W is built as a dyadic Brownian bridge: W(t_lo) = 0, W(t_hi) = sqrt(t_hi - t_lo)·Z_1, and each
    node n of the tree (interval [l, h], children 2n, 2n + 1) sets W at the midpoint to
    (W(l) + W(h))/2 + sqrt((h - l)/4)·Z_n, with Z_n = ``pygen.randn(x.shape, seed, stream=n)``
    (per-row seeds: one tree per batch row). Below depth ``depth`` (interval 2^-depth of the
    range) W is linear, as a tolerance: a query costs ``depth`` noise draws (cached per point).

    Args:
        x: tensor whose shape, device and dtype the noise takes.
        sigma_min, sigma_max: the valid interval.
        seed: int, or a list/1-D tensor of one seed per batch row; None draws ``default_seed()``.
        transform: maps sigma to the tree's time (default: identity).
    """

    def __init__(self, x, sigma_min, sigma_max, seed=None, transform=lambda x: x, *, depth=24):
        self.transform = transform
        t0 = float(transform(torch.as_tensor(sigma_min)))
        t1 = float(transform(torch.as_tensor(sigma_max)))
        if not (math.isfinite(t0) and math.isfinite(t1)) or t0 == t1:
            raise ValueError(f"the transformed interval must be finite and non-empty, got [{t0}, {t1}]")
        self._lo, self._hi = min(t0, t1), max(t0, t1)
        self._sign = 1.0 if t0 < t1 else -1.0
        if seed is None:
            seed = default_seed()
        if isinstance(seed, (list, tuple)) or (isinstance(seed, torch.Tensor) and seed.dim() == 1):
            seed = torch.as_tensor(seed, dtype=torch.int64).to(x.device)
            if seed.shape[0] != x.shape[0]:
                raise ValueError(f"seed must have one entry per batch row ({x.shape[0]}), got {seed.shape[0]}")
        elif isinstance(seed, torch.Tensor):
            seed = int(seed)
        elif not isinstance(seed, numbers.Integral) or isinstance(seed, bool):
            raise TypeError(f"seed must be an int or a list of ints, got {type(seed).__name__}")
        if not isinstance(depth, numbers.Integral) or not 1 <= depth <= 40:
            raise ValueError(f"depth must be an int in [1, 40], got {depth!r}")
        self._seed = seed
        self._depth = int(depth)
        self._shape, self._device, self._dtype = tuple(x.shape), x.device, x.dtype
        self._cache = {}

    def _z(self, node):
        return randn(self._shape, self._seed, node, device=self._device, dtype=torch.float64
                     if self._dtype == torch.float64 else torch.float32)

    def _w(self, t):
        """W(t), t clamped into the tree's interval."""
        t = min(max(t, self._lo), self._hi)
        if t in self._cache:
            return self._cache[t]
        lo, hi = self._lo, self._hi
        w_lo = torch.zeros(self._shape, device=self._device, dtype=torch.float64
                           if self._dtype == torch.float64 else torch.float32)
        w_hi = math.sqrt(hi - lo) * self._z(1)
        node = 1
        for _ in range(self._depth):
            if t == lo:
                w = w_lo
                break
            if t == hi:
                w = w_hi
                break
            mid = 0.5 * (lo + hi)
            w_mid = 0.5 * (w_lo + w_hi) + math.sqrt(0.25 * (hi - lo)) * self._z(2 * node)
            if t < mid:
                hi, w_hi, node = mid, w_mid, 2 * node
            else:
                lo, w_lo, node = mid, w_mid, 2 * node + 1
        else:
            f = (t - lo) / (hi - lo)
            w = w_lo + f * (w_hi - w_lo)
        if len(self._cache) >= 4:
            self._cache.pop(next(iter(self._cache)))
        self._cache[t] = w
        return w

    def __call__(self, sigma, sigma_next):
        t0 = float(self.transform(torch.as_tensor(sigma)))
        t1 = float(self.transform(torch.as_tensor(sigma_next)))
        a, b, sign = (t0, t1, 1.0) if t0 < t1 else (t1, t0, -1.0)
        w = (self._w(b) - self._w(a)) * (self._sign * sign) / math.sqrt(abs(t1 - t0))
        return w.to(self._dtype)


def linear_multistep_coeff(order, t, i, j):
    """∫_{t[i]}^{t[i+1]} of the Lagrange basis polynomial of node t[i-j] over t[i], ..., t[i-order+1].

    Integrated exactly (the polynomial is expanded around t[i]); k-diffusion integrates the same
    polynomial numerically.
    """
    if order - 1 > i:
        raise ValueError(f'Order {order} too high for step {i}')
    t = [float(v) for v in t]
    base = t[i]
    coeffs = [1.0]  # polynomial in u = tau - t[i], lowest degree first
    for k in range(order):
        if k == j:
            continue
        root = t[i - k] - base
        den = t[i - j] - t[i - k]
        nxt = [0.0] * (len(coeffs) + 1)
        for p, c in enumerate(coeffs):
            nxt[p + 1] += c / den
            nxt[p] -= c * root / den
        coeffs = nxt
    u = t[i + 1] - base
    return sum(c * u ** (p + 1) / (p + 1) for p, c in enumerate(coeffs))


# ---------------------------------------------------------------------------
# coefficient programs
# ---------------------------------------------------------------------------
class _Plan:
    """Launches of one sampler run: per k-diffusion step, the model calls and their table rows."""

    def __init__(self, width):
        self.width = width
        self.rows = []         # one table row per model evaluation
        self.call_sigmas = []  # sigma of each model evaluation
        self.call_specs = []   # how k-diffusion computes that sigma from the sigmas tensor (_model_sigmas)
        self.noise = []        # per launch: None, or (sigma, sigma_next) for the noise sampler
        self.first = []        # per launch: the k-diffusion step it starts, or -1
        self.steps = []        # per step: the launches (row numbers) it runs
        self.sigma_hat = []    # per step: gamma + 1 for the callback's sigma_hat (None: sigmas[i])
        self.churn0 = 0.0      # s_churn noise scale before the first model call
        self.r = 0.5           # dpmpp_sde's midpoint fraction
        self.device_tables = {}  # (device, dtypes, batch) -> tensors of _device_tables (cached plans)

    @functools.cached_property
    def in_kernel(self):
        """Whether a launch draws in-kernel noise (then the run needs a Philox key)."""
        return any(r[COL_S] != 0.0 for r in self.rows) or self.churn0 != 0.0

    def churn_start(self, x, seed):
        """x plus the s_churn noise of step 0 (``pygen.randn(x.shape, seed, 0)``), or x itself."""
        if self.churn0 == 0.0:
            return x
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        return (x.to(acc) + self.churn0 * randn(x.shape, seed, 0, device=x.device, dtype=acc)).to(x.dtype)

    def launch(self, step, sigma, noise=None, spec=None, **cols):
        row = [0.0] * self.width
        row[COL_CM] = 1.0
        row[COL_SLOT] = -1.0
        hist = cols.pop("hist", {})
        names = {"a": COL_A, "b": COL_B, "s": COL_S, "hx": COL_HX, "hd": COL_HD, "slot": COL_SLOT}
        for k, v in cols.items():
            row[names[k]] = float(v)
        for j, v in hist.items():
            row[COL_HIST + j] += float(v)
        k = len(self.rows)
        self.rows.append(row)
        self.call_sigmas.append(float(sigma))
        self.call_specs.append(("at", step) if spec is None else spec)
        self.noise.append(noise)
        if len(self.steps) <= step:
            self.steps.append([])
            self.first.append(step)
        else:
            self.first.append(-1)
        self.steps[step].append(k)
        return row


def _host_sigmas(sigmas):
    if not isinstance(sigmas, torch.Tensor):
        raise TypeError(f"sigmas must be a torch.Tensor, got {type(sigmas).__name__}")
    if sigmas.dim() != 1 or sigmas.shape[0] < 2:
        raise ValueError(f"sigmas must be 1-D with at least 2 entries (n steps + final), got {tuple(sigmas.shape)}")
    if not sigmas.is_floating_point():
        raise TypeError(f"sigmas must be floating point, got {sigmas.dtype}")
    s = sigmas.detach().to("cpu", torch.float64).tolist()  # the one host read of the set-up
    if any(not math.isfinite(v) or v < 0 for v in s):
        raise ValueError("sigmas must be finite and >= 0")
    if any(b >= a for a, b in zip(s[:-1], s[1:])):
        raise ValueError(f"sigmas must be strictly decreasing, got {s}")
    return s


def _check_real(name, value, *, ge=None, gt=None):
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = float(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    value = float(value)
    if ge is not None and value < ge:
        raise ValueError(f"{name} must be >= {ge}, got {value}")
    if gt is not None and value <= gt:
        raise ValueError(f"{name} must be > {gt}, got {value}")
    return value


def _churn(sig, s_churn, s_tmin, s_tmax, s_noise):
    """Per step (gamma, sigma_hat, churn noise scale) as in k-diffusion's Euler/Heun/DPM-2; s_churn > 0
    adds noise of std s_noise·sqrt(sigma_hat² - sigma²) before the model call where s_tmin <= sigma <= s_tmax."""
    s_churn = _check_real("s_churn", s_churn, ge=0.0)
    s_tmin = _check_real("s_tmin", s_tmin)
    s_tmax = _check_real("s_tmax", s_tmax)
    s_noise = _check_real("s_noise", s_noise)
    n = len(sig) - 1
    out = []
    for i in range(n):
        gamma = min(s_churn / n, 2 ** 0.5 - 1) if s_tmin <= sig[i] <= s_tmax else 0.
        sigma_hat = sig[i] * (gamma + 1)
        scale = s_noise * math.sqrt(sigma_hat ** 2 - sig[i] ** 2) if gamma > 0 else 0.0
        out.append((gamma, sigma_hat, scale))
    return out


def _euler_rows(plan, i, sh, dt, **extra):
    """x + (x - D)/sh·dt."""
    return plan.launch(i, sh, a=1.0 + dt / sh, b=-dt / sh, **extra)


def _plan_euler(sig, s_churn, s_tmin, s_tmax, s_noise):
    plan = _Plan(COL_HIST)
    churn = _churn(sig, s_churn, s_tmin, s_tmax, s_noise)
    n = len(sig) - 1
    for i in range(n):
        gamma, sh, _ = churn[i]
        nxt = churn[i + 1][2] if i + 1 < n else 0.0
        _euler_rows(plan, i, sh, sig[i + 1] - sh, s=nxt, spec=("hat", i, gamma))
        plan.sigma_hat.append(churn[i][0] + 1)
    plan.churn0 = churn[0][2]
    return plan


def _plan_heun(sig, s_churn, s_tmin, s_tmax, s_noise):
    plan = _Plan(COL_HIST + 1)
    churn = _churn(sig, s_churn, s_tmin, s_tmax, s_noise)
    n = len(sig) - 1
    for i in range(n):
        gamma, sh, _ = churn[i]
        nxt = churn[i + 1][2] if i + 1 < n else 0.0
        sn = sig[i + 1]
        dt = sn - sh
        if sn == 0:
            _euler_rows(plan, i, sh, dt, s=nxt, spec=("hat", i, gamma))
        else:
            # x_2 = x + d·dt; keep h = x + d·dt/2, then x = h + d_2·dt/2.
            _euler_rows(plan, i, sh, dt, hx=1.0 + 0.5 * dt / sh, hd=-0.5 * dt / sh, slot=0, spec=("hat", i, gamma))
            plan.launch(i, sn, a=0.5 * dt / sn, b=-0.5 * dt / sn, hist={0: 1.0}, s=nxt, spec=("at", i + 1))
        plan.sigma_hat.append(churn[i][0] + 1)
    plan.churn0 = churn[0][2]
    return plan


def _mid(a, b):
    return math.exp(0.5 * (math.log(a) + math.log(b)))


def _plan_dpm_2(sig, s_churn, s_tmin, s_tmax, s_noise):
    plan = _Plan(COL_HIST + 1)
    churn = _churn(sig, s_churn, s_tmin, s_tmax, s_noise)
    n = len(sig) - 1
    for i in range(n):
        gamma, sh, _ = churn[i]
        nxt = churn[i + 1][2] if i + 1 < n else 0.0
        sn = sig[i + 1]
        if sn == 0:
            _euler_rows(plan, i, sh, sn - sh, s=nxt, spec=("hat", i, gamma))
        else:
            sm = _mid(sh, sn)
            dt1, dt2 = sm - sh, sn - sh
            _euler_rows(plan, i, sh, dt1, hx=1.0, hd=0.0, slot=0, spec=("hat", i, gamma))
            plan.launch(i, sm, a=dt2 / sm, b=-dt2 / sm, hist={0: 1.0}, s=nxt, spec=("mid", i, gamma))
        plan.sigma_hat.append(churn[i][0] + 1)
    plan.churn0 = churn[0][2]
    return plan


def _plan_euler_ancestral(sig, eta, s_noise):
    eta, s_noise = _check_real("eta", eta, ge=0.0), _check_real("s_noise", s_noise)
    plan = _Plan(COL_HIST)
    for i in range(len(sig) - 1):
        s, sn = sig[i], sig[i + 1]
        sd, su = get_ancestral_step(s, sn, eta)
        noisy = sn > 0
        _euler_rows(plan, i, s, sd - s, s=s_noise * su if noisy else 0.0, noise=(i, i + 1) if noisy else None)
        plan.sigma_hat.append(None)
    return plan


def _plan_dpm_2_ancestral(sig, eta, s_noise):
    eta, s_noise = _check_real("eta", eta, ge=0.0), _check_real("s_noise", s_noise)
    plan = _Plan(COL_HIST + 1)
    for i in range(len(sig) - 1):
        s, sn = sig[i], sig[i + 1]
        sd, su = get_ancestral_step(s, sn, eta)
        if sd == 0:
            _euler_rows(plan, i, s, sd - s)
        else:
            sm = _mid(s, sd)
            dt1, dt2 = sm - s, sd - s
            _euler_rows(plan, i, s, dt1, hx=1.0, hd=0.0, slot=0)
            plan.launch(i, sm, a=dt2 / sm, b=-dt2 / sm, hist={0: 1.0}, s=s_noise * su, noise=(i, i + 1),
                        spec=("amid", i, eta))
        plan.sigma_hat.append(None)
    return plan


def _plan_lms(sig, order):
    if isinstance(order, bool) or not isinstance(order, numbers.Integral) or not 1 <= order <= 9:
        raise ValueError(f"order must be an int in [1, 9], got {order!r}")
    hw = order - 1
    plan = _Plan(COL_HIST + hw)
    for i in range(len(sig) - 1):
        s = sig[i]
        cur = min(i + 1, order)
        c = [linear_multistep_coeff(cur, sig, i, j) for j in range(cur)]
        hist = {(i - j) % hw: c[j] for j in range(1, cur)} if hw else {}
        extra = dict(hx=1.0 / s, hd=-1.0 / s, slot=i % hw) if hw else {}
        plan.launch(i, s, a=1.0 + c[0] / s, b=-c[0] / s, hist=hist, **extra)
        plan.sigma_hat.append(None)
    return plan


def _plan_dpmpp_2s_ancestral(sig, eta, s_noise):
    eta, s_noise = _check_real("eta", eta, ge=0.0), _check_real("s_noise", s_noise)
    plan = _Plan(COL_HIST + 1)
    for i in range(len(sig) - 1):
        s, sn = sig[i], sig[i + 1]
        sd, su = get_ancestral_step(s, sn, eta)
        noise = dict(s=s_noise * su, noise=(i, i + 1)) if sn > 0 else {}
        if sd == 0:
            _euler_rows(plan, i, s, sd - s, **noise)
        else:
            h = math.log(s) - math.log(sd)  # t_next - t with t = -log(sigma)
            plan.launch(i, s, a=math.exp(-0.5 * h), b=-math.expm1(-0.5 * h), hx=1.0, hd=0.0, slot=0)
            plan.launch(i, s * math.exp(-0.5 * h), a=0.0, b=-math.expm1(-h), hist={0: sd / s}, spec=("2s", i, eta),
                        **noise)
        plan.sigma_hat.append(None)
    return plan


def _plan_dpmpp_sde(sig, eta, s_noise, r, in_kernel):
    eta, s_noise, r = _check_real("eta", eta, ge=0.0), _check_real("s_noise", s_noise), _check_real("r", r, gt=0.0)
    plan = _Plan(COL_HIST + 1)
    plan.r = r
    fac = 1 / (2 * r)
    for i in range(len(sig) - 1):
        s, sn = sig[i], sig[i + 1]
        if sn == 0:
            _euler_rows(plan, i, s, sn - s)
        else:
            h = math.log(s) - math.log(sn)
            s_mid = s * math.exp(-r * h)  # sigma_fn(t + r·h)
            sd1, su1 = get_ancestral_step(s, s_mid, eta)
            sd2, su2 = get_ancestral_step(s, sn, eta)
            a1, b1 = sd1 / s, -(sd1 / s - 1.0)      # x_2 = a1·x + b1·D (+ noise)
            a2, e2 = sd2 / s, -(sd2 / s - 1.0)      # x = a2·x + e2·((1 - fac)·D + fac·D_2) (+ noise)
            hx, hd = a2, e2 * (1 - fac)
            if in_kernel:
                # Stage-2 noise (sqrt(L1)·z_a + sqrt(L2)·z_b)/sqrt(L1 + L2): its z_a part is taken
                # from x_2 = a1·x + b1·D + s1·z_a as kappa·x_2, the rest of kappa·x_2 undone in h.
                len1, len2 = s - s_mid, s_mid - sn
                s1 = s_noise * su1
                kappa = s_noise * su2 * math.sqrt(len1 / (len1 + len2)) / s1 if s1 != 0 else 0.0
                plan.launch(i, s, a=a1, b=b1, s=s1, hx=hx - kappa * a1, hd=hd - kappa * b1, slot=0)
                plan.launch(i, s_mid, a=kappa, b=e2 * fac, hist={0: 1.0},
                            s=s_noise * su2 * math.sqrt(len2 / (len1 + len2)), spec=("sde", i, r))
            else:
                plan.launch(i, s, a=a1, b=b1, s=s_noise * su1, hx=hx, hd=hd, slot=0, noise=("mid", i))
                plan.launch(i, s_mid, a=0.0, b=e2 * fac, hist={0: 1.0}, s=s_noise * su2, noise=("mid2", i),
                            spec=("sde", i, r))
        plan.sigma_hat.append(None)
    return plan


def _plan_dpmpp_2m(sig):
    plan = _Plan(COL_HIST + 1)
    for i in range(len(sig) - 1):
        s, sn = sig[i], sig[i + 1]
        if sn == 0:
            plan.launch(i, s, a=0.0, b=1.0, hd=1.0, slot=0)
        else:
            h = math.log(s) - math.log(sn)
            em = math.expm1(-h)
            if i == 0:
                plan.launch(i, s, a=sn / s, b=-em, hd=1.0, slot=0)
            else:
                rr = (math.log(sig[i - 1]) - math.log(s)) / h
                plan.launch(i, s, a=sn / s, b=-em * (1 + 1 / (2 * rr)), hist={0: em / (2 * rr)}, hd=1.0, slot=0)
        plan.sigma_hat.append(None)
    return plan


def _plan_dpmpp_2m_sde(sig, eta, s_noise, solver_type):
    if solver_type not in {'heun', 'midpoint'}:
        raise ValueError('solver_type must be \'heun\' or \'midpoint\'')
    eta, s_noise = _check_real("eta", eta, ge=0.0), _check_real("s_noise", s_noise)
    plan = _Plan(COL_HIST + 1)
    h = h_last = None
    for i in range(len(sig) - 1):
        s, sn = sig[i], sig[i + 1]
        if sn == 0:
            plan.launch(i, s, a=0.0, b=1.0, hd=1.0, slot=0)
        else:
            h = math.log(s) - math.log(sn)
            eta_h = eta * h
            b = -math.expm1(-h - eta_h)
            hist = {}
            if i > 0 and h_last is not None:
                rr = h_last / h
                if solver_type == 'heun':
                    coef = (-math.expm1(-h - eta_h) / (-h - eta_h) + 1) * (1 / rr)
                else:
                    coef = 0.5 * -math.expm1(-h - eta_h) * (1 / rr)
                b += coef
                hist = {0: -coef}
            noise = dict(s=sn * math.sqrt(-math.expm1(-2 * eta_h)) * s_noise, noise=(i, i + 1)) if eta else {}
            plan.launch(i, s, a=sn / s * math.exp(-eta_h), b=b, hist=hist, hd=1.0, slot=0, **noise)
        h_last = h
        plan.sigma_hat.append(None)
    return plan


def _plan_dpmpp_3m_sde(sig, eta, s_noise):
    eta, s_noise = _check_real("eta", eta, ge=0.0), _check_real("s_noise", s_noise)
    plan = _Plan(COL_HIST + 2)
    h = h_1 = h_2 = None
    for i in range(len(sig) - 1):
        s, sn = sig[i], sig[i + 1]
        slot, prev1, prev2 = i % 2, (i - 1) % 2, i % 2  # ring: D_i -> slot i % 2
        if sn == 0:
            plan.launch(i, s, a=0.0, b=1.0, hd=1.0, slot=slot)
        else:
            h = math.log(s) - math.log(sn)
            h_eta = h * (eta + 1)
            cd, c1, c2 = -math.expm1(-h_eta), 0.0, 0.0  # coefficients of D, D_1, D_2
            phi_2 = math.expm1(-h_eta) / h_eta + 1
            if h_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0 = (1 / r0, -1 / r0, 0.0)
                d1_1 = (0.0, 1 / r1, -1 / r1)
                q = r0 / (r0 + r1)
                d1 = [a + (a - b) * q for a, b in zip(d1_0, d1_1)]
                d2 = [(a - b) / (r0 + r1) for a, b in zip(d1_0, d1_1)]
                phi_3 = phi_2 / h_eta - 0.5
                cd += phi_2 * d1[0] - phi_3 * d2[0]
                c1 += phi_2 * d1[1] - phi_3 * d2[1]
                c2 += phi_2 * d1[2] - phi_3 * d2[2]
            elif h_1 is not None:
                rr = h_1 / h
                cd += phi_2 / rr
                c1 -= phi_2 / rr
            hist = {}
            if c1:
                hist[prev1] = hist.get(prev1, 0.0) + c1
            if c2:
                hist[prev2] = hist.get(prev2, 0.0) + c2
            noise = dict(s=sn * math.sqrt(-math.expm1(-2 * h * eta)) * s_noise, noise=(i, i + 1)) if eta else {}
            plan.launch(i, s, a=math.exp(-h_eta), b=cd, hist=hist, hd=1.0, slot=slot, **noise)
        h_1, h_2 = h, h_1
        plan.sigma_hat.append(None)
    return plan


# ---------------------------------------------------------------------------
# the loop shared by every sampler
# ---------------------------------------------------------------------------
def _noise_args(spec, sigmas, r):
    """The arguments k-diffusion passes to the noise sampler, computed as it computes them
    (a Brownian path is sensitive to the last ulp of its query points)."""
    if spec is None:
        return None
    if spec[0] in ("mid", "mid2"):
        i = spec[1]
        t, t_next = sigmas[i].log().neg(), sigmas[i + 1].log().neg()
        if spec[0] == "mid":
            return t.neg().exp(), (t + (t_next - t) * r).neg().exp()
        return t.neg().exp(), t_next.neg().exp()
    return sigmas[spec[0]], sigmas[spec[1]]


def _trange(n, disable):
    try:
        from tqdm.auto import trange
    except ImportError:  # tqdm is a dependency; without it there is just no bar
        return range(n)
    return trange(n, disable=disable)


def _check_x(x):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1 or x.shape[0] < 1:
        raise ValueError(f"x must have a batch dimension of size >= 1, got shape {tuple(x.shape)}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise TypeError(f"x must be float32, float16, bfloat16 or float64, got {x.dtype}")


# Plans and their device tensors, reused by calls with the same sampler, arguments and sigmas
# (the usual case: one schedule, many batches), so a call after the first does no host math and no
# upload. Plans are read-only after they are built; the per-call state (step index, history) is not
# cached. Bounded; a plain dict is enough under the GIL (a race builds a plan twice).
_PLAN_CACHE_SIZE = 32
_plans = {}


def _cached_plan(plan_fn, sig, plan_args):
    try:
        key = (plan_fn, tuple(sig), plan_args)
        hash(key)
    except TypeError:  # unhashable arguments (e.g. tensors): no caching
        return plan_fn(sig, *plan_args)
    plan = _plans.get(key)
    if plan is None:
        plan = plan_fn(sig, *plan_args)
        if len(_plans) >= _PLAN_CACHE_SIZE:
            _plans.pop(next(iter(_plans)))
        _plans[key] = plan
    return plan


def _sigma_down(sigma_from, sigma_to, eta):
    """k-diffusion's get_ancestral_step(...)[0] on 0-d tensors (torch.minimum: Python's min, no sync)."""
    if not eta:
        return sigma_to
    sigma_up = torch.minimum(sigma_to,
                             eta * (sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2) / sigma_from ** 2) ** 0.5)
    return (sigma_to ** 2 - sigma_up ** 2) ** 0.5


def _model_sigmas(specs, sigmas):
    """The sigma of every model evaluation, computed from the sigmas tensor (its dtype and device) with
    k-diffusion's own expressions, so each equals k-diffusion's to the last ulp; one 1-D tensor."""
    out = []
    for kind, i, *arg in specs:
        if kind == "at":
            v = sigmas[i]
        elif kind in ("hat", "mid"):  # sigma_hat = sigmas[i] * (gamma + 1); DPM-2's midpoint
            v = sigmas[i] * (arg[0] + 1)
            if kind == "mid":
                v = v.log().lerp(sigmas[i + 1].log(), 0.5).exp()
        elif kind == "amid":  # DPM-2 ancestral's midpoint
            v = sigmas[i].log().lerp(_sigma_down(sigmas[i], sigmas[i + 1], arg[0]).log(), 0.5).exp()
        elif kind in ("2s", "sde"):  # sigma_fn(t + r·h) of DPM++(2S) ancestral (r = 1/2) and DPM++ SDE
            t = sigmas[i].log().neg()
            if kind == "2s":
                t_next = _sigma_down(sigmas[i], sigmas[i + 1], arg[0]).log().neg()
                v = (t + 1 / 2 * (t_next - t)).neg().exp()
            else:
                t_next = sigmas[i + 1].log().neg()
                v = (t + (t_next - t) * arg[0]).neg().exp()
        else:
            raise AssertionError(kind)
        out.append(v)
    return torch.stack(out)


@functools.lru_cache(maxsize=None)
def _model_sigma_dtype(sigma_dtype, x_dtype):
    """The dtype of k-diffusion's ``sigmas[i] * s_in`` (a 0-d ``sigma_dtype`` tensor times a 1-D ``x_dtype``
    one): type promotion, i.e. x's dtype for floating sigmas."""
    return torch.result_type(torch.empty((), dtype=sigma_dtype), torch.empty(1, dtype=x_dtype))


def _device_tables(plan, x, sigmas):
    """(coefficient table on x's device, the per-evaluation model sigmas ``sigma_k·s_in`` as views),
    made once per (device, dtypes, batch) and kept on the plan."""
    key = (x.device, x.dtype, sigmas.device, sigmas.dtype, x.shape[0])
    cache = plan.device_tables
    got = cache.get(key)
    if got is not None and got[2]._version == got[3]:  # (a model that edited its sigma in place: rebuild)
        return got[0], got[1]
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    coeffs = torch.tensor(plan.rows, dtype=torch.float64).to(device=x.device, dtype=acc)
    # each row = sigma_k·s_in as k-diffusion passes it (s_in = x.new_ones(B)): sigma_k computed as k-diffusion
    # computes it (sigmas' dtype and device), then in the promoted (x's) dtype, on x's device, shape (B,)
    call_in = _model_sigmas(plan.call_specs, sigmas.detach()).to(_model_sigma_dtype(sigmas.dtype, x.dtype)).to(
        x.device)[:, None].expand(-1, x.shape[0]).contiguous()
    rows = list(call_in.unbind(0))
    cache[key] = (coeffs, rows, call_in, call_in._version)
    return coeffs, rows


def _run(plan, model, x, sigmas, extra_args, callback, disable, noise_sampler):
    extra_args = {} if extra_args is None else extra_args
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable or None, got {type(callback).__name__}")
    if noise_sampler is not None and not callable(noise_sampler):
        raise TypeError(f"noise_sampler must be callable or None, got {type(noise_sampler).__name__}")
    seed = default_seed() if plan.in_kernel and noise_sampler is None else 0
    coeffs, call_in = _device_tables(plan, x, sigmas)
    prog = StepProgram(coeffs, x, seed=seed, stream=1)

    x = x.contiguous()
    x = plan.churn_start(x, seed)
    ns_args = None if noise_sampler is None else [_noise_args(spec, sigmas, plan.r) for spec in plan.noise]
    spare = None  # the x of the previous launch: reused as an output once unobserved (_unobserved)
    for i in _trange(len(plan.steps), disable):
        for k in plan.steps[i]:
            denoised = check_model_out(model(x, call_in[k], **extra_args), x)
            if plan.first[k] >= 0 and callback is not None:
                g1 = plan.sigma_hat[i]
                callback({'x': x, 'i': i, 'sigma': sigmas[i], 'sigma_hat': sigmas[i] if g1 is None else sigmas[i] * g1,
                          'denoised': denoised})
            noise = None
            if ns_args is not None and ns_args[k] is not None:
                noise = noise_sampler(*ns_args[k])
                if isinstance(noise, torch.Tensor) and noise.dtype != x.dtype:
                    noise = noise.to(x.dtype)  # k-diffusion would promote; the step reads x's dtype
                noise = check_model_out(noise, x, "noise_sampler(sigma, sigma_next)")
            # k-diffusion never writes a tensor once it was handed out (the model or a callback may keep
            # the x it was given; the caller keeps theirs). So the step writes x in place only when
            # nothing else refers to it any more, else the x of the previous launch if that one is
            # unobserved, else a fresh tensor (on the CPU a fresh 4-16 MB tensor costs its page faults
            # again at every step: 1.3-1.6x the loop's time; a separate output ~1.1-1.2x)
            if _unobserved(x):
                out = x
            elif spare is not None and _unobserved(spare):
                out = spare
            else:
                out = torch.empty_like(x)
            prog.step(x, denoised, out, noise)
            if out is not x:
                spare, x = x, out
            del out  # (a reference of its own would make x look observed at the next step)
    return x


def _unobserved(t):
    """Whether nothing but the caller's one variable refers to ``t`` or its memory: no other Python
    reference (a kept input, a callback's list, a view's base), no weak reference, no view or autograd
    node sharing its TensorImpl or storage, no kept storage object. Writing into ``t`` then cannot be
    seen by anyone. False whenever the interpreter's reference counts do not follow the rule the
    checks assume (``_REUSE_OK``, probed once)."""
    if not _REUSE_OK:
        return False
    try:
        if sys.getrefcount(t) != 3 or weakref.getweakrefcount(t) or t._use_count() != 1:
            return False  # (3: the caller's variable, this parameter, getrefcount's argument)
        # one Python object per storage (a kept one is this same object): this variable, getrefcount's
        # argument and the reference torch keeps while the object exists
        storage = t.untyped_storage()
        return sys.getrefcount(storage) == 3 and torch._C._storage_Use_Count(storage._cdata) == 2
    except (AttributeError, RuntimeError, TypeError):  # another torch build: never reuse
        return False


def _probe_reuse_rule():
    """Whether ``_unobserved`` tells a free tensor from a referenced one on this interpreter (CPython's
    reference counting as of 3.11-3.13; an interpreter that counts borrowed references differently
    turns buffer reuse off instead of risking a write into a kept tensor)."""
    global _REUSE_OK
    _REUSE_OK = True
    try:
        free = torch.empty(4)
        ok = _unobserved(free)
        kept = [free]
        ok = ok and not _unobserved(free)
        del kept
        view = free[1:]
        ok = ok and not _unobserved(free)
        del view
        storage = free.untyped_storage()
        ok = ok and not _unobserved(free)
        del storage
        ok = ok and _unobserved(free)
    except Exception:  # noqa: BLE001 - any surprise: no reuse
        ok = False
    _REUSE_OK = ok
    return ok


_REUSE_OK = True
_probe_reuse_rule()


def _sample(plan_fn, model, x, sigmas, extra_args, callback, disable, noise_sampler, *plan_args):
    """Check x and the sigmas (the one host read), build the coefficient program, run it."""
    _check_x(x)
    sig = _host_sigmas(sigmas)
    return _run(_cached_plan(plan_fn, sig, plan_args), model, x, sigmas, extra_args, callback, disable,
                noise_sampler)


@torch.no_grad()
def sample_euler(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0., s_tmin=0.,
                 s_tmax=float('inf'), s_noise=1.):
    """Euler steps (Karras et al. 2022, Algorithm 2), with optional churn; one fused launch per step."""
    return _sample(_plan_euler, model, x, sigmas, extra_args, callback, disable, None, s_churn, s_tmin, s_tmax,
                   s_noise)


@torch.no_grad()
def sample_euler_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1., s_noise=1.,
                           noise_sampler=None):
    """Ancestral sampling with Euler steps."""
    return _sample(_plan_euler_ancestral, model, x, sigmas, extra_args, callback, disable, noise_sampler, eta,
                   s_noise)


@torch.no_grad()
def sample_heun(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0., s_tmin=0.,
                s_tmax=float('inf'), s_noise=1.):
    """Heun steps (Karras et al. 2022, Algorithm 2): two model calls per step, Euler at sigma_next = 0."""
    return _sample(_plan_heun, model, x, sigmas, extra_args, callback, disable, None, s_churn, s_tmin, s_tmax,
                   s_noise)


@torch.no_grad()
def sample_dpm_2(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0., s_tmin=0.,
                 s_tmax=float('inf'), s_noise=1.):
    """DPM-Solver-2-like midpoint steps in log sigma (k-diffusion's sample_dpm_2)."""
    return _sample(_plan_dpm_2, model, x, sigmas, extra_args, callback, disable, None, s_churn, s_tmin, s_tmax,
                   s_noise)


@torch.no_grad()
def sample_dpm_2_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1., s_noise=1.,
                           noise_sampler=None):
    """Ancestral sampling with DPM-Solver-2 steps."""
    return _sample(_plan_dpm_2_ancestral, model, x, sigmas, extra_args, callback, disable, noise_sampler, eta,
                   s_noise)


@torch.no_grad()
def sample_lms(model, x, sigmas, extra_args=None, callback=None, disable=None, order=4):
    """Linear multistep in sigma of the given order (history of order - 1 derivatives on the device)."""
    return _sample(_plan_lms, model, x, sigmas, extra_args, callback, disable, None, order)


@torch.no_grad()
def sample_dpmpp_2s_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1., s_noise=1.,
                              noise_sampler=None):
    """Ancestral sampling with DPM-Solver++(2S) steps."""
    return _sample(_plan_dpmpp_2s_ancestral, model, x, sigmas, extra_args, callback, disable, noise_sampler, eta,
                   s_noise)


@torch.no_grad()
def sample_dpmpp_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1., s_noise=1.,
                     noise_sampler=None, r=1 / 2):
    """DPM-Solver++ (stochastic); without a noise sampler, Brownian noise drawn in the kernel."""
    return _sample(_plan_dpmpp_sde, model, x, sigmas, extra_args, callback, disable, noise_sampler, eta, s_noise,
                   r, noise_sampler is None)


@torch.no_grad()
def sample_dpmpp_2m(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """DPM-Solver++(2M)."""
    return _sample(_plan_dpmpp_2m, model, x, sigmas, extra_args, callback, disable, None)


@torch.no_grad()
def sample_dpmpp_2m_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1., s_noise=1.,
                        noise_sampler=None, solver_type='midpoint'):
    """DPM-Solver++(2M) SDE (midpoint or heun)."""
    return _sample(_plan_dpmpp_2m_sde, model, x, sigmas, extra_args, callback, disable, noise_sampler, eta, s_noise,
                   solver_type)


@torch.no_grad()
def sample_dpmpp_3m_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1., s_noise=1.,
                        noise_sampler=None):
    """DPM-Solver++(3M) SDE."""
    return _sample(_plan_dpmpp_3m_sde, model, x, sigmas, extra_args, callback, disable, noise_sampler, eta,
                   s_noise)


SAMPLERS = {
    "euler": sample_euler,
    "euler_ancestral": sample_euler_ancestral,
    "heun": sample_heun,
    "dpm_2": sample_dpm_2,
    "dpm_2_ancestral": sample_dpm_2_ancestral,
    "lms": sample_lms,
    "dpmpp_2s_ancestral": sample_dpmpp_2s_ancestral,
    "dpmpp_sde": sample_dpmpp_sde,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,
    "dpmpp_3m_sde": sample_dpmpp_3m_sde,
}
