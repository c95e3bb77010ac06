"""Fused training-loss ops: the per-row diffusion / score-matching MSE and the VAE
reparameterization with its analytic KL, each with a fused backward.

Ops:
    ``torch.ops.pygen.diffusion_loss(model_out, x0, noise, coeffs, seed, stream, row_seeds) -> loss_rows``
        For batch row b (row = index along dim 0, n = elements per row) with
        ``coeffs[b] = [m, ca, cb, w]``:
            loss_rows[b] = w · mean_i (m·model_out[b, i] - ca·x0[b, i] - cb·eps[b, i])²
        where eps is the given ``noise`` or, when ``noise`` is None, exactly
        ``pygen.randn(x0.shape, seed, stream)`` (``row_seeds``: one seed per
        row, elements numbered within the row) regenerated in the kernel — the
        noise that ``pygen.q_sample(x0, t, abar, seed=seed, stream=stream)``
        used to form x_t, so it is never stored or re-read. loss_rows is (B,)
        float32 (float64 for float64 storage). Targets, as (m, ca, cb):
        eps-prediction (1, 0, 1); x0-prediction (1, 1, 0); v = a·eps - s·x0
        (1, -s, a); flow velocity eps - x0 (1, -1, 1); NCSN denoising score
        matching with σ² weighting (σ, 0, -1): σ²‖s + eps/σ‖² = ‖σ·s + eps‖².
        w carries the loss weighting (min-SNR, SNR, EDM, any 1/2 factor).
    ``torch.ops.pygen.diffusion_loss_backward(grad_rows, model_out, x0, noise, coeffs, seed, stream, row_seeds)``
        d loss / d model_out = grad_rows[b]·w·2·m/n · (m·model_out - ca·x0 - cb·eps),
        eps regenerated again (one read of model_out and x0, one write).
    ``torch.ops.pygen.reparameterize_kl(mu, logvar, noise, seed, stream, row_seeds) -> (z, kl_rows)``
        z = mu + std·eps with std = exp(logvar / 2), and in the same pass
        kl_rows[b] = KL(N(mu_b, std_b²) || N(0, I)) = 0.5·Σ_i (mu² + std² - 1 - logvar).
    ``torch.ops.pygen.reparameterize_kl_backward(grad_z, grad_kl, mu, logvar, noise, seed, stream, row_seeds)``
        dmu = grad_z + grad_kl[b]·mu; dlogvar = grad_z·std·eps/2 + grad_kl[b]·0.5·(std² - 1).

Autograd: C++ for the compiled ops (csrc/autograd/loss.cpp: the backward never enters
Python), the Python formulas below for the Triton variants and the reference fallback.
Gradients: the compiled/Triton backward ops give the gradient w.r.t.
model_out (diffusion_loss) and w.r.t. mu and logvar (reparameterize_kl). x0,
a given noise and coeffs are data in training; if they do require gradients
(e.g. x0 from a trained encoder) the autograd formula adds their gradients
with plain torch ops (not fused), so no gradient is ever silently dropped.

Reductions are deterministic: per (row, window) partial sums in a fixed order,
then the windows of a row added in order (no atomics). A NaN anywhere in a row
gives a NaN loss / KL for that row (never hidden). Arithmetic is float32
(float64 for float64 storage); coeffs may be float32 or float64 for any storage.

Backends: torch reference (this file), Triton (kernels/loss.py), C++ CPU
(csrc/cpu/loss.cpp), CUDA (csrc/cuda/loss.cu).
"""
import torch

from pygen import _backend
from pygen.ops._common import check_like, check_stream, check_tensor, contiguous, needs_grad, noise_source
from pygen.ops.random import randn_reference

__all__ = ["fused_diffusion_mse", "reparameterize_kl"]

_COEFF_DTYPES = (torch.float32, torch.float64)


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _row_view(v, ndim):
    return v.view((-1,) + (1,) * (ndim - 1))


def _eps_reference(like, noise, seed, stream, row_seeds, acc):
    """eps in ``acc``: the given noise, or pygen.randn's fp32 normals (as the kernels draw them)."""
    if noise is not None:
        return noise.to(acc)
    return randn_reference(like.shape, seed, stream, row_seeds, device=like.device, dtype=torch.float32).to(acc)


def _row_len(x):
    return x[0].numel() if x.shape[0] > 0 else 0


def _rows(x):
    """``x`` as (B, elements per row) (also for B == 0)."""
    return x.reshape(x.shape[0], _row_len(x))


# ---------------------------------------------------------------------------
# torch reference (the spec)
# ---------------------------------------------------------------------------
def _diffusion_residual(model_out, x0, noise, coeffs, seed, stream, row_seeds):
    """(r = m·out - ca·x0 - cb·eps, eps, (m, ca, cb, w) as row views) in the accumulation dtype."""
    acc = _acc_dtype(model_out.dtype)
    nd = model_out.dim()
    c = coeffs.to(acc)
    m, ca, cb, w = (_row_view(c[:, j], nd) for j in range(4))
    eps = _eps_reference(x0, noise, seed, stream, row_seeds, acc)
    r = m * model_out.to(acc) - ca * x0.to(acc) - cb * eps
    return r, eps, (m, ca, cb, w)


def diffusion_loss_reference(model_out, x0, noise, coeffs, seed, stream, row_seeds):
    """Plain-PyTorch diffusion_loss (the spec): (B,) per-row weighted MSE; differentiable."""
    r, _, (_, _, _, w) = _diffusion_residual(model_out, x0, noise, coeffs, seed, stream, row_seeds)
    batch = model_out.shape[0]
    sq = _rows(r * r).sum(1)
    return w.reshape(batch) * (sq / _row_len(model_out))


def _grad_scale(grad_rows, coeffs, n, acc, nd):
    """Per-row k = grad_rows·w·2·m/n (the factor of the residual in d loss / d model_out)."""
    c = coeffs.to(acc)
    k = grad_rows.to(acc) * c[:, 3] * 2 * c[:, 0] / n
    return _row_view(k, nd)


def diffusion_loss_backward_reference(grad_rows, model_out, x0, noise, coeffs, seed, stream, row_seeds):
    """Plain-PyTorch diffusion_loss_backward: d loss / d model_out (model_out's dtype)."""
    acc = _acc_dtype(model_out.dtype)
    r, _, _ = _diffusion_residual(model_out, x0, noise, coeffs, seed, stream, row_seeds)
    k = _grad_scale(grad_rows, coeffs, _row_len(model_out), acc, model_out.dim())
    return (k * r).to(model_out.dtype)


def reparameterize_kl_reference(mu, logvar, noise, seed, stream, row_seeds):
    """Plain-PyTorch reparameterize_kl: ``(z, kl_rows)``; differentiable."""
    acc = _acc_dtype(mu.dtype)
    m, lv = mu.to(acc), logvar.to(acc)
    eps = _eps_reference(mu, noise, seed, stream, row_seeds, acc)
    std = torch.exp(lv * 0.5)
    z = m + std * eps
    terms = m * m + std * std - 1 - lv
    kl = 0.5 * _rows(terms).sum(1)
    return z.to(mu.dtype), kl


def reparameterize_kl_backward_reference(grad_z, grad_kl, mu, logvar, noise, seed, stream, row_seeds):
    """Plain-PyTorch reparameterize_kl_backward: ``(dmu, dlogvar)`` in mu's dtype."""
    acc = _acc_dtype(mu.dtype)
    nd = mu.dim()
    m, lv = mu.to(acc), logvar.to(acc)
    eps = _eps_reference(mu, noise, seed, stream, row_seeds, acc)
    gz = grad_z.to(acc)
    gk = _row_view(grad_kl.to(acc), nd)
    std = torch.exp(lv * 0.5)
    dmu = gz + gk * m
    dlv = gz * std * eps * 0.5 + gk * (0.5 * (std * std - 1))
    return dmu.to(mu.dtype), dlv.to(mu.dtype)


# ---------------------------------------------------------------------------
# fakes
# ---------------------------------------------------------------------------
def _rows_out(like):
    return torch.empty((like.shape[0],), dtype=_acc_dtype(like.dtype), device=like.device)


def _diffusion_loss_fake(model_out, x0, noise, coeffs, seed, stream, row_seeds):
    return _rows_out(model_out)


def _diffusion_loss_backward_fake(grad_rows, model_out, x0, noise, coeffs, seed, stream, row_seeds):
    return torch.empty_like(model_out, memory_format=torch.contiguous_format)


def _reparameterize_kl_fake(mu, logvar, noise, seed, stream, row_seeds):
    return torch.empty_like(mu, memory_format=torch.contiguous_format), _rows_out(mu)


def _reparameterize_kl_backward_fake(grad_z, grad_kl, mu, logvar, noise, seed, stream, row_seeds):
    return (torch.empty_like(mu, memory_format=torch.contiguous_format),
            torch.empty_like(mu, memory_format=torch.contiguous_format))


# ---------------------------------------------------------------------------
# autograd
# ---------------------------------------------------------------------------
def _diffusion_loss_extra_grads(grad_rows, model_out, x0, noise, coeffs, seed, stream, row_seeds, need):
    """Gradients w.r.t. (x0, noise, coeffs) with plain torch ops (only when they are needed;
    these are data in training, so this path is not fused)."""
    need_x0, need_noise, need_coeffs = need
    acc = _acc_dtype(model_out.dtype)
    nd = model_out.dim()
    n = _row_len(model_out)
    r, eps, (m, ca, cb, w) = _diffusion_residual(model_out.detach(), x0.detach(),
                                                 None if noise is None else noise.detach(), coeffs.detach(),
                                                 seed, stream, row_seeds)
    g = _row_view(grad_rows.to(acc), nd)
    k = g * w * 2 / n  # d loss / d r = k·r
    gx0 = (-(k * ca) * r).to(x0.dtype) if need_x0 else None
    gnoise = (-(k * cb) * r).to(noise.dtype) if need_noise else None
    gcoeffs = None
    if need_coeffs:
        def row_mean(v):
            return _rows(v).sum(1) / n

        kr = _rows(k * r)
        gm = (kr * _rows(model_out.detach().to(acc))).sum(1)
        gca = -(kr * _rows(x0.detach().to(acc))).sum(1)
        gcb = -(kr * _rows(eps)).sum(1)
        gw = grad_rows.to(acc) * row_mean(r * r)
        gcoeffs = torch.stack([gm, gca, gcb, gw], 1).to(coeffs.dtype)
    return gx0, gnoise, gcoeffs


def _diffusion_loss_setup_context(ctx, inputs, output):
    model_out, x0, noise, coeffs, seed, stream, row_seeds = inputs
    ctx.save_for_backward(model_out, x0, noise, coeffs, row_seeds)
    ctx.seed, ctx.stream = seed, stream


def _diffusion_loss_backward_impl(ctx, grad_rows, backward_fn, first=0):
    """Gradients of (model_out, x0, noise, coeffs, seed, stream, row_seeds); the op's inputs start at
    ``ctx.needs_input_grad[first]``."""
    model_out, x0, noise, coeffs, row_seeds = ctx.saved_tensors
    seed, stream = ctx.seed, ctx.stream
    need_out, need_x0, need_noise, need_coeffs = ctx.needs_input_grad[first:first + 4]
    grad_out = gx0 = gnoise = gcoeffs = None
    grad_rows = contiguous(grad_rows)
    if need_out:
        grad_out = backward_fn(grad_rows, model_out, x0, noise, coeffs, seed, stream, row_seeds)
    if need_x0 or need_noise or need_coeffs:
        gx0, gnoise, gcoeffs = _diffusion_loss_extra_grads(grad_rows, model_out, x0, noise, coeffs, seed, stream,
                                                           row_seeds, (need_x0, need_noise, need_coeffs))
    return grad_out, gx0, gnoise, gcoeffs, None, None, None


def _diffusion_loss_backward(ctx, grad_rows):
    return _diffusion_loss_backward_impl(ctx, grad_rows, torch.ops.pygen.diffusion_loss_backward)


def _diffusion_loss_triton_backward(ctx, grad_rows):
    return _diffusion_loss_backward_impl(ctx, grad_rows, torch.ops.pygen.diffusion_loss_backward_triton)


def _reparameterize_kl_setup_context(ctx, inputs, output):
    mu, logvar, noise, seed, stream, row_seeds = inputs
    ctx.save_for_backward(mu, logvar, noise, row_seeds)
    ctx.seed, ctx.stream = seed, stream


def _zeros_if_none(g, shape, dtype, device):
    return torch.zeros(shape, dtype=dtype, device=device) if g is None else contiguous(g)


def _reparameterize_kl_backward_impl(ctx, grad_z, grad_kl, backward_fn, first=0):
    """Gradients of (mu, logvar, noise, seed, stream, row_seeds) (inputs from ``needs_input_grad[first]``)."""
    mu, logvar, noise, row_seeds = ctx.saved_tensors
    need_mu, need_lv, need_noise = ctx.needs_input_grad[first:first + 3]
    gmu = glv = gnoise = None
    if need_mu or need_lv:
        grad_z = _zeros_if_none(grad_z, mu.shape, mu.dtype, mu.device)
        grad_kl = _zeros_if_none(grad_kl, (mu.shape[0],), _acc_dtype(mu.dtype), mu.device)
        gmu, glv = backward_fn(grad_z, grad_kl, mu, logvar, noise, ctx.seed, ctx.stream, row_seeds)
    if need_noise and grad_z is not None:  # dz/deps = std (plain torch: noise is data in training)
        acc = _acc_dtype(mu.dtype)
        gnoise = (grad_z.to(acc) * torch.exp(logvar.detach().to(acc) * 0.5)).to(noise.dtype)
    return (gmu if need_mu else None), (glv if need_lv else None), gnoise, None, None, None


def _reparameterize_kl_backward(ctx, grad_z, grad_kl):
    return _reparameterize_kl_backward_impl(ctx, grad_z, grad_kl, torch.ops.pygen.reparameterize_kl_backward)


def _reparameterize_kl_triton_backward(ctx, grad_z, grad_kl):
    return _reparameterize_kl_backward_impl(ctx, grad_z, grad_kl,
                                            torch.ops.pygen.reparameterize_kl_backward_triton)


def _triton_launchers():
    from pygen.kernels import loss as tk

    return tk


class _CompiledKernels:
    """The compiled ops (cpu/cuda backends) under the launcher names of pygen.kernels.loss."""

    def __getattr__(self, name):
        op = getattr(torch.ops.pygen, name).default
        setattr(self, name, op)
        return op


_COMPILED = _CompiledKernels()


class _DiffusionLossFn(torch.autograd.Function):
    """Autograd of the public API's Triton path: ``kernels`` is the Triton launcher module (direct
    launches, no per-call op-registration overhead); same formulas as the register_autograd of
    pygen::diffusion_loss_triton. (The compiled ops carry a C++ autograd.)"""

    @staticmethod
    def forward(ctx, kernels, model_out, x0, noise, coeffs, seed, stream, row_seeds):
        # old-style (ctx in forward): cheaper per call than setup_context in eager mode
        ctx.kernels = kernels
        ctx.save_for_backward(model_out, x0, noise, coeffs, row_seeds)
        ctx.seed, ctx.stream = seed, stream
        return kernels.diffusion_loss(model_out, x0, noise, coeffs, seed, stream, row_seeds)

    @staticmethod
    def backward(ctx, grad_rows):
        return (None,) + _diffusion_loss_backward_impl(ctx, grad_rows, ctx.kernels.diffusion_loss_backward, 1)


class _ReparameterizeKLFn(torch.autograd.Function):
    """As _DiffusionLossFn, for reparameterize_kl."""

    @staticmethod
    def forward(ctx, kernels, mu, logvar, noise, seed, stream, row_seeds):
        ctx.kernels = kernels
        ctx.save_for_backward(mu, logvar, noise, row_seeds)
        ctx.seed, ctx.stream = seed, stream
        return kernels.reparameterize_kl(mu, logvar, noise, seed, stream, row_seeds)

    @staticmethod
    def backward(ctx, grad_z, grad_kl):
        return (None,) + _reparameterize_kl_backward_impl(ctx, grad_z, grad_kl, ctx.kernels.reparameterize_kl_backward,
                                                          1)


# ---------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------
def _resolve_seed(op, noise, seed, row_seeds, ref_name, ref):
    """(noise, int64 seed, per-row seeds) as pygen.q_sample / pygen.reparameterize resolve them."""
    if row_seeds is not None:
        if seed is not None:
            raise ValueError(f"{op}: pass seed (an int or per-row tensor) or row_seeds, not both")
        if not isinstance(row_seeds, torch.Tensor):
            raise TypeError(f"row_seeds must be a 1-D int64 tensor, got {type(row_seeds).__name__}")
        seed = row_seeds
    if noise is not None and seed is not None:
        raise ValueError(f"{op}: pass either seed/row_seeds (noise regenerated in the kernel) or noise, not both")
    return noise_source(op, noise, seed, ref_name, ref)


def fused_diffusion_mse(model_out, x0, coeffs, *, noise=None, seed=None, stream=0, row_seeds=None):
    """Per-row weighted diffusion / score-matching MSE, fused, differentiable w.r.t. ``model_out``.

    ``loss[b] = w_b · mean_i (m_b·model_out[b, i] - ca_b·x0[b, i] - cb_b·eps[b, i])²``
    with ``coeffs[b] = [m_b, ca_b, cb_b, w_b]`` (see the module docstring for the
    coefficients of each prediction type and of NCSN score matching).

    Args:
        model_out: the model's prediction, shape and dtype of ``x0``.
        x0: clean data, at least 1-D (row b is ``x0[b]``); float32/16/bf16/64.
        coeffs: (B, 4) float32/float64 on x0's device.
        noise: eps, shape/dtype/device of x0. If None the kernel regenerates
            ``pygen.randn(x0.shape, seed, stream)`` — the same eps that
            ``pygen.q_sample(x0, t, abar, seed=seed, stream=stream)`` drew.
        seed: int, or a 1-D int64 tensor of per-row seeds (as q_sample's).
        stream: the 64-bit stream id given to q_sample.
        row_seeds: per-row seeds (same as passing them as ``seed``).

    Returns:
        (B,) float32 losses (float64 for float64 storage); reduce them (e.g.
        ``.mean()``) for the scalar loss. NaN anywhere in a row gives a NaN loss.

    The backward into ``model_out`` is one fused pass that regenerates eps (no
    stored residual). Gradients w.r.t. x0, a given noise or coeffs, when they
    require them, are computed with plain torch ops.

    Regenerate or read? On a GPU regenerating eps should cost little next to
    memory traffic (pass ``seed``; not yet measured). On a CPU generating normals costs about ten
    times reading them (benchmarks/results/losses-cpu-*.md), so passing the noise
    that q_sample returned (``noise=eps``) is the faster choice there. With
    fp16/bf16 storage the regenerated eps is exactly the fp32 eps that formed
    x_t, while q_sample's returned noise is that eps rounded to the storage dtype.
    """
    check_tensor("x0", x0, ndim_min=1)
    check_tensor("model_out", model_out)
    check_like("model_out", model_out, "x0", x0)
    device = x0.device
    check_tensor("coeffs", coeffs, dtypes=_COEFF_DTYPES)
    batch = x0.shape[0]
    if coeffs.dim() != 2 or coeffs.shape[0] != batch or coeffs.shape[1] != 4:
        raise ValueError(f"coeffs must have shape (B, 4) = ({batch}, 4) (columns m, ca, cb, w), "
                         f"got {tuple(coeffs.shape)}")
    if coeffs.device != device:
        raise ValueError(f"coeffs must be on the device of x0 ({device}), got {coeffs.device}")
    stream = check_stream(stream)
    noise, seed_i, rs = _resolve_seed("fused_diffusion_mse", noise, seed, row_seeds, "x0", x0)
    model_out, x0, coeffs = contiguous(model_out), contiguous(x0), contiguous(coeffs)

    backend = _backend.resolve(device)
    if backend == "torch":
        return diffusion_loss_reference(model_out, x0, noise, coeffs, seed_i, stream, rs)
    if backend != "triton":  # compiled op; its autograd is C++ (csrc/autograd/loss.cpp)
        return _COMPILED.diffusion_loss(model_out, x0, noise, coeffs, seed_i, stream, rs)
    kernels = _triton_launchers()
    if needs_grad(model_out, x0, noise, coeffs):
        return _DiffusionLossFn.apply(kernels, model_out, x0, noise, coeffs, seed_i, stream, rs)
    return kernels.diffusion_loss(model_out, x0, noise, coeffs, seed_i, stream, rs)


def reparameterize_kl(mu, logvar, seed=None, stream=0, *, noise=None, row_seeds=None):
    """VAE reparameterization and its analytic KL to N(0, I) in one pass, differentiable.

    ``z = mu + exp(logvar / 2)·eps`` (eps = ``pygen.randn(mu.shape, seed, stream)``
    drawn in the kernel, exactly as ``pygen.reparameterize`` draws it, or the
    given ``noise``), and per row b
    ``kl[b] = 0.5·Σ_i (mu² + exp(logvar) - 1 - logvar)``.

    Args:
        mu, logvar: same shape/dtype/device, at least 1-D (row b is ``mu[b]``).
        seed: int, or a 1-D int64 tensor of per-row seeds (length mu.shape[0]).
        stream: 64-bit stream id for the noise.
        noise: eps to use instead of drawing it.
        row_seeds: per-row seeds (same as passing them as ``seed``).

    Returns ``(z, kl)``: z like mu, kl (B,) float32 (float64 for float64 storage).
    The backward is one fused pass regenerating eps (gradients w.r.t. mu and
    logvar; a given noise gets its gradient with plain torch ops).
    """
    check_tensor("mu", mu, ndim_min=1)
    check_tensor("logvar", logvar)
    check_like("logvar", logvar, "mu", mu)
    stream = check_stream(stream)
    noise, seed_i, rs = _resolve_seed("reparameterize_kl", noise, seed, row_seeds, "mu", mu)
    mu, logvar = contiguous(mu), contiguous(logvar)

    backend = _backend.resolve(mu.device)
    if backend == "torch":
        return reparameterize_kl_reference(mu, logvar, noise, seed_i, stream, rs)
    if backend != "triton":  # compiled op; its autograd is C++ (csrc/autograd/loss.cpp)
        return _COMPILED.reparameterize_kl(mu, logvar, noise, seed_i, stream, rs)
    kernels = _triton_launchers()
    if needs_grad(mu, logvar, noise):
        return _ReparameterizeKLFn.apply(kernels, mu, logvar, noise, seed_i, stream, rs)
    return kernels.reparameterize_kl(mu, logvar, noise, seed_i, stream, rs)


# ---------------------------------------------------------------------------
# torch.library registration
# ---------------------------------------------------------------------------
def _register():
    from pygen.ops import _registry

    for name, ref in (("diffusion_loss", diffusion_loss_reference),
                      ("diffusion_loss_backward", diffusion_loss_backward_reference),
                      ("reparameterize_kl", reparameterize_kl_reference),
                      ("reparameterize_kl_backward", reparameterize_kl_backward_reference)):
        _registry.register_reference(name, ref)

    def diffusion_loss_triton(model_out, x0, noise, coeffs, seed, stream, row_seeds):
        return _triton_launchers().diffusion_loss(model_out, x0, noise, coeffs, seed, stream, row_seeds)

    def diffusion_loss_backward_triton(grad_rows, model_out, x0, noise, coeffs, seed, stream, row_seeds):
        return _triton_launchers().diffusion_loss_backward(grad_rows, model_out, x0, noise, coeffs, seed, stream,
                                                           row_seeds)

    def reparameterize_kl_triton(mu, logvar, noise, seed, stream, row_seeds):
        return _triton_launchers().reparameterize_kl(mu, logvar, noise, seed, stream, row_seeds)

    def reparameterize_kl_backward_triton(grad_z, grad_kl, mu, logvar, noise, seed, stream, row_seeds):
        return _triton_launchers().reparameterize_kl_backward(grad_z, grad_kl, mu, logvar, noise, seed, stream,
                                                              row_seeds)

    _registry.register_triton("diffusion_loss", diffusion_loss_triton)
    _registry.register_triton("diffusion_loss_backward", diffusion_loss_backward_triton)
    _registry.register_triton("reparameterize_kl", reparameterize_kl_triton)
    _registry.register_triton("reparameterize_kl_backward", reparameterize_kl_backward_triton)
    _registry.register_fake("diffusion_loss", _diffusion_loss_fake)
    _registry.register_fake("diffusion_loss_backward", _diffusion_loss_backward_fake)
    _registry.register_fake("reparameterize_kl", _reparameterize_kl_fake)
    _registry.register_fake("reparameterize_kl_backward", _reparameterize_kl_backward_fake)

    # The compiled extension registers these ops' autograd in C++ (csrc/autograd/loss.cpp); the
    # Python formulas serve the reference fallback (extension absent) and the Triton variants.
    if "diffusion_loss" in _registry.MISSING:
        torch.library.register_autograd("pygen::diffusion_loss", _diffusion_loss_backward,
                                        setup_context=_diffusion_loss_setup_context, lib=_registry._lib)
    if "reparameterize_kl" in _registry.MISSING:
        torch.library.register_autograd("pygen::reparameterize_kl", _reparameterize_kl_backward,
                                        setup_context=_reparameterize_kl_setup_context, lib=_registry._lib)
    if "diffusion_loss" in _registry.TRITON_OPS:
        torch.library.register_autograd(_registry.TRITON_OPS["diffusion_loss"], _diffusion_loss_triton_backward,
                                        setup_context=_diffusion_loss_setup_context, lib=_registry._lib)
        torch.library.register_autograd(_registry.TRITON_OPS["reparameterize_kl"],
                                        _reparameterize_kl_triton_backward,
                                        setup_context=_reparameterize_kl_setup_context, lib=_registry._lib)


_register()
