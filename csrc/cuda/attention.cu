// csrc/cuda/attention.cu — CUDA kernels of torch.ops.pygen.attention_fwd and
// torch.ops.pygen.attention_bwd (scaled dot-product attention, pygen.attention).
//
//   attention_fwd(q, k, v, scale, causal) -> (out, lse)
//   attention_bwd(grad_out, q, k, v, out, lse, scale, causal) -> (dq, dk, dv)
//
// Conventions as the CPU kernels (csrc/cpu/attention.cpp, pygen/attention.h):
// q (B, H, Sq, D), k and v (B, H, Sk, D), any strides with a unit last stride;
// out = empty_like(q); lse (B, H, Sq) float32 natural-log logsumexp of
// scale·q·k; causal = top-left aligned (key j visible to query i iff j <= i).
//
// Forward, fp16/bf16, head dims 32/64/80/96/128/256, sm_80+: flash-attention-2
// style tensor-core kernel (attention_fwd_mma_kernel). One CTA of 4 warps per
// 64 query rows of one (b, h); each warp owns 16 query rows. K/V tiles of BN
// keys stream through shared memory with cp.async double buffering;
// S = Q·Kᵀ and O += P·V use mma.sync.m16n8k16 (fp32 accumulation) with
// operands from ldmatrix (V through ldmatrix.trans); the online softmax runs
// on the S accumulators in fp32 with exp2f, P is re-packed from the
// accumulators into the A operand of P·V without touching shared memory.
// Every global load is bounds-guarded: rows past the sequence end are
// zero-filled by cp.async (src-size 0, nothing read), and scores of keys past
// Sk or above the causal diagonal are set to -inf. Causal CTAs stop at the
// diagonal tile and the heaviest CTAs are scheduled first.
//
// Everything else — fp32/fp64, head dims without an mma instantiation (up to
// 256), tensors whose rows are not 16-byte aligned, pre-sm_80 devices — and the
// backward go through simple, exact, deterministic fp32-accumulating kernels
// (one warp per query row for the forward and dQ, one warp per key row for
// dK/dV; no atomics, fixed summation order).
//
// Hopper: the mma.sync kernel runs unchanged on sm_90 (at roughly 60% of the
// wgmma peak). A wgmma + TMA kernel (warp-specialised producer/consumer with
// mbarriers, 128-row tiles, S and O in wgmma register fragments) is what would
// reach cuDNN-class throughput there; it is not written because it cannot be
// run and verified in the session that wrote this file. A GPU session should
// first measure this kernel against SDPA (flash/cuDNN) per head dim, then try
// in order: larger BN for D <= 64, Q kept in registers across K/V tiles,
// splitting the K and V cp.async groups (S = Q·Kᵀ of tile t+1 overlapping the
// V load), and only then a wgmma port.
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <atomic>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>
#include <utility>

#include "cuda_common.cuh"
#include "../attention_checks.h"
#include "pygen/attention.h"

namespace pygen::cuda {
namespace {

namespace attn = pygen::attention;

// Largest head dim the CUDA kernels take (checked in attention_checks.h).
constexpr int64_t kMaxHeadDim = 256;

// (B, H, S, D) strides of a tensor with a unit last stride.
struct Strides {
  int64_t b, h, s;
};
Strides strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

constexpr float kLn2F = static_cast<float>(attn::kLn2);

__device__ __forceinline__ float exp2_acc(float x) { return exp2f(x); }
__device__ __forceinline__ double exp2_acc(double x) { return exp2(x); }
__device__ __forceinline__ float log2_acc(float x) { return log2f(x); }
__device__ __forceinline__ double log2_acc(double x) { return log2(x); }

template <typename T>
__device__ __forceinline__ T neg_inf() {
  return -std::numeric_limits<T>::infinity();
}

template <typename T>
__device__ __forceinline__ T warp_sum(T x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// Max over the warp of values that are never NaN (callers map NaN to -inf
// first, so every lane gets the same result).
template <typename T>
__device__ __forceinline__ T warp_max(T x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const T y = __shfl_xor_sync(0xffffffffu, x, o);
    x = y > x ? y : x;
  }
  return x;
}

// ===========================================================================
// Simple kernels: any dtype, any head dim <= 256, any alignment.
// One warp per row; lane L handles head dims L, L + 32, ... (kPerLane of them).
// ===========================================================================
constexpr int kSimpleWarps = 4;
constexpr int kPerLane = 8;  // 8 · 32 = 256 head dims
static_assert(kPerLane * 32 == kMaxHeadDim, "the simple kernels cover every head dim the checks let through");
constexpr int kMaxD = kPerLane * 32;

struct SimpleParams {
  const void* q;
  const void* k;
  const void* v;
  const void* dout;  // backward only
  const void* out;   // backward (delta) only
  const float* lse;  // backward only
  Strides qs, ks, vs, dos, os;
  int64_t ls_b, ls_h, ls_s;  // lse strides (backward)
  int64_t B, H, Sq, Sk, D;
  double scale;
  bool causal;
};

// This warp's row of a (B, H, S) grid of rows, kSimpleWarps warps per block:
// row = bh·S + i with bh = b·H + h. The caller returns when row >= B·H·S.
struct WarpRow {
  int warp, lane;
  int64_t row, bh, i, b, h;
};
__device__ __forceinline__ WarpRow warp_row(int64_t H, int64_t S) {
  WarpRow r;
  r.warp = threadIdx.x >> 5;
  r.lane = threadIdx.x & 31;
  r.row = static_cast<int64_t>(blockIdx.x) * kSimpleWarps + r.warp;
  r.bh = r.row / S;
  r.i = r.row - r.bh * S;
  r.b = r.bh / H;
  r.h = r.bh - r.b * H;
  return r;
}

// Row 0 of head (b, h) of a (B, H, S, D) tensor with strides s.
template <typename scalar_t>
__device__ __forceinline__ const scalar_t* head_base(const void* t, Strides s, int64_t b, int64_t h) {
  return static_cast<const scalar_t*>(t) + b * s.b + h * s.h;
}
template <typename scalar_t>
__device__ __forceinline__ scalar_t* head_base(scalar_t* t, Strides s, int64_t b, int64_t h) {
  return t + b * s.b + h * s.h;
}

// Two rows of D values copied (as acc) to this warp's shared rows sa and sb.
template <typename acc, typename scalar_t>
__device__ __forceinline__ void stage_rows(acc* sa, const scalar_t* a, acc* sb, const scalar_t* b, int D, int lane) {
  for (int d = lane; d < D; d += 32) {
    sa[d] = static_cast<acc>(a[d]);
    sb[d] = static_cast<acc>(b[d]);
  }
  __syncwarp();
}

// dst[d] = v[c]·mul for this lane's head dims d = lane + 32·c < D.
template <typename scalar_t, typename acc>
__device__ __forceinline__ void store_lane_dims(scalar_t* dst, const acc (&v)[kPerLane], acc mul, int D, int lane) {
#pragma unroll
  for (int c = 0; c < kPerLane; ++c) {
    const int d = lane + 32 * c;
    if (d < D) dst[d] = static_cast<scalar_t>(v[c] * mul);
  }
}

// Forward: warp per query row. Scores of 32 keys at a time, one key per lane
// (full dot product against the query row kept in shared memory); the online
// softmax over those 32; then each lane accumulates its head dims over the 32
// keys in order (p broadcast by shuffle).
template <typename scalar_t>
__global__ void __launch_bounds__(kSimpleWarps * 32)
    attention_fwd_simple_kernel(SimpleParams p, scalar_t* __restrict__ out, Strides out_s, float* __restrict__ lse) {
  using acc = acc_t<scalar_t>;
  __shared__ acc s_q[kSimpleWarps][kMaxD];
  const auto [warp, lane, row, bh, i, b, h] = warp_row(p.H, p.Sq);
  if (row >= p.B * p.H * p.Sq) return;  // whole warp leaves together; no block barrier below
  const scalar_t* q = head_base<scalar_t>(p.q, p.qs, b, h) + i * p.qs.s;
  const scalar_t* kbase = head_base<scalar_t>(p.k, p.ks, b, h);
  const scalar_t* vbase = head_base<scalar_t>(p.v, p.vs, b, h);
  const int D = static_cast<int>(p.D);
  const acc scale2 = static_cast<acc>(p.scale * attn::kLog2e);
  for (int d = lane; d < D; d += 32) s_q[warp][d] = static_cast<acc>(q[d]) * scale2;
  __syncwarp();

  acc o[kPerLane];
#pragma unroll
  for (int c = 0; c < kPerLane; ++c) o[c] = 0;
  acc m = neg_inf<acc>(), l = 0;
  const int64_t kend = p.causal ? (i + 1 < p.Sk ? i + 1 : p.Sk) : p.Sk;
  for (int64_t j0 = 0; j0 < kend; j0 += 32) {
    const int64_t j = j0 + lane;
    acc s = neg_inf<acc>();
    if (j < kend) {
      const scalar_t* kr = kbase + j * p.ks.s;
      acc dot = 0;
      for (int d = 0; d < D; ++d) dot += s_q[warp][d] * static_cast<acc>(kr[d]);
      s = dot;
    }
    const acc s_max = s == s ? s : neg_inf<acc>();  // NaN takes no part in the max (p stays NaN)
    const acc mx = warp_max(s_max > m ? s_max : m);
    const acc sub = mx == neg_inf<acc>() ? acc(0) : mx;
    const acc pj = j < kend ? exp2_acc(s - sub) : acc(0);  // NaN scores stay NaN
    const acc alpha = m == mx ? acc(1) : exp2_acc(m - sub);
    l = l * alpha + warp_sum(pj);
#pragma unroll
    for (int c = 0; c < kPerLane; ++c) o[c] *= alpha;
    const int n = static_cast<int>(kend - j0 < 32 ? kend - j0 : 32);
    for (int jj = 0; jj < n; ++jj) {
      const acc pjj = __shfl_sync(0xffffffffu, pj, jj);
      const scalar_t* vr = vbase + (j0 + jj) * p.vs.s;
#pragma unroll
      for (int c = 0; c < kPerLane; ++c) {
        const int d = lane + 32 * c;
        if (d < D) o[c] += pjj * static_cast<acc>(vr[d]);
      }
    }
    m = mx;
  }
  store_lane_dims(head_base(out, out_s, b, h) + i * out_s.s, o, acc(1) / l, D, lane);
  if (lane == 0) lse[row] = static_cast<float>((m + log2_acc(l)) * static_cast<acc>(attn::kLn2));
}

// delta[row] = sum_d dO·O (acc_t), warp per query row.
template <typename scalar_t>
__global__ void __launch_bounds__(kSimpleWarps * 32)
    attention_delta_kernel(SimpleParams p, acc_t<scalar_t>* __restrict__ delta) {
  using acc = acc_t<scalar_t>;
  const auto [warp, lane, row, bh, i, b, h] = warp_row(p.H, p.Sq);
  if (row >= p.B * p.H * p.Sq) return;
  const scalar_t* g = head_base<scalar_t>(p.dout, p.dos, b, h) + i * p.dos.s;
  const scalar_t* o = head_base<scalar_t>(p.out, p.os, b, h) + i * p.os.s;
  acc s = 0;
  for (int64_t d = lane; d < p.D; d += 32) s += static_cast<acc>(g[d]) * static_cast<acc>(o[d]);
  s = warp_sum(s);
  if (lane == 0) delta[row] = s;
}

// dK, dV: warp per key row j, over the queries that see it, 32 at a time (one
// query per lane for the two dot products, then in order for the sums).
template <typename scalar_t>
__global__ void __launch_bounds__(kSimpleWarps * 32)
    attention_dkdv_kernel(SimpleParams p, const acc_t<scalar_t>* __restrict__ delta, scalar_t* __restrict__ dk,
                          Strides dk_s, scalar_t* __restrict__ dv, Strides dv_s) {
  using acc = acc_t<scalar_t>;
  __shared__ acc s_k[kSimpleWarps][kMaxD];
  __shared__ acc s_v[kSimpleWarps][kMaxD];
  const auto [warp, lane, row, bh, j, b, h] = warp_row(p.H, p.Sk);
  if (row >= p.B * p.H * p.Sk) return;
  const int D = static_cast<int>(p.D);
  stage_rows(s_k[warp], head_base<scalar_t>(p.k, p.ks, b, h) + j * p.ks.s, s_v[warp],
             head_base<scalar_t>(p.v, p.vs, b, h) + j * p.vs.s, D, lane);
  const scalar_t* qbase = head_base<scalar_t>(p.q, p.qs, b, h);
  const scalar_t* gbase = head_base<scalar_t>(p.dout, p.dos, b, h);
  const acc scale2 = static_cast<acc>(p.scale * attn::kLog2e);
  const acc log2e = static_cast<acc>(attn::kLog2e);
  acc gk[kPerLane], gv[kPerLane];
#pragma unroll
  for (int c = 0; c < kPerLane; ++c) gk[c] = gv[c] = 0;
  for (int64_t i0 = attn::query_begin(j, p.causal); i0 < p.Sq; i0 += 32) {
    const int64_t i = i0 + lane;
    acc pij = 0, dsij = 0;
    if (i < p.Sq) {
      const scalar_t* qr = qbase + i * p.qs.s;
      const scalar_t* gr = gbase + i * p.dos.s;
      acc s = 0, dp = 0;
      for (int d = 0; d < D; ++d) {
        s += static_cast<acc>(qr[d]) * s_k[warp][d];
        dp += static_cast<acc>(gr[d]) * s_v[warp][d];
      }
      const acc lse2 = static_cast<acc>(p.lse[b * p.ls_b + h * p.ls_h + i * p.ls_s]) * log2e;
      pij = exp2_acc(s * scale2 - lse2);
      dsij = pij * (dp - delta[bh * p.Sq + i]);
    }
    const int n = static_cast<int>(p.Sq - i0 < 32 ? p.Sq - i0 : 32);
    for (int ii = 0; ii < n; ++ii) {
      const acc pi = __shfl_sync(0xffffffffu, pij, ii);
      const acc dsi = __shfl_sync(0xffffffffu, dsij, ii);
      const scalar_t* qr = qbase + (i0 + ii) * p.qs.s;
      const scalar_t* gr = gbase + (i0 + ii) * p.dos.s;
#pragma unroll
      for (int c = 0; c < kPerLane; ++c) {
        const int d = lane + 32 * c;
        if (d < D) {
          gv[c] += pi * static_cast<acc>(gr[d]);
          gk[c] += dsi * static_cast<acc>(qr[d]);
        }
      }
    }
  }
  store_lane_dims(head_base(dk, dk_s, b, h) + j * dk_s.s, gk, static_cast<acc>(p.scale), D, lane);
  store_lane_dims(head_base(dv, dv_s, b, h) + j * dv_s.s, gv, acc(1), D, lane);
}

// dQ: warp per query row i, over its visible keys, 32 at a time.
template <typename scalar_t>
__global__ void __launch_bounds__(kSimpleWarps * 32)
    attention_dq_kernel(SimpleParams p, const acc_t<scalar_t>* __restrict__ delta, scalar_t* __restrict__ dq,
                        Strides dq_s) {
  using acc = acc_t<scalar_t>;
  __shared__ acc s_q[kSimpleWarps][kMaxD];
  __shared__ acc s_g[kSimpleWarps][kMaxD];
  const auto [warp, lane, row, bh, i, b, h] = warp_row(p.H, p.Sq);
  if (row >= p.B * p.H * p.Sq) return;
  const int D = static_cast<int>(p.D);
  stage_rows(s_q[warp], head_base<scalar_t>(p.q, p.qs, b, h) + i * p.qs.s, s_g[warp],
             head_base<scalar_t>(p.dout, p.dos, b, h) + i * p.dos.s, D, lane);
  const scalar_t* kbase = head_base<scalar_t>(p.k, p.ks, b, h);
  const scalar_t* vbase = head_base<scalar_t>(p.v, p.vs, b, h);
  const acc scale2 = static_cast<acc>(p.scale * attn::kLog2e);
  const acc lse2 = static_cast<acc>(p.lse[b * p.ls_b + h * p.ls_h + i * p.ls_s]) * static_cast<acc>(attn::kLog2e);
  const acc di = delta[row];
  acc gq[kPerLane];
#pragma unroll
  for (int c = 0; c < kPerLane; ++c) gq[c] = 0;
  const int64_t kend = p.causal ? (i + 1 < p.Sk ? i + 1 : p.Sk) : p.Sk;
  for (int64_t j0 = 0; j0 < kend; j0 += 32) {
    const int64_t j = j0 + lane;
    acc dsj = 0;
    if (j < kend) {
      const scalar_t* kr = kbase + j * p.ks.s;
      const scalar_t* vr = vbase + j * p.vs.s;
      acc s = 0, dp = 0;
      for (int d = 0; d < D; ++d) {
        s += s_q[warp][d] * static_cast<acc>(kr[d]);
        dp += s_g[warp][d] * static_cast<acc>(vr[d]);
      }
      dsj = exp2_acc(s * scale2 - lse2) * (dp - di);
    }
    const int n = static_cast<int>(kend - j0 < 32 ? kend - j0 : 32);
    for (int jj = 0; jj < n; ++jj) {
      const acc dsjj = __shfl_sync(0xffffffffu, dsj, jj);
      const scalar_t* kr = kbase + (j0 + jj) * p.ks.s;
#pragma unroll
      for (int c = 0; c < kPerLane; ++c) {
        const int d = lane + 32 * c;
        if (d < D) gq[c] += dsjj * static_cast<acc>(kr[d]);
      }
    }
  }
  store_lane_dims(head_base(dq, dq_s, b, h) + i * dq_s.s, gq, static_cast<acc>(p.scale), D, lane);
}

unsigned int simple_blocks(int64_t rows) {
  const int64_t b = (rows + kSimpleWarps - 1) / kSimpleWarps;
  TORCH_CHECK(b <= 0x7fffffff, "pygen: attention problem too large for one launch (", rows, " rows)");
  return static_cast<unsigned int>(b > 0 ? b : 1);
}

SimpleParams simple_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale, bool causal) {
  SimpleParams p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.qs = strides_of(q);
  p.ks = strides_of(k);
  p.vs = strides_of(v);
  p.B = q.size(0);
  p.H = q.size(1);
  p.Sq = q.size(2);
  p.Sk = k.size(2);
  p.D = q.size(3);
  p.scale = scale;
  p.causal = causal;
  return p;
}

// ===========================================================================
// Tensor-core forward (fp16 / bf16, sm_80+).
// ===========================================================================
constexpr int kMmaWarps = 4;
constexpr int kMmaThreads = kMmaWarps * 32;
constexpr int kBlockM = 16 * kMmaWarps;  // 64 query rows per CTA, 16 per warp

// Tile shape per head dim. Shared memory: Q (64 rows) + 2 stages × (K + V)
// (BN rows each), rows of D + 8 elements (the 16-byte pad puts the 8 rows an
// ldmatrix reads in 8 different bank groups). All supported D are multiples of
// 16 (80 = 5·16, 96 = 6·16), so every mma k-step and every 8-column ldmatrix
// tile lies inside the head dim: no zero padding of D is needed.
template <int D>
struct FwdTile {
  static_assert(D % 16 == 0 && D <= 256, "head dim must be a multiple of 16, at most 256");
  static constexpr int BN = D <= 128 ? 64 : 32;  // keys per tile (D = 256: fits 164 KB smem of sm_80)
  static constexpr int LDS = D + 8;              // smem row stride, elements
  static constexpr int Q_ELEMS = kBlockM * LDS;
  static constexpr int KV_ELEMS = BN * LDS;
  static constexpr int SMEM_BYTES = (Q_ELEMS + 4 * KV_ELEMS) * 2;
};

struct MmaParams {
  const uint16_t* q;
  const uint16_t* k;
  const uint16_t* v;
  uint16_t* out;
  float* lse;
  Strides qs, ks, vs, os;
  int64_t H, Sq, Sk;
  int64_t num_qblocks;
  float scale2;  // scale · log2 e
  bool causal;
};

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copy; src_bytes 0 zero-fills dst and reads nothing.
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t addr, uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(addr)
               : "memory");
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t addr, uint32_t& r0, uint32_t& r1, uint32_t& r2,
                                                  uint32_t& r3) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(addr)
               : "memory");
}

// d (16×8 fp32) += a (16×16, row) · b (16×8, col).
template <bool BF16>
__device__ __forceinline__ void mma_16816(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                          uint32_t b0, uint32_t b1) {
  if constexpr (BF16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
}

// Two fp32 values as one .b32 of two fp16/bf16 (lo = element with the lower column).
template <bool BF16>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  uint32_t u;
  if constexpr (BF16) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    memcpy(&u, &h, 4);
  } else {
    const __half2 h = __floats2half2_rn(lo, hi);
    memcpy(&u, &h, 4);
  }
  return u;
}

// Copy rows [0, ROWS) of a tile (row r at base + r·row_stride, D elements) into
// shared memory (row stride LDS); rows >= valid_rows are zero-filled without
// reading global memory.
template <int ROWS, int D, int LDS>
__device__ __forceinline__ void load_tile_async(uint16_t* smem, const uint16_t* base, int64_t row_stride,
                                                int64_t valid_rows) {
  constexpr int kChunksPerRow = D / 8;  // 16-byte chunks
  constexpr int kChunks = ROWS * kChunksPerRow;
#pragma unroll
  for (int it = 0; it < (kChunks + kMmaThreads - 1) / kMmaThreads; ++it) {
    const int c = it * kMmaThreads + static_cast<int>(threadIdx.x);
    if (kChunks % kMmaThreads != 0 && c >= kChunks) break;
    const int r = c / kChunksPerRow, col = (c % kChunksPerRow) * 8;
    const bool ok = r < valid_rows;
    const uint16_t* src = ok ? base + r * row_stride + col : base;  // base: row 0 exists (S >= 1)
    cp_async_16(smem_addr(smem + r * LDS + col), src, ok ? 16 : 0);
  }
}

template <int D, bool BF16>
__global__ void __launch_bounds__(kMmaThreads) attention_fwd_mma_kernel(MmaParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // the host launches this kernel only on sm_80+
#else
  using Tile = FwdTile<D>;
  constexpr int BN = Tile::BN, LDS = Tile::LDS;
  constexpr int kNT = BN / 8;  // 8-key n-tiles of S
  constexpr int kDT = D / 8;   // 8-column n-tiles of O
  extern __shared__ __align__(16) unsigned char smem_raw[];
  uint16_t* sQ = reinterpret_cast<uint16_t*>(smem_raw);
  uint16_t* sK = sQ + Tile::Q_ELEMS;       // stage s: sK + s · KV_ELEMS
  uint16_t* sV = sK + 2 * Tile::KV_ELEMS;  // stage s: sV + s · KV_ELEMS

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, t4 = lane & 3;  // mma fragment row group / column pair
  // Heaviest (last, under causal) query blocks first.
  const int64_t bh = blockIdx.x / p.num_qblocks;
  const int64_t qb = p.num_qblocks - 1 - (blockIdx.x - bh * p.num_qblocks);
  const int64_t b = bh / p.H, h = bh - b * p.H;
  const int64_t i0 = qb * kBlockM;
  const int64_t q_end = i0 + kBlockM < p.Sq ? i0 + kBlockM : p.Sq;  // rows [i0, q_end) exist
  const int64_t kend = attn::key_end(q_end, p.Sk, p.causal);
  const int num_tiles = static_cast<int>((kend + BN - 1) / BN);

  const uint16_t* qbase = p.q + b * p.qs.b + h * p.qs.h + i0 * p.qs.s;
  const uint16_t* kbase = p.k + b * p.ks.b + h * p.ks.h;
  const uint16_t* vbase = p.v + b * p.vs.b + h * p.vs.h;

  // Prologue: Q and K/V tile 0 (keys past kend zero-filled: never read).
  load_tile_async<kBlockM, D, LDS>(sQ, qbase, p.qs.s, p.Sq - i0);
  load_tile_async<BN, D, LDS>(sK, kbase, p.ks.s, kend);
  load_tile_async<BN, D, LDS>(sV, vbase, p.vs.s, kend);
  cp_async_commit();

  float o[kDT][4];
#pragma unroll
  for (int n = 0; n < kDT; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
  // Running max (base 2, scaled) and this thread's partial row sums of rows g and g + 8.
  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.0f, 0.0f};
  const int64_t row_lo = i0 + warp * 16 + g;  // query of fragment rows g; row_lo + 8 of rows g + 8
  const uint32_t q_frag_addr = smem_addr(sQ + (warp * 16 + (lane & 15)) * LDS + (lane >> 4) * 8);

  for (int t = 0; t < num_tiles; ++t) {
    const int stage = t & 1;
    const int64_t j0 = static_cast<int64_t>(t) * BN;
    if (t + 1 < num_tiles) {  // prefetch tile t + 1 into the other stage (freed by the barrier ending t - 1)
      const int64_t j1 = j0 + BN;
      load_tile_async<BN, D, LDS>(sK + (stage ^ 1) * Tile::KV_ELEMS, kbase + j1 * p.ks.s, p.ks.s, kend - j1);
      load_tile_async<BN, D, LDS>(sV + (stage ^ 1) * Tile::KV_ELEMS, vbase + j1 * p.vs.s, p.vs.s, kend - j1);
      cp_async_commit();
      cp_async_wait<1>();  // everything but the prefetch has landed
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const uint16_t* k_tile = sK + stage * Tile::KV_ELEMS;
    const uint16_t* v_tile = sV + stage * Tile::KV_ELEMS;

    // S = Q Kᵀ (16 × BN per warp, fp32).
    float s[kNT][4];
#pragma unroll
    for (int n = 0; n < kNT; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t a0, a1, a2, a3;
      ldmatrix_x4(q_frag_addr + kk * 32, a0, a1, a2, a3);
#pragma unroll
      for (int n2 = 0; n2 < kNT / 2; ++n2) {
        // keys n2·16 + [0, 16), head dims kk·16 + [0, 16): b of n-tiles 2·n2 and 2·n2 + 1
        const int key = n2 * 16 + (lane & 7) + (lane >> 4) * 8;
        const int col = kk * 16 + ((lane >> 3) & 1) * 8;
        uint32_t b0, b1, b2, b3;
        ldmatrix_x4(smem_addr(k_tile + key * LDS + col), b0, b1, b2, b3);
        mma_16816<BF16>(s[2 * n2], a0, a1, a2, a3, b0, b1);
        mma_16816<BF16>(s[2 * n2 + 1], a0, a1, a2, a3, b2, b3);
      }
    }

    // Scale to base 2; mask keys past Sk (and past kend) and above the causal diagonal.
    const bool need_mask = j0 + BN > kend || (p.causal && j0 + BN - 1 > i0 + warp * 16);
#pragma unroll
    for (int n = 0; n < kNT; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float x = s[n][e] * p.scale2;
        if (need_mask) {
          const int64_t key = j0 + n * 8 + t4 * 2 + (e & 1);
          const int64_t query = row_lo + (e >> 1) * 8;
          if (key >= kend || !attn::key_visible(query, key, p.causal)) x = -INFINITY;
        }
        s[n][e] = x;
      }
    }

    // Online softmax on rows g (e = 0, 1) and g + 8 (e = 2, 3); the 4 threads of
    // a row group hold the row's columns, so row reductions are 2 shuffles.
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = m_run[r];  // never NaN: NaN scores never win a comparison
#pragma unroll
      for (int n = 0; n < kNT; ++n) {
        mx = s[n][2 * r] > mx ? s[n][2 * r] : mx;
        mx = s[n][2 * r + 1] > mx ? s[n][2 * r + 1] : mx;
      }
#pragma unroll
      for (int o_ = 1; o_ <= 2; o_ <<= 1) {
        const float y = __shfl_xor_sync(0xffffffffu, mx, o_);
        mx = y > mx ? y : mx;
      }
      const float sub = mx == -INFINITY ? 0.0f : mx;  // all -inf so far: p = 0, not NaN
      const float alpha = m_run[r] == mx ? 1.0f : exp2f(m_run[r] - sub);
      float sum = 0.0f;
#pragma unroll
      for (int n = 0; n < kNT; ++n) {
        s[n][2 * r] = exp2f(s[n][2 * r] - sub);
        s[n][2 * r + 1] = exp2f(s[n][2 * r + 1] - sub);
        sum += s[n][2 * r] + s[n][2 * r + 1];
      }
      l_run[r] = l_run[r] * alpha + sum;
      m_run[r] = mx;
#pragma unroll
      for (int n = 0; n < kDT; ++n) {
        o[n][2 * r] *= alpha;
        o[n][2 * r + 1] *= alpha;
      }
    }

    // O += P V: P from the S accumulators (k-step kk = n-tiles 2kk, 2kk + 1),
    // V (keys × head dims, row-major in smem) through ldmatrix.trans.
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      const uint32_t a0 = pack2<BF16>(s[2 * kk][0], s[2 * kk][1]);
      const uint32_t a1 = pack2<BF16>(s[2 * kk][2], s[2 * kk][3]);
      const uint32_t a2 = pack2<BF16>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
      const uint32_t a3 = pack2<BF16>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
      for (int n2 = 0; n2 < kDT / 2; ++n2) {
        // keys kk·16 + [0, 16), head dims n2·16 + [0, 16): b of d-tiles 2·n2 and 2·n2 + 1
        const int key = kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
        const int col = n2 * 16 + (lane >> 4) * 8;
        uint32_t b0, b1, b2, b3;
        ldmatrix_x4_trans(smem_addr(v_tile + key * LDS + col), b0, b1, b2, b3);
        mma_16816<BF16>(o[2 * n2], a0, a1, a2, a3, b0, b1);
        mma_16816<BF16>(o[2 * n2 + 1], a0, a1, a2, a3, b2, b3);
      }
    }
    __syncthreads();  // this stage is overwritten by the prefetch of iteration t + 1
  }

  // Epilogue: full row sums, normalise, store rows that exist; lse from one thread per row.
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float l = l_run[r];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    const int64_t row = row_lo + r * 8;
    if (row < p.Sq) {
      const float inv = 1.0f / l;
      uint16_t* orow = p.out + b * p.os.b + h * p.os.h + row * p.os.s;
#pragma unroll
      for (int n = 0; n < kDT; ++n) {
        const uint32_t packed = pack2<BF16>(o[n][2 * r] * inv, o[n][2 * r + 1] * inv);
        *reinterpret_cast<uint32_t*>(orow + n * 8 + t4 * 2) = packed;  // 4-byte aligned (checked on the host)
      }
      if (t4 == 0) p.lse[bh * p.Sq + row] = (m_run[r] + log2f(l)) * kLn2F;
    }
  }
#endif
}

// The rows of t can be read/written 16 bytes at a time: 16-byte aligned base
// and every stride a multiple of 8 elements (a size-1 dim's stride is never used).
bool rows_16b_aligned(const at::Tensor& t) {
  if (reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 != 0) return false;
  for (int d = 0; d < 3; ++d) {
    if (t.size(d) > 1 && t.stride(d) % 8 != 0) return false;
  }
  return true;
}

// One cudaFuncSetAttribute per (kernel, device) for shared memory above 48 KB.
template <int D, bool BF16>
void ensure_smem_attribute(int device) {
  static std::atomic<uint64_t> done{0};
  const uint64_t bit = uint64_t{1} << (device & 63);
  if (done.load(std::memory_order_relaxed) & bit) return;
  C10_CUDA_CHECK(cudaFuncSetAttribute(attention_fwd_mma_kernel<D, BF16>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      FwdTile<D>::SMEM_BYTES));
  done.fetch_or(bit, std::memory_order_relaxed);
}

template <int D, bool BF16>
void launch_fwd_mma(const MmaParams& p, int64_t bh, int device, cudaStream_t stream) {
  ensure_smem_attribute<D, BF16>(device);
  const int64_t blocks = bh * p.num_qblocks;
  TORCH_CHECK(blocks <= 0x7fffffff, "pygen: attention problem too large for one launch");
  attention_fwd_mma_kernel<D, BF16>
      <<<static_cast<unsigned int>(blocks), kMmaThreads, FwdTile<D>::SMEM_BYTES, stream>>>(p);
}

// Launch the tensor-core forward if (dtype, head dim, alignment, device) allow; false otherwise.
bool try_fwd_mma(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                 const at::Tensor& lse, double scale, bool causal, cudaStream_t stream) {
  const auto st = q.scalar_type();
  if (st != at::kHalf && st != at::kBFloat16) return false;
  const int64_t D = q.size(3);
  if (D != 32 && D != 64 && D != 80 && D != 96 && D != 128 && D != 256) return false;
  if (!rows_16b_aligned(q) || !rows_16b_aligned(k) || !rows_16b_aligned(v) || !rows_16b_aligned(out)) return false;
  const int device = q.get_device();
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  if (major < 8) return false;
  MmaParams p{};
  p.q = static_cast<const uint16_t*>(q.data_ptr());
  p.k = static_cast<const uint16_t*>(k.data_ptr());
  p.v = static_cast<const uint16_t*>(v.data_ptr());
  p.out = static_cast<uint16_t*>(out.data_ptr());
  p.lse = lse.data_ptr<float>();
  p.qs = strides_of(q);
  p.ks = strides_of(k);
  p.vs = strides_of(v);
  p.os = strides_of(out);
  p.H = q.size(1);
  p.Sq = q.size(2);
  p.Sk = k.size(2);
  p.num_qblocks = (p.Sq + kBlockM - 1) / kBlockM;
  p.scale2 = static_cast<float>(scale * attn::kLog2e);
  p.causal = causal;
  const int64_t bh = q.size(0) * q.size(1);
  const bool bf16 = st == at::kBFloat16;
  auto launch = [&](auto d_const) {
    constexpr int kD = decltype(d_const)::value;
    if (bf16) {
      launch_fwd_mma<kD, true>(p, bh, device, stream);
    } else {
      launch_fwd_mma<kD, false>(p, bh, device, stream);
    }
  };
  switch (D) {
    case 32: launch(std::integral_constant<int, 32>{}); break;
    case 64: launch(std::integral_constant<int, 64>{}); break;
    case 80: launch(std::integral_constant<int, 80>{}); break;
    case 96: launch(std::integral_constant<int, 96>{}); break;
    case 128: launch(std::integral_constant<int, 128>{}); break;
    default: launch(std::integral_constant<int, 256>{}); break;
  }
  return true;
}

// ===========================================================================
// Host entry points
// ===========================================================================
std::tuple<at::Tensor, at::Tensor> attention_fwd_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                      double scale, bool causal) {
  attn::check_attention_fwd_args(q, k, v, c10::kCUDA, kMaxHeadDim);
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out = at::empty_like(q);
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (try_fwd_mma(q, k, v, out, lse, scale, causal, stream)) {
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return {out, lse};
  }
  const SimpleParams p = simple_params(q, k, v, scale, causal);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "attention_fwd_cuda", [&] {
    attention_fwd_simple_kernel<scalar_t><<<simple_blocks(p.B * p.H * p.Sq), kSimpleWarps * 32, 0, stream>>>(
        p, out.data_ptr<scalar_t>(), strides_of(out), lse.data_ptr<float>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cuda(const at::Tensor& grad_out, const at::Tensor& q,
                                                                  const at::Tensor& k, const at::Tensor& v,
                                                                  const at::Tensor& out, const at::Tensor& lse,
                                                                  double scale, bool causal) {
  attn::check_attention_bwd_args(grad_out, q, k, v, out, lse, c10::kCUDA, kMaxHeadDim);
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  if (q.numel() == 0) {
    dk.zero_();
    dv.zero_();
    return {dq, dk, dv};
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  SimpleParams p = simple_params(q, k, v, scale, causal);
  p.dout = grad_out.data_ptr();
  p.out = out.data_ptr();
  p.dos = strides_of(grad_out);
  p.os = strides_of(out);
  p.lse = lse.data_ptr<float>();
  p.ls_b = lse.stride(0);
  p.ls_h = lse.stride(1);
  p.ls_s = lse.stride(2);
  const auto acc_type = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor delta = at::empty({p.B * p.H * p.Sq}, q.options().dtype(acc_type));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "attention_bwd_cuda", [&] {
    using acc = acc_t<scalar_t>;
    acc* dl = delta.data_ptr<acc>();
    const unsigned int q_blocks = simple_blocks(p.B * p.H * p.Sq);
    attention_delta_kernel<scalar_t><<<q_blocks, kSimpleWarps * 32, 0, stream>>>(p, dl);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    attention_dkdv_kernel<scalar_t><<<simple_blocks(p.B * p.H * p.Sk), kSimpleWarps * 32, 0, stream>>>(
        p, dl, dk.data_ptr<scalar_t>(), strides_of(dk), dv.data_ptr<scalar_t>(), strides_of(dv));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    attention_dq_kernel<scalar_t><<<q_blocks, kSimpleWarps * 32, 0, stream>>>(p, dl, dq.data_ptr<scalar_t>(),
                                                                              strides_of(dq));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(pygen, CUDA, m) {
  m.impl("attention_fwd", &attention_fwd_cuda);
  m.impl("attention_bwd", &attention_bwd_cuda);
}

}  // namespace pygen::cuda
