"""Forward (noising) ops: ``pygen.q_sample`` and ``pygen.reparameterize``.

Ops:
    ``torch.ops.pygen.q_sample(x0, t, table, noise, seed, stream, row_seeds,
    interpolation, target) -> (x_t, noise_out, target_out)``
        x_t = a[t_b]·x0 + s[t_b]·eps for batch row b (row = index along dim 0):
        interpolation 0 "vp" (table = alphas_cumprod): a = sqrt(abar), s = sqrt(1 - abar);
        interpolation 1 "flow" (table = sigmas, rectified flow): a = 1 - sigma, s = sigma.
        target (same pass): 0 none, 1 eps, 2 v = a·eps - s·x0, 3 x0, 4 flow velocity eps - x0.
        noise_out is the generated noise (shape (0,) when ``noise`` was given),
        target_out is shape (0,) when target == 0. Differentiable w.r.t. x0 and
        noise (linear in both; t and the table get no gradient).
    ``torch.ops.pygen.reparameterize(mu, logvar, noise, seed, stream, row_seeds) -> (z, noise_out)``
        z = mu + exp(logvar / 2)·eps (differentiable: d/dmu = 1,
        d/dlogvar = exp(logvar / 2)·eps / 2).

When ``noise`` is None the kernels draw eps = ``pygen.randn(x.shape, seed, stream)``
(or per-row seeds ``row_seeds``) in the same pass.
An out-of-range timestep inside a kernel is never dereferenced: that row's
x_t and target are NaN (the public API rejects it before any kernel).
The coefficients are computed in float64 when the table or the storage is
float64, else in float32; the element arithmetic is float32 (float64 for
float64 storage).

Backends: torch reference (this file), Triton (kernels/forward.py), C++ CPU
(csrc/cpu/forward.cpp), CUDA (csrc/cuda/forward.cu); shared per-element math
in csrc/include/pygen/forward.h.
"""
import math
import numbers

import torch

from pygen import _backend
from pygen.ops._common import (call_compiled, check_like, check_stream, check_tensor, contiguous, needs_grad,
                               noise_source)
from pygen.ops.random import randn_reference

__all__ = ["q_sample", "reparameterize"]

INTERPOLATIONS = {"vp": 0, "flow": 1}
TARGETS = {None: 0, "eps": 1, "v": 2, "x0": 3, "flow": 4}
_TARGET_NONE, _TARGET_EPS, _TARGET_V, _TARGET_X0, _TARGET_FLOW = range(5)
_INTERP_FLOW = 1
_TABLE_DTYPES = (torch.float32, torch.float64)
_T_DTYPES = (torch.int64, torch.int32)


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _empty0(like):
    return torch.empty((0,), dtype=like.dtype, device=like.device)


# ---------------------------------------------------------------------------
# torch reference
# ---------------------------------------------------------------------------
def forward_coefficients_reference(t, table, interpolation, acc_dtype):
    """Per-row ``(a, s, valid)``: a, s in ``acc_dtype`` (NaN where t is out of range)."""
    coef_dtype = torch.promote_types(table.dtype, acc_dtype)
    n = table.shape[0]
    t64 = t.to(torch.int64)
    valid = (t64 >= 0) & (t64 < n)
    if n > 0:
        level = table[t64.clamp(0, n - 1)].to(coef_dtype)
    else:
        level = torch.full(t64.shape, math.nan, dtype=coef_dtype, device=t.device)
    if interpolation == _INTERP_FLOW:
        a, s = 1 - level, level
    else:
        a, s = level.sqrt(), (1 - level).sqrt()
    nan = torch.full_like(a, math.nan)
    return torch.where(valid, a, nan).to(acc_dtype), torch.where(valid, s, nan).to(acc_dtype), valid


def _reference_noise(like, noise, seed, stream, row_seeds, acc):
    """(eps in ``acc``, the noise output): the given noise (output empty), or pygen.randn's normals
    drawn as the kernels draw them (fp32), returned in ``like``'s dtype."""
    if noise is not None:
        return noise.to(acc), _empty0(like)
    eps32 = randn_reference(like.shape, seed, stream, row_seeds, device=like.device, dtype=torch.float32)
    return eps32.to(acc), eps32.to(like.dtype)


def q_sample_reference(x0, t, table, noise, seed, stream, row_seeds, interpolation, target):
    """Plain-PyTorch q_sample (the spec); same arguments and outputs as the op."""
    acc = _acc_dtype(x0.dtype)
    a, s, valid = forward_coefficients_reference(t, table, interpolation, acc)
    bshape = (-1,) + (1,) * (x0.dim() - 1)
    a, s, valid = a.view(bshape), s.view(bshape), valid.view(bshape)
    x = x0.to(acc)
    eps, noise_out = _reference_noise(x0, noise, seed, stream, row_seeds, acc)
    x_t = a * x + s * eps
    if target == _TARGET_NONE:
        target_out = _empty0(x0)
    else:
        if target == _TARGET_EPS:
            tgt = eps
        elif target == _TARGET_V:
            tgt = a * eps - s * x
        elif target == _TARGET_X0:
            tgt = x
        elif target == _TARGET_FLOW:
            tgt = eps - x
        else:
            raise ValueError(f"target must be 0..4, got {target}")
        target_out = torch.where(valid, tgt, torch.full_like(tgt, math.nan)).to(x0.dtype)
    return x_t.to(x0.dtype), noise_out, target_out


def reparameterize_reference(mu, logvar, noise, seed, stream, row_seeds):
    """Plain-PyTorch reparameterize (the spec): ``(z, noise_out)``; differentiable."""
    acc = _acc_dtype(mu.dtype)
    eps, noise_out = _reference_noise(mu, noise, seed, stream, row_seeds, acc)
    z = mu.to(acc) + torch.exp(logvar.to(acc) * 0.5) * eps
    return z.to(mu.dtype), noise_out


def _q_sample_grads(grad_x_t, grad_target, t, table, interpolation, target, dtype, ndim):
    """Gradients of (x_t, target) w.r.t. (x0, noise): the map is linear in both.

    x_t = a·x0 + s·eps; target eps: d/deps = 1; v = a·eps - s·x0; x0: d/dx0 = 1;
    flow = eps - x0. The table and t get no gradient.
    """
    acc = _acc_dtype(dtype)
    a, s, _ = forward_coefficients_reference(t, table, interpolation, acc)
    bshape = (-1,) + (1,) * (ndim - 1)
    a, s = a.view(bshape), s.view(bshape)
    g = grad_x_t.to(acc)
    grad_x0, grad_noise = a * g, s * g
    if target != _TARGET_NONE and grad_target is not None and grad_target.numel():
        gt = grad_target.to(acc)
        if target == _TARGET_EPS:
            grad_noise = grad_noise + gt
        elif target == _TARGET_V:
            grad_x0, grad_noise = grad_x0 - s * gt, grad_noise + a * gt
        elif target == _TARGET_X0:
            grad_x0 = grad_x0 + gt
        else:
            grad_x0, grad_noise = grad_x0 - gt, grad_noise + gt
    return grad_x0.to(dtype), grad_noise.to(dtype)


def _reparameterize_grads(grad_z, logvar, eps, need_logvar, need_noise):
    """Gradients of z = mu + exp(logvar/2)·eps w.r.t. (mu, logvar, noise)."""
    acc = _acc_dtype(logvar.dtype)
    std = None
    grad_logvar = grad_noise = None
    if need_logvar or need_noise:
        g = grad_z.to(acc)
        std = torch.exp(logvar.to(acc) * 0.5)
        if need_logvar:
            grad_logvar = (0.5 * g * std * eps.to(acc)).to(logvar.dtype)
        if need_noise:
            grad_noise = (g * std).to(logvar.dtype)
    return grad_z, grad_logvar, grad_noise


# ---------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------
def _check_t(t, batch, n_table, device):
    """Normalise ``t`` to a 1-D int tensor of length ``batch`` and check its range."""
    if isinstance(t, bool):
        raise TypeError("t must be an int or a 1-D int64/int32 tensor, got bool")
    if isinstance(t, numbers.Integral):  # Python or NumPy int: the same timestep for every row
        t = int(t)
        if not 0 <= t < n_table:
            raise ValueError(f"t must be in [0, {n_table}) (the table length), got {t}")
        return torch.full((batch,), t, dtype=torch.int64, device=device)
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"t must be an int or a 1-D int64/int32 tensor, got {type(t).__name__}")
    if t.dtype not in _T_DTYPES:
        raise TypeError(f"t must have dtype int64 or int32, got {str(t.dtype).replace('torch.', '')}")
    if t.dim() != 1 or t.shape[0] != batch:
        raise ValueError(f"t must be 1-D with one timestep per batch row (length {batch}), got shape {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"t must be on the device of x0 ({device}), got {t.device}")
    # The range check reads t on the host: a CPU t only. Reading a CUDA t would be a device sync per
    # call (and is not allowed under CUDA-graph capture); there the kernels turn an out-of-range row
    # into NaN instead, which the loss or the sample then shows.
    if batch > 0 and t.device.type == "cpu":
        lo, hi = (int(v) for v in torch.aminmax(t))
        if lo < 0 or hi >= n_table:
            raise ValueError(f"t must be in [0, {n_table}) (the table length), got values in [{lo}, {hi}]")
    return contiguous(t)


def q_sample(x0, t, alphas_cumprod, noise=None, seed=None, stream=0, *, target=None, interpolation="vp"):
    """Forward diffusion / interpolation step ``x_t = a·x0 + s·eps`` for each batch row.

    Args:
        x0: clean data, at least 1-D; row b is ``x0[b]`` (float32/16/bf16/64).
        t: one timestep per row (1-D int64/int32 tensor of length ``x0.shape[0]``
            on x0's device) or a Python int for all rows.
        alphas_cumprod: 1-D float32/float64 table on x0's device, indexed by t:
            the cumulative alphas for ``interpolation="vp"``
            (a = sqrt(abar), s = sqrt(1 - abar)), or the sigmas in [0, 1] for
            ``interpolation="flow"`` (rectified flow: a = 1 - sigma, s = sigma).
        noise: eps (shape/dtype/device of x0). If None it is drawn in the
            kernel as ``pygen.randn(x0.shape, seed, stream)``.
        seed: int, or a 1-D int64 tensor of per-row seeds (needed when noise is None).
        stream: 64-bit stream id for the noise.
        target: also return the training target in the same pass: "eps",
            "v" (a·eps - s·x0), "x0" or "flow" (velocity eps - x0).
        interpolation: "vp" or "flow".

    Returns:
        ``x_t`` if noise was given and no target; ``(x_t, target)`` if noise
        was given; ``(x_t, noise)`` if the noise was generated;
        ``(x_t, noise, target)`` if generated and a target was requested.

    Differentiable w.r.t. ``x0`` and a given ``noise`` on every backend (e.g.
    for score distillation, where x0 comes from a generator).

    A CPU t is range-checked (ValueError). A CUDA t is not read on the host
    (that would be a device sync per call): an out-of-range t gives NaN rows
    instead of an error. Table values are not checked.
    """
    check_tensor("x0", x0, ndim_min=1)
    device = x0.device
    check_tensor("alphas_cumprod", alphas_cumprod, dtypes=_TABLE_DTYPES)
    if alphas_cumprod.dim() != 1 or alphas_cumprod.shape[0] == 0:
        raise ValueError(f"alphas_cumprod must be a non-empty 1-D table, got shape {tuple(alphas_cumprod.shape)}")
    if alphas_cumprod.device != device:
        raise ValueError(f"alphas_cumprod must be on the device of x0 ({device}), got {alphas_cumprod.device}")
    if not isinstance(interpolation, str) or interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {tuple(INTERPOLATIONS)}, got {interpolation!r}")
    if target is not None and not (isinstance(target, str) and target in TARGETS):
        raise ValueError(f"target must be None or one of {tuple(k for k in TARGETS if k)}, got {target!r}")
    target_id = TARGETS[target]
    interp_id = INTERPOLATIONS[interpolation]
    batch = x0.shape[0]
    t = _check_t(t, batch, alphas_cumprod.shape[0], device)
    stream = check_stream(stream)
    noise, seed_i, row_seeds = noise_source("q_sample", noise, seed, "x0", x0)
    x0 = contiguous(x0)
    table = contiguous(alphas_cumprod)

    x_t, noise_out, target_out = q_sample_launch(x0, t, table, noise, seed_i, stream, row_seeds, interp_id,
                                                 target_id)
    if noise is not None:
        return x_t if target_id == _TARGET_NONE else (x_t, target_out)
    return (x_t, noise_out) if target_id == _TARGET_NONE else (x_t, noise_out, target_out)


def q_sample_launch(x0, t, table, noise, seed, stream, row_seeds, interpolation, target):
    """``(x_t, noise_out, target_out)`` of the op on the backend resolved for x0's device, for
    arguments already checked (contiguous x0/table, an int64/int32 t on x0's device, op-level ids);
    no host-side check of t (callers that sampled t in range use it to avoid the device sync)."""
    backend = _backend.resolve(x0.device)
    if backend == "torch":
        return q_sample_reference(x0, t, table, noise, seed, stream, row_seeds, interpolation, target)
    if backend == "triton":
        if needs_grad(x0, noise):
            return _QSampleTriton.apply(x0, t, table, noise, seed, stream, row_seeds, interpolation, target)
        from pygen.kernels import forward as tk

        return tk.q_sample(x0, t, table, noise, seed, stream, row_seeds, interpolation, target)  # direct launch
    return call_compiled(torch.ops.pygen.q_sample.default, needs_grad(x0, noise), x0, t, table, noise, seed, stream,
                         row_seeds, interpolation, target)


class _QSampleTriton(torch.autograd.Function):
    """Autograd around the Triton launcher (same formulas as the op's register_autograd)."""

    @staticmethod
    def forward(ctx, x0, t, table, noise, seed, stream, row_seeds, interpolation, target):
        from pygen.kernels import forward as tk

        x_t, noise_out, target_out = tk.q_sample(x0, t, table, noise, seed, stream, row_seeds, interpolation, target)
        ctx.save_for_backward(t, table)
        ctx.interpolation, ctx.target, ctx.dtype, ctx.ndim = interpolation, target, x0.dtype, x0.dim()
        ctx.mark_non_differentiable(noise_out)
        return x_t, noise_out, target_out

    @staticmethod
    def backward(ctx, grad_x_t, grad_noise_out, grad_target):
        return _q_sample_backward(ctx, grad_x_t, grad_noise_out, grad_target)


class _ReparameterizeTriton(torch.autograd.Function):
    """Autograd around the Triton launcher (same formulas as the op's register_autograd)."""

    @staticmethod
    def forward(ctx, mu, logvar, noise, seed, stream, row_seeds):
        from pygen.kernels import forward as tk

        z, noise_out = tk.reparameterize(mu, logvar, noise, seed, stream, row_seeds)
        ctx.save_for_backward(logvar, noise if noise is not None else noise_out)
        ctx.mark_non_differentiable(noise_out)
        return z, noise_out

    @staticmethod
    def backward(ctx, grad_z, grad_noise_out):
        logvar, eps = ctx.saved_tensors
        g_mu, g_lv, g_noise = _reparameterize_grads(grad_z, logvar, eps, ctx.needs_input_grad[1],
                                                    ctx.needs_input_grad[2])
        return (g_mu if ctx.needs_input_grad[0] else None), g_lv, g_noise, None, None, None


def reparameterize(mu, logvar, seed=None, stream=0, *, noise=None, return_noise=False):
    """The VAE reparameterization ``z = mu + exp(logvar / 2)·eps``, differentiable.

    Args:
        mu, logvar: tensors of the same shape/dtype/device (float32/16/bf16/64).
        seed: int, or a 1-D int64 tensor of per-row seeds (length mu.shape[0]);
            needed when ``noise`` is None. eps is then
            ``pygen.randn(mu.shape, seed, stream)``, drawn in the kernel.
        stream: 64-bit stream id for the noise.
        noise: eps to use instead of drawing it (gradients flow into it too).
        return_noise: also return eps.

    Returns ``z``, or ``(z, eps)`` with ``return_noise=True``.
    Gradients: dz/dmu = 1, dz/dlogvar = exp(logvar / 2)·eps / 2, on every backend.
    """
    check_tensor("mu", mu)
    check_like("logvar", logvar, "mu", mu)
    device = mu.device
    stream = check_stream(stream)
    noise, seed_i, row_seeds = noise_source("reparameterize", noise, seed, "mu", mu)
    mu = contiguous(mu)
    logvar = contiguous(logvar)

    backend = _backend.resolve(device)
    if backend == "torch":
        z, noise_out = reparameterize_reference(mu, logvar, noise, seed_i, stream, row_seeds)
    elif backend == "triton":
        if needs_grad(mu, logvar, noise):
            z, noise_out = _ReparameterizeTriton.apply(mu, logvar, noise, seed_i, stream, row_seeds)
        else:  # the hot path: a direct launch
            from pygen.kernels import forward as tk

            z, noise_out = tk.reparameterize(mu, logvar, noise, seed_i, stream, row_seeds)
    else:
        z, noise_out = call_compiled(torch.ops.pygen.reparameterize.default, needs_grad(mu, logvar, noise), mu,
                                     logvar, noise, seed_i, stream, row_seeds)
    if not return_noise:
        return z
    return z, (noise if noise is not None else noise_out)


# ---------------------------------------------------------------------------
# torch.library registration
# ---------------------------------------------------------------------------
def _q_sample_fake(x0, t, table, noise, seed, stream, row_seeds, interpolation, target):
    x_t = torch.empty(x0.shape, dtype=x0.dtype, device=x0.device)
    noise_out = _empty0(x0) if noise is not None else torch.empty(x0.shape, dtype=x0.dtype, device=x0.device)
    target_out = torch.empty(x0.shape, dtype=x0.dtype, device=x0.device) if target != 0 else _empty0(x0)
    return x_t, noise_out, target_out


def _reparameterize_fake(mu, logvar, noise, seed, stream, row_seeds):
    z = torch.empty(mu.shape, dtype=mu.dtype, device=mu.device)
    noise_out = _empty0(mu) if noise is not None else torch.empty(mu.shape, dtype=mu.dtype, device=mu.device)
    return z, noise_out


def _q_sample_setup_context(ctx, inputs, output):
    x0, t, table, noise, seed, stream, row_seeds, interpolation, target = inputs
    x_t, noise_out, target_out = output
    ctx.save_for_backward(t, table)
    ctx.interpolation, ctx.target, ctx.dtype, ctx.ndim = interpolation, target, x0.dtype, x0.dim()
    ctx.mark_non_differentiable(noise_out)


def _q_sample_backward(ctx, grad_x_t, grad_noise_out, grad_target):
    t, table = ctx.saved_tensors
    need_x0, need_noise = ctx.needs_input_grad[0], ctx.needs_input_grad[3]
    grad_x0 = grad_noise = None
    if need_x0 or need_noise:
        grad_x0, grad_noise = _q_sample_grads(grad_x_t, grad_target, t, table, ctx.interpolation, ctx.target,
                                              ctx.dtype, ctx.ndim)
    return (grad_x0 if need_x0 else None), None, None, (grad_noise if need_noise else None), None, None, None, None, None


def _reparameterize_setup_context(ctx, inputs, output):
    mu, logvar, noise, seed, stream, row_seeds = inputs
    z, noise_out = output
    ctx.save_for_backward(logvar, noise if noise is not None else noise_out)
    ctx.mark_non_differentiable(noise_out)


def _reparameterize_backward(ctx, grad_z, grad_noise_out):
    logvar, eps = ctx.saved_tensors
    g_mu, g_lv, g_noise = _reparameterize_grads(grad_z, logvar, eps, ctx.needs_input_grad[1],
                                                ctx.needs_input_grad[2])
    return (g_mu if ctx.needs_input_grad[0] else None), g_lv, g_noise, None, None, None


def _register():
    from pygen.ops import _registry

    _registry.register_reference("q_sample", q_sample_reference)
    _registry.register_reference("reparameterize", reparameterize_reference)

    def q_sample_triton(x0, t, table, noise, seed, stream, row_seeds, interpolation, target):
        from pygen.kernels import forward as tk

        return tk.q_sample(x0, t, table, noise, seed, stream, row_seeds, interpolation, target)

    def reparameterize_triton(mu, logvar, noise, seed, stream, row_seeds):
        from pygen.kernels import forward as tk

        return tk.reparameterize(mu, logvar, noise, seed, stream, row_seeds)

    _registry.register_triton("q_sample", q_sample_triton)
    _registry.register_triton("reparameterize", reparameterize_triton)
    _registry.register_fake("q_sample", _q_sample_fake)
    _registry.register_fake("reparameterize", _reparameterize_fake)

    for name, backward, setup_context in (("q_sample", _q_sample_backward, _q_sample_setup_context),
                                          ("reparameterize", _reparameterize_backward, _reparameterize_setup_context)):
        for qualname in (f"pygen::{name}", _registry.TRITON_OPS.get(name)):
            if qualname is not None:
                torch.library.register_autograd(qualname, backward, setup_context=setup_context, lib=_registry._lib)


_register()
