// csrc/cpu/philox_cpu.cpp — vectorised CPU generation of pygen's Philox normals.
//
// fill_normals() (declared in cpu_common.h) gives the numbers of
// csrc/include/pygen/philox.h: bit-identical uint32 words, and normals within
// fp32 rounding of log/sin/cos (evaluated with the polynomials below, ~1.5 ulp
// of libm, as DESIGN.md allows). Only IEEE +,-,*,/ and sqrt are used and no
// FMA contraction is possible, so every clone (AVX-512, AVX2, baseline) gives
// the same bits. All C++ CPU ops that draw noise go through fill_normals.
#include <cstdint>
#include <cstring>

#include "cpu_common.h"

namespace pygen::cpu {
namespace {

constexpr int64_t kTileGroups = kNoiseTileGroups;

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
  return (static_cast<float>(w >> 9) + 0.5f) * 1.1920928955078125e-07f;  // as word_to_open_uniform
}

// z[4i + j] = normal j of Philox group g0 + i, for i < n <= kTileGroups.
PYGEN_TILE_CLONES void philox_normals_tile(float* __restrict__ z, uint64_t seed, uint64_t stream, int64_t g0, int64_t n) {
  const int64_t m = (n + 15) & ~int64_t{15};  // lanes computed: n rounded up for the vector loops
  uint32_t w0[kTileGroups], w1[kTileGroups], w2[kTileGroups], w3[kTileGroups];
  const uint32_t key0 = static_cast<uint32_t>(seed), key1 = static_cast<uint32_t>(seed >> 32);
  const uint32_t s0 = static_cast<uint32_t>(stream), s1 = static_cast<uint32_t>(stream >> 32);
  for (int64_t i = 0; i < m; ++i) {  // philox4x32_10 of philox.h, one lane per group
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
  for (int64_t i = 0; i < m; ++i) {
    r0[i] = -2.0f * log_open_unit(open_uniform(w0[i]));
    r1[i] = -2.0f * log_open_unit(open_uniform(w2[i]));
  }
  // Scalar sqrt (errno semantics keep it out of the vector loops); cheap.
  for (int64_t i = 0; i < m; ++i) {
    r0[i] = __builtin_sqrtf(r0[i]);
    r1[i] = __builtin_sqrtf(r1[i]);
  }
  float o0[kTileGroups], o1[kTileGroups], o2[kTileGroups], o3[kTileGroups];
  constexpr float kTwoPi = 6.28318530717958647692f;
  for (int64_t i = 0; i < m; ++i) {
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

}  // namespace

void fill_normals(uint64_t seed, uint64_t stream, uint64_t first_group, int64_t count, float* out) {
  alignas(64) float tile[kTileGroups * kGroup];
  for (int64_t done = 0; done < count; done += kTileGroups * kGroup) {
    const int64_t n = count - done < kTileGroups * kGroup ? count - done : kTileGroups * kGroup;
    const int64_t groups = (n + kGroup - 1) / kGroup;
    const int64_t g0 = static_cast<int64_t>(first_group) + done / kGroup;
    if (n % kGroup == 0) {
      philox_normals_tile(out + done, seed, stream, g0, groups);
    } else {
      philox_normals_tile(tile, seed, stream, g0, groups);
      std::memcpy(out + done, tile, sizeof(float) * n);
    }
  }
}

}  // namespace pygen::cpu
