// pygen/common.h — portability macros shared by the CPU (g++) and CUDA (nvcc) builds.
#pragma once
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define PYGEN_HD __host__ __device__ __forceinline__
#else
#define PYGEN_HD inline
#endif

namespace pygen {

// Number of noise/elementwise items one thread (or one CPU inner iteration)
// handles: one Philox call yields four uint32 words = four normals.
constexpr int kGroup = 4;

}  // namespace pygen
