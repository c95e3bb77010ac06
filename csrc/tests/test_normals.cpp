// csrc/tests/test_normals.cpp — ctest: statistics of philox_normals (pygen/philox.h), no torch.
//
// 2^20 normals from one (seed, stream): all finite and bounded by the largest
// Box–Muller radius sqrt(-2 ln 2^-25); mean, variance, skewness and kurtosis
// within 5 standard errors of N(0, 1); the empirical CDF at a few points
// within 5 standard errors of Phi; the four outputs of one call and outputs
// of neighbouring seeds/streams uncorrelated.
#include <cmath>
#include <cstdint>
#include <vector>

#include "check.h"
#include "pygen/philox.h"

namespace {

constexpr int64_t kGroups = 1 << 18;  // 2^20 normals
constexpr int64_t kN = kGroups * 4;

std::vector<float> draw(uint64_t seed, uint64_t stream) {
  std::vector<float> z(kN);
  for (int64_t g = 0; g < kGroups; ++g) {
    const pygen::Normals4 n = pygen::philox_normals(seed, stream, static_cast<uint64_t>(g));
    for (int j = 0; j < 4; ++j) z[4 * g + j] = n.z[j];
  }
  return z;
}

double correlation(const std::vector<float>& a, const std::vector<float>& b, int64_t offset_a,
                   int64_t offset_b, int64_t stride) {
  double sab = 0, saa = 0, sbb = 0;
  int64_t n = 0;
  for (int64_t i = 0; offset_a + i * stride < kN && offset_b + i * stride < kN; ++i, ++n) {
    const double x = a[offset_a + i * stride], y = b[offset_b + i * stride];
    sab += x * y;
    saa += x * x;
    sbb += y * y;
  }
  return sab / std::sqrt(saa * sbb);
}

void test_moments(uint64_t seed, uint64_t stream) {
  const std::vector<float> z = draw(seed, stream);
  const double r_max = std::sqrt(-2.0 * std::log(std::ldexp(1.0, -25)));  // 5.8870...
  int64_t bad = 0;
  double s1 = 0, s2 = 0, s3 = 0, s4 = 0;
  for (float v : z) {
    if (!std::isfinite(v) || std::fabs(v) > r_max + 1e-5) ++bad;
    const double x = v;
    s1 += x;
    s2 += x * x;
    s3 += x * x * x;
    s4 += x * x * x * x;
  }
  PYGEN_CHECK_EQ(bad, int64_t{0});
  const double n = static_cast<double>(kN);
  const double mean = s1 / n, m2 = s2 / n, m3 = s3 / n, m4 = s4 / n;
  const double var = m2 - mean * mean;
  const double skew = (m3 - 3 * mean * m2 + 2 * mean * mean * mean) / std::pow(var, 1.5);
  const double kurt = m4 / (var * var);  // ~ 3 (mean ~ 0)
  PYGEN_CHECK_NEAR(mean, 0.0, 5.0 / std::sqrt(n));
  PYGEN_CHECK_NEAR(var, 1.0, 5.0 * std::sqrt(2.0 / n));
  PYGEN_CHECK_NEAR(skew, 0.0, 5.0 * std::sqrt(6.0 / n));
  PYGEN_CHECK_NEAR(kurt, 3.0, 5.0 * std::sqrt(24.0 / n));

  for (double x : {-2.5, -1.0, -0.3, 0.0, 0.7, 1.5, 3.0}) {
    int64_t below = 0;
    for (float v : z) below += v <= x;
    const double p = 0.5 * std::erfc(-x / std::sqrt(2.0));
    PYGEN_CHECK_NEAR(below / n, p, 5.0 * std::sqrt(p * (1 - p) / n) + 1e-7);
  }
  // the four outputs of one call: pairwise uncorrelated
  for (int a = 0; a < 4; ++a)
    for (int b = a + 1; b < 4; ++b)
      PYGEN_CHECK_NEAR(correlation(z, z, a, b, 4), 0.0, 5.0 / std::sqrt(n / 4));
  // neighbouring groups uncorrelated
  PYGEN_CHECK_NEAR(correlation(z, z, 0, 4, 1), 0.0, 5.0 / std::sqrt(n));
}

void test_independence() {
  const std::vector<float> base = draw(1234, 0);
  const std::vector<float> other_seed = draw(1235, 0);
  const std::vector<float> other_stream = draw(1234, 1);
  const double n = static_cast<double>(kN);
  PYGEN_CHECK_NEAR(correlation(base, other_seed, 0, 0, 1), 0.0, 5.0 / std::sqrt(n));
  PYGEN_CHECK_NEAR(correlation(base, other_stream, 0, 0, 1), 0.0, 5.0 / std::sqrt(n));
  int64_t same = 0;
  for (int64_t i = 0; i < kN; ++i) same += base[i] == other_seed[i] || base[i] == other_stream[i];
  PYGEN_CHECK(same < 64, "identical draws across seeds/streams: ", same);
}

}  // namespace

int main() {
  test_moments(0, 0);
  test_moments(0x9e3779b97f4a7c15ull, 0xffffffffffffffffull);
  test_independence();
  return pygen_test::finish("test_normals");
}
