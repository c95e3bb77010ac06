// csrc/cuda/schedule.cu — CUDA kernel of torch.ops.pygen.step_coefficients
// (pygen.step_coefficients): the whole per-step coefficient table of a sampler
// in one launch, one thread per step, from csrc/include/pygen/step.h.
#include <torch/library.h>

#include "cuda_common.cuh"
#include "pygen/step.h"

namespace pygen::cuda {
namespace {

template <typename out_t>
__global__ void step_coefficients_kernel(const double* __restrict__ levels, int64_t n, int kind, int prediction,
                                         double eta, double p0, double p1, int width, out_t* __restrict__ out) {
  const int64_t i = global_thread_index();
  if (i >= n) return;
  double row[step::kColHist + 1];
  step::coefficient_row(kind, prediction, eta, p0, p1, levels, i, n, row);
  for (int c = 0; c < width; ++c) out[i * width + c] = static_cast<out_t>(row[c]);
}

at::Tensor step_coefficients_cuda(const at::Tensor& levels, int64_t kind, int64_t prediction, double eta, double p0,
                                  double p1) {
  check_step_coefficients_args(levels, kind, c10::kCUDA);
  const c10::cuda::CUDAGuard guard(levels.device());
  const int64_t n = levels.size(0) - 1;
  const int width = step::table_width(static_cast<int>(kind));
  const auto out_dtype = levels.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor lv = levels.to(at::kDouble).contiguous();
  at::Tensor out = at::empty({n, width}, levels.options().dtype(out_dtype));
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(out_dtype, "step_coefficients_cuda", [&] {
    step_coefficients_kernel<scalar_t><<<blocks_for(n), kThreads, 0, stream>>>(
        lv.data_ptr<double>(), n, static_cast<int>(kind), static_cast<int>(prediction), eta, p0, p1, width,
        out.data_ptr<scalar_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(pygen, CUDA, m) { m.impl("step_coefficients", &step_coefficients_cuda); }

}  // namespace pygen::cuda
