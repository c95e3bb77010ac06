"""Tests of pygen.langevin_step (op pygen::langevin_step) and of the SNR Langevin corrector step
pygen.ops.langevin.langevin_snr_step (op pygen::langevin_snr_step) on the torch, cpu, triton
(and, on a GPU, cuda) backends.

x_next = x + (dt/2)·score + sqrt(dt)·z with z given or exactly pygen.randn(x.shape, seed, stream).
Expected values are computed here in float64 from the formula and randn_reference, independently
of pygen/ops/langevin.py. Triton runs under TRITON_INTERPRET=1 (small sizes).
"""
import importlib.util
import math
import os

import pytest
import torch

import pygen
from conftest import ALL_BACKENDS as BACKENDS
from conftest import MANTISSA_BITS, device_for, make, to_device
from pygen.ops._common import to_signed64
from pygen.ops.random import randn_reference

HAS_TRITON = importlib.util.find_spec("triton") is not None
TRITON_OK = HAS_TRITON and (os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available())

SHAPES = [(3, 5, 7), (2, 1001), (1, 4), (5, 3)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def expected(x, score, dt, z):
    """float64 x + dt/2·score + sqrt(dt)·z; dt a float or a per-row tensor."""
    if isinstance(dt, torch.Tensor):
        dt = dt.double().reshape((-1,) + (1,) * (x.dim() - 1))
        c2 = dt.sqrt()
    else:
        c2 = math.sqrt(dt)
    return x.double() + 0.5 * dt * score.double() + c2 * z.double()


def assert_close_storage(out, exp, dtype, *, noise_atol=0.0):
    """fp32: rtol 1e-5; fp64: rtol 1e-12; fp16/bf16: one ulp of the storage type.

    ``noise_atol`` covers in-kernel normals, which agree with randn_reference to fp32
    rounding of log/sin/cos (~1e-6 absolute), not bit for bit.
    """
    assert out.dtype == dtype
    assert out.shape == exp.shape
    out = out.double().cpu()
    exp = exp.cpu()
    assert torch.isfinite(out).all(), "every element must be written with a finite value"
    if dtype in MANTISSA_BITS:
        # one ulp of the storage type at the expected value (plus the normals' fp32 noise)
        exp_rounded = exp.to(dtype).double()
        ulp = torch.ldexp(torch.ones_like(exp), torch.frexp(exp_rounded)[1] - 1 - MANTISSA_BITS[dtype])
        err = (out - exp_rounded).abs()
        assert bool((err <= ulp + noise_atol).all()), f"max err {(err - ulp).max().item()} over 1 ulp"
    else:
        rtol = 1e-12 if dtype == torch.float64 else 1e-5
        torch.testing.assert_close(out, exp, rtol=rtol, atol=1e-7 + noise_atol)


# ---------------------------------------------------------------------------
# values
# ---------------------------------------------------------------------------
MODES = ["noise", "noise_rowstep", "seed", "seed_rowstep", "rowseed", "rowseed_rowstep"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", MODES)
def test_matches_formula(backend, shape, dtype, mode):
    dev = device_for(backend)
    x = make(shape, dtype, dev, seed=1)
    score = make(shape, dtype, dev, seed=2, scale=3.0)
    batch = shape[0]
    per_row_step = mode.endswith("rowstep")
    if per_row_step:
        steps64 = torch.linspace(0.02, 0.9, batch, dtype=torch.float64)
        step_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        dt_arg = steps64.to(step_dtype).to(dev)
        dt_exp = dt_arg.double().cpu()
    else:
        dt_arg = dt_exp = 0.37
    stream = 2**63 + 11
    if mode.startswith("noise"):
        z = make(shape, dtype, dev, seed=3)
        with pygen.use_backend(backend):
            out = pygen.langevin_step(x, score, dt_arg, stream=stream, noise=z)
        exp = expected(x.cpu(), score.cpu(), dt_exp, z.cpu())
        noise_atol = 0.0
    else:
        if mode.startswith("rowseed"):
            seed = torch.tensor([7, -1, 2**62 + 3, 0, 12345][:batch], dtype=torch.int64, device=dev)
            z = randn_reference(shape, 0, to_signed64(stream), seed.cpu())
        else:
            seed = 2**64 - 5
            z = randn_reference(shape, to_signed64(seed), to_signed64(stream), None)
        with pygen.use_backend(backend):
            out = pygen.langevin_step(x, score, dt_arg, seed, stream)
        exp = expected(x.cpu(), score.cpu(), dt_exp, z)
        noise_atol = 2e-6
    assert out.device == x.device
    assert out.is_contiguous()
    assert_close_storage(out, exp, dtype, noise_atol=noise_atol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(3, 5, 7), (4, 1001), (6,), ()])
def test_in_kernel_noise_is_pygen_randn(backend, shape):
    """With x = score = 0 and dt = 1 the step returns its noise: pygen.randn(x.shape, seed, stream)."""
    dev = device_for(backend)
    x = torch.zeros(shape, device=dev)
    seeds = [0, 2**63 + 5, -3]
    if shape:
        seeds.append(torch.arange(shape[0], dtype=torch.int64, device=dev) * (2**61 + 1) - 9)
    for seed in seeds:
        for stream in (0, 1, 2**64 - 1):
            with pygen.use_backend(backend):
                z = pygen.langevin_step(x, x, 1.0, seed, stream)
                ref_same_backend = pygen.randn(shape, seed, stream, device=dev)
            if isinstance(seed, torch.Tensor):
                ref = randn_reference(shape, 0, to_signed64(stream), seed.cpu())
            else:
                ref = randn_reference(shape, to_signed64(seed), to_signed64(stream))
            torch.testing.assert_close(z.cpu(), ref, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(z, ref_same_backend, rtol=1e-5, atol=1e-6)
    # the noise does depend on seed and stream
    with pygen.use_backend(backend):
        a = pygen.langevin_step(x, x, 1.0, 1, 0)
        b = pygen.langevin_step(x, x, 1.0, 1, 1)
        c = pygen.langevin_step(x, x, 1.0, 2, 0)
    if a.numel() >= 4:
        assert not torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_row_steps_scale_each_row(backend):
    """Row b uses dt[b]: a zero step returns x exactly; others match their scalar-step call."""
    dev = device_for(backend)
    shape = (4, 3, 37)
    x, score, z = (make(shape, torch.float32, dev, seed=s) for s in (4, 5, 6))
    steps = torch.tensor([0.0, 0.5, 1e-4, 2.0], device=dev)
    with pygen.use_backend(backend):
        out = pygen.langevin_step(x, score, steps, noise=z)
        out_seed = pygen.langevin_step(x, score, steps, 99, 4)
        rows = [pygen.langevin_step(x[b:b + 1], score[b:b + 1], float(steps[b]), noise=z[b:b + 1]) for b in range(4)]
    assert torch.equal(out[0], x[0])
    torch.testing.assert_close(out, torch.cat(rows), rtol=1e-6, atol=1e-7)
    # in-kernel noise with an int seed keeps its flat numbering while the step varies per row
    zf = randn_reference(shape, 99, 4)
    torch.testing.assert_close(out_seed.cpu(), expected(x.cpu(), score.cpu(), steps.cpu(), zf).float(), rtol=1e-5,
                               atol=2e-6)
    assert torch.equal(out_seed[0], x[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_not_multiple_of_four(backend):
    """Row length 3 and per-row steps: Philox groups straddle batch rows (int seed) or not (row seeds)."""
    dev = device_for(backend)
    shape = (7, 3)
    x, score = make(shape, torch.float32, dev, seed=7), make(shape, torch.float32, dev, seed=8)
    steps = torch.linspace(0.1, 1.3, 7, device=dev)
    for seed in (5, torch.arange(7, device=dev) + 100):
        with pygen.use_backend(backend):
            out = pygen.langevin_step(x, score, steps, seed, 3)
        if isinstance(seed, torch.Tensor):
            z = randn_reference(shape, 0, 3, seed.cpu())
        else:
            z = randn_reference(shape, seed, 3)
        torch.testing.assert_close(out.cpu(), expected(x.cpu(), score.cpu(), steps.cpu(), z).float(), rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_split_with_row_seeds(backend):
    """Per-row seeds: a row's result does not depend on the batch it is in."""
    dev = device_for(backend)
    shape = (6, 2, 45)
    x, score = make(shape, torch.float32, dev, seed=9), make(shape, torch.float32, dev, seed=10)
    seeds = torch.tensor([3, 1, 4, 1, 5, 9], dtype=torch.int64, device=dev)
    steps = torch.linspace(0.05, 0.6, 6, device=dev)
    with pygen.use_backend(backend):
        full = pygen.langevin_step(x, score, steps, seeds, 17)
        head = pygen.langevin_step(x[:2], score[:2], steps[:2], seeds[:2], 17)
        tail = pygen.langevin_step(x[2:], score[2:], steps[2:], seeds[2:], 17)
    assert torch.equal(full, torch.cat([head, tail]))
    # rows 1 and 3 share a seed, so they share noise: out - x - dt/2·score is sqrt(dt)·z
    z1 = (full[1] - x[1] - 0.5 * steps[1] * score[1]) / steps[1].sqrt()
    z3 = (full[3] - x[3] - 0.5 * steps[3] * score[3]) / steps[3].sqrt()
    torch.testing.assert_close(z1, z3, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_propagates(backend):
    dev = device_for(backend)
    shape = (3, 10)
    x, score, z = (make(shape, torch.float32, dev, seed=s) for s in (11, 12, 13))
    x[0, 1] = float("nan")
    score[1, 2] = float("nan")
    z[2, 3] = float("nan")
    nan_mask = torch.zeros(shape, dtype=torch.bool)
    nan_mask[0, 1] = nan_mask[1, 2] = nan_mask[2, 3] = True
    with pygen.use_backend(backend):
        out = pygen.langevin_step(x, score, 0.1, noise=z)
        out_seed = pygen.langevin_step(x, score, torch.full((3,), 0.1, device=dev), 4)
        out_inf = pygen.langevin_step(x, torch.full_like(score, float("inf")), 0.1, noise=z)
    assert torch.equal(torch.isnan(out).cpu(), nan_mask)
    seed_mask = nan_mask.clone()
    seed_mask[2, 3] = False  # z is generated, not read
    assert torch.equal(torch.isnan(out_seed).cpu(), seed_mask)
    assert torch.isinf(out_inf).cpu()[~nan_mask].all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    dev = device_for(backend)
    base = make((9, 8), torch.float32, dev, seed=14)
    x = base.t()  # (8, 9), not contiguous
    score = make((8, 18), torch.float32, dev, seed=15)[:, ::2]
    z = make((9, 8), torch.float32, dev, seed=16).t()
    steps = torch.linspace(0.1, 0.8, 16, device=dev)[::2]
    with pygen.use_backend(backend):
        out = pygen.langevin_step(x, score, steps, noise=z)
        ref = pygen.langevin_step(x.contiguous(), score.contiguous(), steps.contiguous(), noise=z.contiguous())
        out_s = pygen.langevin_step(x, score, 0.3, 21, 2)
    assert torch.equal(out, ref)
    torch.testing.assert_close(out_s.cpu(), expected(x.cpu(), score.cpu(), 0.3, randn_reference((8, 9), 21, 2)).float(),
                               rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_and_zero_dim(backend):
    dev = device_for(backend)
    with pygen.use_backend(backend):
        e = torch.empty(0, 5, device=dev)
        out = pygen.langevin_step(e, e, torch.empty(0, device=dev), 1)
        assert out.shape == (0, 5)
        x = torch.tensor(0.5, device=dev)
        s = torch.tensor(-1.0, device=dev)
        out0 = pygen.langevin_step(x, s, 0.25, 8, 1)
    z = randn_reference((), 8, 1)
    torch.testing.assert_close(out0.cpu(), (0.5 - 0.125 + 0.5 * z).float(), rtol=1e-5, atol=1e-6)
    assert out0.shape == ()


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_global_rng_state(backend):
    dev = device_for(backend)
    x = make((2, 50), torch.float32, dev, seed=17)
    before = torch.get_rng_state()
    with pygen.use_backend(backend):
        a = pygen.langevin_step(x, x, 0.1, 5, 0)
        torch.rand(3)  # moving the global generator changes nothing
        b = pygen.langevin_step(x, x, 0.1, 5, 0)
    torch.random.set_rng_state(before)
    with pygen.use_backend(backend):
        pygen.langevin_step(x, x, 0.1, 5, 0)
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ["torch", BACKENDS[1]])
def test_gaussian_target_stationary_variance(backend):
    """Langevin on N(0, 1) (score = -x) with streams = step numbers: the chain's stationary
    variance is 1 / (1 - dt/4) for x' = (1 - dt/2) x + sqrt(dt) z — checks that the noise of
    successive streams is independent and unit-variance."""
    dt, steps, chains = 0.5, 60, 200_000
    x = torch.zeros(chains, dtype=torch.float64)
    with pygen.use_backend(backend):
        for k in range(steps):
            x = pygen.langevin_step(x, -x, dt, 2024, k)
    var_exp = 1.0 / (1.0 - dt / 4)
    # after 60 steps (1 - dt/2)^120 ~ 1e-15 of the start remains
    se = var_exp * math.sqrt(2.0 / chains)
    assert abs(x.var().item() - var_exp) < 5 * se
    assert abs(x.mean().item()) < 5 * math.sqrt(var_exp / chains)


# ---------------------------------------------------------------------------
# autograd
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["noise", "noise_rowstep", "seed_rowstep", "rowseed_rowstep"])
def test_gradients(backend, mode):
    dev = device_for(backend)
    shape = (3, 6)
    x = make(shape, torch.float64, dev, seed=18).requires_grad_()
    score = make(shape, torch.float64, dev, seed=19).requires_grad_()
    steps = torch.tensor([0.3, 0.7, 1.1], dtype=torch.float64, device=dev).requires_grad_()
    dt = steps if mode.endswith("rowstep") else 0.45
    kwargs = {}
    if mode.startswith("noise"):
        z = make(shape, torch.float64, dev, seed=20).requires_grad_()
        kwargs["noise"] = z
        args = ()
        inputs = [x, score, z] + ([steps] if dt is steps else [])
    else:
        seed = torch.tensor([1, 2, 3], device=dev) if mode.startswith("rowseed") else 77
        args = (seed, 5)
        inputs = [x, score, steps]

    def f(*ins):
        xx, ss = ins[0], ins[1]
        if "noise" in kwargs:
            zz = ins[2]
            d = ins[3] if len(ins) > 3 else dt
            return pygen.langevin_step(xx, ss, d, noise=zz)
        return pygen.langevin_step(xx, ss, ins[2], *args)

    with pygen.use_backend(backend):
        out = f(*inputs)
        assert out.requires_grad
        assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-5)


# ---------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------
def _x():
    return make((2, 3), torch.float32, seed=21)


@pytest.mark.parametrize(
    "call, exc, word",
    [
        (lambda x: pygen.langevin_step(x, x, -0.1, 1), ValueError, "step_size"),
        (lambda x: pygen.langevin_step(x, x, float("nan"), 1), ValueError, "step_size"),
        (lambda x: pygen.langevin_step(x, x, torch.tensor([0.1, -0.2]), 1), ValueError, "step_size"),
        (lambda x: pygen.langevin_step(x, x, torch.tensor([0.1, float("nan")]), 1), ValueError, "step_size"),
        (lambda x: pygen.langevin_step(x, x, torch.tensor([1, 2]), 1), TypeError, "step_size"),
        (lambda x: pygen.langevin_step(x, x, torch.tensor([0.1, 0.2, 0.3]), 1), ValueError, "step_size"),
        (lambda x: pygen.langevin_step(x, x, torch.tensor(0.1), 1), ValueError, "step_size"),
        (lambda x: pygen.langevin_step(x, x, torch.ones(2, 1), 1), ValueError, "step_size"),
        (lambda x: pygen.langevin_step(x, x, torch.ones(2, device="meta"), 1), ValueError, "step_size"),
        (lambda x: pygen.langevin_step(x, x, "0.1", 1), TypeError, "step_size"),
        (lambda x: pygen.langevin_step(x, x, True, 1), TypeError, "step_size"),
        (lambda x: pygen.langevin_step(x, x, None, 1), TypeError, "step_size"),
        (lambda x: pygen.langevin_step(x, x, 0.1), ValueError, "seed"),
        (lambda x: pygen.langevin_step(x, x, 0.1, 1, noise=x), ValueError, "seed"),
        (lambda x: pygen.langevin_step(x, x, 0.1, 1.5), TypeError, "seed"),
        (lambda x: pygen.langevin_step(x, x, 0.1, 2**64), ValueError, "seed"),
        (lambda x: pygen.langevin_step(x, x, 0.1, torch.tensor([1, 2], dtype=torch.int32)), TypeError, "seed"),
        (lambda x: pygen.langevin_step(x, x, 0.1, torch.tensor([1, 2, 3])), ValueError, "seed"),
        (lambda x: pygen.langevin_step(x, x, 0.1, 1, 0.5), TypeError, "stream"),
        (lambda x: pygen.langevin_step(x, x, 0.1, 1, -(2**63) - 1), ValueError, "stream"),
        (lambda x: pygen.langevin_step(x, x[:1], 0.1, 1), ValueError, "score"),
        (lambda x: pygen.langevin_step(x, x.double(), 0.1, 1), TypeError, "score"),
        (lambda x: pygen.langevin_step(x, x.to("meta"), 0.1, 1), ValueError, "score"),
        (lambda x: pygen.langevin_step(x, x.tolist(), 0.1, 1), TypeError, "score"),
        (lambda x: pygen.langevin_step(x, x, 0.1, noise=x.t()), ValueError, "noise"),
        (lambda x: pygen.langevin_step(x, x, 0.1, noise=x.half()), TypeError, "noise"),
        (lambda x: pygen.langevin_step(x.int(), x.int(), 0.1, 1), TypeError, "x"),
        (lambda x: pygen.langevin_step(x.tolist(), x, 0.1, 1), TypeError, "x"),
        (lambda x: pygen.langevin_step(x[0, 0], x[0, 0], 0.1, torch.tensor([1])), ValueError, "seed"),
    ],
)
def test_bad_input(call, exc, word):
    with pytest.raises(exc, match=word):
        call(_x())


def test_op_rejects_negative_scalar_step():
    x = _x()
    with pytest.raises((RuntimeError, ValueError), match="step_size"):
        torch.ops.pygen.langevin_step(x, x, None, -1.0, x, 0, 0, None)


# ---------------------------------------------------------------------------
# torch.library registration
# ---------------------------------------------------------------------------
def _opcheck_cases(dtype):
    x, score, z = (make((3, 5, 7), dtype, seed=s) for s in (22, 23, 24))
    steps = torch.tensor([0.1, 0.2, 0.3])
    rows = torch.tensor([5, -6, 2**62], dtype=torch.int64)
    return [
        (x, score, None, 0.3, z, 0, 0, None),
        (x, score, steps, 0.0, z, 0, 0, None),
        (x, score, None, 0.3, None, -7, 2**40, None),
        (x, score, steps.double(), 0.0, None, 3, 1, rows),
        (x, score, steps, 0.0, None, 3, 1, None),
        (x, score, None, 0.3, None, 3, 2**63 - 1, rows, torch.tensor([4])),
        (x, score, steps, 0.0, None, 3, 1, None, torch.tensor([0])),
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_opcheck_langevin_step(dtype):
    for args in _opcheck_cases(dtype):
        torch.library.opcheck(torch.ops.pygen.langevin_step.default, args)


@pytest.mark.skipif(not TRITON_OK, reason="needs triton and TRITON_INTERPRET=1 or CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_langevin_step_triton(dtype):
    for args in _opcheck_cases(dtype):
        if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("triton needs TRITON_INTERPRET=1 on the CPU")
        torch.library.opcheck(torch.ops.pygen.langevin_step_triton.default, to_device(args, device_for("triton")))


def test_opcheck_with_grad():
    x, score, z = (make((2, 9), torch.float64, seed=s).requires_grad_() for s in (25, 26, 27))
    steps = torch.tensor([0.2, 0.5], dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(torch.ops.pygen.langevin_step.default, (x, score, steps, 0.0, z, 0, 0, None))
    torch.library.opcheck(torch.ops.pygen.langevin_step.default, (x, score, None, 0.2, None, 1, 2, None))
    torch.library.opcheck(torch.ops.pygen.langevin_step.default, (x, score, steps, 0.0, None, 1, 2, None,
                                                                  torch.tensor([3])))


def test_fake_tensor_shape():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(4, 3, 2, dtype=torch.float16)
        out = torch.ops.pygen.langevin_step(x, x, None, 0.1, None, 1, 0, None)
    assert out.shape == (4, 3, 2) and out.dtype == torch.float16


def test_public_names():
    import pygen.ops.langevin as mod

    assert mod.__all__ == ["langevin_step", "langevin_snr_step"]
    assert pygen.langevin_step is mod.langevin_step


@pytest.mark.parametrize("backend", ["torch", BACKENDS[1]])
@pytest.mark.parametrize("shape", [(2, 1025), (3, 2047), (7, 333), (2, 40001), (3, 3, 4099)])
@pytest.mark.parametrize("mode", ["noise_rowstep", "seed_rowstep", "rowseed_rowstep", "seed"])
def test_large_rows_cpu(backend, shape, mode):
    """Sizes that put the CPU kernel's noise tiles (1024 elements) and parallel chunks across
    batch-row boundaries, e.g. a tile starting on a row's last element."""
    x, score = make(shape, torch.float32, seed=28), make(shape, torch.float32, seed=29)
    steps = torch.linspace(0.1, 2.0, shape[0])
    dt = steps if mode.endswith("rowstep") else 0.6
    if mode.startswith("noise"):
        z = make(shape, torch.float32, seed=30)
        with pygen.use_backend(backend):
            out = pygen.langevin_step(x, score, dt, noise=z)
    else:
        seed = torch.arange(shape[0]) * 31 + 1 if mode.startswith("rowseed") else 123
        with pygen.use_backend(backend):
            out = pygen.langevin_step(x, score, dt, seed, 9)
        z = randn_reference(shape, 0 if isinstance(seed, torch.Tensor) else seed, 9,
                            seed if isinstance(seed, torch.Tensor) else None)
    torch.testing.assert_close(out, expected(x, score, dt, z).float(), rtol=1e-5, atol=4e-6)



@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("per_row_steps", [False, True])
@pytest.mark.parametrize("row_seeds", [False, True])
def test_stream_offset(backend, dtype, per_row_steps, row_seeds):
    """stream_offset = [k] (a device step counter): exactly the call with stream + k (mod 2^64); given noise
    ignores it; the offset is not modified."""
    if dtype == torch.float64 and backend not in ("torch", "cpu"):
        pytest.skip("fp64 storage: torch and cpu backends")
    dev = device_for(backend)
    shape = (3, 5, 7)
    x, score = make(shape, dtype, dev, seed=70), make(shape, dtype, dev, seed=71)
    dt = torch.tensor([0.1, 0.3, 0.02], device=dev) if per_row_steps else 0.2
    seed = torch.tensor([3, -4, 2**62], device=dev) if row_seeds else 11
    for stream, k in [(9, 0), (9, 5), (2**64 - 3, 4)]:
        offset = torch.tensor([k], device=dev)
        with pygen.use_backend(backend):
            want = pygen.langevin_step(x, score, dt, seed, to_signed64(stream + k))
            got = pygen.langevin_step(x, score, dt, seed, stream, stream_offset=offset)
            z = make(shape, dtype, dev, seed=72)
            given = pygen.langevin_step(x, score, dt, stream=stream, noise=z, stream_offset=offset)
            given_want = pygen.langevin_step(x, score, dt, noise=z)
        assert torch.equal(got, want), (stream, k)
        assert torch.equal(given, given_want)
        assert int(offset[0]) == k


def test_stream_offset_gradients_regenerate_the_offset_noise():
    """The step-size gradient regenerates z from stream + offset."""
    x, score = make((4, 6), torch.float64, "cpu", seed=73), make((4, 6), torch.float64, "cpu", seed=74)
    dt = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64, requires_grad=True)
    offset = torch.tensor([6])
    for backend in ["torch"] + (["cpu"] if pygen.backends()["cpu"] == "available" else []):
        with pygen.use_backend(backend):
            (ga,) = torch.autograd.grad(pygen.langevin_step(x, score, dt, 2, 10, stream_offset=offset).sum(), dt)
            (gb,) = torch.autograd.grad(pygen.langevin_step(x, score, dt, 2, 16).sum(), dt)
        torch.testing.assert_close(ga, gb, rtol=1e-6, atol=1e-9)


def test_reference_reads_device_counters_without_host_reads():
    """The torch reference forms stream + offset, k_table[i] and the step noise's streams as tensors: no
    ``_local_scalar_dense`` (``.item()``, ``int(t)``), which on a GPU would be a host sync per step and
    would break a CUDA-graph capture."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from pygen.ops.langevin import langevin_snr_step_reference, langevin_step_reference
    from pygen.ops.random import randn_fill_reference
    from pygen.ops.step import step_noise_reference

    class CountReads(TorchDispatchMode):
        reads = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default:
                CountReads.reads += 1
            return func(*args, **(kwargs or {}))

    x, score = make((3, 10), torch.float32, "cpu", seed=75), make((3, 10), torch.float32, "cpu", seed=76)
    offset, index, rows = torch.tensor([4]), torch.tensor([1]), torch.tensor([3, -1, 7])
    with CountReads():
        randn_fill_reference(torch.empty(3, 10), 5, 2**63 - 2, None, offset)
        langevin_step_reference(x, score, None, 0.1, None, 5, 9, rows, offset)
        langevin_snr_step_reference(x, score, None, torch.empty_like(x), torch.empty(3), 5, 9, None, 1.0, True,
                                    torch.tensor([0.2, 0.3]), index)
        step_noise_reference(x, index, 5, 9, None)
        step_noise_reference(x, torch.tensor([0, 2, 1]), 5, 9, rows)
    assert CountReads.reads == 0
    assert int(index[0]) == 2 and int(offset[0]) == 4


@pytest.mark.parametrize("offset, exc", [(torch.zeros(2, dtype=torch.int64), ValueError),
                                         (torch.zeros(1, dtype=torch.int32), TypeError),
                                         (torch.zeros((), dtype=torch.int64), ValueError),
                                         ([0], TypeError)])
def test_stream_offset_bad_input(offset, exc):
    x = torch.zeros(2, 3)
    with pytest.raises(exc, match="stream_offset"):
        pygen.langevin_step(x, x, 0.1, 1, stream_offset=offset)


# ---------------------------------------------------------------------------
# langevin_snr_step (score_sde's SNR Langevin corrector)
# ---------------------------------------------------------------------------
from pygen.ops.langevin import langevin_snr_step  # noqa: E402

SNR_SHAPES = [(3, 5, 7), (2, 1001), (1, 4), (5, 1)]
SNR_MODES = ["noise", "seed", "rowseed"]


def snr_expected(x, score, z, k, batch_norm):
    """float64 (out, dt) straight from score_sde's LangevinCorrector with dt = 2·step_size."""
    b = x.shape[0]
    s, z = score.double().cpu(), z.double().cpu()
    g = torch.linalg.vector_norm(s.reshape(b, -1), dim=1)
    n = torch.linalg.vector_norm(z.reshape(b, -1), dim=1)
    if batch_norm:
        g, n = g.mean().expand(b), n.mean().expand(b)
    step_size = (n / g) ** 2 * (k / 2)  # score_sde: (snr·|z|/|g|)²·2·alpha, k = 4·alpha·snr²
    view = (-1,) + (1,) * (x.dim() - 1)
    out = x.double().cpu() + step_size.view(view) * s + torch.sqrt(2 * step_size).view(view) * z
    return out, 2 * step_size


def _snr_noise(mode, shape, dtype, dev, stream):
    """(seed argument, noise argument, the z the op must use as float64 CPU)."""
    if mode == "noise":
        z = make(shape, dtype, dev, seed=43)
        return None, z, z.double().cpu()
    if mode == "rowseed":
        values = [7, -1, 2**62 + 3, 0, 12345] + [1000 + 3 * r for r in range(shape[0])]
        seed = torch.tensor(values[: shape[0]], dtype=torch.int64, device=dev)
        return seed, None, randn_reference(shape, 0, to_signed64(stream), seed.cpu()).double()
    seed = 2**64 - 5
    return seed, None, randn_reference(shape, to_signed64(seed), to_signed64(stream)).double()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SNR_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", SNR_MODES)
@pytest.mark.parametrize("batch_norm", [True, False])
def test_snr_matches_score_sde(backend, shape, dtype, mode, batch_norm):
    if dtype == torch.float64 and backend not in ("torch", "cpu"):
        pytest.skip("fp64 storage: torch and cpu backends")
    dev = device_for(backend)
    x = make(shape, dtype, dev, seed=41)
    score = make(shape, dtype, dev, seed=42, scale=3.0)
    stream = 2**63 + 11
    seed, noise, z = _snr_noise(mode, shape, dtype, dev, stream)
    k = 4 * 0.93 * 0.16**2
    with pygen.use_backend(backend):
        out, dt = langevin_snr_step(x, score, k, seed, stream, noise=noise, batch_norm=batch_norm,
                                    return_step=True)
    exp, dt_exp = snr_expected(x, score, z, k, batch_norm)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert dt.dtype == acc and dt.shape == (shape[0],) and dt.device == x.device
    # in-kernel normals agree with randn_reference to fp32 rounding of log/sin/cos, not bit for bit
    exact = acc == torch.float64 and mode == "noise"
    torch.testing.assert_close(dt.double().cpu(), dt_exp, rtol=1e-12 if exact else 2e-6, atol=0)
    if batch_norm:
        assert torch.equal(dt, dt[:1].expand_as(dt))
    elif shape[0] > 1:
        assert not torch.equal(dt, dt[:1].expand_as(dt)), "row norms must give different steps per row"
    assert out.device == x.device and out.is_contiguous()
    assert_close_storage(out, exp, dtype, noise_atol=0.0 if mode == "noise" else 2e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(3, 5, 7), (2, 1001), (4, 3)])
@pytest.mark.parametrize("batch_norm", [True, False])
def test_snr_in_kernel_noise_is_pygen_randn(backend, shape, batch_norm):
    """In-kernel z (int seed, per-row seeds) gives the result of passing noise = pygen.randn(...)."""
    dev = device_for(backend)
    x, score = make(shape, torch.float32, dev, seed=44), make(shape, torch.float32, dev, seed=45)
    for seed in (3, 2**63 + 1, torch.arange(shape[0], device=dev) * (2**61 + 1) - 9):
        with pygen.use_backend(backend):
            drawn = langevin_snr_step(x, score, 0.2, seed, 17, batch_norm=batch_norm, return_step=True)
            z = pygen.randn(shape, seed, 17, device=dev)
            given = langevin_snr_step(x, score, 0.2, stream=17, noise=z, batch_norm=batch_norm, return_step=True)
        torch.testing.assert_close(drawn[1], given[1], rtol=1e-6, atol=0)
        torch.testing.assert_close(drawn[0], given[0], rtol=1e-6, atol=1e-6)
    with pygen.use_backend(backend):
        a = langevin_snr_step(x, score, 0.2, 1, 0)
        b = langevin_snr_step(x, score, 0.2, 1, 1)
    assert not torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", SNR_MODES)
def test_snr_out_may_alias_x(backend, mode):
    dev = device_for(backend)
    shape = (3, 37)
    x, score = make(shape, torch.float32, dev, seed=46), make(shape, torch.float32, dev, seed=47)
    seed, noise, _ = _snr_noise(mode, shape, torch.float32, dev, 5)
    with pygen.use_backend(backend):
        want = langevin_snr_step(x, score, 0.3, seed, 5, noise=noise)
        buf = x.clone()
        got = langevin_snr_step(buf, score, 0.3, seed, 5, noise=noise, out=buf)
        other = torch.empty_like(x)
        got2 = langevin_snr_step(x, score, 0.3, seed, 5, noise=noise, out=other)
    assert got is buf and got2 is other
    assert torch.equal(buf, want) and torch.equal(other, want)


@pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")  # the interpreter's numpy on 0/0, inf·0
@pytest.mark.parametrize("backend", BACKENDS)
def test_snr_nan_and_zero_score(backend):
    dev = device_for(backend)
    shape = (3, 10)
    x, score, z = (make(shape, torch.float32, dev, seed=s) for s in (48, 49, 50))
    bad_score = score.clone()
    bad_score[1, 2] = float("nan")
    bad_x = x.clone()
    bad_x[0, 1] = float("nan")
    with pygen.use_backend(backend):
        rows = langevin_snr_step(x, bad_score, 0.1, noise=z, batch_norm=False)
        batch = langevin_snr_step(x, bad_score, 0.1, noise=z, batch_norm=True)
        xnan = langevin_snr_step(bad_x, score, 0.1, 4, batch_norm=True)
        zero = score.clone()
        zero[2] = 0.0
        zrow, zstep = langevin_snr_step(x, zero, 0.1, noise=z, batch_norm=False, return_step=True)
    rows, batch, xnan, zrow, zstep = (t.cpu() for t in (rows, batch, xnan, zrow, zstep))
    # a NaN score poisons its row's norm: that row (row norms) or every row (batch-mean norm)
    assert torch.isnan(rows[1]).all() and torch.isfinite(rows[[0, 2]]).all()
    assert torch.isnan(batch).all()
    nan_mask = torch.zeros(shape, dtype=torch.bool)
    nan_mask[0, 1] = True
    assert torch.equal(torch.isnan(xnan), nan_mask)
    # |score| = 0: dt = inf as the formula says, never hidden
    assert zstep[2] == float("inf") and torch.isfinite(zstep[:2]).all()
    assert not torch.isfinite(zrow[2]).any() and torch.isfinite(zrow[:2]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_snr_batch_split_with_row_seeds(backend):
    """Row norms + per-row seeds: a row's result does not depend on the batch it is in."""
    dev = device_for(backend)
    shape = (5, 3, 11)
    x, score = make(shape, torch.float32, dev, seed=51), make(shape, torch.float32, dev, seed=52)
    seeds = torch.tensor([5, 9, -2, 2**62, 77], device=dev)
    with pygen.use_backend(backend):
        full = langevin_snr_step(x, score, 0.4, seeds, 3, batch_norm=False)
        part = langevin_snr_step(x[1:4], score[1:4], 0.4, seeds[1:4], 3, batch_norm=False)
    torch.testing.assert_close(full[1:4], part, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch", BACKENDS[1], BACKENDS[3]])
@pytest.mark.parametrize("shape", [(3, 9001), (2, 40001), (700, 3), (9, 65), (2, 3, 4099)])
@pytest.mark.parametrize("mode", SNR_MODES)
def test_snr_large_rows(backend, shape, mode):
    """Sizes that span several reduction chunks/windows per row, rows not a multiple of 4
    (flat noise groups straddle rows) and many short rows."""
    dev = device_for(backend)
    x, score = make(shape, torch.float32, dev, seed=53), make(shape, torch.float32, dev, seed=54)
    seed, noise, z = _snr_noise(mode, shape, torch.float32, dev, 8)
    for batch_norm in (True, False):
        with pygen.use_backend(backend):
            out, dt = langevin_snr_step(x, score, 0.05, seed, 8, noise=noise, batch_norm=batch_norm,
                                        return_step=True)
        exp, dt_exp = snr_expected(x, score, z, 0.05, batch_norm)
        torch.testing.assert_close(dt.double().cpu(), dt_exp, rtol=1e-5, atol=0)
        torch.testing.assert_close(out.double().cpu(), exp, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", [BACKENDS[1], BACKENDS[3]])
def test_snr_bit_reproducible(backend):
    """Deterministic reductions: the same call gives the same bits (CPU: whatever the thread count)."""
    dev = device_for(backend)
    shape = (3, 50001)
    x, score = make(shape, torch.float32, dev, seed=55), make(shape, torch.float32, dev, seed=56)
    threads = torch.get_num_threads()
    try:
        with pygen.use_backend(backend):
            a = langevin_snr_step(x, score, 0.1, 6, 2, return_step=True)
            torch.set_num_threads(1)
            b = langevin_snr_step(x, score, 0.1, 6, 2, return_step=True)
            torch.set_num_threads(max(2, threads))
            c = langevin_snr_step(x, score, 0.1, 6, 2, return_step=True)
    finally:
        torch.set_num_threads(threads)
    for other in (b, c):
        assert torch.equal(a[0], other[0]) and torch.equal(a[1], other[1])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
@pytest.mark.parametrize("mode", SNR_MODES)
@pytest.mark.parametrize("batch_norm", [True, False])
def test_snr_device_step_index(backend, dtype, mode, batch_norm):
    """k_table + step_index (a CUDA-graph loop): call i gives exactly the host call with the step constant
    four_alpha_snr2·k_table[i] (in the accumulation dtype) and the noise stream stream + i, and leaves
    step_index = i + 1."""
    if dtype == torch.float64 and backend not in ("torch", "cpu"):
        pytest.skip("fp64 storage: torch and cpu backends")
    dev = device_for(backend)
    shape = (4, 3, 5)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    x, score = make(shape, dtype, dev, seed=60), make(shape, dtype, dev, seed=61, scale=2.0)
    k_table = (torch.rand(5, generator=torch.Generator().manual_seed(62), dtype=torch.float64) + 0.1).to(dev, acc)
    base, stream = 0.37, 2**63 - 2  # (the index carries the stream past 2^63: wraps to the signed int64)
    index = torch.zeros(1, dtype=torch.int64, device=dev)
    state = x
    for i in range(3):
        seed, noise, _ = _snr_noise(mode, shape, dtype, dev, stream + i)
        k = float(torch.tensor(base, dtype=acc) * k_table[i].cpu())
        with pygen.use_backend(backend):
            want = langevin_snr_step(state, score, k, seed, to_signed64(stream + i), noise=noise,
                                     batch_norm=batch_norm, return_step=True)
            got = langevin_snr_step(state, score, base, seed, to_signed64(stream), noise=noise, batch_norm=batch_norm,
                                    return_step=True, k_table=k_table, step_index=index)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), i
        assert int(index[0]) == i + 1
        state = got[0]


@pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")  # the interpreter's numpy on NaN
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch_norm", [True, False])
def test_snr_step_index_outside_the_table_gives_nan(backend, batch_norm):
    """An index past either end of k_table reads nothing out of bounds: the step is NaN and so is the sample."""
    dev = device_for(backend)
    x, score = make((3, 6), torch.float32, dev, seed=63), make((3, 6), torch.float32, dev, seed=64)
    k_table = torch.tensor([0.5, 0.25], device=dev)
    for start in (-1, 2, 2**40):
        index = torch.tensor([start], device=dev)
        with pygen.use_backend(backend):
            out, dt = langevin_snr_step(x, score, 1.0, 3, 0, batch_norm=batch_norm, return_step=True,
                                        k_table=k_table, step_index=index)
        assert torch.isnan(dt).all() and torch.isnan(out).all()
        assert int(index[0]) == start + 1


def test_snr_empty_rows():
    x = torch.empty(3, 0)
    for backend in ["torch"] + (["cpu"] if pygen.backends()["cpu"] == "available" else []):
        with pygen.use_backend(backend):
            out, dt = langevin_snr_step(x, x, 0.1, 1, return_step=True)
        assert out.shape == (3, 0) and torch.isnan(dt).all()


@pytest.mark.parametrize(
    "call, exc, word",
    [
        (lambda x: langevin_snr_step(x, x, -0.1, 1), ValueError, "four_alpha_snr2"),
        (lambda x: langevin_snr_step(x, x, float("nan"), 1), ValueError, "four_alpha_snr2"),
        (lambda x: langevin_snr_step(x, x, float("inf"), 1), ValueError, "four_alpha_snr2"),
        (lambda x: langevin_snr_step(x, x, "0.1", 1), TypeError, "four_alpha_snr2"),
        (lambda x: langevin_snr_step(x, x, True, 1), TypeError, "four_alpha_snr2"),
        (lambda x: langevin_snr_step(x, x, torch.tensor(0.1), 1), TypeError, "four_alpha_snr2"),
        (lambda x: langevin_snr_step(x, x, 0.1), ValueError, "seed"),
        (lambda x: langevin_snr_step(x, x, 0.1, 1, noise=x), ValueError, "seed"),
        (lambda x: langevin_snr_step(x, x, 0.1, 1.5), TypeError, "seed"),
        (lambda x: langevin_snr_step(x, x, 0.1, torch.tensor([1, 2, 3])), ValueError, "seed"),
        (lambda x: langevin_snr_step(x, x, 0.1, 1, 0.5), TypeError, "stream"),
        (lambda x: langevin_snr_step(x, x[:1], 0.1, 1), ValueError, "score"),
        (lambda x: langevin_snr_step(x, x.double(), 0.1, 1), TypeError, "score"),
        (lambda x: langevin_snr_step(x, x, 0.1, noise=x.half()), TypeError, "noise"),
        (lambda x: langevin_snr_step(x, x, 0.1, noise=x[:, :2]), ValueError, "noise"),
        (lambda x: langevin_snr_step(x, x, 0.1, 1, out=x.double()), TypeError, "out"),
        (lambda x: langevin_snr_step(x, x, 0.1, 1, out=torch.empty(3, 2).t()), ValueError, "out"),
        (lambda x: langevin_snr_step(x, x, 0.1, 1, batch_norm="batch"), TypeError, "batch_norm"),
        (lambda x: langevin_snr_step(x, x, 0.1, 1, return_step=1), TypeError, "return_step"),
        (lambda x: langevin_snr_step(x[0, 0], x[0, 0], 0.1, 1), ValueError, "batch dimension"),
        (lambda x: langevin_snr_step(x.int(), x.int(), 0.1, 1), TypeError, "x"),
        (lambda x: langevin_snr_step(x, x, 0.1, 1, k_table=torch.ones(2)), ValueError, "together"),
        (lambda x: langevin_snr_step(x, x, 0.1, 1, step_index=torch.zeros(1, dtype=torch.int64)), ValueError,
         "together"),
        (lambda x: langevin_snr_step(x, x, 0.1, 1, k_table=torch.ones(2, dtype=torch.float64),
                                     step_index=torch.zeros(1, dtype=torch.int64)), TypeError, "k_table"),
        (lambda x: langevin_snr_step(x, x, 0.1, 1, k_table=torch.ones(2, 1), step_index=torch.zeros(1, dtype=torch.int64)),
         ValueError, "k_table"),
        (lambda x: langevin_snr_step(x, x, 0.1, 1, k_table=torch.ones(0), step_index=torch.zeros(1, dtype=torch.int64)),
         ValueError, "k_table"),
        (lambda x: langevin_snr_step(x, x, 0.1, 1, k_table=torch.ones(2), step_index=torch.zeros(1, dtype=torch.int32)),
         TypeError, "step_index"),
        (lambda x: langevin_snr_step(x, x, 0.1, 1, k_table=torch.ones(2), step_index=torch.zeros(2, dtype=torch.int64)),
         ValueError, "step_index"),
    ],
)
def test_snr_bad_input(call, exc, word):
    with pytest.raises(exc, match=word):
        call(_x())


def test_snr_op_checks_arguments():
    x = _x()
    step = torch.empty(2)
    with pytest.raises((RuntimeError, ValueError), match="step"):
        torch.ops.pygen.langevin_snr_step(x, x, None, torch.empty_like(x), torch.empty(3), 1, 0, None, 0.1, True)
    with pytest.raises((RuntimeError, ValueError), match="out"):
        torch.ops.pygen.langevin_snr_step(x, x, None, torch.empty(2, 4), step, 1, 0, None, 0.1, True)
    with pytest.raises((RuntimeError, ValueError), match="row_seeds"):
        torch.ops.pygen.langevin_snr_step(x, x, None, torch.empty_like(x), step, 1, 0, torch.ones(3, dtype=torch.int64),
                                          0.1, True)
    index = torch.zeros(1, dtype=torch.int64)
    for k_table, idx, word in [(torch.ones(2), None, "together"), (None, index, "together"),
                               (torch.ones(2, dtype=torch.float64), index, "k_table"),
                               (torch.ones(2), torch.zeros(2, dtype=torch.int64), "step_index")]:
        with pytest.raises((RuntimeError, ValueError, TypeError), match=word):
            torch.ops.pygen.langevin_snr_step(x, x, None, torch.empty_like(x), step, 1, 0, None, 0.1, True, k_table, idx)


def _snr_opcheck_cases(dtype):
    x, score, z = (make((3, 5, 7), dtype, seed=s) for s in (57, 58, 59))
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    rows = torch.tensor([5, -6, 2**62], dtype=torch.int64)

    def bufs():
        return torch.empty_like(x), torch.empty(3, dtype=acc)

    return [
        (x, score, z, *bufs(), 0, 0, None, 0.3, True),
        (x, score, z, *bufs(), 0, 0, None, 0.3, False),
        (x, score, None, *bufs(), -7, 2**40, None, 0.2, True),
        (x, score, None, *bufs(), 3, 1, rows, 0.2, False),
        (x, score, None, *bufs(), 3, 1, rows, 1.0, True, torch.tensor([0.5, 0.2], dtype=acc),
         torch.tensor([1], dtype=torch.int64)),
        (x, score, z, *bufs(), 0, 0, None, 2.0, False, torch.tensor([0.5], dtype=acc),
         torch.tensor([0], dtype=torch.int64)),
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_opcheck_langevin_snr_step(dtype):
    for args in _snr_opcheck_cases(dtype):
        torch.library.opcheck(torch.ops.pygen.langevin_snr_step.default, args)


@pytest.mark.skipif(not TRITON_OK, reason="needs triton and TRITON_INTERPRET=1 or CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_langevin_snr_step_triton(dtype):
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("triton needs TRITON_INTERPRET=1 on the CPU")
    for args in _snr_opcheck_cases(dtype):
        torch.library.opcheck(torch.ops.pygen.langevin_snr_step_triton.default,
                              to_device(args, device_for("triton")))


def test_snr_fake_tensor():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(4, 3, dtype=torch.float16)
        out, step = torch.empty_like(x), torch.empty(4)
        torch.ops.pygen.langevin_snr_step(x, x, None, out, step, 1, 0, None, 0.1, True)
    assert out.shape == (4, 3)
