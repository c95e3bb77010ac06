"""Tests of pygen.metrics: sliced Wasserstein, MMD, mode weights and threshold calibration (CPU)."""
import math

import pytest
import torch

from pygen import metrics, models

F64 = torch.float64


def gen(seed):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------
# sliced Wasserstein
# ---------------------------------------------------------------------------
def test_sliced_wasserstein_same_distribution_is_small_and_self_is_zero():
    m = models.clot()
    a, b = m.sample(2000, gen(0)), m.sample(2000, gen(1))
    assert metrics.sliced_wasserstein(a, a, generator=gen(2)) == 0.0
    null = metrics.sliced_wasserstein(a, b, generator=gen(2))
    assert 0.0 < null < 0.15


def test_sliced_wasserstein_grows_with_shift():
    m = models.clot()
    a, b = m.sample(2000, gen(0)), m.sample(2000, gen(1))
    d = [metrics.sliced_wasserstein(a, b + s, generator=gen(3)) for s in (0.0, 0.5, 1.0, 2.0)]
    assert d == sorted(d) and d[-1] > 10 * d[0]


@pytest.mark.parametrize("shift", [0.5, 2.0, -1.0])
def test_sliced_wasserstein_1d_gaussians(shift):
    """In 1-D every projection is +-1: W2(N(0,1), N(m,1)) = |m|."""
    a = torch.randn(20000, 1, generator=gen(4), dtype=F64)
    b = torch.randn(25000, generator=gen(5), dtype=F64) + shift  # (N,) is N points in 1-D
    assert abs(metrics.sliced_wasserstein(a, b, n_projections=8, generator=gen(6)) - abs(shift)) < 0.04


def test_sliced_wasserstein_2d_shift_theory():
    """For a shift delta, W2^2 along theta is (theta·delta)^2, whose mean over the circle is |delta|^2 / 2."""
    g = gen(7)
    a = torch.randn(4000, 2, generator=g, dtype=F64)
    b = torch.randn(4000, 2, generator=g, dtype=F64) + torch.tensor([2.0, 0.0], dtype=F64)
    d = metrics.sliced_wasserstein(a, b, n_projections=1000, generator=g)
    assert abs(d - math.sqrt(2.0)) < 0.05


def brute_force_w2_squared(x, y):
    """W2^2 of two 1-D empirical measures on the common grid of n·m equal quantile cells."""
    n, m = len(x), len(y)
    sx, sy = torch.sort(x).values, torch.sort(y).values
    u = (torch.arange(n * m, dtype=F64) + 0.5) / (n * m)
    return float(((sx[(u * n).long()] - sy[(u * m).long()]) ** 2).mean())


@pytest.mark.parametrize("n, m", [(7, 5), (5, 7), (12, 8), (1, 6), (9, 9)])
def test_sliced_wasserstein_unequal_counts_exact(n, m):
    g = gen(n * 100 + m)
    x = torch.randn(n, generator=g, dtype=F64)
    y = 2.0 * torch.randn(m, generator=g, dtype=F64) + 0.3
    got = metrics.sliced_wasserstein(x, y, n_projections=3, generator=g)
    assert abs(got - math.sqrt(brute_force_w2_squared(x, y))) < 1e-12


def test_sliced_wasserstein_repeated_sample_is_zero_and_reproducible():
    m = models.clot()
    a = m.sample(300, gen(8))
    assert metrics.sliced_wasserstein(a, a.repeat(3, 1), generator=gen(9)) < 1e-12
    b = m.sample(500, gen(10))
    d1 = metrics.sliced_wasserstein(a, b, generator=gen(11))
    d2 = metrics.sliced_wasserstein(a, b, generator=gen(11))
    assert d1 == d2 and d1 > 0
    # float32 and image-shaped samples are accepted (flattened per row)
    d3 = metrics.sliced_wasserstein(a.float().reshape(300, 2, 1), b.float(), generator=gen(11))
    assert abs(d3 - d1) < 1e-5


# ---------------------------------------------------------------------------
# MMD
# ---------------------------------------------------------------------------
def test_mmd_matches_gaussian_closed_form():
    """N(0,1) vs N(m,1), kernel exp(-d^2/(2h^2)): MMD^2 = 2h/sqrt(h^2+2)·(1 - exp(-m^2/(2(h^2+2))))."""
    g = gen(12)
    a = torch.randn(2500, 1, generator=g, dtype=F64)
    b = torch.randn(2500, 1, generator=g, dtype=F64) + 1.0
    for h in (0.5, 1.0, 3.0):
        expect = 2 * h / math.sqrt(h * h + 2) * (1 - math.exp(-1.0 / (2 * (h * h + 2))))
        assert abs(metrics.mmd(a, b, bandwidths=h) - expect) < 0.15 * expect
    both = metrics.mmd(a, b, bandwidths=[0.5, 3.0])
    assert abs(both - metrics.mmd(a, b, bandwidths=0.5) - metrics.mmd(a, b, bandwidths=3.0)) < 1e-12


def test_mmd_same_distribution_small_and_grows_with_shift():
    m = models.clot()
    a, b = m.sample(1500, gen(13)), m.sample(1200, gen(14))
    d = [metrics.mmd(a, b + s) for s in (0.0, 0.25, 0.5, 1.0)]
    assert abs(d[0]) < 3e-3
    assert d == sorted(d) and d[1] > 3 * abs(d[0]) and d[-1] > 0.05


def test_mmd_unbiased_drops_diagonal():
    # two points each: with a huge bandwidth every kernel value is ~1, so the unbiased estimate is ~0
    a = torch.tensor([[0.0], [1.0]], dtype=F64)
    b = torch.tensor([[5.0], [6.0]], dtype=F64)
    assert abs(metrics.mmd(a, b, bandwidths=1e6)) < 1e-9
    # with a tiny bandwidth only the (dropped) diagonal would be nonzero: the estimate is ~0 too
    assert abs(metrics.mmd(a, b, bandwidths=1e-3)) < 1e-12
    # k(a1, a2) = k(b1, b2) = exp(-1/2); cross distances 5, 4, 6, 5
    cross = (2 * math.exp(-12.5) + math.exp(-8.0) + math.exp(-18.0)) / 4
    assert abs(metrics.mmd(a, b, bandwidths=1.0) - (2 * math.exp(-0.5) - 2 * cross)) < 1e-12


def test_median_bandwidth():
    a = torch.tensor([[0.0], [1.0], [3.0]], dtype=F64)  # distances 1, 3, 2
    assert metrics.median_bandwidth(a) == 2.0


# ---------------------------------------------------------------------------
# mode weights
# ---------------------------------------------------------------------------
def test_mode_weights():
    m = models.clot()
    x, labels = m.sample(40000, gen(15), return_labels=True)
    w = metrics.mode_weights(x, m)
    assert w.shape == (7,) and w.dtype == F64 and abs(float(w.sum()) - 1.0) < 1e-12
    assert metrics.mode_weight_error(x, m) < 0.01
    only0 = m.means[0] + 0.01 * torch.randn(100, 2, generator=gen(16), dtype=F64)
    expect = torch.zeros(7, dtype=F64)
    expect[0] = 1.0
    assert torch.equal(metrics.mode_weights(only0, m), expect)
    assert abs(metrics.mode_weight_error(only0, m) - (1.0 - float(m.weights[0]))) < 1e-12
    # dropping a mode shows up as its weight
    drop = x[m.component_of(x) != 6]
    assert abs(metrics.mode_weight_error(drop, m) - float(m.weights[6])) < 0.01


# ---------------------------------------------------------------------------
# calibration
# ---------------------------------------------------------------------------
def test_calibrate_returns_quantile_of_exact_pairs():
    m = models.clot()
    seen = []

    def recording(a, b):
        assert a.shape == (64, 2) and b.shape == (80, 2)
        v = metrics.sliced_wasserstein(a, b, n_projections=16, generator=gen(len(seen)))
        seen.append(v)
        return v

    thr = metrics.calibrate(m, 64, recording, trials=25, quantile=0.9, generator=gen(17), m=80)
    assert len(seen) == 25
    assert thr == pytest.approx(float(torch.quantile(torch.tensor(seen, dtype=F64), 0.9)), abs=1e-15)
    assert min(seen) < thr <= max(seen)


def test_calibrate_quantile_behaviour():
    m = models.clot()
    lo = metrics.calibrate(m, 200, "sliced_wasserstein", trials=40, quantile=0.5, generator=gen(18))
    hi = metrics.calibrate(m, 200, "sliced_wasserstein", trials=40, quantile=0.99, generator=gen(18))
    top = metrics.calibrate(m, 200, "sliced_wasserstein", trials=40, quantile=1.0, generator=gen(18))
    assert lo < hi <= top
    # a fresh exact-vs-exact pair exceeds the 0.8 threshold about 20% of the time
    thr = metrics.calibrate(m, 200, "sliced_wasserstein", trials=80, quantile=0.8, generator=gen(19))
    g = gen(20)
    fresh = [metrics.sliced_wasserstein(m.sample(200, g), m.sample(200, g), generator=g) for _ in range(80)]
    frac = sum(v > thr for v in fresh) / len(fresh)
    assert 0.05 < frac < 0.4
    # fewer samples, larger threshold
    assert metrics.calibrate(m, 50, "sliced_wasserstein", trials=40, quantile=0.5, generator=gen(18)) > lo


def test_calibrated_thresholds_catch_a_wrong_sampler():
    m = models.clot()
    n = 600
    g = gen(21)
    thr_sw = metrics.calibrate(m, n, "sliced_wasserstein", trials=20, generator=g)
    thr_mmd = metrics.calibrate(m, n, "mmd", trials=12, generator=g)
    thr_mode = metrics.calibrate(m, n, "mode_weight_error", trials=40, generator=g)
    exact, ref = m.sample(n, g), m.sample(n, g)
    assert metrics.sliced_wasserstein(exact, ref, generator=g) <= thr_sw
    assert metrics.mmd(exact, ref) <= thr_mmd
    assert metrics.mode_weight_error(exact, m) <= thr_mode
    # too wide (e.g. under-denoised) samples and a sampler that ignores the smallest mode
    # (MMD has more power against a change of shape than sliced W2, whose null spread is wide)
    assert metrics.mmd(m.sample(n, g, sigma=0.5), ref) > thr_mmd
    assert metrics.sliced_wasserstein(m.sample(n, g, sigma=0.8), ref, generator=g) > thr_sw
    skewed = models.GaussianMixture(m.means, m.stds, m.weights * torch.tensor([1.5, 1, 1, 1, 1, 1, 0.2])).sample(n, g)
    assert metrics.mode_weight_error(skewed, m) > thr_mode


# ---------------------------------------------------------------------------
# NaN and bad input
# ---------------------------------------------------------------------------
def test_nan_propagates():
    a = torch.randn(50, 2, generator=gen(22), dtype=F64)
    b = a.clone()
    b[3, 0] = float("nan")
    assert math.isnan(metrics.sliced_wasserstein(a, b, generator=gen(0)))
    assert math.isnan(metrics.mmd(a, b))
    assert math.isnan(metrics.mmd(a, b, bandwidths=1.0))
    assert math.isnan(metrics.mode_weight_error(b, models.clot()))


def test_bad_input():
    a = torch.randn(10, 2, dtype=F64)
    m = models.clot()
    with pytest.raises(ValueError, match="a and b must have the same dimension"):
        metrics.sliced_wasserstein(a, torch.randn(10, 3))
    with pytest.raises(ValueError, match="a must have shape"):
        metrics.sliced_wasserstein(torch.tensor(1.0), a)
    with pytest.raises(TypeError, match="b must be a tensor"):
        metrics.mmd(a, [[1.0, 2.0]])
    with pytest.raises(ValueError, match="n_projections"):
        metrics.sliced_wasserstein(a, a, n_projections=0)
    with pytest.raises(TypeError, match="generator"):
        metrics.sliced_wasserstein(a, a, generator=3)
    with pytest.raises(ValueError, match="b must hold at least 2"):
        metrics.mmd(a, a[:1])
    with pytest.raises(ValueError, match="bandwidths"):
        metrics.mmd(a, a, bandwidths=[1.0, -1.0])
    with pytest.raises(ValueError, match="bandwidths"):
        metrics.mmd(a, a, bandwidths=[])
    with pytest.raises(ValueError, match="x must have shape"):
        metrics.mode_weights(torch.randn(10, 3), m)
    with pytest.raises(TypeError, match="mixture"):
        metrics.mode_weights(a, "clot")
    with pytest.raises(ValueError, match="metric"):
        metrics.calibrate(m, 10, "wasserstein")
    with pytest.raises(ValueError, match="quantile"):
        metrics.calibrate(m, 10, "mmd", quantile=1.5)
    with pytest.raises(ValueError, match="trials"):
        metrics.calibrate(m, 10, "mmd", trials=0)
    with pytest.raises(ValueError, match="n must be"):
        metrics.calibrate(m, 1, "mmd")
