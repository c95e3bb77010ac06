// csrc/cpu/cpu_common.h — helpers shared by the C++ CPU kernels.
#pragma once
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>

#include "../op_checks.h"
#include "pygen/noise_layout.h"
#include "pygen/philox.h"

// Function multi-versioning of the CPU loops. The extension is built for the
// baseline x86-64 ISA; a loop marked PYGEN_VECTOR_CLONES is compiled for AVX2
// and for the baseline ISA and picked at load time (GCC/Clang target_clones).
// Neither clone has FMA (AVX-512F would: GCC contracts a·b + c by default), so
// these loops round like the eager composites they mirror: products, then sums.
// PYGEN_CPU_MULTIVERSION says whether per-ISA code is compiled at all (define
// PYGEN_NO_TARGET_CLONES to switch it off).
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(PYGEN_NO_TARGET_CLONES)
#define PYGEN_CPU_MULTIVERSION 1
#define PYGEN_VECTOR_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define PYGEN_CPU_MULTIVERSION 0
#define PYGEN_VECTOR_CLONES
#endif

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

// Call fn(r, i0, len) for every chunk of every noise row of `layout`, in
// parallel over chunks: elements [i0, i0 + len) of noise row r (flat indices
// from r * layout.row_len + i0). Chunks are kNoiseChunk elements (fewer at the
// end of a row), so a Philox group never straddles two chunks.
template <typename Fn>
void for_each_noise_chunk(const NoiseLayout& layout, Fn&& fn) {
  const int64_t chunks_per_row = (layout.row_len + kNoiseChunk - 1) / kNoiseChunk;
  // At least ~32k elements per task: small tensors (many short rows) run inline
  // instead of opening a parallel region per op.
  const int64_t chunk_len = std::max<int64_t>(1, std::min(layout.row_len, kNoiseChunk));
  const int64_t grain = std::max<int64_t>(1, 32768 / chunk_len);
  at::parallel_for(0, layout.rows * chunks_per_row, grain, [&](int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w) {
      const int64_t r = w / chunks_per_row;
      const int64_t i0 = (w - r * chunks_per_row) * kNoiseChunk;
      fn(r, i0, std::min(layout.row_len - i0, kNoiseChunk));
    }
  });
}

// Generate the noise of `layout` a chunk at a time (fill_normals: the numbers
// of pygen.randn on this backend) and call fn(begin, end, normals) for each
// chunk, where normals[k] is the noise of flat element begin + k.
// `seed_of_row(r)` gives the seed of noise row r; `stream_of_row(r)` its stream.
template <typename SeedFn, typename StreamFn, typename Fn>
void for_each_normals_chunk(const NoiseLayout& layout, SeedFn seed_of_row, StreamFn stream_of_row, Fn&& fn) {
  for_each_noise_chunk(layout, [&](int64_t r, int64_t i0, int64_t len) {
    alignas(64) float normals[kNoiseChunk];
    fill_normals(seed_of_row(r), stream_of_row(r), static_cast<uint64_t>(i0 / kGroup), len, normals);
    const int64_t begin = r * layout.row_len + i0;
    fn(begin, begin + len, static_cast<const float*>(normals));
  });
}

// Visit every element of `layout` with its normal: fn(element_index, normal)
// (seed_of_row, stream_of_row as in for_each_normals_chunk).
template <typename SeedFn, typename StreamFn, typename Fn>
void for_each_noise_element(const NoiseLayout& layout, SeedFn seed_of_row, StreamFn stream_of_row, Fn fn) {
  for_each_normals_chunk(layout, seed_of_row, stream_of_row, [&](int64_t begin, int64_t end, const float* normals) {
    for (int64_t e = begin; e < end; ++e) fn(e, normals[e - begin]);
  });
}

// t is a contiguous CPU tensor (argument checks of the ops: ../op_checks.h).
inline void check_cpu(const at::Tensor& t, const char* name) { check_tensor_on(t, name, c10::kCPU); }

}  // namespace pygen::cpu
