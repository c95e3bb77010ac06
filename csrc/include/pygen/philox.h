// pygen/philox.h — counter-based Gaussian noise (header-only, CPU and CUDA).
//
// Contract (shared/DESIGN.md, "Random numbers"):
//   * Philox4x32-10 (Salmon et al., SC'11), key = 64-bit seed (k0 = low word).
//   * counter = (group_lo, group_hi, stream_lo, stream_hi), where group is the
//     element index // 4 and stream a 64-bit stream id (e.g. a step number).
//   * the four words of one call give four normals via two Box–Muller pairs:
//       element 4g+0 = r(w0)·cos(2π u(w1)),  4g+1 = r(w0)·sin(2π u(w1)),
//       element 4g+2 = r(w2)·cos(2π u(w3)),  4g+3 = r(w2)·sin(2π u(w3)),
//     with u(w) = ((w >> 9) + 0.5) · 2^-23 in (0, 1) (exact in fp32) and
//     r(w) = sqrt(-2 ln u(w)).
//   * All arithmetic after the words is fp32, so every backend agrees to
//     within fp32 rounding of log/sin/cos; the words are bit-identical.
// The Triton twin is kernels/random.py, the torch reference pygen/ops/random.py.
#pragma once
#include <cmath>
#include <cstdint>

#include "pygen/common.h"

namespace pygen {

struct Words4 {
  uint32_t w[4];
};

PYGEN_HD void mulhilo32(uint32_t a, uint32_t b, uint32_t* hi, uint32_t* lo) {
  const uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  *hi = static_cast<uint32_t>(p >> 32);
  *lo = static_cast<uint32_t>(p);
}

// Philox4x32 with 10 rounds.
PYGEN_HD Words4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                              uint32_t k1) {
  constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;
  constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      k0 += kW0;
      k1 += kW1;
    }
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo32(kM0, c0, &hi0, &lo0);
    mulhilo32(kM1, c2, &hi1, &lo1);
    const uint32_t n0 = hi1 ^ c1 ^ k0;
    const uint32_t n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
  }
  return Words4{{c0, c1, c2, c3}};
}

// The four words for element group `group` of stream `stream` under `seed`.
PYGEN_HD Words4 philox_group_words(uint64_t seed, uint64_t stream, uint64_t group) {
  return philox4x32_10(static_cast<uint32_t>(group), static_cast<uint32_t>(group >> 32),
                       static_cast<uint32_t>(stream), static_cast<uint32_t>(stream >> 32),
                       static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

// uint32 word -> uniform in (0, 1): the top 23 bits, centred in their bin.
// (w >> 9) + 0.5 needs 24 significant bits, so every step is exact in fp32 and
// u lies in [2^-24, 1 - 2^-24].
PYGEN_HD float word_to_open_uniform(uint32_t w) {
  return (static_cast<float>(w >> 9) + 0.5f) * 1.1920928955078125e-07f;  // 2^-23
}

struct Normals4 {
  float z[4];
};

PYGEN_HD Normals4 words_to_normals(const Words4& words) {
  constexpr float kTwoPi = 6.28318530717958647692f;
  Normals4 out;
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int pair = 0; pair < 2; ++pair) {
    const float u1 = word_to_open_uniform(words.w[2 * pair]);
    const float u2 = word_to_open_uniform(words.w[2 * pair + 1]);
    const float r = sqrtf(-2.0f * logf(u1));
    const float theta = kTwoPi * u2;
    out.z[2 * pair] = r * cosf(theta);
    out.z[2 * pair + 1] = r * sinf(theta);
  }
  return out;
}

// Four standard normals for element group `group` (elements 4g .. 4g+3).
PYGEN_HD Normals4 philox_normals(uint64_t seed, uint64_t stream, uint64_t group) {
  return words_to_normals(philox_group_words(seed, stream, group));
}

}  // namespace pygen
