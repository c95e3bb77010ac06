"""Unadjusted Langevin / Euler–Maruyama step: ``pygen.langevin_step``; and the
score-SDE SNR Langevin corrector step: ``langevin_snr_step``.

Computes ``x_next = x + (dt/2)·score + sqrt(dt)·z`` (seed 000, "Langevin
Dynamics"), with ``dt`` a scalar or one step size per batch row and ``z``
either a given noise tensor or exactly ``pygen.randn(x.shape, seed, stream)``
drawn inside the kernel.

Op: ``torch.ops.pygen.langevin_step(x, score, step_sizes, step_size, noise,
seed, stream, row_seeds, stream_offset=None) -> Tensor`` (``step_sizes`` None
-> scalar ``step_size``; ``noise`` None -> in-kernel noise from
``seed``/``row_seeds``, from stream ``stream + stream_offset[0]`` when a device
offset is given: a loop's step counter, for CUDA graphs).
Backends: torch reference (this file), Triton (kernels/langevin.py), C++ CPU
(csrc/cpu/langevin.cpp), CUDA (csrc/cuda/langevin.cu). The op has autograd
(gradients for x, score, noise and per-row step sizes).

``langevin_snr_step`` (score_sde's LangevinCorrector, Song et al. 2021): per
batch row r, g_r = ||score_r||_2 and n_r = ||z_r||_2 (sums of squares
accumulated in fp32, fp64 for fp64 storage); with ``batch_norm`` both are
replaced by their means over the batch (score_sde's default); then
``dt_r = four_alpha_snr2 · (n_r / g_r)²`` (= 2·score_sde's step_size, i.e.
``pygen.langevin_step``'s step size) and
``out = x + (dt_r/2)·score + sqrt(dt_r)·z``. ``dt_r`` is written to ``step``.
Op: ``torch.ops.pygen.langevin_snr_step(x, score, noise, out, step, seed,
stream, row_seeds, four_alpha_snr2, batch_norm, k_table=None, step_index=None)
-> ()`` (writes ``out``, which may be ``x``, and the (B,) ``step``). One fused
reduction (per-row sums of score² and z², z regenerated from Philox when drawn
in-kernel, never stored) plus one fused update; no host sync. A zero score row
gives inf/NaN as the formula says; NaN propagates. Backends as above; no
autograd (a sampler op).

Device step index (for loops captured in a CUDA graph, where host values are
frozen): with ``k_table`` (1-D, the accumulation dtype) and ``step_index``
(int64, shape (1,)) on x's device, the kernels read i = step_index[0] and use
the step constant ``four_alpha_snr2·k_table[i]`` (NaN when i is outside the
table) and the noise stream ``stream + i``; the op then stores i + 1 in
``step_index``. Eagerly, the same as passing those two values from the host.
"""
import math
import numbers

import torch

from pygen import _backend
from pygen.ops._common import (call_compiled, check_like, check_stream, check_stream_offset, check_tensor, contiguous,
                               needs_grad, noise_source, offset_stream)
from pygen.ops.random import randn_reference

__all__ = ["langevin_step", "langevin_snr_step"]

_STEP_DTYPES = (torch.float32, torch.float64)


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------
# torch reference (the spec)
# ---------------------------------------------------------------------------
def langevin_step_reference(x, score, step_sizes, step_size, noise, seed, stream, row_seeds, stream_offset=None):
    """Plain-PyTorch ``x + (dt/2)·score + sqrt(dt)·z`` in fp32 (fp64 for fp64 storage)."""
    acc = _acc_dtype(x.dtype)
    if noise is None:
        stream = offset_stream(stream, stream_offset)
        z = randn_reference(x.shape, seed, stream, row_seeds, device=x.device, dtype=torch.float32)
    else:
        z = noise
    if step_sizes is None:
        if not step_size >= 0.0:
            raise ValueError(f"step_size must be non-negative, got {step_size}")
        c1, c2 = 0.5 * step_size, math.sqrt(step_size)
    else:
        dt = step_sizes.to(acc).reshape((-1,) + (1,) * (x.dim() - 1))
        c1, c2 = 0.5 * dt, dt.sqrt()
    out = x.to(acc) + c1 * score.to(acc) + c2 * z.to(acc)
    return out.to(x.dtype)


def snr_noise_reference(x, noise, seed, stream, row_seeds):
    """The z of ``langevin_snr_step`` in the accumulation dtype: ``noise``, or pygen.randn's fp32 normals."""
    acc = _acc_dtype(x.dtype)
    if noise is not None:
        return noise.to(acc)
    return randn_reference(x.shape, seed, stream, row_seeds, device=x.device, dtype=torch.float32).to(acc)


def _indexed_k_and_stream(x, four_alpha_snr2, stream, k_table, step_index):
    """(four_alpha_snr2·k_table[i] (NaN outside the table), stream + i) at i = step_index[0], as 0-d tensors
    on the device (no host read), and step_index advanced."""
    n = k_table.shape[0]
    valid = (step_index >= 0) & (step_index < n)
    entry = torch.where(valid, k_table.index_select(0, step_index.clamp(0, n - 1)), float("nan"))
    k = entry * four_alpha_snr2  # (in the accumulation dtype, as the kernels form it)
    stream = offset_stream(stream, step_index)  # (a new tensor: read before the advance below)
    step_index.add_(1)
    return k.view(()), stream


def langevin_snr_step_reference(x, score, noise, out, step, seed, stream, row_seeds, four_alpha_snr2, batch_norm,
                                k_table=None, step_index=None):
    """Plain-PyTorch SNR Langevin corrector step (module docstring); writes ``out`` and ``step``."""
    acc = _acc_dtype(x.dtype)
    b = x.shape[0]
    if step_index is not None:
        four_alpha_snr2, stream = _indexed_k_and_stream(x, four_alpha_snr2, stream, k_table, step_index)
    if x.numel() == 0:
        step.fill_(float("nan"))
        return
    z = snr_noise_reference(x, noise, seed, stream, row_seeds)
    s = score.to(acc)
    g = s.reshape(b, -1).square().sum(1).sqrt()
    n = z.reshape(b, -1).square().sum(1).sqrt()
    if batch_norm:
        g, n = g.mean().expand(b), n.mean().expand(b)
    r = n / g
    dt = four_alpha_snr2 * (r * r)
    view = (-1,) + (1,) * (x.dim() - 1)
    res = x.to(acc) + (0.5 * dt).view(view) * s + dt.sqrt().view(view) * z
    step.copy_(dt)
    out.copy_(res)


# ---------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------
def _check_step_size(step_size, x):
    """-> (step_sizes tensor or None, float step_size)."""
    if isinstance(step_size, torch.Tensor):
        check_tensor("step_size", step_size, dtypes=_STEP_DTYPES, device=x.device)
        if x.dim() == 0:
            raise ValueError("step_size can only be a per-row tensor when x has a batch dimension; x is 0-d")
        if step_size.dim() != 1 or step_size.shape[0] != x.shape[0]:
            raise ValueError(
                f"step_size tensor must be 1-D with one step per row (length {x.shape[0]}), "
                f"got shape {tuple(step_size.shape)}"
            )
        # Host check of a CPU tensor only: reading a device tensor would sync every step. On a device,
        # a negative step gives NaN rows (sqrt(2·step)), which the sample then shows.
        if step_size.device.type == "cpu" and not bool((step_size.detach() >= 0).all()):
            raise ValueError("step_size must be non-negative (and not NaN) in every row")
        return contiguous(step_size), 0.0
    if isinstance(step_size, bool) or not isinstance(step_size, numbers.Real):
        raise TypeError(f"step_size must be a float or a 1-D float tensor, got {type(step_size).__name__}")
    step_size = float(step_size)
    if not step_size >= 0.0:
        raise ValueError(f"step_size must be non-negative, got {step_size}")
    return None, step_size


def langevin_step(x, score, step_size, seed=None, stream=0, *, noise=None, stream_offset=None):
    """One unadjusted Langevin (Euler–Maruyama) step: ``x + (dt/2)·score + sqrt(dt)·z``.

    Args:
        x: current sample, float32/float16/bfloat16/float64 (float64 on the
            torch and cpu backends; Triton computes fp64 too).
        score: ``∇ log π(x)``, same shape, dtype and device as ``x``.
        step_size: ``dt`` — a non-negative float, or a 1-D float32/float64
            tensor with one step per batch row (``len == x.shape[0]``) on
            ``x``'s device.
        seed: an int, or a 1-D int64 tensor of per-row seeds; the noise is
            then exactly ``pygen.randn(x.shape, seed, stream)``, drawn inside
            the kernel. Must be None when ``noise`` is given.
        stream: 64-bit noise stream id (e.g. the step number).
        stream_offset: None, or an int64 tensor of shape (1,) on x's device (a loop's step
            counter): the kernel reads it and draws z from stream ``stream + stream_offset[0]``,
            so the same launch replays correctly in a CUDA graph.
        noise: a given ``z`` (same shape, dtype and device as ``x``) instead
            of in-kernel noise.

    Returns a new tensor like ``x`` (contiguous). NaN in ``x``, ``score`` or
    ``noise`` propagates. Arithmetic is fp32 (fp64 for fp64 storage).
    Gradients flow to ``x``, ``score``, ``noise`` and a step-size tensor.
    """
    check_tensor("x", x)
    check_like("score", score, "x", x)
    step_sizes, step_size = _check_step_size(step_size, x)
    noise, seed_i, row_seeds = noise_source("langevin_step", noise, seed, "x", x, seed_with_noise_ok=False)
    stream = check_stream(stream)
    stream_offset = check_stream_offset(stream_offset, x, "x")
    x, score = contiguous(x), contiguous(score)
    args = (x, score, step_sizes, step_size, noise, seed_i, stream, row_seeds, stream_offset)

    backend = _backend.resolve(x.device)
    if backend == "torch":
        return langevin_step_reference(*args)
    grad = needs_grad(x, score, noise, step_sizes)
    if backend == "triton":
        if grad:
            return torch.ops.pygen.langevin_step_triton(*args)
        from pygen.kernels import langevin as tk

        return tk.langevin_step(*args)
    return call_compiled(torch.ops.pygen.langevin_step.default, grad, *args)


def langevin_snr_step(x, score, four_alpha_snr2, seed=None, stream=0, *, noise=None, batch_norm=True, out=None,
                      return_step=False, k_table=None, step_index=None):
    """score_sde's SNR Langevin corrector step, fused (norms, step size and update on the device).

    Per batch row r: g_r = ||score_r||, n_r = ||z_r|| (batch means of both when
    ``batch_norm``, score_sde's default; else each row's own),
    ``dt_r = four_alpha_snr2·(n_r/g_r)²`` and ``x + (dt_r/2)·score + sqrt(dt_r)·z``.
    score_sde's step_size is dt_r/2, so ``four_alpha_snr2 = 4·alpha·snr²``.

    Args:
        x: current sample with a batch dimension, float32/float16/bfloat16/float64.
        score: ``∇ log p_t(x)``, same shape, dtype and device as ``x``.
        four_alpha_snr2: 4·alpha·snr², a finite float >= 0.
        seed: an int, or a 1-D int64 tensor of per-row seeds: z is exactly
            ``pygen.randn(x.shape, seed, stream)`` (fp32 normals), drawn in the kernels
            and never stored. Must be None when ``noise`` is given.
        stream: 64-bit noise stream id.
        noise: a given z (like ``x``) instead of in-kernel noise.
        batch_norm: batch-mean norms (True) or per-row norms (False).
        out: optional contiguous output like ``x``; may be ``x`` itself (in place).
        return_step: also return the (B,) tensor of dt_r (float32; float64 for float64 x).
        k_table, step_index: a device step index (for a loop captured in a CUDA graph): a 1-D
            float32 (float64 for float64 x) table and an int64 tensor of shape (1,), both on x's
            device. The step constant is then ``four_alpha_snr2·k_table[i]`` (NaN for an i outside
            the table) and the noise stream ``stream + i``, at i = step_index[0] read on the
            device; the call then increments step_index.

    Returns ``out`` (or ``(out, dt)``). No host sync. NaN propagates; a zero score
    gives an inf/NaN step as the formula says.
    """
    check_tensor("x", x)
    if x.dim() < 1:
        raise ValueError("x must have a batch dimension (the SNR norms are per batch row), got a 0-d tensor")
    check_like("score", score, "x", x)
    if isinstance(four_alpha_snr2, bool) or not isinstance(four_alpha_snr2, numbers.Real):
        raise TypeError(f"four_alpha_snr2 must be a real number, got {type(four_alpha_snr2).__name__}")
    four_alpha_snr2 = float(four_alpha_snr2)
    if not (math.isfinite(four_alpha_snr2) and four_alpha_snr2 >= 0.0):
        raise ValueError(f"four_alpha_snr2 must be a finite number >= 0, got {four_alpha_snr2}")
    if not isinstance(batch_norm, bool):
        raise TypeError(f"batch_norm must be a bool, got {type(batch_norm).__name__}")
    if not isinstance(return_step, bool):
        raise TypeError(f"return_step must be a bool, got {type(return_step).__name__}")
    noise, seed_i, row_seeds = noise_source("langevin_snr_step", noise, seed, "x", x, seed_with_noise_ok=False)
    stream = check_stream(stream)
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    else:
        check_like("out", out, "x", x)
        if not out.is_contiguous():
            raise ValueError("out must be contiguous")
    _check_step_index(k_table, step_index, x)
    x, score = contiguous(x), contiguous(score)
    step = torch.empty(x.shape[0], dtype=_acc_dtype(x.dtype), device=x.device)
    run_langevin_snr_step(_backend.resolve(x.device), x, score, noise, out, step, seed_i, stream, row_seeds,
                          four_alpha_snr2, batch_norm, k_table, step_index)
    return (out, step) if return_step else out


def _check_step_index(k_table, step_index, x):
    if (k_table is None) != (step_index is None):
        raise ValueError("k_table and step_index go together: pass both (a device step index) or neither")
    if k_table is None:
        return
    check_tensor("k_table", k_table, dtypes=(_acc_dtype(x.dtype),), device=x.device)
    if k_table.dim() != 1 or k_table.shape[0] < 1 or not k_table.is_contiguous():
        raise ValueError(f"k_table must be a contiguous 1-D tensor with at least one entry, got shape "
                         f"{tuple(k_table.shape)}")
    check_stream_offset(step_index, x, "x", name="step_index")


def run_langevin_snr_step(backend, x, score, noise, out, step, seed, stream, row_seeds, four_alpha_snr2, batch_norm,
                          k_table=None, step_index=None):
    """The per-call hot path (checked, contiguous arguments; ``backend`` resolved by the caller)."""
    args = (x, score, noise, out, step, seed, stream, row_seeds, four_alpha_snr2, batch_norm, k_table, step_index)
    if backend == "torch":
        langevin_snr_step_reference(*args)
    elif backend == "triton":
        from pygen.kernels import langevin as tk

        tk.langevin_snr_step(*args)
    else:
        torch.ops.pygen.langevin_snr_step(*args)


# ---------------------------------------------------------------------------
# torch.library registration
# ---------------------------------------------------------------------------
def _fake(x, score, step_sizes, step_size, noise, seed, stream, row_seeds, stream_offset=None):
    return x.new_empty(x.shape)


def _setup_context(ctx, inputs, output):
    x, score, step_sizes, step_size, noise, seed, stream, row_seeds = inputs[:8]
    stream_offset = inputs[8] if len(inputs) > 8 else None
    ctx.step_size, ctx.seed, ctx.stream = step_size, seed, stream
    ctx.has_noise, ctx.has_steps = noise is not None, step_sizes is not None
    want_steps_grad = step_sizes is not None and ctx.needs_input_grad[2]
    ctx.want_steps_grad = want_steps_grad
    ctx.save_for_backward(
        step_sizes,
        score if want_steps_grad else None,
        noise if want_steps_grad else None,
        row_seeds if want_steps_grad else None,
        # (a copy: a loop advances its counter before the backward runs)
        stream_offset.clone() if want_steps_grad and stream_offset is not None else None,
    )


def _backward(ctx, grad):
    step_sizes, score, noise, row_seeds, stream_offset = ctx.saved_tensors
    if ctx.has_steps:
        dt = step_sizes.to(grad.dtype).reshape((-1,) + (1,) * (grad.dim() - 1))
        c1, c2 = 0.5 * dt, dt.sqrt()
    else:
        c1, c2 = 0.5 * ctx.step_size, math.sqrt(ctx.step_size)
    grad_x = grad if ctx.needs_input_grad[0] else None
    grad_score = grad * c1 if ctx.needs_input_grad[1] else None
    grad_noise = grad * c2 if ctx.has_noise and ctx.needs_input_grad[4] else None
    grad_steps = None
    if ctx.want_steps_grad:
        # d out / d dt = score/2 + z / (2 sqrt(dt)); in-kernel z is regenerated.
        if noise is None:  # pygen.randn(shape, seed, stream + offset), the offset read on the device
            noise = torch.empty(grad.shape, dtype=torch.float32, device=grad.device)
            torch.ops.pygen.randn_fill_(noise, ctx.seed, ctx.stream, row_seeds, stream_offset)
        d = 0.5 * score.to(grad.dtype) + noise.to(grad.dtype) * (0.5 / c2)
        grad_steps = (grad * d).reshape(grad.shape[0], -1).sum(1).to(step_sizes.dtype)
    return grad_x, grad_score, grad_steps, None, grad_noise, None, None, None, None


def _check_snr_op_args(x, score, noise, out, step, row_seeds, k_table, step_index):
    """Checks of direct torch.ops.pygen.langevin_snr_step_triton calls (what the C++ op checks)."""
    if x.dim() < 1:
        raise ValueError("langevin_snr_step: x must have a batch dimension")
    for name, t in (("score", score), ("noise", noise), ("out", out)):
        if t is not None and (t.shape != x.shape or t.dtype != x.dtype or t.device != x.device):
            raise ValueError(f"langevin_snr_step: {name} must match x in shape, dtype and device")
    if not out.is_contiguous() or not step.is_contiguous():
        raise ValueError("langevin_snr_step: out and step must be contiguous")
    if step.dtype != _acc_dtype(x.dtype) or step.shape != (x.shape[0],) or step.device != x.device:
        raise ValueError(f"langevin_snr_step: step must be a ({x.shape[0]},) {_acc_dtype(x.dtype)} tensor on x's device")
    if row_seeds is not None and (row_seeds.dtype != torch.int64 or row_seeds.shape != (x.shape[0],)):
        raise ValueError("langevin_snr_step: row_seeds must be 1-D int64 with one seed per row")
    _check_step_index(k_table, step_index, x)


def _register():
    from pygen.ops import _registry

    _registry.register_reference("langevin_step", langevin_step_reference)

    def langevin_step_triton(x, score, step_sizes, step_size, noise, seed, stream, row_seeds, stream_offset=None):
        from pygen.kernels import langevin as tk

        if step_sizes is None and not step_size >= 0.0:
            raise ValueError(f"step_size must be non-negative, got {step_size}")
        check_stream_offset(stream_offset, x, "x")
        x, score = contiguous(x), contiguous(score)
        noise = contiguous(noise) if noise is not None else None
        step_sizes = contiguous(step_sizes) if step_sizes is not None else None
        row_seeds = contiguous(row_seeds) if row_seeds is not None else None
        return tk.langevin_step(x, score, step_sizes, step_size, noise, seed, stream, row_seeds, stream_offset)

    _registry.register_triton("langevin_step", langevin_step_triton)
    _registry.register_fake("langevin_step", _fake)

    _registry.register_reference("langevin_snr_step", langevin_snr_step_reference)

    def langevin_snr_step_triton(x, score, noise, out, step, seed, stream, row_seeds, four_alpha_snr2, batch_norm,
                                 k_table=None, step_index=None):
        from pygen.kernels import langevin as tk

        _check_snr_op_args(x, score, noise, out, step, row_seeds, k_table, step_index)
        x, score = contiguous(x), contiguous(score)
        noise = contiguous(noise) if noise is not None else None
        row_seeds = contiguous(row_seeds) if row_seeds is not None else None
        tk.langevin_snr_step(x, score, noise, out, step, seed, stream, row_seeds, four_alpha_snr2, batch_norm,
                             k_table, step_index)

    _registry.register_triton("langevin_snr_step", langevin_snr_step_triton,
                              mutates_args=("out", "step", "step_index"))
    _registry.register_fake("langevin_snr_step", lambda *args: None)
    for qualname in ["pygen::langevin_step"] + (
        [_registry.TRITON_OPS["langevin_step"]] if "langevin_step" in _registry.TRITON_OPS else []
    ):
        torch.library.register_autograd(qualname, _backward, setup_context=_setup_context)


_register()
