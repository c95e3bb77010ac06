"""Philox4x32-10 and Box–Muller as Triton device functions.

Bit-identical twin of csrc/include/pygen/philox.h (words) and agrees with it to
fp32 rounding (normals). See that header for the contract.
"""
import triton
import triton.language as tl


@triton.jit
def split64(v):
    """Low and high uint32 halves of an int64 value."""
    v = v.to(tl.int64)
    return (v & 0xFFFFFFFF).to(tl.uint32), ((v >> 32) & 0xFFFFFFFF).to(tl.uint32)


@triton.jit
def philox4x32_10(c0, c1, c2, c3, k0, k1):
    m0 = tl.full([], 0xD2511F53, tl.uint32)
    m1 = tl.full([], 0xCD9E8D57, tl.uint32)
    w0 = tl.full([], 0x9E3779B9, tl.uint32)
    w1 = tl.full([], 0xBB67AE85, tl.uint32)
    for rnd in tl.static_range(10):
        if rnd > 0:
            k0 = k0 + w0
            k1 = k1 + w1
        hi0 = tl.umulhi(c0, m0)
        lo0 = c0 * m0
        hi1 = tl.umulhi(c2, m1)
        lo1 = c2 * m1
        n0 = hi1 ^ c1 ^ k0
        n2 = hi0 ^ c3 ^ k1
        c0 = n0
        c1 = lo1
        c2 = n2
        c3 = lo0
    return c0, c1, c2, c3


@triton.jit
def open_uniform(w):
    return ((w >> 9).to(tl.float32) + 0.5) * 1.1920928955078125e-07


@triton.jit
def philox_normals(seed, stream, group):
    """Four fp32 normals for element group ``group`` (elements 4g..4g+3)."""
    k0, k1 = split64(seed)
    s0, s1 = split64(stream)
    g0, g1 = split64(group)
    zero = tl.zeros_like(g0)
    w0, w1, w2, w3 = philox4x32_10(g0, g1, zero + s0, zero + s1, zero + k0, zero + k1)
    two_pi = 6.283185307179586
    r0 = tl.sqrt(-2.0 * tl.log(open_uniform(w0)))
    t0 = two_pi * open_uniform(w1)
    r1 = tl.sqrt(-2.0 * tl.log(open_uniform(w2)))
    t1 = two_pi * open_uniform(w3)
    return r0 * tl.cos(t0), r0 * tl.sin(t0), r1 * tl.cos(t1), r1 * tl.sin(t1)


@triton.jit
def interleave4(a, b, c, d):
    """(BLOCK,) x4 -> (4*BLOCK,) with element 4g+j taken from the j-th input."""
    return tl.reshape(tl.join(tl.join(a, c), tl.join(b, d)), (4 * a.shape[0],))
