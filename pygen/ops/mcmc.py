"""Fused MCMC updates: ``pygen.leapfrog_`` and ``pygen.mh_select_`` (used by pygen.mcmc).

leapfrog_ (op ``torch.ops.pygen.leapfrog_(x, p, grad, step_sizes, step_size,
kick, drift)``), in place, for every element of row ``b`` (row = index along
dim 0) with ``dt = step_sizes[b]`` or the scalar ``step_size``::

    p <- p - kick·dt·grad                 (momentum kick, grad = ∇E(x))
    x <- x + drift·dt·p    (new p)        (position drift; skipped when drift == 0)

One HMC leapfrog trajectory of L steps with mass m is
``leapfrog_(x, p, g(x), kick=0.5, drift=1/m)``, then L-1 times
``leapfrog_(x, p, g(x), kick=1, drift=1/m)``, then the closing half kick
``leapfrog_(x, p, g(x), kick=0.5, drift=0)``. The updated momentum enters the
drift before it is rounded to the storage dtype.

mh_select_ (op ``torch.ops.pygen.mh_select_(x, x_prop, log_accept, log_u,
accepted)``), in place, per row ``b``: the proposal is accepted when
``log_u[b] < log_accept[b]``; then row ``b`` of ``x`` becomes row ``b`` of
``x_prop`` and ``accepted[b] = 1``, else ``x`` keeps its row and
``accepted[b] = 0``. A NaN in ``log_accept[b]`` or ``log_u[b]`` is never
silently taken as accept or reject: row ``b`` of ``x`` and ``accepted[b]``
become NaN.

Backends: torch reference (this file), Triton (kernels/mcmc.py), C++ CPU
(csrc/cpu/mcmc.cpp), CUDA (csrc/cuda/mcmc.cu). Arithmetic in fp32 (fp64 for
fp64 storage). No autograd (sampler updates, not training ops).
"""
import numbers

import torch

from pygen import _backend
from pygen.ops._common import check_like, check_tensor

__all__ = ["leapfrog_", "mh_select_"]

_STEP_DTYPES = (torch.float32, torch.float64)


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _rows_view(t, ndim):
    """A per-row tensor of shape (rows,) viewed to broadcast over an ndim-d tensor."""
    return t.reshape((-1,) + (1,) * (ndim - 1))


# ---------------------------------------------------------------------------
# torch reference (the spec)
# ---------------------------------------------------------------------------
def leapfrog_reference(x, p, grad, step_sizes, step_size, kick, drift):
    """In place: ``p -= kick·dt·grad``; then ``x += drift·dt·p`` unless drift == 0."""
    acc = _acc_dtype(x.dtype)
    if step_sizes is None:
        ck, cd = kick * step_size, drift * step_size
    else:
        dt = _rows_view(step_sizes.to(acc), x.dim())
        ck, cd = kick * dt, drift * dt
    p_new = p.to(acc) - ck * grad.to(acc)
    p.copy_(p_new)
    if drift != 0.0:
        x.copy_(x.to(acc) + cd * p_new)


def mh_select_reference(x, x_prop, log_accept, log_u, accepted):
    """In place: take row b of ``x_prop`` where ``log_u[b] < log_accept[b]``; NaN -> NaN row."""
    is_nan = torch.isnan(log_accept) | torch.isnan(log_u)
    take = log_u < log_accept
    nan = torch.full((), float("nan"), dtype=accepted.dtype, device=accepted.device)
    accepted.copy_(torch.where(is_nan, nan, take.to(accepted.dtype)))
    if x.numel():
        out = torch.where(_rows_view(take, x.dim()), x_prop, x)
        nan_x = torch.full((), float("nan"), dtype=x.dtype, device=x.device)
        out = torch.where(_rows_view(is_nan, x.dim()), nan_x, out)
        x.copy_(out)


# ---------------------------------------------------------------------------
# dispatch without checks (for samplers that validated once at set-up)
# ---------------------------------------------------------------------------
def leapfrog_impl(backend):
    """The ``leapfrog_(x, p, grad, step_sizes, step_size, kick, drift)`` of ``backend``
    (arguments already checked; tensors contiguous)."""
    if backend == "torch":
        return leapfrog_reference
    if backend == "triton":
        from pygen.kernels import mcmc as tk

        return tk.leapfrog_
    return torch.ops.pygen.leapfrog_


def mh_select_impl(backend):
    """The ``mh_select_(x, x_prop, log_accept, log_u, accepted)`` of ``backend`` (checked args)."""
    if backend == "torch":
        return mh_select_reference
    if backend == "triton":
        from pygen.kernels import mcmc as tk

        return tk.mh_select_
    return torch.ops.pygen.mh_select_


# ---------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------
def _check_inplace(name, t):
    check_tensor(name, t, ndim_min=1)
    if not t.is_contiguous():
        raise ValueError(f"{name} is updated in place and must be contiguous")


def check_step_size(step_size, x, *, positive=False, name="step_size"):
    """-> (per-row step tensor or None, float step). Host check (run once, at set-up)."""
    what = "positive" if positive else "non-negative"
    if isinstance(step_size, torch.Tensor):
        check_tensor(name, step_size, dtypes=_STEP_DTYPES, device=x.device)
        if step_size.dim() != 1 or step_size.shape[0] != x.shape[0]:
            raise ValueError(
                f"{name} tensor must be 1-D with one step per row (length {x.shape[0]}), "
                f"got shape {tuple(step_size.shape)}"
            )
        ok = (step_size > 0) if positive else (step_size >= 0)
        if step_size.numel() and not bool(ok.all()):
            raise ValueError(f"{name} must be {what} (and not NaN) in every row")
        return step_size.contiguous(), 0.0
    if isinstance(step_size, bool) or not isinstance(step_size, numbers.Real):
        raise TypeError(f"{name} must be a float or a 1-D float tensor, got {type(step_size).__name__}")
    step_size = float(step_size)
    if not (step_size > 0.0 if positive else step_size >= 0.0) or step_size == float("inf"):
        raise ValueError(f"{name} must be a finite {what} number, got {step_size}")
    return None, step_size


def _check_real(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    value = float(value)
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def leapfrog_(x, p, grad, step_size, *, kick=1.0, drift=1.0):
    """Fused leapfrog update, in place: ``p -= kick·dt·grad``, then ``x += drift·dt·p``.

    Args:
        x: positions, shape (rows, ...), contiguous, float32/float16/bfloat16/
            float64; updated in place (left untouched when ``drift == 0``).
        p: momenta like ``x``; updated in place.
        grad: ``∇E(x)`` like ``x`` (read only).
        step_size: ``dt`` — a non-negative float, or a 1-D float32/float64
            tensor with one step per row on ``x``'s device.
        kick: momentum coefficient (0.5 for a half step, 1 for a full step).
        drift: position coefficient, the inverse mass (0: momentum only).

    Returns ``(x, p)``. NaN propagates. Arithmetic in fp32 (fp64 for fp64).
    """
    _check_inplace("x", x)
    _check_inplace("p", p)
    check_like("p", p, "x", x)
    check_like("grad", grad, "x", x)
    step_sizes, step_size = check_step_size(step_size, x)
    kick, drift = _check_real("kick", kick), _check_real("drift", drift)
    grad = grad.contiguous()
    leapfrog_impl(_backend.resolve(x.device))(x, p, grad, step_sizes, step_size, kick, drift)
    return x, p


def mh_select_(x, x_prop, log_accept, log_u, accepted=None):
    """Per-row Metropolis–Hastings select, in place: row b of ``x`` <- row b of
    ``x_prop`` where ``log_u[b] < log_accept[b]``.

    Args:
        x: current states, shape (rows, ...), contiguous, any storage dtype;
            updated in place.
        x_prop: proposals like ``x``.
        log_accept: log acceptance ratio per row, 1-D float32/float64 of
            length rows, on ``x``'s device.
        log_u: log of a uniform in (0, 1) per row, like ``log_accept``.
        accepted: optional output like ``log_accept``; allocated if None.

    Returns ``accepted``: 1.0 where the row was accepted, 0.0 where rejected,
    NaN where ``log_accept`` or ``log_u`` is NaN (and then row b of ``x`` is
    NaN too).
    """
    _check_inplace("x", x)
    check_like("x_prop", x_prop, "x", x)
    check_tensor("log_accept", log_accept, dtypes=_STEP_DTYPES, device=x.device)
    if log_accept.dim() != 1 or log_accept.shape[0] != x.shape[0]:
        raise ValueError(
            f"log_accept must be 1-D with one value per row (length {x.shape[0]}), got shape {tuple(log_accept.shape)}"
        )
    check_like("log_u", log_u, "log_accept", log_accept)
    if accepted is None:
        accepted = torch.empty_like(log_accept, memory_format=torch.contiguous_format)
    else:
        check_like("accepted", accepted, "log_accept", log_accept)
        if not accepted.is_contiguous():
            raise ValueError("accepted is written in place and must be contiguous")
    mh_select_impl(_backend.resolve(x.device))(
        x, x_prop.contiguous(), log_accept.contiguous(), log_u.contiguous(), accepted
    )
    return accepted


# ---------------------------------------------------------------------------
# torch.library registration
# ---------------------------------------------------------------------------
def _register():
    from pygen.ops import _registry

    _registry.register_reference("leapfrog_", leapfrog_reference)
    _registry.register_reference("mh_select_", mh_select_reference)

    def leapfrog_triton(x, p, grad, step_sizes, step_size, kick, drift):
        from pygen.kernels import mcmc as tk

        tk.leapfrog_(x, p, grad.contiguous(), step_sizes.contiguous() if step_sizes is not None else None,
                     step_size, kick, drift)

    def mh_select_triton(x, x_prop, log_accept, log_u, accepted):
        from pygen.kernels import mcmc as tk

        tk.mh_select_(x, x_prop.contiguous(), log_accept.contiguous(), log_u.contiguous(), accepted)

    _registry.register_triton("leapfrog_", leapfrog_triton, mutates_args=("x", "p"))
    _registry.register_triton("mh_select_", mh_select_triton, mutates_args=("x", "accepted"))
    _registry.register_fake("leapfrog_", lambda x, p, grad, step_sizes, step_size, kick, drift: None)
    _registry.register_fake("mh_select_", lambda x, x_prop, log_accept, log_u, accepted: None)


_register()
