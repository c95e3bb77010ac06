"""Triton backend of the fused training-loss ops (registered as
``torch.ops.pygen.diffusion_loss_triton``, ``diffusion_loss_backward_triton``,
``reparameterize_kl_triton`` and ``reparameterize_kl_backward_triton``).

diffusion_loss:    loss[b] = w·(Σ_i r² / n), r = m·model_out - ca·x0 - cb·eps, coeffs[b] = [m, ca, cb, w]
backward:          d loss / d model_out = (grad_rows[b]·w·2·m / n)·r
reparameterize_kl: z = mu + std·eps, std = exp(logvar / 2); kl[b] = 0.5·Σ_i (mu² + std² - 1 - logvar)
backward:          dmu = grad_z + grad_kl[b]·mu; dlogvar = grad_z·std·eps·0.5 + grad_kl[b]·0.5·(std² - 1)
Twin of csrc/include/pygen/loss.h; the spec is the torch reference in
pygen/ops/loss.py. eps is the given noise or exactly pygen.randn(x.shape, seed,
stream) (kernels/philox.py), regenerated in every pass.

Tiling (all four kernels): a 1-D grid of (batch row, window) programs,
program = row·windows + window. A window is RB consecutive Philox groups
(4·RB noise elements) starting at the row's first noise group, masked to the
row, so every program lies in one batch row (scalar coefficient loads) and
every element belongs to exactly one program. Noise elements are numbered
flat (int seed) or within the row (per-row seeds).
Reductions are two-stage and deterministic (no atomics): each program writes
its window's partial sum, then ``_finish_rows_kernel`` adds a row's partials
in window order.
"""
import math

import torch
import triton
import triton.language as tl

from pygen.kernels.philox import interleave4, philox_normals

BLOCK = 256  # Philox groups per window (at most) -> 1024 elements
ROWS = 128  # rows per program in the finishing kernel


@triton.jit
def _window(row_len, windows, PER_ROW_SEED: tl.constexpr, RB: tl.constexpr):
    """(row, flat indices, mask, first Philox group) of this program."""
    pid = tl.program_id(0).to(tl.int64)
    row = pid // windows
    w = pid - row * windows
    # noise index of the row's first element: within the row (per-row seeds) or flat
    if PER_ROW_SEED:
        nb = row * 0
    else:
        nb = row * row_len
    g0 = nb // 4 + w * RB
    local = g0 * 4 + tl.arange(0, 4 * RB) - nb  # element index within the batch row
    mask = (local >= 0) & (local < row_len)
    return row, row * row_len + local, mask, g0


@triton.jit
def _eps(noise_ptr, row_seeds_ptr, seed, stream, row, idx, mask, g0,
         HAS_NOISE: tl.constexpr, PER_ROW_SEED: tl.constexpr, ACC: tl.constexpr, RB: tl.constexpr):
    if HAS_NOISE:
        eps = tl.load(noise_ptr + idx, mask=mask, other=0.0).to(ACC)
    else:
        if PER_ROW_SEED:
            seed = tl.load(row_seeds_ptr + row)
        z0, z1, z2, z3 = philox_normals(seed, stream, g0 + tl.arange(0, RB))
        eps = interleave4(z0, z1, z2, z3).to(ACC)
    return eps


@triton.jit
def _residual(out_ptr, x0_ptr, noise_ptr, coeffs_ptr, row_seeds_ptr, seed, stream, row, idx, mask, g0,
              HAS_NOISE: tl.constexpr, PER_ROW_SEED: tl.constexpr, ACC: tl.constexpr, RB: tl.constexpr):
    """(r = m·out - ca·x0 - cb·eps on the window, w, m) of batch row ``row``."""
    m = tl.load(coeffs_ptr + row * 4).to(ACC)
    ca = tl.load(coeffs_ptr + row * 4 + 1).to(ACC)
    cb = tl.load(coeffs_ptr + row * 4 + 2).to(ACC)
    w = tl.load(coeffs_ptr + row * 4 + 3).to(ACC)
    o = tl.load(out_ptr + idx, mask=mask, other=0.0).to(ACC)
    x = tl.load(x0_ptr + idx, mask=mask, other=0.0).to(ACC)
    eps = _eps(noise_ptr, row_seeds_ptr, seed, stream, row, idx, mask, g0, HAS_NOISE, PER_ROW_SEED, ACC, RB)
    return m * o - ca * x - cb * eps, w, m


@triton.jit(do_not_specialize=["seed", "stream"])
def _diffusion_loss_partials_kernel(
    out_ptr, x0_ptr, noise_ptr, coeffs_ptr, row_seeds_ptr, part_ptr, seed, stream, row_len, windows,
    HAS_NOISE: tl.constexpr, PER_ROW_SEED: tl.constexpr, ACC: tl.constexpr, RB: tl.constexpr,
):
    row, idx, mask, g0 = _window(row_len, windows, PER_ROW_SEED, RB)
    r, w, m = _residual(out_ptr, x0_ptr, noise_ptr, coeffs_ptr, row_seeds_ptr, seed, stream, row, idx, mask, g0,
                        HAS_NOISE, PER_ROW_SEED, ACC, RB)
    sq = tl.where(mask, r * r, tl.zeros_like(r))  # masked lanes never add (their r is not 0)
    tl.store(part_ptr + tl.program_id(0).to(tl.int64), tl.sum(sq, axis=0))


@triton.jit(do_not_specialize=["seed", "stream"])
def _diffusion_loss_backward_kernel(
    grad_rows_ptr, out_ptr, x0_ptr, noise_ptr, coeffs_ptr, row_seeds_ptr, grad_ptr, seed, stream, row_len, windows,
    HAS_NOISE: tl.constexpr, PER_ROW_SEED: tl.constexpr, ACC: tl.constexpr, RB: tl.constexpr,
):
    row, idx, mask, g0 = _window(row_len, windows, PER_ROW_SEED, RB)
    r, w, m = _residual(out_ptr, x0_ptr, noise_ptr, coeffs_ptr, row_seeds_ptr, seed, stream, row, idx, mask, g0,
                        HAS_NOISE, PER_ROW_SEED, ACC, RB)
    nf = tl.zeros([], ACC) + row_len
    k = tl.load(grad_rows_ptr + row).to(ACC) * w * 2.0 * m / nf
    tl.store(grad_ptr + idx, (k * r).to(grad_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["seed", "stream"])
def _reparameterize_kl_partials_kernel(
    mu_ptr, logvar_ptr, noise_ptr, row_seeds_ptr, z_ptr, part_ptr, seed, stream, row_len, windows,
    HAS_NOISE: tl.constexpr, PER_ROW_SEED: tl.constexpr, ACC: tl.constexpr, RB: tl.constexpr,
):
    row, idx, mask, g0 = _window(row_len, windows, PER_ROW_SEED, RB)
    mu = tl.load(mu_ptr + idx, mask=mask, other=0.0).to(ACC)
    lv = tl.load(logvar_ptr + idx, mask=mask, other=0.0).to(ACC)
    eps = _eps(noise_ptr, row_seeds_ptr, seed, stream, row, idx, mask, g0, HAS_NOISE, PER_ROW_SEED, ACC, RB)
    std = tl.exp(lv * 0.5)
    tl.store(z_ptr + idx, (mu + std * eps).to(z_ptr.dtype.element_ty), mask=mask)
    term = mu * mu + std * std - 1.0 - lv
    term = tl.where(mask, term, tl.zeros_like(term))
    tl.store(part_ptr + tl.program_id(0).to(tl.int64), tl.sum(term, axis=0))


@triton.jit(do_not_specialize=["seed", "stream"])
def _reparameterize_kl_backward_kernel(
    grad_z_ptr, grad_kl_ptr, mu_ptr, logvar_ptr, noise_ptr, row_seeds_ptr, dmu_ptr, dlv_ptr, seed, stream, row_len,
    windows, HAS_NOISE: tl.constexpr, PER_ROW_SEED: tl.constexpr, ACC: tl.constexpr, RB: tl.constexpr,
):
    row, idx, mask, g0 = _window(row_len, windows, PER_ROW_SEED, RB)
    gk = tl.load(grad_kl_ptr + row).to(ACC)
    gz = tl.load(grad_z_ptr + idx, mask=mask, other=0.0).to(ACC)
    mu = tl.load(mu_ptr + idx, mask=mask, other=0.0).to(ACC)
    lv = tl.load(logvar_ptr + idx, mask=mask, other=0.0).to(ACC)
    eps = _eps(noise_ptr, row_seeds_ptr, seed, stream, row, idx, mask, g0, HAS_NOISE, PER_ROW_SEED, ACC, RB)
    std = tl.exp(lv * 0.5)
    out_ty = dmu_ptr.dtype.element_ty
    tl.store(dmu_ptr + idx, (gz + gk * mu).to(out_ty), mask=mask)
    dlv = gz * std * eps * 0.5 + gk * (0.5 * (std * std - 1.0))
    tl.store(dlv_ptr + idx, dlv.to(out_ty), mask=mask)


@triton.jit
def _finish_rows_kernel(part_ptr, coeffs_ptr, out_ptr, batch, windows, row_len,
                        KIND: tl.constexpr, ACC: tl.constexpr, ROWS: tl.constexpr):
    """Row sums of the window partials (window order); KIND 0: loss = w·(s / n), 1: kl = 0.5·s."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    mask = rows < batch
    s = tl.zeros([ROWS], ACC)
    for w in range(windows):
        s += tl.load(part_ptr + rows * windows + w, mask=mask, other=0.0)
    if KIND == 0:
        wt = tl.load(coeffs_ptr + rows * 4 + 3, mask=mask, other=0.0).to(ACC)
        res = wt * (s / (tl.zeros([], ACC) + row_len))
    else:
        res = 0.5 * s
    tl.store(out_ptr + rows, res, mask=mask)


# ---------------------------------------------------------------------------
# launchers (contiguous inputs, checked by the public API or the op)
# ---------------------------------------------------------------------------
def _acc(dtype):
    return (tl.float64, torch.float64) if dtype == torch.float64 else (tl.float32, torch.float32)


def _windows(row_len):
    """(RB Philox groups per window, windows per row); a row may start mid-group."""
    rb = min(BLOCK, max(4, triton.next_power_of_2(triton.cdiv(row_len + 3, 4))))
    return rb, triton.cdiv(row_len + 3, 4 * rb)


def _common(x, noise, row_seeds):
    batch = x.shape[0]
    row_len = x.numel() // batch if batch else 0
    per_row_seed = noise is None and row_seeds is not None
    return batch, row_len, per_row_seed


def _finish(part, coeffs, out, batch, windows, row_len, kind, acc):
    _finish_rows_kernel[(triton.cdiv(batch, ROWS),)](part, coeffs if coeffs is not None else part, out, batch,
                                                     windows, row_len, KIND=kind, ACC=acc, ROWS=ROWS)


def diffusion_loss(model_out, x0, noise, coeffs, seed, stream, row_seeds):
    """Per-row losses (B,) like ``pygen::diffusion_loss``."""
    batch, row_len, per_row_seed = _common(x0, noise, row_seeds)
    acc, acc_dtype = _acc(x0.dtype)
    if batch == 0:
        return torch.empty((0,), dtype=acc_dtype, device=x0.device)
    if row_len == 0:  # mean of nothing: 0/0
        return torch.full((batch,), math.nan, dtype=acc_dtype, device=x0.device)
    rb, windows = _windows(row_len)
    part = torch.empty(batch * windows, dtype=acc_dtype, device=x0.device)
    _diffusion_loss_partials_kernel[(batch * windows,)](
        model_out, x0, noise if noise is not None else x0, coeffs, row_seeds if per_row_seed else x0, part,
        seed, stream, row_len, windows,
        HAS_NOISE=noise is not None, PER_ROW_SEED=per_row_seed, ACC=acc, RB=rb,
    )
    loss = torch.empty(batch, dtype=acc_dtype, device=x0.device)
    _finish(part, coeffs, loss, batch, windows, row_len, 0, acc)
    return loss


def diffusion_loss_backward(grad_rows, model_out, x0, noise, coeffs, seed, stream, row_seeds):
    """d loss / d model_out like ``pygen::diffusion_loss_backward``."""
    batch, row_len, per_row_seed = _common(x0, noise, row_seeds)
    grad = torch.empty_like(model_out)
    if batch == 0 or row_len == 0:
        return grad
    acc, _ = _acc(x0.dtype)
    rb, windows = _windows(row_len)
    _diffusion_loss_backward_kernel[(batch * windows,)](
        grad_rows, model_out, x0, noise if noise is not None else x0, coeffs, row_seeds if per_row_seed else x0, grad,
        seed, stream, row_len, windows,
        HAS_NOISE=noise is not None, PER_ROW_SEED=per_row_seed, ACC=acc, RB=rb,
    )
    return grad


def reparameterize_kl(mu, logvar, noise, seed, stream, row_seeds):
    """``(z, kl_rows)`` like ``pygen::reparameterize_kl``."""
    batch, row_len, per_row_seed = _common(mu, noise, row_seeds)
    acc, acc_dtype = _acc(mu.dtype)
    z = torch.empty_like(mu)
    if batch == 0 or row_len == 0:
        return z, torch.zeros(batch, dtype=acc_dtype, device=mu.device)
    rb, windows = _windows(row_len)
    part = torch.empty(batch * windows, dtype=acc_dtype, device=mu.device)
    _reparameterize_kl_partials_kernel[(batch * windows,)](
        mu, logvar, noise if noise is not None else mu, row_seeds if per_row_seed else mu, z, part,
        seed, stream, row_len, windows,
        HAS_NOISE=noise is not None, PER_ROW_SEED=per_row_seed, ACC=acc, RB=rb,
    )
    kl = torch.empty(batch, dtype=acc_dtype, device=mu.device)
    _finish(part, None, kl, batch, windows, row_len, 1, acc)
    return z, kl


def reparameterize_kl_backward(grad_z, grad_kl, mu, logvar, noise, seed, stream, row_seeds):
    """``(dmu, dlogvar)`` like ``pygen::reparameterize_kl_backward``."""
    batch, row_len, per_row_seed = _common(mu, noise, row_seeds)
    dmu = torch.empty_like(mu)
    dlv = torch.empty_like(mu)
    if batch == 0 or row_len == 0:
        return dmu, dlv
    acc, _ = _acc(mu.dtype)
    rb, windows = _windows(row_len)
    _reparameterize_kl_backward_kernel[(batch * windows,)](
        grad_z, grad_kl, mu, logvar, noise if noise is not None else mu, row_seeds if per_row_seed else mu, dmu, dlv,
        seed, stream, row_len, windows,
        HAS_NOISE=noise is not None, PER_ROW_SEED=per_row_seed, ACC=acc, RB=rb,
    )
    return dmu, dlv
