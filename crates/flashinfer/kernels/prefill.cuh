// prefill.cuh: batch prefill / append attention on tensor cores (mma.sync, sm_80 and newer), over
// ragged (contiguous) or paged KV.
//
// What it computes: for each work item (a tile of up to CTA_Q packed query rows of one request,
// whose first tile takes the remainder, and a range of its keys) and each KV head,
// softmax(q k^T * scale) v for those rows, written as the
// final output or, when the plan split the request's keys, as a partial state (o, lse) that the
// last block of the tile merges exactly (the paper's composable states).
//
// GQA packing (the paper's appendix A): the GROUP query heads that share a KV head are packed into
// the rows of one tile. Packed row r of a request is (query token r / GROUP, head r % GROUP), so a
// tile of 128 rows at GROUP 4 covers 32 tokens of 4 heads and every K/V element loaded serves all 4.
//
// The generated source defines DTypeQ, DTypeKV, DTypeO, HEAD_DIM (64/128/256), GROUP, WARPS_Q,
// WARPS_KV, M_TILES, KV_TILE, NSTAGE, PAGED (0/1) and MASK_MODE (0 none, 1 causal, 2 custom);
// prefill/tiles.rs chooses them.
//
// Thread layout: WARPS_Q * WARPS_KV warps. Warp (wq, wk) owns packed rows
// [wq * 16 * M_TILES, (wq + 1) * 16 * M_TILES) of the tile (M_TILES mma m-tiles, which share every
// K/V fragment it loads) and tokens [wk * WARP_KV, (wk + 1) * WARP_KV) of each KV tile, with its own
// online-softmax state in registers. WARPS_KV > 1 is the short-append shape (CTA_Q = 16): the KV
// tile is split over the warps, as in decode, and their states merge at the end.
// Every KV tile is loaded by all threads with 16-byte cp.async copies into swizzled shared memory
// (pages resolved once per row, by one lane, one tile ahead), NSTAGE tiles in flight.
//
// Shared memory: Q tile CTA_Q * HEAD_DIM * 2 bytes + NSTAGE * 2 * KV_TILE * HEAD_DIM * 2 bytes of
// K/V stages; after the main loop the same bytes hold the warps' f32 states for the epilogue.
//
// Two matmul backends share everything else (loads, masks, softmax, epilogue, split merge):
// - mma.sync (sm_80+, the portable path): fragments read from shared memory with ldmatrix.
// - wgmma (sm_90a, PREFILL_WGMMA = 1): each warpgroup (4 warps, M_TILES = 1) multiplies its 64
//   rows straight from shared memory (Q and K as descriptors; P from registers times V), with the
//   tiles in wgmma's 128-byte-swizzled layout (wgmma.cuh). Its accumulators have the mma.sync
//   C-fragment layout, so the softmax and epilogue code is the same.
//
// Warp specialisation (wgmma only, PREFILL_WS = 1): an extra producer warpgroup copies the K/V
// tiles and signals each stage's "full" mbarrier; the consumer warpgroups wait on it, compute,
// and release the stage on its "empty" mbarrier (pipeline.cuh). A whole warpgroup, so that its
// registers can move to the consumers (setmaxnreg); its four warps split each tile's rows. No
// block-wide barrier runs per tile, so one warpgroup's softmax overlaps another's matmuls and no
// consumer waits for copies issued by others. Tile transforms that need every thread (RoPE, user
// query/key transforms) keep PREFILL_WS 0.
#pragma once
#include "mma.cuh"
#include "state.cuh"
#ifndef PREFILL_WGMMA
#define PREFILL_WGMMA 0
#endif
#if PREFILL_WGMMA
#include "wgmma.cuh"
#endif
#ifndef PREFILL_WS
#define PREFILL_WS 0
#endif
// Persistent blocks (with PREFILL_WS): one block per SM claims (item, KV head) pairs from a
// counter; the producer loads the next pair's Q and first K/V tiles while the consumers finish
// this one (two Q buffers), and the consumers write the output from registers through their own
// rows of the Q buffer. Plans with split KV do not take it (the merge needs the stage memory the
// producer is refilling).
#ifndef PREFILL_PERSISTENT
#define PREFILL_PERSISTENT 0
#endif
// Debug aid for compute-sanitizer's racecheck, which does not see the ordering that the Q
// buffers' mbarriers give (cp.async with mbarrier arrivals, from NVRTC 13.0 code): the same
// orderings again as named barriers, which it does see (ids 12..15). Slower; the host builds it
// only on request or under compute-sanitizer (`racecheck_shadow` in src/prefill/tiles.rs).
#ifndef PREFILL_RACECHECK_SHADOW
#define PREFILL_RACECHECK_SHADOW 0
#endif
// Ping-pong (with PREFILL_WS and two or three consumer warpgroups): the warpgroups take turns
// issuing their QK^T GEMMs (named barriers 6 + warpgroup, round robin, as FA3's warp scheduler
// barriers), so their softmaxes are staggered and each one's special-function work overlaps the
// others' GEMMs instead of all warpgroups doing softmax at once while the tensor cores idle.
#ifndef PREFILL_PINGPONG
#define PREFILL_PINGPONG 0
#endif
// Intra-warpgroup overlap (with PREFILL_WS, as FA3's IntraWGOverlap): a warpgroup issues tile n's
// QK^T and tile n - 1's PV together, then runs tile n's softmax while the tensor cores do both, so
// the softmax (and a variant's extra work on the logits) hides behind this warpgroup's own GEMMs,
// not only behind the other warpgroups'. A stage is released after its PV, one step later; the
// cost is a second P fragment in registers (KV_TILE / 4 per thread).
#ifndef PREFILL_OVERLAP
#define PREFILL_OVERLAP 0
#endif
#if PREFILL_WS
#include "pipeline.cuh"
#endif

#ifndef MIN_BLOCKS_PER_SM
#define MIN_BLOCKS_PER_SM 1
#endif
// The order in which an item's key tiles are visited: with PREFILL_REVERSE_KV from its last tile
// (the causal diagonal's) back to its first, as FA2/FA3 do. ALiBi's logits grow toward the
// diagonal, so in key order nearly every tile raises some row's max and O is rescaled every tile;
// diagonal first, the first tile sets the max. Chosen by the host (src/prefill/tiles.rs).
#ifndef PREFILL_REVERSE_KV
#define PREFILL_REVERSE_KV 0
#endif
// Rescale slack (log2 units; 0: off), as FlashAttention-4 does: a row's running max, which O and
// the row sum are relative to, moves only when a tile's max exceeds it by more than the slack, so
// most tiles skip O's rescale; P is then at most 2^slack, stored as the KV type (the host keeps
// the slack <= 8: f16 ends at 65504), and the result is exact all the same (O and the sum stay
// relative to the same max, and the final division and LSE use it). The host sets 8, and 0 where
// tiles go diagonal first (src/prefill/tiles.rs, rescale_slack; docs/perf-notes.md, sessions 10
// and 11).
#ifndef PREFILL_RESCALE_SLACK
#define PREFILL_RESCALE_SLACK 0
#endif
// The key tile an item visits i-th (i >= num_tiles: a tile past the item's keys, either way).
__device__ __forceinline__ int kv_tile_at(int i, int num_tiles) {
  return PREFILL_REVERSE_KV && i < num_tiles ? num_tiles - 1 - i : i;
}
// Attention variants (crate::variant has their definitions), each compiled in only when the
// generated source turns it on, so a plain kernel is exactly the plain code.
#ifndef VARIANT_SOFTCAP
#define VARIANT_SOFTCAP 0
#endif
#ifndef VARIANT_ALIBI
#define VARIANT_ALIBI 0
#endif
// Prefetch into L2 the rows of the tile after the one being copied (see prefetch_resolved); chosen
// by the host (PrefillTiles::l2_lookahead).
#ifndef PREFILL_L2_LOOKAHEAD
#define PREFILL_L2_LOOKAHEAD 0
#endif
#ifndef VARIANT_WINDOW
#define VARIANT_WINDOW 0
#endif
#ifndef VARIANT_SINKS
#define VARIANT_SINKS 0
#endif
#ifndef VARIANT_ROPE
#define VARIANT_ROPE 0
#endif
// A user variant (src/user_variant.rs) defines USER_VARIANT 1, struct UserParams, the hooks it
// has (user_query_transform, user_key_transform, user_logits_transform, user_logits_mask,
// user_output_transform, each with its USER_HAS_* switch) and USER_USE_SOFTMAX, before this file.
#ifndef USER_VARIANT
#define USER_VARIANT 0
#endif
#if USER_VARIANT
#define USER_PARAMS_DECL , const UserParams user_params
#else
#define USER_PARAMS_DECL
#define USER_USE_SOFTMAX 1
#define USER_HAS_QUERY_TRANSFORM 0
#define USER_HAS_KEY_TRANSFORM 0
#define USER_HAS_LOGITS_TRANSFORM 0
#define USER_HAS_LOGITS_MASK 0
#define USER_HAS_OUTPUT_TRANSFORM 0
#endif
// Without a softmax (USER_USE_SOFTMAX 0) the transformed logits weigh V directly: no running max,
// no denominator, no LSE (the host refuses an LSE output and split KV for such variants).
// Soft cap and ALiBi change the logits themselves: scores are then moved to the scaled base-2
// domain before the softmax instead of folding the scale into the exponent.
#define VARIANT_LOGITS (VARIANT_SOFTCAP || VARIANT_ALIBI || USER_VARIANT)
// ALiBi alone rides in the S accumulator instead: S = QK^T starts from bias / scale rather than
// zero (one FFMA per score in place of the zeroing), and the scale stays folded into the
// exponent as without variants; with soft cap or a user variant the bias must follow them.
#define ALIBI_IN_ACCUM (VARIANT_ALIBI && !VARIANT_SOFTCAP && !USER_VARIANT)
// The scores are rewritten between QK^T and the softmax (in the scaled base-2 domain).
#define LOGITS_REWRITTEN (VARIANT_LOGITS && !ALIBI_IN_ACCUM)
// Soft cap alone leaves tanh(x / c) and lets the exponent's FFMA multiply by c log2(e), as the
// plain kernel's multiplies by the scale (one FMUL per score less).
#define SOFTCAP_ALONE (VARIANT_SOFTCAP && !VARIANT_ALIBI && !USER_VARIANT)

// NUM_WARPS / NUM_THREADS: the warps that compute (the consumers); the producer warp of the
// warp-specialised kernel comes on top (LAUNCH_THREADS).
constexpr int NUM_WARPS = WARPS_Q * WARPS_KV;
constexpr int NUM_THREADS = NUM_WARPS * 32;
constexpr int PRODUCER_THREADS = PREFILL_WS ? 128 : 0;
constexpr int LAUNCH_THREADS = NUM_THREADS + PRODUCER_THREADS;
constexpr int CTA_Q = WARPS_Q * 16 * M_TILES;
constexpr int WARP_KV = KV_TILE / WARPS_KV;       // tokens of a KV tile per warp
constexpr int NT_KV = WARP_KV / 8;                // n-tiles of 8 tokens in a warp's S
constexpr int CHUNKS = HEAD_DIM / 8;              // 16-byte chunks per row
constexpr int ROWS_PER_PASS = NUM_THREADS / CHUNKS;
constexpr int KV_PASSES = (KV_TILE + ROWS_PER_PASS - 1) / ROWS_PER_PASS;  // the last may be partial
constexpr int Q_PASSES = (CTA_Q + ROWS_PER_PASS - 1) / ROWS_PER_PASS;
constexpr int ST_STRIDE = HEAD_DIM + 8;           // f32 state row stride: float2 stores, no conflicts
static_assert(sizeof(DTypeKV) == 2 && sizeof(DTypeQ) == 2, "the tensor-core prefill takes 16-bit q and KV");
static_assert(WARP_KV % 16 == 0, "each warp takes whole 16-token k-steps of P V");
static_assert(KV_PASSES <= CHUNKS && CHUNKS <= 32, "one lane of a row group resolves each pass");
#if PREFILL_WGMMA
static_assert(WARPS_Q % 4 == 0 && M_TILES == 1 && WARPS_KV == 1, "wgmma: whole warpgroups of 64 rows");
static_assert(HEAD_DIM == 64 || HEAD_DIM == 128, "wgmma: head_dim 64 or 128");
static_assert(KV_TILE == 64 || KV_TILE == 128, "wgmma: 64 or 128 keys per tile");
#endif
#if PREFILL_PERSISTENT
static_assert(PREFILL_WS, "persistent blocks: with the producer warpgroup only");
#endif
static_assert(!PREFILL_OVERLAP || PREFILL_WS, "intra-warpgroup overlap: with the producer warpgroup only");
constexpr int Q_BUFFERS = PREFILL_PERSISTENT ? 2 : 1;
#if PREFILL_WS
static_assert(PREFILL_WGMMA, "warp specialisation: the wgmma backend only");
static_assert(!VARIANT_ROPE && !USER_HAS_QUERY_TRANSFORM && !USER_HAS_KEY_TRANSFORM,
              "warp specialisation: tile transforms need every thread between copy and use");
#endif

#if PREFILL_WS
// Registers: the block is compiled for LAUNCH_REGS per thread (the launch bounds); then the
// producer warpgroup gives most of its share to the consumers (setmaxnreg), as in FA3: three
// consumer warpgroups get 160, two 232 (FA3 gives its TMA producer 24 with two).
constexpr int LAUNCH_REGS = (65536 / (LAUNCH_THREADS * MIN_BLOCKS_PER_SM)) / 8 * 8;
constexpr int PRODUCER_REGS = 32;
constexpr int CONSUMER_REGS_FIT = (LAUNCH_REGS * (NUM_WARPS / 4 + 1) - PRODUCER_REGS) / (NUM_WARPS / 4) / 8 * 8;
constexpr int CONSUMER_REGS = CONSUMER_REGS_FIT < 240 ? CONSUMER_REGS_FIT : 240;
// A block alone on its SM with one consumer warpgroup already has 240 or more per thread: it
// moves nothing (setmaxnreg.inc may not lower a thread's count).
constexpr bool MOVE_REGS = CONSUMER_REGS > LAUNCH_REGS;
static_assert(WARPS_KV == 1, "warp specialisation: every consumer warp reads every stage and releases it");
__device__ __forceinline__ void producer_regs() {
  if constexpr (MOVE_REGS) setmaxnreg_dec<PRODUCER_REGS>();
}
__device__ __forceinline__ void consumer_regs() {
  if constexpr (MOVE_REGS) setmaxnreg_inc<CONSUMER_REGS>();
}
#endif

// tanh on the special-function unit (sm_75 and newer).
__device__ __forceinline__ float tanh_approx(float x) {
  float y;
  asm("tanh.approx.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// The block-wide barrier of the threads that compute (all of them, or all but the producer
// warpgroup, which may have left).
__device__ __forceinline__ void consumers_sync() {
#if PREFILL_WS
  named_barrier_sync<NUM_THREADS>(1);
#else
  __syncthreads();
#endif
}

// Named barrier ids: 1 the consumers (above), 2..4 each consumer warpgroup's epilogue, 5 the
// producer warpgroup's threads (persistent blocks), 12..15 the racecheck shadow's edges.
constexpr int PRODUCER_BARRIER = 5;
static_assert(2 + NUM_WARPS / 4 <= PRODUCER_BARRIER && PRODUCER_BARRIER < 12, "named barrier ids overlap");

#if PREFILL_PINGPONG
static_assert(NUM_WARPS / 4 >= 2 && 6 + NUM_WARPS / 4 <= 12, "ping-pong: 2 or 3 consumer warpgroups, barriers 6..8");
// Opens the first turn (once per block, by every thread of the last consumer warpgroup): its
// arrival stands in for the one that would come from the turn before the first.
__device__ __forceinline__ void pingpong_open() {
  if ((int)threadIdx.x / 128 == NUM_WARPS / 4 - 1) named_barrier_arrive<256>(6);
}
#endif

// Element offset of 16-byte chunk `chunk` of row `row` in a shared tile of ROWS rows.
template <int ROWS>
__device__ __forceinline__ int tile_offset(int row, int chunk) {
#if PREFILL_WGMMA
  return sw128_offset<ROWS>(row, chunk);
#else
  return swizzle<HEAD_DIM>(row, chunk);
#endif
}

#if PREFILL_WGMMA
// O += P V for one stage (issued, not waited for). V is MN-major for this product (dims
// contiguous): 64-dim blocks are KV_TILE * 128 bytes apart, groups of 8 keys 1024 bytes; each
// wgmma takes 16 keys.
__device__ __forceinline__ void issue_pv(float (&o)[HEAD_DIM / 8][4], const u32 (&pa)[KV_TILE / 16][4],
                                         const DTypeKV* vs) {
#pragma unroll
  for (int kt = 0; kt < KV_TILE / 16; ++kt)
    wgmma_rs<DTypeKV, HEAD_DIM>(o, pa[kt], sw128_desc(vs + kt * 16 * 64, KV_TILE * 128, 1024));
}
#endif

#define MASK_NONE 0
#define MASK_CAUSAL 1
#define MASK_CUSTOM 2

// One unit of work, laid out exactly as `PrefillWork` in plan/prefill.rs.
struct PrefillWork {
  int request;
  int q_start;      // row of the request's first query token in q / o
  int qo_len;
  int kv_len;       // the request's keys (causal alignment and custom-mask row length)
  int row_begin;    // first packed row of this tile
  int kv_begin;     // keys [kv_begin, kv_end) of the request are this item's
  int kv_end;
  int kv_offset;    // ragged: row of the request's first key; paged: 0
  int page_begin;   // paged: index into kv_indices of the request's first page
  int mask_offset;  // custom mask: first byte of the request's bits
  int partial;      // partial-state slot, or -1 for the final output
  int merge_begin;  // split tile: first partial slot and number of pieces
  int num_pieces;
  int counter;      // split tile: index of its arrival counter
  int rows;         // packed rows of this tile, at most CTA_Q (a request's first tile may be short)
};
static_assert(sizeof(PrefillWork) == 15 * 4, "PrefillWork: the same layout as in src/plan/prefill.rs");

struct PrefillParams {
  const DTypeQ* q;              // [nnz_qo, num_qo_heads, HEAD_DIM]
  const DTypeKV* k;             // ragged [nnz_kv, num_kv_heads, HEAD_DIM] or the page pool (K)
  const DTypeKV* v;             // same for V
  const int* kv_indices;        // paged: page ids
  const unsigned char* mask;    // custom mask bits (little-endian per request, row-major)
  const PrefillWork* work;      // [num_work]
  const int* num_work;
  DTypeO* o;                    // [nnz_qo, num_qo_heads, HEAD_DIM]
  float* lse;                   // [nnz_qo, num_qo_heads] or null
  float* partial_o;             // [slots, num_kv_heads, CTA_Q, HEAD_DIM]
  float* partial_lse;           // [slots, num_kv_heads, CTA_Q] (base 2)
  int* counters;                // [num_counters, num_kv_heads], zero between runs
  long long page_stride;        // paged: elements between pages
  long long token_stride;       // elements between tokens (of a page, or of the ragged tensor)
  long long head_stride;        // elements between KV heads
  int page_size;
  FastDiv page_size_div;
  int num_qo_heads;
  int num_kv_heads;
  float sm_scale_log2;          // softmax scale * log2(e)
  float lse_out_scale;          // base-2 lse -> caller's base
  // Variants (unused by a plain kernel):
  float softcap_in;             // sm_scale / cap
  float softcap_out;            // cap * log2(e)
  int window_left;              // keys at positions >= query position - window_left
  const float* alibi_slopes_log2;  // [num_qo_heads] slope * log2(e)
  const float* sinks_log2;         // [num_qo_heads] sink logit * log2(e)
  const int* rope_offsets;         // [batch] position of each request's first key, or null (0)
  float rope_rcp_scale;            // 1 / rope_scale
  float rope_log2_theta;           // log2(rope_theta)
};

// prefill/mod.rs asserts the same size for its copy of this struct.
static_assert(sizeof(PrefillParams) == 192, "PrefillParams must match prefill/mod.rs");

#if VARIANT_ROPE
// RoPE, fused: a tile in shared memory is rotated in place after it lands and before the matmuls
// read it (Llama style: the pair (d, d + HEAD_DIM / 2) of a row at position `pos` turns by
// pos / rope_scale * theta^(-2d / HEAD_DIM)). Each thread owns one 8-dim chunk of the first half,
// the same for every row it visits (NUM_THREADS is a multiple of HEAD_DIM / 16), so its 8
// frequencies are computed once.
constexpr int ROPE_HALF_CHUNKS = CHUNKS / 2;
static_assert(NUM_THREADS % ROPE_HALF_CHUNKS == 0, "RoPE: a fixed chunk per thread");

__device__ __forceinline__ void rope_frequencies(const PrefillParams& p, float (&inv_freq)[8]) {
  const int c = threadIdx.x % ROPE_HALF_CHUNKS;
#pragma unroll
  for (int e = 0; e < 8; ++e) {
    const float d = (float)(c * 8 + e);
    inv_freq[e] = exp2f(-2.f * d / (float)HEAD_DIM * p.rope_log2_theta) * p.rope_rcp_scale;
  }
}

// Rotates rows [0, ROWS) of a tile laid out by tile_offset<ROWS>; pos_of(row) < 0 skips a row.
template <int ROWS, class T, class PosFn>
__device__ __forceinline__ void rope_tile(T* tile, const float (&inv_freq)[8], PosFn pos_of) {
  const int c = threadIdx.x % ROPE_HALF_CHUNKS;
  for (int row = threadIdx.x / ROPE_HALF_CHUNKS; row < ROWS; row += NUM_THREADS / ROPE_HALF_CHUNKS) {
    const int pos = pos_of(row);
    if (pos < 0) continue;
    uint4* lo_p = reinterpret_cast<uint4*>(tile + tile_offset<ROWS>(row, c));
    uint4* hi_p = reinterpret_cast<uint4*>(tile + tile_offset<ROWS>(row, c + ROPE_HALF_CHUNKS));
    uint4 lo = *lo_p, hi = *hi_p;
    T* a = reinterpret_cast<T*>(&lo);
    T* b = reinterpret_cast<T*>(&hi);
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      float sn, cs;
      rope_sincos(pos, inv_freq[e], sn, cs);
      const float x = to_float(a[e]), y = to_float(b[e]);
      a[e] = from_float<T>(x * cs - y * sn);
      b[e] = from_float<T>(x * sn + y * cs);
    }
    *lo_p = lo;
    *hi_p = hi;
  }
}
#endif

#if USER_VARIANT
// The user's parameters, copied from the kernel argument once per block so that every helper below
// (and the hooks, which receive it as `params`) can read them.
__shared__ UserParams g_user_params;
#endif
#if USER_HAS_QUERY_TRANSFORM || USER_HAS_KEY_TRANSFORM
// Applies f(row, dim, x) to every element of rows [0, ROWS) of a tile laid out by tile_offset<ROWS>.
template <int ROWS, class T, class Fn>
__device__ __forceinline__ void transform_tile(T* tile, Fn f) {
  for (int i = threadIdx.x; i < ROWS * CHUNKS; i += NUM_THREADS) {
    const int row = i / CHUNKS, c = i % CHUNKS;
    uint4* ptr = reinterpret_cast<uint4*>(tile + tile_offset<ROWS>(row, c));
    uint4 v = *ptr;
    T* x = reinterpret_cast<T*>(&v);
#pragma unroll
    for (int e = 0; e < 8; ++e) x[e] = from_float<T>(f(row, c * 8 + e, to_float(x[e])));
    *ptr = v;
  }
}
#endif

// What a work item covers for this kernel: its valid packed rows, the causal diagonal offset,
// the keys it needs (cut, causal, at its last row's diagonal) and their KV tiles.
struct ItemExtent {
  int valid_rows, diag, kv_stop, num_tiles;
};
__device__ __forceinline__ ItemExtent item_extent(const PrefillWork& w) {
  ItemExtent x;
  x.valid_rows = w.rows;
  x.diag = w.kv_len - w.qo_len;  // causal: token i sees keys <= diag + i
  x.kv_stop = w.kv_end;
  if constexpr (MASK_MODE == MASK_CAUSAL) x.kv_stop = min(x.kv_stop, x.diag + (w.row_begin + x.valid_rows - 1) / GROUP + 1);
  x.num_tiles = x.kv_stop > w.kv_begin ? (x.kv_stop - w.kv_begin + KV_TILE - 1) / KV_TILE : 0;
  return x;
}

// Element offset of key `key` (within the request) of head 0, chunk 0.
__device__ __forceinline__ long long kv_row_offset(const PrefillParams& p, const PrefillWork& w, int key) {
  const u32 abs_tok = (u32)(w.kv_offset + key);
  if constexpr (PAGED) {
    const u32 page_idx = p.page_size_div.div(abs_tok);
    const int page = p.kv_indices[w.page_begin + (int)page_idx];
    return (long long)page * p.page_stride + (long long)(abs_tok - page_idx * (u32)p.page_size) * p.token_stride;
  } else {
    return (long long)abs_tok * p.token_stride;
  }
}

// The L2 look-ahead (PREFILL_L2_LOOKAHEAD): asks L2 for the K and V lines of the key row at
// `row_off` (kv_row_offset) of `kv_head`, a tile before its copy.
__device__ __forceinline__ void prefetch_kv_row(const PrefillParams& p, long long row_off, int kv_head) {
  const long long base = row_off + (long long)kv_head * p.head_stride;
#pragma unroll
  for (int line = 0; line < HEAD_DIM * (int)sizeof(DTypeKV) / 128; ++line) {
    prefetch_l2(p.k + base + line * (128 / (int)sizeof(DTypeKV)));
    prefetch_l2(p.v + base + line * (128 / (int)sizeof(DTypeKV)));
  }
}

// Writes the final output (VEC elements of packed row `row`) and, once per row, its LSE.
template <int VEC>
__device__ __forceinline__ void write_out(const PrefillParams& p, const PrefillWork& w, int kv_head, int row,
                                          int d0, const float* o, float lse2, bool write_lse = true) {
  const int token = row / GROUP, head = kv_head * GROUP + row % GROUP;
  const long long orow = (long long)(w.q_start + token) * p.num_qo_heads + head;
#if USER_HAS_OUTPUT_TRANSFORM
  float out[VEC];
#pragma unroll
  for (int i = 0; i < VEC; ++i)
    out[i] = user_output_transform(g_user_params, o[i], head, w.kv_len - w.qo_len + token, d0 + i);
  o = out;
#endif
  store_vec_f32<DTypeO, VEC>(p.o + orow * HEAD_DIM + d0, o);
  if (write_lse && p.lse != nullptr && d0 == 0) p.lse[orow] = lse2 == NEG_INF ? lse2 : lse2 * p.lse_out_scale;
}

// Split KV: the last block of a tile to arrive merges the tile's partial states, in slot order (so
// the bits do not depend on arrival order), and writes the final output. `smem` holds
// num_pieces * CTA_Q floats.
__device__ __forceinline__ void merge_tile_pieces(const PrefillParams& p, const PrefillWork& w, int kv_head,
                                                  int valid_rows, float* smem) {
  __shared__ int is_last;
  const int tid = threadIdx.x;
  __threadfence();
  consumers_sync();
  if (tid == 0) {
    int* counter = p.counters + (long long)w.counter * p.num_kv_heads + kv_head;
    const int done = atomicAdd(counter, 1) + 1;
    is_last = done == w.num_pieces;
    if (is_last) *counter = 0;  // ready for the next run
  }
  consumers_sync();
  if (!is_last) return;
  __threadfence();
  const int n = w.num_pieces;
  auto slot_row = [&](int piece, int row) {
    return ((long long)(w.merge_begin + piece) * p.num_kv_heads + kv_head) * CTA_Q + row;
  };
  // Only the valid rows' LSEs were written (a short tile's others are never read below).
  for (int i = tid; i < n * CTA_Q; i += NUM_THREADS) {
    if (i % CTA_Q < valid_rows) smem[i] = __ldcg(p.partial_lse + slot_row(i / CTA_Q, i % CTA_Q));
  }
  consumers_sync();
  constexpr int V = 4;
  for (int item = tid; item < valid_rows * (HEAD_DIM / V); item += NUM_THREADS) {
    const int row = item / (HEAD_DIM / V), d0 = (item % (HEAD_DIM / V)) * V;
    float m = NEG_INF;
    for (int piece = 0; piece < n; ++piece) m = fmaxf(m, smem[piece * CTA_Q + row]);
    float acc[V] = {0.f, 0.f, 0.f, 0.f}, den = 0.f;
    if (m != NEG_INF) {
      for (int piece = 0; piece < n; ++piece) {
        const float wgt = fast_exp2(smem[piece * CTA_Q + row] - m);
        const float4 v = __ldcg(reinterpret_cast<const float4*>(p.partial_o + slot_row(piece, row) * HEAD_DIM + d0));
        den += wgt;
        acc[0] += wgt * v.x;
        acc[1] += wgt * v.y;
        acc[2] += wgt * v.z;
        acc[3] += wgt * v.w;
      }
    }
#if VARIANT_SINKS
    add_sink<V>(p.sinks_log2[kv_head * GROUP + (w.row_begin + row) % GROUP], m, den, acc);
#endif
    const float inv = den > 0.f ? 1.f / den : 0.f;
#pragma unroll
    for (int i = 0; i < V; ++i) acc[i] *= inv;
    write_out<V>(p, w, kv_head, w.row_begin + row, d0, acc, den > 0.f ? m + fast_log2(den) : NEG_INF);
  }
}

#if PREFILL_WS
// The producer warpgroup: copies the item's K/V tiles into the stages, each after its consumers
// released it, and has the hardware arrive on the stage's "full" barrier when a lane's copies
// have landed. Producer warp pw copies rows [pw * KV_TILE / 4, (pw + 1) * KV_TILE / 4) of every
// tile; its lane l resolves (page lookup) row l of that range one tile ahead; a pass copies
// 32 / CHUNKS rows, each lane one 16-byte chunk of K and of V (zero-filled past the keys).
// `seq0`: the stage sequence number of the item's first tile (persistent blocks continue the
// ring across items; stage seq % NSTAGE, its (seq / NSTAGE)-th use).
__device__ __forceinline__ void produce_kv(const PrefillParams& p, const PrefillWork& w, int kv_head, int kv_stop,
                                           int num_tiles, DTypeKV* k_smem, DTypeKV* v_smem, u64* full_bar,
                                           u64* empty_bar, int seq0) {
  constexpr int WARP_ROWS = KV_TILE / 4;  // rows per producer warp: 16 or 32
  constexpr int P_ROWS = 32 / CHUNKS;     // rows per pass
  static_assert(32 % CHUNKS == 0 && WARP_ROWS <= 32 && WARP_ROWS % P_ROWS == 0, "producer: whole rows per pass");
  const int lane = threadIdx.x & 31, pw = (threadIdx.x >> 5) - NUM_WARPS;
  const int chunk = lane % CHUNKS, prow = lane / CHUNKS, row0 = pw * WARP_ROWS;
  const long long head_off = (long long)kv_head * p.head_stride + chunk * 8;
  long long off = -1;
  auto resolve = [&](int tile) {
    const int key = w.kv_begin + kv_tile_at(tile, num_tiles) * KV_TILE + row0 + lane;
    off = lane < WARP_ROWS && key < kv_stop ? kv_row_offset(p, w, key) : -1;
  };
  resolve(0);
  for (int tile = 0; tile < num_tiles; ++tile) {
    const int seq = seq0 + tile, stage = seq % NSTAGE;
    if (seq >= NSTAGE) mbar_wait(&empty_bar[stage], ((seq / NSTAGE) - 1) & 1);
    DTypeKV* ks = k_smem + stage * KV_TILE * HEAD_DIM;
    DTypeKV* vs = v_smem + stage * KV_TILE * HEAD_DIM;
#pragma unroll
    for (int pass = 0; pass < WARP_ROWS / P_ROWS; ++pass) {
      const int r = pass * P_ROWS + prow;  // row within this warp's range
      const long long row_off = __shfl_sync(0xffffffffu, off, r);
      const bool ok = row_off >= 0;
      const long long src = ok ? row_off + head_off : 0;
      const int so = tile_offset<KV_TILE>(row0 + r, chunk);
      cp_async_16(ks + so, p.k + src, ok ? 16 : 0);
      cp_async_16(vs + so, p.v + src, ok ? 16 : 0);
    }
    cp_async_mbar_arrive(&full_bar[stage]);
    if (tile + 1 < num_tiles) {
      resolve(tile + 1);
#if PREFILL_L2_LOOKAHEAD
      if (off >= 0) prefetch_kv_row(p, off, kv_head);
#endif
    }
  }
}

// Thread 0 initialises `n` pairs of "full" (the producer's 128 threads arrive, plus `extra`
// plain arrivals) and "empty" (every consumer warp arrives) barriers; the block barrier that
// follows publishes them.
__device__ __forceinline__ void init_barriers(u64* full, u64* empty, int n, int extra = 0) {
  if (threadIdx.x != 0) return;
  for (int i = 0; i < n; ++i) {
    mbar_init(&full[i], PRODUCER_THREADS + extra);
    mbar_init(&empty[i], NUM_WARPS);
  }
  mbar_init_fence();
}

#if PREFILL_PERSISTENT
// The producer's Q copy of a persistent block: the item's tile of packed rows (zero past the
// request) into a Q buffer; the hardware arrives on `q_full` when each lane's copies landed.
__device__ __forceinline__ void produce_q(const PrefillParams& p, const PrefillWork& w, int kv_head, int valid_rows,
                                          DTypeQ* q_tile, u64* q_full) {
  constexpr int P_ROWS = PRODUCER_THREADS / CHUNKS;  // rows per pass
  const int pt = threadIdx.x - NUM_THREADS, chunk = pt % CHUNKS;
#pragma unroll 4
  for (int r = pt / CHUNKS; r < CTA_Q; r += P_ROWS) {
    const int row = w.row_begin + r;
    const bool ok = r < valid_rows;
    const DTypeQ* src = p.q;
    if (ok) {
      src += ((long long)(w.q_start + row / GROUP) * p.num_qo_heads + kv_head * GROUP + row % GROUP) * HEAD_DIM +
             chunk * 8;
    }
    cp_async_16(q_tile + tile_offset<CTA_Q>(r, chunk), src, ok ? 16 : 0);
  }
  cp_async_mbar_arrive(q_full);
}
#endif
#endif

extern "C" __global__ void __launch_bounds__(LAUNCH_THREADS, MIN_BLOCKS_PER_SM)
batch_prefill(const PrefillParams p USER_PARAMS_DECL) {
  extern __shared__ __align__(1024) unsigned char smem_dyn[];
  // wgmma's swizzle needs 1024-byte aligned tiles; the host adds 1 KB so this always fits.
  unsigned char* smem_raw = smem_dyn + ((1024 - ((u32)__cvta_generic_to_shared(smem_dyn) & 1023)) & 1023);
  DTypeQ* q_smem = reinterpret_cast<DTypeQ*>(smem_raw);
  DTypeKV* k_smem = reinterpret_cast<DTypeKV*>(q_smem + Q_BUFFERS * CTA_Q * HEAD_DIM);
  DTypeKV* v_smem = k_smem + NSTAGE * KV_TILE * HEAD_DIM;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int warp_q = warp % WARPS_Q, warp_kv = warp / WARPS_Q;
#if USER_VARIANT
  if (threadIdx.x == 0) g_user_params = user_params;  // published by the first barrier below
#endif
#if PREFILL_PERSISTENT
  // Blocks claim (item, KV head) pairs, heads fastest, from a counter in the workspace: the
  // items come longest first, so claiming them in order is greedy longest-processing-time, as
  // the hardware's block scheduler is for the non-persistent grid (a static stride left a ragged
  // last wave on long prompts). The producer claims; each claim rides with its Q buffer.
  const int num_blocks_work = *p.num_work * p.num_kv_heads;
  __shared__ __align__(8) u64 full_bar[NSTAGE], empty_bar[NSTAGE], q_full[2], q_empty[2];
  __shared__ int claimed[2];  // the pair whose Q tile is in each buffer; >= num_blocks_work: done
  init_barriers(full_bar, empty_bar, NSTAGE);
  init_barriers(q_full, q_empty, 2, 1);  // + the claiming thread's plain arrival
  __syncthreads();  // the last block-wide barrier: the producer warpgroup leaves when it is done
  if (warp >= NUM_WARPS) {
    producer_regs();
    int seq = 0;
    for (int it = 0;; ++it) {
      // The Q buffer (and claim slot) of item it - 2 is free once its consumers wrote their
      // output through it.
      if (it >= 2) {
        mbar_wait(&q_empty[it & 1], ((it >> 1) - 1) & 1);
#if PREFILL_RACECHECK_SHADOW
        named_barrier_sync<LAUNCH_THREADS>(12 + (it & 1));  // the consumers' item it - 2 is done
#endif
      }
      if (tid == NUM_THREADS) {
        const int b = atomicAdd(p.counters, 1);
        // Every block makes exactly one claim past the end, so the last claim of all is this
        // value: nobody touches the counter after it, and it is left zero for the next run.
        if (b == num_blocks_work + (int)gridDim.x - 1) atomicExch(p.counters, 0);
        claimed[it & 1] = b;
        mbar_arrive(&q_full[it & 1]);  // publishes the claim to the consumers (release)
      }
      named_barrier_sync<PRODUCER_THREADS>(PRODUCER_BARRIER);  // ... and to the producer's threads
      const int b = claimed[it & 1];
      if (b >= num_blocks_work) {
        cp_async_mbar_arrive(&q_full[it & 1]);  // no copies: the consumers only read the claim
#if PREFILL_RACECHECK_SHADOW
        named_barrier_arrive<LAUNCH_THREADS>(14 + (it & 1));
        // Match the consumers' release of their last item (they arrive for every item).
        if (it >= 1) {
          mbar_wait(&q_empty[(it - 1) & 1], ((it - 1) >> 1) & 1);
          named_barrier_sync<LAUNCH_THREADS>(12 + ((it - 1) & 1));
        }
#endif
        return;  // copies still in flight complete on their own; the consumers wait for them
      }
      const int item = b / p.num_kv_heads, kv_head = b % p.num_kv_heads;
      const PrefillWork w = p.work[item];
      const ItemExtent x = item_extent(w);
      produce_q(p, w, kv_head, x.valid_rows, q_smem + (it & 1) * CTA_Q * HEAD_DIM, &q_full[it & 1]);
#if PREFILL_RACECHECK_SHADOW
      asm volatile("cp.async.wait_all;\n" ::: "memory");
      named_barrier_arrive<LAUNCH_THREADS>(14 + (it & 1));  // this item's Q tile has landed
#endif
      produce_kv(p, w, kv_head, x.kv_stop, x.num_tiles, k_smem, v_smem, full_bar, empty_bar, seq);
      seq += x.num_tiles;
    }
  }
  consumer_regs();
#if PREFILL_PINGPONG
  pingpong_open();
#endif
  int kv_seq = 0;  // stage sequence number of the current item's first tile
  for (int it = 0;; ++it) {
    // The producer claimed this buffer's pair and copied its Q tile.
    mbar_wait(&q_full[it & 1], (it >> 1) & 1);
#if PREFILL_RACECHECK_SHADOW
    named_barrier_sync<LAUNCH_THREADS>(14 + (it & 1));
#endif
    const int b = claimed[it & 1];
    if (b >= num_blocks_work) break;
    const int item = b / p.num_kv_heads, kv_head = b % p.num_kv_heads;
    DTypeQ* const q_tile = q_smem + (it & 1) * CTA_Q * HEAD_DIM;
#else
  {
    // Heads vary fastest over the grid, so the heaviest items (first in the list) of every head
    // start first.
    const int item = blockIdx.x / p.num_kv_heads, kv_head = blockIdx.x % p.num_kv_heads;
    if (item >= *p.num_work) return;  // uniform over the block, before any barrier
    DTypeQ* const q_tile = q_smem;
    const int kv_seq = 0;
#endif
  // One work item for one KV head, from here to the end of the kernel (the body of the persistent
  // item loop, or the scope of a non-persistent block; not indented, to keep one text for both).
  const PrefillWork w = p.work[item];
  const ItemExtent extent = item_extent(w);
  const int valid_rows = extent.valid_rows, diag = extent.diag, kv_stop = extent.kv_stop;
  const int num_tiles = extent.num_tiles;

#if PREFILL_WS && !PREFILL_PERSISTENT
  __shared__ __align__(8) u64 full_bar[NSTAGE], empty_bar[NSTAGE];
  init_barriers(full_bar, empty_bar, NSTAGE);
  __syncthreads();  // the last block-wide barrier: the producer warpgroup leaves when it is done
  if (warp >= NUM_WARPS) {
    producer_regs();
    produce_kv(p, w, kv_head, kv_stop, num_tiles, k_smem, v_smem, full_bar, empty_bar, 0);
    return;  // copies still in flight complete on their own; the consumers wait for them
  }
  consumer_regs();
#if PREFILL_PINGPONG
  pingpong_open();
#endif
#endif

#if PREFILL_PERSISTENT
  fence_proxy_async();  // the producer's Q copies (waited for above) -> our wgmma reads
#else
  // Q tile -> shared memory (rows past the request are zero).
  const int ld_chunk = tid % CHUNKS, ld_row = tid / CHUNKS;
#pragma unroll
  for (int s = 0; s < Q_PASSES; ++s) {
    const int r = ld_row + s * ROWS_PER_PASS;
    const int row = w.row_begin + r;
    if (r >= CTA_Q) break;  // a partial last pass (uniform per row group)
    const bool ok = r < valid_rows;
    const DTypeQ* src = p.q;
    if (ok) {
      src += ((long long)(w.q_start + row / GROUP) * p.num_qo_heads + kv_head * GROUP + row % GROUP) * HEAD_DIM +
             ld_chunk * 8;
    }
    cp_async_16(q_tile + tile_offset<CTA_Q>(r, ld_chunk), src, ok ? 16 : 0);
  }
#endif
#if PREFILL_WS
#if !PREFILL_PERSISTENT
  cp_async_commit();
  cp_async_wait<0>();
  fence_proxy_async();  // our Q copies -> visible to the wgmma reads of every warpgroup
  consumers_sync();
#endif
#else
  // K/V loader: as in decode_tc.cuh, lane s of each CHUNKS-lane group resolves the row of pass s.
  const long long head_off = (long long)kv_head * p.head_stride + ld_chunk * 8;
  long long my_off = -1;
  auto resolve_rows = [&](int tile) {
    my_off = -1;
    const int r = ld_row + ld_chunk * ROWS_PER_PASS;
    const int key = w.kv_begin + kv_tile_at(tile, num_tiles) * KV_TILE + r;
    if (ld_chunk < KV_PASSES && r < KV_TILE && key < kv_stop) my_off = kv_row_offset(p, w, key);
  };
  auto issue_tile = [&](int stage) {
#pragma unroll
    for (int s = 0; s < KV_PASSES; ++s) {
      const long long row_off = __shfl_sync(0xffffffffu, my_off, s, CHUNKS);
      const int r = ld_row + s * ROWS_PER_PASS;
      // Past the tile in a partial last pass: nothing to copy (the shuffle above stays uniform).
      if (KV_TILE % ROWS_PER_PASS != 0 && r >= KV_TILE) continue;
      const int so = stage * KV_TILE * HEAD_DIM + tile_offset<KV_TILE>(r, ld_chunk);
      const bool ok = row_off >= 0;
      const long long off = ok ? row_off + head_off : 0;
      cp_async_16(k_smem + so, p.k + off, ok ? 16 : 0);
      cp_async_16(v_smem + so, p.v + off, ok ? 16 : 0);
    }
  };
  resolve_rows(0);
#pragma unroll
  for (int s = 0; s < NSTAGE - 1; ++s) {
    if (s < num_tiles) {
      issue_tile(s);
      resolve_rows(s + 1);
    }
    cp_async_commit();  // the first group also carries the Q tile
  }
#endif

  // This thread's query rows: g and g + 8 of each of the warp's m-tiles.
  const int warp_row0 = warp_q * 16 * M_TILES;
  int row_token[M_TILES][2];
#pragma unroll
  for (int mt = 0; mt < M_TILES; ++mt)
#pragma unroll
    for (int h = 0; h < 2; ++h) row_token[mt][h] = (w.row_begin + warp_row0 + mt * 16 + g + 8 * h) / GROUP;
  // Keys below this need no per-element mask for any row of the warp.
  int unmasked_end = kv_stop;
  if constexpr (MASK_MODE == MASK_CAUSAL) unmasked_end = min(kv_stop, diag + (w.row_begin + warp_row0) / GROUP + 1);
#if VARIANT_WINDOW
  // Keys from here on are inside the window of every row of the warp (its last row's bound).
  const int window_lo = diag + (w.row_begin + warp_row0 + 16 * M_TILES - 1) / GROUP - p.window_left;
#endif
#if VARIANT_ALIBI || USER_VARIANT
  // The query head of each of this thread's rows (ALiBi slopes, user hooks).
  int row_head[M_TILES][2];
#pragma unroll
  for (int mt = 0; mt < M_TILES; ++mt)
#pragma unroll
    for (int h = 0; h < 2; ++h) row_head[mt][h] = kv_head * GROUP + (w.row_begin + warp_row0 + mt * 16 + g + 8 * h) % GROUP;
#endif
#if VARIANT_ALIBI
  float row_slope[M_TILES][2];
#pragma unroll
  for (int mt = 0; mt < M_TILES; ++mt)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      row_slope[mt][h] = p.alibi_slopes_log2[row_head[mt][h]];
      // In the accumulator the bias is in raw logit units: the exponent's FFMA scales it back.
      if (ALIBI_IN_ACCUM) row_slope[mt][h] /= p.sm_scale_log2;
    }
#endif
#if USER_VARIANT
  const float sm_scale = p.sm_scale_log2 * 0.6931471805599453f;  // natural-domain scale
#endif
#if VARIANT_ROPE
  float rope_freq[8];
  rope_frequencies(p, rope_freq);
  const int rope_base = p.rope_offsets != nullptr ? p.rope_offsets[w.request] : 0;  // key 0's position
#endif
  // The exponent's scale: folded in (plain, ALiBi alone; soft cap alone folds c log2(e)), or already
  // applied to the logits (other variants).
  const float score_scale = SOFTCAP_ALONE ? p.softcap_out : LOGITS_REWRITTEN ? 1.f : p.sm_scale_log2;

  float m[M_TILES][2], d[M_TILES][2];
  float o[M_TILES][HEAD_DIM / 8][4];
#pragma unroll
  for (int mt = 0; mt < M_TILES; ++mt) {
#if USER_USE_SOFTMAX
    m[mt][0] = m[mt][1] = NEG_INF;
    d[mt][0] = d[mt][1] = 0.f;
#else
    // No softmax: a state of max 0 and denominator 1 (counted once per row, by the warps of the
    // first key slice), so the epilogue's normalisation leaves the weighted sum as it is.
    m[mt][0] = m[mt][1] = 0.f;
    d[mt][0] = d[mt][1] = (warp_kv == 0 && t == 0) ? 1.f : 0.f;
#endif
#pragma unroll
    for (int n = 0; n < HEAD_DIM / 8; ++n) o[mt][n][0] = o[mt][n][1] = o[mt][n][2] = o[mt][n][3] = 0.f;
  }

#if PREFILL_PINGPONG
  // The turn order: warpgroup w issues its QK^T after w - 1 did (for the same tile); the last
  // warpgroup opens the first turn. (Every warpgroup computes every tile here: an idle one
  // skipping its turns would stall the order, so the idle-warpgroup loop below is off.)
  constexpr int PP_WGS = NUM_WARPS / 4;
  const int pp_wg = warp / 4;
#endif
#if PREFILL_WS && !VARIANT_LOGITS && !PREFILL_PINGPONG
  // A warpgroup whose 64 rows all lie past the tile's valid rows (a short row tile) computes
  // nothing: it only keeps step with the stages, handing each back as it fills. (A loop of its
  // own, so the computing loop below is the same code as without it. Not with logits variants:
  // at 160 registers it made ptxas spill more in the soft-cap block, 104 -> 152 bytes.)
  const bool wg_idle = (warp / 4) * 64 >= valid_rows;
  if (wg_idle) {
    for (int tile = 0; tile < num_tiles; ++tile) {
      const int stage = (kv_seq + tile) % NSTAGE;
      mbar_wait(&full_bar[stage], ((kv_seq + tile) / NSTAGE) & 1);
      release_stage(empty_bar, stage);
    }
  }
  const int compute_tiles = wg_idle ? 0 : num_tiles;
#else
  const int compute_tiles = num_tiles;
#endif
#if PREFILL_OVERLAP
  // The previous tile's P (the A operand of its PV, issued with this tile's QK^T) and its stage.
  u32 pa_prev[KV_TILE / 16][4];
  int stage_prev = 0;
#endif
  for (int tile = 0; tile < compute_tiles; ++tile) {
    const int stage = (kv_seq + tile) % NSTAGE;
#if PREFILL_WS
    // Wait for the producer's copies of this stage, then order them before our wgmma reads.
    mbar_wait(&full_bar[stage], ((kv_seq + tile) / NSTAGE) & 1);
    fence_proxy_async();
#else
    cp_async_wait<NSTAGE - 2>();
#if PREFILL_WGMMA
    fence_proxy_async();  // our cp.async writes -> visible to the wgmma (async proxy) reads
#endif
    __syncthreads();
    {
      const int next = tile + NSTAGE - 1;
      if (next < num_tiles) {
        issue_tile(next % NSTAGE);
        resolve_rows(next + 1);
#if PREFILL_L2_LOOKAHEAD
        // The rows just resolved are copied one tile later; the lane that resolved each row
        // starts bringing its K and V lines into L2 now, so that tile's copies hit in L2.
        if (my_off >= 0) prefetch_kv_row(p, my_off, kv_head);
#endif
      }
      cp_async_commit();
    }
#endif
#if VARIANT_ROPE || USER_HAS_QUERY_TRANSFORM || USER_HAS_KEY_TRANSFORM
    {
      // Transform this tile's keys (and, on the first tile, the queries) where they sit, then
      // publish: RoPE, or a user variant's key and query transforms.
      const int first_key = w.kv_begin + kv_tile_at(tile, num_tiles) * KV_TILE;
#if USER_HAS_KEY_TRANSFORM
      transform_tile<KV_TILE>(k_smem + stage * KV_TILE * HEAD_DIM, [&](int r, int dim, float x) {
        const int key = first_key + r;
        return key < kv_stop ? user_key_transform(g_user_params, x, kv_head, key, dim) : x;
      });
#endif
#if USER_HAS_QUERY_TRANSFORM
      if (tile == 0) {
        transform_tile<CTA_Q>(q_tile, [&](int r, int dim, float x) {
          const int row = w.row_begin + r;
          return r < valid_rows
                     ? user_query_transform(g_user_params, x, kv_head * GROUP + row % GROUP, diag + row / GROUP, dim)
                     : x;
        });
      }
#endif
#if VARIANT_ROPE
      rope_tile<KV_TILE>(k_smem + stage * KV_TILE * HEAD_DIM, rope_freq, [&](int r) {
        const int key = first_key + r;
        return key < kv_stop ? rope_base + key : -1;
      });
      if (tile == 0) {
        rope_tile<CTA_Q>(q_tile, rope_freq, [&](int r) {
          return r < valid_rows ? rope_base + diag + (w.row_begin + r) / GROUP : -1;
        });
      }
#endif
#if PREFILL_WGMMA
      fence_proxy_async();
#endif
      __syncthreads();
    }
#endif
    const int key0 = w.kv_begin + kv_tile_at(tile, num_tiles) * KV_TILE + warp_kv * WARP_KV;  // this warp's first key
    // (Never taken with wgmma, whose single key slice starts inside every tile: the
    // warp-specialised loop must reach its release of the stage; WARPS_KV == 1 is asserted.)
    // (Compiled out with the overlap, whose chain of previous P and stage must see every tile.)
#if !PREFILL_OVERLAP
    if (key0 >= kv_stop) continue;
#endif
    const DTypeKV* ks = k_smem + stage * KV_TILE * HEAD_DIM;
#if !PREFILL_OVERLAP
    const DTypeKV* vs = v_smem + stage * KV_TILE * HEAD_DIM;
#endif
#if !PREFILL_WGMMA
    const int srow0 = warp_kv * WARP_KV;  // first stage row of this warp
#endif

    // S = Q K^T: M_TILES x NT_KV tiles of 16 x 8.
    float s[M_TILES][NT_KV][4];
#if ALIBI_IN_ACCUM
    // ALiBi's bias slope * (key - query position) / scale as the accumulator's start: slope *
    // (this thread's first key - position) once per row and tile, then slope * a constant per
    // score (no int-to-float conversion per score).
#pragma unroll
    for (int mt = 0; mt < M_TILES; ++mt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const float base = row_slope[mt][h] * (float)(key0 + 2 * t - (diag + row_token[mt][h]));
#pragma unroll
        for (int j = 0; j < NT_KV; ++j) {
          s[mt][j][2 * h] = fmaf(row_slope[mt][h], (float)(j * 8), base);
          s[mt][j][2 * h + 1] = fmaf(row_slope[mt][h], (float)(j * 8 + 1), base);
        }
      }
#else
#pragma unroll
    for (int mt = 0; mt < M_TILES; ++mt)
#pragma unroll
      for (int j = 0; j < NT_KV; ++j) s[mt][j][0] = s[mt][j][1] = s[mt][j][2] = s[mt][j][3] = 0.f;
#endif
#if PREFILL_WGMMA
    {
      // This warpgroup's 64 rows of Q times the tile's keys, 16 dims per wgmma; the descriptors
      // step 32 bytes inside a 128-byte swizzle row, then to the next 64-column block.
      const int wg_row0 = (warp / 4) * 64;
#if PREFILL_PINGPONG
      named_barrier_sync<256>(6 + pp_wg);  // our turn: the previous warpgroup has issued
#endif
      wgmma_fence();
#pragma unroll
      for (int kd = 0; kd < HEAD_DIM / 16; ++kd) {
        const u64 da = sw128_desc(q_tile + (kd / 4) * CTA_Q * 64 + wg_row0 * 64 + (kd % 4) * 16, 16, 1024);
        const u64 db = sw128_desc(ks + (kd / 4) * KV_TILE * 64 + (kd % 4) * 16, 16, 1024);
        wgmma_ss<DTypeKV, KV_TILE>(s[0], da, db);
      }
      wgmma_commit();
#if PREFILL_OVERLAP
      // The previous tile's P V, queued behind this QK^T: it runs during this tile's softmax.
      // (On the first tile the group is empty; one shape for every tile keeps ptxas's view of
      // the wgmma pipeline simple: a wait for the older group is a wait for the QK^T.)
      if (tile > 0) issue_pv(o[0], pa_prev, v_smem + stage_prev * KV_TILE * HEAD_DIM);
      wgmma_commit();
#endif
#if PREFILL_PINGPONG
      named_barrier_arrive<256>(6 + (pp_wg + 1) % PP_WGS);  // the next warpgroup's turn
#endif
#if PREFILL_OVERLAP
      wgmma_wait<1>();  // QK^T done; the P V may still run
      wgmma_fence_operand(s[0]);
#else
      wgmma_wait<0>();
#endif
    }
#else
#pragma unroll
    for (int kk = 0; kk < HEAD_DIM / 32; ++kk) {
      u32 qa[M_TILES][2][4];
#pragma unroll
      for (int mt = 0; mt < M_TILES; ++mt)
#pragma unroll
        for (int h = 0; h < 2; ++h)
          ldmatrix_x4(qa[mt][h], q_tile + swizzle<HEAD_DIM>(warp_row0 + mt * 16 + (lane & 15),
                                                           kk * 4 + h * 2 + (lane >> 4)));
#pragma unroll
      for (int j = 0; j < NT_KV; ++j) {
        u32 kb[4];
        ldmatrix_x4(kb, ks + swizzle<HEAD_DIM>(srow0 + j * 8 + (lane & 7), kk * 4 + (lane >> 3)));
#pragma unroll
        for (int mt = 0; mt < M_TILES; ++mt) {
          mma_16816<DTypeKV>(s[mt][j], qa[mt][0], kb[0], kb[1]);
          mma_16816<DTypeKV>(s[mt][j], qa[mt][1], kb[2], kb[3]);
        }
      }
    }
#endif

#if LOGITS_REWRITTEN
    // Logits variants, in the scaled base-2 domain: soft cap c (c tanh(x / c)), then ALiBi.
#if VARIANT_ALIBI
    // ALiBi's bias slope * (key - query position): slope * (this thread's first key - position)
    // once per row and tile, then slope * a constant per score, so no int-to-float conversion per
    // score (conversions share the unit that computes exp2: +15 % at 1 x 8192 when converted).
    float alibi_base[M_TILES][2];
#pragma unroll
    for (int mt = 0; mt < M_TILES; ++mt)
#pragma unroll
      for (int h = 0; h < 2; ++h)
        alibi_base[mt][h] = row_slope[mt][h] * (float)(key0 + 2 * t - (diag + row_token[mt][h]));
#endif
#pragma unroll
    for (int mt = 0; mt < M_TILES; ++mt)
#pragma unroll
      for (int j = 0; j < NT_KV; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          float x = s[mt][j][e];
#if USER_VARIANT
          x *= sm_scale;
#if USER_HAS_LOGITS_TRANSFORM
          x = user_logits_transform(g_user_params, x, row_head[mt][e >> 1], diag + row_token[mt][e >> 1],
                                    key0 + j * 8 + 2 * t + (e & 1));
#endif
#if USER_USE_SOFTMAX
          x *= 1.4426950408889634f;  // the softmax's base-2 domain
#endif
#elif VARIANT_SOFTCAP
          // The hardware tanh (one MUFU op, relative error 2^-11; P then moves by about
          // |logit| * 2^-11 relative, 1 % at a logit of 20, as in FA2/FA3); libm's tanhf costs
          // +60 % at 1 x 8192.
          x = tanh_approx(x * p.softcap_in);
          if (!SOFTCAP_ALONE) x *= p.softcap_out;
#elif !VARIANT_ALIBI
          x *= p.sm_scale_log2;
#endif
#if VARIANT_ALIBI
          const float bias = fmaf(row_slope[mt][e >> 1], (float)(j * 8 + (e & 1)), alibi_base[mt][e >> 1]);
#if USER_VARIANT || VARIANT_SOFTCAP
          x += bias;
#else
          x = fmaf(x, p.sm_scale_log2, bias);  // ALiBi alone: the scale rides on the same FFMA
#endif
#endif
          s[mt][j][e] = x;
        }
#endif
    // Mask: only tiles that cross the end of the keys, the causal diagonal, a sliding window's
    // start, or carry a custom mask look at each element. Without logits variants the scores stay
    // unscaled here; the scale (> 0, checked by the host) is folded into the exponent below, one
    // FFMA per score.
    bool full = MASK_MODE != MASK_CUSTOM && !USER_HAS_LOGITS_MASK && key0 + WARP_KV <= unmasked_end;
#if VARIANT_WINDOW
    full = full && key0 >= window_lo;
#endif
    if (!full) {
#pragma unroll
      for (int mt = 0; mt < M_TILES; ++mt) {
#pragma unroll
        for (int j = 0; j < NT_KV; ++j) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int key = key0 + j * 8 + 2 * t + (e & 1);
            const int token = row_token[mt][e >> 1];
            bool visible = key < kv_stop;
            if constexpr (MASK_MODE == MASK_CAUSAL) visible = visible && key <= diag + token;
#if VARIANT_WINDOW
            visible = visible && key >= diag + token - p.window_left;
#endif
            if constexpr (MASK_MODE == MASK_CUSTOM) {
              if (visible && token < w.qo_len) {
                const long long bit = (long long)token * w.kv_len + key;
                visible = (p.mask[w.mask_offset + (bit >> 3)] >> (bit & 7)) & 1;
              } else {
                visible = false;
              }
            }
#if USER_HAS_LOGITS_MASK
            visible = visible && user_logits_mask(g_user_params, row_head[mt][e >> 1], diag + token, key);
#endif
            if (!visible) s[mt][j][e] = NEG_INF;
          }
        }
      }
    }

    // Online softmax per row, then P as the A operand of P V.
    u32 pa[M_TILES][WARP_KV / 16][4];
    float rescale[M_TILES][2];
    bool moved = false;
#if !USER_USE_SOFTMAX
    // No softmax: the (transformed) logits are the weights; masked ones weigh nothing.
#pragma unroll
    for (int mt = 0; mt < M_TILES; ++mt) {
#pragma unroll
      for (int j = 0; j < NT_KV; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) s[mt][j][e] = s[mt][j][e] == NEG_INF ? 0.f : s[mt][j][e];
        pa[mt][j >> 1][(j & 1) * 2 + 0] = pack2<DTypeKV>(s[mt][j][0], s[mt][j][1]);
        pa[mt][j >> 1][(j & 1) * 2 + 1] = pack2<DTypeKV>(s[mt][j][2], s[mt][j][3]);
      }
      rescale[mt][0] = rescale[mt][1] = 1.f;
    }
#else
#pragma unroll
    for (int mt = 0; mt < M_TILES; ++mt) {
      float m_tile[2] = {NEG_INF, NEG_INF};
#pragma unroll
      for (int j = 0; j < NT_KV; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) m_tile[e >> 1] = fmaxf(m_tile[e >> 1], s[mt][j][e]);
      float m_use[2];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        m_tile[h] = fmaxf(m_tile[h], __shfl_xor_sync(0xffffffffu, m_tile[h], 1));
        m_tile[h] = fmaxf(m_tile[h], __shfl_xor_sync(0xffffffffu, m_tile[h], 2));
        const float m_cand = m_tile[h] * score_scale;  // m: scaled, base 2
        const float m_new = PREFILL_RESCALE_SLACK > 0
                                ? (m_cand > m[mt][h] + (float)PREFILL_RESCALE_SLACK ? m_cand : m[mt][h])
                                : fmaxf(m[mt][h], m_cand);
        m_use[h] = m_new == NEG_INF ? 0.f : m_new;  // keeps exp2 finite while nothing is seen
        rescale[mt][h] = fast_exp2(m[mt][h] - m_use[h]);
        moved = moved || rescale[mt][h] != 1.f;
        m[mt][h] = m_new;
        d[mt][h] *= rescale[mt][h];
      }
#pragma unroll
      for (int j = 0; j < NT_KV; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          s[mt][j][e] = fast_exp2(fmaf(s[mt][j][e], score_scale, -m_use[e >> 1]));
          d[mt][e >> 1] += s[mt][j][e];
        }
        pa[mt][j >> 1][(j & 1) * 2 + 0] = pack2<DTypeKV>(s[mt][j][0], s[mt][j][1]);
        pa[mt][j >> 1][(j & 1) * 2 + 1] = pack2<DTypeKV>(s[mt][j][2], s[mt][j][3]);
      }
    }
#endif
#if PREFILL_OVERLAP
    // The previous tile's P V is done: O may be rescaled, and its stage goes back to the producer.
    // (The wait is unconditional, with nothing pending on the first tile, so that ptxas sees every
    // path to O's reads wait for the P V; otherwise it serialises every wgmma.)
    wgmma_wait<0>();
    wgmma_fence_operand(o[0]);
    wgmma_fence_operand(pa_prev);  // read until here, so this tile's P has registers of its own
    if (tile > 0) release_stage(empty_bar, stage_prev);
#endif
    // Rescale O only when some row's max moved (most tiles of a long row leave it); the vote is
    // uniform over the warp.
    if (__any_sync(0xffffffffu, moved)) {
#pragma unroll
      for (int mt = 0; mt < M_TILES; ++mt)
#pragma unroll
        for (int n = 0; n < HEAD_DIM / 8; ++n) {
          o[mt][n][0] *= rescale[mt][0];
          o[mt][n][1] *= rescale[mt][0];
          o[mt][n][2] *= rescale[mt][1];
          o[mt][n][3] *= rescale[mt][1];
        }
    }

    // O += P V.
#if PREFILL_OVERLAP
    // Issued with the next tile's QK^T, or after the loop for the last tile.
#pragma unroll
    for (int kt = 0; kt < KV_TILE / 16; ++kt)
#pragma unroll
      for (int i = 0; i < 4; ++i) pa_prev[kt][i] = pa[0][kt][i];
    stage_prev = stage;
#elif PREFILL_WGMMA
    {
      wgmma_fence();
      issue_pv(o[0], pa[0], vs);
      wgmma_commit();
      wgmma_wait<0>();
#if PREFILL_WS
      release_stage(empty_bar, stage);  // this warp has read the stage for the last time
#endif
    }
#else
#pragma unroll
    for (int kt = 0; kt < WARP_KV / 16; ++kt) {
#pragma unroll
      for (int dp = 0; dp < HEAD_DIM / 16; ++dp) {
        u32 vb[4];
        const int r = srow0 + kt * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
        ldmatrix_x4_trans(vb, vs + swizzle<HEAD_DIM>(r, dp * 2 + (lane >> 4)));
#pragma unroll
        for (int mt = 0; mt < M_TILES; ++mt) {
          mma_16816<DTypeKV>(o[mt][2 * dp], pa[mt][kt], vb[0], vb[1]);
          mma_16816<DTypeKV>(o[mt][2 * dp + 1], pa[mt][kt], vb[2], vb[3]);
        }
      }
    }
#endif
  }
#if PREFILL_OVERLAP
  // The last tile's P V.
  if (compute_tiles > 0) {
    wgmma_fence();
    issue_pv(o[0], pa_prev, v_smem + stage_prev * KV_TILE * HEAD_DIM);
    wgmma_commit();
    wgmma_wait<0>();
    wgmma_fence_operand(o[0]);
    release_stage(empty_bar, stage_prev);
  }
#endif
#if PREFILL_PERSISTENT
  // Epilogue from registers (the producer may be refilling every stage already): each warp
  // normalises its rows, writes them as 16-bit values into its warpgroup's own rows of this
  // item's Q buffer (no longer read: every wgmma of the item has completed), and the warpgroup
  // then copies them out row by row with 16-byte stores. Only then is the Q buffer released.
  {
    const int wg = warp / 4, wg_tid = tid % 128;
    // The output goes where the Q tile was, in the same layout (tile_offset: 128-byte rows with
    // XOR-swizzled chunks, so the fragment stores of a warp's eight row groups hit distinct banks).
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float den = d[0][h];
      den += __shfl_xor_sync(0xffffffffu, den, 1);
      den += __shfl_xor_sync(0xffffffffu, den, 2);
      float m_row = m[0][h], scale = 1.f;
      const int r = warp_row0 + g + 8 * h;  // row of the tile
#if VARIANT_SINKS
      scale = sink_fold(p.sinks_log2[kv_head * GROUP + (w.row_begin + r) % GROUP], m_row, den);
#endif
      const float inv = den > 0.f ? scale / den : 0.f;
      if (t == 0 && r < valid_rows && p.lse != nullptr) {
        const int token = (w.row_begin + r) / GROUP, head = kv_head * GROUP + (w.row_begin + r) % GROUP;
        const float lse2 = den > 0.f ? m_row + fast_log2(den) : NEG_INF;
        p.lse[(long long)(w.q_start + token) * p.num_qo_heads + head] = lse2 == NEG_INF ? lse2 : lse2 * p.lse_out_scale;
      }
#pragma unroll
      for (int n = 0; n < HEAD_DIM / 8; ++n) {
        const u32 v = pack2<DTypeO>(o[0][n][2 * h] * inv, o[0][n][2 * h + 1] * inv);
        *reinterpret_cast<u32*>(q_tile + tile_offset<CTA_Q>(r, n) + 2 * t) = v;
      }
    }
    named_barrier_sync<128>(2 + wg);
    for (int i = wg_tid; i < 64 * CHUNKS; i += 128) {
      const int r = wg * 64 + i / CHUNKS, c = i % CHUNKS;
      if (r < valid_rows) {
        float v[8];
        load_vec_f32<DTypeO, 8>(q_tile + tile_offset<CTA_Q>(r, c), v);
        write_out<8>(p, w, kv_head, w.row_begin + r, c * 8, v, 0.f, false);
      }
    }
    named_barrier_sync<128>(2 + wg);  // every read of the Q buffer done before it is released
#if PREFILL_RACECHECK_SHADOW
    named_barrier_arrive<LAUNCH_THREADS>(12 + (it & 1));
#endif
    if (lane == 0) mbar_arrive(&q_empty[it & 1]);
  }
  kv_seq += num_tiles;
  }  // the persistent item loop
#else
#if !PREFILL_WS
  cp_async_wait<0>();
#endif
  consumers_sync();  // every warp is done with the tiles before their bytes hold the states

  // Epilogue: every warp's unnormalised state -> shared memory as f32, then each (row, 8 dims)
  // merges the WARPS_KV states of its row and writes the output or the partial state.
  float* st_o = reinterpret_cast<float*>(smem_raw);                // [WARPS_KV][CTA_Q][ST_STRIDE]
  float* st_m = st_o + WARPS_KV * CTA_Q * ST_STRIDE;                // [WARPS_KV][CTA_Q]
  float* st_d = st_m + WARPS_KV * CTA_Q;                            // [WARPS_KV][CTA_Q]
#pragma unroll
  for (int mt = 0; mt < M_TILES; ++mt) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float dd = d[mt][h];
      dd += __shfl_xor_sync(0xffffffffu, dd, 1);
      dd += __shfl_xor_sync(0xffffffffu, dd, 2);
      const int row = warp_row0 + mt * 16 + g + 8 * h;
      if (t == 0) {
        st_m[warp_kv * CTA_Q + row] = m[mt][h];
        st_d[warp_kv * CTA_Q + row] = dd;
      }
      float* dst = st_o + (warp_kv * CTA_Q + row) * ST_STRIDE + 2 * t;
#pragma unroll
      for (int n = 0; n < HEAD_DIM / 8; ++n)
        *reinterpret_cast<float2*>(dst + n * 8) = make_float2(o[mt][n][2 * h], o[mt][n][2 * h + 1]);
    }
  }
  consumers_sync();

  constexpr int OUT_VEC = 8;
  for (int it = tid; it < valid_rows * (HEAD_DIM / OUT_VEC); it += NUM_THREADS) {
    const int row = it / (HEAD_DIM / OUT_VEC), d0 = (it % (HEAD_DIM / OUT_VEC)) * OUT_VEC;
    float m_all = NEG_INF;
#pragma unroll
    for (int wk = 0; wk < WARPS_KV; ++wk) m_all = fmaxf(m_all, st_m[wk * CTA_Q + row]);
    float acc[OUT_VEC], den = 0.f;
#pragma unroll
    for (int i = 0; i < OUT_VEC; ++i) acc[i] = 0.f;
    if (m_all != NEG_INF) {
#pragma unroll
      for (int wk = 0; wk < WARPS_KV; ++wk) {
        const float sc = fast_exp2(st_m[wk * CTA_Q + row] - m_all);  // -inf -> 0
        den += st_d[wk * CTA_Q + row] * sc;
        const float* src = st_o + (wk * CTA_Q + row) * ST_STRIDE + d0;
#pragma unroll
        for (int i = 0; i < OUT_VEC; ++i) acc[i] += src[i] * sc;
      }
    }
#if VARIANT_SINKS
    if (w.partial < 0) add_sink<OUT_VEC>(p.sinks_log2[kv_head * GROUP + (w.row_begin + row) % GROUP], m_all, den, acc);
#endif
    const float inv = den > 0.f ? 1.f / den : 0.f;
#pragma unroll
    for (int i = 0; i < OUT_VEC; ++i) acc[i] *= inv;
    const float lse2 = den > 0.f ? m_all + fast_log2(den) : NEG_INF;
    if (w.partial < 0) {
      write_out<OUT_VEC>(p, w, kv_head, w.row_begin + row, d0, acc, lse2);
    } else {
      const long long prow = ((long long)w.partial * p.num_kv_heads + kv_head) * CTA_Q + row;
      store_vec_f32<float, OUT_VEC>(p.partial_o + prow * HEAD_DIM + d0, acc);
      if (d0 == 0) p.partial_lse[prow] = lse2;
    }
  }
  if (w.partial >= 0) {
    consumers_sync();  // the state area is reused by the merge
    merge_tile_pieces(p, w, kv_head, valid_rows, reinterpret_cast<float*>(smem_raw));
  }
  }  // the block's work item
#endif
}
