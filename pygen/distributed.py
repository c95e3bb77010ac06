"""Distributed sampling: shard a batch over ``torch.distributed`` ranks and gather the result.

Pure Python over ``torch.distributed`` (any backend: NCCL on GPUs, gloo on the CPU);
no math of its own. Every function also works without ``torch.distributed`` being
initialised: it then acts as a single process (rank 0 of a world of 1).

Per-row seeds make the result independent of the split::

    seeds = pygen.distributed.row_seeds(1234, n)          # or any 1-D int64 tensor, one per row
    x = pygen.distributed.sample(sampler_fn, (n, 2), seed=seeds, **kwargs)

Rank r takes the contiguous rows ``shard_range(n)`` (the first ``n % world`` ranks get
one row more), calls ``sampler_fn(local_x_T_or_local_shape, seed=local_seeds, **kwargs)``
and the slices are gathered, in rank order, on every rank. The result is bit-identical
to the single-process call ``sampler_fn(x_T_or_shape, seed=seeds, **kwargs)`` **when the
sampler is row-local**: a row's result may depend only on that row's input and seed
(pygen draws per-row-seeded noise within each row, so a row's noise never depends on
its batch). Row-local: ``pygen.sde.pc_sample`` with ``norm="row"`` (or
``corrector="ald"``/``"none"``), ``pygen.sde.ode_sample``, ``pygen.sde.annealed_langevin``,
``pygen.mcmc.ula``/``mala``/``hmc``, and ``pygen.sample`` for the samplers that are.
NOT row-local: ``pc_sample`` with its default ``norm="batch"`` (the Langevin corrector
averages gradient norms over the batch), ``pygen.mcmc.replica_exchange`` (swaps couple
chains), and any model whose output for a row depends on the other rows (batch norm in
training mode, ...). Those still run sharded, but each rank's slice is its own batch.
Bits also need the same backend and device type on every rank as in the reference run,
and a model whose output for a row does not depend on the batch size: true of
``pygen.models``; a neural network on a GPU may get other GEMM/conv kernels for another
batch size (cuBLAS/cuDNN heuristics), and then rows agree to rounding, not to the bit.

``sampler_fn`` is called with x_T (or the shape) as its first positional argument and
everything else as keywords: the convention of ``pygen.mcmc`` (``ula(x, score_fn=...)``)
and ``pygen.sample(model, ...)`` via ``functools.partial``. The ``pygen.sde`` samplers take
``(score_fn, sde, shape, *, x_T=...)``; wrap them with :func:`shape_or_x_T`::

    import functools, torch, pygen
    from pygen import distributed as pd

    mix = pygen.models.clot()
    sde = pygen.schedules.VPSDE(0.1, 20.0, 1000)
    score = mix.model_fn("score", sde=sde)
    fn = pd.shape_or_x_T(pygen.sde.pc_sample, score, sde)   # = lambda s, **kw: pc_sample(score, sde, s, **kw)
    x = pd.sample(fn, (4096, 2), seed=pd.row_seeds(0, 4096), n_steps=100, norm="row")
    # MCMC: x0 is sharded by rows
    x = pd.sample(pygen.mcmc.ula, x0, seed=7, score_fn=mix.model_fn("grad_log_prob"),
                  step_size=1e-2, n_steps=100)
    # pygen.sample: functools.partial(pygen.sample, model) or pd.sample(lambda s, **kw: pygen.sample(model, s, **kw), ...)

An int ``seed`` is expanded to per-row seeds by :func:`row_seeds` (splitmix64 of the seed
and the row index), so ``sample(fn, x, seed=7)`` equals ``fn(x, seed=row_seeds(7, n))``.

torchrun::

    torchrun --nproc_per_node=2 -m pygen.distributed          # self-check, prints on rank 0
    torchrun --nproc_per_node=8 my_script.py                  # your script:

    # my_script.py
    import os, torch, torch.distributed as dist, pygen
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))   # NCCL needs each rank on its GPU
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    x = pygen.distributed.sample(fn, (n, 2), seed=0, device="cuda" if torch.cuda.is_available() else "cpu", ...)
    dist.destroy_process_group()

Collectives: :func:`gather` exchanges each rank's row count, trailing shape and dtype
(``all_gather_object``), then ``all_gather``s the rows padded to the largest shard, as raw
bytes (bit-exact for any dtype). It runs on the local tensor's device; a CPU tensor on an
NCCL group goes through the current CUDA device and comes back, a CUDA tensor on a
gloo-only group goes through the CPU. Every rank must call it (and :func:`sample`) with
the same arguments; a rank whose sampler raises leaves the others waiting in the gather
until the process group's timeout.
"""
import math
import numbers
import os

import torch

__all__ = [
    "is_distributed",
    "get_rank",
    "get_world_size",
    "shard_range",
    "shard",
    "gather",
    "row_seeds",
    "shape_or_x_T",
    "sample",
]

_U64 = 1 << 64


def _dist():
    import torch.distributed as dist

    return dist


# ---------------------------------------------------------------------------
# rank / world with a single-process fallback
# ---------------------------------------------------------------------------
def is_distributed():
    """True when ``torch.distributed`` is available and a default process group is initialised."""
    dist = _dist()
    return dist.is_available() and dist.is_initialized()


def get_rank(group=None):
    """This process's rank in ``group`` (default group), or 0 when not distributed."""
    return _dist().get_rank(group) if is_distributed() else 0


def get_world_size(group=None):
    """The number of ranks in ``group`` (default group), or 1 when not distributed."""
    return _dist().get_world_size(group) if is_distributed() else 1


def _check_count(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


# ---------------------------------------------------------------------------
# sharding
# ---------------------------------------------------------------------------
def shard_range(n, rank=None, world_size=None):
    """``(start, stop)`` of rank's contiguous slice of ``n`` rows split over ``world_size`` ranks.

    Balanced: the first ``n % world_size`` ranks get ``n // world_size + 1`` rows, the
    others ``n // world_size`` (possibly 0). ``rank``/``world_size`` default to this
    process's (rank 0 of 1 when not distributed).
    """
    n = _check_count("n", n, 0)
    world_size = get_world_size() if world_size is None else _check_count("world_size", world_size, 1)
    rank = get_rank() if rank is None else _check_count("rank", rank, 0)
    if rank >= world_size:
        raise ValueError(f"rank must be < world_size ({world_size}), got {rank}")
    q, r = divmod(n, world_size)
    start = rank * q + min(rank, r)
    return start, start + q + (1 if rank < r else 0)


def shard(tensor, group=None):
    """This rank's rows of ``tensor`` (a view of ``tensor[start:stop]``, see :func:`shard_range`)."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"tensor must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dim() < 1:
        raise ValueError("tensor must have a batch dimension (dim >= 1), got a 0-d tensor")
    start, stop = shard_range(tensor.shape[0], get_rank(group), get_world_size(group))
    return tensor[start:stop]


def _backend_kind(group):
    """'nccl' / 'gloo' when the group runs only that backend, else None (use the tensor's device)."""
    name = str(_dist().get_backend(group)).lower()
    if "nccl" in name and "gloo" not in name:
        return "nccl"
    if "gloo" in name and "nccl" not in name:
        return "gloo"
    return None


def _comm_device(kind, device):
    """Device the collective runs on for a tensor on ``device``."""
    if kind == "nccl" and device.type != "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    if kind == "gloo" and device.type != "cpu":
        return torch.device("cpu")
    return device


def gather(local, n=None, group=None):
    """Concatenate every rank's ``local`` rows, in rank order, on every rank.

    ``local`` is a tensor (batch dimension first; shards may have different numbers of
    rows, including 0) or ``None`` for a rank that has no rows: it then takes the
    trailing shape and dtype from the other ranks and returns on the CPU (on the current
    CUDA device for an NCCL group). All shards with rows must share trailing shape and
    dtype. ``n``, if given, is the expected total number of rows (checked on every rank).
    Bit-exact: rows travel as raw bytes, padded to the largest shard. Without
    ``torch.distributed`` (or with a world of 1) it returns ``local`` itself.
    """
    if local is not None and not isinstance(local, torch.Tensor):
        raise TypeError(f"local must be a torch.Tensor or None, got {type(local).__name__}")
    if local is not None and local.dim() < 1:
        raise ValueError("local must have a batch dimension (dim >= 1), got a 0-d tensor")
    if n is not None:
        n = _check_count("n", n, 0)
    if not is_distributed() or get_world_size(group) == 1:
        if local is None:
            raise ValueError("local is None but there is no other rank to take the rows from")
        if n is not None and local.shape[0] != n:
            raise ValueError(f"gathered {local.shape[0]} rows, expected n={n}")
        return local
    dist = _dist()
    kind = _backend_kind(group)
    meta = None if local is None else (int(local.shape[0]), tuple(local.shape[1:]), local.dtype)
    metas = [None] * dist.get_world_size(group)
    dist.all_gather_object(metas, meta, group=group)
    # every rank sees the same metas, so every rank raises (or not) alike: no rank is left waiting
    with_rows = [m for m in metas if m is not None and m[0] > 0]
    ref = with_rows[0] if with_rows else next((m for m in metas if m is not None), None)
    if ref is None:
        raise ValueError("local is None on every rank: nothing to gather")
    for r, m in enumerate(metas):
        if m is not None and m[0] > 0 and m[1:] != ref[1:]:
            raise ValueError(f"rank {r} has rows of shape {m[1]} and dtype {m[2]}; "
                             f"another rank has {ref[1]} and {ref[2]}")
    rows = [0 if m is None else m[0] for m in metas]
    total = sum(rows)
    if n is not None and total != n:
        raise ValueError(f"gathered {total} rows, expected n={n}")
    trailing, dtype = ref[1], ref[2]
    if local is None:
        out_device = torch.device("cuda", torch.cuda.current_device()) if kind == "nccl" else torch.device("cpu")
    else:
        out_device = local.device
    row_bytes = math.prod(trailing) * torch.empty((), dtype=dtype).element_size()
    if row_bytes == 0 or total == 0:
        return torch.empty((total,) + trailing, dtype=dtype, device=out_device)
    dev = _comm_device(kind, out_device)
    buf = torch.zeros((max(rows), row_bytes), dtype=torch.uint8, device=dev)
    k = 0 if local is None else local.shape[0]
    if k:
        buf[:k] = local.contiguous().reshape(k, -1).view(torch.uint8).to(dev)
    parts = [torch.empty_like(buf) for _ in rows]
    dist.all_gather(parts, buf, group=group)
    joined = torch.cat([p[:r] for p, r in zip(parts, rows)])
    return joined.view(dtype).reshape((total,) + trailing).to(out_device)


# ---------------------------------------------------------------------------
# per-row seeds
# ---------------------------------------------------------------------------
def _s64(v):
    v %= _U64
    return v - _U64 if v >= 1 << 63 else v


_GOLDEN = _s64(0x9E3779B97F4A7C15)
_M1 = _s64(0xBF58476D1CE4E5B9)
_M2 = _s64(0x94D049BB133111EB)


def _shr(z, k):
    """Logical right shift of int64 bit patterns."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def row_seeds(seed, n, *, device=None):
    """Per-row seeds ``(n,)`` int64 for an int ``seed``: splitmix64 of ``seed`` and the row.

    ``seeds[i] = mix64(seed + (i + 1)·0x9E3779B97F4A7C15)`` with splitmix64's finaliser
    ``z ^= z >> 30; z *= 0xBF58476D1CE4E5B9; z ^= z >> 27; z *= 0x94D049BB133111EB; z ^= z >> 31``
    (64-bit wrap-around, logical shifts; stored as signed int64). Row i's seed depends only
    on (seed, i), so it is the same whichever rank holds row i; nearby base seeds give
    unrelated rows (unlike ``seed + i``, where seed 0 row 1 would equal seed 1 row 0).
    """
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if not -(1 << 63) <= seed < _U64:
        raise ValueError(f"seed must fit in 64 bits, got {seed}")
    n = _check_count("n", n, 0)
    i = torch.arange(1, n + 1, dtype=torch.int64, device=device)
    z = i * _GOLDEN + _s64(int(seed))
    z = (z ^ _shr(z, 30)) * _M1
    z = (z ^ _shr(z, 27)) * _M2
    return z ^ _shr(z, 31)


# ---------------------------------------------------------------------------
# sampling
# ---------------------------------------------------------------------------
def shape_or_x_T(fn, *args, **kwargs):
    """Adapter for samplers called as ``fn(*args, shape, ..., x_T=None, ...)`` (``pygen.sde``).

    Returns ``g(x_T_or_shape, **kw)`` that calls ``fn(*args, shape, **kwargs, **kw)`` for a
    shape and ``fn(*args, x_T=x_T, **kwargs, **kw)`` for a tensor, e.g.
    ``shape_or_x_T(pygen.sde.pc_sample, score_fn, sde)``.
    """
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")

    def g(x_T_or_shape, **kw):
        if isinstance(x_T_or_shape, torch.Tensor):
            return fn(*args, x_T=x_T_or_shape, **kwargs, **kw)
        return fn(*args, x_T_or_shape, **kwargs, **kw)

    g.__wrapped__ = fn
    return g



def _check_shape(shape):
    if isinstance(shape, torch.Size):
        shape = tuple(shape)
    if not isinstance(shape, (tuple, list)) or len(shape) < 1 or not all(
            isinstance(s, numbers.Integral) and not isinstance(s, bool) and s >= 0 for s in shape):
        raise ValueError(f"x_T_or_shape must be a tensor or a non-empty tuple of non-negative ints, got {shape!r}")
    if shape[0] < 1:
        raise ValueError(f"x_T_or_shape must have at least one row, got shape {tuple(shape)}")
    return tuple(int(s) for s in shape)


def _seed_device(x_T, kwargs, seed):
    if x_T is not None:
        return x_T.device
    if kwargs.get("device") is not None:
        return torch.device(kwargs["device"])
    return seed.device if isinstance(seed, torch.Tensor) else None


def sample(sampler_fn, x_T_or_shape, *, seed, group=None, **kwargs):
    """Run ``sampler_fn`` on this rank's rows and gather the whole batch on every rank.

    Args:
        sampler_fn: ``sampler_fn(x_T_or_shape, *, seed, **kwargs)`` -> a tensor with one row
            per input row (batch first), or a tuple/list of such tensors (gathered one by
            one, e.g. mala's ``(x, accept_rate)``). See the module docstring and
            :func:`shape_or_x_T`.
        x_T_or_shape: the starting batch (a tensor, split by rows) or its shape (rank r
            passes ``(rows_r,) + shape[1:]``).
        seed: per-row seeds, a 1-D int64 tensor of length n (moved to x_T's device, or to
            ``kwargs["device"]``); or an int, expanded with :func:`row_seeds`. Rows are
            bit-identical to the single-process run for row-local samplers.
        group: the process group (default: the default group).
        **kwargs: passed to ``sampler_fn``.

    A rank with no rows (n < world size) does not call ``sampler_fn``; it still joins the
    gather and takes the result's trailing shape and dtype from the other ranks. Without
    ``torch.distributed`` this is ``sampler_fn(x_T_or_shape, seed=seeds, **kwargs)``.
    Returns the (n, ...) result (or tuple/list of them) on every rank.
    """
    if not callable(sampler_fn):
        raise TypeError(f"sampler_fn must be callable, got {type(sampler_fn).__name__}")
    if "seed" in kwargs:  # pragma: no cover - Python already rejects a duplicate keyword
        raise TypeError("seed given twice")
    if isinstance(x_T_or_shape, torch.Tensor):
        x_T, shape = x_T_or_shape, None
        if x_T.dim() < 1 or x_T.shape[0] < 1:
            raise ValueError(f"x_T_or_shape must have at least one row, got shape {tuple(x_T.shape)}")
        n = x_T.shape[0]
    else:
        x_T, shape = None, _check_shape(x_T_or_shape)
        n = shape[0]
    device = _seed_device(x_T, kwargs, seed)
    if isinstance(seed, torch.Tensor):
        if seed.dtype != torch.int64:
            raise TypeError(f"seed tensor must have dtype int64, got {seed.dtype}")
        if seed.dim() != 1 or seed.shape[0] != n:
            raise ValueError(f"seed tensor must be 1-D with one seed per row (length {n}), got shape "
                             f"{tuple(seed.shape)}")
        seeds = seed if device is None else seed.to(device)
    elif isinstance(seed, numbers.Integral) and not isinstance(seed, bool):
        seeds = row_seeds(seed, n, device=device)
    else:
        raise TypeError(f"seed must be an int or a 1-D int64 tensor, got {type(seed).__name__}")

    world = get_world_size(group)
    if world == 1:
        return _call(sampler_fn, x_T if x_T is not None else shape, seeds, kwargs, n)
    start, stop = shard_range(n, get_rank(group), world)
    local = None
    if stop > start:
        arg = x_T[start:stop] if x_T is not None else (stop - start,) + shape[1:]
        local = _call(sampler_fn, arg, seeds[start:stop], kwargs, stop - start)
    # the structure (tensor, or tuple/list of k tensors) from a rank with rows; ranks with
    # rows agree on it (same sampler), ranks without rows learn it here
    kinds = [None] * world
    _dist().all_gather_object(kinds, None if local is None else _structure(local), group=group)
    kind = next(k for k in kinds if k is not None)
    if any(k is not None and k != kind for k in kinds):
        raise ValueError(f"sampler_fn returned different structures on different ranks: {kinds}")
    if kind == "tensor":
        return gather(local, n=n, group=group)
    parts = [gather(None if local is None else t, n=n, group=group) for t in
             (local if local is not None else [None] * kind[1])]
    return tuple(parts) if kind[0] == "tuple" else parts


def _structure(out):
    return "tensor" if isinstance(out, torch.Tensor) else (type(out).__name__, len(out))


def _call(sampler_fn, arg, seeds, kwargs, rows):
    """sampler_fn on rows: a tensor or a tuple/list of tensors, each with ``rows`` rows
    (e.g. ``pygen.mcmc.mala`` returns ``(x, accept_rate)``)."""
    out = sampler_fn(arg, seed=seeds, **kwargs)
    items = [out] if isinstance(out, torch.Tensor) else out if isinstance(out, (tuple, list)) else None
    if not items or not all(isinstance(t, torch.Tensor) for t in items):
        raise TypeError(f"sampler_fn must return a tensor or a tuple/list of tensors, got {type(out).__name__}")
    for t in items:
        if t.dim() < 1 or t.shape[0] != rows:
            raise ValueError(f"sampler_fn returned shape {tuple(t.shape)} for {rows} rows; "
                             "it must return one row per input row")
    return out


# ---------------------------------------------------------------------------
# torchrun self-check: torchrun --nproc_per_node=2 -m pygen.distributed
# ---------------------------------------------------------------------------
def _self_check(n=7, n_steps=20):
    import pygen

    dist = _dist()
    started = False
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and not is_distributed():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if cuda else "gloo")
        started = True
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    try:
        sde = pygen.schedules.VPSDE(0.1, 20.0, 1000)
        score = pygen.models.clot(device=device, dtype=torch.float32).model_fn("score", sde=sde)
        fn = shape_or_x_T(pygen.sde.pc_sample, score, sde)
        kw = dict(n_steps=n_steps, norm="row", device=device)
        x = sample(fn, (n, 2), seed=2024, **kw)
        if get_rank() == 0:
            ref = fn((n, 2), seed=row_seeds(2024, n, device=device), **kw)
            ok = torch.equal(x, ref)
            print(f"pygen.distributed: world_size={get_world_size()} backend="
                  f"{dist.get_backend() if is_distributed() else 'none'} rows={n} "
                  f"bit-identical to a single-process run: {ok}", flush=True)
            return ok
        return True
    finally:
        if started:
            dist.destroy_process_group()


if __name__ == "__main__":
    raise SystemExit(0 if _self_check() else 1)
