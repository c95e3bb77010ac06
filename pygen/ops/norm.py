"""Fused norm / modulation ops around attention: ``pygen.adaln_modulate``,
``pygen.gated_residual``, ``pygen.group_norm`` and ``pygen.timestep_embedding``.

Ops (schemas in csrc/bindings.cpp / pygen/ops/_schemas.py):

``torch.ops.pygen.adaln_modulate(x, weight, bias, shift, scale, eps) -> (y, mean, rstd)``
    DiT's ``modulate(norm(x), shift, scale)`` (adaLN / adaLN-Zero). x is
    (B, N, C); LayerNorm over C (biased variance, ``eps`` inside the rsqrt),
    optional elementwise affine ``weight``/``bias`` (C,), then
    ``y = xn·(1 + scale[b]) + shift[b]`` with shift/scale (B, C) or None.
    mean/rstd (B, N) are float32 (float64 for float64 x), saved for backward.
``torch.ops.pygen.adaln_modulate_backward(grad_y, x, weight, bias, scale, mean, rstd)
-> (dx, dweight, dbias, dshift, dscale)``
    dweight/dbias/dscale are empty (0,) tensors when weight/bias/scale is None.
    The backward op is not told whether a shift was given, so dshift
    (= Σ_N grad_y, (B, C)) is always computed; the autograd wrappers drop it
    when there was no shift.
``torch.ops.pygen.gated_residual(x, gate, y) -> out``
    adaLN-Zero's residual ``out = x + gate[b, None, :]·y``; x, y (B, N, C), gate (B, C).
``torch.ops.pygen.gated_residual_backward(grad, gate, y) -> (dgate, dy)``
    ``dgate = Σ_N grad·y``, ``dy = grad·gate`` (dx = grad needs no op).
``torch.ops.pygen.group_norm(x, weight, bias, groups, eps, silu) -> (y, mean, rstd)``
    GroupNorm of x (N, C, *spatial) (2-D to 5-D) with optional fused SiLU:
    ``y = SiLU?((x - mean)·rstd·w[c] + b[c])``, stats per (n, group) (N, G)
    float32 (float64 for float64 x). x is NCHW-contiguous or channels-last
    (the dense layout of (N, *spatial, C): torch.channels_last,
    channels_last_3d, or its 3-D analogue); y has x's memory format.
``torch.ops.pygen.group_norm_backward(grad_y, x, weight, bias, mean, rstd, groups, silu)
-> (dx, dweight, dbias)``
    The SiLU derivative is folded in (the pre-activation is recomputed).
    grad_y must have x's layout (the C++ and Triton ops copy it otherwise);
    dx has x's layout; dweight/dbias empty (0,) when absent.
``torch.ops.pygen.timestep_embedding(t, dim, max_period, downscale_freq_shift, scale,
flip_sin_to_cos) -> emb``
    diffusers' ``get_timestep_embedding`` (seed 000: "sin ωt + cos ωt"):
    half = dim // 2; f_k = exp(-ln(max_period)·k / (half - downscale_freq_shift));
    a_k = scale·(t·f_k); emb = [sin a, cos a] ([cos a, sin a] when flipped), one
    zero column appended for odd dim. t (B,) int or float; emb (B, dim) float32
    (float64 for float64 t). The fp32 operations are done in diffusers' order
    (the torch reference matches diffusers bit for bit on the CPU; kernels agree to
    the rounding of exp/sin/cos).
``torch.ops.pygen.timestep_embedding_backward(grad, t, ...) -> dt``
    ``dt_b = Σ_k scale·f_k·(g_sin,k·cos a_k - g_cos,k·sin a_k)`` in t's dtype.

Reductions (LayerNorm/GroupNorm statistics, dweight, dbias, dshift, dscale,
dgate, dt) accumulate in fp32 (fp64 for fp64 storage) and are deterministic
on every backend: fixed tiles summed in a fixed order, no atomics.

Backends: torch reference (this file), Triton (kernels/norm.py), C++ CPU
(csrc/cpu/norm.cpp), CUDA (csrc/cuda/norm.cu). Every public function is
differentiable. The compiled ops (cpu, cuda) carry a C++ autograd calling their
backward op (csrc/autograd/norm.cpp); the torch and triton backends use the
torch.autograd.Functions below, and ``torch.library.register_autograd`` is
registered on the ``_triton`` variants (and on the forward ops when the
extension is absent) with the same formulas.
"""
import math

import torch
from torch.autograd.function import once_differentiable

from pygen import _backend
from pygen.ops._common import STORAGE_DTYPES, check_int, check_real, check_tensor, contiguous, needs_grad

__all__ = ["adaln_modulate", "gated_residual", "group_norm", "timestep_embedding"]

_T_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)
_T_DTYPES = STORAGE_DTYPES + _T_INT_DTYPES


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _empty0(like):
    return torch.empty((0,), dtype=like.dtype, device=like.device)


def _dtype_name(dtype):
    return str(dtype).replace("torch.", "")


# ---------------------------------------------------------------------------
# argument checks (public API and the Triton / reference op implementations)
# ---------------------------------------------------------------------------
def _check_param(name, value, ref_name, ref, shape):
    """Optional tensor ``value``: None, or ``shape`` with ``ref``'s dtype and device."""
    if value is None:
        return None
    check_tensor(name, value, dtypes=None)
    if value.dtype != ref.dtype:
        raise TypeError(f"{name} must have the dtype of {ref_name} ({_dtype_name(ref.dtype)}), "
                        f"got {_dtype_name(value.dtype)}")
    if value.device != ref.device:
        raise ValueError(f"{name} must be on the device of {ref_name} ({ref.device}), got {value.device}")
    if tuple(value.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(value.shape)}")
    return contiguous(value)


def check_adaln_args(x, weight, bias, shift, scale):
    """Checked (x, weight, bias, shift, scale), made contiguous (a documented copy when not)."""
    check_tensor("x", x)
    if x.dim() != 3:
        raise ValueError(f"x must be 3-D (batch, tokens, channels), got shape {tuple(x.shape)}")
    b, _, c = x.shape
    weight = _check_param("weight", weight, "x", x, (c,))
    bias = _check_param("bias", bias, "x", x, (c,))
    shift = _check_param("shift", shift, "x", x, (b, c))
    scale = _check_param("scale", scale, "x", x, (b, c))
    return contiguous(x), weight, bias, shift, scale


def check_gated_residual_args(x, gate, y):
    check_tensor("x", x)
    if x.dim() != 3:
        raise ValueError(f"x must be 3-D (batch, tokens, channels), got shape {tuple(x.shape)}")
    y = _check_param("y", y, "x", x, x.shape)
    gate = _check_param("gate", gate, "x", x, (x.shape[0], x.shape[2]))
    return contiguous(x), gate, y


def group_norm_layout(x):
    """'nchw' (contiguous), 'nhwc' (channels-last: dense (N, *spatial, C)) or None (any other strides)."""
    if x.is_contiguous():
        return "nchw"
    if x.dim() >= 3 and x.movedim(1, -1).is_contiguous():
        return "nhwc"
    return None


def _memory_format(x, layout):
    if layout == "nchw":
        return torch.contiguous_format
    if x.dim() == 4:
        return torch.channels_last
    if x.dim() == 5:
        return torch.channels_last_3d
    return None  # 3-D channels-last: no torch memory format; use movedim


def to_layout(t, x, layout):
    """``t`` (shape of x) in x's layout ('nchw' / 'nhwc'); a no-op when it already is."""
    if layout == "nchw":
        return contiguous(t)
    if t.movedim(1, -1).is_contiguous():
        return t
    return t.movedim(1, -1).contiguous().movedim(-1, 1)


def check_group_norm_args(x, weight, bias, groups):
    """Checked (x, weight, bias, groups); x copied to NCHW-contiguous if in neither supported layout."""
    check_tensor("x", x)
    if not 2 <= x.dim() <= 5:
        raise ValueError(f"x must be 2-D to 5-D (N, C, *spatial), got shape {tuple(x.shape)}")
    groups = check_int("num_groups", groups, 1)
    c = x.shape[1]
    if c % groups != 0:
        raise ValueError(f"num_groups ({groups}) must divide the number of channels ({c})")
    weight = _check_param("weight", weight, "x", x, (c,))
    bias = _check_param("bias", bias, "x", x, (c,))
    if group_norm_layout(x) is None:
        x = x.contiguous()  # documented copy: any other strides become NCHW-contiguous
    return x, weight, bias, groups


def check_timestep_args(t, dim, max_period, downscale_freq_shift, scale):
    check_tensor("timesteps", t, dtypes=_T_DTYPES)
    if t.dim() != 1:
        raise ValueError(f"timesteps must be 1-D (one per batch element), got shape {tuple(t.shape)}")
    dim = check_int("embedding_dim", dim, 1)
    max_period = check_real("max_period", max_period, gt=0.0)
    shift = check_real("downscale_freq_shift", downscale_freq_shift)
    scale = check_real("scale", scale)
    if dim // 2 > 0 and dim // 2 - shift == 0.0:
        raise ValueError(f"embedding_dim // 2 - downscale_freq_shift must be nonzero (got {dim} // 2 - {shift}): "
                         "the frequencies would be 0/0")
    return contiguous(t), dim, max_period, shift, scale


# ---------------------------------------------------------------------------
# torch references (the spec; also the fallback ops when pygen._C is missing)
# ---------------------------------------------------------------------------
def adaln_modulate_reference(x, weight, bias, shift, scale, eps):
    """(y, mean, rstd) in plain PyTorch, fp32 math (fp64 for fp64 x)."""
    x, weight, bias, shift, scale = check_adaln_args(x, weight, bias, shift, scale)
    acc = _acc_dtype(x.dtype)
    xf = x.to(acc)
    mean = xf.mean(-1)
    var = (xf - mean[..., None]).square().mean(-1)
    rstd = torch.rsqrt(var + eps)
    z = (xf - mean[..., None]) * rstd[..., None]
    if weight is not None:
        z = z * weight.to(acc)
    if bias is not None:
        z = z + bias.to(acc)
    if scale is not None:
        z = z * (1.0 + scale.to(acc)[:, None, :])
    if shift is not None:
        z = z + shift.to(acc)[:, None, :]
    return z.to(x.dtype), mean, rstd


def adaln_modulate_backward_reference(grad_y, x, weight, bias, scale, mean, rstd):
    acc = _acc_dtype(x.dtype)
    g = grad_y.to(acc)
    xn = (x.to(acc) - mean.to(acc)[..., None]) * rstd.to(acc)[..., None]
    z = xn
    if weight is not None:
        z = z * weight.to(acc)
    if bias is not None:
        z = z + bias.to(acc)
    dshift = g.sum(1)
    dscale = (g * z).sum(1).to(x.dtype) if scale is not None else _empty0(x)
    dz = g * (1.0 + scale.to(acc)[:, None, :]) if scale is not None else g
    dweight = (dz * xn).sum((0, 1)).to(x.dtype) if weight is not None else _empty0(x)
    dbias = dz.sum((0, 1)).to(x.dtype) if bias is not None else _empty0(x)
    dxn = dz * weight.to(acc) if weight is not None else dz
    c1 = dxn.mean(-1, keepdim=True)
    c2 = (dxn * xn).mean(-1, keepdim=True)
    dx = rstd.to(acc)[..., None] * (dxn - c1 - xn * c2)
    return dx.to(x.dtype), dweight, dbias, dshift.to(x.dtype), dscale


def gated_residual_reference(x, gate, y):
    x, gate, y = check_gated_residual_args(x, gate, y)
    acc = _acc_dtype(x.dtype)
    return (x.to(acc) + gate.to(acc)[:, None, :] * y.to(acc)).to(x.dtype)


def gated_residual_backward_reference(grad, gate, y):
    acc = _acc_dtype(y.dtype)
    g = grad.to(acc)
    dgate = (g * y.to(acc)).sum(1).to(gate.dtype)
    dy = (g * gate.to(acc)[:, None, :]).to(y.dtype)
    return dgate, dy


def _gn_views(x, groups):
    """x in acc dtype as (N, G, Cg, S) (a copy for channels-last; fine in the reference)."""
    n, c = x.shape[:2]
    return x.to(_acc_dtype(x.dtype)).reshape(n, groups, c // groups, -1)


def _gn_affine(weight, bias, groups, c, acc):
    w = weight.to(acc).view(1, groups, c // groups, 1) if weight is not None else None
    b = bias.to(acc).view(1, groups, c // groups, 1) if bias is not None else None
    return w, b


def group_norm_reference(x, weight, bias, groups, eps, silu):
    x, weight, bias, groups = check_group_norm_args(x, weight, bias, groups)
    acc = _acc_dtype(x.dtype)
    xv = _gn_views(x, groups)
    mean = xv.mean((2, 3))
    var = (xv - mean[..., None, None]).square().mean((2, 3))
    rstd = torch.rsqrt(var + eps)
    a = (xv - mean[..., None, None]) * rstd[..., None, None]
    w, b = _gn_affine(weight, bias, groups, x.shape[1], acc)
    if w is not None:
        a = a * w
    if b is not None:
        a = a + b
    if silu:
        a = a * torch.sigmoid(a)
    out = torch.empty_like(x)  # x's layout
    out.copy_(a.reshape(x.shape))
    return out, mean, rstd


def group_norm_backward_reference(grad_y, x, weight, bias, mean, rstd, groups, silu):
    acc = _acc_dtype(x.dtype)
    n, c = x.shape[:2]
    xv = _gn_views(x, groups)
    g = grad_y.to(acc).reshape(xv.shape)
    xhat = (xv - mean.to(acc)[..., None, None]) * rstd.to(acc)[..., None, None]
    w, b = _gn_affine(weight, bias, groups, c, acc)
    if silu:
        a = xhat
        if w is not None:
            a = a * w
        if b is not None:
            a = a + b
        sig = torch.sigmoid(a)
        g = g * (sig * (1.0 + a * (1.0 - sig)))
    dweight = (g * xhat).sum((0, 3)).reshape(c).to(x.dtype) if weight is not None else _empty0(x)
    dbias = g.sum((0, 3)).reshape(c).to(x.dtype) if bias is not None else _empty0(x)
    dxhat = g * w if w is not None else g
    c1 = dxhat.mean((2, 3), keepdim=True)
    c2 = (dxhat * xhat).mean((2, 3), keepdim=True)
    dxv = rstd.to(acc)[..., None, None] * (dxhat - c1 - xhat * c2)
    dx = torch.empty_like(x)
    dx.copy_(dxv.reshape(x.shape))
    return dx, dweight, dbias


def timestep_frequencies_reference(half, max_period, downscale_freq_shift, dtype, device):
    """f_k as diffusers computes them (fp32 ops in its order; fp64 for fp64)."""
    k = torch.arange(half, dtype=dtype, device=device)
    exponent = (-math.log(max_period)) * k
    exponent = exponent / (half - downscale_freq_shift)
    return torch.exp(exponent)


def timestep_embedding_reference(t, dim, max_period, downscale_freq_shift, scale, flip_sin_to_cos):
    acc = torch.float64 if t.dtype == torch.float64 else torch.float32
    b = t.shape[0]
    half = dim // 2
    freqs = timestep_frequencies_reference(half, max_period, downscale_freq_shift, acc, t.device)
    arg = t[:, None].to(acc) * freqs[None, :]
    arg = scale * arg
    parts = [torch.cos(arg), torch.sin(arg)] if flip_sin_to_cos else [torch.sin(arg), torch.cos(arg)]
    if dim % 2 == 1:
        parts.append(torch.zeros((b, 1), dtype=acc, device=t.device))
    return torch.cat(parts, dim=-1)


def timestep_embedding_backward_reference(grad, t, dim, max_period, downscale_freq_shift, scale, flip_sin_to_cos):
    acc = torch.float64 if t.dtype == torch.float64 else torch.float32
    half = dim // 2
    freqs = timestep_frequencies_reference(half, max_period, downscale_freq_shift, acc, t.device)
    arg = scale * (t[:, None].to(acc) * freqs[None, :])
    g = grad.to(acc)
    g_first, g_second = g[:, :half], g[:, half:2 * half]
    g_sin, g_cos = (g_second, g_first) if flip_sin_to_cos else (g_first, g_second)
    dt = ((g_sin * torch.cos(arg) - g_cos * torch.sin(arg)) * (scale * freqs)).sum(-1)
    return dt.to(t.dtype)


_REFERENCES = {
    "adaln_modulate": adaln_modulate_reference,
    "adaln_modulate_backward": adaln_modulate_backward_reference,
    "gated_residual": gated_residual_reference,
    "gated_residual_backward": gated_residual_backward_reference,
    "group_norm": group_norm_reference,
    "group_norm_backward": group_norm_backward_reference,
    "timestep_embedding": timestep_embedding_reference,
    "timestep_embedding_backward": timestep_embedding_backward_reference,
}


_COMPILED_OPS = {}  # name -> torch.ops.pygen.<name>.default


def compiled(name):
    """``torch.ops.pygen.<name>.default`` (looked up once): the compiled op, for callers whose arguments
    are already checked (pygen.nn's blocks)."""
    op = _COMPILED_OPS.get(name)
    if op is None:
        op = _COMPILED_OPS[name] = getattr(torch.ops.pygen, name).default
    return op


def _run(backend, name, *args):
    """Run op ``name`` on ``backend`` (checked arguments): the hot path. On the compiled backends
    (cpu, cuda) the op carries its own C++ autograd (csrc/autograd/norm.cpp)."""
    if backend == "torch":
        return _REFERENCES[name](*args)
    if backend == "triton":
        from pygen.kernels import norm as tk

        return getattr(tk, name)(*args)
    return compiled(name)(*args)


def _autograd_here(backend, *tensors):
    """Whether the call needs one of the Python autograd.Functions below: the torch and triton
    backends (the compiled ops differentiate themselves in C++)."""
    return backend in ("torch", "triton") and needs_grad(*tensors)


# ---------------------------------------------------------------------------
# autograd of the torch and triton backends (eager path: one Function per op; the compiled ops
# have theirs in C++, csrc/autograd/norm.cpp)
# ---------------------------------------------------------------------------
class _AdaLNModulate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, backend, x, weight, bias, shift, scale, eps):
        y, mean, rstd = _run(backend, "adaln_modulate", x, weight, bias, shift, scale, eps)
        ctx.backend = backend
        ctx.has_shift = shift is not None
        ctx.save_for_backward(x, weight, bias, scale, mean, rstd)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        x, weight, bias, scale, mean, rstd = ctx.saved_tensors
        dx, dw, db, dsh, dsc = _run(ctx.backend, "adaln_modulate_backward", contiguous(grad_y), x, weight, bias,
                                    scale, mean, rstd)
        return (None, dx, dw if weight is not None else None, db if bias is not None else None,
                dsh if ctx.has_shift else None, dsc if scale is not None else None, None)


class _GatedResidual(torch.autograd.Function):
    @staticmethod
    def forward(ctx, backend, x, gate, y):
        ctx.backend = backend
        ctx.save_for_backward(gate, y)
        return _run(backend, "gated_residual", x, gate, y)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        gate, y = ctx.saved_tensors
        dgate, dy = _run(ctx.backend, "gated_residual_backward", contiguous(grad), gate, y)
        return None, grad, dgate, dy


class _GroupNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, backend, x, weight, bias, groups, eps, silu):
        y, mean, rstd = _run(backend, "group_norm", x, weight, bias, groups, eps, silu)
        ctx.backend, ctx.groups, ctx.silu = backend, groups, silu
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        grad_y = to_layout(grad_y, x, group_norm_layout(x))
        dx, dw, db = _run(ctx.backend, "group_norm_backward", grad_y, x, weight, bias, mean, rstd, ctx.groups,
                          ctx.silu)
        return None, dx, dw if weight is not None else None, db if bias is not None else None, None, None, None


class _TimestepEmbedding(torch.autograd.Function):
    @staticmethod
    def forward(ctx, backend, t, *params):
        ctx.backend, ctx.params = backend, params
        ctx.save_for_backward(t)
        return _run(backend, "timestep_embedding", t, *params)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        (t,) = ctx.saved_tensors
        return (None, _run(ctx.backend, "timestep_embedding_backward", contiguous(grad), t, *ctx.params)) + (
            None,) * len(ctx.params)


# ---------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------
def adaln_modulate(x, shift=None, scale=None, weight=None, bias=None, eps=1e-6):
    """DiT's ``modulate(LayerNorm(x), shift, scale)`` in one pass: ``LN(x)·(1 + scale) + shift``.

    Args:
        x: (B, N, C) tokens, float32/float16/bfloat16 (float64 on the torch,
            cpu and triton backends). Non-contiguous x is copied once.
        shift, scale: (B, C) per-sample modulation (adaLN), or None; x's dtype and device.
        weight, bias: optional LayerNorm affine (C,), applied before the modulation.
        eps: added to the (biased) variance inside the rsqrt.

    Returns y like x. Statistics and arithmetic in fp32 (fp64 for fp64).
    Differentiable in x, shift, scale, weight and bias; the parameter
    reductions are deterministic. NaN in a row propagates to that row.
    """
    x, weight, bias, shift, scale = check_adaln_args(x, weight, bias, shift, scale)
    eps = check_real("eps", eps, ge=0.0)
    backend = _backend.resolve(x.device)
    if _autograd_here(backend, x, weight, bias, shift, scale):
        return _AdaLNModulate.apply(backend, x, weight, bias, shift, scale, eps)
    return _run(backend, "adaln_modulate", x, weight, bias, shift, scale, eps)[0]


def gated_residual(x, gate, y):
    """adaLN-Zero's gated residual ``x + gate[:, None, :]·y`` in one pass.

    Args:
        x, y: (B, N, C), float32/float16/bfloat16/float64; y like x.
        gate: (B, C), x's dtype and device.

    Returns a new tensor like x (fp32 arithmetic, one rounding). Differentiable
    in x, gate and y (dgate = Σ_N grad·y, deterministic).
    """
    x, gate, y = check_gated_residual_args(x, gate, y)
    backend = _backend.resolve(x.device)
    if _autograd_here(backend, x, gate, y):
        return _GatedResidual.apply(backend, x, gate, y)
    return _run(backend, "gated_residual", x, gate, y)


def group_norm(x, num_groups, weight=None, bias=None, eps=1e-5, silu=False):
    """``F.group_norm`` (+ ``F.silu`` when ``silu``) fused: ``SiLU?((x - mean)·rstd·w + b)``.

    Args:
        x: (N, C, *spatial), 2-D to 5-D, float32/float16/bfloat16 (float64 on
            the torch, cpu and triton backends). NCHW-contiguous and
            channels-last (torch.channels_last / channels_last_3d, or the
            dense (N, L, C) layout of a 3-D x) are read in place and y keeps
            the layout; any other strides are copied to NCHW-contiguous first.
        num_groups: divides C.
        weight, bias: optional per-channel affine (C,), x's dtype and device.
        eps: added to the (biased) variance inside the rsqrt.
        silu: apply SiLU to the result (U-Net ``norm -> SiLU``).

    Statistics per (sample, group) in fp32 (fp64 for fp64). Differentiable in
    x, weight and bias; reductions are deterministic.
    """
    x, weight, bias, num_groups = check_group_norm_args(x, weight, bias, num_groups)
    eps = check_real("eps", eps, ge=0.0)
    if not isinstance(silu, bool):
        raise TypeError(f"silu must be a bool, got {type(silu).__name__}")
    backend = _backend.resolve(x.device)
    if _autograd_here(backend, x, weight, bias):
        return _GroupNorm.apply(backend, x, weight, bias, num_groups, eps, silu)
    return _run(backend, "group_norm", x, weight, bias, num_groups, eps, silu)[0]


def timestep_embedding(timesteps, embedding_dim, flip_sin_to_cos=False, downscale_freq_shift=1.0, scale=1.0,
                       max_period=10000):
    """Sinusoidal timestep embedding, exactly diffusers' ``get_timestep_embedding``.

    Args:
        timesteps: (B,) int or float timesteps (may be fractional).
        embedding_dim: output width; odd widths get one zero column at the end.
        flip_sin_to_cos: ``[cos, sin]`` instead of ``[sin, cos]``.
        downscale_freq_shift, scale, max_period: as in diffusers.

    Returns (B, embedding_dim) float32 (float64 for float64 timesteps).
    Differentiable in float timesteps (continuous-time models).
    """
    t, dim, max_period, shift, scale = check_timestep_args(timesteps, embedding_dim, max_period,
                                                           downscale_freq_shift, scale)
    if not isinstance(flip_sin_to_cos, bool):
        raise TypeError(f"flip_sin_to_cos must be a bool, got {type(flip_sin_to_cos).__name__}")
    params = (dim, max_period, shift, scale, flip_sin_to_cos)
    backend = _backend.resolve(t.device)
    if _autograd_here(backend, t):
        return _TimestepEmbedding.apply(backend, t, *params)
    return _run(backend, "timestep_embedding", t, *params)


# ---------------------------------------------------------------------------
# torch.library registration: references, Triton variants, fakes, autograd
# ---------------------------------------------------------------------------
def _fake_adaln(x, weight, bias, shift, scale, eps):
    stats = x.new_empty(x.shape[:2], dtype=_acc_dtype(x.dtype))
    return x.new_empty(x.shape), stats, stats.new_empty(stats.shape)


def _fake_adaln_backward(grad_y, x, weight, bias, scale, mean, rstd):
    b, _, c = x.shape
    return (x.new_empty(x.shape), x.new_empty((c,) if weight is not None else (0,)),
            x.new_empty((c,) if bias is not None else (0,)), x.new_empty((b, c)),
            x.new_empty((b, c) if scale is not None else (0,)))


def _fake_gated_residual(x, gate, y):
    return x.new_empty(x.shape)


def _fake_gated_residual_backward(grad, gate, y):
    return gate.new_empty(gate.shape), y.new_empty(y.shape)


def _fake_group_norm(x, weight, bias, groups, eps, silu):
    stats = x.new_empty((x.shape[0], groups), dtype=_acc_dtype(x.dtype))
    return torch.empty_like(x), stats, stats.new_empty(stats.shape)


def _fake_group_norm_backward(grad_y, x, weight, bias, mean, rstd, groups, silu):
    c = x.shape[1]
    return (torch.empty_like(x), x.new_empty((c,) if weight is not None else (0,)),
            x.new_empty((c,) if bias is not None else (0,)))


def _fake_timestep_embedding(t, dim, max_period, downscale_freq_shift, scale, flip_sin_to_cos):
    return t.new_empty((t.shape[0], dim), dtype=torch.float64 if t.dtype == torch.float64 else torch.float32)


def _fake_timestep_embedding_backward(grad, t, dim, max_period, downscale_freq_shift, scale, flip_sin_to_cos):
    return t.new_empty(t.shape)


_FAKES = {
    "adaln_modulate": _fake_adaln,
    "adaln_modulate_backward": _fake_adaln_backward,
    "gated_residual": _fake_gated_residual,
    "gated_residual_backward": _fake_gated_residual_backward,
    "group_norm": _fake_group_norm,
    "group_norm_backward": _fake_group_norm_backward,
    "timestep_embedding": _fake_timestep_embedding,
    "timestep_embedding_backward": _fake_timestep_embedding_backward,
}


def _autograd_rules(op_of):
    """register_autograd (setup_context, backward) pairs; ``op_of(name)`` is the op the backward calls."""

    def adaln_setup(ctx, inputs, output):
        x, weight, bias, shift, scale, eps = inputs
        _, mean, rstd = output
        ctx.mark_non_differentiable(mean, rstd)
        ctx.has = (weight is not None, bias is not None, shift is not None, scale is not None)
        ctx.save_for_backward(x, weight, bias, scale, mean, rstd)

    def adaln_backward(ctx, grad_y, _grad_mean, _grad_rstd):
        x, weight, bias, scale, mean, rstd = ctx.saved_tensors
        grads = op_of("adaln_modulate_backward")(contiguous(grad_y), x, weight, bias, scale, mean, rstd)
        dx, rest = grads[0], [g if has else None for g, has in zip(grads[1:], ctx.has)]
        return (dx, *rest, None)

    def gated_setup(ctx, inputs, output):
        _, gate, y = inputs
        ctx.save_for_backward(gate, y)

    def gated_backward(ctx, grad):
        gate, y = ctx.saved_tensors
        dgate, dy = op_of("gated_residual_backward")(contiguous(grad), gate, y)
        return grad, dgate, dy

    def gn_setup(ctx, inputs, output):
        x, weight, bias, groups, eps, silu = inputs
        _, mean, rstd = output
        ctx.mark_non_differentiable(mean, rstd)
        ctx.groups, ctx.silu = groups, silu
        ctx.has = (weight is not None, bias is not None)
        ctx.save_for_backward(x, weight, bias, mean, rstd)

    def gn_backward(ctx, grad_y, _grad_mean, _grad_rstd):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        layout = group_norm_layout(x) or "nchw"
        dx, dw, db = op_of("group_norm_backward")(to_layout(grad_y, x, layout), x, weight, bias, mean, rstd,
                                                  ctx.groups, ctx.silu)
        return dx, dw if ctx.has[0] else None, db if ctx.has[1] else None, None, None, None

    def temb_setup(ctx, inputs, output):
        t, *params = inputs
        ctx.params = params
        ctx.save_for_backward(t)

    def temb_backward(ctx, grad):
        (t,) = ctx.saved_tensors
        if not t.is_floating_point():
            return (None,) * 6
        return (op_of("timestep_embedding_backward")(contiguous(grad), t, *ctx.params),) + (None,) * 5

    return {
        "adaln_modulate": (adaln_setup, adaln_backward),
        "gated_residual": (gated_setup, gated_backward),
        "group_norm": (gn_setup, gn_backward),
        "timestep_embedding": (temb_setup, temb_backward),
    }


def _triton_impl(name):
    """The Triton variant of op ``name``: argument checks of direct calls, then the launcher."""

    def check_and_launch(*args):
        from pygen.kernels import norm as tk

        if name in _CHECKS:
            args = _CHECKS[name](*args)
        elif name == "group_norm_backward":
            grad, x, *rest = args
            layout = group_norm_layout(x)
            if layout is None:
                x, layout = x.contiguous(), "nchw"
            rest = [contiguous(a) if isinstance(a, torch.Tensor) else a for a in rest]
            args = (to_layout(grad, x, layout), x, *rest)
        else:
            args = tuple(contiguous(a) if isinstance(a, torch.Tensor) else a for a in args)
        return getattr(tk, name)(*args)

    return check_and_launch


def _check_adaln_op(x, weight, bias, shift, scale, eps):
    return (*check_adaln_args(x, weight, bias, shift, scale), check_real("eps", eps, ge=0.0))


def _check_gated_op(x, gate, y):
    return check_gated_residual_args(x, gate, y)


def _check_gn_op(x, weight, bias, groups, eps, silu):
    return (*check_group_norm_args(x, weight, bias, groups), check_real("eps", eps, ge=0.0), bool(silu))


def _check_temb_op(t, dim, max_period, shift, scale, flip):
    return (*check_timestep_args(t, dim, max_period, shift, scale), bool(flip))


_CHECKS = {
    "adaln_modulate": _check_adaln_op,
    "gated_residual": _check_gated_op,
    "group_norm": _check_gn_op,
    "timestep_embedding": _check_temb_op,
}


def _register():
    from pygen.ops import _registry

    for name, ref in _REFERENCES.items():
        _registry.register_reference(name, ref)
        _registry.register_triton(name, _triton_impl(name))
        _registry.register_fake(name, _FAKES[name])
    rules = _autograd_rules(lambda name: getattr(torch.ops.pygen, name))
    triton_rules = _autograd_rules(lambda name: getattr(torch.ops.pygen, f"{name}_triton"))
    for name in rules:
        if name in _registry.MISSING:  # else the extension registered its C++ autograd (csrc/autograd/norm.cpp)
            torch.library.register_autograd(f"pygen::{name}", rules[name][1], setup_context=rules[name][0],
                                            lib=_registry._lib)
        if name in _registry.TRITON_OPS:
            setup, backward = triton_rules[name]
            torch.library.register_autograd(_registry.TRITON_OPS[name], backward, setup_context=setup,
                                            lib=_registry._lib)


_register()
