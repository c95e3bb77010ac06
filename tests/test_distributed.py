"""Tests of pygen.distributed: sharding, per-row seeds, gather, and bit-identical sampling.

The distributed tests start 2 real processes (gloo on the CPU, a file:// rendezvous in a
temporary directory); each runs the cases in ``_cases`` through pygen.distributed.sample
and saves what it gathered; the test process compares with a single-process run
(torch.equal: bit-identical).
"""
import functools
import os
import subprocess
import sys

import pytest
import torch

import pygen
from pygen import distributed as pd

WORLD = 2
N = 7  # uneven split over 2 ranks: 4 / 3


def _backends():
    return [b for b in ("cpu", "torch") if pygen.backends()[b] == "available"]


def _py_row_seeds(seed, n):
    """splitmix64 in Python ints (the documented rule of pd.row_seeds)."""
    m = (1 << 64) - 1
    out = []
    for i in range(n):
        z = (seed + (i + 1) * 0x9E3779B97F4A7C15) & m
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
        z ^= z >> 31
        out.append(z - (1 << 64) if z >= 1 << 63 else z)
    return out


# ---------------------------------------------------------------------------
# the cases: (sampler_fn, x_T_or_shape, seed, kwargs); built identically in every process
# ---------------------------------------------------------------------------
def _cases():
    mix = pygen.models.clot()
    sde = pygen.schedules.VPSDE(0.1, 20.0, 1000)
    score = mix.model_fn("score", sde=sde)
    pc = pd.shape_or_x_T(pygen.sde.pc_sample, score, sde)
    ode = pd.shape_or_x_T(pygen.sde.ode_sample, score, sde)
    ve = pygen.schedules.VESDE(0.01, 10.0, 1000)
    ald = pd.shape_or_x_T(pygen.sde.annealed_langevin, mix.model_fn("score", sde=ve), ve)
    g = torch.Generator().manual_seed(11)
    seeds = torch.randint(-(1 << 62), 1 << 62, (N,), generator=g, dtype=torch.int64)
    x0 = (3.0 * torch.randn(N, 2, generator=g)).float()
    glp = mix.model_fn("grad_log_prob")
    energy = mix.model_fn("energy")
    ac = pygen.schedules.NoiseSchedule().alphas_cumprod
    return {
        "pc_shape_row": (pc, (N, 2), seeds, dict(n_steps=20, norm="row")),
        "pc_int_seed_ald": (pc, (N, 2), 5, dict(n_steps=20, predictor="euler_maruyama", corrector="ald")),
        "pc_x_T": (pc, x0, seeds, dict(n_steps=20, norm="row", predictor="ancestral")),
        "pc_one_row": (pc, (1, 2), seeds[:1], dict(n_steps=20, norm="row")),  # rank 1 has no rows
        "ode": (ode, (N, 2), seeds, dict(n_steps=20, method="heun")),
        "annealed_langevin": (ald, (N, 2), seeds, dict(n_levels=4, n_steps_each=3, denoise=True)),
        "ula": (pygen.mcmc.ula, x0, seeds, dict(score_fn=glp, step_size=0.05, n_steps=20)),
        "ula_one_row": (pygen.mcmc.ula, x0[:1], 3, dict(score_fn=glp, step_size=0.05, n_steps=20)),
        "mala": (pygen.mcmc.mala, x0.double(), seeds, dict(energy_fn=energy, step_size=0.05, n_steps=20)),
        "hmc_one_row": (pygen.mcmc.hmc, x0[:1], seeds[:1], dict(energy_fn=energy, step_size=0.1, n_leapfrog=3,
                                                                 n_steps=10)),
        "sample_dpmpp_2m_sde": (functools.partial(pygen.sample, mix.model_fn("denoiser")), (N, 2), seeds,
                                dict(sampler="dpmpp_2m_sde", steps=10, prediction_type="denoiser", progress=False)),
        "sample_dpmpp_sde_eps": (functools.partial(pygen.sample, mix.model_fn("eps", alphas_cumprod=ac)), x0, seeds,
                                 dict(sampler="dpmpp_sde", steps=8, prediction_type="eps", progress=False)),
        # not row-local (the corrector averages norms over the batch): the split changes it
        "pc_norm_batch": (pc, (N, 2), seeds, dict(n_steps=20, norm="batch")),
    }


def _single(name, backend):
    fn, x, seed, kw = _cases()[name]
    with pygen.use_backend(backend):
        seeds = pd.row_seeds(seed, x.shape[0] if torch.is_tensor(x) else x[0]) if isinstance(seed, int) else seed
        return fn(x, seed=seeds, **kw)


def _worker(rank, world, init_file, out_dir):
    """Runs in each spawned process."""
    import datetime

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        res = {"rank": pd.get_rank(), "world": pd.get_world_size(), "dist": pd.is_distributed()}
        for backend in _backends():
            with pygen.use_backend(backend):
                for name, (fn, x, seed, kw) in _cases().items():
                    res[f"{backend}/{name}"] = pd.sample(fn, x, seed=seed, **kw)
        # gather on its own: uneven shards, other dtypes and trailing shapes, an empty rank
        a = torch.arange(5 * 3 * 2, dtype=torch.float16).reshape(5, 3, 2)
        res["gather_f16"] = pd.gather(pd.shard(a), n=5)
        b = torch.arange(3) % 2 == 0
        res["gather_bool"] = pd.gather(pd.shard(b))
        c = torch.arange(4, dtype=torch.int64).reshape(1, 4)
        res["gather_none"] = pd.gather(c if rank == 0 else None)
        res["shard_1row"] = pd.shard(c).shape[0]
        try:  # every rank sees the same counts, so every rank raises
            pd.gather(pd.shard(a), n=6)
            res["gather_bad_n"] = "no error"
        except ValueError as e:
            res["gather_bad_n"] = str(e)
        try:
            pd.gather(torch.zeros(1, 2 + rank))
            res["gather_mismatch"] = "no error"
        except ValueError as e:
            res["gather_mismatch"] = str(e)
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.barrier()
        dist.destroy_process_group()


_LAUNCH = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("_pygen_test_distributed", sys.argv[1])
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
mod._worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
"""


@pytest.fixture(scope="module")
def gathered(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    init_file = tmp / "rendezvous"
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    # the children import the pygen this process imported (an installed package in CI, the source
    # tree with an in-place build in development), and run from tmp so that `python -c`'s ''
    # entry on sys.path cannot put a source tree first
    here = os.path.dirname(os.path.dirname(os.path.abspath(pygen.__file__)))
    env["PYTHONPATH"] = here + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    procs = [subprocess.Popen([sys.executable, "-c", _LAUNCH, os.path.abspath(__file__), str(r), str(WORLD),
                               str(init_file), str(tmp)], cwd=str(tmp), env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(WORLD)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=120)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for r, p in enumerate(procs):
        assert p.returncode == 0, f"rank {r} exited with {p.returncode}:\n" + "\n".join(logs)
    return [torch.load(tmp / f"rank{r}.pt") for r in range(WORLD)]


# ---------------------------------------------------------------------------
# 2 gloo processes vs one process
# ---------------------------------------------------------------------------
def test_ranks_see_a_process_group(gathered):
    for r, res in enumerate(gathered):
        assert (res["rank"], res["world"], res["dist"]) == (r, WORLD, True)


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("name", [k for k in _cases() if k != "pc_norm_batch"])
def test_sample_bit_identical_to_single_process(gathered, backend, name):
    ref = _single(name, backend)
    for res in gathered:  # every rank holds the whole batch
        got = res[f"{backend}/{name}"]
        assert type(got) is type(ref)
        for g, r in zip(*((got, ref) if isinstance(ref, tuple) else ((got,), (ref,)))):
            assert g.shape == r.shape and g.dtype == r.dtype
            assert torch.isfinite(g).all()
            assert torch.equal(g, r), f"{backend}/{name}: max |diff| {(g - r).abs().max().item()}"


@pytest.mark.parametrize("backend", _backends())
def test_batch_coupled_sampler_differs(gathered, backend):
    """norm='batch' is not row-local: the comparison above would catch a split that leaks."""
    ref = _single("pc_norm_batch", backend)
    got = gathered[0][f"{backend}/pc_norm_batch"]
    assert got.shape == ref.shape
    assert not torch.equal(got, ref)
    assert torch.equal(gathered[0][f"{backend}/pc_norm_batch"], gathered[1][f"{backend}/pc_norm_batch"])


def test_gather_uneven_dtypes_and_empty_rank(gathered):
    a = torch.arange(5 * 3 * 2, dtype=torch.float16).reshape(5, 3, 2)
    b = torch.arange(3) % 2 == 0
    c = torch.arange(4, dtype=torch.int64).reshape(1, 4)
    for res in gathered:
        assert res["gather_f16"].dtype == torch.float16 and torch.equal(res["gather_f16"], a)
        assert res["gather_bool"].dtype == torch.bool and torch.equal(res["gather_bool"], b)
        assert torch.equal(res["gather_none"], c)
    assert [res["shard_1row"] for res in gathered] == [1, 0]


def test_gather_errors_raise_on_every_rank(gathered):
    for res in gathered:
        assert "expected n=6" in res["gather_bad_n"]
        assert "shape" in res["gather_mismatch"]


def test_torchrun_self_check_in_process():
    assert not pd.is_distributed()
    assert pd._self_check(n=5, n_steps=5)


# ---------------------------------------------------------------------------
# single-process units
# ---------------------------------------------------------------------------
def test_shard_range_covers_every_row_once():
    for world in range(1, 10):
        for n in range(0, 41):
            slices = [pd.shard_range(n, r, world) for r in range(world)]
            assert slices[0][0] == 0 and slices[-1][1] == n
            for (a0, a1), (b0, b1) in zip(slices, slices[1:]):
                assert a1 == b0
            sizes = [b - a for a, b in slices]
            assert min(sizes) >= 0 and max(sizes) - min(sizes) <= 1
            assert sizes == sorted(sizes, reverse=True)  # the first n % world ranks get the extra row
            assert sizes == [len(t) for t in torch.tensor_split(torch.arange(n), world)]


def test_shard_range_defaults_and_bad_input():
    assert pd.shard_range(7) == (0, 7)
    with pytest.raises(ValueError, match="rank"):
        pd.shard_range(7, 2, 2)
    with pytest.raises(ValueError, match="world_size"):
        pd.shard_range(7, 0, 0)
    with pytest.raises(ValueError, match="n must be >= 0"):
        pd.shard_range(-1, 0, 1)
    with pytest.raises(TypeError, match="n must be an int"):
        pd.shard_range(7.0, 0, 1)
    with pytest.raises(TypeError, match="rank"):
        pd.shard_range(7, True, 2)


def test_single_process_fallbacks():
    assert not pd.is_distributed()
    assert (pd.get_rank(), pd.get_world_size()) == (0, 1)
    x = torch.randn(3, 2)
    assert pd.shard(x) is not None and torch.equal(pd.shard(x), x)
    assert pd.gather(x) is x
    assert pd.gather(x, n=3) is x
    with pytest.raises(ValueError, match="expected n=4"):
        pd.gather(x, n=4)
    with pytest.raises(ValueError, match="local is None"):
        pd.gather(None)
    with pytest.raises(TypeError, match="local"):
        pd.gather([1, 2])
    with pytest.raises(ValueError, match="local"):
        pd.gather(torch.tensor(1.0))
    with pytest.raises(TypeError, match="tensor"):
        pd.shard([1, 2])
    with pytest.raises(ValueError, match="tensor"):
        pd.shard(torch.tensor(1.0))


@pytest.mark.parametrize("seed", [0, 1, 12345, -7, (1 << 63) - 1, -(1 << 63), (1 << 64) - 1])
def test_row_seeds_is_splitmix64(seed):
    got = pd.row_seeds(seed, 9)
    assert got.dtype == torch.int64 and got.shape == (9,)
    assert got.tolist() == _py_row_seeds(seed, 9)


def test_row_seeds_known_value_and_independence():
    assert pd.row_seeds(0, 1).item() == 0xE220A8397B1DCDAF - (1 << 64)  # splitmix64's first output for 0
    s0, s1 = pd.row_seeds(0, 10000), pd.row_seeds(1, 10000)
    assert torch.unique(s0).numel() == 10000
    assert torch.unique(torch.cat([s0, s1])).numel() == 20000  # no shifted overlap like seed + i
    assert torch.equal(pd.row_seeds(3, 5), pd.row_seeds(3, 8)[:5])  # row i depends only on (seed, i)
    assert pd.row_seeds(3, 0).shape == (0,)
    assert pd.row_seeds(3, 2, device="meta").device.type == "meta"
    with pytest.raises(TypeError, match="seed"):
        pd.row_seeds(1.5, 3)
    with pytest.raises(TypeError, match="seed"):
        pd.row_seeds(True, 3)
    with pytest.raises(ValueError, match="seed"):
        pd.row_seeds(1 << 64, 3)
    with pytest.raises(ValueError, match="n"):
        pd.row_seeds(1, -1)


def test_sample_single_process_equals_direct_call():
    fn, x, seed, kw = _cases()["pc_shape_row"]
    assert torch.equal(pd.sample(fn, x, seed=seed, **kw), fn(x, seed=seed, **kw))
    fn, x, seed, kw = _cases()["ula"]
    assert torch.equal(pd.sample(fn, x, seed=9, **kw), fn(x, seed=pd.row_seeds(9, N), **kw))
    # a torch.Size shape and a list shape work like a tuple
    fn, x, seed, kw = _cases()["pc_int_seed_ald"]
    a = pd.sample(fn, torch.Size(x), seed=seed, **kw)
    assert torch.equal(a, pd.sample(fn, list(x), seed=seed, **kw))


def test_shape_or_x_T_routes_the_first_argument():
    calls = []

    def f(a, b, shape=None, *, x_T=None, seed=None, k=0):
        calls.append((a, b, shape, x_T, seed, k))
        return torch.zeros(2)

    g = pd.shape_or_x_T(f, "A", "B", k=1)
    g((2, 3), seed=4)
    x = torch.ones(2)
    g(x, seed=5)
    assert calls[0] == ("A", "B", (2, 3), None, 4, 1)
    assert calls[1][:3] == ("A", "B", None) and calls[1][3] is x and calls[1][4:] == (5, 1)
    with pytest.raises(TypeError, match="fn"):
        pd.shape_or_x_T(3)


def test_sample_bad_input():
    fn = functools.partial(pygen.mcmc.ula, score_fn=lambda x: -x, step_size=0.1, n_steps=1)
    x = torch.zeros(4, 2)
    with pytest.raises(ValueError, match="length 4"):
        pd.sample(fn, x, seed=torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="length 4"):
        pd.sample(fn, x, seed=torch.zeros(4, 1, dtype=torch.int64))
    with pytest.raises(TypeError, match="int64"):
        pd.sample(fn, x, seed=torch.zeros(4, dtype=torch.int32))
    with pytest.raises(TypeError, match="seed"):
        pd.sample(fn, x, seed=1.0)
    with pytest.raises(TypeError, match="seed"):
        pd.sample(fn, x, seed=None)
    with pytest.raises(TypeError, match="sampler_fn"):
        pd.sample(None, x, seed=0)
    with pytest.raises(ValueError, match="x_T_or_shape"):
        pd.sample(fn, torch.zeros(0, 2), seed=0)
    with pytest.raises(ValueError, match="x_T_or_shape"):
        pd.sample(fn, (0, 2), seed=0)
    with pytest.raises(ValueError, match="x_T_or_shape"):
        pd.sample(fn, "abc", seed=0)
    with pytest.raises(ValueError, match="x_T_or_shape"):
        pd.sample(fn, (), seed=0)
    with pytest.raises(ValueError, match="one row per input row"):
        pd.sample(lambda x, seed: x[:2], x, seed=0)
    with pytest.raises(TypeError, match="return a tensor"):
        pd.sample(lambda x, seed: x.tolist(), x, seed=0)
    with pytest.raises(TypeError, match="return a tensor"):
        pd.sample(lambda x, seed: (), x, seed=0)
    with pytest.raises(ValueError, match="one row per input row"):
        pd.sample(lambda x, seed: (x, x[:1]), x, seed=0)
    out = pd.sample(lambda x, seed: [x, seed], x, seed=0)
    assert isinstance(out, list) and torch.equal(out[1], pd.row_seeds(0, 4))
    with pytest.raises(TypeError):
        pd.sample(fn, x, 0)  # seed is keyword-only


def test_sample_moves_seeds_to_the_batch_device():
    seen = {}

    def f(x, seed):
        seen["dev"] = seed.device
        return torch.zeros(x if isinstance(x, tuple) else x.shape, device="meta")

    pd.sample(f, torch.zeros(3, 2, device="meta"), seed=torch.arange(3))
    assert seen["dev"].type == "meta"
    pd.sample(lambda s, seed, device: f(s, seed), (3, 2), seed=1, device="meta")
    assert seen["dev"].type == "meta"
