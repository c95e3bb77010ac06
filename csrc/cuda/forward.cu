// csrc/cuda/forward.cu — CUDA kernels of the forward (noising) ops:
//   torch.ops.pygen.q_sample        x_t = a[t_b]·x0 + s[t_b]·eps (+ training target in the same pass)
//   torch.ops.pygen.reparameterize  z = mu + exp(logvar/2)·eps
// Per-element math in csrc/include/pygen/forward.h. One thread per Philox
// group of four consecutive elements (NoiseLayout): with in-kernel noise one
// philox4x32_10 call gives the group's four normals, exactly
// pygen.randn(x.shape, seed, stream). Each thread gathers its row's
// coefficients from the device table itself (t and table are read, an
// out-of-range t is never dereferenced and gives NaN rows); no host sync.
#include <optional>
#include <type_traits>

#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "cuda_common.cuh"
#include "pygen/forward.h"

namespace pygen::cuda {
namespace {

// Where the per-row coefficients come from (dtypes resolved at run time: the
// branches are uniform across the grid).
struct CoefficientSource {
  const void* t;
  const void* table;
  int64_t n_table;
  int interpolation;
  bool t64;      // t is int64 (else int32)
  bool table64;  // table is float64 (else float32)
};

template <typename acc, typename coef_float>
__device__ __forceinline__ ForwardCoefficients<acc> row_coefficients(const CoefficientSource& src, int64_t row) {
  const int64_t tb = src.t64 ? static_cast<const int64_t*>(src.t)[row]
                             : static_cast<int64_t>(static_cast<const int32_t*>(src.t)[row]);
  if (src.table64) {
    return gather_forward_coefficients<acc, double>(tb, static_cast<const double*>(src.table), src.n_table,
                                                    src.interpolation);
  }
  return gather_forward_coefficients<acc, coef_float>(tb, static_cast<const float*>(src.table), src.n_table,
                                                      src.interpolation);
}

// layout: the noise layout (flat unless per-row seeds); row_len: batch row length.
template <typename scalar_t, int TARGET, bool GENERATE>
__global__ void q_sample_kernel(const scalar_t* __restrict__ x0, CoefficientSource src,
                                const scalar_t* __restrict__ noise, const int64_t* __restrict__ row_seeds,
                                uint64_t seed, uint64_t stream, NoiseLayout layout, int64_t row_len,
                                scalar_t* __restrict__ xt, scalar_t* __restrict__ noise_out,
                                scalar_t* __restrict__ target_out) {
  using acc = acc_t<scalar_t>;
  using coef_float = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const int64_t w = global_thread_index();
  if (w >= layout.work_items()) return;
  const NoiseGroup ng = noise_group(layout, w);
  Normals4 z{};
  if constexpr (GENERATE) {
    z = philox_normals(noise_key(row_seeds, seed, ng.row), stream, static_cast<uint64_t>(ng.group));
  }
  int64_t row = ng.first / row_len;
  int64_t row_end = (row + 1) * row_len;
  ForwardCoefficients<acc> c = row_coefficients<acc, coef_float>(src, row);
  const acc nan = std::numeric_limits<acc>::quiet_NaN();
#pragma unroll
  for (int j = 0; j < kGroup; ++j) {
    if (j < ng.count) {
      const int64_t e = ng.first + j;
      if (e >= row_end) {  // a group can straddle batch rows when rows are not a multiple of 4 long
        row = e / row_len;
        row_end = (row + 1) * row_len;
        c = row_coefficients<acc, coef_float>(src, row);
      }
      const acc x = static_cast<acc>(x0[e]);
      acc eps;
      if constexpr (GENERATE) {
        eps = static_cast<acc>(z.z[j]);
        noise_out[e] = static_cast<scalar_t>(z.z[j]);
      } else {
        eps = static_cast<acc>(noise[e]);
      }
      xt[e] = static_cast<scalar_t>(c.valid ? forward_x_t(c.a, c.s, x, eps) : nan);
      if constexpr (TARGET != kTargetNone) {
        target_out[e] = static_cast<scalar_t>(c.valid ? forward_target<TARGET>(c.a, c.s, x, eps) : nan);
      }
    }
  }
}

template <typename scalar_t, bool GENERATE>
__global__ void reparameterize_kernel(const scalar_t* __restrict__ mu, const scalar_t* __restrict__ logvar,
                                      const scalar_t* __restrict__ noise, const int64_t* __restrict__ row_seeds,
                                      uint64_t seed, uint64_t stream, NoiseLayout layout, scalar_t* __restrict__ z,
                                      scalar_t* __restrict__ noise_out) {
  using acc = acc_t<scalar_t>;
  const int64_t w = global_thread_index();
  if (w >= layout.work_items()) return;
  const NoiseGroup ng = noise_group(layout, w);
  Normals4 normals{};
  if constexpr (GENERATE) {
    normals = philox_normals(noise_key(row_seeds, seed, ng.row), stream, static_cast<uint64_t>(ng.group));
  }
#pragma unroll
  for (int j = 0; j < kGroup; ++j) {
    if (j < ng.count) {
      const int64_t e = ng.first + j;
      acc eps;
      if constexpr (GENERATE) {
        eps = static_cast<acc>(normals.z[j]);
        noise_out[e] = static_cast<scalar_t>(normals.z[j]);
      } else {
        eps = static_cast<acc>(noise[e]);
      }
      z[e] = static_cast<scalar_t>(reparameterize_value(static_cast<acc>(mu[e]), static_cast<acc>(logvar[e]), eps));
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> q_sample_cuda(const at::Tensor& x0_in, const at::Tensor& t_in,
                                                              const at::Tensor& table_in,
                                                              const std::optional<at::Tensor>& noise_in, int64_t seed,
                                                              int64_t stream,
                                                              const std::optional<at::Tensor>& row_seeds_in,
                                                              int64_t interpolation, int64_t target) {
  const QSampleArgs args =
      check_q_sample_args(x0_in, t_in, table_in, noise_in, row_seeds_in, interpolation, target, c10::kCUDA);
  const QSampleOutputs outs = q_sample_outputs(args, target);
  const int64_t numel = args.x0.numel();
  if (numel == 0) return outs.as_tuple();

  const c10::cuda::CUDAGuard guard(args.x0.device());
  const int64_t row_len = numel / args.batch;
  const int64_t* seeds = args.row_seeds.has_value() ? args.row_seeds->data_ptr<int64_t>() : nullptr;
  const NoiseLayout layout = make_noise_layout(numel, args.batch, seeds != nullptr);
  CoefficientSource src;
  src.t = args.t.data_ptr();
  src.table = args.table.data_ptr();
  src.n_table = args.table.numel();
  src.interpolation = static_cast<int>(interpolation);
  src.t64 = args.t.scalar_type() == at::kLong;
  src.table64 = args.table.scalar_type() == at::kDouble;
  auto cuda_stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, args.x0.scalar_type(), "q_sample_cuda", [&] {
    const scalar_t* x = args.x0.data_ptr<scalar_t>();
    scalar_t* o = outs.x_t.data_ptr<scalar_t>();
    scalar_t* tg = target != kTargetNone ? outs.target.data_ptr<scalar_t>() : nullptr;
    dispatch_q_sample_target(target, [&](auto target_tag) {
      constexpr int TARGET = decltype(target_tag)::value;
      if (args.noise.has_value()) {
        q_sample_kernel<scalar_t, TARGET, false><<<blocks_for(layout.work_items()), kThreads, 0, cuda_stream>>>(
            x, src, args.noise->data_ptr<scalar_t>(), nullptr, 0, 0, layout, row_len, o, nullptr, tg);
      } else {
        q_sample_kernel<scalar_t, TARGET, true><<<blocks_for(layout.work_items()), kThreads, 0, cuda_stream>>>(
            x, src, nullptr, seeds, static_cast<uint64_t>(seed), static_cast<uint64_t>(stream), layout, row_len, o,
            outs.noise.data_ptr<scalar_t>(), tg);
      }
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return outs.as_tuple();
}

std::tuple<at::Tensor, at::Tensor> reparameterize_cuda(const at::Tensor& mu_in, const at::Tensor& logvar_in,
                                                       const std::optional<at::Tensor>& noise_in, int64_t seed,
                                                       int64_t stream, const std::optional<at::Tensor>& row_seeds_in) {
  const ReparameterizeArgs args = check_reparameterize_args(mu_in, logvar_in, noise_in, row_seeds_in, c10::kCUDA);
  const ReparameterizeOutputs outs = reparameterize_outputs(args);
  const int64_t numel = args.mu.numel();
  if (numel == 0) return outs.as_tuple();

  const c10::cuda::CUDAGuard guard(args.mu.device());
  const int64_t* seeds = args.row_seeds.has_value() ? args.row_seeds->data_ptr<int64_t>() : nullptr;
  const NoiseLayout layout = make_noise_layout(numel, args.batch, seeds != nullptr);
  auto cuda_stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, args.mu.scalar_type(), "reparameterize_cuda", [&] {
    const scalar_t* m = args.mu.data_ptr<scalar_t>();
    const scalar_t* lv = args.logvar.data_ptr<scalar_t>();
    if (args.noise.has_value()) {
      reparameterize_kernel<scalar_t, false><<<blocks_for(layout.work_items()), kThreads, 0, cuda_stream>>>(
          m, lv, args.noise->data_ptr<scalar_t>(), nullptr, 0, 0, layout, outs.z.data_ptr<scalar_t>(), nullptr);
    } else {
      reparameterize_kernel<scalar_t, true><<<blocks_for(layout.work_items()), kThreads, 0, cuda_stream>>>(
          m, lv, nullptr, seeds, static_cast<uint64_t>(seed), static_cast<uint64_t>(stream), layout,
          outs.z.data_ptr<scalar_t>(), outs.noise.data_ptr<scalar_t>());
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return outs.as_tuple();
}

}  // namespace

TORCH_LIBRARY_IMPL(pygen, CUDA, m) {
  m.impl("q_sample", &q_sample_cuda);
  m.impl("reparameterize", &reparameterize_cuda);
}

}  // namespace pygen::cuda
