// csrc/cpu/langevin.cpp — C++ CPU kernels of torch.ops.pygen.langevin_step (pygen.langevin_step)
// and torch.ops.pygen.langevin_snr_step (score_sde's SNR Langevin corrector,
// pygen.ops.langevin.langevin_snr_step).
//
// x_next = x + (dt/2)·score + sqrt(dt)·z, dt = step_sizes[row] or the scalar
// step_size, z = the given noise or exactly pygen.randn(x.shape, seed, stream)
// (csrc/include/pygen/philox.h; flat numbering for an int seed, within each
// batch row for per-row seeds). Arithmetic in fp32 (fp64 for fp64 storage).
//
// In-kernel noise is made a tile of Philox groups at a time into a small
// stack buffer and consumed by the same fused update loop as given noise, so
// every element is read and written once.
//
// langevin_snr_step: g_r = ||score_r||, n_r = ||z_r|| per batch row (batch
// means when batch_norm), dt_r = four_alpha_snr2·(n_r/g_r)² into `step`, then
// the langevin_step update with per-row steps dt_r. The reduction runs over
// fixed work items (a batch row's chunks of kSnrChunk elements) with lanes
// chosen by the position in the item, so the sums do not depend on the thread
// count or split (bit-reproducible); z is regenerated from Philox in both
// passes, never stored.
#include <algorithm>
#include <cmath>
#include <limits>
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
                             const std::optional<at::Tensor>& row_seeds,
                             const std::optional<at::Tensor>& stream_offset) {
  const LangevinArgs args = check_langevin_step_args(x, score, step_sizes, step_size, noise, row_seeds, c10::kCPU);
  check_stream_offset(stream_offset, x, "x", c10::kCPU);
  stream = static_cast<int64_t>(cpu_offset_stream(stream, stream_offset));
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "langevin_step_cpu", [&] {
    langevin_cpu_kernel<scalar_t>(args.x, args.score, args.step_sizes, step_size, args.noise, seed, stream,
                                  args.row_seeds, out);
  });
  return out;
}


// ---------------------------------------------------------------------------
// langevin_snr_step
// ---------------------------------------------------------------------------
constexpr int64_t kSnrChunk = 4096;  // elements per reduction work item (a multiple of 4)
constexpr int kLanes = 8;            // accumulators per work item


// Add s[k]² and z[k]² (k < n) to the lanes of positions pos + k (lane = position mod kLanes).
template <typename scalar_t, typename acc, typename z_t>
inline void accumulate_squares(const scalar_t* __restrict__ s, const z_t* __restrict__ z, int64_t pos, int64_t n,
                               acc* __restrict__ gl, acc* __restrict__ nl) {
  int64_t k = 0;
  for (; k < n && ((pos + k) % kLanes) != 0; ++k) {
    const acc sv = static_cast<acc>(s[k]), zv = static_cast<acc>(z[k]);
    gl[(pos + k) % kLanes] += sv * sv;
    nl[(pos + k) % kLanes] += zv * zv;
  }
  acc g[kLanes], q[kLanes];
  for (int j = 0; j < kLanes; ++j) {
    g[j] = gl[j];
    q[j] = nl[j];
  }
  for (; k + kLanes <= n; k += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      const acc sv = static_cast<acc>(s[k + j]), zv = static_cast<acc>(z[k + j]);
      g[j] += sv * sv;
      q[j] += zv * zv;
    }
  }
  for (int j = 0; j < kLanes; ++j) {
    gl[j] = g[j];
    nl[j] = q[j];
  }
  for (; k < n; ++k) {  // pos + k is a multiple of kLanes here plus k's offset
    const acc sv = static_cast<acc>(s[k]), zv = static_cast<acc>(z[k]);
    gl[(pos + k) % kLanes] += sv * sv;
    nl[(pos + k) % kLanes] += zv * zv;
  }
}

template <typename acc>
inline acc sum_lanes(const acc* l) {
  return ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]));
}

// part[2·item] = Σ score², part[2·item + 1] = Σ z² over work item `item`
// (batch row item / chunks_per_row, its chunk item % chunks_per_row).
template <typename scalar_t>
void snr_partials(const scalar_t* sp, const scalar_t* np, const int64_t* seeds, uint64_t seed, uint64_t stream,
                  int64_t batch, int64_t row_len, acc_t<scalar_t>* part) {
  using acc = acc_t<scalar_t>;
  const int64_t cpr = (row_len + kSnrChunk - 1) / kSnrChunk;  // chunks per row
  const int64_t items = batch * cpr;
  const auto item_begin = [&](int64_t it) { return (it / cpr) * row_len + (it % cpr) * kSnrChunk; };
  const auto item_end = [&](int64_t it) {
    const int64_t b = it / cpr;
    return b * row_len + std::min(row_len, (it % cpr + 1) * kSnrChunk);
  };
  const int64_t grain = std::max<int64_t>(1, kGrainElements / std::min(row_len, kSnrChunk));
  at::parallel_for(0, items, grain, [&](int64_t wb, int64_t we) {
    alignas(64) float zbuf[kNoiseChunk + kGroup];
    acc gl[kLanes] = {}, nl[kLanes] = {};
    int64_t item = wb, end_of_item = item_end(wb), pos = 0;
    int64_t e = item_begin(wb);
    const int64_t e_last = item_end(we - 1);
    while (e < e_last) {
      int64_t t1 = std::min(e + kNoiseChunk, e_last);
      const scalar_t* zt = nullptr;
      const float* zf = nullptr;
      if (np != nullptr) {
        zt = np + e;
      } else {
        const int64_t b = e / row_len;
        uint64_t key = seed;
        int64_t n0 = e;  // noise index of element e
        if (seeds != nullptr) {
          key = static_cast<uint64_t>(seeds[b]);
          n0 = e - b * row_len;
          t1 = std::min(t1, (b + 1) * row_len);  // a noise row is a batch row
        }
        const int64_t skip = n0 % kGroup;
        fill_normals(key, stream, static_cast<uint64_t>(n0 / kGroup), skip + (t1 - e), zbuf);
        zf = zbuf + skip;
      }
      int64_t e2 = e;
      while (e2 < t1) {
        const int64_t seg_end = std::min(t1, end_of_item);
        if (zt != nullptr) {
          accumulate_squares(sp + e2, zt + (e2 - e), pos, seg_end - e2, gl, nl);
        } else {
          accumulate_squares(sp + e2, zf + (e2 - e), pos, seg_end - e2, gl, nl);
        }
        pos += seg_end - e2;
        e2 = seg_end;
        if (e2 == end_of_item) {
          part[2 * item] = sum_lanes(gl);
          part[2 * item + 1] = sum_lanes(nl);
          for (int j = 0; j < kLanes; ++j) gl[j] = nl[j] = acc(0);
          pos = 0;
          ++item;
          if (item < we) end_of_item = item_end(item);
        }
      }
      e = t1;
    }
  });
}

// dt per row from the partial sums (chunks added in order; batch means summed in fp64).
template <typename acc>
void snr_steps(const acc* part, int64_t batch, int64_t cpr, double four_alpha_snr2, bool batch_norm, acc* step) {
  const acc k = static_cast<acc>(four_alpha_snr2);
  const auto row_norms = [&](int64_t b, acc* g, acc* n) {
    acc g2 = 0, n2 = 0;
    for (int64_t c = 0; c < cpr; ++c) {
      g2 += part[2 * (b * cpr + c)];
      n2 += part[2 * (b * cpr + c) + 1];
    }
    *g = std::sqrt(g2);
    *n = std::sqrt(n2);
  };
  if (batch_norm) {
    double gs = 0, ns = 0;
    for (int64_t b = 0; b < batch; ++b) {
      acc g, n;
      row_norms(b, &g, &n);
      gs += static_cast<double>(g);
      ns += static_cast<double>(n);
    }
    const acc r = static_cast<acc>(ns / static_cast<double>(batch)) / static_cast<acc>(gs / static_cast<double>(batch));
    const acc dt = k * (r * r);
    for (int64_t b = 0; b < batch; ++b) step[b] = dt;
    return;
  }
  at::parallel_for(0, batch, 4096, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      acc g, n;
      row_norms(b, &g, &n);
      const acc r = n / g;
      step[b] = k * (r * r);
    }
  });
}

void langevin_snr_step_cpu(const at::Tensor& x, const at::Tensor& score, const std::optional<at::Tensor>& noise,
                           at::Tensor& out, at::Tensor& step, int64_t seed, int64_t stream,
                           const std::optional<at::Tensor>& row_seeds, double four_alpha_snr2, bool batch_norm,
                           const std::optional<at::Tensor>& k_table, const std::optional<at::Tensor>& step_index) {
  check_langevin_snr_args(x, score, noise, out, step, row_seeds, k_table, step_index, c10::kCPU);
  const int64_t batch = x.size(0);
  const int64_t numel = x.numel();
  if (step_index.has_value()) {  // a device step index i: k·k_table[i] (NaN outside the table), stream + i
    int64_t* index = step_index->data_ptr<int64_t>();
    const int64_t i = *index;
    const int64_t k_len = k_table->size(0);
    const double entry = i < 0 || i >= k_len ? std::numeric_limits<double>::quiet_NaN()
                         : k_table->scalar_type() == at::kDouble ? k_table->data_ptr<double>()[i]
                                                                  : static_cast<double>(k_table->data_ptr<float>()[i]);
    // (in the accumulation dtype, as the CUDA and Triton kernels form it)
    four_alpha_snr2 = x.scalar_type() == at::kDouble ? four_alpha_snr2 * entry
                                                      : static_cast<double>(static_cast<float>(four_alpha_snr2) *
                                                                            static_cast<float>(entry));
    stream = static_cast<int64_t>(static_cast<uint64_t>(stream) + static_cast<uint64_t>(i));
    *index = i + 1;
  }
  if (numel == 0) {
    step.fill_(std::numeric_limits<double>::quiet_NaN());  // 0/0: the formula's value for empty rows
    return;
  }
  const int64_t row_len = numel / batch;
  const int64_t cpr = (row_len + kSnrChunk - 1) / kSnrChunk;
  const std::optional<at::Tensor> seeds = noise.has_value() ? std::nullopt : row_seeds;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "langevin_snr_step_cpu", [&] {
    using acc = acc_t<scalar_t>;
    at::Tensor part = at::empty({batch * cpr * 2}, step.options());
    snr_partials<scalar_t>(score.data_ptr<scalar_t>(), noise.has_value() ? noise->data_ptr<scalar_t>() : nullptr,
                           seeds.has_value() ? seeds->data_ptr<int64_t>() : nullptr, static_cast<uint64_t>(seed),
                           static_cast<uint64_t>(stream), batch, row_len, part.data_ptr<acc>());
    snr_steps<acc>(part.data_ptr<acc>(), batch, cpr, four_alpha_snr2, batch_norm, step.data_ptr<acc>());
    langevin_cpu_kernel<scalar_t>(x, score, step, 0.0, noise, seed, stream, seeds, out);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(pygen, CPU, m) {
  m.impl("langevin_step", &langevin_step_cpu);
  m.impl("langevin_snr_step", &langevin_snr_step_cpu);
}

}  // namespace pygen::cpu
