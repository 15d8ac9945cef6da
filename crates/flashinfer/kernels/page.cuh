// page.cuh: append_paged_kv_cache, writing new tokens' K and V rows into their slots of a paged KV
// cache (any layout: NHD or HND, separate or combined K/V, any page stride).
//
// For every new token t < nnz, KV head h < num_kv_heads and byte b < row_bytes:
//   k_cache[(dst[t] + h * head_stride) * elem_bytes + b] = k_new[(t * num_kv_heads + h) * row_bytes + b]
//   v_cache[...same...]                                  = v_new[...same...]
// where dst[t] = page * page_stride + slot * token_stride is the element offset of the token's
// head-0 row, computed on the host by plan() from the page table (layout/append.rs), and v_cache
// already points at V of page 0 (K's pointer plus v_offset for a combined tensor). A copy needs
// no element type: everything moves in 16-byte chunks, so one kernel serves f16, bf16 and f32.
// The host checks that row_bytes, the strides in bytes and every pointer are multiples of 16, and
// that no two tokens share a slot (so no two threads write one address).
//
// Thread layout: block (chunks_per_row, rows_per_block), one thread per 16-byte chunk of one
// (token, head) row, so a warp reads and writes whole contiguous rows; grid.x covers the
// nnz * num_kv_heads rows. Shared memory: none.
#pragma once

extern "C" __global__ void append_paged_kv_cache(const uint4* __restrict__ k_new, const uint4* __restrict__ v_new,
                                                 const long long* __restrict__ dst, char* k_cache, char* v_cache,
                                                 long long num_rows, int num_kv_heads, long long head_stride,
                                                 int elem_bytes) {
  long long row = (long long)blockIdx.x * blockDim.y + threadIdx.y;
  if (row >= num_rows) return;
  long long token = row / num_kv_heads;
  long long head = row - token * num_kv_heads;
  long long src = row * blockDim.x + threadIdx.x;
  long long off = (dst[token] + head * head_stride) * elem_bytes + 16ll * threadIdx.x;
  uint4 k = k_new[src];
  uint4 v = v_new[src];
  *reinterpret_cast<uint4*>(k_cache + off) = k;
  *reinterpret_cast<uint4*>(v_cache + off) = v;
}
