// pygen/norm.h — per-element math of the norm family, shared by the C++ CPU
// (csrc/cpu/norm.cpp) and CUDA (csrc/cuda/norm.cu) kernels of
// torch.ops.pygen.adaln_modulate, gated_residual, group_norm and
// timestep_embedding (and their _backward ops). Torch reference:
// pygen/ops/norm.py; Triton twin: kernels/norm.py.
//
//   * SiLU and its derivative (GroupNorm + SiLU backward recomputes the
//     pre-activation a and multiplies the incoming gradient by silu'(a)).
//   * Chan's merge of (count, mean, M2) partial statistics (LayerNorm /
//     GroupNorm statistics from fixed tiles, merged in a fixed order).
//   * The sinusoidal timestep frequency f_k and argument a_k = scale·(t·f_k) in
//     diffusers' order of fp32 operations (fp64 for fp64 timesteps).
#pragma once
#include <cmath>
#include <cstdint>

#include "pygen/common.h"

namespace pygen {

PYGEN_HD float norm_exp(float v) { return expf(v); }
PYGEN_HD double norm_exp(double v) { return exp(v); }
PYGEN_HD float norm_sqrt(float v) { return sqrtf(v); }
PYGEN_HD double norm_sqrt(double v) { return sqrt(v); }
PYGEN_HD float norm_sin(float v) { return sinf(v); }
PYGEN_HD double norm_sin(double v) { return sin(v); }
PYGEN_HD float norm_cos(float v) { return cosf(v); }
PYGEN_HD double norm_cos(double v) { return cos(v); }

// 1 / sqrt(var + eps) (IEEE sqrt and division).
template <typename acc>
PYGEN_HD acc norm_rstd(acc var, acc eps) {
  return static_cast<acc>(1) / norm_sqrt(var + eps);
}

template <typename acc>
PYGEN_HD acc silu(acc a) {
  return a / (static_cast<acc>(1) + norm_exp(-a));
}

// d silu(a) / da = σ(a)·(1 + a·(1 - σ(a))).
template <typename acc>
PYGEN_HD acc silu_grad(acc a) {
  const acc sig = static_cast<acc>(1) / (static_cast<acc>(1) + norm_exp(-a));
  return sig * (static_cast<acc>(1) + a * (static_cast<acc>(1) - sig));
}

// Partial statistics of a set of values: count, mean, sum of squared deviations.
template <typename acc>
struct MomentStats {
  acc count;
  acc mean;
  acc m2;
};

// Merge b into a (Chan et al.); an empty side leaves the other unchanged.
template <typename acc>
PYGEN_HD void merge_moments(MomentStats<acc>& a, const MomentStats<acc>& b) {
  if (b.count == static_cast<acc>(0)) return;
  if (a.count == static_cast<acc>(0)) {
    a = b;
    return;
  }
  const acc n = a.count + b.count;
  const acc delta = b.mean - a.mean;
  a.mean = a.mean + delta * (b.count / n);
  a.m2 = a.m2 + b.m2 + delta * delta * (a.count * b.count / n);
  a.count = n;
}

// The constants of the timestep frequencies in the arithmetic type acc:
// c = -ln(max_period), d = half - downscale_freq_shift (each rounded to acc
// once, as diffusers' fp32 tensor ops round the Python floats), s = scale.
template <typename acc>
struct TimestepConstants {
  acc c, d, s;
  int64_t half;
};

template <typename acc>
inline TimestepConstants<acc> timestep_constants(int64_t dim, double max_period, double downscale_freq_shift,
                                                 double scale) {
  const int64_t half = dim / 2;
  return {static_cast<acc>(-std::log(max_period)), static_cast<acc>(static_cast<double>(half) - downscale_freq_shift),
          static_cast<acc>(scale), half};
}

// f_k = exp((c·k) / d): the products and quotient rounded to acc in diffusers' order.
template <typename acc>
PYGEN_HD acc timestep_frequency(const TimestepConstants<acc>& tc, int64_t k) {
  const acc e = tc.c * static_cast<acc>(k);
  return norm_exp(e / tc.d);
}

// a_k = scale·(t·f_k).
template <typename acc>
PYGEN_HD acc timestep_argument(const TimestepConstants<acc>& tc, acc t, acc f) {
  return tc.s * (t * f);
}

}  // namespace pygen
