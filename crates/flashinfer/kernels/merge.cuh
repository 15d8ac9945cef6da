// merge.cuh: merging attention states on the GPU (merge_state, merge_state_in_place, merge_states,
// merge_states_varlen). The generated source defines TIn (input values), TOut (output values) and
// VEC (elements per thread, dividing head_dim) before including this file.
//
// Thread layout: block (head_dim / VEC, heads_per_block); grid (rows, ceil(num_heads /
// heads_per_block)). Each thread merges VEC consecutive elements of one head of one row.
// Shared memory: none. LSE arrives in the caller's base; `lse_in_to_log2` converts it to base 2
// (1 or log2 e) and `lse_log2_to_out` converts the result back.
#pragma once
#include "state.cuh"

struct MergeCoord {
  int row, head, d0;
  bool valid;
};

__device__ __forceinline__ MergeCoord merge_coord(int num_heads, int head_dim) {
  MergeCoord c;
  c.row = blockIdx.x;
  c.head = blockIdx.y * blockDim.y + threadIdx.y;
  c.d0 = threadIdx.x * VEC;
  c.valid = c.head < num_heads && c.d0 < head_dim;
  return c;
}

template <class T>
__device__ __forceinline__ void merge_add(MergeAcc<VEC>& acc, const T* v, const float* s, long long state,
                                          const MergeCoord& c, int num_heads, int head_dim, float to_log2) {
  float x[VEC];
  load_vec_f32<T, VEC>(v + (state * num_heads + c.head) * head_dim + c.d0, x);
  acc.add(x, s[state * num_heads + c.head] * to_log2);
}

__device__ __forceinline__ void merge_store(const MergeAcc<VEC>& acc, TOut* vo, float* so, long long row,
                                            const MergeCoord& c, int num_heads, int head_dim, float from_log2) {
  float y[VEC];
  float lse = acc.finish(y);
  store_vec_f32<TOut, VEC>(vo + (row * num_heads + c.head) * head_dim + c.d0, y);
  if (so != nullptr && c.d0 == 0) so[row * num_heads + c.head] = lse == NEG_INF ? lse : lse * from_log2;
}

extern "C" __global__ void merge_state(const TIn* va, const float* sa, const TIn* vb, const float* sb, TOut* vo,
                                       float* so, int num_heads, int head_dim, float to_log2, float from_log2) {
  MergeCoord c = merge_coord(num_heads, head_dim);
  if (!c.valid) return;
  MergeAcc<VEC> acc;
  merge_add(acc, va, sa, c.row, c, num_heads, head_dim, to_log2);
  merge_add(acc, vb, sb, c.row, c, num_heads, head_dim, to_log2);
  merge_store(acc, vo, so, c.row, c, num_heads, head_dim, from_log2);
}

// v, s <- merge((v, s), (v_other, s_other)) for rows whose mask byte is nonzero (all rows if null).
extern "C" __global__ void merge_state_in_place(TOut* v, float* s, const TIn* v_other, const float* s_other,
                                                const unsigned char* mask, int num_heads, int head_dim,
                                                float to_log2, float from_log2) {
  MergeCoord c = merge_coord(num_heads, head_dim);
  if (mask != nullptr && mask[c.row] == 0) return;  // uniform over the block: row = blockIdx.x
  MergeAcc<VEC> acc;
  if (c.valid) {
    merge_add(acc, (const TOut*)v, s, c.row, c, num_heads, head_dim, to_log2);
    merge_add(acc, v_other, s_other, c.row, c, num_heads, head_dim, to_log2);
  }
  __syncthreads();  // every thread of a head has read s[row, head] before it is rewritten
  if (c.valid) merge_store(acc, v, s, c.row, c, num_heads, head_dim, from_log2);
}

// v: [rows, num_states, heads, dim] -> vo: [rows, heads, dim].
extern "C" __global__ void merge_states(const TIn* v, const float* s, TOut* vo, float* so, int num_states,
                                        int num_heads, int head_dim, float to_log2, float from_log2) {
  MergeCoord c = merge_coord(num_heads, head_dim);
  if (!c.valid) return;
  MergeAcc<VEC> acc;
  for (int k = 0; k < num_states; ++k)
    merge_add(acc, v, s, (long long)c.row * num_states + k, c, num_heads, head_dim, to_log2);
  merge_store(acc, vo, so, c.row, c, num_heads, head_dim, from_log2);
}

// States indptr[i]..indptr[i+1] of v: [total, heads, dim] merge into row out_rows[i] (i if null).
extern "C" __global__ void merge_states_varlen(const TIn* v, const float* s, const int* indptr, const int* out_rows,
                                               TOut* vo, float* so, int num_heads, int head_dim, float to_log2,
                                               float from_log2) {
  MergeCoord c = merge_coord(num_heads, head_dim);
  if (!c.valid) return;
  MergeAcc<VEC> acc;
  for (int k = indptr[c.row]; k < indptr[c.row + 1]; ++k) merge_add(acc, v, s, k, c, num_heads, head_dim, to_log2);
  long long out_row = out_rows != nullptr ? out_rows[c.row] : c.row;
  merge_store(acc, vo, so, out_row, c, num_heads, head_dim, from_log2);
}
