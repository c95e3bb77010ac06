"""pygen.sampler_step (op pygen::sampler_step_out): every backend vs the torch reference,
the in-kernel noise contract, history/advance semantics, NaN handling and bad input."""
import math

import pytest
import torch

import pygen
from conftest import ALL_BACKENDS, cpu_backends, device_for, require_backend, tolerances
from pygen.ops.step import sampler_step_reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
SHAPES = [(3, 5, 7), (2, 1001), (1, 4), (4, 3)]


def _levels(kind):
    if kind in ("ddim", "ddpm"):
        ac = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
        ts = torch.arange(999, -1, -111)
        return torch.cat([ac[ts], ac[:1]])
    if kind.startswith("euler_maruyama"):
        return torch.linspace(1.0, 1e-3, 10, dtype=torch.float64)
    sig = torch.linspace(14.0, 0.05, 9, dtype=torch.float64)
    return torch.cat([sig, sig.new_zeros(1)])


KINDS = [("ddim", "eps", 0.7), ("ddpm", "v", 0.0), ("euler", "x0", 0.0), ("euler_ancestral", "eps", 1.0),
         ("dpmpp_2m", "x0", 0.0), ("euler_maruyama_vp", "score", 0.0), ("euler_maruyama_ve", "eps", 0.0)]


def _table(kind, prediction, eta, dtype):
    lv = _levels(kind)
    return pygen.step_coefficients(lv if dtype == torch.float64 else lv.float(), kind, prediction=prediction, eta=eta)


def _inputs(shape, dtype, gen, num_hist):
    x = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    m = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    hist = torch.randn((num_hist,) + shape, generator=gen, dtype=torch.float64).to(dtype) if num_hist else None
    return x, m, hist


def _check(got, ref, dtype, noisy):
    rtol, atol = tolerances(dtype)
    if noisy and dtype == torch.float64:  # in-kernel normals agree to fp32 rounding
        rtol, atol = 1e-5, 1e-5
    elif noisy and dtype == torch.float32:
        atol = 1e-5
    torch.testing.assert_close(got.double(), ref.double(), rtol=rtol, atol=atol)


def _run(backend, x, m, coeffs, steps, hist, **kw):
    out = torch.full_like(x, float("nan"))  # every element must be written
    h = None if hist is None else hist.clone()
    s = steps.clone()
    with pygen.use_backend(backend):
        res, pred = pygen.sampler_step(x, m, coeffs, s, history=h, out=out, return_pred_x0=True, **kw)
    assert res is out
    return res, pred, h, s


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("kind,prediction,eta", KINDS, ids=[k[0] for k in KINDS])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference(backend, kind, prediction, eta, dtype, gen):
    require_backend(backend)
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("fp64 storage is a torch/cpu-backend feature")
    coeffs = _table(kind, prediction, eta, dtype)
    num_hist = coeffs.shape[1] - 8
    n = coeffs.shape[0]
    shapes = SHAPES if backend == "cpu" else [(3, 5, 7), (2, 33)]
    for shape in shapes:
        x, m, hist = _inputs(shape, dtype, gen, num_hist)
        batch = shape[0]
        per_row = torch.randint(0, n, (batch,), generator=gen)
        noise = torch.randn(shape, generator=gen).to(dtype)
        for steps, noise_arg, seed, clamp in [
            (torch.tensor([n // 2]), None, 7, None),
            (per_row, None, 2**63 + 5, 1.5),
            (torch.tensor([0]), noise, 0, None),
            (per_row, noise, 0, 0.8),
            (torch.tensor([n - 1]), None, torch.arange(batch, dtype=torch.int64) * 1000 + 3, None),
        ]:
            kw = dict(noise=noise_arg, seed=seed, stream=11, clamp=clamp)
            ref = _run("torch", x, m, coeffs, steps, hist, **kw)
            got = _run(backend, x, m, coeffs, steps, hist, **kw)
            noisy = noise_arg is None
            _check(got[0], ref[0], dtype, noisy)
            _check(got[1], ref[1], dtype, False)
            if hist is not None:
                _check(got[2], ref[2], dtype, False)
            assert torch.equal(got[3], ref[3])


@pytest.mark.parametrize("backend", cpu_backends())
def test_in_kernel_noise_is_pygen_randn(backend):
    """With a table that keeps only s·z, the step returns exactly its noise."""
    require_backend(backend)
    coeffs = torch.zeros(6, 8)
    coeffs[:, 4] = 1.0  # s
    coeffs[:, 7] = -1.0  # no history slot
    x = torch.randn(3, 2, 9)
    m = torch.randn(3, 2, 9)
    with pygen.use_backend(backend):
        z = pygen.sampler_step(x, m, coeffs, torch.tensor([4]), seed=99, stream=1000)
        want = pygen.randn(x.shape, 99, 1004)
        torch.testing.assert_close(z, want, rtol=1e-6, atol=1e-6)
        # per-row step indices: row r uses stream + step_r and its own numbering
        steps = torch.tensor([0, 5, 2])
        z = pygen.sampler_step(x, m, coeffs, steps, seed=99, stream=1000)
        for r in range(3):
            want_r = pygen.randn((1, 2, 9), 99, 1000 + int(steps[r]))
            torch.testing.assert_close(z[r : r + 1], want_r, rtol=1e-6, atol=1e-6)
        # per-row seeds: a row's noise does not depend on its batch
        seeds = torch.tensor([5, 6, 7])
        z_all = pygen.sampler_step(x, m, coeffs, torch.tensor([1]), seed=seeds, stream=3)
        z_one = pygen.sampler_step(x[1:2], m[1:2], coeffs, torch.tensor([1]), seed=seeds[1:2], stream=3)
        torch.testing.assert_close(z_all[1:2], z_one, rtol=0, atol=0)
        torch.testing.assert_close(z_all, pygen.randn(x.shape, seeds, 4), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", cpu_backends())
def test_ddim_loop_matches_transcription(backend):
    """A whole 10-step DDIM loop with eta and in-kernel noise vs the diffusers formulas."""
    require_backend(backend)
    ac = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    ts = torch.arange(900, -1, -100)
    levels = torch.cat([ac[ts], torch.ones(1, dtype=torch.float64)])
    eta = 0.5
    coeffs = pygen.step_coefficients(levels.float(), "ddim", eta=eta)
    x = torch.randn(2, 3, 5)
    model = lambda v, i: torch.tanh(v) * (1 + i)  # noqa: E731
    step = torch.zeros(1, dtype=torch.int64)
    xr = x.double()
    with pygen.use_backend(backend):
        for i in range(len(ts)):
            eps = model(x, i)
            x = pygen.sampler_step(x, eps, coeffs, step, seed=3, stream=0, advance=True, out=x)
            at, ap = float(levels[i]), float(levels[i + 1])
            e = model(xr, i)
            x0 = (xr - math.sqrt(1 - at) * e) / math.sqrt(at)
            std = eta * math.sqrt((1 - ap) / (1 - at) * (1 - at / ap))
            z = pygen.randn(x.shape, 3, i).double()
            xr = math.sqrt(ap) * x0 + math.sqrt(1 - ap - std**2) * e + std * z
    assert int(step) == len(ts)
    torch.testing.assert_close(x.double(), xr, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", cpu_backends())
def test_dpmpp_2m_two_steps_use_history(backend):
    require_backend(backend)
    sig = torch.tensor([10.0, 3.0, 1.0, 0.0], dtype=torch.float64)
    coeffs = pygen.step_coefficients(sig.float(), "dpmpp_2m", prediction="x0")
    x = torch.randn(2, 7)
    hist = torch.zeros((1, 2, 7))
    step = torch.zeros(1, dtype=torch.int64)
    dens = [torch.randn(2, 7) for _ in range(3)]
    x_ref = x.double()
    old = None
    with pygen.use_backend(backend):
        for i in range(3):
            x = pygen.sampler_step(x, dens[i], coeffs, step, history=hist, advance=True)
            s, sn = float(sig[i]), float(sig[i + 1])
            d = dens[i].double()
            if old is None or sn == 0:
                x_ref = (sn / s) * x_ref - math.expm1(-(math.log(s) - math.log(sn) if sn else math.inf)) * d
            else:
                h = math.log(s) - math.log(sn)
                r = (math.log(float(sig[i - 1])) - math.log(s)) / h
                x_ref = (sn / s) * x_ref - math.expm1(-h) * ((1 + 1 / (2 * r)) * d - (1 / (2 * r)) * old)
            old = d
            torch.testing.assert_close(hist[0], dens[i])
    torch.testing.assert_close(x.double(), x_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", cpu_backends())
def test_nan_propagates_and_bad_step_gives_nan(backend):
    require_backend(backend)
    coeffs = _table("ddim", "eps", 0.0, torch.float32)
    x = torch.randn(2, 6)
    m = torch.randn(2, 6)
    m[1, 3] = float("nan")
    with pygen.use_backend(backend):
        out, pred = pygen.sampler_step(x, m, coeffs, torch.tensor([2]), clamp=1.0, return_pred_x0=True, seed=1)
    assert torch.isnan(out[1, 3]) and torch.isnan(pred[1, 3])  # clamp does not hide NaN
    assert torch.isfinite(out[0]).all() and torch.isfinite(out[1, :3]).all()
    with pygen.use_backend(backend):
        out = pygen.sampler_step(x, torch.randn(2, 6), coeffs, torch.tensor([0, coeffs.shape[0] + 3]), seed=1)
    assert torch.isfinite(out[0]).all()
    assert torch.isnan(out[1]).all()  # out-of-range step index: never read, rows are NaN


@pytest.mark.parametrize("backend", cpu_backends())
def test_in_place_and_advance(backend):
    require_backend(backend)
    coeffs = _table("euler", "x0", 0.0, torch.float32)
    x = torch.randn(3, 10)
    m = torch.randn(3, 10)
    step = torch.tensor([1])
    with pygen.use_backend("torch"):
        want = pygen.sampler_step(x, m, coeffs, step.clone())
    with pygen.use_backend(backend):
        x_in = x.clone()
        got = pygen.sampler_step(x_in, m, coeffs, step, out=x_in, advance=True)
    assert got is x_in
    torch.testing.assert_close(got, want)
    assert int(step) == 2



@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("numel,start,row_seeds", [(9001, 0, False), (2 * 4500, 2, True), (1500, -1, False),
                                                    (7, 0, False)])
def test_advance_over_many_blocks(backend, numel, start, row_seeds):
    """advance=True on a launch of many blocks/programs (the CUDA and Triton kernels increment the
    index in the launch itself: the last block to finish does): K steps in place, noise and history
    read at the right row each step, the index exactly start + K afterwards (-1: a NaN row first)."""
    require_backend(backend)
    dev = device_for(backend)
    gen = torch.Generator().manual_seed(numel + start)
    coeffs = _table("dpmpp_2m", "x0", 0.0, torch.float32)
    coeffs[:, 4] = 0.3  # every row draws in-kernel noise (stream + step index)
    batch = 2 if row_seeds else 1
    x0 = torch.randn(batch, numel // batch, generator=gen)
    ms = torch.randn(4, batch, numel // batch, generator=gen)
    seed = torch.tensor([11, 12], dtype=torch.int64) if row_seeds else 11
    results = {}
    for b in ("torch", backend):
        x, step = x0.clone().to(dev), torch.tensor([start]).to(dev)
        hist = torch.zeros((1,) + tuple(x.shape), device=dev)
        s = seed.to(dev) if row_seeds else seed
        with pygen.use_backend(b):
            for k in range(4):
                pygen.sampler_step(x, ms[k].to(dev), coeffs.to(dev), step, history=hist, seed=s, stream=3,
                                   advance=True, out=x)
        results[b] = (x.cpu(), hist.cpu(), int(step))
    (want, want_h, want_step), (got, got_h, got_step) = results["torch"], results[backend]
    assert want_step == got_step == start + 4
    if start < 0:
        assert torch.isnan(got).all()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, equal_nan=True)
    torch.testing.assert_close(got_h, want_h, rtol=1e-5, atol=1e-5, equal_nan=True)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_float32_pred_x0_for_half_x(backend, dtype):
    """The op writes pred_x0 in float32 for float16/bfloat16 x (diffusers returns the predicted x0
    upcast): the unrounded d of the fp32 arithmetic, while x_next keeps x's dtype."""
    from pygen.samplers.program import resolve_step_launcher

    require_backend(backend)
    dev = device_for(backend)
    gen = torch.Generator().manual_seed(4)
    coeffs = _table("ddim", "eps", 0.5, torch.float32).to(dev)
    x = torch.randn(3, 1001, generator=gen).to(dev, dtype)
    m = torch.randn(3, 1001, generator=gen).to(dev, dtype)
    res = {}
    for b in ("torch", backend):
        with pygen.use_backend(b):
            launch = resolve_step_launcher(torch.device(dev))
        out = torch.full_like(x, float("nan"))
        pred = torch.full(x.shape, float("nan"), device=dev)
        launch(x, m, coeffs, torch.tensor([2, 0, 5], device=dev), None, None, out, pred, 9, 1, None, 2.5, False)
        res[b] = (out.cpu(), pred.cpu())
    assert res[backend][1].dtype == torch.float32
    want = (coeffs[[2, 0, 5], 0:1].cpu() * x.float().cpu() + coeffs[[2, 0, 5], 1:2].cpu() * m.float().cpu()
            ).clamp(-2.5, 2.5)
    torch.testing.assert_close(res[backend][1], want, rtol=1e-6, atol=1e-6)  # not rounded to x's dtype
    torch.testing.assert_close(res[backend][1], res["torch"][1], rtol=1e-6, atol=1e-6)
    _check(res[backend][0], res["torch"][0], dtype, True)
    if backend == "cpu":
        with pytest.raises(RuntimeError, match="pred_x0 must have"):
            launch(x, m, coeffs, torch.tensor([0]), None, None, out, torch.empty(x.shape, dtype=torch.float64),
                   9, 1, None, 0.0, False)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_float32_history_for_half_x(backend, dtype):
    """A float32 history with float16/bfloat16 x (diffusers' multistep schedulers keep their model
    outputs in float32): read and written unrounded, so a half step equals the float32 step on the
    upcast x / model_out up to the final rounding of x_next. Per-row steps, one of them writing a
    slot and one out of range."""
    require_backend(backend)
    dev = device_for(backend)
    gen = torch.Generator().manual_seed(6)
    coeffs = _table("dpmpp_2m", "x0", 0.0, torch.float32).to(dev)  # one history column, slot writes
    x = torch.randn(3, 517, generator=gen).to(dev, dtype)
    m = torch.randn(3, 517, generator=gen).to(dev, dtype)
    hist = torch.randn(1, 3, 517, generator=gen).to(dev)
    steps = torch.tensor([1, 0, coeffs.shape[0]], device=dev)
    with pygen.use_backend(backend):
        h_half = hist.clone()
        out, pred = pygen.sampler_step(x, m, coeffs, steps.clone(), history=h_half, return_pred_x0=True)
    with pygen.use_backend("torch"):
        h_ref = hist.clone()
        out_ref = pygen.sampler_step(x.float(), m.float(), coeffs, steps.clone(), history=h_ref)
    assert out.dtype == dtype and h_half.dtype == torch.float32
    torch.testing.assert_close(h_half.cpu(), h_ref.cpu(), rtol=1e-6, atol=1e-6, equal_nan=True)  # unrounded
    assert not torch.equal(h_half.cpu(), hist.cpu())  # the step wrote its slot
    _check(out[:2].cpu(), out_ref[:2].to(dtype).cpu(), dtype, False)
    assert torch.isnan(out[2]).all() and torch.isnan(pred[2]).all()  # out-of-range step: NaN row
    with pytest.raises(TypeError, match="history"):
        pygen.sampler_step(x, m, coeffs, steps.clone(), history=hist.double())


def test_bad_input():
    coeffs = _table("ddim", "eps", 0.0, torch.float32)
    x = torch.randn(2, 4)
    s = torch.tensor([0])
    with pytest.raises(ValueError, match="model_out"):
        pygen.sampler_step(x, torch.randn(2, 5), coeffs, s)
    with pytest.raises(TypeError, match="model_out"):
        pygen.sampler_step(x, torch.randn(2, 4, dtype=torch.float64), coeffs, s)
    with pytest.raises(TypeError, match="x"):
        pygen.sampler_step(x.long(), x.long(), coeffs, s)
    with pytest.raises(TypeError, match="coeffs"):
        pygen.sampler_step(x, x, coeffs.double(), s)
    with pytest.raises(ValueError, match="coeffs"):
        pygen.sampler_step(x, x, coeffs[:, :5], s)
    with pytest.raises(TypeError, match="step_index"):
        pygen.sampler_step(x, x, coeffs, torch.tensor([0], dtype=torch.int32))
    with pytest.raises(ValueError, match="step_index"):
        pygen.sampler_step(x, x, coeffs, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="history"):
        pygen.sampler_step(x, x, _table("dpmpp_2m", "x0", 0.0, torch.float32), s)
    with pytest.raises(ValueError, match="history"):
        pygen.sampler_step(x, x, coeffs, s, history=torch.zeros(1, 2, 4))
    with pytest.raises(ValueError, match="clamp"):
        pygen.sampler_step(x, x, coeffs, s, clamp=-1.0)
    with pytest.raises(ValueError, match="seed"):
        pygen.sampler_step(x, x, coeffs, s, seed=torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="noise"):
        pygen.sampler_step(x, x, coeffs, s, noise=torch.randn(3, 4))
    with pytest.raises(ValueError, match="advance"):
        pygen.sampler_step(x, x, coeffs, torch.tensor([0, 1]), advance=True)


def _opcheck_args(num_hist):
    coeffs = _table("dpmpp_2m" if num_hist else "ddim", "x0" if num_hist else "eps", 0.0, torch.float32)
    x = torch.randn(3, 5)
    m = torch.randn(3, 5)
    hist = torch.randn(num_hist, 3, 5) if num_hist else None
    return (x, m, coeffs, torch.tensor([1]), hist, None, torch.empty_like(x), torch.empty_like(x), 5, 2, None, 0.0,
            False)


@pytest.mark.parametrize("op_name", ["sampler_step_out", "sampler_step_out_triton"])
@pytest.mark.parametrize("num_hist", [0, 1])
def test_opcheck(op_name, num_hist):
    require_backend("triton" if op_name.endswith("triton") else "cpu")
    torch.library.opcheck(getattr(torch.ops.pygen, op_name), _opcheck_args(num_hist))


def test_reference_signature_matches_op():
    args = _opcheck_args(1)
    sampler_step_reference(*args)
    assert torch.isfinite(args[6]).all()
