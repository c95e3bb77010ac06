"""Statistical correctness of every sampler on analytic Gaussian mixtures (issue 3), CPU.

Each sampler, run with enough steps on a ``pygen.models`` mixture whose noised
score / denoiser / energy is exact, must produce samples whose distance to a
fresh exact sample of the mixture is within a threshold calibrated from
exact-vs-exact samples of the same size (``pygen.metrics.calibrate``):

- sliced Wasserstein (64 fixed random directions, the same for the null and
  the tests) <= ``SLACK`` x the 0.99 quantile of the exact-vs-exact distance;
- mode-weight error (max_k |fraction attributed to component k - w_k|)
  <= ``SLACK`` x the 0.99 quantile of the same statistic on exact samples;
- for a few samplers also the unbiased MMD^2 (median-heuristic Gaussian
  kernels) <= ``MMD_SLACK`` x its 0.99 null quantile (on 1000 points).

Why ``SLACK = 1.5``: at finite steps a sampler has a systematic error b on
top of the sampling noise D0, and the distance behaves like sqrt(D0^2 + b^2).
1.5 x q99 admits b up to sqrt(1.5^2 - 1) ~ 1.1 x q99 even when the sampling
noise is at its 99th percentile, while a real error of that size or more is
flagged. (Measured with 20000 samples on the clot, the systematic error of the
step counts used here is <= ~0.06 in sliced W2, against a q99 of ~0.2 at
N = 2000: the slack is not what makes them pass.) MMD^2 is quadratic in the
discrepancy, so its slack is 2 (~1.4 in distance units). Each threshold is
tested against negative controls (too few steps, a too-small sigma_max, a
shifted model, a wrong SDE discretisation, a too-large ULA step, MCMC without
tempering on a multimodal target) that must fail it: the checks can fail.

Everything is seeded (sample noise, exact samples, projections), so the file
is deterministic; the seeds were fixed before looking at the results. The
tensors are small, so torch runs single-threaded in this module (faster on a
shared CPU; restored afterwards).
"""
import functools
import math

import pytest
import torch

import pygen
from pygen import kdiffusion as K
from pygen import mcmc, metrics, models, schedules
from pygen import sde as S

N = 2000  # samples per sampler run (and per side of the null pairs)
N_SMALL = 1000  # replica exchange (R x chains rows per step) and the MMD checks
PROJECTIONS = 64
SLACK = 1.5
MMD_SLACK = 2.0
QUANTILE = 0.99
SEED = 0  # sampler noise: pygen.randn(..., SEED) / torch.manual_seed(SEED) / mcmc seed

# ---------------------------------------------------------------------------
# targets
# ---------------------------------------------------------------------------
CLOT = models.clot()  # 7 anisotropic blobs of unequal weights (seed 000)
RING = models.ring()  # 8 equal blobs, std 0.3, on a circle of radius 4: well separated modes
# Three overlapping-enough blobs (centres 2.4 apart, stds ~0.5: the barrier is ~3 nats) so that
# single-temperature MCMC mixes between the modes in a few hundred steps; unequal weights.
TRIO = models.GaussianMixture([(-1.2, -0.6), (1.2, -0.6), (0.0, 1.2)],
                              [(0.5, 0.5), (0.45, 0.55), (0.55, 0.45)], [0.5, 0.3, 0.2])
# 8-D, 3 components, means 1.5·N(0, I) (pairwise distances ~6), stds 0.4-0.9, weights 0.5/0.3/0.2.
_g8 = torch.Generator().manual_seed(8)
HIGH = models.GaussianMixture(1.5 * torch.randn(3, 8, generator=_g8, dtype=torch.float64),
                              0.4 + 0.5 * torch.rand(3, 8, generator=_g8, dtype=torch.float64),
                              [0.5, 0.3, 0.2])
TARGETS = {"clot": CLOT, "ring": RING, "trio": TRIO, "high8": HIGH}


@pytest.fixture(scope="module", autouse=True)
def _single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _sw(a, b):
    """Sliced W2 over PROJECTIONS fixed directions (the same ones for the null and every test)."""
    return metrics.sliced_wasserstein(a, b, n_projections=PROJECTIONS, generator=torch.Generator().manual_seed(7))


class Reference:
    """Null thresholds and one fresh exact sample for a target at a sample size."""

    def __init__(self, name, n, mmd):
        mix = TARGETS[name]
        self.name, self.mixture, self.n = name, mix, n
        g = torch.Generator().manual_seed(1000 + n)
        self.sw_null = metrics.calibrate(mix, n, metric=_sw, trials=100, quantile=QUANTILE, generator=g)
        self.mw_null = metrics.calibrate(mix, n, metric="mode_weight_error", trials=200, quantile=QUANTILE,
                                         generator=g)
        self.mmd_null = metrics.calibrate(mix, n, metric="mmd", trials=24, quantile=QUANTILE,
                                          generator=g) if mmd else None
        # independent of the null pairs (another generator)
        self.exact = mix.sample(n, torch.Generator().manual_seed(2000 + n))


def reference(name, n=N, mmd=False):
    """Cached per (target, n, with MMD): calibrated once per module run."""
    return _reference(name, int(n), bool(mmd))


@functools.lru_cache(maxsize=None)
def _reference(name, n, mmd):
    return Reference(name, n, mmd)


def distances(x, ref, mmd=False):
    """{metric: (value, threshold)} of the samples x against the exact reference."""
    x = x.detach().to(torch.float64)
    out = {
        "sliced_w2": (_sw(x, ref.exact), SLACK * ref.sw_null),
        "mode_weights": (metrics.mode_weight_error(x, ref.mixture), SLACK * ref.mw_null),
    }
    if mmd:
        out["mmd2"] = (metrics.mmd(x[:ref.n], ref.exact), MMD_SLACK * ref.mmd_null)
    return out


def failures(x, ref, mmd=False, label=""):
    """The metrics that exceed their thresholds (non-finite samples fail everything)."""
    res = distances(x, ref, mmd)
    print(f"STAT {label} [{ref.name} n={ref.n}] " + " ".join(f"{k}={v:.4f}/{t:.4f}" for k, (v, t) in res.items()))
    if not bool(torch.isfinite(x).all()):
        return {k: (math.nan, t) for k, (_, t) in res.items()}
    return {k: (v, t) for k, (v, t) in res.items() if not v <= t}


def assert_matches(x, ref, mmd=False, label=""):
    assert x.shape == (ref.n, ref.mixture.dim)
    bad = failures(x, ref, mmd, label)
    assert not bad, f"{label}: distance(s) above threshold {bad}"


# ---------------------------------------------------------------------------
# pygen.kdiffusion: denoiser on Karras sigmas, sigma_max = 80 >> the clot's spread (~2)
# ---------------------------------------------------------------------------
SIGMA_MIN, SIGMA_MAX = 0.005, 80.0
# Steps: first-order samplers (Euler, Euler ancestral, churn) need ~100 levels on the clot
# (at 50 their mode-weight error is still ~2x the N=20000 null); the others 50.
KD_CASES = {
    "euler": ("sample_euler", 100, {}),
    "euler_churn": ("sample_euler", 100, {"s_churn": 10.0, "s_tmin": 0.05, "s_tmax": 50.0}),
    "euler_ancestral": ("sample_euler_ancestral", 100, {}),
    "heun": ("sample_heun", 50, {}),
    "heun_churn": ("sample_heun", 50, {"s_churn": 5.0, "s_tmin": 0.05, "s_tmax": 50.0}),
    "dpm_2": ("sample_dpm_2", 50, {}),
    "dpm_2_ancestral": ("sample_dpm_2_ancestral", 50, {}),
    "lms": ("sample_lms", 50, {}),
    "dpmpp_2s_ancestral": ("sample_dpmpp_2s_ancestral", 50, {}),
    "dpmpp_sde": ("sample_dpmpp_sde", 50, {}),
    "dpmpp_2m": ("sample_dpmpp_2m", 50, {}),
    "dpmpp_2m_sde": ("sample_dpmpp_2m_sde", 50, {}),
    "dpmpp_2m_sde_heun": ("sample_dpmpp_2m_sde", 50, {"solver_type": "heun"}),
    "dpmpp_3m_sde": ("sample_dpmpp_3m_sde", 50, {}),
}
KD_MMD = ("dpmpp_2m", "dpmpp_sde", "euler_ancestral")


def run_kdiffusion(fn_name, steps, kwargs, mixture=CLOT, n=N, sigma_max=SIGMA_MAX, model=None, seed=SEED):
    model = mixture.model_fn("denoiser") if model is None else model
    sigmas = K.get_sigmas_karras(steps, SIGMA_MIN, sigma_max)
    x = sigma_max * pygen.randn((n, mixture.dim), seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the in-kernel noise key (kdiffusion.default_seed)
        return getattr(K, fn_name)(model, x, sigmas, disable=True, **kwargs)


@pytest.mark.parametrize("case", list(KD_CASES))
def test_kdiffusion_clot(case):
    fn_name, steps, kwargs = KD_CASES[case]
    mmd = case in KD_MMD
    x = run_kdiffusion(fn_name, steps, kwargs)
    assert_matches(x, reference("clot", N), label=f"kdiffusion.{case}")
    if mmd:
        assert_matches(x[:N_SMALL], reference("clot", N_SMALL, mmd=True), mmd=True, label=f"kdiffusion.{case}")


@pytest.mark.parametrize("case", ["euler_ancestral", "dpmpp_2m", "dpmpp_sde", "dpmpp_3m_sde"])
def test_kdiffusion_ring(case):
    """Eight well-separated equal modes: every mode gets its weight."""
    fn_name, steps, kwargs = KD_CASES[case]
    assert_matches(run_kdiffusion(fn_name, steps, kwargs, mixture=RING), reference("ring"),
                   label=f"kdiffusion.{case}")


@pytest.mark.parametrize("case", ["heun", "euler_ancestral", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_3m_sde"])
def test_kdiffusion_8d(case):
    fn_name, steps, kwargs = KD_CASES[case]
    assert_matches(run_kdiffusion(fn_name, steps, kwargs, mixture=HIGH), reference("high8"),
                   label=f"kdiffusion.{case}")


# ---------------------------------------------------------------------------
# pygen.sde: score of the SDE marginal; the SDE's N equals the loop's steps (the reverse-diffusion
# and ancestral predictors use the SDE's own discretisation, dt = T/N, as in score_sde)
# ---------------------------------------------------------------------------
SDE_STEPS = 100


def make_sde(kind, n=SDE_STEPS, sigma_max=20.0):
    if kind == "vp":
        return schedules.VPSDE(0.1, 20.0, N=n)  # alpha(1) ~ 0.007: the prior is N(0, I) to ~1e-4
    if kind == "subvp":
        return schedules.SubVPSDE(0.1, 20.0, N=n)
    # The VE prior N(0, sigma_max^2 I) ignores the data's mean and spread, so sigma_max must dominate
    # both: 20 for the clot (diameter ~7.5, mean ~(0, 0.4)). The 8-D target (mean norm 1.8, largest
    # covariance eigenvalue 7) needs 100: at sigma_max = 20 the probability-flow ODE converges (in
    # steps) to samples whose mode weights are off by ~0.01 (measured with 20000 samples).
    return schedules.VESDE(0.01, sigma_max, N=n)


PC_CASES = [(kind, pred, corr) for kind in ("vp", "subvp", "ve")
            for pred in ("euler_maruyama", "reverse_diffusion", "ancestral")
            for corr in ("none", "langevin", "ald")
            if not (kind == "subvp" and pred == "ancestral")]  # ancestral is not defined for sub-VP


@pytest.mark.parametrize("kind,predictor,corrector", PC_CASES)
def test_pc_sample_clot(kind, predictor, corrector):
    # 100 steps: the largest systematic error, measured at N = 20000, is the VE reverse-diffusion /
    # ancestral predictors' mode-weight error ~0.009 (null ~0.003 there), a quarter of the threshold.
    # The Langevin corrector at snr = 0.16 (batch norm) is ULA with step ~0.1/E|score|^2: its variance
    # bias in the clot's narrowest direction is a few percent (sliced W2 <= ~0.05 at N = 20000).
    sde = make_sde(kind)
    x = S.pc_sample(CLOT.model_fn("score", sde=sde), sde, (N, 2), predictor=predictor, corrector=corrector,
                    snr=0.16, seed=SEED)
    mmd = (kind, predictor, corrector) == ("ve", "reverse_diffusion", "langevin")
    assert_matches(x, reference("clot"), label=f"sde.pc[{kind},{predictor},{corrector}]")
    if mmd:
        assert_matches(x[:N_SMALL], reference("clot", N_SMALL, mmd=True), mmd=True,
                       label=f"sde.pc[{kind},{predictor},{corrector}]")


@pytest.mark.parametrize("kind", ["vp", "subvp", "ve"])
@pytest.mark.parametrize("method,steps", [("euler", 200), ("heun", 100)])
def test_ode_sample_clot(kind, method, steps):
    sde = make_sde(kind)
    x = S.ode_sample(CLOT.model_fn("score", sde=sde), sde, (N, 2), method=method, n_steps=steps, seed=SEED)
    assert_matches(x, reference("clot"), label=f"sde.ode[{kind},{method}]")


def test_annealed_langevin_clot():
    # NCSN: 10 geometric levels from 20 to 0.01, 100 steps each, step_lr = 2e-5 (step 0.2·sigma_L^2
    # at the last level), Tweedie denoising at the end
    sde = make_sde("ve")
    x = S.annealed_langevin(CLOT.model_fn("score", sde=sde), sde, (N, 2), n_levels=10, n_steps_each=100,
                            step_lr=2e-5, denoise=True, seed=SEED)
    assert_matches(x, reference("clot"), label="sde.annealed_langevin")


@pytest.mark.parametrize("sampler", ["pc_vp_em", "pc_ve_rd_langevin", "ode_heun_ve"])
def test_sde_8d(sampler):
    # VE over 1e4 in sigma: the reverse-diffusion predictor needs 200 steps here (at 100 its weight of
    # component 2 is ~0.21 instead of 0.20, averaged over 40 seeds at N = 2000: discretisation error)
    sde = make_sde("vp") if sampler == "pc_vp_em" else make_sde("ve", n=200, sigma_max=100.0)
    score = HIGH.model_fn("score", sde=sde)
    if sampler == "pc_vp_em":
        x = S.pc_sample(score, sde, (N, 8), predictor="euler_maruyama", corrector="none", seed=SEED)
    elif sampler == "pc_ve_rd_langevin":
        x = S.pc_sample(score, sde, (N, 8), predictor="reverse_diffusion", corrector="langevin", seed=SEED)
    else:
        x = S.ode_sample(score, sde, (N, 8), method="heun", n_steps=100, seed=SEED)
    assert_matches(x, reference("high8"), label=f"sde.{sampler}")


# ---------------------------------------------------------------------------
# pygen.mcmc
# ---------------------------------------------------------------------------
def overdispersed(n=N, dim=2, scale=2.0):
    """Initial chains N(0, scale^2 I): wider than the target, covering all its modes."""
    return scale * torch.randn(n, dim, generator=torch.Generator().manual_seed(77))


# ULA is biased by O(dt): on TRIO (component variances 0.2-0.3) dt = 0.05 inflates the variances by
# ~dt/(4·var) ~ 5%, well below the threshold; 1000 steps mix the three modes from the wide start.
@pytest.mark.parametrize("model", ["score_fn", "energy_fn"])
def test_ula_trio(model):
    fn = TRIO.model_fn("grad_log_prob" if model == "score_fn" else "energy")
    x = mcmc.ula(overdispersed(), **{model: fn}, step_size=0.05, n_steps=1000, seed=SEED)
    assert_matches(x, reference("trio"), label=f"mcmc.ula[{model}]")


def test_mala_trio():
    x, rate = mcmc.mala(overdispersed(), TRIO.model_fn("energy"), step_size=0.1, n_steps=600, seed=SEED)
    assert 0.5 < float(rate.mean()) < 1.0
    assert_matches(x, reference("trio"), label="mcmc.mala")


def test_hmc_trio():
    x, rate = mcmc.hmc(overdispersed(), TRIO.model_fn("energy"), step_size=0.2, n_leapfrog=5, n_steps=150,
                       seed=SEED)
    assert 0.5 < float(rate.mean()) < 1.0
    assert_matches(x, reference("trio"), mmd=False, label="mcmc.hmc")


def _tempered_clot_energy():
    """replica_exchange targets exp(-beta·E)·N(0, I); E = E_clot - |x|^2/2 makes beta = 1 the clot."""
    energy = CLOT.model_fn("energy")

    def fn(x):
        return energy(x) - 0.5 * (x * x).sum(-1)
    return fn


def test_replica_exchange_clot():
    """The hard multimodal case: every chain starts in one mode (component 3) of the clot; MALA moves
    (exact at every temperature) with steps growing towards beta = 0, 5 temperatures, 200 steps."""
    x0 = torch.tensor([3.0, 0.2]).repeat(N_SMALL, 1)
    betas = torch.linspace(0, 1, 5) ** 2
    steps = 0.06 + 0.6 * (1 - betas)
    x, rates = mcmc.replica_exchange(x0, _tempered_clot_energy(), betas, step_size=steps, n_steps=200, seed=SEED,
                                     move="mala")
    assert bool((rates > 0.2).all())
    assert_matches(x, reference("clot", N_SMALL, mmd=True), mmd=True, label="mcmc.replica_exchange")


@pytest.mark.parametrize("sampler", ["mala", "hmc"])
def test_mcmc_8d_keeps_exact_samples_exact(sampler):
    """Invariance in 8-D: started from exact samples, an exact MCMC kernel must stay at the target
    (the modes are too far apart to mix, so this tests detailed balance, not mixing)."""
    x0 = HIGH.sample(N, torch.Generator().manual_seed(78)).float()
    energy = HIGH.model_fn("energy")
    if sampler == "mala":
        x, rate = mcmc.mala(x0, energy, step_size=0.1, n_steps=200, seed=SEED)
    else:
        x, rate = mcmc.hmc(x0, energy, step_size=0.15, n_leapfrog=5, n_steps=60, seed=SEED)
    assert 0.5 < float(rate.mean()) < 1.0
    assert (x != x0).any(dim=1).float().mean() > 0.9  # the chains did move
    assert_matches(x, reference("high8"), label=f"mcmc.{sampler}[8d]")


# ---------------------------------------------------------------------------
# pygen.sample: the same mixture through the one entry point (diffusers prediction types, SDE, MCMC)
# ---------------------------------------------------------------------------
SCHED = schedules.NoiseSchedule()  # DDPM linear betas: sigma from 0.01 to ~157


def _sample_model(pt):
    if pt in ("eps", "x0", "v"):
        return CLOT.model_fn(pt, alphas_cumprod=SCHED.alphas_cumprod)
    return CLOT.model_fn(pt)


@pytest.mark.parametrize("sampler,pt,steps", [
    ("ddim", "eps", 50), ("ddpm", "eps", 100), ("dpmpp_2m", "v", 50), ("dpmpp_2m_sde", "x0", 50),
    ("euler", "flow", 100), ("dpmpp_sde", "denoiser", 50)])
def test_pygen_sample_diffusion(sampler, pt, steps):
    x = pygen.sample(_sample_model(pt), (N, 2), sampler=sampler, steps=steps, schedule=SCHED, prediction_type=pt,
                     seed=SEED, progress=False)
    assert_matches(x, reference("clot"), label=f"pygen.sample[{sampler},{pt}]")


@pytest.mark.parametrize("sampler", ["pc", "ode_heun", "mala"])
def test_pygen_sample_sde_mcmc(sampler):
    if sampler == "mala":
        x = pygen.sample(TRIO.model_fn("energy"), (N, 2), sampler="mala", steps=600, prediction_type="energy",
                         seed=SEED, progress=False, step_size=0.1)
        assert_matches(x, reference("trio"), label="pygen.sample[mala]")
        return
    sde = make_sde("ve")
    x = pygen.sample(CLOT.model_fn("score", sde=sde), (N, 2), sampler=sampler, steps=SDE_STEPS, schedule=sde,
                     prediction_type="score", seed=SEED, progress=False)
    assert_matches(x, reference("clot"), label=f"pygen.sample[{sampler}]")


# ---------------------------------------------------------------------------
# negative controls: wrong samplers must FAIL the same thresholds
# ---------------------------------------------------------------------------
def test_thresholds_are_meaningful():
    """The calibrated thresholds are small against the target's scale (clot std ~1.9 per axis)."""
    ref = reference("clot")
    assert SLACK * ref.sw_null < 0.4
    assert SLACK * ref.mw_null < 0.05
    # an exact sample is well inside, a shifted exact sample is not
    fresh = CLOT.sample(N, torch.Generator().manual_seed(3))
    assert not failures(fresh, ref, label="exact")
    assert "sliced_w2" in failures(fresh + torch.tensor([0.5, 0.0], dtype=fresh.dtype), ref, label="exact+0.5")


def test_control_too_few_steps_fails():
    x = run_kdiffusion("sample_euler", 8, {})
    bad = failures(x, reference("clot"), label="control euler 8 steps")
    assert "mode_weights" in bad and "sliced_w2" in bad


def test_control_small_sigma_max_fails():
    """Starting at sigma_max = 1 from N(0, 1) ignores most of the clot's spread."""
    x = run_kdiffusion("sample_dpmpp_2m", 50, {}, sigma_max=1.0)
    assert "sliced_w2" in failures(x, reference("clot"), label="control sigma_max=1")


def test_control_shifted_model_fails():
    """The denoiser of the clot moved by 0.5 (about one component std) along x."""
    shifted = models.GaussianMixture(CLOT.means + torch.tensor([0.5, 0.0], dtype=torch.float64), CLOT.stds,
                                     CLOT.weights)
    for fn_name in ("sample_dpmpp_2m", "sample_euler_ancestral"):
        x = run_kdiffusion(fn_name, 50, {}, model=shifted.model_fn("denoiser"))
        assert "sliced_w2" in failures(x, reference("clot"), label=f"control shifted {fn_name}")
    x = run_kdiffusion("sample_dpmpp_2m", 50, {}, model=shifted.model_fn("denoiser"), n=N_SMALL)
    assert "mmd2" in failures(x, reference("clot", N_SMALL, mmd=True), mmd=True, label="control shifted mmd")


def test_control_sde_discretisation_mismatch_fails():
    """reverse_diffusion with the SDE's N = 1000 but a 100-step loop: each step moves 1/10 of the way."""
    sde = schedules.VPSDE(0.1, 20.0, N=1000)
    x = S.pc_sample(CLOT.model_fn("score", sde=sde), sde, (N, 2), predictor="reverse_diffusion",
                    corrector="none", n_steps=100, seed=SEED)
    bad = failures(x, reference("clot"), label="control pc N mismatch")
    assert "sliced_w2" in bad and "mode_weights" in bad


def test_control_ula_large_step_fails():
    """ULA's O(dt) bias is detected: dt = 0.5 inflates TRIO's component variances ~1.5-2x."""
    x = mcmc.ula(overdispersed(), score_fn=TRIO.model_fn("grad_log_prob"), step_size=0.5, n_steps=300, seed=SEED)
    assert "sliced_w2" in failures(x, reference("trio"), label="control ula dt=0.5")


def test_control_mala_without_tempering_fails():
    """MALA (exact kernel) started in one mode of the clot cannot reach the other modes in 200 steps."""
    x0 = torch.tensor([3.0, 0.2]).repeat(N_SMALL, 1)
    x, _ = mcmc.mala(x0, CLOT.model_fn("energy"), step_size=0.06, n_steps=200, seed=SEED)
    bad = failures(x, reference("clot", N_SMALL, mmd=True), mmd=True, label="control mala one mode")
    assert "mode_weights" in bad and "sliced_w2" in bad and "mmd2" in bad
