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

inline void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "pygen: ", name, " must be a CUDA tensor, got ", t.device());
  TORCH_CHECK(t.is_contiguous(), "pygen: ", name, " must be contiguous");
}

__device__ __forceinline__ int64_t global_thread_index() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}

}  // namespace pygen::cuda
