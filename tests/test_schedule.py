"""pygen.step_coefficients (op pygen::step_coefficients): every backend vs the torch reference,
and the table against independent transcriptions of each sampler's formulas."""
import math

import pytest
import torch

import pygen
from conftest import cpu_backends, require_backend
from pygen.ops.schedule import KINDS, step_coefficients_reference


def _vp_levels(n_steps=20, dtype=torch.float64):
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    ac = torch.cumprod(1 - betas, 0)
    ts = torch.linspace(999, 0, n_steps).round().long()
    return torch.cat([ac[ts], ac[:1]]).to(dtype)


def _sigma_levels(n=15, dtype=torch.float64):
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    smin, smax, rho = 0.03, 14.6, 7.0
    sig = (smax ** (1 / rho) + ramp * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho
    return torch.cat([sig, sig.new_zeros(1)]).to(dtype)


def _time_levels(n=25, dtype=torch.float64):
    return torch.linspace(1.0, 1e-3, n + 1, dtype=torch.float64).to(dtype)


CASES = [
    ("ddim", _vp_levels, ["eps", "x0", "v"]),
    ("ddpm", _vp_levels, ["eps", "x0", "v"]),
    ("euler", _sigma_levels, ["x0", "eps"]),
    ("euler_ancestral", _sigma_levels, ["x0", "eps"]),
    ("dpmpp_2m", _sigma_levels, ["x0", "eps"]),
    ("euler_maruyama_vp", _time_levels, ["score", "eps"]),
    ("euler_maruyama_ve", _time_levels, ["score", "eps"]),
]


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("kind,levels_fn,predictions", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_backends_match_reference(backend, kind, levels_fn, predictions, dtype):
    require_backend(backend)
    levels = levels_fn(dtype=dtype)
    for prediction in predictions:
        for eta in (0.0, 0.6, 1.0):
            with pygen.use_backend("torch"):
                ref = pygen.step_coefficients(levels, kind, prediction=prediction, eta=eta)
            with pygen.use_backend(backend):
                got = pygen.step_coefficients(levels, kind, prediction=prediction, eta=eta)
            assert got.dtype == ref.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
            assert got.shape == (levels.shape[0] - 1, 9 if kind == "dpmpp_2m" else 8)
            assert torch.isfinite(ref).all()
            rtol = 1e-12 if dtype == torch.float64 else 1e-6
            torch.testing.assert_close(got, ref, rtol=rtol, atol=rtol)


def test_ddim_row_matches_transcription():
    levels = _vp_levels()
    eta = 0.3
    table = pygen.step_coefficients(levels, "ddim", prediction="eps", eta=eta)
    x, eps, z = 0.7, -0.4, 1.3
    for i in range(levels.shape[0] - 1):
        at, ap = float(levels[i]), float(levels[i + 1])
        # diffusers DDIMScheduler.step, epsilon prediction
        pred_x0 = (x - math.sqrt(1 - at) * eps) / math.sqrt(at)
        var = (1 - ap) / (1 - at) * (1 - at / ap)
        std = eta * math.sqrt(var)
        want = math.sqrt(ap) * pred_x0 + math.sqrt(1 - ap - std**2) * eps + std * z
        c = table[i].tolist()
        d = c[0] * x + c[1] * eps
        got = c[2] * x + c[3] * d + c[4] * z
        assert d == pytest.approx(pred_x0, rel=1e-12)
        assert got == pytest.approx(want, rel=1e-10, abs=1e-12)


def test_ddpm_row_matches_transcription():
    levels = _vp_levels()
    table = pygen.step_coefficients(levels, "ddpm", prediction="v")
    x, v, z = -0.3, 0.8, 0.5
    n = levels.shape[0] - 1
    for i in range(n):
        at, ap = float(levels[i]), float(levels[i + 1])
        pred_x0 = math.sqrt(at) * x - math.sqrt(1 - at) * v
        cur_alpha = at / ap
        mean = (math.sqrt(ap) * (1 - cur_alpha) / (1 - at)) * pred_x0 + (math.sqrt(cur_alpha) * (1 - ap) / (1 - at)) * x
        std = math.sqrt(max((1 - ap) / (1 - at) * (1 - cur_alpha), 1e-20))
        c = table[i].tolist()
        got = c[2] * x + c[3] * (c[0] * x + c[1] * v) + c[4] * z
        assert got == pytest.approx(mean + std * z, rel=1e-10, abs=1e-12)


def test_euler_family_rows_match_kdiffusion_formulas():
    sig = _sigma_levels()
    x, den, z = 2.0, 0.5, -0.7
    t_e = pygen.step_coefficients(sig, "euler", prediction="x0")
    t_a = pygen.step_coefficients(sig, "euler_ancestral", prediction="x0", eta=1.0)
    for i in range(sig.shape[0] - 1):
        s, sn = float(sig[i]), float(sig[i + 1])
        d = (x - den) / s
        c = t_e[i].tolist()
        assert c[2] * x + c[3] * den == pytest.approx(x + d * (sn - s), rel=1e-12)
        up = min(sn, math.sqrt(sn**2 * (s**2 - sn**2) / s**2))
        down = math.sqrt(sn**2 - up**2)
        c = t_a[i].tolist()
        assert c[2] * x + c[3] * den + c[4] * z == pytest.approx(x + d * (down - s) + up * z, rel=1e-12, abs=1e-14)


def test_dpmpp_2m_rows_match_kdiffusion_formula():
    sig = _sigma_levels()
    table = pygen.step_coefficients(sig, "dpmpp_2m", prediction="x0")
    x, den, old = 1.5, 0.2, -0.4
    for i in range(sig.shape[0] - 1):
        s, sn = float(sig[i]), float(sig[i + 1])
        c = table[i].tolist()
        got = c[2] * x + c[3] * den + c[8] * old
        if sn == 0:
            want = den
        else:
            h = math.log(s) - math.log(sn)
            if i == 0:
                want = (sn / s) * x - math.expm1(-h) * den
            else:
                r = (math.log(float(sig[i - 1])) - math.log(s)) / h
                want = (sn / s) * x - math.expm1(-h) * ((1 + 1 / (2 * r)) * den - (1 / (2 * r)) * old)
        assert got == pytest.approx(want, rel=1e-10, abs=1e-12)
        assert c[5:8] == [0.0, 1.0, 0.0]  # history slot 0 <- denoised


def test_euler_maruyama_rows_match_score_sde():
    t = _time_levels()
    bmin, bmax = 0.1, 20.0
    smin, smax = 0.01, 50.0
    vp = pygen.step_coefficients(t, "euler_maruyama_vp", prediction="score", beta_min=bmin, beta_max=bmax)
    ve = pygen.step_coefficients(t, "euler_maruyama_ve", prediction="eps", sigma_min=smin, sigma_max=smax)
    x, score, z = 0.9, -1.1, 0.25
    for i in range(t.shape[0] - 1):
        ti, dt = float(t[i]), float(t[i + 1] - t[i])
        beta = bmin + ti * (bmax - bmin)
        want = x + (-0.5 * beta * x - beta * score) * dt + math.sqrt(beta * -dt) * z
        c = vp[i].tolist()
        assert c[2] * x + c[3] * (c[1] * score) + c[4] * z == pytest.approx(want, rel=1e-10)
        sigma = smin * (smax / smin) ** ti
        g2 = sigma**2 * 2 * math.log(smax / smin)
        eps = -score * sigma  # score = -eps / sigma
        want = x - g2 * score * dt + math.sqrt(g2 * -dt) * z
        c = ve[i].tolist()
        assert c[2] * x + c[3] * (c[1] * eps) + c[4] * z == pytest.approx(want, rel=1e-10)


@pytest.mark.parametrize("backend", cpu_backends())
def test_nan_levels_propagate(backend):
    require_backend(backend)
    levels = _vp_levels()
    levels[3] = float("nan")
    with pygen.use_backend(backend):
        table = pygen.step_coefficients(levels, "ddim")
    assert torch.isnan(table[3, :5]).any() and torch.isnan(table[2, 2:5]).any()
    assert torch.isfinite(table[5]).all()


def test_bad_input():
    levels = _vp_levels()
    with pytest.raises(ValueError, match="kind"):
        pygen.step_coefficients(levels, "heun_magic")
    with pytest.raises(ValueError, match="prediction"):
        pygen.step_coefficients(_sigma_levels(), "euler", prediction="v")
    with pytest.raises(TypeError, match="levels"):
        pygen.step_coefficients(levels.to(torch.int64), "ddim")
    with pytest.raises(TypeError, match="levels"):
        pygen.step_coefficients([0.9, 0.5], "ddim")
    with pytest.raises(ValueError, match="levels"):
        pygen.step_coefficients(levels[:1], "ddim")
    with pytest.raises(ValueError, match="eta"):
        pygen.step_coefficients(levels, "ddim", eta=1.5)
    with pytest.raises(ValueError, match="sigma_min"):
        pygen.step_coefficients(_time_levels(), "euler_maruyama_ve", sigma_min=0.0)


def test_reference_is_registered_kind_list():
    assert sorted(KINDS.values()) == list(range(7))
    assert step_coefficients_reference(_vp_levels(), 0, 0, 0.0, 0.0, 0.0).shape == (20, 8)


@pytest.mark.parametrize("op_name", ["step_coefficients", "step_coefficients_triton"])
def test_opcheck(op_name):
    if op_name.endswith("triton"):
        require_backend("triton")
    else:
        require_backend("cpu")
    op = getattr(torch.ops.pygen, op_name)
    torch.library.opcheck(op, (_vp_levels(), 0, 0, 0.5, 0.0, 0.0))
    torch.library.opcheck(op, (_sigma_levels(dtype=torch.float32), 4, 1, 0.0, 0.0, 0.0))
