// csrc/cpu/forward.cpp — C++ CPU kernels of the forward (noising) ops:
//   torch.ops.pygen.q_sample        x_t = a[t_b]·x0 + s[t_b]·eps (+ training target in the same pass)
//   torch.ops.pygen.reparameterize  z = mu + exp(logvar/2)·eps
// Per-element math in csrc/include/pygen/forward.h; in-kernel noise is exactly
// pygen.randn(x.shape, seed, stream) of the CPU backend (NoiseLayout +
// fill_normals from cpu_common.h).
//
// Loop structure (so that GCC vectorizes the arithmetic):
//   * the per-row coefficients (a, s) are gathered once per call, before the
//     element loops (an out-of-range t gives a NaN row, never a read);
//   * at::parallel_for splits the flat element range; inside a chunk, each
//     batch row's segment is one contiguous inner loop with (a, s) hoisted;
//   * with in-kernel noise the chunk is a run of kNoiseChunk elements of one
//     noise row: its normals are generated into a small buffer first
//     (fill_normals, vectorised: the same numbers as pygen.randn on the CPU),
//     then the same contiguous loop reads them from there.
#include <ATen/ops/empty.h>
#include <c10/util/SmallVector.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <optional>
#include <type_traits>

#include "cpu_common.h"
#include "pygen/forward.h"

namespace pygen::cpu {
namespace {

// Elements per at::parallel_for grain when the noise is given.
constexpr int64_t kGrainElements = int64_t{1} << 15;
// Rows per at::parallel_for grain when gathering the per-row coefficients.
constexpr int64_t kGrainRows = int64_t{1} << 14;
// Row segments shorter than this skip the multi-versioned (not inlinable) loop.
constexpr int64_t kShortSegment = 32;

// The contiguous arithmetic loops are PYGEN_VECTOR_CLONES (cpu_common.h: AVX2
// and baseline, no FMA), so x_t rounds like the eager composite: two products,
// then the sum.

template <typename T>
T* offset_or_null(T* p, int64_t k) {
  return p != nullptr ? p + k : nullptr;
}

// Call fn(row, begin, end) for the pieces of the flat range [begin, end) that
// lie in one batch row each (rows are row_len elements long).
template <typename Fn>
inline void for_each_row_segment(int64_t begin, int64_t end, int64_t row_len, Fn&& fn) {
  int64_t row = begin / row_len;
  int64_t pos = begin;
  while (pos < end) {
    const int64_t stop = std::min(end, (row + 1) * row_len);
    fn(row, pos, stop);
    pos = stop;
    ++row;
  }
}

// Draw the noise of an op's numel elements in `batch` rows chunk by chunk —
// pygen.randn(shape, seed, stream), per-row seeds when given — and call
// fn(begin, end, normals) per chunk (see for_each_normals_chunk).
template <typename Fn>
void for_each_drawn_noise_chunk(int64_t numel, int64_t batch, const std::optional<at::Tensor>& row_seeds, int64_t seed,
                                int64_t stream, Fn&& fn) {
  const int64_t* seeds = row_seeds.has_value() ? row_seeds->data_ptr<int64_t>() : nullptr;
  for_each_normals_chunk(
      make_noise_layout(numel, batch, seeds != nullptr),
      [&](int64_t r) { return static_cast<uint64_t>(seeds != nullptr ? seeds[r] : seed); },
      [&](int64_t) { return static_cast<uint64_t>(stream); }, fn);
}

// ---------------------------------------------------------------------------
// q_sample
// ---------------------------------------------------------------------------
template <typename acc>
struct RowCoefficients {
  c10::SmallVector<acc, 64> a, s;
  c10::SmallVector<uint8_t, 64> valid;
};

template <typename acc, typename coef_t, typename table_t, typename index_t>
void gather_rows(RowCoefficients<acc>& rc, const index_t* t, int64_t batch, const table_t* table, int64_t n_table,
                 int interpolation) {
  rc.a.resize(batch);
  rc.s.resize(batch);
  rc.valid.resize(batch);
  at::parallel_for(0, batch, kGrainRows, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const auto c =
          gather_forward_coefficients<acc, coef_t>(static_cast<int64_t>(t[b]), table, n_table, interpolation);
      rc.a[b] = c.a;
      rc.s[b] = c.s;
      rc.valid[b] = c.valid ? 1 : 0;
    }
  });
}

template <typename scalar_t>
RowCoefficients<acc_t<scalar_t>> row_coefficients(const at::Tensor& t, const at::Tensor& table, int interpolation) {
  using acc = acc_t<scalar_t>;
  RowCoefficients<acc> rc;
  const int64_t batch = t.numel();
  const int64_t n_table = table.numel();
  const bool t64 = t.scalar_type() == at::kLong;
  if (table.scalar_type() == at::kDouble) {
    const double* tab = table.data_ptr<double>();
    if (t64) gather_rows<acc, double>(rc, t.data_ptr<int64_t>(), batch, tab, n_table, interpolation);
    else gather_rows<acc, double>(rc, t.data_ptr<int32_t>(), batch, tab, n_table, interpolation);
  } else {
    using coef_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const float* tab = table.data_ptr<float>();
    if (t64) gather_rows<acc, coef_t>(rc, t.data_ptr<int64_t>(), batch, tab, n_table, interpolation);
    else gather_rows<acc, coef_t>(rc, t.data_ptr<int32_t>(), batch, tab, n_table, interpolation);
  }
  return rc;
}

// One batch row's contiguous segment of n elements.
template <int TARGET, bool WRITE_NOISE, typename scalar_t, typename eps_t>
inline void q_sample_segment_impl(acc_t<scalar_t> a, acc_t<scalar_t> s, bool valid, const scalar_t* __restrict__ x0,
                                  const eps_t* __restrict__ eps, scalar_t* __restrict__ xt,
                                  scalar_t* __restrict__ noise_out, scalar_t* __restrict__ tgt, int64_t n) {
  using acc = acc_t<scalar_t>;
  if (valid) {
    for (int64_t i = 0; i < n; ++i) {
      const acc x = static_cast<acc>(x0[i]);
      const acc e = static_cast<acc>(eps[i]);
      xt[i] = static_cast<scalar_t>(forward_x_t(a, s, x, e));
      if constexpr (WRITE_NOISE) noise_out[i] = static_cast<scalar_t>(eps[i]);
      if constexpr (TARGET != kTargetNone) tgt[i] = static_cast<scalar_t>(forward_target<TARGET>(a, s, x, e));
    }
  } else {
    // t out of range: the row's x_t and target are NaN; the noise is still the seed's noise.
    const scalar_t nan = static_cast<scalar_t>(std::numeric_limits<acc>::quiet_NaN());
    for (int64_t i = 0; i < n; ++i) {
      xt[i] = nan;
      if constexpr (WRITE_NOISE) noise_out[i] = static_cast<scalar_t>(eps[i]);
      if constexpr (TARGET != kTargetNone) tgt[i] = nan;
    }
  }
}

// The same loop compiled per ISA (see PYGEN_VECTOR_CLONES).
template <int TARGET, bool WRITE_NOISE, typename scalar_t, typename eps_t>
PYGEN_VECTOR_CLONES void q_sample_segment_vector(acc_t<scalar_t> a, acc_t<scalar_t> s, bool valid,
                                                 const scalar_t* __restrict__ x0, const eps_t* __restrict__ eps,
                                                 scalar_t* __restrict__ xt, scalar_t* __restrict__ noise_out,
                                                 scalar_t* __restrict__ tgt, int64_t n) {
  q_sample_segment_impl<TARGET, WRITE_NOISE>(a, s, valid, x0, eps, xt, noise_out, tgt, n);
}

template <int TARGET, bool WRITE_NOISE, typename scalar_t, typename eps_t>
inline void q_sample_segment(acc_t<scalar_t> a, acc_t<scalar_t> s, bool valid, const scalar_t* x0, const eps_t* eps,
                             scalar_t* xt, scalar_t* noise_out, scalar_t* tgt, int64_t n) {
  if (n >= kShortSegment) {
    q_sample_segment_vector<TARGET, WRITE_NOISE>(a, s, valid, x0, eps, xt, noise_out, tgt, n);
  } else {
    q_sample_segment_impl<TARGET, WRITE_NOISE>(a, s, valid, x0, eps, xt, noise_out, tgt, n);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> q_sample_cpu(const at::Tensor& x0_in, const at::Tensor& t_in,
                                                             const at::Tensor& table_in,
                                                             const std::optional<at::Tensor>& noise_in, int64_t seed,
                                                             int64_t stream, const std::optional<at::Tensor>& row_seeds_in,
                                                             int64_t interpolation, int64_t target) {
  const QSampleArgs args =
      check_q_sample_args(x0_in, t_in, table_in, noise_in, row_seeds_in, interpolation, target, c10::kCPU);
  const QSampleOutputs outs = q_sample_outputs(args, target);
  const int64_t numel = args.x0.numel();
  if (numel == 0) return outs.as_tuple();
  const int64_t row_len = numel / args.batch;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, args.x0.scalar_type(), "q_sample_cpu", [&] {
    const auto rc = row_coefficients<scalar_t>(args.t, args.table, static_cast<int>(interpolation));
    const scalar_t* x = args.x0.data_ptr<scalar_t>();
    scalar_t* o = outs.x_t.data_ptr<scalar_t>();
    scalar_t* tg = target != kTargetNone ? outs.target.data_ptr<scalar_t>() : nullptr;
    dispatch_q_sample_target(target, [&](auto target_tag) {
      constexpr int TARGET = decltype(target_tag)::value;
      if (args.noise.has_value()) {
        const scalar_t* n = args.noise->data_ptr<scalar_t>();
        at::parallel_for(0, numel, kGrainElements, [&](int64_t begin, int64_t end) {
          for_each_row_segment(begin, end, row_len, [&](int64_t row, int64_t p, int64_t q) {
            q_sample_segment<TARGET, false, scalar_t, scalar_t>(rc.a[row], rc.s[row], rc.valid[row] != 0, x + p, n + p,
                                                                o + p, nullptr, offset_or_null(tg, p), q - p);
          });
        });
      } else {
        scalar_t* no = outs.noise.data_ptr<scalar_t>();
        for_each_drawn_noise_chunk(
            numel, args.batch, args.row_seeds, seed, stream, [&](int64_t begin, int64_t end, const float* normals) {
              for_each_row_segment(begin, end, row_len, [&](int64_t row, int64_t p, int64_t q) {
                q_sample_segment<TARGET, true, scalar_t, float>(rc.a[row], rc.s[row], rc.valid[row] != 0, x + p,
                                                                normals + (p - begin), o + p, no + p,
                                                                offset_or_null(tg, p), q - p);
              });
            });
      }
    });
  });
  return outs.as_tuple();
}

// ---------------------------------------------------------------------------
// reparameterize
// ---------------------------------------------------------------------------
template <bool WRITE_NOISE, typename scalar_t, typename eps_t>
PYGEN_VECTOR_CLONES void reparameterize_segment(const scalar_t* __restrict__ mu, const scalar_t* __restrict__ logvar,
                            const eps_t* __restrict__ eps, scalar_t* __restrict__ z, scalar_t* __restrict__ noise_out,
                            int64_t n) {
  using acc = acc_t<scalar_t>;
  for (int64_t i = 0; i < n; ++i) {
    z[i] = static_cast<scalar_t>(
        reparameterize_value(static_cast<acc>(mu[i]), static_cast<acc>(logvar[i]), static_cast<acc>(eps[i])));
    if constexpr (WRITE_NOISE) noise_out[i] = static_cast<scalar_t>(eps[i]);
  }
}

std::tuple<at::Tensor, at::Tensor> reparameterize_cpu(const at::Tensor& mu_in, const at::Tensor& logvar_in,
                                                      const std::optional<at::Tensor>& noise_in, int64_t seed,
                                                      int64_t stream, const std::optional<at::Tensor>& row_seeds_in) {
  const ReparameterizeArgs args = check_reparameterize_args(mu_in, logvar_in, noise_in, row_seeds_in, c10::kCPU);
  const ReparameterizeOutputs outs = reparameterize_outputs(args);
  const int64_t numel = args.mu.numel();
  if (numel == 0) return outs.as_tuple();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, args.mu.scalar_type(), "reparameterize_cpu", [&] {
    const scalar_t* m = args.mu.data_ptr<scalar_t>();
    const scalar_t* lv = args.logvar.data_ptr<scalar_t>();
    scalar_t* o = outs.z.data_ptr<scalar_t>();
    if (args.noise.has_value()) {
      const scalar_t* n = args.noise->data_ptr<scalar_t>();
      at::parallel_for(0, numel, kGrainElements, [&](int64_t begin, int64_t end) {
        reparameterize_segment<false, scalar_t, scalar_t>(m + begin, lv + begin, n + begin, o + begin, nullptr,
                                                          end - begin);
      });
    } else {
      scalar_t* no = outs.noise.data_ptr<scalar_t>();
      for_each_drawn_noise_chunk(
          numel, args.batch, args.row_seeds, seed, stream, [&](int64_t begin, int64_t end, const float* normals) {
            reparameterize_segment<true, scalar_t, float>(m + begin, lv + begin, normals, o + begin, no + begin,
                                                          end - begin);
          });
    }
  });
  return outs.as_tuple();
}

}  // namespace

TORCH_LIBRARY_IMPL(pygen, CPU, m) {
  m.impl("q_sample", &q_sample_cpu);
  m.impl("reparameterize", &reparameterize_cpu);
}

}  // namespace pygen::cpu
