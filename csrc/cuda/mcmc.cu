// csrc/cuda/mcmc.cu — CUDA kernels of torch.ops.pygen.leapfrog_ and torch.ops.pygen.mh_select_
// (pygen.leapfrog_, pygen.mh_select_; used by the samplers in pygen/mcmc.py).
//
// leapfrog_, in place, per element of row b (dt = step_sizes[b] or the scalar step):
//   p <- p - kick·dt·grad;  x <- x + drift·dt·p   (x untouched when drift == 0)
// mh_select_, in place, per row b: x[b] <- x_prop[b] where log_u[b] < log_accept[b];
// accepted[b] = 1/0, or NaN (and x[b] NaN) when log_accept[b] or log_u[b] is NaN.
// Arithmetic in fp32 (fp64 for fp64 storage). One thread per element (int64
// indices); in mh_select_ thread i < rows also writes accepted[i].
// The argument checks are defined in csrc/cpu/mcmc.cpp (same checks on both devices).
#include <math_constants.h>

#include <optional>

#include <torch/library.h>

#include "cuda_common.cuh"

namespace pygen {

void check_leapfrog_args(const at::Tensor& x, const at::Tensor& p, const at::Tensor& grad,
                         const std::optional<at::Tensor>& step_sizes, double step_size, double kick, double drift,
                         c10::DeviceType type);
void check_mh_select_args(const at::Tensor& x, const at::Tensor& x_prop, const at::Tensor& log_accept,
                          const at::Tensor& log_u, const at::Tensor& accepted, c10::DeviceType type);

namespace cuda {
namespace {

template <typename acc>
struct LeapfrogParams {
  int64_t numel, row_len;
  acc ck, cd;               // kick·dt, drift·dt for a scalar step
  acc kick, drift;          // multiplied by the row's step for per-row steps
  const float* steps_f32;   // per-row steps (one of these, or neither)
  const double* steps_f64;
};

template <typename scalar_t, bool kPerRowStep, bool kDrift>
__global__ void leapfrog_kernel(scalar_t* __restrict__ x, scalar_t* __restrict__ p, const scalar_t* __restrict__ grad,
                                LeapfrogParams<acc_t<scalar_t>> prm) {
  using acc = acc_t<scalar_t>;
  const int64_t i = global_thread_index();
  if (i >= prm.numel) return;
  acc ck = prm.ck, cd = prm.cd;
  if constexpr (kPerRowStep) {
    const int64_t b = i / prm.row_len;
    const acc dt = prm.steps_f32 != nullptr ? static_cast<acc>(prm.steps_f32[b]) : static_cast<acc>(prm.steps_f64[b]);
    ck = prm.kick * dt;
    cd = prm.drift * dt;
  }
  const acc pn = static_cast<acc>(p[i]) - ck * static_cast<acc>(grad[i]);
  p[i] = static_cast<scalar_t>(pn);
  if constexpr (kDrift) x[i] = static_cast<scalar_t>(static_cast<acc>(x[i]) + cd * pn);
}

template <typename scalar_t, bool kPerRowStep>
void launch_leapfrog(at::Tensor& x, at::Tensor& p, const at::Tensor& grad, const LeapfrogParams<acc_t<scalar_t>>& prm,
                     bool drift, cudaStream_t stream) {
  const unsigned int blocks = blocks_for(prm.numel);
  if (drift) {
    leapfrog_kernel<scalar_t, kPerRowStep, true><<<blocks, kThreads, 0, stream>>>(
        x.data_ptr<scalar_t>(), p.data_ptr<scalar_t>(), grad.data_ptr<scalar_t>(), prm);
  } else {
    leapfrog_kernel<scalar_t, kPerRowStep, false><<<blocks, kThreads, 0, stream>>>(
        x.data_ptr<scalar_t>(), p.data_ptr<scalar_t>(), grad.data_ptr<scalar_t>(), prm);
  }
}

void leapfrog_cuda(at::Tensor& x, at::Tensor& p, const at::Tensor& grad, const std::optional<at::Tensor>& step_sizes,
                   double step_size, double kick, double drift) {
  check_leapfrog_args(x, p, grad, step_sizes, step_size, kick, drift, c10::kCUDA);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t numel = x.numel();
  if (numel == 0) return;
  auto cuda_stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "leapfrog_cuda", [&] {
    using acc = acc_t<scalar_t>;
    LeapfrogParams<acc> prm;
    prm.numel = numel;
    prm.row_len = numel / x.size(0);
    prm.ck = static_cast<acc>(kick * step_size);
    prm.cd = static_cast<acc>(drift * step_size);
    prm.kick = static_cast<acc>(kick);
    prm.drift = static_cast<acc>(drift);
    const bool per_row = step_sizes.has_value();
    prm.steps_f32 = per_row && step_sizes->scalar_type() == at::kFloat ? step_sizes->data_ptr<float>() : nullptr;
    prm.steps_f64 = per_row && step_sizes->scalar_type() == at::kDouble ? step_sizes->data_ptr<double>() : nullptr;
    if (per_row) {
      launch_leapfrog<scalar_t, true>(x, p, grad, prm, drift != 0.0, cuda_stream);
    } else {
      launch_leapfrog<scalar_t, false>(x, p, grad, prm, drift != 0.0, cuda_stream);
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, typename log_t>
__global__ void mh_select_kernel(scalar_t* __restrict__ x, const scalar_t* __restrict__ x_prop,
                                 const log_t* __restrict__ log_accept, const log_t* __restrict__ log_u,
                                 log_t* __restrict__ accepted, int64_t numel, int64_t rows, int64_t row_len) {
  const int64_t i = global_thread_index();
  if (i < numel) {
    const int64_t b = i / row_len;
    const log_t a = log_accept[b], u = log_u[b];
    if (isnan(a) || isnan(u)) {
      x[i] = static_cast<scalar_t>(CUDART_NAN_F);
    } else if (u < a) {
      x[i] = x_prop[i];
    }
  }
  if (i < rows) {
    const log_t a = log_accept[i], u = log_u[i];
    accepted[i] = (isnan(a) || isnan(u)) ? static_cast<log_t>(CUDART_NAN) : (u < a ? log_t(1) : log_t(0));
  }
}

void mh_select_cuda(at::Tensor& x, const at::Tensor& x_prop, const at::Tensor& log_accept, const at::Tensor& log_u,
                    at::Tensor& accepted) {
  check_mh_select_args(x, x_prop, log_accept, log_u, accepted, c10::kCUDA);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t rows = x.size(0);
  const int64_t numel = x.numel();
  const int64_t items = numel > rows ? numel : rows;
  if (items == 0) return;
  const int64_t row_len = rows > 0 ? numel / rows : 0;
  auto cuda_stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "mh_select_cuda", [&] {
    if (log_accept.scalar_type() == at::kFloat) {
      mh_select_kernel<scalar_t, float><<<blocks_for(items), kThreads, 0, cuda_stream>>>(
          x.data_ptr<scalar_t>(), x_prop.data_ptr<scalar_t>(), log_accept.data_ptr<float>(), log_u.data_ptr<float>(),
          accepted.data_ptr<float>(), numel, rows, row_len);
    } else {
      mh_select_kernel<scalar_t, double><<<blocks_for(items), kThreads, 0, cuda_stream>>>(
          x.data_ptr<scalar_t>(), x_prop.data_ptr<scalar_t>(), log_accept.data_ptr<double>(),
          log_u.data_ptr<double>(), accepted.data_ptr<double>(), numel, rows, row_len);
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_IMPL(pygen, CUDA, m) {
  m.impl("leapfrog_", &leapfrog_cuda);
  m.impl("mh_select_", &mh_select_cuda);
}

}  // namespace cuda
}  // namespace pygen
