// csrc/cpu/step.cpp — C++ CPU kernel of torch.ops.pygen.sampler_step_out
// (pygen.sampler_step): the general fused sampler step of
// csrc/include/pygen/step.h, coefficients read from a table at a step index
// held in a tensor, noise drawn in the loop when not given.
//
// Work is split into chunks of a noise row (multiples of 4 elements, so a
// Philox group never straddles chunks); each chunk hoists its coefficient row
// and runs a contiguous loop the compiler can vectorise.
#include <optional>

#include <torch/library.h>

#include "cpu_common.h"
#include "pygen/step.h"

namespace pygen::cpu {
namespace {

// Most history slots the kernel supports (it keeps a table row on the stack).
constexpr int64_t kMaxHistory = 8;

struct StepArgs {
  const int64_t* steps;
  int64_t num_steps;   // rows of the coefficient table
  int64_t width;       // columns of the coefficient table
  int64_t num_hist;    // history slots
  bool per_row_steps;  // one step index per batch row
  const int64_t* row_seeds;
  uint64_t seed;
  uint64_t stream;
  double clamp;
};

// pred_t / hist_t: scalar_t, or acc_t<scalar_t> (float32) for float16/bfloat16 x.
template <typename scalar_t, typename pred_t, typename hist_t>
void step_kernel(const StepArgs& p, const NoiseLayout& layout, const scalar_t* x, const scalar_t* m,
                 const acc_t<scalar_t>* coeffs, hist_t* hist, int64_t hist_stride, const scalar_t* noise,
                 scalar_t* out, pred_t* pred) {
  using acc = acc_t<scalar_t>;
  for_each_noise_chunk(layout, [&](int64_t r, int64_t i0, int64_t len) {
    acc z[kNoiseChunk], d[kNoiseChunk], res[kNoiseChunk];
    const int64_t step = p.steps[p.per_row_steps ? r : 0];
    const bool valid = step >= 0 && step < p.num_steps;
    acc c[step::kColHist + kMaxHistory];
    for (int64_t k = 0; k < p.width; ++k) c[k] = valid ? coeffs[step * p.width + k] : acc(NAN);
    const acc cx = c[step::kColCx], cm = c[step::kColCm], a = c[step::kColA], b = c[step::kColB];
    const acc s = c[step::kColS], hx = c[step::kColHx], hd = c[step::kColHd];
    const int64_t slot = valid ? static_cast<int64_t>(c[step::kColSlot]) : -1;
    const bool write_hist = slot >= 0 && slot < p.num_hist;
    const int64_t base = r * layout.row_len + i0;
    // Noise for this chunk: given, drawn (Philox groups i0/4 ...), or unused (s == 0).
    if (noise != nullptr) {
      for (int64_t i = 0; i < len; ++i) z[i] = static_cast<acc>(noise[base + i]);
    } else if (s != acc(0)) {
      const uint64_t key = p.row_seeds != nullptr ? static_cast<uint64_t>(p.row_seeds[r]) : p.seed;
      float zf[kNoiseChunk];
      fill_normals(key, p.stream + static_cast<uint64_t>(step), static_cast<uint64_t>(i0 / kGroup), len, zf);
      for (int64_t i = 0; i < len; ++i) z[i] = static_cast<acc>(zf[i]);
    } else {
      for (int64_t i = 0; i < len; ++i) z[i] = acc(0);
    }
    // Branch-free passes over chunk-local buffers (they cannot alias x, out
    // or history, so each loop vectorises; out may be x: it is written last).
    const acc lim = static_cast<acc>(p.clamp);
    const bool use_clamp = lim > acc(0);
    const scalar_t* xs = x + base;
    const scalar_t* ms = m + base;
    for (int64_t i = 0; i < len; ++i) {
      const acc xv = static_cast<acc>(xs[i]);
      const acc raw = cx * xv + cm * static_cast<acc>(ms[i]);
      const acc clamped = raw < -lim ? -lim : (raw > lim ? lim : raw);  // keeps NaN
      const acc dv = use_clamp ? clamped : raw;
      d[i] = dv;
      res[i] = a * xv + b * dv + s * z[i];
    }
    for (int64_t j = 0; j < p.num_hist; ++j) {
      const acc cj = c[step::kColHist + j];
      const hist_t* hj = hist + j * hist_stride + base;
      for (int64_t i = 0; i < len; ++i) res[i] += cj * static_cast<acc>(hj[i]);
    }
    if (write_hist) {
      hist_t* hs = hist + slot * hist_stride + base;
      for (int64_t i = 0; i < len; ++i) hs[i] = static_cast<hist_t>(hx * static_cast<acc>(xs[i]) + hd * d[i]);
    }
    if (pred != nullptr) {
      pred_t* ps = pred + base;
      for (int64_t i = 0; i < len; ++i) ps[i] = static_cast<pred_t>(d[i]);
    }
    scalar_t* os = out + base;
    for (int64_t i = 0; i < len; ++i) os[i] = static_cast<scalar_t>(res[i]);
  });
}

void sampler_step_out_cpu(const at::Tensor& x, const at::Tensor& model_out, const at::Tensor& coeffs,
                          at::Tensor& step_index, const std::optional<at::Tensor>& history,
                          const std::optional<at::Tensor>& noise, at::Tensor& out,
                          const std::optional<at::Tensor>& pred_x0, int64_t seed, int64_t stream,
                          const std::optional<at::Tensor>& row_seeds, double clamp, bool advance) {
  const int64_t num_hist =
      check_sampler_step_args(x, model_out, coeffs, step_index, history, noise, out, pred_x0, row_seeds, c10::kCPU);
  TORCH_CHECK(num_hist <= kMaxHistory, "pygen: coeffs must be a (steps, 8 + H) table with H <= ", kMaxHistory,
              " on the CPU, got H = ", num_hist);
  const int64_t batch = x.size(0);
  const bool per_row_steps = step_index.size(0) > 1;
  StepArgs p;
  p.steps = step_index.data_ptr<int64_t>();
  p.num_steps = coeffs.size(0);
  p.width = coeffs.size(1);
  p.num_hist = num_hist;
  p.per_row_steps = per_row_steps;
  p.row_seeds = row_seeds.has_value() ? row_seeds->data_ptr<int64_t>() : nullptr;
  p.seed = static_cast<uint64_t>(seed);
  p.stream = static_cast<uint64_t>(stream);
  p.clamp = clamp;
  const NoiseLayout layout = make_noise_layout(x.numel(), batch, per_row_steps || row_seeds.has_value());
  if (x.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sampler_step_out_cpu", [&] {
      using acc = acc_t<scalar_t>;
      with_step_pointers<scalar_t, acc>(x, pred_x0, history, num_hist, [&](auto* pred, auto* hist) {
        step_kernel(p, layout, x.data_ptr<scalar_t>(), model_out.data_ptr<scalar_t>(), coeffs.data_ptr<acc>(), hist,
                    x.numel(), noise.has_value() ? noise->data_ptr<scalar_t>() : nullptr, out.data_ptr<scalar_t>(),
                    pred);
      });
    });
  }
  if (advance) {
    int64_t* s = step_index.data_ptr<int64_t>();
    for (int64_t k = 0; k < step_index.size(0); ++k) s[k] += 1;
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(pygen, CPU, m) { m.impl("sampler_step_out", &sampler_step_out_cpu); }

}  // namespace pygen::cpu
