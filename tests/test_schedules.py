"""Tests for pygen.schedules (the math layer: beta/sigma/log-SNR schedules,
timestep spacings, continuous SDEs, NoiseSchedule).

References: diffusers (test dependency; run in float64 through a shim that
swaps float32 for float64 inside one scheduler module), k-diffusion's
get_sigmas_* and DiscreteSchedule (loaded from its installed files without its
heavy package __init__; skipped if k-diffusion is not installed), and closed
forms from Song et al. (2021) / Karras et al. (2022).
"""
import contextlib
import importlib
import importlib.util
import math
import sys
import types

import numpy as np
import pytest
import torch

from pygen import schedules as S

pytestmark = pytest.mark.filterwarnings(
    # emitted by diffusers' np.array(tensor) calls under numpy 2, not by pygen
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"
)

F64 = torch.float64
# Requirement: float64 schedules match the references to 1e-6 (relative; atol only
# absorbs exact zeros such as an appended final sigma).
RTOL, ATOL = 1e-6, 1e-12


def close(actual, expected, rtol=RTOL, atol=ATOL):
    actual = actual if isinstance(actual, torch.Tensor) else torch.as_tensor(actual, dtype=F64)
    expected = expected if isinstance(expected, torch.Tensor) else torch.as_tensor(expected, dtype=F64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    torch.testing.assert_close(actual.to(F64), expected.to(F64), rtol=rtol, atol=atol)


# ---------------------------------------------------------------------------
# diffusers in float64
# ---------------------------------------------------------------------------
class _Float64Proxy:
    """Stands in for ``torch``/``numpy`` inside one diffusers module: ``float32`` means float64."""

    def __init__(self, module):
        self._module = module

    def __getattr__(self, name):
        return getattr(self._module, "float64" if name == "float32" else name)


@contextlib.contextmanager
def diffusers_float64(module_name):
    """Run the scheduler module ``diffusers.schedulers.<module_name>`` in float64."""
    pytest.importorskip("diffusers")
    module = importlib.import_module(f"diffusers.schedulers.{module_name}")
    saved = module.torch, module.np, torch.get_default_dtype()
    module.torch, module.np = _Float64Proxy(torch), _Float64Proxy(np)
    torch.set_default_dtype(F64)
    try:
        yield module
    finally:
        module.torch, module.np = saved[0], saved[1]
        torch.set_default_dtype(saved[2])


def ddpm64(**config):
    with diffusers_float64("scheduling_ddpm") as m:
        sched = m.DDPMScheduler(**config)
    assert sched.betas.dtype == F64  # the shim took effect
    return sched


# ---------------------------------------------------------------------------
# k-diffusion (sampling.py + external.py only)
# ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def kdiff():
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("k-diffusion is not installed (pip install k-diffusion --no-deps)")
    for dep in ("scipy", "torchdiffeq", "torchsde", "tqdm"):
        pytest.importorskip(dep)
    pkg_dir = spec.submodule_search_locations[0]
    name = "_pygen_test_k_diffusion"
    if name + ".external" not in sys.modules:
        pkg = types.ModuleType(name)
        pkg.__path__ = [pkg_dir]
        sys.modules[name] = pkg
        # k_diffusion.utils imports PIL/safetensors/torchvision; the schedule
        # functions tested here do not use it.
        utils = types.ModuleType(name + ".utils")
        sys.modules[name + ".utils"] = utils
        pkg.utils = utils
        for sub in ("sampling", "external"):
            sub_spec = importlib.util.spec_from_file_location(f"{name}.{sub}", f"{pkg_dir}/{sub}.py")
            module = importlib.util.module_from_spec(sub_spec)
            sys.modules[f"{name}.{sub}"] = module
            sub_spec.loader.exec_module(module)
            setattr(pkg, sub, module)
    return types.SimpleNamespace(sampling=sys.modules[name + ".sampling"], external=sys.modules[name + ".external"])


@contextlib.contextmanager
def default_float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(F64)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


# ===========================================================================
# beta schedules
# ===========================================================================
BETA_CASES = [
    ("linear", 1000, 0.0001, 0.02),
    ("linear", 37, 0.001, 0.05),
    ("scaled_linear", 1000, 0.00085, 0.012),
    ("scaled_linear", 513, 0.0001, 0.02),
    ("squaredcos_cap_v2", 1000, 0.0001, 0.02),
    ("squaredcos_cap_v2", 50, 0.0001, 0.02),
    ("sigmoid", 1000, 0.0001, 0.02),
    ("sigmoid", 101, 0.0003, 0.03),
    ("laplace", 1000, 0.0001, 0.02),
    ("laplace", 64, 0.0001, 0.02),
]


@pytest.mark.parametrize("name,n,start,end", BETA_CASES)
@pytest.mark.parametrize("rescale", [False, True])
def test_betas_match_diffusers_ddpm_float64(name, n, start, end, rescale):
    ref = ddpm64(num_train_timesteps=n, beta_schedule=name, beta_start=start, beta_end=end,
                 rescale_betas_zero_snr=rescale)
    b = S.betas(name, n, start, end)
    if rescale:
        b = S.rescale_zero_terminal_snr(b)
    assert b.dtype == F64 and b.shape == (n,)
    close(b, ref.betas)
    close(S.alphas_cumprod(b), ref.alphas_cumprod)


@pytest.mark.parametrize("name", ["linear", "scaled_linear", "squaredcos_cap_v2", "exp"])
@pytest.mark.parametrize("n", [1000, 77])
def test_betas_match_diffusers_heun_float64(name, n):
    with diffusers_float64("scheduling_heun_discrete") as m:
        ref = m.HeunDiscreteScheduler(num_train_timesteps=n, beta_schedule=name, beta_start=0.00085, beta_end=0.012)
    close(S.betas(name, n, 0.00085, 0.012), ref.betas)
    close(S.alphas_cumprod(S.betas(name, n, 0.00085, 0.012)), ref.alphas_cumprod)


@pytest.mark.parametrize("name", ["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid"])
def test_betas_match_diffusers_default_float32(name):
    """Unpatched diffusers (float32 tables): our float64 betas round to them."""
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.DDPMScheduler(beta_schedule=name, beta_start=0.00085, beta_end=0.012)
    ours = S.betas(name, 1000, 0.00085, 0.012)
    close(ours, ref.betas, rtol=1e-6)
    close(S.betas(name, 1000, 0.00085, 0.012, dtype=torch.float32), ref.betas, rtol=2.4e-7)
    # float32 cumprod of 1000 factors drifts by a few float32 ulps per step
    close(S.alphas_cumprod(ours), ref.alphas_cumprod, rtol=1e-5)


def test_betas_closed_forms():
    n = 250
    i = torch.arange(n, dtype=F64)
    close(S.betas("linear", n, 0.001, 0.03), 0.001 + i / (n - 1) * (0.03 - 0.001))
    close(S.betas("scaled_linear", n, 0.001, 0.03),
          (0.001**0.5 + i / (n - 1) * (0.03**0.5 - 0.001**0.5)) ** 2)
    x = -6 + 12 * i / (n - 1)
    close(S.betas("sigmoid", n, 0.001, 0.03), 1 / (1 + torch.exp(-x)) * 0.029 + 0.001)
    # "exp": alpha_bar(t) = exp(-12 t) -> every beta is 1 - exp(-12/N)
    close(S.betas("exp", n), torch.full((n,), -math.expm1(-12 / n), dtype=F64))

    # cosine: alphas_cumprod telescopes to alpha_bar((i+1)/N)/alpha_bar(0) while no beta is capped
    def abar(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    b = S.betas("squaredcos_cap_v2", n)
    ac = S.alphas_cumprod(b)
    uncapped = (b < 0.999).nonzero().max().item()
    expect = torch.tensor([abar((k + 1) / n) / abar(0) for k in range(uncapped + 1)], dtype=F64)
    close(ac[: uncapped + 1], expect, rtol=1e-10)
    assert b[-1].item() == 0.999  # the last one is capped at max_beta
    assert S.betas("squaredcos_cap_v2", n, max_beta=0.5).max().item() == 0.5
    # alphas_cumprod is the running product of (1 - beta)
    bb = S.betas("linear", 20, 0.01, 0.2)
    prod, expect = 1.0, []
    for v in bb.tolist():
        prod *= 1 - v
        expect.append(prod)
    close(S.alphas_cumprod(bb), expect, rtol=1e-14)


def test_rescale_zero_terminal_snr_properties():
    b = S.betas("scaled_linear", 1000, 0.00085, 0.012)
    r = S.rescale_zero_terminal_snr(b)
    ac, ac_r = S.alphas_cumprod(b), S.alphas_cumprod(r)
    assert ac_r[-1].item() == pytest.approx(0.0, abs=1e-30)
    assert r[-1].item() == pytest.approx(1.0, abs=1e-12)
    close(ac_r[0], ac[0], rtol=1e-12)
    # sqrt(alpha_bar) is an affine map of the original one
    s, s_r = ac.sqrt(), ac_r.sqrt()
    close(s_r, (s - s[-1]) * s[0] / (s[0] - s[-1]), rtol=1e-10, atol=1e-14)
    # dtype and device follow the input
    assert S.rescale_zero_terminal_snr(b.float()).dtype == torch.float32
    assert S.rescale_zero_terminal_snr(b.tolist()).dtype == F64


def test_betas_dtype_and_device_arguments():
    b64 = S.betas("scaled_linear", 100, 0.00085, 0.012)
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        b = S.betas("scaled_linear", 100, 0.00085, 0.012, dtype=dt)
        assert b.dtype == dt
        assert torch.equal(b, b64.to(dt))  # computed in float64, then rounded once
    meta = S.betas("linear", 10, device="meta")
    assert meta.device.type == "meta" and meta.shape == (10,)
    assert S.karras_sigmas(5, 0.1, 10, device="meta", dtype=torch.float32).device.type == "meta"


# ===========================================================================
# timestep spacings
# ===========================================================================
def _diffusers_timesteps(cls_name, n, **config):
    diffusers = pytest.importorskip("diffusers")
    sched = getattr(diffusers, cls_name)(**config)
    sched.set_timesteps(n)
    return sched.timesteps


def _check_against(ref, ours, n):
    if ref.shape[0] == n + 1:
        # diffusers' float arange(N, 0, -N/n) yields one spurious extra step (-1) for some n
        assert ref[-1].item() in (-1, -1.0)
        ref = ref[:n]
    assert ours.shape == (n,)
    return ref


@pytest.mark.parametrize("spacing", S.TIMESTEP_SPACINGS)
@pytest.mark.parametrize("N", [1000, 1001, 999])
def test_timesteps_match_ddim_every_n(spacing, N):
    diffusers = pytest.importorskip("diffusers")
    ddim = diffusers.DDIMScheduler(num_train_timesteps=N, timestep_spacing=spacing)
    extra = 0
    for n in range(1, N + 1):
        ddim.set_timesteps(n)
        ours = S.timesteps(n, N, spacing)
        assert ours.dtype == torch.int64
        ref = ddim.timesteps
        extra += ref.shape[0] != n
        ref = _check_against(ref, ours, n)
        assert torch.equal(ours, ref), (n, ours, ref)
        assert (ours[:-1] > ours[1:]).all() and ours.min() >= 0 and ours.max() <= N - 1
    if spacing != "trailing":
        assert extra == 0


@pytest.mark.parametrize("cls_name", ["DDIMScheduler", "DDPMScheduler", "EulerDiscreteScheduler"])
@pytest.mark.parametrize("spacing", S.TIMESTEP_SPACINGS)
@pytest.mark.parametrize("offset", [0, 1, 3])
@pytest.mark.parametrize("n", [1, 2, 3, 7, 10, 25, 50, 61, 333, 999])
def test_timesteps_match_diffusers_with_offset(cls_name, spacing, offset, n):
    N = 1000
    ref = _diffusers_timesteps(cls_name, n, num_train_timesteps=N, timestep_spacing=spacing, steps_offset=offset)
    if spacing == "leading" and offset and (n - 1) * (N // n) + offset > N - 1:
        with pytest.raises(ValueError, match="steps_offset"):
            S.timesteps(n, N, spacing, offset)
        return
    rounded = cls_name != "EulerDiscreteScheduler"
    ours = S.timesteps(n, N, spacing, offset, rounded=rounded)
    ref = _check_against(ref, ours, n)
    if rounded:
        assert ours.dtype == torch.int64 and torch.equal(ours, ref)
    else:
        assert ours.dtype == F64
        close(ours, ref, rtol=1e-6)  # diffusers' Euler keeps float32 timesteps


@pytest.mark.parametrize("spacing", S.TIMESTEP_SPACINGS)
@pytest.mark.parametrize("n", [3, 28, 50, 999])
def test_timesteps_euler_float64_exact(spacing, n):
    with diffusers_float64("scheduling_euler_discrete") as m:
        ref = m.EulerDiscreteScheduler(timestep_spacing=spacing)
        ref.set_timesteps(n)
    ours = S.timesteps(n, 1000, spacing, rounded=False)
    ref = _check_against(ref.timesteps, ours, n)
    assert torch.equal(ours, ref.to(F64))


def test_timesteps_closed_forms():
    assert S.timesteps(4, 1000, "leading").tolist() == [750, 500, 250, 0]
    assert S.timesteps(4, 1000, "leading", 1).tolist() == [751, 501, 251, 1]
    assert S.timesteps(4, 1000, "trailing").tolist() == [999, 749, 499, 249]
    assert S.timesteps(4, 1000, "linspace").tolist() == [999, 666, 333, 0]
    assert S.timesteps(4, 1000, "linspace", rounded=False).tolist() == [999.0, 666.0, 333.0, 0.0]
    assert S.timesteps(2, 1000, "linspace", rounded=False).tolist() == [999.0, 0.0]
    assert S.timesteps(1, 1000, "linspace").tolist() == [0]
    assert S.timesteps(1, 1000, "trailing").tolist() == [999]
    # steps_offset applies to "leading" only (as in diffusers)
    assert torch.equal(S.timesteps(10, 1000, "trailing", 1), S.timesteps(10, 1000, "trailing"))
    assert S.timesteps(1000, 1000, "trailing").tolist() == list(range(999, -1, -1))
    meta = S.timesteps(5, device="meta")
    assert meta.device.type == "meta" and meta.dtype == torch.int64


# ===========================================================================
# sigma schedules: k-diffusion
# ===========================================================================
SIGMA_ARGS = [(1, 0.03, 14.6), (2, 0.03, 14.6), (10, 0.0292, 14.6146), (37, 0.002, 80.0), (100, 0.1, 1.0)]


@pytest.mark.parametrize("n,smin,smax", SIGMA_ARGS)
@pytest.mark.parametrize("rho", [7.0, 3.0, 1.0])
def test_karras_matches_kdiffusion(kdiff, n, smin, smax, rho):
    with default_float64():
        ref = kdiff.sampling.get_sigmas_karras(n, smin, smax, rho=rho)
    ours = S.karras_sigmas(n, smin, smax, rho)
    assert ours.dtype == F64 and ref.dtype == F64
    close(ours, ref)
    close(S.karras_sigmas(n, smin, smax, rho, append_zero=False), ref[:-1])


@pytest.mark.parametrize("n,smin,smax", SIGMA_ARGS)
def test_exponential_matches_kdiffusion(kdiff, n, smin, smax):
    with default_float64():
        ref = kdiff.sampling.get_sigmas_exponential(n, smin, smax)
    close(S.exponential_sigmas(n, smin, smax), ref)
    close(S.sigma_schedule("exponential", n, smin, smax, append_zero=False), ref[:-1])


@pytest.mark.parametrize("n,smin,smax", SIGMA_ARGS)
@pytest.mark.parametrize("rho", [1.0, 0.5, 2.5])
def test_polyexponential_matches_kdiffusion(kdiff, n, smin, smax, rho):
    with default_float64():
        ref = kdiff.sampling.get_sigmas_polyexponential(n, smin, smax, rho=rho)
    close(S.polyexponential_sigmas(n, smin, smax, rho), ref)


@pytest.mark.parametrize("n", [1, 2, 10, 50])
@pytest.mark.parametrize("beta_d,beta_min,eps_s", [(19.9, 0.1, 1e-3), (10.0, 0.5, 1e-2)])
def test_vp_sigmas_match_kdiffusion(kdiff, n, beta_d, beta_min, eps_s):
    with default_float64():
        ref = kdiff.sampling.get_sigmas_vp(n, beta_d, beta_min, eps_s)
    close(S.vp_sigmas(n, beta_d, beta_min, eps_s), ref)
    close(S.sigma_schedule("vp", n, beta_d=beta_d, beta_min=beta_min, eps_s=eps_s), ref)


@pytest.mark.parametrize("name", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_discrete_schedule_matches_kdiffusion(kdiff, name):
    """sigma_to_t / t_to_sigma / CompVis sigma table against k-diffusion's DiscreteSchedule."""
    ac = S.alphas_cumprod(S.betas(name, 1000, 0.00085, 0.012))
    sigmas = S.sigmas_from_alphas_cumprod(ac)
    ref = kdiff.external.DiscreteSchedule(sigmas, quantize=False)
    close(sigmas, ((1 - ac) / ac) ** 0.5)
    gen = torch.Generator().manual_seed(0)
    lo, hi = sigmas[0].item(), sigmas[-1].item()
    query = torch.exp(torch.empty(257, dtype=F64).uniform_(math.log(lo) - 0.5, math.log(hi) + 0.5, generator=gen))
    close(S.sigma_to_t(query, sigmas), ref.sigma_to_t(query), rtol=1e-9, atol=1e-9)
    assert torch.equal(S.sigma_to_t(query, sigmas, quantize=True), ref.sigma_to_t(query, quantize=True))
    # k-diffusion casts t to float32 first: use t values exact in float32
    t = torch.randint(0, 999 * 8 + 1, (301,), generator=gen).to(F64) / 8
    close(S.t_to_sigma(t, sigmas), ref.t_to_sigma(t))
    # t_to_sigma(sigma_to_t(s)) round trip inside the table's range
    inside = query.clamp(lo, hi)
    close(S.t_to_sigma(S.sigma_to_t(inside, sigmas), sigmas), inside, rtol=1e-10)


# ===========================================================================
# sigma schedules: closed forms
# ===========================================================================
def test_karras_closed_form():
    n, smin, smax, rho = 12, 0.02, 80.0, 7.0
    s = S.karras_sigmas(n, smin, smax, rho)
    assert s.shape == (n + 1,) and s[-1].item() == 0.0
    close(s[0], smax, rtol=1e-13)
    close(s[n - 1], smin, rtol=1e-12)
    assert (s[:-1] > s[1:]).all()
    # sigma^(1/rho) is linear in i
    r = s[:-1] ** (1 / rho)
    close(r[1:] - r[:-1], torch.full((n - 1,), (smin ** (1 / rho) - smax ** (1 / rho)) / (n - 1), dtype=F64),
          rtol=1e-9)
    close(S.karras_sigmas(n, smin, smax, 1.0, append_zero=False), torch.linspace(smax, smin, n, dtype=F64),
          rtol=1e-12)
    assert S.karras_sigmas(1, smin, smax).tolist() == [pytest.approx(smax, rel=1e-13), 0.0]


def test_exponential_and_polyexponential_closed_form():
    n, smin, smax = 9, 0.05, 20.0
    e = S.exponential_sigmas(n, smin, smax, append_zero=False)
    ratio = e[1:] / e[:-1]
    close(ratio, torch.full((n - 1,), (smin / smax) ** (1 / (n - 1)), dtype=F64), rtol=1e-12)
    close(e[[0, -1]], [smax, smin], rtol=1e-13)
    close(S.polyexponential_sigmas(n, smin, smax, 1.0), S.exponential_sigmas(n, smin, smax), rtol=1e-13)
    p = S.polyexponential_sigmas(n, smin, smax, 2.0, append_zero=False)
    ramp = torch.linspace(1, 0, n, dtype=F64) ** 2
    close(torch.log(p / smin) / math.log(smax / smin), ramp, rtol=1e-12, atol=1e-14)


def test_vp_sigmas_equal_vpsde_sigma():
    sde = S.VPSDE(beta_min=0.1, beta_max=20.0)
    t = torch.linspace(1, 1e-3, 40, dtype=F64)
    close(S.vp_sigmas(40, beta_d=19.9, beta_min=0.1, eps_s=1e-3, append_zero=False), sde.sigma(t), rtol=1e-12)


def test_parameterisation_round_trips():
    gen = torch.Generator().manual_seed(1)
    ac = torch.rand(500, dtype=F64, generator=gen) * 0.998 + 0.001
    sig = S.sigmas_from_alphas_cumprod(ac)
    lam = S.log_snr_from_alphas_cumprod(ac)
    close(sig, torch.sqrt((1 - ac) / ac), rtol=1e-14)
    close(lam, torch.log(ac / (1 - ac)), rtol=1e-12, atol=1e-13)
    close(lam, -2 * torch.log(sig), rtol=1e-12, atol=1e-13)
    close(S.log_snr_from_sigmas(sig), lam, rtol=1e-12, atol=1e-13)
    close(S.alphas_cumprod_from_sigmas(sig), ac, rtol=1e-13)
    close(S.alphas_cumprod_from_log_snr(lam), ac, rtol=1e-13)
    close(S.sigmas_from_log_snr(lam), sig, rtol=1e-13)
    close(S.sigmas_from_log_snr(S.log_snr_from_sigmas(sig)), sig, rtol=1e-13)
    # dtype follows the input; numbers and sequences become float64
    assert S.sigmas_from_alphas_cumprod(ac.float()).dtype == torch.float32
    assert S.log_snr_from_sigmas([1.0, 2.0]).dtype == F64
    assert S.log_snr_from_sigmas(1.0).item() == 0.0
    # extremes: zero terminal SNR
    assert math.isinf(S.sigmas_from_alphas_cumprod(torch.tensor([0.0], dtype=F64)).item())
    assert S.log_snr_from_alphas_cumprod(torch.tensor([0.0], dtype=F64)).item() == -math.inf


def test_t_to_sigma_linear_and_log():
    table = torch.tensor([0.1, 0.4, 1.6, 6.4], dtype=F64)
    t = torch.tensor([0.0, 0.5, 1.0, 2.25, 3.0], dtype=F64)
    close(S.t_to_sigma(t, table), [0.1, 0.2, 0.4, 1.6 * 4**0.25, 6.4], rtol=1e-13)
    close(S.t_to_sigma(t, table, log_space=False), np.interp(t.numpy(), np.arange(4), table.numpy()), rtol=1e-13)
    close(S.sigma_to_t(torch.tensor([0.05, 0.2, 6.4, 100.0], dtype=F64), table), [0.0, 0.5, 3.0, 3.0], rtol=1e-13)


# ===========================================================================
# EulerDiscreteScheduler sigmas (incl. Karras / exponential)
# ===========================================================================
@pytest.mark.parametrize("beta_schedule,start,end", [("scaled_linear", 0.00085, 0.012), ("linear", 0.0001, 0.02)])
@pytest.mark.parametrize("spacing", S.TIMESTEP_SPACINGS)
@pytest.mark.parametrize("variant", [None, "karras", "exponential"])
@pytest.mark.parametrize("n", [1, 4, 25, 50])
def test_inference_sigmas_match_euler(beta_schedule, start, end, spacing, variant, n):
    cfg = dict(beta_schedule=beta_schedule, beta_start=start, beta_end=end, timestep_spacing=spacing,
               use_karras_sigmas=variant == "karras", use_exponential_sigmas=variant == "exponential")
    with diffusers_float64("scheduling_euler_discrete") as m:
        ref = m.EulerDiscreteScheduler(**cfg)
        ref.set_timesteps(n)
    assert ref.sigmas.dtype == F64
    ac = S.alphas_cumprod(S.betas(beta_schedule, 1000, start, end))
    if n == 1 and variant is not None:
        # diffusers' sigma_min = sigma_max = the one sigma here; ours refuses the empty range
        with pytest.raises(ValueError, match="sigma_max"):
            S.inference_sigmas(ac, n, spacing, sigma_schedule=variant)
        return
    ts, sig = S.inference_sigmas(ac, n, spacing, sigma_schedule=variant)
    assert ts.shape == (n,) and sig.shape == (n + 1,)
    ref_ts = _check_against(ref.timesteps, ts, n)
    close(ts, ref_ts, rtol=1e-6, atol=1e-9)
    close(sig, ref.sigmas)
    # the same through NoiseSchedule
    sched = S.NoiseSchedule.from_config(ref.config)
    ts2, sig2 = sched.inference_sigmas(n, sigma_schedule=variant)
    assert torch.equal(ts2, ts) and torch.equal(sig2, sig)


@pytest.mark.parametrize("variant", ["karras", "exponential"])
def test_inference_sigmas_match_euler_config_range_and_final(variant):
    cfg = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, timestep_spacing="trailing",
               sigma_min=0.05, sigma_max=10.0, final_sigmas_type="sigma_min", steps_offset=1)
    cfg["use_karras_sigmas" if variant == "karras" else "use_exponential_sigmas"] = True
    with diffusers_float64("scheduling_euler_discrete") as m:
        ref = m.EulerDiscreteScheduler(**cfg)
        ref.set_timesteps(30)
    sched = S.NoiseSchedule.from_config(ref.config)
    ts, sig = sched.inference_sigmas(30, sigma_schedule=variant, sigma_min=0.05, sigma_max=10.0,
                                     final_sigma="sigma_min")
    close(ts, ref.timesteps, rtol=1e-6, atol=1e-9)
    close(sig, ref.sigmas)


def test_euler_train_sigmas_match_noise_schedule():
    with diffusers_float64("scheduling_euler_discrete") as m:
        ref = m.EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    sched = S.NoiseSchedule.from_config(ref.config)
    # Euler keeps sigmas descending with a 0 appended
    close(torch.cat([sched.sigmas.flip(0), torch.zeros(1, dtype=F64)]), ref.sigmas)


# ===========================================================================
# continuous SDEs
# ===========================================================================
SDES = [
    S.VPSDE(),
    S.VPSDE(beta_min=0.5, beta_max=5.0, N=37),
    S.SubVPSDE(),
    S.SubVPSDE(beta_min=0.2, beta_max=12.0, N=100),
    S.VESDE(),
    S.VESDE(sigma_min=0.002, sigma_max=80.0, N=64),
]


def _simpson(f, a, b, m=2000):
    x = np.linspace(a, b, 2 * m + 1)
    y = f(x)
    h = (b - a) / (2 * m)
    return h / 3 * (y[0] + y[-1] + 4 * y[1:-1:2].sum() + 2 * y[2:-1:2].sum())


def test_vp_marginals_from_integral_of_beta():
    sde = S.VPSDE(beta_min=0.1, beta_max=20.0)
    for t in [1e-3, 0.1, 0.37, 0.5, 0.9, 1.0]:
        integral = _simpson(lambda s: 0.1 + s * 19.9, 0.0, t)
        close(sde.integral_beta(t), integral, rtol=1e-12)
        close(sde.mean_coeff(t), math.exp(-0.5 * integral), rtol=1e-10)
        close(sde.marginal_std(t), math.sqrt(1 - math.exp(-integral)), rtol=1e-10)
        # the paper's closed form (score_sde marginal_prob)
        lmc = -0.25 * t**2 * (20.0 - 0.1) - 0.5 * t * 0.1
        close(sde.mean_coeff(t), math.exp(lmc), rtol=1e-12)
        close(sde.marginal_std(t), math.sqrt(1 - math.exp(2 * lmc)), rtol=1e-10)
        sub = S.SubVPSDE(beta_min=0.1, beta_max=20.0)
        close(sub.marginal_std(t), 1 - math.exp(2 * lmc), rtol=1e-10)
        close(sub.diffusion_coeff(t), math.sqrt((0.1 + t * 19.9) * (1 - math.exp(-2 * 0.1 * t - 19.9 * t**2))),
              rtol=1e-10)
        ve = S.VESDE(sigma_min=0.01, sigma_max=50.0)
        close(ve.marginal_std(t), 0.01 * 5000**t, rtol=1e-12)
        close(ve.diffusion_coeff(t), 0.01 * 5000**t * math.sqrt(2 * math.log(5000)), rtol=1e-12)


@pytest.mark.parametrize("sde", SDES, ids=repr)
def test_sde_moment_odes(sde):
    """For x_0 fixed, m(t) = mean_coeff and v(t) = std² solve m' = f·m and v' = 2·f·v + g²."""
    t = torch.linspace(0.02, 0.98, 25, dtype=F64)
    h = 1e-5
    dm = (sde.mean_coeff(t + h) - sde.mean_coeff(t - h)) / (2 * h)
    dv = (sde.marginal_std(t + h) ** 2 - sde.marginal_std(t - h) ** 2) / (2 * h)
    f, g = sde.drift_coeff(t), sde.diffusion_coeff(t)
    close(dm, f * sde.mean_coeff(t), rtol=1e-6, atol=1e-9)
    close(dv, 2 * f * sde.marginal_std(t) ** 2 + g**2, rtol=1e-6, atol=1e-9)
    # sigma / log-SNR consistency and the inverse map
    close(sde.sigma(t), sde.marginal_std(t) / sde.mean_coeff(t), rtol=1e-12)
    close(sde.log_snr(t), torch.log(sde.mean_coeff(t) ** 2 / sde.marginal_std(t) ** 2), rtol=1e-10, atol=1e-12)
    close(sde.t_from_sigma(sde.sigma(t)), t, rtol=1e-10)
    assert sde.T == 1.0


def test_vp_discretization_matches_score_sde():
    for beta_min, beta_max, N in [(0.1, 20.0, 1000), (0.5, 5.0, 37)]:
        sde = S.VPSDE(beta_min, beta_max, N)
        db = sde.discrete_betas()
        close(db, torch.linspace(beta_min / N, beta_max / N, N, dtype=F64), rtol=1e-14)
        # N·beta_i = beta(i / (N - 1))
        close(db * N, sde.beta(torch.linspace(0, 1, N, dtype=F64)), rtol=1e-12)
        close(sde.discrete_alphas_cumprod(), torch.cumprod(1 - db, 0), rtol=1e-14)
        t = torch.tensor([0.0, 0.25, 0.5, 0.999, 1.0], dtype=F64)
        i = (t * (N - 1)).long()
        f, G = sde.discretize(t)
        close(f, torch.sqrt(1 - db[i]) - 1, rtol=1e-14)
        close(G, torch.sqrt(db[i]), rtol=1e-14)
        assert sde.prior_std == 1.0


def test_subvp_discretization_is_euler_maruyama():
    sde = S.SubVPSDE(0.1, 20.0, 1000)
    t = torch.tensor([0.0, 0.3, 1.0], dtype=F64)
    f, G = sde.discretize(t)
    close(f, -0.5 * sde.beta(t) / 1000, rtol=1e-14)
    close(G, sde.diffusion_coeff(t) / math.sqrt(1000), rtol=1e-14, atol=1e-300)


def test_ve_discretization_matches_score_sde():
    sde = S.VESDE(0.01, 50.0, 1000)
    ds = sde.discrete_sigmas()
    close(ds, torch.exp(torch.linspace(math.log(0.01), math.log(50.0), 1000, dtype=F64)), rtol=1e-14)
    close(ds, sde.sigma(torch.linspace(0, 1, 1000, dtype=F64)), rtol=1e-12)
    t = torch.tensor([0.0, 0.5, 1.0], dtype=F64)
    f, G = sde.discretize(t)
    i = (t * 999).long()
    assert torch.equal(f, torch.zeros(3, dtype=F64))
    close(G[0], 0.01, rtol=1e-14)
    close(G[1:] ** 2, ds[i[1:]] ** 2 - ds[i[1:] - 1] ** 2, rtol=1e-12)
    assert sde.prior_std == 50.0


def test_ve_matches_diffusers_score_sde_ve():
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.ScoreSdeVeScheduler(num_train_timesteps=200, sigma_min=0.01, sigma_max=50.0, sampling_eps=1e-5)
    ref.set_sigmas(200)
    sde = S.VESDE(0.01, 50.0, N=200)
    close(sde.discrete_sigmas(), ref.discrete_sigmas, rtol=1e-5)  # diffusers works in float32
    close(sde.sigma(ref.timesteps.to(F64)), ref.sigmas, rtol=1e-5)


def test_sde_number_and_tensor_inputs():
    sde = S.VPSDE()
    assert sde.beta(0.5).dtype == F64 and sde.beta(0.5).shape == ()
    t32 = torch.tensor([0.1, 0.9], dtype=torch.float32)
    assert sde.marginal_std(t32).dtype == torch.float32
    close(sde.marginal_std(t32), sde.marginal_std(t32.to(F64)), rtol=1e-6)
    assert sde.marginal_std(torch.tensor([0, 1])).dtype == F64
    m = torch.tensor([0.5], device="meta")
    assert sde.drift_coeff(m).device.type == "meta"


# ===========================================================================
# NoiseSchedule
# ===========================================================================
@pytest.mark.parametrize("config", [
    dict(beta_schedule="linear"),
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1),
    dict(beta_schedule="squaredcos_cap_v2", num_train_timesteps=500, timestep_spacing="trailing"),
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, rescale_betas_zero_snr=True,
         timestep_spacing="trailing"),
])
def test_noise_schedule_from_diffusers_config(config):
    with diffusers_float64("scheduling_ddim") as m:
        ref = m.DDIMScheduler(**config)
    sched = S.NoiseSchedule.from_config(ref.config)
    assert sched.dtype == F64 and sched.device == torch.device("cpu")
    assert len(sched) == ref.config.num_train_timesteps
    close(sched.betas, ref.betas)
    close(sched.alphas, ref.alphas)
    close(sched.alphas_cumprod, ref.alphas_cumprod)
    ac = sched.alphas_cumprod
    close(sched.sqrt_alphas_cumprod, ac.sqrt(), rtol=1e-14)
    close(sched.sqrt_one_minus_alphas_cumprod, (1 - ac).sqrt(), rtol=1e-14)
    close(sched.sigmas, S.sigmas_from_alphas_cumprod(ac), rtol=1e-14)
    close(sched.log_snr, S.log_snr_from_alphas_cumprod(ac), rtol=1e-14)
    # timesteps follow the config's spacing and offset
    ref.set_timesteps(20)
    assert torch.equal(sched.timesteps(20), ref.timesteps)
    # the same object built from the scheduler itself and from keyword arguments
    assert torch.equal(S.NoiseSchedule.from_config(ref).alphas_cumprod, sched.alphas_cumprod)
    direct = S.NoiseSchedule(**config)
    for name in S.NoiseSchedule.TABLES:
        assert torch.equal(getattr(direct, name), getattr(sched, name))
    if config.get("rescale_betas_zero_snr"):
        assert sched.alphas_cumprod[-1].item() == pytest.approx(0.0, abs=1e-30)
        assert math.isinf(sched.sigmas[-1].item()) and sched.log_snr[-1].item() == -math.inf


def test_noise_schedule_from_config_dict_and_trained_betas():
    cfg = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
           "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
           "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
           "clip_sample": False}
    sched = S.NoiseSchedule.from_config(cfg)
    close(sched.betas, S.betas("scaled_linear", 1000, 0.00085, 0.012), rtol=0, atol=0)
    assert sched.timesteps(50).tolist() == S.timesteps(50, 1000, "leading", 1).tolist()
    assert sched.config["steps_offset"] == 1 and sched.config["timestep_spacing"] == "leading"
    trained = torch.linspace(0.001, 0.2, 30, dtype=torch.float32)
    t = S.NoiseSchedule.from_config({"trained_betas": trained.tolist(), "num_train_timesteps": 1000})
    assert len(t) == 30
    close(t.betas, trained.to(F64), rtol=0, atol=0)
    over = S.NoiseSchedule.from_config(cfg, beta_schedule="linear", steps_offset=0)
    close(over.betas, S.betas("linear", 1000, 0.00085, 0.012), rtol=0, atol=0)
    with pytest.raises(TypeError, match="config"):
        S.NoiseSchedule.from_config(["not", "a", "config"])
    with pytest.raises(TypeError, match="override"):
        S.NoiseSchedule.from_config(cfg, prediction_type="epsilon")
    with pytest.raises(ValueError, match="'linear'"):
        S.NoiseSchedule.from_config({"beta_schedule": "cubic"})


def test_noise_schedule_to_device_and_dtype():
    sched = S.NoiseSchedule(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    s32 = sched.to(dtype=torch.float32)
    assert s32 is not sched and sched.dtype == F64
    for name in S.NoiseSchedule.TABLES:
        table = getattr(s32, name)
        assert table.dtype == torch.float32 and table.shape == (1000,)
        assert torch.equal(table, getattr(sched, name).float())
    # back to float64 is lossless: tables are kept in float64 on the side
    back = s32.to(dtype=F64)
    for name in S.NoiseSchedule.TABLES:
        assert torch.equal(getattr(back, name), getattr(sched, name))
    meta = sched.to("meta")
    assert meta.device.type == "meta" and all(getattr(meta, n).device.type == "meta" for n in meta.TABLES)
    assert meta.timesteps(10).device.type == "meta"
    assert S.NoiseSchedule(dtype=torch.bfloat16).betas.dtype == torch.bfloat16
    assert "scaled_linear" in repr(sched)


@pytest.mark.cuda
def test_noise_schedule_on_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    sched = S.NoiseSchedule(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, device="cuda",
                            dtype=torch.float32)
    assert sched.alphas_cumprod.is_cuda and sched.timesteps(10).is_cuda
    cpu = S.NoiseSchedule(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, dtype=torch.float32)
    for name in S.NoiseSchedule.TABLES:
        assert torch.equal(getattr(sched, name).cpu(), getattr(cpu, name))  # same values on every device
    t = torch.linspace(0, 1, 11, device="cuda", dtype=F64)
    close(S.VPSDE().marginal_std(t).cpu(), S.VPSDE().marginal_std(t.cpu()), rtol=1e-12)
    close(S.karras_sigmas(10, 0.03, 14.6, device="cuda").cpu(), S.karras_sigmas(10, 0.03, 14.6), rtol=0, atol=0)


# ===========================================================================
# bad input and NaN
# ===========================================================================
def test_unknown_names_list_the_valid_ones():
    with pytest.raises(ValueError, match="'linear'.*'scaled_linear'.*'squaredcos_cap_v2'.*'sigmoid'.*'exp'"):
        S.betas("cosine")
    with pytest.raises(ValueError, match="'cosine'.*'exp'.*'laplace'"):
        S.betas_for_alpha_bar(10, "tanh")
    with pytest.raises(ValueError, match="'karras'.*'exponential'.*'polyexponential'.*'vp'"):
        S.sigma_schedule("edm", 10, 0.1, 10)
    with pytest.raises(ValueError, match="'leading'.*'trailing'.*'linspace'"):
        S.timesteps(10, spacing="uniform")
    with pytest.raises(ValueError, match="timestep_spacing.*'leading'"):
        S.NoiseSchedule(timestep_spacing="middle")
    with pytest.raises(ValueError, match="name.*'linear'"):
        S.NoiseSchedule(beta_schedule="quadratic")
    with pytest.raises(ValueError, match="final_sigma"):
        S.inference_sigmas(S.alphas_cumprod(S.betas()), 10, final_sigma="one")
    with pytest.raises(ValueError, match="sigma_schedule"):
        S.inference_sigmas(S.alphas_cumprod(S.betas()), 10, sigma_schedule="vp")


@pytest.mark.parametrize("call,exc,word", [
    (lambda: S.karras_sigmas(0, 0.1, 10), ValueError, "n must be >= 1"),
    (lambda: S.exponential_sigmas(-3, 0.1, 10), ValueError, "n must be >= 1"),
    (lambda: S.karras_sigmas(2.0, 0.1, 10), TypeError, "n must be an int"),
    (lambda: S.karras_sigmas(True, 0.1, 10), TypeError, "n must be an int"),
    (lambda: S.karras_sigmas(5, 0.0, 10), ValueError, "sigma_min"),
    (lambda: S.polyexponential_sigmas(5, -1.0, 10), ValueError, "sigma_min"),
    (lambda: S.exponential_sigmas(5, 1.0, 1.0), ValueError, "sigma_max"),
    (lambda: S.karras_sigmas(5, 2.0, 1.0), ValueError, "sigma_max"),
    (lambda: S.karras_sigmas(5, 0.1, float("inf")), ValueError, "sigma_max"),
    (lambda: S.karras_sigmas(5, 0.1, 10, rho=0), ValueError, "rho"),
    (lambda: S.karras_sigmas(5, 0.1, "10"), TypeError, "sigma_max"),
    (lambda: S.karras_sigmas(5, 0.1, 10, append_zero=1), TypeError, "append_zero"),
    (lambda: S.vp_sigmas(5, eps_s=0), ValueError, "eps_s"),
    (lambda: S.vp_sigmas(5, beta_d=-1), ValueError, "beta_d"),
    (lambda: S.betas("linear", 0), ValueError, "num_train_timesteps"),
    (lambda: S.betas("linear", 10, beta_start=-0.1), ValueError, "beta_start"),
    (lambda: S.betas("scaled_linear", 10, beta_end=1.5), ValueError, "beta_end"),
    (lambda: S.betas("linear", 10, beta_end=float("nan")), ValueError, "beta_end"),
    (lambda: S.betas("squaredcos_cap_v2", 10, max_beta=0), ValueError, "max_beta"),
    (lambda: S.betas("linear", 10, dtype=torch.int64), TypeError, "dtype"),
    (lambda: S.rescale_zero_terminal_snr(torch.tensor([0.1])), ValueError, "betas"),
    (lambda: S.alphas_cumprod(torch.ones(2, 2)), ValueError, "betas"),
    (lambda: S.alphas_cumprod("abc"), TypeError, "betas"),
    (lambda: S.timesteps(0), ValueError, "num_inference_steps"),
    (lambda: S.timesteps(1001, 1000), ValueError, "num_inference_steps"),
    (lambda: S.timesteps(10, 0), ValueError, "num_train_timesteps"),
    (lambda: S.timesteps(1000, 1000, "leading", 1), ValueError, "steps_offset"),
    (lambda: S.timesteps(10, 1000, "leading", -1), ValueError, "steps_offset"),
    (lambda: S.timesteps(10, 1000, "leading", 1.5), TypeError, "steps_offset"),
    (lambda: S.VPSDE(beta_min=-0.1), ValueError, "beta_min"),
    (lambda: S.VPSDE(beta_min=5.0, beta_max=1.0), ValueError, "beta_max"),
    (lambda: S.VPSDE(N=0), ValueError, "N must be"),
    (lambda: S.VESDE(sigma_min=0.0), ValueError, "sigma_min"),
    (lambda: S.VESDE(sigma_min=1.0, sigma_max=0.5), ValueError, "sigma_max"),
    (lambda: S.VPSDE().beta(1.5), ValueError, "t must lie"),
    (lambda: S.VESDE().discretize(torch.tensor([-0.1, 0.5])), ValueError, "t must lie"),
    (lambda: S.t_to_sigma(torch.tensor([3.5]), torch.tensor([1.0, 2.0, 3.0])), ValueError, "t must lie"),
    (lambda: S.sigma_to_t(1.0, torch.tensor([1.0])), ValueError, "sigmas"),
    (lambda: S.NoiseSchedule(rescale_betas_zero_snr=1), TypeError, "rescale_betas_zero_snr"),
    (lambda: S.NoiseSchedule(dtype=torch.int32), TypeError, "dtype"),
    (lambda: S.NoiseSchedule().to(dtype=torch.int32), TypeError, "dtype"),
])
def test_bad_arguments_raise_naming_the_argument(call, exc, word):
    with pytest.raises(exc, match=word):
        call()


def test_nan_propagates():
    nan = float("nan")
    x = torch.tensor([0.5, nan], dtype=F64)
    for fn in (S.sigmas_from_alphas_cumprod, S.alphas_cumprod_from_sigmas, S.log_snr_from_alphas_cumprod,
               S.alphas_cumprod_from_log_snr, S.log_snr_from_sigmas, S.sigmas_from_log_snr):
        out = fn(x)
        assert torch.isfinite(out[0]) and torch.isnan(out[1]), fn.__name__
    table = S.sigmas_from_alphas_cumprod(S.alphas_cumprod(S.betas()))
    out = S.t_to_sigma(torch.tensor([10.0, nan], dtype=F64), table)
    assert torch.isfinite(out[0]) and torch.isnan(out[1])
    out = S.sigma_to_t(torch.tensor([1.0, nan], dtype=F64), table)
    assert torch.isfinite(out[0]) and torch.isnan(out[1])
    for sde in SDES:
        for method in (sde.drift_coeff, sde.diffusion_coeff, sde.mean_coeff, sde.marginal_std, sde.sigma,
                       sde.log_snr):
            out = method(x)
            assert torch.isfinite(out[0]) and torch.isnan(out[1]), (sde, method.__name__)
        f, g = sde.discretize(x)
        assert torch.isfinite(f[0]) and torch.isnan(f[1]) and torch.isfinite(g[0]) and torch.isnan(g[1]), sde
    b = S.betas("linear", 5)
    b[2] = nan
    assert torch.isnan(S.alphas_cumprod(b)[2:]).all() and torch.isfinite(S.alphas_cumprod(b)[:2]).all()
    assert torch.isnan(S.rescale_zero_terminal_snr(b)).any()
