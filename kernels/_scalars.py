"""Host-side helpers for passing float64 scalars to Triton kernels.

Triton passes Python floats as fp32 scalars; kernels that need a float64
scalar's precision take it as an fp32 (hi, lo) pair and add the halves in the
kernel.
"""
import math
import struct

_F32 = struct.Struct("f")


def to_f32(v):
    """``v`` rounded to the nearest fp32 (inf when out of range)."""
    try:
        return _F32.unpack(_F32.pack(v))[0]
    except OverflowError:
        return math.copysign(math.inf, v)


def split_float(v):
    """``v`` as fp32 hi + fp32 lo (hi + lo == v to ~2^-48 relative)."""
    hi = to_f32(v)
    lo = to_f32(v - hi) if math.isfinite(hi) else 0.0
    return hi, lo
