// csrc/loss_checks.h — host-side argument checks of the fused training-loss ops
// (torch.ops.pygen.diffusion_loss(_backward), torch.ops.pygen.reparameterize_kl(_backward)),
// shared by their C++ CPU (csrc/cpu/loss.cpp) and CUDA (csrc/cuda/loss.cu)
// implementations, in the style of op_checks.h (kept beside it so the loss
// family stays in files of its own; it may be folded into op_checks.h).
// They raise c10::Error (RuntimeError in Python) naming the argument.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/DeviceType.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>

#include "op_checks.h"
#include "pygen/loss.h"

namespace pygen {

// The checked inputs of one loss op, made contiguous. `noise` is the given
// noise (absent: regenerated in the kernel); `row_seeds` is present only when
// the noise is regenerated with per-row seeds. a/b: (model_out, x0) or (mu, logvar).
struct LossArgs {
  at::Tensor a, b;
  std::optional<at::Tensor> noise, row_seeds;
  int64_t batch;
  int64_t row_len;
};

inline at::ScalarType loss_acc_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// A per-row float32/float64 vector (grad_rows, grad_kl) or table (coeffs).
inline at::Tensor check_row_table(const at::Tensor& t, const char* name, int64_t batch, int64_t cols,
                                  const at::Tensor& ref, const char* ref_name, c10::DeviceType type) {
  at::Tensor c = t.contiguous();
  check_tensor_on(c, name, type);
  check_same_device(c, name, ref, ref_name);
  TORCH_CHECK(c.scalar_type() == at::kFloat || c.scalar_type() == at::kDouble, "pygen: ", name,
              " must be float32 or float64, got ", c.scalar_type());
  if (cols == 0) {
    TORCH_CHECK(c.dim() == 1 && c.size(0) == batch, "pygen: ", name, " must have shape (", batch, ",), got ",
                c.sizes());
  } else {
    TORCH_CHECK(c.dim() == 2 && c.size(0) == batch && c.size(1) == cols, "pygen: ", name, " must have shape (",
                batch, ", ", cols, "), got ", c.sizes());
  }
  return c;
}

inline LossArgs check_loss_args(const at::Tensor& a, const char* a_name, const at::Tensor& b, const char* b_name,
                                const std::optional<at::Tensor>& noise, const std::optional<at::Tensor>& row_seeds,
                                c10::DeviceType type) {
  TORCH_CHECK(a.dim() >= 1, "pygen: ", a_name, " must have a batch dimension, got a 0-d tensor");
  LossArgs r{a.contiguous(), b.contiguous(), std::nullopt, std::nullopt, a.size(0), 0};
  check_tensor_on(r.a, a_name, type);
  check_like(r.b, b_name, r.a, a_name, type);
  r.row_len = r.batch > 0 ? r.a.numel() / r.batch : 0;
  if (noise.has_value()) {
    r.noise = noise->contiguous();
    check_like(*r.noise, "noise", r.a, a_name, type);
  } else if (row_seeds.has_value()) {
    r.row_seeds = row_seeds->contiguous();
    check_row_seeds(*r.row_seeds, r.batch, r.a, a_name, type);
  }
  return r;
}

// diffusion_loss(model_out, x0, noise, coeffs, ...): x0 is the reference
// argument (model_out must match it), coeffs (B, 4).
inline LossArgs check_diffusion_loss_args(const at::Tensor& model_out, const at::Tensor& x0,
                                          const std::optional<at::Tensor>& noise, const at::Tensor& coeffs,
                                          const std::optional<at::Tensor>& row_seeds, at::Tensor* coeffs_out,
                                          c10::DeviceType type) {
  LossArgs r = check_loss_args(x0, "x0", model_out, "model_out", noise, row_seeds, type);
  std::swap(r.a, r.b);  // a = model_out, b = x0
  *coeffs_out = check_row_table(coeffs, "coeffs", r.batch, kLossCols, r.b, "x0", type);
  return r;
}

}  // namespace pygen
