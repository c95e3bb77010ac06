// csrc/autograd/loss.cpp — C++ autograd (dispatch key Autograd, every device) of the
// fused training-loss ops:
//   torch.ops.pygen.diffusion_loss      backward: torch.ops.pygen.diffusion_loss_backward
//   torch.ops.pygen.reparameterize_kl   backward: torch.ops.pygen.reparameterize_kl_backward
//
// Why C++: the backward then runs inside the autograd engine without entering
// Python (on CUDA the engine runs it on its device thread, which would
// otherwise take the GIL for every step), and the forward is one dispatcher
// call. The formulas are those of pygen/ops/loss.py (the spec), which also
// holds the Python autograd used when this extension is absent and for the
// Triton variants.
//
// The fused backward ops give the gradients w.r.t. model_out (diffusion_loss)
// and mu / logvar (reparameterize_kl). x0, a given noise and coeffs are data in
// training; when they do require gradients, these are formed here with ATen
// ops (not fused), so no gradient is ever dropped. Second derivatives are not
// provided (the backward ops have no autograd).
#include <ATen/TensorOperators.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/exp.h>
#include <ATen/ops/stack.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "common.h"

namespace pygen::autograd {
namespace {

int64_t row_len(const at::Tensor& x) {
  return x.size(0) > 0 ? x.numel() / x.size(0) : 0;
}

at::Tensor row_view(const at::Tensor& v, int64_t ndim) {
  std::vector<int64_t> shape(static_cast<size_t>(ndim), 1);
  shape[0] = -1;
  return v.view(shape);
}

// The ops below autograd, called through the dispatcher (CPU or CUDA kernel by device).
at::Tensor call_diffusion_loss(const at::Tensor& model_out, const at::Tensor& x0, const OptTensor& noise,
                               const at::Tensor& coeffs, int64_t seed, int64_t stream, const OptTensor& row_seeds) {
  static const auto op = op_handle<at::Tensor(const at::Tensor&, const at::Tensor&, const OptTensor&,
                                              const at::Tensor&, int64_t, int64_t, const OptTensor&)>(
      "pygen::diffusion_loss");
  return op.call(model_out, x0, noise, coeffs, seed, stream, row_seeds);
}

at::Tensor call_diffusion_loss_backward(const at::Tensor& grad_rows, const at::Tensor& model_out, const at::Tensor& x0,
                                        const OptTensor& noise, const at::Tensor& coeffs, int64_t seed, int64_t stream,
                                        const OptTensor& row_seeds) {
  static const auto op = op_handle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                              const OptTensor&, const at::Tensor&, int64_t, int64_t,
                                              const OptTensor&)>("pygen::diffusion_loss_backward");
  return op.call(grad_rows, model_out, x0, noise, coeffs, seed, stream, row_seeds);
}

std::tuple<at::Tensor, at::Tensor> call_reparameterize_kl(const at::Tensor& mu, const at::Tensor& logvar,
                                                          const OptTensor& noise, int64_t seed, int64_t stream,
                                                          const OptTensor& row_seeds) {
  static const auto op = op_handle<std::tuple<at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, const OptTensor&, int64_t, int64_t, const OptTensor&)>(
      "pygen::reparameterize_kl");
  return op.call(mu, logvar, noise, seed, stream, row_seeds);
}

std::tuple<at::Tensor, at::Tensor> call_reparameterize_kl_backward(const at::Tensor& grad_z, const at::Tensor& grad_kl,
                                                                   const at::Tensor& mu, const at::Tensor& logvar,
                                                                   const OptTensor& noise, int64_t seed, int64_t stream,
                                                                   const OptTensor& row_seeds) {
  static const auto op = op_handle<std::tuple<at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&, int64_t, int64_t,
      const OptTensor&)>("pygen::reparameterize_kl_backward");
  return op.call(grad_z, grad_kl, mu, logvar, noise, seed, stream, row_seeds);
}

// eps in float32 exactly as the kernels regenerate it: pygen.randn(shape, seed, stream[, row_seeds]).
at::Tensor regenerate_eps(const at::Tensor& like, int64_t seed, int64_t stream, const OptTensor& row_seeds) {
  static const auto op =
      op_handle<void(at::Tensor&, int64_t, int64_t, const OptTensor&, const OptTensor&)>("pygen::randn_fill_");
  at::Tensor eps = at::empty(like.sizes(), like.options().dtype(at::kFloat));
  op.call(eps, seed, stream, row_seeds, std::nullopt);
  return eps;
}

// ---------------------------------------------------------------------------
// diffusion_loss
// ---------------------------------------------------------------------------
class DiffusionLossFunction : public torch::autograd::Function<DiffusionLossFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& model_out, const at::Tensor& x0,
                            const OptTensor& noise, const at::Tensor& coeffs, int64_t seed, int64_t stream,
                            const OptTensor& row_seeds) {
    at::AutoDispatchBelowADInplaceOrView below;
    Edges e;
    ctx->saved_data["e_out"] = e.take(true);
    ctx->saved_data["e_x0"] = e.take(true);
    ctx->saved_data["e_noise"] = e.take(present(noise));
    ctx->saved_data["e_coeffs"] = e.take(true);
    ctx->saved_data["seed"] = seed;
    ctx->saved_data["stream"] = stream;
    ctx->save_for_backward({model_out, x0, noise.value_or(at::Tensor()), coeffs, row_seeds.value_or(at::Tensor())});
    return call_diffusion_loss(model_out, x0, noise, coeffs, seed, stream, row_seeds);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &model_out = saved[0], &x0 = saved[1], &coeffs = saved[3];
    const OptTensor noise = saved_optional(saved[2]), row_seeds = saved_optional(saved[4]);
    const int64_t seed = ctx->saved_data["seed"].toInt(), stream = ctx->saved_data["stream"].toInt();
    const bool need_out = needs(ctx, ctx->saved_data["e_out"].toInt());
    const bool need_x0 = needs(ctx, ctx->saved_data["e_x0"].toInt());
    const bool need_noise = needs(ctx, ctx->saved_data["e_noise"].toInt());
    const bool need_coeffs = needs(ctx, ctx->saved_data["e_coeffs"].toInt());
    const at::Tensor grad_rows = grads[0].contiguous();

    at::Tensor grad_out, grad_x0, grad_noise, grad_coeffs;
    if (need_out) {
      grad_out = call_diffusion_loss_backward(grad_rows, model_out, x0, noise, coeffs, seed, stream, row_seeds);
    }
    if (need_x0 || need_noise || need_coeffs) {
      // r = m·out - ca·x0 - cb·eps; loss[b] = w·mean(r²), so d loss / d r = k·r with k = g·w·2/n.
      const at::ScalarType acc = acc_type(model_out);
      const int64_t nd = model_out.dim(), batch = model_out.size(0), n = row_len(model_out);
      const at::Tensor c = coeffs.to(acc);
      const at::Tensor m = row_view(c.select(1, 0), nd), ca = row_view(c.select(1, 1), nd),
                       cb = row_view(c.select(1, 2), nd), w = row_view(c.select(1, 3), nd);
      const at::Tensor eps = noise.has_value() ? noise->to(acc) : regenerate_eps(x0, seed, stream, row_seeds).to(acc);
      const at::Tensor out_a = model_out.to(acc), x0_a = x0.to(acc);
      const at::Tensor r = m * out_a - ca * x0_a - cb * eps;
      const at::Tensor k = row_view(grad_rows.to(acc), nd) * w * (2.0 / static_cast<double>(n));
      if (need_x0) grad_x0 = (-(k * ca) * r).to(x0.scalar_type());
      if (need_noise) grad_noise = (-(k * cb) * r).to(noise->scalar_type());
      if (need_coeffs) {
        const at::Tensor kr = (k * r).reshape({batch, n});
        const at::Tensor gm = (kr * out_a.reshape({batch, n})).sum(1);
        const at::Tensor gca = -(kr * x0_a.reshape({batch, n})).sum(1);
        const at::Tensor gcb = -(kr * eps.reshape({batch, n})).sum(1);
        const at::Tensor gw = grad_rows.to(acc) * ((r * r).reshape({batch, n}).sum(1) / static_cast<double>(n));
        grad_coeffs = at::stack({gm, gca, gcb, gw}, 1).to(coeffs.scalar_type());
      }
    }
    // one entry per forward argument: model_out, x0, noise, coeffs, seed, stream, row_seeds
    return {grad_out, grad_x0, grad_noise, grad_coeffs, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor diffusion_loss_autograd(const at::Tensor& model_out, const at::Tensor& x0, const OptTensor& noise,
                                   const at::Tensor& coeffs, int64_t seed, int64_t stream,
                                   const OptTensor& row_seeds) {
  return DiffusionLossFunction::apply(model_out, x0, noise, coeffs, seed, stream, row_seeds);
}

// ---------------------------------------------------------------------------
// reparameterize_kl
// ---------------------------------------------------------------------------
class ReparameterizeKLFunction : public torch::autograd::Function<ReparameterizeKLFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& mu, const at::Tensor& logvar,
                               const OptTensor& noise, int64_t seed, int64_t stream, const OptTensor& row_seeds) {
    at::AutoDispatchBelowADInplaceOrView below;
    Edges e;
    ctx->saved_data["e_mu"] = e.take(true);
    ctx->saved_data["e_logvar"] = e.take(true);
    ctx->saved_data["e_noise"] = e.take(present(noise));
    ctx->saved_data["seed"] = seed;
    ctx->saved_data["stream"] = stream;
    ctx->save_for_backward({mu, logvar, noise.value_or(at::Tensor()), row_seeds.value_or(at::Tensor())});
    auto [z, kl] = call_reparameterize_kl(mu, logvar, noise, seed, stream, row_seeds);
    return {z, kl};
  }

  // grads: (grad_z, grad_kl); an output that was not used arrives as zeros (materialized grads).
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &mu = saved[0], &logvar = saved[1];
    const OptTensor noise = saved_optional(saved[2]), row_seeds = saved_optional(saved[3]);
    const bool need_mu = needs(ctx, ctx->saved_data["e_mu"].toInt());
    const bool need_lv = needs(ctx, ctx->saved_data["e_logvar"].toInt());
    const bool need_noise = needs(ctx, ctx->saved_data["e_noise"].toInt());
    const at::Tensor grad_z = grads[0].contiguous(), grad_kl = grads[1].contiguous();

    at::Tensor grad_mu, grad_lv, grad_noise;
    if (need_mu || need_lv) {
      auto [gmu, glv] = call_reparameterize_kl_backward(grad_z, grad_kl, mu, logvar, noise,
                                                        ctx->saved_data["seed"].toInt(),
                                                        ctx->saved_data["stream"].toInt(), row_seeds);
      if (need_mu) grad_mu = gmu;
      if (need_lv) grad_lv = glv;
    }
    if (need_noise) {  // dz / deps = std = exp(logvar / 2)
      const at::ScalarType acc = acc_type(mu);
      grad_noise = (grad_z.to(acc) * at::exp(logvar.to(acc) * 0.5)).to(noise->scalar_type());
    }
    // mu, logvar, noise, seed, stream, row_seeds
    return {grad_mu, grad_lv, grad_noise, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor> reparameterize_kl_autograd(const at::Tensor& mu, const at::Tensor& logvar,
                                                              const OptTensor& noise, int64_t seed, int64_t stream,
                                                              const OptTensor& row_seeds) {
  variable_list out = ReparameterizeKLFunction::apply(mu, logvar, noise, seed, stream, row_seeds);
  return {out[0], out[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(pygen, Autograd, m) {
  m.impl("diffusion_loss", &diffusion_loss_autograd);
  m.impl("reparameterize_kl", &reparameterize_kl_autograd);
}

}  // namespace pygen::autograd
