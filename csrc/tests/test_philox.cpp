// csrc/tests/test_philox.cpp — ctest for csrc/include/pygen/philox.h (no torch).
//
// * Philox4x32-10 against the Random123 known-answer vectors (kat_vectors,
//   philox4x32_10 rows): counter c0..c3, key k0 k1 -> four output words.
// * philox_group_words: how (seed, stream, group) map onto counter and key.
// * word_to_open_uniform: in (0, 1], the centre of its 24-bit bin (see below).
// * words_to_normals: the Box–Muller formulas of the header, in double.
#include <cmath>
#include <cstdint>
#include <limits>

#include "check.h"
#include "pygen/philox.h"

using pygen::Words4;

static void check_words(const Words4& got, uint32_t e0, uint32_t e1, uint32_t e2, uint32_t e3,
                        const char* what) {
  PYGEN_CHECK(got.w[0] == e0 && got.w[1] == e1 && got.w[2] == e2 && got.w[3] == e3, what, std::hex,
              " got ", got.w[0], " ", got.w[1], " ", got.w[2], " ", got.w[3], " want ", e0, " ", e1,
              " ", e2, " ", e3);
}

static void test_known_answers() {
  check_words(pygen::philox4x32_10(0, 0, 0, 0, 0, 0), 0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu,
              0x9b00dbd8u, "zeros");
  check_words(pygen::philox4x32_10(0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu,
                                   0xffffffffu),
              0x408f276du, 0x41c83b0eu, 0xa20bc7c6u, 0x6d5451fdu, "all ones");
  check_words(pygen::philox4x32_10(0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u, 0xa4093822u,
                                   0x299f31d0u),
              0xd16cfe09u, 0x94fdccebu, 0x5001e420u, 0x24126ea1u, "pi digits");
}

static void test_group_words_layout() {
  // counter = (group_lo, group_hi, stream_lo, stream_hi), key = (seed_lo, seed_hi)
  const uint64_t seed = 0x299f31d0a4093822ull, stream = 0x0370734413198a2eull,
                 group = 0x85a308d3243f6a88ull;
  check_words(pygen::philox_group_words(seed, stream, group), 0xd16cfe09u, 0x94fdccebu, 0x5001e420u,
              0x24126ea1u, "philox_group_words(pi digits)");
  check_words(pygen::philox_group_words(~0ull, ~0ull, ~0ull), 0x408f276du, 0x41c83b0eu, 0xa20bc7c6u,
              0x6d5451fdu, "philox_group_words(all ones)");
  check_words(pygen::philox_group_words(0, 0, 0), 0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu, 0x9b00dbd8u,
              "philox_group_words(zeros)");
  // Any change of seed, stream or group (either half) changes the words.
  const Words4 base = pygen::philox_group_words(1, 2, 3);
  const Words4 other[] = {pygen::philox_group_words(1ull | (1ull << 32), 2, 3),
                          pygen::philox_group_words(1, 2ull | (1ull << 32), 3),
                          pygen::philox_group_words(1, 2, 3ull | (1ull << 32)),
                          pygen::philox_group_words(0, 2, 3), pygen::philox_group_words(1, 3, 3),
                          pygen::philox_group_words(1, 2, 4)};
  for (const Words4& o : other) {
    PYGEN_CHECK(o.w[0] != base.w[0] || o.w[1] != base.w[1] || o.w[2] != base.w[2] || o.w[3] != base.w[3],
                "words must depend on every counter/key half");
  }
}

static void test_uniform() {
  // u(w) = (float(w >> 9) + 0.5f) * 2^-23: the top 23 bits, centred in their
  // bin. (w >> 9) + 0.5 needs 24 significant bits, so it is exact in fp32 over
  // the whole range, and u lies in [2^-24, 1 - 2^-24].
  constexpr double kBin = 1.0 / 8388608.0;  // 2^-23
  const float lo = pygen::word_to_open_uniform(0u);
  PYGEN_CHECK_EQ(lo, 0.5f * 1.1920928955078125e-07f);               // 2^-24 > 0: log finite
  PYGEN_CHECK_EQ(pygen::word_to_open_uniform(0x000001ffu), lo);      // low 9 bits ignored
  PYGEN_CHECK_EQ(pygen::word_to_open_uniform(0x00000200u) - lo, 1.1920928955078125e-07f);
  int64_t bad = 0;
  float prev = 0.0f;
  for (uint64_t k = 0; k < (1u << 23); k += 2053) {
    const uint32_t w = static_cast<uint32_t>(k << 9) | 0x15au;
    const float u = pygen::word_to_open_uniform(w);
    const double centre = (static_cast<double>(k) + 0.5) * kBin;
    bad += !(u > 0.0f && u < 1.0f && u > prev) || static_cast<double>(u) != centre;
    prev = u;
  }
  PYGEN_CHECK_EQ(bad, int64_t{0});
  const float hi = pygen::word_to_open_uniform(0xffffffffu);
  PYGEN_CHECK_EQ(static_cast<double>(hi), 1.0 - 0.5 * kBin);  // strictly below 1
  const pygen::Normals4 z = pygen::words_to_normals(Words4{{0xffffffffu, 0xffffffffu, 0u, 0u}});
  for (int j = 0; j < 4; ++j) PYGEN_CHECK(std::isfinite(z.z[j]), "extreme words give non-finite z[", j, "]");
  PYGEN_CHECK(z.z[0] != 0.0f || z.z[1] != 0.0f, "u < 1 keeps the radius positive");
  PYGEN_CHECK_NEAR(z.z[2], std::sqrt(-2.0 * std::log(std::ldexp(1.0, -24))), 1e-5);  // largest radius
}

static void test_box_muller_formula() {
  // The fp32 header math against the Box–Muller formulas in double, fed with
  // the same fp32 uniforms: cos/sin/log of fp32 arguments agree to a few ulp.
  const double two_pi = 6.283185307179586476925;
  int64_t bad = 0;
  for (uint64_t g = 0; g < 4096; ++g) {
    const Words4 w = pygen::philox_group_words(0x5eedull, 7, g);
    const pygen::Normals4 z = pygen::words_to_normals(w);
    for (int pair = 0; pair < 2; ++pair) {
      const double u1 = pygen::word_to_open_uniform(w.w[2 * pair]);
      const double u2 = pygen::word_to_open_uniform(w.w[2 * pair + 1]);
      const double r = std::sqrt(-2.0 * std::log(u1));
      const double c = r * std::cos(two_pi * u2), s = r * std::sin(two_pi * u2);
      // relative error of r and an absolute error of theta (rounded to fp32)
      const double tol_c = 4e-6 * std::fabs(c) + 1e-6 * r;
      const double tol_s = 4e-6 * std::fabs(s) + 1e-6 * r;
      bad += !(std::fabs(z.z[2 * pair] - c) <= tol_c && std::fabs(z.z[2 * pair + 1] - s) <= tol_s);
    }
  }
  PYGEN_CHECK_EQ(bad, int64_t{0});
  // philox_normals == words_to_normals(philox_group_words)
  const pygen::Normals4 a = pygen::philox_normals(42, 3, 99);
  const pygen::Normals4 b = pygen::words_to_normals(pygen::philox_group_words(42, 3, 99));
  for (int j = 0; j < 4; ++j) PYGEN_CHECK_EQ(a.z[j], b.z[j]);
}

int main() {
  test_known_answers();
  test_group_words_layout();
  test_uniform();
  test_box_muller_formula();
  return pygen_test::finish("test_philox");
}
