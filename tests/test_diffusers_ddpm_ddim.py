"""pygen.diffusers DDPMScheduler / DDIMScheduler against the stock diffusers classes.

Side by side in one loop with the same synthetic model, across the config space (prediction
types, timestep spacings, steps_offset, clip_sample / thresholding, eta, use_clipped_model_output,
variance types, custom timesteps, rescale_betas_zero_snr), seeded generators, fp32/fp64 and
fp16/bf16, the pygen backends, per-row timesteps, config round-trips, threads, bad input.
"""
import threading

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import pygen  # noqa: E402
from pygen.diffusers.ddim import DDIMScheduler  # noqa: E402
from pygen.diffusers.ddpm import DDPMScheduler  # noqa: E402

from conftest import require_backend  # noqa: E402

SHAPE = (2, 3, 4, 5)
STOCK = {DDIMScheduler: diffusers.DDIMScheduler, DDPMScheduler: diffusers.DDPMScheduler}
VARIANCES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range")


def model(x, t, learned=False):
    """A synthetic denoiser: smooth in x, slightly t-dependent (per row for a 1-D t)."""
    t = torch.as_tensor(t, dtype=torch.float32)
    tt = t.view(-1, *([1] * (x.dim() - 1))) if t.dim() == 1 else t
    out = torch.tanh(x.float()) * 0.7 + 0.3 * torch.sin(0.5 * x.float()) * (tt / 1000.0) + 0.05
    if learned:  # a 2C-channel output: predicted variance in [-1, 1]
        out = torch.cat([out, torch.tanh(0.3 * x.float() + tt / 1000.0)], dim=1)
    return out.to(x.dtype)


def close(a, b, rtol, what=""):
    assert a.dtype == b.dtype, (what, a.dtype, b.dtype)
    assert a.shape == b.shape, (what, a.shape, b.shape)
    a64, b64 = a.double(), b.double()
    assert torch.equal(a64.isnan(), b64.isnan()), what
    ok = ~b64.isnan()
    scale = b64[ok].abs().max().item() if ok.any() else 1.0
    err = (a64[ok] - b64[ok]).abs().max().item() if ok.any() else 0.0
    assert err <= rtol * max(scale, 1.0), f"{what}: max err {err:.3g} vs scale {scale:.3g}"


def run_pair(cls, config, steps=8, dtype=torch.float32, step_kwargs=None, set_kwargs=None, seed=0, generator=True,
             rtol=None, shape=SHAPE):
    """Run the fused and the stock scheduler side by side; compare every step's outputs."""
    step_kwargs = dict(step_kwargs or {})
    fused, stock = cls(**config), STOCK[cls](**config)
    if set_kwargs is None:
        set_kwargs = dict(num_inference_steps=steps)
    fused.set_timesteps(**set_kwargs)
    stock.set_timesteps(**set_kwargs)
    assert torch.equal(fused.timesteps, stock.timesteps)
    learned = config.get("variance_type", "").startswith("learned")
    x0 = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)
    xf, xs = x0.clone(), x0.clone()
    gf = torch.Generator().manual_seed(seed + 1) if generator else None
    gs = torch.Generator().manual_seed(seed + 1) if generator else None
    if rtol is None:
        rtol = {torch.float32: 2e-5, torch.float64: 1e-6}.get(dtype, 2e-2)
    for i, t in enumerate(fused.timesteps):
        mf, ms = model(xf, t, learned), model(xs, t, learned)
        of = fused.step(mf, t, xf, generator=gf, **step_kwargs)
        os_ = stock.step(ms, t, xs, generator=gs, **step_kwargs)
        assert type(of) is type(os_)
        close(of.pred_original_sample, os_.pred_original_sample, rtol, f"pred step {i} t={int(t)}")
        close(of.prev_sample, os_.prev_sample, rtol, f"prev step {i} t={int(t)}")
        # continue both from the stock state so errors never compound
        xf, xs = os_.prev_sample.clone(), os_.prev_sample.clone()
    if generator:  # the generator advanced exactly as in diffusers
        assert torch.equal(torch.randn(3, generator=gf), torch.randn(3, generator=gs))
    return fused, stock


# ---------------------------------------------------------------------------
# DDIM across the config space
# ---------------------------------------------------------------------------
SPACINGS = [dict(timestep_spacing="leading"), dict(timestep_spacing="leading", steps_offset=1),
            dict(timestep_spacing="trailing"), dict(timestep_spacing="linspace")]


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("spacing", SPACINGS, ids=["leading", "leading+offset", "trailing", "linspace"])
@pytest.mark.parametrize("clip_sample", [False, True])
def test_ddim_matches_stock(prediction_type, spacing, clip_sample):
    for set_alpha_to_one in (True, False):
        config = dict(prediction_type=prediction_type, clip_sample=clip_sample, set_alpha_to_one=set_alpha_to_one,
                      **spacing)
        for eta in (0.0, 0.7):
            for use_clipped in (False, True):
                run_pair(DDIMScheduler, config, steps=7,
                         step_kwargs=dict(eta=eta, use_clipped_model_output=use_clipped))


@pytest.mark.parametrize("config", [
    dict(thresholding=True),
    dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.5, prediction_type="v_prediction"),
    dict(thresholding=True, sample_max_value=0.8, prediction_type="sample"),
    dict(clip_sample=True, clip_sample_range=0.5),
    dict(clip_sample=True, clip_sample_range=2.0, prediction_type="v_prediction"),
    dict(clip_sample=True, clip_sample_range=0.0),
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False),
    dict(beta_schedule="squaredcos_cap_v2"),
    dict(rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing", clip_sample=False),
    dict(rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing"),
    dict(num_train_timesteps=100, timestep_spacing="linspace"),
    dict(trained_betas=torch.linspace(1e-4, 0.03, 200).tolist(), num_train_timesteps=200),
], ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items() if k != "trained_betas") or "trained")
@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("use_clipped", [False, True])
def test_ddim_thresholding_clip_schedules(config, eta, use_clipped):
    if eta == 1.0 and config.get("rescale_betas_zero_snr"):
        # at alphas_cumprod = 0, eta = 1 gives dir = sqrt(1 - ap - std^2) = sqrt(0): diffusers' float32
        # cancellation leaves ~3e-4 there (pygen's float64 row gives ~0); eta = 0 covers zero SNR
        pytest.skip("ill-conditioned in diffusers' float32 arithmetic")
    run_pair(DDIMScheduler, config, steps=6, step_kwargs=dict(eta=eta, use_clipped_model_output=use_clipped))


def test_ddim_many_steps_and_all_steps():
    run_pair(DDIMScheduler, dict(num_train_timesteps=20, clip_sample=False), steps=20, step_kwargs=dict(eta=0.3))
    run_pair(DDIMScheduler, dict(num_train_timesteps=20, timestep_spacing="trailing"), steps=3)


def test_ddim_eta_changes_between_steps_and_tables_are_cached():
    fused, stock = DDIMScheduler(), diffusers.DDIMScheduler()
    fused.set_timesteps(6)
    stock.set_timesteps(6)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    etas = [0.0, 0.5, 0.5, 1.0, 0.5, 0.0]
    for t, eta in zip(fused.timesteps, etas):
        m = model(x, t)
        a = fused.step(m, t, x, eta=eta, generator=g1)
        b = stock.step(m, t, x, eta=eta, generator=g2)
        close(a.prev_sample, b.prev_sample, 2e-5)
        x = b.prev_sample
    # one host table per distinct (eta, clip mode) and one device copy each
    etas_built = sorted({k[0] for k in fused._pygen_host_cache})
    assert etas_built == [0.0, 0.5, 1.0]
    assert len(fused._pygen_dev_cache) == 3


def test_ddim_variance_noise_and_return_dict():
    fused, stock = DDIMScheduler(clip_sample=False), diffusers.DDIMScheduler(clip_sample=False)
    fused.set_timesteps(5)
    stock.set_timesteps(5)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    for t in fused.timesteps:
        noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(int(t)))
        m = model(x, t)
        a = fused.step(m, t, x, eta=0.8, variance_noise=noise, return_dict=False)
        b = stock.step(m, t, x, eta=0.8, variance_noise=noise, return_dict=False)
        assert isinstance(a, tuple) and len(a) == 2
        close(a[0], b[0], 2e-5)
        close(a[1], b[1], 2e-5)
        x = b[0]


# ---------------------------------------------------------------------------
# DDPM across the config space
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("variance_type", VARIANCES)
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_ddpm_matches_stock(variance_type, prediction_type):
    for spacing in SPACINGS:
        for clip_sample in (True, False):
            config = dict(variance_type=variance_type, prediction_type=prediction_type, clip_sample=clip_sample,
                          **spacing)
            run_pair(DDPMScheduler, config, steps=6)


@pytest.mark.parametrize("config", [
    dict(thresholding=True),
    dict(thresholding=True, dynamic_thresholding_ratio=0.8, sample_max_value=2.0, variance_type="learned_range"),
    dict(clip_sample=True, clip_sample_range=0.3, variance_type="fixed_large"),
    dict(clip_sample=True, clip_sample_range=0.0),
    dict(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction"),
    dict(beta_schedule="sigmoid"),
    dict(beta_schedule="scaled_linear", clip_sample=False),
    dict(rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing"),
    dict(num_train_timesteps=50, timestep_spacing="linspace", variance_type="learned"),
], ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_ddpm_thresholding_clip_schedules(config):
    run_pair(DDPMScheduler, config, steps=7)


@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large", "learned_range"])
@pytest.mark.parametrize("timesteps", [[999, 800, 500, 250, 60, 7, 0], [900, 500, 10], [3, 2, 1, 0]])
def test_ddpm_custom_timesteps(variance_type, timesteps):
    # at t <= 3, 1 - alphas_cumprod ~ 3e-4: diffusers' float32 `1 - at` and `1 - at/ap` lose ~4 digits
    # (pygen's rows are float64; see test_ddpm_small_t_closer_to_float64), hence 2e-4 there
    run_pair(DDPMScheduler, dict(variance_type=variance_type), set_kwargs=dict(timesteps=timesteps),
             rtol=2e-4 if min(timesteps[:-1]) < 5 else None)


def test_ddpm_small_t_closer_to_float64(monkeypatch):
    """Where diffusers' float32 coefficient arithmetic cancels (t near 0), pygen is the accurate one."""
    import diffusers.schedulers.scheduling_ddpm as sd

    orig = sd.randn_tensor
    monkeypatch.setattr(sd, "randn_tensor", lambda shape, generator=None, device=None, dtype=None:
                        orig(shape, generator=generator, device=device, dtype=torch.float32).to(dtype))
    fused, stock, oracle = DDPMScheduler(), diffusers.DDPMScheduler(), diffusers.DDPMScheduler()
    for s in (fused, stock, oracle):
        s.set_timesteps(timesteps=[3, 2, 1, 0])
    oracle.alphas_cumprod, oracle.one = oracle.alphas_cumprod.double(), oracle.one.double()
    x = torch.randn(SHAPE).double()
    t = oracle.timesteps[1]
    m = model(x, t)
    outs = [s.step(mm, t, xx, generator=torch.Generator().manual_seed(0)).prev_sample.double()
            for s, mm, xx in ((fused, m.float(), x.float()), (stock, m.float(), x.float()), (oracle, m, x))]
    err_fused = (outs[0] - outs[2]).abs().max().item()
    err_stock = (outs[1] - outs[2]).abs().max().item()
    assert err_fused < 1e-6 and err_fused < err_stock / 10


def test_ddpm_without_set_timesteps():
    """diffusers' DDPM steps before set_timesteps (previous timestep t - 1): so does the fused one."""
    fused, stock = DDPMScheduler(), diffusers.DDPMScheduler()
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    for t in [999, 500, 3, 1, 0]:
        m = model(x, t)
        a = fused.step(m, t, x, generator=g1)
        b = stock.step(m, torch.tensor(t), x, generator=g2)
        rtol = 2e-4 if t < 5 else 2e-5  # diffusers' float32 cancellation near t = 0 (see below)
        close(a.prev_sample, b.prev_sample, rtol, f"t={t}")
        close(a.pred_original_sample, b.pred_original_sample, rtol)
        x = b.prev_sample


def test_ddpm_all_train_steps_small():
    run_pair(DDPMScheduler, dict(num_train_timesteps=16), steps=16)


def test_ddpm_return_dict_false():
    fused, stock = DDPMScheduler(), diffusers.DDPMScheduler()
    fused.set_timesteps(4)
    stock.set_timesteps(4)
    x = torch.randn(SHAPE)
    t = fused.timesteps[1]
    a = fused.step(model(x, t), t, x, generator=torch.Generator().manual_seed(0), return_dict=False)
    b = stock.step(model(x, t), t, x, generator=torch.Generator().manual_seed(0), return_dict=False)
    assert isinstance(a, tuple) and len(a) == 2
    close(a[0], b[0], 2e-5)
    close(a[1], b[1], 2e-5)


# ---------------------------------------------------------------------------
# dtypes
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("cls,config,kwargs", [
    (DDIMScheduler, dict(), dict(eta=0.0)),
    (DDIMScheduler, dict(clip_sample=False, prediction_type="v_prediction"), dict(eta=0.5)),
    (DDIMScheduler, dict(thresholding=True), dict(eta=0.5)),
    (DDPMScheduler, dict(), {}),
    (DDPMScheduler, dict(thresholding=True, variance_type="fixed_large"), {}),
    (DDPMScheduler, dict(variance_type="learned_range", prediction_type="sample"), {}),
], ids=["ddim", "ddim-v-eta", "ddim-thr", "ddpm", "ddpm-thr", "ddpm-learned"])
def test_dtypes(dtype, cls, config, kwargs):
    # stock computes in the half type itself (many roundings), pygen in fp32 rounded once
    # (float64: diffusers computes its coefficients from float32 0-dim tensors, ~1e-7 relative)
    rtol = {torch.float16: 1e-2, torch.bfloat16: 5e-2, torch.float64: 1e-6}[dtype]
    run_pair(cls, config, steps=5, dtype=dtype, step_kwargs=kwargs, rtol=rtol)


def test_mixed_dtypes_promote_like_stock():
    fused, stock = DDIMScheduler(), diffusers.DDIMScheduler()
    fused.set_timesteps(5)
    stock.set_timesteps(5)
    x = torch.randn(SHAPE)
    t = fused.timesteps[2]
    m = model(x, t).half()
    a, b = fused.step(m, t, x), stock.step(m, t, x)
    assert a.prev_sample.dtype == torch.float32
    # diffusers rounds `coefficient * model_output` to float16 (a 0-dim factor does not promote)
    close(a.prev_sample, b.prev_sample, 2e-3)


# ---------------------------------------------------------------------------
# backends
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
@pytest.mark.parametrize("cls,config,kwargs", [
    (DDIMScheduler, dict(), dict(eta=0.0)),
    (DDIMScheduler, dict(thresholding=True, prediction_type="v_prediction"), dict(eta=0.6)),
    (DDPMScheduler, dict(variance_type="fixed_small_log"), {}),
    (DDPMScheduler, dict(variance_type="learned_range"), {}),
], ids=["ddim-clip", "ddim-thr-eta", "ddpm", "ddpm-learned"])
def test_backends(backend, cls, config, kwargs):
    require_backend(backend)
    with pygen.use_backend(backend):
        run_pair(cls, config, steps=4, step_kwargs=kwargs, shape=(2, 1, 3, 5))


# ---------------------------------------------------------------------------
# noise: Philox path
# ---------------------------------------------------------------------------
def test_ddim_philox_noise_is_pygen_randn_of_the_timestep():
    """No generator: the noise of timestep t is pygen.randn(shape, seed, stream=t)."""
    fused, stock = DDIMScheduler(clip_sample=False), diffusers.DDIMScheduler(clip_sample=False)
    torch.manual_seed(0)
    fused.set_timesteps(5)
    stock.set_timesteps(5)
    x = torch.randn(SHAPE)
    for t in fused.timesteps:
        m = model(x, t)
        a = fused.step(m, t, x, eta=0.9)
        z = pygen.randn(SHAPE, fused._pygen_seed, int(t))
        b = stock.step(m, t, x, eta=0.9, variance_noise=z)
        close(a.prev_sample, b.prev_sample, 2e-5)
        x = b.prev_sample


def _philox_loop(cls, kwargs, seed):
    torch.manual_seed(seed)
    s = cls()
    s.set_timesteps(4)
    x = torch.randn(SHAPE)
    for t in s.timesteps:
        x = s.step(model(x, t), t, x, **kwargs).prev_sample
    return x


@pytest.mark.parametrize("cls,kwargs", [(DDIMScheduler, dict(eta=1.0)), (DDPMScheduler, {})])
def test_philox_reproducible_under_manual_seed(cls, kwargs):
    a, b, c = _philox_loop(cls, kwargs, 0), _philox_loop(cls, kwargs, 0), _philox_loop(cls, kwargs, 1)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_ddpm_philox_noise_moments():
    """No generator: (prev - noiseless prev) / std is standard normal."""
    torch.manual_seed(0)
    fused = DDPMScheduler(clip_sample=False)
    fused.set_timesteps(10)
    shape = (4, 4, 32, 32)
    x = torch.randn(shape)
    t = fused.timesteps[3]
    m = model(x, t)
    a = fused.step(m, t, x).prev_sample
    ref = diffusers.DDPMScheduler(clip_sample=False)
    ref.set_timesteps(10)
    mean_part = ref.step(m, t, x, generator=torch.Generator().manual_seed(0)).prev_sample
    std = ref._get_variance(t) ** 0.5
    z_ref = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    mean_part = mean_part - std * z_ref
    z = ((a - mean_part) / std).double()
    n = z.numel()
    assert abs(z.mean().item()) < 5 / n ** 0.5
    assert abs(z.var().item() - 1) < 5 * (2 / n) ** 0.5
    assert torch.allclose(z, pygen.randn(shape, fused._pygen_seed, int(t)).double(), atol=1e-3)


def test_noise_mode_config_forces_generator_or_philox():
    x = torch.randn(SHAPE)

    def run(mode, generator):
        torch.manual_seed(0)
        s = DDPMScheduler()
        if mode:
            s.register_to_config(pygen_noise=mode)
        s.set_timesteps(4)
        t = s.timesteps[0]
        return s.step(model(x, t), t, x, generator=generator).prev_sample

    stock = diffusers.DDPMScheduler()
    stock.set_timesteps(4)
    t = stock.timesteps[0]
    want = stock.step(model(x, t), t, x, generator=torch.Generator().manual_seed(7)).prev_sample
    close(run(None, torch.Generator().manual_seed(7)), want, 2e-5)
    philox = run("philox", torch.Generator().manual_seed(7))
    assert not torch.allclose(philox, want)
    assert torch.equal(philox, run(None, None))
    torch.manual_seed(0)
    s = DDPMScheduler()
    s.register_to_config(pygen_noise="generator")
    s.set_timesteps(4)
    state = torch.get_rng_state()
    got = s.step(model(x, t), t, x).prev_sample
    torch.set_rng_state(state)
    close(got, stock.step(model(x, t), t, x).prev_sample, 2e-5)


def test_ddpm_generator_not_advanced_at_t0_host_timestep():
    s = DDPMScheduler()
    s.set_timesteps(timesteps=[5, 0])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(SHAPE)
    s.step(model(x, 0), 0, x, generator=g)
    s.step(model(x, 0), torch.tensor(0), x, generator=g)
    assert torch.equal(torch.randn(2, generator=g), torch.randn(2, generator=torch.Generator().manual_seed(0)))


# ---------------------------------------------------------------------------
# per-row timesteps
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("cls,config,kwargs", [
    (DDIMScheduler, dict(), dict(eta=0.0)),
    (DDIMScheduler, dict(thresholding=True), dict(eta=0.7)),
    (DDPMScheduler, dict(), {}),
    (DDPMScheduler, dict(variance_type="fixed_large", thresholding=True), {}),
])
@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_per_row_timesteps_equal_rows_alone(cls, config, kwargs, backend):
    require_backend(backend)
    with pygen.use_backend(backend):
        torch.manual_seed(0)
        s = cls(**config)
        s.set_timesteps(10)
        x = torch.randn(3, 2, 3, 3)
        ts = s.timesteps[[0, 4, 9]]  # 900, 500, 0 (leading)
        m = model(x, ts)
        out = s.step(m, ts, x, **kwargs)
        for r in range(3):
            alone = s.step(m[r:r + 1], ts[r], x[r:r + 1], **kwargs)  # Philox noise: same per-row stream
            close(out.prev_sample[r:r + 1], alone.prev_sample, 1e-6, f"row {r}")
            close(out.pred_original_sample[r:r + 1], alone.pred_original_sample, 1e-6)
        if kwargs.get("eta", 1) == 0.0:  # deterministic: also equal to the stock class row by row
            stock = STOCK[cls](**config)
            stock.set_timesteps(10)
            for r in range(3):
                b = stock.step(m[r:r + 1], ts[r], x[r:r + 1])
                close(out.prev_sample[r:r + 1], b.prev_sample, 2e-5)


# ---------------------------------------------------------------------------
# API surface, config round trip, threads
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [DDIMScheduler, DDPMScheduler])
def test_surface_like_stock(cls):
    fused, stock = cls(), STOCK[cls]()
    for name in ("set_begin_index", "step_index", "begin_index"):
        assert hasattr(fused, name) == hasattr(stock, name), name
    for name in ("betas", "alphas_cumprod", "timesteps", "init_noise_sigma", "order", "add_noise", "__len__",
                 "scale_model_input", "compatibles"):
        assert hasattr(fused, name), name
    fused.set_timesteps(5)
    stock.set_timesteps(5)
    assert fused.num_inference_steps == stock.num_inference_steps == 5
    assert len(fused) == len(stock)
    x = torch.randn(SHAPE)
    assert torch.equal(fused.scale_model_input(x, fused.timesteps[0]), x)
    noise = torch.randn(SHAPE)
    tt = torch.tensor([10, 500])
    assert torch.equal(fused.add_noise(x, noise, tt), stock.add_noise(x, noise, tt))
    import inspect

    def params(f):  # names, kinds and defaults (annotations may differ)
        return [(p.name, p.kind, p.default) for p in inspect.signature(f).parameters.values()]

    assert params(cls.step) == params(STOCK[cls].step)
    assert params(cls.__init__) == params(STOCK[cls].__init__)


@pytest.mark.parametrize("cls", [DDIMScheduler, DDPMScheduler])
def test_config_round_trip(cls, tmp_path):
    config = dict(prediction_type="v_prediction", timestep_spacing="trailing", clip_sample=False,
                  beta_schedule="scaled_linear")
    fused = cls(**config)
    fused.save_pretrained(tmp_path / "fused")
    stock = STOCK[cls].from_pretrained(tmp_path / "fused")
    assert stock.config.prediction_type == "v_prediction" and stock.config.timestep_spacing == "trailing"
    STOCK[cls](**config).save_pretrained(tmp_path / "stock")
    back = cls.from_pretrained(tmp_path / "stock")
    assert type(back) is cls
    def public(c):
        return {k: v for k, v in dict(c).items() if not k.startswith("_")}

    assert public(back.config) == public(fused.config)
    from_cfg = cls.from_config(stock.config)
    assert type(from_cfg) is cls and from_cfg.config.beta_schedule == "scaled_linear"
    assert type(STOCK[cls].from_config(fused.config)) is STOCK[cls]
    run_pair(cls, dict(from_cfg.config), steps=4)


def test_two_instances_in_two_threads():
    def loop(cls, seed, out, key):
        s = cls(clip_sample=False)
        s.set_timesteps(8)
        x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))
        g = torch.Generator().manual_seed(seed)
        kwargs = dict(eta=0.5) if cls is DDIMScheduler else {}
        for t in s.timesteps:
            x = s.step(model(x, t), t, x, generator=g, **kwargs).prev_sample
        out[key] = x

    alone = {}
    loop(DDIMScheduler, 1, alone, "a")
    loop(DDPMScheduler, 2, alone, "b")
    together = {}
    for _ in range(3):
        threads = [threading.Thread(target=loop, args=(DDIMScheduler, 1, together, "a")),
                   threading.Thread(target=loop, args=(DDPMScheduler, 2, together, "b"))]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert torch.equal(together["a"], alone["a"]) and torch.equal(together["b"], alone["b"])


# ---------------------------------------------------------------------------
# bad input, NaN
# ---------------------------------------------------------------------------
def test_bad_input():
    x = torch.randn(SHAPE)
    with pytest.raises(ValueError, match="set_timesteps"):
        DDIMScheduler().step(x, 10, x)
    s = DDIMScheduler()
    s.set_timesteps(5)
    with pytest.raises(ValueError, match="shape"):
        s.step(x[:, :2], 10, x)
    with pytest.raises(ValueError, match="one entry per batch row"):
        s.step(x, torch.tensor([1, 2, 3]), x)
    with pytest.raises(TypeError, match="floating"):
        s.step(x.long(), 10, x.long())
    with pytest.raises(ValueError, match="generator"):
        s.step(x, 10, x, eta=0.5, generator=torch.Generator(), variance_noise=x)
    s.register_to_config(prediction_type="nope")
    with pytest.raises(ValueError, match="prediction_type"):
        s.step(x, 10, x)
    d = DDPMScheduler(variance_type="learned")
    d.set_timesteps(5)
    with pytest.raises(ValueError, match="twice the channels"):
        d.step(x, d.timesteps[0], x)
    with pytest.raises(ValueError, match="shape"):
        d.step(torch.randn(2, 5, 4, 5), d.timesteps[0], x)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_out_of_schedule_timestep_gives_nan(backend):
    require_backend(backend)
    with pygen.use_backend(backend):
        x = torch.randn(SHAPE)
        d = DDPMScheduler()
        d.set_timesteps(5)
        with pytest.raises(IndexError, match="not in DDPMScheduler.timesteps"):  # known on the host: as stock
            d.step(x, 123, x)
        rows = torch.full((SHAPE[0],), 123)  # per-row timesteps (looked up on the device): NaN rows
        assert d.step(x, rows, x).prev_sample.isnan().all()
        s = DDIMScheduler()
        s.set_timesteps(5)
        assert s.step(x, 5000, x).prev_sample.isnan().all()


@pytest.mark.parametrize("cls,config", [
    (DDIMScheduler, dict(clip_sample=True)), (DDIMScheduler, dict(thresholding=True)),
    (DDPMScheduler, dict(clip_sample=True)), (DDPMScheduler, dict(thresholding=True)),
])
def test_nan_propagates(cls, config):
    s = cls(**config)
    s.set_timesteps(5)
    x = torch.randn(SHAPE)
    m = model(x, 0)
    m[0, 1, 2, 3] = float("nan")
    t = s.timesteps[1]
    out = s.step(m, t, x)
    assert out.prev_sample[0, 1, 2, 3].isnan() and out.pred_original_sample[0, 1, 2, 3].isnan()
    if not config.get("thresholding"):
        assert out.prev_sample[1].isfinite().all()
    else:  # the row's quantile is NaN, as in diffusers; the other row is fine
        assert out.prev_sample[0].isnan().all() and out.prev_sample[1].isfinite().all()


# ---------------------------------------------------------------------------
# pipelines (tiny UNet, no download)
# ---------------------------------------------------------------------------
def _tiny_unet():
    torch.manual_seed(0)
    return diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                                 block_out_channels=(8, 16), norm_num_groups=4,
                                 down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D")).eval()


@pytest.mark.parametrize("pipe_cls,cls,kwargs", [(diffusers.DDPMPipeline, DDPMScheduler, {}),
                                                  (diffusers.DDIMPipeline, DDIMScheduler, dict(eta=0.5))])
def test_pipeline_end_to_end(pipe_cls, cls, kwargs):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny UNet: intra-op threads only add contention on a shared CPU
    try:
        _pipeline_end_to_end(pipe_cls, cls, kwargs)
    finally:
        torch.set_num_threads(threads)


def _pipeline_end_to_end(pipe_cls, cls, kwargs):
    unet = _tiny_unet()
    stock = pipe_cls(unet=unet, scheduler=STOCK[cls]())
    a = stock(batch_size=2, num_inference_steps=5, generator=torch.Generator().manual_seed(0), output_type="np",
              **kwargs).images
    patched = pipe_cls(unet=unet, scheduler=STOCK[cls]())
    patched.scheduler = cls.from_config(stock.scheduler.config)  # (DDIMPipeline.__init__ re-creates its scheduler)
    b = patched(batch_size=2, num_inference_steps=5, generator=torch.Generator().manual_seed(0), output_type="np",
                **kwargs).images
    assert abs(a - b).max() < 1e-4
    assert type(patched.scheduler) is cls


# ---------------------------------------------------------------------------
# GPU-only checks (run on a lent GPU)
# ---------------------------------------------------------------------------
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
GPU_CASES = [(DDIMScheduler, dict(), dict(eta=0.0)), (DDIMScheduler, dict(thresholding=True), dict(eta=0.5)),
             (DDPMScheduler, dict(), {}), (DDPMScheduler, dict(variance_type="learned_range"), {})]


def _gpu_model(x, t, learned):
    return model(x, t.float() if isinstance(t, torch.Tensor) else t, learned)


@pytest.mark.cuda
@CUDA
@pytest.mark.parametrize("cls,config,kwargs", GPU_CASES)
def test_cuda_no_host_sync_and_matches_stock(cls, config, kwargs):
    fused, stock = cls(**config), STOCK[cls](**config)
    fused.set_timesteps(10, device="cuda")
    stock.set_timesteps(10, device="cuda")
    learned = config.get("variance_type", "").startswith("learned")
    x = torch.randn(2, 4, 16, 16, device="cuda")
    xs = x.clone()
    t0 = fused.timesteps[0]
    fused.step(_gpu_model(x, t0, learned), t0, x, **kwargs)  # table uploads (pinned, async) before the check
    torch.cuda.synchronize()
    g1 = torch.Generator("cuda").manual_seed(0)
    g2 = torch.Generator("cuda").manual_seed(0)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for t in fused.timesteps:
            x = fused.step(_gpu_model(x, t, learned), t, x, generator=g1, **kwargs).prev_sample
    finally:
        torch.cuda.set_sync_debug_mode(0)
    for t in stock.timesteps:
        xs = stock.step(_gpu_model(xs, t, learned), t, xs, generator=g2, **kwargs).prev_sample
    close(x.cpu(), xs.cpu(), 1e-4)


@pytest.mark.cuda
@CUDA
@pytest.mark.parametrize("cls,config,kwargs", GPU_CASES[:3])
def test_cuda_graph_capture(cls, config, kwargs):
    s = cls(**config)
    s.set_timesteps(10, device="cuda")
    x = torch.randn(2, 4, 16, 16, device="cuda")
    t_buf = s.timesteps[:1].clone()
    static_x = x.clone()
    kwargs = dict(kwargs)
    s.step(model(static_x, t_buf), t_buf, static_x, **kwargs)  # warm up (tables, launchers)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        s.step(model(static_x, t_buf), t_buf, static_x, **kwargs)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = s.step(model(static_x, t_buf), t_buf, static_x, **kwargs).prev_sample
    eager = x.clone()
    for t in s.timesteps:
        eager = s.step(model(eager, t), t, eager, **kwargs).prev_sample
    static_x.copy_(x)
    for t in s.timesteps:
        t_buf.copy_(t.view(1))
        graph.replay()
        static_x.copy_(static_out)
    if kwargs.get("eta", 1) == 0.0:
        close(static_x.cpu(), eager.cpu(), 1e-5)
    else:
        assert static_x.isfinite().all()


@pytest.mark.cuda
@CUDA
def test_cuda_torch_compile_fullgraph():
    s = DDIMScheduler()
    s.set_timesteps(10, device="cuda")
    x = torch.randn(2, 4, 16, 16, device="cuda")

    @torch.compile(fullgraph=True)
    def step(x, t):
        return s.step(model(x, t), t, x).prev_sample

    ref = x.clone()
    for t in s.timesteps:
        x = step(x, t)
        ref = s.step(model(ref, t), t, ref).prev_sample
    close(x.cpu(), ref.cpu(), 1e-5)
