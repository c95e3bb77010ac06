"""pygen.sample: every sampler through the one entry point, prediction-type conversions,
per-row seeds, progress bar, CUDA-graph fallback and bad input."""
import warnings

import pytest
import torch

import pygen
from pygen import kdiffusion as K
from pygen.samplers import DIFFUSION_SAMPLERS, MCMC_SAMPLERS, SAMPLERS, SDE_SAMPLERS

MIX = pygen.models.clot(dtype=torch.float32)
SCHED = pygen.schedules.NoiseSchedule()


def model_for(pt):
    if pt in ("eps", "x0", "v"):
        return MIX.model_fn(pt, alphas_cumprod=SCHED.alphas_cumprod)
    return MIX.model_fn({"flow": "flow", "denoiser": "denoiser"}[pt])


def noise(n=16, seed=0):
    return pygen.randn((n, 2), seed)


@pytest.mark.parametrize("sampler", DIFFUSION_SAMPLERS)
@pytest.mark.parametrize("pt", ["eps", "x0", "v", "flow", "denoiser"])
def test_diffusion_samplers_run(sampler, pt):
    x = pygen.sample(model_for(pt), (9, 2), sampler=sampler, steps=6, prediction_type=pt, seed=3, progress=False)
    assert x.shape == (9, 2) and x.dtype == torch.float32 and torch.isfinite(x).all()


@pytest.mark.parametrize("sampler", ["euler", "heun", "dpm_2", "lms", "dpmpp_2m"])
def test_same_as_kdiffusion_function(sampler):
    """Noise-free samplers: pygen.sample(denoiser) is exactly pygen.kdiffusion.sample_<name>."""
    eps = noise()
    x = pygen.sample(MIX.model_fn("denoiser"), eps, sampler=sampler, steps=8, prediction_type="denoiser",
                     progress=False, sigma_min=0.01, sigma_max=30.0)
    sigmas = K.get_sigmas_karras(8, 0.01, 30.0).double()
    ref = getattr(K, "sample_" + sampler)(MIX.model_fn("denoiser"), eps * 30.0, sigmas.float(), disable=True)
    torch.testing.assert_close(x, ref, rtol=1e-5, atol=1e-5)


def _wrapped_denoiser(pt, model):
    """k-diffusion's D(x, sigma) for a diffusers-convention (eps/x0/v on SCHED) or flow model, written
    out directly: D = cx·x + cm·model(c_in·x, t(sigma)) (no pygen.sample code involved)."""
    table = SCHED.sigmas.double()

    def D(x, sigma):
        s = sigma.double().view(-1, *([1] * (x.dim() - 1)))
        if pt == "flow":
            c_in, tt = 1 / (1 + s), (sigma.double() / (1 + sigma.double())).to(x.dtype)
        else:
            c_in, tt = (s * s + 1).rsqrt(), pygen.schedules.sigma_to_t(sigma.double(), table).to(x.dtype)
        out = model((x * c_in).to(x.dtype), tt).double()
        xd = x.double()
        d = {"eps": xd - s * out, "x0": out, "v": c_in * c_in * xd - s * c_in * out,
             "flow": c_in * xd - s * c_in * out}[pt]
        return d.to(x.dtype)

    return D


@pytest.mark.parametrize("pt", ["eps", "x0", "v", "flow"])
@pytest.mark.parametrize("sampler", ["euler", "heun", "dpm_2", "lms", "dpmpp_2m", "euler_ancestral", "dpmpp_sde",
                                     "dpmpp_2m_sde", "dpmpp_3m_sde", "dpm_2_ancestral", "dpmpp_2s_ancestral"])
def test_loop_matches_kdiffusion_with_the_model_wrapped(sampler, pt, monkeypatch):
    """pygen.sample's loop keeps the model's input c_in·x as its state (the input scale folded into
    the table, one launch per evaluation). Its result must equal k-diffusion's sampler run on the
    wrapped denoiser D(x, sigma) = cx·x + cm·model(c_in·x, t): k-diffusion itself for the noise-free
    samplers, pygen.kdiffusion (k-diffusion's loop with the same in-kernel noise) for the others."""
    from conftest import load_kdiffusion_sampling

    model = model_for(pt)
    steps, seed = 9, 7
    hi = 14.0 if pt != "flow" else 0.999 / 0.001
    sig = K.get_sigmas_karras(steps, 0.05, hi if pt != "flow" else 30.0)
    eps = noise(12, seed=3)
    x = pygen.sample(model, eps, sampler=sampler, steps=steps, prediction_type=pt, seed=seed, progress=False,
                     sigmas=sig)
    x_start = eps * float(sig[0]) if pt != "flow" else eps * (1 + float(sig[0]))
    if sampler in ("euler", "heun", "dpm_2", "lms", "dpmpp_2m"):
        kd = load_kdiffusion_sampling()
        ref = getattr(kd, "sample_" + sampler)(_wrapped_denoiser(pt, model), x_start, sig, disable=True)
    else:
        monkeypatch.setattr(K, "default_seed", lambda: seed)  # pygen.sample's key: its seed
        ref = getattr(K, "sample_" + sampler)(_wrapped_denoiser(pt, model), x_start, sig, disable=True)
    torch.testing.assert_close(x, ref, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("pt", ["eps", "v", "flow"])
def test_loop_state_in_half_and_double(pt):
    """The folded table in float64 for float64 samples, float32 for float16 ones: float16 stays within
    a few half ulps of the float64 run, float64 equals the float32 run to float32 accuracy."""
    model = model_for(pt)
    eps = noise(64, seed=4)
    kw = dict(sampler="dpmpp_2m", steps=10, prediction_type=pt, seed=1, progress=False)

    def cast_model(dtype):
        return lambda x, t: model(x.float(), t.float()).to(dtype)

    x64 = pygen.sample(cast_model(torch.float64), eps.double(), **kw)
    x32 = pygen.sample(model, eps, **kw)
    x16 = pygen.sample(cast_model(torch.float16), eps.half(), **kw)
    assert x64.dtype == torch.float64 and x16.dtype == torch.float16
    torch.testing.assert_close(x32.double(), x64, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(x16.double(), x64, rtol=2e-2, atol=2e-2)


def test_loop_never_writes_a_tensor_the_model_kept():
    """The model gets the loop state itself; a model (or callback) that keeps it must not see it change:
    the step writes in place only when nothing else refers to the state."""
    model = model_for("eps")
    kept, copies = [], []

    def keeping(x, t):
        kept.append(x)
        copies.append(x.clone())
        return model(x, t)

    eps = noise(8)
    x = pygen.sample(keeping, eps, sampler="heun", steps=5, prediction_type="eps", progress=False)
    ref = pygen.sample(model, eps, sampler="heun", steps=5, prediction_type="eps", progress=False)
    assert all(torch.equal(a, b) for a, b in zip(kept, copies))
    torch.testing.assert_close(x, ref, rtol=0, atol=0)
    seen = []  # (denoiser: the callback gets the state itself, not an unscaled copy)
    pygen.sample(model_for("denoiser"), eps, sampler="euler", steps=5, prediction_type="denoiser", progress=False,
                 callback=lambda k, x: seen.append((x, x.clone())))
    assert len(seen) == 5 and all(torch.equal(a, b) for a, b in seen)


def test_loop_writes_the_state_in_place_when_nothing_keeps_it():
    """With nothing kept, every model evaluation sees the same buffer (the first included): no
    allocation per step. (Triton's CPU interpreter keeps references to the storages it ran on, so the
    loop rightly allocates there.)"""
    if not K._REUSE_OK or pygen.backends().get("cpu") != "available":
        pytest.skip("needs the compiled CPU backend and the reference-count rule of _unobserved")
    model = model_for("eps")
    ptrs = []

    def recording(x, t):
        ptrs.append(x.data_ptr())
        return model(x, t)

    with pygen.use_backend("cpu"):
        out = pygen.sample(recording, noise(8), sampler="dpmpp_2m", steps=6, prediction_type="eps", progress=False)
    assert len(ptrs) == 6 and len(set(ptrs)) == 1 and out.data_ptr() == ptrs[0]


def test_callback_gets_the_unscaled_state():
    """callback(k, x) receives x_{k+1} (not the model's scaled input): for an exact denoiser the last
    one is the result and each equals the denoiser-convention run's state."""
    eps = noise(8)
    lo, hi = float(SCHED.sigmas[0]), float(SCHED.sigmas[-1])
    kw = dict(sampler="euler", steps=6, progress=False, sigma_min=lo, sigma_max=hi)
    got, ref = [], []
    x = pygen.sample(model_for("x0"), eps, prediction_type="x0", callback=lambda k, x: got.append(x.clone()), **kw)
    pygen.sample(model_for("denoiser"), eps, prediction_type="denoiser", callback=lambda k, x: ref.append(x.clone()),
                 **kw)
    assert len(got) == len(ref) == 6 and torch.equal(got[-1], x)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "heun", "euler_ancestral", "dpmpp_sde"])
def test_prediction_types_agree(sampler):
    """eps, x0, v and denoiser models of one mixture give one trajectory: the conversions are exact."""
    eps = noise(32)
    lo, hi = float(SCHED.sigmas[0]), float(SCHED.sigmas[-1])
    outs = {pt: pygen.sample(model_for(pt), eps, sampler=sampler, steps=10, prediction_type=pt, seed=5,
                             progress=False, sigma_min=lo, sigma_max=hi)
            for pt in ("denoiser", "eps", "x0", "v")}
    for pt in ("eps", "x0", "v"):
        # the discrete schedule's timestep interpolation is not exactly the continuous sigma
        torch.testing.assert_close(outs[pt], outs["denoiser"], rtol=2e-3, atol=2e-3)


def test_per_row_seeds_batch_split():
    eps = noise(6)
    seeds = torch.tensor([11, 12, 13, 14, 15, 16])
    for sampler in ("euler_ancestral", "dpmpp_2m_sde", "dpmpp_sde"):
        full = pygen.sample(MIX.model_fn("denoiser"), eps, sampler=sampler, steps=7, prediction_type="denoiser",
                            seed=seeds, progress=False)
        a = pygen.sample(MIX.model_fn("denoiser"), eps[:2], sampler=sampler, steps=7, prediction_type="denoiser",
                         seed=seeds[:2], progress=False)
        b = pygen.sample(MIX.model_fn("denoiser"), eps[2:], sampler=sampler, steps=7, prediction_type="denoiser",
                         seed=seeds[2:], progress=False)
        assert torch.equal(full, torch.cat([a, b]))
        other = pygen.sample(MIX.model_fn("denoiser"), eps, sampler=sampler, steps=7, prediction_type="denoiser",
                             seed=seeds + 100, progress=False)
        assert not torch.equal(full, other)


@pytest.mark.parametrize("sampler", SDE_SAMPLERS)
def test_sde_samplers(sampler):
    sde = pygen.schedules.VPSDE()
    score = MIX.model_fn("score", sde=sde)
    x = pygen.sample(score, (8, 2), sampler=sampler, steps=25, schedule=sde, prediction_type="score", seed=2,
                     progress=False)
    assert x.shape == (8, 2) and torch.isfinite(x).all()


def test_sde_eps_prediction_matches_score():
    sde = pygen.schedules.VPSDE()
    score = MIX.model_fn("score", sde=sde)

    def eps_model(x, t):
        return -score(x, t) * sde.marginal_std(t).to(x.dtype)[:, None]

    kw = dict(sampler="pc", steps=30, schedule=sde, seed=4, progress=False, corrector="none")
    a = pygen.sample(score, noise(), prediction_type="score", **kw)
    b = pygen.sample(eps_model, noise(), prediction_type="eps", **kw)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("sampler", MCMC_SAMPLERS)
def test_mcmc_samplers(sampler):
    energy = MIX.model_fn("energy")
    opts = dict(step_size=0.05)
    if sampler == "hmc":
        opts["n_leapfrog"] = 3
    if sampler == "replica_exchange":
        opts["betas"] = [0.2, 0.5, 1.0]
    x = pygen.sample(energy, (8, 2), sampler=sampler, steps=10, prediction_type="energy", seed=2, progress=False,
                     **opts)
    assert x.shape == (8, 2) and torch.isfinite(x).all()


def test_every_name_is_covered():
    assert set(SAMPLERS) == set(DIFFUSION_SAMPLERS) | set(SDE_SAMPLERS) | set(MCMC_SAMPLERS)
    assert len(SAMPLERS) == 11 + 2 + 4 + 4


def test_progress_bar_and_callback(capsys):
    seen = []
    pygen.sample(MIX.model_fn("denoiser"), (4, 2), sampler="heun", steps=5, prediction_type="denoiser",
                 progress=True, callback=lambda i, x: seen.append(i))
    err = capsys.readouterr().err
    assert "9/9" in err  # Heun: 2·5 - 1 model evaluations
    assert seen == list(range(9))
    pygen.sample(MIX.model_fn("denoiser"), (4, 2), sampler="euler", steps=5, prediction_type="denoiser",
                 progress=False)
    assert "5/5" not in capsys.readouterr().err


def test_cuda_graph_on_cpu_warns_and_matches_eager():
    kw = dict(sampler="dpmpp_2m_sde", steps=6, prediction_type="denoiser", seed=1, progress=False)
    eager = pygen.sample(MIX.model_fn("denoiser"), noise(), **kw)
    with pytest.warns(UserWarning, match="cuda_graph=True needs CUDA"):
        graphed = pygen.sample(MIX.model_fn("denoiser"), noise(), cuda_graph=True, **kw)
    assert torch.equal(eager, graphed)


def _eager_then_graph_device(model, calls, sampler, monkeypatch):
    """The eager run of a 7-step ``sampler`` (its result and model-call count; ``calls`` cleared after),
    then every tensor counts as a CUDA-graph device: (eps, sample kwargs, eager result, eager calls)."""
    import pygen.samplers as PS

    eps = pygen.randn((6, 3), 0)
    kw = dict(sampler=sampler, steps=7, prediction_type="denoiser", seed=1, progress=False)
    eager = pygen.sample(model, eps, **kw)
    n_eager = len(calls)
    calls.clear()
    monkeypatch.setattr(PS, "_graph_device", lambda x: True)
    return eps, kw, eager, n_eager


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m", "heun"])
def test_graph_loop_runs_each_evaluation_once(sampler, monkeypatch):
    """The cuda_graph=True loop logic on the CPU: _capture runs evaluation 0 (its warm-up) and hands
    back a graph whose replay is one evaluation at the device row index. The loop must then replay
    evaluations 1..K-1 exactly once each (a second evaluation 0 ran the index past the table: a device
    assert on the H100)."""
    import pygen.samplers as PS

    calls = []

    def model(x, sigma):
        calls.append(1)
        return x / (1 + sigma.view(-1, 1) ** 2)

    class FakeGraph:
        def __init__(self, replay):
            self.replay = replay

    def fake_capture(model_, state, prog, t_dev, launch):
        launch(0)
        return FakeGraph(lambda: launch(int(prog.index)))

    eps, kw, eager, n_eager = _eager_then_graph_device(model, calls, sampler, monkeypatch)
    monkeypatch.setattr(PS, "_capture", fake_capture)
    seen = []
    graphed = pygen.sample(model, eps, cuda_graph=True, callback=lambda k, x: seen.append(k), **kw)
    assert len(calls) == n_eager and seen == list(range(n_eager))
    torch.testing.assert_close(graphed, eager, rtol=0, atol=0)


class _FakeCapture:
    """CPU stand-ins for the torch.cuda objects _capture uses; ``active`` while 'capturing'."""

    active = False

    class Stream:
        def wait_stream(self, other):
            pass

    class CUDAGraph:
        def replay(self):
            raise AssertionError("a graph whose capture failed must not be replayed")

    class graph:
        def __init__(self, g):
            pass

        def __enter__(self):
            _FakeCapture.active = True

        def __exit__(self, *exc):
            _FakeCapture.active = False
            return False

    @staticmethod
    def stream(s):
        import contextlib

        return contextlib.nullcontext()

    @staticmethod
    def current_stream():
        return _FakeCapture.Stream()


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m", "heun", "dpmpp_2m_sde"])
def test_graph_capture_failure_falls_back_with_one_warning(sampler, monkeypatch):
    """The real _capture path on the CPU (torch.cuda objects faked): a model that cannot be captured
    (here it raises as a host sync does under stream capture) gives exactly one clear warning, pointing
    at the caller, and the eager result, each evaluation run once after the warm-up."""
    calls = []

    def model(x, sigma):
        if _FakeCapture.active:
            raise RuntimeError("operation not permitted when stream is capturing")
        calls.append(1)
        return x / (1 + sigma.view(-1, 1) ** 2)

    eps, kw, eager, n_eager = _eager_then_graph_device(model, calls, sampler, monkeypatch)
    for name in ("Stream", "CUDAGraph", "graph", "stream", "current_stream"):
        monkeypatch.setattr(torch.cuda, name, getattr(_FakeCapture, name))
    seen = []
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        graphed = pygen.sample(model, eps, cuda_graph=True, callback=lambda k, x: seen.append(k), **kw)
    assert len(rec) == 1, [str(w.message) for w in rec]
    msg = str(rec[0].message)
    assert rec[0].category is UserWarning
    assert "cuda_graph=True" in msg and "could not be captured" in msg and "running eagerly" in msg
    assert "operation not permitted when stream is capturing" in msg  # the cause is named
    assert rec[0].filename == __file__  # stacklevel: the user's call of pygen.sample
    assert len(calls) == n_eager and seen == list(range(n_eager))
    assert torch.equal(graphed, eager)


def _sde_and_mcmc_cases():
    sde = pygen.schedules.VPSDE()
    score = MIX.model_fn("score", sde=sde)
    cases = [(name, score, dict(schedule=sde, prediction_type="score")) for name in SDE_SAMPLERS]
    cases[SDE_SAMPLERS.index("annealed_langevin")][2]["n_steps_each"] = 3
    energy = MIX.model_fn("energy")
    for name in MCMC_SAMPLERS:
        opts = dict(prediction_type="energy", step_size=0.05)
        if name == "hmc":
            opts["n_leapfrog"] = 2
        if name == "replica_exchange":
            opts["betas"] = [0.3, 1.0]
        cases.append((name, energy, opts))
    return cases


@pytest.mark.parametrize("sampler,model,opts", _sde_and_mcmc_cases(), ids=SDE_SAMPLERS + MCMC_SAMPLERS)
def test_cuda_graph_on_cpu_warns_once_and_runs_eagerly(sampler, model, opts):
    """cuda_graph=True with CPU tensors, for the score-SDE and MCMC samplers: one warning (pointing at the
    call) that a graph needs CUDA tensors, and the eager loop's samples."""
    kw = dict(sampler=sampler, steps=20, seed=3, progress=False, **opts)
    eager = pygen.sample(model, noise(8), **kw)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        graphed = pygen.sample(model, noise(8), cuda_graph=True, **kw)
    assert len(rec) == 1, [str(w.message) for w in rec]
    assert "cuda_graph=True needs CUDA tensors" in str(rec[0].message)
    assert rec[0].filename == __file__
    assert torch.equal(graphed, eager)


def _fake_capture(monkeypatch, module, device_check, capture_owner):
    """CPU stand-in for a loop's CUDA-graph path: ``module.<device_check>`` accepts CPU tensors, and
    ``capture_owner.capture_step`` runs the warm-up, then hands back a graph whose replay runs the
    captured step eagerly (reading every per-step value from the device indices and counters)."""

    class FakeGraph:
        def __init__(self, step):
            self.replay = step

    def fake_capture(warmup, step):
        warmup()
        return FakeGraph(step)

    monkeypatch.setattr(module, device_check, lambda x: True)
    monkeypatch.setattr(capture_owner, "capture_step", fake_capture)


def _fake_mcmc_capture(monkeypatch):
    """pygen.mcmc's StepGraphs (pygen.samplers.program.capture_step) faked on the CPU."""
    import pygen.mcmc as M
    import pygen.samplers.program as P

    _fake_capture(monkeypatch, M, "graph_device", P)


MCMC_GRAPH_CASES = [
    ("ula-score", dict()), ("ula-energy", dict()), ("ula-rows", dict(rows=True)),
    ("mala", dict()), ("mala-rows", dict(rows=True)), ("hmc", dict(n_leapfrog=3, mass=2.0)),
    ("hmc-rows", dict(n_leapfrog=2, rows=True)),
    ("replica_exchange-ula", dict(move="ula", swap_every=1)), ("replica_exchange-mala", dict(move="mala", swap_every=2)),
]


@pytest.mark.parametrize("case,opts", MCMC_GRAPH_CASES, ids=[c for c, _ in MCMC_GRAPH_CASES])
def test_mcmc_graph_loop_matches_eager(case, opts, monkeypatch):
    """cuda_graph=True for MCMC: each step reads its noise streams from device counters and updates the
    chains in place, so the captured step (replica exchange: the move and each parity's swap round),
    replayed, gives exactly the eager chains, rates and callbacks, with as many energy evaluations."""
    from pygen import mcmc

    opts = dict(opts)
    name = case.split("-")[0]
    chains = 6
    rows = opts.pop("rows", False)
    seed = torch.arange(chains) * 5 + 1 if rows else 9
    step = torch.linspace(0.05, 0.3, chains) if rows else 0.2
    calls = []
    energy_fn = MIX.model_fn("energy")

    def energy(x):
        calls.append(x.shape[0])
        return energy_fn(x)

    def run(cuda_graph):
        calls.clear()
        seen = []
        x0 = noise(chains)
        kw = dict(n_steps=7, seed=seed, stream=3, callback=seen.append, cuda_graph=cuda_graph)
        if name == "ula":
            fn = dict(score_fn=lambda x: -0.5 * x) if case == "ula-score" else dict(energy_fn=energy)
            out = (mcmc.ula(x0, step_size=step, **fn, **kw),)
        elif name == "replica_exchange":
            kw.update(seed=9)
            out = mcmc.replica_exchange(x0, energy, [0.2, 0.6, 1.0], step_size=0.2, **opts, **kw)
        else:
            out = getattr(mcmc, name)(x0, energy, step_size=step, **opts, **kw)
        return out, seen, list(calls)

    eager, eager_seen, eager_calls = run(False)
    _fake_mcmc_capture(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning: the (fake) capture succeeded
        graphed, seen, graph_calls = run(True)
    assert all(torch.equal(a, b) for a, b in zip(graphed, eager))
    assert graph_calls == eager_calls
    assert len(seen) == len(eager_seen) == 7
    for a, b in zip(seen, eager_seen):
        assert a.keys() == b.keys() and a["i"] == b["i"]
        for k in a:
            if isinstance(a[k], torch.Tensor):
                assert torch.equal(a[k], b[k]), k
            else:
                assert a[k] == b[k], k
    if name != "ula":
        assert 0 < float(eager[1].min()) and float(eager[1].max()) <= 1  # accept / swap rates were exercised


def test_a_failed_capture_after_a_successful_one_drops_every_graph(monkeypatch):
    """Replica exchange captures its move, then the even swap round; when the odd round's capture fails
    (one warning), no graph replays any more: every later move and swap runs eagerly with host streams,
    and the chains and swap rates are the eager loop's."""
    from pygen import mcmc
    import pygen.mcmc as M
    import pygen.samplers.program as P

    energy = MIX.model_fn("energy")
    kw = dict(step_size=0.2, n_steps=8, seed=5, move="mala")
    eager = mcmc.replica_exchange(noise(6), energy, [0.2, 0.6, 1.0], **kw)
    replays, captures = [], []

    class FakeGraph:
        def __init__(self, step):
            self.step = step

        def replay(self):
            replays.append(1)
            self.step()

    def capture(warmup, step):
        warmup()
        captures.append(1)
        if len(captures) == 3:  # the odd swap round
            import warnings as w

            w.warn("cuda_graph=True: the model could not be captured in a CUDA graph (test); running eagerly")
            return None
        return FakeGraph(step)

    monkeypatch.setattr(M, "graph_device", lambda x: True)
    monkeypatch.setattr(P, "capture_step", capture)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        graphed = mcmc.replica_exchange(noise(6), energy, [0.2, 0.6, 1.0], cuda_graph=True, **kw)
    assert len(rec) == 1 and len(captures) == 3
    assert len(replays) == 1  # the move's replay at step 1, before the odd round's capture failed
    assert all(torch.equal(a, b) for a, b in zip(graphed, eager))


def test_mcmc_graph_capture_failure_falls_back_with_one_warning(monkeypatch):
    """An energy that cannot be captured (it raises under capture, as a host sync does): one warning at the
    caller, then the eager loop, with the eager result and every step's energy evaluated once."""
    from pygen import mcmc

    energy_fn = MIX.model_fn("energy")
    calls = []

    def energy(x):
        if _FakeCapture.active:
            raise RuntimeError("operation not permitted when stream is capturing")
        calls.append(1)
        return energy_fn(x)

    kw = dict(step_size=0.2, n_steps=5, seed=4)
    eager = mcmc.mala(noise(6), energy, **kw)
    n_eager = len(calls)
    calls.clear()
    import pygen.mcmc as M

    monkeypatch.setattr(M, "graph_device", lambda x: True)
    for name in ("Stream", "CUDAGraph", "graph", "stream", "current_stream"):
        monkeypatch.setattr(torch.cuda, name, getattr(_FakeCapture, name))
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        graphed = mcmc.mala(noise(6), energy, cuda_graph=True, **kw)
    assert len(rec) == 1 and "could not be captured" in str(rec[0].message), [str(w.message) for w in rec]
    assert rec[0].filename == __file__
    assert len(calls) == n_eager
    assert all(torch.equal(a, b) for a, b in zip(graphed, eager))


def _fake_sde_capture(monkeypatch):
    """pygen.sde's CUDA-graph path (its capture_step) faked on the CPU."""
    import pygen.samplers.program as P
    import pygen.sde as S

    _fake_capture(monkeypatch, S, "_graph_device", P)


SDE_GRAPH_CASES = [("ode_euler", {}), ("ode_heun", {}),
                   ("pc", dict(corrector="none", predictor="euler_maruyama")),
                   ("pc", dict(corrector="none", predictor="reverse_diffusion")),
                   ("pc", dict(corrector="none", predictor="ancestral")),
                   ("pc", dict(corrector="langevin", predictor="reverse_diffusion")),
                   ("pc", dict(corrector="langevin", predictor="ancestral", norm="row", n_corrector_steps=2)),
                   ("pc", dict(corrector="ald", predictor="euler_maruyama", n_corrector_steps=2)),
                   ("pc", dict(corrector="langevin", predictor="none", n_corrector_steps=3)),
                   ("pc", dict(corrector="ald", predictor="none")),
                   ("annealed_langevin", dict(n_steps_each=3, schedule="ve"))]
SDE_GRAPH_IDS = [f"{s}-{o.get('predictor', '')}-{o.get('corrector', '')}-{o.get('n_corrector_steps', '')}"
                 for s, o in SDE_GRAPH_CASES]


@pytest.mark.parametrize("sampler,opts", SDE_GRAPH_CASES, ids=SDE_GRAPH_IDS)
@pytest.mark.parametrize("pt", ["score", "eps"])
@pytest.mark.parametrize("row_seeds", [False, True])
def test_sde_graph_loop_matches_eager(sampler, opts, pt, row_seeds, monkeypatch):
    """cuda_graph=True for every score-SDE sampler: the captured loop step reads its times, table rows,
    corrector step constants and noise streams from device step indices; replayed per step it gives
    exactly the eager samples, with the same model calls, and the callback gets a copy per step."""
    opts = dict(opts)  # (reverse diffusion / ancestral need beta_max / N <= 1: N = 25)
    sde = pygen.schedules.VESDE(N=25) if opts.pop("schedule", "vp") == "ve" else pygen.schedules.VPSDE(N=25)
    exact = MIX.model_fn("score", sde=sde)

    def score(x, t):  # the score, or the eps-prediction -std(t)·score (the conversion runs on the device)
        s = exact(x, t)
        return s if pt == "score" else -s * sde.marginal_std(t).to(x.dtype)[:, None]
    calls = []

    def model(x, t):
        calls.append(t.clone())
        return score(x, t)

    seed = torch.arange(8) * 7 + 2 if row_seeds else 3
    kw = dict(sampler=sampler, steps=25, schedule=sde, prediction_type=pt, seed=seed, progress=False, **opts)
    eager = pygen.sample(model, noise(8), **kw)
    eager_calls = [t.clone() for t in calls]
    calls.clear()
    _fake_sde_capture(monkeypatch)
    seen = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning: the (fake) capture succeeded
        graphed = pygen.sample(model, noise(8), cuda_graph=True, callback=lambda k, x: seen.append((k, x)), **kw)
    assert torch.equal(graphed, eager)
    assert len(calls) == len(eager_calls) and all(torch.equal(a, b) for a, b in zip(calls, eager_calls))
    assert [k for k, _ in seen] == list(range(25)) and all(x is not graphed for _, x in seen)
    assert torch.equal(seen[-1][1], graphed)


def test_sde_graph_needs_cuda():
    """On CPU tensors cuda_graph=True warns once and runs eagerly; bad cuda_graph types raise."""
    sde = pygen.schedules.VPSDE(N=25)
    score = MIX.model_fn("score", sde=sde)
    for sampler, opts, words in [("ode_heun", {}, "needs CUDA tensors"),
                                 ("pc", dict(corrector="none"), "needs CUDA tensors"),
                                 ("pc", {}, "needs CUDA tensors"),
                                 ("annealed_langevin", dict(n_steps_each=2), "needs CUDA tensors")]:
        kw = dict(sampler=sampler, steps=25, schedule=sde, prediction_type="score", seed=1, progress=False, **opts)
        eager = pygen.sample(score, noise(8), **kw)
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            graphed = pygen.sample(score, noise(8), cuda_graph=True, **kw)
        assert len(rec) == 1 and words in str(rec[0].message), [str(w.message) for w in rec]
        assert rec[0].filename == __file__
        assert torch.equal(graphed, eager)
    for loop in (pygen.sde.ode_sample, pygen.sde.pc_sample, pygen.sde.annealed_langevin):
        with pytest.raises(TypeError, match="cuda_graph"):
            loop(score, sde, (4, 2), cuda_graph="yes")


BAD_OUTPUTS = {
    "(1,D)": lambda out: out[:1],
    "(B,1)": lambda out: out[:, :1],
    "dtype": lambda out: out.double(),
}


@pytest.mark.parametrize("sampler", SDE_SAMPLERS)
@pytest.mark.parametrize("pt", ["score", "eps", "x0"])
@pytest.mark.parametrize("bad", sorted(BAD_OUTPUTS))
def test_sde_model_output_checked_before_conversion(sampler, pt, bad):
    """A wrong-shaped or wrong-dtype model output is an error for every prediction type: the eps/x0 -> score
    conversion broadcasts, so the output must be checked before it (a (1, D) or (B, 1) output ran silently)."""
    sde = pygen.schedules.VPSDE()
    score = MIX.model_fn("score", sde=sde)

    def good(x, t):
        if pt == "score":
            return score(x, t)
        std = sde.marginal_std(t).to(x.dtype)[:, None]
        eps = -score(x, t) * std
        if pt == "eps":
            return eps
        return (x - std * eps) / sde.mean_coeff(t).to(x.dtype)[:, None]

    def model(x, t):
        return BAD_OUTPUTS[bad](good(x, t))

    kw = dict(sampler=sampler, steps=25, schedule=sde, prediction_type=pt, seed=2, progress=False)
    if sampler == "annealed_langevin":
        kw["n_steps_each"] = 2
    if bad == "dtype":
        assert torch.isfinite(pygen.sample(good, (4, 2), **kw)).all()  # the well-formed model runs
    if bad == "dtype":
        with pytest.raises(TypeError, match=r"model\(x, t\) must have the dtype of x \(torch.float32\), got "
                                            r"torch.float64"):
            pygen.sample(model, (4, 2), **kw)
    else:
        want = "(1, 2)" if bad == "(1,D)" else "(4, 1)"
        with pytest.raises(ValueError, match=r"model\(x, t\) must have the shape of x \(4, 2\), got "
                                             + want.replace("(", r"\(").replace(")", r"\)")):
            pygen.sample(model, (4, 2), **kw)


def test_sde_x0_prediction_matches_score():
    sde = pygen.schedules.VPSDE()
    score = MIX.model_fn("score", sde=sde)

    def x0_model(x, t):
        std = sde.marginal_std(t).to(x.dtype)[:, None]
        return (x + std * std * score(x, t)) / sde.mean_coeff(t).to(x.dtype)[:, None]

    kw = dict(sampler="pc", steps=30, schedule=sde, seed=4, progress=False, corrector="none")
    a = pygen.sample(score, noise(), prediction_type="score", **kw)
    b = pygen.sample(x0_model, noise(), prediction_type="x0", **kw)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("sampler", ["dpmpp_2m", "heun", "dpmpp_sde", "lms"])
def test_cuda_graph_matches_eager(sampler):
    model = pygen.models.clot(device="cuda", dtype=torch.float32).model_fn("denoiser")
    _assert_cuda_graph_equals_eager(model, sampler=sampler, steps=8, prediction_type="denoiser")


def _assert_cuda_graph_equals_eager(model, **kw):
    """pygen.sample with cuda_graph=True on CUDA: no fallback warning, the eager loop's samples."""
    eps = pygen.randn((64, 2), 0, device="cuda")
    kw.update(seed=1, progress=False)
    eager = pygen.sample(model, eps, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        graphed = pygen.sample(model, eps, cuda_graph=True, **kw)
    torch.testing.assert_close(graphed, eager, rtol=1e-6, atol=1e-6)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("pt", ["eps", "v", "flow"])
def test_cuda_graph_matches_eager_scaled_state(pt):
    """The scaled loop state (model input c_in·x) under a real CUDA graph: the same samples as eager."""
    mix = pygen.models.clot(device="cuda", dtype=torch.float32)
    sched = pygen.schedules.NoiseSchedule()
    model = mix.model_fn(pt, alphas_cumprod=sched.alphas_cumprod.cuda()) if pt != "flow" else mix.model_fn("flow")
    _assert_cuda_graph_equals_eager(model, sampler="dpmpp_2m", steps=8, prediction_type=pt)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("sampler,opts", SDE_GRAPH_CASES, ids=SDE_GRAPH_IDS)
def test_cuda_graph_matches_eager_sde(sampler, opts):
    """Every score-SDE sampler captured in a real CUDA graph: no fallback warning, and the same samples
    as the eager loop."""
    opts = dict(opts)
    sde = pygen.schedules.VESDE(N=25) if opts.pop("schedule", "vp") == "ve" else pygen.schedules.VPSDE(N=25)
    score = pygen.models.clot(device="cuda", dtype=torch.float32).model_fn("score", sde=sde)
    _assert_cuda_graph_equals_eager(score, sampler=sampler, steps=25, schedule=sde, prediction_type="score", **opts)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("sampler,opts", [("ula", {}), ("mala", {}), ("hmc", dict(n_leapfrog=3)),
                                          ("replica_exchange", dict(betas=[0.3, 1.0], swap_every=2, move="mala"))])
def test_cuda_graph_matches_eager_mcmc(sampler, opts):
    """MCMC captured in real CUDA graphs (the energy and its autograd gradient included): no fallback
    warning, and the eager chains."""
    energy = pygen.models.clot(device="cuda", dtype=torch.float32).model_fn("energy")
    _assert_cuda_graph_equals_eager(energy, sampler=sampler, steps=9, prediction_type="energy", step_size=0.05,
                                    **opts)


def test_pc_rediscretises_the_sde_with_n_steps():
    """score_sde's reverse-diffusion predictor needs N = steps; pygen.sample rebuilds the SDE so."""
    sde = pygen.schedules.VPSDE()  # N = 1000
    score = MIX.model_fn("score", sde=sde)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        a = pygen.sample(score, noise(), sampler="pc", steps=40, schedule=sde, prediction_type="score", seed=1,
                         progress=False)
    b = pygen.sde.pc_sample(score, pygen.schedules.VPSDE(N=40), x_T=noise() * sde.prior_std, n_steps=40, seed=1)
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="beta_max/N <= 1"):
        pygen.sample(score, noise(), sampler="pc", steps=10, schedule=sde, prediction_type="score", progress=False)


def test_bad_input():
    den = MIX.model_fn("denoiser")
    with pytest.raises(ValueError, match="unknown sampler 'dpmpp_9m'.*euler"):
        pygen.sample(den, (4, 2), sampler="dpmpp_9m")
    with pytest.raises(ValueError, match="steps must be an int >= 1"):
        pygen.sample(den, (4, 2), sampler="euler", steps=0, prediction_type="denoiser")
    with pytest.raises(ValueError, match="unknown prediction_type"):
        pygen.sample(den, (4, 2), prediction_type="epsilon")
    with pytest.raises(ValueError, match="strictly decreasing"):
        pygen.sample(den, (4, 2), sampler="euler", prediction_type="denoiser", sigmas=torch.tensor([1.0, 2.0, 0.0]))
    with pytest.raises(ValueError, match="returned shape"):
        pygen.sample(lambda x, s: x[:, :1], (4, 2), sampler="euler", prediction_type="denoiser", progress=False)
    with pytest.raises(TypeError, match="returned dtype"):
        pygen.sample(lambda x, s: x.double(), (4, 2), sampler="euler", prediction_type="denoiser", progress=False)
    with pytest.raises(ValueError, match="not valid for the diffusion samplers"):
        pygen.sample(den, (4, 2), sampler="euler", prediction_type="score")
    with pytest.raises(ValueError, match="not valid for 'hmc'"):
        pygen.sample(den, (4, 2), sampler="hmc", prediction_type="score", step_size=0.1)
    with pytest.raises(TypeError, match="step_size"):
        pygen.sample(MIX.model_fn("energy"), (4, 2), sampler="mala", prediction_type="energy")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        pygen.sample(MIX.model_fn("energy"), (4, 2), sampler="replica_exchange", prediction_type="energy",
                     step_size=0.1, betas=[0.5, 1.5], progress=False)
    with pytest.raises(TypeError, match="unexpected option"):
        pygen.sample(den, (4, 2), sampler="dpmpp_2m", prediction_type="denoiser", eta=0.5)
    with pytest.raises(ValueError, match="x_T_or_shape"):
        pygen.sample(den, (4, 0), sampler="euler", prediction_type="denoiser")
    with pytest.raises(TypeError, match="NoiseSchedule"):
        pygen.sample(den, (4, 2), sampler="euler", prediction_type="eps", schedule=pygen.schedules.VPSDE())
