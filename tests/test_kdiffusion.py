"""pygen.kdiffusion against k-diffusion 0.1.1.post1's sampling.py (loaded without its __init__).

Given identical noise, every sampler matches k-diffusion to 1e-5 relative in fp32 (1e-12 in
fp64); the in-kernel noise path equals the explicit-noise path fed with the documented
pygen.randn streams; callbacks, extra_args, disable and bad input behave as in k-diffusion.
"""
import inspect
import math

import weakref

import pytest
import torch

import pygen
from pygen import kdiffusion as K
from conftest import cpu_backends, load_kdiffusion_sampling

NOISY = ("euler_ancestral", "dpm_2_ancestral", "dpmpp_2s_ancestral", "dpmpp_sde", "dpmpp_2m_sde", "dpmpp_3m_sde")
CHURN = ("euler", "heun", "dpm_2")


@pytest.fixture(scope="module")
def KS():
    return load_kdiffusion_sampling()


def mixture(dtype):
    return pygen.models.clot(dtype=dtype)


class QueueNoise:
    """A noise sampler returning fresh normals from its own generator, in call order."""

    def __init__(self, x, seed=5):
        self.g = torch.Generator().manual_seed(seed)
        self.x = x
        self.calls = []

    def __call__(self, sigma, sigma_next):
        self.calls.append((float(sigma), float(sigma_next)))
        return torch.randn(self.x.shape, generator=self.g, dtype=torch.float64).to(self.x.dtype)


def start(n=37, dim=2, dtype=torch.float32, scale=20.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(n, dim, generator=g, dtype=torch.float64)).to(dtype)


def run_pair(KS, name, x, sigmas, model, **kw):
    ref_fn, fn = getattr(KS, "sample_" + name), getattr(K, "sample_" + name)
    if "noise_sampler" in inspect.signature(ref_fn).parameters and "noise_sampler" not in kw:
        ref = ref_fn(model, x, sigmas, disable=True, noise_sampler=QueueNoise(x), **kw)
        out = fn(model, x, sigmas, disable=True, noise_sampler=QueueNoise(x), **kw)
    else:
        ref = ref_fn(model, x, sigmas, disable=True, **kw)
        out = fn(model, x, sigmas, disable=True, **kw)
    return out, ref


def assert_rel(out, ref, tol):
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert torch.isfinite(out).all()
    err = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
    assert err <= tol, f"relative error {err:.3e} > {tol:.1e}"
    scale = ref.double().abs().max().item()
    torch.testing.assert_close(out.double(), ref.double(), rtol=10 * tol, atol=10 * tol * scale)


def test_same_signatures(KS):
    for name in K.SAMPLERS:
        assert inspect.signature(getattr(K, "sample_" + name)) == inspect.signature(getattr(KS, "sample_" + name))
    for name in ("get_sigmas_karras", "get_sigmas_exponential", "get_sigmas_polyexponential", "get_sigmas_vp",
                 "to_d", "append_zero", "get_ancestral_step"):
        assert inspect.signature(getattr(K, name)) == inspect.signature(getattr(KS, name))


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("name", list(K.SAMPLERS))
@pytest.mark.parametrize("schedule", ["karras", "exponential"])
def test_matches_kdiffusion_fp32(KS, name, backend, schedule):
    n = 9 if backend == "triton" else 14
    sigmas = getattr(K, "get_sigmas_" + schedule)(n, 0.02, 30.0)
    x = start(n=37 if backend != "triton" else 11)
    model = mixture(torch.float32).model_fn("denoiser")
    with pygen.use_backend(backend):
        out, ref = run_pair(KS, name, x, sigmas, model)
    assert_rel(out, ref, 1e-5)


@pytest.mark.parametrize("name", list(K.SAMPLERS))
def test_matches_kdiffusion_fp64(KS, name):
    sigmas = K.get_sigmas_karras(10, 0.02, 30.0).double()
    x = start(dtype=torch.float64)
    model = mixture(torch.float64).model_fn("denoiser")
    with pygen.use_backend("cpu" if "cpu" in cpu_backends() else "torch"):
        out, ref = run_pair(KS, name, x, sigmas, model)
    # k-diffusion multiplies float32-valued noise by 0-d float64 sigmas in float32; ours stays float64.
    assert_rel(out, ref, 1e-12 if name not in NOISY else 1e-6)


@pytest.mark.parametrize("name,kw", [
    ("euler_ancestral", dict(eta=0.5, s_noise=0.9)),
    ("euler_ancestral", dict(eta=0.0)),
    ("dpm_2_ancestral", dict(eta=0.7, s_noise=1.1)),
    ("dpmpp_2s_ancestral", dict(eta=0.3)),
    ("dpmpp_sde", dict(eta=0.5, r=0.3, s_noise=0.8)),
    ("dpmpp_sde", dict(eta=0.0)),
    ("dpmpp_2m_sde", dict(solver_type="heun")),
    ("dpmpp_2m_sde", dict(eta=0.4, s_noise=1.2)),
    ("dpmpp_2m_sde", dict(eta=0.0)),
    ("dpmpp_3m_sde", dict(eta=0.6)),
    ("dpmpp_3m_sde", dict(eta=0.0)),
    ("lms", dict(order=1)),
    ("lms", dict(order=2)),
    ("lms", dict(order=6)),
])
def test_options_match(KS, name, kw):
    sigmas = K.get_sigmas_polyexponential(12, 0.03, 25.0, rho=1.5)
    x = start()
    model = mixture(torch.float32).model_fn("denoiser")
    out, ref = run_pair(KS, name, x, sigmas, model, **kw)
    assert_rel(out, ref, 1e-5)


def patched_randn_like(monkeypatch, noises):
    """Make torch.randn_like return the given tensors in order (k-diffusion's churn noise)."""
    queue = list(noises)

    def fake(x, *a, **k):
        return queue.pop(0).to(dtype=x.dtype, device=x.device)

    monkeypatch.setattr(torch, "randn_like", fake)
    return queue


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("name", CHURN)
@pytest.mark.parametrize("churn", [dict(s_churn=1.0), dict(s_churn=4.0, s_tmin=0.5, s_tmax=10.0, s_noise=1.003)])
def test_churn_in_kernel_noise_matches_kdiffusion(KS, monkeypatch, name, churn, backend):
    """pygen draws the churn noise of step i in the kernel (stream 0 for step 0, else 1 + the last launch
    of step i - 1: i for Euler, 2i for the two-stage Heun/DPM-2); k-diffusion draws
    torch.randn_like(x) at every step; feed it the same noise and compare."""
    sigmas = K.get_sigmas_karras(8, 0.05, 15.0)
    x = start(n=9)
    model = mixture(torch.float32).model_fn("denoiser")
    torch.manual_seed(77)
    seed = K.default_seed()
    torch.manual_seed(77)
    with pygen.use_backend(backend):
        out = getattr(K, "sample_" + name)(model, x, sigmas, disable=True, **churn)
    per_step = 1 if name == "euler" else 2
    noises = [pygen.randn(x.shape, seed, per_step * i) for i in range(len(sigmas) - 1)]
    queue = patched_randn_like(monkeypatch, noises)
    ref = getattr(KS, "sample_" + name)(model, x, sigmas, disable=True, **churn)
    assert not queue
    assert_rel(out, ref, 1e-5)


def kernel_streams(name, sigmas):
    """For each noise-sampler call of ``name``, how pygen's in-kernel noise is built (documented
    contract): a list of (stream, ) or the dpmpp_sde Brownian pair."""
    n = len(sigmas) - 1
    if name in ("euler_ancestral", "dpmpp_2m_sde", "dpmpp_3m_sde"):
        return [("z", 1 + i) for i in range(n - 1)]
    if name in ("dpm_2_ancestral", "dpmpp_2s_ancestral"):
        return [("z", 2 + 2 * i) for i in range(n - 1)]
    assert name == "dpmpp_sde"
    out = []
    for i in range(n - 1):
        out.append(("z", 1 + 2 * i))
        out.append(("bridge", 1 + 2 * i, 2 + 2 * i, i))
    return out


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("name", NOISY)
def test_in_kernel_noise_is_the_documented_noise(name, backend):
    sigmas = K.get_sigmas_karras(7, 0.05, 15.0)
    sig = sigmas.double().tolist()
    x = start(n=5, dim=3)
    model = mixture(torch.float32).model_fn("denoiser")
    model3 = lambda xx, s: torch.cat([model(xx[:, :2], s), xx[:, 2:] / (1 + s[:, None] ** 2)], 1)  # noqa: E731
    torch.manual_seed(3)
    seed = K.default_seed()
    torch.manual_seed(3)
    with pygen.use_backend(backend):
        out = getattr(K, "sample_" + name)(model3, x, sigmas, disable=True)
    plan = kernel_streams(name, sigmas)

    def z(stream):
        return pygen.randn(x.shape, seed, stream)

    calls = []

    def noise_sampler(a, b):
        spec = plan[len(calls)]
        calls.append(spec)
        if spec[0] == "z":
            return z(spec[1])
        _, sa, sb, i = spec
        s_mid = sig[i] * math.exp(-0.5 * (math.log(sig[i]) - math.log(sig[i + 1])))
        l1, l2 = sig[i] - s_mid, s_mid - sig[i + 1]
        return (math.sqrt(l1) * z(sa) + math.sqrt(l2) * z(sb)) / math.sqrt(l1 + l2)

    with pygen.use_backend("torch"):
        ref = getattr(K, "sample_" + name)(model3, x, sigmas, disable=True, noise_sampler=noise_sampler)
    assert len(calls) == len(plan)
    assert_rel(out, ref, 2e-5)


def test_callback_extra_args_and_x_untouched(KS):
    sigmas = K.get_sigmas_karras(6, 0.05, 15.0)
    x = start(n=4)
    x_copy = x.clone()
    base = mixture(torch.float32).model_fn("denoiser")
    seen_args = []

    def model(xx, s, **extra):
        seen_args.append(dict(extra))
        return base(xx, s) * extra["gain"]

    for name in K.SAMPLERS:
        got, want = [], []
        kw = dict(s_churn=2.0) if name in CHURN else {}
        if name in NOISY:
            kw_a, kw_b = dict(noise_sampler=QueueNoise(x)), dict(noise_sampler=QueueNoise(x))
        else:
            kw_a = kw_b = {}
        torch.manual_seed(0)
        seed = K.default_seed()
        per_step = 1 if name == "euler" else 2
        noises = [pygen.randn(x.shape, seed, per_step * i) for i in range(len(sigmas) - 1)]
        torch.manual_seed(0)
        getattr(K, "sample_" + name)(model, x, sigmas, extra_args={"gain": 0.9}, callback=got.append,
                                     disable=True, **kw, **kw_a)
        orig = torch.randn_like
        queue = list(noises)
        torch.randn_like = lambda t, *a, **k: queue.pop(0) if queue else orig(t)
        try:
            getattr(KS, "sample_" + name)(model, x, sigmas, extra_args={"gain": 0.9}, callback=want.append,
                                          disable=True, **kw, **kw_b)
        finally:
            torch.randn_like = orig
        assert len(got) == len(want) == len(sigmas) - 1
        for a, b in zip(got, want):
            assert set(a) == set(b) == {"x", "i", "sigma", "sigma_hat", "denoised"}
            assert a["i"] == b["i"]
            assert torch.equal(a["sigma"], b["sigma"])
            torch.testing.assert_close(a["sigma_hat"], b["sigma_hat"], rtol=0, atol=0)
            assert_rel(a["x"], b["x"], 1e-5)
            assert_rel(a["denoised"], b["denoised"], 1e-5)
        # callbacks may keep x: each step's x is its own tensor
        assert len({id(a["x"]) for a in got}) == len(got)
        assert torch.equal(x, x_copy)
    assert all(a == {"gain": 0.9} for a in seen_args)


def test_disable_progress(capsys):
    sigmas = K.get_sigmas_karras(4, 0.05, 15.0)
    model = mixture(torch.float32).model_fn("denoiser")
    K.sample_euler(model, start(n=3), sigmas, disable=True)
    assert "it/s" not in capsys.readouterr().err
    K.sample_euler(model, start(n=3), sigmas, disable=False)
    assert "4/4" in capsys.readouterr().err


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["euler", "heun", "dpmpp_2m", "dpmpp_3m_sde", "lms"])
def test_half_storage_close_to_fp32(name, dtype):
    sigmas = K.get_sigmas_karras(10, 0.05, 15.0)
    x = start(n=64)
    model = mixture(torch.float32).model_fn("denoiser")
    model_h = lambda xx, s: model(xx.float(), s.float()).to(xx.dtype)  # noqa: E731
    torch.manual_seed(1)
    ref = getattr(K, "sample_" + name)(model, x, sigmas, disable=True)
    torch.manual_seed(1)
    out = getattr(K, "sample_" + name)(model_h, x.to(dtype), sigmas, disable=True)
    assert out.dtype == dtype
    err = ((out.float() - ref).norm() / ref.norm()).item()
    assert err < (2e-2 if dtype == torch.bfloat16 else 3e-3)


def test_helpers_match(KS):
    for args in [(10, 0.002, 80.0), (1, 0.1, 1.0), (33, 0.03, 14.6)]:
        assert torch.equal(K.get_sigmas_karras(*args), KS.get_sigmas_karras(*args))
        assert torch.equal(K.get_sigmas_karras(*args, rho=3.0), KS.get_sigmas_karras(*args, rho=3.0))
        assert torch.equal(K.get_sigmas_exponential(*args), KS.get_sigmas_exponential(*args))
        assert torch.equal(K.get_sigmas_polyexponential(*args, rho=2.0), KS.get_sigmas_polyexponential(*args, rho=2.0))
    assert torch.equal(K.get_sigmas_vp(12), KS.get_sigmas_vp(12))
    x, d = torch.randn(3, 4, 5), torch.randn(3, 4, 5)
    s = torch.rand(3) + 0.5
    assert torch.equal(K.to_d(x, s, d), KS.to_d(x, s, d))
    assert torch.equal(K.append_zero(s), KS.append_zero(s))
    for a, b, eta in [(2.0, 1.0, 1.0), (2.0, 1.0, 0.3), (1.0, 0.0, 1.0), (3.0, 2.0, 0.0), (5.0, 1.0, 7.0)]:
        assert K.get_ancestral_step(a, b, eta) == KS.get_ancestral_step(a, b, eta)
    sig = K.get_sigmas_karras(9, 0.1, 10.0).numpy()
    for order in (1, 2, 3, 4):
        for i in range(order - 1, 8):
            for j in range(order):
                assert K.linear_multistep_coeff(order, sig, i, j) == pytest.approx(
                    KS.linear_multistep_coeff(order, sig, i, j), rel=1e-6, abs=1e-9)
    with pytest.raises(ValueError, match="too high"):
        K.linear_multistep_coeff(3, sig, 1, 0)


def test_brownian_tree_noise_sampler(KS):
    x = torch.zeros(4000, 3)
    ns = K.BrownianTreeNoiseSampler(x, 0.02, 20.0, seed=11)
    a = ns(torch.tensor(10.0), torch.tensor(5.0))
    b = ns(torch.tensor(5.0), torch.tensor(1.0))
    c = ns(torch.tensor(10.0), torch.tensor(1.0))
    for z in (a, b, c):
        assert z.shape == x.shape and z.dtype == x.dtype
        assert abs(z.mean().item()) < 0.05 and abs(z.std().item() - 1) < 0.05
    # disjoint increments independent; nested ones correlated as sqrt(L1 / L2); additive path
    assert abs((a * b).mean().item()) < 0.05
    assert (a * c).mean().item() == pytest.approx(math.sqrt(5.0 / 9.0), abs=0.05)
    torch.testing.assert_close(c * 3.0, a * math.sqrt(5.0) + b * 2.0, rtol=1e-4, atol=1e-4)
    # same seed -> same path whatever the query order; other seed -> other path
    ns2 = K.BrownianTreeNoiseSampler(x, 0.02, 20.0, seed=11)
    torch.testing.assert_close(ns2(torch.tensor(10.0), torch.tensor(1.0)), c)
    torch.testing.assert_close(ns2(torch.tensor(5.0), torch.tensor(10.0)), -a)
    assert not torch.allclose(K.BrownianTreeNoiseSampler(x, 0.02, 20.0, seed=12)(10.0, 1.0), c)
    # per-row seeds: a row's noise does not depend on its batch
    seeds = [3, 4, 5]
    full = K.BrownianTreeNoiseSampler(torch.zeros(3, 7), 0.1, 9.0, seed=seeds)(4.0, 2.0)
    part = K.BrownianTreeNoiseSampler(torch.zeros(1, 7), 0.1, 9.0, seed=seeds[1:2])(4.0, 2.0)
    torch.testing.assert_close(full[1:2], part)
    with pytest.raises(ValueError, match="one entry per batch row"):
        K.BrownianTreeNoiseSampler(torch.zeros(3, 7), 0.1, 9.0, seed=[1, 2])
    # as the noise sampler of both implementations (fresh trees with one seed)
    sigmas = K.get_sigmas_karras(6, 0.05, 12.0)
    xx = start(n=6)
    model = mixture(torch.float32).model_fn("denoiser")
    for name in ("dpmpp_sde", "dpmpp_2m_sde"):
        out = getattr(K, "sample_" + name)(model, xx, sigmas, disable=True,
                                           noise_sampler=K.BrownianTreeNoiseSampler(xx, 0.05, 12.0, seed=9))
        ref = getattr(KS, "sample_" + name)(model, xx, sigmas, disable=True,
                                            noise_sampler=K.BrownianTreeNoiseSampler(xx, 0.05, 12.0, seed=9))
        assert_rel(out, ref, 1e-5)


def test_reproducible_with_manual_seed():
    sigmas = K.get_sigmas_karras(6, 0.05, 12.0)
    model = mixture(torch.float32).model_fn("denoiser")
    x = start(n=8)
    outs = []
    for s in (1, 1, 2):
        torch.manual_seed(s)
        outs.append(K.sample_dpmpp_2m_sde(model, x, sigmas, disable=True))
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])


def test_bad_input():
    model = mixture(torch.float32).model_fn("denoiser")
    x = start(n=4)
    good = K.get_sigmas_karras(5, 0.05, 12.0)
    with pytest.raises(ValueError, match="strictly decreasing"):
        K.sample_euler(model, x, torch.tensor([1.0, 2.0, 0.0]), disable=True)
    with pytest.raises(ValueError, match="strictly decreasing"):
        K.sample_heun(model, x, torch.tensor([3.0, 3.0, 0.0]), disable=True)
    with pytest.raises(ValueError, match="1-D"):
        K.sample_euler(model, x, good[None], disable=True)
    with pytest.raises(ValueError, match=">= 0"):
        K.sample_euler(model, x, torch.tensor([1.0, -1.0]), disable=True)
    with pytest.raises(TypeError, match="sigmas must be a torch.Tensor"):
        K.sample_euler(model, x, [1.0, 0.0], disable=True)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        K.sample_euler(model, [1.0], good, disable=True)
    with pytest.raises(ValueError, match="returned shape"):
        K.sample_dpmpp_2m(lambda xx, s: xx[:, :1], x, good, disable=True)
    with pytest.raises(TypeError, match="returned dtype"):
        K.sample_dpmpp_2m(lambda xx, s: xx.double(), x, good, disable=True)
    with pytest.raises(ValueError, match="order"):
        K.sample_lms(model, x, good, disable=True, order=0)
    with pytest.raises(ValueError, match="solver_type"):
        K.sample_dpmpp_2m_sde(model, x, good, disable=True, solver_type="rk4")
    with pytest.raises(ValueError, match="r must be > 0"):
        K.sample_dpmpp_sde(model, x, good, disable=True, r=0.0)
    with pytest.raises(ValueError, match="s_churn"):
        K.sample_euler(model, x, good, disable=True, s_churn=-1.0)
    with pytest.raises(ValueError, match="noise_sampler.*shape"):
        K.sample_euler_ancestral(model, x, good, disable=True, noise_sampler=lambda a, b: torch.zeros(1))


def test_nan_in_model_output_is_not_hidden():
    sigmas = K.get_sigmas_karras(5, 0.05, 12.0)
    x = start(n=4)

    def model(xx, s):
        out = xx / (1 + s[:, None] ** 2)
        out[1, 0] = float("nan")
        return out

    for name in ("euler", "heun", "dpmpp_2m", "lms", "dpmpp_3m_sde"):
        out = getattr(K, "sample_" + name)(model, x, sigmas, disable=True)
        assert torch.isnan(out[1]).any() and torch.isfinite(out[0]).all()


def test_repeated_calls_reuse_the_plan_and_stay_exact(KS):
    """A second call with the same sampler, arguments and sigmas reuses the cached plan and its device
    tables (no host math, no table upload); other sigmas, another batch size and a model that edits
    its sigma argument in place still give k-diffusion's results."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.__name__.split(".")[0])
            return func(*args, **(kwargs or {}))

    model = mixture(torch.float32).denoiser
    x = start()
    sig = K.get_sigmas_karras(12, 0.02, 20.0)
    first, ref = run_pair(KS, "dpmpp_2m", x, sig, model)
    assert_rel(first, ref, 1e-5)
    with Ops() as ops:
        again = K.sample_dpmpp_2m(model, x, sig, disable=True)
    assert torch.equal(again, first)
    # per call: the sigma read (one _to_copy), the step index and history buffers; per step: the
    # model's own ops and the step. No table build (lift_fresh + _to_copy of the plan rows).
    assert "lift_fresh" not in ops.names and ops.names.count("_to_copy") <= 1, ops.names
    assert ops.names.count("sampler_step_out") == 12
    out, ref = run_pair(KS, "dpmpp_2m", x, K.get_sigmas_karras(12, 0.03, 20.0), model)  # other sigmas
    assert_rel(out, ref, 1e-5)
    out, ref = run_pair(KS, "dpmpp_2m", x[:5], sig, model)  # another batch size
    assert_rel(out, ref, 1e-5)

    def editing(x, sigma):
        out = model(x, sigma)
        sigma.mul_(2.0)  # a model that modifies its argument in place
        return out

    want = KS.sample_euler(editing, x, sig, disable=True)
    for _ in range(2):  # the second call must not see the first call's edits
        assert_rel(K.sample_euler(editing, x, sig, disable=True), want, 1e-5)


SIGMA_CHECKED = ("euler", "heun", "dpmpp_2m", "dpmpp_2s_ancestral", "dpmpp_sde", "lms", "dpm_2", "dpm_2_ancestral")


class SigmaRecorder:
    """A denoiser that records (dtype, device, shape, values) of every sigma it receives."""

    def __init__(self):
        self.seen = []

    def __call__(self, x, sigma):
        self.seen.append((sigma.dtype, sigma.device, tuple(sigma.shape), sigma.clone()))
        return x / (1 + sigma.to(torch.float64)[:, None] ** 2).to(x.dtype)


@pytest.mark.parametrize("x_dtype,sigma_dtype", [(torch.float32, torch.float64), (torch.float16, torch.float32),
                                                 (torch.bfloat16, torch.float32), (torch.float64, torch.float32),
                                                 (torch.float32, torch.float32)])
@pytest.mark.parametrize("name", SIGMA_CHECKED)
def test_model_sigma_is_kdiffusions(KS, name, x_dtype, sigma_dtype):
    """The model gets sigma·s_in exactly as k-diffusion passes it: x's dtype (type promotion of a 0-d
    sigmas element times a 1-D x-dtype tensor), x's device, shape (B,), the same values (midpoint sigmas
    too: computed in the sigmas' dtype as k-diffusion does, not rounded from float64)."""
    sigmas = K.get_sigmas_karras(7, 0.05, 14.0).to(sigma_dtype)
    x = start(n=5, dtype=x_dtype)
    kw = dict(s_churn=1.0) if name in CHURN else {}
    ours, theirs = SigmaRecorder(), SigmaRecorder()
    for impl, rec in ((K, ours), (KS, theirs)):  # (churn noise differs between the two; the sigmas do not)
        fn = getattr(impl, "sample_" + name)
        extra = dict(noise_sampler=QueueNoise(x)) if "noise_sampler" in inspect.signature(fn).parameters else {}
        fn(rec, x, sigmas, disable=True, **kw, **extra)
    assert len(ours.seen) == len(theirs.seen) > 0
    for (dt, dev, shape, val), (rdt, rdev, rshape, rval) in zip(ours.seen, theirs.seen):
        assert rdt == x_dtype and rdev == x.device and rshape == (x.shape[0],)  # what k-diffusion passes
        assert (dt, dev, shape) == (rdt, rdev, rshape)
        assert torch.equal(val, rval), (val, rval)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.cuda
@pytest.mark.parametrize("name", ["euler", "dpmpp_2m"])
def test_model_sigma_on_x_device(KS, name):
    """Sigmas on the CPU, x on CUDA: the model's sigma is on x's device (k-diffusion's too: a CPU 0-d
    sigmas element times a CUDA s_in)."""
    sigmas = K.get_sigmas_karras(6, 0.05, 14.0)
    x = start(n=4).cuda()
    ours, theirs = SigmaRecorder(), SigmaRecorder()
    getattr(K, "sample_" + name)(ours, x, sigmas, disable=True)
    getattr(KS, "sample_" + name)(theirs, x, sigmas, disable=True)
    assert len(ours.seen) == len(theirs.seen)
    for (dt, dev, shape, val), (rdt, rdev, rshape, rval) in zip(ours.seen, theirs.seen):
        assert (dt, dev, shape) == (rdt, rdev, rshape) == (x.dtype, x.device, (4,))
        assert torch.equal(val, rval)


class InputKeeper:
    """A denoiser that keeps a reference and a clone of every tensor it is given and returns."""

    def __init__(self):
        self.kept = []

    def __call__(self, x, sigma, cond=None):
        out = x / (1 + sigma[:, None] ** 2) + 0.01 * cond
        for t in (x, sigma, cond, out):
            self.kept.append((t, t.clone()))
        return out

    def check(self):
        assert self.kept
        for i, (ref, copy) in enumerate(self.kept):
            assert torch.equal(ref, copy), f"tensor {i} handed to/from the model was modified afterwards"


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("with_callback", [False, True])
@pytest.mark.parametrize("name", ["euler", "heun", "dpmpp_2m", "dpmpp_2s_ancestral", "dpmpp_sde", "lms",
                                  "dpmpp_3m_sde", "euler_ancestral"])
def test_model_inputs_are_never_modified(KS, name, with_callback, backend):
    """k-diffusion never writes a tensor it handed to the model (nor the caller's x): a model or wrapper
    that keeps its inputs must see them unchanged after sampling."""
    sigmas = K.get_sigmas_karras(5 if backend == "triton" else 7, 0.05, 14.0)
    x = start(n=4)
    x_copy = x.clone()
    cond = torch.full_like(x, 0.5)
    kept_cb = []
    cb = (lambda d: kept_cb.append((d["x"], d["x"].clone()))) if with_callback else None
    model = InputKeeper()
    with pygen.use_backend(backend):
        out = getattr(K, "sample_" + name)(model, x, sigmas, extra_args={"cond": cond}, callback=cb, disable=True)
    model.check()
    assert torch.equal(x, x_copy) and torch.equal(cond, torch.full_like(x, 0.5))
    assert all(torch.equal(a, b) for a, b in kept_cb)
    assert not any(t.data_ptr() == out.data_ptr() for t, _ in model.kept[::4])
    # the reference behaves the same (the test's premise), and the results agree
    ref_model = InputKeeper()
    ref_fn = getattr(KS, "sample_" + name)
    extra = dict(noise_sampler=QueueNoise(x)) if name in NOISY else {}
    ref = ref_fn(ref_model, x, sigmas, extra_args={"cond": cond}, disable=True, **extra)
    ref_model.check()
    assert len(ref_model.kept) == len(model.kept)
    if name not in NOISY:
        assert_rel(out, ref, 1e-5)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("keep", ["nothing", "view", "list", "storage", "weakref", "callback_view"])
@pytest.mark.parametrize("name", ["euler", "heun", "dpmpp_2m", "euler_ancestral"])
def test_buffers_reused_only_when_unobserved(name, keep, backend):
    """The loop writes into an earlier x only when nothing else refers to it: with nothing kept it
    runs on at most two buffers (no per-step allocation, no page faults on the CPU); a kept view, a
    kept reference or a callback's view of x forces fresh outputs, and what was kept never changes."""
    sigmas = K.get_sigmas_karras(5 if backend == "triton" else 8, 0.05, 14.0)
    x = start(n=4)
    seen, kept, refs, snapshots = [], [], [], []

    def model(v, s):
        seen.append(v.data_ptr())
        if keep == "view":
            kept.append((v[:2], v[:2].clone()))
        elif keep == "list":
            kept.append((v, v.clone()))
        elif keep in ("storage", "weakref"):
            snapshots.append(v.clone())
            # the storage object alone (as torch.save / shared-memory code keep it), or a weak reference
            refs.append(v.untyped_storage() if keep == "storage" else weakref.ref(v))
        return v * (1.0 / (1.0 + s * s)).view(-1, 1)

    cb = (lambda d: kept.append((d["x"][1:], d["x"][1:].clone()))) if keep == "callback_view" else None
    with pygen.use_backend(backend):
        out = getattr(K, "sample_" + name)(model, x.clone(), sigmas, callback=cb, disable=True)
    assert all(torch.equal(a, b) for a, b in kept)
    if keep == "storage":  # the kept storages hold what the model was given
        for st, snap in zip(refs, snapshots):
            assert torch.equal(torch.empty(0, dtype=snap.dtype).set_(st).view(snap.shape), snap)
    if keep == "weakref":  # the weakly held inputs that are still alive were not written
        alive = [(r(), snap) for r, snap in zip(refs, snapshots) if r() is not None]
        assert all(torch.equal(t, snap) for t, snap in alive)
    if keep == "nothing" and backend != "triton":
        assert len(set(seen)) <= 2, f"{len(set(seen))} buffers for {len(seen)} model calls"
    elif keep == "nothing":  # Triton's CPU interpreter keeps references to some of the storages it ran on
        pass  # (for a while): the loop then, rightly, takes fresh outputs, and freed ones may recur
    else:
        # every model input stays alive when the model keeps it (view, list, storage): none is written, so
        # the addresses are all distinct; a weakref or a callback's view (of the step's first x only, not of
        # a two-stage sampler's midpoint) lets freed inputs go, and their memory may recur
        if keep not in ("callback_view", "weakref"):
            assert len(set(seen)) == len(seen) and all(out.data_ptr() != p for p in seen[1:])
    with pygen.use_backend(backend):
        again = getattr(K, "sample_" + name)(lambda v, s: v * (1.0 / (1.0 + s * s)).view(-1, 1), x.clone(), sigmas,
                                             disable=True)
    if name != "euler_ancestral":  # (a new Philox key per call)
        assert torch.equal(out, again)


def test_buffer_reuse_rule_probed_on_this_interpreter(monkeypatch):
    """The reference-count rule _unobserved relies on is checked at import (True on CPython 3.11-3.13);
    when it does not hold, every launch writes a fresh tensor."""
    assert K._REUSE_OK and K._probe_reuse_rule()
    monkeypatch.setattr(K, "_REUSE_OK", False)
    seen = []

    def model(v, s):
        seen.append(v.data_ptr())
        return v * 0.5

    K.sample_euler(model, start(n=4), K.get_sigmas_karras(6, 0.05, 14.0), disable=True)
    assert len(set(seen)) == len(seen)
