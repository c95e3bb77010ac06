"""Triton backend of ``pygen.langevin_step`` (op ``pygen::langevin_step``).

x_next = x + (dt/2)·score + sqrt(dt)·z, with dt a scalar or one step per batch
row and z a given noise tensor or exactly pygen.randn(x.shape, seed, stream)
(kernels/random.py numbering: flat for an int seed, within each batch row for
per-row seeds). Arithmetic in fp32 (fp64 for fp64 storage).

Grid: (groups of 4*BLOCK elements, noise rows); a noise row is the whole
tensor (given noise or int seed) or one batch row (per-row seeds).
"""
import math

import torch
import triton
import triton.language as tl

from pygen.kernels._scalars import split_float
from pygen.kernels.philox import interleave4, philox_normals

BLOCK = 256  # Philox groups per program -> 1024 elements


@triton.jit
def _langevin_step_kernel(
    x_ptr, score_ptr, noise_ptr, steps_ptr, row_seeds_ptr, out_ptr,
    seed, stream, c1_hi, c1_lo, c2_hi, c2_lo, row_len, batch_row_len,
    HAS_NOISE: tl.constexpr, PER_ROW_SEED: tl.constexpr, PER_ROW_STEP: tl.constexpr,
    ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    row = tl.program_id(1).to(tl.int64)
    offs = pid * (4 * BLOCK) + tl.arange(0, 4 * BLOCK)
    mask = offs < row_len
    idx = row * row_len + offs
    if HAS_NOISE:
        z = tl.load(noise_ptr + idx, mask=mask, other=0.0).to(ACC)
    else:
        if PER_ROW_SEED:
            seed = tl.load(row_seeds_ptr + row)
        group = pid * BLOCK + tl.arange(0, BLOCK)
        z0, z1, z2, z3 = philox_normals(seed, stream, group)
        z = interleave4(z0, z1, z2, z3).to(ACC)
    x = tl.load(x_ptr + idx, mask=mask, other=0.0).to(ACC)
    s = tl.load(score_ptr + idx, mask=mask, other=0.0).to(ACC)
    if PER_ROW_STEP:
        if PER_ROW_SEED:
            dt = tl.load(steps_ptr + row).to(ACC)
        else:
            b = idx // batch_row_len
            dt = tl.load(steps_ptr + b, mask=mask, other=0.0).to(ACC)
        c1 = 0.5 * dt
        if ACC == tl.float64:
            c2 = tl.sqrt(dt)
        else:
            c2 = tl.sqrt_rn(dt)  # IEEE sqrt, as in C++ and torch
    else:
        # Scalars arrive as fp32; hi + lo carries ~48 bits for fp64 storage.
        one = tl.full([], 1.0, ACC)
        c1 = c1_hi * one + c1_lo * one
        c2 = c2_hi * one + c2_lo * one
    out = x + c1 * s + c2 * z
    tl.store(out_ptr + idx, out.to(out_ptr.dtype.element_ty), mask=mask)


def langevin_step(x, score, step_sizes, step_size, noise, seed, stream, row_seeds):
    """Launch on contiguous tensors (arguments as in pygen::langevin_step); returns x_next."""
    out = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    numel = out.numel()
    if numel == 0:
        return out
    batch = x.shape[0] if x.dim() else 1
    batch_row_len = numel // batch
    per_row_seed = noise is None and row_seeds is not None
    rows, row_len = (batch, batch_row_len) if per_row_seed else (1, numel)
    if step_sizes is None:
        c1_hi, c1_lo = split_float(0.5 * step_size)
        c2_hi, c2_lo = split_float(math.sqrt(step_size))
    else:
        c1_hi = c1_lo = c2_hi = c2_lo = 0.0
    grid = (triton.cdiv(row_len, 4 * BLOCK), rows)
    _langevin_step_kernel[grid](
        x, score, noise if noise is not None else x, step_sizes if step_sizes is not None else x,
        row_seeds if per_row_seed else x, out,
        seed, stream, c1_hi, c1_lo, c2_hi, c2_lo, row_len, batch_row_len,
        HAS_NOISE=noise is not None, PER_ROW_SEED=per_row_seed, PER_ROW_STEP=step_sizes is not None,
        ACC=tl.float64 if x.dtype == torch.float64 else tl.float32, BLOCK=BLOCK,
    )
    return out
