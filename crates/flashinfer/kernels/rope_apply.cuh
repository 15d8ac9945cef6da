// rope_apply.cuh: rope_apply_paged, RoPE applied to the keys of a paged KV cache as a pass of its
// own (rope.rs): every used slot's K rows, all KV heads, rotated to the slot's position and written
// to `dst` (a copy of the pool, or the pool itself: each thread reads its elements before writing
// them, and no two threads touch one element). The fused decode kernels do the same rotation
// on the fly; this pass is the baseline they are measured against, and a tool for callers whose
// cache holds unrotated keys.
//
// Llama style (crate::variant): the pair (d, d + head_dim / 2) of a row at position pos turns by
// pos / rope_scale * theta^(-2d / head_dim), with the angles of rope_sincos (common.cuh) and the
// frequencies computed as the decode kernels compute them.
//
// The generated source includes common.cuh and defines DTypeKV (a 16-bit type) before including
// this file.
// Work: one block per (entry, KV head). An entry is a run of slots of one page; rope.rs cuts pages
// into entries of at most SLOTS_PER_ENTRY slots, so that any page size spreads over many blocks.
// Thread (c, r) rotates 16-byte chunk c of the first half and its partner chunk in
// the second half, for slots r, r + blockDim.y, ... of the entry. The host checks that head_dim
// is a multiple of 16, that blockDim.x = head_dim / 16, and that strides and pointers are 16-byte
// multiples.
#pragma once
#include "common.cuh"

static_assert(sizeof(DTypeKV) == 2, "rope_apply_paged takes 16-bit elements");

// `count` consecutive slots of page `page`, from slot `slot`, whose first is at position `pos`.
struct RopeEntry {
  int page, slot, pos, count;
};

extern "C" __global__ void rope_apply_paged(const DTypeKV* src, DTypeKV* dst, const RopeEntry* __restrict__ entries,
                                            long long page_stride, long long token_stride, long long head_stride,
                                            int head_dim, float log2_theta, float rcp_scale) {
  const RopeEntry e = entries[blockIdx.x];
  const int c = threadIdx.x;
  float freq[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) freq[i] = exp2f(-2.f * (float)(c * 8 + i) / (float)head_dim * log2_theta) * rcp_scale;
  const long long base = (long long)e.page * page_stride + (long long)blockIdx.y * head_stride + c * 8;
  for (int s = threadIdx.y; s < e.count; s += blockDim.y) {
    const long long off = base + (long long)(e.slot + s) * token_stride;
    float x[8], y[8];
    load_vec_f32<DTypeKV, 8>(src + off, x);
    load_vec_f32<DTypeKV, 8>(src + off + head_dim / 2, y);
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      float sn, cs;
      rope_sincos(e.pos + s, freq[i], sn, cs);
      const float x0 = x[i];
      x[i] = x0 * cs - y[i] * sn;
      y[i] = x0 * sn + y[i] * cs;
    }
    store_vec_f32<DTypeKV, 8>(dst + off, x);
    store_vec_f32<DTypeKV, 8>(dst + off + head_dim / 2, y);
  }
}
