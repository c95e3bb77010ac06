// pygen/forward.h — per-element math of the forward (noising) ops, shared by
// the C++ CPU (csrc/cpu/forward.cpp) and CUDA (csrc/cuda/forward.cu) kernels of
// torch.ops.pygen.q_sample and torch.ops.pygen.reparameterize.
//
// q_sample, for batch row b with timestep t_b and noise eps:
//   x_t = a·x0 + s·eps
//   vp   (interpolation 0, table = alphas_cumprod): a = sqrt(abar[t_b]), s = sqrt(1 - abar[t_b])
//   flow (interpolation 1, table = sigmas):         a = 1 - sigma[t_b],   s = sigma[t_b]
// Training targets (same pass): eps; v = a·eps - s·x0; x0; flow velocity eps - x0.
// An out-of-range t_b is never dereferenced: the row's coefficients become NaN
// (and the caller writes NaN to the row's x_t and target).
// The coefficients are computed in double when the table or the storage is
// double, else in float, and then used in the kernel's arithmetic type.
//
// reparameterize: z = mu + exp(logvar / 2)·eps.
// The torch reference of all of this is pygen/ops/forward.py, the Triton twin kernels/forward.py.
#pragma once
#include <cmath>
#include <cstdint>
#include <limits>

#include "pygen/common.h"

namespace pygen {

enum ForwardInterpolation : int { kInterpVP = 0, kInterpFlow = 1 };
enum ForwardTarget : int { kTargetNone = 0, kTargetEps = 1, kTargetV = 2, kTargetX0 = 3, kTargetFlow = 4 };

PYGEN_HD float forward_sqrt(float v) { return sqrtf(v); }
PYGEN_HD double forward_sqrt(double v) { return sqrt(v); }
PYGEN_HD float forward_exp(float v) { return expf(v); }
PYGEN_HD double forward_exp(double v) { return exp(v); }

template <typename T>
struct ForwardCoefficients {
  T a;         // weight of x0
  T s;         // weight of the noise
  bool valid;  // t was inside the table
};

// Coefficients (a, s) for one table entry `level`, computed in coef_t.
template <typename coef_t>
PYGEN_HD void forward_coefficients(coef_t level, int interpolation, coef_t* a, coef_t* s) {
  if (interpolation == kInterpFlow) {
    *a = coef_t(1) - level;
    *s = level;
  } else {
    *a = forward_sqrt(level);
    *s = forward_sqrt(coef_t(1) - level);
  }
}

// Gather the coefficients of timestep `t` from `table` (n_table entries). An
// out-of-range t is not dereferenced and gives NaN coefficients, valid = false.
template <typename acc_t, typename coef_t, typename table_t>
PYGEN_HD ForwardCoefficients<acc_t> gather_forward_coefficients(int64_t t, const table_t* table, int64_t n_table,
                                                                int interpolation) {
  ForwardCoefficients<acc_t> c;
  if (t < 0 || t >= n_table) {
    c.a = std::numeric_limits<acc_t>::quiet_NaN();
    c.s = std::numeric_limits<acc_t>::quiet_NaN();
    c.valid = false;
    return c;
  }
  coef_t a, s;
  forward_coefficients<coef_t>(static_cast<coef_t>(table[t]), interpolation, &a, &s);
  c.a = static_cast<acc_t>(a);
  c.s = static_cast<acc_t>(s);
  c.valid = true;
  return c;
}

// x_t = a·x0 + s·eps (two products, then the sum, as the eager composite).
template <typename acc_t>
PYGEN_HD acc_t forward_x_t(acc_t a, acc_t s, acc_t x0, acc_t eps) {
  return a * x0 + s * eps;
}

// The training target TARGET (a ForwardTarget other than kTargetNone).
template <int TARGET, typename acc_t>
PYGEN_HD acc_t forward_target(acc_t a, acc_t s, acc_t x0, acc_t eps) {
  if constexpr (TARGET == kTargetEps) {
    return eps;
  } else if constexpr (TARGET == kTargetV) {
    return a * eps - s * x0;
  } else if constexpr (TARGET == kTargetX0) {
    return x0;
  } else {
    return eps - x0;
  }
}

// z = mu + exp(logvar / 2)·eps.
template <typename acc_t>
PYGEN_HD acc_t reparameterize_value(acc_t mu, acc_t logvar, acc_t eps) {
  return mu + forward_exp(logvar * acc_t(0.5)) * eps;
}

}  // namespace pygen
