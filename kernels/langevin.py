"""Triton backend of ``pygen.langevin_step`` (op ``pygen::langevin_step``) and of
``langevin_snr_step`` (op ``pygen::langevin_snr_step``, score_sde's SNR Langevin corrector).

x_next = x + (dt/2)·score + sqrt(dt)·z, with dt a scalar or one step per batch
row and z a given noise tensor or exactly pygen.randn(x.shape, seed, stream)
(kernels/random.py numbering: flat for an int seed, within each batch row for
per-row seeds). Arithmetic in fp32 (fp64 for fp64 storage).

Grid: (groups of 4*BLOCK elements, noise rows); a noise row is the whole
tensor (given noise or int seed) or one batch row (per-row seeds).

langevin_snr_step: three launches, no host sync, deterministic (no atomics):
1. ``_snr_partials_kernel``, grid (batch rows, windows): each program sums
   score² and z² over one window of 4*RB noise elements (RB <= BLOCK, smaller for short rows) (Philox-group
   aligned, masked to its batch row) and writes the two partial sums; in-kernel
   z is regenerated from Philox, never stored.
2. ``_snr_finalize_kernel``: per row g = sqrt(Σ score²), n = sqrt(Σ z²) (partials
   added in window order); batch means of both when batch_norm (one program,
   fixed tile order); dt = four_alpha_snr2·(n/g)² into ``step``.
3. ``_langevin_step_kernel`` with per-row steps = ``step`` (same z again).
With a device step index i (``k_table``/``step_index``, a CUDA-graph loop) the kernels read i:
the step constant is four_alpha_snr2·k_table[i] (NaN outside the table), the noise stream
stream + i; ``step_index`` is then incremented (a fourth, tiny launch).
"""
import math

import torch
import triton
import triton.language as tl

from pygen.kernels._scalars import split_float
from pygen.kernels.philox import interleave4, philox_normals

BLOCK = 256  # Philox groups per program -> 1024 elements


@triton.jit(do_not_specialize=["seed", "stream"])
def _langevin_step_kernel(
    x_ptr, score_ptr, noise_ptr, steps_ptr, row_seeds_ptr, out_ptr, index_ptr,
    seed, stream, c1_hi, c1_lo, c2_hi, c2_lo, row_len, batch_row_len,
    HAS_NOISE: tl.constexpr, PER_ROW_SEED: tl.constexpr, PER_ROW_STEP: tl.constexpr,
    HAS_INDEX: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
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
        if HAS_INDEX:  # noise stream offset by the device step index
            stream = stream + tl.load(index_ptr)
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


def langevin_step(x, score, step_sizes, step_size, noise, seed, stream, row_seeds, stream_offset=None):
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
        row_seeds if per_row_seed else x, out, stream_offset if stream_offset is not None else x,
        seed, stream, c1_hi, c1_lo, c2_hi, c2_lo, row_len, batch_row_len,
        HAS_NOISE=noise is not None, PER_ROW_SEED=per_row_seed, PER_ROW_STEP=step_sizes is not None,
        HAS_INDEX=stream_offset is not None,
        ACC=tl.float64 if x.dtype == torch.float64 else tl.float32, BLOCK=BLOCK,
    )
    return out


# ---------------------------------------------------------------------------
# langevin_snr_step
# ---------------------------------------------------------------------------
SNR_ROWS = 128  # rows per finalize tile


@triton.jit(do_not_specialize=["seed", "stream"])
def _snr_partials_kernel(
    score_ptr, noise_ptr, row_seeds_ptr, part_ptr, index_ptr, seed, stream, row_len, windows,
    HAS_NOISE: tl.constexpr, PER_ROW_SEED: tl.constexpr, HAS_INDEX: tl.constexpr, ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    w = tl.program_id(1).to(tl.int64)
    # noise index of the row's first element: within the row (per-row seeds) or flat
    if PER_ROW_SEED:
        nb = row * 0
    else:
        nb = row * row_len
    g0 = nb // 4 + w * BLOCK  # first Philox group of this window
    n = g0 * 4 + tl.arange(0, 4 * BLOCK)
    local = n - nb  # element index within the batch row
    mask = (local >= 0) & (local < row_len)
    idx = row * row_len + local
    s = tl.load(score_ptr + idx, mask=mask, other=0.0).to(ACC)
    if HAS_NOISE:
        z = tl.load(noise_ptr + idx, mask=mask, other=0.0).to(ACC)
    else:
        if PER_ROW_SEED:
            seed = tl.load(row_seeds_ptr + row)
        if HAS_INDEX:
            stream = stream + tl.load(index_ptr)
        z0, z1, z2, z3 = philox_normals(seed, stream, g0 + tl.arange(0, BLOCK))
        z = interleave4(z0, z1, z2, z3).to(ACC)
    zero = tl.zeros_like(s)
    ss = tl.sum(tl.where(mask, s * s, zero), axis=0)
    zz = tl.sum(tl.where(mask, z * z, zero), axis=0)
    p = (row * windows + w) * 2
    tl.store(part_ptr + p, ss)
    tl.store(part_ptr + p + 1, zz)


@triton.jit
def _snr_row_norms(part_ptr, rows, windows, batch, ACC: tl.constexpr):
    """(g, n) of the rows ``rows`` (masked to < batch): partial sums added in window order."""
    mask = rows < batch
    g2 = tl.zeros(rows.shape, ACC)
    n2 = tl.zeros(rows.shape, ACC)
    for w in range(windows):
        p = (rows * windows + w) * 2
        g2 += tl.load(part_ptr + p, mask=mask, other=0.0)
        n2 += tl.load(part_ptr + p + 1, mask=mask, other=0.0)
    g2 = tl.where(mask, g2, 1.0)  # rows past the batch: no 0/0 (never stored)
    return tl.sqrt(g2), tl.sqrt(n2)


@triton.jit
def _snr_dt(n, g, k, ACC: tl.constexpr):
    r = n / g
    return k * (r * r)


@triton.jit
def _snr_finalize_kernel(
    part_ptr, step_ptr, k_table_ptr, index_ptr, batch, windows, k_hi, k_lo, k_len,
    BATCH_NORM: tl.constexpr, HAS_INDEX: tl.constexpr, ACC: tl.constexpr, ROWS: tl.constexpr,
):
    one = tl.full([], 1.0, ACC)
    k = k_hi * one + k_lo * one
    if HAS_INDEX:  # k·k_table[i] at the device step index i (NaN outside the table)
        i = tl.load(index_ptr)
        valid = (i >= 0) & (i < k_len)
        k = k * tl.where(valid, tl.load(k_table_ptr + tl.where(valid, i, 0)), float("nan")).to(ACC)
    if BATCH_NORM:
        # one program: batch means of the row norms, tiles added in a fixed order
        g_sum = tl.zeros([], ACC)
        n_sum = tl.zeros([], ACC)
        for t in range(0, batch, ROWS):
            rows = t + tl.arange(0, ROWS).to(tl.int64)
            g, n = _snr_row_norms(part_ptr, rows, windows, batch, ACC)
            zero = tl.zeros_like(g)
            g_sum += tl.sum(tl.where(rows < batch, g, zero), axis=0)
            n_sum += tl.sum(tl.where(rows < batch, n, zero), axis=0)
        dt = _snr_dt(n_sum / batch, g_sum / batch, k, ACC)
        for t in range(0, batch, ROWS):
            rows = t + tl.arange(0, ROWS).to(tl.int64)
            tl.store(step_ptr + rows, tl.zeros([ROWS], ACC) + dt, mask=rows < batch)
    else:
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        g, n = _snr_row_norms(part_ptr, rows, windows, batch, ACC)
        tl.store(step_ptr + rows, _snr_dt(n, g, k, ACC), mask=rows < batch)


def _launch_update(x, score, noise, steps, seed, stream, row_seeds, out, step_index):
    """out = x + steps[row]/2·score + sqrt(steps[row])·z (the langevin_step kernel, per-row steps)."""
    numel = x.numel()
    batch = x.shape[0]
    batch_row_len = numel // batch
    per_row_seed = noise is None and row_seeds is not None
    rows, row_len = (batch, batch_row_len) if per_row_seed else (1, numel)
    grid = (triton.cdiv(row_len, 4 * BLOCK), rows)
    _langevin_step_kernel[grid](
        x, score, noise if noise is not None else x, steps, row_seeds if per_row_seed else x, out,
        step_index if step_index is not None else steps, seed, stream, 0.0, 0.0, 0.0, 0.0, row_len, batch_row_len,
        HAS_NOISE=noise is not None, PER_ROW_SEED=per_row_seed, PER_ROW_STEP=True, HAS_INDEX=step_index is not None,
        ACC=tl.float64 if x.dtype == torch.float64 else tl.float32, BLOCK=BLOCK,
    )


def langevin_snr_step(x, score, noise, out, step, seed, stream, row_seeds, four_alpha_snr2, batch_norm, k_table=None,
                      step_index=None):
    """Launch on contiguous tensors (arguments as in pygen::langevin_snr_step); writes out and step (and
    increments ``step_index`` when given)."""
    numel = x.numel()
    batch = x.shape[0]
    if numel == 0:
        step.fill_(float("nan"))  # 0/0: the formula's value for empty rows
        if step_index is not None:
            step_index.add_(1)
        return
    row_len = numel // batch
    acc = tl.float64 if x.dtype == torch.float64 else tl.float32
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    rb = min(BLOCK, max(4, triton.next_power_of_2(triton.cdiv(row_len + 3, 4))))  # Philox groups per window
    windows = triton.cdiv(row_len + 3, 4 * rb)
    part = torch.empty(batch * windows * 2, dtype=acc_dtype, device=x.device)
    per_row_seed = noise is None and row_seeds is not None
    _snr_partials_kernel[(batch, windows)](
        score, noise if noise is not None else score, row_seeds if per_row_seed else score, part,
        step_index if step_index is not None else part, seed, stream, row_len, windows,
        HAS_NOISE=noise is not None, PER_ROW_SEED=per_row_seed, HAS_INDEX=step_index is not None, ACC=acc, BLOCK=rb,
    )
    k_hi, k_lo = split_float(four_alpha_snr2)
    grid = (1,) if batch_norm else (triton.cdiv(batch, SNR_ROWS),)
    indexed = step_index is not None
    _snr_finalize_kernel[grid](part, step, k_table if indexed else part, step_index if indexed else part, batch, windows,
                               k_hi, k_lo, k_table.shape[0] if indexed else 0, BATCH_NORM=batch_norm,
                               HAS_INDEX=indexed, ACC=acc, ROWS=SNR_ROWS)
    _launch_update(x, score, noise, step, seed, stream, row_seeds, out, step_index)
    if indexed:
        step_index.add_(1)  # after every launch above read it (stream order)
