// csrc/cuda/random.cu — CUDA kernel of torch.ops.pygen.randn_fill_ (pygen.randn).
// One thread per Philox group: one philox4x32_10 call -> four normals -> four
// consecutive elements (csrc/include/pygen/philox.h).
#include <optional>

#include <torch/library.h>

#include "cuda_common.cuh"

namespace pygen::cuda {
namespace {

template <typename scalar_t>
__global__ void randn_fill_kernel(scalar_t* __restrict__ out, const int64_t* __restrict__ row_seeds, uint64_t seed,
                                  uint64_t stream, const int64_t* __restrict__ stream_offset, NoiseLayout layout) {
  const int64_t w = global_thread_index();
  if (w >= layout.work_items()) return;
  if (stream_offset != nullptr) stream += static_cast<uint64_t>(*stream_offset);  // a device step counter
  const NoiseGroup ng = noise_group(layout, w);
  const Normals4 z = philox_normals(noise_key(row_seeds, seed, ng.row), stream, static_cast<uint64_t>(ng.group));
  scalar_t* o = out + ng.first;
#pragma unroll
  for (int j = 0; j < kGroup; ++j) {
    if (j < ng.count) o[j] = static_cast<scalar_t>(z.z[j]);
  }
}

void randn_fill_cuda(at::Tensor& out, int64_t seed, int64_t stream, const std::optional<at::Tensor>& row_seeds,
                     const std::optional<at::Tensor>& stream_offset) {
  check_randn_fill_args(out, row_seeds, stream_offset, c10::kCUDA);
  const bool per_row = row_seeds.has_value();
  const int64_t batch = out.dim() > 0 ? out.size(0) : 1;
  if (out.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(out.device());
  const NoiseLayout layout = make_noise_layout(out.numel(), batch, per_row);
  const int64_t* seeds = per_row ? row_seeds->data_ptr<int64_t>() : nullptr;
  auto stream_ = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "randn_fill_cuda", [&] {
    randn_fill_kernel<scalar_t><<<blocks_for(layout.work_items()), kThreads, 0, stream_>>>(
        out.data_ptr<scalar_t>(), seeds, static_cast<uint64_t>(seed), static_cast<uint64_t>(stream),
        stream_offset.has_value() ? stream_offset->data_ptr<int64_t>() : nullptr, layout);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_IMPL(pygen, CUDA, m) { m.impl("randn_fill_", &randn_fill_cuda); }

}  // namespace pygen::cuda
