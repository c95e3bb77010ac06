// csrc/cuda/step.cu — CUDA kernel of torch.ops.pygen.sampler_step_out
// (pygen.sampler_step): the general fused sampler step of
// csrc/include/pygen/step.h in one launch per model evaluation.
//
// One thread per Philox group (4 consecutive elements of a noise row). The
// step index is read on the device, so the launch replays unchanged inside a
// CUDA graph. advance=True with one step index: the same launch increments it
// (the last block to finish does, see "In-kernel advance" in pygen/step.h); with
// per-row indices, or a grid too large for the block count, a one-thread kernel
// on the same stream does.
#include <optional>
#include <type_traits>

#include <torch/library.h>

#include "cuda_common.cuh"
#include "pygen/step.h"

namespace pygen::cuda {
namespace {

struct StepParams {
  int64_t* steps;  // written by the in-kernel advance
  int64_t num_steps;
  int width;
  int num_hist;
  bool per_row_steps;
  const int64_t* row_seeds;
  uint64_t seed;
  uint64_t stream;
  float clamp;
  int64_t hist_stride;
  bool fused_advance;  // one step index, incremented by this launch (last block done)
};

// The update of one Philox group at table row `step`.
template <typename scalar_t, typename pred_t, typename hist_t>
__device__ __forceinline__ void step_group(const StepParams& p, const NoiseGroup& ng, int64_t step, const scalar_t* x,
                                           const scalar_t* __restrict__ m, const acc_t<scalar_t>* __restrict__ coeffs,
                                           hist_t* hist, const scalar_t* __restrict__ noise, scalar_t* out,
                                           pred_t* __restrict__ pred) {
  using acc = acc_t<scalar_t>;
  const bool valid = step >= 0 && step < p.num_steps;
  const acc* row = coeffs + (valid ? step : 0) * p.width;
  const acc nan = acc(NAN);
  const acc cx = valid ? row[step::kColCx] : nan, cm = valid ? row[step::kColCm] : nan;
  const acc a = valid ? row[step::kColA] : nan, b = valid ? row[step::kColB] : nan;
  const acc s = valid ? row[step::kColS] : nan;
  const int slot = valid ? static_cast<int>(row[step::kColSlot]) : -1;
  const bool write_hist = slot >= 0 && slot < p.num_hist;

  float z[kGroup] = {0.f, 0.f, 0.f, 0.f};
  if (noise == nullptr && s != acc(0)) {
    const Normals4 n4 = philox_normals(noise_key(p.row_seeds, p.seed, ng.row), p.stream + static_cast<uint64_t>(step),
                                       static_cast<uint64_t>(ng.group));
#pragma unroll
    for (int j = 0; j < kGroup; ++j) z[j] = n4.z[j];
  }
  const acc lim = static_cast<acc>(p.clamp);
#pragma unroll
  for (int j = 0; j < kGroup; ++j) {
    if (j >= ng.count) break;
    const int64_t e = ng.first + j;
    const acc xv = static_cast<acc>(x[e]);
    acc d = cx * xv + cm * static_cast<acc>(m[e]);
    if (lim > acc(0)) d = d < -lim ? -lim : (d > lim ? lim : d);  // keeps NaN
    const acc zv = noise != nullptr ? static_cast<acc>(noise[e]) : static_cast<acc>(z[j]);
    acc xn = a * xv + b * d + s * zv;
    for (int k = 0; k < p.num_hist; ++k) {
      const acc ck = valid ? row[step::kColHist + k] : nan;
      xn += ck * static_cast<acc>(hist[k * p.hist_stride + e]);
    }
    if (write_hist) {
      hist[slot * p.hist_stride + e] = static_cast<hist_t>(row[step::kColHx] * xv + row[step::kColHd] * d);
    }
    if (pred != nullptr) pred[e] = static_cast<pred_t>(d);
    out[e] = static_cast<scalar_t>(xn);
  }
}

// pred_t / hist_t: scalar_t, or float for float16/bfloat16 x (a float32 pred_x0 / history).
template <typename scalar_t, typename pred_t, typename hist_t>
__global__ void sampler_step_kernel(StepParams p, NoiseLayout layout, const scalar_t* x,  // out may alias x
                                    const scalar_t* __restrict__ m, const acc_t<scalar_t>* __restrict__ coeffs,
                                    hist_t* hist, const scalar_t* __restrict__ noise, scalar_t* out,
                                    pred_t* __restrict__ pred) {
  const int64_t w = global_thread_index();
  if (!p.fused_advance) {
    if (w >= layout.work_items()) return;
    const NoiseGroup ng = noise_group(layout, w);
    step_group(p, ng, p.steps[p.per_row_steps ? ng.row : 0], x, m, coeffs, hist, noise, out, pred);
    return;
  }
  // In-kernel advance (pygen/step.h): read the index once (it may carry the count of blocks
  // already done), update, then count this block; the last block stores index + 1.
  const int64_t step = step::decode_advancing_index(*reinterpret_cast<volatile const int64_t*>(p.steps));
  if (w < layout.work_items()) step_group(p, noise_group(layout, w), step, x, m, coeffs, hist, noise, out, pred);
  __syncthreads();  // every thread of the block has read the index
  if (threadIdx.x == 0) {
    __threadfence();
    auto* word = reinterpret_cast<unsigned long long*>(p.steps);
    const auto old = atomicAdd(word, 1ull << step::kAdvanceShift);
    if (step::advance_count(static_cast<int64_t>(old), step) == static_cast<int64_t>(gridDim.x) - 1) {
      __threadfence();
      atomicExch(word, static_cast<unsigned long long>(step + 1));
    }
  }
}

__global__ void advance_kernel(int64_t* steps, int64_t count) {
  for (int64_t k = threadIdx.x; k < count; k += blockDim.x) steps[k] += 1;
}

void sampler_step_out_cuda(const at::Tensor& x, const at::Tensor& model_out, const at::Tensor& coeffs,
                           at::Tensor& step_index, const std::optional<at::Tensor>& history,
                           const std::optional<at::Tensor>& noise, at::Tensor& out,
                           const std::optional<at::Tensor>& pred_x0, int64_t seed, int64_t stream,
                           const std::optional<at::Tensor>& row_seeds, double clamp, bool advance) {
  const int64_t num_hist =
      check_sampler_step_args(x, model_out, coeffs, step_index, history, noise, out, pred_x0, row_seeds, c10::kCUDA);
  const int64_t batch = x.size(0);
  const c10::cuda::CUDAGuard guard(x.device());
  auto cuda_stream = c10::cuda::getCurrentCUDAStream();
  const bool per_row_steps = step_index.size(0) > 1;
  StepParams p;
  p.steps = step_index.data_ptr<int64_t>();
  p.num_steps = coeffs.size(0);
  p.width = static_cast<int>(coeffs.size(1));
  p.num_hist = static_cast<int>(num_hist);
  p.per_row_steps = per_row_steps;
  p.row_seeds = row_seeds.has_value() ? row_seeds->data_ptr<int64_t>() : nullptr;
  p.seed = static_cast<uint64_t>(seed);
  p.stream = static_cast<uint64_t>(stream);
  p.clamp = static_cast<float>(clamp);
  p.hist_stride = x.numel();
  const NoiseLayout layout = make_noise_layout(x.numel(), batch, per_row_steps || row_seeds.has_value());
  const unsigned int blocks = blocks_for(layout.work_items());
  p.fused_advance = advance && !per_row_steps && x.numel() > 0 && blocks <= step::kMaxAdvanceBlocks;
  if (x.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sampler_step_out_cuda", [&] {
      using acc = acc_t<scalar_t>;
      with_step_pointers<scalar_t, acc>(x, pred_x0, history, num_hist, [&](auto* pred, auto* hist) {
        using pred_t = std::remove_pointer_t<decltype(pred)>;
        using hist_t = std::remove_pointer_t<decltype(hist)>;
        sampler_step_kernel<scalar_t, pred_t, hist_t><<<blocks, kThreads, 0, cuda_stream>>>(
            p, layout, x.data_ptr<scalar_t>(), model_out.data_ptr<scalar_t>(), coeffs.data_ptr<acc>(), hist,
            noise.has_value() ? noise->data_ptr<scalar_t>() : nullptr, out.data_ptr<scalar_t>(), pred);
      });
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (advance && !p.fused_advance) {
    advance_kernel<<<1, 32, 0, cuda_stream>>>(step_index.data_ptr<int64_t>(), step_index.size(0));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(pygen, CUDA, m) { m.impl("sampler_step_out", &sampler_step_out_cuda); }

}  // namespace pygen::cuda
