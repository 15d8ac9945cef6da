// decode_tc.cuh: batch decode on a paged KV cache, tensor-core path.
//
// Same work as decode.cuh (one query token per request; per work item and KV head, the GROUP
// query heads sharing that KV head over a chunk of keys), but q·k and p·v run on the tensor cores:
// the GROUP query heads are the rows of a 16-row mma tile (the paper's appendix A: query heads of a
// KV head fused into one tile), so every K and V element is read from shared memory and converted
// once for all of them. Rows >= GROUP are zero padding and never written.
//
// The generated source defines DTypeQ, DTypeKV, DTypeO, HEAD_DIM (64/128/256), GROUP (<= 16),
// KT (16-token k-steps per warp per tile), NSTAGE and, for a variant, its VARIANT_* switches
// (decode_variant.cuh); decode/tiles.rs chooses them.
//
// Thread layout: 4 warps. A tile of TILE = 4 * 16 * KT tokens is loaded by all 128 threads, or
// with DECODE_WS (below) by a fifth, producer warp (16-byte cp.async copies; page ids loaded two
// tiles ahead and resolved into offsets one tile ahead); warp w then attends tokens
// [w * 16 * KT, (w + 1) * 16 * KT) of the tile with its own online-softmax state. The four states
// merge through shared memory at the end.
// Shared memory: 2 * NSTAGE * TILE * HEAD_DIM * 2 bytes of swizzled K/V tiles (16-byte chunks
// XOR-permuted by row, see mma.cuh), reused for the 4 warps' states at the end. Fused RoPE adds
// static tables, the frequencies and two tiles' key angles: 4.8 KB at head_dim 128, 18 KB at
// head_dim 256.
#pragma once
#include "decode_common.cuh"
#include "mma.cuh"

constexpr int NUM_WARPS = 4;
constexpr int NUM_THREADS = NUM_WARPS * 32;  // the warps that compute
constexpr int WARP_TOKENS = 16 * KT;
constexpr int TILE = NUM_WARPS * WARP_TOKENS;
constexpr int CHUNKS = HEAD_DIM / 8;             // 16-byte chunks per row
static_assert(sizeof(DTypeKV) == 2, "tensor-core decode needs 16-bit KV");
static_assert(GROUP <= 16, "at most 16 query heads per KV head");

#if VARIANT_ROPE
// RoPE (decode_variant.cuh), on the K fragments in registers: no shared-memory pass over K.
// After ldmatrix a thread holds, for key g of each 8-key n-tile, dims c * 8 + 2t + {0, 1} of every
// 16-byte chunk c, and the partner of chunk c < HEAD_DIM / 16 is chunk c + HEAD_DIM / 16, which
// the same thread receives in the same register of the ldmatrix HEAD_DIM / 64 steps (of 32 dims)
// further on. So both halves are loaded together and each pair of registers (two pairs of dims)
// is rotated in place, in packed 16-bit arithmetic (rope_pair2), before the mmas read it.
//
// Angles are shared: <R(a) q, R(b) k> depends only on b - a, so a key may turn by any angle if q
// turns by the same amount less. Each warp keeps ROPE_QC copies of q: copy c is rotated to
// q_pos - row0 - 8c (row0: the warp's first row in the tile), and n-tile j = ROPE_QC * s + c of
// the warp, whose key g sits at row0 + 8j + g of the tile, to the tile's position
// 8 * ROPE_QC * s + g. So the keys' angles depend on the tile, s and g only, the same for the
// 4 warps and for the 4 lanes sharing g: a table of ROPE_ROWS (8 per s) positions by
// HEAD_DIM / 2 frequencies, as packed 16-bit (cos, sin), built once per tile by the whole block
// (at head_dim 128, 4 angles per thread instead of 16) and read with one 8-byte load per chunk.
// It is double-buffered and built one tile ahead, so the loop's one barrier per tile orders every
// write before its reads, and after the reads (a tile earlier) of the buffer it overwrites.
// Head_dim 256 has no registers for a second copy of q: ROPE_QC = 1 there.
constexpr int ROPE_QC = HEAD_DIM <= 128 ? 2 : 1;
static_assert((2 * KT) % ROPE_QC == 0, "RoPE: whole groups of n-tiles per q copy");
constexpr int ROPE_CHUNKS = HEAD_DIM / 16;         // chunks of the first half
constexpr int ROPE_ROWS = 8 * (2 * KT / ROPE_QC);  // key positions per tile
constexpr int ROPE_PER_THREAD = ROPE_ROWS * ROPE_CHUNKS * 4 / NUM_THREADS;  // entries built
static_assert(ROPE_PER_THREAD * NUM_THREADS == ROPE_ROWS * ROPE_CHUNKS * 4 &&
                  (NUM_THREADS / 4) % ROPE_CHUNKS == 0,
              "RoPE: each thread builds whole table entries, all of one (chunk, t)");
// A thread's entries move by TILE positions from one tile to the next, so their angles advance by
// a fixed step (angle addition, rope_advance: 4 f32 operations instead of a reduction and a sin
// and cos); every ROPE_ANCHOR tiles they are computed exactly again, so that rounding cannot
// drift (the step is within ~4e-7 of exact: 16 steps stay far below the 16-bit rounding of the
// table). Head_dim 256 (8 entries per thread) has no registers to keep them: exact every tile.
constexpr bool ROPE_RECUR = ROPE_PER_THREAD <= 2;
constexpr int ROPE_ANCHOR = 16;
constexpr int ROPE_KEPT = ROPE_RECUR ? ROPE_PER_THREAD : 1;
// [row][chunk * 4 + t]: packed cos and sin of the pair dims chunk * 8 + 2t + {0, 1} at the tile's
// position of the row. Rows are padded by 32 bytes: the 16 lanes of a half-warp's 8-byte loads
// read 4 rows (g) at 4 t each, which then fall on distinct banks (unpadded, a row is a multiple of
// 128 bytes and the loads conflict 4 ways).
constexpr int ROPE_ROW_ENTRIES = ROPE_CHUNKS * 4 + 4;
typedef uint2 RopeTable[ROPE_ROWS][ROPE_ROW_ENTRIES];

// One thread's part of building the table: entries tid + k * NUM_THREADS, which are rows
// row0 + k * ROW_STEP, all of one chunk and t (so of two frequencies).
struct RopeTableBuilder {
  static constexpr int ROW_STEP = NUM_THREADS / (4 * ROPE_CHUNKS);
  int k0, row0, chunk, t;  // k0: the position of the work item's first key
  // ROPE_RECUR: the angles of the entries of the last table built (cos, sin per pair dim), and
  // the step from one tile to the next (cos and sin of TILE * f, for the two frequencies f).
  float cs[ROPE_KEPT][2] = {}, sn[ROPE_KEPT][2] = {}, step[4] = {};

  __device__ __forceinline__ RopeTableBuilder(int tid, const float2 (*freq)[4], int key0)
      : k0(key0), row0(tid / (4 * ROPE_CHUNKS)), chunk((tid / 4) % ROPE_CHUNKS), t(tid % 4) {
    if constexpr (ROPE_RECUR) {
      const float2 f = freq[chunk][t];
      rope_sincos(TILE, f.x, step[1], step[0]);
      rope_sincos(TILE, f.y, step[3], step[2]);
    }
  }
  // The angles of entry k of tile `tile`, exactly.
  __device__ __forceinline__ void exact(const float2 (*freq)[4], int tile, int k, float (&c)[2],
                                        float (&s)[2]) const {
    const float2 f = freq[chunk][t];  // from shared memory: not kept in registers
    const int row = row0 + k * ROW_STEP;
    const int pos = k0 + tile * TILE + 8 * ROPE_QC * (row / 8) + row % 8;
    rope_sincos(pos, f.x, s[0], c[0]);
    rope_sincos(pos, f.y, s[1], c[1]);
  }
  __device__ __forceinline__ void store(RopeTable& tab, int k, const float (&c)[2],
                                        const float (&s)[2]) const {
    tab[row0 + k * ROW_STEP][chunk * 4 + t] =
        make_uint2(pack2<DTypeKV>(c[0], c[1]), pack2<DTypeKV>(s[0], s[1]));
  }
  // Writes this thread's entries of tile `tile` into `tab`; called for tiles 0, 1, 2, ... in order.
  __device__ __forceinline__ void build(RopeTable& tab, const float2 (*freq)[4], int tile) {
    if constexpr (ROPE_RECUR) {
      // Advance, then overwrite on anchor tiles (so that the angles keep their registers).
#pragma unroll
      for (int k = 0; k < ROPE_PER_THREAD; ++k) {
#pragma unroll
        for (int e = 0; e < 2; ++e) rope_advance(cs[k][e], sn[k][e], step[2 * e], step[2 * e + 1]);
      }
      if (tile % ROPE_ANCHOR == 0) {
#pragma unroll
        for (int k = 0; k < ROPE_PER_THREAD; ++k) exact(freq, tile, k, cs[k], sn[k]);
      }
#pragma unroll
      for (int k = 0; k < ROPE_PER_THREAD; ++k) store(tab, k, cs[k], sn[k]);
    } else {
#pragma unroll 1
      for (int k = 0; k < ROPE_PER_THREAD; ++k) {
        float c[2], s[2];
        exact(freq, tile, k, c, s);
        store(tab, k, c, s);
      }
    }
  }
};
#endif

// The K/V tile loader, run by THREADS threads (the whole block, or the producer warp): thread i
// copies chunk i % CHUNKS of rows i / CHUNKS + s * ROWS_PER_PASS (pass s). The CHUNKS lanes sharing
// a row set resolve each of its rows' pages once: lane c resolves pass c + j * CHUNKS (its slot
// j), and the others take the offset by shuffle (a page lookup costs a dependent load and a
// divide). The copies' addresses: per-thread bases (this thread's chunk of the KV head in K and in
// V; the stages' shared addresses) plus each row's byte offset, so that a copy costs the shuffle,
// one 64-bit add and the copy itself (the bases are opaque to the compiler, which otherwise
// rebuilds them from their parts at every copy); whole tiles skip the zero-fill's source size.
template <int THREADS>
struct TileLoader {
  static constexpr int ROWS_PER_PASS = THREADS / CHUNKS;
  static constexpr int PASSES = TILE / ROWS_PER_PASS;
  static constexpr int SLOTS = (PASSES + CHUNKS - 1) / CHUNKS;  // rows each lane resolves
  static_assert(THREADS % CHUNKS == 0 && TILE % ROWS_PER_PASS == 0, "tile rows must split evenly over the threads");
  static_assert((PASSES <= CHUNKS || PASSES % CHUNKS == 0) && CHUNKS <= 32, "the lanes of a row group resolve every pass");
  int ld_row, ld_chunk;
  const char *k_src, *v_src;
  u32 k_dst, v_dst;
  long long off[SLOTS];  // byte offsets of this lane's rows (-1 past the item's keys)
  // The page ids of this lane's rows in the tile fetch_pages() was last given, and their
  // positions in those pages (-1 past the item's keys).
  int page[SLOTS], in_page[SLOTS];

  __device__ __forceinline__ TileLoader(const DecodeParams& p, int kv_head, int i, DTypeKV* k_smem, DTypeKV* v_smem)
      : ld_row(i / CHUNKS), ld_chunk(i % CHUNKS) {
    const long long head_bytes = ((long long)kv_head * p.head_stride + ld_chunk * 8) * (long long)sizeof(DTypeKV);
    k_src = opaque(reinterpret_cast<const char*>(p.k) + head_bytes);
    v_src = opaque(reinterpret_cast<const char*>(p.v) + head_bytes);
    k_dst = opaque(smem_addr(k_smem));
    v_dst = opaque(smem_addr(v_smem));
  }
  // This lane's rows of tile `tile` of the work item.
  __device__ __forceinline__ void resolve(const DecodeParams& p, const DecodeWork& w, int tile) {
    fetch_pages(p, w, tile);
    resolve_fetched(p);
  }
  // The two halves of resolve(), for loaders that run them a tile apart (both loaders do):
  // the page-id loads of tile `tile`'s rows are issued here and only used by resolve_fetched, so
  // their latency (a new line of ids every tile with small pages) passes while the loader waits.
  __device__ __forceinline__ void fetch_pages(const DecodeParams& p, const DecodeWork& w, int tile) {
#pragma unroll
    for (int j = 0; j < SLOTS; ++j) {
      const int pass = ld_chunk + j * CHUNKS;
      const int tok = tile * TILE + ld_row + pass * ROWS_PER_PASS;
      page[j] = 0;
      in_page[j] = -1;
      if (pass < PASSES && tok < w.kv_len) page[j] = key_page(p, w, tok, in_page[j]);
    }
  }
  __device__ __forceinline__ void resolve_fetched(const DecodeParams& p) {
#pragma unroll
    for (int j = 0; j < SLOTS; ++j)
      off[j] = in_page[j] >= 0 ? page_offset(p, page[j], in_page[j]) * (long long)sizeof(DTypeKV) : -1;
  }
  // A stage's byte offset of pass s of this thread's rows.
  __device__ __forceinline__ u32 dst(int stage, int s) const {
    // (Passes 8 rows apart keep the row's swizzle: a constant step from pass 0.)
    if constexpr (ROWS_PER_PASS % 8 == 0)
      return (u32)(stage * TILE * HEAD_DIM + swizzle<HEAD_DIM>(ld_row, ld_chunk) + s * ROWS_PER_PASS * HEAD_DIM) * 2u;
    return (u32)(stage * TILE * HEAD_DIM + swizzle<HEAD_DIM>(ld_row + s * ROWS_PER_PASS, ld_chunk)) * 2u;
  }
  // The copies of the tile resolved last into `stage`; `whole_tile`: every row of it is in range
  // (uniform over the threads).
  __device__ __forceinline__ void issue(int stage, bool whole_tile) const {
    if (whole_tile) {  // uniform: two loops, so that neither issues the other's instructions
#pragma unroll
      for (int s = 0; s < PASSES; ++s) {
        const long long o = __shfl_sync(0xffffffffu, off[s / CHUNKS], s % CHUNKS, CHUNKS);
        cp_async_16_at(k_dst + dst(stage, s), k_src + o);
        cp_async_16_at(v_dst + dst(stage, s), v_src + o);
      }
    } else {
      // Rows past the keys are zero-filled (P is 0 there, and 0 * V must be finite).
#pragma unroll
      for (int s = 0; s < PASSES; ++s) {
        const long long row_off = __shfl_sync(0xffffffffu, off[s / CHUNKS], s % CHUNKS, CHUNKS);
        const bool ok = row_off >= 0;
        const long long o = ok ? row_off : 0;
        cp_async_16_at(k_dst + dst(stage, s), k_src + o, ok ? 16 : 0);
        cp_async_16_at(v_dst + dst(stage, s), v_src + o, ok ? 16 : 0);
      }
    }
  }
};

// Producer warp (DECODE_WS, sm_90): a fifth warp resolves the pages and copies the K/V tiles
// with 16-byte cp.async (the same swizzled layout as the block-wide loader), and each of its
// lanes arrives on the stage's "full" mbarrier when its copies have landed
// (cp.async.mbarrier.arrive.noinc); the four warps that compute wait on "full", read the stage,
// and release it on its "empty" mbarrier (every computing thread arrives after its own reads).
// No block barrier per tile: a stage is refilled as soon as the last warp has read it, so while
// the warps wait for tile t every other stage is loading (NSTAGE tiles in flight, against
// NSTAGE - 1 issued at a block barrier).
// (One cp.async.bulk per 256-byte row instead measured 2.1x slower: docs/perf-notes.md.)
#if DECODE_WS
#include "pipeline.cuh"
static_assert(!VARIANT_ROPE, "the producer-warp decode: RoPE rotates with every thread's help");

// The producer warp: every tile of the block's item into the stages, in order, each lane arriving
// on the stage's "full" barrier once its copies have landed.
__device__ __forceinline__ void produce_tiles(const DecodeParams& p, const DecodeWork& w, int kv_head, int num_tiles,
                                              DTypeKV* k_smem, DTypeKV* v_smem, u64* full_bar, u64* empty_bar,
                                              int lane) {
  TileLoader<32> ld(p, kv_head, lane, k_smem, v_smem);
  // Rows are resolved a tile ahead and their page ids loaded two tiles ahead, so that neither the
  // id loads nor the offsets they feed hold up a free stage's copies.
  if (num_tiles > 0) ld.resolve(p, w, 0);
  if (num_tiles > 1) ld.fetch_pages(p, w, 1);
  for (int tile = 0; tile < num_tiles; ++tile) {
    const int stage = tile % NSTAGE;
    if (tile >= NSTAGE) mbar_wait(&empty_bar[stage], ((tile / NSTAGE) - 1) & 1);
    ld.issue(stage, (tile + 1) * TILE <= w.kv_len);
    cp_async_mbar_arrive(&full_bar[stage]);  // counts once this lane's copies have landed
    // Tile + 1's page ids were loaded a tile ago; tile + 2's load while this lane waits.
    if (tile + 1 < num_tiles) ld.resolve_fetched(p);
    if (tile + 2 < num_tiles) ld.fetch_pages(p, w, tile + 2);
  }
  cp_async_wait<0>();  // (the arrivals above already order the copies; nothing left in flight at exit)
}
#endif

// The computing warps, and the producer warp with DECODE_WS.
constexpr int LAUNCH_THREADS = NUM_THREADS + (DECODE_WS ? 32 : 0);

extern "C" __global__ void __launch_bounds__(LAUNCH_THREADS)
batch_decode(const __grid_constant__ DecodeParams p) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  DTypeKV* k_smem = reinterpret_cast<DTypeKV*>(smem_raw);
  DTypeKV* v_smem = k_smem + NSTAGE * TILE * HEAD_DIM;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int kv_head = block_kv_head(p);
  // Both loads in flight at once: the work list always has a slot for every block of the grid.
  const DecodeWork w = block_work(p);
  if (!block_has_work(p)) return;  // uniform over the block, before any barrier
#if DECODE_WS
  __shared__ __align__(8) u64 full_bar[NSTAGE], empty_bar[NSTAGE];
  if (tid == 0) {
    for (int s = 0; s < NSTAGE; ++s) {
      mbar_init(&full_bar[s], 32);          // the producer's lanes
      mbar_init(&empty_bar[s], NUM_THREADS);  // every computing thread
    }
    mbar_init_fence();
  }
  __syncthreads();
  if (warp == NUM_WARPS) {
    produce_tiles(p, w, kv_head, (w.kv_len + TILE - 1) / TILE, k_smem, v_smem, full_bar, empty_bar, lane);
    return;  // no block-wide barrier follows: the computing warps use compute_sync()
  }
#endif

#if VARIANT_ROPE
  // RoPE: the frequencies of pair dims c * 8 + 2t + {0, 1} (t = lane % 4, c < HEAD_DIM / 16) and
  // the key-angle table (see above). The barrier is uniform (after the early return).
  __shared__ float2 rope_freq_s[ROPE_CHUNKS][4];
  __shared__ RopeTable rope_tab_s[2];
  if (tid < HEAD_DIM / 4) {
    const int c = tid / 4, d = c * 8 + 2 * (tid % 4);
    rope_freq_s[c][tid % 4] = make_float2(rope_inv_freq(d, p.rope_log2_theta, p.rope_rcp_scale),
                                          rope_inv_freq(d + 1, p.rope_log2_theta, p.rope_rcp_scale));
  }
  __syncthreads();
  const int rope_off = p.rope_offsets[w.request];
  const int rope_k0 = rope_off + w.kv_start;  // position of the item's first key
  RopeTableBuilder rope_tab(tid, rope_freq_s, rope_k0);
  rope_tab.build(rope_tab_s[0], rope_freq_s, 0);  // read after the first tile's barrier
  // Query fragments, rotated (ROPE_QC copies) and converted to the KV type; rows >= GROUP are zero.
  // Fragment ks's partner is ks + HEAD_DIM / 32 (the same columns HEAD_DIM / 2 further on).
  u32 qa[ROPE_QC][HEAD_DIM / 16][4];
  {
    const DTypeQ* q0 = p.q + ((long long)w.request * p.num_qo_heads + kv_head * GROUP) * HEAD_DIM;
    // This warp's copies of q turn back by its first row, and copy c by 8c more (see above).
    const int q_pos = rope_off + p.kv_lens[w.request] - 1 - warp * WARP_TOKENS;
#pragma unroll
    for (int ks = 0; ks < HEAD_DIM / 32; ++ks) {
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const int row = g + (r & 1) * 8, col = ks * 16 + 2 * t + (r >> 1) * 8;
        const float2 f = rope_freq_s[2 * ks + (r >> 1)][t];
        float x[2] = {0.f, 0.f}, y[2] = {0.f, 0.f};
        if (row < GROUP) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            x[e] = to_float(q0[row * HEAD_DIM + col + e]);
            y[e] = to_float(q0[row * HEAD_DIM + col + e + HEAD_DIM / 2]);
          }
        }
#pragma unroll
        for (int c = 0; c < ROPE_QC; ++c) {
          float xr[2], yr[2];
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            float sn, cs;
            rope_sincos(q_pos - 8 * c, e == 0 ? f.x : f.y, sn, cs);
            xr[e] = x[e];
            yr[e] = y[e];
            rope_pair(xr[e], yr[e], sn, cs);
          }
          qa[c][ks][r] = pack2<DTypeKV>(xr[0], xr[1]);
          qa[c][ks + HEAD_DIM / 32][r] = pack2<DTypeKV>(yr[0], yr[1]);
        }
      }
    }
  }
#else
  // Query fragments (A operand), converted to the KV type for the mma; rows >= GROUP are zero.
  u32 qa[HEAD_DIM / 16][4];
  {
    const DTypeQ* q0 = p.q + ((long long)w.request * p.num_qo_heads + kv_head * GROUP) * HEAD_DIM;
#pragma unroll
    for (int ks = 0; ks < HEAD_DIM / 16; ++ks) {
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const int row = g + (r & 1) * 8, col = ks * 16 + 2 * t + (r >> 1) * 8;
        float a = 0.f, b = 0.f;
        if (row < GROUP) {
          a = to_float(q0[row * HEAD_DIM + col]);
          b = to_float(q0[row * HEAD_DIM + col + 1]);
        }
        qa[ks][r] = pack2<DTypeKV>(a, b);
      }
    }
  }
#endif
#if VARIANT_LOGITS
  // ALiBi: the slopes of this thread's query rows g and g + 8 (0 for padding rows), and the
  // position of the item's first key relative to the query's (kv_len - 1).
  float alibi_slope[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = g + r * 8;
    alibi_slope[r] = VARIANT_ALIBI && row < GROUP ? p.alibi_slopes_log2[kv_head * GROUP + row] : 0.f;
  }
  const int rel0 = VARIANT_ALIBI ? w.kv_start - (p.kv_lens[w.request] - 1) : 0;
#endif

  const int num_tiles = (w.kv_len + TILE - 1) / TILE;
#if !DECODE_WS
  TileLoader<NUM_THREADS> ld(p, kv_head, tid, k_smem, v_smem);
  // Whether every row of tile `tile` is in range (uniform over the block).
  auto whole_tile = [&](int tile) { return (tile + 1) * TILE <= w.kv_len; };
  // As the producer warp does: offsets a tile ahead, page ids two tiles ahead (fetch_pages of a
  // tile past the item's keys loads nothing).
  ld.resolve(p, w, 0);
  ld.fetch_pages(p, w, 1);
#pragma unroll
  for (int s = 0; s < NSTAGE - 1; ++s) {
    if (s < num_tiles) {
      ld.issue(s, whole_tile(s));
      ld.resolve_fetched(p);
      ld.fetch_pages(p, w, s + 2);
    }
    cp_async_commit();
  }
#endif

  // Online-softmax state of rows g and g + 8 (base 2). d is this thread's partial row sum.
  float m[2] = {NEG_INF, NEG_INF}, d[2] = {0.f, 0.f};
  float o[HEAD_DIM / 8][4];
#pragma unroll
  for (int n = 0; n < HEAD_DIM / 8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;

  for (int tile = 0; tile < num_tiles; ++tile) {
#if DECODE_WS
    mbar_wait(&full_bar[tile % NSTAGE], (tile / NSTAGE) & 1);  // the producer's copies landed
#else
    cp_async_wait<NSTAGE - 2>();
    __syncthreads();
    {
      const int next = tile + NSTAGE - 1;
      if (next < num_tiles) {
        ld.issue(next % NSTAGE, whole_tile(next));
        ld.resolve_fetched(p);
        ld.fetch_pages(p, w, next + 2);
      }
      cp_async_commit();
    }
#endif
    const DTypeKV* ks_base = k_smem + (tile % NSTAGE) * TILE * HEAD_DIM;
    const DTypeKV* vs_base = v_smem + (tile % NSTAGE) * TILE * HEAD_DIM;
    const int row0 = warp * WARP_TOKENS;                   // first tile row of this warp
    const int valid = w.kv_len - (tile * TILE + row0);      // rows of this warp in range
    // (A block, left by `break` when this warp has no rows in the tile: with the producer warp
    // the stage is released after it either way.)
    do {
    if (valid <= 0) break;

    // S = Q K^T for this warp's 16 * KT tokens: 2 * KT n-tiles of 8 tokens.
    float s[2 * KT][4];
#pragma unroll
    for (int j = 0; j < 2 * KT; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
#if VARIANT_ROPE
    // 32 dims and their partners per step: load both halves' fragments, rotate them (rows past the
    // chunk's end are zeros and stay zeros; they are masked below), then both halves' mmas.
#pragma unroll
    for (int kk = 0; kk < HEAD_DIM / 64; ++kk) {
      uint2 rot[4];  // packed cos, sin of chunks kk * 4 + i
#pragma unroll
      for (int j = 0; j < 2 * KT; ++j) {
        if (j % ROPE_QC == 0) {
          const RopeTable& tab = rope_tab_s[tile & 1];
#pragma unroll
          for (int i = 0; i < 4; ++i) rot[i] = tab[8 * (j / ROPE_QC) + g][(kk * 4 + i) * 4 + t];
        }
        const int krow = row0 + j * 8 + (lane & 7);
        u32 lo[4], hi[4];
        ldmatrix_x4(lo, ks_base + swizzle<HEAD_DIM>(krow, kk * 4 + (lane >> 3)));
        ldmatrix_x4(hi, ks_base + swizzle<HEAD_DIM>(krow, (kk + HEAD_DIM / 64) * 4 + (lane >> 3)));
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          rope_pair2<DTypeKV>(lo[i], hi[i], rot[i].x, rot[i].y, rot[i].y ^ 0x80008000u);  // -sin
        }
        const u32(*qj)[4] = qa[j % ROPE_QC];
        mma_16816<DTypeKV>(s[j], qj[2 * kk], lo[0], lo[1]);
        mma_16816<DTypeKV>(s[j], qj[2 * kk + 1], lo[2], lo[3]);
        mma_16816<DTypeKV>(s[j], qj[2 * kk + HEAD_DIM / 32], hi[0], hi[1]);
        mma_16816<DTypeKV>(s[j], qj[2 * kk + 1 + HEAD_DIM / 32], hi[2], hi[3]);
      }
    }
    // The next tile's angles, into the other buffer (uniform over the block).
    if (tile + 1 < num_tiles) rope_tab.build(rope_tab_s[(tile + 1) & 1], rope_freq_s, tile + 1);
#else
#pragma unroll
    for (int kk = 0; kk < HEAD_DIM / 32; ++kk) {
#pragma unroll
      for (int j = 0; j < 2 * KT; ++j) {
        u32 kb[4];
        ldmatrix_x4(kb, ks_base + swizzle<HEAD_DIM>(row0 + j * 8 + (lane & 7), kk * 4 + (lane >> 3)));
        mma_16816<DTypeKV>(s[j], qa[2 * kk], kb[0], kb[1]);
        mma_16816<DTypeKV>(s[j], qa[2 * kk + 1], kb[2], kb[3]);
      }
    }
#endif

#if VARIANT_LOGITS
    // The variant logits (soft cap, ALiBi) of every column; the columns past the chunk's end are
    // masked below.
#pragma unroll
    for (int j = 0; j < 2 * KT; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = j * 8 + 2 * t + (e & 1);
        s[j][e] = decode_logit(s[j][e] * logit_scale(p), p.softcap_out, alibi_slope[e >> 1],
                               rel0 + tile * TILE + row0 + col);
      }
    }
#endif
    // Scale, mask the rows past the chunk's end, and update the running max per query row. The
    // variant logits above are already scaled (a macro, so that a plain kernel's code is exactly
    // what it was before variants).
#if VARIANT_LOGITS
#define SCORE_SCALE 1.f
#else
#define SCORE_SCALE p.sm_scale_log2
#endif
    float m_tile[2] = {NEG_INF, NEG_INF};
    if (valid >= WARP_TOKENS) {  // a full tile: no masking
#pragma unroll
      for (int j = 0; j < 2 * KT; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          s[j][e] *= SCORE_SCALE;
          m_tile[e >> 1] = fmaxf(m_tile[e >> 1], s[j][e]);
        }
      }
    } else {
#pragma unroll
      for (int j = 0; j < 2 * KT; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int col = j * 8 + 2 * t + (e & 1);
          s[j][e] = col < valid ? s[j][e] * SCORE_SCALE : NEG_INF;
          m_tile[e >> 1] = fmaxf(m_tile[e >> 1], s[j][e]);
        }
      }
    }
#undef SCORE_SCALE
    float rescale[2], m_use[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      m_tile[r] = fmaxf(m_tile[r], __shfl_xor_sync(0xffffffffu, m_tile[r], 1));
      m_tile[r] = fmaxf(m_tile[r], __shfl_xor_sync(0xffffffffu, m_tile[r], 2));
      const float m_new = fmaxf(m[r], m_tile[r]);
      m_use[r] = m_new == NEG_INF ? 0.f : m_new;  // keeps exp2 finite while nothing is seen
      rescale[r] = fast_exp2(m[r] - m_use[r]);
      m[r] = m_new;
      d[r] *= rescale[r];
    }
    // P = exp2(S - m) as A fragments of the p·v mma (k = tokens).
    u32 pa[KT][4];
#pragma unroll
    for (int j = 0; j < 2 * KT; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[j][e] = fast_exp2(s[j][e] - m_use[e >> 1]);
        d[e >> 1] += s[j][e];
      }
      pa[j >> 1][(j & 1) * 2 + 0] = pack2<DTypeKV>(s[j][0], s[j][1]);
      pa[j >> 1][(j & 1) * 2 + 1] = pack2<DTypeKV>(s[j][2], s[j][3]);
    }
    // Rescale the accumulators only when some row's max moved (most tiles of a long request
    // leave it unchanged); the test is uniform over the warp, so nothing diverges.
    if (__any_sync(0xffffffffu, rescale[0] != 1.f || rescale[1] != 1.f)) {
#pragma unroll
      for (int n = 0; n < HEAD_DIM / 8; ++n) {
        o[n][0] *= rescale[0];
        o[n][1] *= rescale[0];
        o[n][2] *= rescale[1];
        o[n][3] *= rescale[1];
      }
    }
    // O += P V.
#pragma unroll
    for (int kt = 0; kt < KT; ++kt) {
#pragma unroll
      for (int dp = 0; dp < HEAD_DIM / 16; ++dp) {
        u32 vb[4];
        const int r = row0 + kt * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
        ldmatrix_x4_trans(vb, vs_base + swizzle<HEAD_DIM>(r, dp * 2 + (lane >> 4)));
        mma_16816<DTypeKV>(o[2 * dp], pa[kt], vb[0], vb[1]);
        mma_16816<DTypeKV>(o[2 * dp + 1], pa[kt], vb[2], vb[3]);
      }
    }
    } while (false);
#if DECODE_WS
    // This thread has read the stage for the last time: release it to the producer. Every thread
    // arrives after its own reads: one lane's arrival after __syncwarp left the other lanes'
    // ldmatrix reads unordered against the refill for compute-sanitizer's racecheck.
    mbar_arrive(&empty_bar[tile % NSTAGE]);
#endif
  }
#if !DECODE_WS
  cp_async_wait<0>();
#endif
  compute_sync();

  // Merge the four warps' states through shared memory.
  float* st_o = reinterpret_cast<float*>(smem_raw);              // [NUM_WARPS][GROUP][HEAD_DIM]
  float* st_m = st_o + NUM_WARPS * GROUP * HEAD_DIM;              // [NUM_WARPS][16]
  float* st_d = st_m + NUM_WARPS * 16;                            // [NUM_WARPS][16]
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    d[r] += __shfl_xor_sync(0xffffffffu, d[r], 1);
    d[r] += __shfl_xor_sync(0xffffffffu, d[r], 2);
    const int row = g + r * 8;
    if (t == 0) {
      st_m[warp * 16 + row] = m[r];
      st_d[warp * 16 + row] = d[r];
    }
    if (row < GROUP) {
#pragma unroll
      for (int n = 0; n < HEAD_DIM / 8; ++n) {
        float* dst = st_o + (warp * GROUP + row) * HEAD_DIM + n * 8 + 2 * t;
        dst[0] = o[n][r * 2];
        dst[1] = o[n][r * 2 + 1];
      }
    }
  }
  compute_sync();

  constexpr int OUT_VEC = 8;
  for (int item = tid; item < GROUP * (HEAD_DIM / OUT_VEC); item += NUM_THREADS) {
    const int row = item / (HEAD_DIM / OUT_VEC), d0 = (item % (HEAD_DIM / OUT_VEC)) * OUT_VEC;
    float m_all = NEG_INF;
#pragma unroll
    for (int wi = 0; wi < NUM_WARPS; ++wi) m_all = fmaxf(m_all, st_m[wi * 16 + row]);
    float acc[OUT_VEC], den = 0.f;
#pragma unroll
    for (int i = 0; i < OUT_VEC; ++i) acc[i] = 0.f;
    if (m_all != NEG_INF) {
#pragma unroll
      for (int wi = 0; wi < NUM_WARPS; ++wi) {
        const float sc = fast_exp2(st_m[wi * 16 + row] - m_all);  // -inf -> 0
        den += st_d[wi * 16 + row] * sc;
#pragma unroll
        for (int i = 0; i < OUT_VEC; ++i) acc[i] += st_o[(wi * GROUP + row) * HEAD_DIM + d0 + i] * sc;
      }
    }
    const int qo_head = kv_head * GROUP + row;
#if VARIANT_SINKS
    // The sink joins the final state only; a split request's last block adds it after the merge.
    if (w.partial < 0) add_sink<OUT_VEC>(p.sinks_log2[qo_head], m_all, den, acc);
#endif
    const float inv = den > 0.f ? 1.f / den : 0.f;
#pragma unroll
    for (int i = 0; i < OUT_VEC; ++i) acc[i] *= inv;
    const float lse2 = den > 0.f ? m_all + fast_log2(den) : NEG_INF;
    if (w.partial < 0) {
      write_final<OUT_VEC>(p, w.request, qo_head, d0, acc, lse2);
    } else {
      const long long orow = (long long)w.partial * p.num_qo_heads + qo_head;
      store_vec_f32<float, OUT_VEC>(p.partial_o + orow * HEAD_DIM + d0, acc);
      if (d0 == 0) p.partial_lse[orow] = lse2;
    }
  }
  if (w.partial >= 0) {
    compute_sync();  // the state exchange area is reused by the merge
    merge_split_pieces<NUM_THREADS>(p, w, kv_head, tid, reinterpret_cast<float*>(smem_raw));
  }
}
