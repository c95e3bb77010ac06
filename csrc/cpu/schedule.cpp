// csrc/cpu/schedule.cpp — C++ CPU kernel of torch.ops.pygen.step_coefficients
// (pygen.step_coefficients): a sampler's per-step coefficient table, one row
// per step, from the formulas in csrc/include/pygen/step.h.
#include <torch/library.h>

#include "cpu_common.h"
#include "pygen/step.h"

namespace pygen::cpu {
namespace {

at::Tensor step_coefficients_cpu(const at::Tensor& levels, int64_t kind, int64_t prediction, double eta, double p0,
                                 double p1) {
  check_step_coefficients_args(levels, kind, c10::kCPU);
  const int64_t n = levels.size(0) - 1;
  const int width = step::table_width(static_cast<int>(kind));
  const auto out_dtype = levels.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor lv = levels.to(at::kDouble).contiguous();
  at::Tensor out = at::empty({n, width}, levels.options().dtype(out_dtype));
  const double* l = lv.data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES(out_dtype, "step_coefficients_cpu", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    for (int64_t i = 0; i < n; ++i) {
      double row[step::kColHist + 1];
      step::coefficient_row(static_cast<int>(kind), static_cast<int>(prediction), eta, p0, p1, l, i, n, row);
      for (int c = 0; c < width; ++c) o[i * width + c] = static_cast<scalar_t>(row[c]);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(pygen, CPU, m) { m.impl("step_coefficients", &step_coefficients_cpu); }

}  // namespace pygen::cpu
