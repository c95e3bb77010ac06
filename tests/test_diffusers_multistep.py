"""pygen.diffusers multistep schedulers vs the stock diffusers classes, side by side:
DPMSolverMultistepScheduler (pygen/diffusers/dpmsolver.py) and FlowMatchEulerDiscreteScheduler
(pygen/diffusers/flow_match.py); UniPC is in test_diffusers_unipc.py."""
import threading
import warnings

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
import pygen  # noqa: E402
from pygen.diffusers.dpmsolver import DPMSolverMultistepScheduler as FusedDPM  # noqa: E402

from conftest import assert_half_close, cpu_backends, require_backend  # noqa: E402

warnings.filterwarnings("ignore", message=".*deprecated.*")


def model(x, t):
    """Synthetic model: smooth in x, small dependence on t (scalar or per-row)."""
    tt = torch.as_tensor(t, dtype=torch.float32).reshape(-1, *([1] * (x.dim() - 1))).to(x.dtype)
    return torch.tanh(x) * 0.7 + 0.0005 * tt * torch.cos(x)


def x0(shape=(2, 3, 4, 5), dtype=torch.float32, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def loop(s, x, *, generator_seed=None, timesteps=None, ts_slice=None, with_noise=None):
    g = None if generator_seed is None else torch.Generator().manual_seed(generator_seed)
    ts = s.timesteps if ts_slice is None else s.timesteps[ts_slice]
    scale = getattr(s, "scale_model_input", lambda y, t: y)
    for t in ts:
        x = s.step(model(scale(x, t), t), t, x, generator=g).prev_sample
    return x


def side_by_side(stock_cls, fused_cls, cfg, steps=10, dtype=torch.float32, generator_seed=None, set_kw=None,
                 shape=(2, 3, 4, 5)):
    outs, scheds = [], []
    for cls in (stock_cls, fused_cls):
        s = cls(**cfg)
        s.set_timesteps(steps, **(set_kw or {})) if steps is not None else s.set_timesteps(**set_kw)
        outs.append(loop(s, x0(shape, dtype), generator_seed=generator_seed))
        scheds.append(s)
    return outs, scheds


def assert_close_to_stock(ref, got, rtol=1e-5):
    assert got.dtype == ref.dtype and got.shape == ref.shape
    assert torch.isfinite(ref).all()
    scale = ref.double().abs().max().item()
    err = (ref.double() - got.double()).abs().max().item()
    assert err <= rtol * max(scale, 1.0), (err, scale)


# ---------------------------------------------------------------------------
# DPMSolverMultistepScheduler
# ---------------------------------------------------------------------------
ALGOS = ["dpmsolver++", "dpmsolver", "sde-dpmsolver++", "sde-dpmsolver"]


def dpm_cfg(algo, **kw):
    cfg = dict(algorithm_type=algo, **kw)
    if algo in ("dpmsolver", "sde-dpmsolver"):
        cfg.setdefault("final_sigmas_type", "sigma_min")
    return cfg


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("solver_type", ["midpoint", "heun"])
@pytest.mark.parametrize("pred", ["epsilon", "sample", "v_prediction"])
def test_dpm_orders_algorithms_predictions(algo, order, solver_type, pred):
    if algo == "sde-dpmsolver" and order == 3:
        pytest.skip("diffusers has no third-order sde-dpmsolver update (tested separately)")
    cfg = dpm_cfg(algo, solver_order=order, solver_type=solver_type, prediction_type=pred)
    (ref, got), _ = side_by_side(diffusers.DPMSolverMultistepScheduler, FusedDPM, cfg, steps=12,
                                 generator_seed=3 if algo.startswith("sde") else None)
    assert_close_to_stock(ref, got)


SIGMA_OPTS = [{}, {"use_karras_sigmas": True}, {"use_exponential_sigmas": True}, {"use_beta_sigmas": True},
              {"use_lu_lambdas": True}, {"timestep_spacing": "leading", "steps_offset": 1},
              {"timestep_spacing": "trailing"}, {"final_sigmas_type": "sigma_min"},
              {"lower_order_final": False}, {"euler_at_final": True}, {"thresholding": True, "sample_max_value": 1.5},
              {"beta_schedule": "scaled_linear"}, {"rescale_betas_zero_snr": True, "final_sigmas_type": "sigma_min"},
              {"beta_schedule": "squaredcos_cap_v2", "lambda_min_clipped": -5.1},
              {"use_flow_sigmas": True, "prediction_type": "flow_prediction", "flow_shift": 3.0},
              {"variance_type": "learned_range"}]


@pytest.mark.parametrize("opts", SIGMA_OPTS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
@pytest.mark.parametrize("algo,order", [("dpmsolver++", 2), ("dpmsolver++", 3), ("sde-dpmsolver++", 2),
                                        ("dpmsolver", 3)])
def test_dpm_config_space(opts, algo, order):
    if algo == "dpmsolver" and opts.get("prediction_type") == "flow_prediction":
        pytest.skip("flow_prediction needs a ++ algorithm")
    cfg = dpm_cfg(algo, solver_order=order, **opts)
    if cfg.get("variance_type"):
        return _learned_variance(cfg)
    steps = 8 if opts.get("lower_order_final") is False else 12
    (ref, got), _ = side_by_side(diffusers.DPMSolverMultistepScheduler, FusedDPM, cfg, steps=steps,
                                 generator_seed=5 if algo.startswith("sde") else None)
    assert_close_to_stock(ref, got)


def _learned_variance(cfg):
    outs = []
    for cls in (diffusers.DPMSolverMultistepScheduler, FusedDPM):
        s = cls(**cfg)
        s.set_timesteps(6)
        x = x0((2, 3, 4, 4))
        for t in s.timesteps:
            out = torch.cat([model(x, t), torch.zeros_like(x)], dim=1)  # 6 channels: mean + variance
            x = s.step(out, t, x, generator=torch.Generator().manual_seed(0)).prev_sample
        outs.append(x)
    assert_close_to_stock(*outs)


def test_dpm_long_schedule_third_order():
    """>= 15 steps: lower_order_final does not apply, third-order steps all the way."""
    cfg = dict(solver_order=3, use_karras_sigmas=True)
    (ref, got), _ = side_by_side(diffusers.DPMSolverMultistepScheduler, FusedDPM, cfg, steps=18,
                                 shape=(1, 4, 3, 3))
    assert_close_to_stock(ref, got)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("algo", ["dpmsolver++", "sde-dpmsolver++"])
def test_dpm_half_precision(dtype, algo):
    (ref, got), (stock, fused) = side_by_side(diffusers.DPMSolverMultistepScheduler, FusedDPM, dpm_cfg(algo),
                                              steps=10, dtype=dtype, generator_seed=1)
    assert got.dtype == ref.dtype == dtype
    if algo == "dpmsolver++":  # (the one-launch half path)
        assert [m.dtype for m in fused.model_outputs] == [m.dtype for m in stock.model_outputs]
    tol = 4 * (2.0**-10 if dtype == torch.float16 else 2.0**-7)
    assert_close_to_stock(ref, got, rtol=tol)


# (assert_half_close, conftest: the sde variants draw their noise in float32 in every dtype, so the
# float64 run of stock sees the same normals)
_CUSTOM_TS = dict(timesteps=[999, 850, 700, 500, 320, 200, 90, 10])
DPM_HALF_CASES = (
    [(algo, o, {}, None) for algo, o in [("dpmsolver++", 1), ("dpmsolver++", 2), ("dpmsolver++", 3), ("dpmsolver", 2),
                                         ("dpmsolver", 3), ("sde-dpmsolver++", 2), ("sde-dpmsolver++", 3),
                                         ("sde-dpmsolver", 1), ("sde-dpmsolver", 2)]]
    + [(algo, o, {sig: True}, None) for sig in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")
       for algo, o in [("dpmsolver++", 3), ("sde-dpmsolver++", 2), ("dpmsolver", 2)]]
    + [(algo, 2, sp, None) for sp in (dict(timestep_spacing="linspace"), dict(timestep_spacing="leading", steps_offset=1),
                                      dict(timestep_spacing="trailing"))
       for algo in ("dpmsolver++", "sde-dpmsolver")]
    + [(algo, o, dict(final_sigmas_type=f, **extra), None) for f in ("zero", "sigma_min")
       for algo, o, extra in [("dpmsolver++", 2, {}), ("sde-dpmsolver++", 2, {}),
                              ("dpmsolver++", 3, {"use_karras_sigmas": True})]]
    + [("dpmsolver++", 3, {}, _CUSTOM_TS), ("sde-dpmsolver++", 2, {}, _CUSTOM_TS),
       ("dpmsolver++", 2, {"thresholding": True, "sample_max_value": 1.5}, None),
       ("dpmsolver++", 2, {"prediction_type": "v_prediction"}, None),
       ("dpmsolver", 2, {"prediction_type": "sample"}, None)]
)


@pytest.mark.parametrize("algo,order,opts,set_kw", DPM_HALF_CASES,
                         ids=[f"{a}-{o}-{c}-{'custom' if k else ''}" for a, o, c, k in DPM_HALF_CASES])
def test_dpm_fp16_config_space(algo, order, opts, set_kw):
    cfg = dpm_cfg(algo, solver_order=order, **opts)
    steps = None if set_kw else 8
    seed = 3 if algo.startswith("sde") else None
    (ref, got), _ = side_by_side(diffusers.DPMSolverMultistepScheduler, FusedDPM, cfg, steps=steps,
                                 dtype=torch.float16, generator_seed=seed, set_kw=set_kw)
    (ref64, _), _ = side_by_side(diffusers.DPMSolverMultistepScheduler, FusedDPM, cfg, steps=steps,
                                 dtype=torch.float64, generator_seed=seed, set_kw=set_kw)
    assert_half_close(ref, got, ref64)


@pytest.mark.parametrize("algo", ["sde-dpmsolver++", "sde-dpmsolver"])
def test_dpm_fp16_variance_noise(algo):
    """The sde variants in float16 with the noise given as variance_noise (float16, as a pipeline
    would pass it), against stock float16 and float64 with the same noise."""
    cfg = dpm_cfg(algo, solver_order=2, use_karras_sigmas=True)
    g = torch.Generator().manual_seed(11)
    noise = [torch.randn((2, 3, 4, 5), generator=g).half() for _ in range(8)]
    outs = {}
    for cls, dtype in ((diffusers.DPMSolverMultistepScheduler, torch.float16), (FusedDPM, torch.float16),
                       (diffusers.DPMSolverMultistepScheduler, torch.float64)):
        s = cls(**cfg)
        s.set_timesteps(8)
        x = x0(dtype=dtype)
        for t, z in zip(s.timesteps, noise):
            x = s.step(model(x, t), t, x, variance_noise=z.to(dtype)).prev_sample
        outs[(cls, dtype)] = x
    assert_half_close(outs[(diffusers.DPMSolverMultistepScheduler, torch.float16)], outs[(FusedDPM, torch.float16)],
                      outs[(diffusers.DPMSolverMultistepScheduler, torch.float64)])


def test_dpm_custom_timesteps():
    ts = [999, 850, 700, 500, 320, 200, 90, 10]
    outs = []
    for cls in (diffusers.DPMSolverMultistepScheduler, FusedDPM):
        s = cls(solver_order=3)
        s.set_timesteps(timesteps=ts)
        outs.append(loop(s, x0()))
    assert_close_to_stock(*outs)


def test_dpm_dynamic_shifting_mu():
    cfg = dict(use_flow_sigmas=True, prediction_type="flow_prediction", use_dynamic_shifting=True)
    (ref, got), _ = side_by_side(diffusers.DPMSolverMultistepScheduler, FusedDPM, cfg, steps=8, set_kw={"mu": 0.7})
    assert_close_to_stock(ref, got)


def test_dpm_state_model_outputs_lower_order_nums_step_index():
    stock, fused = diffusers.DPMSolverMultistepScheduler(solver_order=3), FusedDPM(solver_order=3)
    xs, xf = x0(), x0()
    for s in (stock, fused):
        s.set_timesteps(9)
        assert s.model_outputs == [None, None, None] and s.lower_order_nums == 0
    for k, t in enumerate(stock.timesteps[:4]):
        xs = stock.step(model(xs, t), t, xs).prev_sample
        xf = fused.step(model(xf, t), t, xf).prev_sample
        assert fused.lower_order_nums == stock.lower_order_nums
        assert fused.step_index == stock.step_index == k + 1
        for a, b in zip(stock.model_outputs, fused.model_outputs):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_dpm_return_tuple_and_output_class():
    s = FusedDPM()
    s.set_timesteps(5)
    t = s.timesteps[0]
    out = s.step(model(x0(), t), t, x0(), return_dict=False)
    assert isinstance(out, tuple) and len(out) == 1
    s.set_timesteps(5)
    out = s.step(model(x0(), t), t, x0())
    assert type(out).__name__ == "SchedulerOutput" and not hasattr(out, "pred_original_sample")


def test_dpm_begin_index_mid_schedule():
    outs = []
    for cls in (diffusers.DPMSolverMultistepScheduler, FusedDPM):
        s = cls(solver_order=3)
        s.set_timesteps(12)
        s.set_begin_index(4)
        outs.append(loop(s, x0(), ts_slice=slice(4, None)))
    assert_close_to_stock(*outs)


def test_dpm_start_found_from_timestep():
    outs = []
    for cls in (diffusers.DPMSolverMultistepScheduler, FusedDPM):
        s = cls(solver_order=2)
        s.set_timesteps(10)
        outs.append(loop(s, x0(), ts_slice=slice(3, None)))
    assert_close_to_stock(*outs)


@pytest.mark.parametrize("order", [2, 3])
def test_dpm_per_row_timesteps(order):
    """Rows at different step indices, same number of steps taken: each row as if alone."""
    s = FusedDPM(solver_order=order, algorithm_type="dpmsolver++")
    s.set_timesteps(12)
    ts = s.timesteps
    starts = [0, 3, 5]
    x = x0((3, 2, 3, 3))
    y = x.clone()
    for k in range(6):
        t = torch.stack([ts[st + k] for st in starts])
        y = s.step(model(y, t), t, y).prev_sample
    for r, st in enumerate(starts):
        a = diffusers.DPMSolverMultistepScheduler(solver_order=order)
        a.set_timesteps(12)
        a.set_begin_index(st)
        xr = x[r:r + 1]
        for k in range(6):
            t = ts[st + k]
            xr = a.step(model(xr, t), t, xr).prev_sample
        assert_close_to_stock(xr, y[r:r + 1])


def test_dpm_variance_noise_equals_generator_noise():
    """sde-dpmsolver++: passing the normals as variance_noise gives the generator run, in both classes."""
    cfg = dict(algorithm_type="sde-dpmsolver++")
    (ref, got), _ = side_by_side(diffusers.DPMSolverMultistepScheduler, FusedDPM, cfg, steps=6, generator_seed=9)
    s = FusedDPM(**cfg)
    s.set_timesteps(6)
    g = torch.Generator().manual_seed(9)
    x = x0()
    for t in s.timesteps:
        z = torch.randn(x.shape, generator=g)
        x = s.step(model(x, t), t, x, variance_noise=z).prev_sample
    assert_close_to_stock(ref, x)
    assert_close_to_stock(ref, got)


def test_dpm_philox_noise_reproducible_and_sane():
    cfg = dict(algorithm_type="sde-dpmsolver++", solver_order=1)
    runs = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        s = FusedDPM(**cfg)
        s.set_timesteps(4)
        runs.append(loop(s, x0((4, 16, 16))))
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    # one step from a known state: x_next = a·x + b·x0 + s·z, so the noise part has mean 0, std s
    s = FusedDPM(**cfg)
    s.set_timesteps(4)
    t = s.timesteps[0]
    x = torch.zeros(8, 64, 64)
    m = torch.zeros_like(x)
    nxt = s.step(m, t, x).prev_sample
    sig = s.sigmas.double()
    a1 = 1 / (sig[1] ** 2 + 1).sqrt()
    st, ss = sig[1] * a1, sig[0] / (sig[0] ** 2 + 1).sqrt()
    h = torch.log(a1 / st) - torch.log(1 / (sig[0] ** 2 + 1).sqrt() / ss)
    std = (st * (1 - torch.exp(-2 * h)).sqrt()).item()
    z = nxt.double() / std
    assert abs(z.mean().item()) < 0.02 and abs(z.std().item() - 1) < 0.02


def test_dpm_sde_dpmsolver_third_order_rejected():
    s = FusedDPM(algorithm_type="sde-dpmsolver", solver_order=3, final_sigmas_type="sigma_min")
    s.set_timesteps(20)
    with pytest.raises(ValueError, match="third-order"):
        loop(s, x0())


def test_dpm_bad_input():
    s = FusedDPM()
    with pytest.raises(ValueError, match="set_timesteps"):
        s.step(x0(), 10, x0())
    s.set_timesteps(5)
    with pytest.raises(ValueError, match="shape"):
        s.step(x0((2, 3, 4, 4)), s.timesteps[0], x0())
    s = FusedDPM(prediction_type="flow_prediction", algorithm_type="dpmsolver", final_sigmas_type="sigma_min")
    s.set_timesteps(5)
    with pytest.raises(ValueError, match="prediction_type"):
        s.step(x0(), s.timesteps[0], x0())


def test_dpm_nan_propagates():
    s = FusedDPM()
    s.set_timesteps(5)
    x = x0()
    m = model(x, 0)
    m[0, 0, 0, 0] = float("nan")
    out = s.step(m, s.timesteps[0], x).prev_sample
    assert out[0, 0, 0, 0].isnan() and torch.isfinite(out[1]).all()


def test_dpm_config_round_trip(tmp_path):
    fused = FusedDPM(solver_order=3, algorithm_type="sde-dpmsolver++", use_karras_sigmas=True)
    fused.save_pretrained(tmp_path / "a")
    stock = diffusers.DPMSolverMultistepScheduler.from_pretrained(tmp_path / "a")
    assert stock.config.solver_order == 3 and stock.config.algorithm_type == "sde-dpmsolver++"
    stock.save_pretrained(tmp_path / "b")
    again = FusedDPM.from_pretrained(tmp_path / "b")
    assert type(again) is FusedDPM and again.config.use_karras_sigmas
    assert type(FusedDPM.from_config(stock.config)) is FusedDPM
    assert type(diffusers.DPMSolverMultistepScheduler.from_config(fused.config)) is diffusers.DPMSolverMultistepScheduler
    assert len(again) == 1000


def test_dpm_two_threads_do_not_interfere():
    ref = {}
    for order in (2, 3):
        s = FusedDPM(solver_order=order)
        s.set_timesteps(8)
        ref[order] = loop(s, x0(seed=order))
    got, errors = {}, []

    def work(order):
        try:
            for _ in range(3):
                s = FusedDPM(solver_order=order)
                s.set_timesteps(8)
                got[order] = loop(s, x0(seed=order))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(o,)) for o in (2, 3)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    for order in (2, 3):
        assert torch.equal(got[order], ref[order])


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("cfg", [dict(solver_order=2), dict(solver_order=3, algorithm_type="dpmsolver"),
                                 dict(algorithm_type="sde-dpmsolver++", solver_type="heun")], ids=str)
def test_dpm_backends(backend, cfg):
    require_backend(backend)
    cfg = dict(cfg)
    cfg = dpm_cfg(cfg.pop("algorithm_type", "dpmsolver++"), **cfg)
    stock = diffusers.DPMSolverMultistepScheduler(**cfg)
    stock.set_timesteps(6)
    ref = loop(stock, x0((2, 3, 5)), generator_seed=2)
    with pygen.use_backend(backend):
        s = FusedDPM(**cfg)
        s.set_timesteps(6)
        got = loop(s, x0((2, 3, 5)), generator_seed=2)
    assert_close_to_stock(ref, got)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("cfg", [dict(solver_order=2), dict(solver_order=3, thresholding=True),
                                 dict(algorithm_type="sde-dpmsolver++")], ids=str)
def test_dpm_cuda_loop_has_no_host_sync(cfg):
    s = FusedDPM(**cfg)
    s.set_timesteps(10, device="cuda")
    x = torch.randn(2, 4, 16, 16, device="cuda")
    ts = list(s.timesteps)  # host copies of the timesteps: made before the checked loop
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for t in ts:
            x = s.step(model(x, 0.0), t, x).prev_sample
    finally:
        torch.cuda.set_sync_debug_mode(0)
    stock = diffusers.DPMSolverMultistepScheduler(**cfg)
    stock.set_timesteps(10, device="cuda")
    if not cfg.get("algorithm_type", "").startswith("sde"):
        y = torch.randn(2, 4, 16, 16, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
        a, b = y.clone(), y.clone()
        s.set_timesteps(10, device="cuda")
        for t in stock.timesteps:
            a = stock.step(model(a, 0.0), t, a).prev_sample
            b = s.step(model(b, 0.0), t, b).prev_sample
        assert_close_to_stock(a, b)


@pytest.mark.cuda
@cuda
def test_dpm_cuda_graph_capture():
    s = FusedDPM(solver_order=2)
    s.set_timesteps(6, device="cuda")
    x = torch.randn(1, 4, 8, 8, device="cuda")
    ref = x.clone()
    stock = diffusers.DPMSolverMultistepScheduler(solver_order=2)
    stock.set_timesteps(6, device="cuda")
    for t in stock.timesteps:
        ref = stock.step(model(ref, 0.0), t, ref).prev_sample
    # steady state (lower_order_nums saturated) is what a graph captures: run 2 steps eagerly
    ts = s.timesteps
    for k in range(2):
        x = s.step(model(x, 0.0), ts[k], x).prev_sample
    static_x = x.clone()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        static_out = s.step(model(static_x, 0.0), ts[2], static_x).prev_sample
    for k in range(2, 6):
        g.replay()
        static_x.copy_(static_out)
    # the captured launch reads the steady table (lower_order_nums saturated) at the device step
    # index, whose rows already hold lower_order_final's first-order last step
    assert_close_to_stock(ref, static_x)


@pytest.mark.cuda
@cuda
def test_dpm_torch_compile_fullgraph_step():
    s = FusedDPM(solver_order=2)
    s.set_timesteps(6, device="cuda")
    stock = diffusers.DPMSolverMultistepScheduler(solver_order=2)
    stock.set_timesteps(6, device="cuda")
    x = torch.randn(1, 4, 8, 8, device="cuda")
    ref = x.clone()
    for t in stock.timesteps:
        ref = stock.step(model(ref, 0.0), t, ref).prev_sample
    step = torch.compile(lambda m, t, y: s.step(m, t, y).prev_sample, fullgraph=True)
    for t in s.timesteps:
        x = step(model(x, 0.0), t, x)
    assert_close_to_stock(ref, x)


# ---------------------------------------------------------------------------
# FlowMatchEulerDiscreteScheduler
# ---------------------------------------------------------------------------
from pygen.diffusers.flow_match import FlowMatchEulerDiscreteScheduler as FusedFM  # noqa: E402

FM_OPTS = [({}, {}), ({"shift": 3.0}, {}), ({"use_dynamic_shifting": True}, {"mu": 0.8}),
           ({"use_dynamic_shifting": True, "time_shift_type": "linear"}, {"mu": 0.8}),
           ({"invert_sigmas": True}, {}), ({"shift_terminal": 0.1, "shift": 2.0}, {}),
           ({"use_karras_sigmas": True}, {}), ({"use_exponential_sigmas": True}, {}),
           ({"use_beta_sigmas": True}, {}), ({"stochastic_sampling": True}, {}),
           ({"stochastic_sampling": True, "shift": 3.0}, {})]


@pytest.mark.parametrize("cfg,set_kw", FM_OPTS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "-")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fm_matches_stock(cfg, set_kw, dtype):
    (ref, got), (a, b) = side_by_side(diffusers.FlowMatchEulerDiscreteScheduler, FusedFM, cfg, steps=9,
                                      dtype=dtype, generator_seed=4, set_kw=set_kw)
    assert_close_to_stock(ref, got, rtol=1e-5 if dtype == torch.float32 else 2 * 2.0**-10)
    assert a.step_index == b.step_index == 9


@pytest.mark.parametrize("set_kw", [{"sigmas": [1.0, 0.8, 0.55, 0.3, 0.1]},
                                    {"sigmas": [1.0, 0.7, 0.4, 0.2], "timesteps": [1000.0, 700.0, 400.0, 200.0]}],
                         ids=["sigmas", "sigmas+timesteps"])
def test_fm_custom_sigmas(set_kw):
    (ref, got), _ = side_by_side(diffusers.FlowMatchEulerDiscreteScheduler, FusedFM, {"shift": 2.0}, steps=None,
                                 set_kw=set_kw)
    assert_close_to_stock(ref, got)


def test_fm_begin_index_and_scale_noise_img2img():
    outs = []
    noise = x0(seed=7)
    for cls in (diffusers.FlowMatchEulerDiscreteScheduler, FusedFM):
        s = cls(shift=3.0)
        s.set_timesteps(10)
        s.set_begin_index(4)
        t0 = s.timesteps[4:5].repeat(2)
        x = s.scale_noise(x0(), t0, noise)
        y = loop(s, x, ts_slice=slice(4, None))
        # inpainting-style re-noising after steps: uses the current step index
        outs.append((x, y, s.scale_noise(x0(), t0, noise)))
    for a, b in zip(*outs):
        assert_close_to_stock(a, b)


def test_fm_scale_noise_lookup_and_training_use():
    noise = x0(seed=8)
    for configure in (lambda s: None, lambda s: s.set_timesteps(8)):
        res = []
        for cls in (diffusers.FlowMatchEulerDiscreteScheduler, FusedFM):
            s = cls(shift=2.0)
            configure(s)
            t = s.timesteps[torch.tensor([1, 5])]
            res.append(s.scale_noise(x0(), t, noise))
        assert_close_to_stock(*res)


def test_fm_per_row_timesteps():
    s = FusedFM(shift=3.0)
    s.set_timesteps(10)
    ts = s.timesteps
    starts = [0, 2, 6]
    x = x0((3, 2, 5))
    y = x.clone()
    for k in range(4):
        t = torch.stack([ts[st + k] for st in starts])
        y = s.step(model(y, t), t, y).prev_sample
    for r, st in enumerate(starts):
        a = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
        a.set_timesteps(10)
        xr = x[r:r + 1]
        for k in range(4):
            t = ts[st + k]
            xr = a.step(model(xr, t), t, xr).prev_sample
        assert_close_to_stock(xr, y[r:r + 1])


def test_fm_per_token_timesteps_falls_back_to_stock():
    outs = []
    for cls in (diffusers.FlowMatchEulerDiscreteScheduler, FusedFM):
        s = cls()
        s.set_timesteps(6)
        x = x0((2, 5, 3))
        for k, t in enumerate(s.timesteps[:-1]):
            if k == 2:  # a fused step in between: the device index stays in sync
                x = s.step(model(x, t), t, x).prev_sample
                continue
            ptt = torch.full((2, 5), float(t)) - torch.arange(5.0)
            x = s.step(model(x, t), t, x, per_token_timesteps=ptt).prev_sample
        outs.append((x, s.step_index))
    assert_close_to_stock(outs[0][0], outs[1][0])
    assert outs[0][1] == outs[1][1] == 5


def test_fm_stochastic_philox_reproducible_and_sane():
    runs = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        s = FusedFM(stochastic_sampling=True)
        s.set_timesteps(3)
        runs.append(loop(s, x0((2, 8, 8))))
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    s = FusedFM(stochastic_sampling=True)
    s.set_timesteps(4)
    t = s.timesteps[0]
    x = torch.zeros(8, 64, 64)
    out = s.step(torch.zeros_like(x), t, x).prev_sample / s.sigmas[1]
    assert abs(out.mean().item()) < 0.02 and abs(out.std().item() - 1) < 0.02


def test_fm_return_tuple_bad_input_nan():
    s = FusedFM()
    with pytest.raises(ValueError, match="set_timesteps"):
        s.step(x0(), s.timesteps[0], x0())
    s.set_timesteps(4)
    with pytest.raises(ValueError, match="integer indices"):
        s.step(x0(), 3, x0())
    with pytest.raises(ValueError, match="shape"):
        s.step(x0((2, 3)), s.timesteps[0], x0())
    m = model(x0(), 0)
    m[1, 0, 0, 0] = float("nan")
    out = s.step(m, s.timesteps[0], x0(), return_dict=False)
    assert isinstance(out, tuple) and len(out) == 1
    assert out[0][1, 0, 0, 0].isnan() and torch.isfinite(out[0][0]).all()


def test_fm_config_round_trip(tmp_path):
    fused = FusedFM(shift=3.0, use_dynamic_shifting=True, stochastic_sampling=True)
    fused.save_pretrained(tmp_path)
    stock = diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(tmp_path)
    assert stock.config.shift == 3.0 and stock.config.stochastic_sampling
    assert type(FusedFM.from_config(stock.config)) is FusedFM
    assert FusedFM.from_config(stock.config).config.use_dynamic_shifting


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("cfg", [dict(shift=3.0), dict(stochastic_sampling=True)], ids=str)
def test_fm_backends(backend, cfg):
    require_backend(backend)
    stock = diffusers.FlowMatchEulerDiscreteScheduler(**cfg)
    stock.set_timesteps(5)
    ref = loop(stock, x0((2, 3, 5)), generator_seed=2)
    with pygen.use_backend(backend):
        s = FusedFM(**cfg)
        s.set_timesteps(5)
        got = loop(s, x0((2, 3, 5)), generator_seed=2)
    assert_close_to_stock(ref, got)


@pytest.mark.cuda
@cuda
def test_fm_cuda_loop_has_no_host_sync():
    s = FusedFM(shift=3.0)
    s.set_timesteps(8, device="cuda")
    x = torch.randn(2, 4, 16, 16, device="cuda")
    ts = list(s.timesteps)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for t in ts:
            x = s.step(model(x, 0.0), t, x).prev_sample
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(x).all()
