"""Tests of the fused training-loss ops pygen.fused_diffusion_mse / pygen.reparameterize_kl
(torch.ops.pygen.diffusion_loss(_backward), torch.ops.pygen.reparameterize_kl(_backward) and
their _triton variants) on the torch, cpu and triton (TRITON_INTERPRET=1) backends, against
plain-torch oracles written here (values, and gradients through torch autograd)."""
import importlib.util
import math
import os
import zlib

import pytest
import torch
import torch.nn.functional as F

import pygen
from conftest import require_backend
from pygen.ops import loss as L

HAS_TRITON = importlib.util.find_spec("triton") is not None
TRITON_OK = HAS_TRITON and (os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available())
BACKENDS = ["torch", "cpu", "triton"]
SHAPES = [(3, 5, 7), (2, 1001), (1, 4)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
NOISE_MODES = ["seed", "row_seeds", "noise"]
SEED, STREAM = 1234567, 9


def acc_of(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def skip_unsupported(backend, dtype):
    require_backend(backend)
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("float64 storage is supported on the torch and cpu backends")


def gen(seed):
    return torch.Generator().manual_seed(seed)


def rand(shape, dtype, g, scale=1.0):
    return (scale * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype)


def rand_coeffs(batch, g, dtype=torch.float32):
    """Rows of [m, ca, cb, w] with different values per row (w > 0)."""
    c = torch.randn(batch, 4, generator=g, dtype=torch.float64)
    c[:, 3] = c[:, 3].abs() + 0.1
    return c.to(dtype)


def noise_kwargs(mode, shape, dtype, g):
    if mode == "seed":
        return {"seed": SEED, "stream": STREAM}
    if mode == "row_seeds":
        return {"row_seeds": torch.randint(-2**62, 2**62, (shape[0],), generator=g), "stream": STREAM}
    return {"noise": rand(shape, dtype, g)}


def eps_for(backend, shape, kwargs):
    """The eps the op must use: the given noise, or pygen.randn on this backend (fp32)."""
    if "noise" in kwargs:
        return kwargs["noise"]
    seed = kwargs.get("row_seeds", kwargs.get("seed"))
    with pygen.use_backend(backend):
        return pygen.randn(shape, seed, kwargs["stream"], dtype=torch.float32)


def oracle_diffusion_loss(out, x0, eps, coeffs):
    """Plain torch: w·mean over the row of (m·out - ca·x0 - cb·eps)² (differentiable)."""
    acc = acc_of(x0.dtype)
    view = (-1,) + (1,) * (x0.dim() - 1)
    m, ca, cb, w = (coeffs[:, j].to(acc).view(view) for j in range(4))
    r = m * out - ca * x0.to(acc) - cb * eps.to(acc)
    return w.reshape(-1) * (r * r).reshape(x0.shape[0], -1).mean(1)


def oracle_reparameterize_kl(mu, logvar, eps):
    """Plain torch (float32/float64 inputs): z = mu + exp(logvar/2)·eps, 0.5·Σ (mu² + exp(logvar) - 1 - logvar)."""
    z = mu + torch.exp(0.5 * logvar) * eps.to(mu.dtype)
    kl = 0.5 * (mu * mu + torch.exp(logvar) - 1 - logvar).reshape(mu.shape[0], -1).sum(1)
    return z, kl


def assert_close(actual, expected, *, storage=None):
    """fp32: rtol 1e-5 with an atol of 1e-6 of the largest |value|; fp64 1e-10; fp16/bf16: one ulp
    of the storage type (``expected`` computed in fp32/fp64 and rounded). NaN in the same places."""
    storage = storage or actual.dtype
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    nan_a, nan_e = torch.isnan(actual), torch.isnan(expected)
    assert torch.equal(nan_a, nan_e), "NaN positions differ"
    a, e = actual[~nan_a].double(), expected[~nan_e].double()
    if a.numel() == 0:
        return
    scale = e.abs().max().item()
    if storage in (torch.float16, torch.bfloat16) and actual.dtype == storage:
        ref = expected[~nan_e].abs()
        ulp = (torch.nextafter(ref, torch.full_like(ref, math.inf)) - ref).double()
        bad = (a - e).abs() > ulp + 1e-7 * scale
        assert not bad.any(), f"{int(bad.sum())} elements differ by more than 1 ulp: max {(a - e).abs().max()}"
    elif actual.dtype == torch.float64:
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12 * scale)
    else:
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6 * scale)


# ---------------------------------------------------------------------------
# values and gradients against the oracle
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("mode", NOISE_MODES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_diffusion_loss_value_and_grad(backend, shape, dtype, mode):
    skip_unsupported(backend, dtype)
    g = gen(zlib.crc32(repr((shape, dtype, mode)).encode()))
    x0 = rand(shape, dtype, g)
    out = rand(shape, dtype, g).requires_grad_()
    coeffs = rand_coeffs(shape[0], g, torch.float64 if mode == "noise" else torch.float32)
    kw = noise_kwargs(mode, shape, dtype, g)
    grad_rows = rand((shape[0],), acc_of(dtype), g)

    with pygen.use_backend(backend):
        loss = pygen.fused_diffusion_mse(out, x0, coeffs, **kw)
    assert loss.shape == (shape[0],) and loss.dtype == acc_of(dtype)
    (grad,) = torch.autograd.grad(loss, out, grad_rows)

    eps = eps_for(backend, shape, kw)
    out_acc = out.detach().to(acc_of(dtype)).requires_grad_()
    expected = oracle_diffusion_loss(out_acc, x0, eps, coeffs)
    (expected_grad,) = torch.autograd.grad(expected, out_acc, grad_rows)
    assert_close(loss.detach(), expected.detach(), storage=dtype)
    assert_close(grad, expected_grad.to(dtype))


@pytest.mark.parametrize("mode", NOISE_MODES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_reparameterize_kl_value_and_grad(backend, shape, dtype, mode):
    skip_unsupported(backend, dtype)
    g = gen(zlib.crc32(repr((shape, dtype, mode, "kl")).encode()))
    mu = rand(shape, dtype, g).requires_grad_()
    logvar = rand(shape, dtype, g, 0.5).requires_grad_()
    kw = noise_kwargs(mode, shape, dtype, g)
    grad_z = rand(shape, dtype, g)
    grad_kl = rand((shape[0],), acc_of(dtype), g)

    with pygen.use_backend(backend):
        z, kl = pygen.reparameterize_kl(mu, logvar, **kw)
    assert z.shape == shape and z.dtype == dtype and kl.shape == (shape[0],) and kl.dtype == acc_of(dtype)
    gmu, glv = torch.autograd.grad((z, kl), (mu, logvar), (grad_z, grad_kl))

    acc = acc_of(dtype)
    eps = eps_for(backend, shape, kw).to(acc)
    mu_a = mu.detach().to(acc).requires_grad_()
    lv_a = logvar.detach().to(acc).requires_grad_()
    std = torch.exp(0.5 * lv_a)
    z_e = mu_a + std * eps
    kl_e = 0.5 * (mu_a * mu_a + std * std - 1 - lv_a).reshape(shape[0], -1).sum(1)
    gmu_e, glv_e = torch.autograd.grad((z_e, kl_e), (mu_a, lv_a), (grad_z.to(acc), grad_kl))
    assert_close(z.detach(), z_e.detach().to(dtype))
    assert_close(kl.detach(), kl_e.detach(), storage=dtype)
    assert_close(gmu, gmu_e.to(dtype))
    assert_close(glv, glv_e.to(dtype))


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_long_rows_and_unaligned_row_starts(backend):
    """Rows longer than one CPU piece (1024) whose flat noise index starts mid Philox group."""
    require_backend(backend)
    g = gen(5)
    shape = (3, 2501)
    x0, out = rand(shape, torch.float32, g), rand(shape, torch.float32, g)
    coeffs = rand_coeffs(3, g)
    with pygen.use_backend(backend):
        loss = pygen.fused_diffusion_mse(out, x0, coeffs, seed=SEED, stream=STREAM)
        z, kl = pygen.reparameterize_kl(out, x0 * 0.3, SEED, STREAM)
    eps = eps_for(backend, shape, {"seed": SEED, "stream": STREAM})
    assert_close(loss, oracle_diffusion_loss(out, x0, eps, coeffs))
    z_e, kl_e = oracle_reparameterize_kl(out, x0 * 0.3, eps)
    assert_close(z, z_e)
    assert_close(kl, kl_e)


# ---------------------------------------------------------------------------
# the noise contract: the same eps as q_sample / reparameterize
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("per_row", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_loss_sees_q_sample_noise(backend, per_row):
    """q_sample(x0, t, abar, seed=s, stream=k) and fused_diffusion_mse(..., seed=s, stream=k) use one eps,
    and the coefficient rows of each prediction type reproduce q_sample's own training targets."""
    require_backend(backend)
    g = gen(11)
    shape = (4, 3, 5)
    x0 = rand(shape, torch.float32, g)
    abar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    t = torch.tensor([0, 250, 600, 999])
    seed = torch.tensor([3, -5, 2**40, 7]) if per_row else 2**33 + 5
    out = rand(shape, torch.float32, g)
    a, s = abar[t].sqrt().float(), (1 - abar[t]).sqrt().float()
    ones, zeros = torch.ones(4), torch.zeros(4)
    cases = {"eps": (ones, zeros, ones), "x0": (ones, ones, zeros), "v": (ones, -s, a)}
    with pygen.use_backend(backend):
        for target, (m, ca, cb) in cases.items():
            x_t, eps, tgt = pygen.q_sample(x0, t, abar, seed=seed, stream=3, target=target)
            coeffs = torch.stack([m, ca, cb, ones], 1)
            fused = pygen.fused_diffusion_mse(out, x0, coeffs, seed=seed, stream=3)
            given = pygen.fused_diffusion_mse(out, x0, coeffs, noise=eps)
            torch.testing.assert_close(fused, given, rtol=1e-6, atol=1e-7)
            expected = ((out - tgt) ** 2).reshape(4, -1).mean(1)
            torch.testing.assert_close(fused, expected, rtol=1e-5, atol=1e-6)
        # the plain DDPM loss: F.mse_loss(eps_theta, eps) per row
        coeffs = torch.stack([ones, zeros, ones, ones], 1)
        fused = pygen.fused_diffusion_mse(out, x0, coeffs, seed=seed, stream=3)
        _, eps = pygen.q_sample(x0, t, abar, seed=seed, stream=3)
        torch.testing.assert_close(fused.mean(), F.mse_loss(out, eps), rtol=1e-5, atol=1e-7)
        # a different stream is different noise
        other = pygen.fused_diffusion_mse(out, x0, coeffs, seed=seed, stream=4)
        assert not torch.allclose(other, fused)


def test_ncsn_score_matching_coefficients():
    """coeffs (σ, 0, -1, w) give w·mean‖σ·s + eps‖² = w·σ²·mean‖s + eps/σ‖² (DSM with σ² weighting)."""
    g = gen(12)
    shape = (3, 17)
    x0, score, noise = (rand(shape, torch.float64, g) for _ in range(3))
    sigma = torch.tensor([0.01, 0.5, 20.0], dtype=torch.float64)
    coeffs = torch.stack([sigma, torch.zeros(3, dtype=torch.float64), -torch.ones(3, dtype=torch.float64),
                          0.5 * torch.ones(3, dtype=torch.float64)], 1)
    for backend in ("torch", "cpu"):
        if pygen.backends()[backend] != "available":
            continue
        with pygen.use_backend(backend):
            loss = pygen.fused_diffusion_mse(score, x0, coeffs, noise=noise)
        target = -noise / sigma.view(-1, 1)  # the score of the perturbation kernel at x0 + σ·eps
        expected = 0.5 * sigma**2 * ((score - target) ** 2).mean(1)
        torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_reparameterize_kl_z_is_reparameterize(backend):
    require_backend(backend)
    g = gen(13)
    mu, logvar = rand((3, 9), torch.float32, g), rand((3, 9), torch.float32, g)
    with pygen.use_backend(backend):
        for seed in (77, torch.tensor([1, 2, 3])):
            z, _ = pygen.reparameterize_kl(mu, logvar, seed, 5)
            torch.testing.assert_close(z, pygen.reparameterize(mu, logvar, seed, 5), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------
# gradcheck (fp64) on the torch path and the compiled CPU path
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("mode", NOISE_MODES)
@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_gradcheck_diffusion_loss(backend, mode):
    require_backend(backend)
    g = gen(21)
    shape = (3, 2, 5)
    x0 = rand(shape, torch.float64, g)
    out = rand(shape, torch.float64, g).requires_grad_()
    coeffs = rand_coeffs(3, g, torch.float64)
    kw = noise_kwargs(mode, shape, torch.float64, g)
    with pygen.use_backend(backend):
        assert torch.autograd.gradcheck(lambda o: pygen.fused_diffusion_mse(o, x0, coeffs, **kw), (out,))
        if backend == "torch":  # the reference is plain torch: second derivatives too
            assert torch.autograd.gradgradcheck(lambda o: pygen.fused_diffusion_mse(o, x0, coeffs, **kw), (out,))


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_gradcheck_diffusion_loss_all_inputs(backend):
    """x0, a given noise and coeffs get correct gradients too (plain torch in the backward)."""
    require_backend(backend)
    g = gen(22)
    shape = (2, 7)
    out, x0, noise = (rand(shape, torch.float64, g).requires_grad_() for _ in range(3))
    coeffs = rand_coeffs(2, g, torch.float64).requires_grad_()
    with pygen.use_backend(backend):
        assert torch.autograd.gradcheck(lambda o, x, n, c: pygen.fused_diffusion_mse(o, x, c, noise=n),
                                        (out, x0, noise, coeffs))
        assert torch.autograd.gradcheck(lambda x, c: pygen.fused_diffusion_mse(out.detach(), x, c, seed=4),
                                        (x0, coeffs))


@pytest.mark.parametrize("mode", NOISE_MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_diffusion_loss_grads_of_every_input(backend, dtype, mode):
    """model_out, x0, coeffs (and a given noise) all requiring gradients, against the oracle through
    torch autograd: the unfused part of the backward, for every storage dtype and noise source."""
    skip_unsupported(backend, dtype)
    g = gen(zlib.crc32(repr(("all-inputs", dtype, mode)).encode()))
    shape = (3, 2, 9)
    out, x0 = rand(shape, dtype, g).requires_grad_(), rand(shape, dtype, g).requires_grad_()
    coeffs = rand_coeffs(3, g).requires_grad_()
    kw = noise_kwargs(mode, shape, dtype, g)
    leaves = [out, x0, coeffs] + ([kw["noise"].requires_grad_()] if mode == "noise" else [])
    grad_rows = rand((3,), torch.float32, g)
    with pygen.use_backend(backend):
        got = torch.autograd.grad(pygen.fused_diffusion_mse(out, x0, coeffs, **kw), leaves, grad_rows)

    eps = eps_for(backend, shape, kw)
    ref_leaves = [t.detach().float().requires_grad_() for t in leaves]
    r_out, r_x0, r_coeffs = ref_leaves[:3]
    r_eps = ref_leaves[3] if mode == "noise" else eps
    expected = torch.autograd.grad(oracle_diffusion_loss(r_out, r_x0, r_eps, r_coeffs), ref_leaves, grad_rows)
    for name, a, e, leaf in zip(("model_out", "x0", "coeffs", "noise"), got, expected, leaves):
        assert a.dtype == leaf.dtype, name
        tol = 1e-5 if a.dtype == torch.float32 else (2e-3 if a.dtype == torch.float16 else 1.6e-2)
        torch.testing.assert_close(a.float(), e, rtol=tol, atol=tol * e.abs().max().item(), msg=name)


def test_compiled_backward_is_cpp():
    """On the compiled backends the autograd node is the C++ one (csrc/autograd/loss.cpp): the
    backward runs in the autograd engine without entering Python."""
    require_backend("cpu")
    x0 = torch.randn(2, 5)
    out = torch.randn(2, 5, requires_grad=True)
    with pygen.use_backend("cpu"):
        loss = pygen.fused_diffusion_mse(out, x0, torch.ones(2, 4), seed=1)
        z, kl = pygen.reparameterize_kl(out, torch.zeros(2, 5, requires_grad=True), 1)
    for t, name in ((loss, "DiffusionLossFunction"), (z, "ReparameterizeKLFunction"),
                    (kl, "ReparameterizeKLFunction")):
        assert name in t.grad_fn.name(), t.grad_fn.name()
        assert not isinstance(t.grad_fn, torch.autograd.function.BackwardCFunction)


@pytest.mark.parametrize("mode", NOISE_MODES)
@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_gradcheck_reparameterize_kl(backend, mode):
    require_backend(backend)
    g = gen(23)
    shape = (3, 4)
    mu = rand(shape, torch.float64, g).requires_grad_()
    logvar = rand(shape, torch.float64, g, 0.5).requires_grad_()
    kw = noise_kwargs(mode, shape, torch.float64, g)
    if mode == "noise":
        kw["noise"].requires_grad_()
        fn = lambda m, lv, n: pygen.reparameterize_kl(m, lv, noise=n)  # noqa: E731
        inputs = (mu, logvar, kw["noise"])
    else:
        fn = lambda m, lv: pygen.reparameterize_kl(m, lv, **kw)  # noqa: E731
        inputs = (mu, logvar)
    with pygen.use_backend(backend):
        assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unused_output_gradients(backend):
    """Only z or only kl used: the other output's gradient is zero."""
    require_backend(backend)
    g = gen(24)
    mu = rand((2, 6), torch.float32, g).requires_grad_()
    logvar = rand((2, 6), torch.float32, g).requires_grad_()
    with pygen.use_backend(backend):
        z, kl = pygen.reparameterize_kl(mu, logvar, 3)
        gmu, glv = torch.autograd.grad(kl.sum(), (mu, logvar))
    torch.testing.assert_close(gmu, mu.detach())
    torch.testing.assert_close(glv, 0.5 * (torch.exp(logvar.detach()) - 1), rtol=1e-5, atol=1e-6)
    with pygen.use_backend(backend):
        z, kl = pygen.reparameterize_kl(mu, logvar, 3)
        (gmu,) = torch.autograd.grad(z.sum(), (mu,))
    torch.testing.assert_close(gmu, torch.ones_like(mu))


# ---------------------------------------------------------------------------
# determinism
# ---------------------------------------------------------------------------
def test_cpu_reduction_independent_of_threads():
    require_backend("cpu")
    g = gen(31)
    shape = (3, 70001)
    x0, out = rand(shape, torch.float32, g), rand(shape, torch.float32, g)
    coeffs = rand_coeffs(3, g)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            with pygen.use_backend("cpu"):
                results.append((pygen.fused_diffusion_mse(out, x0, coeffs, seed=1, stream=2),
                                pygen.reparameterize_kl(out, x0, 1, 2)[1]))
    finally:
        torch.set_num_threads(threads)
    for loss, kl in results[1:]:
        assert torch.equal(loss, results[0][0]) and torch.equal(kl, results[0][1])


# ---------------------------------------------------------------------------
# NaN propagation and empty inputs
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_propagates(backend):
    require_backend(backend)
    g = gen(41)
    shape = (3, 6)
    x0 = rand(shape, torch.float32, g)
    out = rand(shape, torch.float32, g)
    out[1, 4] = math.nan
    coeffs = rand_coeffs(3, g)
    coeffs[2, 3] = math.nan  # a NaN weight
    out.requires_grad_()
    with pygen.use_backend(backend):
        loss = pygen.fused_diffusion_mse(out, x0, coeffs, seed=5)
        (grad,) = torch.autograd.grad(loss.sum(), out)
        mu = x0.clone()
        mu[0, 2] = math.nan
        z, kl = pygen.reparameterize_kl(mu, x0, 5)
    assert torch.isfinite(loss[0]) and torch.isnan(loss[1]) and torch.isnan(loss[2])
    assert torch.isnan(grad[1, 4]) and torch.isnan(grad[2]).all() and torch.isfinite(grad[0]).all()
    assert torch.isnan(kl[0]) and torch.isfinite(kl[1:]).all()
    assert torch.isnan(z[0, 2]) and torch.isfinite(z).sum() == z.numel() - 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_rows(backend):
    require_backend(backend)
    coeffs = torch.ones(2, 4)
    with pygen.use_backend(backend):
        loss = pygen.fused_diffusion_mse(torch.empty(2, 0), torch.empty(2, 0), coeffs, seed=1)
        z, kl = pygen.reparameterize_kl(torch.empty(2, 0), torch.empty(2, 0), 1)
        none = pygen.fused_diffusion_mse(torch.empty(0, 3), torch.empty(0, 3), torch.empty(0, 4), seed=1)
    assert torch.isnan(loss).all() and loss.shape == (2,)  # mean of nothing
    assert torch.equal(kl, torch.zeros(2)) and z.shape == (2, 0)
    assert none.shape == (0,)


# ---------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------
def test_bad_input_diffusion_loss():
    x0 = torch.randn(3, 4)
    c = torch.ones(3, 4)
    with pytest.raises(ValueError, match="model_out"):
        pygen.fused_diffusion_mse(torch.randn(3, 5), x0, c, seed=1)
    with pytest.raises(TypeError, match="model_out"):
        pygen.fused_diffusion_mse(x0.double(), x0, c, seed=1)
    with pytest.raises(TypeError, match="model_out"):
        pygen.fused_diffusion_mse([1.0], x0, c, seed=1)
    with pytest.raises(ValueError, match="coeffs"):
        pygen.fused_diffusion_mse(x0, x0, torch.ones(3, 3), seed=1)
    with pytest.raises(ValueError, match="coeffs"):
        pygen.fused_diffusion_mse(x0, x0, torch.ones(2, 4), seed=1)
    with pytest.raises(TypeError, match="coeffs"):
        pygen.fused_diffusion_mse(x0, x0, torch.ones(3, 4, dtype=torch.float16), seed=1)
    with pytest.raises(TypeError, match="x0"):
        pygen.fused_diffusion_mse(x0.int(), x0.int(), c, seed=1)
    with pytest.raises(ValueError, match="x0"):
        pygen.fused_diffusion_mse(torch.tensor(1.0), torch.tensor(1.0), c, seed=1)
    with pytest.raises(ValueError, match="seed"):
        pygen.fused_diffusion_mse(x0, x0, c)
    with pytest.raises(ValueError, match="not both"):
        pygen.fused_diffusion_mse(x0, x0, c, seed=1, noise=x0)
    with pytest.raises(ValueError, match="not both"):
        pygen.fused_diffusion_mse(x0, x0, c, seed=1, row_seeds=torch.ones(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="noise"):
        pygen.fused_diffusion_mse(x0, x0, c, noise=torch.randn(3, 5))
    with pytest.raises(ValueError, match="seed"):
        pygen.fused_diffusion_mse(x0, x0, c, row_seeds=torch.ones(2, dtype=torch.int64))
    with pytest.raises(TypeError, match="seed"):
        pygen.fused_diffusion_mse(x0, x0, c, seed=1.5)
    with pytest.raises(TypeError, match="stream"):
        pygen.fused_diffusion_mse(x0, x0, c, seed=1, stream="0")


def test_bad_input_reparameterize_kl():
    mu = torch.randn(3, 4)
    with pytest.raises(ValueError, match="logvar"):
        pygen.reparameterize_kl(mu, torch.randn(3, 5), 1)
    with pytest.raises(TypeError, match="logvar"):
        pygen.reparameterize_kl(mu, mu.double(), 1)
    with pytest.raises(ValueError, match="mu"):
        pygen.reparameterize_kl(torch.tensor(0.0), torch.tensor(0.0), 1)
    with pytest.raises(ValueError, match="seed"):
        pygen.reparameterize_kl(mu, mu)
    with pytest.raises(ValueError, match="noise"):
        pygen.reparameterize_kl(mu, mu, noise=torch.randn(4, 3))


def test_compiled_ops_reject_bad_input():
    """Direct torch.ops calls are checked in C++ too (RuntimeError naming the argument)."""
    require_backend("cpu")
    x0 = torch.randn(3, 4)
    c = torch.ones(3, 4)
    with pytest.raises(RuntimeError, match="model_out"):
        torch.ops.pygen.diffusion_loss(torch.randn(3, 5), x0, None, c, 1, 0, None)
    with pytest.raises(RuntimeError, match="coeffs"):
        torch.ops.pygen.diffusion_loss(x0, x0, None, torch.ones(3, 2), 1, 0, None)
    with pytest.raises(RuntimeError, match="grad_rows"):
        torch.ops.pygen.diffusion_loss_backward(torch.ones(2), x0, x0, None, c, 1, 0, None)
    with pytest.raises(RuntimeError, match="logvar"):
        torch.ops.pygen.reparameterize_kl(x0, torch.randn(4, 3), None, 1, 0, None)
    with pytest.raises(RuntimeError, match="row_seeds"):
        torch.ops.pygen.reparameterize_kl(x0, x0, None, 1, 0, torch.ones(2, dtype=torch.int64))
    with pytest.raises(RuntimeError, match="grad_kl"):
        torch.ops.pygen.reparameterize_kl_backward(x0, torch.ones(3, 1), x0, x0, None, 1, 0, None)


# ---------------------------------------------------------------------------
# torch.library registration
# ---------------------------------------------------------------------------
def _opcheck_cases(dtype, *, grad=False):
    g = gen(51)
    shape = (3, 5)
    acc = acc_of(dtype)
    out, x0, noise, mu, lv, gz = (rand(shape, dtype, g) for _ in range(6))
    coeffs = rand_coeffs(3, g)
    rows = torch.tensor([5, -6, 2**62])
    gr = rand((3,), acc, g)
    if grad:
        out.requires_grad_()
        mu.requires_grad_()
        lv.requires_grad_()
    fwd = [
        (torch.ops.pygen.diffusion_loss, (out, x0, noise, coeffs, 0, 0, None)),
        (torch.ops.pygen.diffusion_loss, (out, x0, None, coeffs.double(), -7, 2**40, None)),
        (torch.ops.pygen.diffusion_loss, (out, x0, None, coeffs, 3, 1, rows)),
        (torch.ops.pygen.reparameterize_kl, (mu, lv, noise, 0, 0, None)),
        (torch.ops.pygen.reparameterize_kl, (mu, lv, None, 3, 1, rows)),
    ]
    bwd = [
        (torch.ops.pygen.diffusion_loss_backward, (gr, out, x0, None, coeffs, 3, 1, rows)),
        (torch.ops.pygen.diffusion_loss_backward, (gr, out, x0, noise, coeffs, 0, 0, None)),
        (torch.ops.pygen.reparameterize_kl_backward, (gz, gr, mu, lv, None, -7, 2, None)),
        (torch.ops.pygen.reparameterize_kl_backward, (gz, gr, mu, lv, noise, 0, 0, None)),
    ]
    return fwd if grad else fwd + bwd


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_opcheck(dtype):
    for op, args in _opcheck_cases(dtype):
        torch.library.opcheck(op.default, args)


def test_opcheck_with_grad():
    for op, args in _opcheck_cases(torch.float64, grad=True):
        torch.library.opcheck(op.default, args)


@pytest.mark.skipif(not TRITON_OK, reason="needs triton and TRITON_INTERPRET=1 or CUDA")
@pytest.mark.parametrize("grad", [False, True])
def test_opcheck_triton(grad):
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("triton needs TRITON_INTERPRET=1 on the CPU")
    from conftest import device_for, to_device

    for op, args in _opcheck_cases(torch.float32, grad=grad):
        triton_op = getattr(torch.ops.pygen, op._qualified_op_name.split("::")[1] + "_triton")
        torch.library.opcheck(triton_op.default, to_device(args, device_for("triton")))


def test_fake_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(4, 3, 2, dtype=torch.bfloat16)
        loss = torch.ops.pygen.diffusion_loss(x, x, None, torch.empty(4, 4), 1, 0, None)
        z, kl = torch.ops.pygen.reparameterize_kl(x, x, None, 1, 0, None)
    assert loss.shape == (4,) and loss.dtype == torch.float32
    assert z.shape == (4, 3, 2) and z.dtype == torch.bfloat16 and kl.shape == (4,) and kl.dtype == torch.float32


def test_public_names():
    assert pygen.fused_diffusion_mse is L.fused_diffusion_mse
    assert pygen.reparameterize_kl is L.reparameterize_kl
