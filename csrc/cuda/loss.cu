// csrc/cuda/loss.cu — CUDA kernels of the fused training-loss ops:
//   torch.ops.pygen.diffusion_loss              loss[b] = w·mean_i (m·out - ca·x0 - cb·eps)²
//   torch.ops.pygen.diffusion_loss_backward     d loss / d model_out = grad[b]·w·2·m/n·(m·out - ca·x0 - cb·eps)
//   torch.ops.pygen.reparameterize_kl           z = mu + exp(logvar/2)·eps, kl[b] = 0.5·Σ (mu² + exp(logvar) - 1 - logvar)
//   torch.ops.pygen.reparameterize_kl_backward  (dmu, dlogvar)
// Per-element math in csrc/include/pygen/loss.h; the spec is pygen/ops/loss.py.
// eps is the given noise or exactly pygen.randn(x0.shape, seed, stream)
// (philox_normals; flat numbering for an int seed, within each batch row for
// per-row seeds), regenerated in every pass, never stored.
//
// Reductions (diffusion_loss, the KL of reparameterize_kl): two launches on the
// current stream, no host sync, no atomics (bit-reproducible):
//   1. one block per (batch row, window of kWindowGroups Philox groups starting
//      at the row's first noise group); each thread takes kGroupsPerThread
//      groups, the block sums in a fixed tree and writes one partial. Rows of
//      at most kSmallRow elements use one thread per row instead.
//   2. one thread per row adds its partials in window order.
// Backward kernels: one thread per Philox group of four elements (NoiseLayout),
// with the batch row of each element (a group can straddle two rows).
#include <limits>
#include <optional>

#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "../loss_checks.h"
#include "cuda_common.cuh"
#include "pygen/loss.h"

namespace pygen::cuda {
namespace {

constexpr int kGroupsPerThread = 4;
constexpr int64_t kWindowGroups = static_cast<int64_t>(kThreads) * kGroupsPerThread;
constexpr int64_t kSmallRow = 64;  // rows this short: one thread per row


// A float32 or float64 per-row table (coeffs (B, 4), grad_rows / grad_kl (B,)), read in acc.
struct RowTable {
  const float* f32;
  const double* f64;
};

inline RowTable row_table(const at::Tensor& t) {
  RowTable r{nullptr, nullptr};
  if (t.scalar_type() == at::kDouble) r.f64 = t.data_ptr<double>();
  else r.f32 = t.data_ptr<float>();
  return r;
}

template <typename acc>
__device__ __forceinline__ acc table_at(const RowTable& t, int64_t i) {
  return t.f64 != nullptr ? static_cast<acc>(t.f64[i]) : static_cast<acc>(t.f32[i]);
}

template <typename acc>
__device__ __forceinline__ LossRowCoeffs<acc> row_coeffs(const RowTable& t, int64_t b) {
  return t.f64 != nullptr ? load_loss_coeffs<acc>(t.f64, b) : load_loss_coeffs<acc>(t.f32, b);
}

// Noise of a launch: the given tensor, or Philox (seed / per-row seeds, stream).
template <typename scalar_t>
struct Noise {
  const scalar_t* given;
  const int64_t* row_seeds;
  uint64_t seed, stream;
};

template <typename scalar_t>
Noise<scalar_t> make_noise(const LossArgs& args, int64_t seed, int64_t stream) {
  Noise<scalar_t> n{nullptr, nullptr, static_cast<uint64_t>(seed), static_cast<uint64_t>(stream)};
  if (args.noise.has_value()) n.given = args.noise->data_ptr<scalar_t>();
  else if (args.row_seeds.has_value()) n.row_seeds = args.row_seeds->data_ptr<int64_t>();
  return n;
}

// Visit the elements of Philox group g of batch row b (noise index of the row's
// element 0: nb): fn(flat index, eps) for those inside the row.
template <typename scalar_t, bool GIVEN, typename Fn>
__device__ __forceinline__ void visit_group(const Noise<scalar_t>& nz, int64_t g, int64_t b, int64_t nb,
                                            int64_t row_len, Fn&& fn) {
  using acc = acc_t<scalar_t>;
  const int64_t local0 = g * kGroup - nb;
  if (local0 + kGroup <= 0 || local0 >= row_len) return;
  Normals4 z{};
  if constexpr (!GIVEN) z = philox_normals(noise_key(nz.row_seeds, nz.seed, b), nz.stream, static_cast<uint64_t>(g));
#pragma unroll
  for (int j = 0; j < kGroup; ++j) {
    const int64_t local = local0 + j;
    if (local >= 0 && local < row_len) {
      const int64_t idx = b * row_len + local;
      if constexpr (GIVEN) {
        fn(idx, static_cast<acc>(nz.given[idx]));
      } else {
        fn(idx, static_cast<acc>(z.z[j]));
      }
    }
  }
}

// The reduction kernels' element work: KIND 0 adds r² (diffusion_loss), KIND 1
// writes z and adds the KL term (reparameterize_kl).
template <typename scalar_t, int KIND>
struct RowOp {
  const scalar_t* a;  // model_out / mu
  const scalar_t* b;  // x0 / logvar
  scalar_t* z;        // KIND 1: z
  RowTable coeffs;    // KIND 0
};

template <typename scalar_t, int KIND, bool GIVEN>
__device__ __forceinline__ acc_t<scalar_t> reduce_group(const RowOp<scalar_t, KIND>& op, const Noise<scalar_t>& nz,
                                                        const LossRowCoeffs<acc_t<scalar_t>>& c, int64_t g, int64_t b,
                                                        int64_t nb, int64_t row_len) {
  using acc = acc_t<scalar_t>;
  acc s = 0;
  visit_group<scalar_t, GIVEN>(nz, g, b, nb, row_len, [&](int64_t idx, acc eps) {
    const acc u = static_cast<acc>(op.a[idx]), v = static_cast<acc>(op.b[idx]);
    if constexpr (KIND == 0) {
      const acc r = diffusion_residual<acc>(c.m, c.ca, c.cb, u, v, eps);
      s += r * r;
    } else {
      const acc sd = reparameterize_std<acc>(v);
      op.z[idx] = static_cast<scalar_t>(u + sd * eps);
      s += kl_term<acc>(u, v, sd);
    }
  });
  return s;
}

template <typename scalar_t, int KIND, bool GIVEN>
__global__ void row_partials_kernel(RowOp<scalar_t, KIND> op, Noise<scalar_t> nz, int64_t row_len, int64_t windows,
                                    acc_t<scalar_t>* __restrict__ part) {
  using acc = acc_t<scalar_t>;
  __shared__ acc shm[kThreads / 32];
  const int64_t item = blockIdx.x;
  const int64_t b = item / windows;
  const int64_t w = item - b * windows;
  const int64_t nb = (GIVEN || nz.row_seeds != nullptr) ? 0 : b * row_len;
  LossRowCoeffs<acc> c{};
  if constexpr (KIND == 0) c = row_coeffs<acc>(op.coeffs, b);
  const int64_t g0 = nb / kGroup + w * kWindowGroups;
  acc s = 0;
#pragma unroll
  for (int k = 0; k < kGroupsPerThread; ++k) {
    s += reduce_group<scalar_t, KIND, GIVEN>(op, nz, c, g0 + k * kThreads + threadIdx.x, b, nb, row_len);
  }
  s = block_sum_to_thread0(s, shm);
  if (threadIdx.x == 0) part[item] = s;
}

// Short rows: one thread per batch row (one partial per row).
template <typename scalar_t, int KIND, bool GIVEN>
__global__ void small_rows_kernel(RowOp<scalar_t, KIND> op, Noise<scalar_t> nz, int64_t batch, int64_t row_len,
                                  acc_t<scalar_t>* __restrict__ part) {
  using acc = acc_t<scalar_t>;
  const int64_t b = global_thread_index();
  if (b >= batch) return;
  const int64_t nb = (GIVEN || nz.row_seeds != nullptr) ? 0 : b * row_len;
  LossRowCoeffs<acc> c{};
  if constexpr (KIND == 0) c = row_coeffs<acc>(op.coeffs, b);
  acc s = 0;
  for (int64_t g = nb / kGroup; g * kGroup < nb + row_len; ++g) {
    s += reduce_group<scalar_t, KIND, GIVEN>(op, nz, c, g, b, nb, row_len);
  }
  part[b] = s;
}

// KIND 0: loss[b] = w·(s / n); KIND 1: kl[b] = 0.5·s (partials added in window order).
template <typename acc, int KIND>
__global__ void finish_rows_kernel(const acc* __restrict__ part, RowTable coeffs, int64_t batch, int64_t windows,
                                   int64_t row_len, acc* __restrict__ out) {
  const int64_t b = global_thread_index();
  if (b >= batch) return;
  acc s = 0;
  for (int64_t w = 0; w < windows; ++w) s += part[b * windows + w];
  if constexpr (KIND == 0) {
    out[b] = diffusion_row_loss<acc>(row_coeffs<acc>(coeffs, b).w, s, row_len);
  } else {
    out[b] = acc(0.5) * s;
  }
}

template <typename scalar_t, int KIND>
void launch_row_reduction(const RowOp<scalar_t, KIND>& op, const Noise<scalar_t>& nz, int64_t batch, int64_t row_len,
                          at::Tensor& out, cudaStream_t cs) {
  using acc = acc_t<scalar_t>;
  const bool small = row_len <= kSmallRow;
  // a row may start mid-group (flat numbering), hence the + kGroup - 1
  const int64_t windows = small ? 1 : (row_len + kGroup - 1 + kWindowGroups * kGroup - 1) / (kWindowGroups * kGroup);
  const int64_t items = batch * windows;
  TORCH_CHECK(small || items <= static_cast<int64_t>(std::numeric_limits<int>::max()),
              "pygen: loss reduction: too many blocks (", items, ")");
  at::Tensor part = at::empty({items}, out.options());
  acc* pp = part.data_ptr<acc>();
  const bool given = nz.given != nullptr;
  if (small) {
    const unsigned int blocks = blocks_for(batch);
    if (given) small_rows_kernel<scalar_t, KIND, true><<<blocks, kThreads, 0, cs>>>(op, nz, batch, row_len, pp);
    else small_rows_kernel<scalar_t, KIND, false><<<blocks, kThreads, 0, cs>>>(op, nz, batch, row_len, pp);
  } else {
    const auto grid = static_cast<unsigned int>(items);
    if (given) row_partials_kernel<scalar_t, KIND, true><<<grid, kThreads, 0, cs>>>(op, nz, row_len, windows, pp);
    else row_partials_kernel<scalar_t, KIND, false><<<grid, kThreads, 0, cs>>>(op, nz, row_len, windows, pp);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  finish_rows_kernel<acc, KIND><<<blocks_for(batch), kThreads, 0, cs>>>(pp, op.coeffs, batch, windows, row_len,
                                                                        out.data_ptr<acc>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---------------------------------------------------------------------------
// elementwise backward kernels: one thread per Philox group of the NoiseLayout
// ---------------------------------------------------------------------------
template <typename scalar_t, bool GIVEN, typename Fn>
__device__ __forceinline__ void visit_layout_group(const Noise<scalar_t>& nz, const NoiseLayout& layout, int64_t w,
                                                   Fn&& fn) {
  using acc = acc_t<scalar_t>;
  const NoiseGroup ng = noise_group(layout, w);
  Normals4 z{};
  if constexpr (!GIVEN) z = philox_normals(noise_key(nz.row_seeds, nz.seed, ng.row), nz.stream,
                                           static_cast<uint64_t>(ng.group));
#pragma unroll
  for (int j = 0; j < kGroup; ++j) {
    if (j < ng.count) {
      const int64_t e = ng.first + j;
      if constexpr (GIVEN) {
        fn(e, static_cast<acc>(nz.given[e]));
      } else {
        fn(e, static_cast<acc>(z.z[j]));
      }
    }
  }
}

template <typename scalar_t, bool GIVEN>
__global__ void diffusion_loss_backward_kernel(RowTable grad_rows,
                                               RowTable coeffs, const scalar_t* __restrict__ out,
                                               const scalar_t* __restrict__ x0, Noise<scalar_t> nz, NoiseLayout layout,
                                               int64_t row_len, scalar_t* __restrict__ grad) {
  using acc = acc_t<scalar_t>;
  const int64_t w = global_thread_index();
  if (w >= layout.work_items()) return;
  int64_t row = -1;
  LossRowCoeffs<acc> c{};
  acc k = 0;
  visit_layout_group<scalar_t, GIVEN>(nz, layout, w, [&](int64_t e, acc eps) {
    const int64_t b = e / row_len;
    if (b != row) {  // a group can straddle batch rows when rows are not a multiple of 4 long
      row = b;
      c = row_coeffs<acc>(coeffs, b);
      k = diffusion_grad_scale<acc>(table_at<acc>(grad_rows, b), c.w, c.m, row_len);
    }
    const acc r = diffusion_residual<acc>(c.m, c.ca, c.cb, static_cast<acc>(out[e]), static_cast<acc>(x0[e]), eps);
    grad[e] = static_cast<scalar_t>(k * r);
  });
}

template <typename scalar_t, bool GIVEN>
__global__ void reparameterize_kl_backward_kernel(RowTable grad_kl, const scalar_t* __restrict__ grad_z,
                                                  const scalar_t* __restrict__ mu, const scalar_t* __restrict__ logvar,
                                                  Noise<scalar_t> nz, NoiseLayout layout, int64_t row_len,
                                                  scalar_t* __restrict__ dmu, scalar_t* __restrict__ dlogvar) {
  using acc = acc_t<scalar_t>;
  const int64_t w = global_thread_index();
  if (w >= layout.work_items()) return;
  int64_t row = -1;
  acc gk = 0;
  visit_layout_group<scalar_t, GIVEN>(nz, layout, w, [&](int64_t e, acc eps) {
    const int64_t b = e / row_len;
    if (b != row) {
      row = b;
      gk = table_at<acc>(grad_kl, b);
    }
    const acc g = static_cast<acc>(grad_z[e]);
    const acc sd = reparameterize_std<acc>(static_cast<acc>(logvar[e]));
    dmu[e] = static_cast<scalar_t>(kl_grad_mu<acc>(g, gk, static_cast<acc>(mu[e])));
    dlogvar[e] = static_cast<scalar_t>(kl_grad_logvar<acc>(g, gk, sd, eps));
  });
}

// ---------------------------------------------------------------------------
// op entry points
// ---------------------------------------------------------------------------
at::Tensor diffusion_loss_cuda(const at::Tensor& model_out, const at::Tensor& x0,
                               const std::optional<at::Tensor>& noise, const at::Tensor& coeffs_in, int64_t seed,
                               int64_t stream, const std::optional<at::Tensor>& row_seeds) {
  at::Tensor coeffs;
  const LossArgs args = check_diffusion_loss_args(model_out, x0, noise, coeffs_in, row_seeds, &coeffs, c10::kCUDA);
  const c10::cuda::CUDAGuard guard(args.a.device());
  at::Tensor loss = at::empty({args.batch}, args.a.options().dtype(loss_acc_type(args.a)));
  if (args.batch == 0) return loss;
  if (args.row_len == 0) return loss.fill_(std::numeric_limits<double>::quiet_NaN());  // mean of nothing: 0/0
  cudaStream_t cs = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, args.a.scalar_type(), "diffusion_loss_cuda", [&] {
    RowOp<scalar_t, 0> op{args.a.data_ptr<scalar_t>(), args.b.data_ptr<scalar_t>(), nullptr, row_table(coeffs)};
    launch_row_reduction<scalar_t, 0>(op, make_noise<scalar_t>(args, seed, stream), args.batch, args.row_len, loss,
                                      cs);
  });
  return loss;
}

at::Tensor diffusion_loss_backward_cuda(const at::Tensor& grad_rows_in, const at::Tensor& model_out,
                                        const at::Tensor& x0, const std::optional<at::Tensor>& noise,
                                        const at::Tensor& coeffs_in, int64_t seed, int64_t stream,
                                        const std::optional<at::Tensor>& row_seeds) {
  at::Tensor coeffs;
  const LossArgs args = check_diffusion_loss_args(model_out, x0, noise, coeffs_in, row_seeds, &coeffs, c10::kCUDA);
  const at::Tensor grad_rows = check_row_table(grad_rows_in, "grad_rows", args.batch, 0, args.b, "x0", c10::kCUDA);
  const c10::cuda::CUDAGuard guard(args.a.device());
  at::Tensor grad = at::empty(args.a.sizes(), args.a.options());
  if (args.a.numel() == 0) return grad;
  const NoiseLayout layout = make_noise_layout(args.a.numel(), args.batch, args.row_seeds.has_value());
  cudaStream_t cs = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, args.a.scalar_type(), "diffusion_loss_backward_cuda", [&] {
    const Noise<scalar_t> nz = make_noise<scalar_t>(args, seed, stream);
    const scalar_t* o = args.a.data_ptr<scalar_t>();
    const scalar_t* x = args.b.data_ptr<scalar_t>();
    scalar_t* g = grad.data_ptr<scalar_t>();
    const auto blocks = blocks_for(layout.work_items());
    if (nz.given != nullptr) {
      diffusion_loss_backward_kernel<scalar_t, true><<<blocks, kThreads, 0, cs>>>(
          row_table(grad_rows), row_table(coeffs), o, x, nz, layout, args.row_len, g);
    } else {
      diffusion_loss_backward_kernel<scalar_t, false><<<blocks, kThreads, 0, cs>>>(
          row_table(grad_rows), row_table(coeffs), o, x, nz, layout, args.row_len, g);
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return grad;
}

std::tuple<at::Tensor, at::Tensor> reparameterize_kl_cuda(const at::Tensor& mu_in, const at::Tensor& logvar_in,
                                                          const std::optional<at::Tensor>& noise, int64_t seed,
                                                          int64_t stream, const std::optional<at::Tensor>& row_seeds) {
  const LossArgs args = check_loss_args(mu_in, "mu", logvar_in, "logvar", noise, row_seeds, c10::kCUDA);
  const c10::cuda::CUDAGuard guard(args.a.device());
  at::Tensor z = at::empty(args.a.sizes(), args.a.options());
  at::Tensor kl = at::empty({args.batch}, args.a.options().dtype(loss_acc_type(args.a)));
  if (args.batch == 0) return {z, kl};
  if (args.row_len == 0) return {z, kl.zero_()};  // a sum of nothing
  cudaStream_t cs = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, args.a.scalar_type(), "reparameterize_kl_cuda", [&] {
    RowOp<scalar_t, 1> op{args.a.data_ptr<scalar_t>(), args.b.data_ptr<scalar_t>(), z.data_ptr<scalar_t>(),
                          RowTable{nullptr, nullptr}};
    launch_row_reduction<scalar_t, 1>(op, make_noise<scalar_t>(args, seed, stream), args.batch, args.row_len, kl, cs);
  });
  return {z, kl};
}

std::tuple<at::Tensor, at::Tensor> reparameterize_kl_backward_cuda(
    const at::Tensor& grad_z_in, const at::Tensor& grad_kl_in, const at::Tensor& mu_in, const at::Tensor& logvar_in,
    const std::optional<at::Tensor>& noise, int64_t seed, int64_t stream, const std::optional<at::Tensor>& row_seeds) {
  const LossArgs args = check_loss_args(mu_in, "mu", logvar_in, "logvar", noise, row_seeds, c10::kCUDA);
  const at::Tensor grad_z = grad_z_in.contiguous();
  check_like(grad_z, "grad_z", args.a, "mu", c10::kCUDA);
  const at::Tensor grad_kl = check_row_table(grad_kl_in, "grad_kl", args.batch, 0, args.a, "mu", c10::kCUDA);
  const c10::cuda::CUDAGuard guard(args.a.device());
  at::Tensor dmu = at::empty(args.a.sizes(), args.a.options());
  at::Tensor dlv = at::empty(args.a.sizes(), args.a.options());
  if (args.a.numel() == 0) return {dmu, dlv};
  const NoiseLayout layout = make_noise_layout(args.a.numel(), args.batch, args.row_seeds.has_value());
  cudaStream_t cs = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, args.a.scalar_type(), "reparameterize_kl_backward_cuda",
                                  [&] {
    const Noise<scalar_t> nz = make_noise<scalar_t>(args, seed, stream);
    const auto blocks = blocks_for(layout.work_items());
    const scalar_t* gz = grad_z.data_ptr<scalar_t>();
    const scalar_t* m = args.a.data_ptr<scalar_t>();
    const scalar_t* lv = args.b.data_ptr<scalar_t>();
    scalar_t* dm = dmu.data_ptr<scalar_t>();
    scalar_t* dl = dlv.data_ptr<scalar_t>();
    if (nz.given != nullptr) {
      reparameterize_kl_backward_kernel<scalar_t, true><<<blocks, kThreads, 0, cs>>>(
          row_table(grad_kl), gz, m, lv, nz, layout, args.row_len, dm, dl);
    } else {
      reparameterize_kl_backward_kernel<scalar_t, false><<<blocks, kThreads, 0, cs>>>(
          row_table(grad_kl), gz, m, lv, nz, layout, args.row_len, dm, dl);
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {dmu, dlv};
}

}  // namespace

TORCH_LIBRARY_IMPL(pygen, CUDA, m) {
  m.impl("diffusion_loss", &diffusion_loss_cuda);
  m.impl("diffusion_loss_backward", &diffusion_loss_backward_cuda);
  m.impl("reparameterize_kl", &reparameterize_kl_cuda);
  m.impl("reparameterize_kl_backward", &reparameterize_kl_backward_cuda);
}

}  // namespace pygen::cuda
