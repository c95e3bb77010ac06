// csrc/cuda/cuda_common.cuh — helpers shared by the CUDA kernels.
#pragma once
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "../op_checks.h"
#include "pygen/noise_layout.h"
#include "pygen/philox.h"

namespace pygen::cuda {

constexpr int kThreads = 256;

// Arithmetic type for a storage type: fp32 for fp32/fp16/bf16, fp64 for fp64.
template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };
template <typename T> using acc_t = typename Acc<T>::type;

inline unsigned int blocks_for(int64_t work_items) {
  const int64_t b = (work_items + kThreads - 1) / kThreads;
  return static_cast<unsigned int>(b > 0 ? b : 1);
}

// Sum of v over the block (blockDim.x == kThreads) in a fixed order (deterministic); the result
// is valid in thread 0 only. shm holds kThreads / 32 values and may be reused after the call.
template <typename T>
__device__ __forceinline__ T block_sum_to_thread0(T v, T* shm) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) shm[warp] = v;
  __syncthreads();
  v = threadIdx.x < kThreads / 32 ? shm[threadIdx.x] : T(0);
  if (warp == 0) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  }
  __syncthreads();  // shm may be reused
  return v;
}

// t is a contiguous CUDA tensor (argument checks of the ops: ../op_checks.h).
inline void check_cuda(const at::Tensor& t, const char* name) { check_tensor_on(t, name, c10::kCUDA); }

__device__ __forceinline__ int64_t global_thread_index() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}

// The Philox group of a NoiseLayout that work item w handles (one thread per
// group): group `group` of noise row `row` (the group is the Philox counter),
// elements first .. first + count - 1 (flat indices; count is kGroup, fewer at
// the end of a noise row). Only for w < layout.work_items().
struct NoiseGroup {
  int64_t row;
  int64_t group;
  int64_t first;
  int count;
};

__device__ __forceinline__ NoiseGroup noise_group(const NoiseLayout& layout, int64_t w) {
  NoiseGroup ng;
  ng.row = w / layout.groups_per_row;
  ng.group = w - ng.row * layout.groups_per_row;
  const int64_t i0 = ng.group * kGroup;
  ng.first = ng.row * layout.row_len + i0;
  const int64_t left = layout.row_len - i0;
  ng.count = left < kGroup ? static_cast<int>(left) : kGroup;
  return ng;
}

// The Philox key of noise row `row`: its per-row seed, or the one seed.
__device__ __forceinline__ uint64_t noise_key(const int64_t* row_seeds, uint64_t seed, int64_t row) {
  return row_seeds != nullptr ? static_cast<uint64_t>(row_seeds[row]) : seed;
}

}  // namespace pygen::cuda
