// csrc/cpu/random.cpp — C++ CPU kernel of torch.ops.pygen.randn_fill_ (pygen.randn).
// Philox normals per csrc/include/pygen/philox.h; parallel over element groups.
#include <optional>

#include <torch/library.h>

#include "cpu_common.h"

namespace pygen::cpu {
namespace {

void randn_fill_cpu(at::Tensor& out, int64_t seed, int64_t stream, const std::optional<at::Tensor>& row_seeds,
                    const std::optional<at::Tensor>& stream_offset) {
  check_randn_fill_args(out, row_seeds, stream_offset, c10::kCPU);
  const uint64_t noise_stream = cpu_offset_stream(stream, stream_offset);
  const bool per_row = row_seeds.has_value();
  const int64_t batch = out.dim() > 0 ? out.size(0) : 1;
  const NoiseLayout layout = make_noise_layout(out.numel(), batch, per_row);
  const int64_t* seeds = per_row ? row_seeds->data_ptr<int64_t>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "randn_fill_cpu", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    for_each_noise_element(
        layout, [&](int64_t r) { return static_cast<uint64_t>(per_row ? seeds[r] : seed); },
        [&](int64_t) { return noise_stream; },
        [&](int64_t e, float z) { o[e] = static_cast<scalar_t>(z); });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(pygen, CPU, m) { m.impl("randn_fill_", &randn_fill_cpu); }

}  // namespace pygen::cpu
