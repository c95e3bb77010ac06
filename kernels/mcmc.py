"""Triton backend of the fused MCMC updates (ops ``pygen::leapfrog_`` and ``pygen::mh_select_``).

leapfrog_, in place, per element of row b (dt = step_sizes[b] or the scalar step):
    p <- p - kick·dt·grad;  x <- x + drift·dt·p   (x untouched when drift == 0)
mh_select_, in place, per row b: x[b] <- x_prop[b] where log_u[b] < log_accept[b];
accepted[b] = 1/0, or NaN (and x[b] NaN) when log_accept[b] or log_u[b] is NaN.
Arithmetic in fp32 (fp64 for fp64 storage). Both are 1-D grids over flat
elements; a row's values are looked up per element (row = index // row_len).
"""
import torch
import triton
import triton.language as tl

from pygen.kernels._scalars import split_float

BLOCK = 1024


@triton.jit
def _leapfrog_kernel(
    x_ptr, p_ptr, g_ptr, steps_ptr, a_hi, a_lo, b_hi, b_lo, numel, row_len,
    PER_ROW_STEP: tl.constexpr, DRIFT: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    # Scalars arrive as fp32; hi + lo carries ~48 bits for fp64 storage.
    one = tl.full([], 1.0, ACC)
    a = a_hi * one + a_lo * one  # kick·dt (scalar step) or kick (per-row step)
    b = b_hi * one + b_lo * one  # drift·dt or drift
    if PER_ROW_STEP:
        dt = tl.load(steps_ptr + offs // row_len, mask=mask, other=0.0).to(ACC)
        ck = a * dt
        cd = b * dt
    else:
        ck = a
        cd = b
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(ACC)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(ACC)
    p = p - ck * g
    tl.store(p_ptr + offs, p.to(p_ptr.dtype.element_ty), mask=mask)
    if DRIFT:
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
        tl.store(x_ptr + offs, (x + cd * p).to(x_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _mh_select_kernel(x_ptr, xp_ptr, la_ptr, lu_ptr, acc_ptr, numel, rows, row_len, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    # the elements of x
    emask = offs < numel
    row = offs // tl.maximum(row_len, 1)
    la = tl.load(la_ptr + row, mask=emask, other=0.0)
    lu = tl.load(lu_ptr + row, mask=emask, other=0.0)
    bad = (la != la) | (lu != lu)
    take = lu < la
    xp = tl.load(xp_ptr + offs, mask=emask & take, other=0.0)
    nan = tl.where(bad, la + lu, 0.0).to(x_ptr.dtype.element_ty)  # la + lu is NaN where bad
    out = tl.where(bad, nan, xp)
    tl.store(x_ptr + offs, out, mask=emask & (take | bad))
    # the accept flags: item i < rows writes accepted[i]
    rmask = offs < rows
    la_r = tl.load(la_ptr + offs, mask=rmask, other=0.0)
    lu_r = tl.load(lu_ptr + offs, mask=rmask, other=0.0)
    bad_r = (la_r != la_r) | (lu_r != lu_r)
    flag = tl.where(lu_r < la_r, 1.0, 0.0).to(acc_ptr.dtype.element_ty)
    flag = tl.where(bad_r, tl.where(bad_r, la_r + lu_r, 0.0).to(acc_ptr.dtype.element_ty), flag)
    tl.store(acc_ptr + offs, flag, mask=rmask)


def leapfrog_(x, p, grad, step_sizes, step_size, kick, drift):
    """Launch on contiguous tensors (arguments as in pygen::leapfrog_); updates x and p in place."""
    numel = x.numel()
    if numel == 0:
        return
    row_len = numel // x.shape[0]
    if step_sizes is None:
        a, b = kick * step_size, drift * step_size
    else:
        a, b = kick, drift
    a_hi, a_lo = split_float(a)
    b_hi, b_lo = split_float(b)
    grid = (triton.cdiv(numel, BLOCK),)
    _leapfrog_kernel[grid](
        x, p, grad, step_sizes if step_sizes is not None else x, a_hi, a_lo, b_hi, b_lo, numel, row_len,
        PER_ROW_STEP=step_sizes is not None, DRIFT=drift != 0.0,
        ACC=tl.float64 if x.dtype == torch.float64 else tl.float32, BLOCK=BLOCK,
    )


def mh_select_(x, x_prop, log_accept, log_u, accepted):
    """Launch on contiguous tensors (arguments as in pygen::mh_select_); updates x and accepted."""
    rows = x.shape[0]
    numel = x.numel()
    items = max(numel, rows)
    if items == 0:
        return
    row_len = numel // rows
    grid = (triton.cdiv(items, BLOCK),)
    _mh_select_kernel[grid](x, x_prop, log_accept, log_u, accepted, numel, rows, row_len, BLOCK=BLOCK)
