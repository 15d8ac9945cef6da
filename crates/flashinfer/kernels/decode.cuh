// decode.cuh: batch decode on a paged KV cache, CUDA-core path (one query token per request).
//
// Computes, for each work item (request, KV chunk) and KV head, the attention of the GROUP query
// heads that share that KV head over the chunk's keys, and writes either the final output (and
// LSE) or a partial state that the request's last block merges (split-KV, decode_common.cuh).
//
// The generated source defines before including this file:
//   DTypeQ, DTypeKV, DTypeO   element types
//   HEAD_DIM                  64, 128 or 256
//   GROUP                     query heads per KV head (GQA ratio)
//   BDZ                       token slots working in parallel (independent softmax states)
//   PASSES                    row-load passes per tile; TILE = GROUP * BDZ * PASSES tokens
//   NSTAGE                    depth of the cp.async pipeline (tiles in flight)
//   VARIANT_*                 (optional) the attention variants compiled in (decode_variant.cuh)
// (decode/tiles.rs chooses them.)
// Under RoPE each tile's keys are rotated in shared memory after they land (one more barrier per
// tile), since the GROUP query heads of a block all read every key.
//
// Thread layout: block (BDX, GROUP, BDZ), BDX = HEAD_DIM / VEC with VEC = 16 bytes of KV. Lane tx
// owns elements [tx*VEC, tx*VEC + VEC) of one query head (ty) for the tokens of slot tz. q·k sums
// over the BDX lanes of a group with shuffles; p·v needs no reduction.
// Loads: every thread copies 16-byte pieces of K and V rows (whole rows are BDX consecutive
// threads, so each row is one coalesced 128/256/512-byte transaction) into shared memory with
// cp.async, NSTAGE - 1 tiles ahead; the page ids of the next tile are read one iteration ahead.
// Shared memory: 2 * NSTAGE * TILE * HEAD_DIM * sizeof(DTypeKV) bytes for K and V tiles, reused at
// the end for the BDZ partial states (BDZ * GROUP * (HEAD_DIM + 2) floats).
#pragma once
#include "decode_common.cuh"

constexpr int VEC = 16 / sizeof(DTypeKV);
constexpr int BDX = HEAD_DIM / VEC;
constexpr int NUM_THREADS = BDX * GROUP * BDZ;
constexpr int ROWS_PER_PASS = GROUP * BDZ;
constexpr int TILE = ROWS_PER_PASS * PASSES;
constexpr int TOKENS_PER_SLOT = TILE / BDZ;
static_assert(HEAD_DIM % VEC == 0, "head_dim must be a multiple of 16 bytes");
static_assert(NUM_THREADS <= 1024, "too many threads per block");

extern "C" __global__ void __launch_bounds__(NUM_THREADS)
batch_decode(const __grid_constant__ DecodeParams p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  DTypeKV* k_smem = reinterpret_cast<DTypeKV*>(smem_raw);
  DTypeKV* v_smem = k_smem + NSTAGE * TILE * HEAD_DIM;

  const int tx = threadIdx.x, ty = threadIdx.y, tz = threadIdx.z;
  const int tid = tx + BDX * (ty + GROUP * tz);
  const int kv_head = block_kv_head(p);
  const int qo_head = kv_head * GROUP + ty;
  // Both loads in flight at once: the work list always has a slot for every block of the grid.
  const DecodeWork w = block_work(p);
  if (!block_has_work(p)) return;  // uniform over the block, before any barrier

  // This thread's query slice, pre-scaled so that scores come out in base 2 (under a soft cap: as
  // the natural logit over the cap, which decode_logit then caps).
  float q[VEC];
  load_vec_f32<DTypeQ, VEC>(p.q + ((long long)w.request * p.num_qo_heads + qo_head) * HEAD_DIM + tx * VEC, q);
#if VARIANT_ROPE
  // RoPE (decode_variant.cuh): lanes tx and tx +- ROPE_HALF hold the two halves of the same pairs.
  // The query is rotated here, once (each lane also reads its partner's slice); the keys, shared
  // by the GROUP query heads, are rotated once per tile in shared memory (below).
  constexpr int ROPE_HALF = BDX / 2;  // 16-byte chunks per half row
  const int rope_off = p.rope_offsets[w.request];
  {
    const int partner = tx < ROPE_HALF ? tx + ROPE_HALF : tx - ROPE_HALF;
    float qp[VEC];
    load_vec_f32<DTypeQ, VEC>(p.q + ((long long)w.request * p.num_qo_heads + qo_head) * HEAD_DIM + partner * VEC, qp);
    const int q_pos = rope_off + p.kv_lens[w.request] - 1;
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      float sn, cs;
      rope_sincos(q_pos, rope_inv_freq((tx % ROPE_HALF) * VEC + i, p.rope_log2_theta, p.rope_rcp_scale), sn, cs);
      // First half: x cos - y sin with y the partner's; second half: x sin + y cos with x its.
      q[i] = tx < ROPE_HALF ? q[i] * cs - qp[i] * sn : qp[i] * sn + q[i] * cs;
    }
  }
  // The rope pass: thread tid rotates chunk rope_chunk (and its partner) of rows tid / ROPE_HALF +
  // k * ROPE_ROW_STEP of each tile; its VEC frequencies are the same for every row.
  constexpr int ROPE_ROW_STEP = NUM_THREADS / ROPE_HALF;
  static_assert(NUM_THREADS % ROPE_HALF == 0, "RoPE: a fixed chunk per thread");
  const int rope_chunk = tid % ROPE_HALF;
  float rope_freq[VEC];
#pragma unroll
  for (int i = 0; i < VEC; ++i) rope_freq[i] = rope_inv_freq(rope_chunk * VEC + i, p.rope_log2_theta, p.rope_rcp_scale);
  const int rope_k0 = rope_off + w.kv_start;  // position of the item's first key
#endif
#pragma unroll
  for (int i = 0; i < VEC; ++i) q[i] *= logit_scale(p);
#if VARIANT_LOGITS
  // ALiBi: this query head's slope, and the position of the item's first key relative to the
  // query's (kv_len - 1).
  const float alibi_slope = VARIANT_ALIBI ? p.alibi_slopes_log2[qo_head] : 0.f;
  const int rel0 = VARIANT_ALIBI ? w.kv_start - (p.kv_lens[w.request] - 1) : 0;
#endif

  // Global element offset of the rows this thread copies in tile `t` (-1 past the chunk's end).
  const int load_row = tid / BDX;
  const long long head_off = (long long)kv_head * p.head_stride + tx * VEC;
  long long row_off[PASSES];
  auto resolve_rows = [&](int t) {
#pragma unroll
    for (int s = 0; s < PASSES; ++s) {
      int tok = t * TILE + load_row + s * ROWS_PER_PASS;
      if (tok < w.kv_len) {
        row_off[s] = key_offset(p, w, tok) + head_off;
      } else {
        row_off[s] = -1;
      }
    }
  };
  auto issue_tile = [&](int stage) {
#pragma unroll
    for (int s = 0; s < PASSES; ++s) {
      int r = load_row + s * ROWS_PER_PASS;
      long long off = row_off[s] < 0 ? 0 : row_off[s];
      int bytes = row_off[s] < 0 ? 0 : 16;
      cp_async_16(k_smem + (stage * TILE + r) * HEAD_DIM + tx * VEC, p.k + off, bytes);
      cp_async_16(v_smem + (stage * TILE + r) * HEAD_DIM + tx * VEC, p.v + off, bytes);
    }
  };

  const int num_tiles = (w.kv_len + TILE - 1) / TILE;
  resolve_rows(0);
#pragma unroll
  for (int s = 0; s < NSTAGE - 1; ++s) {
    if (s < num_tiles) {
      issue_tile(s);
      resolve_rows(s + 1);
    }
    cp_async_commit();
  }

  float m = NEG_INF, d = 0.f, o[VEC];
#pragma unroll
  for (int i = 0; i < VEC; ++i) o[i] = 0.f;

  for (int t = 0; t < num_tiles; ++t) {
    cp_async_wait<NSTAGE - 2>();
    __syncthreads();
    {
      int next = t + NSTAGE - 1;
      if (next < num_tiles) {
        issue_tile(next % NSTAGE);
        resolve_rows(next + 1);
      }
      cp_async_commit();
    }
    const int stage = t % NSTAGE;
#if VARIANT_ROPE
    {
      // Rotate the tile's keys in place, then publish them to the other threads. Rows are visited
      // in increasing order, so the first row past the chunk's end ends this thread's part (the
      // barrier below is outside the loop: every thread reaches it).
      DTypeKV* ks = k_smem + stage * TILE * HEAD_DIM;
      for (int r = tid / ROPE_HALF; r < TILE; r += ROPE_ROW_STEP) {
        if (t * TILE + r >= w.kv_len) break;
        DTypeKV* lo_p = ks + r * HEAD_DIM + rope_chunk * VEC;
        DTypeKV* hi_p = lo_p + HEAD_DIM / 2;
        float x[VEC], y[VEC];
        load_vec_f32<DTypeKV, VEC>(lo_p, x);
        load_vec_f32<DTypeKV, VEC>(hi_p, y);
        const int pos = rope_k0 + t * TILE + r;
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          float sn, cs;
          rope_sincos(pos, rope_freq[i], sn, cs);
          rope_pair(x[i], y[i], sn, cs);
        }
        store_vec_f32<DTypeKV, VEC>(lo_p, x);
        store_vec_f32<DTypeKV, VEC>(hi_p, y);
      }
      __syncthreads();
    }
#endif
    const DTypeKV* kt = k_smem + (stage * TILE + tz * TOKENS_PER_SLOT) * HEAD_DIM + tx * VEC;
    const DTypeKV* vt = v_smem + (stage * TILE + tz * TOKENS_PER_SLOT) * HEAD_DIM + tx * VEC;
    const int valid = w.kv_len - (t * TILE + tz * TOKENS_PER_SLOT);  // tokens of this slot in range

    float s[TOKENS_PER_SLOT];
    float m_tile = NEG_INF;
#pragma unroll
    for (int j = 0; j < TOKENS_PER_SLOT; ++j) {
      float kf[VEC];
      load_vec_f32<DTypeKV, VEC>(kt + j * HEAD_DIM, kf);
      float acc = 0.f;
#pragma unroll
      for (int i = 0; i < VEC; ++i) acc = fmaf(q[i], kf[i], acc);
      acc = group_sum<BDX>(acc);
#if VARIANT_LOGITS
      acc = decode_logit(acc, p.softcap_out, alibi_slope, rel0 + t * TILE + tz * TOKENS_PER_SLOT + j);
#endif
      s[j] = j < valid ? acc : NEG_INF;
      m_tile = fmaxf(m_tile, s[j]);
    }
    const float m_new = fmaxf(m, m_tile);
    if (m_new == NEG_INF) continue;  // nothing of this slot in range yet
    const float rescale = fast_exp2(m - m_new);
    d *= rescale;
#pragma unroll
    for (int i = 0; i < VEC; ++i) o[i] *= rescale;
#pragma unroll
    for (int j = 0; j < TOKENS_PER_SLOT; ++j) {
      const float pj = fast_exp2(s[j] - m_new);
      d += pj;
      float vf[VEC];
      load_vec_f32<DTypeKV, VEC>(vt + j * HEAD_DIM, vf);
#pragma unroll
      for (int i = 0; i < VEC; ++i) o[i] = fmaf(pj, vf[i], o[i]);
    }
    m = m_new;
  }
  cp_async_wait<0>();
  __syncthreads();

  // Merge the BDZ slots' states through shared memory (reusing the K/V tiles).
  float* st_o = reinterpret_cast<float*>(smem_raw);           // [BDZ][GROUP][HEAD_DIM]
  float* st_md = st_o + BDZ * GROUP * HEAD_DIM;                // [BDZ][GROUP][2]
  if constexpr (BDZ > 1) {
#pragma unroll
    for (int i = 0; i < VEC; ++i) st_o[(tz * GROUP + ty) * HEAD_DIM + tx * VEC + i] = o[i];
    if (tx == 0) {
      st_md[(tz * GROUP + ty) * 2] = m;
      st_md[(tz * GROUP + ty) * 2 + 1] = d;
    }
    __syncthreads();
    float m_all = NEG_INF;
#pragma unroll
    for (int z = 0; z < BDZ; ++z) m_all = fmaxf(m_all, st_md[(z * GROUP + ty) * 2]);
    d = 0.f;
#pragma unroll
    for (int i = 0; i < VEC; ++i) o[i] = 0.f;
    if (m_all != NEG_INF) {
#pragma unroll
      for (int z = 0; z < BDZ; ++z) {
        float mz = st_md[(z * GROUP + ty) * 2];
        float scale = fast_exp2(mz - m_all);  // mz = -inf -> 0
        d += st_md[(z * GROUP + ty) * 2 + 1] * scale;
#pragma unroll
        for (int i = 0; i < VEC; ++i) o[i] += st_o[(z * GROUP + ty) * HEAD_DIM + tx * VEC + i] * scale;
      }
    }
    m = m_all;
  }

#if VARIANT_SINKS
  // The sink joins the final state only; a split request's last block adds it after the merge.
  if (w.partial < 0) add_sink<VEC>(p.sinks_log2[qo_head], m, d, o);
#endif
  const float inv = d > 0.f ? 1.f / d : 0.f;
#pragma unroll
  for (int i = 0; i < VEC; ++i) o[i] *= inv;
  const float lse2 = d > 0.f ? m + fast_log2(d) : NEG_INF;
  if (tz == 0) {  // every slot now holds the merged state; slot 0 writes it
    if (w.partial < 0) {
      write_final<VEC>(p, w.request, qo_head, tx * VEC, o, lse2);
    } else {
      const long long row = (long long)w.partial * p.num_qo_heads + qo_head;
      store_vec_f32<float, VEC>(p.partial_o + row * HEAD_DIM + tx * VEC, o);
      if (tx == 0) p.partial_lse[row] = lse2;
    }
  }
  if (w.partial >= 0) {
    __syncthreads();  // the state exchange area is reused by the merge
    merge_split_pieces<NUM_THREADS>(p, w, kv_head, tid, reinterpret_cast<float*>(smem_raw));
  }
}
