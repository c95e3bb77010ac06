// csrc/cpu/attention.cpp — C++ CPU kernels of torch.ops.pygen.attention_fwd and
// torch.ops.pygen.attention_bwd (scaled dot-product attention, pygen.attention).
//
//   attention_fwd(q, k, v, scale, causal) -> (out, lse)
//   attention_bwd(grad_out, q, k, v, out, lse, scale, causal) -> (dq, dk, dv)
//
// q (B, H, Sq, D), k and v (B, H, Sk, D), any strides with a unit last stride
// (a (B, S, H, D) tensor passed as .transpose(1, 2) is read in place). out is
// empty_like(q); lse is (B, H, Sq) float32, the natural-log logsumexp of
// scale·q·k over the visible keys. Causal masking is top-left aligned (key j
// visible to query i iff j <= i), see pygen/attention.h.
//
// Storage fp32, fp64, fp16, bf16; arithmetic in fp32 (fp64 for fp64).
// Forward: flash-style blocked online softmax, parallel over (b, h, query
// block); each task streams key/value tiles through fp32 scratch. Backward:
// P recomputed from lse (never stored), delta = rowsum(dO·O); one parallel pass
// over (b, h, key block) accumulates dK and dV, one over (b, h, query block)
// accumulates dQ, so every output element is written by exactly one task in a
// fixed order (deterministic, no atomics).
#include <torch/library.h>

#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "cpu_common.h"
#include "../attention_checks.h"
#include "pygen/attention.h"

namespace pygen::cpu {
namespace {

namespace attn = pygen::attention;

// Query rows per task and keys per tile.
constexpr int64_t kBlockQ = 64;
constexpr int64_t kBlockK = 64;
// Multiply-adds per at::parallel_for grain: small problems run inline.
constexpr int64_t kGrainMacs = int64_t{1} << 18;

// The tile loops are compiled for AVX-512, AVX2 and the baseline ISA and picked
// at load time (the extension itself targets baseline x86-64). FMA contraction
// is allowed here: attention makes no bit-exactness promise across ISAs.
#if PYGEN_CPU_MULTIVERSION && defined(__linux__)
#define PYGEN_ATTN_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define PYGEN_ATTN_CLONES
#endif

// ---------------------------------------------------------------------------
// Tile arithmetic on acc_t scratch.
// ---------------------------------------------------------------------------

// C[m][n] += sum_k A[m·a_rs + k·a_cs] · B[k·ldb + n] for m < M, n < N, k < K
// (row-major C and B; A read with any strides, so A^T costs nothing). The
// fp32 version is register-blocked (gemm_f32 below); this generic one serves fp64.
template <typename T>
void gemm_acc_generic(T* __restrict__ C, int64_t ldc, const T* __restrict__ A, int64_t a_rs, int64_t a_cs,
                      const T* __restrict__ B, int64_t ldb, int64_t M, int64_t N, int64_t K) {
  for (int64_t m = 0; m < M; ++m) {
    T* __restrict__ c = C + m * ldc;
    const T* __restrict__ a = A + m * a_rs;
    for (int64_t kk = 0; kk < K; ++kk) {
      const T av = a[kk * a_cs];
      const T* __restrict__ b = B + kk * ldb;
      for (int64_t n = 0; n < N; ++n) c[n] += av * b[n];
    }
  }
}

// Everything that takes or returns a vector type is inlined into its caller:
// a call across the per-ISA copies would pass vectors in registers on one
// side and in memory on the other (the -Wpsabi note).
#define PYGEN_ATTN_INLINE __attribute__((always_inline)) inline

// 16 fp32 lanes (one AVX-512 register, two AVX2 or four SSE registers).
typedef float vf16 __attribute__((vector_size(64)));
typedef int32_t vi16 __attribute__((vector_size(64)));
typedef uint32_t vu16 __attribute__((vector_size(64)));
constexpr int kLanes = 16;

PYGEN_ATTN_INLINE vf16 vload(const float* p) {
  vf16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
PYGEN_ATTN_INLINE void vstore(float* p, vf16 v) { std::memcpy(p, &v, sizeof v); }
PYGEN_ATTN_INLINE vf16 vsplat(float x) { return vf16{} + x; }

// C[MR][NV·16] += A[MR][K] · B[K][NV·16]: MR·NV accumulator registers, each B
// vector loaded once per k and used MR times.
template <int MR, int NV>
PYGEN_ATTN_INLINE void micro_f32(float* __restrict__ C, int64_t ldc, const float* __restrict__ A,
                                                     int64_t a_rs, int64_t a_cs, const float* __restrict__ B,
                                                     int64_t ldb, int64_t K) {
  vf16 c[MR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) c[r][v] = vload(C + r * ldc + v * kLanes);
  for (int64_t kk = 0; kk < K; ++kk) {
    vf16 b[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) b[v] = vload(B + kk * ldb + v * kLanes);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const float a = A[r * a_rs + kk * a_cs];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) c[r][v] += a * b[v];
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) vstore(C + r * ldc + v * kLanes, c[r][v]);
}

// Rows [m0, m0 + MR) of C over all N columns: 32-column panels, then 16, then scalars.
template <int MR>
PYGEN_ATTN_INLINE void gemm_rows_f32(float* __restrict__ C, int64_t ldc,
                                                         const float* __restrict__ A, int64_t a_rs, int64_t a_cs,
                                                         const float* __restrict__ B, int64_t ldb, int64_t N,
                                                         int64_t K) {
  int64_t n0 = 0;
  for (; n0 + 2 * kLanes <= N; n0 += 2 * kLanes) micro_f32<MR, 2>(C + n0, ldc, A, a_rs, a_cs, B + n0, ldb, K);
  for (; n0 + kLanes <= N; n0 += kLanes) micro_f32<MR, 1>(C + n0, ldc, A, a_rs, a_cs, B + n0, ldb, K);
  if (n0 < N) gemm_acc_generic(C + n0, ldc, A, a_rs, a_cs, B + n0, ldb, int64_t{MR}, N - n0, K);
}

template <int MR>
PYGEN_ATTN_INLINE void gemm_f32_body(float* __restrict__ C, int64_t ldc,
                                                         const float* __restrict__ A, int64_t a_rs, int64_t a_cs,
                                                         const float* __restrict__ B, int64_t ldb, int64_t M, int64_t N,
                                                         int64_t K) {
  int64_t m0 = 0;
  for (; m0 + MR <= M; m0 += MR) gemm_rows_f32<MR>(C + m0 * ldc, ldc, A + m0 * a_rs, a_rs, a_cs, B, ldb, N, K);
  for (; m0 < M; ++m0) gemm_rows_f32<1>(C + m0 * ldc, ldc, A + m0 * a_rs, a_rs, a_cs, B, ldb, N, K);
}

// One copy per ISA (the extension targets baseline x86-64), picked once at
// load time: AVX-512 holds 4 rows × 32 columns in 8 of its 32 registers; AVX2
// and SSE 2 rows × 32 columns.
using GemmF32 = void (*)(float*, int64_t, const float*, int64_t, int64_t, const float*, int64_t, int64_t, int64_t,
                         int64_t);
#if PYGEN_CPU_MULTIVERSION
__attribute__((target("avx512f"))) void gemm_f32_avx512(float* C, int64_t ldc, const float* A, int64_t a_rs,
                                                        int64_t a_cs, const float* B, int64_t ldb, int64_t M,
                                                        int64_t N, int64_t K) {
  gemm_f32_body<4>(C, ldc, A, a_rs, a_cs, B, ldb, M, N, K);
}
__attribute__((target("avx2,fma"))) void gemm_f32_avx2(float* C, int64_t ldc, const float* A, int64_t a_rs,
                                                       int64_t a_cs, const float* B, int64_t ldb, int64_t M, int64_t N,
                                                       int64_t K) {
  gemm_f32_body<2>(C, ldc, A, a_rs, a_cs, B, ldb, M, N, K);
}
#endif
void gemm_f32_baseline(float* C, int64_t ldc, const float* A, int64_t a_rs, int64_t a_cs, const float* B, int64_t ldb,
                       int64_t M, int64_t N, int64_t K) {
  gemm_f32_body<2>(C, ldc, A, a_rs, a_cs, B, ldb, M, N, K);
}

GemmF32 pick_gemm_f32() {
#if PYGEN_CPU_MULTIVERSION
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return gemm_f32_avx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return gemm_f32_avx2;
#endif
  return gemm_f32_baseline;
}
const GemmF32 gemm_f32 = pick_gemm_f32();

inline void gemm_acc(float* C, int64_t ldc, const float* A, int64_t a_rs, int64_t a_cs, const float* B, int64_t ldb,
                     int64_t M, int64_t N, int64_t K) {
  gemm_f32(C, ldc, A, a_rs, a_cs, B, ldb, M, N, K);
}
inline void gemm_acc(double* C, int64_t ldc, const double* A, int64_t a_rs, int64_t a_cs, const double* B,
                     int64_t ldb, int64_t M, int64_t N, int64_t K) {
  gemm_acc_generic(C, ldc, A, a_rs, a_cs, B, ldb, M, N, K);
}

// 2^x in fp32 (|relative error| < 2e-7 on normal results), for scalars and
// vf16 alike: x clamped to [-126, 127], split x = n + f with f in [-0.5, 0.5],
// 2^f by its degree-7 Taylor polynomial (truncation < 6e-9), 2^n added to the
// exponent bits. x < -126 gives 0; NaN gives NaN. Branch-free.
template <typename F, typename U>
PYGEN_ATTN_INLINE F exp2_poly(F x) {
  const F lo = F{} - 126.0f, hi = F{} + 127.0f, zero = F{};
  F xc = x < lo ? lo : x;  // NaN passes through both selects
  xc = xc > hi ? hi : xc;
  const F kRound = F{} + 12582912.0f;  // 1.5 · 2^23: adding it rounds to an integer
  const F rb = xc + kRound;
  const F f = xc - (rb - kRound);
  const U n = __builtin_bit_cast(U, rb) - __builtin_bit_cast(U, kRound);
  F p = F{} + 1.5252733804059841e-05f;  // ln2^7 / 7!
  p = p * f + 1.5403530393381606e-04f;
  p = p * f + 1.3333558146428443e-03f;
  p = p * f + 9.6181291076284772e-03f;
  p = p * f + 5.5504108664821580e-02f;
  p = p * f + 2.4022650695910071e-01f;
  p = p * f + 6.9314718055994531e-01f;
  p = p * f + 1.0f;
  F y = __builtin_bit_cast(F, __builtin_bit_cast(U, p) + (n << 23));
  y = x < lo ? zero : y;
  return x != x ? x : y;
}

inline float exp2_acc(float x) { return exp2_poly<float, uint32_t>(x); }
inline double exp2_acc(double x) { return std::exp2(x); }

// Score tiles come in two layouts. Query-major S[i][j] (row i: query q0 + i,
// kBlockK columns) serves the dK/dV pass, whose key block is fixed per task so
// its K^T and V^T are built once. Key-major St[j][i] (row j: key j0 + j,
// kBlockQ columns) serves the forward and the dQ pass, whose query block is
// fixed per task: Q^T is built once and the per-tile K and V rows are used as
// they are. In the key-major layout the softmax statistics of kBlockQ queries
// are kBlockQ / 16 vectors, updated lane-wise down the key rows.

// Key-major tile, lanes [g·16, g·16 + 16) of query columns: true where key
// (j0 + j) is visible to query (q0 + lane).
PYGEN_ATTN_INLINE vi16 visible_lanes(int64_t j, int64_t q0, int64_t j0, int g, bool causal) {
  vi16 lane;
  for (int t = 0; t < kLanes; ++t) lane[t] = g * kLanes + t;
  if (!causal) return lane >= 0;
  // visible iff q0 + lane >= j0 + j iff lane >= t (t clamped into int32 range).
  const int64_t t = std::clamp<int64_t>(j0 + j - q0, -1, kBlockQ);
  return lane >= static_cast<int32_t>(t);
}

// Forward online softmax of a key-major tile (nk rows of kBlockQ base-2 scores,
// already multiplied by scale·log2 e): masked entries and rows become
// probabilities p = 2^(s - m_new) (0 when masked); m and l (running max and
// sum per query) are updated and alpha[i] = 2^(m_old - m_new) returned for
// rescaling the output accumulator.
template <typename T>
PYGEN_ATTN_CLONES void softmax_cols(T* __restrict__ st, int64_t nk, int64_t q0, int64_t j0, bool causal,
                                    T* __restrict__ m, T* __restrict__ l, T* __restrict__ alpha) {
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  if constexpr (std::is_same_v<T, float>) {
    static_assert(kBlockQ % kLanes == 0);
    for (int g = 0; g < kBlockQ / kLanes; ++g) {
      const vf16 m_old = vload(m + g * kLanes);
      vf16 mx = m_old;
      for (int64_t j = 0; j < nk; ++j) {
        float* row = st + j * kBlockQ + g * kLanes;
        vf16 x = vload(row);
        if (causal) {
          x = visible_lanes(j, q0, j0, g, causal) ? x : vsplat(kNegInf);
          vstore(row, x);  // 2^(-inf - sub) = 0 below
        }
        mx = x > mx ? x : mx;  // NaN never becomes the max
      }
      // A query whose scores are all -inf so far subtracts 0 (p = 0, not NaN).
      const vf16 sub = mx == kNegInf ? vf16{} : mx;
      vf16 sum = vf16{};
      for (int64_t j = 0; j < nk; ++j) {
        float* row = st + j * kBlockQ + g * kLanes;
        const vf16 p = exp2_poly<vf16, vu16>(vload(row) - sub);
        vstore(row, p);
        sum += p;
      }
      const vf16 a = m_old == mx ? vsplat(1.0f) : exp2_poly<vf16, vu16>(m_old - sub);
      vstore(alpha + g * kLanes, a);
      vstore(l + g * kLanes, vload(l + g * kLanes) * a + sum);
      vstore(m + g * kLanes, mx);
    }
  } else {
    for (int64_t i = 0; i < kBlockQ; ++i) {
      T mx = m[i];
      for (int64_t j = 0; j < nk; ++j) {
        T& x = st[j * kBlockQ + i];
        if (!attn::key_visible(q0 + i, j0 + j, causal)) x = kNegInf;
        mx = x > mx ? x : mx;
      }
      const T sub = mx == kNegInf ? T(0) : mx;
      T sum = 0;
      for (int64_t j = 0; j < nk; ++j) {
        T& x = st[j * kBlockQ + i];
        x = exp2_acc(x - sub);
        sum += x;
      }
      alpha[i] = m[i] == mx ? T(1) : exp2_acc(m[i] - sub);
      l[i] = l[i] * alpha[i] + sum;
      m[i] = mx;
    }
  }
}

// Backward, key-major tile of raw scores q·k (nk rows of kBlockQ): P =
// 2^(scale·log2e·s - lse2_i) where visible, 0 elsewhere; then, given the
// key-major dP tile dpt, dS = P·(dP - delta_i) in place in dpt.
template <typename T>
PYGEN_ATTN_CLONES void probs_dscores_cols(T* __restrict__ st, T* __restrict__ dpt, int64_t nk, int64_t q0, int64_t j0,
                                          bool causal, T scale2, const T* __restrict__ lse2,
                                          const T* __restrict__ delta) {
  if constexpr (std::is_same_v<T, float>) {
    for (int g = 0; g < kBlockQ / kLanes; ++g) {
      const vf16 sub = vload(lse2 + g * kLanes), dl = vload(delta + g * kLanes);
      for (int64_t j = 0; j < nk; ++j) {
        float* srow = st + j * kBlockQ + g * kLanes;
        float* drow = dpt + j * kBlockQ + g * kLanes;
        vf16 p = exp2_poly<vf16, vu16>(vload(srow) * scale2 - sub);
        if (causal) p = visible_lanes(j, q0, j0, g, causal) ? p : vf16{};
        vstore(srow, p);
        vstore(drow, p * (vload(drow) - dl));
      }
    }
  } else {
    for (int64_t j = 0; j < nk; ++j) {
      for (int64_t i = 0; i < kBlockQ; ++i) {
        const T p = attn::key_visible(q0 + i, j0 + j, causal) ? exp2_acc(st[j * kBlockQ + i] * scale2 - lse2[i]) : T(0);
        st[j * kBlockQ + i] = p;
        dpt[j * kBlockQ + i] = p * (dpt[j * kBlockQ + i] - delta[i]);
      }
    }
  }
}

// Backward tile: s holds nq × nk raw scores q·k (row stride kBlockK). Overwrite
// s with P = 2^(scale·log2e·s - lse2_i) on visible entries, 0 on the others.
PYGEN_ATTN_INLINE void probs_row(float* __restrict__ row, int64_t nvis, float scale2, float sub) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  for (int64_t j = nvis; j < kBlockK; ++j) row[j] = kNegInf;  // 2^(-inf) = 0
  for (int64_t j = 0; j < kBlockK; j += kLanes) vstore(row + j, exp2_poly<vf16, vu16>(vload(row + j) * scale2 - sub));
  // A NaN lse would turn the masked entries into NaN too; keep them 0.
  for (int64_t j = nvis; j < kBlockK; ++j) row[j] = 0.0f;
}
PYGEN_ATTN_INLINE void probs_row(double* __restrict__ row, int64_t nvis, double scale2, double sub) {
  for (int64_t j = 0; j < nvis; ++j) row[j] = std::exp2(row[j] * scale2 - sub);
  for (int64_t j = nvis; j < kBlockK; ++j) row[j] = 0.0;
}

template <typename T>
PYGEN_ATTN_CLONES void probs_tile(T* __restrict__ s, int64_t nq, int64_t nk, int64_t q0, int64_t j0, bool causal,
                                  T scale2, const T* __restrict__ lse2) {
  for (int64_t i = 0; i < nq; ++i) {
    const int64_t nvis = causal ? std::clamp<int64_t>(q0 + i - j0 + 1, 0, nk) : nk;
    probs_row(s + i * kBlockK, nvis, scale2, lse2[i]);
  }
}

// dS = P · (dP - delta_i), in place in dp (both nq rows of stride kBlockK).
template <typename T>
PYGEN_ATTN_CLONES void dscores_tile(T* __restrict__ dp, const T* __restrict__ p, int64_t nq,
                                    const T* __restrict__ delta) {
  for (int64_t i = 0; i < nq; ++i) {
    const T di = delta[i];
    for (int64_t j = 0; j < kBlockK; ++j) dp[i * kBlockK + j] = p[i * kBlockK + j] * (dp[i * kBlockK + j] - di);
  }
}

// ---------------------------------------------------------------------------
// Strided (B, H, S, D) access with a unit last stride.
// ---------------------------------------------------------------------------
template <typename scalar_t>
struct Rows {
  scalar_t* data;
  int64_t sb, sh, ss;
  Rows(const at::Tensor& t) : data(t.data_ptr<scalar_t>()), sb(t.stride(0)), sh(t.stride(1)), ss(t.stride(2)) {}
  scalar_t* row(int64_t b, int64_t h, int64_t s) const { return data + b * sb + h * sh + s * ss; }
};

// dst[r · ld + d] = mul · src row (r0 + r), for r < n.
template <typename T, typename scalar_t>
PYGEN_ATTN_CLONES void load_rows(T* __restrict__ dst, int64_t ld, const Rows<scalar_t>& src, int64_t b, int64_t h,
                                 int64_t r0, int64_t n, int64_t D, T mul) {
  for (int64_t r = 0; r < n; ++r) {
    const scalar_t* __restrict__ x = src.row(b, h, r0 + r);
    T* __restrict__ y = dst + r * ld;
    for (int64_t d = 0; d < D; ++d) y[d] = static_cast<T>(x[d]) * mul;
  }
}

// dst[d · ld + r] = mul · src row (r0 + r)[d] (transposed), for r < n.
template <typename T, typename scalar_t>
PYGEN_ATTN_CLONES void load_rows_transposed(T* __restrict__ dst, int64_t ld, const Rows<scalar_t>& src, int64_t b,
                                            int64_t h, int64_t r0, int64_t n, int64_t D, T mul) {
  for (int64_t r = 0; r < n; ++r) {
    const scalar_t* __restrict__ x = src.row(b, h, r0 + r);
    for (int64_t d = 0; d < D; ++d) dst[d * ld + r] = static_cast<T>(x[d]) * mul;
  }
}

// dst row (r0 + r) = mul · src[r · ld + d], for r < n.
template <typename T, typename scalar_t>
PYGEN_ATTN_CLONES void store_rows(const Rows<scalar_t>& dst, int64_t b, int64_t h, int64_t r0, int64_t n, int64_t D,
                const T* __restrict__ src, int64_t ld, T mul) {
  for (int64_t r = 0; r < n; ++r) {
    scalar_t* __restrict__ y = dst.row(b, h, r0 + r);
    const T* __restrict__ x = src + r * ld;
    for (int64_t d = 0; d < D; ++d) y[d] = static_cast<scalar_t>(x[d] * mul);
  }
}

int64_t grain_for(int64_t macs_per_task) {
  return std::max<int64_t>(1, kGrainMacs / std::max<int64_t>(1, macs_per_task));
}

// Task w of a parallel loop over (b, h, block of rows): rows [r0, r0 + n) of
// head (b, h) (bh = b·H + h), blocks of `block` rows out of S, nblocks per head.
struct BlockTask {
  int64_t bh, b, h, r0, n;
};
inline BlockTask block_task(int64_t w, int64_t nblocks, int64_t block, int64_t H, int64_t S) {
  BlockTask t;
  t.bh = w / nblocks;
  t.r0 = (w - t.bh * nblocks) * block;
  t.b = t.bh / H;
  t.h = t.bh - t.b * H;
  t.n = std::min(block, S - t.r0);
  return t;
}

// Key tile [j0, j0 + nk) of head (b, h): Ks, Vs (nk × D) loaded, and the
// key-major scores St = Ks·Qt (nk × kBlockQ; Qt is D × kBlockQ).
template <typename T, typename scalar_t>
void load_key_tile(T* Ks, T* Vs, T* St, const Rows<scalar_t>& K, const Rows<scalar_t>& V, const T* Qt, int64_t b,
                   int64_t h, int64_t j0, int64_t nk, int64_t D) {
  load_rows(Ks, D, K, b, h, j0, nk, D, T(1));
  load_rows(Vs, D, V, b, h, j0, nk, D, T(1));
  std::fill(St, St + nk * kBlockQ, T(0));
  gemm_acc(St, kBlockQ, Ks, D, 1, Qt, kBlockQ, nk, kBlockQ, D);
}

// ---------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------
template <typename scalar_t>
void attention_fwd_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                        const at::Tensor& lse, double scale, bool causal) {
  using T = acc_t<scalar_t>;
  const int64_t B = q.size(0), H = q.size(1), Sq = q.size(2), Sk = k.size(2), D = q.size(3);
  const int64_t nqb = (Sq + kBlockQ - 1) / kBlockQ;
  const Rows<scalar_t> Q(q), K(k), V(v), O(out);
  float* lse_p = lse.data_ptr<float>();  // contiguous (B, H, Sq)
  const T qmul = static_cast<T>(scale * attn::kLog2e);
  const T ln2 = static_cast<T>(attn::kLn2);
  at::parallel_for(0, B * H * nqb, grain_for(kBlockQ * Sk * D * 2), [&](int64_t begin, int64_t end) {
    // Scratch: Qt (D × BQ), acc (BQ × D), Ks, Vs (BK × D), St (BK × BQ), m, l, alpha (BQ).
    std::vector<T> buf(2 * kBlockQ * D + 2 * kBlockK * D + kBlockK * kBlockQ + 3 * kBlockQ);
    T* Qt = buf.data();
    T* acc = Qt + kBlockQ * D;
    T* Ks = acc + kBlockQ * D;
    T* Vs = Ks + kBlockK * D;
    T* St = Vs + kBlockK * D;
    T* m = St + kBlockK * kBlockQ;
    T* l = m + kBlockQ;
    T* alpha = l + kBlockQ;
    for (int64_t w = begin; w < end; ++w) {
      const auto [bh, b, h, i0, nq] = block_task(w, nqb, kBlockQ, H, Sq);
      // Columns nq.. of Qt stay 0: those padding queries get finite scores and are never stored.
      std::fill(Qt, Qt + kBlockQ * D, T(0));
      load_rows_transposed(Qt, kBlockQ, Q, b, h, i0, nq, D, qmul);
      std::fill(acc, acc + nq * D, T(0));
      std::fill(m, m + kBlockQ, -std::numeric_limits<T>::infinity());
      std::fill(l, l + kBlockQ, T(0));
      const int64_t kend = attn::key_end(i0 + nq, Sk, causal);
      for (int64_t j0 = 0; j0 < kend; j0 += kBlockK) {
        const int64_t nk = std::min(kBlockK, kend - j0);
        load_key_tile(Ks, Vs, St, K, V, Qt, b, h, j0, nk, D);  // St = K Q^T (key-major scores, base 2)
        softmax_cols(St, nk, i0, j0, causal, m, l, alpha);
        for (int64_t i = 0; i < nq; ++i) {
          if (alpha[i] == T(1)) continue;
          T* a = acc + i * D;
          for (int64_t d = 0; d < D; ++d) a[d] *= alpha[i];
        }
        // acc += P V, P = St^T
        gemm_acc(acc, D, St, 1, kBlockQ, Vs, D, nq, D, nk);
      }
      for (int64_t i = 0; i < nq; ++i) {
        const T inv = T(1) / l[i];
        T* a = acc + i * D;
        for (int64_t d = 0; d < D; ++d) a[d] *= inv;
        lse_p[bh * Sq + i0 + i] = static_cast<float>((m[i] + std::log2(l[i])) * ln2);
      }
      store_rows(O, b, h, i0, nq, D, acc, D, T(1));
    }
  });
}

std::tuple<at::Tensor, at::Tensor> attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                     double scale, bool causal) {
  attn::check_attention_fwd_args(q, k, v, c10::kCPU);
  at::Tensor out = at::empty_like(q);
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "attention_fwd_cpu", [&] {
    attention_fwd_impl<scalar_t>(q, k, v, out, lse, scale, causal);
  });
  return {out, lse};
}

// ---------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------
template <typename scalar_t>
void attention_bwd_impl(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                        const at::Tensor& out, const at::Tensor& lse, double scale, bool causal, const at::Tensor& dq,
                        const at::Tensor& dk, const at::Tensor& dv) {
  using T = acc_t<scalar_t>;
  const int64_t B = q.size(0), H = q.size(1), Sq = q.size(2), Sk = k.size(2), D = q.size(3);
  const Rows<scalar_t> dO(dout), Q(q), K(k), V(v), O(out), dQ(dq), dK(dk), dV(dv);
  const T scale2 = static_cast<T>(scale * attn::kLog2e);
  const T sc = static_cast<T>(scale);
  const T log2e = static_cast<T>(attn::kLog2e);
  const float* lse_p = lse.data_ptr<float>();
  const int64_t ls_b = lse.stride(0), ls_h = lse.stride(1), ls_s = lse.stride(2);

  // lse2 = log2(e)·lse and delta = rowsum(dO·O), contiguous (B, H, Sq), acc_t.
  std::vector<T> lse2_delta(static_cast<size_t>(2 * B * H * Sq));
  T* lse2 = lse2_delta.data();
  T* delta = lse2 + B * H * Sq;
  at::parallel_for(0, B * H * Sq, grain_for(D * 64), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t bh = r / Sq, i = r - bh * Sq, b = bh / H, h = bh - b * H;
      const scalar_t* g = dO.row(b, h, i);
      const scalar_t* o = O.row(b, h, i);
      T s = 0;
      for (int64_t d = 0; d < D; ++d) s += static_cast<T>(g[d]) * static_cast<T>(o[d]);
      delta[r] = s;
      lse2[r] = static_cast<T>(lse_p[b * ls_b + h * ls_h + i * ls_s]) * log2e;
    }
  });

  // dK, dV: one task per (b, h, key block), looping over the queries that see it.
  const int64_t nkb = (Sk + kBlockK - 1) / kBlockK;
  at::parallel_for(0, B * H * nkb, grain_for(kBlockK * Sq * D * 4), [&](int64_t begin, int64_t end) {
    // Scratch: Kt, Vt (D × BK), Qs, dOs (BQ × D), S, dP (BQ × BK), dKa, dVa (BK × D).
    std::vector<T> buf(2 * D * kBlockK + 2 * kBlockQ * D + 2 * kBlockQ * kBlockK + 2 * kBlockK * D);
    T* Kt = buf.data();
    T* Vt = Kt + D * kBlockK;
    T* Qs = Vt + D * kBlockK;
    T* dOs = Qs + kBlockQ * D;
    T* S = dOs + kBlockQ * D;
    T* dP = S + kBlockQ * kBlockK;
    T* dKa = dP + kBlockQ * kBlockK;
    T* dVa = dKa + kBlockK * D;
    for (int64_t w = begin; w < end; ++w) {
      const auto [bh, b, h, j0, nk] = block_task(w, nkb, kBlockK, H, Sk);
      load_rows_transposed(Kt, kBlockK, K, b, h, j0, nk, D, T(1));
      load_rows_transposed(Vt, kBlockK, V, b, h, j0, nk, D, T(1));
      std::fill(dKa, dKa + nk * D, T(0));
      std::fill(dVa, dVa + nk * D, T(0));
      for (int64_t i0 = attn::query_begin(j0, causal); i0 < Sq; i0 += kBlockQ) {
        const int64_t nq = std::min(kBlockQ, Sq - i0);
        const int64_t r0 = bh * Sq + i0;
        load_rows(Qs, D, Q, b, h, i0, nq, D, T(1));
        load_rows(dOs, D, dO, b, h, i0, nq, D, T(1));
        std::fill(S, S + nq * kBlockK, T(0));
        gemm_acc(S, kBlockK, Qs, D, 1, Kt, kBlockK, nq, nk, D);
        probs_tile(S, nq, nk, i0, j0, causal, scale2, lse2 + r0);
        // dV += P^T dO
        gemm_acc(dVa, D, S, 1, kBlockK, dOs, D, nk, D, nq);
        // dP = dO V^T; dS = P (dP - delta)
        std::fill(dP, dP + nq * kBlockK, T(0));
        gemm_acc(dP, kBlockK, dOs, D, 1, Vt, kBlockK, nq, nk, D);
        dscores_tile(dP, S, nq, delta + r0);
        // dK += dS^T Q (scaled at the end)
        gemm_acc(dKa, D, dP, 1, kBlockK, Qs, D, nk, D, nq);
      }
      store_rows(dK, b, h, j0, nk, D, dKa, D, sc);
      store_rows(dV, b, h, j0, nk, D, dVa, D, T(1));
    }
  });

  // dQ: one task per (b, h, query block), looping over its visible keys.
  const int64_t nqb = (Sq + kBlockQ - 1) / kBlockQ;
  at::parallel_for(0, B * H * nqb, grain_for(kBlockQ * Sk * D * 3), [&](int64_t begin, int64_t end) {
    // Scratch: Qt, dOt (D × BQ), dQa (BQ × D), Ks, Vs (BK × D), St, dPt (BK × BQ), lse2, delta (BQ).
    std::vector<T> buf(3 * kBlockQ * D + 2 * kBlockK * D + 2 * kBlockK * kBlockQ + 2 * kBlockQ);
    T* Qt = buf.data();
    T* dOt = Qt + kBlockQ * D;
    T* dQa = dOt + kBlockQ * D;
    T* Ks = dQa + kBlockQ * D;
    T* Vs = Ks + kBlockK * D;
    T* St = Vs + kBlockK * D;
    T* dPt = St + kBlockK * kBlockQ;
    T* lse2_blk = dPt + kBlockK * kBlockQ;
    T* delta_blk = lse2_blk + kBlockQ;
    for (int64_t w = begin; w < end; ++w) {
      const auto [bh, b, h, i0, nq] = block_task(w, nqb, kBlockQ, H, Sq);
      const int64_t r0 = bh * Sq + i0;
      // Padding query columns (nq..) are 0 with lse2 = delta = 0: finite, never stored.
      std::fill(Qt, Qt + kBlockQ * D, T(0));
      std::fill(dOt, dOt + kBlockQ * D, T(0));
      load_rows_transposed(Qt, kBlockQ, Q, b, h, i0, nq, D, T(1));
      load_rows_transposed(dOt, kBlockQ, dO, b, h, i0, nq, D, T(1));
      std::fill(lse2_blk, lse2_blk + 2 * kBlockQ, T(0));
      std::copy(lse2 + r0, lse2 + r0 + nq, lse2_blk);
      std::copy(delta + r0, delta + r0 + nq, delta_blk);
      std::fill(dQa, dQa + nq * D, T(0));
      const int64_t kend = attn::key_end(i0 + nq, Sk, causal);
      for (int64_t j0 = 0; j0 < kend; j0 += kBlockK) {
        const int64_t nk = std::min(kBlockK, kend - j0);
        load_key_tile(Ks, Vs, St, K, V, Qt, b, h, j0, nk, D);  // S^T = K Q^T
        std::fill(dPt, dPt + nk * kBlockQ, T(0));
        gemm_acc(dPt, kBlockQ, Vs, D, 1, dOt, kBlockQ, nk, kBlockQ, D);  // dP^T = V dO^T
        probs_dscores_cols(St, dPt, nk, i0, j0, causal, scale2, lse2_blk, delta_blk);
        // dQ += dS K (scaled at the end), dS = dPt^T
        gemm_acc(dQa, D, dPt, 1, kBlockQ, Ks, D, nq, D, nk);
      }
      store_rows(dQ, b, h, i0, nq, D, dQa, D, sc);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cpu(const at::Tensor& grad_out, const at::Tensor& q,
                                                                 const at::Tensor& k, const at::Tensor& v,
                                                                 const at::Tensor& out, const at::Tensor& lse,
                                                                 double scale, bool causal) {
  attn::check_attention_bwd_args(grad_out, q, k, v, out, lse, c10::kCPU);
  at::Tensor dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  if (q.numel() == 0) {
    dk.zero_();
    dv.zero_();
    return {dq, dk, dv};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "attention_bwd_cpu", [&] {
    attention_bwd_impl<scalar_t>(grad_out, q, k, v, out, lse, scale, causal, dq, dk, dv);
  });
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(pygen, CPU, m) {
  m.impl("attention_fwd", &attention_fwd_cpu);
  m.impl("attention_bwd", &attention_bwd_cpu);
}

}  // namespace pygen::cpu
