// pygen/step.h — the general fused sampler step and its coefficient table
// (header-only, CPU and CUDA). Torch reference: pygen/ops/step.py and
// pygen/ops/schedule.py; Triton: kernels/step.py and kernels/schedule.py.
//
// One sampler step, per element, with coefficients from row `i` of a table:
//   d      = cx·x + cm·model_out                  (denoised / pred_x0 / score)
//   d      = clamp(d, -c, c)          if c > 0    (clip_sample; NaN stays NaN)
//   x_next = a·x + b·d + Σ_j hist_j·h_j + s·z      (z: noise, in-kernel Philox)
//   h[slot] = hx·x + hd·d             if slot >= 0 (history for multistep/2nd order)
// DDIM, DDPM, Euler, Euler-ancestral, DPM-Solver++(2M) and Euler–Maruyama are
// each exactly this form, so each costs one launch per model evaluation.
#pragma once
#include <cmath>
#include <cstdint>

#include "pygen/common.h"

namespace pygen::step {

// Columns of a coefficient-table row; the table has kColHist + H columns.
enum Column : int {
  kColCx = 0,
  kColCm = 1,
  kColA = 2,
  kColB = 3,
  kColS = 4,
  kColHx = 5,
  kColHd = 6,
  kColSlot = 7,
  kColHist = 8,
};

// Sampler kinds of step_coefficients (pygen.ops.schedule.KINDS mirrors this).
enum Kind : int {
  kDDIM = 0,             // levels: alphas_cumprod at each step's timestep, then the final one
  kDDPM = 1,             // levels: as DDIM
  kEuler = 2,            // levels: sigmas (k-diffusion, trailing 0)
  kEulerAncestral = 3,   // levels: sigmas
  kDPMSolverPP2M = 4,    // levels: sigmas; history width 1 (previous denoised)
  kEulerMaruyamaVP = 5,  // levels: times t (decreasing); params beta_min, beta_max; model_out = score
  kEulerMaruyamaVE = 6,  // levels: times t; params sigma_min, sigma_max
  kNumKinds = 7,
};

// What the model predicts (pygen.ops.schedule.PREDICTIONS mirrors this).
enum Prediction : int { kEps = 0, kSample = 1, kV = 2 };

PYGEN_HD int history_width(int kind) { return kind == kDPMSolverPP2M ? 1 : 0; }
PYGEN_HD int table_width(int kind) { return kColHist + history_width(kind); }

// Row i of the table for `kind` (n = number of steps = len(levels) - 1).
// Computed in double; one row per thread. Unsupported combinations give NaN.
PYGEN_HD void coefficient_row(int kind, int prediction, double eta, double p0, double p1, const double* levels,
                              int64_t i, int64_t n, double* row) {
  const double nan = NAN;
  for (int c = 0; c < kColHist + 1; ++c) row[c] = 0.0;
  row[kColSlot] = -1.0;
  const double l0 = levels[i];
  const double l1 = levels[i + 1];
  switch (kind) {
    case kDDIM:
    case kDDPM: {
      const double at = l0, ap = l1;
      const double sat = sqrt(at), s1at = sqrt(1.0 - at);
      if (prediction == kEps) {
        row[kColCx] = 1.0 / sat;
        row[kColCm] = -s1at / sat;
      } else if (prediction == kSample) {
        row[kColCm] = 1.0;
      } else if (prediction == kV) {
        row[kColCx] = sat;
        row[kColCm] = -s1at;
      } else {
        row[kColCx] = row[kColCm] = nan;
      }
      if (kind == kDDIM) {
        const double var = (1.0 - ap) / (1.0 - at) * (1.0 - at / ap);
        const double std = eta * sqrt(var);
        const double dir = sqrt(1.0 - ap - std * std);
        row[kColA] = dir / s1at;
        row[kColB] = sqrt(ap) - dir * sat / s1at;
        row[kColS] = std;
      } else {
        const double cur_alpha = at / ap, cur_beta = 1.0 - cur_alpha;
        row[kColA] = sqrt(cur_alpha) * (1.0 - ap) / (1.0 - at);
        row[kColB] = sqrt(ap) * cur_beta / (1.0 - at);
        double var = (1.0 - ap) / (1.0 - at) * cur_beta;
        var = var > 1e-20 ? var : 1e-20;
        row[kColS] = (i == n - 1 && ap >= 1.0) ? 0.0 : sqrt(var);
      }
      break;
    }
    case kEuler:
    case kEulerAncestral:
    case kDPMSolverPP2M: {
      const double sig = l0, sn = l1;
      if (prediction == kSample) {
        row[kColCm] = 1.0;
      } else if (prediction == kEps) {
        row[kColCx] = 1.0;
        row[kColCm] = -sig;
      } else {
        row[kColCx] = row[kColCm] = nan;
      }
      if (kind == kEuler) {
        row[kColA] = sn / sig;
        row[kColB] = 1.0 - sn / sig;
      } else if (kind == kEulerAncestral) {
        double up = eta * sqrt(sn * sn * (sig * sig - sn * sn) / (sig * sig));
        up = up < sn ? up : sn;
        const double down = sqrt(sn * sn - up * up);
        row[kColA] = down / sig;
        row[kColB] = 1.0 - down / sig;
        row[kColS] = up;
      } else {  // DPM-Solver++(2M), k-diffusion sample_dpmpp_2m
        row[kColHd] = 1.0;
        row[kColSlot] = 0.0;
        if (sn == 0.0) {
          row[kColB] = 1.0;
        } else {
          const double h = log(sig) - log(sn);  // t = -log(sigma)
          const double em1 = expm1(-h);
          row[kColA] = sn / sig;
          if (i == 0) {
            row[kColB] = -em1;
          } else {
            const double h_last = log(levels[i - 1]) - log(sig);
            const double r = h_last / h;
            row[kColB] = -em1 * (1.0 + 1.0 / (2.0 * r));
            row[kColHist] = em1 / (2.0 * r);
          }
        }
      }
      break;
    }
    case kEulerMaruyamaVP:
    case kEulerMaruyamaVE: {
      // Reverse SDE dx = [f(x,t) - g(t)^2 score] dt + g(t) dw, dt = t_{i+1} - t_i < 0.
      const double t = l0, dt = l1 - l0;
      double f = 0.0, g2 = 0.0, std = 1.0;
      if (kind == kEulerMaruyamaVP) {
        const double beta = p0 + t * (p1 - p0);
        f = -0.5 * beta;
        g2 = beta;
        const double log_mean = -0.25 * t * t * (p1 - p0) - 0.5 * t * p0;
        std = sqrt(-expm1(2.0 * log_mean));
      } else {
        const double sigma = p0 * pow(p1 / p0, t);
        g2 = sigma * sigma * 2.0 * log(p1 / p0);
        std = sigma;
      }
      if (prediction == kSample) {  // model_out is the score itself
        row[kColCm] = 1.0;
      } else if (prediction == kEps) {  // score = -eps / std(t)
        row[kColCm] = -1.0 / std;
      } else {
        row[kColCm] = nan;
      }
      row[kColA] = 1.0 + f * dt;
      row[kColB] = -g2 * dt;
      row[kColS] = sqrt(g2 * fabs(dt));
      break;
    }
    default:
      for (int c = 0; c < kColHist; ++c) row[c] = nan;
  }
}

// In-kernel advance (advance=True with one step index, CUDA and Triton): the launch that reads
// the index also increments it, with no second launch. Every block reads the index, then adds
// kAdvanceUnit to it atomically; the block that sees the count of the others reach
// blocks - 1 is the last one (all others have read), and stores index + 1. While the launch
// runs the word holds index + count·2^40, so a reader decodes the index from the low 40 bits
// (sign-extended): indices must lie in [-2^39, 2^39) (any table has far fewer rows). Launches of
// more than kMaxAdvanceBlocks blocks increment with a second one-thread launch instead.
constexpr int kAdvanceShift = 40;
constexpr int64_t kMaxAdvanceBlocks = int64_t(1) << 23;

// The step index held in a word that may carry an in-flight block count.
PYGEN_HD int64_t decode_advancing_index(int64_t raw) {
  return static_cast<int64_t>(static_cast<uint64_t>(raw) << (64 - kAdvanceShift)) >> (64 - kAdvanceShift);
}

// How many blocks had added their unit before `old` (the word before this block's add) was read.
PYGEN_HD int64_t advance_count(int64_t old, int64_t index) {
  return static_cast<int64_t>((static_cast<uint64_t>(old) - static_cast<uint64_t>(index)) >> kAdvanceShift);
}

}  // namespace pygen::step
