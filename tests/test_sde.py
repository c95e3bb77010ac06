"""Tests of pygen.sde: each step against a direct fp64 PyTorch transcription of score_sde's formulas
(given noise), the loops on the analytic mixture against calibrated MMD / mode-weight thresholds,
reproducibility and bad input."""
import math
import warnings

import pytest
import torch

import pygen
from pygen import metrics, models, schedules
from pygen import sde as S

F64 = torch.float64
BMIN, BMAX, N = 0.1, 20.0, 50
SMIN, SMAX = 0.01, 10.0


# ---------------------------------------------------------------------------
# score_sde transcription (independent of pygen.schedules)
# ---------------------------------------------------------------------------
class Ref:
    def __init__(self, kind, n=N):
        self.kind, self.N = kind, n

    def sde(self, x, t):  # forward drift, diffusion
        if self.kind == "ve":
            sigma = SMIN * (SMAX / SMIN) ** t
            return torch.zeros_like(x), sigma * math.sqrt(2 * (math.log(SMAX) - math.log(SMIN)))
        beta = BMIN + t * (BMAX - BMIN)
        drift = -0.5 * beta[:, None] * x
        if self.kind == "vp":
            return drift, torch.sqrt(beta)
        disc = 1.0 - torch.exp(-2 * BMIN * t - (BMAX - BMIN) * t**2)
        return drift, torch.sqrt(beta * disc)

    def std(self, t):
        lmc = -0.25 * t**2 * (BMAX - BMIN) - 0.5 * t * BMIN
        if self.kind == "ve":
            return SMIN * (SMAX / SMIN) ** t
        if self.kind == "vp":
            return torch.sqrt(1.0 - torch.exp(2.0 * lmc))
        return 1 - torch.exp(2.0 * lmc)

    def mean(self, t):  # marginal mean coefficient
        if self.kind == "ve":
            return torch.ones_like(t)
        return torch.exp(-0.25 * t**2 * (BMAX - BMIN) - 0.5 * t * BMIN)

    def betas(self):
        n = self.N
        return torch.linspace(BMIN / n, BMAX / n, n, dtype=F64)

    def sigmas(self):
        return torch.exp(torch.linspace(math.log(SMIN), math.log(SMAX), self.N, dtype=F64))

    def discretize(self, x, t):
        n = self.N
        i = (t * (n - 1)).long()
        if self.kind == "vp":
            beta = self.betas()[i]
            return torch.sqrt(1 - beta)[:, None] * x - x, torch.sqrt(beta)
        if self.kind == "ve":
            sig = self.sigmas()
            adj = torch.where(i == 0, torch.zeros_like(t), sig[(i - 1).clamp(min=0)])
            return torch.zeros_like(x), torch.sqrt(sig[i] ** 2 - adj**2)
        drift, g = self.sde(x, t)
        return drift / n, g * math.sqrt(1.0 / n)

    def alpha(self, t):
        if self.kind == "ve":
            return torch.ones_like(t)
        return 1 - self.betas()[(t * (self.N - 1)).long()]


def make_sde(kind, n=N):
    if kind == "vp":
        return schedules.VPSDE(BMIN, BMAX, n)
    if kind == "subvp":
        return schedules.SubVPSDE(BMIN, BMAX, n)
    return schedules.VESDE(SMIN, SMAX, n)


def ref_em(score, ref, x, t, z, dt):
    drift, g = ref.sde(x, t)
    x_mean = x + (drift - g[:, None] ** 2 * score(x, t)) * dt
    return x_mean + g[:, None] * math.sqrt(-dt) * z, x_mean


def ref_rd(score, ref, x, t, z):
    f, G = ref.discretize(x, t)
    x_mean = x - (f - G[:, None] ** 2 * score(x, t))
    return x_mean + G[:, None] * z, x_mean


def ref_anc(score, ref, x, t, z):
    i = (t * (ref.N - 1)).long()
    s = score(x, t)
    if ref.kind == "vp":
        beta = ref.betas()[i][:, None]
        x_mean = (x + beta * s) / torch.sqrt(1 - beta)
        return x_mean + torch.sqrt(beta) * z, x_mean
    sig = ref.sigmas()
    sigma = sig[i]
    adj = torch.where(i == 0, torch.zeros_like(t), sig[(i - 1).clamp(min=0)])
    x_mean = x + s * (sigma**2 - adj**2)[:, None]
    std = torch.sqrt(adj**2 * (sigma**2 - adj**2) / sigma**2)
    return x_mean + std[:, None] * z, x_mean


def ref_langevin(score, ref, x, t, zs, snr, per_row=False):
    alpha = ref.alpha(t)
    for z in zs:
        grad = score(x, t)
        gn = torch.norm(grad.reshape(grad.shape[0], -1), dim=-1)
        nn = torch.norm(z.reshape(z.shape[0], -1), dim=-1)
        if not per_row:
            gn, nn = gn.mean(), nn.mean()
        step = (snr * nn / gn) ** 2 * 2 * alpha
        x = x + step[:, None] * grad + torch.sqrt(step * 2)[:, None] * z
    return x


def ref_ald(score, ref, x, t, zs, snr):
    alpha, std = ref.alpha(t), ref.std(t)
    for z in zs:
        step = (snr * std) ** 2 * 2 * alpha
        x = x + step[:, None] * score(x, t) + z * torch.sqrt(step * 2)[:, None]
    return x


def ref_pf_drift(score, ref, x, t):
    drift, g = ref.sde(x, t)
    return drift - 0.5 * g[:, None] ** 2 * score(x, t)


KINDS = ["vp", "subvp", "ve"]


@pytest.fixture
def mix():
    return models.ring(k=4, radius=2.0, std=0.4, dtype=F64)


def _inputs(seed, b=7, d=3, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, d, generator=g, dtype=F64) * scale, torch.randn(b, d, generator=g, dtype=F64)


def _score(kind, dim=3, dtype=F64):
    m = models.ring(k=5, radius=1.5, std=0.5, dim=dim, dtype=dtype)
    return m.model_fn("score", sde=make_sde(kind))


# ---------------------------------------------------------------------------
# steps vs score_sde
# ---------------------------------------------------------------------------
TIMES = [1.0, 0.6131, 0.0371]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("t", TIMES)
def test_euler_maruyama_step(kind, t):
    sde, ref, score = make_sde(kind), Ref(kind), _score(kind)
    x, z = _inputs(1, scale=3.0)
    tt = torch.full((7,), t, dtype=F64)
    want, want_mean = ref_em(score, ref, x, tt, z, -1.0 / N)
    got = S.euler_maruyama_step(score, sde, x, t, noise=z)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    got_mean = S.euler_maruyama_step(score, sde, x, t, denoise=True)
    torch.testing.assert_close(got_mean, want_mean, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(got, got_mean)
    want2, _ = ref_em(score, ref, x, tt, z, -0.013)
    torch.testing.assert_close(S.euler_maruyama_step(score, sde, x, t, -0.013, noise=z), want2, rtol=1e-12,
                               atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("t", TIMES)
def test_reverse_diffusion_step(kind, t):
    sde, ref, score = make_sde(kind), Ref(kind), _score(kind)
    x, z = _inputs(2, scale=3.0)
    tt = torch.full((7,), t, dtype=F64)
    want, want_mean = ref_rd(score, ref, x, tt, z)
    torch.testing.assert_close(S.reverse_diffusion_step(score, sde, x, t, noise=z), want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(S.reverse_diffusion_step(score, sde, x, t, denoise=True), want_mean, rtol=1e-12,
                               atol=1e-12)


@pytest.mark.parametrize("kind", ["vp", "ve"])
@pytest.mark.parametrize("t", TIMES + [0.0])
def test_ancestral_step(kind, t):
    sde, ref, score = make_sde(kind), Ref(kind), _score(kind)
    x, z = _inputs(3, scale=3.0)
    tt = torch.full((7,), t, dtype=F64)
    want, want_mean = ref_anc(score, ref, x, tt, z)
    torch.testing.assert_close(S.ancestral_step(score, sde, x, t, noise=z), want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(S.ancestral_step(score, sde, x, t, denoise=True), want_mean, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("norm", ["batch", "row"])
def test_langevin_corrector(kind, norm):
    sde, ref, score = make_sde(kind), Ref(kind), _score(kind)
    x, _ = _inputs(4, scale=2.0)
    zs = torch.randn((3,) + tuple(x.shape), generator=torch.Generator().manual_seed(5), dtype=F64)
    t = 0.4217
    want = ref_langevin(score, ref, x, torch.full((7,), t, dtype=F64), zs, 0.21, per_row=norm == "row")
    got = S.langevin_corrector(score, sde, x, t, snr=0.21, n_steps=3, noise=zs, norm=norm)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # the in-kernel noise is pygen.randn(x.shape, seed, stream + j)
    zk = torch.stack([pygen.randn(x.shape, 9, 40 + j, dtype=F64) for j in range(3)])
    got = S.langevin_corrector(score, sde, x, t, snr=0.21, n_steps=3, seed=9, stream=40, norm=norm)
    want = ref_langevin(score, ref, x, torch.full((7,), t, dtype=F64), zk, 0.21, per_row=norm == "row")
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_langevin_norm_modes_differ():
    sde, score = make_sde("vp"), _score("vp")
    x, _ = _inputs(6, scale=2.0)
    a = S.langevin_corrector(score, sde, x, 0.3, seed=1, norm="batch")
    b = S.langevin_corrector(score, sde, x, 0.3, seed=1, norm="row")
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("kind", KINDS)
def test_ald_corrector(kind):
    sde, ref, score = make_sde(kind), Ref(kind), _score(kind)
    x, _ = _inputs(7, scale=2.0)
    t = 0.7319
    zs = torch.stack([pygen.randn(x.shape, 3, 11 + j, dtype=F64) for j in range(2)])
    want = ref_ald(score, ref, x, torch.full((7,), t, dtype=F64), zs, 0.3)
    torch.testing.assert_close(S.annealed_langevin_corrector(score, sde, x, t, snr=0.3, n_steps=2, noise=zs), want,
                               rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(S.annealed_langevin_corrector(score, sde, x, t, snr=0.3, n_steps=2, seed=3, stream=11),
                               want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("t,dt", [(1.0, -0.05), (0.5, -0.2371), (0.06, -0.05)])
def test_ode_steps(kind, t, dt):
    sde, ref, score = make_sde(kind), Ref(kind), _score(kind)
    x, _ = _inputs(8, scale=3.0)
    tt = torch.full((7,), t, dtype=F64)
    d1 = ref_pf_drift(score, ref, x, tt)
    euler = x + d1 * dt
    torch.testing.assert_close(S.ode_euler_step(score, sde, x, t, dt), euler, rtol=1e-12, atol=1e-12)
    d2 = ref_pf_drift(score, ref, euler, tt + dt)
    heun = x + 0.5 * dt * (d1 + d2)
    torch.testing.assert_close(S.ode_heun_step(score, sde, x, t, dt), heun, rtol=1e-12, atol=1e-12)
    # score_sde's EM predictor with probability_flow=True is the Euler step
    assert not torch.allclose(heun, euler)


@pytest.mark.parametrize("kind", ["vp", "ve"])
def test_pc_loop_matches_transcription(kind):
    """Whole PC loop (EM + Langevin, score_sde grid) vs score_sde's loop with pygen's noise streams."""
    sde, ref, score = make_sde(kind), Ref(kind), _score(kind, dim=2)
    b, n, snr, seed, st = 5, 4, 0.17, 123, 1000
    got = S.pc_sample(score, sde, (b, 2), predictor="euler_maruyama", corrector="langevin", n_steps=n, snr=snr,
                      n_corrector_steps=2, seed=seed, stream=st, dtype=F64)
    x = pygen.randn((b, 2), seed, st, dtype=F64) * (SMAX if kind == "ve" else 1.0)
    times = torch.linspace(1.0, 1e-3, n, dtype=F64)
    for i in range(n):
        t = times[i].expand(b)
        zs = [pygen.randn((b, 2), seed, st + 1 + n + i * 2 + j, dtype=F64) for j in range(2)]
        x = ref_langevin(score, ref, x, t, zs, snr)
        x, x_mean = ref_em(score, ref, x, t, pygen.randn((b, 2), seed, st + 1 + i, dtype=F64), -1.0 / n)
    torch.testing.assert_close(got, x_mean, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------------
# whole loops vs score_sde / NCSN transcriptions, with pygen's documented noise streams:
# prior z = randn(seed, s), predictor step i: s + 1 + i, corrector iteration j of step i:
# s + 1 + n + i·n_corr + j; annealed Langevin level i, step m: s + 1 + i·M + m
# ---------------------------------------------------------------------------
LOOP_N = 25  # VP: beta_max/N = 0.8 <= 1 (discrete betas), alpha = 1 - beta_i >= 0 (corrector)


def _z(shape, seed, stream, dtype=F64):
    return pygen.randn(shape, seed, stream, dtype=dtype).to(F64)


def _prior(kind, shape, seed, stream, dtype=F64):
    return _z(shape, seed, stream, dtype) * (SMAX if kind == "ve" else 1.0)


def ref_pc_loop(score, ref, predictor, x, n, seed, st, snr, n_corr, denoise, eps=1e-3):
    """score_sde's pc_sampler: t = linspace(T, eps, N); corrector then predictor at each t."""
    b, shape = x.shape[0], tuple(x.shape)
    times = torch.linspace(1.0, eps, n, dtype=F64)
    step = {"reverse_diffusion": ref_rd, "ancestral": ref_anc}[predictor]
    for i in range(n):
        t = times[i].expand(b)
        zs = [_z(shape, seed, st + 1 + n + i * n_corr + j) for j in range(n_corr)]
        x = ref_langevin(score, ref, x, t, zs, snr)
        x, x_mean = step(score, ref, x, t, _z(shape, seed, st + 1 + i))
    return x_mean if denoise else x


def _fp32_tol(got, want):
    # fp32 storage and kernels vs the fp64 transcription: 1e-5 relative (plus an fp32-rounding floor)
    torch.testing.assert_close(got.to(F64), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


PC_LOOPS = [("vp", "reverse_diffusion"), ("subvp", "reverse_diffusion"), ("ve", "reverse_diffusion"),
            ("vp", "ancestral"), ("ve", "ancestral")]


@pytest.mark.parametrize("kind,predictor", PC_LOOPS)
@pytest.mark.parametrize("denoise", [True, False])
def test_pc_loop_rd_ancestral_matches_transcription(kind, predictor, denoise):
    """Whole PC loop (reverse-diffusion / ancestral predictor + Langevin corrector, sde.N = n) vs
    score_sde's loop: x <- x - f + G²·score + G·z with (f, G) the discretized SDE; ancestral VP
    x <- (x + beta_i·score)/sqrt(1 - beta_i) + sqrt(beta_i)·z, VE x <- x + (sigma_i² - sigma_{i-1}²)·score
    + sqrt(sigma_{i-1}²(sigma_i² - sigma_{i-1}²)/sigma_i²)·z."""
    n, b, snr, seed, st = LOOP_N, 5, 0.16, 321, 77
    sde, ref, score = make_sde(kind, n), Ref(kind, n), _score(kind, dim=2)
    got = S.pc_sample(score, sde, (b, 2), predictor=predictor, corrector="langevin", n_steps=n, snr=snr, seed=seed,
                      stream=st, denoise=denoise, dtype=F64)
    want = ref_pc_loop(score, ref, predictor, _prior(kind, (b, 2), seed, st), n, seed, st, snr, 1, denoise)
    assert torch.isfinite(want).all() and want.abs().max() < 20
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    if kind != "subvp":
        got32 = S.pc_sample(_score(kind, dim=2, dtype=torch.float32), sde, (b, 2), predictor=predictor,
                            corrector="langevin", n_steps=n, snr=snr, seed=seed, stream=st, denoise=denoise,
                            dtype=torch.float32)
        assert got32.dtype == torch.float32
        want32 = ref_pc_loop(score, ref, predictor, _prior(kind, (b, 2), seed, st, torch.float32), n, seed, st, snr,
                             1, denoise)
        _fp32_tol(got32, want32)


def test_pc_loop_rd_two_corrector_steps_matches_transcription():
    n, b, snr, seed, st = LOOP_N, 4, 0.2, 5, 0
    sde, ref, score = make_sde("vp", n), Ref("vp", n), _score("vp", dim=3)
    got = S.pc_sample(score, sde, (b, 3), predictor="reverse_diffusion", corrector="langevin", n_steps=n, snr=snr,
                      n_corrector_steps=2, seed=seed, stream=st, dtype=F64)
    want = ref_pc_loop(score, ref, "reverse_diffusion", _prior("vp", (b, 3), seed, st), n, seed, st, snr, 2, True)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def ref_annealed_langevin(score, ref, x, n_levels, m, step_lr, seed, st, denoise, eps=1e-3):
    """NCSN's anneal_Langevin_dynamics: step_i = step_lr·(sigma_i/sigma_L)², x <- x + step_i·score
    + sqrt(2·step_i)·z; optional final denoising x <- (x + sigma_L²·score(x, sigma_L)) / mean(t_L)."""
    b, shape = x.shape[0], tuple(x.shape)
    times = torch.linspace(1.0, eps, n_levels, dtype=F64)
    sigmas = ref.std(times)
    for i in range(n_levels):
        t = times[i].expand(b)
        step_size = step_lr * (sigmas[i] / sigmas[-1]) ** 2
        for k in range(m):
            z = _z(shape, seed, st + 1 + i * m + k)
            x = x + step_size * score(x, t) + torch.sqrt(step_size * 2) * z
    if denoise:
        t = times[-1].expand(b)
        x = (x + sigmas[-1] ** 2 * score(x, t)) / ref.mean(times[-1])
    return x


@pytest.mark.parametrize("kind", ["ve", "vp"])
@pytest.mark.parametrize("denoise", [False, True])
def test_annealed_langevin_matches_transcription(kind, denoise):
    # step_1 = step_lr·(sigma_1/sigma_L)² must stay stable: VE sigma 10 -> 0.01 (NCSN's step_lr 2e-5);
    # VP stops at eps = 0.2 (sigma_L ~ 0.6; at eps = 1e-3 it would be ~0.01)
    eps, lr = (1e-3, 2e-5) if kind == "ve" else (0.2, 3e-3)
    n_levels, m, b, seed, st = 6, 3, 5, 17, 400
    sde, ref, score = make_sde(kind), Ref(kind), _score(kind, dim=2)
    kw = dict(n_levels=n_levels, n_steps_each=m, step_lr=lr, seed=seed, stream=st, denoise=denoise, eps=eps)
    got = S.annealed_langevin(score, sde, (b, 2), dtype=F64, **kw)
    want = ref_annealed_langevin(score, ref, _prior(kind, (b, 2), seed, st), n_levels, m, lr, seed, st, denoise, eps)
    assert torch.isfinite(want).all() and want.abs().max() < 20  # a sane trajectory, not a blow-up
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    got32 = S.annealed_langevin(_score(kind, dim=2, dtype=torch.float32), sde, (b, 2), dtype=torch.float32, **kw)
    want32 = ref_annealed_langevin(score, ref, _prior(kind, (b, 2), seed, st, torch.float32), n_levels, m, lr, seed,
                                   st, denoise, eps)
    _fp32_tol(got32, want32)


def ref_ode_loop(score, ref, method, x, n, eps=1e-3):
    """Probability-flow ODE dx/dt = f·x - g²·score/2 on linspace(T, eps, n + 1): Euler, or Heun
    x <- x + dt/2·(d(x, t) + d(x + dt·d(x, t), t + dt))."""
    b = x.shape[0]
    levels = torch.linspace(1.0, eps, n + 1, dtype=F64)
    for i in range(n):
        t, t2 = levels[i].expand(b), levels[i + 1].expand(b)
        dt = levels[i + 1] - levels[i]
        d1 = ref_pf_drift(score, ref, x, t)
        if method == "euler":
            x = x + dt * d1
        else:
            d2 = ref_pf_drift(score, ref, x + dt * d1, t2)
            x = x + 0.5 * dt * (d1 + d2)
    return x


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", ["euler", "heun"])
def test_ode_loop_matches_transcription(kind, method):
    n, b, seed, st = 12, 6, 8, 3
    sde, ref, score = make_sde(kind), Ref(kind), _score(kind, dim=2)
    got = S.ode_sample(score, sde, (b, 2), method=method, n_steps=n, seed=seed, stream=st, dtype=F64)
    want = ref_ode_loop(score, ref, method, _prior(kind, (b, 2), seed, st), n)
    assert torch.isfinite(want).all() and want.abs().max() < 20
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    got32 = S.ode_sample(_score(kind, dim=2, dtype=torch.float32), sde, (b, 2), method=method, n_steps=n, seed=seed,
                         stream=st, dtype=torch.float32)
    _fp32_tol(got32, ref_ode_loop(score, ref, method, _prior(kind, (b, 2), seed, st, torch.float32), n))


def test_time_grid():
    sde = make_sde("vp")
    t, dt = S.time_grid(sde, 4, 1e-3)
    torch.testing.assert_close(t, torch.linspace(1.0, 1e-3, 4, dtype=F64))
    assert torch.all(dt == -0.25)
    t, dt = S.time_grid(sde, 4, 1e-3, "uniform")
    torch.testing.assert_close(t + dt, torch.linspace(1.0, 1e-3, 5, dtype=F64)[1:])


# ---------------------------------------------------------------------------
# statistics on the analytic mixture
# ---------------------------------------------------------------------------
NS = 800


@pytest.fixture(scope="module")
def thresholds():
    m = models.ring(k=4, radius=2.0, std=0.4, dtype=F64)
    g = torch.Generator().manual_seed(0)
    mmd = metrics.calibrate(m, NS, "mmd", trials=24, quantile=0.99, generator=g)
    mwe = metrics.calibrate(m, NS, "mode_weight_error", trials=24, quantile=0.99, generator=g)
    return m, 1.5 * mmd, 1.5 * mwe


def _check_stats(x, thresholds):
    m, t_mmd, t_mwe = thresholds
    assert torch.isfinite(x).all()
    ref = m.sample(NS, torch.Generator().manual_seed(1))
    d = metrics.mmd(x, ref)
    e = metrics.mode_weight_error(x, m)
    assert d < t_mmd, (d, t_mmd)
    assert e < t_mwe, (e, t_mwe)


CASES = [
    ("vp", "reverse_diffusion", "langevin"),
    ("vp", "euler_maruyama", "none"),
    ("subvp", "euler_maruyama", "ald"),
    ("ve", "ancestral", "langevin"),
    ("ve", "reverse_diffusion", "none"),
]


@pytest.mark.parametrize("kind,pred,corr", CASES)
def test_pc_sample_statistics(kind, pred, corr, thresholds):
    m = thresholds[0]
    sde = schedules.VPSDE(BMIN, BMAX, 200) if kind == "vp" else (
        schedules.SubVPSDE(BMIN, BMAX, 200) if kind == "subvp" else schedules.VESDE(SMIN, SMAX, 200))
    x = S.pc_sample(m.model_fn("score", sde=sde), sde, (NS, 2), predictor=pred, corrector=corr, n_steps=200,
                    snr=0.1, seed=11, dtype=F64)
    _check_stats(x, thresholds)


@pytest.mark.parametrize("kind,method", [("vp", "heun"), ("ve", "heun"), ("subvp", "euler")])
def test_ode_sample_statistics(kind, method, thresholds):
    m = thresholds[0]
    sde = make_sde(kind)
    x = S.ode_sample(m.model_fn("score", sde=sde), sde, (NS, 2), method=method,
                     n_steps=40 if method == "heun" else 200, seed=12, dtype=F64)
    _check_stats(x, thresholds)


def test_annealed_langevin_statistics(thresholds):
    m = thresholds[0]
    sde = schedules.VESDE(0.05, SMAX, N)
    x = S.annealed_langevin(m.model_fn("score", sde=sde), sde, (NS, 2), n_levels=20, n_steps_each=20, step_lr=2e-3,
                            seed=13, dtype=F64, eps=1e-3)
    _check_stats(x, thresholds)


def test_wrong_sampler_is_detected(thresholds):
    """The statistical check can fail: a score for the wrong SDE gives far-off samples."""
    m = thresholds[0]
    sde = make_sde("vp")
    wrong = m.model_fn("score", sde=make_sde("ve"))
    x = S.pc_sample(wrong, sde, (NS, 2), predictor="euler_maruyama", corrector="none", n_steps=50, seed=3, dtype=F64)
    ref = m.sample(NS, torch.Generator().manual_seed(1))
    assert not (metrics.mmd(x, ref) < thresholds[1])


# ---------------------------------------------------------------------------
# reproducibility, float32, callback
# ---------------------------------------------------------------------------
def test_reproducible_and_seeded():
    sde, score = make_sde("vp"), _score("vp", dim=2)
    kw = dict(predictor="reverse_diffusion", corrector="langevin", n_steps=5, dtype=torch.float32)
    a = S.pc_sample(score, sde, (9, 2), seed=4, **kw)
    b = S.pc_sample(score, sde, (9, 2), seed=4, **kw)
    c = S.pc_sample(score, sde, (9, 2), seed=5, **kw)
    assert a.dtype == torch.float32
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    seeds = torch.arange(9, dtype=torch.int64) + 100
    # per-row noise, but the batch-mean SNR norm couples rows: use norm="row" for row independence
    r = S.pc_sample(score, sde, (9, 2), seed=seeds, norm="row", **kw)
    r3 = S.pc_sample(score, sde, (3, 2), seed=seeds[3:6], norm="row", **kw)
    torch.testing.assert_close(r[3:6], r3, rtol=1e-5, atol=1e-6)


def test_callback_and_x_T():
    sde, score = make_sde("ve"), _score("ve", dim=2)
    seen = []
    x_T = torch.randn(4, 2, dtype=F64) * SMAX
    out = S.pc_sample(score, sde, x_T=x_T, predictor="ancestral", corrector="none", n_steps=6,
                      callback=lambda i, x: seen.append(i))
    assert seen == list(range(6))
    assert out.shape == (4, 2) and out.dtype == F64
    assert not torch.equal(out, x_T)
    seen.clear()
    S.ode_sample(score, sde, x_T=x_T, method="heun", n_steps=3, callback=lambda i, x: seen.append(i))
    assert seen == [0, 1, 2]


@pytest.mark.parametrize("loop", ["pc", "pc-none", "annealed", "ode"])
def test_callback_gets_a_copy_per_step(loop):
    """The loops rewrite their state in place; a callback that keeps x gets each step's own value."""
    sde, score = make_sde("ve", 6), _score("ve", dim=2)
    kept = []
    kw = dict(x_T=torch.randn(4, 2, dtype=F64) * SMAX, callback=lambda i, x: kept.append(x))
    if loop.startswith("pc"):
        out = S.pc_sample(score, sde, n_steps=6, predictor="none" if loop == "pc-none" else "reverse_diffusion",
                          denoise=False, **kw)
    elif loop == "annealed":
        out = S.annealed_langevin(score, sde, n_levels=6, n_steps_each=2, **kw)
    else:
        out = S.ode_sample(score, sde, method="euler", n_steps=6, **kw)
    assert len(kept) == 6 and len({x.data_ptr() for x in kept}) == 6
    assert all(not torch.equal(a, b) for a, b in zip(kept, kept[1:]))
    assert torch.equal(kept[-1], out)


# ---------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------
def test_bad_input():
    sde, score = make_sde("vp"), _score("vp", dim=2)
    x = torch.zeros(3, 2, dtype=F64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the error comes first, not the n_steps != sde.N warning
        with pytest.raises(ValueError, match="n_steps"):
            S.pc_sample(score, sde, (3, 2), n_steps=0)
    with pytest.raises(ValueError, match="n_steps"):
        S.ode_sample(score, sde, (3, 2), n_steps=0)
    with pytest.raises(ValueError, match="n_steps"):
        S.langevin_corrector(score, sde, x, 0.5, n_steps=0)
    with pytest.raises(ValueError, match="predictor"):
        S.pc_sample(score, sde, (3, 2), predictor="heun")
    with pytest.raises(ValueError, match="corrector"):
        S.pc_sample(score, sde, (3, 2), corrector="mala")
    with pytest.raises(ValueError, match="snr"):
        S.pc_sample(score, sde, (3, 2), snr=0.0)
    with pytest.raises(ValueError, match="snr"):
        S.langevin_corrector(score, sde, x, 0.5, snr=-1.0)
    with pytest.raises(ValueError, match="method"):
        S.ode_sample(score, sde, (3, 2), method="rk45")
    with pytest.raises(ValueError, match="ancestral"):
        S.pc_sample(score, make_sde("subvp"), (3, 2), predictor="ancestral")
    with pytest.raises(ValueError, match="eps"):
        S.pc_sample(score, sde, (3, 2), eps=0.0)
    with pytest.raises(ValueError, match="n_corrector_steps"):
        S.pc_sample(score, sde, (3, 2), n_corrector_steps=0)
    with pytest.raises(ValueError, match="dt"):
        S.euler_maruyama_step(score, sde, x, 0.5, 0.1)
    with pytest.raises(ValueError, match="t"):
        S.reverse_diffusion_step(score, sde, x, 1.5)
    with pytest.raises(ValueError, match="shape"):
        S.pc_sample(score, sde, (0, 2))
    with pytest.raises(TypeError, match="sde"):
        S.pc_sample(score, "vp", (3, 2))
    with pytest.raises(ValueError, match="score_fn"):
        S.pc_sample(lambda x, t: x[:, :1], sde, (3, 2), n_steps=2)


def test_nan_propagates():
    sde, score = make_sde("vp"), _score("vp", dim=2)
    x = torch.zeros(3, 2, dtype=F64)
    x[1, 0] = float("nan")
    out = S.reverse_diffusion_step(score, sde, x, 0.5, seed=1)
    assert torch.isnan(out[1]).any() and torch.isfinite(out[0]).all()


# ---------------------------------------------------------------------------
# no host syncs in the loops (as tests/test_mcmc.py checks the MCMC loops)
# ---------------------------------------------------------------------------
HOST_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")


class HostReadGuard:
    """Records (and raises on) every Tensor -> host read while armed.

    Armed from the loop's first score evaluation to its last callback, so the one-off host-side setup
    (float64 coefficient tables on the CPU) is allowed and every per-step read is not. Reads made on
    behalf of the Triton interpreter (which runs kernels on the host, under TRITON_INTERPRET=1) are not
    the loop's and pass.
    """

    def __init__(self, monkeypatch=None):
        self.armed, self.calls = False, []
        for name in HOST_READS if monkeypatch is not None else ():  # (None: a plain, unguarded run)
            monkeypatch.setattr(torch.Tensor, name, self._forbid(name, getattr(torch.Tensor, name)))

    @staticmethod
    def _from_triton():
        import sys

        f = sys._getframe(2)
        while f is not None:
            if "triton" in f.f_code.co_filename.replace("\\", "/").split("/"):
                return True
            f = f.f_back
        return False

    def _forbid(self, name, orig):
        guard = self

        def f(self, *a, **k):
            if guard.armed and not guard._from_triton():
                guard.calls.append(name)
                raise AssertionError(f"host sync: Tensor.{name} in the sampling loop")
            return orig(self, *a, **k)
        return f

    def score(self, score_fn):
        started = []

        def s(x, t):
            if not started:  # the loop's first evaluation (a later one may follow its last callback)
                started.append(True)
                self.armed = True
            return score_fn(x, t)
        return s

    def callback(self, last):
        def cb(i, x):
            if i == last:
                self.armed = False
        return cb


def _run_loop(loop, score, sde, guard, seed=3, n=LOOP_N):
    shape = (6, 3)
    kw = dict(seed=seed, dtype=torch.float32)
    if loop == "annealed_langevin":
        return S.annealed_langevin(guard.score(score), sde, shape, n_levels=4, n_steps_each=2, denoise=True,
                                   callback=guard.callback(3), **kw)
    if loop.startswith("ode_"):
        return S.ode_sample(guard.score(score), sde, shape, method=loop[4:], n_steps=4, callback=guard.callback(3),
                            **kw)
    predictor, corrector = loop.split("+")
    return S.pc_sample(guard.score(score), sde, shape, predictor=predictor, corrector=corrector, n_steps=n,
                       n_corrector_steps=2, callback=guard.callback(n - 1), **kw)


SYNC_LOOPS = [("vp", "euler_maruyama+langevin"), ("subvp", "euler_maruyama+langevin"),
              ("vp", "reverse_diffusion+langevin"), ("vp", "ancestral+langevin"), ("ve", "ancestral+langevin"),
              ("vp", "none+langevin"), ("vp", "reverse_diffusion+ald"), ("ve", "annealed_langevin"),
              ("vp", "ode_euler"), ("ve", "ode_heun")]


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("kind,loop", SYNC_LOOPS)
def test_no_host_sync_in_loops(kind, loop, backend, monkeypatch):
    """The PC loop (each predictor with the SNR Langevin corrector, and ALD), annealed Langevin and the
    probability-flow ODE never pull a tensor value to the host per step (.item(), .tolist(), .cpu(),
    .numpy(), bool/float/int of a tensor), with an int or per-row seeds."""
    from conftest import require_backend

    require_backend(backend)
    n = LOOP_N
    if backend == "triton":
        if (kind, loop) not in (("vp", "euler_maruyama+langevin"), ("ve", "ode_heun")):
            pytest.skip("the interpreter is slow: two loops cover the Triton launchers")
        n = 3  # (Euler–Maruyama takes any number of steps)
    sde, score = make_sde(kind, LOOP_N), _score(kind, dim=3, dtype=torch.float32)
    with pygen.use_backend(backend):
        want = _run_loop(loop, score, sde, HostReadGuard(), n=n)
        guard = HostReadGuard(monkeypatch)
        got = _run_loop(loop, score, sde, guard, n=n)
        assert not guard.armed  # the loop ran to its last callback
        rows = torch.arange(6, dtype=torch.int64) + 50
        _run_loop(loop, score, sde, guard, seed=rows, n=n)
    monkeypatch.undo()
    assert not guard.calls
    assert torch.isfinite(got).all() and torch.equal(got, want)


@pytest.mark.parametrize("target,loop", [("sampler_step", "ode_heun"), ("run_langevin_snr_step", "none+langevin"),
                                         ("sampler_step", "annealed_langevin")])
def test_host_sync_check_can_fail(target, loop, monkeypatch):
    """The guard above catches a per-step host read inside the loop (here injected next to the fused ops)."""
    real = getattr(S, target)

    def with_sync(*a, **k):
        out = real(*a, **k)
        x = next(v for v in a if isinstance(v, torch.Tensor))
        float(x.sum())  # a per-step host read
        return out

    monkeypatch.setattr(S, target, with_sync)
    guard = HostReadGuard(monkeypatch)
    kind = "ve" if loop == "annealed_langevin" else "vp"
    from conftest import require_backend

    require_backend("cpu")
    with pygen.use_backend("cpu"):
        with pytest.raises(AssertionError, match="host sync: Tensor.__float__"):
            _run_loop(loop, _score(kind, dim=3, dtype=torch.float32), make_sde(kind, LOOP_N), guard)
    monkeypatch.undo()
    assert guard.calls == ["__float__"]


# ---------------------------------------------------------------------------
# backends: the loops give the same samples on torch, cpu and triton
# ---------------------------------------------------------------------------
def _available(name):
    return pygen.backends().get(name) == "available"


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_backends_agree(backend, dtype):
    if not _available(backend):
        pytest.skip(f"backend {backend}: {pygen.backends().get(backend)}")
    from conftest import device_for

    dev = device_for(backend)
    sde, score = make_sde("vp"), _score("vp", dim=3)
    runs = {}
    for name in ("torch", backend):
        with pygen.use_backend(name):
            pc = S.pc_sample(score, sde, (5, 3), predictor="euler_maruyama", corrector="langevin", n_steps=3,
                             seed=7, dtype=dtype, norm="row", device=dev)
            ald = S.pc_sample(score, sde, (5, 3), predictor="ancestral", corrector="ald", n_steps=3, seed=7,
                              dtype=dtype, device=dev)
            ode = S.ode_sample(score, sde, (5, 3), method="heun", n_steps=3, seed=7, dtype=dtype, device=dev)
            runs[name] = (pc, ald, ode)
    # the normals are computed in fp32 on every backend (noise contract), so backends may differ
    # by an fp32 ulp of the noise even for fp64 storage
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-6, atol=2e-6)
    for a, b in zip(runs["torch"], runs[backend]):
        assert a.dtype == dtype
        torch.testing.assert_close(b, a, **tol)


def test_langevin_corrector_rejects_negative_alpha():
    """score_sde's corrector alpha = 1 - beta_i goes negative when N is small for beta_max: clear error, not NaN."""
    import pygen

    sde = pygen.schedules.VPSDE(0.1, 20.0, 10)
    score = pygen.models.clot().model_fn("score", sde=sde)
    with pytest.raises(ValueError, match="alpha = 1 - beta_i >= 0"):
        pygen.sde.pc_sample(score, sde, (4, 2), seed=0, predictor="euler_maruyama")
    with pytest.raises(ValueError, match="beta_max/N <= 1"):
        pygen.sde.pc_sample(score, sde, (4, 2), seed=0, corrector="none")
    x = pygen.sde.pc_sample(score, sde, (4, 2), seed=0, predictor="euler_maruyama", corrector="none")
    assert torch.isfinite(x).all()
