// csrc/norm_checks.h — host-side argument checks of the norm family ops
// (torch.ops.pygen.adaln_modulate, gated_residual, group_norm,
// timestep_embedding and their _backward ops), shared by the C++ CPU
// (csrc/cpu/norm.cpp) and CUDA (csrc/cuda/norm.cu) implementations so both
// accept and reject the same arguments. The public Python API
// (pygen/ops/norm.py) has already raised ValueError/TypeError for bad user
// input; these guard direct torch.ops.pygen calls (c10::Error naming the
// argument) and return the tensors in the layout the kernels read.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/DeviceType.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>

namespace pygen::norm {

inline bool is_float_storage(c10::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

inline c10::ScalarType acc_type(c10::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

inline void check_on(const at::Tensor& t, const char* name, c10::DeviceType type, const at::Tensor& ref) {
  TORCH_CHECK(t.device().type() == type, "pygen: ", name, " must be a ", c10::DeviceTypeName(type), " tensor, got ",
              t.device());
  TORCH_CHECK(t.device() == ref.device(), "pygen: ", name, " must be on the device of x (", ref.device(), "), got ",
              t.device());
}

// t has exactly `sizes` and ref's dtype and device.
inline void check_same(const at::Tensor& t, const char* name, at::IntArrayRef sizes, const at::Tensor& ref,
                       c10::DeviceType type) {
  check_on(t, name, type, ref);
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "pygen: ", name, " must have dtype ", ref.scalar_type(), ", got ",
              t.scalar_type());
  TORCH_CHECK(t.sizes() == sizes, "pygen: ", name, " must have shape ", sizes, ", got ", t.sizes());
}

// check_same, then t made contiguous.
inline at::Tensor checked_like(const at::Tensor& t, const char* name, at::IntArrayRef sizes, const at::Tensor& ref,
                               c10::DeviceType type) {
  check_same(t, name, sizes, ref, type);
  return t.contiguous();
}

inline std::optional<at::Tensor> checked_optional(const std::optional<at::Tensor>& t, const char* name,
                                                  at::IntArrayRef sizes, const at::Tensor& ref, c10::DeviceType type) {
  if (!t.has_value()) return std::nullopt;
  return checked_like(*t, name, sizes, ref, type);
}

// Per-row statistics (mean / rstd): `sizes`, the accumulation dtype of x.
inline at::Tensor checked_stats(const at::Tensor& t, const char* name, at::IntArrayRef sizes, const at::Tensor& x,
                                c10::DeviceType type) {
  check_on(t, name, type, x);
  TORCH_CHECK(t.scalar_type() == acc_type(x.scalar_type()), "pygen: ", name, " must be ", acc_type(x.scalar_type()),
              " for ", x.scalar_type(), " x, got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == sizes, "pygen: ", name, " must have shape ", sizes, ", got ", t.sizes());
  return t.contiguous();
}

inline at::Tensor checked_tokens(const at::Tensor& x, const char* name, c10::DeviceType type) {
  TORCH_CHECK(x.device().type() == type, "pygen: ", name, " must be a ", c10::DeviceTypeName(type), " tensor, got ",
              x.device());
  TORCH_CHECK(is_float_storage(x.scalar_type()), "pygen: ", name,
              " must be float32, float16, bfloat16 or float64, got ", x.scalar_type());
  TORCH_CHECK(x.dim() == 3, "pygen: ", name, " must be 3-D (batch, tokens, channels), got shape ", x.sizes());
  return x.contiguous();
}

// ---------------------------------------------------------------------------
// adaln_modulate / adaln_modulate_backward
// ---------------------------------------------------------------------------
struct AdaLNArgs {
  at::Tensor x;
  std::optional<at::Tensor> weight, bias, shift, scale;
  int64_t B, N, C;
};

inline AdaLNArgs check_adaln_args(const at::Tensor& x_in, const std::optional<at::Tensor>& weight,
                                  const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& shift,
                                  const std::optional<at::Tensor>& scale, c10::DeviceType type) {
  AdaLNArgs a;
  a.x = checked_tokens(x_in, "x", type);
  a.B = a.x.size(0);
  a.N = a.x.size(1);
  a.C = a.x.size(2);
  a.weight = checked_optional(weight, "weight", {a.C}, a.x, type);
  a.bias = checked_optional(bias, "bias", {a.C}, a.x, type);
  a.shift = checked_optional(shift, "shift", {a.B, a.C}, a.x, type);
  a.scale = checked_optional(scale, "scale", {a.B, a.C}, a.x, type);
  return a;
}

// ---------------------------------------------------------------------------
// gated_residual / gated_residual_backward
// ---------------------------------------------------------------------------
struct GatedArgs {
  at::Tensor x, gate, y;  // x: the residual (forward) or the incoming gradient (backward)
  int64_t B, N, C;
};

inline GatedArgs check_gated_args(const at::Tensor& x_in, const char* x_name, const at::Tensor& gate,
                                  const at::Tensor& y, c10::DeviceType type) {
  GatedArgs a;
  a.x = checked_tokens(x_in, x_name, type);
  a.B = a.x.size(0);
  a.N = a.x.size(1);
  a.C = a.x.size(2);
  a.y = checked_like(y, "y", a.x.sizes(), a.x, type);
  a.gate = checked_like(gate, "gate", {a.B, a.C}, a.x, type);
  return a;
}

// ---------------------------------------------------------------------------
// group_norm / group_norm_backward
// ---------------------------------------------------------------------------
// x is read as (N, C, S): NCHW-contiguous (channel stride S) or channels-last
// (the dense layout of (N, *spatial, C): channel stride 1, spatial stride C).
inline bool is_channels_last(const at::Tensor& x) {
  return !x.is_contiguous() && x.dim() >= 3 && x.movedim(1, -1).is_contiguous();
}

// t (shape of x) in the layout of x; a copy only when it is not.
inline at::Tensor in_layout(const at::Tensor& t, bool channels_last) {
  if (!channels_last) return t.contiguous();
  if (t.movedim(1, -1).is_contiguous()) return t;
  return t.movedim(1, -1).contiguous().movedim(-1, 1);
}

struct GroupNormArgs {
  at::Tensor x;
  std::optional<at::Tensor> weight, bias;
  bool channels_last;
  int64_t N, C, S, G;
};

inline GroupNormArgs check_group_norm_args(const at::Tensor& x_in, const std::optional<at::Tensor>& weight,
                                           const std::optional<at::Tensor>& bias, int64_t groups,
                                           c10::DeviceType type) {
  GroupNormArgs a;
  TORCH_CHECK(x_in.device().type() == type, "pygen: x must be a ", c10::DeviceTypeName(type), " tensor, got ",
              x_in.device());
  TORCH_CHECK(is_float_storage(x_in.scalar_type()), "pygen: x must be float32, float16, bfloat16 or float64, got ",
              x_in.scalar_type());
  TORCH_CHECK(x_in.dim() >= 2 && x_in.dim() <= 5, "pygen: x must be 2-D to 5-D (N, C, *spatial), got shape ",
              x_in.sizes());
  a.channels_last = is_channels_last(x_in);
  a.x = a.channels_last ? x_in : x_in.contiguous();  // other strides: copied to NCHW-contiguous
  a.N = a.x.size(0);
  a.C = a.x.size(1);
  a.S = a.N * a.C > 0 ? a.x.numel() / (a.N * a.C) : 0;
  if (a.x.numel() == 0) {
    int64_t s = 1;
    for (int64_t d = 2; d < a.x.dim(); ++d) s *= a.x.size(d);
    a.S = s;
  }
  TORCH_CHECK(groups >= 1 && a.C % groups == 0, "pygen: groups (", groups, ") must be >= 1 and divide the ", a.C,
              " channels");
  a.G = groups;
  a.weight = checked_optional(weight, "weight", {a.C}, a.x, type);
  a.bias = checked_optional(bias, "bias", {a.C}, a.x, type);
  return a;
}

// ---------------------------------------------------------------------------
// timestep_embedding / timestep_embedding_backward
// ---------------------------------------------------------------------------
inline at::Tensor check_timestep_args(const at::Tensor& t, int64_t dim, double max_period,
                                      double downscale_freq_shift, c10::DeviceType type) {
  TORCH_CHECK(t.device().type() == type, "pygen: t must be a ", c10::DeviceTypeName(type), " tensor, got ",
              t.device());
  const auto st = t.scalar_type();
  TORCH_CHECK(is_float_storage(st) || st == at::kLong || st == at::kInt || st == at::kShort || st == at::kChar ||
                  st == at::kByte,
              "pygen: t must be a float or integer tensor, got ", st);
  TORCH_CHECK(t.dim() == 1, "pygen: t must be 1-D (one timestep per batch element), got shape ", t.sizes());
  TORCH_CHECK(dim >= 1, "pygen: dim must be >= 1, got ", dim);
  TORCH_CHECK(max_period > 0.0, "pygen: max_period must be > 0, got ", max_period);
  TORCH_CHECK(dim / 2 == 0 || static_cast<double>(dim / 2) - downscale_freq_shift != 0.0,
              "pygen: dim // 2 - downscale_freq_shift must be nonzero");
  return t.contiguous();
}

// timestep_embedding's output (and incoming gradient) dtype: float64 for float64 t, else float32.
inline c10::ScalarType timestep_out_type(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// timestep_embedding_backward: t (already through check_timestep_args) must be floating point;
// grad is the (B, dim) timestep_out_type(t) gradient on t's device, returned contiguous.
inline at::Tensor check_timestep_backward_args(const at::Tensor& grad, const at::Tensor& t, int64_t dim,
                                               c10::DeviceType type) {
  TORCH_CHECK(t.is_floating_point(), "pygen: timestep_embedding_backward needs floating-point t, got ",
              t.scalar_type());
  const int64_t B = t.size(0);
  const auto out_type = timestep_out_type(t);
  TORCH_CHECK(grad.device() == t.device() && grad.scalar_type() == out_type && grad.dim() == 2 && grad.size(0) == B &&
                  grad.size(1) == dim,
              "pygen: grad must be a (", B, ", ", dim, ") ", out_type, " ", c10::DeviceTypeName(type),
              " tensor on t's device, got ", grad.scalar_type(), " of shape ", grad.sizes(), " on ", grad.device());
  return grad.contiguous();
}

// ---------------------------------------------------------------------------
// Output allocation shared by the CPU and CUDA ops
// ---------------------------------------------------------------------------
// Per-row statistics (mean / rstd) of x: `sizes`, x's accumulation dtype, x's device.
inline at::Tensor empty_stats(const at::Tensor& x, at::IntArrayRef sizes) {
  return at::empty(sizes, x.options().dtype(acc_type(x.scalar_type())));
}

// The forward's result when rows exist but have no elements: the statistics are NaN.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> with_nan_stats(const at::Tensor& y, at::Tensor& mean,
                                                                     at::Tensor& rstd) {
  mean.fill_(std::numeric_limits<double>::quiet_NaN());
  rstd.fill_(std::numeric_limits<double>::quiet_NaN());
  return {y, mean, rstd};
}

// Gradient of an optional parameter of shape `sizes` (x's dtype and device): allocated when the
// parameter is given, an empty (0,) tensor when it is absent.
inline at::Tensor empty_param_grad(const std::optional<at::Tensor>& param, at::IntArrayRef sizes,
                                   const at::Tensor& x) {
  return param.has_value() ? at::empty(sizes, x.options()) : at::empty({0}, x.options());
}

}  // namespace pygen::norm
