"""Built-in analytic models: Gaussian mixtures with exact noised scores (issue 3, "Built-in analytic models").

Plain PyTorch, batched, device-agnostic; no kernels. The samplers' tests, the
demo and the benchmarks use these models, so no weights are needed.

A ``GaussianMixture`` is p(x0) = sum_k w_k N(x0; mu_k, diag(s_k^2)) with K
components in D dimensions. Adding Gaussian noise keeps it a mixture, so every
quantity a sampler needs is exact at every noise level:

VE convention (k-diffusion, score_sde VE): x = x0 + sigma·eps,
    p_sigma(x) = sum_k w_k N(x; mu_k, diag(s_k^2 + sigma^2));
    ``log_prob``, ``energy`` (= -log_prob), ``score`` (= grad_x log p_sigma),
    ``denoiser`` (Tweedie: E[x0 | x] = x + sigma^2·score), ``eps`` (E[eps | x] =
    (x - denoiser)/sigma = -sigma·score).
VP convention (DDPM/diffusers, score_sde VP): x_t = alpha·x0 + s·eps,
    p(x_t) = sum_k w_k N(x_t; alpha·mu_k, diag(alpha^2 s_k^2 + s^2));
    ``score_vp``, ``eps_vp`` (= -s·score_vp), ``x0_vp`` (E[x0 | x_t]),
    ``v_vp`` (alpha·eps - s·x0, diffusers' v-prediction), and
    ``flow_velocity`` (rectified flow x_t = (1 - t)·x0 + t·eps: E[eps - x0 | x_t]).

The posterior over components (the "responsibilities") is a softmax of
log-weights plus Gaussian log-densities, so every quantity is a
responsibility-weighted sum of per-component closed forms, numerically stable
far from all modes (no density is ever exponentiated on its own).

Shapes: ``x`` is (..., D), or (B, *event) with prod(event) == D (e.g. images,
flattened per row). A noise level (``sigma``, ``alpha``, ``s``, ``t``) is a
Python number, a 0-d tensor, a per-row tensor (B,) (B = x.shape[0]), or a
tensor of x's batch shape. Computation is in x's dtype (float16/bfloat16
inputs are computed in float32 and the result cast back) on x's device; the
mixture's parameters are cast once per (device, dtype) and cached, so the
callables do no host synchronisation and no host-to-device copies after their
first call.

Bad arguments raise ``ValueError``/``TypeError`` naming the argument.
"""
import math
import numbers

import torch

from pygen.ops._common import check_int as _check_int
from pygen.ops._common import check_real as _check_real

__all__ = ["GaussianMixture", "clot", "ring", "CLOT_MEANS", "CLOT_STDS", "CLOT_WEIGHTS", "MODEL_KINDS"]

_F64 = torch.float64
_LOG_2PI = math.log(2.0 * math.pi)

# The 2-D "clot" of seed 000: seven axis-aligned anisotropic blobs of unequal
# weights around the origin, spread over roughly [-3.5, 3.5]^2 (mean ~(0.01, 0.40),
# covariance ~[[3.85, -0.41], [-0.41, 3.55]]), the modes far enough apart that
# mode weights are a meaningful statistic: about 0.2% of exact samples are
# attributed (``component_of``) to a component other than the one that drew them.
CLOT_MEANS = (
    (-2.6, 1.3),
    (-0.6, 3.2),
    (1.5, 2.1),
    (3.0, 0.2),
    (1.4, -2.3),
    (-1.6, -1.8),
    (0.2, 0.1),
)
CLOT_STDS = (
    (0.35, 0.65),
    (0.55, 0.25),
    (0.30, 0.30),
    (0.25, 0.60),
    (0.60, 0.30),
    (0.45, 0.45),
    (0.20, 0.35),
)
CLOT_WEIGHTS = (0.22, 0.10, 0.18, 0.12, 0.16, 0.14, 0.08)

#: kinds accepted by ``GaussianMixture.model_fn``
MODEL_KINDS = ("denoiser", "eps", "x0", "v", "flow", "score", "energy", "grad_log_prob")


# ---------------------------------------------------------------------------
# argument helpers
# ---------------------------------------------------------------------------
def _param(name, value):
    """A real tensor (numbers/sequences -> float64) for a constructor argument."""
    if isinstance(value, torch.Tensor):
        if value.is_complex() or value.dtype == torch.bool:
            raise TypeError(f"{name} must be a real tensor, got dtype {value.dtype}")
        return value.detach() if value.is_floating_point() else value.detach().to(_F64)
    try:
        return torch.as_tensor(value, dtype=_F64)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(f"{name} must be a tensor or a (nested) sequence of numbers, "
                        f"got {type(value).__name__}") from exc


def _compute_dtype(x):
    if x.dtype in (torch.float32, _F64):
        return x.dtype
    return torch.float32


def _level(name, value, bshape, device, dtype):
    """A noise level as a float, or a tensor broadcastable to the batch shape ``bshape``.

    Accepts a number, a 0-d or one-element tensor, a per-row tensor (B,) with
    B = bshape[0], or a tensor of shape ``bshape``. Only metadata is inspected
    (no host sync).
    """
    if isinstance(value, torch.Tensor):
        if value.is_complex() or value.dtype == torch.bool:
            raise TypeError(f"{name} must be a real number or tensor, got dtype {value.dtype}")
        v = value.to(device=device, dtype=dtype)
        if v.dim() == 0:
            return v
        if v.dim() == 1 and v.shape[0] == 1:
            return v.reshape(())
        if tuple(v.shape) == tuple(bshape):
            return v
        if v.dim() == 1 and len(bshape) >= 1 and v.shape[0] == bshape[0]:
            return v.reshape((v.shape[0],) + (1,) * (len(bshape) - 1))
        raise ValueError(f"{name} must be a number, a 0-d tensor, a per-row tensor of shape "
                         f"({bshape[0] if bshape else 1},) or a tensor of the batch shape {tuple(bshape)}; "
                         f"got shape {tuple(v.shape)}")
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number or tensor, got {type(value).__name__}")
    return float(value)


def _kd(c):
    """Lift a level (float or tensor of batch shape) to broadcast against (..., K, D)."""
    if isinstance(c, torch.Tensor):
        return c[..., None, None]
    return c


# ---------------------------------------------------------------------------
# the mixture
# ---------------------------------------------------------------------------
class GaussianMixture:
    """A mixture of K diagonal Gaussians in D dimensions with exact noised quantities.

    Args:
        means: (K, D) component means.
        stds: (K, D) per-dimension standard deviations, or (K,) isotropic ones
            (all > 0).
        weights: (K,) positive component weights (normalised here); equal
            weights when omitted.
        device, dtype: where and in which floating dtype to keep the
            parameters (default: the device of ``means`` if it is a tensor, else
            CPU; float64).

    Evaluation methods compute in the dtype of ``x`` (fp16/bf16 in fp32) on
    x's device; ``sample`` returns the mixture's dtype on its device.
    """

    def __init__(self, means, stds, weights=None, *, device=None, dtype=None):
        means = _param("means", means)
        stds = _param("stds", stds)
        if means.dim() != 2 or means.shape[0] < 1 or means.shape[1] < 1:
            raise ValueError(f"means must have shape (K, D) with K, D >= 1, got {tuple(means.shape)}")
        K, D = means.shape
        if stds.dim() == 1 and stds.shape[0] == K:
            stds = stds[:, None].expand(K, D)
        elif tuple(stds.shape) != (K, D):
            raise ValueError(f"stds must have shape ({K}, {D}) (diagonal) or ({K},) (isotropic) to match "
                             f"means {tuple(means.shape)}, got {tuple(stds.shape)}")
        if weights is None:
            weights = torch.ones(K, dtype=_F64, device=means.device)
        weights = _param("weights", weights)
        if weights.dim() != 1 or weights.shape[0] != K:
            raise ValueError(f"weights must have shape ({K},) to match means {tuple(means.shape)}, "
                             f"got {tuple(weights.shape)}")
        if dtype is None:
            dtype = _F64
        if dtype not in (_F64, torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"dtype must be a floating dtype, got {dtype}")
        if device is None:
            device = means.device
        device = torch.device(device)
        # validate values in float64 on the CPU (setup-time host sync)
        m64, s64, w64 = (t.to("cpu", _F64) if t.device.type != "meta" else None for t in (means, stds, weights))
        if m64 is not None:
            if not bool(torch.isfinite(m64).all()):
                raise ValueError("means must be finite")
            if not bool(torch.isfinite(s64).all()) or not bool((s64 > 0).all()):
                raise ValueError(f"stds must be finite and > 0, got min {float(s64.min())}")
            if not bool(torch.isfinite(w64).all()) or not bool((w64 > 0).all()):
                raise ValueError(f"weights must be finite and > 0, got {w64.tolist()}")
            w64 = w64 / w64.sum()
        else:  # parameters on the meta device: shapes only
            m64, s64 = means.to(_F64), stds.to(_F64)
            w64 = weights.to(_F64) / weights.to(_F64).sum()
        self._means = m64.to(device=device, dtype=dtype).contiguous()
        self._stds = s64.to(device=device, dtype=dtype).contiguous()
        self._weights = w64.to(device=device, dtype=dtype).contiguous()
        self._cache = {}

    # -- parameters --------------------------------------------------------
    @property
    def means(self):
        """(K, D) component means."""
        return self._means

    @property
    def stds(self):
        """(K, D) per-dimension component standard deviations."""
        return self._stds

    @property
    def weights(self):
        """(K,) normalised component weights."""
        return self._weights

    @property
    def num_components(self):
        return self._means.shape[0]

    @property
    def dim(self):
        return self._means.shape[1]

    @property
    def device(self):
        return self._means.device

    @property
    def dtype(self):
        return self._means.dtype

    def __repr__(self):
        return (f"GaussianMixture(K={self.num_components}, D={self.dim}, device={self.device}, "
                f"dtype={self.dtype})")

    def to(self, device=None, dtype=None):
        """A copy with parameters on ``device`` in ``dtype`` (either may be None: keep)."""
        device = self.device if device is None else device
        dtype = self.dtype if dtype is None else dtype
        return GaussianMixture(self._means, self._stds, self._weights, device=device, dtype=dtype)

    def mean(self):
        """(D,) mean of the mixture (sigma = 0)."""
        return self._weights @ self._means

    def covariance(self, sigma=0.0):
        """(D, D) covariance of the noised mixture p_sigma (sigma a number)."""
        sigma = _check_real("sigma", sigma)
        w, mu = self._weights, self._means
        m = w @ mu
        second = (w[:, None] * (self._stds**2 + sigma * sigma)).sum(0)
        centred = mu - m
        return torch.diag(second) + (w[:, None] * centred).T @ centred

    def _params(self, device, dtype):
        key = (device, dtype)
        p = self._cache.get(key)
        if p is None:
            mu = self._means.to(device=device, dtype=dtype)
            var = (self._stds.to(device=device, dtype=dtype)) ** 2
            logw = torch.log(self._weights.to(device=device, dtype=dtype))
            p = self._cache[key] = (mu, var, logw)
        return p

    # -- plumbing ------------------------------------------------------------
    def _flat(self, x, name="x"):
        """(x in compute dtype as (..., D), batch shape, output shape for vectors)."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor, got dtype {x.dtype}")
        D = self.dim
        if x.dim() >= 1 and x.shape[-1] == D:
            xf = x
        elif x.dim() >= 2 and math.prod(x.shape[1:]) == D:
            xf = x.reshape(x.shape[0], D)
        else:
            raise ValueError(f"{name} must have shape (..., {D}) or (B, *event) with prod(event) == {D}, "
                             f"got {tuple(x.shape)}")
        return xf.to(_compute_dtype(x)), xf.shape[:-1]

    def _terms(self, xf, alpha, var_noise):
        """Per-component terms of the mixture with means alpha·mu and variances alpha²·s² + var_noise.

        Returns (logits (..., K), diff = x - alpha·mu (..., K, D), V (..., K, D) or (K, D)).
        """
        mu, var, logw = self._params(xf.device, xf.dtype)
        a = _kd(alpha)
        V = (a * a) * var + _kd(var_noise)
        diff = xf[..., None, :] - a * mu
        logn = -0.5 * (diff * diff / V).sum(-1) - 0.5 * torch.log(V).sum(-1) - 0.5 * self.dim * _LOG_2PI
        return logw + logn, diff, V

    def _vp(self, x, alpha, s, *, names=("alpha", "s")):
        xf, bshape = self._flat(x)
        a = _level(names[0], alpha, bshape, xf.device, xf.dtype)
        s = _level(names[1], s, bshape, xf.device, xf.dtype)
        return xf, a, s

    def _score_from(self, logits, diff, V):
        r = torch.softmax(logits, dim=-1)
        return -(r[..., None] * (diff / V)).sum(-2)

    def _x0_from(self, logits, diff, V, alpha):
        mu, var, _ = self._params(diff.device, diff.dtype)
        r = torch.softmax(logits, dim=-1)
        post = mu + (_kd(alpha) * var / V) * diff  # E[x0 | x, component k]
        return (r[..., None] * post).sum(-2)

    @staticmethod
    def _out(y, x):
        return y.reshape(x.shape).to(x.dtype)

    # -- VE convention: x = x0 + sigma·eps -------------------------------------
    def log_prob(self, x, sigma=0.0):
        """log p_sigma(x), shape of x's batch ((...) for (..., D) input, (B,) for (B, *event))."""
        xf, bshape = self._flat(x)
        sg = _level("sigma", sigma, bshape, xf.device, xf.dtype)
        logits, _, _ = self._terms(xf, 1.0, sg * sg)
        return torch.logsumexp(logits, dim=-1).to(x.dtype)

    def energy(self, x, sigma=0.0):
        """-log p_sigma(x) (normalised energy)."""
        return -self.log_prob(x, sigma)

    def score(self, x, sigma=0.0):
        """grad_x log p_sigma(x), shape of x."""
        xf, bshape = self._flat(x)
        sg = _level("sigma", sigma, bshape, xf.device, xf.dtype)
        return self._out(self._score_from(*self._terms(xf, 1.0, sg * sg)), x)

    def denoiser(self, x, sigma):
        """E[x0 | x0 + sigma·eps = x] = x + sigma²·score (computed as a posterior mean), shape of x."""
        xf, bshape = self._flat(x)
        sg = _level("sigma", sigma, bshape, xf.device, xf.dtype)
        logits, diff, V = self._terms(xf, 1.0, sg * sg)
        return self._out(self._x0_from(logits, diff, V, 1.0), x)

    def eps(self, x, sigma):
        """E[eps | x0 + sigma·eps = x] = (x - denoiser)/sigma = -sigma·score, shape of x."""
        xf, bshape = self._flat(x)
        sg = _level("sigma", sigma, bshape, xf.device, xf.dtype)
        score = self._score_from(*self._terms(xf, 1.0, sg * sg))
        return self._out(-(sg[..., None] if isinstance(sg, torch.Tensor) else sg) * score, x)

    # -- VP convention: x_t = alpha·x0 + s·eps ---------------------------------
    def log_prob_vp(self, x, alpha, s):
        """log density of x_t = alpha·x0 + s·eps."""
        xf, a, s = self._vp(x, alpha, s)
        logits, _, _ = self._terms(xf, a, s * s)
        return torch.logsumexp(logits, dim=-1).to(x.dtype)

    def score_vp(self, x, alpha, s):
        """grad log p(x_t) for x_t = alpha·x0 + s·eps, shape of x."""
        xf, a, s = self._vp(x, alpha, s)
        return self._out(self._score_from(*self._terms(xf, a, s * s)), x)

    def eps_vp(self, x, alpha, s):
        """E[eps | x_t] = -s·score_vp (the eps-prediction target), shape of x."""
        xf, a, s = self._vp(x, alpha, s)
        score = self._score_from(*self._terms(xf, a, s * s))
        return self._out(-(s[..., None] if isinstance(s, torch.Tensor) else s) * score, x)

    def x0_vp(self, x, alpha, s):
        """E[x0 | x_t] (the x0-prediction target), shape of x."""
        xf, a, s = self._vp(x, alpha, s)
        logits, diff, V = self._terms(xf, a, s * s)
        return self._out(self._x0_from(logits, diff, V, a), x)

    def v_vp(self, x, alpha, s):
        """E[alpha·eps - s·x0 | x_t] (diffusers' v-prediction target), shape of x."""
        xf, a, s = self._vp(x, alpha, s)
        logits, diff, V = self._terms(xf, a, s * s)
        eps = -self._expand_level(s) * self._score_from(logits, diff, V)
        x0 = self._x0_from(logits, diff, V, a)
        return self._out(self._expand_level(a) * eps - self._expand_level(s) * x0, x)

    def flow_velocity(self, x, t):
        """E[eps - x0 | x_t] for the rectified flow x_t = (1 - t)·x0 + t·eps, t in [0, 1], shape of x."""
        xf, bshape = self._flat(x)
        t = _level("t", t, bshape, xf.device, xf.dtype)
        a = 1.0 - t
        logits, diff, V = self._terms(xf, a, t * t)
        eps = -self._expand_level(t) * self._score_from(logits, diff, V)
        x0 = self._x0_from(logits, diff, V, a)
        return self._out(eps - x0, x)

    @staticmethod
    def _expand_level(c):
        return c[..., None] if isinstance(c, torch.Tensor) else c

    # -- components and sampling -------------------------------------------
    def responsibilities(self, x, sigma=0.0):
        """(..., K) posterior probabilities of the components given x under p_sigma."""
        xf, bshape = self._flat(x)
        sg = _level("sigma", sigma, bshape, xf.device, xf.dtype)
        logits, _, _ = self._terms(xf, 1.0, sg * sg)
        return torch.softmax(logits, dim=-1).to(x.dtype)

    def component_of(self, x, sigma=0.0):
        """Index (int64, x's batch shape) of the most responsible component for each point."""
        xf, bshape = self._flat(x)
        sg = _level("sigma", sigma, bshape, xf.device, xf.dtype)
        logits, _, _ = self._terms(xf, 1.0, sg * sg)
        return torch.argmax(logits, dim=-1)

    def sample(self, n, generator=None, *, sigma=0.0, return_labels=False):
        """n exact samples (n, D) of p_sigma on the mixture's device in its dtype.

        ``generator``: a torch.Generator on the mixture's device (default: the
        global RNG). ``return_labels=True`` also returns the (n,) int64
        component each sample was drawn from.
        """
        n = _check_int("n", n, 0)
        sigma = _check_real("sigma", sigma, ge=0.0)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        dev, dt = self.device, self.dtype
        wdt = _F64 if dt == _F64 else torch.float32
        labels = torch.multinomial(self._weights.to(wdt), n, replacement=True, generator=generator) \
            if n > 0 else torch.zeros(0, dtype=torch.long, device=dev)
        noise = torch.randn(n, self.dim, generator=generator, device=dev, dtype=wdt)
        std = torch.sqrt(self._stds.to(wdt) ** 2 + sigma * sigma)
        x = (self._means.to(wdt)[labels] + std[labels] * noise).to(dt)
        return (x, labels) if return_labels else x

    # -- adapters for samplers ----------------------------------------------
    def model_fn(self, kind, *, sde=None, alphas_cumprod=None, sigma=0.0):
        """A callable in one of the conventions the samplers use (``MODEL_KINDS``).

        - ``"denoiser"``: k-diffusion ``D(x, sigma, **extra_args)`` -> E[x0 | x]
          (sigma per row (B,) or scalar; extra args are ignored).
        - ``"eps"``, ``"x0"``, ``"v"``: diffusers-style ``f(x_t, alpha_bar_t)`` for
          x_t = sqrt(alpha_bar)·x0 + sqrt(1 - alpha_bar)·eps, returning the eps-,
          x0- or v-prediction. With ``alphas_cumprod`` (a 1-D table) the second
          argument is a timestep instead (integer: looked up; floating: linearly
          interpolated in the table; outside [0, len - 1]: NaN), like
          ``unet(sample, timestep)``.
        - ``"flow"``: ``f(x_t, t)`` -> E[eps - x0 | x_t] for x_t = (1-t)·x0 + t·eps
          (diffusers FlowMatch convention, t = sigma in [0, 1]).
        - ``"score"``: with ``sde`` (a ``pygen.schedules`` SDE) ``f(x, t)`` ->
          grad log p_t(x) of the SDE's marginal at time t; without ``sde``,
          ``f(x, sigma)`` -> the VE score.
        - ``"energy"``: ``f(x)`` -> -log p_sigma(x) at the fixed noise level
          ``sigma`` (default 0), shape of x's batch.
        - ``"grad_log_prob"``: ``f(x)`` -> grad log p_sigma(x) at the fixed ``sigma``.

        The callables only launch torch ops (no host sync). Each counts its
        calls in ``.nfe`` (a Python counter).
        """
        if not isinstance(kind, str) or kind not in MODEL_KINDS:
            raise ValueError(f"kind must be one of {', '.join(repr(k) for k in MODEL_KINDS)}; got {kind!r}")
        if sde is not None and kind != "score":
            raise ValueError(f"sde is only used by kind='score', got kind={kind!r}")
        if alphas_cumprod is not None and kind not in ("eps", "x0", "v"):
            raise ValueError(f"alphas_cumprod is only used by kinds 'eps', 'x0', 'v', got kind={kind!r}")
        if kind in ("energy", "grad_log_prob"):
            fixed = _check_real("sigma", sigma, ge=0.0)
        elif not (isinstance(sigma, numbers.Real) and float(sigma) == 0.0):
            raise ValueError(f"sigma is only used by kinds 'energy' and 'grad_log_prob', got kind={kind!r}")

        if kind == "denoiser":
            def fn(x, sigma, **extra_args):
                return self.denoiser(x, sigma)
        elif kind in ("eps", "x0", "v"):
            method = {"eps": self.eps_vp, "x0": self.x0_vp, "v": self.v_vp}[kind]
            table = None
            if alphas_cumprod is not None:
                table = _param("alphas_cumprod", alphas_cumprod)
                if table.dim() != 1 or table.shape[0] < 1:
                    raise ValueError(f"alphas_cumprod must be a non-empty 1-D table, got {tuple(table.shape)}")
                tables = {}

            def fn(x, t, **extra_args):
                if table is None:
                    ab = t
                else:
                    ab = _lookup(tables, table, t, x)
                if isinstance(ab, torch.Tensor):
                    ab = ab.to(device=x.device, dtype=_compute_dtype(x))
                    return method(x, torch.sqrt(ab), torch.sqrt(1.0 - ab))
                ab = float(ab)
                return method(x, math.sqrt(ab), math.sqrt(1.0 - ab))
        elif kind == "flow":
            def fn(x, t, **extra_args):
                return self.flow_velocity(x, t)
        elif kind == "score":
            if sde is None:
                def fn(x, sigma, **extra_args):
                    return self.score(x, sigma)
            else:
                if not (hasattr(sde, "mean_coeff") and hasattr(sde, "marginal_std")):
                    raise TypeError(f"sde must be a pygen.schedules SDE, got {type(sde).__name__}")

                def fn(x, t, **extra_args):
                    if isinstance(t, torch.Tensor):
                        t = t.to(device=x.device, dtype=_compute_dtype(x))
                    alpha, std = _sde_marginal(sde, t)
                    return self.score_vp(x, alpha, std)
        elif kind == "energy":
            def fn(x, **extra_args):
                return self.energy(x, fixed)
        else:  # grad_log_prob
            def fn(x, **extra_args):
                return self.score(x, fixed)
        return _Counted(fn, kind)


class _Counted:
    """A model callable that counts its evaluations (``nfe``)."""

    def __init__(self, fn, kind):
        self._fn = fn
        self.kind = kind
        self.nfe = 0

    def __call__(self, *args, **kwargs):
        self.nfe += 1
        return self._fn(*args, **kwargs)

    def __repr__(self):
        return f"<pygen.models model_fn kind={self.kind!r} nfe={self.nfe}>"


def _lookup(cache, table, t, x):
    """alpha_bar at timestep ``t`` from ``table``: integer t indexes, floating t interpolates linearly."""
    dt = _compute_dtype(x)
    key = (x.device, dt)
    tab = cache.get(key)
    if tab is None:
        tab = cache[key] = table.to(device=x.device, dtype=dt)
    if not isinstance(t, torch.Tensor):
        t = torch.as_tensor(t)
    t = t.to(x.device)
    n = tab.shape[0]
    if not t.is_floating_point():
        t = t.long()
        inside = (t >= 0) & (t < n)
        return torch.where(inside, tab[t.clamp(0, n - 1)], torch.nan)
    tf = t.to(dt)
    inside = (tf >= 0) & (tf <= n - 1)  # False for NaN
    tf = torch.where(inside, tf, 0.0)
    lo = tf.floor()
    frac = tf - lo
    lo = lo.long()
    hi = (lo + 1).clamp(max=n - 1)
    return torch.where(inside, torch.lerp(tab[lo], tab[hi], frac), torch.nan)


def _sde_marginal(sde, t):
    """(mean_coeff, marginal_std) of a pygen.schedules SDE at t, without the host-side range check.

    Known SDEs are evaluated from their closed forms (so a device tensor ``t``
    causes no host sync); other SDE classes fall back to their methods.
    """
    from pygen import schedules

    if isinstance(sde, schedules.VESDE):
        ratio = sde.sigma_max / sde.sigma_min
        std = sde.sigma_min * (ratio ** t if isinstance(t, torch.Tensor) else ratio ** float(t))
        return 1.0, std
    if isinstance(sde, schedules.VPSDE):
        if isinstance(t, torch.Tensor):
            B = sde.beta_min * t + 0.5 * (sde.beta_max - sde.beta_min) * t * t
            alpha = torch.exp(-0.5 * B)
            var = -torch.expm1(-B)
            std = var if isinstance(sde, schedules.SubVPSDE) else torch.sqrt(var)
            return alpha, std
        t = float(t)
        B = sde.beta_min * t + 0.5 * (sde.beta_max - sde.beta_min) * t * t
        var = -math.expm1(-B)
        return math.exp(-0.5 * B), (var if isinstance(sde, schedules.SubVPSDE) else math.sqrt(var))
    return sde.mean_coeff(t), sde.marginal_std(t)


# ---------------------------------------------------------------------------
# factories
# ---------------------------------------------------------------------------
def clot(*, device=None, dtype=_F64):
    """The 2-D "clot" of seed 000: 7 anisotropic blobs of unequal weights (``CLOT_*``).

    Means, per-axis stds and weights (normalised, they sum to 1):

    ====  ==============  ============  ======
     k     mean            std           weight
    ====  ==============  ============  ======
     0     (-2.6,  1.3)    (0.35, 0.65)  0.22
     1     (-0.6,  3.2)    (0.55, 0.25)  0.10
     2     ( 1.5,  2.1)    (0.30, 0.30)  0.18
     3     ( 3.0,  0.2)    (0.25, 0.60)  0.12
     4     ( 1.4, -2.3)    (0.60, 0.30)  0.16
     5     (-1.6, -1.8)    (0.45, 0.45)  0.14
     6     ( 0.2,  0.1)    (0.20, 0.35)  0.08
    ====  ==============  ============  ======
    """
    return GaussianMixture(CLOT_MEANS, CLOT_STDS, CLOT_WEIGHTS, device=device, dtype=dtype)


def ring(k=8, radius=4.0, std=0.3, dim=2, *, device=None, dtype=_F64):
    """k equal-weight isotropic Gaussians (std ``std``) evenly spaced on a circle of ``radius``.

    The circle lies in the first two coordinates; further coordinates (``dim`` > 2)
    have mean 0 and the same std.
    """
    k = _check_int("k", k, 1)
    dim = _check_int("dim", dim, 2)
    radius = _check_real("radius", radius, ge=0.0)
    std = _check_real("std", std, gt=0.0)
    angle = torch.arange(k, dtype=_F64) * (2.0 * math.pi / k)
    means = torch.zeros(k, dim, dtype=_F64)
    means[:, 0] = radius * torch.cos(angle)
    means[:, 1] = radius * torch.sin(angle)
    return GaussianMixture(means, torch.full((k,), std, dtype=_F64), device=device, dtype=dtype)
