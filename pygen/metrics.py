"""Sample-quality distances for the statistical tests of the samplers (issue 3, "Statistical correctness").

Plain PyTorch on the samples' device; no kernels. Every function returns a
Python float (they are test and report tools, not per-step code).

- ``sliced_wasserstein(a, b, n_projections, generator)``: the sliced 2-Wasserstein
  distance sqrt(mean over random unit directions theta of W2^2(theta·a, theta·b)),
  each 1-D W2 exact from sorted projections (unequal sample counts: the exact
  integral of the squared difference of the two empirical quantile functions).
- ``mmd(a, b, bandwidths)``: the unbiased estimate of MMD^2 with the kernel
  sum_h exp(-|x - y|^2 / (2 h^2)); bandwidths by default the median pairwise
  distance of the pooled sample times ``MMD_BANDWIDTH_FACTORS``.
- ``mode_weights(x, mixture)`` / ``mode_weight_error(x, mixture)``: fraction of
  samples whose most responsible component (``mixture.component_of``) is k, and
  max_k |fraction_k - weight_k|.
- ``calibrate(mixture, n, metric, trials, quantile, generator)``: a threshold for
  ``metric`` from exact-vs-exact sample pairs of size n (the ``quantile`` of the
  metric over ``trials`` pairs).

Samples are (N, D) tensors; (N,) is taken as N points in 1-D and (N, *event) is
flattened per row. Computation is in float64.
"""
import math
import numbers

import torch

from pygen.ops._common import check_int as _check_int

__all__ = [
    "MMD_BANDWIDTH_FACTORS",
    "METRICS",
    "sliced_wasserstein",
    "mmd",
    "median_bandwidth",
    "mode_weights",
    "mode_weight_error",
    "calibrate",
]

_F64 = torch.float64

#: default MMD bandwidths, as multiples of the median pairwise distance
MMD_BANDWIDTH_FACTORS = (0.125, 0.25, 0.5, 1.0, 2.0)
#: metric names accepted by ``calibrate``
METRICS = ("sliced_wasserstein", "mmd", "mode_weight_error")

_MEDIAN_POINTS = 1000  # points used by the median heuristic
_BLOCK_ELEMENTS = 1 << 22  # pairwise distances held at once by the MMD kernel sums


def _check_generator(generator):
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")


def _points(name, x, min_n=1):
    """x as an (N, D) float64 tensor."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(x).__name__}")
    if x.is_complex() or x.dtype == torch.bool:
        raise TypeError(f"{name} must be a real tensor, got dtype {x.dtype}")
    if x.dim() == 0:
        raise ValueError(f"{name} must have shape (N, D) or (N,), got a 0-d tensor")
    x = x.reshape(x.shape[0], -1) if x.dim() != 1 else x[:, None]
    if x.shape[0] < min_n or x.shape[1] < 1:
        raise ValueError(f"{name} must hold at least {min_n} point(s) of dimension >= 1, "
                         f"got shape {tuple(x.shape)}")
    return x.to(_F64)


def _pair(a, b, min_n=1):
    a = _points("a", a, min_n)
    b = _points("b", b, min_n)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"a and b must have the same dimension, got {a.shape[1]} and {b.shape[1]}")
    if a.device != b.device:
        raise ValueError(f"a and b must be on the same device, got {a.device} and {b.device}")
    return a, b


def _w2_squared_sorted(sa, sb):
    """Exact W2^2 between the empirical measures of the sorted columns of sa (n, P) and sb (m, P) -> (P,)."""
    n, m = sa.shape[0], sb.shape[0]
    if n == m:
        return ((sa - sb) ** 2).mean(0)
    # the quantile functions are step functions with breaks at i/n and j/m:
    # integrate the squared difference exactly over the merged breaks
    dev = sa.device
    u = torch.cat([torch.arange(1, n + 1, device=dev, dtype=_F64) / n,
                   torch.arange(1, m + 1, device=dev, dtype=_F64) / m]).sort().values
    prev = torch.cat([u.new_zeros(1), u[:-1]])
    width = u - prev
    mid = 0.5 * (u + prev)
    ia = torch.clamp((mid * n).floor().long(), max=n - 1)
    ib = torch.clamp((mid * m).floor().long(), max=m - 1)
    return (width[:, None] * (sa[ia] - sb[ib]) ** 2).sum(0)


def sliced_wasserstein(a, b, n_projections=256, generator=None):
    """Sliced W2 distance between the samples a (n, D) and b (m, D).

    sqrt(mean_theta W2^2(theta·a, theta·b)) over ``n_projections`` unit
    directions theta drawn uniformly on the sphere (from ``generator``, a
    torch.Generator on the samples' device or the CPU; default the global RNG).
    Each 1-D W2 is exact for the two empirical distributions (sorting; for n != m
    the exact integral of the squared quantile difference). In 1-D it is the
    exact W2 of the two samples. NaN in the samples gives NaN.
    """
    a, b = _pair(a, b)
    P = _check_int("n_projections", n_projections, 1)
    _check_generator(generator)
    D = a.shape[1]
    gdev = generator.device if generator is not None else a.device
    theta = torch.randn(D, P, generator=generator, device=gdev, dtype=_F64).to(a.device)
    theta = theta / theta.norm(dim=0, keepdim=True)
    sa = (a @ theta).sort(dim=0).values
    sb = (b @ theta).sort(dim=0).values
    return float(_w2_squared_sorted(sa, sb).mean().clamp_min(0.0).sqrt())


def median_bandwidth(a, b=None):
    """Median pairwise Euclidean distance of the pooled sample (at most 1000 evenly strided points)."""
    x = _points("a", a)
    if b is not None:
        x = torch.cat([x, _points("b", b)])
    if x.shape[0] > _MEDIAN_POINTS:
        x = x[torch.linspace(0, x.shape[0] - 1, _MEDIAN_POINTS, device=x.device).long()]
    d = torch.pdist(x)
    return float(d.median()) if d.numel() else 0.0


def _kernel_sum(x, y, inv2h2, same):
    """sum_{i,j} sum_h exp(-|x_i - y_j|^2 * inv2h2[h]); the diagonal is left out when ``same``."""
    total = torch.zeros((), dtype=_F64, device=x.device)
    yy = (y * y).sum(1)
    block = max(1, _BLOCK_ELEMENTS // y.shape[0])
    for start in range(0, x.shape[0], block):
        xb = x[start:start + block]
        d2 = ((xb * xb).sum(1)[:, None] + yy[None, :] - 2.0 * xb @ y.T).clamp_min(0.0)
        if same:
            idx = torch.arange(xb.shape[0], device=x.device)
            d2[idx, idx + start] = math.inf  # exp(-inf) = 0: drop i == j
        for c in inv2h2:
            total = total + torch.exp(-c * d2).sum()
    return total


def mmd(a, b, bandwidths=None):
    """Unbiased estimate of MMD^2 between the samples a (n, D) and b (m, D) (n, m >= 2).

    Kernel k(x, y) = sum_h exp(-|x - y|^2 / (2 h^2)) over ``bandwidths`` (a
    number or a sequence of positive numbers); by default the median pairwise
    distance of the pooled sample times ``MMD_BANDWIDTH_FACTORS``. The estimate
    can be slightly negative when the distributions are equal.
    """
    a, b = _pair(a, b, min_n=2)
    if bandwidths is None:
        med = median_bandwidth(a, b)
        if not math.isfinite(med):
            return math.nan
        if med <= 0.0:
            med = 1.0  # all points coincide: any bandwidth gives the same (zero) estimate
        hs = [med * f for f in MMD_BANDWIDTH_FACTORS]
    else:
        hs = [bandwidths] if isinstance(bandwidths, numbers.Real) or (
            isinstance(bandwidths, torch.Tensor) and bandwidths.dim() == 0) else list(bandwidths)
        if not hs:
            raise ValueError("bandwidths must hold at least one bandwidth")
        out = []
        for h in hs:
            h = float(h)
            if not (math.isfinite(h) and h > 0.0):
                raise ValueError(f"bandwidths must be finite and > 0, got {h}")
            out.append(h)
        hs = out
    inv2h2 = [0.5 / (h * h) for h in hs]
    n, m = a.shape[0], b.shape[0]
    kaa = _kernel_sum(a, a, inv2h2, True) / (n * (n - 1))
    kbb = _kernel_sum(b, b, inv2h2, True) / (m * (m - 1))
    kab = _kernel_sum(a, b, inv2h2, False) / (n * m)
    return float(kaa + kbb - 2.0 * kab)


def _mixture_points(x, mixture):
    if not (hasattr(mixture, "component_of") and hasattr(mixture, "weights")):
        raise TypeError(f"mixture must be a pygen.models.GaussianMixture, got {type(mixture).__name__}")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a tensor, got {type(x).__name__}")
    D = mixture.dim
    if x.dim() == 2 and x.shape[1] == D:
        pass
    elif x.dim() >= 2 and math.prod(x.shape[1:]) == D:
        x = x.reshape(x.shape[0], D)
    elif x.dim() == 1 and D == 1:
        x = x[:, None]
    else:
        raise ValueError(f"x must have shape (N, {D}) to match the mixture, got {tuple(x.shape)}")
    if x.shape[0] < 1:
        raise ValueError("x must hold at least one sample")
    return x


def mode_weights(x, mixture):
    """(K,) float64: fraction of the samples x (N, D) whose most responsible component is k."""
    x = _mixture_points(x, mixture)
    comp = mixture.component_of(x)
    counts = torch.bincount(comp, minlength=mixture.num_components).to(_F64)
    return counts / x.shape[0]


def mode_weight_error(x, mixture):
    """max_k |mode_weights(x, mixture)_k - weight_k| (NaN if x holds NaN)."""
    x = _mixture_points(x, mixture)
    if bool(torch.isnan(x).any()):
        return math.nan
    w = mixture.weights.to(device=x.device, dtype=_F64)
    return float((mode_weights(x, mixture) - w).abs().max())


def calibrate(mixture, n, metric="sliced_wasserstein", trials=32, quantile=0.99, generator=None, *, m=None):
    """A threshold for ``metric`` from exact-vs-exact samples of ``mixture``.

    Draws ``trials`` independent pairs of exact samples (n and ``m`` points,
    m = n by default) and returns the ``quantile`` (linear interpolation) of
    metric(a, b) over the pairs: a correct sampler's n samples against m exact
    ones exceed it with probability about 1 - quantile.

    ``metric``: "sliced_wasserstein", "mmd", "mode_weight_error" (one sample of
    n points per trial, against the mixture's weights) or a callable
    ``metric(a, b) -> float``. ``generator`` (on the mixture's device) drives
    the samples and the sliced-Wasserstein projections.
    """
    if not (hasattr(mixture, "sample") and hasattr(mixture, "component_of")):
        raise TypeError(f"mixture must be a pygen.models.GaussianMixture, got {type(mixture).__name__}")
    n = _check_int("n", n, 2)
    m = n if m is None else _check_int("m", m, 2)
    trials = _check_int("trials", trials, 1)
    if isinstance(quantile, bool) or not isinstance(quantile, numbers.Real) or not 0.0 <= quantile <= 1.0:
        raise ValueError(f"quantile must be a number in [0, 1], got {quantile!r}")
    _check_generator(generator)
    if isinstance(metric, str):
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {', '.join(repr(k) for k in METRICS)} or a callable; "
                             f"got {metric!r}")
        if metric == "sliced_wasserstein":
            def fn(a, b):
                return sliced_wasserstein(a, b, generator=generator)
        elif metric == "mmd":
            fn = mmd
        else:
            fn = None
    elif callable(metric):
        fn = metric
    else:
        raise TypeError(f"metric must be a metric name or a callable, got {type(metric).__name__}")
    values = []
    for _ in range(trials):
        a = mixture.sample(n, generator)
        if fn is None:
            values.append(mode_weight_error(a, mixture))
        else:
            values.append(float(fn(a, mixture.sample(m, generator))))
    return float(torch.quantile(torch.tensor(values, dtype=_F64), float(quantile)))
