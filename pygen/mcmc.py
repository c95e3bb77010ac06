"""MCMC samplers for energy-based models: ``pygen.mcmc.ula``, ``mala``, ``hmc``, ``replica_exchange``.

Conventions shared by every sampler (k-diffusion style: a plain function that
runs the whole loop under ``torch.no_grad()`` and calls ``callback(dict)``
after each step):

* All chains live in one batched tensor ``x`` of shape ``(chains, *event)``;
  every update is a batched op over all chains (no Python loop over chains)
  and accept masks, counters and swaps stay on the device: the step loop
  never syncs with the host. ``x`` itself is never modified; the samplers
  return new tensors.
* ``energy_fn(x) -> (chains,)`` energies ``E``; the target is
  ``π(x) ∝ exp(-E(x))``. Its gradient comes from ``torch.autograd``.
  ``score_fn(x) -> ∇ log π(x)`` (same shape and dtype as ``x``) can replace
  ``energy_fn`` where no energy is needed (``ula``).
* ``step_size`` is a float or a 1-D tensor with one step per chain
  (``replica_exchange``: per replica). Langevin moves use pygen's convention
  ``x' = x + (dt/2)·∇log π(x) + sqrt(dt)·z`` (seed 000); HMC uses ``dt`` as the
  leapfrog step.
* ``seed`` is an int, or a 1-D int64 tensor with one seed per chain (then a
  chain's result does not depend on the batch it is in; not for
  ``replica_exchange``). ``stream`` offsets every noise stream.
* No global RNG state is read or changed. All randomness is pygen's
  counter-based noise, so a run is reproducible from ``(seed, stream)`` and the
  same on every backend up to fp32 rounding. Step ``i`` (0-based) draws

  - its move noise (the Langevin ``z``, or the HMC momentum ``p = sqrt(m)·z``)
    as ``pygen.randn(x.shape, seed, noise_stream(stream, i, LANE_MOVE))``;
  - its Metropolis uniforms as ``u = Φ(z)``, computed as
    ``log u = torch.special.log_ndtr(z)`` with
    ``z = pygen.randn((chains,), seed, noise_stream(stream, i, LANE_ACCEPT))``
    (Φ the standard normal CDF, so ``u`` is exactly uniform on (0, 1));
    chain ``b`` accepts when ``log u[b] < log α[b]``;
  - replica exchange swap round ``j`` (0-based) uses ``LANE_SWAP`` and
    stream index ``j`` in the same way (see ``replica_exchange``),

  where ``noise_stream(stream, i, lane) = (stream + i + lane·2**62) mod 2**64``.

CUDA graphs: with ``cuda_graph=True`` (CUDA tensors) a step takes its noise
streams from a step counter on the device instead (the kernels add it to the
lane's base stream; the step advances it) and updates the chains, energies and
gradients in place, so one step (replica exchange: the move and the swap round
of each parity) is captured once and replayed, with the same results as the
eager loop; the user's energy and its autograd gradient are captured with it. A
capture that fails warns once and the loop finishes eagerly.

Fused ops (pygen/ops/mcmc.py, on every backend): the Langevin proposal is one
``pygen.langevin_step`` (noise drawn in the kernel); HMC's leapfrog updates are
``pygen.leapfrog_`` (one kernel per gradient evaluation); every accept/reject
and every replica swap is ``pygen.mh_select_``. The log-acceptance ratios
(per-chain reductions) and the user's energy and its autograd gradient are
plain torch. The backend is resolved once per call, at set-up, as for every
pygen op (``pygen.use_backend`` / ``PYGEN_BACKEND``).
"""
import math
import numbers

import torch

from pygen import _backend
from pygen.ops._common import (STORAGE_DTYPES, call_compiled, check_stream, check_tensor, needs_grad, split_seed,
                               to_signed64)
from pygen.ops.langevin import langevin_step_reference
from pygen.ops.mcmc import check_step_size, leapfrog_impl, mh_select_impl
from pygen.ops.random import randn_fill_reference
from pygen.samplers.program import StepGraphs, graph_device

__all__ = ["ula", "mala", "hmc", "replica_exchange", "noise_stream", "LANE_MOVE", "LANE_ACCEPT", "LANE_SWAP"]

LANE_MOVE, LANE_ACCEPT, LANE_SWAP = 0, 1, 2
_LANE_STRIDE = 1 << 62


def noise_stream(stream, step, lane):
    """The pygen noise stream of step ``step`` in ``lane``: ``(stream + step + lane·2**62) mod 2**64``
    (as the signed int64 the ops take)."""
    return to_signed64(stream + step + lane * _LANE_STRIDE)


# ---------------------------------------------------------------------------
# set-up: checks and the ops of one backend
# ---------------------------------------------------------------------------
class _Ops:
    """The ops of the backend serving ``device``, resolved once (no per-step dispatch or checks)."""

    def __init__(self, device):
        self.backend = _backend.resolve(device)
        self.leapfrog_ = leapfrog_impl(self.backend)
        self.mh_select_ = mh_select_impl(self.backend)

    # The noise ops take a lane's base stream plus ``step``, the loop's step counter on the device (the
    # kernels read it), so that a step replays unchanged in a CUDA graph.
    def langevin(self, x, score, step_sizes, step_size, seed, stream, row_seeds, step):
        if self.backend == "torch":
            return langevin_step_reference(x, score, step_sizes, step_size, None, seed, stream, row_seeds, step)
        if self.backend == "triton":
            from pygen.kernels import langevin as tk

            return tk.langevin_step(x, score, step_sizes, step_size, None, seed, stream, row_seeds, step)
        return call_compiled(torch.ops.pygen.langevin_step.default, needs_grad(x, score, step_sizes), x, score,
                             step_sizes, step_size, None, seed, stream, row_seeds, step)

    def randn(self, shape, seed, stream, row_seeds, step, *, device, dtype):
        out = torch.empty(shape, device=device, dtype=dtype)
        if self.backend == "torch":
            randn_fill_reference(out, seed, stream, row_seeds, step)
        elif self.backend == "triton":
            from pygen.kernels import random as tk

            tk.randn_fill(out, seed, stream, row_seeds, step)
        else:
            torch.ops.pygen.randn_fill_(out, seed, stream, row_seeds, step)
        return out

    def log_uniform(self, n, seed, stream, row_seeds, step, *, device, dtype):
        """``log Φ(z)``, z = pygen.randn((n,), seed, stream + step): logs of uniforms in (0, 1)."""
        z = self.randn((n,), seed, stream, row_seeds, step, device=device, dtype=torch.float32)
        return torch.special.log_ndtr(z.to(dtype))


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_count(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)


def _setup(x, step_size, n_steps, seed, stream, callback, *, positive_step, cuda_graph=False):
    """Shared checks -> (state, ops, step_sizes, step_size, seed, row_seeds, stream, n_steps, graphs)."""
    check_tensor("x", x, dtypes=STORAGE_DTYPES, ndim_min=1)
    n_steps = _check_count("n_steps", n_steps)
    step_sizes, step_size = check_step_size(step_size, x, positive=positive_step)
    seed_i, row_seeds = split_seed(seed, x.shape[0], x.device)
    stream = check_stream(stream)
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable or None, got {type(callback).__name__}")
    if not isinstance(cuda_graph, bool):
        raise TypeError(f"cuda_graph must be a bool, got {type(cuda_graph).__name__}")
    state = x.detach().clone(memory_format=torch.contiguous_format)
    graphs = StepGraphs(cuda_graph and graph_device(x))  # (CPU tensors: one warning, eager)
    return state, _Ops(x.device), step_sizes, step_size, seed_i, row_seeds, stream, n_steps, graphs


class _Steps:
    """The noise streams of loop step i. Eagerly: the host values ``noise_stream(stream, i, lane)``. While
    ``graphs`` captures (or after a capture): each lane's base stream plus a step counter on the device,
    which the noise kernels read and the step advances, so the captured step replays unchanged."""

    def __init__(self, stream, graphs, device):
        self.stream, self.graphs = stream, graphs
        self.counter = torch.zeros(1, dtype=torch.int64, device=device)

    def at(self, i):
        """(the device offset or None, the host step k): lane L's stream is ``noise_stream(stream, k, L)``
        (plus the offset, added by the kernels)."""
        return (self.counter, 0) if self.graphs.enabled else (None, i)

    @staticmethod
    def advance(offset):
        if offset is not None:
            offset.add_(1)


def _keep(graphs, cur, new):
    """The loop state after a step that made ``new``: eagerly ``new`` itself; while ``graphs`` captures or
    replays, ``new`` copied into ``cur`` (a captured step leaves the state in the buffer it read)."""
    if graphs.enabled:
        return cur.copy_(new)
    return new


def _check_fn(name, fn):
    if not callable(fn):
        raise TypeError(f"{name} must be callable, got {type(fn).__name__}")


def _check_energy(e, x):
    if not isinstance(e, torch.Tensor):
        raise TypeError(f"energy_fn must return a tensor of energies, got {type(e).__name__}")
    if e.shape != (x.shape[0],):
        raise ValueError(f"energy_fn must return one energy per chain, shape ({x.shape[0]},), got {tuple(e.shape)}")
    if not e.is_floating_point():
        raise TypeError(f"energy_fn must return floating-point energies, got {e.dtype}")
    if e.device != x.device:
        raise ValueError(f"energy_fn must return energies on {x.device}, got {e.device}")


def _energy_grad(energy_fn, x, acc):
    """(E(x) as ``acc`` (chains,), ∇E(x) like x, contiguous) via autograd."""
    with torch.enable_grad():
        xr = x.detach().requires_grad_(True)
        e = energy_fn(xr)
        _check_energy(e, x)
        (g,) = torch.autograd.grad(e.sum(), xr, allow_unused=True)
    if g is None:
        g = torch.zeros_like(x)
    return e.detach().to(acc), g.contiguous()


def _score(score_fn, x):
    s = score_fn(x)
    if not isinstance(s, torch.Tensor):
        raise TypeError(f"score_fn must return a tensor, got {type(s).__name__}")
    if s.shape != x.shape:
        raise ValueError(f"score_fn must return a tensor of x's shape {tuple(x.shape)}, got {tuple(s.shape)}")
    if s.dtype != x.dtype:
        raise TypeError(f"score_fn must return x's dtype {x.dtype}, got {s.dtype}")
    if s.device != x.device:
        raise ValueError(f"score_fn must return a tensor on {x.device}, got {s.device}")
    return s.contiguous()


def _sqnorm(t):
    """Per-chain squared norm of a (chains, *event) tensor."""
    return t.reshape(t.shape[0], -1).square().sum(1)


def _rows(t, ndim):
    return t.reshape((-1,) + (1,) * (ndim - 1))


class _MH:
    """Per-chain Metropolis–Hastings bookkeeping: the accept buffer and counts, on the device."""

    def __init__(self, ops, chains, device, acc):
        self.ops = ops
        self.accepted = torch.empty(chains, device=device, dtype=acc)
        self.count = torch.zeros(chains, device=device, dtype=acc)

    def select(self, log_accept, log_u, pairs):
        """Accept per chain; apply the same decision to every (current, proposed) pair."""
        for cur, prop in pairs:
            self.ops.mh_select_(cur, prop, log_accept, log_u, self.accepted)
        self.count += self.accepted
        return self.accepted


# ---------------------------------------------------------------------------
# samplers
# ---------------------------------------------------------------------------
@torch.no_grad()
def ula(x, score_fn=None, energy_fn=None, *, step_size, n_steps, seed, stream=0, callback=None, cuda_graph=False):
    """Unadjusted Langevin: ``x <- x + (dt/2)·∇log π(x) + sqrt(dt)·z`` for ``n_steps`` steps.

    Args:
        x: initial chains, (chains, *event), float32/float16/bfloat16/float64.
        score_fn: ``x -> ∇ log π(x)`` (x's shape and dtype); or
        energy_fn: ``x -> E(x)`` of shape (chains,); the score is ``-∇E`` by autograd.
            Give exactly one of the two.
        step_size: ``dt`` >= 0, a float or one per chain (1-D float32/float64).
        n_steps: number of steps (>= 1).
        seed, stream: noise (module docstring); step i is one
            ``pygen.langevin_step`` with ``seed`` and ``noise_stream(stream, i, LANE_MOVE)``.
        callback: called after each step with ``{"x", "i", "score"}`` (copies).
        cuda_graph: capture one step (the score or energy gradient and the move) in a CUDA graph
            and replay it (CUDA tensors; module docstring).

    Returns the chains after the last step (biased by O(dt): no accept/reject).
    """
    if (score_fn is None) == (energy_fn is None):
        raise ValueError("pass exactly one of score_fn and energy_fn")
    _check_fn("score_fn" if score_fn is not None else "energy_fn", score_fn or energy_fn)
    x, ops, step_sizes, step_size, seed, row_seeds, stream, n_steps, graphs = _setup(
        x, step_size, n_steps, seed, stream, callback, positive_step=False, cuda_graph=cuda_graph)
    acc = _acc_dtype(x.dtype)
    steps = _Steps(stream, graphs, x.device)

    def step(i):
        nonlocal x
        offset, k = steps.at(i)
        score = _score(score_fn, x) if score_fn is not None else _energy_grad(energy_fn, x, acc)[1].neg_()
        new = ops.langevin(x, score, step_sizes, step_size, seed, noise_stream(stream, k, LANE_MOVE), row_seeds,
                           offset)
        x = _keep(graphs, x, new)
        steps.advance(offset)
        return score

    for i in range(n_steps):
        score = graphs("step", step, i)
        if callback is not None:
            callback({"x": x.clone(), "i": i, "score": score.clone()})
    return x


def _mala_log_accept(x, xp, e, ep, s, sp, half_dt, inv_2dt, acc):
    """log α = E(x) - E(x') + log q(x | x') - log q(x' | x), q(a | b) = N(a; b + (dt/2)·s(b), dt·I)."""
    xa, xpa = x.to(acc), xp.to(acc)
    fwd = _sqnorm(xpa - xa - half_dt * s.to(acc))
    rev = _sqnorm(xa - xpa - half_dt * sp.to(acc))
    return e - ep + (fwd - rev) * inv_2dt


def _metropolis_loop(propose, x, energy_fn, ops, seed, stream, row_seeds, n_steps, graphs, callback):
    """The accept/reject loop shared by MALA and HMC: step i calls ``propose(e, g, offset, k)`` -> (x', E(x'),
    ∇E(x'), log α) from the chains ``x`` and their energies / gradients (noise streams at host step k plus
    the device offset, see ``_Steps``), accepts per chain with ``LANE_ACCEPT``'s uniforms and selects x, E
    and ∇E in place. Returns ``(x, accept_rate)``."""
    acc = _acc_dtype(x.dtype)
    chains = x.shape[0]
    mh = _MH(ops, chains, x.device, acc)
    e, g = _energy_grad(energy_fn, x, acc)
    steps = _Steps(stream, graphs, x.device)

    def step(i):  # x, g, e updated in place
        offset, k = steps.at(i)
        xp, ep, gp, log_accept = propose(e, g, offset, k)
        log_u = ops.log_uniform(chains, seed, noise_stream(stream, k, LANE_ACCEPT), row_seeds, offset,
                                device=x.device, dtype=acc)
        steps.advance(offset)
        return mh.select(log_accept, log_u, [(x, xp), (g, gp), (e.view(-1, 1), ep.view(-1, 1))]), log_accept

    for i in range(n_steps):
        accepted, log_accept = graphs("step", step, i)
        if callback is not None:
            callback({"x": x.clone(), "i": i, "accepted": accepted.clone(), "log_accept": log_accept.clone()})
    return x, mh.count / n_steps


def _step_coeffs(step_sizes, step_size, ndim, acc):
    """(dt/2 broadcasting over x, 1/(2dt) per chain) for a per-chain or scalar step."""
    if step_sizes is None:
        return 0.5 * step_size, 0.5 / step_size
    dt = step_sizes.to(acc)
    return _rows(0.5 * dt, ndim), 0.5 / dt


@torch.no_grad()
def mala(x, energy_fn, *, step_size, n_steps, seed, stream=0, callback=None, cuda_graph=False):
    """Metropolis-adjusted Langevin: exact for ``π ∝ exp(-E)`` at any step size.

    Step i proposes ``x' = pygen.langevin_step(x, -∇E(x), dt, seed, noise_stream(stream, i, LANE_MOVE))``
    and accepts per chain when ``log u < log α`` with
    ``log α = E(x) - E(x') + log q(x | x') - log q(x' | x)``,
    ``q(a | b) = N(a; b - (dt/2)·∇E(b), dt·I)`` and ``u`` from ``LANE_ACCEPT``
    (module docstring); the select is ``pygen.mh_select_``.

    Args: as ``ula`` with ``energy_fn``; ``step_size`` must be > 0.
        callback gets ``{"x", "i", "accepted", "log_accept"}`` (copies).

    Returns ``(x, accept_rate)``: the chains after the last step and each
    chain's fraction of accepted proposals (shape (chains,), fp32; fp64 for
    fp64 x).
    """
    _check_fn("energy_fn", energy_fn)
    x, ops, step_sizes, step_size, seed, row_seeds, stream, n_steps, graphs = _setup(
        x, step_size, n_steps, seed, stream, callback, positive_step=True, cuda_graph=cuda_graph)
    acc = _acc_dtype(x.dtype)
    half_dt, inv_2dt = _step_coeffs(step_sizes, step_size, x.dim(), acc)

    def propose(e, g, offset, k):  # a Langevin proposal from the current gradient
        s = g.neg()
        xp = ops.langevin(x, s, step_sizes, step_size, seed, noise_stream(stream, k, LANE_MOVE), row_seeds, offset)
        ep, gp = _energy_grad(energy_fn, xp, acc)
        return xp, ep, gp, _mala_log_accept(x, xp, e, ep, s, gp.neg(), half_dt, inv_2dt, acc)

    return _metropolis_loop(propose, x, energy_fn, ops, seed, stream, row_seeds, n_steps, graphs, callback)


@torch.no_grad()
def hmc(x, energy_fn, *, step_size, n_leapfrog, n_steps, seed, mass=1.0, stream=0, callback=None, cuda_graph=False):
    """Hamiltonian Monte Carlo for ``π ∝ exp(-E)`` with ``H(x, p) = E(x) + |p|²/(2·mass)``.

    Step i draws ``p = sqrt(mass)·pygen.randn(x.shape, seed, noise_stream(stream, i, LANE_MOVE))``,
    runs ``n_leapfrog`` leapfrog steps of size ``dt`` with the fused
    ``pygen.leapfrog_`` (half kick + drift, full kicks + drifts, closing half
    kick: one kernel per gradient evaluation, ``n_leapfrog`` gradient
    evaluations per step), and accepts per chain when
    ``log u < H(x, p) - H(x', p')`` (``u`` from ``LANE_ACCEPT``) with
    ``pygen.mh_select_``. The energy and gradient at the current state are
    carried over between steps (selected with the state).

    Args: as ``mala``, plus ``n_leapfrog`` (>= 1) and ``mass`` (float > 0).
        ``step_size`` (> 0) may be one per chain. callback gets
        ``{"x", "i", "accepted", "log_accept"}``.

    Returns ``(x, accept_rate)`` as ``mala``.
    """
    _check_fn("energy_fn", energy_fn)
    n_leapfrog = _check_count("n_leapfrog", n_leapfrog)
    if isinstance(mass, bool) or not isinstance(mass, numbers.Real):
        raise TypeError(f"mass must be a float, got {type(mass).__name__}")
    mass = float(mass)
    if not 0.0 < mass < math.inf:
        raise ValueError(f"mass must be a finite positive number, got {mass}")
    x, ops, step_sizes, step_size, seed, row_seeds, stream, n_steps, graphs = _setup(
        x, step_size, n_steps, seed, stream, callback, positive_step=True, cuda_graph=cuda_graph)
    acc = _acc_dtype(x.dtype)
    inv_m, sqrt_m = 1.0 / mass, math.sqrt(mass)

    def propose(e, g, offset, k):  # a leapfrog trajectory from a fresh momentum
        p = ops.randn(x.shape, seed, noise_stream(stream, k, LANE_MOVE), row_seeds, offset, device=x.device,
                      dtype=x.dtype)
        if mass != 1.0:
            p.mul_(sqrt_m)
        h0 = e + _sqnorm(p.to(acc)) * (0.5 * inv_m)
        xq = x.clone()
        ops.leapfrog_(xq, p, g, step_sizes, step_size, 0.5, inv_m)
        for _ in range(n_leapfrog - 1):
            _, gq = _energy_grad(energy_fn, xq, acc)
            ops.leapfrog_(xq, p, gq, step_sizes, step_size, 1.0, inv_m)
        eq, gq = _energy_grad(energy_fn, xq, acc)
        ops.leapfrog_(xq, p, gq, step_sizes, step_size, 0.5, 0.0)
        return xq, eq, gq, h0 - (eq + _sqnorm(p.to(acc)) * (0.5 * inv_m))

    return _metropolis_loop(propose, x, energy_fn, ops, seed, stream, row_seeds, n_steps, graphs, callback)


def _check_betas(betas):
    """-> list of floats in [0, 1], strictly monotone, at least two."""
    if isinstance(betas, torch.Tensor):
        if betas.dim() != 1 or not betas.is_floating_point():
            raise ValueError(f"betas must be a 1-D float tensor or a sequence of floats, got {betas.dtype} "
                             f"of shape {tuple(betas.shape)}")
        values = [float(b) for b in betas.detach().cpu().tolist()]  # set-up, not the step loop
    else:
        try:
            values = list(betas)
        except TypeError:
            raise TypeError(f"betas must be a sequence of floats, got {type(betas).__name__}") from None
        for b in values:
            if isinstance(b, bool) or not isinstance(b, numbers.Real):
                raise TypeError(f"betas must hold floats, got {type(b).__name__}")
        values = [float(b) for b in values]
    if len(values) < 2:
        raise ValueError(f"betas must hold at least two temperatures, got {values}")
    if not all(0.0 <= b <= 1.0 for b in values):
        raise ValueError(f"betas must lie in [0, 1], got {values}")
    diffs = [b - a for a, b in zip(values, values[1:])]
    if not (all(d > 0 for d in diffs) or all(d < 0 for d in diffs)):
        raise ValueError(f"betas must be strictly monotone (increasing or decreasing), got {values}")
    return values


@torch.no_grad()
def replica_exchange(x, energy_fn, betas, *, step_size, n_steps, swap_every=1, seed, stream=0, move="ula",
                     callback=None, cuda_graph=False):
    """Parallel tempering over a temperature ladder ``betas`` in [0, 1] (seed 000, "Tempering & Annealing").

    Replica ``r`` targets ``π_β(x) ∝ exp(-β·E(x))·q(x)`` with ``q = N(0, I)``:
    ``β = 0`` is the standard normal, ``β = 1`` is ``exp(-E)·q`` (to target
    ``exp(-E')`` alone, pass ``E = E' - |x|²/2``). Every replica starts from
    ``x`` (chains, *event) and makes a Langevin move per step (``move="ula"``,
    or ``"mala"`` with accept/reject on ``π_β``) with score
    ``-β·∇E(x) - x``. After every ``swap_every`` steps, swap round ``j``
    proposes to exchange the states of neighbours ``(r, r+1)`` in ascending β
    order for all ``r ≡ j (mod 2)`` (even/odd rounds), for every chain, and
    accepts with the exact Metropolis probability
    ``min(1, exp((β_r - β_{r+1})·(E(x_r) - E(x_{r+1}))))``.

    All replicas of all chains are one tensor of ``R·C`` rows (row ``r·C + c``
    is replica ``r`` in ascending β order, chain ``c``): one move launch per
    step for all of them; a swap is one gather plus ``pygen.mh_select_``, with
    ``log u = log Φ(z)``, ``z = pygen.randn((R·C,), seed, noise_stream(stream, j, LANE_SWAP))``
    taken at the row of the pair's lower-β member (both members share it).
    Moves use ``seed`` and ``LANE_MOVE``/``LANE_ACCEPT`` with step ``i`` over
    the ``R·C`` rows. No host sync in the loop.

    Args:
        x: initial chains (chains, *event), copied into every replica.
        energy_fn: ``x -> E(x)`` (rows,) for any number of rows.
        betas: strictly monotone sequence (or 1-D tensor) of at least two
            values in [0, 1].
        step_size: ``dt`` > 0, a float or a 1-D tensor with one step per
            replica (in the order of ``betas``).
        n_steps, swap_every: steps (>= 1), steps between swap rounds (>= 1).
        seed: an int (per-chain seed tensors are not supported here).
        move: ``"ula"`` or ``"mala"``.
        callback: after each step, ``{"x": all replicas (R, C, *event) in
            ascending β order, "i", "swapped": per-row swap flags of the
            round just made, or None}`` (copies).
        cuda_graph: capture the move step and the swap round of each parity in
            CUDA graphs (up to three) and replay them (CUDA tensors).

    Returns ``(x, swap_rate)``: the chains of the replica with the largest β
    (β = 1 for a ladder ending at 1), and for each neighbour pair
    ``(betas[k], betas[k+1])`` the fraction of its swap proposals accepted
    (shape (R-1,), NaN for a pair never proposed).
    """
    _check_fn("energy_fn", energy_fn)
    values = _check_betas(betas)
    if move not in ("ula", "mala"):
        raise ValueError(f"move must be 'ula' or 'mala', got {move!r}")
    swap_every = _check_count("swap_every", swap_every)
    if isinstance(seed, torch.Tensor):
        raise TypeError("seed must be an int for replica_exchange (per-chain seed tensors are not supported)")
    check_tensor("x", x, dtypes=STORAGE_DTYPES, ndim_min=1)
    reps, chains = len(values), x.shape[0]
    descending = values[0] > values[-1]
    if descending:
        values = values[::-1]
    # per-replica steps -> per-row steps (checked against a (R,)-row stand-in)
    if isinstance(step_size, torch.Tensor):
        step_reps, _ = check_step_size(step_size, x.new_empty((reps,)), positive=True)
        if descending:
            step_reps = step_reps.flip(0)
        step_arg = step_reps.repeat_interleave(chains)
    else:
        step_arg = step_size
    event = x.shape[1:]
    rows_x = x.detach().unsqueeze(0).expand(reps, *x.shape).reshape(reps * chains, *event)
    state, ops, step_sizes, step_size, seed, _, stream, n_steps, graphs = _setup(
        rows_x, step_arg, n_steps, seed, stream, callback, positive_step=True, cuda_graph=cuda_graph)
    acc = _acc_dtype(state.dtype)
    dev, n_rows, ndim = state.device, reps * chains, state.dim()
    beta_rows = torch.tensor(values, dtype=acc, device=dev).repeat_interleave(chains)
    beta_b = _rows(beta_rows.to(state.dtype), ndim)
    half_dt, inv_2dt = _step_coeffs(step_sizes, step_size, ndim, acc)

    # even/odd pairings: row permutation, lower-member rows, paired mask, per-replica "is a lower member"
    perms, lowers, paired, is_lower = [], [], [], []
    c_idx = torch.arange(chains, device=dev)
    for parity in (0, 1):
        partner, lower, low_flag = list(range(reps)), list(range(reps)), [0.0] * reps
        for r in range(parity, reps - 1, 2):
            partner[r], partner[r + 1] = r + 1, r
            lower[r + 1] = r
            low_flag[r] = 1.0
        partner_t = torch.tensor(partner, device=dev)
        perms.append((partner_t.view(-1, 1) * chains + c_idx).reshape(-1))
        lowers.append((torch.tensor(lower, device=dev).view(-1, 1) * chains + c_idx).reshape(-1))
        paired.append((partner_t != torch.arange(reps, device=dev)).repeat_interleave(chains))
        is_lower.append(torch.tensor(low_flag, dtype=acc, device=dev))
    n_rounds = n_steps // swap_every
    proposals = [chains * len(range(k % 2, n_rounds, 2)) for k in range(reps - 1)]
    swap_count = torch.zeros(reps, dtype=acc, device=dev)
    neg_inf = torch.full((), -math.inf, dtype=acc, device=dev)

    def tempered_score(g, xx):
        """Score of π_β: -β·∇E(x) - x."""
        return (-beta_b * g - xx).contiguous()

    def tempered_energy(e, xx):
        """U_β = β·E + |x|²/2 per row (π_β ∝ exp(-U_β))."""
        return beta_rows * e + 0.5 * _sqnorm(xx.to(acc))

    mh = _MH(ops, n_rows, dev, acc)
    swap_flags = torch.empty(n_rows, dtype=acc, device=dev)
    e, g = _energy_grad(energy_fn, state, acc)
    moves, rounds = _Steps(stream, graphs, dev), _Steps(stream, graphs, dev)  # move step i, swap round j

    def move_step(i):  # state, e, g updated in place (eager ULA moves: the new tensors taken over)
        nonlocal state, e, g
        offset, k = moves.at(i)
        s = tempered_score(g, state)
        prop = ops.langevin(state, s, step_sizes, step_size, seed, noise_stream(stream, k, LANE_MOVE), None, offset)
        ep, gp = _energy_grad(energy_fn, prop, acc)
        if move == "ula":
            state, e, g = _keep(graphs, state, prop), _keep(graphs, e, ep), _keep(graphs, g, gp)
        else:
            log_accept = _mala_log_accept(state, prop, tempered_energy(e, state), tempered_energy(ep, prop), s,
                                          tempered_score(gp, prop), half_dt, inv_2dt, acc)
            log_u = ops.log_uniform(n_rows, seed, noise_stream(stream, k, LANE_ACCEPT), None, offset, device=dev,
                                    dtype=acc)
            mh.select(log_accept, log_u, [(state, prop), (g, gp), (e.view(-1, 1), ep.view(-1, 1))])
        moves.advance(offset)

    def swap_round(j):  # round j (parity j % 2), swapping state, g and e in place
        par = j % 2
        offset, k = rounds.at(j)
        perm = perms[par]
        e_sw = e.index_select(0, perm)
        log_accept = torch.where(paired[par], (beta_rows - beta_rows.index_select(0, perm)) * (e - e_sw), neg_inf)
        log_u = ops.log_uniform(n_rows, seed, noise_stream(stream, k, LANE_SWAP), None, offset, device=dev, dtype=acc)
        log_u = log_u.index_select(0, lowers[par])
        for cur, other in ((state, state.index_select(0, perm)), (g, g.index_select(0, perm)),
                           (e.view(-1, 1), e_sw.view(-1, 1))):
            ops.mh_select_(cur, other, log_accept, log_u, swap_flags)
        swap_count.add_(swap_flags.view(reps, chains).sum(1) * is_lower[par])
        rounds.advance(offset)
        return swap_flags

    for i in range(n_steps):
        graphs("move", move_step, i)
        swapped = None
        if (i + 1) % swap_every == 0:
            j = (i + 1) // swap_every - 1
            swapped = graphs(("swap", j % 2), swap_round, j)
        if callback is not None:
            callback({"x": state.view(reps, chains, *event).clone(), "i": i,
                      "swapped": swapped.clone() if swapped is not None else None})
    denom = torch.tensor([float(n) if n else math.nan for n in proposals], dtype=acc, device=dev)
    swap_rate = swap_count[: reps - 1] / denom
    if descending:
        swap_rate = swap_rate.flip(0)
    return state.view(reps, chains, *event)[reps - 1].clone(), swap_rate
