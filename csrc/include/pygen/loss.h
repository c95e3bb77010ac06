// pygen/loss.h — per-element math of the fused training-loss ops, shared by the
// C++ CPU (csrc/cpu/loss.cpp) and CUDA (csrc/cuda/loss.cu) kernels of
// torch.ops.pygen.diffusion_loss(_backward) and torch.ops.pygen.reparameterize_kl(_backward).
//
// diffusion_loss, batch row b with coeffs[b] = [m, ca, cb, w], n elements per row:
//   r = m·model_out - ca·x0 - cb·eps                 (residual against the target)
//   loss[b] = w · (Σ_i r² / n)
//   d loss[b] / d model_out = k·r,  k = grad_rows[b]·w·2·m / n
// reparameterize_kl, std = exp(logvar / 2):
//   z = mu + std·eps;  kl[b] = 0.5 · Σ_i ((mu² + std²) - 1 - logvar)
//   dmu = grad_z + grad_kl[b]·mu;  dlogvar = grad_z·std·eps·0.5 + grad_kl[b]·(0.5·(std² - 1))
// Operations are written in the order of the torch reference (pygen/ops/loss.py);
// the Triton twin is kernels/loss.py.
#pragma once
#include <cmath>
#include <cstdint>

#include "pygen/common.h"

namespace pygen {

// Columns of the (B, 4) coefficient table.
enum LossCoeffColumn : int { kLossColM = 0, kLossColCa = 1, kLossColCb = 2, kLossColW = 3, kLossCols = 4 };

PYGEN_HD float loss_exp(float v) { return expf(v); }
PYGEN_HD double loss_exp(double v) { return exp(v); }

template <typename acc>
struct LossRowCoeffs {
  acc m, ca, cb, w;
};

// Row b of the coefficient table (float or double), in acc.
template <typename acc, typename coef_t>
PYGEN_HD LossRowCoeffs<acc> load_loss_coeffs(const coef_t* coeffs, int64_t b) {
  const coef_t* c = coeffs + b * kLossCols;
  return {static_cast<acc>(c[kLossColM]), static_cast<acc>(c[kLossColCa]), static_cast<acc>(c[kLossColCb]),
          static_cast<acc>(c[kLossColW])};
}

template <typename acc>
PYGEN_HD acc diffusion_residual(acc m, acc ca, acc cb, acc out, acc x0, acc eps) {
  return m * out - ca * x0 - cb * eps;
}

// loss[b] from the row's sum of squared residuals.
template <typename acc>
PYGEN_HD acc diffusion_row_loss(acc w, acc sum_sq, int64_t n) {
  return w * (sum_sq / static_cast<acc>(n));
}

// k of d loss / d model_out = k·r.
template <typename acc>
PYGEN_HD acc diffusion_grad_scale(acc grad_row, acc w, acc m, int64_t n) {
  return grad_row * w * acc(2) * m / static_cast<acc>(n);
}

template <typename acc>
PYGEN_HD acc reparameterize_std(acc logvar) {
  return loss_exp(logvar * acc(0.5));
}

// One element's term of the KL sum (kl = 0.5·Σ term).
template <typename acc>
PYGEN_HD acc kl_term(acc mu, acc logvar, acc std) {
  return mu * mu + std * std - acc(1) - logvar;
}

template <typename acc>
PYGEN_HD acc kl_grad_mu(acc grad_z, acc grad_kl, acc mu) {
  return grad_z + grad_kl * mu;
}

template <typename acc>
PYGEN_HD acc kl_grad_logvar(acc grad_z, acc grad_kl, acc std, acc eps) {
  return grad_z * std * eps * acc(0.5) + grad_kl * (acc(0.5) * (std * std - acc(1)));
}

}  // namespace pygen
