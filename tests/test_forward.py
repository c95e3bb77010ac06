"""Tests of the forward ops pygen.q_sample / pygen.reparameterize
(torch.ops.pygen.q_sample, torch.ops.pygen.reparameterize and their _triton variants)
on the torch, cpu and triton (TRITON_INTERPRET=1) backends against the torch reference."""
import importlib.util
import math
import os

import numpy as np
import pytest
import torch

import pygen
from pygen.ops import forward as F
from pygen.ops.random import randn_reference

HAS_TRITON = importlib.util.find_spec("triton") is not None
BACKENDS = ["torch", "cpu", "triton"]
SHAPES = [(3, 5, 7), (2, 1001), (1, 4), (6,), (4, 3)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
TARGETS = [None, "eps", "v", "x0", "flow"]
N_TABLE = 1000


def require(backend):
    if backend == "triton":
        if not HAS_TRITON:
            pytest.skip("triton is not installed")
        if os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1")
    status = pygen.backends()[backend]
    if status != "available":
        pytest.skip(f"backend {backend} unavailable: {status}")


def skip_fp64_triton(backend, dtype):
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("float64 storage is supported on the torch and cpu backends")


def make_gen(seed=1234):
    return torch.Generator().manual_seed(seed)


def alphas_cumprod(dtype=torch.float64):
    betas = torch.linspace(1e-4, 0.02, N_TABLE, dtype=torch.float64)
    return torch.cumprod(1 - betas, 0).to(dtype)


def sigmas(dtype=torch.float32):
    return torch.linspace(0.0, 1.0, N_TABLE, dtype=torch.float64).to(dtype)


def rand_t(batch, gen, dtype=torch.int64):
    return torch.randint(0, N_TABLE, (batch,), generator=gen).to(dtype)


def assert_close_storage(actual, expected, *, loose=False):
    """fp32/fp64: rtol 1e-5 (plus a tiny atol); fp16/bf16: one ulp of the storage type.

    ``expected`` is the reference computed in fp32/fp64 and rounded to the
    storage type. ``loose`` is for fp64 outputs built from fp32 noise.
    NaN must sit in the same places.
    """
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    nan_a, nan_e = torch.isnan(actual), torch.isnan(expected)
    assert torch.equal(nan_a, nan_e), "NaN positions differ"
    a = actual[~nan_a].double()
    e = expected[~nan_e].double()
    if actual.dtype in (torch.float16, torch.bfloat16):
        ref = expected[~nan_e].abs()
        ulp = (torch.nextafter(ref, torch.full_like(ref, math.inf)) - ref).double()
        bad = (a - e).abs() > ulp + 1e-5
        assert not bad.any(), f"{int(bad.sum())} elements differ by more than 1 ulp: max {(a - e).abs().max()}"
    elif actual.dtype == torch.float64 and not loose:
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)
    else:
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


def run_q_sample(backend, *args, **kwargs):
    with pygen.use_backend(backend):
        return pygen.q_sample(*args, **kwargs)


def run_reparameterize(backend, *args, **kwargs):
    with pygen.use_backend(backend):
        return pygen.reparameterize(*args, **kwargs)


# ---------------------------------------------------------------------------
# q_sample: values
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("target", TARGETS)
def test_q_sample_given_noise(backend, shape, dtype, target):
    require(backend)
    skip_fp64_triton(backend, dtype)
    g = make_gen()
    x0 = torch.randn(shape, generator=g).to(dtype)
    noise = torch.randn(shape, generator=g).to(dtype)
    table = alphas_cumprod()
    t = rand_t(shape[0], g)
    out = run_q_sample(backend, x0, t, table, noise, target=target)
    ref = F.q_sample_reference(x0, t, table, noise, 0, 0, None, 0, F.TARGETS[target])
    if target is None:
        assert isinstance(out, torch.Tensor)
        assert_close_storage(out, ref[0])
    else:
        x_t, tgt = out
        assert_close_storage(x_t, ref[0])
        assert_close_storage(tgt, ref[2])
        assert not torch.isnan(tgt).any()
    # closed form, independent of the reference
    abar = table[t].view((-1,) + (1,) * (len(shape) - 1))
    expect = abar.sqrt() * x0.double() + (1 - abar).sqrt() * noise.double()
    tol = {torch.float16: 2e-3, torch.bfloat16: 2e-2}.get(dtype, 1e-5)
    x_t = out if target is None else out[0]
    torch.testing.assert_close(x_t.double(), expect, rtol=tol, atol=tol * 4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("per_row", [False, True])
def test_q_sample_generated_noise(backend, shape, dtype, per_row):
    require(backend)
    skip_fp64_triton(backend, dtype)
    g = make_gen(7)
    x0 = torch.randn(shape, generator=g).to(dtype)
    table = alphas_cumprod(torch.float32)
    t = rand_t(shape[0], g)
    seed = torch.randint(-(2**62), 2**62, (shape[0],), generator=g) if per_row else 0xDEADBEEFCAFE
    x_t, noise = run_q_sample(backend, x0, t, table, seed=seed, stream=5)
    seed_i, row_seeds = (0, seed) if per_row else (seed, None)
    ref = F.q_sample_reference(x0, t, table, None, seed_i, 5, row_seeds, 0, 0)
    assert_close_storage(x_t, ref[0], loose=True)
    assert_close_storage(noise, ref[1], loose=True)
    # the noise is exactly pygen.randn(x0.shape, seed, stream) of the same backend
    with pygen.use_backend(backend):
        expected_noise = pygen.randn(shape, seed, 5, dtype=dtype)
    assert torch.equal(noise, expected_noise)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("interpolation", ["vp", "flow"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_q_sample_targets_generated(backend, target, interpolation, dtype):
    require(backend)
    g = make_gen(11)
    shape = (4, 3, 9)
    x0 = torch.randn(shape, generator=g).to(dtype)
    table = alphas_cumprod() if interpolation == "vp" else sigmas()
    t = rand_t(shape[0], g, torch.int32)
    out = run_q_sample(backend, x0, t, table, seed=42, stream=1, target=target, interpolation=interpolation)
    interp = F.INTERPOLATIONS[interpolation]
    ref = F.q_sample_reference(x0, t, table, None, 42, 1, None, interp, F.TARGETS[target])
    assert len(out) == (2 if target is None else 3)
    assert_close_storage(out[0], ref[0])
    assert_close_storage(out[1], ref[1])
    if target is not None:
        assert_close_storage(out[2], ref[2])
        # target from first principles, in fp64 from the returned noise
        eps, x = out[1].double(), x0.double()
        lv = table.double()[t.long()].view(-1, 1, 1)
        a, s = (lv.sqrt(), (1 - lv).sqrt()) if interpolation == "vp" else (1 - lv, lv)
        expect = {"eps": eps, "v": a * eps - s * x, "x0": x, "flow": eps - x}[target]
        tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
        torch.testing.assert_close(out[2].double(), expect, rtol=tol, atol=tol * 4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_q_sample_flow_closed_form(backend):
    require(backend)
    g = make_gen(3)
    x0 = torch.randn(5, 17, generator=g)
    noise = torch.randn(5, 17, generator=g)
    table = sigmas()
    t = torch.tensor([0, 999, 500, 1, 250])
    x_t, v = run_q_sample(backend, x0, t, table, noise, interpolation="flow", target="flow")
    sig = table[t].view(-1, 1)
    torch.testing.assert_close(x_t, (1 - sig) * x0 + sig * noise, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(v, noise - x0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x_t[0], x0[0], rtol=0, atol=0)  # sigma = 0
    torch.testing.assert_close(x_t[1], noise[1], rtol=0, atol=0)  # sigma = 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_q_sample_generated_matches_given(backend):
    """In-kernel noise gives the same x_t as passing pygen.randn explicitly (fp32)."""
    require(backend)
    g = make_gen(5)
    x0 = torch.randn(3, 5, 7, generator=g)
    t = rand_t(3, g)
    table = alphas_cumprod(torch.float32)
    x_t, noise = run_q_sample(backend, x0, t, table, seed=9, stream=2)
    with pygen.use_backend(backend):
        eps = pygen.randn(x0.shape, 9, 2)
    x_t2 = run_q_sample(backend, x0, t, table, eps)
    torch.testing.assert_close(x_t, x_t2, rtol=1e-6, atol=1e-7)
    assert torch.equal(noise, eps)


@pytest.mark.parametrize("backend", BACKENDS)
def test_q_sample_per_row_seed_independent_of_batch(backend):
    require(backend)
    g = make_gen(8)
    x0 = torch.randn(4, 2, 33, generator=g)
    t = rand_t(4, g)
    seeds = torch.tensor([11, 22, 33, 44])
    table = alphas_cumprod()
    x_t, noise = run_q_sample(backend, x0, t, table, seed=seeds, stream=3)
    x_a, n_a = run_q_sample(backend, x0[:1], t[:1], table, seed=seeds[:1], stream=3)
    x_b, n_b = run_q_sample(backend, x0[1:], t[1:], table, seed=seeds[1:], stream=3)
    assert torch.equal(torch.cat([n_a, n_b]), noise)
    assert torch.equal(torch.cat([x_a, x_b]), x_t)


@pytest.mark.parametrize("backend", BACKENDS)
def test_q_sample_int_t_and_int32_t(backend):
    require(backend)
    g = make_gen(2)
    x0 = torch.randn(3, 10, generator=g)
    noise = torch.randn(3, 10, generator=g)
    table = alphas_cumprod(torch.float32)
    a = run_q_sample(backend, x0, 417, table, noise)
    b = run_q_sample(backend, x0, torch.full((3,), 417, dtype=torch.int32), table, noise)
    c = run_q_sample(backend, x0, torch.full((3,), 417), table, noise)
    d = run_q_sample(backend, x0, np.int64(417), table, noise)
    assert torch.equal(a, b) and torch.equal(a, c) and torch.equal(a, d)
    ab = table[417]
    torch.testing.assert_close(a, ab.sqrt() * x0 + (1 - ab).sqrt() * noise, rtol=1e-5, atol=1e-6)


def test_q_sample_backends_agree_on_noise():
    """Generated noise agrees across the available backends (words identical, normals to fp32 rounding)."""
    g = make_gen(4)
    x0 = torch.randn(2, 1001, generator=g)
    t = rand_t(2, g)
    table = alphas_cumprod()
    outs = {}
    for backend in BACKENDS:
        try:
            require(backend)
        except pytest.skip.Exception:
            continue
        outs[backend] = run_q_sample(backend, x0, t, table, seed=123, stream=7, target="v")
    for name, out in outs.items():
        for a, b in zip(out, outs["torch"]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=f"backend {name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_q_sample_empty_batch(backend):
    require(backend)
    x0 = torch.empty(0, 5)
    t = torch.empty(0, dtype=torch.int64)
    x_t, noise = run_q_sample(backend, x0, t, alphas_cumprod(), seed=1)
    assert x_t.shape == (0, 5) and noise.shape == (0, 5)


# ---------------------------------------------------------------------------
# q_sample: NaN and out-of-range t inside the kernels
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_q_sample_nan_propagates(backend):
    require(backend)
    g = make_gen(6)
    x0 = torch.randn(3, 9, generator=g)
    noise = torch.randn(3, 9, generator=g)
    x0[0, 2] = math.nan
    noise[1, 5] = math.nan
    table = alphas_cumprod(torch.float32)
    table[700] = math.nan
    t = torch.tensor([10, 20, 700])
    x_t, v = run_q_sample(backend, x0, t, table, noise, target="v")
    expect = torch.zeros(3, 9, dtype=torch.bool)
    expect[0, 2] = expect[1, 5] = True
    expect[2] = True  # NaN in the table at t
    assert torch.equal(torch.isnan(x_t), expect)
    assert torch.equal(torch.isnan(v), expect)
    x_t, eps_t = run_q_sample(backend, x0, t, table, noise, target="eps")
    assert torch.isnan(eps_t[1, 5]) and torch.isnan(eps_t).sum() == 1


def _op_for(backend):
    if backend == "torch":
        return F.q_sample_reference
    if backend == "cpu":
        return torch.ops.pygen.q_sample
    from pygen.kernels import forward as tk

    return tk.q_sample


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("target", [1, 2, 3, 4])
@pytest.mark.parametrize("generate", [False, True])
def test_q_sample_out_of_range_t_in_kernel_gives_nan_rows(backend, target, generate):
    """The op itself (no public-API check) never dereferences a bad t: that row is NaN."""
    require(backend)
    g = make_gen(10)
    x0 = torch.randn(4, 6, generator=g)
    noise = None if generate else torch.randn(4, 6, generator=g)
    t = torch.tensor([5, -1, N_TABLE, 2**40])
    table = alphas_cumprod(torch.float32)
    x_t, noise_out, tgt = _op_for(backend)(x0, t, table, noise, 1, 0, None, 0, target)
    assert not torch.isnan(x_t[0]).any() and not torch.isnan(tgt[0]).any()
    assert torch.isnan(x_t[1:]).all() and torch.isnan(tgt[1:]).all()
    if generate:
        assert not torch.isnan(noise_out).any()


# ---------------------------------------------------------------------------
# q_sample: bad input
# ---------------------------------------------------------------------------
def _good():
    g = make_gen(1)
    return torch.randn(2, 3, generator=g), torch.tensor([1, 2]), alphas_cumprod(torch.float32)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(t=torch.tensor([1, N_TABLE])), ValueError, "t must be in"),
        (dict(t=torch.tensor([-1, 0])), ValueError, "t must be in"),
        (dict(t=N_TABLE), ValueError, "t must be in"),
        (dict(t=-3), ValueError, "t must be in"),
        (dict(t=True), TypeError, "t must be"),
        (dict(t=1.5), TypeError, "t must be"),
        (dict(t=torch.tensor([1.0, 2.0])), TypeError, "t must have dtype"),
        (dict(t=torch.tensor([1, 2, 3])), ValueError, "t must be 1-D"),
        (dict(t=torch.tensor([[1, 2]])), ValueError, "t must be 1-D"),
        (dict(t=torch.tensor([1, 2], device="meta")), ValueError, "t must be on the device"),
        (dict(alphas_cumprod=torch.ones(2, 5)), ValueError, "alphas_cumprod must be a non-empty 1-D"),
        (dict(alphas_cumprod=torch.ones(0)), ValueError, "alphas_cumprod must be a non-empty 1-D"),
        (dict(alphas_cumprod=torch.ones(10, dtype=torch.float16)), TypeError, "alphas_cumprod must have dtype"),
        (dict(alphas_cumprod=torch.ones(10, dtype=torch.int64)), TypeError, "alphas_cumprod must have dtype"),
        (dict(alphas_cumprod=[0.5, 0.4]), TypeError, "alphas_cumprod must be a torch.Tensor"),
        (dict(alphas_cumprod=torch.ones(10, device="meta")), ValueError, "alphas_cumprod must be on the device"),
        (dict(x0=torch.tensor(1.0)), ValueError, "x0 must have at least 1"),
        (dict(x0=torch.ones(2, 3, dtype=torch.int32)), TypeError, "x0 must have dtype"),
        (dict(x0=[[1.0]]), TypeError, "x0 must be a torch.Tensor"),
        (dict(noise=torch.ones(2, 4)), ValueError, "noise must have the shape"),
        (dict(noise=torch.ones(2, 3, dtype=torch.float64)), TypeError, "noise must have the dtype"),
        (dict(noise=None, seed=None), ValueError, "seed is required"),
        (dict(noise=None, seed=torch.tensor([1, 2, 3])), ValueError, "seed tensor must be 1-D"),
        (dict(noise=None, seed=torch.tensor([1, 2], dtype=torch.int32)), TypeError, "seed tensor must have dtype"),
        (dict(noise=None, seed=1.5), TypeError, "seed must be"),
        (dict(stream=1.0), TypeError, "stream must be an int"),
        (dict(target="velocity"), ValueError, "target must be"),
        (dict(target=2), ValueError, "target must be"),
        (dict(interpolation="ve"), ValueError, "interpolation must be"),
        (dict(interpolation=0), ValueError, "interpolation must be"),
    ],
)
def test_q_sample_bad_input(kwargs, exc, match):
    x0, t, table = _good()
    args = dict(x0=x0, t=t, alphas_cumprod=table, noise=torch.randn(2, 3), seed=None, stream=0)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        pygen.q_sample(**args)


def test_q_sample_noise_wrong_device():
    x0, t, table = _good()
    with pytest.raises(ValueError, match="noise must be on the device"):
        pygen.q_sample(x0, t, table, torch.ones(2, 3, device="meta"))


# ---------------------------------------------------------------------------
# q_sample: torch.library
# ---------------------------------------------------------------------------
def _q_sample_samples(requires_grad=False):
    g = make_gen(12)

    def r(*shape):
        return torch.randn(*shape, generator=g).requires_grad_(requires_grad)

    x0, noise = r(3, 5, 7), r(3, 5, 7)
    t = rand_t(3, g)
    table = alphas_cumprod(torch.float32)
    return [
        (x0, t, table, noise, 0, 0, None, 0, 0),
        (x0, t, table, noise, 0, 0, None, 0, 2),
        (x0, t.int(), table.double(), None, 5, 1, None, 1, 4),
        (x0.detach().half().requires_grad_(requires_grad), t, table, None, 0, 2, torch.tensor([1, 2, 3]), 0, 1),
        (r(2, 1001), rand_t(2, g), table, None, 3, 0, None, 0, 3),
    ]


@pytest.mark.parametrize("requires_grad", [False, True])
def test_q_sample_opcheck(requires_grad):
    for args in _q_sample_samples(requires_grad):
        torch.library.opcheck(torch.ops.pygen.q_sample, args)


@pytest.mark.parametrize("requires_grad", [False, True])
def test_q_sample_triton_opcheck(requires_grad):
    require("triton")
    for args in _q_sample_samples(requires_grad)[:3]:
        torch.library.opcheck(torch.ops.pygen.q_sample_triton, args)


def test_q_sample_fake_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x0 = torch.empty(4, 8)
        t = torch.zeros(4, dtype=torch.int64)
        table = torch.ones(10)
        x_t, n, tg = torch.ops.pygen.q_sample(x0, t, table, None, 1, 0, None, 0, 0)
        assert x_t.shape == (4, 8) and n.shape == (4, 8) and tg.shape == (0,)
        x_t, n, tg = torch.ops.pygen.q_sample(x0, t, table, x0, 1, 0, None, 0, 2)
        assert n.shape == (0,) and tg.shape == (4, 8)


# ---------------------------------------------------------------------------
# reparameterize
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["given", "seed", "row_seeds"])
def test_reparameterize_values(backend, shape, dtype, mode):
    require(backend)
    skip_fp64_triton(backend, dtype)
    g = make_gen(13)
    mu = torch.randn(shape, generator=g).to(dtype)
    logvar = (torch.randn(shape, generator=g) * 2).to(dtype)
    if mode == "given":
        noise = torch.randn(shape, generator=g).to(dtype)
        z = run_reparameterize(backend, mu, logvar, noise=noise)
        ref = F.reparameterize_reference(mu, logvar, noise, 0, 0, None)
        assert_close_storage(z, ref[0])
        expect = mu.double() + torch.exp(logvar.double() / 2) * noise.double()
    else:
        seed = torch.arange(shape[0]) * 7919 + 1 if mode == "row_seeds" else 77
        z, eps = run_reparameterize(backend, mu, logvar, seed, 4, return_noise=True)
        seed_i, row_seeds = (0, seed) if mode == "row_seeds" else (seed, None)
        ref = F.reparameterize_reference(mu, logvar, None, seed_i, 4, row_seeds)
        assert_close_storage(z, ref[0], loose=True)
        assert_close_storage(eps, ref[1], loose=True)
        with pygen.use_backend(backend):
            assert torch.equal(eps, pygen.randn(shape, seed, 4, dtype=dtype))
        expect = mu.double() + torch.exp(logvar.double() / 2) * randn_reference(shape, seed_i, 4, row_seeds).double()
    tol = {torch.float16: 2e-3, torch.bfloat16: 2e-2}.get(dtype, 1e-5)
    torch.testing.assert_close(z.double(), expect, rtol=tol, atol=tol * 4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_reparameterize_nan_propagates(backend):
    require(backend)
    mu = torch.zeros(2, 5)
    logvar = torch.zeros(2, 5)
    mu[0, 1] = math.nan
    logvar[1, 3] = math.nan
    z = run_reparameterize(backend, mu, logvar, 3)
    expect = torch.zeros(2, 5, dtype=torch.bool)
    expect[0, 1] = expect[1, 3] = True
    assert torch.equal(torch.isnan(z), expect)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("given", [False, True])
def test_reparameterize_grad_matches_reference_autograd(backend, dtype, given):
    require(backend)
    g = make_gen(14)
    shape = (3, 5, 7)
    mu = torch.randn(shape, generator=g).to(dtype).requires_grad_()
    logvar = torch.randn(shape, generator=g).to(dtype).requires_grad_()
    noise = torch.randn(shape, generator=g).to(dtype).requires_grad_() if given else None
    upstream = torch.randn(shape, generator=g).to(dtype)
    if given:
        z = run_reparameterize(backend, mu, logvar, noise=noise)
        eps = noise
    else:
        z, eps = run_reparameterize(backend, mu, logvar, 5, 1, return_noise=True)
    z.backward(upstream)
    # reference: plain autograd through the formula in fp64, same eps
    mu_r = mu.detach().double().requires_grad_()
    lv_r = logvar.detach().double().requires_grad_()
    eps_r = eps.detach().double().requires_grad_()
    (mu_r + torch.exp(lv_r / 2) * eps_r).backward(upstream.double())
    tol = 2e-3 if dtype == torch.float16 else 1e-5
    torch.testing.assert_close(mu.grad.double(), mu_r.grad, rtol=tol, atol=tol)
    torch.testing.assert_close(logvar.grad.double(), lv_r.grad, rtol=tol, atol=tol)
    if given:
        torch.testing.assert_close(noise.grad.double(), eps_r.grad, rtol=tol, atol=tol)
    else:
        assert not eps.requires_grad  # the drawn noise is not differentiable


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_reparameterize_gradcheck_fp64(backend):
    require(backend)
    g = make_gen(15)
    mu = torch.randn(3, 7, generator=g, dtype=torch.float64).requires_grad_()
    logvar = torch.randn(3, 7, generator=g, dtype=torch.float64).requires_grad_()
    noise = torch.randn(3, 7, generator=g, dtype=torch.float64).requires_grad_()
    with pygen.use_backend(backend):
        assert torch.autograd.gradcheck(lambda m, lv: pygen.reparameterize(m, lv, 21, 3), (mu, logvar))
        assert torch.autograd.gradcheck(lambda m, lv: pygen.reparameterize(m, lv, torch.tensor([4, 5, 6])),
                                        (mu, logvar))
        assert torch.autograd.gradcheck(lambda m, lv, n: pygen.reparameterize(m, lv, noise=n), (mu, logvar, noise))


def test_reparameterize_op_gradcheck_fp64():
    """The registered autograd of torch.ops.pygen.reparameterize (compiled CPU op, or the reference)."""
    g = make_gen(16)
    mu = torch.randn(2, 9, generator=g, dtype=torch.float64).requires_grad_()
    logvar = torch.randn(2, 9, generator=g, dtype=torch.float64).requires_grad_()
    noise = torch.randn(2, 9, generator=g, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda m, lv: torch.ops.pygen.reparameterize(m, lv, None, 8, 0, None)[0],
                                    (mu, logvar))
    assert torch.autograd.gradcheck(lambda m, lv, n: torch.ops.pygen.reparameterize(m, lv, n, 0, 0, None)[0],
                                    (mu, logvar, noise))


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(seed=None), ValueError, "seed is required"),
        (dict(logvar=torch.zeros(2, 4)), ValueError, "logvar must have the shape"),
        (dict(logvar=torch.zeros(2, 3, dtype=torch.float64)), TypeError, "logvar must have the dtype"),
        (dict(logvar=torch.zeros(2, 3, device="meta")), ValueError, "logvar must be on the device"),
        (dict(mu=torch.zeros(2, 3, dtype=torch.int64)), TypeError, "mu must have dtype"),
        (dict(noise=torch.zeros(3, 3)), ValueError, "noise must have the shape"),
        (dict(seed=torch.tensor([1, 2, 3])), ValueError, "seed tensor must be 1-D"),
        (dict(seed="1"), TypeError, "seed must be"),
        (dict(stream=None), TypeError, "stream must be an int"),
    ],
)
def test_reparameterize_bad_input(kwargs, exc, match):
    args = dict(mu=torch.zeros(2, 3), logvar=torch.zeros(2, 3), seed=1, stream=0)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        pygen.reparameterize(**args)


def _reparameterize_samples(requires_grad):
    g = make_gen(17)

    def r(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g, dtype=dtype).requires_grad_(requires_grad)

    return [
        (r(3, 5, 7), r(3, 5, 7), None, 3, 1, None),
        (r(2, 9), r(2, 9), r(2, 9), 0, 0, None),
        (r(3, 4), r(3, 4), None, 0, 2, torch.tensor([7, 8, 9])),
        (r(4, 3, dtype=torch.float64), r(4, 3, dtype=torch.float64), None, 1, 0, None),
    ]


@pytest.mark.parametrize("requires_grad", [False, True])
def test_reparameterize_opcheck(requires_grad):
    for args in _reparameterize_samples(requires_grad):
        torch.library.opcheck(torch.ops.pygen.reparameterize, args)


@pytest.mark.parametrize("requires_grad", [False, True])
def test_reparameterize_triton_opcheck(requires_grad):
    require("triton")
    for args in _reparameterize_samples(requires_grad)[:3]:
        torch.library.opcheck(torch.ops.pygen.reparameterize_triton, args)


# ---------------------------------------------------------------------------
# CUDA (skipped without a GPU)
# ---------------------------------------------------------------------------
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def require_gpu_backend(backend):
    if backend == "triton" and not HAS_TRITON:
        pytest.skip("triton is not installed")
    status = pygen.backends()[backend]
    if status != "available":
        pytest.skip(f"backend {backend} unavailable: {status}")


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("shape", [(3, 5, 7), (2, 1001), (6,), (64, 4, 33)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("mode", ["given", "seed", "row_seeds"])
def test_q_sample_cuda(backend, shape, dtype, target, mode):
    require_gpu_backend(backend)
    g = make_gen(20)
    x0 = torch.randn(shape, generator=g).to(dtype)
    t = rand_t(shape[0], g)
    t[0] = N_TABLE - 1
    table = alphas_cumprod(torch.float32)
    noise = torch.randn(shape, generator=g).to(dtype) if mode == "given" else None
    seed = torch.arange(shape[0]) * 31 + 5 if mode == "row_seeds" else 99
    seed_i, row_seeds = (0, seed) if mode == "row_seeds" else (seed, None)
    ref = F.q_sample_reference(x0, t, table, noise, seed_i, 3, row_seeds, 0, F.TARGETS[target])
    dev = torch.device("cuda")
    out = run_q_sample(backend, x0.to(dev), t.to(dev), table.to(dev), None if noise is None else noise.to(dev),
                       seed=None if mode == "given" else (seed.to(dev) if mode == "row_seeds" else seed),
                       stream=3, target=target)
    out = (out,) if isinstance(out, torch.Tensor) else out
    expected = [ref[0]] + ([ref[1]] if mode != "given" else []) + ([ref[2]] if target is not None else [])
    assert len(out) == len(expected)
    for a, e in zip(out, expected):
        assert a.device.type == "cuda"
        assert_close_storage(a.cpu(), e, loose=True)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", ["given", "seed", "row_seeds"])
def test_reparameterize_cuda(backend, dtype, mode):
    require_gpu_backend(backend)
    g = make_gen(21)
    shape = (5, 3, 77)
    dev = torch.device("cuda")
    mu = torch.randn(shape, generator=g).to(dtype)
    logvar = torch.randn(shape, generator=g).to(dtype)
    noise = torch.randn(shape, generator=g).to(dtype) if mode == "given" else None
    seed = torch.arange(shape[0]) + 1 if mode == "row_seeds" else 7
    seed_i, row_seeds = (0, seed) if mode == "row_seeds" else (seed, None)
    ref = F.reparameterize_reference(mu, logvar, noise, seed_i, 2, row_seeds)
    mu_d = mu.to(dev).requires_grad_()
    lv_d = logvar.to(dev).requires_grad_()
    with pygen.use_backend(backend):
        if mode == "given":
            z = pygen.reparameterize(mu_d, lv_d, noise=noise.to(dev))
            eps = noise
        else:
            z, eps = pygen.reparameterize(mu_d, lv_d, seed.to(dev) if mode == "row_seeds" else seed, 2,
                                          return_noise=True)
            assert_close_storage(eps.cpu(), ref[1], loose=True)
    assert_close_storage(z.detach().cpu(), ref[0], loose=True)
    z.sum().backward()
    expect = 0.5 * torch.exp(logvar.float() / 2) * eps.cpu().float()
    tol = 2e-2 if dtype == torch.bfloat16 else 2e-3 if dtype == torch.float16 else 1e-5
    torch.testing.assert_close(lv_d.grad.cpu().float(), expect, rtol=tol, atol=tol)
    assert torch.equal(mu_d.grad.cpu(), torch.ones_like(mu))


@pytest.mark.cuda
@needs_cuda
def test_forward_opcheck_cuda():
    require_gpu_backend("cuda")
    dev = torch.device("cuda")
    for args in _q_sample_samples():
        args = tuple(a.to(dev) if isinstance(a, torch.Tensor) else a for a in args)
        torch.library.opcheck(torch.ops.pygen.q_sample, args)
    for args in _reparameterize_samples(True):
        args = tuple(a.detach().to(dev).requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a
                     for a in args)
        torch.library.opcheck(torch.ops.pygen.reparameterize, args)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_q_sample_cuda_graph_capture(backend):
    """Under capture the host range check is skipped (no sync); replay follows the device t."""
    require_gpu_backend(backend)
    dev = torch.device("cuda")
    g = make_gen(22)
    x0 = torch.randn(4, 257, generator=g).to(dev)
    t = torch.tensor([1, 10, 100, 999], device=dev)
    table = alphas_cumprod(torch.float32).to(dev)
    with pygen.use_backend(backend):
        pygen.q_sample(x0, t, table, seed=1, target="v")  # warm-up (compiles Triton kernels)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            x_t, noise, v = pygen.q_sample(x0, t, table, seed=1, target="v")
    t.copy_(torch.tensor([7, 8, 9, 10], device=dev))
    graph.replay()
    ref = F.q_sample_reference(x0.cpu(), t.cpu(), table.cpu(), None, 1, 0, None, 0, 2)
    for a, e in zip((x_t, noise, v), ref):
        assert_close_storage(a.cpu(), e, loose=True)


# ---------------------------------------------------------------------------
# q_sample: autograd (x0 and noise)
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("interpolation", ["vp", "flow"])
def test_q_sample_gradcheck_fp64(backend, target, interpolation):
    require(backend)
    g = make_gen(23)
    x0 = torch.randn(3, 7, generator=g, dtype=torch.float64).requires_grad_()
    noise = torch.randn(3, 7, generator=g, dtype=torch.float64).requires_grad_()
    t = torch.tensor([0, 500, 999])
    table = alphas_cumprod() if interpolation == "vp" else sigmas(torch.float64)
    kw = dict(target=target, interpolation=interpolation)
    with pygen.use_backend(backend):
        assert torch.autograd.gradcheck(lambda x, n: pygen.q_sample(x, t, table, n, **kw), (x0, noise))
        assert torch.autograd.gradcheck(lambda x: pygen.q_sample(x, t, table, seed=3, **kw), (x0,))


def test_q_sample_op_gradcheck_fp64():
    g = make_gen(24)
    x0 = torch.randn(2, 5, generator=g, dtype=torch.float64).requires_grad_()
    noise = torch.randn(2, 5, generator=g, dtype=torch.float64).requires_grad_()
    t = torch.tensor([10, 900])
    table = alphas_cumprod()

    def f(x, n):
        x_t, _, v = torch.ops.pygen.q_sample(x, t, table, n, 0, 0, None, 0, 2)
        return x_t, v

    assert torch.autograd.gradcheck(f, (x0, noise))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("given", [False, True])
def test_q_sample_grad_matches_reference_autograd(backend, target, given):
    require(backend)
    g = make_gen(25)
    shape = (4, 3, 5)
    x0 = torch.randn(shape, generator=g).requires_grad_()
    noise = torch.randn(shape, generator=g).requires_grad_() if given else None
    t = rand_t(4, g)
    table = alphas_cumprod(torch.float32)
    out = run_q_sample(backend, x0, t, table, noise, seed=None if given else 4, target=target)
    out = (out,) if isinstance(out, torch.Tensor) else out
    ups = [torch.randn(o.shape, generator=g) for o in out]
    torch.autograd.backward([o for o in out if o.requires_grad],
                            [u for o, u in zip(out, ups) if o.requires_grad])
    # reference: autograd of the closed form in fp64
    eps = noise.detach() if given else out[1].detach()
    x_r = x0.detach().double().requires_grad_()
    n_r = eps.double().requires_grad_()
    ab = table.double()[t].view(-1, 1, 1)
    a, s = ab.sqrt(), (1 - ab).sqrt()
    outs_r = [a * x_r + s * n_r]
    if not given:
        outs_r.append(None)
    if target is not None:
        outs_r.append({"eps": n_r + 0 * x_r, "v": a * n_r - s * x_r, "x0": x_r + 0 * n_r, "flow": n_r - x_r}[target])
    loss = sum((o * u.double()).sum() for o, u in zip(outs_r, ups) if o is not None)
    loss.backward()
    torch.testing.assert_close(x0.grad.double(), x_r.grad, rtol=1e-5, atol=1e-6)
    if given:
        torch.testing.assert_close(noise.grad.double(), n_r.grad, rtol=1e-5, atol=1e-6)
    else:
        assert not out[1].requires_grad  # the drawn noise is not differentiable


@pytest.mark.parametrize("backend", BACKENDS)
def test_q_sample_no_grad_outputs_without_requires_grad(backend):
    require(backend)
    x0 = torch.randn(2, 6)
    x_t, noise, v = run_q_sample(backend, x0, 3, alphas_cumprod(), seed=1, target="v")
    assert not x_t.requires_grad and not noise.requires_grad and not v.requires_grad


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_non_contiguous_inputs(backend):
    require(backend)
    g = make_gen(26)
    x0 = torch.randn(9, 4, generator=g).t()  # (4, 9), not contiguous
    noise = torch.randn(9, 4, generator=g).t()
    t = torch.tensor([1, 0, 500, 0, 30, 0, 999, 0])[::2]  # strided
    assert not t.is_contiguous()
    table = alphas_cumprod(torch.float32)
    a = run_q_sample(backend, x0, t, table, noise, target="v")
    b = run_q_sample(backend, x0.contiguous(), t.contiguous(), table, noise.contiguous(), target="v")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    z1 = run_reparameterize(backend, x0, noise, noise=x0)
    z2 = run_reparameterize(backend, x0.contiguous(), noise.contiguous(), noise=x0.contiguous())
    assert torch.equal(z1, z2)
