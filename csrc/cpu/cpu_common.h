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

// Standard normals of elements [4*first_group, 4*first_group + count) of one
// noise row, written to out[0 .. count). Same numbers as philox_normals();
// vectorised (csrc/cpu/philox_cpu.cpp).
void fill_normals(uint64_t seed, uint64_t stream, uint64_t first_group, int64_t count, float* out);

// Elements per chunk in for_each_noise_element (a multiple of 4), and the
// Philox groups fill_normals computes per vectorised tile.
constexpr int64_t kNoiseChunk = 1024;
constexpr int64_t kNoiseTileGroups = kNoiseChunk / kGroup;

// Visit every element of `layout` with its normal: fn(element_index, normal).
// `seed_of_row(r)` gives the seed of noise row r; `stream_of_row(r)` its stream.
// Rows are cut into chunks of kNoiseChunk elements; normals are generated a
// chunk at a time with fill_normals, in parallel over chunks.
template <typename SeedFn, typename StreamFn, typename Fn>
void for_each_noise_element(const NoiseLayout& layout, SeedFn seed_of_row, StreamFn stream_of_row, Fn fn) {
  const int64_t chunks_per_row = (layout.row_len + kNoiseChunk - 1) / kNoiseChunk;
  at::parallel_for(0, layout.rows * chunks_per_row, 1, [&](int64_t begin, int64_t end) {
    float z[kNoiseChunk];
    for (int64_t w = begin; w < end; ++w) {
      const int64_t r = w / chunks_per_row;
      const int64_t i0 = (w - r * chunks_per_row) * kNoiseChunk;
      const int64_t len = layout.row_len - i0 < kNoiseChunk ? layout.row_len - i0 : kNoiseChunk;
      fill_normals(seed_of_row(r), stream_of_row(r), static_cast<uint64_t>(i0 / kGroup), len, z);
      const int64_t base = r * layout.row_len + i0;
      for (int64_t i = 0; i < len; ++i) fn(base + i, z[i]);
    }
  });
}

inline void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "pygen: ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.is_contiguous(), "pygen: ", name, " must be contiguous");
}

}  // namespace pygen::cpu
