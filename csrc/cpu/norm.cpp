// csrc/cpu/norm.cpp — C++ CPU kernels of the norm family (pygen/ops/norm.py):
//   torch.ops.pygen.adaln_modulate / adaln_modulate_backward   LayerNorm(x)·(1 + scale[b]) + shift[b]
//   torch.ops.pygen.gated_residual / gated_residual_backward   x + gate[b]·y
//   torch.ops.pygen.group_norm / group_norm_backward           SiLU?(GroupNorm(x)), NCHW or channels-last
//   torch.ops.pygen.timestep_embedding / _backward             diffusers' sinusoidal embedding
// Shared math: csrc/include/pygen/norm.h; argument checks: csrc/norm_checks.h.
// Arithmetic in fp32 (fp64 for fp64 storage).
//
// Parallelism (at::parallel_for) and determinism: every reduction is split
// into fixed pieces that do not depend on the thread count — LayerNorm rows,
// tiles of kRowTile token rows for the (B, C) / (C,) column sums, GroupNorm
// per-(sample, channel) rows (NCHW) or tiles of kSpatialTile spatial rows
// (channels-last) — and the pieces are combined in a fixed order, so results
// are bit-identical for any number of threads. Sums over a row use eight
// interleaved accumulators (fixed order, lets the compiler vectorise).
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../norm_checks.h"
#include "cpu_common.h"
#include "pygen/norm.h"

namespace pygen::cpu {
namespace {

constexpr int64_t kGrainElements = int64_t{1} << 15;  // elements per at::parallel_for task, about
constexpr int64_t kRowTile = 16;                      // token rows per partial column sum
constexpr int64_t kSpatialTile = 64;                  // channels-last GroupNorm: spatial rows per tile

inline int64_t grain_for(int64_t work_per_item) {
  return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(work_per_item, 1));
}

template <typename T>
inline const T* opt_ptr(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<T>() : nullptr;
}

// Σ_{i < n} f(i): eight interleaved accumulators (element i goes to lane i % 8), added in a fixed tree.
template <typename acc, typename F>
inline acc lane_sum(int64_t n, F&& f) {
  acc s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int k = 0; k < 8; ++k) s[k] += f(i + k);
  }
  for (int k = 0; i < n; ++i, ++k) s[k] += f(i);
  return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
}

// out[g, c] = Σ_{r < rows} part[(g·rows + r)·C + c] (rows summed in order), cast to out's type.
template <typename acc, typename out_t>
void sum_partials(const acc* part, out_t* out, int64_t groups, int64_t rows, int64_t C) {
  at::parallel_for(0, groups * C, grain_for(rows), [&](int64_t begin, int64_t end) {
    for (int64_t gc = begin; gc < end; ++gc) {
      const int64_t g = gc / C, c = gc - g * C;
      acc s = 0;
      for (int64_t r = 0; r < rows; ++r) s += part[(g * rows + r) * C + c];
      out[gc] = static_cast<out_t>(s);
    }
  });
}

// ---------------------------------------------------------------------------
// adaln_modulate
// ---------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor, at::Tensor> adaln_modulate_cpu(const at::Tensor& x_in,
                                                                  const std::optional<at::Tensor>& weight_in,
                                                                  const std::optional<at::Tensor>& bias_in,
                                                                  const std::optional<at::Tensor>& shift_in,
                                                                  const std::optional<at::Tensor>& scale_in,
                                                                  double eps) {
  const auto a = norm::check_adaln_args(x_in, weight_in, bias_in, shift_in, scale_in, c10::kCPU);
  TORCH_CHECK(eps >= 0.0, "pygen: eps must be >= 0, got ", eps);
  const int64_t B = a.B, N = a.N, C = a.C, rows = B * N;
  at::Tensor y = at::empty_like(a.x);
  at::Tensor mean = norm::empty_stats(a.x, {B, N}), rstd = norm::empty_stats(a.x, {B, N});
  if (rows == 0) return {y, mean, rstd};
  if (C == 0) return norm::with_nan_stats(y, mean, rstd);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x.scalar_type(), "adaln_modulate_cpu", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* X = a.x.data_ptr<scalar_t>();
    const scalar_t* W = opt_ptr<scalar_t>(a.weight);
    const scalar_t* Bi = opt_ptr<scalar_t>(a.bias);
    const scalar_t* SH = opt_ptr<scalar_t>(a.shift);
    const scalar_t* SC = opt_ptr<scalar_t>(a.scale);
    scalar_t* Y = y.data_ptr<scalar_t>();
    acc* M = mean.data_ptr<acc>();
    acc* R = rstd.data_ptr<acc>();
    const acc eps_a = static_cast<acc>(eps);
    const acc inv_c = static_cast<acc>(1) / static_cast<acc>(C);
    at::parallel_for(0, rows, grain_for(C), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const scalar_t* xr = X + r * C;
        const int64_t b = r / N;
        const acc m = lane_sum<acc>(C, [&](int64_t i) { return static_cast<acc>(xr[i]); }) * inv_c;
        const acc var = lane_sum<acc>(C, [&](int64_t i) {
                          const acc d = static_cast<acc>(xr[i]) - m;
                          return d * d;
                        }) *
                        inv_c;
        const acc rs = norm_rstd(var, eps_a);
        M[r] = m;
        R[r] = rs;
        scalar_t* yr = Y + r * C;
        const scalar_t* shr = SH != nullptr ? SH + b * C : nullptr;
        const scalar_t* scr = SC != nullptr ? SC + b * C : nullptr;
        for (int64_t i = 0; i < C; ++i) {
          acc z = (static_cast<acc>(xr[i]) - m) * rs;
          if (W != nullptr) z = z * static_cast<acc>(W[i]);
          if (Bi != nullptr) z = z + static_cast<acc>(Bi[i]);
          if (scr != nullptr) z = z * (static_cast<acc>(1) + static_cast<acc>(scr[i]));
          if (shr != nullptr) z = z + static_cast<acc>(shr[i]);
          yr[i] = static_cast<scalar_t>(z);
        }
      }
    });
  });
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> adaln_modulate_backward_cpu(
    const at::Tensor& grad_in, const at::Tensor& x_in, const std::optional<at::Tensor>& weight_in,
    const std::optional<at::Tensor>& bias_in, const std::optional<at::Tensor>& scale_in, const at::Tensor& mean_in,
    const at::Tensor& rstd_in) {
  const auto a = norm::check_adaln_args(x_in, weight_in, bias_in, std::nullopt, scale_in, c10::kCPU);
  const int64_t B = a.B, N = a.N, C = a.C;
  const at::Tensor g = norm::checked_like(grad_in, "grad_y", a.x.sizes(), a.x, c10::kCPU);
  const at::Tensor mean = norm::checked_stats(mean_in, "mean", {B, N}, a.x, c10::kCPU);
  const at::Tensor rstd = norm::checked_stats(rstd_in, "rstd", {B, N}, a.x, c10::kCPU);
  at::Tensor dx = at::empty_like(a.x);
  at::Tensor dshift = at::empty({B, C}, a.x.options());
  at::Tensor dscale = norm::empty_param_grad(a.scale, {B, C}, a.x);
  at::Tensor dweight = norm::empty_param_grad(a.weight, {C}, a.x);
  at::Tensor dbias = norm::empty_param_grad(a.bias, {C}, a.x);
  if (B * N * C == 0) {  // sums of nothing (dweight / dbias are (C,) also when B == 0)
    for (at::Tensor* t : {&dshift, &dscale, &dweight, &dbias}) t->zero_();
    return {dx, dweight, dbias, dshift, dscale};
  }
  const int64_t tiles = (N + kRowTile - 1) / kRowTile;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x.scalar_type(), "adaln_modulate_backward_cpu", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* X = a.x.data_ptr<scalar_t>();
    const scalar_t* G = g.data_ptr<scalar_t>();
    const scalar_t* W = opt_ptr<scalar_t>(a.weight);
    const scalar_t* Bi = opt_ptr<scalar_t>(a.bias);
    const scalar_t* SC = opt_ptr<scalar_t>(a.scale);
    const acc* M = mean.data_ptr<acc>();
    const acc* R = rstd.data_ptr<acc>();
    scalar_t* DX = dx.data_ptr<scalar_t>();
    const int64_t prow = B * tiles;
    std::vector<acc> p_shift(prow * C), p_scale(SC ? prow * C : 0), p_w(W ? prow * C : 0), p_b(Bi ? prow * C : 0);
    const acc inv_c = static_cast<acc>(1) / static_cast<acc>(C);
    at::parallel_for(0, prow, grain_for(kRowTile * C), [&](int64_t t0, int64_t t1) {
      std::vector<acc> dz(C), xn(C);
      for (int64_t task = t0; task < t1; ++task) {
        const int64_t b = task / tiles, tile = task - b * tiles;
        acc* ps = p_shift.data() + task * C;
        acc* psc = SC ? p_scale.data() + task * C : nullptr;
        acc* pw = W ? p_w.data() + task * C : nullptr;
        acc* pb = Bi ? p_b.data() + task * C : nullptr;
        std::fill(ps, ps + C, acc(0));
        if (psc) std::fill(psc, psc + C, acc(0));
        if (pw) std::fill(pw, pw + C, acc(0));
        if (pb) std::fill(pb, pb + C, acc(0));
        const scalar_t* scr = SC ? SC + b * C : nullptr;
        const int64_t n1 = std::min(N, (tile + 1) * kRowTile);
        for (int64_t n = tile * kRowTile; n < n1; ++n) {
          const int64_t r = b * N + n;
          const scalar_t* xr = X + r * C;
          const scalar_t* gr = G + r * C;
          const acc m = M[r], rs = R[r];
          for (int64_t i = 0; i < C; ++i) {
            const acc gi = static_cast<acc>(gr[i]);
            const acc xi = (static_cast<acc>(xr[i]) - m) * rs;
            const acc dzi = scr ? gi * (static_cast<acc>(1) + static_cast<acc>(scr[i])) : gi;
            xn[i] = xi;
            dz[i] = dzi;
            ps[i] += gi;
            if (psc) {
              acc z = W ? xi * static_cast<acc>(W[i]) : xi;
              if (Bi) z += static_cast<acc>(Bi[i]);
              psc[i] += gi * z;
            }
            if (pw) pw[i] += dzi * xi;
            if (pb) pb[i] += dzi;
          }
          // dxn = dz·w; dx = rstd·(dxn - mean(dxn) - xn·mean(dxn·xn))
          if (W) {
            for (int64_t i = 0; i < C; ++i) dz[i] *= static_cast<acc>(W[i]);
          }
          const acc c1 = lane_sum<acc>(C, [&](int64_t i) { return dz[i]; }) * inv_c;
          const acc c2 = lane_sum<acc>(C, [&](int64_t i) { return dz[i] * xn[i]; }) * inv_c;
          scalar_t* dxr = DX + r * C;
          for (int64_t i = 0; i < C; ++i) dxr[i] = static_cast<scalar_t>(rs * (dz[i] - c1 - xn[i] * c2));
        }
      }
    });
    sum_partials(p_shift.data(), dshift.data_ptr<scalar_t>(), B, tiles, C);
    if (SC) sum_partials(p_scale.data(), dscale.data_ptr<scalar_t>(), B, tiles, C);
    if (W) sum_partials(p_w.data(), dweight.data_ptr<scalar_t>(), 1, prow, C);
    if (Bi) sum_partials(p_b.data(), dbias.data_ptr<scalar_t>(), 1, prow, C);
  });
  return {dx, dweight, dbias, dshift, dscale};
}

// ---------------------------------------------------------------------------
// gated_residual
// ---------------------------------------------------------------------------
at::Tensor gated_residual_cpu(const at::Tensor& x_in, const at::Tensor& gate_in, const at::Tensor& y_in) {
  const auto a = norm::check_gated_args(x_in, "x", gate_in, y_in, c10::kCPU);
  at::Tensor out = at::empty_like(a.x);
  const int64_t rows = a.B * a.N, C = a.C, N = a.N;
  if (rows * C == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x.scalar_type(), "gated_residual_cpu", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* X = a.x.data_ptr<scalar_t>();
    const scalar_t* Y = a.y.data_ptr<scalar_t>();
    const scalar_t* GT = a.gate.data_ptr<scalar_t>();
    scalar_t* O = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, grain_for(C), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const scalar_t* gr = GT + (r / N) * C;
        const int64_t o = r * C;
        for (int64_t i = 0; i < C; ++i) {
          O[o + i] = static_cast<scalar_t>(static_cast<acc>(X[o + i]) +
                                           static_cast<acc>(gr[i]) * static_cast<acc>(Y[o + i]));
        }
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> gated_residual_backward_cpu(const at::Tensor& grad_in, const at::Tensor& gate_in,
                                                               const at::Tensor& y_in) {
  const auto a = norm::check_gated_args(grad_in, "grad", gate_in, y_in, c10::kCPU);
  const int64_t B = a.B, N = a.N, C = a.C;
  at::Tensor dy = at::empty_like(a.y);
  at::Tensor dgate = at::empty_like(a.gate);
  if (B * C == 0) return {dgate, dy};
  if (N == 0) return {dgate.zero_(), dy};
  const int64_t tiles = (N + kRowTile - 1) / kRowTile;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.y.scalar_type(), "gated_residual_backward_cpu", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* G = a.x.data_ptr<scalar_t>();
    const scalar_t* Y = a.y.data_ptr<scalar_t>();
    const scalar_t* GT = a.gate.data_ptr<scalar_t>();
    scalar_t* DY = dy.data_ptr<scalar_t>();
    std::vector<acc> part(B * tiles * C);
    at::parallel_for(0, B * tiles, grain_for(kRowTile * C), [&](int64_t t0, int64_t t1) {
      for (int64_t task = t0; task < t1; ++task) {
        const int64_t b = task / tiles, tile = task - b * tiles;
        acc* p = part.data() + task * C;
        std::fill(p, p + C, acc(0));
        const scalar_t* gt = GT + b * C;
        const int64_t n1 = std::min(N, (tile + 1) * kRowTile);
        for (int64_t n = tile * kRowTile; n < n1; ++n) {
          const int64_t o = (b * N + n) * C;
          for (int64_t i = 0; i < C; ++i) {
            const acc gi = static_cast<acc>(G[o + i]);
            DY[o + i] = static_cast<scalar_t>(gi * static_cast<acc>(gt[i]));
            p[i] += gi * static_cast<acc>(Y[o + i]);
          }
        }
      }
    });
    sum_partials(part.data(), dgate.data_ptr<scalar_t>(), B, tiles, C);
  });
  return {dgate, dy};
}

// ---------------------------------------------------------------------------
// group_norm
// ---------------------------------------------------------------------------
// x is (N, C, S): NCHW (element (n, c, s) at (n·C + c)·S + s) or channels-last
// (at (n·S + s)·C + c). Per-(n, tile, c) partial results, tiles = 1 for NCHW
// (a whole (n, c) row) or kSpatialTile spatial rows for channels-last.
struct GnGeometry {
  int64_t N, C, S, G, Cg, tiles;
  bool cl;
};

GnGeometry gn_geometry(const norm::GroupNormArgs& a) {
  GnGeometry g{a.N, a.C, a.S, a.G, a.C / a.G, 1, a.channels_last};
  if (g.cl) g.tiles = (g.S + kSpatialTile - 1) / kSpatialTile;
  return g;
}

// Per-(n, c) mean and rstd of the channel's group (expanded, so the element loops need no division).
template <typename acc>
struct GnChannelStats {
  std::vector<acc> mean, rstd;
};

template <typename scalar_t>
GnChannelStats<acc_t<scalar_t>> gn_statistics(const GnGeometry& g, const scalar_t* X, double eps, acc_t<scalar_t>* M,
                                              acc_t<scalar_t>* R) {
  using acc = acc_t<scalar_t>;
  using Stats = MomentStats<acc>;
  std::vector<Stats> part(g.N * g.tiles * g.C);
  if (!g.cl) {
    at::parallel_for(0, g.N * g.C, grain_for(g.S), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const scalar_t* xr = X + r * g.S;
        const acc m = lane_sum<acc>(g.S, [&](int64_t i) { return static_cast<acc>(xr[i]); }) / static_cast<acc>(g.S);
        const acc m2 = lane_sum<acc>(g.S, [&](int64_t i) {
          const acc d = static_cast<acc>(xr[i]) - m;
          return d * d;
        });
        part[r] = Stats{static_cast<acc>(g.S), m, m2};
      }
    });
  } else {
    at::parallel_for(0, g.N * g.tiles, grain_for(kSpatialTile * g.C), [&](int64_t t0, int64_t t1) {
      std::vector<acc> sum(g.C), sq(g.C);
      for (int64_t task = t0; task < t1; ++task) {
        const int64_t n = task / g.tiles, tile = task - n * g.tiles;
        const int64_t s0 = tile * kSpatialTile, s1 = std::min(g.S, s0 + kSpatialTile);
        const scalar_t* xt = X + (n * g.S + s0) * g.C;
        std::fill(sum.begin(), sum.end(), acc(0));
        std::fill(sq.begin(), sq.end(), acc(0));
        for (int64_t s = 0; s < s1 - s0; ++s) {
          for (int64_t c = 0; c < g.C; ++c) sum[c] += static_cast<acc>(xt[s * g.C + c]);
        }
        const acc cnt = static_cast<acc>(s1 - s0);
        for (int64_t c = 0; c < g.C; ++c) sum[c] /= cnt;
        for (int64_t s = 0; s < s1 - s0; ++s) {
          for (int64_t c = 0; c < g.C; ++c) {
            const acc d = static_cast<acc>(xt[s * g.C + c]) - sum[c];
            sq[c] += d * d;
          }
        }
        Stats* p = part.data() + task * g.C;
        for (int64_t c = 0; c < g.C; ++c) p[c] = Stats{cnt, sum[c], sq[c]};
      }
    });
  }
  GnChannelStats<acc> cs{std::vector<acc>(g.N * g.C), std::vector<acc>(g.N * g.C)};
  const acc eps_a = static_cast<acc>(eps);
  at::parallel_for(0, g.N * g.G, grain_for(g.tiles * g.Cg), [&](int64_t q0, int64_t q1) {
    for (int64_t ng = q0; ng < q1; ++ng) {
      const int64_t n = ng / g.G, grp = ng - n * g.G;
      Stats st{0, 0, 0};
      for (int64_t c = grp * g.Cg; c < (grp + 1) * g.Cg; ++c) {
        for (int64_t t = 0; t < g.tiles; ++t) merge_moments(st, part[(n * g.tiles + t) * g.C + c]);
      }
      const acc m = st.mean;
      const acc rs = norm_rstd(st.m2 / st.count, eps_a);
      M[ng] = m;
      R[ng] = rs;
      for (int64_t c = grp * g.Cg; c < (grp + 1) * g.Cg; ++c) {
        cs.mean[n * g.C + c] = m;
        cs.rstd[n * g.C + c] = rs;
      }
    }
  });
  return cs;
}

// The GroupNorm element loops, branch-free (absent weight / bias are 1 / 0, exact in
// ((x - mean)·rstd)·w + b, the reference's order) and compiled per ISA
// (PYGEN_VECTOR_CLONES, cpu_common.h) so the compiler can vectorise them. NCHW rows
// take per-row scalars; channels-last rows take per-channel arrays.

// exp for the SiLU loops: Cephes' expf (Cody–Waite reduction, degree-5 polynomial; measured
// <= 1.4 ulp on [-87, 87]) written without branches or float compares (integer masks on the
// bits), so loops calling it vectorise; |x| is clamped to 87 (silu and its derivative are
// unaffected at fp32 precision); NaN passes through.
inline float silu_exp(float x) {
  int32_t xb;
  std::memcpy(&xb, &x, sizeof(xb));
  const int32_t ab = xb & 0x7fffffff;
  const int32_t big = -static_cast<int32_t>(ab > 0x42ae0000);  // |x| > 87
  const int32_t cb = (xb & ~big) | (((xb & static_cast<int32_t>(0x80000000u)) | 0x42ae0000) & big);
  float xc;
  std::memcpy(&xc, &cb, sizeof(xc));
  const float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = (p * (r * r) + r) + 1.0f;
  const int32_t eb = (static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &eb, sizeof(two_n));
  const float out = y * two_n;
  int32_t ob;
  std::memcpy(&ob, &out, sizeof(ob));
  const int32_t nan = -static_cast<int32_t>(ab > 0x7f800000);
  const int32_t rb = (xb & nan) | (ob & ~nan);
  float res;
  std::memcpy(&res, &rb, sizeof(res));
  return res;
}
inline double silu_exp(double x) { return std::exp(x); }

template <bool SILU, typename acc>
inline acc gn_activate(acc v) {
  if constexpr (SILU) {
    return v / (static_cast<acc>(1) + silu_exp(-v));
  } else {
    return v;
  }
}

// dL/d(pre-activation) from the incoming gradient g (xh = normalised x).
template <bool SILU, typename acc>
inline acc gn_da(acc g, acc xh, acc w, acc b) {
  if constexpr (SILU) {
    const acc a = xh * w + b;
    const acc sig = static_cast<acc>(1) / (static_cast<acc>(1) + silu_exp(-a));
    return g * (sig * (static_cast<acc>(1) + a * (static_cast<acc>(1) - sig)));
  } else {
    return g;
  }
}

template <bool SILU, typename scalar_t, typename acc = acc_t<scalar_t>>
PYGEN_VECTOR_CLONES void gn_forward_row(const scalar_t* __restrict__ x, scalar_t* __restrict__ y, int64_t n, acc m,
                                        acc rs, acc w, acc b) {
  for (int64_t i = 0; i < n; ++i) y[i] = static_cast<scalar_t>(gn_activate<SILU>((static_cast<acc>(x[i]) - m) * rs * w + b));
}

template <bool SILU, typename scalar_t, typename acc = acc_t<scalar_t>>
PYGEN_VECTOR_CLONES void gn_forward_channels(const scalar_t* __restrict__ x, scalar_t* __restrict__ y, int64_t C,
                                             const acc* __restrict__ m, const acc* __restrict__ rs,
                                             const acc* __restrict__ w, const acc* __restrict__ b) {
  for (int64_t c = 0; c < C; ++c) {
    y[c] = static_cast<scalar_t>(gn_activate<SILU>((static_cast<acc>(x[c]) - m[c]) * rs[c] * w[c] + b[c]));
  }
}

// Σ da·xhat and Σ da over one NCHW row (eight interleaved lanes, fixed order).
template <bool SILU, typename scalar_t, typename acc = acc_t<scalar_t>>
PYGEN_VECTOR_CLONES void gn_backward_row_sums(const scalar_t* __restrict__ x, const scalar_t* __restrict__ g,
                                              int64_t n, acc m, acc rs, acc w, acc b, acc* sum_dax, acc* sum_da) {
  acc s1[8] = {0, 0, 0, 0, 0, 0, 0, 0}, s2[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int k = 0; k < 8; ++k) {
      const acc xh = (static_cast<acc>(x[i + k]) - m) * rs;
      const acc da = gn_da<SILU>(static_cast<acc>(g[i + k]), xh, w, b);
      s1[k] += da * xh;
      s2[k] += da;
    }
  }
  for (int k = 0; i < n; ++i, ++k) {
    const acc xh = (static_cast<acc>(x[i]) - m) * rs;
    const acc da = gn_da<SILU>(static_cast<acc>(g[i]), xh, w, b);
    s1[k] += da * xh;
    s2[k] += da;
  }
  *sum_dax = ((s1[0] + s1[1]) + (s1[2] + s1[3])) + ((s1[4] + s1[5]) + (s1[6] + s1[7]));
  *sum_da = ((s2[0] + s2[1]) + (s2[2] + s2[3])) + ((s2[4] + s2[5]) + (s2[6] + s2[7]));
}

// Channels-last: add one spatial row's da·xhat and da to the per-channel sums.
template <bool SILU, typename scalar_t, typename acc = acc_t<scalar_t>>
PYGEN_VECTOR_CLONES void gn_backward_channel_sums(const scalar_t* __restrict__ x, const scalar_t* __restrict__ g,
                                                  int64_t C, const acc* __restrict__ m, const acc* __restrict__ rs,
                                                  const acc* __restrict__ w, const acc* __restrict__ b,
                                                  acc* __restrict__ sum_dax, acc* __restrict__ sum_da) {
  for (int64_t c = 0; c < C; ++c) {
    const acc xh = (static_cast<acc>(x[c]) - m[c]) * rs[c];
    const acc da = gn_da<SILU>(static_cast<acc>(g[c]), xh, w[c], b[c]);
    sum_dax[c] += da * xh;
    sum_da[c] += da;
  }
}

// dx = rstd·(da·w - k0 - xhat·kx) over one NCHW row.
template <bool SILU, typename scalar_t, typename acc = acc_t<scalar_t>>
PYGEN_VECTOR_CLONES void gn_dx_row(const scalar_t* __restrict__ x, const scalar_t* __restrict__ g,
                                   scalar_t* __restrict__ dx, int64_t n, acc m, acc rs, acc w, acc b, acc k0, acc kx) {
  for (int64_t i = 0; i < n; ++i) {
    const acc xh = (static_cast<acc>(x[i]) - m) * rs;
    const acc da = gn_da<SILU>(static_cast<acc>(g[i]), xh, w, b);
    dx[i] = static_cast<scalar_t>(rs * (da * w - k0 - xh * kx));
  }
}

template <bool SILU, typename scalar_t, typename acc = acc_t<scalar_t>>
PYGEN_VECTOR_CLONES void gn_dx_channels(const scalar_t* __restrict__ x, const scalar_t* __restrict__ g,
                                        scalar_t* __restrict__ dx, int64_t C, const acc* __restrict__ m,
                                        const acc* __restrict__ rs, const acc* __restrict__ w,
                                        const acc* __restrict__ b, const acc* __restrict__ k0,
                                        const acc* __restrict__ kx) {
  for (int64_t c = 0; c < C; ++c) {
    const acc xh = (static_cast<acc>(x[c]) - m[c]) * rs[c];
    const acc da = gn_da<SILU>(static_cast<acc>(g[c]), xh, w[c], b[c]);
    dx[c] = static_cast<scalar_t>(rs[c] * (da * w[c] - k0[c] - xh * kx[c]));
  }
}

// weight / bias as acc arrays, 1 / 0 where absent.
template <typename scalar_t, typename acc = acc_t<scalar_t>>
void affine_arrays(const scalar_t* W, const scalar_t* Bi, int64_t C, std::vector<acc>& w, std::vector<acc>& b) {
  w.resize(C);
  b.resize(C);
  for (int64_t c = 0; c < C; ++c) {
    w[c] = W != nullptr ? static_cast<acc>(W[c]) : acc(1);
    b[c] = Bi != nullptr ? static_cast<acc>(Bi[c]) : acc(0);
  }
}

template <typename Fn>
void dispatch_silu(bool silu, Fn&& fn) {
  if (silu) fn(std::true_type{});
  else fn(std::false_type{});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_cpu(const at::Tensor& x_in,
                                                              const std::optional<at::Tensor>& weight_in,
                                                              const std::optional<at::Tensor>& bias_in, int64_t groups,
                                                              double eps, bool silu) {
  const auto a = norm::check_group_norm_args(x_in, weight_in, bias_in, groups, c10::kCPU);
  TORCH_CHECK(eps >= 0.0, "pygen: eps must be >= 0, got ", eps);
  const GnGeometry g = gn_geometry(a);
  at::Tensor y = at::empty_like(a.x);  // keeps x's layout
  at::Tensor mean = norm::empty_stats(a.x, {g.N, g.G}), rstd = norm::empty_stats(a.x, {g.N, g.G});
  if (g.N == 0) return {y, mean, rstd};
  if (g.S == 0 || g.C == 0) return norm::with_nan_stats(y, mean, rstd);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x.scalar_type(), "group_norm_cpu", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* X = a.x.data_ptr<scalar_t>();
    scalar_t* Y = y.data_ptr<scalar_t>();
    std::vector<acc> wv, bv;
    affine_arrays(opt_ptr<scalar_t>(a.weight), opt_ptr<scalar_t>(a.bias), g.C, wv, bv);
    const auto cs = gn_statistics(g, X, eps, mean.data_ptr<acc>(), rstd.data_ptr<acc>());
    // y = SiLU?((x - mean)·rstd·w + b)
    dispatch_silu(silu, [&](auto silu_tag) {
      constexpr bool SILU = decltype(silu_tag)::value;
      if (!g.cl) {
        at::parallel_for(0, g.N * g.C, grain_for(g.S), [&](int64_t r0, int64_t r1) {
          for (int64_t r = r0; r < r1; ++r) {
            const int64_t c = r % g.C;
            gn_forward_row<SILU>(X + r * g.S, Y + r * g.S, g.S, cs.mean[r], cs.rstd[r], wv[c], bv[c]);
          }
        });
      } else {
        at::parallel_for(0, g.N * g.S, grain_for(g.C), [&](int64_t r0, int64_t r1) {
          for (int64_t r = r0; r < r1; ++r) {
            const int64_t n = r / g.S;
            gn_forward_channels<SILU>(X + r * g.C, Y + r * g.C, g.C, cs.mean.data() + n * g.C,
                                      cs.rstd.data() + n * g.C, wv.data(), bv.data());
          }
        });
      }
    });
  });
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_backward_cpu(
    const at::Tensor& grad_in, const at::Tensor& x_in, const std::optional<at::Tensor>& weight_in,
    const std::optional<at::Tensor>& bias_in, const at::Tensor& mean_in, const at::Tensor& rstd_in, int64_t groups,
    bool silu) {
  const auto a = norm::check_group_norm_args(x_in, weight_in, bias_in, groups, c10::kCPU);
  const GnGeometry g = gn_geometry(a);
  norm::check_same(grad_in, "grad_y", a.x.sizes(), a.x, c10::kCPU);
  const at::Tensor grad = norm::in_layout(grad_in, g.cl);
  const at::Tensor mean = norm::checked_stats(mean_in, "mean", {g.N, g.G}, a.x, c10::kCPU);
  const at::Tensor rstd = norm::checked_stats(rstd_in, "rstd", {g.N, g.G}, a.x, c10::kCPU);
  at::Tensor dx = at::empty_like(a.x);
  at::Tensor dweight = norm::empty_param_grad(a.weight, {g.C}, a.x);
  at::Tensor dbias = norm::empty_param_grad(a.bias, {g.C}, a.x);
  if (a.x.numel() == 0) {
    dweight.zero_();
    dbias.zero_();
    return {dx, dweight, dbias};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x.scalar_type(), "group_norm_backward_cpu", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* X = a.x.data_ptr<scalar_t>();
    const scalar_t* GR = grad.data_ptr<scalar_t>();
    const acc* M = mean.data_ptr<acc>();
    const acc* R = rstd.data_ptr<acc>();
    scalar_t* DX = dx.data_ptr<scalar_t>();
    std::vector<acc> wv, bv;
    affine_arrays(opt_ptr<scalar_t>(a.weight), opt_ptr<scalar_t>(a.bias), g.C, wv, bv);
    // per-(n, c) mean / rstd of the channel's group
    std::vector<acc> mc(g.N * g.C), rc(g.N * g.C);
    for (int64_t n = 0; n < g.N; ++n) {
      for (int64_t c = 0; c < g.C; ++c) {
        mc[n * g.C + c] = M[n * g.G + c / g.Cg];
        rc[n * g.C + c] = R[n * g.G + c / g.Cg];
      }
    }
    std::vector<acc> sw(g.N * g.tiles * g.C), sb(g.N * g.tiles * g.C);
    std::vector<acc> cw(g.N * g.C), cb(g.N * g.C), k0(g.N * g.C), kx(g.N * g.C);
    dispatch_silu(silu, [&](auto silu_tag) {
      constexpr bool SILU = decltype(silu_tag)::value;
      // stage 1: per-(n, tile, c) Σ da·xhat and Σ da (da = dL/d(pre-activation))
      if (!g.cl) {
        at::parallel_for(0, g.N * g.C, grain_for(g.S), [&](int64_t r0, int64_t r1) {
          for (int64_t r = r0; r < r1; ++r) {
            const int64_t c = r % g.C;
            gn_backward_row_sums<SILU>(X + r * g.S, GR + r * g.S, g.S, mc[r], rc[r], wv[c], bv[c], &sw[r], &sb[r]);
          }
        });
      } else {
        at::parallel_for(0, g.N * g.tiles, grain_for(kSpatialTile * g.C), [&](int64_t t0, int64_t t1) {
          for (int64_t task = t0; task < t1; ++task) {
            const int64_t n = task / g.tiles, tile = task - n * g.tiles;
            const int64_t s0 = tile * kSpatialTile, s1 = std::min(g.S, s0 + kSpatialTile);
            acc* pw = sw.data() + task * g.C;
            acc* pb = sb.data() + task * g.C;
            std::fill(pw, pw + g.C, acc(0));
            std::fill(pb, pb + g.C, acc(0));
            for (int64_t s = s0; s < s1; ++s) {
              const int64_t o = (n * g.S + s) * g.C;
              gn_backward_channel_sums<SILU>(X + o, GR + o, g.C, mc.data() + n * g.C, rc.data() + n * g.C,
                                             wv.data(), bv.data(), pw, pb);
            }
          }
        });
      }
      // stage 2: per-(n, c) sums over tiles; per (n, group) s1 = Σ w·Σda, s2 = Σ w·Σda·xhat;
      // dx = rstd·(da·w - s1/M - xhat·s2/M) with k0 = s1/M, kx = s2/M per (n, c) (M = Cg·S)
      at::parallel_for(0, g.N * g.G, grain_for(g.tiles * g.Cg), [&](int64_t q0, int64_t q1) {
        for (int64_t ng = q0; ng < q1; ++ng) {
          const int64_t n = ng / g.G, grp = ng - n * g.G;
          acc s1 = 0, s2 = 0;
          for (int64_t c = grp * g.Cg; c < (grp + 1) * g.Cg; ++c) {
            acc a1 = 0, a2 = 0;
            for (int64_t t = 0; t < g.tiles; ++t) {
              a1 += sw[(n * g.tiles + t) * g.C + c];
              a2 += sb[(n * g.tiles + t) * g.C + c];
            }
            cw[n * g.C + c] = a1;
            cb[n * g.C + c] = a2;
            s1 += wv[c] * a2;
            s2 += wv[c] * a1;
          }
          const acc inv_m = static_cast<acc>(1) / (static_cast<acc>(g.Cg) * static_cast<acc>(g.S));
          for (int64_t c = grp * g.Cg; c < (grp + 1) * g.Cg; ++c) {
            k0[n * g.C + c] = s1 * inv_m;
            kx[n * g.C + c] = s2 * inv_m;
          }
        }
      });
      // stage 3: dx
      if (!g.cl) {
        at::parallel_for(0, g.N * g.C, grain_for(g.S), [&](int64_t r0, int64_t r1) {
          for (int64_t r = r0; r < r1; ++r) {
            const int64_t c = r % g.C;
            gn_dx_row<SILU>(X + r * g.S, GR + r * g.S, DX + r * g.S, g.S, mc[r], rc[r], wv[c], bv[c], k0[r], kx[r]);
          }
        });
      } else {
        at::parallel_for(0, g.N * g.S, grain_for(g.C), [&](int64_t r0, int64_t r1) {
          for (int64_t r = r0; r < r1; ++r) {
            const int64_t n = r / g.S, o = r * g.C, nc = n * g.C;
            gn_dx_channels<SILU>(X + o, GR + o, DX + o, g.C, mc.data() + nc, rc.data() + nc, wv.data(), bv.data(),
                                 k0.data() + nc, kx.data() + nc);
          }
        });
      }
    });
    if (a.weight.has_value()) sum_partials(cw.data(), dweight.data_ptr<scalar_t>(), 1, g.N, g.C);
    if (a.bias.has_value()) sum_partials(cb.data(), dbias.data_ptr<scalar_t>(), 1, g.N, g.C);
  });
  return {dx, dweight, dbias};
}

// ---------------------------------------------------------------------------
// timestep_embedding
// ---------------------------------------------------------------------------
// Index of t's values as acc, for float and integer t.
template <typename acc, typename Fn>
void with_timesteps(const at::Tensor& t, Fn&& fn) {
  AT_DISPATCH_ALL_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "pygen_timesteps", [&] {
    const scalar_t* T = t.data_ptr<scalar_t>();
    fn([T](int64_t b) { return static_cast<acc>(T[b]); });
  });
}

template <typename acc>
std::vector<acc> timestep_frequencies(const TimestepConstants<acc>& tc) {
  std::vector<acc> f(tc.half);
  for (int64_t k = 0; k < tc.half; ++k) f[k] = timestep_frequency(tc, k);
  return f;
}

at::Tensor timestep_embedding_cpu(const at::Tensor& t_in, int64_t dim, double max_period,
                                  double downscale_freq_shift, double scale, bool flip_sin_to_cos) {
  const at::Tensor t = norm::check_timestep_args(t_in, dim, max_period, downscale_freq_shift, c10::kCPU);
  const bool f64 = t.scalar_type() == at::kDouble;
  const int64_t B = t.size(0);
  at::Tensor out = at::empty({B, dim}, t.options().dtype(norm::timestep_out_type(t)));
  if (B == 0) return out;
  auto run = [&](auto acc_tag) {
    using acc = decltype(acc_tag);
    const auto tc = timestep_constants<acc>(dim, max_period, downscale_freq_shift, scale);
    const std::vector<acc> f = timestep_frequencies(tc);
    acc* O = out.data_ptr<acc>();
    const int64_t half = tc.half;
    with_timesteps<acc>(t, [&](auto tv) {
      at::parallel_for(0, B, grain_for(dim), [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) {
          const acc tb = tv(b);
          acc* o = O + b * dim;
          acc* first = o;
          acc* second = o + half;
          for (int64_t k = 0; k < half; ++k) {
            const acc arg = timestep_argument(tc, tb, f[k]);
            const acc sv = norm_sin(arg), cv = norm_cos(arg);
            first[k] = flip_sin_to_cos ? cv : sv;
            second[k] = flip_sin_to_cos ? sv : cv;
          }
          if (dim % 2 == 1) o[dim - 1] = acc(0);
        }
      });
    });
  };
  if (f64) run(double{});
  else run(float{});
  return out;
}

at::Tensor timestep_embedding_backward_cpu(const at::Tensor& grad_in, const at::Tensor& t_in, int64_t dim,
                                           double max_period, double downscale_freq_shift, double scale,
                                           bool flip_sin_to_cos) {
  const at::Tensor t = norm::check_timestep_args(t_in, dim, max_period, downscale_freq_shift, c10::kCPU);
  const at::Tensor grad = norm::check_timestep_backward_args(grad_in, t, dim, c10::kCPU);
  const bool f64 = t.scalar_type() == at::kDouble;
  const int64_t B = t.size(0);
  at::Tensor dt = at::empty_like(t);
  if (B == 0) return dt;
  auto run = [&](auto acc_tag) {
    using acc = decltype(acc_tag);
    const auto tc = timestep_constants<acc>(dim, max_period, downscale_freq_shift, scale);
    const std::vector<acc> f = timestep_frequencies(tc);
    const acc* GR = grad.data_ptr<acc>();
    const int64_t half = tc.half;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "timestep_embedding_backward_cpu", [&] {
      const scalar_t* T = t.data_ptr<scalar_t>();
      scalar_t* DT = dt.data_ptr<scalar_t>();
      at::parallel_for(0, B, grain_for(dim), [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) {
          const acc tb = static_cast<acc>(T[b]);
          const acc* g1 = GR + b * dim;
          const acc* g2 = g1 + half;
          acc s = 0;
          for (int64_t k = 0; k < half; ++k) {
            const acc arg = timestep_argument(tc, tb, f[k]);
            const acc gs = flip_sin_to_cos ? g2[k] : g1[k];
            const acc gc = flip_sin_to_cos ? g1[k] : g2[k];
            s += (gs * norm_cos(arg) - gc * norm_sin(arg)) * (tc.s * f[k]);
          }
          DT[b] = static_cast<scalar_t>(s);
        }
      });
    });
  };
  if (f64) run(double{});
  else run(float{});
  return dt;
}

}  // namespace

TORCH_LIBRARY_IMPL(pygen, CPU, m) {
  m.impl("adaln_modulate", &adaln_modulate_cpu);
  m.impl("adaln_modulate_backward", &adaln_modulate_backward_cpu);
  m.impl("gated_residual", &gated_residual_cpu);
  m.impl("gated_residual_backward", &gated_residual_backward_cpu);
  m.impl("group_norm", &group_norm_cpu);
  m.impl("group_norm_backward", &group_norm_backward_cpu);
  m.impl("timestep_embedding", &timestep_embedding_cpu);
  m.impl("timestep_embedding_backward", &timestep_embedding_backward_cpu);
}

}  // namespace pygen::cpu
