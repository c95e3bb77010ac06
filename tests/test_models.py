"""Tests of pygen.models: exact noised quantities of Gaussian mixtures (plain torch, CPU)."""
import math

import pytest
import torch

from pygen import models, schedules

F64 = torch.float64


def random_mixture(K=4, D=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    means = 3.0 * torch.randn(K, D, generator=g, dtype=F64)
    stds = 0.2 + torch.rand(K, D, generator=g, dtype=F64)
    weights = 0.1 + torch.rand(K, generator=g, dtype=F64)
    return models.GaussianMixture(means, stds, weights)


MIXTURES = {
    "clot": models.clot,
    "random3d": random_mixture,
    "ring3d": lambda: models.ring(5, 3.0, 0.4, dim=3),
}


def points(mixture, n=9, seed=1):
    """Points near the modes, between them, and far from all of them (up to ~1e3 away)."""
    g = torch.Generator().manual_seed(seed)
    D = mixture.dim
    near = mixture.sample(n, g) + 0.3 * torch.randn(n, D, generator=g, dtype=F64)
    mid = 4.0 * torch.randn(n, D, generator=g, dtype=F64)
    far = torch.randn(3, D, generator=g, dtype=F64) * torch.tensor([[50.0], [300.0], [1000.0]], dtype=F64)
    return torch.cat([near, mid, far])


def sigma_cases(n):
    g = torch.Generator().manual_seed(7)
    return [0.0, 0.3, 2.5, torch.tensor(1.1, dtype=F64),
            torch.exp(torch.randn(n, generator=g, dtype=F64))]  # per-row


def autograd_score(logp_fn, x):
    x = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(logp_fn(x).sum(), x)
    return g


# ---------------------------------------------------------------------------
# score, denoiser, eps (VE)
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(MIXTURES))
def test_score_matches_autograd_of_log_prob(name):
    m = MIXTURES[name]()
    x = points(m)
    for sigma in sigma_cases(x.shape[0]):
        ref = autograd_score(lambda y: m.log_prob(y, sigma), x)
        got = m.score(x, sigma)
        assert got.shape == x.shape and got.dtype == F64
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-9)


def test_score_far_from_modes_is_finite_and_points_home():
    m = models.clot()
    for dtype in (F64, torch.float32):
        x = torch.tensor([[1e4, -3e4], [-1e5, 2e3], [0.0, 8e2]], dtype=dtype)
        s = m.score(x)
        assert torch.isfinite(s).all() and torch.isfinite(m.log_prob(x)).all()
        assert (s * x).sum(1).lt(0).all()  # towards the modes
        d = m.denoiser(x, 5.0)
        assert torch.isfinite(d).all() and d.abs().max() < 1e5


def test_denoiser_eps_tweedie_identities():
    m = random_mixture()
    x = points(m)
    for sigma in sigma_cases(x.shape[0])[1:]:
        sg = sigma[:, None] if isinstance(sigma, torch.Tensor) and sigma.dim() == 1 else sigma
        score = m.score(x, sigma)
        den = m.denoiser(x, sigma)
        torch.testing.assert_close(den, x + sg**2 * score, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(m.eps(x, sigma), (x - den) / sg, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(m.energy(x, sigma), -m.log_prob(x, sigma), rtol=0, atol=0)


def test_denoiser_single_gaussian_closed_form():
    mu, s = torch.tensor([[1.5, -0.5]], dtype=F64), torch.tensor([[0.7, 2.0]], dtype=F64)
    m = models.GaussianMixture(mu, s)
    x = torch.randn(6, 2, generator=torch.Generator().manual_seed(0), dtype=F64) * 3
    sigma = torch.tensor([0.1, 0.5, 1.0, 2.0, 10.0, 80.0], dtype=F64)
    expect = (s**2 * x + sigma[:, None] ** 2 * mu) / (s**2 + sigma[:, None] ** 2)
    torch.testing.assert_close(m.denoiser(x, sigma), expect, rtol=1e-12, atol=1e-12)
    v = s**2 + sigma[:, None] ** 2
    logp = (-0.5 * ((x - mu) ** 2 / v + torch.log(2 * math.pi * v))).sum(1)
    torch.testing.assert_close(m.log_prob(x, sigma), logp, rtol=1e-12, atol=1e-12)


def test_denoiser_at_zero_noise_is_identity():
    m = models.clot()
    x = points(m)
    torch.testing.assert_close(m.denoiser(x, 0.0), x, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------
# VP parameterisation and flow
# ---------------------------------------------------------------------------
def vp_cases(n):
    g = torch.Generator().manual_seed(3)
    ab = torch.rand(n, generator=g, dtype=F64) * 0.98 + 0.01
    return [(0.9, 0.3), (0.2, 0.97), (torch.sqrt(ab), torch.sqrt(1 - ab))]


@pytest.mark.parametrize("name", sorted(MIXTURES))
def test_score_vp_matches_autograd_and_explicit_mixture(name):
    m = MIXTURES[name]()
    x = points(m)
    for alpha, s in vp_cases(x.shape[0]):
        ref = autograd_score(lambda y: m.log_prob_vp(y, alpha, s), x)
        torch.testing.assert_close(m.score_vp(x, alpha, s), ref, rtol=1e-9, atol=1e-9)
        if not isinstance(alpha, torch.Tensor):  # the noised mixture written out explicitly
            explicit = models.GaussianMixture(alpha * m.means, torch.sqrt(alpha**2 * m.stds**2 + s**2), m.weights)
            torch.testing.assert_close(m.log_prob_vp(x, alpha, s), explicit.log_prob(x), rtol=1e-12, atol=1e-10)
            torch.testing.assert_close(m.score_vp(x, alpha, s), explicit.score(x), rtol=1e-10, atol=1e-10)


def test_vp_identities():
    m = random_mixture()
    x = points(m)
    for alpha, s in vp_cases(x.shape[0]):
        a_ = alpha[:, None] if isinstance(alpha, torch.Tensor) else alpha
        s_ = s[:, None] if isinstance(s, torch.Tensor) else s
        score = m.score_vp(x, alpha, s)
        eps = m.eps_vp(x, alpha, s)
        x0 = m.x0_vp(x, alpha, s)
        torch.testing.assert_close(eps, -s_ * score, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(x0, (x - s_ * eps) / a_, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(m.v_vp(x, alpha, s), a_ * eps - s_ * x0, rtol=1e-12, atol=1e-12)
        # VP at (alpha, s) is VE at sigma = s/alpha on x/alpha, rescaled
        torch.testing.assert_close(score, m.score(x / a_, s / alpha) / a_, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(x0, m.denoiser(x / a_, s / alpha), rtol=1e-9, atol=1e-9)


def test_flow_velocity():
    m = models.clot()
    x = points(m)
    t = torch.linspace(0.02, 0.98, x.shape[0], dtype=F64)
    v = m.flow_velocity(x, t)
    eps = m.eps_vp(x, 1 - t, t)
    x0 = m.x0_vp(x, 1 - t, t)
    torch.testing.assert_close(v, eps - x0, rtol=1e-12, atol=1e-12)
    # x_t = (1 - t)·x0 + t·eps holds for the posterior means too
    torch.testing.assert_close((1 - t)[:, None] * x0 + t[:, None] * eps, x, rtol=1e-9, atol=1e-9)


# ---------------------------------------------------------------------------
# normalisation and sampling
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("sigma", [0.0, 0.7])
def test_log_prob_integrates_to_one(sigma):
    m = models.clot()
    h = 0.025
    g = torch.arange(-9.0, 9.0 + h / 2, h, dtype=F64)
    X, Y = torch.meshgrid(g, g, indexing="ij")
    grid = torch.stack([X.reshape(-1), Y.reshape(-1)], 1)
    total = float(torch.exp(m.log_prob(grid, sigma)).sum()) * h * h
    assert abs(total - 1.0) < 1e-6


def test_sample_moments_and_labels():
    m = models.clot()
    n = 200_000
    x, labels = m.sample(n, torch.Generator().manual_seed(11), return_labels=True)
    assert x.shape == (n, 2) and x.dtype == F64 and labels.dtype == torch.long
    cov = m.covariance()
    se = torch.sqrt(torch.diagonal(cov) / n)
    assert ((x.mean(0) - m.mean()).abs() < 5 * se).all()
    torch.testing.assert_close(torch.cov(x.T), cov, rtol=0, atol=0.04)
    frac = torch.bincount(labels, minlength=7).to(F64) / n
    assert ((frac - m.weights).abs() < 5 * torch.sqrt(m.weights / n)).all()
    # each sample sits in its own component: per-label means and stds
    for k in range(7):
        xk = x[labels == k]
        assert ((xk.mean(0) - m.means[k]).abs() < 6 * m.stds[k] / math.sqrt(len(xk))).all()
        torch.testing.assert_close(xk.std(0), m.stds[k], rtol=0.03, atol=0)


def test_sample_with_noise_and_reproducible():
    m = models.ring(6, 2.0, 0.2, dim=3)
    x = m.sample(100_000, torch.Generator().manual_seed(5), sigma=1.5)
    torch.testing.assert_close(torch.cov(x.T), m.covariance(1.5), rtol=0, atol=0.06)
    a = m.sample(10, torch.Generator().manual_seed(9))
    b = m.sample(10, torch.Generator().manual_seed(9))
    assert torch.equal(a, b)
    assert m.sample(0).shape == (0, 3)


def test_component_of_and_responsibilities():
    m = models.clot()
    assert torch.equal(m.component_of(m.means), torch.arange(7))
    r = m.responsibilities(points(m), 0.5)
    torch.testing.assert_close(r.sum(-1), torch.ones(r.shape[0], dtype=F64), rtol=1e-12, atol=1e-12)
    x, labels = m.sample(20_000, torch.Generator().manual_seed(2), return_labels=True)
    assert (m.component_of(x) != labels).double().mean() < 0.005


def test_ring_and_clot_parameters():
    r = models.ring(8, 4.0, 0.3)
    assert r.means.shape == (8, 2) and r.stds.shape == (8, 2)
    torch.testing.assert_close(r.means.norm(dim=1), torch.full((8,), 4.0, dtype=F64))
    torch.testing.assert_close(r.weights, torch.full((8,), 1 / 8, dtype=F64))
    c = models.clot()
    assert c.num_components == 7 and c.dim == 2
    assert abs(float(c.weights.sum()) - 1.0) < 1e-15
    assert len(set(models.CLOT_WEIGHTS)) > 3  # unequal weights
    assert (c.stds[:, 0] != c.stds[:, 1]).sum() >= 4  # anisotropic blobs


# ---------------------------------------------------------------------------
# shapes, dtypes, devices
# ---------------------------------------------------------------------------
def test_event_shaped_and_batched_inputs():
    m = random_mixture(K=3, D=12)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(5, 3, 2, 2, generator=g, dtype=F64)
    sigma = torch.rand(5, generator=g, dtype=F64) + 0.1
    flat = x.reshape(5, 12)
    assert m.score(x, sigma).shape == x.shape
    torch.testing.assert_close(m.score(x, sigma).reshape(5, 12), m.score(flat, sigma))
    torch.testing.assert_close(m.denoiser(x, sigma).reshape(5, 12), m.denoiser(flat, sigma))
    assert m.log_prob(x, sigma).shape == (5,)
    # (B1, B2, D) with a per-row sigma (B1,) and a full batch-shaped sigma (B1, B2)
    y = torch.randn(3, 4, 12, generator=g, dtype=F64)
    s_row = torch.tensor([0.5, 1.0, 2.0], dtype=F64)
    got = m.score(y, s_row)
    for i in range(3):
        torch.testing.assert_close(got[i], m.score(y[i], float(s_row[i])))
    torch.testing.assert_close(m.score(y, s_row[:, None].expand(3, 4)), got)


def test_dtypes_and_to():
    m = models.clot()
    x = points(m)
    ref = m.score(x, 0.8)
    for dtype, tol in ((torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 1e-2)):
        xd = x[:-3].to(dtype)  # near and mid points (far ones overflow fp16)
        out = m.score(xd, 0.8)
        assert out.dtype == dtype
        torch.testing.assert_close(out.to(F64), m.score(xd.to(F64), 0.8), rtol=tol, atol=tol)
    m32 = m.to(dtype=torch.float32)
    assert m32.dtype == torch.float32 and m32.sample(4).dtype == torch.float32
    torch.testing.assert_close(m32.score(x, 0.8), ref, rtol=1e-5, atol=1e-5)  # x is fp64: fp64 math
    assert m.to("cpu", F64).means.equal(m.means)


def test_callables_do_not_sync_meta_device():
    """Every evaluation runs on meta tensors: any host sync (item, bool, nonzero) would raise."""
    m = models.clot()
    x = torch.empty(6, 2, device="meta", dtype=torch.float32)
    sigma = torch.empty(6, device="meta", dtype=torch.float32)
    for fn in (m.model_fn("denoiser"), m.model_fn("eps"), m.model_fn("x0"), m.model_fn("v"),
               m.model_fn("flow"), m.model_fn("score"), m.model_fn("score", sde=schedules.VPSDE()),
               m.model_fn("score", sde=schedules.SubVPSDE()), m.model_fn("score", sde=schedules.VESDE()),
               m.model_fn("eps", alphas_cumprod=torch.linspace(0.99, 0.01, 10))):
        out = fn(x, sigma)
        assert out.shape == x.shape and out.device.type == "meta" and out.dtype == torch.float32
    assert m.model_fn("energy")(x).shape == (6,)
    assert m.model_fn("grad_log_prob")(x).shape == (6, 2)
    t = torch.empty(6, device="meta", dtype=torch.long)
    assert m.model_fn("x0", alphas_cumprod=torch.linspace(0.99, 0.01, 10))(x, t).shape == (6, 2)


# ---------------------------------------------------------------------------
# model_fn adapters
# ---------------------------------------------------------------------------
def test_model_fn_denoiser_and_counts():
    m = models.clot()
    x = points(m)
    sigma = torch.exp(torch.randn(x.shape[0], generator=torch.Generator().manual_seed(1), dtype=F64))
    D = m.model_fn("denoiser")
    torch.testing.assert_close(D(x, sigma, cond=None), m.denoiser(x, sigma), rtol=0, atol=0)
    D(x, sigma)
    assert D.nfe == 2


def test_model_fn_diffusers_style():
    m = models.clot()
    x = points(m)
    ab = torch.linspace(0.02, 0.99, x.shape[0], dtype=F64)
    a, s = torch.sqrt(ab), torch.sqrt(1 - ab)
    torch.testing.assert_close(m.model_fn("eps")(x, ab), m.eps_vp(x, a, s), rtol=0, atol=0)
    torch.testing.assert_close(m.model_fn("x0")(x, ab), m.x0_vp(x, a, s), rtol=0, atol=0)
    torch.testing.assert_close(m.model_fn("v")(x, ab), m.v_vp(x, a, s), rtol=0, atol=0)
    torch.testing.assert_close(m.model_fn("eps")(x, 0.5), m.eps_vp(x, math.sqrt(0.5), math.sqrt(0.5)))
    # timestep lookup in an alphas_cumprod table (integer: index; float: linear interpolation)
    table = schedules.alphas_cumprod(schedules.betas("linear", 1000))
    eps = m.model_fn("eps", alphas_cumprod=table)
    t = torch.arange(x.shape[0]) * 45 + 3
    torch.testing.assert_close(eps(x, t), m.eps_vp(x, table[t].sqrt(), (1 - table[t]).sqrt()))
    tf = t.to(F64) + 0.25
    abf = 0.75 * table[t] + 0.25 * table[t + 1]
    torch.testing.assert_close(eps(x, tf), m.eps_vp(x, abf.sqrt(), (1 - abf).sqrt()))
    torch.testing.assert_close(eps(x[:1], 999), m.eps_vp(x[:1], table[999].sqrt(), (1 - table[999]).sqrt()))
    bad = eps(x[:3], torch.tensor([-1, 5, 1000]))  # out of the table: NaN, never a wild read
    assert torch.isnan(bad[0]).all() and torch.isnan(bad[2]).all() and torch.isfinite(bad[1]).all()


@pytest.mark.parametrize("sde", [schedules.VPSDE(), schedules.SubVPSDE(), schedules.VESDE(0.01, 50.0)],
                         ids=["vp", "subvp", "ve"])
def test_model_fn_score_sde(sde):
    m = models.clot()
    x = points(m)
    t = torch.linspace(0.0, 1.0, x.shape[0], dtype=F64)
    fn = m.model_fn("score", sde=sde)
    alpha, std = sde.mean_coeff(t), sde.marginal_std(t)
    torch.testing.assert_close(fn(x, t), m.score_vp(x, alpha, std), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(fn(x, 0.4), m.score_vp(x, float(sde.mean_coeff(0.4)), float(sde.marginal_std(0.4))),
                               rtol=1e-10, atol=1e-12)


def test_model_fn_other_kinds():
    m = models.clot()
    x = points(m)
    t = torch.linspace(0.05, 0.95, x.shape[0], dtype=F64)
    torch.testing.assert_close(m.model_fn("flow")(x, t), m.flow_velocity(x, t), rtol=0, atol=0)
    torch.testing.assert_close(m.model_fn("score")(x, 0.3), m.score(x, 0.3), rtol=0, atol=0)
    torch.testing.assert_close(m.model_fn("energy")(x), m.energy(x), rtol=0, atol=0)
    torch.testing.assert_close(m.model_fn("energy", sigma=0.5)(x), m.energy(x, 0.5), rtol=0, atol=0)
    torch.testing.assert_close(m.model_fn("grad_log_prob", sigma=0.5)(x), m.score(x, 0.5), rtol=0, atol=0)


def test_nan_propagates_per_row():
    m = models.clot()
    x = points(m)
    x[2, 1] = float("nan")
    sigma = torch.full((x.shape[0],), 0.5, dtype=F64)
    sigma[4] = float("nan")
    for out in (m.score(x, sigma), m.denoiser(x, sigma), m.eps(x, sigma)):
        assert torch.isnan(out[2]).all() and torch.isnan(out[4]).all()
        keep = torch.ones(x.shape[0], dtype=torch.bool)
        keep[[2, 4]] = False
        assert torch.isfinite(out[keep]).all()
    lp = m.log_prob(x, sigma)
    assert torch.isnan(lp[2]) and torch.isnan(lp[4])


# ---------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("args, kwargs, exc, word", [
    (([0.0, 1.0], [1.0, 1.0]), {}, ValueError, "means"),
    (([[0.0, 1.0]], [[1.0, 1.0, 1.0]]), {}, ValueError, "stds"),
    (([[0.0, 1.0]], [[1.0, -1.0]]), {}, ValueError, "stds"),
    (([[0.0, 1.0]], [0.0]), {}, ValueError, "stds"),
    (([[0.0, 1.0]], [float("nan")]), {}, ValueError, "stds"),
    (([[0.0, 1.0], [1.0, 0.0]], [1.0, 1.0], [1.0]), {}, ValueError, "weights"),
    (([[0.0, 1.0], [1.0, 0.0]], [1.0, 1.0], [1.0, 0.0]), {}, ValueError, "weights"),
    (([[0.0, 1.0], [1.0, 0.0]], [1.0, 1.0], [1.0, -2.0]), {}, ValueError, "weights"),
    (([[0.0, 1.0], [1.0, 0.0]], [1.0, 1.0], [1.0, float("inf")]), {}, ValueError, "weights"),
    (([[0.0, float("nan")]], [1.0]), {}, ValueError, "means"),
    (("abc", [1.0]), {}, TypeError, "means"),
    (([[0.0, 1.0]], [1.0]), {"dtype": torch.int32}, TypeError, "dtype"),
])
def test_bad_constructor_arguments(args, kwargs, exc, word):
    with pytest.raises(exc, match=word):
        models.GaussianMixture(*args, **kwargs)


def test_bad_call_arguments():
    m = models.clot()
    x = torch.randn(4, 2, dtype=F64)
    with pytest.raises(ValueError, match="x must have shape"):
        m.score(torch.randn(4, 3, dtype=F64))
    with pytest.raises(TypeError, match="x must be a floating"):
        m.score(torch.ones(4, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="sigma"):
        m.denoiser(x, torch.ones(3, dtype=F64))
    with pytest.raises(ValueError, match="alpha"):
        m.score_vp(x, torch.ones(5, dtype=F64), 0.5)
    with pytest.raises(TypeError, match="sigma"):
        m.score(x, "big")
    with pytest.raises(ValueError, match="kind"):
        m.model_fn("epsilon")
    with pytest.raises(ValueError, match="sde"):
        m.model_fn("eps", sde=schedules.VPSDE())
    with pytest.raises(ValueError, match="alphas_cumprod"):
        m.model_fn("eps", alphas_cumprod=torch.ones(2, 2))
    with pytest.raises(ValueError, match="sigma"):
        m.model_fn("energy", sigma=-1.0)
    with pytest.raises(ValueError, match="n must be"):
        m.sample(-1)
    with pytest.raises(ValueError, match="sigma"):
        m.sample(3, sigma=-0.5)
    with pytest.raises(ValueError, match="k must be"):
        models.ring(0)
    with pytest.raises(ValueError, match="dim must be"):
        models.ring(4, dim=1)
    with pytest.raises(ValueError, match="std must be"):
        models.ring(4, std=0.0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_callables_match_cpu_without_sync():
    m = models.clot()
    mc = m.to("cuda", torch.float32)
    x = points(m).float()
    sigma = torch.exp(torch.randn(x.shape[0], generator=gen_cpu(5))).float()
    xc, sc = x.cuda(), sigma.cuda()
    table = torch.linspace(0.999, 0.01, 50)
    fns = [("denoiser", {}), ("eps", {}), ("v", {}), ("flow", {}), ("score", {"sde": schedules.VPSDE()}),
           ("x0", {"alphas_cumprod": table})]
    args = {"eps": sc.clamp(max=1), "v": sc.clamp(max=1), "flow": sc.clamp(max=1), "score": sc.clamp(max=1),
            "x0": torch.arange(x.shape[0], device="cuda") * 2, "denoiser": sc}
    outs = {}
    callables = {kind: mc.model_fn(kind, **kw) for kind, kw in fns}
    callables["energy"] = mc.model_fn("energy")
    for kind, _ in fns:
        callables[kind](xc, args[kind])  # the first call caches its tables on the device
    callables["energy"](xc)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for kind, _ in fns:
            outs[kind] = callables[kind](xc, args[kind])
        outs["energy"] = callables["energy"](xc)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for kind, kw in fns:
        ref = m.model_fn(kind, **kw)(x.double(), args[kind].cpu().double() if args[kind].is_floating_point()
                                    else args[kind].cpu())
        assert outs[kind].device.type == "cuda" and outs[kind].dtype == torch.float32
        torch.testing.assert_close(outs[kind].cpu().double(), ref, rtol=1e-4, atol=1e-4)
    s = mc.sample(1000, torch.Generator("cuda").manual_seed(0))
    assert s.device.type == "cuda"
    ref = m.sample(1000, gen_cpu(0))
    assert metrics_distance(s, ref) < 0.5


def gen_cpu(seed):
    return torch.Generator().manual_seed(seed)


def metrics_distance(a, b):
    from pygen import metrics

    return metrics.sliced_wasserstein(a, b.to(a.device), generator=torch.Generator(a.device).manual_seed(0))
