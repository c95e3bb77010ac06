"""Counter-based Gaussian noise: ``pygen.randn``.

Op: ``torch.ops.pygen.randn_fill_(out, seed, stream, row_seeds,
stream_offset=None)`` fills ``out`` with standard normals; ``stream_offset``
(an int64 tensor of shape (1,) on ``out``'s device, read by the kernel) is
added to ``stream``, so a loop captured in a CUDA graph can draw step i's noise
from a step counter on the device.
Backends: torch reference (this file), Triton (kernels/random.py), C++ CPU
(csrc/cpu/random.cpp), CUDA (csrc/cuda/random.cu).

The numbers follow csrc/include/pygen/philox.h: Philox4x32-10 keyed by the
64-bit seed, counter = (element // 4, stream), four normals per call from two
Box–Muller pairs. With per-row seeds, elements are numbered within each row
(row = index along dim 0), so a row's noise does not depend on its batch.
"""
import math
import operator

import torch

from pygen import _backend
from pygen.ops._common import STORAGE_DTYPES, check_stream, check_stream_offset, offset_stream, split_seed

_MASK32 = 0xFFFFFFFF
_M0, _M1 = 0xD2511F53, 0xCD9E8D57
_W0, _W1 = 0x9E3779B9, 0xBB67AE85


# ---------------------------------------------------------------------------
# torch reference: Philox in int64 tensors holding uint32 values
# ---------------------------------------------------------------------------
def _mulhilo(a, b):
    """hi, lo 32-bit halves of a * b for uint32 ``a`` (int64 tensor) and int ``b``."""
    p_lo = a * (b & 0xFFFF)  # < 2^48
    p_hi = a * (b >> 16)  # < 2^48; a*b = p_hi * 2^16 + p_lo
    mid = p_lo + ((p_hi & 0xFFFF) << 16)
    return (p_hi >> 16) + (mid >> 32), mid & _MASK32


def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 on int64 tensors holding uint32 values; returns four words."""
    for rnd in range(10):
        if rnd:
            k0 = (k0 + _W0) & _MASK32
            k1 = (k1 + _W1) & _MASK32
        hi0, lo0 = _mulhilo(c0, _M0)
        hi1, lo1 = _mulhilo(c2, _M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def _halves(v):
    """Low and high uint32 halves of int64 tensor/int ``v`` (two's complement bits)."""
    return v & _MASK32, (v >> 32) & _MASK32


def philox_words(seeds, stream, groups):
    """uint32 words (as int64) for ``groups`` (int64 tensor, broadcast with ``seeds``)."""
    k0, k1 = _halves(seeds)
    c0, c1 = _halves(groups)
    s0, s1 = _halves(torch.as_tensor(stream, dtype=torch.int64, device=groups.device))
    c2 = torch.zeros_like(c0) + s0
    c3 = torch.zeros_like(c0) + s1
    k0 = torch.zeros_like(c0) + k0
    k1 = torch.zeros_like(c0) + k1
    return philox4x32_10(c0, c1, c2, c3, k0, k1)


def _uniform(w):
    return ((w >> 9).to(torch.float32) + 0.5) * (2.0**-23)


def words_to_normals(w0, w1, w2, w3):
    """Box–Muller on the four words -> tensor (..., 4) of fp32 normals."""
    two_pi = torch.tensor(2.0 * math.pi, dtype=torch.float32)
    out = []
    for wa, wb in ((w0, w1), (w2, w3)):
        r = torch.sqrt(-2.0 * torch.log(_uniform(wa)))
        theta = two_pi * _uniform(wb)
        out += [r * torch.cos(theta), r * torch.sin(theta)]
    return torch.stack(out, dim=-1)


def randn_reference(shape, seed, stream=0, row_seeds=None, *, device="cpu", dtype=torch.float32):
    """Plain-PyTorch Philox normals (the spec every backend is tested against)."""
    shape = tuple(shape)
    numel = math.prod(shape)
    device = torch.device(device)
    if numel == 0:
        return torch.empty(shape, device=device, dtype=dtype)
    if row_seeds is None:
        rows, row_len = 1, numel
        seeds = torch.tensor([seed], dtype=torch.int64, device=device).view(1, 1)
    else:
        rows, row_len = shape[0], numel // shape[0]
        seeds = row_seeds.to(device=device, dtype=torch.int64).view(rows, 1)
    n_groups = -(-row_len // 4)
    groups = torch.arange(n_groups, dtype=torch.int64, device=device).view(1, n_groups)
    words = philox_words(seeds, stream, groups)
    z = words_to_normals(*words).reshape(rows, n_groups * 4)[:, :row_len]
    return z.reshape(shape).to(dtype)


def randn_fill_reference(out, seed, stream, row_seeds, stream_offset=None):
    stream = offset_stream(stream, stream_offset)
    out.copy_(randn_reference(out.shape, seed, stream, row_seeds, device=out.device, dtype=out.dtype))


# ---------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------
def randn(shape, seed, stream=0, *, device=None, dtype=torch.float32):
    """Standard normals that depend only on (seed, stream, element index).

    Args:
        shape: output shape.
        seed: an int (elements numbered over the whole tensor) or a 1-D int64
            tensor with one seed per row (``len == shape[0]``; elements
            numbered within each row, so a row's noise is the same whatever
            batch it is in).
        stream: 64-bit stream id, e.g. the sampler step.
        device: defaults to the seed tensor's device, else CPU.
        dtype: float32, float16, bfloat16 or float64 (normals are computed in
            fp32 and rounded).

    No global RNG state is read or changed. Every pygen op that draws noise
    in its kernel uses exactly these numbers.
    """
    if isinstance(shape, int):
        shape = (shape,)
    try:
        shape = tuple(operator.index(s) for s in shape)
    except TypeError:
        raise TypeError(f"shape must be a sequence of ints, got {shape!r}") from None
    if any(s < 0 for s in shape):
        raise ValueError(f"shape must have non-negative sizes, got {shape}")
    if dtype not in STORAGE_DTYPES:
        raise TypeError(f"dtype must be one of float32, float16, bfloat16, float64, got {dtype}")
    if device is None:
        device = seed.device if isinstance(seed, torch.Tensor) else torch.device("cpu")
    device = torch.device(device)
    if isinstance(seed, torch.Tensor) and len(shape) == 0:
        raise ValueError("shape must have a batch dimension when seed is a per-row tensor")
    seed_i, row_seeds = split_seed(seed, shape[0] if shape else 1, device)
    return randn_checked(shape, seed_i, check_stream(stream), row_seeds, device, dtype)


def randn_checked(shape, seed_i, stream, row_seeds, device, dtype):
    """``randn`` with its arguments already checked (a tuple shape, ``split_seed``'s int seed and per-row
    seeds or None, a ``check_stream``-ed stream, a torch.device, a storage dtype): for callers that
    validated them once per call already (the training losses), without a second pass (~5 µs)."""
    out = torch.empty(shape, device=device, dtype=dtype)
    if out.numel() == 0:
        return out
    backend = _backend.resolve(device)
    if backend == "torch":
        randn_fill_reference(out, seed_i, stream, row_seeds)
    elif backend == "triton":
        from pygen.kernels import random as tk

        tk.randn_fill(out, seed_i, stream, row_seeds)
    else:
        torch.ops.pygen.randn_fill_(out, seed_i, stream, row_seeds)
    return out


# ---------------------------------------------------------------------------
# torch.library registration
# ---------------------------------------------------------------------------
def _register():
    from pygen.ops import _registry

    _registry.register_reference("randn_fill_", randn_fill_reference)

    def randn_fill_triton(out, seed, stream, row_seeds, stream_offset=None):
        from pygen.kernels import random as tk

        check_stream_offset(stream_offset, out, "out")
        if out.numel():
            tk.randn_fill(out, seed, stream, row_seeds, stream_offset)

    _registry.register_triton("randn_fill_", randn_fill_triton, mutates_args=("out",))
    _registry.register_fake("randn_fill_", lambda out, seed, stream, row_seeds, stream_offset=None: None)


_register()
