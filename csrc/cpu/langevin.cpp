// csrc/cpu/langevin.cpp — C++ CPU kernel of torch.ops.pygen.langevin_step (pygen.langevin_step).
//
// x_next = x + (dt/2)·score + sqrt(dt)·z, dt = step_sizes[row] or the scalar
// step_size, z = the given noise or exactly pygen.randn(x.shape, seed, stream)
// (csrc/include/pygen/philox.h; flat numbering for an int seed, within each
// batch row for per-row seeds). Arithmetic in fp32 (fp64 for fp64 storage).
//
// In-kernel noise is made a tile of Philox groups at a time into a small
// stack buffer and consumed by the same fused update loop as given noise, so
// every element is read and written once.
#include <algorithm>
#include <cmath>
#include <optional>

#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "cpu_common.h"

namespace pygen::cpu {
namespace {

constexpr int64_t kGrainElements = 1 << 15;  // at::parallel_for grain (elements)

// dt/2 and sqrt(dt) for each batch row: constant, or from a float/double tensor.
template <typename acc>
struct StepCoeffs {
  acc c1 = 0, c2 = 0;          // scalar step
  const float* f32 = nullptr;  // per-row steps (one of f32/f64, or neither)
  const double* f64 = nullptr;
  int64_t batch_row_len = 1;   // elements per batch row

  bool per_row() const { return f32 != nullptr || f64 != nullptr; }
  void at_row(int64_t b, acc* a1, acc* a2) const {
    const acc dt = f32 != nullptr ? static_cast<acc>(f32[b]) : static_cast<acc>(f64[b]);
    *a1 = static_cast<acc>(0.5) * dt;
    *a2 = std::sqrt(dt);
  }
};

// out[i] = x[i] + c1(row)·s[i] + c2(row)·z[i - begin] for i in [begin, end).
template <typename scalar_t, typename acc, typename z_t>
inline void update_range(scalar_t* __restrict__ out, const scalar_t* __restrict__ x, const scalar_t* __restrict__ s,
                         const z_t* __restrict__ z, int64_t begin, int64_t end, const StepCoeffs<acc>& st) {
  int64_t i = begin;
  while (i < end) {
    acc c1 = st.c1, c2 = st.c2;
    int64_t seg_end = end;
    if (st.per_row()) {
      const int64_t b = i / st.batch_row_len;
      seg_end = std::min(end, (b + 1) * st.batch_row_len);
      st.at_row(b, &c1, &c2);
    }
    const z_t* zz = z + (i - begin);
    const int64_t n = seg_end - i;
    scalar_t* o = out + i;
    const scalar_t* xx = x + i;
    const scalar_t* ss = s + i;
    for (int64_t k = 0; k < n; ++k) {
      o[k] = static_cast<scalar_t>(static_cast<acc>(xx[k]) + c1 * static_cast<acc>(ss[k]) +
                                   c2 * static_cast<acc>(zz[k]));
    }
    i = seg_end;
  }
}

template <typename scalar_t>
void langevin_cpu_kernel(const at::Tensor& x, const at::Tensor& score, const std::optional<at::Tensor>& step_sizes,
                         double step_size, const std::optional<at::Tensor>& noise, int64_t seed, int64_t stream,
                         const std::optional<at::Tensor>& row_seeds, at::Tensor& out) {
  using acc = acc_t<scalar_t>;
  const int64_t numel = x.numel();
  const int64_t batch = x.dim() > 0 ? x.size(0) : 1;
  StepCoeffs<acc> st;
  st.batch_row_len = numel / batch;
  if (step_sizes.has_value()) {
    if (step_sizes->scalar_type() == at::kFloat) {
      st.f32 = step_sizes->data_ptr<float>();
    } else {
      st.f64 = step_sizes->data_ptr<double>();
    }
  } else {
    st.c1 = static_cast<acc>(0.5 * step_size);
    st.c2 = static_cast<acc>(std::sqrt(step_size));
  }
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const scalar_t* sp = score.data_ptr<scalar_t>();
  scalar_t* op = out.data_ptr<scalar_t>();

  if (noise.has_value()) {
    const scalar_t* np = noise->data_ptr<scalar_t>();
    at::parallel_for(0, numel, kGrainElements, [&](int64_t begin, int64_t end) {
      update_range(op, xp, sp, np + begin, begin, end, st);
    });
    return;
  }

  const bool per_row_seed = row_seeds.has_value();
  const NoiseLayout layout = make_noise_layout(numel, batch, per_row_seed);
  const int64_t* seeds = per_row_seed ? row_seeds->data_ptr<int64_t>() : nullptr;
  at::parallel_for(0, layout.work_items(), kGrainElements / kGroup, [&](int64_t wb, int64_t we) {
    alignas(64) float zbuf[kNoiseTileGroups * kGroup];
    int64_t w = wb;
    while (w < we) {
      const int64_t r = w / layout.groups_per_row;
      const int64_t g0 = w - r * layout.groups_per_row;
      const int64_t g1 = std::min({g0 + kNoiseTileGroups, layout.groups_per_row, g0 + (we - w)});
      const uint64_t key = static_cast<uint64_t>(per_row_seed ? seeds[r] : seed);
      fill_normals(key, static_cast<uint64_t>(stream), static_cast<uint64_t>(g0), std::min(g1 * kGroup, layout.row_len) - g0 * kGroup, zbuf);
      const int64_t e0 = r * layout.row_len + g0 * kGroup;
      const int64_t e1 = r * layout.row_len + std::min(g1 * kGroup, layout.row_len);
      update_range(op, xp, sp, zbuf, e0, e1, st);
      w += g1 - g0;
    }
  });
}

at::Tensor langevin_step_cpu(const at::Tensor& x, const at::Tensor& score, const std::optional<at::Tensor>& step_sizes,
                             double step_size, const std::optional<at::Tensor>& noise, int64_t seed, int64_t stream,
                             const std::optional<at::Tensor>& row_seeds) {
  const LangevinArgs args = check_langevin_step_args(x, score, step_sizes, step_size, noise, row_seeds, c10::kCPU);
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "langevin_step_cpu", [&] {
    langevin_cpu_kernel<scalar_t>(args.x, args.score, args.step_sizes, step_size, args.noise, seed, stream,
                                  args.row_seeds, out);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(pygen, CPU, m) { m.impl("langevin_step", &langevin_step_cpu); }

}  // namespace pygen::cpu
