// csrc/cpu/philox_cpu.cpp — vectorised CPU generation of pygen's Philox normals.
//
// Same numbers as csrc/include/pygen/philox.h (bit-identical uint32 words;
// normals within fp32 rounding of log/sin/cos), computed 8 Philox groups at a
// time with GCC/Clang vector extensions, and branch-free polynomial log and
// sin/cos (Cephes-style minimax coefficients, about 1 ulp).
// Compiled twice (AVX2+FMA and baseline) with target_clones; the loader picks
// the one the CPU supports.
#include <cstdint>
#include <cstring>

#include "cpu_common.h"

namespace pygen::cpu {
namespace {

// 8-lane GCC/Clang vector types (AVX2 registers; two SSE registers in the baseline clone).
typedef uint32_t u32x8 __attribute__((vector_size(32)));
typedef int32_t i32x8 __attribute__((vector_size(32)));
typedef uint64_t u64x4 __attribute__((vector_size(32)));
typedef float f32x8 __attribute__((vector_size(32)));

constexpr int kLanes = 8;

#define PYGEN_INLINE inline __attribute__((always_inline))

PYGEN_INLINE void mulhilo(u32x8 a, uint32_t m, u32x8* hi, u32x8* lo) {
  *lo = a * m;
  const u64x4 even = reinterpret_cast<u64x4&>(a) & 0xffffffffull;  // lanes 0,2,4,6
  const u64x4 odd = reinterpret_cast<u64x4&>(a) >> 32;             // lanes 1,3,5,7
  const u64x4 pe = even * static_cast<uint64_t>(m);
  const u64x4 po = odd * static_cast<uint64_t>(m);
  const u64x4 h = (pe >> 32) | (po & 0xffffffff00000000ull);
  *hi = reinterpret_cast<const u32x8&>(h);
}

PYGEN_INLINE f32x8 open_uniform(u32x8 w) {
  const i32x8 top = reinterpret_cast<i32x8>(w >> 8);
  return (__builtin_convertvector(top, f32x8) + 0.5f) * 5.9604644775390625e-08f;
}

PYGEN_INLINE f32x8 log_open01(f32x8 x) {  // x in (0, 1], normal numbers
  u32x8 bits = reinterpret_cast<u32x8>(x);
  const i32x8 e = reinterpret_cast<i32x8>((bits >> 23) & 0xffu) - 126;  // x = m * 2^e, m in [0.5, 1)
  bits = (bits & 0x007fffffu) | 0x3f000000u;
  const f32x8 m = reinterpret_cast<f32x8>(bits);
  const i32x8 small = m < 0.70710678118654752f;  // all-ones where true
  const f32x8 ef = __builtin_convertvector(e + small, f32x8);  // small: e - 1
  const f32x8 f = small ? (m + m - 1.0f) : (m - 1.0f);
  const f32x8 z = f * f;
  f32x8 p = f * 7.0376836292e-2f - 1.1514610310e-1f;
  p = p * f + 1.1676998740e-1f;
  p = p * f - 1.2420140846e-1f;
  p = p * f + 1.4249322787e-1f;
  p = p * f - 1.6668057665e-1f;
  p = p * f + 2.0000714765e-1f;
  p = p * f - 2.4999993993e-1f;
  p = p * f + 3.3333331174e-1f;
  f32x8 y = p * f * z;
  y += ef * -2.12194440e-4f;
  y += z * -0.5f;
  return f + y + ef * 0.693359375f;
}

PYGEN_INLINE void sincos_0_2pi(f32x8 x, f32x8* s, f32x8* c) {  // x in [0, 2*pi]
  i32x8 j = __builtin_convertvector(x * 1.27323954473516f, i32x8);  // x * 4/pi, truncated
  j += j & 1;
  const f32x8 y = __builtin_convertvector(j, f32x8);
  const f32x8 r = ((x - y * 0.78515625f) - y * 2.4187564849853515625e-4f) - y * 3.77489497744594108e-8f;
  const f32x8 z = r * r;
  const f32x8 sp = ((z * -1.9515295891e-4f + 8.3321608736e-3f) * z - 1.6666654611e-1f) * z * r + r;
  const f32x8 cp = ((z * 2.443315711809948e-5f - 1.388731625493765e-3f) * z + 4.166664568298827e-2f) * z * z -
                   z * 0.5f + 1.0f;
  const i32x8 q = (j >> 1) & 3;  // x = q*pi/2 + r
  const i32x8 odd = (q & 1) != 0;
  const f32x8 sv = odd ? cp : sp;
  const f32x8 cv = odd ? sp : cp;
  *s = ((q & 2) != 0) ? -sv : sv;
  *c = (((q + 1) & 2) != 0) ? -cv : cv;
}

PYGEN_INLINE f32x8 sqrt8(f32x8 v) {
  f32x8 r;
  for (int k = 0; k < kLanes; ++k) r[k] = __builtin_sqrtf(v[k]);
  return r;
}

// 8 groups = 32 normals, planar: out[j * 8 + i] is element 4*(g0+i)+j.
PYGEN_INLINE void philox_block(uint32_t k0, uint32_t k1, uint32_t s0, uint32_t s1, uint64_t g0, float* out) {
  u32x8 c0, c1;
  for (int i = 0; i < kLanes; ++i) {
    const uint64_t g = g0 + static_cast<uint64_t>(i);
    c0[i] = static_cast<uint32_t>(g);
    c1[i] = static_cast<uint32_t>(g >> 32);
  }
  u32x8 c2 = u32x8{} + s0, c3 = u32x8{} + s1;
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    u32x8 hi0, lo0, hi1, lo1;
    mulhilo(c0, 0xD2511F53u, &hi0, &lo0);
    mulhilo(c2, 0xCD9E8D57u, &hi1, &lo1);
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
  }
  constexpr float kTwoPi = 6.28318530717958647692f;
  const f32x8 r0 = sqrt8(log_open01(open_uniform(c0)) * -2.0f);
  const f32x8 r1 = sqrt8(log_open01(open_uniform(c2)) * -2.0f);
  f32x8 s0v, c0v, s1v, c1v;
  sincos_0_2pi(open_uniform(c1) * kTwoPi, &s0v, &c0v);
  sincos_0_2pi(open_uniform(c3) * kTwoPi, &s1v, &c1v);
  const f32x8 z0 = r0 * c0v, z1 = r0 * s0v, z2 = r1 * c1v, z3 = r1 * s1v;
  __builtin_memcpy(out + 0 * kLanes, &z0, sizeof z0);
  __builtin_memcpy(out + 1 * kLanes, &z1, sizeof z1);
  __builtin_memcpy(out + 2 * kLanes, &z2, sizeof z2);
  __builtin_memcpy(out + 3 * kLanes, &z3, sizeof z3);
}

}  // namespace

__attribute__((target_clones("avx2", "default"))) void fill_normals(uint64_t seed, uint64_t stream,
                                                                     uint64_t first_group, int64_t count,
                                                                     float* out) {
  const uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  const uint32_t s0 = static_cast<uint32_t>(stream), s1 = static_cast<uint32_t>(stream >> 32);
  constexpr int64_t kPerBlock = kGroup * kLanes;
  float planar[kPerBlock];
  for (int64_t done = 0; done < count; done += kPerBlock) {
    philox_block(k0, k1, s0, s1, first_group + static_cast<uint64_t>(done / kGroup), planar);
    const int64_t n = count - done < kPerBlock ? count - done : kPerBlock;
    if (n == kPerBlock) {
      for (int i = 0; i < kLanes; ++i)
        for (int j = 0; j < kGroup; ++j) out[done + i * kGroup + j] = planar[j * kLanes + i];
    } else {
      for (int64_t e = 0; e < n; ++e) out[done + e] = planar[(e % kGroup) * kLanes + e / kGroup];
    }
  }
}

}  // namespace pygen::cpu
