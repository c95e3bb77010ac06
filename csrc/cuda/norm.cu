// csrc/cuda/norm.cu — CUDA kernels of the norm family (pygen/ops/norm.py):
//   torch.ops.pygen.adaln_modulate / adaln_modulate_backward   LayerNorm(x)·(1 + scale[b]) + shift[b]
//   torch.ops.pygen.gated_residual / gated_residual_backward   x + gate[b]·y
//   torch.ops.pygen.group_norm / group_norm_backward           SiLU?(GroupNorm(x)), NCHW or channels-last
//   torch.ops.pygen.timestep_embedding / _backward             diffusers' sinusoidal embedding
// Shared math: csrc/include/pygen/norm.h; argument checks: csrc/norm_checks.h
// (the same as the CPU ops). Arithmetic in fp32 (fp64 for fp64 storage).
//
// Kernels (all on the current stream, no host sync, no atomics: every
// reduction is a fixed shuffle/shared-memory tree or a fixed-order sum of
// fixed tiles, so results are bit-reproducible):
//   * adaLN forward / dx: one block per (b, n) row; row sums by block
//     reductions; 16-byte vector loads/stores when C and every pointer allow.
//   * column sums (dshift, dscale, dweight, dbias, dgate): one thread per
//     column over a tile of kRowTile rows -> per-tile partials, then a second
//     kernel adds the tiles in order.
//   * group norm: per-(n, tile, c) partial statistics — a block per (n, c)
//     row (NCHW; tile = the row) or a thread per channel over kSpatialTile
//     spatial rows (channels-last) — merged per (n, group) in a fixed order
//     (Chan), then one elementwise pass (vectorised where aligned). Backward
//     alike: per-(n, tile, c) Σ da·xhat and Σ da, per-group coefficients,
//     elementwise dx.
//   * timestep embedding: a thread per output element; backward a block per t.
#include <limits>
#include <optional>
#include <tuple>

#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "../norm_checks.h"
#include "cuda_common.cuh"
#include "pygen/norm.h"

namespace pygen::cuda {
namespace {

constexpr int kRowThreads = 256;    // threads of a row block (multiple of 32, <= 1024)
constexpr int kColThreads = 128;    // columns per block in the column-sum kernels
constexpr int64_t kRowTile = 64;    // rows per column partial sum
constexpr int64_t kSpatialTile = 64;

__host__ __device__ __forceinline__ int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

template <typename T, int V>
struct alignas(sizeof(T) * V) Vec {
  T v[V];
};

// 16-byte vectors: 4 fp32, 8 fp16/bf16, 2 fp64.
template <typename T>
constexpr int vec_width() {
  return 16 / static_cast<int>(sizeof(T)) > 0 ? 16 / static_cast<int>(sizeof(T)) : 1;
}

inline bool aligned16(const void* p) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Sum over the block (blockDim.x a multiple of 32): xor-butterfly in each warp, then
// warp 0 over the warp sums; every thread gets the same value. `shared` holds 32 acc.
template <typename acc>
__device__ acc block_sum(acc v, acc* shared) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  __syncthreads();  // the previous call's readers are done with shared
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  if (warp == 0) {
    acc r = lane < warps ? shared[lane] : acc(0);
    for (int o = 16; o > 0; o >>= 1) r += __shfl_xor_sync(0xffffffffu, r, o);
    if (lane == 0) shared[0] = r;
  }
  __syncthreads();
  return shared[0];
}

template <typename T>
const T* opt_ptr(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<T>() : nullptr;
}

unsigned int grid_for(int64_t items, int threads) {
  const int64_t b = (items + threads - 1) / threads;
  TORCH_CHECK(b <= 0x7fffffffLL, "pygen: tensor too large for one launch");
  return static_cast<unsigned int>(b > 0 ? b : 1);
}

// out[g·C + c] = Σ_{r < rows} part[(g·rows + r)·C + c], in order.
template <typename acc, typename out_t>
__global__ void sum_partials_kernel(const acc* __restrict__ part, out_t* __restrict__ out, int64_t groups,
                                    int64_t rows, int64_t C) {
  const int64_t i = global_thread_index();
  if (i >= groups * C) return;
  const int64_t g = i / C, c = i - g * C;
  acc s = 0;
  for (int64_t r = 0; r < rows; ++r) s += part[(g * rows + r) * C + c];
  out[i] = static_cast<out_t>(s);
}

template <typename acc, typename out_t>
void sum_partials(const at::Tensor& part, at::Tensor& out, int64_t groups, int64_t rows, int64_t C,
                  cudaStream_t stream) {
  sum_partials_kernel<acc, out_t><<<grid_for(groups * C, kThreads), kThreads, 0, stream>>>(
      part.data_ptr<acc>(), out.data_ptr<out_t>(), groups, rows, C);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---------------------------------------------------------------------------
// adaln_modulate
// ---------------------------------------------------------------------------
template <typename scalar_t>
struct AdaLNPtrs {
  const scalar_t* x;
  const scalar_t* w;
  const scalar_t* b;
  const scalar_t* shift;
  const scalar_t* scale;
  const scalar_t* grad;
};

template <typename scalar_t, int V>
__global__ void __launch_bounds__(kRowThreads) adaln_fwd_kernel(AdaLNPtrs<scalar_t> p, scalar_t* __restrict__ y,
                                                                acc_t<scalar_t>* __restrict__ mean,
                                                                acc_t<scalar_t>* __restrict__ rstd, int64_t N,
                                                                int64_t C, acc_t<scalar_t> eps) {
  using acc = acc_t<scalar_t>;
  using VT = Vec<scalar_t, V>;
  __shared__ acc shared[32];
  const int64_t row = blockIdx.x;
  const int64_t bi = row / N;
  const int64_t CV = C / V;
  const VT* xr = reinterpret_cast<const VT*>(p.x + row * C);
  acc s = 0;
  for (int64_t i = threadIdx.x; i < CV; i += blockDim.x) {
    const VT v = xr[i];
#pragma unroll
    for (int k = 0; k < V; ++k) s += static_cast<acc>(v.v[k]);
  }
  const acc m = block_sum(s, shared) / static_cast<acc>(C);
  acc q = 0;
  for (int64_t i = threadIdx.x; i < CV; i += blockDim.x) {
    const VT v = xr[i];
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const acc d = static_cast<acc>(v.v[k]) - m;
      q += d * d;
    }
  }
  const acc rs = norm_rstd(block_sum(q, shared) / static_cast<acc>(C), eps);
  if (threadIdx.x == 0) {
    mean[row] = m;
    rstd[row] = rs;
  }
  VT* yr = reinterpret_cast<VT*>(y + row * C);
  const VT* wv = reinterpret_cast<const VT*>(p.w);
  const VT* bv = reinterpret_cast<const VT*>(p.b);
  const VT* shv = p.shift != nullptr ? reinterpret_cast<const VT*>(p.shift + bi * C) : nullptr;
  const VT* scv = p.scale != nullptr ? reinterpret_cast<const VT*>(p.scale + bi * C) : nullptr;
  for (int64_t i = threadIdx.x; i < CV; i += blockDim.x) {
    const VT v = xr[i];
    VT w, b, sh, sc, out;
    if (wv != nullptr) w = wv[i];
    if (bv != nullptr) b = bv[i];
    if (shv != nullptr) sh = shv[i];
    if (scv != nullptr) sc = scv[i];
#pragma unroll
    for (int k = 0; k < V; ++k) {
      acc z = (static_cast<acc>(v.v[k]) - m) * rs;
      if (wv != nullptr) z = z * static_cast<acc>(w.v[k]);
      if (bv != nullptr) z = z + static_cast<acc>(b.v[k]);
      if (scv != nullptr) z = z * (acc(1) + static_cast<acc>(sc.v[k]));
      if (shv != nullptr) z = z + static_cast<acc>(sh.v[k]);
      out.v[k] = static_cast<scalar_t>(z);
    }
    yr[i] = out;
  }
}

// Width V used for rows of C elements when every pointer is 16-byte aligned.
template <typename scalar_t>
bool can_vectorize(int64_t C, std::initializer_list<const void*> ptrs) {
  if (C % vec_width<scalar_t>() != 0) return false;
  for (const void* p : ptrs) {
    if (!aligned16(p)) return false;
  }
  return true;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> adaln_modulate_cuda(const at::Tensor& x_in,
                                                                   const std::optional<at::Tensor>& weight_in,
                                                                   const std::optional<at::Tensor>& bias_in,
                                                                   const std::optional<at::Tensor>& shift_in,
                                                                   const std::optional<at::Tensor>& scale_in,
                                                                   double eps) {
  const auto a = norm::check_adaln_args(x_in, weight_in, bias_in, shift_in, scale_in, c10::kCUDA);
  TORCH_CHECK(eps >= 0.0, "pygen: eps must be >= 0, got ", eps);
  const c10::cuda::CUDAGuard guard(a.x.device());
  const int64_t B = a.B, N = a.N, C = a.C, rows = B * N;
  at::Tensor y = at::empty_like(a.x);
  at::Tensor mean = norm::empty_stats(a.x, {B, N}), rstd = norm::empty_stats(a.x, {B, N});
  if (rows == 0) return {y, mean, rstd};
  if (C == 0) return norm::with_nan_stats(y, mean, rstd);
  TORCH_CHECK(rows <= 0x7fffffffLL, "pygen: adaln_modulate supports at most 2^31 - 1 rows");
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x.scalar_type(), "adaln_modulate_cuda", [&] {
    using acc = acc_t<scalar_t>;
    AdaLNPtrs<scalar_t> p{a.x.data_ptr<scalar_t>(), opt_ptr<scalar_t>(a.weight), opt_ptr<scalar_t>(a.bias),
                          opt_ptr<scalar_t>(a.shift), opt_ptr<scalar_t>(a.scale), nullptr};
    scalar_t* yp = y.data_ptr<scalar_t>();
    constexpr int V = vec_width<scalar_t>();
    const bool vec = can_vectorize<scalar_t>(C, {p.x, p.w, p.b, p.shift, p.scale, yp});
    const dim3 grid(static_cast<unsigned int>(rows));
    if (vec) {
      adaln_fwd_kernel<scalar_t, V><<<grid, kRowThreads, 0, stream>>>(p, yp, mean.data_ptr<acc>(),
                                                                      rstd.data_ptr<acc>(), N, C,
                                                                      static_cast<acc>(eps));
    } else {
      adaln_fwd_kernel<scalar_t, 1><<<grid, kRowThreads, 0, stream>>>(p, yp, mean.data_ptr<acc>(),
                                                                      rstd.data_ptr<acc>(), N, C,
                                                                      static_cast<acc>(eps));
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {y, mean, rstd};
}

// dxn_k = g·(1 + scale)·w for V elements of vector i of a row.
template <typename scalar_t, int V>
__device__ __forceinline__ void adaln_dxn(const AdaLNPtrs<scalar_t>& p, int64_t row, int64_t bi, int64_t C,
                                          int64_t i, acc_t<scalar_t> m, acc_t<scalar_t> rs, acc_t<scalar_t>* d,
                                          acc_t<scalar_t>* xn) {
  using acc = acc_t<scalar_t>;
  using VT = Vec<scalar_t, V>;
  const VT xv = reinterpret_cast<const VT*>(p.x + row * C)[i];
  const VT gv = reinterpret_cast<const VT*>(p.grad + row * C)[i];
  VT w, sc;
  if (p.w != nullptr) w = reinterpret_cast<const VT*>(p.w)[i];
  if (p.scale != nullptr) sc = reinterpret_cast<const VT*>(p.scale + bi * C)[i];
#pragma unroll
  for (int k = 0; k < V; ++k) {
    acc dv = static_cast<acc>(gv.v[k]);
    if (p.scale != nullptr) dv = dv * (acc(1) + static_cast<acc>(sc.v[k]));
    if (p.w != nullptr) dv = dv * static_cast<acc>(w.v[k]);
    d[k] = dv;
    xn[k] = (static_cast<acc>(xv.v[k]) - m) * rs;
  }
}

template <typename scalar_t, int V>
__global__ void __launch_bounds__(kRowThreads) adaln_dx_kernel(AdaLNPtrs<scalar_t> p,
                                                               const acc_t<scalar_t>* __restrict__ mean,
                                                               const acc_t<scalar_t>* __restrict__ rstd,
                                                               scalar_t* __restrict__ dx, int64_t N, int64_t C) {
  using acc = acc_t<scalar_t>;
  using VT = Vec<scalar_t, V>;
  __shared__ acc shared[32];
  const int64_t row = blockIdx.x;
  const int64_t bi = row / N;
  const int64_t CV = C / V;
  const acc m = mean[row], rs = rstd[row];
  acc s1 = 0, s2 = 0;
  for (int64_t i = threadIdx.x; i < CV; i += blockDim.x) {
    acc d[V], xn[V];
    adaln_dxn<scalar_t, V>(p, row, bi, C, i, m, rs, d, xn);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      s1 += d[k];
      s2 += d[k] * xn[k];
    }
  }
  const acc c1 = block_sum(s1, shared) / static_cast<acc>(C);
  const acc c2 = block_sum(s2, shared) / static_cast<acc>(C);
  VT* dxr = reinterpret_cast<VT*>(dx + row * C);
  for (int64_t i = threadIdx.x; i < CV; i += blockDim.x) {
    acc d[V], xn[V];
    adaln_dxn<scalar_t, V>(p, row, bi, C, i, m, rs, d, xn);
    VT out;
#pragma unroll
    for (int k = 0; k < V; ++k) out.v[k] = static_cast<scalar_t>(rs * (d[k] - c1 - xn[k] * c2));
    dxr[i] = out;
  }
}

// Partial column sums of a tile of kRowTile rows of batch row b: grid (B·tiles, column blocks).
template <typename scalar_t>
__global__ void adaln_cols_kernel(AdaLNPtrs<scalar_t> p, const acc_t<scalar_t>* __restrict__ mean,
                                  const acc_t<scalar_t>* __restrict__ rstd, acc_t<scalar_t>* __restrict__ p_shift,
                                  acc_t<scalar_t>* __restrict__ p_scale, acc_t<scalar_t>* __restrict__ p_w,
                                  acc_t<scalar_t>* __restrict__ p_b, int64_t N, int64_t C, int64_t tiles) {
  using acc = acc_t<scalar_t>;
  const int64_t task = blockIdx.x;
  const int64_t c = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  const int64_t bi = task / tiles, tile = task - bi * tiles;
  const acc w = p.w != nullptr ? static_cast<acc>(p.w[c]) : acc(1);
  const acc bb = p.b != nullptr ? static_cast<acc>(p.b[c]) : acc(0);
  const acc s1 = p.scale != nullptr ? acc(1) + static_cast<acc>(p.scale[bi * C + c]) : acc(1);
  acc ag = 0, agz = 0, agx = 0;
  const int64_t n1 = imin(N, (tile + 1) * kRowTile);
  for (int64_t n = tile * kRowTile; n < n1; ++n) {
    const int64_t row = bi * N + n;
    const acc xn = (static_cast<acc>(p.x[row * C + c]) - mean[row]) * rstd[row];
    const acc g = static_cast<acc>(p.grad[row * C + c]);
    ag += g;
    agz += g * (xn * w + bb);
    agx += g * xn;
  }
  const int64_t o = task * C + c;
  p_shift[o] = ag;
  if (p_scale != nullptr) p_scale[o] = agz;
  if (p_w != nullptr) p_w[o] = agx * s1;  // dz = g·(1 + scale[b]): constant down the column
  if (p_b != nullptr) p_b[o] = ag * s1;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> adaln_modulate_backward_cuda(
    const at::Tensor& grad_in, const at::Tensor& x_in, const std::optional<at::Tensor>& weight_in,
    const std::optional<at::Tensor>& bias_in, const std::optional<at::Tensor>& scale_in, const at::Tensor& mean_in,
    const at::Tensor& rstd_in) {
  const auto a = norm::check_adaln_args(x_in, weight_in, bias_in, std::nullopt, scale_in, c10::kCUDA);
  const c10::cuda::CUDAGuard guard(a.x.device());
  const int64_t B = a.B, N = a.N, C = a.C;
  const at::Tensor g = norm::checked_like(grad_in, "grad_y", a.x.sizes(), a.x, c10::kCUDA);
  const at::Tensor mean = norm::checked_stats(mean_in, "mean", {B, N}, a.x, c10::kCUDA);
  const at::Tensor rstd = norm::checked_stats(rstd_in, "rstd", {B, N}, a.x, c10::kCUDA);
  at::Tensor dx = at::empty_like(a.x);
  at::Tensor dshift = at::empty({B, C}, a.x.options());
  at::Tensor dscale = norm::empty_param_grad(a.scale, {B, C}, a.x);
  at::Tensor dweight = norm::empty_param_grad(a.weight, {C}, a.x);
  at::Tensor dbias = norm::empty_param_grad(a.bias, {C}, a.x);
  if (B * N * C == 0) {  // sums of nothing (dweight / dbias are (C,) also when B == 0)
    for (at::Tensor* t : {&dshift, &dscale, &dweight, &dbias}) t->zero_();
    return {dx, dweight, dbias, dshift, dscale};
  }
  TORCH_CHECK(B * N <= 0x7fffffffLL, "pygen: adaln_modulate_backward supports at most 2^31 - 1 rows");
  const int64_t tiles = (N + kRowTile - 1) / kRowTile;
  TORCH_CHECK((C + kColThreads - 1) / kColThreads <= 65535, "pygen: adaln_modulate_backward: C too large");
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x.scalar_type(), "adaln_modulate_backward_cuda", [&] {
    using acc = acc_t<scalar_t>;
    AdaLNPtrs<scalar_t> p{a.x.data_ptr<scalar_t>(), opt_ptr<scalar_t>(a.weight), opt_ptr<scalar_t>(a.bias),
                          nullptr, opt_ptr<scalar_t>(a.scale), g.data_ptr<scalar_t>()};
    scalar_t* dxp = dx.data_ptr<scalar_t>();
    constexpr int V = vec_width<scalar_t>();
    const dim3 grid(static_cast<unsigned int>(B * N));
    if (can_vectorize<scalar_t>(C, {p.x, p.w, p.scale, p.grad, dxp})) {
      adaln_dx_kernel<scalar_t, V><<<grid, kRowThreads, 0, stream>>>(p, mean.data_ptr<acc>(), rstd.data_ptr<acc>(),
                                                                     dxp, N, C);
    } else {
      adaln_dx_kernel<scalar_t, 1><<<grid, kRowThreads, 0, stream>>>(p, mean.data_ptr<acc>(), rstd.data_ptr<acc>(),
                                                                     dxp, N, C);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const auto popts = a.x.options().dtype(norm::acc_type(a.x.scalar_type()));
    at::Tensor p_shift = at::empty({B * tiles, C}, popts);
    at::Tensor p_scale = a.scale.has_value() ? at::empty({B * tiles, C}, popts) : at::Tensor();
    at::Tensor p_w = a.weight.has_value() ? at::empty({B * tiles, C}, popts) : at::Tensor();
    at::Tensor p_b = a.bias.has_value() ? at::empty({B * tiles, C}, popts) : at::Tensor();
    auto ptr = [](at::Tensor& t) { return t.defined() ? t.data_ptr<acc>() : nullptr; };
    const dim3 cgrid(static_cast<unsigned int>(B * tiles), static_cast<unsigned int>((C + kColThreads - 1) / kColThreads));
    adaln_cols_kernel<scalar_t><<<cgrid, kColThreads, 0, stream>>>(p, mean.data_ptr<acc>(), rstd.data_ptr<acc>(),
                                                                   ptr(p_shift), ptr(p_scale), ptr(p_w), ptr(p_b), N,
                                                                   C, tiles);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    sum_partials<acc, scalar_t>(p_shift, dshift, B, tiles, C, stream);
    if (p_scale.defined()) sum_partials<acc, scalar_t>(p_scale, dscale, B, tiles, C, stream);
    if (p_w.defined()) sum_partials<acc, scalar_t>(p_w, dweight, 1, B * tiles, C, stream);
    if (p_b.defined()) sum_partials<acc, scalar_t>(p_b, dbias, 1, B * tiles, C, stream);
  });
  return {dx, dweight, dbias, dshift, dscale};
}

// ---------------------------------------------------------------------------
// gated_residual
// ---------------------------------------------------------------------------
template <typename scalar_t, int V>
__global__ void gated_fwd_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ gate,
                                 const scalar_t* __restrict__ y, scalar_t* __restrict__ out, int64_t nvec, int64_t NC,
                                 int64_t C) {
  using acc = acc_t<scalar_t>;
  using VT = Vec<scalar_t, V>;
  const int64_t i = global_thread_index();
  if (i >= nvec) return;
  const int64_t e = i * V;  // V | C: the V elements share a row
  const int64_t gi = (e / NC) * C + e % C;
  const VT xv = reinterpret_cast<const VT*>(x)[i];
  const VT yv = reinterpret_cast<const VT*>(y)[i];
  VT gv;
#pragma unroll
  for (int k = 0; k < V; ++k) gv.v[k] = gate[gi + k];
  VT o;
#pragma unroll
  for (int k = 0; k < V; ++k) {
    o.v[k] = static_cast<scalar_t>(static_cast<acc>(xv.v[k]) + static_cast<acc>(gv.v[k]) * static_cast<acc>(yv.v[k]));
  }
  reinterpret_cast<VT*>(out)[i] = o;
}

at::Tensor gated_residual_cuda(const at::Tensor& x_in, const at::Tensor& gate_in, const at::Tensor& y_in) {
  const auto a = norm::check_gated_args(x_in, "x", gate_in, y_in, c10::kCUDA);
  const c10::cuda::CUDAGuard guard(a.x.device());
  at::Tensor out = at::empty_like(a.x);
  const int64_t numel = a.x.numel();
  if (numel == 0) return out;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x.scalar_type(), "gated_residual_cuda", [&] {
    const scalar_t* xp = a.x.data_ptr<scalar_t>();
    const scalar_t* yp = a.y.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    constexpr int V = vec_width<scalar_t>();
    if (can_vectorize<scalar_t>(a.C, {xp, yp, op})) {
      gated_fwd_kernel<scalar_t, V><<<grid_for(numel / V, kThreads), kThreads, 0, stream>>>(
          xp, a.gate.data_ptr<scalar_t>(), yp, op, numel / V, a.N * a.C, a.C);
    } else {
      gated_fwd_kernel<scalar_t, 1><<<grid_for(numel, kThreads), kThreads, 0, stream>>>(
          xp, a.gate.data_ptr<scalar_t>(), yp, op, numel, a.N * a.C, a.C);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

template <typename scalar_t>
__global__ void gated_bwd_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ gate,
                                 const scalar_t* __restrict__ y, scalar_t* __restrict__ dy,
                                 acc_t<scalar_t>* __restrict__ part, int64_t N, int64_t C, int64_t tiles) {
  using acc = acc_t<scalar_t>;
  const int64_t task = blockIdx.x;
  const int64_t c = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  const int64_t bi = task / tiles, tile = task - bi * tiles;
  const acc gt = static_cast<acc>(gate[bi * C + c]);
  acc s = 0;
  const int64_t n1 = imin(N, (tile + 1) * kRowTile);
  for (int64_t n = tile * kRowTile; n < n1; ++n) {
    const int64_t o = (bi * N + n) * C + c;
    const acc g = static_cast<acc>(grad[o]);
    dy[o] = static_cast<scalar_t>(g * gt);
    s += g * static_cast<acc>(y[o]);
  }
  part[task * C + c] = s;
}

std::tuple<at::Tensor, at::Tensor> gated_residual_backward_cuda(const at::Tensor& grad_in, const at::Tensor& gate_in,
                                                                const at::Tensor& y_in) {
  const auto a = norm::check_gated_args(grad_in, "grad", gate_in, y_in, c10::kCUDA);
  const c10::cuda::CUDAGuard guard(a.x.device());
  const int64_t B = a.B, N = a.N, C = a.C;
  at::Tensor dy = at::empty_like(a.y);
  at::Tensor dgate = at::empty_like(a.gate);
  if (B * C == 0) return {dgate, dy};
  if (N == 0) return {dgate.zero_(), dy};
  const int64_t tiles = (N + kRowTile - 1) / kRowTile;
  TORCH_CHECK((C + kColThreads - 1) / kColThreads <= 65535, "pygen: gated_residual_backward: C too large");
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.y.scalar_type(), "gated_residual_backward_cuda", [&] {
    using acc = acc_t<scalar_t>;
    at::Tensor part = at::empty({B * tiles, C}, a.y.options().dtype(norm::acc_type(a.y.scalar_type())));
    const dim3 grid(static_cast<unsigned int>(B * tiles), static_cast<unsigned int>((C + kColThreads - 1) / kColThreads));
    gated_bwd_kernel<scalar_t><<<grid, kColThreads, 0, stream>>>(a.x.data_ptr<scalar_t>(), a.gate.data_ptr<scalar_t>(),
                                                                 a.y.data_ptr<scalar_t>(), dy.data_ptr<scalar_t>(),
                                                                 part.data_ptr<acc>(), N, C, tiles);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    sum_partials<acc, scalar_t>(part, dgate, B, tiles, C, stream);
  });
  return {dgate, dy};
}

// ---------------------------------------------------------------------------
// group_norm
// ---------------------------------------------------------------------------
// x is (N, C, S): NCHW (element (n, c, s) at (n·C + c)·S + s) or channels-last
// (at (n·S + s)·C + c). Partials per (n, tile, c): tiles = 1 (NCHW) or
// ceil(S / kSpatialTile) (channels-last).
struct GnGeometry {
  int64_t N, C, S, G, Cg, tiles;
  bool cl;
};

// NCHW partial statistics: one block per (n, c) row, two-pass.
template <typename scalar_t>
__global__ void __launch_bounds__(kRowThreads) gn_row_stats_kernel(const scalar_t* __restrict__ x,
                                                                   MomentStats<acc_t<scalar_t>>* __restrict__ part,
                                                                   int64_t S) {
  using acc = acc_t<scalar_t>;
  __shared__ acc shared[32];
  const int64_t r = blockIdx.x;
  const scalar_t* xr = x + r * S;
  acc s = 0;
  for (int64_t i = threadIdx.x; i < S; i += blockDim.x) s += static_cast<acc>(xr[i]);
  const acc m = block_sum(s, shared) / static_cast<acc>(S);
  acc q = 0;
  for (int64_t i = threadIdx.x; i < S; i += blockDim.x) {
    const acc d = static_cast<acc>(xr[i]) - m;
    q += d * d;
  }
  q = block_sum(q, shared);
  if (threadIdx.x == 0) part[r] = MomentStats<acc>{static_cast<acc>(S), m, q};
}

// Channels-last partial statistics: grid (N·tiles, channel blocks), a thread per channel.
template <typename scalar_t>
__global__ void gn_tile_stats_kernel(const scalar_t* __restrict__ x, MomentStats<acc_t<scalar_t>>* __restrict__ part,
                                     int64_t S, int64_t C, int64_t tiles) {
  using acc = acc_t<scalar_t>;
  const int64_t task = blockIdx.x;
  const int64_t c = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  const int64_t n = task / tiles, tile = task - n * tiles;
  const int64_t s0 = tile * kSpatialTile, s1 = imin(S, s0 + kSpatialTile);
  const scalar_t* xc = x + n * S * C + c;
  acc s = 0;
  for (int64_t i = s0; i < s1; ++i) s += static_cast<acc>(xc[i * C]);
  const acc cnt = static_cast<acc>(s1 - s0);
  const acc m = s / cnt;
  acc q = 0;
  for (int64_t i = s0; i < s1; ++i) {
    const acc d = static_cast<acc>(xc[i * C]) - m;
    q += d * d;
  }
  part[task * C + c] = MomentStats<acc>{cnt, m, q};
}

// Per (n, group): merge the partials (channels, then tiles, in order) -> mean, rstd (N, G)
// and their per-(n, c) copies mc, rc.
template <typename acc>
__global__ void gn_merge_kernel(const MomentStats<acc>* __restrict__ part, acc* __restrict__ mean,
                                acc* __restrict__ rstd, acc* __restrict__ mc, acc* __restrict__ rc, GnGeometry g,
                                acc eps) {
  const int64_t ng = global_thread_index();
  if (ng >= g.N * g.G) return;
  const int64_t n = ng / g.G, grp = ng - n * g.G;
  MomentStats<acc> st{0, 0, 0};
  for (int64_t c = grp * g.Cg; c < (grp + 1) * g.Cg; ++c) {
    for (int64_t t = 0; t < g.tiles; ++t) merge_moments(st, part[(n * g.tiles + t) * g.C + c]);
  }
  const acc rs = norm_rstd(st.m2 / st.count, eps);
  mean[ng] = st.mean;
  rstd[ng] = rs;
  for (int64_t c = grp * g.Cg; c < (grp + 1) * g.Cg; ++c) {
    mc[n * g.C + c] = st.mean;
    rc[n * g.C + c] = rs;
  }
}

// (n·C + c) of element e, and its channel c.
__device__ __forceinline__ void gn_channel_of(const GnGeometry& g, int64_t e, int64_t* nc, int64_t* c) {
  if (g.cl) {
    *c = e % g.C;
    *nc = (e / (g.S * g.C)) * g.C + *c;
  } else {
    *nc = e / g.S;
    *c = *nc % g.C;
  }
}

template <typename scalar_t>
struct GnPtrs {
  const scalar_t* x;
  const scalar_t* w;
  const scalar_t* b;
  const scalar_t* grad;
  const acc_t<scalar_t>* mc;  // per-(n, c) group mean / rstd
  const acc_t<scalar_t>* rc;
  const acc_t<scalar_t>* k0;  // backward: per-(n, c) s1/M and s2/M
  const acc_t<scalar_t>* kx;
};

template <typename scalar_t>
__device__ __forceinline__ acc_t<scalar_t> gn_forward_value(const GnPtrs<scalar_t>& p, acc_t<scalar_t> xv,
                                                            int64_t nc, int64_t c, bool silu) {
  using acc = acc_t<scalar_t>;
  acc v = (xv - p.mc[nc]) * p.rc[nc];
  if (p.w != nullptr) v = v * static_cast<acc>(p.w[c]);
  if (p.b != nullptr) v = v + static_cast<acc>(p.b[c]);
  return silu ? pygen::silu(v) : v;
}

// (xhat, da): da = dL/d(pre-activation).
template <typename scalar_t>
__device__ __forceinline__ acc_t<scalar_t> gn_xhat_da(const GnPtrs<scalar_t>& p, acc_t<scalar_t> xv,
                                                      acc_t<scalar_t> gv, int64_t nc, int64_t c, bool silu,
                                                      acc_t<scalar_t>* da) {
  using acc = acc_t<scalar_t>;
  const acc xh = (xv - p.mc[nc]) * p.rc[nc];
  acc d = gv;
  if (silu) {
    acc pre = p.w != nullptr ? xh * static_cast<acc>(p.w[c]) : xh;
    if (p.b != nullptr) pre = pre + static_cast<acc>(p.b[c]);
    d = d * silu_grad(pre);
  }
  *da = d;
  return xh;
}

template <typename scalar_t>
__device__ __forceinline__ acc_t<scalar_t> gn_dx_value(const GnPtrs<scalar_t>& p, acc_t<scalar_t> xv,
                                                       acc_t<scalar_t> gv, int64_t nc, int64_t c, bool silu) {
  using acc = acc_t<scalar_t>;
  acc da;
  const acc xh = gn_xhat_da(p, xv, gv, nc, c, silu, &da);
  const acc dxh = p.w != nullptr ? da * static_cast<acc>(p.w[c]) : da;
  return p.rc[nc] * (dxh - p.k0[nc] - xh * p.kx[nc]);
}

// Elementwise pass (forward y or backward dx): a thread per V elements that share
// a row (NCHW: V | S, one (n, c)) or are V consecutive channels (channels-last: V | C).
template <typename scalar_t, int V, bool kBackward>
__global__ void gn_elementwise_kernel(GnPtrs<scalar_t> p, scalar_t* __restrict__ out, GnGeometry g, int64_t nvec,
                                      bool silu) {
  using acc = acc_t<scalar_t>;
  using VT = Vec<scalar_t, V>;
  const int64_t i = global_thread_index();
  if (i >= nvec) return;
  const int64_t e = i * V;
  int64_t nc, c;
  gn_channel_of(g, e, &nc, &c);
  const VT xv = reinterpret_cast<const VT*>(p.x)[i];
  VT gv;
  if (kBackward) gv = reinterpret_cast<const VT*>(p.grad)[i];
  VT o;
#pragma unroll
  for (int k = 0; k < V; ++k) {
    const int64_t kc = g.cl ? c + k : c;
    const int64_t knc = g.cl ? nc + k : nc;
    acc v;
    if (kBackward) {
      v = gn_dx_value(p, static_cast<acc>(xv.v[k]), static_cast<acc>(gv.v[k]), knc, kc, silu);
    } else {
      v = gn_forward_value(p, static_cast<acc>(xv.v[k]), knc, kc, silu);
    }
    o.v[k] = static_cast<scalar_t>(v);
  }
  reinterpret_cast<VT*>(out)[i] = o;
}

template <typename scalar_t, bool kBackward>
void launch_gn_elementwise(const GnPtrs<scalar_t>& p, scalar_t* out, const GnGeometry& g, int64_t numel, bool silu,
                           cudaStream_t stream) {
  constexpr int V = vec_width<scalar_t>();
  const bool vec = (g.cl ? g.C : g.S) % V == 0 && aligned16(p.x) && aligned16(out) && aligned16(p.grad);
  if (vec) {
    gn_elementwise_kernel<scalar_t, V, kBackward><<<grid_for(numel / V, kThreads), kThreads, 0, stream>>>(
        p, out, g, numel / V, silu);
  } else {
    gn_elementwise_kernel<scalar_t, 1, kBackward><<<grid_for(numel, kThreads), kThreads, 0, stream>>>(
        p, out, g, numel, silu);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

GnGeometry gn_geometry(const norm::GroupNormArgs& a) {
  GnGeometry g{a.N, a.C, a.S, a.G, a.C / a.G, 1, a.channels_last};
  if (g.cl) g.tiles = (g.S + kSpatialTile - 1) / kSpatialTile;
  TORCH_CHECK(g.N * g.tiles <= 0x7fffffffLL && g.N * g.C <= 0x7fffffffLL && (g.C + kColThreads - 1) / kColThreads <= 65535,
              "pygen: group_norm: tensor too large");
  return g;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_cuda(const at::Tensor& x_in,
                                                               const std::optional<at::Tensor>& weight_in,
                                                               const std::optional<at::Tensor>& bias_in,
                                                               int64_t groups, double eps, bool silu) {
  const auto a = norm::check_group_norm_args(x_in, weight_in, bias_in, groups, c10::kCUDA);
  TORCH_CHECK(eps >= 0.0, "pygen: eps must be >= 0, got ", eps);
  const c10::cuda::CUDAGuard guard(a.x.device());
  const GnGeometry g = gn_geometry(a);
  at::Tensor y = at::empty_like(a.x);  // keeps x's layout
  at::Tensor mean = norm::empty_stats(a.x, {g.N, g.G}), rstd = norm::empty_stats(a.x, {g.N, g.G});
  if (g.N == 0) return {y, mean, rstd};
  if (g.S == 0 || g.C == 0) return norm::with_nan_stats(y, mean, rstd);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x.scalar_type(), "group_norm_cuda", [&] {
    using acc = acc_t<scalar_t>;
    using Stats = MomentStats<acc>;
    const scalar_t* xp = a.x.data_ptr<scalar_t>();
    // partial stats as 3 acc each, then the per-(n, c) expanded mean / rstd
    at::Tensor part = at::empty({g.N * g.tiles * g.C * 3}, mean.options());
    at::Tensor expanded = at::empty({2, g.N * g.C}, mean.options());
    Stats* pp = reinterpret_cast<Stats*>(part.data_ptr<acc>());
    if (!g.cl) {
      gn_row_stats_kernel<scalar_t><<<static_cast<unsigned int>(g.N * g.C), kRowThreads, 0, stream>>>(xp, pp, g.S);
    } else {
      const dim3 grid(static_cast<unsigned int>(g.N * g.tiles), static_cast<unsigned int>((g.C + kColThreads - 1) / kColThreads));
      gn_tile_stats_kernel<scalar_t><<<grid, kColThreads, 0, stream>>>(xp, pp, g.S, g.C, g.tiles);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    acc* mc = expanded.data_ptr<acc>();
    acc* rc = mc + g.N * g.C;
    gn_merge_kernel<acc><<<grid_for(g.N * g.G, kThreads), kThreads, 0, stream>>>(
        pp, mean.data_ptr<acc>(), rstd.data_ptr<acc>(), mc, rc, g, static_cast<acc>(eps));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    GnPtrs<scalar_t> p{xp, opt_ptr<scalar_t>(a.weight), opt_ptr<scalar_t>(a.bias), nullptr, mc, rc, nullptr, nullptr};
    launch_gn_elementwise<scalar_t, false>(p, y.data_ptr<scalar_t>(), g, a.x.numel(), silu, stream);
  });
  return {y, mean, rstd};
}

// Backward partials: NCHW a block per (n, c) row; Σ da·xhat -> sw, Σ da -> sb.
template <typename scalar_t>
__global__ void __launch_bounds__(kRowThreads) gn_row_bwd_kernel(GnPtrs<scalar_t> p, acc_t<scalar_t>* __restrict__ sw,
                                                                 acc_t<scalar_t>* __restrict__ sb, GnGeometry g,
                                                                 bool silu) {
  using acc = acc_t<scalar_t>;
  __shared__ acc shared[32];
  const int64_t r = blockIdx.x;
  const int64_t c = r % g.C;
  acc a1 = 0, a2 = 0;
  for (int64_t i = threadIdx.x; i < g.S; i += blockDim.x) {
    acc da;
    const acc xh = gn_xhat_da(p, static_cast<acc>(p.x[r * g.S + i]), static_cast<acc>(p.grad[r * g.S + i]), r, c,
                              silu, &da);
    a1 += da * xh;
    a2 += da;
  }
  a1 = block_sum(a1, shared);
  a2 = block_sum(a2, shared);
  if (threadIdx.x == 0) {
    sw[r] = a1;
    sb[r] = a2;
  }
}

// Backward partials, channels-last: grid (N·tiles, channel blocks), a thread per channel.
template <typename scalar_t>
__global__ void gn_tile_bwd_kernel(GnPtrs<scalar_t> p, acc_t<scalar_t>* __restrict__ sw,
                                   acc_t<scalar_t>* __restrict__ sb, GnGeometry g, bool silu) {
  using acc = acc_t<scalar_t>;
  const int64_t task = blockIdx.x;
  const int64_t c = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  if (c >= g.C) return;
  const int64_t n = task / g.tiles, tile = task - n * g.tiles;
  const int64_t s0 = tile * kSpatialTile, s1 = imin(g.S, s0 + kSpatialTile);
  acc a1 = 0, a2 = 0;
  for (int64_t s = s0; s < s1; ++s) {
    const int64_t o = (n * g.S + s) * g.C + c;
    acc da;
    const acc xh = gn_xhat_da(p, static_cast<acc>(p.x[o]), static_cast<acc>(p.grad[o]), n * g.C + c, c, silu, &da);
    a1 += da * xh;
    a2 += da;
  }
  sw[task * g.C + c] = a1;
  sb[task * g.C + c] = a2;
}

// Per (n, group): per-channel sums over tiles -> cw, cb (n, c); k0 = s1/M, kx = s2/M per (n, c).
template <typename scalar_t>
__global__ void gn_bwd_merge_kernel(const scalar_t* __restrict__ w, const acc_t<scalar_t>* __restrict__ sw,
                                    const acc_t<scalar_t>* __restrict__ sb, acc_t<scalar_t>* __restrict__ cw,
                                    acc_t<scalar_t>* __restrict__ cb, acc_t<scalar_t>* __restrict__ k0,
                                    acc_t<scalar_t>* __restrict__ kx, GnGeometry g) {
  using acc = acc_t<scalar_t>;
  const int64_t ng = global_thread_index();
  if (ng >= g.N * g.G) return;
  const int64_t n = ng / g.G, grp = ng - n * g.G;
  acc s1 = 0, s2 = 0;
  for (int64_t c = grp * g.Cg; c < (grp + 1) * g.Cg; ++c) {
    acc a1 = 0, a2 = 0;
    for (int64_t t = 0; t < g.tiles; ++t) {
      a1 += sw[(n * g.tiles + t) * g.C + c];
      a2 += sb[(n * g.tiles + t) * g.C + c];
    }
    cw[n * g.C + c] = a1;
    cb[n * g.C + c] = a2;
    const acc wc = w != nullptr ? static_cast<acc>(w[c]) : acc(1);
    s1 += wc * a2;
    s2 += wc * a1;
  }
  const acc inv_m = acc(1) / (static_cast<acc>(g.Cg) * static_cast<acc>(g.S));
  for (int64_t c = grp * g.Cg; c < (grp + 1) * g.Cg; ++c) {
    k0[n * g.C + c] = s1 * inv_m;
    kx[n * g.C + c] = s2 * inv_m;
  }
}

template <typename acc>
__global__ void gn_expand_stats_kernel(const acc* __restrict__ mean, const acc* __restrict__ rstd,
                                       acc* __restrict__ mc, acc* __restrict__ rc, GnGeometry g) {
  const int64_t i = global_thread_index();
  if (i >= g.N * g.C) return;
  const int64_t n = i / g.C, c = i - n * g.C;
  mc[i] = mean[n * g.G + c / g.Cg];
  rc[i] = rstd[n * g.G + c / g.Cg];
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_backward_cuda(
    const at::Tensor& grad_in, const at::Tensor& x_in, const std::optional<at::Tensor>& weight_in,
    const std::optional<at::Tensor>& bias_in, const at::Tensor& mean_in, const at::Tensor& rstd_in, int64_t groups,
    bool silu) {
  const auto a = norm::check_group_norm_args(x_in, weight_in, bias_in, groups, c10::kCUDA);
  const c10::cuda::CUDAGuard guard(a.x.device());
  const GnGeometry g = gn_geometry(a);
  norm::check_same(grad_in, "grad_y", a.x.sizes(), a.x, c10::kCUDA);
  const at::Tensor grad = norm::in_layout(grad_in, g.cl);
  const at::Tensor mean = norm::checked_stats(mean_in, "mean", {g.N, g.G}, a.x, c10::kCUDA);
  const at::Tensor rstd = norm::checked_stats(rstd_in, "rstd", {g.N, g.G}, a.x, c10::kCUDA);
  at::Tensor dx = at::empty_like(a.x);
  at::Tensor dweight = norm::empty_param_grad(a.weight, {g.C}, a.x);
  at::Tensor dbias = norm::empty_param_grad(a.bias, {g.C}, a.x);
  if (a.x.numel() == 0) {
    dweight.zero_();
    dbias.zero_();
    return {dx, dweight, dbias};
  }
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x.scalar_type(), "group_norm_backward_cuda", [&] {
    using acc = acc_t<scalar_t>;
    const auto opts = a.x.options().dtype(norm::acc_type(a.x.scalar_type()));
    const int64_t nct = g.N * g.tiles * g.C, nc = g.N * g.C;
    at::Tensor buf = at::empty({2 * nct + 6 * nc}, opts);
    acc* sw = buf.data_ptr<acc>();
    acc* sb = sw + nct;
    acc* mc = sb + nct;
    acc* rc = mc + nc;
    acc* cw = rc + nc;
    acc* cb = cw + nc;
    acc* k0 = cb + nc;
    acc* kx = k0 + nc;
    gn_expand_stats_kernel<acc><<<grid_for(nc, kThreads), kThreads, 0, stream>>>(mean.data_ptr<acc>(),
                                                                                 rstd.data_ptr<acc>(), mc, rc, g);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    GnPtrs<scalar_t> p{a.x.data_ptr<scalar_t>(), opt_ptr<scalar_t>(a.weight), opt_ptr<scalar_t>(a.bias),
                       grad.data_ptr<scalar_t>(), mc, rc, k0, kx};
    if (!g.cl) {
      gn_row_bwd_kernel<scalar_t><<<static_cast<unsigned int>(nc), kRowThreads, 0, stream>>>(p, sw, sb, g, silu);
    } else {
      const dim3 grid(static_cast<unsigned int>(g.N * g.tiles), static_cast<unsigned int>((g.C + kColThreads - 1) / kColThreads));
      gn_tile_bwd_kernel<scalar_t><<<grid, kColThreads, 0, stream>>>(p, sw, sb, g, silu);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    gn_bwd_merge_kernel<scalar_t><<<grid_for(g.N * g.G, kThreads), kThreads, 0, stream>>>(p.w, sw, sb, cw, cb, k0,
                                                                                          kx, g);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    launch_gn_elementwise<scalar_t, true>(p, dx.data_ptr<scalar_t>(), g, a.x.numel(), silu, stream);
    if (a.weight.has_value()) {
      sum_partials_kernel<acc, scalar_t><<<grid_for(g.C, kThreads), kThreads, 0, stream>>>(
          cw, dweight.data_ptr<scalar_t>(), 1, g.N, g.C);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (a.bias.has_value()) {
      sum_partials_kernel<acc, scalar_t><<<grid_for(g.C, kThreads), kThreads, 0, stream>>>(
          cb, dbias.data_ptr<scalar_t>(), 1, g.N, g.C);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {dx, dweight, dbias};
}

// ---------------------------------------------------------------------------
// timestep_embedding
// ---------------------------------------------------------------------------
template <typename t_t, typename acc>
__global__ void timestep_embedding_kernel(const t_t* __restrict__ t, acc* __restrict__ out, int64_t B, int64_t dim,
                                          TimestepConstants<acc> tc, bool flip) {
  const int64_t i = global_thread_index();
  if (i >= B * dim) return;
  const int64_t b = i / dim, j = i - b * dim;
  acc v = 0;
  if (j < 2 * tc.half) {
    const bool second = j >= tc.half;
    const int64_t k = second ? j - tc.half : j;
    const acc arg = timestep_argument(tc, static_cast<acc>(t[b]), timestep_frequency(tc, k));
    v = (second != flip) ? norm_cos(arg) : norm_sin(arg);
  }
  out[i] = v;
}

template <typename t_t, typename acc>
__global__ void __launch_bounds__(kRowThreads) timestep_embedding_backward_kernel(const acc* __restrict__ grad,
                                                                                  const t_t* __restrict__ t,
                                                                                  t_t* __restrict__ dt, int64_t dim,
                                                                                  TimestepConstants<acc> tc,
                                                                                  bool flip) {
  __shared__ acc shared[32];
  const int64_t b = blockIdx.x;
  const acc tb = static_cast<acc>(t[b]);
  const acc* g1 = grad + b * dim;
  const acc* g2 = g1 + tc.half;
  acc s = 0;
  for (int64_t k = threadIdx.x; k < tc.half; k += blockDim.x) {
    const acc f = timestep_frequency(tc, k);
    const acc arg = timestep_argument(tc, tb, f);
    const acc gs = flip ? g2[k] : g1[k];
    const acc gc = flip ? g1[k] : g2[k];
    s += (gs * norm_cos(arg) - gc * norm_sin(arg)) * (tc.s * f);
  }
  s = block_sum(s, shared);
  if (threadIdx.x == 0) dt[b] = static_cast<t_t>(s);
}

at::Tensor timestep_embedding_cuda(const at::Tensor& t_in, int64_t dim, double max_period,
                                   double downscale_freq_shift, double scale, bool flip_sin_to_cos) {
  const at::Tensor t = norm::check_timestep_args(t_in, dim, max_period, downscale_freq_shift, c10::kCUDA);
  const c10::cuda::CUDAGuard guard(t.device());
  const bool f64 = t.scalar_type() == at::kDouble;
  const int64_t B = t.size(0);
  at::Tensor out = at::empty({B, dim}, t.options().dtype(norm::timestep_out_type(t)));
  if (B == 0) return out;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_ALL_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "timestep_embedding_cuda", [&] {
    if (f64) {
      timestep_embedding_kernel<scalar_t, double><<<grid_for(B * dim, kThreads), kThreads, 0, stream>>>(
          t.data_ptr<scalar_t>(), out.data_ptr<double>(), B, dim,
          timestep_constants<double>(dim, max_period, downscale_freq_shift, scale), flip_sin_to_cos);
    } else {
      timestep_embedding_kernel<scalar_t, float><<<grid_for(B * dim, kThreads), kThreads, 0, stream>>>(
          t.data_ptr<scalar_t>(), out.data_ptr<float>(), B, dim,
          timestep_constants<float>(dim, max_period, downscale_freq_shift, scale), flip_sin_to_cos);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor timestep_embedding_backward_cuda(const at::Tensor& grad_in, const at::Tensor& t_in, int64_t dim,
                                            double max_period, double downscale_freq_shift, double scale,
                                            bool flip_sin_to_cos) {
  const at::Tensor t = norm::check_timestep_args(t_in, dim, max_period, downscale_freq_shift, c10::kCUDA);
  const at::Tensor grad = norm::check_timestep_backward_args(grad_in, t, dim, c10::kCUDA);
  const c10::cuda::CUDAGuard guard(t.device());
  const bool f64 = t.scalar_type() == at::kDouble;
  const int64_t B = t.size(0);
  at::Tensor dt = at::empty_like(t);
  if (B == 0) return dt;
  TORCH_CHECK(B <= 0x7fffffffLL, "pygen: timestep_embedding_backward: too many timesteps");
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "timestep_embedding_backward_cuda", [&] {
    const dim3 grid(static_cast<unsigned int>(B));
    if (f64) {
      timestep_embedding_backward_kernel<scalar_t, double><<<grid, kRowThreads, 0, stream>>>(
          grad.data_ptr<double>(), t.data_ptr<scalar_t>(), dt.data_ptr<scalar_t>(), dim,
          timestep_constants<double>(dim, max_period, downscale_freq_shift, scale), flip_sin_to_cos);
    } else {
      timestep_embedding_backward_kernel<scalar_t, float><<<grid, kRowThreads, 0, stream>>>(
          grad.data_ptr<float>(), t.data_ptr<scalar_t>(), dt.data_ptr<scalar_t>(), dim,
          timestep_constants<float>(dim, max_period, downscale_freq_shift, scale), flip_sin_to_cos);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return dt;
}

}  // namespace

TORCH_LIBRARY_IMPL(pygen, CUDA, m) {
  m.impl("adaln_modulate", &adaln_modulate_cuda);
  m.impl("adaln_modulate_backward", &adaln_modulate_backward_cuda);
  m.impl("gated_residual", &gated_residual_cuda);
  m.impl("gated_residual_backward", &gated_residual_backward_cuda);
  m.impl("group_norm", &group_norm_cuda);
  m.impl("group_norm_backward", &group_norm_backward_cuda);
  m.impl("timestep_embedding", &timestep_embedding_cuda);
  m.impl("timestep_embedding_backward", &timestep_embedding_backward_cuda);
}

}  // namespace pygen::cuda
