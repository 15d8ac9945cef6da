// decode_common.cuh: what both decode kernels (decode.cuh on CUDA cores, decode_tc.cuh on tensor
// cores) share: the work-list entry, the parameter block, and the in-kernel merge of split-KV
// partial states. Included after the generated source has defined DTypeQ, DTypeKV, DTypeO,
// HEAD_DIM and GROUP (and, for a variant, its VARIANT_* switches).
#pragma once
#include "state.cuh"
#include "decode_variant.cuh"

// One unit of work: `kv_len` keys of `request` starting at token `kv_start`; the request's pages
// start at kv_indices[page_begin]. `partial` >= 0: the request is split into `num_pieces` chunks
// whose partial states live in slots merge_begin .. merge_begin + num_pieces; this one is `partial`.
struct DecodeWork {
  int request, page_begin, kv_start, kv_len, partial, merge_begin, num_pieces;
};

// Work items the launch parameters can carry (decode/mod.rs: INLINE_WORK).
constexpr int INLINE_WORK = 32;

struct DecodeParams {
  const DTypeQ* q;            // [batch, num_qo_heads, HEAD_DIM]
  const DTypeKV* k;           // page pool (K)
  const DTypeKV* v;           // page pool (V)
  const int* kv_indices;      // page ids; null: page i of a request is page_begin + i
  const DecodeWork* work;     // [num_work]
  const int* num_work;        // work items of this plan; blocks past it exit (CUDA-graph mode)
  DTypeO* o;                  // [batch, num_qo_heads, HEAD_DIM]
  float* lse;                 // [batch, num_qo_heads] or null
  float* partial_o;           // [num_partial, num_qo_heads, HEAD_DIM]
  float* partial_lse;         // [num_partial, num_qo_heads] (base 2)
  int* counters;              // [batch, num_kv_heads], zero between runs
  long long page_stride;      // elements between pages
  long long token_stride;     // elements between tokens of a page
  long long head_stride;      // elements between heads of a page
  int page_size;
  FastDiv page_size_div;      // division by page_size
  int num_qo_heads;
  float sm_scale_log2;        // softmax scale * log2(e)
  float lse_out_scale;        // base-2 lse -> caller's base
  // Variants (decode_variant.cuh; unused by a plain kernel):
  float softcap_in;                // sm_scale / cap
  float softcap_out;               // cap * log2(e)
  const float* alibi_slopes_log2;  // [num_qo_heads] slope * log2(e)
  const float* sinks_log2;         // [num_qo_heads] sink logit * log2(e)
  const int* kv_lens;              // [batch] keys of each request (ALiBi, RoPE: its query is at kv_len - 1)
  const int* rope_offsets;         // [batch] RoPE position of each request's first key
  float rope_rcp_scale;            // 1 / rope_scale
  float rope_log2_theta;           // log2(rope_theta)
  // A plan of at most INLINE_WORK items outside graph mode travels in the launch's parameters
  // (num_inline > 0: every item is here, and `work` / `num_work` are not read): a block's first
  // load, the work item, then costs no DRAM trip before the page ids it leads to.
  int num_inline;
  int inline_pad;
  DecodeWork inline_work[INLINE_WORK];
};

// decode/mod.rs asserts the same size for its copy of this struct.
static_assert(sizeof(DecodeParams) == 192 + INLINE_WORK * 28, "DecodeParams must match decode/mod.rs");

// What q·k is multiplied by before decode_logit (decode_variant.cuh): sm_scale * log2(e) for a
// plain kernel or ALiBi alone, sm_scale / cap under a soft cap.
__device__ __forceinline__ float logit_scale(const DecodeParams& p) {
  return VARIANT_SOFTCAP ? p.softcap_in : p.sm_scale_log2;
}

// One block per (work item, KV head), in one of two orders the host picks per plan
// (DecodeSchedule::heads_fastest): a 1-D grid with the KV heads fastest, so every head of the
// longest item starts first (skewed or split batches: each head's whole longest-first list in
// turn left the last head's long items as the tail), or items on x and heads on y (uniform
// batches: 4 % faster at page size 1).
__device__ __forceinline__ int block_kv_head(const DecodeParams& p) {
  return gridDim.y > 1 ? (int)blockIdx.y : (int)blockIdx.x % (p.num_qo_heads / GROUP);
}
__device__ __forceinline__ int block_item(const DecodeParams& p) {
  return gridDim.y > 1 ? (int)blockIdx.x : (int)blockIdx.x / (p.num_qo_heads / GROUP);
}

#ifndef DECODE_WS
#define DECODE_WS 0
#endif
// The barrier of the threads that compute: the whole block, or (DECODE_WS, decode_tc.cuh) its
// consumer warps, named barrier 1 over 128 threads, once the producer warp has left.
__device__ __forceinline__ void compute_sync() {
#if DECODE_WS
  asm volatile("bar.sync 1, 128;\n" ::: "memory");
#else
  __syncthreads();
#endif
}

// Where key `tok` (< w.kv_len) of the work item lies, in two steps, so that a loader can load the
// page id (a dependent global load) a tile before it needs the offset; every decode loader
// resolves its rows here, the head's offset being the caller's.
// key_page: the key's page id (through the page table, or page_begin + i without one) and, in
// `in_page`, its position in that page.
__device__ __forceinline__ int key_page(const DecodeParams& p, const DecodeWork& w, int tok, int& in_page) {
  const u32 abs_tok = (u32)(w.kv_start + tok);
  const u32 page_idx = p.page_size_div.div(abs_tok);
  in_page = (int)(abs_tok - page_idx * (u32)p.page_size);
  const int page_pos = w.page_begin + (int)page_idx;
  return p.kv_indices != nullptr ? p.kv_indices[page_pos] : page_pos;
}
// page_offset: the element offset in the page pool of position `in_page` of page `page`.
__device__ __forceinline__ long long page_offset(const DecodeParams& p, int page, int in_page) {
  return (long long)page * p.page_stride + (long long)in_page * p.token_stride;
}
// key_offset: both steps at once.
__device__ __forceinline__ long long key_offset(const DecodeParams& p, const DecodeWork& w, int tok) {
  int in_page;
  const int page = key_page(p, w, tok, in_page);
  return page_offset(p, page, in_page);
}

// Whether this block has work: in CUDA-graph mode the grid is sized for the largest plan.
__device__ __forceinline__ bool block_has_work(const DecodeParams& p) {
  return block_item(p) < (p.num_inline > 0 ? p.num_inline : *p.num_work);
}
// This block's work item: from the launch parameters when the plan put it there.
__device__ __forceinline__ DecodeWork block_work(const DecodeParams& p) {
  const int i = block_item(p);
  return p.num_inline > 0 ? p.inline_work[i < p.num_inline ? i : 0] : p.work[i];
}

// Writes a final output row of GROUP heads' slice [d0, d0 + N) and, once per head, its LSE.
template <int N>
__device__ __forceinline__ void write_final(const DecodeParams& p, int request, int qo_head, int d0, const float* o,
                                            float lse2) {
  const long long row = (long long)request * p.num_qo_heads + qo_head;
  store_vec_f32<DTypeO, N>(p.o + row * HEAD_DIM + d0, o);
  if (p.lse != nullptr && d0 == 0) p.lse[row] = lse2 == NEG_INF ? lse2 : lse2 * p.lse_out_scale;
}

// Split-KV: called by every thread of a block after it wrote its partial state. The last block of
// a (request, KV head) to finish merges all the request's pieces, in slot order (so the result
// does not depend on which block came last), and writes the final output. This replaces a second
// kernel launch. `smem` must hold num_pieces * GROUP floats and be free to reuse.
template <int NT>
__device__ __forceinline__ void merge_split_pieces(const DecodeParams& p, const DecodeWork& w, int kv_head, int tid,
                                                   float* smem) {
  __shared__ int is_last;
  __threadfence();  // our partial state is visible device-wide before we count ourselves done
  compute_sync();
  if (tid == 0) {
    int* counter = p.counters + (long long)w.request * (p.num_qo_heads / GROUP) + kv_head;
    const int done = atomicAdd(counter, 1) + 1;
    is_last = done == w.num_pieces;
    if (is_last) *counter = 0;  // ready for the next run (CUDA graph replays reuse the plan)
  }
  compute_sync();
  if (!is_last) return;
  __threadfence();

  const int n = w.num_pieces;
  for (int i = tid; i < n * GROUP; i += NT) {
    const int piece = i / GROUP, g = i % GROUP;
    smem[i] = __ldcg(p.partial_lse + (long long)(w.merge_begin + piece) * p.num_qo_heads + kv_head * GROUP + g);
  }
  compute_sync();
  constexpr int V = 4;
  for (int item = tid; item < GROUP * (HEAD_DIM / V); item += NT) {
    const int g = item / (HEAD_DIM / V), d0 = (item % (HEAD_DIM / V)) * V;
    const int qo_head = kv_head * GROUP + g;
    float m = NEG_INF;
    for (int piece = 0; piece < n; ++piece) m = fmaxf(m, smem[piece * GROUP + g]);
    float acc[V] = {0.f, 0.f, 0.f, 0.f}, den = 0.f;
    if (m != NEG_INF) {
#pragma unroll 8
      for (int piece = 0; piece < n; ++piece) {
        const float wgt = fast_exp2(smem[piece * GROUP + g] - m);  // empty piece: 0
        const float4 v = __ldcg(reinterpret_cast<const float4*>(
            p.partial_o + ((long long)(w.merge_begin + piece) * p.num_qo_heads + qo_head) * HEAD_DIM + d0));
        den += wgt;
        acc[0] += wgt * v.x;
        acc[1] += wgt * v.y;
        acc[2] += wgt * v.z;
        acc[3] += wgt * v.w;
      }
    }
#if VARIANT_SINKS
    add_sink<V>(p.sinks_log2[qo_head], m, den, acc);  // once, into the merged state
#endif
    const float inv = den > 0.f ? 1.f / den : 0.f;
#pragma unroll
    for (int i = 0; i < V; ++i) acc[i] *= inv;
    write_final<V>(p, w.request, qo_head, d0, acc, den > 0.f ? m + fast_log2(den) : NEG_INF);
  }
}
