// Stand-in for the header that CUDA builds of torch generate. CPU-only torch
// wheels ship the c10/cuda headers without it; the nvcc compile check
// (tools/nvcc_check.sh, CMakeLists.txt) puts this directory last on the
// include path so that csrc/cuda/*.cu compile against CPU torch headers.
// Real CUDA builds (setup.py with CUDA torch) never see this file.
#pragma once
#define C10_CUDA_BUILD_SHARED_LIBS
