// csrc/attention_checks.h — host-side argument checks of the attention ops
// (torch.ops.pygen.attention_fwd and attention_bwd), shared by the C++ CPU
// (csrc/cpu/attention.cpp) and CUDA (csrc/cuda/attention.cu) implementations
// so both accept and reject the same arguments. The public Python API
// (pygen/ops/attention.py) has already raised ValueError/TypeError for bad
// user input; these guard direct torch.ops.pygen calls (c10::Error naming the
// argument).
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <utility>

#include "op_checks.h"

namespace pygen::attention {

// q (B, H, Sq, D), k and v (B, H, Sk, D): one float dtype, one device of type
// `type`, at least one key, unit last strides. max_head_dim > 0 caps D (the
// CUDA kernels' limit); 0 means no cap.
inline void check_attention_fwd_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                     c10::DeviceType type, int64_t max_head_dim = 0) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4,
              "pygen: attention q, k, v must be 4-D (B, H, S, D), got ", q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  TORCH_CHECK(q.device().type() == type, "pygen: attention q must be a ", c10::DeviceTypeName(type),
              " tensor, got ", q.device());
  check_same_device(k, "k", q, "q");
  check_same_device(v, "v", q, "q");
  const auto st = q.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16,
              "pygen: attention q must be float32, float64, float16 or bfloat16, got ", st);
  TORCH_CHECK(k.scalar_type() == st && v.scalar_type() == st, "pygen: attention k and v must have the dtype of q (",
              st, "), got ", k.scalar_type(), " and ", v.scalar_type());
  TORCH_CHECK(k.size(0) == q.size(0) && v.size(0) == q.size(0), "pygen: attention batch sizes differ: q ", q.sizes(),
              ", k ", k.sizes(), ", v ", v.sizes());
  TORCH_CHECK(k.size(1) == q.size(1) && v.size(1) == q.size(1), "pygen: attention head counts differ: q ", q.sizes(),
              ", k ", k.sizes(), ", v ", v.sizes());
  TORCH_CHECK(k.size(3) == q.size(3) && v.size(3) == q.size(3), "pygen: attention head dims differ: q ", q.sizes(),
              ", k ", k.sizes(), ", v ", v.sizes());
  TORCH_CHECK(v.size(2) == k.size(2), "pygen: attention k and v must have the same length, got ", k.sizes(), " and ",
              v.sizes());
  TORCH_CHECK(k.size(2) >= 1, "pygen: attention needs at least one key, got k of shape ", k.sizes());
  TORCH_CHECK(q.size(3) >= 1, "pygen: attention head dim must be >= 1, got ", q.size(3));
  TORCH_CHECK(max_head_dim <= 0 || q.size(3) <= max_head_dim, "pygen: attention on ", c10::DeviceTypeName(type),
              " supports head dims up to ", max_head_dim, ", got ", q.size(3));
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{q, "q"}, {k, "k"}, {v, "v"}}) {
    TORCH_CHECK(t.stride(3) == 1 || t.size(3) == 1, "pygen: attention ", name,
                " must have a unit stride in its last dimension, got strides ", t.strides());
  }
}

// The forward checks on q, k, v, then grad_out and out with q's shape and
// dtype (unit last stride), lse float32 (B, H, Sq).
inline void check_attention_bwd_args(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                                     const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                     c10::DeviceType type, int64_t max_head_dim = 0) {
  check_attention_fwd_args(q, k, v, type, max_head_dim);
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{grad_out, "grad_out"}, {out, "out"}}) {
    check_same_device(t, name, q, "q");
    TORCH_CHECK(t.sizes() == q.sizes() && t.scalar_type() == q.scalar_type(), "pygen: attention_bwd ", name,
                " must have the shape and dtype of q (", q.sizes(), ", ", q.scalar_type(), "), got ", t.sizes(), ", ",
                t.scalar_type());
    TORCH_CHECK(t.stride(3) == 1 || t.size(3) == 1, "pygen: attention_bwd ", name,
                " must have a unit stride in its last dimension, got strides ", t.strides());
  }
  check_same_device(lse, "lse", q, "q");
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.dim() == 3 && lse.size(0) == q.size(0) &&
                  lse.size(1) == q.size(1) && lse.size(2) == q.size(2),
              "pygen: attention_bwd lse must be float32 of shape (B, H, Sq) = (", q.size(0), ", ", q.size(1), ", ",
              q.size(2), "), got ", lse.scalar_type(), " of shape ", lse.sizes());
}

}  // namespace pygen::attention
