"""Triton backend of the forward (noising) ops ``pygen.q_sample`` and ``pygen.reparameterize``
(registered as ``torch.ops.pygen.q_sample_triton`` / ``torch.ops.pygen.reparameterize_triton``).

q_sample:       x_t = a[t_b]·x0 + s[t_b]·eps, plus an optional training target
                (eps, v = a·eps - s·x0, x0, flow velocity eps - x0) in the same pass;
                vp: a = sqrt(abar), s = sqrt(1 - abar); flow: a = 1 - sigma, s = sigma.
reparameterize: z = mu + exp(logvar / 2)·eps.
Twin of csrc/include/pygen/forward.h; the spec is the torch reference in
pygen/ops/forward.py. In-kernel noise is exactly pygen.randn(x.shape, seed,
stream) (kernels/philox.py).

Grid: 1-D over blocks of 4*BLOCK elements. With an int seed or given noise the
blocks tile the flat tensor (noise elements are numbered over the whole tensor);
with per-row seeds each batch row is tiled separately (program = row * blocks_per_row + block),
so noise elements are numbered within the row. The inputs must be contiguous.
"""
import torch
import triton
import triton.language as tl

from pygen.kernels.philox import interleave4, philox_normals

BLOCK = 256  # Philox groups per program -> 1024 elements


@triton.jit
def _tile(pid, row_len, numel, blocks_per_row, PER_ROW: tl.constexpr, BLOCK: tl.constexpr):
    """(flat element indices, in-bounds mask, noise group indices, noise row or -1) of a program."""
    if PER_ROW:
        row = pid // blocks_per_row
        blk = pid - row * blocks_per_row
        offs = blk * (4 * BLOCK) + tl.arange(0, 4 * BLOCK)
        mask = offs < row_len
        idx = row * row_len + offs
    else:
        row = pid * 0 - 1
        blk = pid
        idx = blk * (4 * BLOCK) + tl.arange(0, 4 * BLOCK)
        mask = idx < numel
    group = blk * BLOCK + tl.arange(0, BLOCK)
    return idx, mask, group, row


@triton.jit(do_not_specialize=["seed", "stream"])
def _q_sample_kernel(x0_ptr, t_ptr, table_ptr, noise_ptr, row_seeds_ptr, xt_ptr, noise_out_ptr, target_ptr,
                     seed, stream, row_len, numel, n_table, blocks_per_row,
                     PER_ROW: tl.constexpr, GENERATE: tl.constexpr, INTERP: tl.constexpr, TARGET: tl.constexpr,
                     COEF64: tl.constexpr, ACC64: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    idx, mask, group, noise_row = _tile(pid, row_len, numel, blocks_per_row, PER_ROW, BLOCK)
    if PER_ROW:
        # one batch row per program: scalar coefficient gather
        tb = tl.load(t_ptr + noise_row).to(tl.int64)
        key = tl.load(row_seeds_ptr + noise_row)
    else:
        row = idx // row_len
        tb = tl.load(t_ptr + row, mask=mask, other=0).to(tl.int64)
        key = seed
    # an out-of-range t is never dereferenced: NaN coefficients for the row
    valid = (tb >= 0) & (tb < n_table)
    level = tl.load(table_ptr + tb, mask=valid, other=0.0)
    if COEF64:
        level = level.to(tl.float64)
    else:
        level = level.to(tl.float32)
    if INTERP == 1:
        a = 1.0 - level
        s = level
    else:
        a = tl.sqrt(level)
        s = tl.sqrt(1.0 - level)
    a = tl.where(valid, a, float("nan"))
    s = tl.where(valid, s, float("nan"))
    if ACC64:
        a = a.to(tl.float64)
        s = s.to(tl.float64)
        x = tl.load(x0_ptr + idx, mask=mask, other=0.0).to(tl.float64)
    else:
        a = a.to(tl.float32)
        s = s.to(tl.float32)
        x = tl.load(x0_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    out_ty = xt_ptr.dtype.element_ty
    if GENERATE:
        z0, z1, z2, z3 = philox_normals(key, stream, group)
        eps = interleave4(z0, z1, z2, z3)
        tl.store(noise_out_ptr + idx, eps.to(out_ty), mask=mask)
        eps = eps.to(x.dtype)
    else:
        eps = tl.load(noise_ptr + idx, mask=mask, other=0.0).to(x.dtype)
    x_t = a * x + s * eps
    tl.store(xt_ptr + idx, x_t.to(out_ty), mask=mask)
    if TARGET != 0:
        if TARGET == 1:
            tgt = eps
        elif TARGET == 2:
            tgt = a * eps - s * x
        elif TARGET == 3:
            tgt = x
        else:
            tgt = eps - x
        tgt = tl.where(valid, tgt, float("nan"))
        tl.store(target_ptr + idx, tgt.to(out_ty), mask=mask)


@triton.jit(do_not_specialize=["seed", "stream"])
def _reparameterize_kernel(mu_ptr, logvar_ptr, noise_ptr, row_seeds_ptr, z_ptr, noise_out_ptr,
                           seed, stream, row_len, numel, blocks_per_row,
                           PER_ROW: tl.constexpr, GENERATE: tl.constexpr, ACC64: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    idx, mask, group, noise_row = _tile(pid, row_len, numel, blocks_per_row, PER_ROW, BLOCK)
    if ACC64:
        acc_ty = tl.float64
    else:
        acc_ty = tl.float32
    mu = tl.load(mu_ptr + idx, mask=mask, other=0.0).to(acc_ty)
    logvar = tl.load(logvar_ptr + idx, mask=mask, other=0.0).to(acc_ty)
    out_ty = z_ptr.dtype.element_ty
    if GENERATE:
        if PER_ROW:
            key = tl.load(row_seeds_ptr + noise_row)
        else:
            key = seed
        z0, z1, z2, z3 = philox_normals(key, stream, group)
        eps = interleave4(z0, z1, z2, z3)
        tl.store(noise_out_ptr + idx, eps.to(out_ty), mask=mask)
        eps = eps.to(acc_ty)
    else:
        eps = tl.load(noise_ptr + idx, mask=mask, other=0.0).to(acc_ty)
    z = mu + tl.exp(logvar * 0.5) * eps
    tl.store(z_ptr + idx, z.to(out_ty), mask=mask)


def _grid(numel, batch, per_row):
    """(grid, row_len, blocks_per_row) for the tiling described in the module docstring."""
    per_block = 4 * BLOCK
    if per_row:
        row_len = numel // batch
        blocks_per_row = triton.cdiv(row_len, per_block)
        return (batch * blocks_per_row,), row_len, blocks_per_row
    return (triton.cdiv(numel, per_block),), numel, 1


def _empty(like, full):
    return torch.empty(like.shape if full else (0,), dtype=like.dtype, device=like.device)


def q_sample(x0, t, table, noise, seed, stream, row_seeds, interpolation, target):
    """Launch q_sample on contiguous tensors; returns ``(x_t, noise_out, target_out)`` like the op."""
    generate = noise is None
    x_t = _empty(x0, True)
    noise_out = _empty(x0, generate)
    target_out = _empty(x0, target != 0)
    numel = x0.numel()
    if numel == 0:
        return x_t, noise_out, target_out
    batch = x0.shape[0]
    per_row = generate and row_seeds is not None
    grid, _, blocks_per_row = _grid(numel, batch, per_row)
    _q_sample_kernel[grid](
        x0, t, table, x0 if generate else noise, row_seeds if per_row else t, x_t,
        noise_out if generate else x_t, target_out if target != 0 else x_t,
        seed, stream, numel // batch, numel, table.shape[0], blocks_per_row,
        PER_ROW=per_row, GENERATE=generate, INTERP=int(interpolation), TARGET=int(target),
        COEF64=table.dtype == torch.float64 or x0.dtype == torch.float64, ACC64=x0.dtype == torch.float64,
        BLOCK=BLOCK,
    )
    return x_t, noise_out, target_out


def reparameterize(mu, logvar, noise, seed, stream, row_seeds):
    """Launch reparameterize on contiguous tensors; returns ``(z, noise_out)`` like the op."""
    generate = noise is None
    z = _empty(mu, True)
    noise_out = _empty(mu, generate)
    numel = mu.numel()
    if numel == 0:
        return z, noise_out
    batch = mu.shape[0] if mu.dim() > 0 else 1
    per_row = generate and row_seeds is not None
    grid, row_len, blocks_per_row = _grid(numel, batch, per_row)
    _reparameterize_kernel[grid](
        mu, logvar, mu if generate else noise, row_seeds if per_row else mu, z, noise_out if generate else z,
        seed, stream, row_len, numel, blocks_per_row,
        PER_ROW=per_row, GENERATE=generate, ACC64=mu.dtype == torch.float64, BLOCK=BLOCK,
    )
    return z, noise_out
