"""Tests of the training API pygen.losses (issue 6): diffusion_loss, dsm_loss, vae_reparameterize, elbo,
ReplayBuffer, contrastive_divergence_step, nce_loss.

Every loss value and gradient is checked against a plain-torch reference written here (the math of the
docstrings, independent of pygen's own references), on the torch, compiled CPU and Triton (interpreter)
backends, in fp32/fp16/bf16 (+ fp64 gradcheck); plus determinism from the seed, per-row timesteps and
seeds, the model-calling conventions (the exact Gaussian-mixture predictors minimise the loss), bad input
and NaN reporting.
"""
import importlib.util
import math
import os

import pytest
import torch

import pygen
from pygen import losses
from pygen.ops._common import to_signed64
from pygen.ops.random import randn_reference

HAS_TRITON = importlib.util.find_spec("triton") is not None
BACKENDS = ["torch", "cpu", "triton"]
PREDICTIONS = ["eps", "v", "x0", "flow"]
WEIGHTINGS = ["uniform", "min_snr", "snr", "edm"]
LANE = 3 << 62


def require(backend):
    if backend == "triton":
        if not HAS_TRITON:
            pytest.skip("triton is not installed")
        if os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1")
        if importlib.util.find_spec("pygen.kernels.loss") is None:
            pytest.skip("the Triton loss kernels (kernels/loss.py) are not in this tree")
    status = pygen.backends()[backend]
    if status != "available":
        pytest.skip(f"backend {backend} unavailable: {status}")


def gen(seed=1234):
    return torch.Generator().manual_seed(seed)


def rows(x):
    return x.reshape(x.shape[0], -1)


def bview(v, ndim):
    return v.reshape((-1,) + (1,) * (ndim - 1))


def schedule():
    return pygen.schedules.NoiseSchedule()  # float64 tables, DDPM linear betas


class Affine(torch.nn.Module):
    """out = x·W + b + c·τ(t) elementwise (τ = t/1000 for int timesteps, t itself for float levels).

    Records its inputs and output (with retain_grad) so tests can check x_t, t and d loss / d out.
    """

    def __init__(self, tail, dtype=torch.float32, seed=0):
        super().__init__()
        g = gen(seed)
        self.W = torch.nn.Parameter((1 + 0.3 * torch.randn(tail, generator=g, dtype=torch.float64)).to(dtype))
        self.b = torch.nn.Parameter((0.2 * torch.randn(tail, generator=g, dtype=torch.float64)).to(dtype))
        self.c = torch.nn.Parameter(torch.tensor(0.5, dtype=dtype))

    def forward(self, x, t):
        self.x_t, self.t = x, t
        tau = t.to(x.dtype) / 1000 if not t.is_floating_point() else t.to(x.dtype)
        out = x * self.W + self.b + self.c * bview(tau, x.dim())
        if out.requires_grad:
            out.retain_grad()
        self.out = out
        return out


# ---------------------------------------------------------------------------
# plain-torch references
# ---------------------------------------------------------------------------
def ref_weight(prediction, weighting, a, s, gamma=5.0, sd=0.5):
    """Per-row weight from the definitions: lambda on the x0-space error times c² (x0 error = c·pred error)."""
    a, s = a.double(), s.double()
    if weighting == "uniform":
        return torch.ones_like(a)
    snr = a * a / (s * s)
    sigma2 = 1 / snr  # equivalent VE noise level
    lam = {"snr": snr, "min_snr": torch.clamp(snr, max=gamma),
           "edm": (sigma2 + sd * sd) / (sigma2 * sd * sd)}[weighting]
    c2 = {"eps": 1 / snr, "x0": torch.ones_like(a), "v": 1 / (snr + 1), "flow": s * s}[prediction]
    return lam * c2


def ref_target(prediction, x0, eps, a, s):
    a, s = bview(a, x0.dim()), bview(s, x0.dim())
    return {"eps": eps, "x0": x0, "v": a * eps - s * x0, "flow": eps - x0}[prediction]


def ref_levels(prediction, level):
    """(a, s) in float64 from the table value of each row (alphas_cumprod, or the flow sigma)."""
    level = level.double()
    if prediction == "flow":
        return 1 - level, level
    return level.sqrt(), (1 - level).sqrt()


def ref_x_t(x0, eps, a, s):
    """x_t as the ops compute it: coefficients rounded to fp32 (fp64 storage: fp64), fp32 math, storage rounding."""
    acc = torch.float64 if x0.dtype == torch.float64 else torch.float32
    a, s = bview(a.to(acc), x0.dim()), bview(s.to(acc), x0.dim())
    return (a * x0.to(acc) + s * eps.to(acc)).to(x0.dtype)


def ref_diffusion_rows(out, x0, eps, a, s, prediction, weighting, **kw):
    """w·mean((out - target)²) per row, float64."""
    tgt = ref_target(prediction, x0.double(), eps.double(), a, s)
    return ref_weight(prediction, weighting, a, s, **kw) * rows((out.double() - tgt) ** 2).mean(1)


def sampled_t(batch, seed, stream, n):
    u = torch.special.ndtr(randn_reference((batch,), seed, to_signed64(stream + LANE)).double())
    return torch.clamp((u * n).long(), max=n - 1)


def loss_tol(dtype):
    # The loss is an fp32 computation from storage-dtype inputs; x_t may round differently by an ulp of the
    # storage type (fused multiply-add in the kernels), which moves the model output by about as much.
    return {torch.float16: (4e-3, 1e-5), torch.bfloat16: (3e-2, 1e-4)}.get(dtype, (2e-5, 1e-6))


def grad_tol(dtype):
    return {torch.float16: (4e-3, 1e-4), torch.bfloat16: (3e-2, 1e-3)}.get(dtype, (1e-5, 1e-7))


# ---------------------------------------------------------------------------
# diffusion_loss: values and gradients vs the reference
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("weighting", WEIGHTINGS)
def test_diffusion_loss_matches_reference(backend, prediction, weighting):
    require(backend)
    g = gen(11)
    shape = (5, 3, 7)
    x0 = torch.randn(shape, generator=g)
    model = Affine(shape[1:])
    if prediction == "flow":
        table = torch.linspace(0.02, 0.98, 50, dtype=torch.float64)  # a sigma table, int t
    else:
        table = schedule().alphas_cumprod
    t = torch.randint(1, table.shape[0] - 1, (shape[0],), generator=g)
    with pygen.use_backend(backend):
        loss_rows = losses.diffusion_loss(model, x0, table if prediction == "flow" else schedule(), prediction,
                                          weighting, t=t, seed=77, stream=3, reduction="none")
    assert loss_rows.shape == (shape[0],) and loss_rows.dtype == torch.float32
    eps = randn_reference(shape, 77, 3)
    a, s = ref_levels(prediction, table[t])
    torch.testing.assert_close(model.x_t, ref_x_t(x0, eps, a, s), rtol=1e-5, atol=1e-6)
    if prediction == "flow":
        torch.testing.assert_close(model.t, table[t].float())  # the model gets sigma per row
    else:
        assert torch.equal(model.t, t)  # the model gets the int train timestep
    ref = ref_diffusion_rows(model.out.detach(), x0, eps, a, s, prediction, weighting)
    torch.testing.assert_close(loss_rows.double(), ref, rtol=2e-5, atol=1e-6)
    # gradient w.r.t. the model output (the fused backward) vs autograd through the plain formula
    loss_rows.sum().backward()
    out = model.out.detach().double().requires_grad_(True)
    ref_diffusion_rows(out, x0, eps, a, s, prediction, weighting).sum().backward()
    torch.testing.assert_close(model.out.grad.double(), out.grad, rtol=1e-5, atol=1e-7)
    # and the parameter gradients are those of the chain rule through the model
    assert model.W.grad is not None and torch.isfinite(model.W.grad).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(4, 2, 3, 5), (3, 1001), (1, 4)])
@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_diffusion_loss_dtypes(backend, dtype, shape, prediction):
    require(backend)
    g = gen(5)
    x0 = torch.randn(shape, generator=g).to(dtype)
    model = Affine(shape[1:], dtype)
    sched = schedule()
    t = torch.randint(0, 1000, (shape[0],), generator=g)
    with pygen.use_backend(backend):
        loss = losses.diffusion_loss(model, x0, sched, prediction, "min_snr", t=t, seed=9, stream=1)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    eps = randn_reference(shape, 9, 1)
    a, s = ref_levels(prediction, sched.alphas_cumprod[t])
    rtol, atol = loss_tol(dtype)
    torch.testing.assert_close(model.x_t.double(), ref_x_t(x0, eps, a, s).double(), rtol=rtol, atol=atol * 10)
    # the loss of the output the model actually produced: fp32 math on storage-dtype inputs
    ref = ref_diffusion_rows(model.out.detach(), x0, eps, a, s, prediction, "min_snr").mean()
    torch.testing.assert_close(loss.double(), ref, rtol=2e-5 if dtype == torch.float32 else 1e-4, atol=1e-6)
    loss.backward()
    out = model.out.detach().double().requires_grad_(True)
    ref_diffusion_rows(out, x0, eps, a, s, prediction, "min_snr").mean().backward()
    assert model.out.grad.dtype == dtype
    rtol, atol = grad_tol(dtype)
    torch.testing.assert_close(model.out.grad.double(), out.grad.to(dtype).double(), rtol=rtol, atol=atol)


def half_eps(dtype):
    return torch.finfo(dtype).eps


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("prediction", ["x0", "flow"])
@pytest.mark.parametrize("weighting", WEIGHTINGS)
def test_diffusion_loss_half_x0_and_flow(backend, dtype, prediction, weighting):
    """fp16/bf16 x0- and flow-prediction, every weighting: the per-row values, d loss / d out and the model's
    parameter gradients against a float64 reference of the formulas (on the values the model produced)."""
    require(backend)
    g = gen(17)
    shape = (6, 3, 5)
    x0 = torch.randn(shape, generator=g).to(dtype)
    model = Affine(shape[1:], dtype, seed=3)
    if prediction == "flow":  # continuous sigmas given per row (float)
        sched, t = None, 0.05 + 0.9 * torch.rand(shape[0], generator=g)
        a, s = ref_levels("flow", t)
    else:
        sched, t = schedule(), torch.randint(0, 1000, (shape[0],), generator=g)
        a, s = ref_levels("x0", schedule().alphas_cumprod[t])
    with pygen.use_backend(backend):
        r = losses.diffusion_loss(model, x0, sched, prediction, weighting, t=t, seed=21, stream=5, reduction="none")
    assert r.shape == (shape[0],) and r.dtype == torch.float32 and torch.isfinite(r).all()
    if prediction == "flow":
        assert model.t.dtype == dtype and torch.equal(model.t, t.to(dtype))
    else:
        assert torch.equal(model.t, t)
    eps = randn_reference(shape, 21, 5)
    rtol, atol = loss_tol(dtype)
    torch.testing.assert_close(model.x_t.double(), ref_x_t(x0, eps, a, s).double(), rtol=rtol, atol=atol * 10)
    # the value: an fp32 computation on the storage-dtype model output and data
    out_ref = model.out.detach().double().requires_grad_(True)
    ref = ref_diffusion_rows(out_ref, x0, eps, a, s, prediction, weighting)
    torch.testing.assert_close(r.double(), ref.detach(), rtol=2e-5, atol=1e-7)
    # gradients: a random cotangent per row, into the output and (chain rule) into W, b, c
    gr = torch.randn(shape[0], generator=g)
    (r * gr).sum().backward()
    (ref * gr.double()).sum().backward()
    g_out = out_ref.grad
    assert model.out.grad.dtype == dtype
    rtol, atol = grad_tol(dtype)
    torch.testing.assert_close(model.out.grad.double(), g_out.to(dtype).double(), rtol=rtol,
                               atol=atol * g_out.abs().max().item())
    x_t = model.x_t.double()
    tau = bview(t.to(dtype).double() if prediction == "flow" else t.double() / 1000, x0.dim())
    ulp = 4 * half_eps(dtype)  # each product and the batch sum are computed in the storage dtype
    for got, terms in ((model.W.grad, g_out * x_t), (model.b.grad, g_out), (model.c.grad, g_out * tau)):
        dims = tuple(range(terms.dim() - got.dim()))
        want, bound = terms.sum(dims), terms.abs().sum(dims)
        if got.dim() == 0:
            want, bound = terms.sum(), terms.abs().sum()
        assert got.dtype == dtype and got.shape == want.shape
        assert ((got.double() - want).abs() <= ulp * bound + 1e-12).all(), (got, want)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_diffusion_loss_default_is_ddpm_simple_loss(backend):
    """The default case equals mean ||eps - eps_theta(sqrt(abar) x0 + sqrt(1-abar) eps, t)||² with sampled t."""
    require(backend)
    x0 = torch.randn(8, 2, 5, generator=gen(3))
    model = Affine((2, 5))
    with pygen.use_backend(backend):
        loss = losses.diffusion_loss(model, x0, seed=123, stream=4)  # schedule None: DDPM linear betas
    t = sampled_t(8, 123, 4, 1000)
    assert torch.equal(model.t, t)
    abar = bview(schedule().alphas_cumprod[t], 3)
    eps = randn_reference(x0.shape, 123, 4).double()
    x_t = (abar.sqrt() * x0.double() + (1 - abar).sqrt() * eps).float()
    with torch.no_grad():
        expect = torch.nn.functional.mse_loss(model(x_t, t).double(), eps)
    torch.testing.assert_close(loss.double(), expect, rtol=2e-5, atol=1e-7)


def test_diffusion_loss_reductions_and_schedule_forms():
    x0 = torch.randn(6, 4, generator=gen(2))
    model = Affine((4,))
    sched = schedule()
    r = losses.diffusion_loss(model, x0, sched, seed=1, reduction="none")
    torch.testing.assert_close(losses.diffusion_loss(model, x0, sched, seed=1), r.mean())
    torch.testing.assert_close(losses.diffusion_loss(model, x0, sched, seed=1, reduction="sum"), r.sum())
    # the same schedule as a float32 table, a float64 table, a diffusers-like object
    for form in (sched.alphas_cumprod, sched.alphas_cumprod.float(), type("S", (), {"alphas_cumprod":
                                                                                    sched.alphas_cumprod.float()})()):
        torch.testing.assert_close(losses.diffusion_loss(model, x0, form, seed=1, reduction="none"), r,
                                   rtol=1e-5, atol=1e-7)


def test_schedule_table_copies_and_checks_follow_in_place_changes():
    x0 = torch.randn(4, 3, generator=gen(3))
    model = Affine((3,))
    table = schedule().alphas_cumprod.to(torch.float16)  # converted to float32 once, then reused
    t = torch.tensor([1, 300, 600, 999])
    a = losses.diffusion_loss(model, x0, table, t=t, seed=2, reduction="none")
    assert torch.equal(losses.diffusion_loss(model, x0, table, t=t, seed=2, reduction="none"), a)
    ref = losses.diffusion_loss(model, x0, table.float(), t=t, seed=2, reduction="none")
    assert torch.equal(a, ref)
    table[300] = 0.5  # an in-place change is seen (new version: a new copy)
    b = losses.diffusion_loss(model, x0, table, t=t, seed=2, reduction="none")
    assert not torch.equal(a[1], b[1]) and torch.equal(a[[0, 2, 3]], b[[0, 2, 3]])
    table[0] = 2.0  # ... and checked again
    with pytest.raises(ValueError, match="alphas_cumprod values in"):
        losses.diffusion_loss(model, x0, table, t=t, seed=2)


def test_diffusion_loss_accepts_a_diffusers_scheduler():
    diffusers = pytest.importorskip("diffusers")
    x0 = torch.randn(4, 3, generator=gen(8))
    model = Affine((3,))
    sched = diffusers.DDPMScheduler(num_train_timesteps=1000)
    a = losses.diffusion_loss(model, x0, sched, "v", seed=5, reduction="none")
    b = losses.diffusion_loss(model, x0, schedule(), "v", seed=5, reduction="none")
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_diffusion_loss_unwraps_diffusers_style_outputs():
    x0 = torch.randn(3, 4, generator=gen(1))
    model = Affine((4,))
    ref = losses.diffusion_loss(model, x0, seed=2)

    class Out:
        def __init__(self, sample):
            self.sample = sample
    assert torch.equal(losses.diffusion_loss(lambda x, t: Out(model(x, t)), x0, seed=2), ref)
    assert torch.equal(losses.diffusion_loss(lambda x, t: (model(x, t),), x0, seed=2), ref)
    # model_kwargs are passed through
    got = losses.diffusion_loss(lambda x, t, scale: model(x, t) * scale, x0, seed=2, model_kwargs={"scale": 1.0})
    assert torch.equal(got, ref)


# ---------------------------------------------------------------------------
# timesteps: sampled vs given, determinism, per-row seeds
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_sampled_t_is_deterministic_and_per_row(backend):
    require(backend)
    x0 = torch.randn(16, 3, generator=gen(4))
    model = Affine((3,))
    with pygen.use_backend(backend):
        a = losses.diffusion_loss(model, x0, seed=42, stream=7, reduction="none")
        t_a = model.t.clone()
        b = losses.diffusion_loss(model, x0, seed=42, stream=7, reduction="none")
        assert torch.equal(a, b) and torch.equal(model.t, t_a)
        # given t equal to the sampled ones: the same loss
        c = losses.diffusion_loss(model, x0, t=t_a, seed=42, stream=7, reduction="none")
        assert torch.equal(a, c)
        # another stream: other timesteps and noise
        losses.diffusion_loss(model, x0, seed=42, stream=8, reduction="none")
        assert not torch.equal(model.t, t_a)
    assert torch.equal(t_a, sampled_t(16, 42, 7, 1000))  # the documented draw, on every backend
    assert t_a.unique().numel() > 8  # different t per row


@pytest.mark.parametrize("n", [1, 2, 3, 7, 1000, 4096])
def test_sampled_t_search_equals_the_float64_formula(n):
    """The sampled t is found by searching z among float32 thresholds (two device ops instead of the
    float64 Φ(z)·n chain): it must equal min(⌊Φ(z)·n⌋, n - 1) with Φ in float64 for every float32 z,
    including each threshold, its float32 neighbours and the extremes."""
    from pygen.losses import _t_thresholds

    z = [torch.randn(100000, generator=gen(n)), torch.tensor([0.0, -0.0, 1e-30, -1e-30, 8.5, -8.5, 40.0, -40.0,
                                                              float("inf"), float("-inf")])]
    if n > 1:
        thr = _t_thresholds(n, torch.device("cpu"))
        assert thr.dtype == torch.float32 and thr.shape == (n - 1,)
        near = thr
        for _ in range(3):  # the thresholds and 3 float32 steps either side
            near = torch.cat([near, torch.nextafter(near, torch.tensor(math.inf)),
                              torch.nextafter(near, torch.tensor(-math.inf))])
        z.append(near)
    z = torch.cat(z).to(torch.float32)
    want = torch.clamp((torch.special.ndtr(z.double()) * n).long(), max=n - 1)
    got = torch.searchsorted(thr, z, right=True) if n > 1 else torch.zeros_like(want)
    assert torch.equal(got, want)


@pytest.mark.parametrize("prediction,weighting", [("eps", "uniform"), ("v", "min_snr"), ("flow", "edm")])
def test_diffusion_loss_device_ops_per_call(prediction, weighting):
    """After the first call with a table (its coefficient rows and t thresholds are made once), a call
    dispatches: the t normal and its search, one gather of the coefficients, q_sample, the model, the fused
    loss and the mean (plus, on the CPU backend, the one eps draw both ops read). Each is a launch on a
    GPU: the coefficient arithmetic per call (a, s, weights, stack: 14 more ops) must not come back."""
    from torch.utils._python_dispatch import TorchDispatchMode

    require("cpu")

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.__name__.split(".")[0] not in ("empty", "empty_like", "empty_strided", "view", "expand",
                                                   "as_strided", "detach", "alias", "reshape", "_unsafe_view"):
                self.ops.append(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    x0 = torch.randn(6, 3, generator=gen(2))
    table = schedule().alphas_cumprod if prediction != "flow" else torch.linspace(0.0, 1.0, 50)

    def model(x, t):
        return x * 0.5

    with pygen.use_backend("cpu"):
        kw = dict(prediction_type=prediction, weighting=weighting, seed=3, stream=1)
        losses.diffusion_loss(model, x0, table, **kw)
        with Count() as c:
            losses.diffusion_loss(model, x0, table, **kw)
    want = (["pygen.randn_fill_", "aten.searchsorted", "aten.index_select"]
            + (["aten.index_select"] if prediction == "flow" else [])  # (flow: the model's sigma)
            + ["pygen.randn_fill_", "pygen.q_sample", "aten.mul", "pygen.diffusion_loss", "aten.mean"])
    assert c.ops == want, c.ops


def test_coefficient_cache_and_a_table_that_requires_grad_or_changes():
    """The per-table coefficient rows are cached, but never for a table that requires grad (each call
    differentiates into the table, twice in a row too, with the gradient of the uncached computation),
    and a table changed in place (a new version) gets new rows."""
    x0 = torch.randn(6, 3, generator=gen(21))

    def model(x, t):
        return x * 0.5

    tab = torch.linspace(0.99, 0.01, 50, requires_grad=True)
    grads = []
    for _ in range(2):
        tab.grad = None
        losses.diffusion_loss(model, x0, tab, "v", "snr", seed=4, stream=1).backward()
        grads.append(tab.grad.clone())
    assert torch.equal(grads[0], grads[1]) and grads[0].abs().sum() > 0
    with torch.no_grad():  # cached under no_grad: a later call with grad still reaches the table
        losses.diffusion_loss(model, x0, tab, "v", "snr", seed=4, stream=1)
    tab.grad = None
    losses.diffusion_loss(model, x0, tab, "v", "snr", seed=4, stream=1).backward()
    assert torch.equal(tab.grad, grads[0])
    fixed = torch.linspace(0.99, 0.01, 50)
    a = losses.diffusion_loss(model, x0, fixed, "eps", "min_snr", seed=4, stream=1, reduction="none")
    fixed.mul_(0.5)  # a new version: new coefficient rows
    b = losses.diffusion_loss(model, x0, fixed, "eps", "min_snr", seed=4, stream=1, reduction="none")
    c = losses.diffusion_loss(model, x0, fixed.clone(), "eps", "min_snr", seed=4, stream=1, reduction="none")
    assert not torch.equal(a, b) and torch.equal(b, c)


def test_sampled_t_is_uniform():
    x0 = torch.zeros(4000, 1)
    model = Affine((1,))
    with torch.no_grad():
        losses.diffusion_loss(model, x0, schedule(), seed=3)
    counts = torch.bincount(model.t // 100, minlength=10).double()
    # 400 expected per bin; sd = sqrt(4000·0.1·0.9) = 19: 6 sd
    assert (counts - 400).abs().max() < 115, counts
    assert model.t.min() >= 0 and model.t.max() <= 999


@pytest.mark.parametrize("sampling", ["uniform", "logit_normal"])
def test_flow_continuous_sigma_sampling(sampling):
    x0 = torch.randn(4000, 2, generator=gen(9))
    model = Affine((2,))
    with torch.no_grad():
        r = losses.diffusion_loss(model, x0, None, "flow", seed=6, flow_time_sampling=sampling, reduction="none")
    sig = model.t.double()
    z = randn_reference((4000,), 6, to_signed64(LANE)).double()
    expect = torch.special.ndtr(z) if sampling == "uniform" else torch.sigmoid(z)
    torch.testing.assert_close(sig, expect.float().double())
    assert 0 <= sig.min() and sig.max() <= 1
    assert abs(sig.mean().item() - 0.5) < 0.02
    if sampling == "uniform":
        assert abs(sig.var().item() - 1 / 12) < 0.006
    # x_t = (1 - sigma)·x0 + sigma·eps
    eps = randn_reference(x0.shape, 6, 0)
    torch.testing.assert_close(model.x_t, ref_x_t(x0, eps, 1 - sig, sig), rtol=1e-5, atol=1e-6)
    assert torch.isfinite(r).all()


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_flow_given_sigma_rows(backend):
    require(backend)
    x0 = torch.randn(5, 3, generator=gen(10))
    sig = torch.tensor([0.1, 0.5, 0.9, 0.3, 0.7])
    model = Affine((3,))
    with pygen.use_backend(backend):
        r = losses.diffusion_loss(model, x0, None, "flow", "min_snr", t=sig, seed=3, reduction="none")
    eps = randn_reference(x0.shape, 3, 0)
    a, s = 1 - sig.double(), sig.double()
    torch.testing.assert_close(model.t, sig)
    torch.testing.assert_close(r.double(), ref_diffusion_rows(model.out.detach(), x0, eps, a, s, "flow", "min_snr"),
                               rtol=2e-5, atol=1e-7)
    # a Python float: the same sigma in every row
    with pygen.use_backend(backend):
        losses.diffusion_loss(model, x0, None, "flow", t=0.25, seed=3)
    assert torch.equal(model.t, torch.full((5,), 0.25))


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_per_row_seeds_make_rows_batch_independent(backend):
    require(backend)
    x0 = torch.randn(6, 2, 3, generator=gen(12))
    seeds = torch.randint(0, 2**40, (6,), generator=gen(13))
    model = Affine((2, 3))
    with pygen.use_backend(backend):
        full = losses.diffusion_loss(model, x0, seed=seeds, stream=2, reduction="none")
        t_full = model.t.clone()
        part = losses.diffusion_loss(model, x0[2:5], seed=seeds[2:5], stream=2, reduction="none")
    assert torch.equal(model.t, t_full[2:5])
    torch.testing.assert_close(part, full[2:5], rtol=0, atol=0)
    eps = randn_reference(x0.shape, 0, 2, seeds)
    a, s = ref_levels("eps", schedule().alphas_cumprod[t_full])
    with torch.no_grad():
        out = model(ref_x_t(x0, eps, a, s), t_full)
    torch.testing.assert_close(full.double(), ref_diffusion_rows(out, x0, eps, a, s, "eps", "uniform"),
                               rtol=2e-5, atol=1e-7)


def test_seed_none_uses_torch_global_generator():
    x0 = torch.randn(4, 3, generator=gen(1))
    model = Affine((3,))
    torch.manual_seed(5)
    a = losses.diffusion_loss(model, x0)
    torch.manual_seed(5)
    b = losses.diffusion_loss(model, x0)
    c = losses.diffusion_loss(model, x0)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_explicit_noise():
    x0 = torch.randn(4, 3, generator=gen(1))
    noise = torch.randn(4, 3, generator=gen(2))
    t = torch.tensor([10, 200, 500, 900])
    model = Affine((3,))
    r = losses.diffusion_loss(model, x0, schedule(), "x0", "snr", t=t, noise=noise, reduction="none")
    a, s = ref_levels("x0", schedule().alphas_cumprod[t])
    torch.testing.assert_close(model.x_t, ref_x_t(x0, noise, a, s), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(r.double(), ref_diffusion_rows(model.out.detach(), x0, noise, a, s, "x0", "snr"),
                               rtol=2e-5, atol=1e-6)


# ---------------------------------------------------------------------------
# conventions: the exact predictors of a Gaussian mixture minimise each loss
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_exact_mixture_predictor_minimises_the_loss(prediction):
    mix = pygen.models.clot(dtype=torch.float32)
    x0 = mix.sample(4096, gen(21))
    sched = schedule()
    if prediction == "flow":
        exact = mix.model_fn("flow")
        sched = None
    else:
        exact = mix.model_fn(prediction, alphas_cumprod=sched.alphas_cumprod)

    def loss(model):
        with torch.no_grad():
            return losses.diffusion_loss(model, x0, sched, prediction, seed=4).item()
    best = loss(exact)
    # (the same seed: the comparisons are paired, so small differences are meaningful)
    for bad in (lambda x, t: exact(x, t) * 1.3, lambda x, t: exact(x, t) + 0.2,
                lambda x, t: exact(x, t.flip(0))):  # a model that reads another row's t
        assert loss(bad) > best * 1.005, prediction
    # and with weighting the optimum is unchanged (per-row weights do not move the regression target)
    with torch.no_grad():
        w_best = losses.diffusion_loss(exact, x0, sched, prediction, "min_snr", seed=4).item()
        w_bad = losses.diffusion_loss(lambda x, t: exact(x, t) * 1.1, x0, sched, prediction, "min_snr", seed=4).item()
    assert w_bad > w_best


# ---------------------------------------------------------------------------
# gradcheck (fp64) through diffusion_loss / dsm_loss / vae_reparameterize
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_gradcheck_diffusion_loss(backend, prediction):
    require(backend)
    x0 = torch.randn(3, 4, generator=gen(31), dtype=torch.float64)
    lin = torch.randn(4, 4, generator=gen(32), dtype=torch.float64).requires_grad_(True)
    bias = torch.randn(4, generator=gen(33), dtype=torch.float64).requires_grad_(True)
    if prediction == "flow":
        sched, t = None, torch.tensor([0.2, 0.5, 0.8], dtype=torch.float64)
    else:
        sched, t = schedule(), torch.tensor([5, 400, 950])

    def f(W, b):
        with pygen.use_backend(backend):
            return losses.diffusion_loss(lambda x, tt: x @ W + b, x0, sched, prediction, "min_snr", t=t, seed=3,
                                         reduction="none")
    assert f(lin, bias).dtype == torch.float64
    assert torch.autograd.gradcheck(f, (lin, bias))


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_gradcheck_dsm_and_vae(backend):
    require(backend)
    x = torch.randn(3, 4, generator=gen(41), dtype=torch.float64)
    sig = torch.tensor([0.01, 0.1, 1.0, 10.0], dtype=torch.float64)
    W = torch.randn(4, 4, generator=gen(42), dtype=torch.float64).requires_grad_(True)

    def f(W):
        with pygen.use_backend(backend):
            return losses.dsm_loss(lambda xs, s: xs @ W / bview(s, 2) ** 2, x, sig, t=torch.tensor([0, 2, 3]),
                                   seed=5, reduction="none")
    assert torch.autograd.gradcheck(f, (W,))
    mu = torch.randn(3, 5, generator=gen(43), dtype=torch.float64).requires_grad_(True)
    lv = (0.3 * torch.randn(3, 5, generator=gen(44), dtype=torch.float64)).requires_grad_(True)

    def g(mu, lv):
        with pygen.use_backend(backend):
            return losses.vae_reparameterize(mu, lv, seed=9, stream=2)
    assert torch.autograd.gradcheck(g, (mu, lv))


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("likelihood", ["gaussian", "bernoulli"])
def test_gradcheck_elbo(backend, likelihood):
    """fp64 gradcheck of elbo: the analytic-KL form (w.r.t. x, x_recon, mu, logvar) and the form with the
    fused KL rows of vae_reparameterize (the backend's op) passed as kl=."""
    require(backend)
    x = torch.rand(3, 2, 4, generator=gen(45), dtype=torch.float64).requires_grad_(True)
    recon = torch.randn(3, 2, 4, generator=gen(46), dtype=torch.float64).requires_grad_(True)
    mu = torch.randn(3, 5, generator=gen(47), dtype=torch.float64).requires_grad_(True)
    lv = (0.3 * torch.randn(3, 5, generator=gen(48), dtype=torch.float64)).requires_grad_(True)

    def f(x, recon, mu, lv):
        with pygen.use_backend(backend):
            return losses.elbo(x, recon, mu, lv, likelihood, sigma=0.7, beta=0.5, reduction="none")

    def g(recon, mu, lv):
        with pygen.use_backend(backend):
            _, kl = losses.vae_reparameterize(mu, lv, seed=3, stream=1)
            return losses.elbo(x.detach(), recon, kl=kl, likelihood=likelihood, sigma=0.7, beta=0.5,
                               reduction="none")
    assert f(x, recon, mu, lv).dtype == torch.float64 and g(recon, mu, lv).dtype == torch.float64
    assert torch.autograd.gradcheck(f, (x, recon, mu, lv))
    assert torch.autograd.gradcheck(g, (recon, mu, lv))


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("nu", [None, 3.0])
def test_gradcheck_nce_loss(backend, nu):
    """fp64 gradcheck of nce_loss w.r.t. the model's parameters and the data samples."""
    require(backend)
    x = torch.randn(6, 2, generator=gen(49), dtype=torch.float64).requires_grad_(True)
    y = (2.0 * torch.randn(9, 2, generator=gen(50), dtype=torch.float64)).requires_grad_(True)
    mean = torch.tensor([0.3, -0.2], dtype=torch.float64, requires_grad=True)
    log_scale = torch.tensor([0.1, -0.3], dtype=torch.float64, requires_grad=True)
    c = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)

    def log_q(v):
        return (-0.5 * (v / 2.0).square() - math.log(2.0 * math.sqrt(2.0 * math.pi))).sum(1)

    def f(mean, log_scale, c, x, y):
        def log_p(v):
            return (-0.5 * ((v - mean) * torch.exp(-log_scale)).square() - log_scale).sum(1) - c
        with pygen.use_backend(backend):
            return losses.nce_loss(log_p, x, y, log_q, nu=nu)
    assert f(mean, log_scale, c, x, y).dtype == torch.float64
    assert torch.autograd.gradcheck(f, (mean, log_scale, c, x, y))


# ---------------------------------------------------------------------------
# dsm_loss
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dsm_loss_matches_reference(backend, dtype):
    require(backend)
    shape = (6, 2, 5)
    x = torch.randn(shape, generator=gen(51)).to(dtype)
    sigmas = torch.exp(torch.linspace(math.log(10.0), math.log(0.01), 10))  # NCSN's geometric levels
    model = Affine(shape[1:], dtype)
    with pygen.use_backend(backend):
        r = losses.dsm_loss(model, x, sigmas, seed=8, stream=3, reduction="none")
    t = sampled_t(shape[0], 8, 3, 10)
    sig = sigmas[t].double()
    torch.testing.assert_close(model.t, sigmas[t].to(dtype))  # the model gets sigma per row
    eps = randn_reference(shape, 8, 3).double()
    xs = x.double() + bview(sig, 3) * eps
    rtol, atol = loss_tol(dtype)
    torch.testing.assert_close(model.x_t.double(), xs.to(dtype).double(), rtol=rtol, atol=atol * 10)

    def ref(out):  # 0.5·lambda(σ)·mean(s + eps/σ)² with lambda = σ²
        return 0.5 * bview(sig, 1) ** 2 * rows((out.double() + eps / bview(sig, 3)) ** 2).mean(1)
    torch.testing.assert_close(r.double(), ref(model.out.detach()), rtol=2e-5 if dtype == torch.float32 else 1e-4,
                               atol=1e-6)
    r.mean().backward()
    out = model.out.detach().double().requires_grad_(True)
    ref(out).mean().backward()
    rtol, atol = grad_tol(dtype)
    torch.testing.assert_close(model.out.grad.double(), out.grad.to(dtype).double(), rtol=rtol, atol=atol)


def test_dsm_exact_score_minimises():
    mix = pygen.models.ring(dtype=torch.float32)
    x = mix.sample(4096, gen(52))
    sigmas = torch.exp(torch.linspace(math.log(5.0), math.log(0.05), 8))
    exact = mix.model_fn("score")  # f(x, sigma): the VE score of the noised mixture

    def loss(model):
        with torch.no_grad():
            return losses.dsm_loss(model, x, sigmas, seed=3).item()
    best = loss(exact)
    assert loss(lambda x, s: exact(x, s) * 1.3) > best * 1.02
    assert loss(lambda x, s: exact(x, s.flip(0))) > best * 1.02


# ---------------------------------------------------------------------------
# VAE
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(4, 7), (3, 2, 5)])
def test_vae_reparameterize_matches_reference(backend, dtype, shape):
    require(backend)
    g = gen(61)
    mu = torch.randn(shape, generator=g).to(dtype).requires_grad_(True)
    lv = (0.5 * torch.randn(shape, generator=g)).to(dtype).requires_grad_(True)
    with pygen.use_backend(backend):
        z, kl = losses.vae_reparameterize(mu, lv, seed=17, stream=4)
    assert z.shape == shape and z.dtype == dtype and kl.shape == (shape[0],) and kl.dtype == torch.float32
    eps = randn_reference(shape, 17, 4).double()
    m, l = mu.detach().double().requires_grad_(True), lv.detach().double().requires_grad_(True)
    z_ref = m + torch.exp(l / 2) * eps
    kl_ref = 0.5 * rows(m ** 2 + l.exp() - 1 - l).sum(1)
    rtol, atol = loss_tol(dtype)
    torch.testing.assert_close(z.double(), z_ref.detach().to(dtype).double(), rtol=rtol, atol=atol * 10)
    torch.testing.assert_close(kl.double(), kl_ref.detach(), rtol=2e-5 if dtype == torch.float32 else 1e-4, atol=1e-5)
    gz = torch.randn(shape, generator=g)
    gk = torch.randn(shape[0], generator=g)
    ((z.float() * gz).sum() + (kl * gk).sum()).backward()
    ((z_ref * gz.double()).sum() + (kl_ref * gk.double()).sum()).backward()
    rtol, atol = grad_tol(dtype)
    for got, want in ((mu.grad, m.grad), (lv.grad, l.grad)):
        torch.testing.assert_close(got.double(), want.to(dtype).double(), rtol=rtol, atol=max(atol, 1e-5))


def _elbo_reference(xd, rd, md, ld, likelihood):
    """Per-row negative ELBO with torch.distributions (sigma 0.7, beta 0.5), in float64."""
    if likelihood == "gaussian":
        nll = -torch.distributions.Normal(rd, 0.7).log_prob(xd).reshape(xd.shape[0], -1).sum(1)
    else:
        nll = -torch.distributions.Bernoulli(logits=rd, validate_args=False).log_prob(xd).reshape(xd.shape[0], -1).sum(1)
    kl = torch.distributions.kl_divergence(torch.distributions.Normal(md, torch.exp(ld / 2)),
                                           torch.distributions.Normal(0.0, 1.0)).sum(1)
    return nll + 0.5 * kl


@pytest.mark.parametrize("likelihood", ["gaussian", "bernoulli"])
def test_elbo_matches_reference(likelihood):
    g = gen(62)
    x = torch.rand(5, 3, 4, generator=g)
    recon = torch.randn(5, 3, 4, generator=g, requires_grad=True)
    mu = torch.randn(5, 6, generator=g, requires_grad=True)
    lv = (0.3 * torch.randn(5, 6, generator=g)).requires_grad_(True)
    loss = losses.elbo(x, recon, mu, lv, likelihood, sigma=0.7, beta=0.5, reduction="none")
    xd, rd, md, ld = (v.detach().double().requires_grad_(True) for v in (x, recon, mu, lv))
    ref = _elbo_reference(xd, rd, md, ld, likelihood)
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-5)
    loss.sum().backward()
    ref.sum().backward()
    for got, want in ((recon.grad, rd.grad), (mu.grad, md.grad), (lv.grad, ld.grad)):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    # fused KL from vae_reparameterize gives the same value
    _, kl_rows = losses.vae_reparameterize(mu, lv, seed=1)
    torch.testing.assert_close(losses.elbo(x, recon, kl=kl_rows, likelihood=likelihood, sigma=0.7, beta=0.5,
                                           reduction="none"), loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(losses.elbo(x, recon, mu, lv, likelihood, sigma=0.7, beta=0.5), loss.mean())
    torch.testing.assert_close(losses.elbo(x, recon, mu, lv, likelihood, sigma=0.7, beta=0.5, reduction="sum"),
                               loss.sum())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("likelihood", ["gaussian", "bernoulli"])
def test_elbo_half_matches_reference(backend, dtype, likelihood):
    """fp16/bf16 data, decoder output and posterior: the loss is an fp32 computation on the stored values
    (compared to torch.distributions in float64), the gradients are the float64 ones rounded to the storage
    dtype; with the analytic KL and with the fused KL rows of vae_reparameterize (the backend's op)."""
    require(backend)
    g = gen(63)
    shape = (5, 3, 4)
    x = torch.rand(shape, generator=g).to(dtype)
    if likelihood == "bernoulli":
        x[0] = torch.rand(shape[1:], generator=g).round().to(dtype)  # some binary rows too
    recon = torch.randn(shape, generator=g).to(dtype).requires_grad_(True)
    mu = torch.randn(5, 6, generator=g).to(dtype).requires_grad_(True)
    lv = (0.3 * torch.randn(5, 6, generator=g)).to(dtype).requires_grad_(True)
    xd, rd, md, ld = (v.detach().double().requires_grad_(True) for v in (x, recon, mu, lv))
    ref = _elbo_reference(xd, rd, md, ld, likelihood)
    gr = torch.randn(5, generator=g, dtype=torch.float64)
    want = torch.autograd.grad((ref * gr).sum(), (xd, rd, md, ld))
    rtol, atol = grad_tol(dtype)
    for fused_kl in (False, True):
        with pygen.use_backend(backend):
            if fused_kl:
                _, kl = losses.vae_reparameterize(mu, lv, seed=6, stream=2)
                loss = losses.elbo(x, recon, kl=kl, likelihood=likelihood, sigma=0.7, beta=0.5, reduction="none")
            else:
                loss = losses.elbo(x, recon, mu, lv, likelihood, sigma=0.7, beta=0.5, reduction="none")
        assert loss.dtype == torch.float32 and loss.shape == (5,)
        torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-5)
        got = torch.autograd.grad((loss * gr.float()).sum(), (recon, mu, lv))
        for gv, wv in zip(got, want[1:]):
            assert gv.dtype == dtype
            torch.testing.assert_close(gv.double(), wv.to(dtype).double(), rtol=rtol,
                                       atol=atol * wv.abs().max().item())


# ---------------------------------------------------------------------------
# EBM: replay buffer, contrastive divergence, NCE
# ---------------------------------------------------------------------------
def test_replay_buffer_is_deterministic_and_reinitialises():
    buf = losses.ReplayBuffer(1000, (2,), reinit_prob=0.25, init="uniform", low=-3, high=3, seed=4)
    again = losses.ReplayBuffer(1000, (2,), reinit_prob=0.25, init="uniform", low=-3, high=3, seed=4)
    assert torch.equal(buf.data, again.data)
    assert buf.data.min() >= -3 and buf.data.max() <= 3 and buf.data.std() > 1.5  # uniform on [-3, 3]: sd 1.73
    buf.data.fill_(100.0)  # mark the slots so that re-initialised samples are visible
    x, idx = buf.sample(800, seed=7, stream=3)
    x2, idx2 = buf.sample(800, seed=7, stream=3)
    assert torch.equal(x, x2) and torch.equal(idx, idx2)
    assert idx.unique().numel() == 800 and 0 <= idx.min() and idx.max() < 1000  # distinct slots
    fresh = (x != 100.0).all(1)
    assert ((x == 100.0).all(1) | fresh).all()
    frac = fresh.double().mean().item()
    assert abs(frac - 0.25) < 0.07, frac  # sd = sqrt(.25·.75/800) = 0.015
    buf.update(idx, torch.zeros(800, 2))
    assert (buf.data[idx] == 0).all() and int((buf.data == 100.0).all(1).sum()) == 200
    noise_buf = losses.ReplayBuffer(4000, 3, init="noise", scale=2.0, seed=1)
    assert abs(noise_buf.data.std().item() - 2.0) < 0.1
    with pytest.raises(ValueError, match="n must be"):
        buf.sample(1001, seed=0)
    with pytest.raises(ValueError, match="reinit_prob"):
        losses.ReplayBuffer(10, 2, reinit_prob=1.5)


def test_contrastive_divergence_step_matches_reference():
    torch.manual_seed(0)
    energy_net = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.SiLU(), torch.nn.Linear(16, 1))

    def energy(x):
        return energy_net(x).squeeze(-1)
    x_data = torch.randn(32, 2, generator=gen(71))
    buf = losses.ReplayBuffer(100, (2,), reinit_prob=0.1, low=-2, high=2, seed=3)
    before = buf.data.clone()
    loss, x_neg = losses.contrastive_divergence_step(energy, x_data, buf, n_steps=5, step_size=0.01, seed=11,
                                                     stream=2, alpha=0.1, return_samples=True)
    assert not x_neg.requires_grad
    # the chains: the buffer's draw (stream = 2·2^32 + LANE) then pygen.mcmc.ula with stream 2·2^32
    ref_buf = losses.ReplayBuffer(100, (2,), reinit_prob=0.1, low=-2, high=2, seed=3)
    x_init, idx = ref_buf.sample(32, 11, to_signed64((2 << 32) + LANE))
    expect = pygen.mcmc.ula(x_init, energy_fn=energy, step_size=0.01, n_steps=5, seed=11, stream=2 << 32)
    torch.testing.assert_close(x_neg, expect, rtol=0, atol=0)
    assert torch.equal(buf.data[idx], x_neg) and not torch.equal(buf.data, before)
    # loss and gradient vs the plain formula
    energy_net.zero_grad()
    loss.backward()
    got = [p.grad.clone() for p in energy_net.parameters()]
    energy_net.zero_grad()
    ep, en = energy(x_data), energy(expect)
    ref = ep.mean() - en.mean() + 0.1 * (ep.square().mean() + en.square().mean())
    torch.testing.assert_close(loss, ref)
    ref.backward()
    for g_, p in zip(got, energy_net.parameters()):
        torch.testing.assert_close(g_, p.grad)


class QuarticEnergy(torch.nn.Module):
    """E(x) = k + sum_j 0.5·p_j²·(x_j - m_j)² + r_j·log cosh(x_j): a smooth energy with parameters in any dtype
    (the offset k makes the energies large next to their differences, as they are in CD training).

    Records (with retain_grad) the energies of each call, so tests can read the ones the loss used.
    """

    def __init__(self, dim, dtype, seed=0, offset=8.0):
        super().__init__()
        g = gen(seed)
        self.p = torch.nn.Parameter((1 + 0.3 * torch.randn(dim, generator=g)).to(dtype))
        self.m = torch.nn.Parameter((0.5 * torch.randn(dim, generator=g)).to(dtype))
        self.r = torch.nn.Parameter((0.4 * torch.randn(dim, generator=g)).to(dtype))
        self.k = torch.nn.Parameter(torch.tensor(offset).to(dtype))
        self.calls = []

    def forward(self, x, params=None):
        p, m, r, k = params if params is not None else (self.p, self.m, self.r, self.k)
        e = k + (0.5 * (p * (x - m)).square() + r * torch.log(torch.cosh(x))).sum(1)
        if params is None:
            if e.requires_grad:
                e.retain_grad()
            self.calls.append((x, e))
        return e


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("alpha", [0.0, 0.01])
def test_contrastive_divergence_step_half_matches_reference(backend, dtype, alpha):
    """fp16/bf16 chains and energies. The Langevin noise is fixed by (seed, stream): step i of the chains
    draws pygen.randn(shape, seed, 2·2^32 + i). The chains are checked against a float64 Langevin loop
    (score from float64 autograd, storage rounding after each step), the loss against the float64 formula
    on the energies the model produced (an fp32 computation: at most an ulp or so of fp32, no fp16
    cancellation), d loss / d energies and the parameter gradients against float64."""
    require(backend)
    n, dim, n_steps, dt = 24, 3, 5, 0.01
    energy = QuarticEnergy(dim, dtype, seed=72)
    x_data = (0.5 + torch.randn(n, dim, generator=gen(73))).to(dtype)
    buf = losses.ReplayBuffer(60, (dim,), reinit_prob=0.2, low=-2, high=2, seed=5, dtype=dtype)
    with pygen.use_backend(backend):
        loss, x_neg = losses.contrastive_divergence_step(energy, x_data, buf, n_steps=n_steps, step_size=dt,
                                                         seed=13, stream=2, alpha=alpha, return_samples=True)
    assert loss.dim() == 0 and loss.dtype == torch.float32 and x_neg.dtype == dtype
    # the chains: the buffer's draw (stream 2·2^32 + LANE), then Langevin in float64 with storage rounding
    params64 = [q.detach().double() for q in (energy.p, energy.m, energy.r, energy.k)]
    x_init, idx = losses.ReplayBuffer(60, (dim,), reinit_prob=0.2, low=-2, high=2, seed=5,
                                      dtype=dtype).sample(n, 13, to_signed64((2 << 32) + LANE))
    # (the Triton interpreter truncates fp32 -> bf16 where a GPU rounds to nearest: emulated here)
    truncate = backend == "triton" and dtype == torch.bfloat16

    def store(v):
        v = v.float()
        if truncate:
            v = (v.view(torch.int32) & -65536).view(torch.float32)  # exact in bf16
        return v.to(dtype)
    x = x_init
    for i in range(n_steps):
        xr = x.double().requires_grad_(True)
        (grad,) = torch.autograd.grad(energy(xr, params64).sum(), xr)
        z = randn_reference(x.shape, 13, (2 << 32) + i).double()
        x = store(xr.detach() - 0.5 * dt * grad + math.sqrt(dt) * z)
    # the same fp32 arithmetic up to the score's rounding (x dt/2): a rounding may differ by an ulp
    eps = half_eps(dtype)
    torch.testing.assert_close(x_neg.double(), x.double(), rtol=eps, atol=eps / 4)
    assert torch.equal(buf.data[idx], x_neg)
    # the loss on the energies the model produced: the last two calls (data, then the negatives)
    (xp, ep), (xn, en) = energy.calls[-2:]
    assert torch.equal(xp, x_data) and torch.equal(xn, x_neg) and ep.dtype == dtype
    ep64, en64 = (e.detach().double().requires_grad_(True) for e in (ep, en))
    ref = ep64.mean() - en64.mean() + alpha * (ep64.square().mean() + en64.square().mean())
    scale = ep64.abs().mean() + en64.abs().mean() + alpha * (ep64.square().mean() + en64.square().mean())
    assert abs(loss.double() - ref).item() <= 4 * torch.finfo(torch.float32).eps * scale.item(), (loss, ref)
    energy.zero_grad()
    loss.backward()
    ref.backward()
    rtol, atol = grad_tol(dtype)
    for e, e64 in ((ep, ep64), (en, en64)):
        torch.testing.assert_close(e.grad.double(), e64.grad.to(dtype).double(), rtol=rtol, atol=0.0)
    # the parameter gradients: float64 autograd of the energies with the float64 d loss / d energies
    q64 = [q.requires_grad_(True) for q in params64]
    e_all = torch.cat([energy(xp.double(), q64), energy(xn.double(), q64)])
    g_all = torch.cat([ep64.grad, en64.grad])
    want = torch.autograd.grad(e_all, q64, grad_outputs=g_all)
    bound = torch.autograd.grad(energy(torch.cat([xp, xn]).double(), q64), q64, grad_outputs=g_all.abs(),
                                allow_unused=True)
    for q, w, b in zip((energy.p, energy.m, energy.r, energy.k), want, bound):
        assert q.grad.dtype == dtype
        # each term rounds in the storage dtype and the sum over the chains accumulates: a few ulps of
        # the sum of the terms' magnitudes (bounded by the derivative at |d loss / d e|)
        tol = 16 * half_eps(dtype) * (b.abs() + w.abs()) + 1e-6
        assert ((q.grad.double() - w).abs() <= tol).all(), (q.grad, w)


def test_contrastive_divergence_streams_do_not_overlap():
    """Consecutive training steps (stream k, k+1) must not reuse Langevin noise."""
    def energy(x):
        return 0.5 * x.square().sum(1)
    x_data = torch.zeros(8, 2)
    outs = []
    for k in (0, 1):
        buf = losses.ReplayBuffer(8, (2,), reinit_prob=0.0, init="noise", seed=0)
        buf.data.zero_()
        outs.append(losses.contrastive_divergence_step(energy, x_data, buf, n_steps=2, step_size=0.1, seed=5,
                                                       stream=k, return_samples=True)[1])
    # with a zero start the first Langevin step is pure noise: step k's second-step noise must differ from
    # step k+1's first-step noise, i.e. the samples are not shifted copies of each other
    assert not torch.allclose(outs[0], outs[1])


def test_nce_loss_matches_reference_and_recovers_log_normaliser():
    g = gen(81)
    x = 1.0 + 0.5 * torch.randn(512, 1, generator=g)
    y = 2.0 * torch.randn(1024, 1, generator=g)
    q = torch.distributions.Normal(0.0, 2.0)

    def log_q(v):
        return q.log_prob(v).sum(1)
    mean = torch.zeros(1, requires_grad=True)
    c = torch.zeros((), requires_grad=True)  # the learned log-normaliser

    def log_p(v):
        return -0.5 * ((v - mean) / 0.5).square().sum(1) - c
    loss = losses.nce_loss(log_p, x, y, log_q)
    nu = 2.0
    gx = log_p(x) - log_q(x) - math.log(nu)
    gy = log_p(y) - log_q(y) - math.log(nu)
    ref = -(torch.log(torch.sigmoid(gx)).mean() + nu * torch.log(1 - torch.sigmoid(gy)).mean())
    torch.testing.assert_close(loss, ref)
    ga = torch.autograd.grad(loss, (mean, c))
    gb = torch.autograd.grad(ref, (mean, c))
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b)
    # fit: NCE's estimate of c is log Z of the unnormalised Gaussian (log(0.5·sqrt(2π)) = -0.0807)
    opt = torch.optim.Adam([mean, c], lr=0.05)
    for _ in range(300):
        opt.zero_grad()
        losses.nce_loss(log_p, x, y, log_q).backward()
        opt.step()
    assert abs(mean.item() - x.mean().item()) < 0.1
    assert abs(c.item() - math.log(0.5 * math.sqrt(2 * math.pi))) < 0.15


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("nu", [None, 0.5])
def test_nce_loss_half_matches_reference(dtype, nu):
    """fp16/bf16 samples, parameters and log-densities: the loss within about an ulp of the storage dtype
    of the float64 formula on the log-densities the model produced; d loss / d log p and the parameter
    gradients against float64."""
    g = gen(82)
    x = (1.0 + 0.5 * torch.randn(48, 2, generator=g)).to(dtype)
    y = (2.0 * torch.randn(96, 2, generator=g)).to(dtype)
    mean = torch.tensor([0.3, -0.2]).to(dtype).requires_grad_(True)
    c = torch.tensor(0.1).to(dtype).requires_grad_(True)
    seen = {}

    def log_q(v):
        out = (-0.5 * (v / 2.0).square() - math.log(2.0 * math.sqrt(2.0 * math.pi))).sum(1)
        seen["lq"] = out
        return out

    def log_p(v):
        out = -0.5 * ((v - mean) / 0.5).square().sum(1) - c
        out.retain_grad()
        seen["v"], seen["lp"] = v, out
        return out
    loss = losses.nce_loss(log_p, x, y, log_q, nu=nu)
    assert torch.equal(seen["v"], torch.cat([x, y])) and seen["lp"].dtype == dtype
    nu_ = 2.0 if nu is None else nu
    lp64 = seen["lp"].detach().double().requires_grad_(True)
    gv = lp64 - seen["lq"].double() - math.log(nu_)
    ref = -(torch.log(torch.sigmoid(gv[:48])).mean() + nu_ * torch.log(1 - torch.sigmoid(gv[48:])).mean())
    eps = half_eps(dtype)
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=eps, atol=0.0)
    loss.backward()
    ref.backward()
    rtol, atol = grad_tol(dtype)
    g_lp = lp64.grad
    torch.testing.assert_close(seen["lp"].grad.double(), g_lp.to(dtype).double(), rtol=rtol,
                               atol=atol * g_lp.abs().max().item())
    # the chain rule into mean and c: d lp / d mean = (v - mean)/0.25, d lp / d c = -1
    v = torch.cat([x, y]).double()
    dmean = (v - mean.detach().double()) / 0.25
    for got, want, bound in ((mean.grad, (g_lp[:, None] * dmean).sum(0), (g_lp.abs()[:, None] * dmean.abs()).sum(0)),
                             (c.grad, -g_lp.sum(), g_lp.abs().sum())):
        assert got.dtype == dtype
        assert ((got.double() - want).abs() <= 8 * eps * bound + 1e-7).all(), (got, want)


# ---------------------------------------------------------------------------
# bad input and NaN reporting
# ---------------------------------------------------------------------------
def test_bad_input_errors():
    x0 = torch.randn(4, 3)
    model = Affine((3,))
    with pytest.raises(ValueError, match=r"model output has shape \(4, 2\)"):
        losses.diffusion_loss(lambda x, t: x[:, :2], x0, seed=0)
    with pytest.raises(TypeError, match="model must return a tensor"):
        losses.diffusion_loss(lambda x, t: 3.0, x0, seed=0)
    with pytest.raises(ValueError, match="unknown prediction_type 'epsilon'"):
        losses.diffusion_loss(model, x0, prediction_type="epsilon", seed=0)
    with pytest.raises(ValueError, match="unknown weighting 'minsnr'"):
        losses.diffusion_loss(model, x0, weighting="minsnr", seed=0)
    with pytest.raises(ValueError, match=r"t must be in \[0, 1000\)"):
        losses.diffusion_loss(model, x0, t=1000, seed=0)
    with pytest.raises(ValueError, match=r"t must be in \[0, 1000\)"):
        losses.diffusion_loss(model, x0, t=torch.tensor([0, 1, -1, 3]), seed=0)
    with pytest.raises(ValueError, match="one timestep per batch row"):
        losses.diffusion_loss(model, x0, t=torch.tensor([0, 1]), seed=0)
    with pytest.raises(ValueError, match=r"flow sigma\) must be in \[0, 1\]"):
        losses.diffusion_loss(model, x0, None, "flow", t=torch.tensor([0.1, 0.2, 1.5, 0.3]), seed=0)
    with pytest.raises(TypeError, match="float sigmas"):
        losses.diffusion_loss(model, x0, None, "flow", t=torch.tensor([1, 2, 3, 4]), seed=0)
    with pytest.raises(TypeError, match="schedule must be"):
        losses.diffusion_loss(model, x0, "linear", seed=0)
    with pytest.raises(ValueError, match="non-empty 1-D"):
        losses.diffusion_loss(model, x0, torch.rand(10, 2), seed=0)
    with pytest.raises(ValueError, match=r"alphas_cumprod values in \[0.0, 1.0\]"):
        losses.diffusion_loss(model, x0, torch.linspace(0.5, 1.5, 10), seed=0)
    with pytest.raises(TypeError, match="prediction_type='flow' takes"):
        losses.diffusion_loss(model, x0, schedule(), "flow", seed=0)
    with pytest.raises(ValueError, match="unknown reduction"):
        losses.diffusion_loss(model, x0, seed=0, reduction="avg")
    with pytest.raises(ValueError, match="min_snr_gamma must be > 0"):
        losses.diffusion_loss(model, x0, weighting="min_snr", min_snr_gamma=0.0, seed=0)
    with pytest.raises(ValueError, match="noise must have the shape of x0"):
        losses.diffusion_loss(model, x0, noise=torch.randn(4, 2))
    with pytest.raises(ValueError, match=r"score_model output has shape"):
        losses.dsm_loss(lambda x, s: x[:2], x0, torch.tensor([1.0, 0.1]), seed=0)
    with pytest.raises(ValueError, match="sigmas must be positive"):
        losses.dsm_loss(model, x0, torch.tensor([1.0, 0.0]), seed=0)
    mu = torch.randn(4, 5)
    with pytest.raises(ValueError, match=r"mu and logvar must have the same shape.*\(4, 5\).*\(4, 6\)"):
        losses.vae_reparameterize(mu, torch.randn(4, 6), seed=0)
    with pytest.raises(ValueError, match=r"mu and logvar must have the same shape"):
        losses.elbo(x0, x0, mu, torch.randn(4, 6))
    with pytest.raises(ValueError, match=r"x_recon must have x's shape"):
        losses.elbo(x0, x0[:, :2], mu, mu)
    with pytest.raises(ValueError, match="unknown likelihood"):
        losses.elbo(x0, x0, mu, mu, likelihood="poisson")
    with pytest.raises(ValueError, match=r"kl must be the per-row KL"):
        losses.elbo(x0, x0, kl=torch.zeros(3))
    buf = losses.ReplayBuffer(10, (3,))
    with pytest.raises(ValueError, match="energy must return one energy per row"):
        losses.contrastive_divergence_step(lambda x: x.sum(1, keepdim=True), x0, buf, n_steps=1, step_size=0.1,
                                           seed=0)
    with pytest.raises(ValueError, match="buffer's shape"):
        losses.contrastive_divergence_step(lambda x: x.sum(1), torch.randn(4, 2), buf, n_steps=1, step_size=0.1,
                                           seed=0)
    with pytest.raises(ValueError, match="log_p_model must return one log-density per sample"):
        losses.nce_loss(lambda x: x, x0, x0, lambda x: x.sum(1))


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_nan_is_reported_not_masked(backend):
    require(backend)
    x0 = torch.randn(5, 3, generator=gen(91))
    model = Affine((3,))

    def nan_model(x, t):
        out = model(x, t)
        return torch.where((torch.arange(5) == 2)[:, None], torch.nan, out)
    with pygen.use_backend(backend):
        r = losses.diffusion_loss(nan_model, x0, seed=1, reduction="none")
        assert torch.isnan(r[2]) and torch.isfinite(r[[0, 1, 3, 4]]).all()
        assert torch.isnan(losses.diffusion_loss(nan_model, x0, seed=1))  # the mean is NaN, not hidden
        with pytest.raises(FloatingPointError, match=r"non-finite loss .* 1 of 5 rows: \[2\] \(t = \["):
            losses.diffusion_loss(nan_model, x0, seed=1, check_nan=True)
        with pytest.warns(RuntimeWarning, match=r"rows: \[2\]"):
            losses.diffusion_loss(nan_model, x0, seed=1, check_nan="warn")
        losses.diffusion_loss(model, x0, seed=1, check_nan=True)  # finite: no error
        # NaN in the data propagates too
        x_bad = x0.clone()
        x_bad[4, 1] = torch.nan
        r = losses.diffusion_loss(model, x_bad, seed=1, reduction="none")
        assert torch.isnan(r[4]) and torch.isfinite(r[:4]).all()
        with pytest.raises(FloatingPointError, match=r"rows: \[4\]"):
            losses.dsm_loss(model, x_bad, torch.tensor([1.0, 0.1]), seed=1, check_nan=True)
        mu = torch.randn(3, 4)
        mu[1, 0] = torch.nan
        z, kl = losses.vae_reparameterize(mu, torch.zeros(3, 4), seed=0)
        assert torch.isnan(kl[1]) and torch.isfinite(kl[[0, 2]]).all()
