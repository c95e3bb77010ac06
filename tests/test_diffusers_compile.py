"""pygen.diffusers under torch.compile(fullgraph=True), a CPU check that the denoising loop does no
host sync (as CUDA would see it), and (GPU only) CUDA-graph capture of model + step.

- compile: ``denoise(x, t) = step(model(scale_model_input(x, t), t), t, x)`` compiled with
  ``fullgraph=True, dynamic=False`` runs a whole loop equal to the eager loop; the number of
  compiled graphs is bounded independently of the number of steps (first call, then one per value
  of the host-side ``lower_order_nums`` of multistep schedulers, then none).
- no host sync: the loop after ``set_timesteps`` runs under a TorchDispatchMode that fails on aten
  ops that read device data on the host (``.item()``, ``bool(tensor)``, nonzero, equal, boolean
  indexing, unique, ...) and with ``Tensor.tolist/numpy`` patched to fail. On the CPU nothing
  syncs, but these are the calls that would sync on CUDA.
"""
import inspect

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("scipy")

import pygen  # noqa: E402
from pygen.diffusers import SCHEDULERS  # noqa: E402
from pygen.diffusers.ddim import DDIMScheduler  # noqa: E402
from pygen.diffusers.ddpm import DDPMScheduler  # noqa: E402
from pygen.diffusers.dpmsolver import DPMSolverMultistepScheduler  # noqa: E402
from pygen.diffusers.euler import EulerDiscreteScheduler  # noqa: E402
from pygen.diffusers.euler_ancestral import EulerAncestralDiscreteScheduler  # noqa: E402
from pygen.diffusers.flow_match import FlowMatchEulerDiscreteScheduler  # noqa: E402
from pygen.diffusers.heun import HeunDiscreteScheduler  # noqa: E402
from pygen.diffusers.lms import LMSDiscreteScheduler  # noqa: E402
from pygen.diffusers.unipc import UniPCMultistepScheduler  # noqa: E402

SHAPE = (2, 3, 5)
STEPS = 8


def model(x, t):
    """Synthetic denoiser (t: a 0-d tensor from scheduler.timesteps, or 1-D per row)."""
    t = t.to(torch.float32).reshape((-1,) + (1,) * (x.dim() - 1))
    return (torch.tanh(x.float()) * 0.7 + 3e-4 * t).to(x.dtype)


def model_input(s, x, t):
    return s.scale_model_input(x, t) if hasattr(s, "scale_model_input") else x  # FlowMatch has none


def make_denoise(s, **stepkw):
    def denoise(x, t):
        return s.step(model(model_input(s, x, t), t), t, x, return_dict=False, **stepkw)[0]

    return denoise


def fresh(cls, cfg, steps=STEPS, **set_kw):
    torch.manual_seed(0)  # the in-kernel Philox key is drawn from torch's RNG at set_timesteps
    cfg = dict(cfg)
    noise = cfg.pop("pygen_noise", None)  # (a from_config keyword, not a constructor argument)
    s = cls(**cfg) if noise is None else cls.from_config(cls(**cfg).config, pygen_noise=noise)
    s.set_timesteps(steps, **set_kw)
    return s


def start(s):
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    return x * float(getattr(s, "init_noise_sigma", 1.0))


def run_loop(fn, s, x):
    for t in s.timesteps:
        x = fn(x, t)
    return x


def seeded_loop(fn, s, seed):
    """``run_loop`` from ``start(s)`` with torch's RNG seeded first: a Philox key drawn at the first
    noisy step (DDIM with eta > 0) or noise drawn from torch's RNG is then the same in both loops."""
    torch.manual_seed(seed)
    return run_loop(fn, s, start(s))


# ---------------------------------------------------------------------------
# torch.compile(fullgraph=True)
# ---------------------------------------------------------------------------
# (id, class, config, backend, most graphs one loop may compile[, options]); options: "step" (step()
# keyword arguments), "regraphs" (graphs the loop after the first set_timesteps may add: UniPC's
# stock ``timestep_list`` is not reset by set_timesteps, and the first loop's graphs guard on its
# entries being None; the loops after that add none)
COMPILE_CASES = [
    ("euler", EulerDiscreteScheduler, {}, "aot_eager", 2),
    ("euler-karras-v", EulerDiscreteScheduler, dict(use_karras_sigmas=True, prediction_type="v_prediction"),
     "aot_eager", 2),
    ("euler_a-philox", EulerAncestralDiscreteScheduler, {}, "inductor", 2),
    ("euler_a-philox-aot", EulerAncestralDiscreteScheduler, {}, "aot_eager", 2),
    ("dpmpp2m", DPMSolverMultistepScheduler, dict(solver_order=2), "aot_eager", 4),
    ("dpmpp3m-sde-philox", DPMSolverMultistepScheduler, dict(solver_order=3, algorithm_type="sde-dpmsolver++"),
     "aot_eager", 5),
    ("dpm-threshold", DPMSolverMultistepScheduler, dict(thresholding=True, prediction_type="v_prediction"),
     "aot_eager", 4),
    ("flow", FlowMatchEulerDiscreteScheduler, {}, "aot_eager", 2),
    ("flow-stochastic-philox", FlowMatchEulerDiscreteScheduler, dict(stochastic_sampling=True), "aot_eager", 2),
    ("heun", HeunDiscreteScheduler, {}, "aot_eager", 3),
    ("lms", LMSDiscreteScheduler, {}, "aot_eager", 2),
    # DDPM / DDIM: tables indexed by the timestep value (the step index is computed from t)
    ("ddpm-philox", DDPMScheduler, {}, "aot_eager", 1),
    ("ddpm-philox-inductor", DDPMScheduler, {}, "inductor", 1),
    ("ddpm-threshold-v", DDPMScheduler, dict(thresholding=True, prediction_type="v_prediction"), "aot_eager", 1),
    # explicit noise (torch.randn from the global RNG, traced): launches with the noise-free key 0
    ("ddpm-generator-noise", DDPMScheduler, dict(pygen_noise="generator", clip_sample=False), "aot_eager", 1),
    ("ddim", DDIMScheduler, dict(clip_sample=False), "aot_eager", 1),
    ("ddim-clip", DDIMScheduler, {}, "aot_eager", 1),  # default: the raw-eps term through history
    ("ddim-threshold", DDIMScheduler, dict(thresholding=True), "aot_eager", 1),
    # a new eta: its table is built in the first graph and cached, the second graph reads it
    ("ddim-eta-philox", DDIMScheduler, {}, "aot_eager", 2, dict(step=dict(eta=0.5))),
    ("ddim-threshold-eta-philox", DDIMScheduler, dict(thresholding=True, prediction_type="v_prediction"),
     "aot_eager", 2, dict(step=dict(eta=1.0, use_clipped_model_output=True))),
    ("unipc", UniPCMultistepScheduler, {}, "aot_eager", 3, dict(regraphs=1)),
    ("unipc3-threshold", UniPCMultistepScheduler, dict(solver_order=3, thresholding=True), "aot_eager", 4,
     dict(regraphs=2)),
]


@pytest.fixture
def dynamo_reset():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("case", COMPILE_CASES, ids=[c[0] for c in COMPILE_CASES])
def test_compiled_loop_matches_eager(case, dynamo_reset):
    from torch._dynamo.testing import CompileCounterWithBackend

    _, cls, cfg, backend, max_graphs, *opts = case
    opts = opts[0] if opts else {}
    stepkw = opts.get("step", {})
    eager_s = fresh(cls, cfg)
    want = seeded_loop(make_denoise(eager_s, **stepkw), eager_s, 10)

    s = fresh(cls, cfg)
    counter = CompileCounterWithBackend(backend)
    fn = torch.compile(make_denoise(s, **stepkw), backend=counter, fullgraph=True, dynamic=False)
    got = seeded_loop(fn, s, 10)
    assert torch.isfinite(want).all()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # bounded: no recompilation per step (STEPS > max_graphs), whatever the step index
    assert 1 <= counter.frame_count <= max_graphs < STEPS
    # loops after set_timesteps (new tables, new Philox key) reuse the graphs, equal to eager
    compiled = counter.frame_count
    for k in (1, 2):
        torch.manual_seed(k)
        s.set_timesteps(STEPS)
        torch.manual_seed(k)
        eager_s.set_timesteps(STEPS)
        want2 = seeded_loop(make_denoise(eager_s, **stepkw), eager_s, 10 + k)
        got2 = seeded_loop(fn, s, 10 + k)
        torch.testing.assert_close(got2, want2, rtol=1e-5, atol=1e-5)
        assert counter.frame_count == compiled + opts.get("regraphs", 0), k


def test_compiled_loop_honours_begin_index(dynamo_reset):
    """img2img: set_begin_index, then a compiled loop over the tail of the schedule."""
    res = []
    for compiled in (False, True):
        s = fresh(EulerAncestralDiscreteScheduler, {})
        s.set_begin_index(3)
        fn = make_denoise(s)
        if compiled:
            fn = torch.compile(fn, backend="aot_eager", fullgraph=True, dynamic=False)
        x = start(s)
        for t in s.timesteps[3:]:
            x = fn(x, t)
        res.append(x)
    torch.testing.assert_close(res[1], res[0], rtol=1e-5, atol=1e-5)


def test_compiled_step_per_row_timesteps(dynamo_reset):
    """A 1-D timestep (one per batch row) traces too; rows at different steps."""
    res = []
    for compiled in (False, True):
        s = fresh(EulerDiscreteScheduler, {})
        fn = make_denoise(s)
        if compiled:
            fn = torch.compile(fn, backend="aot_eager", fullgraph=True, dynamic=False)
        x = start(s)
        for k in range(4):
            x = fn(x, torch.stack([s.timesteps[k], s.timesteps[k + 2]]))
        res.append(x)
    torch.testing.assert_close(res[1], res[0], rtol=1e-5, atol=1e-5)


# (class, config, step kwargs, backend): eager steps first, then the compiled step traced at a later
# timestep. The step index of DDPM/DDIM comes from the timestep tensor, ``self.timesteps[k]`` (a
# view at storage offset k); the op declares its index and history mutated, and a mutated view of a
# graph input is regenerated with the trace-time offset (aot_eager; Inductor even through a clone).
WARMUP_CASES = [
    (DDIMScheduler, {}, {}, "aot_eager"),
    (DDIMScheduler, {}, {}, "inductor"),
    (DDIMScheduler, dict(thresholding=True), dict(eta=0.7), "aot_eager"),
    (DDPMScheduler, {}, {}, "aot_eager"),
]


@pytest.mark.parametrize("cls,cfg,stepkw,backend", WARMUP_CASES,
                         ids=[f"{c.__name__}-{cfg}-{kw}-{b}" for c, cfg, kw, b in WARMUP_CASES])
def test_compiled_timestep_tables_after_eager_steps(cls, cfg, stepkw, backend, dynamo_reset):
    res = []
    for compiled in (False, True):
        s = fresh(cls, cfg)
        torch.manual_seed(4)
        eager = make_denoise(s, **stepkw)
        fn = torch.compile(eager, backend=backend, fullgraph=True, dynamic=False) if compiled else eager
        x = start(s)
        for k, t in enumerate(s.timesteps):
            x = (eager if k < 2 else fn)(x, t)
        res.append(x)
    assert torch.isfinite(res[0]).all()
    torch.testing.assert_close(res[1], res[0], rtol=1e-5, atol=1e-5)


def test_compiled_ddim_step_with_model_output_views(dynamo_reset):
    """The step alone compiled, model_output a view of a graph input at a new storage offset each call
    (DDIM passes it as the raw-eps history too): the compiled step reads this call's data."""
    res = []
    for compiled in (False, True):
        s = fresh(DDIMScheduler, {})

        def step(mo, t, x):
            return s.step(mo, t, x, return_dict=False)[0]

        fn = torch.compile(step, backend="aot_eager", fullgraph=True, dynamic=False) if compiled else step
        x = start(s)
        for k, t in enumerate(s.timesteps):
            mo = model(x, t)
            outs = [mo + 9.0, mo - 5.0]
            outs.insert(k % 3, mo)
            x = fn(torch.stack(outs)[k % 3], t, x)
        res.append(x)
    torch.testing.assert_close(res[1], res[0], rtol=1e-5, atol=1e-5)


def test_compiled_step_on_triton_backend(dynamo_reset):
    """With the Triton backend selected, the traced step is the ``pygen::sampler_step_out_triton`` op."""
    from conftest import require_backend

    require_backend("triton")
    with pygen.use_backend("triton"):
        eager_s = fresh(EulerDiscreteScheduler, {}, steps=3)
        want = run_loop(make_denoise(eager_s), eager_s, start(eager_s))
        s = fresh(EulerDiscreteScheduler, {}, steps=3)
        fn = torch.compile(make_denoise(s), backend="aot_eager", fullgraph=True, dynamic=False)
        got = run_loop(fn, s, start(s))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------
# no host sync (the calls that would sync on CUDA), on the CPU
# ---------------------------------------------------------------------------
_aten = torch.ops.aten
_HOST_READS = {
    _aten._local_scalar_dense.default,  # .item(), int()/float() of a tensor
    _aten.is_nonzero.default,           # bool(tensor), `if tensor:`
    _aten.nonzero.default,
    _aten.equal.default,
    _aten.masked_select.default,
    _aten._unique.default,
    _aten._unique2.default,
    _aten.unique_dim.default,
    _aten.unique_consecutive.default,
    _aten.repeat_interleave.Tensor,
    _aten.bincount.default,
}


class HostSyncError(AssertionError):
    pass


class NoHostReads(TorchDispatchMode):
    """Fails on aten ops that copy device data to the host (they sync on CUDA), and on boolean-mask
    indexing (which runs nonzero inside)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _HOST_READS:
            raise HostSyncError(f"{func} reads device data on the host (a sync on CUDA)")
        if func in (_aten.index.Tensor, _aten.index_put.default, _aten.index_put_.default):
            for ix in args[1]:
                if isinstance(ix, torch.Tensor) and ix.dtype == torch.bool:
                    raise HostSyncError(f"{func} with a boolean mask runs nonzero (a sync on CUDA)")
        return func(*args, **kwargs)


def _fail(name):
    def method(self, *args, **kwargs):
        raise HostSyncError(f"Tensor.{name}() copies device data to the host (a sync on CUDA)")

    return method


@pytest.fixture
def no_host_reads(monkeypatch):
    """Context manager factory: dispatch mode + Tensor.tolist/numpy/__array__ made to fail."""

    class Guard:
        def __enter__(self):
            for name in ("tolist", "numpy", "__array__"):
                monkeypatch.setattr(torch.Tensor, name, _fail(name))
            self.mode = NoHostReads()
            self.mode.__enter__()
            return self

        def __exit__(self, *exc):
            self.mode.__exit__(*exc)
            monkeypatch.undo()
            return False

    return Guard


def _accepts(s, name):
    return name in inspect.signature(s.step).parameters


SYNC_CASES = [(name, {}) for name in sorted(SCHEDULERS)] + [
    ("EulerDiscreteScheduler", dict(use_karras_sigmas=True)),
    ("EulerDiscreteScheduler", dict(prediction_type="v_prediction", timestep_spacing="trailing")),
    ("EulerDiscreteScheduler", dict(use_beta_sigmas=True, final_sigmas_type="zero")),
    ("EulerAncestralDiscreteScheduler", dict(prediction_type="v_prediction")),
    ("HeunDiscreteScheduler", dict(use_exponential_sigmas=True, prediction_type="sample")),
    ("LMSDiscreteScheduler", dict(use_karras_sigmas=True)),
    ("DPMSolverMultistepScheduler", dict(thresholding=True)),
    ("DPMSolverMultistepScheduler", dict(solver_order=3)),
    ("DPMSolverMultistepScheduler", dict(solver_order=3, algorithm_type="sde-dpmsolver++")),
    ("DPMSolverMultistepScheduler", dict(algorithm_type="sde-dpmsolver", use_karras_sigmas=True, final_sigmas_type="sigma_min")),
    ("DPMSolverMultistepScheduler", dict(algorithm_type="dpmsolver", solver_type="heun",
                                         prediction_type="v_prediction", final_sigmas_type="sigma_min")),
    ("FlowMatchEulerDiscreteScheduler", dict(stochastic_sampling=True)),
    ("FlowMatchEulerDiscreteScheduler", dict(use_karras_sigmas=True, shift=3.0)),
]


@pytest.mark.parametrize("generator", [False, True], ids=["philox", "generator"])
@pytest.mark.parametrize("name,cfg", SYNC_CASES, ids=[f"{n}-{c}" for n, c in SYNC_CASES])
def test_loop_has_no_host_reads(name, cfg, generator, no_host_reads):
    s = fresh(SCHEDULERS[name], cfg, steps=6)
    x = start(s)
    gen = torch.Generator().manual_seed(5)
    kw = {"generator": gen} if generator and _accepts(s, "generator") else {}
    ts = s.timesteps
    if name == "DDPMScheduler":
        # DDPM decides diffusers' "noise only when t > 0" rule on the host when the timestep is on
        # the CPU (free there, and it keeps a generator's state exactly as stock); with CUDA
        # timesteps it takes a device path instead (no host read; the cuda tests cover it). Python
        # ints exercise the CPU rule without a tensor read.
        step_ts = [int(t) for t in ts]
    else:
        step_ts = list(ts)
    with no_host_reads():
        for t, t_step in zip(ts, step_ts):
            x = s.step(model(model_input(s, x, t), t), t_step, x, **kw).prev_sample
    assert torch.isfinite(x).all()


def test_euler_churn_has_no_host_reads(no_host_reads):
    s = fresh(EulerDiscreteScheduler, {}, steps=6)
    x = start(s)
    # the first churned step builds the churn table from ``s.sigmas``, which diffusers keeps on the
    # CPU for this class (a host read, no device sync); the check covers the steps after it
    t = s.timesteps[0]
    x = s.step(model(s.scale_model_input(x, t), t), t, x, s_churn=0.5).prev_sample
    with no_host_reads():
        for t in s.timesteps[1:]:
            x = s.step(model(s.scale_model_input(x, t), t), t, x, s_churn=0.5,
                       generator=torch.Generator().manual_seed(1)).prev_sample
    assert torch.isfinite(x).all()


@pytest.mark.parametrize("name", ["EulerDiscreteScheduler", "DPMSolverMultistepScheduler",
                                  "FlowMatchEulerDiscreteScheduler"])
def test_per_row_and_begin_index_have_no_host_reads(name, no_host_reads):
    s = fresh(SCHEDULERS[name], {}, steps=8)
    x = start(s)
    s.set_begin_index(2)
    with no_host_reads():  # img2img: from step 2
        for t in s.timesteps[2:5]:
            x = s.step(model(model_input(s, x, t), t), t, x).prev_sample
    s = fresh(SCHEDULERS[name], {}, steps=8)
    with no_host_reads():  # per-row timesteps
        for k in range(3):
            t = torch.stack([s.timesteps[k], s.timesteps[k + 3]])
            x = s.step(model(model_input(s, x, t), t), t, x).prev_sample
    assert torch.isfinite(x).all()


def test_sync_check_can_fail(no_host_reads):
    """The check catches the usual culprits (so a passing check means something)."""
    s = fresh(EulerDiscreteScheduler, {}, steps=4)
    x = start(s)
    t = s.timesteps[0]
    x = s.step(model(s.scale_model_input(x, t), t), t, x).prev_sample
    for culprit in (lambda: s.step_index, lambda: x.sum().item(), lambda: bool(x.max() > 0),
                    lambda: x[x > 0], lambda: x.tolist(), lambda: (s.timesteps == t).nonzero()):
        with pytest.raises(HostSyncError):
            with no_host_reads():
                culprit()
    # the torch reference backend decides on the host whether a row draws noise (bool(any)):
    s = fresh(EulerAncestralDiscreteScheduler, {}, steps=4)
    with pygen.use_backend("torch"):
        with pytest.raises(HostSyncError):
            with no_host_reads():
                for t in s.timesteps:
                    x = s.step(model(s.scale_model_input(x, t), t), t, x).prev_sample


# ---------------------------------------------------------------------------
# GPU only
# ---------------------------------------------------------------------------
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _net(x, t):
    return torch.tanh(x) * 0.7 + 3e-4 * t.to(x.dtype)


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("cls,cfg,warmup", [
    (EulerDiscreteScheduler, {}, 1),
    (DPMSolverMultistepScheduler, dict(solver_order=2), 2),  # lower_order_nums saturates after 2 steps
])
def test_cuda_graph_replays_the_loop(cls, cfg, warmup):
    """Eager warm-up steps (find the device index, allocate history, saturate host counters), then
    capture one model+step iteration and replay it for the rest of the loop; equals eager."""
    steps = 10
    ref = fresh(cls, cfg, steps=steps, device="cuda")
    x0 = torch.randn((2, 4, 8, 8), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    x0 = x0 * float(ref.init_noise_sigma)
    want = x0.clone()
    for t in ref.timesteps:
        want = ref.step(_net(ref.scale_model_input(want, t), t), t, want).prev_sample

    s = fresh(cls, cfg, steps=steps, device="cuda")
    x = x0.clone()
    for t in s.timesteps[:warmup]:
        x = s.step(_net(s.scale_model_input(x, t), t), t, x).prev_sample
    static_x = x.clone()
    static_t = s.timesteps[warmup].clone()  # the model's t input: refreshed before each replay
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(side):
        with torch.cuda.graph(graph):  # recorded, not run: the device step index does not advance here
            static_out = s.step(_net(s.scale_model_input(static_x, static_t), static_t), static_t,
                                static_x).prev_sample
    torch.cuda.current_stream().wait_stream(side)
    for t in s.timesteps[warmup:]:
        static_t.copy_(t)
        graph.replay()  # the fused step advances the device index
        static_x.copy_(static_out)
    torch.cuda.synchronize()
    torch.testing.assert_close(static_x, want, rtol=1e-4, atol=1e-4)
    assert s.step_index == steps


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("cls,cfg", [(EulerAncestralDiscreteScheduler, {}), (DPMSolverMultistepScheduler, {})])
def test_cuda_compiled_loop_has_no_sync(cls, cfg, dynamo_reset):
    """torch.compile(fullgraph=True) on CUDA (inductor): equal to eager; the second loop (graphs
    compiled) runs under sync_debug_mode="error"."""
    ref = fresh(cls, cfg, device="cuda")
    x0 = torch.randn((2, 4, 8, 8), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    want = run_loop(make_denoise(ref), ref, x0 * float(ref.init_noise_sigma))
    s = fresh(cls, cfg, device="cuda")
    fn = torch.compile(make_denoise(s), fullgraph=True, dynamic=False)
    got = run_loop(fn, s, x0 * float(s.init_noise_sigma))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    s.set_timesteps(STEPS, device="cuda")
    x = x0 * float(s.init_noise_sigma)
    ts = list(s.timesteps)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for t in ts:
            x = fn(x, t)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(x).all()


ADD_NOISE_CLASSES = ["EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler",
                     "LMSDiscreteScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler"]


@pytest.mark.parametrize("name", ADD_NOISE_CLASSES)
def test_add_noise_matches_stock_without_host_reads(name, no_host_reads):
    """img2img (begin_index, before the first step), inpainting (after steps) and training
    (no begin_index: per-element timestep lookup) all equal stock's add_noise, with no op that
    would read device data on the host."""
    import diffusers as _d

    fused_cls = SCHEDULERS[name]
    stock_cls = getattr(_d, name)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 2, 4, 4, generator=g)
    noise = torch.randn(3, 2, 4, 4, generator=g)
    a, b = stock_cls(), fused_cls()
    a.set_timesteps(10)
    b.set_timesteps(10)
    # training-style: no begin index, one timestep per row (Heun repeats timesteps: second match)
    ts = torch.stack([a.timesteps[1], a.timesteps[4], a.timesteps[len(a.timesteps) - 1]])
    want = a.add_noise(x0, noise, ts)
    with no_host_reads():
        got = b.add_noise(x0, noise, ts)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    # img2img: begin index set, before the first step
    for s in (a, b):
        s.set_timesteps(10)
        s.set_begin_index(3)
    t3 = a.timesteps[3:4].repeat(3)
    want = a.add_noise(x0, noise, t3)
    with no_host_reads():
        got = b.add_noise(x0, noise, t3)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    # inpainting: after two steps
    xa = xb = x0 * 3.0
    for t in a.timesteps[3:5]:
        xa = a.step(torch.tanh(a.scale_model_input(xa, t)), t, xa).prev_sample
        xb = b.step(torch.tanh(b.scale_model_input(xb, t)), t, xb).prev_sample
    t5 = a.timesteps[5:6].repeat(3)
    want = a.add_noise(x0, noise, t5)
    with no_host_reads():
        got = b.add_noise(x0, noise, t5)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------
# device work per step: how many kernels a loop step launches
# ---------------------------------------------------------------------------
# aten ops that only make tensor metadata or allocate (no kernel on CUDA)
_NO_KERNEL = {"empty_like", "empty", "empty_strided", "view", "_unsafe_view", "reshape", "slice", "select",
              "expand", "as_strided", "alias", "detach", "promote_types", "unsqueeze", "squeeze", "t",
              "result_type"}


class CountKernels(TorchDispatchMode):
    """Names of the dispatched ops that launch device work (everything not in ``_NO_KERNEL``)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if name not in _NO_KERNEL:
            self.ops.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


# (class, config, kernels per loop step: scale_model_input + step). Euler family / Heun / LMS: the
# fused scale_model_input and the fused step; UniPC: the step and the copy of prev_sample it must
# not alias; DDIM's default clip_sample=True with use_clipped_model_output=False reads the
# unclipped-eps term from model_output passed as read-only history (same launch). The first step
# may add one: zeroing the history buffer of multistep / two-stage methods (its shape is known
# only then).
LAUNCH_CASES = [
    ("DDPMScheduler", {}, 1), ("DDIMScheduler", dict(clip_sample=False), 1), ("DDIMScheduler", {}, 1),
    ("EulerDiscreteScheduler", {}, 2), ("EulerAncestralDiscreteScheduler", {}, 2),
    ("HeunDiscreteScheduler", {}, 2), ("LMSDiscreteScheduler", {}, 2), ("DPMSolverMultistepScheduler", {}, 1),
    ("UniPCMultistepScheduler", {}, 2), ("FlowMatchEulerDiscreteScheduler", {}, 1),
]


# float16 sample and model output: Euler / EulerAncestral / FlowMatch / DPM-Solver read and write
# half directly (fp32 arithmetic in the kernel; a float32 pred_original_sample, DPM-Solver's
# history ring in float32); UniPC too (float32 ring), plus the copy of prev_sample it must keep.
HALF_LAUNCHES = {"UniPCMultistepScheduler": 2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("name,cfg,kernels", LAUNCH_CASES, ids=[f"{n}-{c}" for n, c, _ in LAUNCH_CASES])
def test_kernels_per_step(name, cfg, kernels, dtype):
    """Every step of a fp32 loop (pipeline style: timesteps iterated from scheduler.timesteps, the
    first step included) dispatches exactly ``kernels`` ops that do device work (plus the history
    zeroing at the first step); the fused step op is one of them. Tables are uploaded at
    set_timesteps, so the first step uploads nothing. A regression here is a launch per step more
    on the GPU."""
    if dtype == torch.float16 and not (name == "DDIMScheduler" and cfg):
        kernels = HALF_LAUNCHES.get(name, kernels)
    s = fresh(SCHEDULERS[name], cfg, steps=6)
    x = start(s).to(dtype)
    ts = list(s.timesteps) if name != "DDPMScheduler" else [int(t) for t in s.timesteps]  # (DDPM: see above)
    outs = {}
    for t, t_step in zip(s.timesteps, ts):
        mo = model(model_input(s, x, t), t)
        with CountKernels() as counted:
            x_in = model_input(s, x, t_step)
            x = s.step(mo, t_step, x_in if name == "FlowMatchEulerDiscreteScheduler" else x).prev_sample
        ops = counted.ops
        if not outs and "aten.zeros" in ops:  # the history buffer, allocated by the first step
            ops = [op for op in ops if op != "aten.zeros"]
            assert len(ops) == len(counted.ops) - 1
        outs[len(outs)] = ops
        assert len(ops) == kernels, (len(outs) - 1, counted.ops)
        assert "pygen.sampler_step_out" in ops
    assert torch.isfinite(x).all()
