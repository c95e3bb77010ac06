// csrc/cpu/langevin.cpp — C++ CPU kernel of torch.ops.pygen.langevin_step (pygen.langevin_step).
//
// x_next = x + (dt/2)·score + sqrt(dt)·z, dt = step_sizes[row] or the scalar
// step_size, z = the given noise or exactly pygen.randn(x.shape, seed, stream)
// (csrc/include/pygen/philox.h; flat numbering for an int seed, within each
// batch row for per-row seeds). Arithmetic in fp32 (fp64 for fp64 storage).
//
// In-kernel noise is made a tile of Philox groups at a time into a small
// stack buffer and consumed by the same fused update loop as given noise, so
// every element is read and written once.
#include <algorithm>
#include <cmath>
#include <optional>

#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "cpu_common.h"

namespace pygen::cpu {
namespace {

constexpr int64_t kGrainElements = 1 << 15;  // at::parallel_for grain (elements)

// dt/2 and sqrt(dt) for each batch row: constant, or from a float/double tensor.
template <typename acc>
struct StepCoeffs {
  acc c1 = 0, c2 = 0;          // scalar step
  const float* f32 = nullptr;  // per-row steps (one of f32/f64, or neither)
  const double* f64 = nullptr;
  int64_t batch_row_len = 1;   // elements per batch row

  bool per_row() const { return f32 != nullptr || f64 != nullptr; }
  void at_row(int64_t b, acc* a1, acc* a2) const {
    const acc dt = f32 != nullptr ? static_cast<acc>(f32[b]) : static_cast<acc>(f64[b]);
    *a1 = static_cast<acc>(0.5) * dt;
    *a2 = std::sqrt(dt);
  }
};

// out[i] = x[i] + c1(row)·s[i] + c2(row)·z[i - begin] for i in [begin, end).
template <typename scalar_t, typename acc, typename z_t>
inline void update_range(scalar_t* __restrict__ out, const scalar_t* __restrict__ x, const scalar_t* __restrict__ s,
                         const z_t* __restrict__ z, int64_t begin, int64_t end, const StepCoeffs<acc>& st) {
  int64_t i = begin;
  while (i < end) {
    acc c1 = st.c1, c2 = st.c2;
    int64_t seg_end = end;
    if (st.per_row()) {
      const int64_t b = i / st.batch_row_len;
      seg_end = std::min(end, (b + 1) * st.batch_row_len);
      st.at_row(b, &c1, &c2);
    }
    const z_t* zz = z + (i - begin);
    const int64_t n = seg_end - i;
    scalar_t* o = out + i;
    const scalar_t* xx = x + i;
    const scalar_t* ss = s + i;
    for (int64_t k = 0; k < n; ++k) {
      o[k] = static_cast<scalar_t>(static_cast<acc>(xx[k]) + c1 * static_cast<acc>(ss[k]) +
                                   c2 * static_cast<acc>(zz[k]));
    }
    i = seg_end;
  }
}

// ---------------------------------------------------------------------------
// In-kernel noise: Philox normals for a tile of groups, written as plain loops
// over arrays so the compiler vectorises them (no libm calls: log and sincos
// are evaluated with the polynomials below, within ~1.5 ulp of libm, i.e.
// "within fp32 rounding of log/sin/cos" as DESIGN.md allows). Only IEEE
// +,-,*,/ and sqrt are used and no FMA contraction is possible, so every
// vector width gives the same bits. The uint32 words are those of
// csrc/include/pygen/philox.h exactly.
// ---------------------------------------------------------------------------
constexpr int64_t kTileGroups = 256;  // Philox groups per tile (1024 normals)

// No FMA contraction in this section, so the AVX-512 clone (which has FMA)
// gives the same bits as the AVX2 and baseline clones. Everything it calls is
// defined inside the section (same options, so it inlines).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
#define PYGEN_TILE_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#endif
#if !defined(PYGEN_TILE_CLONES) || !defined(__x86_64__) || !defined(__linux__)
#undef PYGEN_TILE_CLONES
#define PYGEN_TILE_CLONES
#endif

// ln(u) for u in (0, 1]: u = 2^e·m, m in [sqrt(1/2), sqrt(2)), f = m - 1,
// s = f/(2+f), ln(1+f) = 2·atanh(s) = f - s·(f - 2p), p = s²/3 + s⁴/5 + ... + s¹⁰/11
// (|s| < 0.172, truncation < 2e-9 relative); ln 2 split so e·ln2_hi is exact.
inline float log_open_unit(float u) {
  const uint32_t ix = __builtin_bit_cast(uint32_t, u) + (0x3F800000u - 0x3F3504F3u);
  const float e = static_cast<float>(static_cast<int32_t>(ix >> 23) - 127);
  const float f = __builtin_bit_cast(float, (ix & 0x007FFFFFu) + 0x3F3504F3u) - 1.0f;
  const float s = f / (2.0f + f);
  const float s2 = s * s;
  const float p =
      s2 * (1.0f / 3.0f + s2 * (1.0f / 5.0f + s2 * (1.0f / 7.0f + s2 * (1.0f / 9.0f + s2 * (1.0f / 11.0f)))));
  constexpr float kLn2Hi = 6.9313812256e-01f;  // 17 significant bits
  constexpr float kLn2Lo = 9.0580006145e-06f;
  return e * kLn2Hi + (f + (e * kLn2Lo - s * (f - 2.0f * p)));
}

// sin and cos of theta in [0, 2π]: theta = j·π/2 + y (Cody–Waite, π/2 in three
// fp32 parts, j·part exact for j <= 4), |y| <= π/4, Taylor polynomials to
// y⁹ / y¹⁰ (truncation < 3e-9), then the quadrant swap/sign of j.
inline void sincos_0_2pi(float theta, float* sin_out, float* cos_out) {
  const int32_t j = static_cast<int32_t>(theta * 0.636619772367581343f + 0.5f);
  const float jf = static_cast<float>(j);
  const float y = ((theta - jf * 1.5703125f) - jf * 4.837512969970703e-04f) - jf * 7.549790126404332e-08f;
  const float y2 = y * y;
  const float sp =
      y + y * y2 * (-1.0f / 6.0f + y2 * (1.0f / 120.0f + y2 * (-1.0f / 5040.0f + y2 * (1.0f / 362880.0f))));
  const float cp =
      1.0f - 0.5f * y2 +
      y2 * y2 * (1.0f / 24.0f + y2 * (-1.0f / 720.0f + y2 * (1.0f / 40320.0f + y2 * (-1.0f / 3628800.0f))));
  const float a = (j & 1) ? cp : sp;
  const float b = (j & 1) ? sp : cp;
  *sin_out = (j & 2) ? -a : a;
  *cos_out = ((j + 1) & 2) ? -b : b;
}

inline float open_uniform(uint32_t w) {
  return (static_cast<float>(w >> 8) + 0.5f) * 5.9604644775390625e-08f;  // as word_to_open_uniform
}

// z[4i + j] = normal j of Philox group g0 + i, for i < n <= kTileGroups.
PYGEN_TILE_CLONES void philox_normals_tile(float* __restrict__ z, uint64_t seed, uint64_t stream, int64_t g0, int64_t n) {
  uint32_t w0[kTileGroups], w1[kTileGroups], w2[kTileGroups], w3[kTileGroups];
  const uint32_t key0 = static_cast<uint32_t>(seed), key1 = static_cast<uint32_t>(seed >> 32);
  const uint32_t s0 = static_cast<uint32_t>(stream), s1 = static_cast<uint32_t>(stream >> 32);
  for (int64_t i = 0; i < kTileGroups; ++i) {  // philox4x32_10 of philox.h, one lane per group
    const uint64_t g = static_cast<uint64_t>(g0 + i);
    uint32_t c0 = static_cast<uint32_t>(g), c1 = static_cast<uint32_t>(g >> 32), c2 = s0, c3 = s1;
    uint32_t k0 = key0, k1 = key1;
    for (int round = 0; round < 10; ++round) {
      const uint64_t p0 = static_cast<uint64_t>(0xD2511F53u) * c0;
      const uint64_t p1 = static_cast<uint64_t>(0xCD9E8D57u) * c2;
      const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1 ^ k0;
      const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ k1;
      c1 = static_cast<uint32_t>(p1);
      c3 = static_cast<uint32_t>(p0);
      c0 = n0;
      c2 = n2;
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    w0[i] = c0;
    w1[i] = c1;
    w2[i] = c2;
    w3[i] = c3;
  }
  float r0[kTileGroups], r1[kTileGroups];
  for (int64_t i = 0; i < kTileGroups; ++i) {
    r0[i] = -2.0f * log_open_unit(open_uniform(w0[i]));
    r1[i] = -2.0f * log_open_unit(open_uniform(w2[i]));
  }
  // Scalar sqrt (errno semantics keep it out of the vector loops); cheap.
  for (int64_t i = 0; i < kTileGroups; ++i) {
    r0[i] = __builtin_sqrtf(r0[i]);
    r1[i] = __builtin_sqrtf(r1[i]);
  }
  float o0[kTileGroups], o1[kTileGroups], o2[kTileGroups], o3[kTileGroups];
  constexpr float kTwoPi = 6.28318530717958647692f;
  for (int64_t i = 0; i < kTileGroups; ++i) {
    float sa, ca, sb, cb;
    sincos_0_2pi(kTwoPi * open_uniform(w1[i]), &sa, &ca);
    sincos_0_2pi(kTwoPi * open_uniform(w3[i]), &sb, &cb);
    o0[i] = r0[i] * ca;
    o1[i] = r0[i] * sa;
    o2[i] = r1[i] * cb;
    o3[i] = r1[i] * sb;
  }
  for (int64_t i = 0; i < n; ++i) {
    z[4 * i] = o0[i];
    z[4 * i + 1] = o1[i];
    z[4 * i + 2] = o2[i];
    z[4 * i + 3] = o3[i];
  }
}

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif

template <typename scalar_t>
void langevin_cpu_kernel(const at::Tensor& x, const at::Tensor& score, const std::optional<at::Tensor>& step_sizes,
                         double step_size, const std::optional<at::Tensor>& noise, int64_t seed, int64_t stream,
                         const std::optional<at::Tensor>& row_seeds, at::Tensor& out) {
  using acc = acc_t<scalar_t>;
  const int64_t numel = x.numel();
  const int64_t batch = x.dim() > 0 ? x.size(0) : 1;
  StepCoeffs<acc> st;
  st.batch_row_len = numel / batch;
  if (step_sizes.has_value()) {
    if (step_sizes->scalar_type() == at::kFloat) {
      st.f32 = step_sizes->data_ptr<float>();
    } else {
      st.f64 = step_sizes->data_ptr<double>();
    }
  } else {
    st.c1 = static_cast<acc>(0.5 * step_size);
    st.c2 = static_cast<acc>(std::sqrt(step_size));
  }
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const scalar_t* sp = score.data_ptr<scalar_t>();
  scalar_t* op = out.data_ptr<scalar_t>();

  if (noise.has_value()) {
    const scalar_t* np = noise->data_ptr<scalar_t>();
    at::parallel_for(0, numel, kGrainElements, [&](int64_t begin, int64_t end) {
      update_range(op, xp, sp, np + begin, begin, end, st);
    });
    return;
  }

  const bool per_row_seed = row_seeds.has_value();
  const NoiseLayout layout = make_noise_layout(numel, batch, per_row_seed);
  const int64_t* seeds = per_row_seed ? row_seeds->data_ptr<int64_t>() : nullptr;
  at::parallel_for(0, layout.work_items(), kGrainElements / kGroup, [&](int64_t wb, int64_t we) {
    alignas(64) float zbuf[kTileGroups * kGroup];
    int64_t w = wb;
    while (w < we) {
      const int64_t r = w / layout.groups_per_row;
      const int64_t g0 = w - r * layout.groups_per_row;
      const int64_t g1 = std::min({g0 + kTileGroups, layout.groups_per_row, g0 + (we - w)});
      const uint64_t key = static_cast<uint64_t>(per_row_seed ? seeds[r] : seed);
      philox_normals_tile(zbuf, key, static_cast<uint64_t>(stream), g0, g1 - g0);
      const int64_t e0 = r * layout.row_len + g0 * kGroup;
      const int64_t e1 = r * layout.row_len + std::min(g1 * kGroup, layout.row_len);
      update_range(op, xp, sp, zbuf, e0, e1, st);
      w += g1 - g0;
    }
  });
}

at::Tensor langevin_step_cpu(const at::Tensor& x, const at::Tensor& score, const std::optional<at::Tensor>& step_sizes,
                             double step_size, const std::optional<at::Tensor>& noise, int64_t seed, int64_t stream,
                             const std::optional<at::Tensor>& row_seeds) {
  TORCH_CHECK(x.device().is_cpu(), "pygen: x must be a CPU tensor, got ", x.device());
  TORCH_CHECK(score.sizes() == x.sizes() && score.scalar_type() == x.scalar_type(),
              "pygen: score must have the shape and dtype of x");
  const int64_t batch = x.dim() > 0 ? x.size(0) : 1;
  const at::Tensor xc = x.contiguous();
  const at::Tensor sc = score.contiguous();
  check_cpu(sc, "score");
  std::optional<at::Tensor> nc, stc, rsc;
  if (noise.has_value()) {
    TORCH_CHECK(noise->sizes() == x.sizes() && noise->scalar_type() == x.scalar_type(),
                "pygen: noise must have the shape and dtype of x");
    nc = noise->contiguous();
    check_cpu(*nc, "noise");
  } else if (row_seeds.has_value()) {
    TORCH_CHECK(x.dim() > 0, "pygen: row_seeds needs x with a batch dimension");
    rsc = row_seeds->contiguous();
    check_cpu(*rsc, "row_seeds");
    TORCH_CHECK(rsc->scalar_type() == at::kLong && rsc->dim() == 1 && rsc->numel() == batch,
                "pygen: row_seeds must be 1-D int64 with one seed per row");
  }
  if (step_sizes.has_value()) {
    TORCH_CHECK(x.dim() > 0, "pygen: step_sizes needs x with a batch dimension");
    stc = step_sizes->contiguous();
    check_cpu(*stc, "step_sizes");
    TORCH_CHECK((stc->scalar_type() == at::kFloat || stc->scalar_type() == at::kDouble) && stc->dim() == 1 &&
                    stc->numel() == batch,
                "pygen: step_sizes must be 1-D float32/float64 with one step per row");
  } else {
    TORCH_CHECK(step_size >= 0.0, "pygen: step_size must be non-negative, got ", step_size);
  }
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "langevin_step_cpu", [&] {
    langevin_cpu_kernel<scalar_t>(xc, sc, stc, step_size, nc, seed, stream, rsc, out);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(pygen, CPU, m) { m.impl("langevin_step", &langevin_step_cpu); }

}  // namespace pygen::cpu
