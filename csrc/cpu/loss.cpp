// csrc/cpu/loss.cpp — C++ CPU kernels of the fused training-loss ops:
//   torch.ops.pygen.diffusion_loss              loss[b] = w·mean_i (m·out - ca·x0 - cb·eps)²
//   torch.ops.pygen.diffusion_loss_backward     d loss / d model_out = grad[b]·w·2·m/n·(m·out - ca·x0 - cb·eps)
//   torch.ops.pygen.reparameterize_kl           z = mu + exp(logvar/2)·eps, kl[b] = 0.5·Σ (mu² + exp(logvar) - 1 - logvar)
//   torch.ops.pygen.reparameterize_kl_backward  (dmu, dlogvar)
// Per-element math in csrc/include/pygen/loss.h; the spec is pygen/ops/loss.py.
// eps is the given noise or exactly pygen.randn(x0.shape, seed, stream) of the
// CPU backend (fill_normals; flat numbering for an int seed, within each batch
// row for per-row seeds), regenerated in every pass, never stored.
//
// Work pieces: a batch row's chunks of kPiece elements (a piece never straddles
// two rows, so the row's coefficients are hoisted out of its loop). With
// regenerated noise a piece's normals are drawn into a stack buffer first and
// consumed by the same contiguous loop as given noise. Reductions add into
// kLanes accumulators chosen by the position in the piece, and each row adds
// its pieces' partial sums in piece order: the sums do not depend on the
// thread count or split (bit-reproducible).
#include <ATen/ops/empty.h>
#include <c10/util/SmallVector.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <optional>
#include <type_traits>

#include "../loss_checks.h"
#include "cpu_common.h"
#include "pygen/loss.h"

namespace pygen::cpu {
namespace {

constexpr int64_t kPiece = kNoiseChunk;  // elements per work piece (one noise buffer)
constexpr int kLanes = 8;                 // accumulators per piece
constexpr int64_t kTaskElements = int64_t{1} << 15;  // elements per at::parallel_for grain (about)
static_assert(kPiece % kLanes == 0 && kPiece % kGroup == 0, "piece alignment");

// Arithmetic loops are compiled for AVX2 and the baseline ISA (PYGEN_VECTOR_CLONES, cpu_common.h).

// Where eps comes from: the given noise, or Philox (seed / per-row seeds, stream).
template <typename scalar_t>
struct NoiseSource {
  const scalar_t* noise = nullptr;  // given noise, or nullptr: regenerate
  const int64_t* row_seeds = nullptr;
  uint64_t seed = 0, stream = 0;
};

template <typename scalar_t>
NoiseSource<scalar_t> noise_source(const LossArgs& args, int64_t seed, int64_t stream) {
  NoiseSource<scalar_t> src;
  if (args.noise.has_value()) {
    src.noise = args.noise->data_ptr<scalar_t>();
  } else {
    src.row_seeds = args.row_seeds.has_value() ? args.row_seeds->data_ptr<int64_t>() : nullptr;
    src.seed = static_cast<uint64_t>(seed);
    src.stream = static_cast<uint64_t>(stream);
  }
  return src;
}

// Pieces per batch row.
inline int64_t pieces_per_row(int64_t row_len) { return (row_len + kPiece - 1) / kPiece; }

// Run fn(b, piece, p, q, eps) in parallel over the pieces of a (batch, row_len)
// tensor: piece `piece` (= b·pieces_per_row + chunk) covers the flat elements
// [p, q) of batch row b (kPiece long, fewer at the end of the row), and eps
// points at the noise of element p (const scalar_t* for given noise, const
// float* for regenerated normals).
template <typename scalar_t, typename Fn>
void for_each_piece(int64_t batch, int64_t row_len, const NoiseSource<scalar_t>& src, Fn&& fn) {
  const int64_t ppr = pieces_per_row(row_len);
  const int64_t pieces = batch * ppr;
  if (pieces == 0) return;
  const int64_t grain = std::max<int64_t>(1, kTaskElements / std::min(row_len, kPiece));
  at::parallel_for(0, pieces, grain, [&](int64_t i0, int64_t i1) {
    alignas(64) float normals[kPiece + kGroup];
    for (int64_t piece = i0; piece < i1; ++piece) {
      const int64_t b = piece / ppr;
      const int64_t row0 = b * row_len;
      const int64_t p = row0 + (piece - b * ppr) * kPiece;
      const int64_t q = std::min(row0 + row_len, p + kPiece);
      if (src.noise != nullptr) {
        fn(b, piece, p, q, src.noise + p);
      } else {
        // noise index of element p: within the row (per-row seeds) or flat
        const int64_t n0 = src.row_seeds != nullptr ? p - row0 : p;
        const uint64_t key = src.row_seeds != nullptr ? static_cast<uint64_t>(src.row_seeds[b]) : src.seed;
        const int64_t skip = n0 % kGroup;
        fill_normals(key, src.stream, static_cast<uint64_t>(n0 / kGroup), skip + (q - p), normals);
        fn(b, piece, p, q, static_cast<const float*>(normals + skip));
      }
    }
  });
}

// Row sums of per-piece partial sums, added in piece order.
template <typename acc, typename Fn>
void finish_rows(const acc* part, int64_t batch, int64_t ppr, Fn&& write_row) {
  at::parallel_for(0, batch, 4096, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      acc s = 0;
      for (int64_t c = 0; c < ppr; ++c) s += part[b * ppr + c];
      write_row(b, s);
    }
  });
}

template <typename acc>
inline acc sum_lanes(const acc* l) {
  return ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]));
}

// Per-row coefficient / gradient reads from a float or double tensor.
template <typename acc>
struct RowReader {
  const float* f32 = nullptr;
  const double* f64 = nullptr;
  explicit RowReader(const at::Tensor& t) {
    if (t.scalar_type() == at::kDouble) f64 = t.data_ptr<double>();
    else f32 = t.data_ptr<float>();
  }
  LossRowCoeffs<acc> coeffs(int64_t b) const {
    return f64 != nullptr ? load_loss_coeffs<acc>(f64, b) : load_loss_coeffs<acc>(f32, b);
  }
  acc at(int64_t b) const { return f64 != nullptr ? static_cast<acc>(f64[b]) : static_cast<acc>(f32[b]); }
};

// ---------------------------------------------------------------------------
// diffusion_loss
// ---------------------------------------------------------------------------
// lanes[k mod kLanes] += r_k² for the n elements of a piece (n a multiple of
// kLanes except for a row's last piece).
template <typename scalar_t, typename eps_t>
PYGEN_VECTOR_CLONES void residual_square_lanes(acc_t<scalar_t> m, acc_t<scalar_t> ca, acc_t<scalar_t> cb,
                                             const scalar_t* __restrict__ out, const scalar_t* __restrict__ x,
                                             const eps_t* __restrict__ eps, int64_t n, acc_t<scalar_t>* lanes) {
  using acc = acc_t<scalar_t>;
  acc l[kLanes];
  for (int j = 0; j < kLanes; ++j) l[j] = lanes[j];
  int64_t k = 0;
  for (; k + kLanes <= n; k += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      const acc r = diffusion_residual<acc>(m, ca, cb, static_cast<acc>(out[k + j]), static_cast<acc>(x[k + j]),
                                            static_cast<acc>(eps[k + j]));
      l[j] += r * r;
    }
  }
  for (int j = 0; k < n; ++k, ++j) {
    const acc r = diffusion_residual<acc>(m, ca, cb, static_cast<acc>(out[k]), static_cast<acc>(x[k]),
                                          static_cast<acc>(eps[k]));
    l[j] += r * r;
  }
  for (int j = 0; j < kLanes; ++j) lanes[j] = l[j];
}

template <typename scalar_t>
void diffusion_loss_kernel(const LossArgs& args, const at::Tensor& coeffs, const NoiseSource<scalar_t>& src,
                           at::Tensor& loss) {
  using acc = acc_t<scalar_t>;
  const int64_t batch = args.batch, row_len = args.row_len, ppr = pieces_per_row(row_len);
  const scalar_t* out = args.a.data_ptr<scalar_t>();
  const scalar_t* x = args.b.data_ptr<scalar_t>();
  const RowReader<acc> rows(coeffs);
  c10::SmallVector<acc, 1024> part(static_cast<size_t>(batch * ppr));
  acc* pp = part.data();
  for_each_piece<scalar_t>(batch, row_len, src, [&](int64_t b, int64_t piece, int64_t p, int64_t q, auto eps) {
    const LossRowCoeffs<acc> c = rows.coeffs(b);
    acc lanes[kLanes] = {};
    residual_square_lanes<scalar_t>(c.m, c.ca, c.cb, out + p, x + p, eps, q - p, lanes);
    pp[piece] = sum_lanes(lanes);
  });
  acc* lp = loss.data_ptr<acc>();
  finish_rows<acc>(pp, batch, ppr,
                   [&](int64_t b, acc s) { lp[b] = diffusion_row_loss<acc>(rows.coeffs(b).w, s, row_len); });
}

at::Tensor diffusion_loss_cpu(const at::Tensor& model_out, const at::Tensor& x0,
                              const std::optional<at::Tensor>& noise, const at::Tensor& coeffs_in, int64_t seed,
                              int64_t stream, const std::optional<at::Tensor>& row_seeds) {
  at::Tensor coeffs;
  const LossArgs args = check_diffusion_loss_args(model_out, x0, noise, coeffs_in, row_seeds, &coeffs, c10::kCPU);
  at::Tensor loss = at::empty({args.batch}, args.a.options().dtype(loss_acc_type(args.a)));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, args.a.scalar_type(), "diffusion_loss_cpu", [&] {
    diffusion_loss_kernel<scalar_t>(args, coeffs, noise_source<scalar_t>(args, seed, stream), loss);
  });
  return loss;
}

// ---------------------------------------------------------------------------
// diffusion_loss_backward
// ---------------------------------------------------------------------------
template <typename scalar_t, typename eps_t>
PYGEN_VECTOR_CLONES void diffusion_grad_piece(acc_t<scalar_t> k, acc_t<scalar_t> m, acc_t<scalar_t> ca,
                                            acc_t<scalar_t> cb, const scalar_t* __restrict__ out,
                                            const scalar_t* __restrict__ x, const eps_t* __restrict__ eps,
                                            scalar_t* __restrict__ grad, int64_t n) {
  using acc = acc_t<scalar_t>;
  for (int64_t i = 0; i < n; ++i) {
    const acc r = diffusion_residual<acc>(m, ca, cb, static_cast<acc>(out[i]), static_cast<acc>(x[i]),
                                          static_cast<acc>(eps[i]));
    grad[i] = static_cast<scalar_t>(k * r);
  }
}

at::Tensor diffusion_loss_backward_cpu(const at::Tensor& grad_rows_in, const at::Tensor& model_out,
                                       const at::Tensor& x0, const std::optional<at::Tensor>& noise,
                                       const at::Tensor& coeffs_in, int64_t seed, int64_t stream,
                                       const std::optional<at::Tensor>& row_seeds) {
  at::Tensor coeffs;
  const LossArgs args = check_diffusion_loss_args(model_out, x0, noise, coeffs_in, row_seeds, &coeffs, c10::kCPU);
  const at::Tensor grad_rows = check_row_table(grad_rows_in, "grad_rows", args.batch, 0, args.b, "x0", c10::kCPU);
  at::Tensor grad = at::empty(args.a.sizes(), args.a.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, args.a.scalar_type(), "diffusion_loss_backward_cpu", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* out = args.a.data_ptr<scalar_t>();
    const scalar_t* x = args.b.data_ptr<scalar_t>();
    scalar_t* g = grad.data_ptr<scalar_t>();
    const RowReader<acc> rows(coeffs), grads(grad_rows);
    const int64_t row_len = args.row_len;
    for_each_piece<scalar_t>(args.batch, row_len, noise_source<scalar_t>(args, seed, stream),
                             [&](int64_t b, int64_t, int64_t p, int64_t q, auto eps) {
                               const LossRowCoeffs<acc> c = rows.coeffs(b);
                               const acc k = diffusion_grad_scale<acc>(grads.at(b), c.w, c.m, row_len);
                               diffusion_grad_piece<scalar_t>(k, c.m, c.ca, c.cb, out + p, x + p, eps, g + p, q - p);
                             });
  });
  return grad;
}

// ---------------------------------------------------------------------------
// reparameterize_kl
// ---------------------------------------------------------------------------
template <typename scalar_t, typename eps_t>
PYGEN_VECTOR_CLONES void reparameterize_kl_piece(const scalar_t* __restrict__ mu, const scalar_t* __restrict__ lv,
                                               const eps_t* __restrict__ eps, scalar_t* __restrict__ z, int64_t n,
                                               acc_t<scalar_t>* lanes) {
  using acc = acc_t<scalar_t>;
  acc l[kLanes];
  for (int j = 0; j < kLanes; ++j) l[j] = lanes[j];
  int64_t k = 0;
  for (; k + kLanes <= n; k += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      const acc m = static_cast<acc>(mu[k + j]), v = static_cast<acc>(lv[k + j]);
      const acc s = reparameterize_std<acc>(v);
      z[k + j] = static_cast<scalar_t>(m + s * static_cast<acc>(eps[k + j]));
      l[j] += kl_term<acc>(m, v, s);
    }
  }
  for (int j = 0; k < n; ++k, ++j) {
    const acc m = static_cast<acc>(mu[k]), v = static_cast<acc>(lv[k]);
    const acc s = reparameterize_std<acc>(v);
    z[k] = static_cast<scalar_t>(m + s * static_cast<acc>(eps[k]));
    l[j] += kl_term<acc>(m, v, s);
  }
  for (int j = 0; j < kLanes; ++j) lanes[j] = l[j];
}

std::tuple<at::Tensor, at::Tensor> reparameterize_kl_cpu(const at::Tensor& mu_in, const at::Tensor& logvar_in,
                                                         const std::optional<at::Tensor>& noise, int64_t seed,
                                                         int64_t stream, const std::optional<at::Tensor>& row_seeds) {
  const LossArgs args = check_loss_args(mu_in, "mu", logvar_in, "logvar", noise, row_seeds, c10::kCPU);
  at::Tensor z = at::empty(args.a.sizes(), args.a.options());
  at::Tensor kl = at::empty({args.batch}, args.a.options().dtype(loss_acc_type(args.a)));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, args.a.scalar_type(), "reparameterize_kl_cpu", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* mu = args.a.data_ptr<scalar_t>();
    const scalar_t* lv = args.b.data_ptr<scalar_t>();
    scalar_t* zp = z.data_ptr<scalar_t>();
    const int64_t batch = args.batch, row_len = args.row_len, ppr = pieces_per_row(row_len);
    c10::SmallVector<acc, 1024> part(static_cast<size_t>(batch * ppr));
    acc* pp = part.data();
    for_each_piece<scalar_t>(batch, row_len, noise_source<scalar_t>(args, seed, stream),
                             [&](int64_t, int64_t piece, int64_t p, int64_t q, auto eps) {
                               acc lanes[kLanes] = {};
                               reparameterize_kl_piece<scalar_t>(mu + p, lv + p, eps, zp + p, q - p, lanes);
                               pp[piece] = sum_lanes(lanes);
                             });
    acc* kp = kl.data_ptr<acc>();
    finish_rows<acc>(pp, batch, ppr, [&](int64_t b, acc s) { kp[b] = acc(0.5) * s; });
  });
  return {z, kl};
}

// ---------------------------------------------------------------------------
// reparameterize_kl_backward
// ---------------------------------------------------------------------------
template <typename scalar_t, typename eps_t>
PYGEN_VECTOR_CLONES void reparameterize_kl_grad_piece(acc_t<scalar_t> gk, const scalar_t* __restrict__ gz,
                                                    const scalar_t* __restrict__ mu, const scalar_t* __restrict__ lv,
                                                    const eps_t* __restrict__ eps, scalar_t* __restrict__ dmu,
                                                    scalar_t* __restrict__ dlv, int64_t n) {
  using acc = acc_t<scalar_t>;
  for (int64_t i = 0; i < n; ++i) {
    const acc g = static_cast<acc>(gz[i]);
    const acc s = reparameterize_std<acc>(static_cast<acc>(lv[i]));
    dmu[i] = static_cast<scalar_t>(kl_grad_mu<acc>(g, gk, static_cast<acc>(mu[i])));
    dlv[i] = static_cast<scalar_t>(kl_grad_logvar<acc>(g, gk, s, static_cast<acc>(eps[i])));
  }
}

std::tuple<at::Tensor, at::Tensor> reparameterize_kl_backward_cpu(const at::Tensor& grad_z_in,
                                                                  const at::Tensor& grad_kl_in, const at::Tensor& mu_in,
                                                                  const at::Tensor& logvar_in,
                                                                  const std::optional<at::Tensor>& noise, int64_t seed,
                                                                  int64_t stream,
                                                                  const std::optional<at::Tensor>& row_seeds) {
  const LossArgs args = check_loss_args(mu_in, "mu", logvar_in, "logvar", noise, row_seeds, c10::kCPU);
  const at::Tensor grad_z = grad_z_in.contiguous();
  check_like(grad_z, "grad_z", args.a, "mu", c10::kCPU);
  const at::Tensor grad_kl = check_row_table(grad_kl_in, "grad_kl", args.batch, 0, args.a, "mu", c10::kCPU);
  at::Tensor dmu = at::empty(args.a.sizes(), args.a.options());
  at::Tensor dlv = at::empty(args.a.sizes(), args.a.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, args.a.scalar_type(), "reparameterize_kl_backward_cpu",
                                  [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* gz = grad_z.data_ptr<scalar_t>();
    const scalar_t* mu = args.a.data_ptr<scalar_t>();
    const scalar_t* lv = args.b.data_ptr<scalar_t>();
    scalar_t* dm = dmu.data_ptr<scalar_t>();
    scalar_t* dl = dlv.data_ptr<scalar_t>();
    const RowReader<acc> gks(grad_kl);
    for_each_piece<scalar_t>(args.batch, args.row_len, noise_source<scalar_t>(args, seed, stream),
                             [&](int64_t b, int64_t, int64_t p, int64_t q, auto eps) {
                               reparameterize_kl_grad_piece<scalar_t>(gks.at(b), gz + p, mu + p, lv + p, eps, dm + p,
                                                                      dl + p, q - p);
                             });
  });
  return {dmu, dlv};
}

}  // namespace

TORCH_LIBRARY_IMPL(pygen, CPU, m) {
  m.impl("diffusion_loss", &diffusion_loss_cpu);
  m.impl("diffusion_loss_backward", &diffusion_loss_backward_cpu);
  m.impl("reparameterize_kl", &reparameterize_kl_cpu);
  m.impl("reparameterize_kl_backward", &reparameterize_kl_backward_cpu);
}

}  // namespace pygen::cpu
