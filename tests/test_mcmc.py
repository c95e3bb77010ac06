"""Tests of the "mcmc" family: the fused ops pygen.leapfrog_ / pygen.mh_select_ (pygen/ops/mcmc.py;
ops pygen::leapfrog_, pygen::mh_select_) on the torch, cpu and triton backends, and the samplers
in pygen/mcmc.py (ula, mala, hmc, replica_exchange).

Op values are checked against float64 formulas written here. Sampler statistics use targets
defined here (a correlated 2-D Gaussian, a 1-D standard normal, a well-separated 2-mode
mixture) with tolerances derived from the sample size (a few standard errors). Triton runs
under TRITON_INTERPRET=1 with small sizes.
"""
import importlib.util
import math
import os

import pytest
import torch

import pygen
from conftest import ALL_BACKENDS as BACKENDS
from conftest import MANTISSA_BITS, device_for, make
from pygen import mcmc
from pygen.ops._common import to_signed64
from pygen.ops.mcmc import leapfrog_, mh_select_
from pygen.ops.random import randn_reference

HAS_TRITON = importlib.util.find_spec("triton") is not None
TRITON_OK = HAS_TRITON and (os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available())
HAS_CPU = pygen.backends()["cpu"] == "available"

SHAPES = [(3, 5, 7), (2, 1001), (1, 4), (5, 3)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def assert_close_storage(out, exp, dtype):
    """fp32 rtol 1e-5; fp64 1e-12; fp16/bf16 one ulp of the storage type (exp in float64)."""
    assert out.dtype == dtype and out.shape == exp.shape
    out, exp = out.double().cpu(), exp.cpu()
    assert torch.isfinite(out).all()
    if dtype in MANTISSA_BITS:
        exp_rounded = exp.to(dtype).double()
        ulp = torch.ldexp(torch.ones_like(exp), torch.frexp(exp_rounded)[1] - 1 - MANTISSA_BITS[dtype])
        ulp = ulp.clamp(min=torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps)  # subnormal spacing
        err = (out - exp_rounded).abs()
        assert bool((err <= ulp).all()), f"max err over 1 ulp: {(err - ulp).max().item()}"
    else:
        rtol = 1e-12 if dtype == torch.float64 else 1e-5
        torch.testing.assert_close(out, exp, rtol=rtol, atol=1e-7)


def rows(t, ndim):
    return t.reshape((-1,) + (1,) * (ndim - 1))


# ---------------------------------------------------------------------------
# leapfrog_
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("per_row", [False, True], ids=["scalar_step", "row_steps"])
def test_leapfrog_matches_formula(backend, shape, dtype, per_row):
    dev = device_for(backend)
    x0, p0, g = (make(shape, dtype, dev, seed=s) for s in (1, 2, 3))
    if per_row:
        steps = torch.linspace(0.05, 0.9, shape[0], dtype=torch.float64)
        step_arg = steps.to(torch.float64 if dtype == torch.float64 else torch.float32).to(dev)
        dt = rows(step_arg.double().cpu(), len(shape))
    else:
        step_arg = dt = 0.37
    kick, drift = 0.5, 1.0 / 3.0
    x, p = x0.clone(), p0.clone()
    with pygen.use_backend(backend):
        out = leapfrog_(x, p, g, step_arg, kick=kick, drift=drift)
    assert out[0] is x and out[1] is p
    p_exp = p0.double().cpu() - kick * dt * g.double().cpu()
    x_exp = x0.double().cpu() + drift * dt * p_exp
    assert_close_storage(p, p_exp, dtype)
    assert_close_storage(x, x_exp, dtype)
    # drift == 0: momentum only, x untouched bit for bit
    x, p = x0.clone(), p0.clone()
    with pygen.use_backend(backend):
        leapfrog_(x, p, g, step_arg, kick=1.0, drift=0.0)
    assert torch.equal(x, x0)
    assert_close_storage(p, p0.double().cpu() - dt * g.double().cpu(), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_leapfrog_nan_propagates_and_zero_step(backend):
    dev = device_for(backend)
    x, p, g = (make((4, 6), torch.float32, dev, seed=s) for s in (4, 5, 6))
    g[1, 2] = float("nan")
    p[2, 0] = float("nan")
    steps = torch.tensor([0.0, 0.1, 0.2, 0.3], device=dev)
    x0, p0 = x.clone(), p.clone()
    with pygen.use_backend(backend):
        leapfrog_(x, p, g, steps)
    assert torch.isnan(p[1, 2]) and torch.isnan(x[1, 2]) and torch.isnan(p[2, 0]) and torch.isnan(x[2, 0])
    assert torch.isnan(p).sum() == 2 and torch.isnan(x).sum() == 2
    assert torch.equal(x[0], x0[0]) and torch.equal(p[0], p0[0])  # a zero step changes nothing


@pytest.mark.parametrize("backend", BACKENDS)
def test_leapfrog_trajectory_conserves_energy(backend):
    """A full leapfrog trajectory on a harmonic oscillator (E = |x|²/2) conserves H to O(dt²)
    and is time reversible."""
    dev = device_for(backend)
    x0 = make((3, 8), torch.float64, dev, seed=7)
    p0 = make((3, 8), torch.float64, dev, seed=8)
    x, p = x0.clone(), p0.clone()
    dt, n = 0.05, 40
    with pygen.use_backend(backend):
        leapfrog_(x, p, x.clone(), dt, kick=0.5, drift=1.0)
        for _ in range(n - 1):
            leapfrog_(x, p, x.clone(), dt, kick=1.0, drift=1.0)
        leapfrog_(x, p, x.clone(), dt, kick=0.5, drift=0.0)
    h0 = 0.5 * (x0.square() + p0.square()).sum(1)
    h1 = 0.5 * (x.square() + p.square()).sum(1)
    assert ((h1 - h0).abs() < 1e-3 * h0).all()
    # the exact flow rotates (x, p) by angle n·dt
    t = n * dt
    torch.testing.assert_close(x, x0 * math.cos(t) + p0 * math.sin(t), rtol=0, atol=5e-3)
    # reversibility: flip momentum, integrate back
    p.neg_()
    with pygen.use_backend(backend):
        leapfrog_(x, p, x.clone(), dt, kick=0.5, drift=1.0)
        for _ in range(n - 1):
            leapfrog_(x, p, x.clone(), dt, kick=1.0, drift=1.0)
        leapfrog_(x, p, x.clone(), dt, kick=0.5, drift=0.0)
    torch.testing.assert_close(x, x0, rtol=0, atol=1e-12)
    torch.testing.assert_close(-p, p0, rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------
# mh_select_
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(3, 5, 7), (2, 1001), (6, 0), (9,)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("log_dtype", [torch.float32, torch.float64])
def test_mh_select_matches_formula(backend, shape, dtype, log_dtype):
    dev = device_for(backend)
    n = shape[0]
    x0, xp = make(shape, dtype, dev, seed=9), make(shape, dtype, dev, seed=10)
    log_accept = make((n,), log_dtype, dev, seed=11)
    log_u = make((n,), log_dtype, dev, seed=12)
    log_accept[0] = math.inf  # always accept
    if n > 1:
        log_accept[1] = -math.inf  # never accept
    x = x0.clone()
    accepted = torch.full((n,), 7.0, dtype=log_dtype, device=dev)
    with pygen.use_backend(backend):
        res = mh_select_(x, xp, log_accept, log_u, accepted)
    assert res is accepted
    take = (log_u < log_accept).cpu()
    assert torch.equal(accepted.cpu(), take.to(log_dtype))
    assert take[0] and (n == 1 or not take[1])
    exp = torch.where(rows(take, len(shape)), xp.cpu(), x0.cpu())
    assert torch.equal(x.cpu(), exp)  # a copy: bit for bit
    # accepted allocated when not given
    with pygen.use_backend(backend):
        acc2 = mh_select_(x0.clone(), xp, log_accept, log_u)
    assert torch.equal(acc2, accepted)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mh_select_nan_propagates(backend, dtype):
    """NaN log_accept/log_u is neither accept nor reject: the row and its flag become NaN;
    NaN inside x_prop is copied when accepted, NaN inside x stays when rejected."""
    dev = device_for(backend)
    x0, xp = make((5, 7), dtype, dev, seed=13), make((5, 7), dtype, dev, seed=14)
    x0[3, 1] = float("nan")
    xp[4, 2] = float("nan")
    log_accept = torch.tensor([float("nan"), 0.0, 0.0, -math.inf, math.inf], device=dev)
    log_u = torch.tensor([-1.0, float("nan"), -1.0, -1.0, -1.0], device=dev)
    x = x0.clone()
    with pygen.use_backend(backend):
        acc = mh_select_(x, xp, log_accept, log_u)
    assert torch.isnan(acc[:2]).all() and acc[2:].tolist() == [1.0, 0.0, 1.0]
    assert torch.isnan(x[:2]).all()
    assert torch.equal(x[2], xp[2])
    assert torch.isnan(x[3, 1]) and torch.isnan(x[4, 2]) and torch.isnan(x[2:]).sum() == 2


# ---------------------------------------------------------------------------
# registration, opcheck, bad input
# ---------------------------------------------------------------------------
def _op_samples(dtype=torch.float32):
    x, p, g = (make((3, 5), dtype, seed=s) for s in (15, 16, 17))
    steps = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float32)
    la, lu = make((3,), torch.float32, seed=18), make((3,), torch.float32, seed=19)
    return x, p, g, steps, la, lu


@pytest.mark.parametrize("variant", ["compiled", "triton"])
def test_opcheck(variant):
    if variant == "triton":
        if not TRITON_OK or os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("Triton opcheck on CPU tensors needs TRITON_INTERPRET=1")
        from pygen.ops._registry import TRITON_OPS

        lf = getattr(torch.ops.pygen, TRITON_OPS["leapfrog_"].split("::")[1])
        ms = getattr(torch.ops.pygen, TRITON_OPS["mh_select_"].split("::")[1])
    else:
        lf, ms = torch.ops.pygen.leapfrog_, torch.ops.pygen.mh_select_
    for dtype in (torch.float32, torch.float64):
        x, p, g, steps, la, lu = _op_samples(dtype)
        torch.library.opcheck(lf, (x, p, g, None, 0.3, 0.5, 2.0))
        torch.library.opcheck(lf, (x, p, g, steps, 0.0, 1.0, 0.0))
        torch.library.opcheck(ms, (x, p, la, lu, torch.empty(3)))


def test_ops_registered():
    for name in ("leapfrog_", "mh_select_"):
        op = getattr(torch.ops.pygen, name).default
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"pygen::{name}", "Meta")
        if HAS_CPU:
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"pygen::{name}", "CPU")
        assert op._schema.arguments[0].alias_info.is_write


def test_ops_bad_input():
    x, p, g, steps, la, lu = _op_samples()
    with pytest.raises(ValueError, match="p must have the shape"):
        leapfrog_(x, p[:2], g, 0.1)
    with pytest.raises(TypeError, match="grad must have the dtype"):
        leapfrog_(x, p, g.double(), 0.1)
    with pytest.raises(ValueError, match="step_size must be a finite non-negative"):
        leapfrog_(x, p, g, -0.1)
    with pytest.raises(ValueError, match="step_size tensor must be 1-D"):
        leapfrog_(x, p, g, steps[:2])
    with pytest.raises(ValueError, match="step_size must be non-negative"):
        leapfrog_(x, p, g, -steps)
    with pytest.raises(ValueError, match="x is updated in place and must be contiguous"):
        leapfrog_(x.t(), p.t(), g.t(), 0.1)
    with pytest.raises(ValueError, match="kick must be finite"):
        leapfrog_(x, p, g, 0.1, kick=math.nan)
    with pytest.raises(ValueError, match="at least 1 dimension"):
        leapfrog_(x[0, 0], p[0, 0], g[0, 0], 0.1)
    with pytest.raises(ValueError, match="log_accept must be 1-D"):
        mh_select_(x, p, la[:2], lu)
    with pytest.raises(TypeError, match="log_u must have the dtype"):
        mh_select_(x, p, la, lu.double())
    with pytest.raises(TypeError, match="log_accept must have dtype"):
        mh_select_(x, p, la.half(), lu.half())
    with pytest.raises(ValueError, match="x_prop must have the shape"):
        mh_select_(x, p[:, :2], la, lu)
    # the compiled ops check too (RuntimeError naming the argument)
    if HAS_CPU:
        with pytest.raises(RuntimeError, match="step_sizes"):
            torch.ops.pygen.leapfrog_(x, p, g, steps[:2], 0.0, 1.0, 1.0)
        with pytest.raises(RuntimeError, match="accepted"):
            torch.ops.pygen.mh_select_(x, p, la, lu, torch.empty(2))


# ---------------------------------------------------------------------------
# targets for the samplers
# ---------------------------------------------------------------------------
MU = torch.tensor([1.0, -2.0])
COV = torch.tensor([[1.0, 0.6], [0.6, 2.0]])
PREC = torch.linalg.inv(COV)


def gauss_energy(x):
    d = x - MU.to(x)
    return 0.5 * ((d @ PREC.to(x)) * d).sum(1)


def gauss_score(x):
    return -(x - MU.to(x)) @ PREC.to(x)


def std_normal_energy(x):
    return 0.5 * x.reshape(x.shape[0], -1).square().sum(1)


MIX_W = torch.tensor([0.25, 0.75])
MIX_MU = torch.tensor([[-2.5, 0.0], [2.5, 0.0]])
MIX_SIG = 0.5


def mix_log_density(x):
    d2 = ((x[:, None, :] - MIX_MU.to(x)) ** 2).sum(-1)
    return torch.logsumexp(torch.log(MIX_W.to(x)) - d2 / (2 * MIX_SIG**2), dim=1) - math.log(2 * math.pi * MIX_SIG**2)


def mix_energy_tempered(x):
    """E with exp(-E)·N(0, I) ∝ the mixture (replica_exchange's β = 1 target)."""
    return -mix_log_density(x) - 0.5 * x.square().sum(1)


def check_mean_cov(xs, mu, cov, k=5.0):
    """Sample mean and covariance within k standard errors (n independent chains)."""
    n = xs.shape[0]
    xs = xs.double()
    mean, c = xs.mean(0), torch.cov(xs.T)
    var = torch.diag(cov).double()
    se_mean = (var / n).sqrt()
    se_cov = ((var[:, None] * var[None, :] + cov.double() ** 2) / n).sqrt()
    assert ((mean - mu.double()).abs() <= k * se_mean).all(), (mean, mu)
    assert ((c - cov.double()).abs() <= k * se_cov).all(), (c, cov)


# ---------------------------------------------------------------------------
# sampler statistics
# ---------------------------------------------------------------------------
N_CHAINS = 3000


def test_ula_gaussian_mean_cov():
    x0 = torch.zeros(N_CHAINS, 2)
    xs = mcmc.ula(x0, gauss_score, step_size=0.05, n_steps=500, seed=1)
    # ULA's O(dt) bias here is < 2% of the covariance (< 0.02), well below 5 standard errors
    check_mean_cov(xs, MU, COV)
    # energy_fn (autograd) gives the same chain as the analytic score
    xe = mcmc.ula(x0[:64], energy_fn=gauss_energy, step_size=0.02, n_steps=50, seed=1)
    xa = mcmc.ula(x0[:64], gauss_score, step_size=0.02, n_steps=50, seed=1)
    torch.testing.assert_close(xe, xa, rtol=1e-5, atol=1e-5)


def test_mala_gaussian_mean_cov():
    x0 = torch.zeros(N_CHAINS, 2)
    xs, rate = mcmc.mala(x0, gauss_energy, step_size=0.4, n_steps=150, seed=2)
    check_mean_cov(xs, MU, COV)
    assert rate.shape == (N_CHAINS,) and ((rate > 0) & (rate <= 1)).all()


def test_hmc_gaussian_mean_cov():
    x0 = torch.zeros(N_CHAINS, 2)
    xs, rate = mcmc.hmc(x0, gauss_energy, step_size=0.3, n_leapfrog=3, n_steps=60, seed=3)
    check_mean_cov(xs, MU, COV)
    assert rate.shape == (N_CHAINS,) and ((rate > 0) & (rate <= 1)).all()
    # a mass rescales the dynamics but not the target
    xs, rate = mcmc.hmc(x0, gauss_energy, step_size=0.6, n_leapfrog=3, n_steps=60, seed=3, mass=4.0)
    check_mean_cov(xs, MU, COV)


def test_exact_with_large_step():
    """Detailed balance: with a step where ULA is visibly biased (variance 1/(1 - dt/4) = 1.6 on N(0, 1)),
    MALA and HMC still sample variance 1; started from exact samples they stay there."""
    n = 4000
    x0 = torch.randn(n, 1, generator=torch.Generator().manual_seed(5))
    se_var = math.sqrt(2.0 / n)
    dt = 1.5
    x_ula = mcmc.ula(x0, energy_fn=std_normal_energy, step_size=dt, n_steps=60, seed=6)
    assert x_ula.var() > 1.0 + 8 * se_var  # the check below can fail
    x_mala, rate_mala = mcmc.mala(x0, std_normal_energy, step_size=dt, n_steps=60, seed=6)
    x_hmc, rate_hmc = mcmc.hmc(x0 * 3.0, std_normal_energy, step_size=1.2, n_leapfrog=2, n_steps=40, seed=6)
    for xs in (x_mala, x_hmc):
        assert abs(xs.var().item() - 1.0) < 5 * se_var
        assert abs(xs.mean().item()) < 5 / math.sqrt(n)
    assert 0.3 < rate_mala.mean() < 1.0 and 0.3 < rate_hmc.mean() < 1.0


@pytest.mark.parametrize("sampler", ["mala", "hmc"])
def test_acceptance_lower_for_larger_steps(sampler):
    """Per-chain steps: half the chains take a small step, half a large one, in one batch."""
    n = 400
    x0 = torch.randn(n, 2, generator=torch.Generator().manual_seed(7)) + MU
    small, large = (0.1, 1.5) if sampler == "mala" else (0.2, 1.3)
    steps = torch.tensor([small] * (n // 2) + [large] * (n // 2))
    if sampler == "mala":
        _, rate = mcmc.mala(x0, gauss_energy, step_size=steps, n_steps=30, seed=8)
    else:
        _, rate = mcmc.hmc(x0, gauss_energy, step_size=steps, n_leapfrog=3, n_steps=30, seed=8)
    assert ((rate >= 0) & (rate <= 1)).all()
    assert ((rate[: n // 2] > 0) & (rate[: n // 2] <= 1)).all()  # small steps: every chain in (0, 1]
    assert rate[: n // 2].mean() > rate[n // 2:].mean() + 0.1


def test_replica_exchange_recovers_mode_weights():
    """All chains start in the light mode (weight 0.25) of a 2-mode mixture separated by 10σ:
    ULA at β = 1 never leaves it; parallel tempering recovers the weights 0.25 / 0.75."""
    chains = 500
    x0 = MIX_MU[0].repeat(chains, 1)
    x_ula = mcmc.ula(x0, energy_fn=lambda x: -mix_log_density(x), step_size=0.05, n_steps=800, seed=9)
    assert (x_ula[:, 0] < 0).all()
    betas = (torch.linspace(0, 1, 8) ** 2).tolist()
    xs, rates = mcmc.replica_exchange(x0, mix_energy_tempered, betas, step_size=0.05, n_steps=800, seed=9)
    assert xs.shape == x0.shape and rates.shape == (7,)
    assert ((rates > 0) & (rates <= 1)).all()
    w_right = (xs[:, 0] > 0).double().mean().item()
    se = math.sqrt(0.25 * 0.75 / chains)
    assert abs(w_right - 0.75) < 4 * se
    # within-mode spread ~ σ (ULA at dt = 0.05 inflates the variance by ~5%)
    near = xs - MIX_MU[(xs[:, 0] > 0).long()]
    assert abs(near.square().mean().sqrt().item() - MIX_SIG) < 0.05


def test_replica_exchange_mala_and_ladder_order():
    """MALA moves; a descending ladder gives the same chains with the swap rates reversed;
    the β = 0 replica samples N(0, I)."""
    chains = 300
    x0 = MIX_MU[0].repeat(chains, 1)
    betas = (torch.linspace(0, 1, 6) ** 2).tolist()
    steps = torch.tensor([0.3, 0.3, 0.2, 0.1, 0.1, 0.05])
    seen = {}

    def cb(d):
        seen["x"], seen["i"] = d["x"], d["i"]
        if d["swapped"] is not None:
            seen["n_swaps"] = seen.get("n_swaps", 0) + 1

    up, r_up = mcmc.replica_exchange(x0, mix_energy_tempered, betas, step_size=steps, n_steps=300, swap_every=2,
                                     seed=10, move="mala", callback=cb)
    down, r_down = mcmc.replica_exchange(x0, mix_energy_tempered, betas[::-1], step_size=steps.flip(0), n_steps=300,
                                         swap_every=2, seed=10, move="mala")
    assert torch.equal(up, down) and torch.equal(r_up, r_down.flip(0))
    assert seen["i"] == 299 and seen["n_swaps"] == 150 and seen["x"].shape == (6, chains, 2)
    assert torch.equal(seen["x"][-1], up)
    check_mean_cov(seen["x"][0], torch.zeros(2), torch.eye(2))
    assert ((r_up > 0) & (r_up <= 1)).all()
    w_right = (up[:, 0] > 0).double().mean().item()
    assert abs(w_right - 0.75) < 4 * math.sqrt(0.25 * 0.75 / chains) + 0.03


# ---------------------------------------------------------------------------
# reproducibility, backends, RNG state, batch independence, no host sync
# ---------------------------------------------------------------------------
def _run(name, backend=None, seed=11, chains=32, n_steps=12, **kw):
    x0 = torch.randn(chains, 2, generator=torch.Generator().manual_seed(12))
    ctx = pygen.use_backend(backend) if backend else torch.no_grad()
    with ctx:
        if name == "ula":
            return (mcmc.ula(x0, gauss_score, step_size=0.1, n_steps=n_steps, seed=seed, **kw),)
        if name == "mala":
            return mcmc.mala(x0, gauss_energy, step_size=0.8, n_steps=n_steps, seed=seed, **kw)
        if name == "hmc":
            return mcmc.hmc(x0, gauss_energy, step_size=0.4, n_leapfrog=3, n_steps=n_steps, seed=seed, **kw)
        return mcmc.replica_exchange(x0, mix_energy_tempered, [0.0, 0.3, 1.0], step_size=0.1, n_steps=n_steps,
                                     seed=seed, move="mala", **kw)


SAMPLERS = ["ula", "mala", "hmc", "replica_exchange"]


@pytest.mark.parametrize("name", SAMPLERS)
def test_reproducible_and_no_global_rng(name):
    state = torch.get_rng_state()
    torch.manual_seed(0)
    a = _run(name)
    torch.manual_seed(1)
    b = _run(name)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    c = _run(name, seed=12)
    assert not torch.equal(a[0], c[0])
    d = _run(name, stream=5)
    assert not torch.equal(a[0], d[0])
    torch.manual_seed(1)
    e = torch.rand(3)
    torch.manual_seed(1)
    _run(name)
    assert torch.equal(torch.rand(3), e)  # the global generator was neither read nor advanced
    torch.set_rng_state(state)


@pytest.mark.parametrize("backend", [
    pytest.param("cpu", marks=pytest.mark.skipif(not HAS_CPU, reason="pygen._C not built")),
    pytest.param("triton", marks=pytest.mark.skipif(not TRITON_OK or os.environ.get("TRITON_INTERPRET") != "1",
                                                    reason="needs TRITON_INTERPRET=1")),
])
@pytest.mark.parametrize("name", SAMPLERS)
def test_backend_independent(backend, name):
    """Same chains (and accept decisions) on the torch reference and the compiled/Triton ops."""
    n_steps = 12 if backend == "cpu" else 4
    ref = _run(name, "torch", n_steps=n_steps)
    out = _run(name, backend, n_steps=n_steps)
    for r, o in zip(ref, out):
        torch.testing.assert_close(o, r, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("name", ["ula", "mala", "hmc"])
def test_per_chain_seeds_batch_independent(name):
    """With one seed per chain, a chain's result does not depend on the batch it is in."""
    x0 = torch.randn(6, 3, generator=torch.Generator().manual_seed(13))
    seeds = torch.tensor([5, 3, 9, 1, -(2**63), 7], dtype=torch.int64)
    steps = torch.linspace(0.1, 0.6, 6)

    def run(sl):
        if name == "ula":
            return (mcmc.ula(x0[sl], energy_fn=std_normal_energy, step_size=steps[sl], n_steps=8, seed=seeds[sl]),)
        if name == "mala":
            return mcmc.mala(x0[sl], std_normal_energy, step_size=steps[sl], n_steps=8, seed=seeds[sl])
        return mcmc.hmc(x0[sl], std_normal_energy, step_size=steps[sl], n_leapfrog=2, n_steps=8, seed=seeds[sl])

    full, head, tail = run(slice(None)), run(slice(0, 2)), run(slice(2, None))
    for f, h, t in zip(full, head, tail):
        torch.testing.assert_close(f, torch.cat([h, t]), rtol=1e-6, atol=1e-6)


def test_documented_noise_streams():
    """MALA step 0 is reproducible by hand from the documented streams and the torch formulas."""
    x0 = torch.randn(5, 2, generator=torch.Generator().manual_seed(14))
    dt, seed, stream = 0.7, 21, 2**64 - 1
    xs, rate = mcmc.mala(x0, gauss_energy, step_size=dt, n_steps=1, seed=seed, stream=stream)
    z = randn_reference(x0.shape, seed, to_signed64(stream))
    xp = x0 + 0.5 * dt * gauss_score(x0) + math.sqrt(dt) * z
    fwd = (xp - x0 - 0.5 * dt * gauss_score(x0)).square().sum(1)
    rev = (x0 - xp - 0.5 * dt * gauss_score(xp)).square().sum(1)
    log_accept = gauss_energy(x0) - gauss_energy(xp) + (fwd - rev) / (2 * dt)
    zu = randn_reference((5,), seed, to_signed64(stream + 2**62))
    take = torch.special.log_ndtr(zu) < log_accept
    assert 0 < take.sum() < 5  # both branches exercised
    torch.testing.assert_close(xs, torch.where(take[:, None], xp, x0), rtol=1e-5, atol=1e-6)
    assert torch.equal(rate, take.float())
    assert mcmc.noise_stream(stream, 0, mcmc.LANE_ACCEPT) == to_signed64(stream + 2**62)


def test_no_host_sync_in_step_loop(monkeypatch):
    """The step loops never pull a tensor value to the host (.item(), bool(), float(), tolist())."""
    calls = []

    def forbid(name):
        def f(self, *a, **k):
            calls.append(name)
            raise AssertionError(f"host sync: Tensor.{name} in the step loop")
        return f

    for name in ("item", "__bool__", "__float__", "__int__", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, forbid(name))
    for name in SAMPLERS:
        _run(name, n_steps=4)
    monkeypatch.undo()
    assert not calls


def test_input_not_modified_and_dtypes():
    x0 = torch.randn(8, 2, generator=torch.Generator().manual_seed(15))
    keep = x0.clone()
    for dtype in (torch.float64, torch.bfloat16):
        xs, rate = mcmc.hmc(x0.to(dtype), std_normal_energy, step_size=0.3, n_leapfrog=2, n_steps=3, seed=1)
        assert xs.dtype == dtype and rate.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        assert torch.isfinite(xs.float()).all()
    assert torch.equal(x0, keep)


# ---------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------
def test_sampler_bad_input():
    x = torch.zeros(4, 2)
    with pytest.raises(ValueError, match="n_steps"):
        mcmc.ula(x, gauss_score, step_size=0.1, n_steps=0, seed=1)
    with pytest.raises(TypeError, match="n_steps"):
        mcmc.mala(x, gauss_energy, step_size=0.1, n_steps=2.5, seed=1)
    with pytest.raises(ValueError, match="step_size"):
        mcmc.ula(x, gauss_score, step_size=-0.1, n_steps=1, seed=1)
    with pytest.raises(ValueError, match="step_size"):
        mcmc.mala(x, gauss_energy, step_size=0.0, n_steps=1, seed=1)
    with pytest.raises(ValueError, match="step_size"):
        mcmc.hmc(x, gauss_energy, step_size=torch.tensor([0.1, -0.1, 0.1, 0.1]), n_leapfrog=1, n_steps=1, seed=1)
    with pytest.raises(ValueError, match="step_size"):
        mcmc.mala(x, gauss_energy, step_size=torch.tensor([0.1, 0.1]), n_steps=1, seed=1)
    with pytest.raises(ValueError, match="n_leapfrog"):
        mcmc.hmc(x, gauss_energy, step_size=0.1, n_leapfrog=0, n_steps=1, seed=1)
    with pytest.raises(ValueError, match="mass"):
        mcmc.hmc(x, gauss_energy, step_size=0.1, n_leapfrog=1, n_steps=1, seed=1, mass=0.0)
    with pytest.raises(ValueError, match="seed"):
        mcmc.ula(x, gauss_score, step_size=0.1, n_steps=1, seed=torch.tensor([1, 2], dtype=torch.int64))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        mcmc.ula([0.0, 1.0], gauss_score, step_size=0.1, n_steps=1, seed=1)
    with pytest.raises(ValueError, match="exactly one of score_fn and energy_fn"):
        mcmc.ula(x, step_size=0.1, n_steps=1, seed=1)
    with pytest.raises(ValueError, match="score_fn must return"):
        mcmc.ula(x, lambda t: t[:, :1], step_size=0.1, n_steps=1, seed=1)
    with pytest.raises(TypeError, match="score_fn must return"):
        mcmc.ula(x, lambda t: t.double(), step_size=0.1, n_steps=1, seed=1)
    with pytest.raises(ValueError, match="energy_fn must return one energy per chain"):
        mcmc.mala(x, lambda t: t.sum(), step_size=0.1, n_steps=1, seed=1)
    with pytest.raises(ValueError, match="energy_fn must return one energy per chain"):
        mcmc.hmc(x, lambda t: t, step_size=0.1, n_leapfrog=1, n_steps=1, seed=1)
    re = dict(step_size=0.1, n_steps=2, seed=1)
    for bad in ([0.0, 1.5], [-0.1, 1.0], [0.0, 0.5, 0.3, 1.0], [0.5, 0.5], [1.0], [0.0, math.nan]):
        with pytest.raises(ValueError, match="betas"):
            mcmc.replica_exchange(x, mix_energy_tempered, bad, **re)
    with pytest.raises(ValueError, match="betas"):
        mcmc.replica_exchange(x, mix_energy_tempered, torch.tensor([0.0, 2.0]), **re)
    with pytest.raises(ValueError, match="move"):
        mcmc.replica_exchange(x, mix_energy_tempered, [0.0, 1.0], move="hmc", **re)
    with pytest.raises(ValueError, match="swap_every"):
        mcmc.replica_exchange(x, mix_energy_tempered, [0.0, 1.0], swap_every=0, **re)
    with pytest.raises(ValueError, match="step_size"):
        mcmc.replica_exchange(x, mix_energy_tempered, [0.0, 1.0], step_size=torch.tensor([0.1, 0.1, 0.1]),
                              n_steps=2, seed=1)
    with pytest.raises(TypeError, match="seed"):
        mcmc.replica_exchange(x, mix_energy_tempered, [0.0, 1.0], step_size=0.1, n_steps=2,
                              seed=torch.arange(4))
