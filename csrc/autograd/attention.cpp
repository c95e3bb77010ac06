// csrc/autograd/attention.cpp — C++ autograd (dispatch key Autograd, every device) of
//   torch.ops.pygen.attention_fwd(q, k, v, scale, causal) -> (out, lse)
// backward: torch.ops.pygen.attention_bwd(grad_out, q, k, v, out, lse, scale, causal) -> (dq, dk, dv).
// lse (float32 log-sum-exp per query row) is saved for the backward, not differentiable.
// Formulas: the register_autograd of pygen/ops/attention.py (the spec). pygen.attention's own
// autograd.Function may pair this forward with the Triton backward on CUDA; calling the op
// directly with inputs that require grad uses this pairing with the compiled backward.
#include <torch/library.h>

#include <tuple>

#include "common.h"

namespace pygen::autograd {
namespace {

using Triple = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

class AttentionFunction : public torch::autograd::Function<AttentionFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               double scale, bool causal) {
    at::AutoDispatchBelowADInplaceOrView below;
    static const auto op =
        op_handle<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&, double,
                                                     bool)>("pygen::attention_fwd");
    auto [out, lse] = op.call(q, k, v, scale, causal);
    ctx->mark_non_differentiable({lse});
    ctx->save_for_backward({q, k, v, out, lse});
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["causal"] = causal;
    return {out, lse};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op =
        op_handle<Triple(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                         const at::Tensor&, const at::Tensor&, double, bool)>("pygen::attention_bwd");
    const variable_list s = ctx->get_saved_variables();
    // grad_out may be expanded (e.g. from .sum()); the op takes a unit last stride.
    auto [dq, dk, dv] = op.call(unit_last(grads[0]), s[0], s[1], s[2], s[3], s[4],
                                ctx->saved_data["scale"].toDouble(), ctx->saved_data["causal"].toBool());
    return {dq, dk, dv, at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor> attention_fwd_autograd(const at::Tensor& q, const at::Tensor& k,
                                                          const at::Tensor& v, double scale, bool causal) {
  variable_list out = AttentionFunction::apply(q, k, v, scale, causal);
  return {out[0], out[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(pygen, Autograd, m) { m.impl("attention_fwd", &attention_fwd_autograd); }

}  // namespace pygen::autograd
