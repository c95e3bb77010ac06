"""pygen.diffusers.unipc.UniPCMultistepScheduler (fused) vs the stock diffusers class, side by side
with the same synthetic model, across UniPC's config space, plus API/state/robustness checks."""
import threading
import warnings

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
import pygen  # noqa: E402
from pygen.diffusers.unipc import UniPCMultistepScheduler as Fused  # noqa: E402

from conftest import HALF_ULP, assert_half_close, cpu_backends, rel_err, require_backend  # noqa: E402

warnings.filterwarnings("ignore", message=".*deprecated.*")
Stock = diffusers.UniPCMultistepScheduler
SHAPE = (2, 3, 4, 5)


def model(x, t):
    """Synthetic model: smooth in x, small dependence on t (scalar or per-row)."""
    tt = torch.as_tensor(t, dtype=torch.float32).reshape(-1, *([1] * (x.dim() - 1))).to(x.dtype)
    return torch.tanh(x) * 0.7 + 0.0005 * tt * torch.cos(x)


def x0(shape=SHAPE, dtype=torch.float32, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def loop(s, x, ts=None, edit=None):
    ts = s.timesteps if ts is None else ts
    for k, t in enumerate(ts):
        x = s.step(model(x, t), t, x).prev_sample
        if edit is not None:
            x = edit(k, x)
    return x


def pair(cfg, steps=10, dtype=torch.float32, set_kw=None, shape=SHAPE, edit=None, begin=None):
    outs, scheds = [], []
    for cls in (Stock, Fused):
        s = cls(**cfg)
        if steps is None:
            s.set_timesteps(**set_kw)
        else:
            s.set_timesteps(steps, **(set_kw or {}))
        ts = None
        if begin is not None:
            s.set_begin_index(begin)
            ts = s.timesteps[begin:]
        outs.append(loop(s, x0(shape, dtype), ts, edit))
        scheds.append(s)
    return outs, scheds


def assert_close(ref, got, rtol=1e-5):
    assert got.dtype == ref.dtype and got.shape == ref.shape
    assert torch.isfinite(ref).all() and torch.isfinite(got).all()
    scale = ref.double().abs().max().item()
    err = (ref.double() - got.double()).abs().max().item()
    assert err <= rtol * max(scale, 1.0), (err, scale)


def base_cfg(solver_type="bh2", order=2, predict_x0=True, pred="epsilon", **kw):
    cfg = dict(solver_type=solver_type, solver_order=order, predict_x0=predict_x0, prediction_type=pred, **kw)
    # final_sigmas_type="zero" makes stock return NaN for predict_x0=False (sigma_t·expm1(inf)) and for
    # bh1 (B(h) = -inf times a zero residual); both are tested on their own below
    if not predict_x0 or solver_type == "bh1":
        cfg.setdefault("final_sigmas_type", "sigma_min")
    return cfg


def tol_for(cfg):
    # eps-space UniPC with "sample" prediction converts eps = (x - alpha·x0)/sigma_t: at sigma_min
    # that amplifies float32 rounding ~50x; stock's own float32 result is as far from float64.
    if not cfg["predict_x0"] and cfg["prediction_type"] == "sample":
        return 1e-3
    return 1e-5


# ---------------------------------------------------------------------------
# the config space vs stock
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("solver_type", ["bh1", "bh2"])
@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("predict_x0", [True, False])
@pytest.mark.parametrize("pred", ["epsilon", "sample", "v_prediction"])
def test_solver_types_orders_predictions(solver_type, order, predict_x0, pred):
    cfg = base_cfg(solver_type, order, predict_x0, pred)
    (ref, got), _ = pair(cfg, steps=12)
    assert_close(ref, got, tol_for(cfg))


@pytest.mark.parametrize("order", [2, 3])
@pytest.mark.parametrize("predict_x0", [True, False])
@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
def test_no_lower_order_final(order, predict_x0, pred):
    cfg = base_cfg("bh2", order, predict_x0, pred, lower_order_final=False, final_sigmas_type="sigma_min")
    (ref, got), _ = pair(cfg, steps=8)
    assert_close(ref, got, 1e-4 if order == 3 else 1e-5)


def test_no_lower_order_final_zero_sigma_is_nonfinite_in_both():
    # a higher-order final step to sigma 0 divides by r_k = 0: stock gives inf/NaN, so do we
    cfg = base_cfg("bh2", 2, True, "epsilon", lower_order_final=False)
    (ref, got), _ = pair(cfg, steps=6)
    assert not torch.isfinite(ref).any() and not torch.isfinite(got).any()


@pytest.mark.parametrize("spacing,offset", [("linspace", 0), ("leading", 0), ("leading", 1), ("trailing", 0)])
@pytest.mark.parametrize("order", [2, 3])
def test_timestep_spacings(spacing, offset, order):
    cfg = base_cfg(order=order, timestep_spacing=spacing, steps_offset=offset)
    (ref, got), _ = pair(cfg, steps=9)
    assert_close(ref, got)


@pytest.mark.parametrize("sigmas", ["use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"])
@pytest.mark.parametrize("final", ["zero", "sigma_min"])
@pytest.mark.parametrize("predict_x0", [True, False])
def test_sigma_schedules_and_final_sigmas(sigmas, final, predict_x0):
    if not predict_x0 and final == "zero":
        pytest.skip("stock returns NaN there (tested in test_eps_space_zero_final_sigma_is_nan_in_both)")
    cfg = base_cfg(order=3, predict_x0=predict_x0, final_sigmas_type=final, **{sigmas: True})
    (ref, got), _ = pair(cfg, steps=10)
    assert_close(ref, got)


@pytest.mark.parametrize("beta_schedule", ["scaled_linear", "squaredcos_cap_v2"])
@pytest.mark.parametrize("zero_snr", [False, True])
def test_beta_schedules_and_zero_snr(beta_schedule, zero_snr):
    cfg = base_cfg(order=2, pred="v_prediction", beta_schedule=beta_schedule, rescale_betas_zero_snr=zero_snr,
                   timestep_spacing="trailing")
    (ref, got), _ = pair(cfg, steps=8)
    assert_close(ref, got, 1e-4 if zero_snr else 1e-5)


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_prediction(order, shift):
    cfg = base_cfg(order=order, pred="flow_prediction", use_flow_sigmas=True, flow_shift=shift)
    (ref, got), _ = pair(cfg, steps=10)
    assert_close(ref, got)


def test_custom_sigmas_and_dynamic_shifting():
    cfg = base_cfg(order=2, pred="flow_prediction", use_flow_sigmas=True)
    (ref, got), _ = pair(cfg, steps=None, set_kw=dict(sigmas=np.array([1.0, 0.8, 0.55, 0.3, 0.2, 0.1])))
    assert_close(ref, got)
    cfg = base_cfg(order=3, pred="flow_prediction", use_flow_sigmas=True, use_dynamic_shifting=True)
    (ref, got), _ = pair(cfg, steps=8, set_kw=dict(mu=0.7))
    assert_close(ref, got)


@pytest.mark.parametrize("disable", [[0], [0, 1, 2], [3, 5], list(range(12))])
@pytest.mark.parametrize("order", [1, 3])
def test_disable_corrector(disable, order):
    cfg = base_cfg(order=order, disable_corrector=disable)
    (ref, got), _ = pair(cfg, steps=10)
    assert_close(ref, got)


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("order", [2, 3])
def test_thresholding(pred, order):
    cfg = base_cfg(order=order, pred=pred, thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.5)
    (ref, got), _ = pair(cfg, steps=8, shape=(2, 3, 5, 5))
    assert_close(ref, got)
    # the quantile really acted (a run without thresholding differs)
    (plain, _), _ = pair(base_cfg(order=order, pred=pred), steps=8, shape=(2, 3, 5, 5))
    assert (plain - ref).abs().max() > 1e-3


def test_bh1_zero_final_sigma():
    # stock multiplies B(h) = -inf by the zero residual of the first-order final step and returns NaN;
    # the fused step returns the formula's value, the converted x0 of the final step
    cfg = dict(solver_type="bh1", solver_order=2, final_sigmas_type="zero")
    stock, fused = Stock(**cfg), Fused(**cfg)
    stock.set_timesteps(6)
    fused.set_timesteps(6)
    xs, xf = x0(), x0()
    for t in stock.timesteps[:-1]:
        xs = stock.step(model(xs, t), t, xs).prev_sample
        xf = fused.step(model(xf, t), t, xf).prev_sample
    assert_close(xs, xf)
    t = stock.timesteps[-1]
    expected = stock.convert_model_output(model(xs, t), sample=xs)
    assert torch.isnan(stock.step(model(xs, t), t, xs).prev_sample).all()
    assert_close(expected, fused.step(model(xf, t), t, xf).prev_sample)


def test_eps_space_zero_final_sigma_is_nan_in_both():
    cfg = dict(predict_x0=False, solver_order=2, final_sigmas_type="zero")
    (ref, got), _ = pair(cfg, steps=6)
    assert torch.isnan(ref).all() and torch.isnan(got).all()


# ---------------------------------------------------------------------------
# dtypes and backends
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,rtol", [(torch.float16, 2e-2), (torch.bfloat16, 8e-2), (torch.float64, 1e-5)])
@pytest.mark.parametrize("order", [2, 3])
def test_dtypes(dtype, rtol, order):
    cfg = base_cfg(order=order)
    (ref, got), _ = pair(cfg, steps=10, dtype=dtype)
    assert got.dtype == dtype
    assert_close(ref, got, rtol)
    # half precision: the fused float32 computation is closer to a float64 run than stock's
    if dtype in (torch.float16, torch.bfloat16):
        (ref64, _), _ = pair(cfg, steps=10, dtype=torch.float64)
        assert (got.double() - ref64).abs().max() <= (ref.double() - ref64).abs().max() * 1.5 + 1e-3


HALF_SIGMAS = np.array([1.0, 0.8, 0.55, 0.3, 0.2, 0.1])
HALF_CASES = (
    [(base_cfg(st, o, px), None) for st in ("bh1", "bh2") for o in (1, 2, 3) for px in (True, False)]
    + [(base_cfg(order=3, final_sigmas_type=f, **{sig: True}), None)
       for sig in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas") for f in ("zero", "sigma_min")]
    + [(base_cfg("bh1", 2, False, "v_prediction", **{sig: True}), None)
       for sig in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")]
    + [(base_cfg(order=3, **sp), None) for sp in (dict(timestep_spacing="linspace"),
                                                   dict(timestep_spacing="leading", steps_offset=1),
                                                   dict(timestep_spacing="trailing"))]
    + [(base_cfg("bh1", 2, False, timestep_spacing=sp), None) for sp in ("leading", "trailing")]
    + [(base_cfg(order=2, pred="flow_prediction", use_flow_sigmas=True), dict(sigmas=HALF_SIGMAS)),
       (base_cfg(order=3, pred="flow_prediction", use_flow_sigmas=True, flow_shift=3.0), None),
       (base_cfg(order=2, pred="v_prediction", thresholding=True, sample_max_value=1.5), None),
       (base_cfg(order=2, pred="sample"), None)]
)


@pytest.mark.parametrize("cfg,set_kw", HALF_CASES,
                         ids=[",".join(f"{k}={v}" for k, v in c.items()) + (",sigmas=" if k else "") for c, k in HALF_CASES])
def test_fp16_config_space(cfg, set_kw):
    steps = None if set_kw else 8
    (ref, got), _ = pair(cfg, steps=steps, dtype=torch.float16, set_kw=set_kw)
    (ref64, _), _ = pair(cfg, steps=steps, dtype=torch.float64, set_kw=set_kw)
    assert_half_close(ref, got, ref64)


MO_CASES = [base_cfg("bh2", 1), base_cfg("bh1", 2), base_cfg("bh2", 3), base_cfg("bh1", 3, False, "v_prediction"),
            base_cfg("bh2", 2, False, "sample"), base_cfg("bh2", 2, pred="v_prediction", thresholding=True,
                                                         sample_max_value=1.5),
            base_cfg("bh2", 3, pred="sample", thresholding=True, sample_max_value=1.5)]


def _run_with_state(cls, cfg, dtype, steps=8):
    s = cls(**cfg)
    s.set_timesteps(steps)
    x, states = x0(dtype=dtype), []
    for t in s.timesteps:
        x = s.step(model(x, t), t, x).prev_sample
        states.append((list(s.model_outputs), s.this_order))
    return states


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("cfg", MO_CASES, ids=[",".join(f"{k}={v}" for k, v in c.items()) for c in MO_CASES])
def test_model_outputs_and_this_order_follow_stock(cfg, dtype):
    """After every step: model_outputs (converted outputs, oldest first, thresholded x0 when
    thresholding) with stock's dtype and values, and this_order, as stock."""
    stock, fused = _run_with_state(Stock, cfg, dtype), _run_with_state(Fused, cfg, dtype)
    ref64 = _run_with_state(Stock, cfg, torch.float64) if dtype == torch.float16 else stock
    e_stock = e_fused = 0.0
    for (ms, os_), (mf, of), (m64, _) in zip(stock, fused, ref64):
        assert of == os_
        assert len(mf) == len(ms) == cfg["solver_order"]
        for a, b, r in zip(ms, mf, m64):
            assert (a is None) == (b is None)
            if a is None:
                continue
            assert b.dtype == a.dtype and b.shape == a.shape
            if dtype == torch.float32:
                assert_close(a, b, tol_for(cfg))
            else:
                e_stock, e_fused = max(e_stock, rel_err(r, a)), max(e_fused, rel_err(r, b))
    assert e_fused <= 1.5 * e_stock + 3 * HALF_ULP, (e_fused, e_stock)
    assert fused[-1][0][-1] is not None


def test_model_outputs_read_only_and_reset():
    cfg = base_cfg(order=3)
    s = _fused(cfg, 6)
    assert s.model_outputs == [None] * 3
    x = x0()
    t = s.timesteps[0]
    x = s.step(model(x, t), t, x).prev_sample
    assert s.model_outputs[:2] == [None, None] and s.model_outputs[2] is not None
    s.model_outputs[2] = torch.zeros_like(x)  # read-only: later steps use what the fused step keeps
    for t in s.timesteps[1:]:
        x = s.step(model(x, t), t, x).prev_sample
    assert_close(loop(_stock(cfg, 6), x0()), x)
    s.set_timesteps(6)
    assert s.model_outputs == [None] * 3


@pytest.mark.parametrize("how", ["begin_index", "timestep", "lower_order_final=False"])
def test_this_order_host_known(how):
    cfg = base_cfg(order=3, lower_order_final=how != "lower_order_final=False", final_sigmas_type="sigma_min")
    orders = []
    for cls in (Stock, Fused):
        s = cls(**cfg)
        s.set_timesteps(10)
        ts = s.timesteps
        if how == "begin_index":
            s.set_begin_index(4)
            ts = ts[4:]
        elif how == "timestep":
            ts = ts[5:]  # first index found from the timestep (on the host: an element of s.timesteps)
        x, seen = x0(), []
        for t in ts:
            x = s.step(model(x, t), t, x).prev_sample
            seen.append(s.this_order)
        orders.append(seen)
    assert orders[0] == orders[1]
    assert min(orders[1]) == 1 and (how == "lower_order_final=False" or orders[1][-1] == 1)


def test_this_order_unknown_on_the_host_is_none():
    # per-row timesteps: the order may differ per row and the step indices live on the device
    s = _fused(base_cfg(order=2, timestep_spacing="trailing"), 10)
    x = x0((2, 3, 4))
    t = s.timesteps[torch.tensor([0, 3])]
    s.step(model(x, t), t, x)
    assert s.this_order is None
    # ... unless it does not depend on the step index
    s = _fused(base_cfg(order=2, lower_order_final=False, final_sigmas_type="sigma_min"), 10)
    s.step(model(x, t), t, x)
    assert s.this_order == 1
    s.step(model(x, t + 0), t, x)
    assert s.this_order == 2


def test_mixed_dtypes():
    cfg = base_cfg(order=2)
    for cls_out in (Stock, Fused):
        s = cls_out(**cfg)
        s.set_timesteps(4)
        x = x0(dtype=torch.float16)
        out = s.step(model(x, s.timesteps[0]).float(), s.timesteps[0], x).prev_sample
        assert out.dtype == torch.float16


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("cfg", [
    base_cfg(order=3),
    base_cfg("bh1", 2, False, "v_prediction", disable_corrector=[1]),
    base_cfg(order=2, thresholding=True, pred="v_prediction"),
], ids=["x0-o3", "eps-bh1", "threshold"])
def test_backends(backend, cfg):
    require_backend(backend)
    shape = (2, 3, 7) if backend == "triton" else SHAPE
    with pygen.use_backend(backend):
        (ref, got), _ = pair(cfg, steps=6, shape=shape)
    assert_close(ref, got)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("cfg", [base_cfg(order=3), base_cfg("bh1", 2, False, "v_prediction", disable_corrector=[1])],
                         ids=["x0-o3", "eps-bh1"])
def test_backends_fp16_one_launch_path(backend, cfg):
    """float16 sample and model output on every backend: the kernel reads/writes half with the float32
    ring (the kept previous output in float16), as close to a float64 run as stock fp16 is."""
    require_backend(backend)
    shape = (2, 3, 7) if backend == "triton" else SHAPE
    with pygen.use_backend(backend):
        (ref, got), (_, fused) = pair(cfg, steps=6, dtype=torch.float16, shape=shape)
    (ref64, _), _ = pair(cfg, steps=6, dtype=torch.float64, shape=shape)
    assert fused._pygen_history.dtype == torch.float32 and fused._pygen_last_out.dtype == torch.float16
    assert_half_close(ref, got, ref64)


# ---------------------------------------------------------------------------
# API, state, begin_index, per-row timesteps
# ---------------------------------------------------------------------------
def test_return_dict_false_and_state_mirrors():
    cfg = base_cfg(order=3)
    stock, fused = Stock(**cfg), Fused(**cfg)
    for s in (stock, fused):
        s.set_timesteps(5)
    xs, xf = x0(), x0()
    for t in stock.timesteps:
        (xs,) = stock.step(model(xs, t), t, xs, return_dict=False)
        out = fused.step(model(xf, t), t, xf, return_dict=False)
        assert isinstance(out, tuple) and len(out) == 1
        (xf,) = out
        assert fused.lower_order_nums == stock.lower_order_nums
        assert fused.step_index == stock.step_index
        assert [int(v) for v in fused.timestep_list if v is not None] == \
            [int(v) for v in stock.timestep_list if v is not None]
        assert (fused.last_sample is None) == (stock.last_sample is None)
    assert_close(xs, xf)
    assert fused.scale_model_input(xf, 3) is xf


@pytest.mark.parametrize("begin", [2, 5])
@pytest.mark.parametrize("order", [2, 3])
def test_begin_index_mid_schedule(begin, order):
    cfg = base_cfg(order=order, timestep_spacing="trailing")
    (ref, got), (stock, fused) = pair(cfg, steps=10, begin=begin)
    assert_close(ref, got)
    assert fused.step_index == stock.step_index == 10


def test_start_mid_schedule_by_timestep_lookup():
    cfg = base_cfg(order=3)
    outs = []
    for cls in (Stock, Fused):
        s = cls(**cfg)
        s.set_timesteps(10)
        outs.append(loop(s, x0(), s.timesteps[3:]))
    assert_close(*outs)


def test_set_timesteps_resets_state():
    cfg = base_cfg(order=3)
    s = Fused(**cfg)
    s.set_timesteps(6)
    loop(s, x0(seed=5))
    s.set_timesteps(10)
    got = loop(s, x0())
    ref = loop(_stock(cfg, 10), x0())
    assert_close(ref, got)


def _stock(cfg, steps):
    s = Stock(**cfg)
    s.set_timesteps(steps)
    return s


@pytest.mark.parametrize("order", [2, 3])
def test_per_row_timesteps(order):
    cfg = base_cfg(order=order, timestep_spacing="trailing")
    n, starts = 10, [0, 3]
    s = Fused(**cfg)
    s.set_timesteps(n)
    x = x0((2, 3, 4))
    idx = torch.tensor(starts)
    for k in range(n - max(starts)):
        t = s.timesteps[idx + k]
        x = s.step(model(x, t), t, x).prev_sample
    for r, st in enumerate(starts):
        alone = Stock(**cfg)
        alone.set_timesteps(n)
        alone.set_begin_index(st)
        ref = loop(alone, x0((2, 3, 4))[r:r + 1], alone.timesteps[st:n - max(starts) + st])
        assert_close(ref, x[r:r + 1])


def test_sample_edited_between_steps_matches_stock():
    # inpainting-style pipelines blend latents between steps (a new tensor) or edit prev_sample in place;
    # stock's corrector uses its own last sample, so must we
    mask = (torch.arange(5) % 2).float()

    def rebind(k, x):
        return x * mask + (1 - mask) * 0.3

    def in_place(k, x):
        x.mul_(0.9)
        return x

    for edit in (rebind, in_place):
        (ref, got), _ = pair(base_cfg(order=3), steps=8, edit=edit)
        assert_close(ref, got)


def test_solver_p_falls_back_to_stock():
    cfg = base_cfg(order=2)
    outs = []
    for cls in (Stock, Fused):
        s = cls(**cfg, solver_p=diffusers.DPMSolverMultistepScheduler())
        s.set_timesteps(6)
        outs.append(loop(s, x0()))
    assert_close(*outs)


def test_config_round_trip(tmp_path):
    cfg = base_cfg("bh1", 3, True, "v_prediction", disable_corrector=[0, 1], use_karras_sigmas=True)
    Fused(**cfg).save_pretrained(tmp_path / "fused")
    stock = Stock.from_pretrained(tmp_path / "fused")
    Stock(**cfg).save_pretrained(tmp_path / "stock")
    fused = Fused.from_pretrained(tmp_path / "stock")
    assert isinstance(fused, Fused)
    for key in ("solver_type", "solver_order", "prediction_type", "disable_corrector", "use_karras_sigmas"):
        assert stock.config[key] == fused.config[key] == (cfg[key] if key in cfg else stock.config[key])
    from_cfg = Fused.from_config(Stock(**cfg).config)
    back = Stock.from_config(from_cfg.config)
    for s in (stock, fused, from_cfg, back):
        s.set_timesteps(7)
    assert_close(loop(stock, x0()), loop(fused, x0()))
    assert_close(loop(back, x0()), loop(from_cfg, x0()))
    assert Fused.compatibles == Stock.compatibles


def test_two_threads_do_not_interfere():
    cfgs = [base_cfg(order=3), base_cfg("bh1", 2, False, "v_prediction")]
    refs = [loop(_stock(c, 10), x0(seed=i)) for i, c in enumerate(cfgs)]
    results = [None, None]
    errors = []

    def work(i):
        try:
            s = Fused(**cfgs[i])
            s.set_timesteps(10)
            for _ in range(3):
                s.set_timesteps(10)
                results[i] = loop(s, x0(seed=i))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    for r, g in zip(refs, results):
        assert_close(r, g)


def test_deterministic_repeat():
    cfg = base_cfg(order=3)
    a = loop(_fused(cfg, 8), x0())
    b = loop(_fused(cfg, 8), x0())
    assert torch.equal(a, b)


def _fused(cfg, steps):
    s = Fused(**cfg)
    s.set_timesteps(steps)
    return s


# ---------------------------------------------------------------------------
# NaN and bad input
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("predict_x0", [True, False])
def test_nan_propagates_like_stock(predict_x0):
    cfg = base_cfg(order=2, predict_x0=predict_x0, pred="v_prediction")

    def run(s):
        x = x0()
        for k, t in enumerate(s.timesteps):
            m = model(x, t)
            if k == 3:
                m = m.clone()
                m[0, 1, 2, 3] = float("nan")
            x = s.step(m, t, x).prev_sample
        return x

    ref, got = run(_stock(cfg, 8)), run(_fused(cfg, 8))
    assert torch.isnan(got).any()
    assert torch.equal(torch.isnan(ref), torch.isnan(got))
    ok = ~torch.isnan(ref)
    assert torch.allclose(ref[ok], got[ok], rtol=1e-4, atol=1e-5)


def test_bad_input():
    s = Fused()
    with pytest.raises(ValueError, match="set_timesteps"):
        s.step(torch.zeros(2, 3), 10, torch.zeros(2, 3))
    s.set_timesteps(5)
    t = s.timesteps[0]
    with pytest.raises(ValueError, match="shape"):
        s.step(torch.zeros(2, 4), t, torch.zeros(2, 3))
    with pytest.raises(TypeError):
        s.step([0.0], t, torch.zeros(2, 3))
    with pytest.raises(TypeError):
        s.step(torch.zeros(2, 3, dtype=torch.int64), t, torch.zeros(2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="timestep"):
        s.step(torch.zeros(2, 3), torch.tensor([1, 2, 3]), torch.zeros(2, 3))
    s.step(torch.zeros(2, 3), t, torch.zeros(2, 3))
    with pytest.raises(ValueError, match="between steps"):
        s.step(torch.zeros(4, 3), s.timesteps[1], torch.zeros(4, 3))
    bad = Fused(prediction_type="flow_prediction", predict_x0=False)
    bad.set_timesteps(4)
    with pytest.raises(ValueError, match="prediction_type"):
        bad.step(torch.zeros(2, 3), bad.timesteps[0], torch.zeros(2, 3))


def test_past_end_gives_nan_not_out_of_bounds():
    s = _fused(base_cfg(order=2), 4)
    x = loop(s, x0())
    assert torch.isfinite(x).all()
    out = s.step(model(x, 1), s.timesteps[-1], x).prev_sample
    assert torch.isnan(out).all()


# ---------------------------------------------------------------------------
# GPU-only
# ---------------------------------------------------------------------------
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("cfg", [base_cfg(order=3), base_cfg(order=2, thresholding=True),
                                 base_cfg("bh1", 2, False, "epsilon", disable_corrector=[2])])
def test_cuda_loop_has_no_host_sync(cfg):
    s = Fused(**cfg)
    s.set_timesteps(10, device="cuda")
    x = torch.randn(2, 4, 16, 16, device="cuda")
    ts = list(s.timesteps)  # host copies of the timesteps, read before the loop
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        xf = x
        for t in ts:
            xf = s.step(model(xf, t), t, xf).prev_sample
    finally:
        torch.cuda.set_sync_debug_mode(0)
    stock = Stock(**cfg)
    stock.set_timesteps(10, device="cuda")
    xs = loop(stock, x)
    assert_close(xs, xf, 1e-4)
    assert s.this_order == stock.this_order  # (timesteps iterated from s.timesteps: known on the host)
    for a, b in zip(stock.model_outputs, s.model_outputs):
        assert b.dtype == a.dtype and b.device == a.device
        assert_close(a, b, 1e-4)


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_cuda_matches_cpu(dtype):
    cfg = base_cfg(order=3)
    x = x0((2, 4, 8, 8), dtype)
    cpu = loop(_fused(cfg, 8), x)
    s = Fused(**cfg)
    s.set_timesteps(8, device="cuda")
    gpu = loop(s, x.cuda()).cpu()
    assert_close(cpu, gpu, 1e-5 if dtype == torch.float32 else 2e-3)
