// csrc/autograd/common.h — shared pieces of the C++ autograd of pygen's ops
// (csrc/autograd/<family>.cpp, registered for the Autograd dispatch key, every device).
//
// The pattern, per op with a fused backward op: a torch::autograd::Function whose
// forward calls the op below autograd (through the dispatcher: the CPU or CUDA
// kernel by device) and saves what the backward op needs; its backward calls the
// backward op. The Python formulas of pygen/ops/<family>.py are the spec; they
// stay registered for the reference fallback (extension absent) and the Triton
// variants.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>

#include <optional>
#include <vector>

namespace pygen::autograd {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = std::optional<at::Tensor>;

// The typed dispatcher handle of op `name` ("pygen::..."); call once, keep in a static.
template <typename Signature>
c10::TypedOperatorHandle<Signature> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

inline at::ScalarType acc_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// A saved optional input: an undefined saved tensor means it was absent.
inline OptTensor saved_optional(const at::Tensor& t) {
  return t.defined() ? OptTensor(t) : std::nullopt;
}

inline bool present(const OptTensor& t) {
  return t.has_value() && t->defined();
}

// The autograd edges of a Function's inputs are numbered over the tensors actually
// passed (an absent optional has none). Edges::take gives an argument its edge
// (-1: absent); needs() asks whether that input's gradient is wanted.
struct Edges {
  int64_t next = 0;
  int64_t take(bool is_present) { return is_present ? next++ : -1; }
};

inline bool needs(const AutogradContext* ctx, int64_t edge) {
  return edge >= 0 && ctx->needs_input_grad(static_cast<size_t>(edge));
}

// grad made dense with a unit last stride when it is not (e.g. expanded from .sum()).
inline at::Tensor unit_last(const at::Tensor& g) {
  return g.dim() > 0 && g.stride(-1) != 1 ? g.contiguous() : g;
}

}  // namespace pygen::autograd
