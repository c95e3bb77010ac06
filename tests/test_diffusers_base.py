"""pygen.diffusers common behaviour (base mixin, patch/unpatch), on the fused EulerDiscreteScheduler:
config round-trips with the stock class, sync-free step index, per-row timesteps, threads."""
import threading

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
import pygen.diffusers as PD  # noqa: E402


def model(x, t):
    return torch.tanh(x) * 0.7 + 0.01 * torch.as_tensor(t, dtype=x.dtype).reshape(-1, *([1] * (x.dim() - 1)))


def run(s, x, steps=10):
    s.set_timesteps(steps)
    for t in s.timesteps:
        x = s.step(model(s.scale_model_input(x, t), t), t, x).prev_sample
    return x


def test_config_round_trip(tmp_path):
    fused = PD.EulerDiscreteScheduler(prediction_type="v_prediction", use_karras_sigmas=True)
    fused.save_pretrained(tmp_path / "a")
    stock = diffusers.EulerDiscreteScheduler.from_pretrained(tmp_path / "a")
    assert stock.config.prediction_type == "v_prediction" and stock.config.use_karras_sigmas
    stock.save_pretrained(tmp_path / "b")
    again = PD.EulerDiscreteScheduler.from_pretrained(tmp_path / "b")
    def public(c):
        return {k: v for k, v in dict(c).items() if not k.startswith("_")}

    assert type(again) is PD.EulerDiscreteScheduler and public(again.config) == public(fused.config)
    assert type(PD.EulerDiscreteScheduler.from_config(stock.config)) is PD.EulerDiscreteScheduler
    assert diffusers.EulerDiscreteScheduler in [type(c) if not isinstance(c, type) else c for c in stock.compatibles]
    assert len(fused) == fused.config.num_train_timesteps


def test_matches_stock_and_step_index():
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0)) * 14.6
    a, b = diffusers.EulerDiscreteScheduler(), PD.EulerDiscreteScheduler()
    ra, rb = run(a, x.clone()), run(b, x.clone())
    assert ((ra - rb).norm() / ra.norm()).item() < 1e-5
    assert a.step_index == b.step_index == 10


def test_begin_index_mid_schedule():
    x = torch.randn(2, 6, generator=torch.Generator().manual_seed(1)) * 5.0
    outs = []
    for cls in (diffusers.EulerDiscreteScheduler, PD.EulerDiscreteScheduler):
        s = cls()
        s.set_timesteps(12)
        s.set_begin_index(5)
        y = x.clone()
        for t in s.timesteps[5:]:
            y = s.step(model(s.scale_model_input(y, t), t), t, y).prev_sample
        outs.append(y)
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)


def test_first_step_found_from_timestep_without_begin_index():
    """Starting at the 4th timestep with no begin_index: found on the device from the timestep value."""
    x = torch.randn(3, 5, generator=torch.Generator().manual_seed(2)) * 3.0
    outs = []
    for cls in (diffusers.EulerDiscreteScheduler, PD.EulerDiscreteScheduler):
        s = cls()
        s.set_timesteps(10)
        y = x.clone()
        for t in s.timesteps[3:]:
            y = s.step(model(s.scale_model_input(y, t), t), t, y).prev_sample
        outs.append(y)
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)


def test_per_row_timesteps_equal_rows_run_alone():
    """A batch whose rows sit at different timesteps: each row as if it ran alone."""
    s = PD.EulerDiscreteScheduler()
    s.set_timesteps(10)
    ts = s.timesteps
    x = torch.randn(3, 7, generator=torch.Generator().manual_seed(3)) * 4.0
    starts = [0, 2, 5]
    t_rows = torch.stack([ts[i] for i in starts])
    out = s.step(model(x, t_rows), t_rows, x).prev_sample
    for r, i in enumerate(starts):
        alone = PD.EulerDiscreteScheduler()
        alone.set_timesteps(10)
        alone.set_begin_index(i)
        want = alone.step(model(x[r:r + 1], ts[i]), ts[i], x[r:r + 1]).prev_sample
        torch.testing.assert_close(out[r:r + 1], want, rtol=1e-6, atol=1e-6)
    assert s.step_index == [1, 3, 6]


def test_two_threads_do_not_interfere():
    x = torch.randn(2, 9, generator=torch.Generator().manual_seed(4)) * 10.0
    want = run(PD.EulerDiscreteScheduler(), x.clone(), 15)
    want_k = run(PD.EulerDiscreteScheduler(use_karras_sigmas=True), x.clone(), 7)
    results = {}

    def work(name, sched, steps):
        for _ in range(5):
            results.setdefault(name, []).append(run(sched, x.clone(), steps))

    threads = [threading.Thread(target=work, args=("a", PD.EulerDiscreteScheduler(), 15)),
               threading.Thread(target=work, args=("b", PD.EulerDiscreteScheduler(use_karras_sigmas=True), 7))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert all(torch.equal(r, want) for r in results["a"])
    assert all(torch.equal(r, want_k) for r in results["b"])


def test_step_before_set_timesteps():
    s = PD.EulerDiscreteScheduler()
    with pytest.raises(ValueError, match="set_timesteps"):
        s.step(torch.zeros(1, 2), torch.tensor(999.0), torch.zeros(1, 2))


def test_noise_mode_config_key(tmp_path):
    s = PD.EulerDiscreteScheduler()
    s.register_to_config(pygen_noise="bogus")
    s.set_timesteps(4)
    with pytest.raises(ValueError, match="pygen_noise"):
        s._pygen_noise(torch.zeros(1), None)
    s.register_to_config(pygen_noise="philox")
    s.save_pretrained(tmp_path)
    assert diffusers.EulerDiscreteScheduler.from_pretrained(tmp_path).config.num_train_timesteps == 1000


def test_patch_and_unpatch():
    class Pipe(diffusers.DiffusionPipeline):
        def __init__(self, scheduler):
            super().__init__()
            self.register_modules(scheduler=scheduler)

    stock = diffusers.EulerDiscreteScheduler(use_karras_sigmas=True)
    pipe = Pipe(stock)
    assert PD.patch(pipe) is pipe
    assert isinstance(pipe.scheduler, PD.EulerDiscreteScheduler)
    assert {k: v for k, v in pipe.scheduler.config.items() if not k.startswith("_")} == \
        {k: v for k, v in stock.config.items() if not k.startswith("_")}
    assert PD.patch(pipe) is pipe and isinstance(pipe.scheduler, PD.EulerDiscreteScheduler)  # idempotent
    assert PD.unpatch(pipe).scheduler is stock
    other = Pipe(diffusers.PNDMScheduler())
    with pytest.warns(UserWarning, match="no fused PNDMScheduler"):
        PD.patch(other)
    assert isinstance(other.scheduler, diffusers.PNDMScheduler)
    with pytest.raises(TypeError, match="scheduler"):
        PD.patch(object())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_loop_has_no_host_sync():
    s = PD.EulerDiscreteScheduler()
    s.set_timesteps(20, device="cuda")
    x = torch.randn(2, 4, 32, 32, device="cuda") * s.init_noise_sigma
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for t in s.timesteps:
            x = s.step(model(s.scale_model_input(x, t), t), t, x).prev_sample
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(x).all()


@pytest.mark.parametrize("pred", [True, False], ids=["both", "prev_only"])
def test_fast_output_equals_the_dataclass(pred):
    """fast_output (the per-step output object built without BaseOutput.__post_init__) is
    indistinguishable from calling the class: type, attributes, keys, items, tuple, pickling."""
    import pickle

    from diffusers.schedulers.scheduling_euler_discrete import EulerDiscreteSchedulerOutput
    from diffusers.schedulers.scheduling_utils import SchedulerOutput

    from pygen.diffusers._base import fast_output

    a, b = torch.randn(2, 3), torch.randn(2, 3)
    for cls, kw in [(EulerDiscreteSchedulerOutput, dict(prev_sample=a, pred_original_sample=b if pred else None)),
                    (SchedulerOutput, dict(prev_sample=a))]:
        want, got = cls(**kw), fast_output(cls, **kw)
        assert type(got) is cls
        assert list(got.keys()) == list(want.keys())
        assert all(got[k] is want[k] for k in want.keys())
        assert got.to_tuple() == want.to_tuple() and got[0] is a
        for name in kw:
            assert getattr(got, name) is kw[name]
        back = pickle.loads(pickle.dumps(got))
        assert type(back) is cls and list(back.keys()) == list(want.keys())
        torch.testing.assert_close(back.prev_sample, a)


ALL = ("DDPMScheduler", "DDIMScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
       "HeunDiscreteScheduler", "DPMSolverMultistepScheduler", "LMSDiscreteScheduler", "UniPCMultistepScheduler",
       "FlowMatchEulerDiscreteScheduler")


@pytest.mark.parametrize("name", ALL)
def test_set_timesteps_signature_and_optional_methods_as_stock(name):
    """diffusers' pipelines read set_timesteps' signature to decide whether timesteps= / sigmas= may be
    passed (retrieve_timesteps); hasattr(scheduler, "add_noise") is what stock answers."""
    import inspect

    fused, stock = getattr(PD, name), getattr(diffusers, name)
    assert inspect.signature(fused.set_timesteps) == inspect.signature(stock.set_timesteps)
    assert fused.set_timesteps.__doc__ == stock.set_timesteps.__doc__
    for attr in ("add_noise", "scale_noise", "set_begin_index"):
        assert hasattr(fused(), attr) == hasattr(stock(), attr), attr


FLOW_SIGMAS = [1.0, 0.8, 0.5, 0.25, 0.1]


@pytest.mark.parametrize("name,cfg,kw", [
    ("EulerDiscreteScheduler", {}, dict(sigmas=[14.6, 7.0, 3.0, 1.0, 0.3])),
    ("EulerDiscreteScheduler", {}, dict(timesteps=[999, 800, 500, 200, 10])),
    ("DPMSolverMultistepScheduler", {}, dict(timesteps=[999, 800, 500, 200, 10])),
    ("UniPCMultistepScheduler", dict(use_flow_sigmas=True, prediction_type="flow_prediction"),
     dict(sigmas=np.array(FLOW_SIGMAS))),  # (stock UniPC multiplies them: a list fails there too)
    ("FlowMatchEulerDiscreteScheduler", {}, dict(sigmas=FLOW_SIGMAS))])
def test_pipeline_retrieve_timesteps_accepts_custom_schedules(name, cfg, kw):
    """What a pipeline does with pipe(sigmas=...) / pipe(timesteps=...): stock's retrieve_timesteps
    refused the fused classes when set_timesteps hid its parameters behind *args, **kwargs."""
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps

    got = retrieve_timesteps(getattr(PD, name)(**cfg), device="cpu", **kw)
    want = retrieve_timesteps(getattr(diffusers, name)(**cfg), device="cpu", **kw)
    assert got[1] == want[1]
    torch.testing.assert_close(got[0], want[0])


@pytest.mark.parametrize("name", ALL)
def test_noise_free_run_leaves_torch_rng_as_stock(name):
    """set_timesteps and a noise-free loop draw nothing from torch's global RNG (stock draws nothing
    either), so a pipeline seeded with torch.manual_seed alone gets stock's latents and result.
    Schedules with in-kernel noise draw their Philox key at set_timesteps (one default_seed())."""
    kw = {"eta": 0.0} if name == "DDIMScheduler" else {}
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(3))
    s = getattr(PD, name)()
    state = torch.get_rng_state()
    s.set_timesteps(4)
    if name in ("DDPMScheduler", "EulerAncestralDiscreteScheduler"):  # noise at every step
        from pygen.kdiffusion import default_seed

        torch.set_rng_state(state)
        assert s._pygen_seed == default_seed()  # drawn at set_timesteps, outside the loop
        generator_mode = getattr(PD, name).from_config(s.config, pygen_noise="generator")
        torch.set_rng_state(state)
        generator_mode.set_timesteps(4)
        assert torch.equal(torch.get_rng_state(), state), "pygen_noise='generator' drew a Philox key"
        return
    assert torch.equal(torch.get_rng_state(), state), "set_timesteps drew from torch's RNG"
    for t in s.timesteps:
        x_in = s.scale_model_input(x, t) if hasattr(s, "scale_model_input") else x
        x = s.step(model(x_in, t), t, x, **kw).prev_sample
    assert torch.equal(torch.get_rng_state(), state), "a noise-free step drew from torch's RNG"


def test_ddim_eta_key_drawn_at_first_noisy_step_from_torch_rng():
    """DDIM's set_timesteps table is eta = 0 (noise-free): the Philox key is drawn from torch's RNG
    at the first step with eta > 0 (in-kernel noise), the same key after the same torch.manual_seed."""
    from pygen.kdiffusion import default_seed

    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(4))
    runs = []
    for _ in range(2):
        s = PD.DDIMScheduler()
        torch.manual_seed(11)
        s.set_timesteps(5)
        assert s._pygen_seed is None
        y = x.clone()
        for t in s.timesteps:
            y = s.step(model(y, t), t, y, eta=1.0).prev_sample
        runs.append((y, s._pygen_seed))
    torch.manual_seed(11)
    assert runs[0][1] == runs[1][1] == default_seed()  # one draw, at the first eta > 0 step
    assert torch.equal(runs[0][0], runs[1][0])


@pytest.mark.parametrize("name", ["EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler",
                                  "LMSDiscreteScheduler", "FlowMatchEulerDiscreteScheduler", "DDPMScheduler"])
def test_timestep_not_in_schedule_raises(name):
    """Stock raises IndexError (an empty nonzero()); the fused class raises a ValueError that is also an
    IndexError, with a message, when the timestep is known on the host (no device read needed)."""
    s = getattr(PD, name)()
    s.set_timesteps(5)
    x = torch.randn(1, 2, 3, 3)
    missing = 501 if name == "DDPMScheduler" else 12345.0  # (DDPM: a training timestep off the schedule)
    for t in (missing, torch.tensor(missing)):
        with pytest.raises(ValueError, match="not in .*timesteps") as info:
            s.step(x, t, x)
        assert isinstance(info.value, IndexError)
        with pytest.raises(IndexError):
            stock = getattr(diffusers, name)()
            stock.set_timesteps(5)
            stock.step(x, t, x)


@pytest.mark.parametrize("name", ["DPMSolverMultistepScheduler", "UniPCMultistepScheduler"])
@pytest.mark.parametrize("how", ["number", "cpu_tensor", "per_row"])
def test_timestep_not_in_schedule_is_last_step_as_stock(name, how):
    """Stock DPM-Solver / UniPC take a timestep missing from self.timesteps as the last step."""
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(5))
    m = model(x, 0.5)
    stock = getattr(diffusers, name)()
    stock.set_timesteps(6)
    want = stock.step(m, 7, x).prev_sample
    fused = getattr(PD, name)()
    fused.set_timesteps(6)
    t = {"number": 7, "cpu_tensor": torch.tensor(7), "per_row": torch.tensor([7, 7])}[how]
    got = fused.step(m, t, x).prev_sample
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_noise_mode_from_config_and_reload(tmp_path, caplog):
    stock = diffusers.EulerAncestralDiscreteScheduler()
    s = PD.EulerAncestralDiscreteScheduler.from_config(stock.config, pygen_noise="philox")
    assert s.config.pygen_noise == "philox" and s._pygen_noise_mode() == "philox"
    with pytest.raises(ValueError, match="pygen_noise"):
        PD.EulerAncestralDiscreteScheduler.from_config(stock.config, pygen_noise="bogus")
    s.save_pretrained(tmp_path)
    import logging

    with caplog.at_level(logging.WARNING):
        again = PD.EulerAncestralDiscreteScheduler.from_pretrained(tmp_path)
    assert again.config.pygen_noise == "philox"
    assert "not expected" not in caplog.text
    assert diffusers.EulerAncestralDiscreteScheduler.from_pretrained(tmp_path).config.num_train_timesteps == 1000
    # from_config of the pygen config without the keyword keeps it; the keyword overrides it
    assert PD.DDPMScheduler.from_config(again.config).config.pygen_noise == "philox"
    assert PD.DDPMScheduler.from_config(again.config, pygen_noise="generator").config.pygen_noise == "generator"


@pytest.mark.parametrize("name,offset", [("EulerDiscreteScheduler", 1e-5), ("DPMSolverMultistepScheduler", 1e-5),
                                         ("UniPCMultistepScheduler", 0.25)])
def test_first_timestep_matched_with_stocks_type_promotion(name, offset):
    """A first timestep equal to one of self.timesteps only after stock's type promotion (a float a hair
    off a float32 timestep; a float against int64 timesteps) is found where stock finds it."""
    x = torch.randn(1, 2, 3, 3, generator=torch.Generator().manual_seed(9))
    m = model(x, 0.3)
    stock, fused = getattr(diffusers, name)(), getattr(PD, name)()
    for s in (stock, fused):
        s.set_timesteps(5)
    t = float(stock.timesteps[1]) + offset
    want = stock.step(m, t, x).prev_sample
    got = fused.step(m, t, x).prev_sample
    assert fused.step_index == stock.step_index
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_user_subclass_overriding_set_timesteps_is_kept():
    """A user subclass's set_timesteps override (calling super()) stays in force for its own
    subclasses; the fused tables are still built."""
    import inspect

    calls = []

    class Mine(PD.EulerDiscreteScheduler):
        def set_timesteps(self, *args, **kwargs):
            calls.append("mine")
            return super().set_timesteps(*args, **kwargs)

    class Below(Mine):
        pass

    class Plain(PD.EulerDiscreteScheduler):
        pass

    s = Below()
    s.set_timesteps(5)
    assert calls == ["mine"] and s._pygen_table64 is not None
    assert inspect.signature(Plain.set_timesteps) == inspect.signature(diffusers.EulerDiscreteScheduler.set_timesteps)
    p = Plain()
    p.set_timesteps(5)
    assert p._pygen_table64 is not None


def test_ddim_takes_any_timestep_as_stock():
    """DDIM's step depends on the timestep value only: stock takes one that is not in self.timesteps."""
    x = torch.randn(1, 2, 3, 3, generator=torch.Generator().manual_seed(2))
    m = model(x, 0.1)
    stock, fused = diffusers.DDIMScheduler(), PD.DDIMScheduler()
    for s in (stock, fused):
        s.set_timesteps(5)
    torch.testing.assert_close(fused.step(m, 501, x).prev_sample, stock.step(m, 501, x).prev_sample,
                               rtol=1e-5, atol=1e-5)
