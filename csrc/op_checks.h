// csrc/op_checks.h — host-side argument checks of the torch.ops.pygen ops,
// shared by their C++ CPU (csrc/cpu/*.cpp) and CUDA (csrc/cuda/*.cu)
// implementations: one check_<op>_args per op, given the device type the
// implementation serves (c10::kCPU or c10::kCUDA), so both backends accept
// and reject exactly the same arguments; plus the small pieces of op glue the
// two share (output allocation of the forward ops, q_sample's target dispatch).
//
// The public Python API has already raised ValueError/TypeError for bad user
// input; these checks guard direct torch.ops.pygen calls and keep anything a
// kernel cannot handle from reaching it. They raise c10::Error (RuntimeError
// in Python) naming the argument. Torch glue, so it lives here and not in
// csrc/include/pygen/ (which stays torch-free).
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/DeviceType.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>
#include <tuple>
#include <type_traits>

#include "pygen/forward.h"
#include "pygen/step.h"

namespace pygen {

// t is on a device of type `type` and contiguous.
inline void check_tensor_on(const at::Tensor& t, const char* name, c10::DeviceType type) {
  TORCH_CHECK(t.device().type() == type, "pygen: ", name, " must be a ", c10::DeviceTypeName(type), " tensor, got ",
              t.device());
  TORCH_CHECK(t.is_contiguous(), "pygen: ", name, " must be contiguous");
}

// t is on the same device as ref (always true for two CPU tensors).
inline void check_same_device(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), "pygen: ", name, " must be on the device of ", ref_name, " (", ref.device(),
              "), got ", t.device());
}

// t is contiguous, on ref's device (of type `type`), with ref's shape and dtype.
inline void check_like(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name,
                       c10::DeviceType type) {
  check_tensor_on(t, name, type);
  check_same_device(t, name, ref, ref_name);
  TORCH_CHECK(t.sizes() == ref.sizes(), "pygen: ", name, " must have the shape of ", ref_name, " ", ref.sizes(),
              ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "pygen: ", name, " must have the dtype of ", ref_name, " (",
              ref.scalar_type(), "), got ", t.scalar_type());
}

// Per-row seeds: contiguous 1-D int64 on ref's device, one seed per batch row.
inline void check_row_seeds(const at::Tensor& row_seeds, int64_t batch, const at::Tensor& ref, const char* ref_name,
                            c10::DeviceType type) {
  check_tensor_on(row_seeds, "row_seeds", type);
  check_same_device(row_seeds, "row_seeds", ref, ref_name);
  TORCH_CHECK(row_seeds.scalar_type() == at::kLong && row_seeds.dim() == 1 && row_seeds.numel() == batch,
              "pygen: row_seeds must be 1-D int64 with one seed per row (", batch, "), got ", row_seeds.scalar_type(),
              " of shape ", row_seeds.sizes());
}

// ---------------------------------------------------------------------------
// randn_fill_(out, seed, stream, row_seeds)
// ---------------------------------------------------------------------------
// A device step counter (randn_fill_'s and langevin_step's stream_offset, langevin_snr_step's
// step_index): an int64 tensor of shape (1,) on like's device, read by the kernels (a CUDA-graph
// loop's step).
inline void check_stream_offset(const std::optional<at::Tensor>& offset, const at::Tensor& like, const char* like_name,
                                c10::DeviceType type, const char* name = "stream_offset") {
  if (!offset.has_value()) return;
  check_tensor_on(*offset, name, type);
  check_same_device(*offset, name, like, like_name);
  TORCH_CHECK(offset->scalar_type() == at::kLong && offset->dim() == 1 && offset->size(0) == 1, "pygen: ", name,
              " must be int64 of shape (1,), got ", offset->scalar_type(), " of shape ", offset->sizes());
}

// The noise stream of a CPU kernel's call: stream + stream_offset[0] (mod 2^64), the offset read from
// host memory (CPU tensors only).
inline uint64_t cpu_offset_stream(int64_t stream, const std::optional<at::Tensor>& offset) {
  TORCH_CHECK(!offset.has_value() || offset->is_cpu(), "pygen: cpu_offset_stream needs a CPU stream_offset");
  return static_cast<uint64_t>(stream) + (offset.has_value() ? static_cast<uint64_t>(*offset->data_ptr<int64_t>()) : 0);
}

inline void check_randn_fill_args(const at::Tensor& out, const std::optional<at::Tensor>& row_seeds,
                                  const std::optional<at::Tensor>& stream_offset, c10::DeviceType type) {
  check_tensor_on(out, "out", type);
  if (row_seeds.has_value()) check_row_seeds(*row_seeds, out.dim() > 0 ? out.size(0) : 1, out, "out", type);
  check_stream_offset(stream_offset, out, "out", type);
}

// ---------------------------------------------------------------------------
// q_sample(x0, t, table, noise, seed, stream, row_seeds, interpolation, target)
// ---------------------------------------------------------------------------
// The checked inputs, made contiguous. `noise` is the given noise (absent:
// drawn in the kernel); `row_seeds` is present only when the noise is drawn
// with per-row seeds.
struct QSampleArgs {
  at::Tensor x0, t, table;
  std::optional<at::Tensor> noise, row_seeds;
  int64_t batch;
};

inline QSampleArgs check_q_sample_args(const at::Tensor& x0, const at::Tensor& t, const at::Tensor& table,
                                       const std::optional<at::Tensor>& noise,
                                       const std::optional<at::Tensor>& row_seeds, int64_t interpolation,
                                       int64_t target, c10::DeviceType type) {
  TORCH_CHECK(x0.dim() >= 1, "pygen: q_sample x0 must have a batch dimension, got a 0-d tensor");
  QSampleArgs a{x0.contiguous(), t.contiguous(), table.contiguous(), std::nullopt, std::nullopt, x0.size(0)};
  check_tensor_on(a.x0, "x0", type);
  check_tensor_on(a.t, "t", type);
  check_tensor_on(a.table, "table", type);
  check_same_device(a.t, "t", a.x0, "x0");
  check_same_device(a.table, "table", a.x0, "x0");
  TORCH_CHECK(a.t.scalar_type() == at::kLong || a.t.scalar_type() == at::kInt,
              "pygen: q_sample t must be int64 or int32, got ", a.t.scalar_type());
  TORCH_CHECK(a.t.dim() == 1 && a.t.numel() == a.batch, "pygen: q_sample t must be 1-D with one timestep per row (",
              a.batch, "), got shape ", a.t.sizes());
  TORCH_CHECK(a.table.dim() == 1 && (a.table.scalar_type() == at::kFloat || a.table.scalar_type() == at::kDouble),
              "pygen: q_sample table must be a 1-D float32/float64 tensor, got ", a.table.scalar_type(), " of shape ",
              a.table.sizes());
  TORCH_CHECK(interpolation == kInterpVP || interpolation == kInterpFlow,
              "pygen: q_sample interpolation must be 0 (vp) or 1 (flow), got ", interpolation);
  TORCH_CHECK(target >= kTargetNone && target <= kTargetFlow, "pygen: q_sample target must be 0..4, got ", target);
  if (noise.has_value()) {
    a.noise = noise->contiguous();
    check_like(*a.noise, "noise", a.x0, "x0", type);
  } else if (row_seeds.has_value()) {
    a.row_seeds = row_seeds->contiguous();
    check_row_seeds(*a.row_seeds, a.batch, a.x0, "x0", type);
  }
  return a;
}

// q_sample's outputs, as the schema and the fake (pygen/ops/forward.py) give
// them: x_t like x0; the drawn noise like x0, or empty when noise was given;
// the training target like x0, or empty for target 0 (kTargetNone).
struct QSampleOutputs {
  at::Tensor x_t, noise, target;
  std::tuple<at::Tensor, at::Tensor, at::Tensor> as_tuple() const { return {x_t, noise, target}; }
};

inline QSampleOutputs q_sample_outputs(const QSampleArgs& a, int64_t target) {
  const auto like_x0 = [&](bool used) {
    return used ? at::empty(a.x0.sizes(), a.x0.options()) : at::empty({0}, a.x0.options());
  };
  return {like_x0(true), like_x0(!a.noise.has_value()), like_x0(target != kTargetNone)};
}

// Call fn(std::integral_constant<int, TARGET>{}) for a checked runtime target.
template <typename Fn>
void dispatch_q_sample_target(int64_t target, Fn&& fn) {
  switch (target) {
    case kTargetNone: return fn(std::integral_constant<int, kTargetNone>{});
    case kTargetEps: return fn(std::integral_constant<int, kTargetEps>{});
    case kTargetV: return fn(std::integral_constant<int, kTargetV>{});
    case kTargetX0: return fn(std::integral_constant<int, kTargetX0>{});
    case kTargetFlow: return fn(std::integral_constant<int, kTargetFlow>{});
    default: TORCH_CHECK(false, "pygen: q_sample target must be 0..4, got ", target);
  }
}

// ---------------------------------------------------------------------------
// reparameterize(mu, logvar, noise, seed, stream, row_seeds)
// ---------------------------------------------------------------------------
// The checked inputs, made contiguous (noise / row_seeds as in QSampleArgs).
// batch: mu.size(0), or 1 for a 0-d mu.
struct ReparameterizeArgs {
  at::Tensor mu, logvar;
  std::optional<at::Tensor> noise, row_seeds;
  int64_t batch;
};

inline ReparameterizeArgs check_reparameterize_args(const at::Tensor& mu, const at::Tensor& logvar,
                                                    const std::optional<at::Tensor>& noise,
                                                    const std::optional<at::Tensor>& row_seeds, c10::DeviceType type) {
  ReparameterizeArgs a{mu.contiguous(), logvar.contiguous(), std::nullopt, std::nullopt, mu.dim() > 0 ? mu.size(0) : 1};
  check_tensor_on(a.mu, "mu", type);
  check_like(a.logvar, "logvar", a.mu, "mu", type);
  if (noise.has_value()) {
    a.noise = noise->contiguous();
    check_like(*a.noise, "noise", a.mu, "mu", type);
  } else if (row_seeds.has_value()) {
    TORCH_CHECK(a.mu.dim() >= 1, "pygen: reparameterize with row_seeds needs mu with a batch dimension");
    a.row_seeds = row_seeds->contiguous();
    check_row_seeds(*a.row_seeds, a.batch, a.mu, "mu", type);
  }
  return a;
}

// reparameterize's outputs, as the schema and the fake give them: z like mu;
// the drawn noise like mu, or empty when noise was given.
struct ReparameterizeOutputs {
  at::Tensor z, noise;
  std::tuple<at::Tensor, at::Tensor> as_tuple() const { return {z, noise}; }
};

inline ReparameterizeOutputs reparameterize_outputs(const ReparameterizeArgs& a) {
  return {at::empty(a.mu.sizes(), a.mu.options()),
          a.noise.has_value() ? at::empty({0}, a.mu.options()) : at::empty(a.mu.sizes(), a.mu.options())};
}

// ---------------------------------------------------------------------------
// langevin_step(x, score, step_sizes, step_size, noise, seed, stream, row_seeds, stream_offset)
// (stream_offset: check_stream_offset above)
// ---------------------------------------------------------------------------
// The checked inputs, made contiguous (noise / row_seeds as in QSampleArgs;
// step_sizes: per-row steps, absent for the scalar step_size).
// batch: x.size(0), or 1 for a 0-d x.
struct LangevinArgs {
  at::Tensor x, score;
  std::optional<at::Tensor> step_sizes, noise, row_seeds;
  int64_t batch;
};

inline LangevinArgs check_langevin_step_args(const at::Tensor& x, const at::Tensor& score,
                                             const std::optional<at::Tensor>& step_sizes, double step_size,
                                             const std::optional<at::Tensor>& noise,
                                             const std::optional<at::Tensor>& row_seeds, c10::DeviceType type) {
  LangevinArgs a{x.contiguous(), score.contiguous(), std::nullopt, std::nullopt, std::nullopt,
                 x.dim() > 0 ? x.size(0) : 1};
  check_tensor_on(a.x, "x", type);
  check_like(a.score, "score", a.x, "x", type);
  if (noise.has_value()) {
    a.noise = noise->contiguous();
    check_like(*a.noise, "noise", a.x, "x", type);
  } else if (row_seeds.has_value()) {
    TORCH_CHECK(a.x.dim() > 0, "pygen: row_seeds needs x with a batch dimension");
    a.row_seeds = row_seeds->contiguous();
    check_row_seeds(*a.row_seeds, a.batch, a.x, "x", type);
  }
  if (step_sizes.has_value()) {
    TORCH_CHECK(a.x.dim() > 0, "pygen: step_sizes needs x with a batch dimension");
    a.step_sizes = step_sizes->contiguous();
    const at::Tensor& st = *a.step_sizes;
    check_tensor_on(st, "step_sizes", type);
    check_same_device(st, "step_sizes", a.x, "x");
    TORCH_CHECK((st.scalar_type() == at::kFloat || st.scalar_type() == at::kDouble) && st.dim() == 1 &&
                    st.numel() == a.batch,
                "pygen: step_sizes must be 1-D float32/float64 with one step per row (", a.batch, "), got ",
                st.scalar_type(), " of shape ", st.sizes());
  } else {
    TORCH_CHECK(step_size >= 0.0, "pygen: step_size must be non-negative, got ", step_size);
  }
  return a;
}

// langevin_snr_step: x, score, noise, out alike; step a (batch,) fp32 (fp64 for fp64) output;
// k_table (a 1-D table in that dtype) and step_index (int64 of shape (1,)) both or neither.
inline void check_langevin_snr_args(const at::Tensor& x, const at::Tensor& score,
                                    const std::optional<at::Tensor>& noise, const at::Tensor& out,
                                    const at::Tensor& step, const std::optional<at::Tensor>& row_seeds,
                                    const std::optional<at::Tensor>& k_table,
                                    const std::optional<at::Tensor>& step_index, c10::DeviceType type) {
  check_tensor_on(x, "x", type);
  TORCH_CHECK(x.dim() >= 1, "pygen: langevin_snr_step x must have a batch dimension, got a 0-d tensor");
  check_like(score, "score", x, "x", type);
  if (noise.has_value()) check_like(*noise, "noise", x, "x", type);
  check_like(out, "out", x, "x", type);
  check_tensor_on(step, "step", type);
  check_same_device(step, "step", x, "x");
  const auto acc_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(step.scalar_type() == acc_type && step.dim() == 1 && step.size(0) == x.size(0),
              "pygen: langevin_snr_step step must be a 1-D ", acc_type, " tensor of length ", x.size(0), ", got ",
              step.scalar_type(), " of shape ", step.sizes());
  if (!noise.has_value() && row_seeds.has_value()) check_row_seeds(*row_seeds, x.size(0), x, "x", type);
  TORCH_CHECK(k_table.has_value() == step_index.has_value(),
              "pygen: langevin_snr_step takes k_table and step_index together (or neither)");
  if (k_table.has_value()) {
    check_tensor_on(*k_table, "k_table", type);
    check_same_device(*k_table, "k_table", x, "x");
    TORCH_CHECK(k_table->scalar_type() == acc_type && k_table->dim() == 1 && k_table->size(0) >= 1 &&
                    k_table->is_contiguous(),
                "pygen: langevin_snr_step k_table must be a contiguous 1-D ", acc_type,
                " tensor with at least one entry, got ", k_table->scalar_type(), " of shape ", k_table->sizes());
    check_stream_offset(step_index, x, "x", type, "step_index");
  }
}

// ---------------------------------------------------------------------------
// sampler_step_out(x, model_out, coeffs, step_index, history, noise, out,
//                  pred_x0, seed, stream, row_seeds, clamp, advance)
// ---------------------------------------------------------------------------
// Every tensor is used as given (the outputs are written in place), so all must
// already be contiguous. pred_x0 and history may be float32 for float16/bfloat16 x
// (diffusers' multistep schedulers keep their history in float32). Returns the
// number of history slots H of the table.
inline int64_t check_sampler_step_args(const at::Tensor& x, const at::Tensor& model_out, const at::Tensor& coeffs,
                                       const at::Tensor& step_index, const std::optional<at::Tensor>& history,
                                       const std::optional<at::Tensor>& noise, const at::Tensor& out,
                                       const std::optional<at::Tensor>& pred_x0,
                                       const std::optional<at::Tensor>& row_seeds, c10::DeviceType type) {
  check_tensor_on(x, "x", type);
  TORCH_CHECK(x.dim() >= 1, "pygen: x must have a batch dimension");
  check_like(model_out, "model_out", x, "x", type);
  check_like(out, "out", x, "x", type);
  check_tensor_on(coeffs, "coeffs", type);
  check_same_device(coeffs, "coeffs", x, "x");
  TORCH_CHECK(coeffs.dim() == 2 && coeffs.size(1) >= step::kColHist,
              "pygen: coeffs must be a (steps, 8 + H) table, got shape ", coeffs.sizes());
  const auto acc_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(coeffs.scalar_type() == acc_type, "pygen: coeffs must be ", acc_type, " for ", x.scalar_type(),
              " x, got ", coeffs.scalar_type());
  const int64_t batch = x.size(0);
  check_tensor_on(step_index, "step_index", type);
  check_same_device(step_index, "step_index", x, "x");
  TORCH_CHECK(step_index.scalar_type() == at::kLong && step_index.dim() == 1 &&
                  (step_index.size(0) == 1 || step_index.size(0) == batch),
              "pygen: step_index must be int64 of shape (1,) or (batch,) = (", batch, ",), got ",
              step_index.scalar_type(), " of shape ", step_index.sizes());
  const int64_t num_hist = coeffs.size(1) - step::kColHist;
  if (num_hist > 0) {
    TORCH_CHECK(history.has_value(), "pygen: history is required for this coefficient table (", num_hist,
                " history columns)");
    check_tensor_on(*history, "history", type);
    check_same_device(*history, "history", x, "x");
    TORCH_CHECK((history->scalar_type() == x.scalar_type() || history->scalar_type() == acc_type) &&
                    history->dim() == x.dim() + 1 && history->size(0) == num_hist &&
                    history->numel() == num_hist * x.numel(),
                "pygen: history must have shape (H, *x.shape) with H = ", num_hist, " and x's dtype (or ", acc_type,
                "), got ", history->scalar_type(), " of shape ", history->sizes());
  }
  if (noise.has_value()) check_like(*noise, "noise", x, "x", type);
  if (pred_x0.has_value()) {  // x's dtype, or float32 for float16/bfloat16 x (diffusers' upcast pred)
    check_tensor_on(*pred_x0, "pred_x0", type);
    check_same_device(*pred_x0, "pred_x0", x, "x");
    TORCH_CHECK(pred_x0->sizes() == x.sizes(), "pygen: pred_x0 must have the shape of x ", x.sizes(), ", got ",
                pred_x0->sizes());
    TORCH_CHECK(pred_x0->scalar_type() == x.scalar_type() || pred_x0->scalar_type() == acc_type,
                "pygen: pred_x0 must have x's dtype (", x.scalar_type(), ") or ", acc_type, ", got ",
                pred_x0->scalar_type());
  }
  if (row_seeds.has_value()) check_row_seeds(*row_seeds, batch, x, "x", type);
  return num_hist;
}

// Calls f(pred, hist) with sampler_step_out's pred_x0 and history as typed pointers: scalar_t*
// (x's dtype), wide_t* when given in the accumulation dtype (float32 for float16/bfloat16 x), or
// a null scalar_t* when absent. Shared by the CPU and CUDA kernels' dispatch.
template <typename scalar_t, typename wide_t, typename F>
void with_step_pointers(const at::Tensor& x, const std::optional<at::Tensor>& pred_x0,
                        const std::optional<at::Tensor>& history, int64_t num_hist, F&& f) {
  auto with_hist = [&](auto* pred) {
    if (num_hist > 0 && history->scalar_type() != x.scalar_type()) {
      f(pred, history->data_ptr<wide_t>());
    } else {
      f(pred, num_hist > 0 ? history->data_ptr<scalar_t>() : static_cast<scalar_t*>(nullptr));
    }
  };
  if (pred_x0.has_value() && pred_x0->scalar_type() != x.scalar_type()) {
    with_hist(pred_x0->data_ptr<wide_t>());
  } else {
    with_hist(pred_x0.has_value() ? pred_x0->data_ptr<scalar_t>() : static_cast<scalar_t*>(nullptr));
  }
}

// ---------------------------------------------------------------------------
// step_coefficients(levels, kind, prediction, eta, param0, param1)
// ---------------------------------------------------------------------------
inline void check_step_coefficients_args(const at::Tensor& levels, int64_t kind, c10::DeviceType type) {
  check_tensor_on(levels, "levels", type);
  TORCH_CHECK(levels.dim() == 1 && levels.size(0) >= 2, "pygen: levels must be 1-D with at least 2 entries, got shape ",
              levels.sizes());
  TORCH_CHECK(kind >= 0 && kind < step::kNumKinds, "pygen: unknown step kind ", kind, " (expected 0..",
              step::kNumKinds - 1, ")");
}

}  // namespace pygen
