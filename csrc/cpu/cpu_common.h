// csrc/cpu/cpu_common.h — helpers shared by the C++ CPU kernels.
#pragma once
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>

#include <cstdint>

#include "pygen/noise_layout.h"
#include "pygen/philox.h"

namespace pygen::cpu {

// Arithmetic type for a storage type: fp32 for fp32/fp16/bf16, fp64 for fp64.
template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };
template <typename T> using acc_t = typename Acc<T>::type;

// Grain of at::parallel_for in Philox groups (4 elements each).
constexpr int64_t kGrainGroups = 8192;

// Visit every element of `layout` with its normal: fn(element_index, normal).
// `seed_of_row(r)` gives the seed of noise row r; `stream_of_row(r)` its stream.
template <typename SeedFn, typename StreamFn, typename Fn>
void for_each_noise_element(const NoiseLayout& layout, SeedFn seed_of_row, StreamFn stream_of_row, Fn fn) {
  at::parallel_for(0, layout.work_items(), kGrainGroups, [&](int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w) {
      const int64_t r = w / layout.groups_per_row;
      const int64_t g = w - r * layout.groups_per_row;
      const Normals4 z = philox_normals(seed_of_row(r), stream_of_row(r), static_cast<uint64_t>(g));
      const int64_t base = r * layout.row_len + g * kGroup;
      const int64_t n = layout.row_len - g * kGroup < kGroup ? layout.row_len - g * kGroup : kGroup;
      for (int j = 0; j < n; ++j) fn(base + j, z.z[j]);
    }
  });
}

inline void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "pygen: ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.is_contiguous(), "pygen: ", name, " must be contiguous");
}

}  // namespace pygen::cpu
