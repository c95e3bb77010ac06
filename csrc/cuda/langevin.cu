// csrc/cuda/langevin.cu — CUDA kernel of torch.ops.pygen.langevin_step (pygen.langevin_step).
//
// x_next = x + (dt/2)·score + sqrt(dt)·z, dt = step_sizes[row] or the scalar
// step_size, z = the given noise or exactly pygen.randn(x.shape, seed, stream)
// (csrc/include/pygen/philox.h: one thread per Philox group -> four normals ->
// four consecutive elements; flat numbering for an int seed, within each batch
// row for per-row seeds). Arithmetic in fp32 (fp64 for fp64 storage).
// When every pointer is 4-element aligned and groups never straddle a noise
// row, each thread moves its four elements with one vector load/store.
#include <optional>

#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "cuda_common.cuh"

namespace pygen::cuda {
namespace {

template <typename scalar_t>
struct alignas(sizeof(scalar_t) * kGroup) Pack4 {
  scalar_t v[kGroup];
};

template <typename acc>
struct LangevinParams {
  NoiseLayout layout;       // noise rows: the whole tensor, or batch rows for per-row seeds
  int64_t batch_row_len;    // elements per batch row (step-size lookup)
  acc c1, c2;               // dt/2, sqrt(dt) for a scalar step
  const float* steps_f32;   // per-row steps (one of these, or neither)
  const double* steps_f64;
  const int64_t* row_seeds; // per-row seeds (in-kernel noise only)
  uint64_t seed, stream;
};

template <typename acc>
__device__ __forceinline__ void row_coeffs(const LangevinParams<acc>& p, int64_t b, acc* c1, acc* c2) {
  const acc dt = p.steps_f32 != nullptr ? static_cast<acc>(p.steps_f32[b]) : static_cast<acc>(p.steps_f64[b]);
  *c1 = static_cast<acc>(0.5) * dt;
  *c2 = sqrt(dt);  // NaN for a negative step: the result shows it
}

template <typename scalar_t, bool kHasNoise, bool kPerRowStep, bool kVec>
__global__ void langevin_step_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ score,
                                     const scalar_t* __restrict__ noise, scalar_t* __restrict__ out,
                                     LangevinParams<acc_t<scalar_t>> p) {
  using acc = acc_t<scalar_t>;
  const int64_t w = global_thread_index();
  if (w >= p.layout.work_items()) return;
  const NoiseGroup ng = noise_group(p.layout, w);
  const int64_t r = ng.row;
  const int64_t base = ng.first;
  const int n = ng.count;

  scalar_t xv[kGroup], sv[kGroup], nv[kGroup];
  if (kVec && n == kGroup) {
    const Pack4<scalar_t> xp = *reinterpret_cast<const Pack4<scalar_t>*>(x + base);
    const Pack4<scalar_t> sp = *reinterpret_cast<const Pack4<scalar_t>*>(score + base);
#pragma unroll
    for (int j = 0; j < kGroup; ++j) {
      xv[j] = xp.v[j];
      sv[j] = sp.v[j];
    }
    if constexpr (kHasNoise) {
      const Pack4<scalar_t> np = *reinterpret_cast<const Pack4<scalar_t>*>(noise + base);
#pragma unroll
      for (int j = 0; j < kGroup; ++j) nv[j] = np.v[j];
    }
  } else {
#pragma unroll
    for (int j = 0; j < kGroup; ++j) {
      const bool in = j < n;
      xv[j] = in ? x[base + j] : scalar_t(0);
      sv[j] = in ? score[base + j] : scalar_t(0);
      if constexpr (kHasNoise) nv[j] = in ? noise[base + j] : scalar_t(0);
    }
  }

  acc z[kGroup];
  if constexpr (kHasNoise) {
#pragma unroll
    for (int j = 0; j < kGroup; ++j) z[j] = static_cast<acc>(nv[j]);
  } else {
    const Normals4 nz = philox_normals(noise_key(p.row_seeds, p.seed, r), p.stream, static_cast<uint64_t>(ng.group));
#pragma unroll
    for (int j = 0; j < kGroup; ++j) z[j] = static_cast<acc>(nz.z[j]);
  }

  acc c1[kGroup], c2[kGroup];
  if constexpr (kPerRowStep) {
    if (p.row_seeds != nullptr && !kHasNoise) {
      // noise row == batch row
      acc a, b;
      row_coeffs(p, r, &a, &b);
#pragma unroll
      for (int j = 0; j < kGroup; ++j) {
        c1[j] = a;
        c2[j] = b;
      }
    } else {
      // flat numbering: a group may straddle batch rows; walk them without divisions per element
      int64_t b = base / p.batch_row_len;
      int64_t rem = base - b * p.batch_row_len;
      acc a, s;
      row_coeffs(p, b, &a, &s);
#pragma unroll
      for (int j = 0; j < kGroup; ++j) {
        if (j < n && rem == p.batch_row_len) {  // next batch row starts inside this group
          rem = 0;
          ++b;
          row_coeffs(p, b, &a, &s);
        }
        c1[j] = a;
        c2[j] = s;
        ++rem;
      }
    }
  } else {
#pragma unroll
    for (int j = 0; j < kGroup; ++j) {
      c1[j] = p.c1;
      c2[j] = p.c2;
    }
  }

  scalar_t ov[kGroup];
#pragma unroll
  for (int j = 0; j < kGroup; ++j) {
    ov[j] = static_cast<scalar_t>(static_cast<acc>(xv[j]) + c1[j] * static_cast<acc>(sv[j]) + c2[j] * z[j]);
  }
  if (kVec && n == kGroup) {
    Pack4<scalar_t> op;
#pragma unroll
    for (int j = 0; j < kGroup; ++j) op.v[j] = ov[j];
    *reinterpret_cast<Pack4<scalar_t>*>(out + base) = op;
  } else {
#pragma unroll
    for (int j = 0; j < kGroup; ++j) {
      if (j < n) out[base + j] = ov[j];
    }
  }
}

inline bool aligned_for_pack(const void* ptr, int64_t bytes) {
  return ptr == nullptr || reinterpret_cast<uintptr_t>(ptr) % static_cast<uintptr_t>(bytes) == 0;
}

template <typename scalar_t, bool kHasNoise, bool kPerRowStep>
void launch(const at::Tensor& x, const at::Tensor& score, const scalar_t* noise, at::Tensor& out,
            const LangevinParams<acc_t<scalar_t>>& p, cudaStream_t stream) {
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const scalar_t* sp = score.data_ptr<scalar_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  const int64_t pack = static_cast<int64_t>(sizeof(scalar_t)) * kGroup;
  const bool vec = (p.layout.rows == 1 || p.layout.row_len % kGroup == 0) && aligned_for_pack(xp, pack) &&
                   aligned_for_pack(sp, pack) && aligned_for_pack(noise, pack) && aligned_for_pack(op, pack);
  const unsigned int blocks = blocks_for(p.layout.work_items());
  if (vec) {
    langevin_step_kernel<scalar_t, kHasNoise, kPerRowStep, true><<<blocks, kThreads, 0, stream>>>(xp, sp, noise, op, p);
  } else {
    langevin_step_kernel<scalar_t, kHasNoise, kPerRowStep, false><<<blocks, kThreads, 0, stream>>>(xp, sp, noise, op, p);
  }
}

at::Tensor langevin_step_cuda(const at::Tensor& x, const at::Tensor& score, const std::optional<at::Tensor>& step_sizes,
                              double step_size, const std::optional<at::Tensor>& noise, int64_t seed, int64_t stream,
                              const std::optional<at::Tensor>& row_seeds) {
  const LangevinArgs args = check_langevin_step_args(x, score, step_sizes, step_size, noise, row_seeds, c10::kCUDA);
  const c10::cuda::CUDAGuard guard(x.device());
  // args.* are contiguous: contiguous() in the checks is free (no copy) for the
  // contiguous tensors the public API passes.
  const std::optional<at::Tensor>& stc = args.step_sizes;
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t numel = out.numel();
  if (numel == 0) return out;

  const bool per_row_seed = args.row_seeds.has_value();  // only set when the noise is drawn
  auto cuda_stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "langevin_step_cuda", [&] {
    using acc = acc_t<scalar_t>;
    LangevinParams<acc> p;
    p.layout = make_noise_layout(numel, args.batch, per_row_seed);
    p.batch_row_len = numel / args.batch;
    p.c1 = static_cast<acc>(0.5 * step_size);
    p.c2 = static_cast<acc>(step_sizes.has_value() ? 0.0 : std::sqrt(step_size));
    p.steps_f32 = stc.has_value() && stc->scalar_type() == at::kFloat ? stc->data_ptr<float>() : nullptr;
    p.steps_f64 = stc.has_value() && stc->scalar_type() == at::kDouble ? stc->data_ptr<double>() : nullptr;
    p.row_seeds = per_row_seed ? args.row_seeds->data_ptr<int64_t>() : nullptr;
    p.seed = static_cast<uint64_t>(seed);
    p.stream = static_cast<uint64_t>(stream);
    const scalar_t* np = args.noise.has_value() ? args.noise->data_ptr<scalar_t>() : nullptr;
    if (args.noise.has_value()) {
      if (stc.has_value()) {
        launch<scalar_t, true, true>(args.x, args.score, np, out, p, cuda_stream);
      } else {
        launch<scalar_t, true, false>(args.x, args.score, np, out, p, cuda_stream);
      }
    } else {
      if (stc.has_value()) {
        launch<scalar_t, false, true>(args.x, args.score, np, out, p, cuda_stream);
      } else {
        launch<scalar_t, false, false>(args.x, args.score, np, out, p, cuda_stream);
      }
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(pygen, CUDA, m) { m.impl("langevin_step", &langevin_step_cuda); }

}  // namespace pygen::cuda
