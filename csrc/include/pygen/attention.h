// pygen/attention.h — scalar pieces of scaled dot-product attention shared by
// the C++ CPU (csrc/cpu/attention.cpp) and CUDA (csrc/cuda/attention.cu)
// kernels of torch.ops.pygen.attention_fwd / attention_bwd. Torch-free.
//
//   out[i]  = sum_j softmax_j(scale · q_i·k_j) v_j     over the keys j visible to query i
//   lse[i]  = log sum_j exp(scale · q_i·k_j)            (natural log, fp32)
//
// The kernels work in base 2: s2 = (scale · log2 e) · q·k, p = exp2(s2 - m2),
// lse = ln 2 · (m2 + log2 l). Causal masking is top-left aligned, as torch's
// scaled_dot_product_attention(is_causal=True): key j is visible to query i iff
// j <= i, for any (Sq, Sk). Every query row sees at least key 0, so with
// Sk >= 1 no row is empty.
#pragma once
#include <cstdint>

#include "pygen/common.h"

namespace pygen::attention {

constexpr double kLog2e = 1.4426950408889634074;
constexpr double kLn2 = 0.69314718055994530942;

// Key j is visible to query i.
PYGEN_HD bool key_visible(int64_t i, int64_t j, bool causal) { return !causal || j <= i; }

// Keys [0, key_end) are all keys visible to any query in [0, q_end) (q_end >= 1).
PYGEN_HD int64_t key_end(int64_t q_end, int64_t sk, bool causal) {
  return causal ? (q_end < sk ? q_end : sk) : sk;
}

// The first query that sees key j (queries [query_begin, Sq) see it).
PYGEN_HD int64_t query_begin(int64_t j, bool causal) { return causal ? j : 0; }

}  // namespace pygen::attention
