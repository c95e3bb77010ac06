// csrc/cpu/mcmc.cpp — C++ CPU kernels of torch.ops.pygen.leapfrog_ and torch.ops.pygen.mh_select_
// (pygen.leapfrog_, pygen.mh_select_; used by the samplers in pygen/mcmc.py).
//
// leapfrog_, in place, per element of row b (dt = step_sizes[b] or the scalar step):
//   p <- p - kick·dt·grad;  x <- x + drift·dt·p   (x untouched when drift == 0)
// mh_select_, in place, per row b: x[b] <- x_prop[b] where log_u[b] < log_accept[b];
// accepted[b] = 1/0, or NaN (and x[b] NaN) when log_accept[b] or log_u[b] is NaN.
// Arithmetic in fp32 (fp64 for fp64 storage).
//
// This file also defines the argument checks of both ops (namespace pygen,
// check_leapfrog_args / check_mh_select_args), which csrc/cuda/mcmc.cu uses
// too, so CPU and CUDA accept and reject exactly the same arguments.
#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>

#include <torch/library.h>

#include "cpu_common.h"

namespace pygen {

void check_leapfrog_args(const at::Tensor& x, const at::Tensor& p, const at::Tensor& grad,
                         const std::optional<at::Tensor>& step_sizes, double step_size, double kick, double drift,
                         c10::DeviceType type) {
  check_tensor_on(x, "x", type);
  TORCH_CHECK(x.dim() >= 1, "pygen: leapfrog_ x must have a batch dimension, got a 0-d tensor");
  check_like(p, "p", x, "x", type);
  check_like(grad, "grad", x, "x", type);
  TORCH_CHECK(std::isfinite(kick) && std::isfinite(drift), "pygen: leapfrog_ kick and drift must be finite, got ",
              kick, " and ", drift);
  if (step_sizes.has_value()) {
    const at::Tensor& st = *step_sizes;
    check_tensor_on(st, "step_sizes", type);
    check_same_device(st, "step_sizes", x, "x");
    TORCH_CHECK((st.scalar_type() == at::kFloat || st.scalar_type() == at::kDouble) && st.dim() == 1 &&
                    st.numel() == x.size(0),
                "pygen: step_sizes must be 1-D float32/float64 with one step per row (", x.size(0), "), got ",
                st.scalar_type(), " of shape ", st.sizes());
  } else {
    TORCH_CHECK(step_size >= 0.0, "pygen: step_size must be non-negative, got ", step_size);
  }
}

void check_mh_select_args(const at::Tensor& x, const at::Tensor& x_prop, const at::Tensor& log_accept,
                          const at::Tensor& log_u, const at::Tensor& accepted, c10::DeviceType type) {
  check_tensor_on(x, "x", type);
  TORCH_CHECK(x.dim() >= 1, "pygen: mh_select_ x must have a batch dimension, got a 0-d tensor");
  check_like(x_prop, "x_prop", x, "x", type);
  check_tensor_on(log_accept, "log_accept", type);
  check_same_device(log_accept, "log_accept", x, "x");
  TORCH_CHECK((log_accept.scalar_type() == at::kFloat || log_accept.scalar_type() == at::kDouble) &&
                  log_accept.dim() == 1 && log_accept.numel() == x.size(0),
              "pygen: log_accept must be 1-D float32/float64 with one value per row (", x.size(0), "), got ",
              log_accept.scalar_type(), " of shape ", log_accept.sizes());
  check_like(log_u, "log_u", log_accept, "log_accept", type);
  check_like(accepted, "accepted", log_accept, "log_accept", type);
}

namespace cpu {
namespace {

constexpr int64_t kGrainElements = 1 << 15;  // at::parallel_for grain (elements)

template <typename scalar_t>
void leapfrog_cpu_kernel(at::Tensor& x, at::Tensor& p, const at::Tensor& grad,
                         const std::optional<at::Tensor>& step_sizes, double step_size, double kick, double drift) {
  using acc = acc_t<scalar_t>;
  const int64_t numel = x.numel();
  const int64_t row_len = numel / x.size(0);
  const float* st32 = step_sizes.has_value() && step_sizes->scalar_type() == at::kFloat ? step_sizes->data_ptr<float>()
                                                                                        : nullptr;
  const double* st64 = step_sizes.has_value() && step_sizes->scalar_type() == at::kDouble
                           ? step_sizes->data_ptr<double>()
                           : nullptr;
  const bool per_row = step_sizes.has_value();
  const bool do_drift = drift != 0.0;
  const acc kick_a = static_cast<acc>(kick), drift_a = static_cast<acc>(drift);
  const acc ck_scalar = static_cast<acc>(kick * step_size), cd_scalar = static_cast<acc>(drift * step_size);
  scalar_t* xp = x.data_ptr<scalar_t>();
  scalar_t* pp = p.data_ptr<scalar_t>();
  const scalar_t* gp = grad.data_ptr<scalar_t>();
  at::parallel_for(0, numel, kGrainElements, [&](int64_t begin, int64_t end) {
    int64_t i = begin;
    while (i < end) {
      acc ck = ck_scalar, cd = cd_scalar;
      int64_t seg_end = end;
      if (per_row) {
        const int64_t b = i / row_len;
        seg_end = std::min(end, (b + 1) * row_len);
        const acc dt = st32 != nullptr ? static_cast<acc>(st32[b]) : static_cast<acc>(st64[b]);
        ck = kick_a * dt;
        cd = drift_a * dt;
      }
      if (do_drift) {
        for (int64_t k = i; k < seg_end; ++k) {
          const acc pn = static_cast<acc>(pp[k]) - ck * static_cast<acc>(gp[k]);
          pp[k] = static_cast<scalar_t>(pn);
          xp[k] = static_cast<scalar_t>(static_cast<acc>(xp[k]) + cd * pn);
        }
      } else {
        for (int64_t k = i; k < seg_end; ++k) {
          pp[k] = static_cast<scalar_t>(static_cast<acc>(pp[k]) - ck * static_cast<acc>(gp[k]));
        }
      }
      i = seg_end;
    }
  });
}

void leapfrog_cpu(at::Tensor& x, at::Tensor& p, const at::Tensor& grad, const std::optional<at::Tensor>& step_sizes,
                  double step_size, double kick, double drift) {
  check_leapfrog_args(x, p, grad, step_sizes, step_size, kick, drift, c10::kCPU);
  if (x.numel() == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "leapfrog_cpu", [&] {
    leapfrog_cpu_kernel<scalar_t>(x, p, grad, step_sizes, step_size, kick, drift);
  });
}

template <typename scalar_t, typename log_t>
void mh_select_cpu_kernel(at::Tensor& x, const at::Tensor& x_prop, const at::Tensor& log_accept,
                          const at::Tensor& log_u, at::Tensor& accepted) {
  const int64_t rows = x.size(0);
  const int64_t row_len = x.numel() / std::max<int64_t>(rows, 1);
  scalar_t* xp = x.data_ptr<scalar_t>();
  const scalar_t* pp = x_prop.data_ptr<scalar_t>();
  const log_t* la = log_accept.data_ptr<log_t>();
  const log_t* lu = log_u.data_ptr<log_t>();
  log_t* ap = accepted.data_ptr<log_t>();
  const int64_t grain = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(row_len, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const log_t a = la[b], u = lu[b];
      scalar_t* row = xp + b * row_len;
      if (std::isnan(a) || std::isnan(u)) {
        ap[b] = std::numeric_limits<log_t>::quiet_NaN();
        std::fill(row, row + row_len, static_cast<scalar_t>(std::numeric_limits<float>::quiet_NaN()));
      } else if (u < a) {
        ap[b] = log_t(1);
        std::copy(pp + b * row_len, pp + (b + 1) * row_len, row);
      } else {
        ap[b] = log_t(0);
      }
    }
  });
}

void mh_select_cpu(at::Tensor& x, const at::Tensor& x_prop, const at::Tensor& log_accept, const at::Tensor& log_u,
                   at::Tensor& accepted) {
  check_mh_select_args(x, x_prop, log_accept, log_u, accepted, c10::kCPU);
  if (x.size(0) == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "mh_select_cpu", [&] {
    if (log_accept.scalar_type() == at::kFloat) {
      mh_select_cpu_kernel<scalar_t, float>(x, x_prop, log_accept, log_u, accepted);
    } else {
      mh_select_cpu_kernel<scalar_t, double>(x, x_prop, log_accept, log_u, accepted);
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(pygen, CPU, m) {
  m.impl("leapfrog_", &leapfrog_cpu);
  m.impl("mh_select_", &mh_select_cpu);
}

}  // namespace cpu
}  // namespace pygen
