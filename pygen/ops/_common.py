"""Argument checks and small helpers shared by the public ops.

Checks run once at the public boundary (or at sampler set-up), never inside a
kernel. They raise ValueError/TypeError naming the argument and what was
expected.
"""
import math
import numbers

import torch

STORAGE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_U64 = 1 << 64


def same_device(actual, wanted):
    """``actual`` (a tensor's device) is ``wanted``, where an index-less "cuda" means the current one."""
    if actual == wanted:  # the common case: both torch.device, same index
        return True
    wanted = torch.device(wanted)
    if actual.type != wanted.type:
        return False
    if actual.type == "cpu" or actual.index == wanted.index:
        return True
    mod = getattr(torch, actual.type, None)
    current = mod.current_device() if mod is not None and hasattr(mod, "current_device") else 0
    return (actual.index if actual.index is not None else current) == (
        wanted.index if wanted.index is not None else current)


def check_tensor(name, value, *, dtypes=STORAGE_DTYPES, device=None, ndim_min=None):
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if dtypes is not None and value.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({names}), got {str(value.dtype).replace('torch.', '')}")
    if device is not None and not same_device(value.device, device):
        raise ValueError(f"{name} must be on device {device}, got {value.device}")
    if ndim_min is not None and value.dim() < ndim_min:
        raise ValueError(f"{name} must have at least {ndim_min} dimension(s), got shape {tuple(value.shape)}")
    return value


def check_like(name, value, ref_name, ref):
    """``value`` must match ``ref`` in shape, dtype and device."""
    check_tensor(name, value, dtypes=None)
    if value.shape != ref.shape:
        raise ValueError(f"{name} must have the shape of {ref_name} {tuple(ref.shape)}, got {tuple(value.shape)}")
    if value.dtype != ref.dtype:
        raise TypeError(f"{name} must have the dtype of {ref_name} ({ref.dtype}), got {value.dtype}")
    if value.device != ref.device:
        raise ValueError(f"{name} must be on the device of {ref_name} ({ref.device}), got {value.device}")
    return value


def contiguous(value):
    return value if value.is_contiguous() else value.contiguous()


def needs_grad(*tensors):
    """Whether autograd must record an op on these tensors (grad mode on and one of them requires grad)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


# torch's own guard for "run below the Autograd dispatch key" (what torch.library's Python
# autograd wrapper enters before it redispatches); None if a torch version lacks it.
_BELOW_AUTOGRAD = getattr(torch._C, "_AutoDispatchBelowAutograd", None)


def call_compiled(op, grad, *args):
    """``op(*args)`` for a compiled ``torch.ops.pygen`` op whose autograd is registered in Python.

    When ``grad`` is False (no input requires grad, or grad mode is off) the call skips the
    Autograd key and so torch.library's Python autograd wrapper (about 5 us per call on the host;
    its outputs would not require grad anyway); otherwise it goes through it. Under torch.compile
    tracing the plain call is used.
    """
    if grad or _BELOW_AUTOGRAD is None or torch.compiler.is_compiling():
        return op(*args)
    with _BELOW_AUTOGRAD():
        return op(*args)


def to_signed64(value):
    """A 64-bit value in [-2^63, 2^64) as the signed int64 that holds its bits."""
    value %= _U64
    return value - _U64 if value >= 1 << 63 else value


def split_seed(seed, batch, device, *, name="seed"):
    """Normalise ``seed`` into ``(int64 seed, per-row seed tensor or None)``.

    ``seed`` is an int (one key, elements numbered over the whole tensor) or a
    1-D int64 tensor of per-row seeds of length ``batch`` (elements numbered
    within each row, so a row's noise does not depend on its batch).
    """
    if isinstance(seed, bool):
        raise TypeError(f"{name} must be an int or a 1-D int64 tensor, got bool")
    if isinstance(seed, int):
        if not -(1 << 63) <= seed < _U64:
            raise ValueError(f"{name} must fit in 64 bits, got {seed}")
        return to_signed64(seed), None
    if isinstance(seed, torch.Tensor):
        if seed.dtype != torch.int64:
            raise TypeError(f"{name} tensor must have dtype int64, got {seed.dtype}")
        if seed.dim() != 1 or seed.shape[0] != batch:
            raise ValueError(
                f"{name} tensor must be 1-D with one seed per row (length {batch}), got shape {tuple(seed.shape)}"
            )
        if not same_device(seed.device, device):
            raise ValueError(f"{name} tensor must be on device {device}, got {seed.device}")
        return 0, contiguous(seed)
    raise TypeError(f"{name} must be an int or a 1-D int64 tensor, got {type(seed).__name__}")


def noise_source(op, noise, seed, ref_name, ref, *, seed_with_noise_ok=True):
    """Where an op's noise comes from: ``(noise or None, int64 seed, per-row seeds or None)``.

    ``noise`` given: it must match ``ref`` (and ``seed`` must be None unless
    ``seed_with_noise_ok``). Otherwise ``seed`` is required and split as in
    ``split_seed`` over the rows of ``ref``; the op draws the noise in its kernel.
    """
    if noise is not None:
        check_like("noise", noise, ref_name, ref)
        if seed is not None and not seed_with_noise_ok:
            raise ValueError("pass either seed (in-kernel noise) or noise, not both; seed must be None with noise")
        return contiguous(noise), 0, None
    if seed is None:
        raise ValueError(f"seed is required when noise is None ({op} draws the noise in its kernel)")
    if isinstance(seed, torch.Tensor) and ref.dim() == 0:
        raise ValueError(f"{ref_name} must have a batch dimension when seed is a per-row tensor")
    seed_i, row_seeds = split_seed(seed, ref.shape[0] if ref.dim() else 1, ref.device)
    return None, seed_i, row_seeds


def check_stream(stream, name="stream"):
    if isinstance(stream, bool) or not isinstance(stream, int):
        raise TypeError(f"{name} must be an int, got {type(stream).__name__}")
    if not -(1 << 63) <= stream < _U64:
        raise ValueError(f"{name} must fit in 64 bits, got {stream}")
    return to_signed64(stream)


def check_stream_offset(stream_offset, like, like_name, name="stream_offset"):
    """A device step counter: None, or an int64 tensor of shape (1,) on ``like``'s device (e.g. a loop's
    step that the kernels read and add to the noise stream, so a CUDA graph can replay the step)."""
    if stream_offset is None:
        return None
    if not isinstance(stream_offset, torch.Tensor):
        raise TypeError(f"{name} must be None or an int64 tensor, got {type(stream_offset).__name__}")
    if stream_offset.dtype != torch.int64:
        raise TypeError(f"{name} must have dtype int64, got {stream_offset.dtype}")
    if stream_offset.shape != (1,):
        raise ValueError(f"{name} must have shape (1,), got {tuple(stream_offset.shape)}")
    if not same_device(stream_offset.device, like.device):
        raise ValueError(f"{name} must be on {like_name}'s device {like.device}, got {stream_offset.device}")
    return stream_offset


def offset_stream(stream, stream_offset):
    """The noise stream ``stream + stream_offset[0]`` for the torch reference: ``stream`` itself without an
    offset, else a 0-d int64 tensor on the offset's device (wrapping mod 2^64; no host read)."""
    return stream if stream_offset is None else stream_offset[0] + stream


def check_int(name, value, minimum):
    """``value`` as an int >= ``minimum`` (bools are rejected)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_real(name, value, *, ge=None, gt=None):
    """``value`` as a finite float, optionally >= ``ge`` / > ``gt`` (bools are rejected)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if ge is not None and not value >= ge:
        raise ValueError(f"{name} must be >= {ge}, got {value}")
    if gt is not None and not value > gt:
        raise ValueError(f"{name} must be > {gt}, got {value}")
    return value
