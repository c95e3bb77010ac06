"""pygen.diffusers Euler family (Euler, EulerAncestral, Heun, LMS) side by side with stock diffusers.

Each test runs the stock class and pygen's fused class in one loop with the same synthetic
model on the same inputs and compares every step's prev_sample and pred_original_sample.
"""
import threading

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("scipy")

import pygen  # noqa: E402
from pygen.diffusers.euler import EulerDiscreteScheduler  # noqa: E402
from pygen.diffusers.euler_ancestral import EulerAncestralDiscreteScheduler  # noqa: E402
from pygen.diffusers.heun import HeunDiscreteScheduler  # noqa: E402
from pygen.diffusers.lms import LMSDiscreteScheduler, lms_rows  # noqa: E402
from pygen.ops.random import randn_reference  # noqa: E402
from conftest import cpu_backends, require_backend  # noqa: E402

D = diffusers
PAIRS = {
    "euler": (D.EulerDiscreteScheduler, EulerDiscreteScheduler),
    "euler_a": (D.EulerAncestralDiscreteScheduler, EulerAncestralDiscreteScheduler),
    "heun": (D.HeunDiscreteScheduler, HeunDiscreteScheduler),
    "lms": (D.LMSDiscreteScheduler, LMSDiscreteScheduler),
}
SHAPE = (2, 3, 5)
RTOL = {torch.float32: 1e-5, torch.float16: 8e-3, torch.bfloat16: 5e-2, torch.float64: 1e-5}


def model(x, t):
    """Synthetic denoiser: depends on the (scaled) input and a little on t (per row when t is 1-D)."""
    t = torch.as_tensor(t, dtype=torch.float32).reshape(-1, *([1] * (x.dim() - 1)))
    return (torch.tanh(x.float()) * 0.7 + 3e-4 * t).to(x.dtype)


def loop(s, x, timesteps, gen=None, stepkw=None, record=True):
    outs = []
    for t in timesteps:
        m = model(s.scale_model_input(x, t), t)
        kw = dict(stepkw or {})
        if gen is not None:
            kw["generator"] = gen
        o = s.step(m, t, x, **kw)
        if record:
            outs.append((o.prev_sample, o.pred_original_sample, x))
        x = o.prev_sample
    return outs if record else x


def side_by_side(name, cfg=None, steps=6, dtype=torch.float32, set_kw=None, stepkw=None, seed=None, begin=None,
                 shape=SHAPE):
    stock_cls, fused_cls = PAIRS[name]
    config = stock_cls(**(cfg or {})).config
    res = []
    for cls in (stock_cls, fused_cls):
        s = cls.from_config(config)
        set_kw_ = dict(set_kw or {})
        if steps is not None:
            s.set_timesteps(steps, **set_kw_)
        else:
            s.set_timesteps(**set_kw_)
        ts = s.timesteps
        if begin is not None:
            s.set_begin_index(begin)
            ts = ts[begin:]
        x = torch.randn(shape, generator=torch.Generator().manual_seed(7)).to(dtype) * s.init_noise_sigma
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        res.append((loop(s, x.to(dtype), ts, gen, stepkw), s))
    return res


def assert_close_runs(a, b, dtype=torch.float32, rtol_factor=1.0):
    """Every step's outputs agree relative to the largest sample magnitude of the run so far: steps
    cancel large terms (x ~ sigma_max·noise down to x0), and the rounding of an early step carries on."""
    assert len(a) == len(b) > 0
    rtol = RTOL[dtype] * rtol_factor
    scale_in = 0.0
    for i, ((pa, xa, xin), (pb, xb, _)) in enumerate(zip(a, b)):
        scale_in = max(scale_in, xin.double().abs().max().item())
        for u, v, what in ((pa, pb, "prev_sample"), (xa, xb, "pred_original_sample")):
            assert u.dtype == v.dtype, (i, what, u.dtype, v.dtype)
            assert u.shape == v.shape
            u, v = u.double(), v.double()
            scale = max(u.abs().max().item(), scale_in) + 1e-6
            err = (u - v).abs().max().item()
            assert err <= rtol * scale, (i, what, err, scale)


# ---------------------------------------------------------------------------
# the config space, fp32
# ---------------------------------------------------------------------------
SPACING = [dict(timestep_spacing="linspace"), dict(timestep_spacing="leading", steps_offset=1),
           dict(timestep_spacing="trailing")]
SIGMAS = [dict(), dict(use_karras_sigmas=True), dict(use_exponential_sigmas=True), dict(use_beta_sigmas=True)]


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("spacing", SPACING, ids=lambda c: c["timestep_spacing"])
@pytest.mark.parametrize("name", ["euler", "euler_a", "heun", "lms"])
def test_prediction_and_spacing(name, pred, spacing):
    if name == "euler_a" and pred == "sample":
        pytest.skip("stock EulerAncestral raises NotImplementedError for sample (tested below)")
    seed = 3 if name == "euler_a" else None
    (a, _), (b, _) = side_by_side(name, dict(prediction_type=pred, **spacing), seed=seed)
    assert_close_runs(a, b)


@pytest.mark.parametrize("sig", SIGMAS[1:], ids=lambda c: next(iter(c)))
@pytest.mark.parametrize("name", ["euler", "heun", "lms"])
def test_sigma_schedules(name, sig):
    (a, _), (b, _) = side_by_side(name, dict(sig, prediction_type="v_prediction"), steps=7)
    assert_close_runs(a, b)


@pytest.mark.parametrize("cfg", [
    dict(interpolation_type="log_linear"),
    dict(final_sigmas_type="sigma_min", use_karras_sigmas=True),
    dict(final_sigmas_type="sigma_min"),
    dict(rescale_betas_zero_snr=True, timestep_spacing="trailing", prediction_type="v_prediction"),
    dict(timestep_type="continuous", prediction_type="v_prediction"),
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    dict(beta_schedule="squaredcos_cap_v2", prediction_type="sample"),
], ids=str)
def test_euler_configs(cfg):
    (a, _), (b, _) = side_by_side("euler", cfg, steps=7)
    assert_close_runs(a, b)


@pytest.mark.parametrize("set_kw", [dict(timesteps=[999, 800, 555, 300, 21]),
                                    dict(sigmas=[14.6, 5.0, 2.0, 0.5, 0.1, 0.0])], ids=str)
def test_euler_custom_timesteps_and_sigmas(set_kw):
    (a, _), (b, _) = side_by_side("euler", steps=None, set_kw=set_kw)
    assert_close_runs(a, b)


def test_heun_custom_timesteps_and_clip():
    (a, _), (b, _) = side_by_side("heun", dict(clip_sample=True, clip_sample_range=0.3), steps=None,
                                  set_kw=dict(timesteps=[900, 600, 250, 40]))
    assert_close_runs(a, b)
    assert max(p.abs().max().item() for _, p, _ in b) <= 0.3 + 1e-6


@pytest.mark.parametrize("cfg", [dict(rescale_betas_zero_snr=True, timestep_spacing="trailing"),
                                 dict(beta_schedule="scaled_linear")], ids=str)
def test_euler_ancestral_configs(cfg):
    (a, _), (b, _) = side_by_side("euler_a", cfg, seed=11)
    assert_close_runs(a, b)


# ---------------------------------------------------------------------------
# dtypes
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("name", ["euler", "euler_a", "heun", "lms"])
def test_dtypes(name, dtype):
    for pred in ("epsilon", "v_prediction"):
        (a, _), (b, _) = side_by_side(name, dict(prediction_type=pred), dtype=dtype,
                                      seed=5 if name == "euler_a" else None)
        assert_close_runs(a, b, dtype)
        assert a[-1][0].dtype == b[-1][0].dtype and a[-1][1].dtype == b[-1][1].dtype


def _run_err(ref, got):
    """Largest error of a run's prev_sample / pred_original_sample relative to the run's sample scale
    (as assert_close_runs measures it)."""
    worst, scale_in = 0.0, 0.0
    for (pr, xr, xin), (pg, xg, _) in zip(ref, got):
        scale_in = max(scale_in, xin.double().abs().max().item())
        for u, v in ((pr, pg), (xr, xg)):
            scale = max(u.double().abs().max().item(), scale_in) + 1e-6
            worst = max(worst, (u.double() - v.double()).abs().max().item() / scale)
    return worst


HALF_CASES = (
    [(name, sig, None) for name in ("euler", "heun", "lms") for sig in SIGMAS[1:]]
    + [(name, sp, None) for name in ("euler", "euler_a", "heun", "lms") for sp in SPACING]
    + [("euler", dict(final_sigmas_type="sigma_min"), None),
       ("euler", dict(final_sigmas_type="sigma_min", use_karras_sigmas=True), None),
       ("euler", dict(final_sigmas_type="zero", use_exponential_sigmas=True, prediction_type="v_prediction"), None),
       ("euler", {}, dict(timesteps=[999, 800, 555, 300, 21])),
       ("euler", {}, dict(sigmas=[14.6, 5.0, 2.0, 0.5, 0.1, 0.0])),
       ("heun", dict(prediction_type="v_prediction"), dict(timesteps=[900, 600, 250, 40]))]
)


@pytest.mark.parametrize("name,cfg,set_kw", HALF_CASES, ids=[f"{n}-{c}-{k}" for n, c, k in HALF_CASES])
def test_fp16_config_space(name, cfg, set_kw):
    """float16 vs stock float16 on the same inputs, every step. Stock computes some terms in float16,
    the fused step in float32: besides the direct comparison, both are compared to a float64 run of
    stock, where the fused error may be at most 1.5x stock's plus 2 float16 ulps (EulerAncestral draws
    its noise in the sample's dtype, so its float64 run is another path: direct comparison only)."""
    steps = None if set_kw and ("timesteps" in set_kw or "sigmas" in set_kw) else 6
    seed = 5 if name == "euler_a" else None
    (a, _), (b, _) = side_by_side(name, cfg, steps=steps, dtype=torch.float16, set_kw=set_kw, seed=seed)
    assert all(torch.isfinite(p).all() and torch.isfinite(x).all() for p, x, _ in b)
    assert_close_runs(a, b, torch.float16, rtol_factor=1.5)  # (stock's own float16 error reaches 6.5e-3)
    if name != "euler_a":
        (r, _), _ = side_by_side(name, cfg, steps=steps, dtype=torch.float64, set_kw=set_kw, seed=seed)
        e_stock, e_fused = _run_err(r, a), _run_err(r, b)
        assert e_fused <= 1.5 * e_stock + 2 * 2.0**-10, (e_fused, e_stock)


def test_euler_mixed_dtypes_and_sample_prediction_dtype():
    outs = []
    for cls in (D.EulerDiscreteScheduler, EulerDiscreteScheduler):
        s = cls(prediction_type="sample")
        s.set_timesteps(4)
        x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
        t = s.timesteps[0]
        o = s.step(model(x, t).half(), t, x)  # fp32 sample, fp16 model output
        outs.append(o)
    assert outs[0].prev_sample.dtype == outs[1].prev_sample.dtype == torch.float16
    assert outs[0].pred_original_sample.dtype == outs[1].pred_original_sample.dtype == torch.float16
    torch.testing.assert_close(outs[1].prev_sample, outs[0].prev_sample, rtol=2e-3, atol=1e-3)


# ---------------------------------------------------------------------------
# Euler's s_churn
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("stepkw", [dict(s_churn=1.0), dict(s_churn=0.5, s_noise=1.003),
                                    dict(s_churn=1.0, s_tmin=1.0, s_tmax=8.0)], ids=str)
@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
def test_euler_s_churn(stepkw, pred):
    (a, _), (b, _) = side_by_side("euler", dict(prediction_type=pred), steps=7, stepkw=stepkw, seed=9)
    assert_close_runs(a, b)


def test_euler_s_churn_all_steps_is_sync_free_path(monkeypatch):
    s = EulerDiscreteScheduler()
    s.set_timesteps(5)
    calls = []
    monkeypatch.setattr(D.EulerDiscreteScheduler, "step", lambda *a, **k: calls.append(1))
    x = torch.randn(SHAPE)
    loop(s, x, s.timesteps, torch.Generator().manual_seed(0), dict(s_churn=1.0))
    assert calls == []  # gamma > 0 at every step: never the stock step


# ---------------------------------------------------------------------------
# noise (EulerAncestral)
# ---------------------------------------------------------------------------
def test_euler_ancestral_generator_is_diffusers_exact_and_advances_generator():
    (a, sa), (b, sb) = side_by_side("euler_a", seed=21, steps=5)
    assert_close_runs(a, b)
    # same number of draws: both generators end in the same state
    ga, gb = torch.Generator().manual_seed(21), torch.Generator().manual_seed(21)
    for cls, g in ((D.EulerAncestralDiscreteScheduler, ga), (EulerAncestralDiscreteScheduler, gb)):
        s = cls()
        s.set_timesteps(4)
        loop(s, torch.randn(SHAPE), s.timesteps, g, record=False)
    assert torch.equal(ga.get_state(), gb.get_state())


def test_euler_ancestral_sample_prediction_raises():
    s = EulerAncestralDiscreteScheduler(prediction_type="sample")
    s.set_timesteps(4)
    with pytest.raises(NotImplementedError):
        s.step(torch.zeros(SHAPE), s.timesteps[0], torch.zeros(SHAPE))


def test_euler_ancestral_philox_noise_is_pygen_randn():
    """In-kernel noise = pygen.randn(shape, seed, stream=step index): recover it from the output."""
    shape = (2, 40, 25)
    torch.manual_seed(0)
    s = EulerAncestralDiscreteScheduler()
    s.set_timesteps(5)
    ref = D.EulerAncestralDiscreteScheduler()
    ref.set_timesteps(5)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(2)) * s.init_noise_sigma
    zs = []
    for i, t in enumerate(s.timesteps[:-1]):
        m = model(s.scale_model_input(x, t), t)
        out = s.step(m, t, x).prev_sample
        g = torch.Generator().manual_seed(100 + i)
        stock = ref.step(m, t, x, generator=g).prev_sample
        z_stock = torch.randn(shape, generator=torch.Generator().manual_seed(100 + i))
        sf, st = ref.sigmas[i].double(), ref.sigmas[i + 1].double()
        up = (st ** 2 * (sf ** 2 - st ** 2) / sf ** 2).sqrt().item()
        z = (out.double() - stock.double()) / up + z_stock.double()  # out - stock = up·(z - z_stock)
        want = randn_reference(shape, s._pygen_seed, i).double()
        # fp32 rounding of the deterministic part (~1e-6·|x|) is divided by sigma_up
        torch.testing.assert_close(z, want, rtol=0, atol=4e-6 * x.abs().max().item() / up + 1e-5)
        zs.append(z)
        x = out
    z = torch.cat(zs)
    assert abs(z.mean().item()) < 0.05 and abs(z.std().item() - 1) < 0.05


def test_euler_ancestral_philox_reproducible_under_manual_seed():
    def once():
        torch.manual_seed(123)
        s = EulerAncestralDiscreteScheduler()
        s.set_timesteps(4)
        return loop(s, torch.ones(SHAPE), s.timesteps, record=False)

    a, b = once(), once()
    assert torch.equal(a, b)
    torch.manual_seed(124)
    s = EulerAncestralDiscreteScheduler()
    s.set_timesteps(4)
    assert not torch.equal(a, loop(s, torch.ones(SHAPE), s.timesteps, record=False))


# ---------------------------------------------------------------------------
# Heun's two calls per timestep, LMS orders
# ---------------------------------------------------------------------------
def test_heun_state_attributes_follow_stock():
    a, b = D.HeunDiscreteScheduler(), HeunDiscreteScheduler()
    assert a.order == b.order == 2
    for s in (a, b):
        s.set_timesteps(4)
    assert b.state_in_first_order and b.dt is None
    x = torch.randn(SHAPE)
    xa = xb = x
    for t in a.timesteps:
        oa = a.step(model(a.scale_model_input(xa, t), t), t, xa)
        ob = b.step(model(b.scale_model_input(xb, t), t), t, xb)
        xa, xb = oa.prev_sample, ob.prev_sample
        assert a.state_in_first_order == b.state_in_first_order
        assert a.step_index == b.step_index
        if a.dt is None:
            assert b.dt is None
        else:
            torch.testing.assert_close(b.dt.reshape(()).double(), torch.as_tensor(a.dt).double(), rtol=1e-6, atol=0)
    torch.testing.assert_close(xb, xa, rtol=2e-6, atol=1e-6)
    b.set_timesteps(3)
    assert b.state_in_first_order and b.dt is None


@pytest.mark.parametrize("order", [1, 2, 3, 5])
def test_lms_other_orders(order):
    (a, _), (b, s) = side_by_side("lms", steps=7, stepkw=dict(order=order))
    assert_close_runs(a, b)
    if order != 4:
        assert order in s._pygen_order_tables  # built on first use


def test_lms_coefficients_match_scipy():
    s = D.LMSDiscreteScheduler(use_karras_sigmas=True)
    s.set_timesteps(8)
    sig = s.sigmas.double().tolist()
    rows = lms_rows(sig, 4, "sample", "LMS")
    from pygen.kdiffusion import linear_multistep_coeff
    for k in range(8):
        cur = min(k + 1, 4)
        for j in range(cur):
            want = s.get_lms_coefficient(cur, k, j)
            got = linear_multistep_coeff(cur, sig, k, j)
            assert abs(got - want) <= 1e-6 * (abs(want) + 1e-3)
        assert abs(rows[k, 3] + linear_multistep_coeff(cur, sig, k, 0) / sig[k]) < 1e-12


def test_lms_bad_order():
    s = LMSDiscreteScheduler()
    s.set_timesteps(4)
    x = torch.zeros(SHAPE)
    for bad in (0, 10, 2.5, True):
        with pytest.raises(ValueError, match="order"):
            s.step(x, s.timesteps[0], x, order=bad)


# ---------------------------------------------------------------------------
# begin_index (img2img), return_dict, per-row timesteps
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("name,begin", [("euler", 3), ("euler_a", 2), ("heun", 4), ("heun", 3), ("lms", 3)])
def test_begin_index(name, begin):
    (a, sa), (b, sb) = side_by_side(name, steps=7, begin=begin, seed=4 if name == "euler_a" else None)
    assert_close_runs(a, b)
    assert sa.step_index == sb.step_index
    if name == "heun":
        assert sa.state_in_first_order == sb.state_in_first_order


@pytest.mark.parametrize("name", ["euler", "euler_a", "heun", "lms"])
def test_img2img_lookup_without_begin_index(name):
    """First timestep taken from the middle of the schedule, found on the device (second-match rule)."""
    stock_cls, fused_cls = PAIRS[name]
    outs = []
    for cls in (stock_cls, fused_cls):
        s = cls()
        s.set_timesteps(6)
        start = 4 if name == "heun" else 2
        x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3)) * 4
        g = torch.Generator().manual_seed(8) if name == "euler_a" else None
        outs.append(loop(s, x, s.timesteps[start:], g))
    assert_close_runs(*outs)


@pytest.mark.parametrize("name", ["euler", "euler_a", "heun", "lms"])
def test_return_dict_false(name):
    stock_cls, fused_cls = PAIRS[name]
    s = fused_cls()
    s.set_timesteps(4)
    x = torch.randn(SHAPE)
    t = s.timesteps[0]
    out = s.step(model(s.scale_model_input(x, t), t), t, x, return_dict=False)
    assert type(out) is tuple and len(out) == 2 and out[0].shape == SHAPE


@pytest.mark.parametrize("name", ["euler", "euler_a", "heun", "lms"])
def test_per_row_timesteps_equal_rows_alone(name):
    _, cls = PAIRS[name]
    n = 7
    starts = [0, 2, 4] if name == "heun" else [0, 2, 3]
    x0 = torch.randn((3, 4, 5), generator=torch.Generator().manual_seed(1)) * 3
    torch.manual_seed(0)
    s = cls()
    s.set_timesteps(n)
    s.register_to_config(pygen_noise="philox")
    ts = s.timesteps
    calls = len(ts) - max(starts)
    x = x0.clone()
    for c in range(calls):
        t = torch.stack([ts[k + c] for k in starts])
        m = model(s.scale_model_input(x, t), t)
        x = s.step(m, t, x).prev_sample
    for r, k in enumerate(starts):
        torch.manual_seed(0)
        alone = cls()
        alone.set_timesteps(n)
        alone.register_to_config(pygen_noise="philox")
        xr = x0[r:r + 1].clone()
        for c in range(calls):
            t = ts[k + c]
            xr = alone.step(model(alone.scale_model_input(xr, t), t), t, xr).prev_sample
        if name == "euler_a":  # noise is numbered within the row for per-row steps: compare moments only
            assert torch.isfinite(x[r]).all()
            continue
        torch.testing.assert_close(x[r:r + 1], xr, rtol=2e-6, atol=1e-6)


# ---------------------------------------------------------------------------
# backends
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("name,cfg", [("euler", dict(prediction_type="v_prediction")), ("euler_a", {}),
                                      ("heun", dict(clip_sample=True, clip_sample_range=2.0)),
                                      ("lms", dict(use_karras_sigmas=True))], ids=lambda v: str(v))
def test_backends(backend, name, cfg):
    require_backend(backend)
    stock_cls, fused_cls = PAIRS[name]
    outs = []
    for cls in (stock_cls, fused_cls):
        s = cls(**cfg)
        s.set_timesteps(4)
        x = torch.randn((2, 1001), generator=torch.Generator().manual_seed(3)) * 3
        g = torch.Generator().manual_seed(6) if name == "euler_a" else None
        if cls is fused_cls:
            with pygen.use_backend(backend):
                outs.append(loop(s, x, s.timesteps, g))
        else:
            outs.append(loop(s, x, s.timesteps, g))
    assert_close_runs(*outs)


# ---------------------------------------------------------------------------
# config round-trip, threads, bad input, NaN
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["euler", "euler_a", "heun", "lms"])
def test_config_round_trip(name, tmp_path):
    stock_cls, fused_cls = PAIRS[name]
    fused = fused_cls(prediction_type="v_prediction", timestep_spacing="trailing")
    fused.save_pretrained(tmp_path / "f")
    stock = stock_cls.from_pretrained(tmp_path / "f")
    assert stock.config.prediction_type == "v_prediction" and stock.config.timestep_spacing == "trailing"
    stock.save_pretrained(tmp_path / "s")
    again = fused_cls.from_pretrained(tmp_path / "s")
    assert type(again) is fused_cls and again.config.timestep_spacing == "trailing"
    assert type(fused_cls.from_config(stock.config)) is fused_cls
    assert type(stock_cls.from_config(fused.config)) is stock_cls


def test_two_instances_in_two_threads():
    results, errors = {}, []
    want = {}
    for key, name, steps in (("h", "heun", 5), ("l", "lms", 7)):
        s = PAIRS[name][1]()
        s.set_timesteps(steps)
        want[key] = loop(s, torch.ones(SHAPE), s.timesteps, record=False)
    threads = []
    for key, name, steps in (("h", "heun", 5), ("l", "lms", 7)):
        def full(key=key, name=name, steps=steps):
            try:
                s = PAIRS[name][1]()
                s.set_timesteps(steps)
                results[key] = loop(s, torch.ones(SHAPE), s.timesteps, record=False)
            except Exception as e:  # pragma: no cover
                errors.append(e)
        threads.append(threading.Thread(target=full))
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    for key in want:
        torch.testing.assert_close(results[key], want[key], rtol=0, atol=0)


@pytest.mark.parametrize("name", ["euler", "euler_a"])
def test_step_before_set_timesteps(name):
    s = PAIRS[name][1]()
    x = torch.zeros(SHAPE)
    with pytest.raises(ValueError, match="set_timesteps"):
        s.step(x, torch.tensor(999.0), x)


@pytest.mark.parametrize("name", ["euler", "euler_a", "heun", "lms"])
def test_bad_input(name):
    s = PAIRS[name][1]()
    s.set_timesteps(4)
    x = torch.zeros(SHAPE)
    with pytest.raises(ValueError, match="timestep"):
        s.step(x, s.timesteps[:3], x)  # 1-D timestep of the wrong length
    with pytest.raises((ValueError, TypeError)):
        s.step(torch.zeros(3, 3), s.timesteps[0], x)
    if name in ("euler", "euler_a"):
        with pytest.raises(ValueError, match="integer"):
            s.step(x, 5, x)


@pytest.mark.parametrize("name", ["euler", "euler_a", "heun", "lms"])
def test_nan_propagates(name):
    s = PAIRS[name][1]()
    s.set_timesteps(4)
    x = torch.randn(SHAPE)
    m = torch.zeros(SHAPE)
    m[1, 2, 3] = float("nan")
    t = s.timesteps[0]
    o = s.step(m, t, x)
    assert torch.isnan(o.prev_sample[1, 2, 3]) and torch.isnan(o.pred_original_sample[1, 2, 3])
    assert torch.isfinite(o.prev_sample[0]).all()


# ---------------------------------------------------------------------------
# GPU only
# ---------------------------------------------------------------------------
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("name", ["euler", "euler_a", "heun", "lms"])
def test_cuda_loop_has_no_sync(name):
    s = PAIRS[name][1]()
    s.set_timesteps(6, device="cuda")
    x = torch.randn((2, 4, 8, 8), device="cuda")
    ts = list(s.timesteps)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for t in ts:
            m = model(s.scale_model_input(x, t), t)
            x = s.step(m, t, x).prev_sample
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(x).all()


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("name", ["euler", "euler_a", "heun", "lms"])
def test_cuda_matches_stock(name):
    stock_cls, fused_cls = PAIRS[name]
    outs = []
    for cls in (stock_cls, fused_cls):
        s = cls()
        s.set_timesteps(6, device="cuda")
        x = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(0)).cuda() * 5
        g = torch.Generator(device="cuda").manual_seed(1) if name == "euler_a" else None
        outs.append(loop(s, x, s.timesteps, g))
    assert_close_runs(*outs)


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("name", ["euler", "euler_a", "lms"])  # (Heun alternates two tables: one graph per phase)
def test_cuda_graph_capture(name):
    def net(x):
        return torch.tanh(x) * 0.7

    s = PAIRS[name][1]()
    torch.manual_seed(3)  # euler_a: the same Philox key for both (drawn at set_timesteps)
    s.set_timesteps(6, device="cuda")
    ref = PAIRS[name][1]()
    torch.manual_seed(3)
    ref.set_timesteps(6, device="cuda")
    x0 = torch.randn((2, 4, 8, 8), device="cuda") * 5
    want = x0.clone()
    for t in ref.timesteps:
        want = ref.step(net(ref.scale_model_input(want, t)), t, want).prev_sample
    t0 = s.timesteps[0]
    # warm-up step (finds the index, allocates history), then capture one model+step
    static_x = s.step(net(s.scale_model_input(x0.clone(), t0)), t0, x0.clone()).prev_sample.clone()
    t = s.timesteps[1]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream):
        with torch.cuda.graph(graph):  # recorded, not run: the device index is not advanced here
            out = s.step(net(s.scale_model_input(static_x, t)), t, static_x).prev_sample
    torch.cuda.current_stream().wait_stream(stream)
    for _ in range(len(s.timesteps) - 1):
        graph.replay()
        static_x.copy_(out)
    torch.testing.assert_close(static_x, want, rtol=1e-4, atol=1e-4)


@pytest.mark.cuda
@cuda
def test_cuda_compile_fullgraph_step():
    s = EulerDiscreteScheduler()
    s.set_timesteps(6, device="cuda")
    x = torch.randn((2, 4, 8, 8), device="cuda")
    t = s.timesteps[0]
    s.step(model(x, t), t, x)  # index found eagerly

    @torch.compile(fullgraph=True)
    def one(m, x):
        return s.step(m, s.timesteps[1], x, return_dict=False)[0]

    out = one(model(x, s.timesteps[1]), x)
    assert torch.isfinite(out).all()
