// state.cuh: the attention state (o, lse) and its exact merge (the paper's ⊕ operator).
//
// A state over a set of keys is (o = softmax-weighted sum of values, lse = log2 of the sum of
// exp2(scores)). Two states over disjoint key sets merge exactly:
//   lse = log2(2^lse_a + 2^lse_b),  o = o_a * 2^(lse_a - lse) + o_b * 2^(lse_b - lse).
// A state with lse = -inf is empty (no key seen) and contributes nothing.
#pragma once
#include "common.cuh"

// Running merge of many states for VEC output elements: keeps the running max `m` and the sum `d`
// of 2^(lse_i - m) so that no exponent overflows.
template <int VEC>
struct MergeAcc {
  float m = NEG_INF, d = 0.f, o[VEC];
  __device__ __forceinline__ MergeAcc() {
#pragma unroll
    for (int i = 0; i < VEC; ++i) o[i] = 0.f;
  }
  __device__ __forceinline__ void add(const float* v, float lse) {
    if (lse == NEG_INF) return;
    float m_new = fmaxf(m, lse);
    float scale_old = fast_exp2(m - m_new);  // m = -inf -> 0
    float w = fast_exp2(lse - m_new);
    d = d * scale_old + w;
#pragma unroll
    for (int i = 0; i < VEC; ++i) o[i] = o[i] * scale_old + v[i] * w;
    m = m_new;
  }
  // Normalised output (zeros when nothing was merged) and the merged lse (base 2).
  __device__ __forceinline__ float finish(float* out) const {
    float inv = d > 0.f ? 1.f / d : 0.f;
#pragma unroll
    for (int i = 0; i < VEC; ++i) out[i] = o[i] * inv;
    return d > 0.f ? m + fast_log2(d) : NEG_INF;
  }
};

// Folds an attention sink (a state with lse `sink`, base 2, and no value) into an unnormalised row
// state (m, den, acc over V output elements). Called exactly once per output row, where the final
// output is written (after the split-KV merge for a split row), never into a partial state.
// The same for a row whose values the caller scales itself: returns the factor for them.
__device__ __forceinline__ float sink_fold(float sink, float& m, float& den) {
  const float m_new = fmaxf(m, sink);
  const float f = fast_exp2(m - m_new);  // m = -inf (no key seen) -> 0
  den = den * f + fast_exp2(sink - m_new);
  m = m_new;
  return f;
}
template <int V>
__device__ __forceinline__ void add_sink(float sink, float& m, float& den, float* acc) {
  const float f = sink_fold(sink, m, den);
#pragma unroll
  for (int i = 0; i < V; ++i) acc[i] *= f;
}
