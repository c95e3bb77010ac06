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

template <typename Fn>
void dispatch_target(int64_t target, Fn&& fn) {
  switch (target) {
    case kTargetNone: return fn(std::integral_constant<int, kTargetNone>{});
    case kTargetEps: return fn(std::integral_constant<int, kTargetEps>{});
    case kTargetV: return fn(std::integral_constant<int, kTargetV>{});
    case kTargetX0: return fn(std::integral_constant<int, kTargetX0>{});
    case kTargetFlow: return fn(std::integral_constant<int, kTargetFlow>{});
    default: TORCH_CHECK(false, "pygen: q_sample target must be 0..4, got ", target);
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
  const at::Tensor& x0 = args.x0;
  const at::Tensor& t = args.t;
  const at::Tensor& table = args.table;
  const int64_t batch = args.batch;
  const bool generate = !args.noise.has_value();
  const bool per_row = args.row_seeds.has_value();
  at::Tensor xt = at::empty(x0.sizes(), x0.options());
  at::Tensor noise_out = generate ? at::empty(x0.sizes(), x0.options()) : at::empty({0}, x0.options());
  at::Tensor target_out = target != kTargetNone ? at::empty(x0.sizes(), x0.options()) : at::empty({0}, x0.options());
  const int64_t numel = x0.numel();
  if (numel == 0) return {xt, noise_out, target_out};

  const c10::cuda::CUDAGuard guard(x0.device());
  const int64_t row_len = numel / batch;
  const NoiseLayout layout = make_noise_layout(numel, batch, per_row);
  CoefficientSource src;
  src.t = t.data_ptr();
  src.table = table.data_ptr();
  src.n_table = table.numel();
  src.interpolation = static_cast<int>(interpolation);
  src.t64 = t.scalar_type() == at::kLong;
  src.table64 = table.scalar_type() == at::kDouble;
  const int64_t* seeds = per_row ? args.row_seeds->data_ptr<int64_t>() : nullptr;
  auto cuda_stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x0.scalar_type(), "q_sample_cuda", [&] {
    const scalar_t* x = x0.data_ptr<scalar_t>();
    scalar_t* o = xt.data_ptr<scalar_t>();
    scalar_t* tg = target != kTargetNone ? target_out.data_ptr<scalar_t>() : nullptr;
    dispatch_target(target, [&](auto target_tag) {
      constexpr int TARGET = decltype(target_tag)::value;
      if (generate) {
        q_sample_kernel<scalar_t, TARGET, true><<<blocks_for(layout.work_items()), kThreads, 0, cuda_stream>>>(
            x, src, nullptr, seeds, static_cast<uint64_t>(seed), static_cast<uint64_t>(stream), layout, row_len, o,
            noise_out.data_ptr<scalar_t>(), tg);
      } else {
        q_sample_kernel<scalar_t, TARGET, false><<<blocks_for(layout.work_items()), kThreads, 0, cuda_stream>>>(
            x, src, args.noise->data_ptr<scalar_t>(), nullptr, 0, 0, layout, row_len, o, nullptr, tg);
      }
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {xt, noise_out, target_out};
}

std::tuple<at::Tensor, at::Tensor> reparameterize_cuda(const at::Tensor& mu_in, const at::Tensor& logvar_in,
                                                       const std::optional<at::Tensor>& noise_in, int64_t seed,
                                                       int64_t stream, const std::optional<at::Tensor>& row_seeds_in) {
  const ReparameterizeArgs args = check_reparameterize_args(mu_in, logvar_in, noise_in, row_seeds_in, c10::kCUDA);
  const at::Tensor& mu = args.mu;
  const at::Tensor& logvar = args.logvar;
  const int64_t batch = args.batch;
  const bool generate = !args.noise.has_value();
  const bool per_row = args.row_seeds.has_value();
  at::Tensor z = at::empty(mu.sizes(), mu.options());
  at::Tensor noise_out = generate ? at::empty(mu.sizes(), mu.options()) : at::empty({0}, mu.options());
  const int64_t numel = mu.numel();
  if (numel == 0) return {z, noise_out};

  const c10::cuda::CUDAGuard guard(mu.device());
  const NoiseLayout layout = make_noise_layout(numel, batch, per_row);
  const int64_t* seeds = per_row ? args.row_seeds->data_ptr<int64_t>() : nullptr;
  auto cuda_stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, mu.scalar_type(), "reparameterize_cuda", [&] {
    if (generate) {
      reparameterize_kernel<scalar_t, true><<<blocks_for(layout.work_items()), kThreads, 0, cuda_stream>>>(
          mu.data_ptr<scalar_t>(), logvar.data_ptr<scalar_t>(), nullptr, seeds, static_cast<uint64_t>(seed),
          static_cast<uint64_t>(stream), layout, z.data_ptr<scalar_t>(), noise_out.data_ptr<scalar_t>());
    } else {
      reparameterize_kernel<scalar_t, false><<<blocks_for(layout.work_items()), kThreads, 0, cuda_stream>>>(
          mu.data_ptr<scalar_t>(), logvar.data_ptr<scalar_t>(), args.noise->data_ptr<scalar_t>(), nullptr, 0, 0, layout,
          z.data_ptr<scalar_t>(), nullptr);
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {z, noise_out};
}

}  // namespace

TORCH_LIBRARY_IMPL(pygen, CUDA, m) {
  m.impl("q_sample", &q_sample_cuda);
  m.impl("reparameterize", &reparameterize_cuda);
}

}  // namespace pygen::cuda
