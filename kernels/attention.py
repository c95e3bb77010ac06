"""Triton backend of ``pygen.attention`` (ops ``pygen::attention_fwd`` / ``pygen::attention_bwd``,
registered as ``torch.ops.pygen.attention_fwd_triton`` / ``attention_bwd_triton``).

Flash-attention-2 style, q (B, H, Sq, D), k and v (B, H, Sk, D), any strides (a (B, S, H, D)
tensor passed as ``.transpose(1, 2)`` is read in place):

* forward: one program per (query block, batch, head); online softmax in fp32 with ``exp2``
  (log2(e) folded into the score scale); key blocks that are fully visible run without masks,
  the ragged last block and the causal diagonal blocks with masks; causal key blocks past the
  diagonal are skipped. Writes ``out`` (like ``torch.empty_like(q)``) and ``lse`` (B, H, Sq)
  fp32 = natural-log logsumexp of the scaled scores per query row (not allocated or written by the
  inference launch, ``need_lse=False``).
* backward (deterministic, no atomics): ``delta = rowsum(dO * O)`` (preprocess kernel), then a
  dK/dV kernel (one program per key block, looping over query blocks) and a dQ kernel (one
  program per query block, looping over key blocks); both recompute P = exp(S - lse).

Causal is top-left aligned (key j visible to query i iff j <= i), as SDPA's ``is_causal``.
Head dims 80 and 96 are padded to 128 lanes with masks. Storage fp16/bf16/fp32, arithmetic fp32;
fp32 inputs use IEEE fp32 dots (no TF32), so the kernel can be checked tightly in fp32.

Block sizes are autotuned per (head dim, sequence-length buckets, causal, dtype): the real head dim
D is the key, so 80, 96 and 128 (all padded to BLOCK_D = 128) each get their own tuned entry; the
candidate configs come from the padded head-dim class. Under TRITON_INTERPRET=1 there is a single
small config so tests do not multiply their time.
"""
import os

import torch
import triton
import triton.language as tl

HEAD_DIMS = (32, 64, 80, 96, 128, 256)  # tuned; any head dim in [MIN_HEAD_DIM, MAX_HEAD_DIM] runs
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 256  # padded to the next power of two (tl.dot needs K >= 16)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# PYGEN_TRITON_AUTOTUNE=0: take the first listed config per head-dim class instead of timing them all
# (the GPU test run uses it: same code paths, a fraction of the compiles, no timing noise).
AUTOTUNE = os.environ.get("PYGEN_TRITON_AUTOTUNE", "1") != "0"


# ---------------------------------------------------------------------------
# autotuning configurations
# ---------------------------------------------------------------------------
def _seq_bucket(n):
    """Sequence-length bucket for the autotuning key: next power of two, clamped to [16, 16384]."""
    return min(max(triton.next_power_of_2(n), 16), 16384)


def _cfg(bm, bn, warps, stages):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)


if INTERPRET:
    # One small config: exercises several blocks and every mask at tiny test sizes, no tuning.
    _FWD_CONFIGS = _BWD_CONFIGS = [_cfg(16, 16, 1, 1)]
    _FWD_BY_D = _BWD_BY_D = None
else:
    # (BLOCK_M, BLOCK_N, warps, stages) per padded head dim (<= 64, 128, 256): a short list each,
    # so a new key costs a few compiles. Shared memory stays under ~100 KB (checked for sm_90).
    _FWD_BY_D = {
        64: [(128, 64, 4, 3), (128, 128, 8, 3), (128, 64, 8, 4), (64, 64, 4, 3), (128, 32, 4, 4), (64, 32, 4, 2)],
        128: [(128, 64, 8, 3), (128, 64, 4, 3), (128, 32, 4, 3), (64, 64, 4, 3), (64, 128, 4, 3), (64, 32, 4, 2)],
        256: [(64, 64, 4, 2), (64, 32, 4, 2), (128, 32, 8, 2), (64, 64, 8, 2), (32, 32, 4, 2)],
    }
    # dK/dV programs hold a key block (BLOCK_N) and loop over query blocks (BLOCK_M); dQ the reverse:
    # the list has shapes for both and each kernel tunes on its own.
    _BWD_BY_D = {
        64: [(32, 128, 4, 2), (64, 128, 8, 2), (64, 64, 4, 2), (128, 32, 4, 2), (128, 64, 8, 2), (32, 64, 4, 3)],
        128: [(32, 128, 8, 2), (64, 64, 4, 2), (64, 64, 8, 2), (128, 32, 8, 2), (32, 64, 4, 2)],
        256: [(32, 64, 4, 2), (64, 32, 4, 2), (32, 32, 4, 2), (16, 64, 4, 2)],
    }
    _FWD_CONFIGS = [_cfg(*c) for c in dict.fromkeys(c for cs in _FWD_BY_D.values() for c in cs)]
    _BWD_CONFIGS = [_cfg(*c) for c in dict.fromkeys(c for cs in _BWD_BY_D.values() for c in cs)]


def _d_class(block_d):
    return 64 if block_d <= 64 else block_d


def _select_configs(configs, table, block_d, max_m=None):
    if table is None:
        return configs
    wanted = table[_d_class(block_d)]
    kept = [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in wanted]
    if max_m is not None:
        kept = [c for c in kept if c.kwargs["BLOCK_M"] <= max_m] or kept
    return kept if AUTOTUNE else kept[:1]


def _prune_fwd(configs, named_args, **kwargs):
    block_d = kwargs.get("BLOCK_D", named_args.get("BLOCK_D"))
    # Short query sequences: blocks of 128 queries would mostly be padding.
    max_m = max(named_args.get("SQ_BUCKET", 1 << 20), 64)
    return _select_configs(configs, _FWD_BY_D, block_d, max_m)


def _prune_bwd(configs, named_args, **kwargs):
    return _select_configs(configs, _BWD_BY_D, kwargs.get("BLOCK_D", named_args.get("BLOCK_D")))


# The real head dim D, not the padded BLOCK_D (a function of D): 80, 96 and 128 share BLOCK_D = 128 but
# tune differently (masked lanes, memory traffic). The autotuner adds the tensors' dtypes.
_KEY = ["D", "SQ_BUCKET", "SK_BUCKET", "CAUSAL"]


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------
@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    """fp32-accumulating dot. IEEE: 0 native (fp16/bf16 tensor cores), 1 fp32 without TF32,
    2 operands upcast to fp32 first (bf16 under the interpreter, whose bf16 ``tl.dot`` is wrong)."""
    if IEEE == 2:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif IEEE == 1:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


def _dot_mode(dtype):
    if dtype == torch.float32:
        return 1
    if dtype == torch.bfloat16 and INTERPRET:
        return 2
    return 0


@triton.jit
def _load_rows(base, rows, offs_d, stride_s, stride_d, n_rows, D: tl.constexpr, BLOCK_D: tl.constexpr,
               MASK_ROWS: tl.constexpr):
    """A (rows, BLOCK_D) tile; rows >= n_rows (when MASK_ROWS) and lanes >= D read as 0."""
    # int64 row offsets: S · stride_s exceeds 2**31 for long (B, S, H, D) sequences.
    ptrs = base + rows.to(tl.int64)[:, None] * stride_s + offs_d[None, :] * stride_d
    if MASK_ROWS:
        if BLOCK_D == D:
            t = tl.load(ptrs, mask=(rows < n_rows)[:, None], other=0.0)
        else:
            t = tl.load(ptrs, mask=(rows < n_rows)[:, None] & (offs_d < D)[None, :], other=0.0)
    else:
        if BLOCK_D == D:
            t = tl.load(ptrs)
        else:
            t = tl.load(ptrs, mask=(offs_d < D)[None, :], other=0.0)
    return t


@triton.jit
def _store_rows(base, value, rows, offs_d, stride_s, stride_d, n_rows, D: tl.constexpr, BLOCK_D: tl.constexpr):
    ptrs = base + rows.to(tl.int64)[:, None] * stride_s + offs_d[None, :] * stride_d
    if BLOCK_D == D:
        tl.store(ptrs, value, mask=(rows < n_rows)[:, None])
    else:
        tl.store(ptrs, value, mask=(rows < n_rows)[:, None] & (offs_d < D)[None, :])


# ---------------------------------------------------------------------------
# forward
# ---------------------------------------------------------------------------
@triton.jit
def _fwd_block(acc, l_i, m_i, q, k_base, v_base, rows, offs_n, offs_d, stride_kn, stride_kd, stride_vn,
               stride_vd, SK, qk_scale, lo, hi,
               MASK: tl.constexpr, CAUSAL: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
               BLOCK_N: tl.constexpr, IEEE: tl.constexpr):
    """Online-softmax update of (acc, l_i, m_i) over key blocks [lo, hi); scores in log2 units."""
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        # k is read transposed: (BLOCK_D, BLOCK_N)
        k_ptrs = k_base + cols.to(tl.int64)[None, :] * stride_kn + offs_d[:, None] * stride_kd
        if MASK:
            if BLOCK_D == D:
                k = tl.load(k_ptrs, mask=(cols < SK)[None, :], other=0.0)
            else:
                k = tl.load(k_ptrs, mask=(cols < SK)[None, :] & (offs_d < D)[:, None], other=0.0)
        else:
            if BLOCK_D == D:
                k = tl.load(k_ptrs)
            else:
                k = tl.load(k_ptrs, mask=(offs_d < D)[:, None], other=0.0)
        s = _dot(q, k, IEEE) * qk_scale
        if MASK:
            visible = (cols < SK)[None, :]
            if CAUSAL:
                visible = visible & (cols[None, :] <= rows[:, None])
            s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_rows(v_base, cols, offs_d, stride_vn, stride_vd, SK, D, BLOCK_D, MASK)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)
        m_i = m_new
    return acc, l_i, m_i


@triton.autotune(configs=_FWD_CONFIGS, key=_KEY, prune_configs_by={"early_config_prune": _prune_fwd},
                 cache_results=True)
@triton.jit(do_not_specialize=["SQ_BUCKET", "SK_BUCKET"])
def _attn_fwd_kernel(Q, K, V, O, LSE,
                     sqb, sqh, sqs, sqd, skb, skh, sks, skd, svb, svh, svs, svd, sob, soh, sos, sod,
                     slb, slh, sls,
                     SQ, SK, qk_scale, SQ_BUCKET, SK_BUCKET,
                     D: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, IEEE: tl.constexpr,
                     STORE_LSE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    if CAUSAL:  # the heaviest (last) query blocks first
        pid_m = tl.num_programs(0) - 1 - pid_m
    b = tl.program_id(1).to(tl.int64)
    h = tl.program_id(2).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_rows(Q + b * sqb + h * sqh, rows, offs_d, sqs, sqd, SQ, D, BLOCK_D, True)
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # Key blocks [0, full) need no mask: inside Sk and (causal) visible to every row of this block.
    if CAUSAL:
        hi = tl.minimum(SK, (pid_m + 1) * BLOCK_M)
        full = tl.minimum(((pid_m * BLOCK_M + 1) // BLOCK_N) * BLOCK_N, (SK // BLOCK_N) * BLOCK_N)
    else:
        hi = SK
        full = (SK // BLOCK_N) * BLOCK_N
    acc, l_i, m_i = _fwd_block(acc, l_i, m_i, q, k_base, v_base, rows, offs_n, offs_d, sks, skd, svs, svd,
                               SK, qk_scale, 0, full, False, CAUSAL, D, BLOCK_D, BLOCK_N, IEEE)
    acc, l_i, m_i = _fwd_block(acc, l_i, m_i, q, k_base, v_base, rows, offs_n, offs_d, sks, skd, svs, svd,
                               SK, qk_scale, full, hi, True, CAUSAL, D, BLOCK_D, BLOCK_N, IEEE)
    out = acc / l_i[:, None]
    _store_rows(O + b * sob + h * soh, out.to(O.dtype.element_ty), rows, offs_d, sos, sod, SQ, D, BLOCK_D)
    if STORE_LSE:
        lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453  # log2 -> natural log
        tl.store(LSE + b * slb + h * slh + rows.to(tl.int64) * sls, lse, mask=rows < SQ)


# ---------------------------------------------------------------------------
# backward
# ---------------------------------------------------------------------------
@triton.jit
def _bwd_delta_kernel(O, DO, DELTA, sob, soh, sos, sod, sgb, sgh, sgs, sgd, SQ, H,
                      D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta[b, h, i] = sum_d dO[b, h, i, d] * O[b, h, i, d] (fp32); delta is contiguous (B, H, Sq)."""
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    h = tl.program_id(2).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    o = _load_rows(O + b * sob + h * soh, rows, offs_d, sos, sod, SQ, D, BLOCK_D, True).to(tl.float32)
    do = _load_rows(DO + b * sgb + h * sgh, rows, offs_d, sgs, sgd, SQ, D, BLOCK_D, True).to(tl.float32)
    tl.store(DELTA + (b * H + h) * SQ + rows, tl.sum(o * do, 1), mask=rows < SQ)


@triton.autotune(configs=_BWD_CONFIGS, key=_KEY, prune_configs_by={"early_config_prune": _prune_bwd},
                 cache_results=True)
@triton.jit(do_not_specialize=["SQ_BUCKET", "SK_BUCKET"])
def _attn_bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV,
                          sqb, sqh, sqs, sqd, skb, skh, sks, skd, svb, svh, svs, svd, sgb, sgh, sgs, sgd,
                          slb, slh, sls, sdkb, sdkh, sdks, sdkd, sdvb, sdvh, sdvs, sdvd,
                          SQ, SK, H, sm_scale, qk_scale, SQ_BUCKET, SK_BUCKET,
                          D: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, IEEE: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program per key block: dV = P^T dO, dK = scale * dS^T Q over the query blocks that see it."""
    pid_n = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    h = tl.program_id(2).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    k = _load_rows(K + b * skb + h * skh, cols, offs_d, sks, skd, SK, D, BLOCK_D, True)
    v = _load_rows(V + b * svb + h * svh, cols, offs_d, svs, svd, SK, D, BLOCK_D, True)
    q_base = Q + b * sqb + h * sqh
    do_base = DO + b * sgb + h * sgh
    lse_base = LSE + b * slb + h * slh
    delta_base = DELTA + (b * H + h) * SQ
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    lo = 0
    if CAUSAL:  # queries before this key block see none of it
        lo = ((pid_n * BLOCK_N) // BLOCK_M) * BLOCK_M
    for start_m in range(lo, SQ, BLOCK_M):
        rows = start_m + offs_m
        row_ok = rows < SQ
        q = _load_rows(q_base, rows, offs_d, sqs, sqd, SQ, D, BLOCK_D, True)
        do = _load_rows(do_base, rows, offs_d, sgs, sgd, SQ, D, BLOCK_D, True)
        lse2 = tl.load(lse_base + rows.to(tl.int64) * sls, mask=row_ok, other=0.0) * 1.4426950408889634
        delta = tl.load(delta_base + rows, mask=row_ok, other=0.0)
        st = _dot(k, tl.trans(q), IEEE) * qk_scale  # (BLOCK_N, BLOCK_M), log2 units
        pt = tl.math.exp2(st - lse2[None, :])
        visible = row_ok[None, :] & (cols < SK)[:, None]
        if CAUSAL:
            visible = visible & (cols[:, None] <= rows[None, :])
        pt = tl.where(visible, pt, 0.0)
        dv += _dot(pt.to(do.dtype), do, IEEE)
        dpt = _dot(v, tl.trans(do), IEEE)
        dst = pt * (dpt - delta[None, :])
        dk += _dot(dst.to(q.dtype), q, IEEE)
    dk = dk * sm_scale
    _store_rows(DK + b * sdkb + h * sdkh, dk.to(DK.dtype.element_ty), cols, offs_d, sdks, sdkd, SK, D, BLOCK_D)
    _store_rows(DV + b * sdvb + h * sdvh, dv.to(DV.dtype.element_ty), cols, offs_d, sdvs, sdvd, SK, D, BLOCK_D)


@triton.autotune(configs=_BWD_CONFIGS, key=_KEY, prune_configs_by={"early_config_prune": _prune_bwd},
                 cache_results=True)
@triton.jit(do_not_specialize=["SQ_BUCKET", "SK_BUCKET"])
def _attn_bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ,
                        sqb, sqh, sqs, sqd, skb, skh, sks, skd, svb, svh, svs, svd, sgb, sgh, sgs, sgd,
                        slb, slh, sls, sdqb, sdqh, sdqs, sdqd,
                        SQ, SK, H, sm_scale, qk_scale, SQ_BUCKET, SK_BUCKET,
                        D: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, IEEE: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program per query block: dQ = scale * dS K over the key blocks it sees."""
    pid_m = tl.program_id(0)
    if CAUSAL:
        pid_m = tl.num_programs(0) - 1 - pid_m
    b = tl.program_id(1).to(tl.int64)
    h = tl.program_id(2).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < SQ
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_rows(Q + b * sqb + h * sqh, rows, offs_d, sqs, sqd, SQ, D, BLOCK_D, True)
    do = _load_rows(DO + b * sgb + h * sgh, rows, offs_d, sgs, sgd, SQ, D, BLOCK_D, True)
    lse2 = tl.load(LSE + b * slb + h * slh + rows.to(tl.int64) * sls, mask=row_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + (b * H + h) * SQ + rows, mask=row_ok, other=0.0)
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    hi = SK
    if CAUSAL:
        hi = tl.minimum(SK, (pid_m + 1) * BLOCK_M)
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        k = _load_rows(k_base, cols, offs_d, sks, skd, SK, D, BLOCK_D, True)
        v = _load_rows(v_base, cols, offs_d, svs, svd, SK, D, BLOCK_D, True)
        s = _dot(q, tl.trans(k), IEEE) * qk_scale
        p = tl.math.exp2(s - lse2[:, None])
        visible = row_ok[:, None] & (cols < SK)[None, :]
        if CAUSAL:
            visible = visible & (cols[None, :] <= rows[:, None])
        p = tl.where(visible, p, 0.0)
        dp = _dot(do, tl.trans(v), IEEE)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(k.dtype), k, IEEE)
    dq = dq * sm_scale
    _store_rows(DQ + b * sdqb + h * sdqh, dq.to(DQ.dtype.element_ty), rows, offs_d, sdqs, sdqd, SQ, D, BLOCK_D)


# ---------------------------------------------------------------------------
# launchers (the eager hot path calls these directly)
# ---------------------------------------------------------------------------
def _check(q, k, v):
    if q.dtype not in DTYPES:
        raise TypeError(f"q must have dtype float16, bfloat16 or float32 on the triton backend, got {q.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k and v must have one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    d = q.shape[-1]
    if not MIN_HEAD_DIM <= d <= MAX_HEAD_DIM:
        raise ValueError(f"head dim (q.shape[-1]) must be in [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}] on the triton backend, "
                         f"got {d}")
    if k.shape[-1] != d or v.shape[-1] != d:
        raise ValueError(f"q, k and v must have one head dim, got {d}, {k.shape[-1]}, {v.shape[-1]}")


def _grid_m(n):
    def grid(meta):
        return (triton.cdiv(n[0], meta["BLOCK_M"]), n[1], n[2])

    return grid


def _grid_n(n):
    def grid(meta):
        return (triton.cdiv(n[0], meta["BLOCK_N"]), n[1], n[2])

    return grid


def attention_fwd(q, k, v, scale, causal, need_lse=True):
    """(out, lse) for q (B, H, Sq, D), k, v (B, H, Sk, D); see the module docstring.

    ``need_lse=False`` (inference): lse is neither allocated nor written and None is returned for it.
    """
    _check(q, k, v)
    B, H, SQ, D = q.shape
    SK = k.shape[2]
    out = torch.empty_like(q)
    lse = torch.empty((B, H, SQ), device=q.device, dtype=torch.float32) if need_lse else None
    if out.numel() == 0:
        return out, lse
    if SK == 0:
        raise ValueError("k and v must have at least one key (Sk >= 1)")
    lse_strides = lse.stride() if need_lse else (0, 0, 0)
    _attn_fwd_kernel[_grid_m((SQ, B, H))](
        q, k, v, out, lse if need_lse else out, *q.stride(), *k.stride(), *v.stride(), *out.stride(), *lse_strides,
        SQ, SK, float(scale) * LOG2E, _seq_bucket(SQ), _seq_bucket(SK),
        D=D, BLOCK_D=triton.next_power_of_2(D), CAUSAL=bool(causal), IEEE=_dot_mode(q.dtype), STORE_LSE=need_lse)
    return out, lse


def attention_bwd(grad_out, q, k, v, out, lse, scale, causal):
    """(dq, dk, dv), each like its input (``torch.empty_like``)."""
    _check(q, k, v)
    B, H, SQ, D = q.shape
    SK = k.shape[2]
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if dq.numel() == 0 or dk.numel() == 0:
        if dk.numel():
            dk.zero_()
            dv.zero_()
        return dq, dk, dv
    block_d = triton.next_power_of_2(D)
    delta = torch.empty((B, H, SQ), device=q.device, dtype=torch.float32)
    block_m_delta = 16 if INTERPRET else 64
    _bwd_delta_kernel[(triton.cdiv(SQ, block_m_delta), B, H)](
        out, grad_out, delta, *out.stride(), *grad_out.stride(), SQ, H, D=D, BLOCK_D=block_d, BLOCK_M=block_m_delta)
    common = (*q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *lse.stride())
    consts = dict(D=D, BLOCK_D=block_d, CAUSAL=bool(causal), IEEE=_dot_mode(q.dtype))
    tail = (SQ, SK, H, float(scale), float(scale) * LOG2E, _seq_bucket(SQ), _seq_bucket(SK))
    _attn_bwd_dkdv_kernel[_grid_n((SK, B, H))](
        q, k, v, grad_out, lse, delta, dk, dv, *common, *dk.stride(), *dv.stride(), *tail, **consts)
    _attn_bwd_dq_kernel[_grid_m((SQ, B, H))](
        q, k, v, grad_out, lse, delta, dq, *common, *dq.stride(), *tail, **consts)
    return dq, dk, dv
