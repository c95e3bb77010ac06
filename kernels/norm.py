"""Triton backend of the norm family (pygen/ops/norm.py): ops
``pygen::adaln_modulate`` / ``adaln_modulate_backward`` (LayerNorm + adaLN
shift/scale), ``pygen::gated_residual`` / ``gated_residual_backward``
(x + gate·y), ``pygen::group_norm`` / ``group_norm_backward`` (GroupNorm with
optional fused SiLU, NCHW or channels-last) and ``pygen::timestep_embedding`` /
``timestep_embedding_backward`` (diffusers' sinusoidal embedding).

Launchers take checked tensors (contiguous; for group norm x and grad_y in
the same layout, NCHW-contiguous or channels-last) and launch directly.
Arithmetic in fp32 (fp64 for fp64 storage).

Grids and reductions (all deterministic: fixed tiles, partial sums combined in
a fixed order by a second kernel, no atomics):
* adaLN forward: one program per (b, n) row, looping over C in BLOCK_C pieces
  (two-pass mean / variance, then the output pass).
* adaLN backward: dx one program per row; the column sums (dshift, dscale per
  batch row; dweight, dbias over all rows) as per-(b, row-tile) partials of
  BLOCK_C columns, then summed over the tiles.
* gated residual: elementwise forward; backward dy elementwise with the dgate
  partials of each (b, row-tile), then summed over the tiles.
* group norm: x seen as (N, C, S) with strides (C·S, sC, sS) = (S, 1) for NCHW
  or (1, C) for channels-last, so both layouts are one strided 2-D walk of
  [channel block, spatial block] tiles. Grid (N·G, P): program (n·G + g, p)
  handles the group's channels at spatial chunk p. Statistics: per-program
  (count, mean, M2) merged with Chan's formula, then each output program
  merges the P partials of its group itself. Backward likewise: per-program
  Σ dxhat, Σ dxhat·xhat (group) and per-channel Σ da·xhat, Σ da partials.
* timestep embedding: grid (B, column blocks); backward one program per t.
"""
import torch
import triton
import triton.language as tl

from pygen.kernels._scalars import split_float

MAX_BLOCK_C = 4096  # adaLN row block (longer rows loop)
COL_BLOCK = 128  # columns per program in the column-sum kernels
ROW_TILE = 64  # rows per partial sum in the column-sum kernels
GN_TILE = 2048  # elements per group-norm tile
GN_MAX_PARTS = 64  # spatial chunks per group at most


def _acc(dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _acc_torch(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _warps(block):
    return 8 if block >= 2048 else 4


def _empty0(like):
    return torch.empty((0,), dtype=like.dtype, device=like.device)


@triton.jit
def _rsqrt(v, ACC: tl.constexpr):
    if ACC == tl.float64:
        return 1.0 / tl.sqrt(v)
    else:
        return tl.rsqrt(v)


@triton.jit
def _silu_grad(a):
    """d silu(a) / da = σ(a)·(1 + a·(1 - σ(a)))."""
    sig = 1.0 / (1.0 + tl.exp(-a))
    return sig * (1.0 + a * (1.0 - sig))


# ---------------------------------------------------------------------------
# column sums of partials: out[g, c] = Σ_{r < R} part[g·R + r, c]
# ---------------------------------------------------------------------------
@triton.jit
def _sum_partials_kernel(pa_ptr, pb_ptr, oa_ptr, ob_ptr, R, C, HAS_A: tl.constexpr, HAS_B: tl.constexpr,
                         BLOCK: tl.constexpr):
    g = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = cols < C
    acc_a = tl.zeros([BLOCK], tl.float32).to(pa_ptr.dtype.element_ty)
    acc_b = tl.zeros([BLOCK], tl.float32).to(pa_ptr.dtype.element_ty)
    for r in range(0, R):
        off = (g * R + r) * C + cols
        if HAS_A:
            acc_a += tl.load(pa_ptr + off, mask=m, other=0.0)
        if HAS_B:
            acc_b += tl.load(pb_ptr + off, mask=m, other=0.0)
    if HAS_A:
        tl.store(oa_ptr + g * C + cols, acc_a.to(oa_ptr.dtype.element_ty), mask=m)
    if HAS_B:
        tl.store(ob_ptr + g * C + cols, acc_b.to(ob_ptr.dtype.element_ty), mask=m)


def _sum_partials(pa, pb, oa, ob, groups, rows, cols):
    """oa (groups, cols) = Σ over each group's ``rows`` partial rows of pa (likewise pb -> ob); None skips."""
    if oa is None and ob is None:
        return
    any_p = pa if pa is not None else pb
    grid = (groups, triton.cdiv(cols, COL_BLOCK))
    _sum_partials_kernel[grid](
        pa if pa is not None else any_p, pb if pb is not None else any_p,
        oa if oa is not None else any_p, ob if ob is not None else any_p, rows, cols,
        HAS_A=oa is not None, HAS_B=ob is not None, BLOCK=COL_BLOCK,
    )


# ---------------------------------------------------------------------------
# adaln_modulate
# ---------------------------------------------------------------------------
@triton.jit
def _adaln_fwd_kernel(
    x_ptr, w_ptr, b_ptr, shift_ptr, scale_ptr, y_ptr, mean_ptr, rstd_ptr, N, C, eps,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_SHIFT: tl.constexpr, HAS_SCALE: tl.constexpr,
    ACC: tl.constexpr, BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    bi = row // N
    base = row * C
    acc = tl.zeros([BLOCK_C], ACC)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        acc += tl.load(x_ptr + base + cols, mask=cols < C, other=0.0).to(ACC)
    mean = tl.sum(acc, axis=0) / C
    acc = tl.zeros([BLOCK_C], ACC)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        m = cols < C
        d = tl.where(m, tl.load(x_ptr + base + cols, mask=m, other=0.0).to(ACC) - mean, 0.0)
        acc += d * d
    var = tl.sum(acc, axis=0) / C
    rstd = _rsqrt(var + eps, ACC)
    tl.store(mean_ptr + row, mean)
    tl.store(rstd_ptr + row, rstd)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        m = cols < C
        z = (tl.load(x_ptr + base + cols, mask=m, other=0.0).to(ACC) - mean) * rstd
        if HAS_W:
            z = z * tl.load(w_ptr + cols, mask=m, other=0.0).to(ACC)
        if HAS_B:
            z = z + tl.load(b_ptr + cols, mask=m, other=0.0).to(ACC)
        if HAS_SCALE:
            z = z * (1.0 + tl.load(scale_ptr + bi * C + cols, mask=m, other=0.0).to(ACC))
        if HAS_SHIFT:
            z = z + tl.load(shift_ptr + bi * C + cols, mask=m, other=0.0).to(ACC)
        tl.store(y_ptr + base + cols, z.to(y_ptr.dtype.element_ty), mask=m)


def _row_block(c):
    return min(triton.next_power_of_2(max(c, 1)), MAX_BLOCK_C)


def adaln_modulate(x, weight, bias, shift, scale, eps):
    """(y, mean, rstd) of pygen::adaln_modulate; x (B, N, C) contiguous."""
    b, n, c = x.shape
    y = torch.empty_like(x)
    acc = _acc_torch(x.dtype)
    mean = torch.empty((b, n), dtype=acc, device=x.device)
    rstd = torch.empty((b, n), dtype=acc, device=x.device)
    if b * n == 0:
        return y, mean, rstd
    if c == 0:
        mean.fill_(float("nan"))
        rstd.fill_(float("nan"))
        return y, mean, rstd
    block = _row_block(c)
    _adaln_fwd_kernel[(b * n,)](
        x, weight if weight is not None else x, bias if bias is not None else x,
        shift if shift is not None else x, scale if scale is not None else x, y, mean, rstd, n, c, eps,
        HAS_W=weight is not None, HAS_B=bias is not None, HAS_SHIFT=shift is not None,
        HAS_SCALE=scale is not None, ACC=_acc(x.dtype), BLOCK_C=block, num_warps=_warps(block),
    )
    return y, mean, rstd


@triton.jit
def _adaln_dx_tile(g_ptr, x_ptr, w_ptr, scale_ptr, base, bi, c0, C, mean, rstd,
                   HAS_W: tl.constexpr, HAS_SCALE: tl.constexpr, ACC: tl.constexpr, BLOCK_C: tl.constexpr):
    """Columns [c0, c0 + BLOCK_C) of one row: (cols, mask, x̂ = (x - mean)·rstd, d = dL/dx̂)."""
    cols = c0 + tl.arange(0, BLOCK_C)
    m = cols < C
    xn = (tl.load(x_ptr + base + cols, mask=m, other=0.0).to(ACC) - mean) * rstd
    d = tl.load(g_ptr + base + cols, mask=m, other=0.0).to(ACC)
    if HAS_SCALE:
        d = d * (1.0 + tl.load(scale_ptr + bi * C + cols, mask=m, other=0.0).to(ACC))
    if HAS_W:
        d = d * tl.load(w_ptr + cols, mask=m, other=0.0).to(ACC)
    return cols, m, xn, d


@triton.jit
def _adaln_dx_kernel(
    g_ptr, x_ptr, w_ptr, scale_ptr, mean_ptr, rstd_ptr, dx_ptr, N, C,
    HAS_W: tl.constexpr, HAS_SCALE: tl.constexpr, ACC: tl.constexpr, BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    bi = row // N
    base = row * C
    mean = tl.load(mean_ptr + row).to(ACC)
    rstd = tl.load(rstd_ptr + row).to(ACC)
    a1 = tl.zeros([BLOCK_C], ACC)
    a2 = tl.zeros([BLOCK_C], ACC)
    for c0 in range(0, C, BLOCK_C):
        cols, m, xn, d = _adaln_dx_tile(g_ptr, x_ptr, w_ptr, scale_ptr, base, bi, c0, C, mean, rstd,
                                        HAS_W, HAS_SCALE, ACC, BLOCK_C)
        a1 += d
        a2 += tl.where(m, d * xn, 0.0)
    c1 = tl.sum(a1, axis=0) / C
    c2 = tl.sum(a2, axis=0) / C
    for c0 in range(0, C, BLOCK_C):
        cols, m, xn, d = _adaln_dx_tile(g_ptr, x_ptr, w_ptr, scale_ptr, base, bi, c0, C, mean, rstd,
                                        HAS_W, HAS_SCALE, ACC, BLOCK_C)
        dx = rstd * (d - c1 - xn * c2)
        tl.store(dx_ptr + base + cols, dx.to(dx_ptr.dtype.element_ty), mask=m)


@triton.jit
def _adaln_cols_kernel(
    g_ptr, x_ptr, w_ptr, b_ptr, scale_ptr, mean_ptr, rstd_ptr, p_shift, p_scale, p_w, p_b, N, C, tiles,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_SCALE: tl.constexpr,
    ACC: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
):
    """Partial column sums of one (batch row b, row tile) over BLOCK columns."""
    bi = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1).to(tl.int64)
    cols = tl.program_id(2).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = cols < C
    w = tl.full([BLOCK], 1.0, ACC)
    bb = tl.zeros([BLOCK], ACC)
    s1 = tl.full([BLOCK], 1.0, ACC)
    if HAS_W:
        w = tl.load(w_ptr + cols, mask=m, other=0.0).to(ACC)
    if HAS_B:
        bb = tl.load(b_ptr + cols, mask=m, other=0.0).to(ACC)
    if HAS_SCALE:
        s1 = 1.0 + tl.load(scale_ptr + bi * C + cols, mask=m, other=0.0).to(ACC)
    acc_g = tl.zeros([BLOCK], ACC)
    acc_gz = tl.zeros([BLOCK], ACC)
    acc_dzx = tl.zeros([BLOCK], ACC)
    r0 = tile * ROWS
    r1 = tl.minimum(r0 + ROWS, N)
    for r in range(r0, r1):
        row = bi * N + r
        mean = tl.load(mean_ptr + row).to(ACC)
        rstd = tl.load(rstd_ptr + row).to(ACC)
        xn = (tl.load(x_ptr + row * C + cols, mask=m, other=0.0).to(ACC) - mean) * rstd
        g = tl.load(g_ptr + row * C + cols, mask=m, other=0.0).to(ACC)
        acc_g += g
        acc_gz += g * (xn * w + bb)
        acc_dzx += g * xn
    out = (bi * tiles + tile) * C + cols
    tl.store(p_shift + out, acc_g, mask=m)
    if HAS_SCALE:
        tl.store(p_scale + out, acc_gz, mask=m)
    # dz = g·(1 + scale[b]) is constant in the tile's column: apply it once
    if HAS_W:
        tl.store(p_w + out, acc_dzx * s1, mask=m)
    if HAS_B:
        tl.store(p_b + out, acc_g * s1, mask=m)


def adaln_modulate_backward(grad_y, x, weight, bias, scale, mean, rstd):
    """(dx, dweight, dbias, dshift, dscale) of pygen::adaln_modulate_backward (contiguous inputs)."""
    b, n, c = x.shape
    acc = _acc_torch(x.dtype)
    dx = torch.empty_like(x)
    dshift = torch.empty((b, c), dtype=x.dtype, device=x.device)
    dscale = torch.empty((b, c), dtype=x.dtype, device=x.device) if scale is not None else _empty0(x)
    dweight = torch.empty((c,), dtype=x.dtype, device=x.device) if weight is not None else _empty0(x)
    dbias = torch.empty((c,), dtype=x.dtype, device=x.device) if bias is not None else _empty0(x)
    if b * n * c == 0:  # no elements: every parameter gradient is an empty sum (zeros, never garbage)
        for t in (dshift, dscale, dweight, dbias):
            t.zero_()
        return dx, dweight, dbias, dshift, dscale
    ACC = _acc(x.dtype)
    block = _row_block(c)
    w_arg = weight if weight is not None else x
    s_arg = scale if scale is not None else x
    _adaln_dx_kernel[(b * n,)](
        grad_y, x, w_arg, s_arg, mean, rstd, dx, n, c,
        HAS_W=weight is not None, HAS_SCALE=scale is not None, ACC=ACC, BLOCK_C=block, num_warps=_warps(block),
    )
    tiles = triton.cdiv(n, ROW_TILE)
    p_shift = torch.empty((b * tiles, c), dtype=acc, device=x.device)
    p_scale = torch.empty_like(p_shift) if scale is not None else p_shift
    p_w = torch.empty_like(p_shift) if weight is not None else p_shift
    p_b = torch.empty_like(p_shift) if bias is not None else p_shift
    _adaln_cols_kernel[(b, tiles, triton.cdiv(c, COL_BLOCK))](
        grad_y, x, w_arg, bias if bias is not None else x, s_arg, mean, rstd, p_shift, p_scale, p_w, p_b, n, c,
        tiles, HAS_W=weight is not None, HAS_B=bias is not None, HAS_SCALE=scale is not None,
        ACC=ACC, ROWS=ROW_TILE, BLOCK=COL_BLOCK,
    )
    _sum_partials(p_shift, p_scale, dshift, dscale if scale is not None else None, b, tiles, c)
    _sum_partials(p_w, p_b, dweight if weight is not None else None, dbias if bias is not None else None,
                  1, b * tiles, c)
    return dx, dweight, dbias, dshift, dscale


# ---------------------------------------------------------------------------
# gated_residual
# ---------------------------------------------------------------------------
@triton.jit
def _gated_fwd_kernel(x_ptr, gate_ptr, y_ptr, out_ptr, numel, NC, C, ACC: tl.constexpr, BLOCK: tl.constexpr):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = idx < numel
    gi = (idx // NC) * C + idx % C
    x = tl.load(x_ptr + idx, mask=m, other=0.0).to(ACC)
    y = tl.load(y_ptr + idx, mask=m, other=0.0).to(ACC)
    g = tl.load(gate_ptr + gi, mask=m, other=0.0).to(ACC)
    tl.store(out_ptr + idx, (x + g * y).to(out_ptr.dtype.element_ty), mask=m)


def gated_residual(x, gate, y):
    out = torch.empty_like(x)
    numel = x.numel()
    if numel == 0:
        return out
    b, n, c = x.shape
    block = 1024
    _gated_fwd_kernel[(triton.cdiv(numel, block),)](x, gate, y, out, numel, n * c, c, ACC=_acc(x.dtype),
                                                   BLOCK=block)
    return out


@triton.jit
def _gated_bwd_kernel(g_ptr, gate_ptr, y_ptr, dy_ptr, part_ptr, N, C, tiles,
                      ACC: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    bi = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1).to(tl.int64)
    cols = tl.program_id(2).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = cols < C
    gate = tl.load(gate_ptr + bi * C + cols, mask=m, other=0.0).to(ACC)
    acc = tl.zeros([BLOCK], ACC)
    r0 = tile * ROWS
    r1 = tl.minimum(r0 + ROWS, N)
    for r in range(r0, r1):
        off = (bi * N + r) * C + cols
        g = tl.load(g_ptr + off, mask=m, other=0.0).to(ACC)
        y = tl.load(y_ptr + off, mask=m, other=0.0).to(ACC)
        tl.store(dy_ptr + off, (g * gate).to(dy_ptr.dtype.element_ty), mask=m)
        acc += g * y
    tl.store(part_ptr + (bi * tiles + tile) * C + cols, acc, mask=m)


def gated_residual_backward(grad, gate, y):
    """(dgate, dy) of pygen::gated_residual_backward (contiguous inputs)."""
    b, n, c = y.shape
    dy = torch.empty_like(y)
    dgate = torch.empty_like(gate)
    if b * c == 0:
        return dgate, dy
    if n == 0:
        return dgate.zero_(), dy
    tiles = triton.cdiv(n, ROW_TILE)
    part = torch.empty((b * tiles, c), dtype=_acc_torch(y.dtype), device=y.device)
    _gated_bwd_kernel[(b, tiles, triton.cdiv(c, COL_BLOCK))](
        grad, gate, y, dy, part, n, c, tiles, ACC=_acc(y.dtype), ROWS=ROW_TILE, BLOCK=COL_BLOCK,
    )
    _sum_partials(part, None, dgate, None, b, tiles, c)
    return dgate, dy


# ---------------------------------------------------------------------------
# group_norm
# ---------------------------------------------------------------------------
def _gn_geometry(x, groups):
    """(N, C, S, sC, sS, Cg, CB, SB, chunk, P) for x in NCHW or channels-last layout."""
    n, c = x.shape[:2]
    s = x.numel() // max(n * c, 1)
    if x.is_contiguous():
        sc, ss = s, 1
    else:  # channels-last: the dense layout of (N, *spatial, C)
        sc, ss = 1, c
    cg = c // groups
    cb = min(triton.next_power_of_2(cg), GN_TILE)
    sb = max(1, min(GN_TILE // cb, triton.next_power_of_2(s)))
    blocks = triton.cdiv(s, sb)
    # enough programs to fill a GPU, at most GN_MAX_PARTS spatial chunks per group
    parts = max(1, min(blocks, GN_MAX_PARTS, triton.cdiv(1024, max(n * groups, 1))))
    chunk = triton.cdiv(blocks, parts) * sb
    parts = triton.cdiv(s, chunk)
    return n, c, s, sc, ss, cg, cb, sb, chunk, parts


@triton.jit
def _gn_tile_offsets(n, g, c0, s0, C, S, sC, sS, Cg, CB: tl.constexpr, SB: tl.constexpr):
    ch_in = c0 + tl.arange(0, CB)[:, None]  # channel within the group
    sp = s0 + tl.arange(0, SB)[None, :]
    m = (ch_in < Cg) & (sp < S)
    ch = g * Cg + ch_in
    off = n * C * S + ch.to(tl.int64) * sC + sp.to(tl.int64) * sS
    return off, ch, m


@triton.jit
def _gn_program(G, chunk, S):
    """This program's work: (n, g) group row ng = n·G + g (axis 0) and spatial chunk p
    (axis 1), covering spatial positions [s_begin, s_end)."""
    ng = tl.program_id(0).to(tl.int64)
    p = tl.program_id(1).to(tl.int64)
    s_begin = p * chunk
    s_end = tl.minimum(s_begin + chunk, S)
    return ng, ng // G, ng % G, p, s_begin, s_end


@triton.jit
def _gn_stats_kernel(
    x_ptr, part_ptr, C, S, sC, sS, Cg, G, chunk, P,
    ACC: tl.constexpr, CB: tl.constexpr, SB: tl.constexpr,
):
    ng, n, g, p, s_begin, s_end = _gn_program(G, chunk, S)
    cnt = tl.zeros([], ACC)
    mean = tl.zeros([], ACC)
    m2 = tl.zeros([], ACC)
    for s0 in range(s_begin, s_end, SB):
        for c0 in range(0, Cg, CB):
            off, ch, m = _gn_tile_offsets(n, g, c0, s0, C, S, sC, sS, Cg, CB, SB)
            x = tl.load(x_ptr + off, mask=m, other=0.0).to(ACC)
            t_cnt = tl.sum(tl.sum(m.to(ACC), axis=1), axis=0)
            t_mean = tl.sum(tl.sum(x, axis=1), axis=0) / t_cnt
            d = tl.where(m, x - t_mean, 0.0)
            t_m2 = tl.sum(tl.sum(d * d, axis=1), axis=0)
            new_cnt = cnt + t_cnt
            delta = t_mean - mean
            mean = mean + delta * (t_cnt / new_cnt)
            m2 = m2 + t_m2 + delta * delta * (cnt * t_cnt / new_cnt)
            cnt = new_cnt
    base = (ng * P + p) * 3
    tl.store(part_ptr + base, cnt)
    tl.store(part_ptr + base + 1, mean)
    tl.store(part_ptr + base + 2, m2)


@triton.jit
def _gn_group_stats(part_ptr, ng, P, eps, ACC: tl.constexpr, PMAX: tl.constexpr):
    """Merge the P (count, mean, M2) partials of group ng -> (mean, rstd)."""
    i = tl.arange(0, PMAX)
    pm = i < P
    base = (ng * P + i) * 3
    cnt = tl.load(part_ptr + base, mask=pm, other=0.0)
    pmean = tl.load(part_ptr + base + 1, mask=pm, other=0.0)
    pm2 = tl.load(part_ptr + base + 2, mask=pm, other=0.0)
    total = tl.sum(cnt, axis=0)
    mean = tl.sum(cnt * pmean, axis=0) / total
    d = pmean - mean
    m2 = tl.sum(pm2 + cnt * d * d, axis=0)
    rstd = _rsqrt(m2 / total + eps, ACC)
    return mean, rstd


@triton.jit
def _gn_fwd_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, part_ptr, mean_ptr, rstd_ptr, C, S, sC, sS, Cg, G, chunk, P, eps,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, SILU: tl.constexpr,
    ACC: tl.constexpr, CB: tl.constexpr, SB: tl.constexpr, PMAX: tl.constexpr,
):
    ng, n, g, p, s_begin, s_end = _gn_program(G, chunk, S)
    mean, rstd = _gn_group_stats(part_ptr, ng, P, eps, ACC, PMAX)
    if p == 0:
        tl.store(mean_ptr + ng, mean)
        tl.store(rstd_ptr + ng, rstd)
    for s0 in range(s_begin, s_end, SB):
        for c0 in range(0, Cg, CB):
            off, ch, m = _gn_tile_offsets(n, g, c0, s0, C, S, sC, sS, Cg, CB, SB)
            cm = (c0 + tl.arange(0, CB)[:, None]) < Cg
            a = (tl.load(x_ptr + off, mask=m, other=0.0).to(ACC) - mean) * rstd
            if HAS_W:
                a = a * tl.load(w_ptr + ch, mask=cm, other=0.0).to(ACC)
            if HAS_B:
                a = a + tl.load(b_ptr + ch, mask=cm, other=0.0).to(ACC)
            if SILU:
                a = a / (1.0 + tl.exp(-a))
            tl.store(y_ptr + off, a.to(y_ptr.dtype.element_ty), mask=m)


def group_norm(x, weight, bias, groups, eps, silu):
    """(y, mean, rstd) of pygen::group_norm; x NCHW-contiguous or channels-last, y in x's layout."""
    y = torch.empty_like(x)
    acc = _acc_torch(x.dtype)
    nb = x.shape[0]
    mean = torch.empty((nb, groups), dtype=acc, device=x.device)
    rstd = torch.empty((nb, groups), dtype=acc, device=x.device)
    if nb == 0 or groups == 0:
        return y, mean, rstd
    n, c, s, sc, ss, cg, cb, sb, chunk, parts = _gn_geometry(x, groups)
    if s == 0 or cg == 0:
        mean.fill_(float("nan"))
        rstd.fill_(float("nan"))
        return y, mean, rstd
    part = torch.empty((n * groups, parts, 3), dtype=acc, device=x.device)
    grid = (n * groups, parts)
    ACC = _acc(x.dtype)
    _gn_stats_kernel[grid](x, part, c, s, sc, ss, cg, groups, chunk, parts, ACC=ACC, CB=cb, SB=sb, num_warps=8)
    _gn_fwd_kernel[grid](
        x, weight if weight is not None else x, bias if bias is not None else x, y, part, mean, rstd,
        c, s, sc, ss, cg, groups, chunk, parts, eps,
        HAS_W=weight is not None, HAS_B=bias is not None, SILU=silu, ACC=ACC, CB=cb, SB=sb,
        PMAX=triton.next_power_of_2(parts), num_warps=8,
    )
    return y, mean, rstd


@triton.jit
def _gn_da(g_ptr, x_ptr, w_ptr, b_ptr, off, ch, m, cm, mean, rstd,
           HAS_W: tl.constexpr, HAS_B: tl.constexpr, SILU: tl.constexpr, ACC: tl.constexpr):
    """(xhat, da, dxhat) of one tile: da = dL/d(pre-activation), dxhat = da·w."""
    xhat = (tl.load(x_ptr + off, mask=m, other=0.0).to(ACC) - mean) * rstd
    da = tl.load(g_ptr + off, mask=m, other=0.0).to(ACC)
    if HAS_W:
        w = tl.load(w_ptr + ch, mask=cm, other=0.0).to(ACC)
    if SILU:
        a = xhat
        if HAS_W:
            a = a * w
        if HAS_B:
            a = a + tl.load(b_ptr + ch, mask=cm, other=0.0).to(ACC)
        da = da * _silu_grad(a)
    da = tl.where(m, da, 0.0)
    xhat = tl.where(m, xhat, 0.0)
    if HAS_W:
        dxhat = da * w
    else:
        dxhat = da
    return xhat, da, dxhat


@triton.jit
def _gn_bwd_sums_kernel(
    g_ptr, x_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, part_ptr, pw_ptr, pb_ptr, C, S, sC, sS, Cg, G, chunk, P,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, SILU: tl.constexpr,
    ACC: tl.constexpr, CB: tl.constexpr, SB: tl.constexpr,
):
    ng, n, g, p, s_begin, s_end = _gn_program(G, chunk, S)
    mean = tl.load(mean_ptr + ng).to(ACC)
    rstd = tl.load(rstd_ptr + ng).to(ACC)
    s1 = tl.zeros([], ACC)
    s2 = tl.zeros([], ACC)
    for c0 in range(0, Cg, CB):
        cw = tl.zeros([CB], ACC)
        cbias = tl.zeros([CB], ACC)
        for s0 in range(s_begin, s_end, SB):
            off, ch, m = _gn_tile_offsets(n, g, c0, s0, C, S, sC, sS, Cg, CB, SB)
            cm = (c0 + tl.arange(0, CB)[:, None]) < Cg
            xhat, da, dxhat = _gn_da(g_ptr, x_ptr, w_ptr, b_ptr, off, ch, m, cm, mean, rstd,
                                     HAS_W, HAS_B, SILU, ACC)
            s1 += tl.sum(tl.sum(dxhat, axis=1), axis=0)
            s2 += tl.sum(tl.sum(dxhat * xhat, axis=1), axis=0)
            cw += tl.sum(da * xhat, axis=1)
            cbias += tl.sum(da, axis=1)
        chv = g * Cg + c0 + tl.arange(0, CB)
        cmv = (c0 + tl.arange(0, CB)) < Cg
        row = (n * P + p) * C
        if HAS_W:
            tl.store(pw_ptr + row + chv, cw, mask=cmv)
        if HAS_B:
            tl.store(pb_ptr + row + chv, cbias, mask=cmv)
    tl.store(part_ptr + (ng * P + p) * 2, s1)
    tl.store(part_ptr + (ng * P + p) * 2 + 1, s2)


@triton.jit
def _gn_dx_kernel(
    g_ptr, x_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, part_ptr, dx_ptr, C, S, sC, sS, Cg, G, chunk, P,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, SILU: tl.constexpr,
    ACC: tl.constexpr, CB: tl.constexpr, SB: tl.constexpr, PMAX: tl.constexpr,
):
    ng, n, g, p, s_begin, s_end = _gn_program(G, chunk, S)
    mean = tl.load(mean_ptr + ng).to(ACC)
    rstd = tl.load(rstd_ptr + ng).to(ACC)
    i = tl.arange(0, PMAX)
    pm = i < P
    s1 = tl.sum(tl.load(part_ptr + (ng * P + i) * 2, mask=pm, other=0.0), axis=0)
    s2 = tl.sum(tl.load(part_ptr + (ng * P + i) * 2 + 1, mask=pm, other=0.0), axis=0)
    total = (tl.zeros([], ACC) + Cg) * S
    c1 = s1 / total
    c2 = s2 / total
    for s0 in range(s_begin, s_end, SB):
        for c0 in range(0, Cg, CB):
            off, ch, m = _gn_tile_offsets(n, g, c0, s0, C, S, sC, sS, Cg, CB, SB)
            cm = (c0 + tl.arange(0, CB)[:, None]) < Cg
            xhat, da, dxhat = _gn_da(g_ptr, x_ptr, w_ptr, b_ptr, off, ch, m, cm, mean, rstd,
                                     HAS_W, HAS_B, SILU, ACC)
            dx = rstd * (dxhat - c1 - xhat * c2)
            tl.store(dx_ptr + off, dx.to(dx_ptr.dtype.element_ty), mask=m)


def group_norm_backward(grad_y, x, weight, bias, mean, rstd, groups, silu):
    """(dx, dweight, dbias) of pygen::group_norm_backward; grad_y in x's layout, dx too."""
    dx = torch.empty_like(x)
    nb, c = x.shape[:2]
    dweight = torch.empty((c,), dtype=x.dtype, device=x.device) if weight is not None else _empty0(x)
    dbias = torch.empty((c,), dtype=x.dtype, device=x.device) if bias is not None else _empty0(x)
    if x.numel() == 0:
        dweight.zero_()
        dbias.zero_()
        return dx, dweight, dbias
    n, c, s, sc, ss, cg, cb, sb, chunk, parts = _gn_geometry(x, groups)
    acc = _acc_torch(x.dtype)
    ACC = _acc(x.dtype)
    part = torch.empty((n * groups, parts, 2), dtype=acc, device=x.device)
    pw = torch.empty((n * parts, c), dtype=acc, device=x.device) if weight is not None else part
    pb = torch.empty((n * parts, c), dtype=acc, device=x.device) if bias is not None else part
    grid = (n * groups, parts)
    w_arg = weight if weight is not None else x
    b_arg = bias if bias is not None else x
    _gn_bwd_sums_kernel[grid](
        grad_y, x, w_arg, b_arg, mean, rstd, part, pw, pb, c, s, sc, ss, cg, groups, chunk, parts,
        HAS_W=weight is not None, HAS_B=bias is not None, SILU=silu, ACC=ACC, CB=cb, SB=sb, num_warps=8,
    )
    _gn_dx_kernel[grid](
        grad_y, x, w_arg, b_arg, mean, rstd, part, dx, c, s, sc, ss, cg, groups, chunk, parts,
        HAS_W=weight is not None, HAS_B=bias is not None, SILU=silu, ACC=ACC, CB=cb, SB=sb,
        PMAX=triton.next_power_of_2(parts), num_warps=8,
    )
    _sum_partials(pw if weight is not None else None, pb if bias is not None else None,
                  dweight if weight is not None else None, dbias if bias is not None else None, 1, n * parts, c)
    return dx, dweight, dbias


# ---------------------------------------------------------------------------
# timestep_embedding
# ---------------------------------------------------------------------------
@triton.jit
def _temb_args(t, k, c_hi, c_lo, d_hi, d_lo, s_hi, s_lo, ACC: tl.constexpr):
    """(a_k, scale·f_k): f_k = exp(c·k / d), a_k = scale·(t·f_k), in diffusers' fp32 operation order.

    fp32: (c, d, s) = fp32 of (-ln max_period, half - shift, scale) in the *_hi arguments.
    fp64: c_hi + c_lo is max_period (c = -ln of it, computed here), d and s as hi + lo pairs.
    """
    kf = k.to(ACC)
    if ACC == tl.float64:
        one = tl.full([], 1.0, tl.float64)
        c = -tl.log(c_hi * one + c_lo * one)
        d = d_hi * one + d_lo * one
        s = s_hi * one + s_lo * one
        f = tl.exp((c * kf) / d)
    else:
        c = c_hi
        d = d_hi
        s = s_hi
        f = tl.exp(tl.div_rn(c * kf, d))
    return s * (t * f), s * f


@triton.jit
def _temb_fwd_kernel(
    t_ptr, out_ptr, dim, half, c_hi, c_lo, d_hi, d_lo, s_hi, s_lo,
    FLIP: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = j < dim
    t = tl.load(t_ptr + row).to(ACC)
    second = j >= half
    k = tl.where(second, j - half, j)
    a, _ = _temb_args(t, k, c_hi, c_lo, d_hi, d_lo, s_hi, s_lo, ACC)
    if FLIP:
        v = tl.where(second, tl.sin(a), tl.cos(a))
    else:
        v = tl.where(second, tl.cos(a), tl.sin(a))
    v = tl.where(j < 2 * half, v, 0.0)
    tl.store(out_ptr + row * dim + j, v.to(out_ptr.dtype.element_ty), mask=m)


def _temb_scalars(dim, max_period, downscale_freq_shift, scale, dtype):
    import math

    half = dim // 2
    c_hi, c_lo = split_float(-math.log(max_period))
    if dtype == torch.float64:
        c_hi, c_lo = split_float(max_period)
    d_hi, d_lo = split_float(half - downscale_freq_shift)
    s_hi, s_lo = split_float(scale)
    return half, (c_hi, c_lo, d_hi, d_lo, s_hi, s_lo)


def timestep_embedding(t, dim, max_period, downscale_freq_shift, scale, flip_sin_to_cos):
    """(B, dim) embedding of pygen::timestep_embedding (float32; float64 for float64 t)."""
    b = t.shape[0]
    out_dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
    out = torch.empty((b, dim), dtype=out_dtype, device=t.device)
    if b == 0 or dim == 0:
        return out
    half, scalars = _temb_scalars(dim, max_period, downscale_freq_shift, scale, out_dtype)
    block = min(triton.next_power_of_2(dim), 1024)
    _temb_fwd_kernel[(b, triton.cdiv(dim, block))](
        t, out, dim, half, *scalars, FLIP=flip_sin_to_cos, ACC=_acc(out_dtype), BLOCK=block,
    )
    return out


@triton.jit
def _temb_bwd_kernel(
    g_ptr, t_ptr, dt_ptr, dim, half, c_hi, c_lo, d_hi, d_lo, s_hi, s_lo,
    FLIP: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    t = tl.load(t_ptr + row).to(ACC)
    acc = tl.zeros([BLOCK], ACC)
    for k0 in range(0, half, BLOCK):
        k = k0 + tl.arange(0, BLOCK)
        m = k < half
        a, sf = _temb_args(t, k, c_hi, c_lo, d_hi, d_lo, s_hi, s_lo, ACC)
        g1 = tl.load(g_ptr + row * dim + k, mask=m, other=0.0).to(ACC)
        g2 = tl.load(g_ptr + row * dim + half + k, mask=m, other=0.0).to(ACC)
        if FLIP:
            term = g2 * tl.cos(a) - g1 * tl.sin(a)
        else:
            term = g1 * tl.cos(a) - g2 * tl.sin(a)
        acc += tl.where(m, term * sf, 0.0)
    tl.store(dt_ptr + row, tl.sum(acc, axis=0).to(dt_ptr.dtype.element_ty))


def timestep_embedding_backward(grad, t, dim, max_period, downscale_freq_shift, scale, flip_sin_to_cos):
    """dL/dt (t's dtype) of pygen::timestep_embedding_backward."""
    dt = torch.empty_like(t)
    b = t.shape[0]
    if b == 0:
        return dt
    half, scalars = _temb_scalars(dim, max_period, downscale_freq_shift, scale, t.dtype)
    if half == 0:
        return dt.zero_()
    block = min(triton.next_power_of_2(half), 1024)
    _temb_bwd_kernel[(b,)](
        grad, t, dt, dim, half, *scalars, FLIP=flip_sin_to_cos,
        ACC=tl.float64 if t.dtype == torch.float64 else tl.float32, BLOCK=block,
    )
    return dt
