"""pygen.diffusers common behaviour (base mixin, patch/unpatch), on the fused EulerDiscreteScheduler:
config round-trips with the stock class, sync-free step index, per-row timesteps, threads."""
import threading

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
