// csrc/autograd/norm.cpp — C++ autograd (dispatch key Autograd, every device) of the fused
// ops around attention:
//   torch.ops.pygen.adaln_modulate      backward: torch.ops.pygen.adaln_modulate_backward
//   torch.ops.pygen.gated_residual      backward: dx = grad, (dgate, dy) from gated_residual_backward
//   torch.ops.pygen.group_norm          backward: torch.ops.pygen.group_norm_backward
//   torch.ops.pygen.timestep_embedding  backward: torch.ops.pygen.timestep_embedding_backward
// The formulas are the register_autograd rules of pygen/ops/norm.py (the spec). The mean/rstd
// outputs of adaln_modulate and group_norm are statistics for the backward, not differentiable.
// First derivatives only (the backward ops have no autograd).
#include <torch/library.h>

#include <tuple>

#include "common.h"

namespace pygen::autograd {
namespace {

using Stats3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

// ---------------------------------------------------------------------------
// adaln_modulate(x, weight?, bias?, shift?, scale?, eps) -> (y, mean, rstd)
// ---------------------------------------------------------------------------
class AdaLNModulateFunction : public torch::autograd::Function<AdaLNModulateFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const OptTensor& weight,
                               const OptTensor& bias, const OptTensor& shift, const OptTensor& scale, double eps) {
    at::AutoDispatchBelowADInplaceOrView below;
    static const auto op = op_handle<Stats3(const at::Tensor&, const OptTensor&, const OptTensor&, const OptTensor&,
                                            const OptTensor&, double)>("pygen::adaln_modulate");
    auto [y, mean, rstd] = op.call(x, weight, bias, shift, scale, eps);
    ctx->mark_non_differentiable({mean, rstd});
    ctx->save_for_backward({x, weight.value_or(at::Tensor()), bias.value_or(at::Tensor()),
                            scale.value_or(at::Tensor()), mean, rstd});
    ctx->saved_data["has_shift"] = present(shift);
    return {y, mean, rstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = op_handle<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
        const at::Tensor&, const at::Tensor&, const OptTensor&, const OptTensor&, const OptTensor&, const at::Tensor&,
        const at::Tensor&)>("pygen::adaln_modulate_backward");
    const variable_list s = ctx->get_saved_variables();
    const OptTensor weight = saved_optional(s[1]), bias = saved_optional(s[2]), scale = saved_optional(s[3]);
    auto [dx, dw, db, dshift, dscale] = op.call(grads[0], s[0], weight, bias, scale, s[4], s[5]);
    // one entry per forward argument: x, weight, bias, shift, scale, eps (absent optionals: undefined)
    return {dx, weight ? dw : at::Tensor(), bias ? db : at::Tensor(),
            ctx->saved_data["has_shift"].toBool() ? dshift : at::Tensor(), scale ? dscale : at::Tensor(),
            at::Tensor()};
  }
};

Stats3 adaln_modulate_autograd(const at::Tensor& x, const OptTensor& weight, const OptTensor& bias,
                               const OptTensor& shift, const OptTensor& scale, double eps) {
  variable_list out = AdaLNModulateFunction::apply(x, weight, bias, shift, scale, eps);
  return {out[0], out[1], out[2]};
}

// ---------------------------------------------------------------------------
// gated_residual(x, gate, y) -> x + gate[:, None, :]·y
// ---------------------------------------------------------------------------
class GatedResidualFunction : public torch::autograd::Function<GatedResidualFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& gate, const at::Tensor& y) {
    at::AutoDispatchBelowADInplaceOrView below;
    static const auto op =
        op_handle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&)>("pygen::gated_residual");
    ctx->save_for_backward({gate, y});
    return op.call(x, gate, y);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = op_handle<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                        const at::Tensor&)>(
        "pygen::gated_residual_backward");
    const variable_list s = ctx->get_saved_variables();
    const at::Tensor& grad = grads[0];
    at::Tensor dgate, dy;
    if (ctx->needs_input_grad(1) || ctx->needs_input_grad(2)) {
      std::tie(dgate, dy) = op.call(grad, s[0], s[1]);
    }
    return {grad, dgate, dy};
  }
};

at::Tensor gated_residual_autograd(const at::Tensor& x, const at::Tensor& gate, const at::Tensor& y) {
  return GatedResidualFunction::apply(x, gate, y);
}

// ---------------------------------------------------------------------------
// group_norm(x, weight?, bias?, groups, eps, silu) -> (y, mean, rstd)
// ---------------------------------------------------------------------------
class GroupNormFunction : public torch::autograd::Function<GroupNormFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const OptTensor& weight,
                               const OptTensor& bias, int64_t groups, double eps, bool silu) {
    at::AutoDispatchBelowADInplaceOrView below;
    static const auto op = op_handle<Stats3(const at::Tensor&, const OptTensor&, const OptTensor&, int64_t, double,
                                            bool)>("pygen::group_norm");
    auto [y, mean, rstd] = op.call(x, weight, bias, groups, eps, silu);
    ctx->mark_non_differentiable({mean, rstd});
    ctx->save_for_backward({x, weight.value_or(at::Tensor()), bias.value_or(at::Tensor()), mean, rstd});
    ctx->saved_data["groups"] = groups;
    ctx->saved_data["silu"] = silu;
    return {y, mean, rstd};
  }

  // The backward op reads grad_y in x's layout (NCHW or channels-last) and copies it when it is not.
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = op_handle<Stats3(const at::Tensor&, const at::Tensor&, const OptTensor&, const OptTensor&,
                                            const at::Tensor&, const at::Tensor&, int64_t, bool)>(
        "pygen::group_norm_backward");
    const variable_list s = ctx->get_saved_variables();
    const OptTensor weight = saved_optional(s[1]), bias = saved_optional(s[2]);
    auto [dx, dw, db] = op.call(grads[0], s[0], weight, bias, s[3], s[4], ctx->saved_data["groups"].toInt(),
                                ctx->saved_data["silu"].toBool());
    // x, weight, bias, groups, eps, silu
    return {dx, weight ? dw : at::Tensor(), bias ? db : at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

Stats3 group_norm_autograd(const at::Tensor& x, const OptTensor& weight, const OptTensor& bias, int64_t groups,
                           double eps, bool silu) {
  variable_list out = GroupNormFunction::apply(x, weight, bias, groups, eps, silu);
  return {out[0], out[1], out[2]};
}

// ---------------------------------------------------------------------------
// timestep_embedding(t, dim, max_period, downscale_freq_shift, scale, flip_sin_to_cos) -> (B, dim)
// ---------------------------------------------------------------------------
using TembSignature = at::Tensor(const at::Tensor&, int64_t, double, double, double, bool);

class TimestepEmbeddingFunction : public torch::autograd::Function<TimestepEmbeddingFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& t, int64_t dim, double max_period, double shift,
                            double scale, bool flip) {
    at::AutoDispatchBelowADInplaceOrView below;
    static const auto op = op_handle<TembSignature>("pygen::timestep_embedding");
    ctx->save_for_backward({t});
    ctx->saved_data["dim"] = dim;
    ctx->saved_data["max_period"] = max_period;
    ctx->saved_data["shift"] = shift;
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["flip"] = flip;
    return op.call(t, dim, max_period, shift, scale, flip);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = op_handle<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, double, double, double,
                                                bool)>("pygen::timestep_embedding_backward");
    const at::Tensor t = ctx->get_saved_variables()[0];
    auto& d = ctx->saved_data;
    at::Tensor dt = op.call(grads[0], t, d["dim"].toInt(), d["max_period"].toDouble(), d["shift"].toDouble(),
                            d["scale"].toDouble(), d["flip"].toBool());
    return {dt, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor timestep_embedding_autograd(const at::Tensor& t, int64_t dim, double max_period, double shift,
                                       double scale, bool flip) {
  return TimestepEmbeddingFunction::apply(t, dim, max_period, shift, scale, flip);
}

}  // namespace

TORCH_LIBRARY_IMPL(pygen, Autograd, m) {
  m.impl("adaln_modulate", &adaln_modulate_autograd);
  m.impl("gated_residual", &gated_residual_autograd);
  m.impl("group_norm", &group_norm_autograd);
  m.impl("timestep_embedding", &timestep_embedding_autograd);
}

}  // namespace pygen::autograd
