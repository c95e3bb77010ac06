// csrc/cuda/langevin.cu — CUDA kernels of torch.ops.pygen.langevin_step (pygen.langevin_step)
// and torch.ops.pygen.langevin_snr_step (score_sde's SNR Langevin corrector,
// pygen.ops.langevin.langevin_snr_step).
//
// x_next = x + (dt/2)·score + sqrt(dt)·z, dt = step_sizes[row] or the scalar
// step_size, z = the given noise or exactly pygen.randn(x.shape, seed, stream)
// (stream + stream_offset[0], read by the kernel, when a device offset is given)
// (csrc/include/pygen/philox.h: one thread per Philox group -> four normals ->
// four consecutive elements; flat numbering for an int seed, within each batch
// row for per-row seeds). Arithmetic in fp32 (fp64 for fp64 storage).
// When every pointer is 4-element aligned and groups never straddle a noise
// row, each thread moves its four elements with one vector load/store.
//
// langevin_snr_step: three launches on the current stream, no host sync, no
// atomics (bit-reproducible): (1) per-(batch row, window) partial sums of
// score² and z² (a block per window of kSnrWindow elements with a fixed
// shuffle/shared-memory tree; a thread per row for rows of <= kSnrSmallRow
// elements), z regenerated from Philox and never stored; (2) per-row norms
// from the partials in window order, batch means (one block, fp64 sums in a
// fixed tree) when batch_norm, dt = four_alpha_snr2·(n/g)² into `step`;
// (3) the langevin_step kernel with per-row steps `step`.
// With a device step index i (k_table, step_index given: a CUDA-graph loop), the
// step constant is four_alpha_snr2·k_table[i] and the noise stream stream + i,
// both read on the device; a fourth launch then stores i + 1.
#include <limits>
#include <optional>
#include <type_traits>

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
  const int64_t* stream_offset = nullptr;  // device step index added to stream (langevin_snr_step), or none
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
    const uint64_t stream = p.stream + (p.stream_offset != nullptr ? static_cast<uint64_t>(*p.stream_offset) : 0);
    const Normals4 nz = philox_normals(noise_key(p.row_seeds, p.seed, r), stream, static_cast<uint64_t>(ng.group));
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
                              const std::optional<at::Tensor>& row_seeds,
                              const std::optional<at::Tensor>& stream_offset) {
  const LangevinArgs args = check_langevin_step_args(x, score, step_sizes, step_size, noise, row_seeds, c10::kCUDA);
  check_stream_offset(stream_offset, x, "x", c10::kCUDA);
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
    p.stream_offset = stream_offset.has_value() ? stream_offset->data_ptr<int64_t>() : nullptr;
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


// ---------------------------------------------------------------------------
// langevin_snr_step
// ---------------------------------------------------------------------------
constexpr int kSnrGroupsPerThread = 4;
constexpr int64_t kSnrWindow = static_cast<int64_t>(kThreads) * kSnrGroupsPerThread * kGroup;  // elements
constexpr int64_t kSnrSmallRow = 64;  // rows this short: one thread per row

// Adds score² and z² of the elements of Philox group g (noise indices 4g..4g+3)
// that lie in batch row b (noise index of its element 0: nb).
template <typename scalar_t, bool kHasNoise>
__device__ __forceinline__ void add_group_squares(const scalar_t* __restrict__ score, const scalar_t* __restrict__ noise,
                                                  uint64_t key, uint64_t stream, int64_t g, int64_t b, int64_t nb,
                                                  int64_t row_len, acc_t<scalar_t>* gs, acc_t<scalar_t>* ns) {
  using acc = acc_t<scalar_t>;
  const int64_t local0 = g * kGroup - nb;
  if (local0 + kGroup <= 0 || local0 >= row_len) return;
  Normals4 nz;
  if constexpr (!kHasNoise) nz = philox_normals(key, stream, static_cast<uint64_t>(g));
#pragma unroll
  for (int j = 0; j < kGroup; ++j) {
    const int64_t local = local0 + j;
    if (local >= 0 && local < row_len) {
      const int64_t idx = b * row_len + local;
      const acc sv = static_cast<acc>(score[idx]);
      acc zv;
      if constexpr (kHasNoise) {
        zv = static_cast<acc>(noise[idx]);
      } else {
        zv = static_cast<acc>(nz.z[j]);
      }
      *gs += sv * sv;
      *ns += zv * zv;
    }
  }
}

// One block per (batch row b, window w): part[2·item], part[2·item + 1] = Σ score², Σ z²
// over the Philox groups nb/4 + w·(kThreads·kSnrGroupsPerThread) + [0, kThreads·kSnrGroupsPerThread).
template <typename scalar_t, bool kHasNoise>
__global__ void snr_window_kernel(const scalar_t* __restrict__ score, const scalar_t* __restrict__ noise,
                                  const int64_t* __restrict__ row_seeds, uint64_t seed, uint64_t stream,
                                  const int64_t* __restrict__ index, int64_t row_len, int64_t windows,
                                  acc_t<scalar_t>* __restrict__ part) {
  using acc = acc_t<scalar_t>;
  __shared__ acc shm[kThreads / 32];
  stream += index != nullptr ? static_cast<uint64_t>(*index) : 0;
  const int64_t item = blockIdx.x;
  const int64_t b = item / windows;
  const int64_t w = item - b * windows;
  const int64_t nb = row_seeds != nullptr ? 0 : b * row_len;
  const uint64_t key = noise_key(row_seeds, seed, b);
  const int64_t g0 = nb / kGroup + w * (static_cast<int64_t>(kThreads) * kSnrGroupsPerThread);
  acc gs = 0, ns = 0;
#pragma unroll
  for (int k = 0; k < kSnrGroupsPerThread; ++k) {
    add_group_squares<scalar_t, kHasNoise>(score, noise, key, stream, g0 + k * kThreads + threadIdx.x, b, nb,
                                           row_len, &gs, &ns);
  }
  gs = block_sum_to_thread0(gs, shm);
  ns = block_sum_to_thread0(ns, shm);
  if (threadIdx.x == 0) {
    part[2 * item] = gs;
    part[2 * item + 1] = ns;
  }
}

// Short rows: one thread per batch row (one partial pair per row).
template <typename scalar_t, bool kHasNoise>
__global__ void snr_small_rows_kernel(const scalar_t* __restrict__ score, const scalar_t* __restrict__ noise,
                                      const int64_t* __restrict__ row_seeds, uint64_t seed, uint64_t stream,
                                      const int64_t* __restrict__ index, int64_t batch, int64_t row_len,
                                      acc_t<scalar_t>* __restrict__ part) {
  using acc = acc_t<scalar_t>;
  const int64_t b = global_thread_index();
  if (b >= batch) return;
  stream += index != nullptr ? static_cast<uint64_t>(*index) : 0;
  const int64_t nb = row_seeds != nullptr ? 0 : b * row_len;
  const uint64_t key = noise_key(row_seeds, seed, b);
  acc gs = 0, ns = 0;
  for (int64_t g = nb / kGroup; g * kGroup < nb + row_len; ++g) {
    add_group_squares<scalar_t, kHasNoise>(score, noise, key, stream, g, b, nb, row_len, &gs, &ns);
  }
  part[2 * b] = gs;
  part[2 * b + 1] = ns;
}

template <typename acc>
__device__ __forceinline__ void snr_row_norms(const acc* __restrict__ part, int64_t b, int64_t windows, acc* g,
                                              acc* n) {
  acc g2 = 0, n2 = 0;
  for (int64_t w = 0; w < windows; ++w) {
    g2 += part[2 * (b * windows + w)];
    n2 += part[2 * (b * windows + w) + 1];
  }
  *g = sqrt(g2);
  *n = sqrt(n2);
}

// The step constant: k, times k_table[*index] when a device step index is given (NaN for an
// index outside [0, k_len): the step and the sample show it, nothing is read out of bounds).
struct SnrK {
  const void* table;  // acc-typed (k_len,) table, or null
  int64_t k_len;
  const int64_t* index;
};

template <typename acc>
__device__ __forceinline__ acc snr_k(acc k, const SnrK& t) {
  if (t.table == nullptr) return k;
  const int64_t i = *t.index;
  return i >= 0 && i < t.k_len ? k * static_cast<const acc*>(t.table)[i] : std::numeric_limits<acc>::quiet_NaN();
}

// Per-row norms: dt_b = k·(n_b/g_b)².
template <typename acc>
__global__ void snr_rows_finalize_kernel(const acc* __restrict__ part, int64_t batch, int64_t windows, acc k,
                                         SnrK kt, acc* __restrict__ step) {
  const int64_t b = global_thread_index();
  if (b >= batch) return;
  k = snr_k(k, kt);
  acc g, n;
  snr_row_norms(part, b, windows, &g, &n);
  const acc r = n / g;
  step[b] = k * (r * r);
}

// Batch-mean norms (one block): dt = k·(mean n / mean g)² for every row.
template <typename acc>
__global__ void snr_batch_finalize_kernel(const acc* __restrict__ part, int64_t batch, int64_t windows, acc k,
                                          SnrK kt, acc* __restrict__ step) {
  __shared__ double shm[kThreads / 32];
  __shared__ acc dt_shared;
  double gs = 0, ns = 0;
  for (int64_t b = threadIdx.x; b < batch; b += kThreads) {
    acc g, n;
    snr_row_norms(part, b, windows, &g, &n);
    gs += static_cast<double>(g);
    ns += static_cast<double>(n);
  }
  gs = block_sum_to_thread0(gs, shm);
  ns = block_sum_to_thread0(ns, shm);
  if (threadIdx.x == 0) {
    const acc r = static_cast<acc>(ns / static_cast<double>(batch)) / static_cast<acc>(gs / static_cast<double>(batch));
    dt_shared = snr_k(k, kt) * (r * r);
  }
  __syncthreads();
  const acc dt = dt_shared;
  for (int64_t b = threadIdx.x; b < batch; b += kThreads) step[b] = dt;
}

template <typename scalar_t, bool kHasNoise>
void snr_launch(const at::Tensor& x, const at::Tensor& score, const scalar_t* np, at::Tensor& out, at::Tensor& step,
                const int64_t* seeds, uint64_t seed, uint64_t stream, int64_t batch, int64_t row_len,
                double four_alpha_snr2, bool batch_norm, const SnrK& kt, cudaStream_t cs) {
  using acc = acc_t<scalar_t>;
  const bool small = row_len <= kSnrSmallRow;
  const int64_t windows = small ? 1 : (row_len + kGroup - 1 + kSnrWindow - 1) / kSnrWindow;  // start may be mid-group
  const int64_t items = batch * windows;
  TORCH_CHECK(small || items <= static_cast<int64_t>(std::numeric_limits<int>::max()),
              "pygen: langevin_snr_step: too many reduction blocks (", items, ")");
  at::Tensor part = at::empty({items * 2}, step.options());
  acc* pp = part.data_ptr<acc>();
  const scalar_t* sp = score.data_ptr<scalar_t>();
  if (small) {
    snr_small_rows_kernel<scalar_t, kHasNoise><<<blocks_for(batch), kThreads, 0, cs>>>(sp, np, seeds, seed, stream,
                                                                                       kt.index, batch, row_len, pp);
  } else {
    snr_window_kernel<scalar_t, kHasNoise><<<static_cast<unsigned int>(items), kThreads, 0, cs>>>(
        sp, np, seeds, seed, stream, kt.index, row_len, windows, pp);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const acc k = static_cast<acc>(four_alpha_snr2);
  acc* stp = step.data_ptr<acc>();
  if (batch_norm) {
    snr_batch_finalize_kernel<acc><<<1, kThreads, 0, cs>>>(pp, batch, windows, k, kt, stp);
  } else {
    snr_rows_finalize_kernel<acc><<<blocks_for(batch), kThreads, 0, cs>>>(pp, batch, windows, k, kt, stp);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  LangevinParams<acc> p;
  p.layout = make_noise_layout(x.numel(), batch, seeds != nullptr);
  p.batch_row_len = row_len;
  p.c1 = acc(0);
  p.c2 = acc(0);
  p.steps_f32 = std::is_same_v<acc, float> ? reinterpret_cast<const float*>(stp) : nullptr;
  p.steps_f64 = std::is_same_v<acc, double> ? reinterpret_cast<const double*>(stp) : nullptr;
  p.row_seeds = seeds;
  p.seed = seed;
  p.stream = stream;
  p.stream_offset = kt.index;
  launch<scalar_t, kHasNoise, true>(x, score, np, out, p, cs);
}

__global__ void advance_index_kernel(int64_t* index) { *index += 1; }

// step_index += 1 after the step's three launches (they all read it first, in stream order).
void advance_index(const at::Tensor& step_index, cudaStream_t cs) {
  advance_index_kernel<<<1, 1, 0, cs>>>(step_index.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void langevin_snr_step_cuda(const at::Tensor& x, const at::Tensor& score, const std::optional<at::Tensor>& noise,
                            at::Tensor& out, at::Tensor& step, int64_t seed, int64_t stream,
                            const std::optional<at::Tensor>& row_seeds, double four_alpha_snr2, bool batch_norm,
                            const std::optional<at::Tensor>& k_table, const std::optional<at::Tensor>& step_index) {
  check_langevin_snr_args(x, score, noise, out, step, row_seeds, k_table, step_index, c10::kCUDA);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t batch = x.size(0);
  const int64_t numel = x.numel();
  cudaStream_t cs = c10::cuda::getCurrentCUDAStream();
  if (numel == 0) {
    step.fill_(std::numeric_limits<double>::quiet_NaN());  // 0/0: the formula's value for empty rows
    if (step_index.has_value()) advance_index(*step_index, cs);
    return;
  }
  const int64_t row_len = numel / batch;
  const int64_t* seeds = !noise.has_value() && row_seeds.has_value() ? row_seeds->data_ptr<int64_t>() : nullptr;
  const SnrK kt{k_table.has_value() ? k_table->data_ptr() : nullptr, k_table.has_value() ? k_table->size(0) : 0,
                step_index.has_value() ? step_index->data_ptr<int64_t>() : nullptr};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "langevin_snr_step_cuda", [&] {
    if (noise.has_value()) {
      snr_launch<scalar_t, true>(x, score, noise->data_ptr<scalar_t>(), out, step, nullptr, static_cast<uint64_t>(seed),
                                 static_cast<uint64_t>(stream), batch, row_len, four_alpha_snr2, batch_norm, kt, cs);
    } else {
      snr_launch<scalar_t, false>(x, score, nullptr, out, step, seeds, static_cast<uint64_t>(seed),
                                  static_cast<uint64_t>(stream), batch, row_len, four_alpha_snr2, batch_norm, kt, cs);
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (step_index.has_value()) advance_index(*step_index, cs);
}

}  // namespace

TORCH_LIBRARY_IMPL(pygen, CUDA, m) {
  m.impl("langevin_step", &langevin_step_cuda);
  m.impl("langevin_snr_step", &langevin_snr_step_cuda);
}

}  // namespace pygen::cuda
