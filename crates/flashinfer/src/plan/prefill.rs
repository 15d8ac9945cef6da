//! The prefill planner: a pure function of request lengths and the GPU's size.
//!
//! A request's `qo_len * group` packed query rows (query token, head of the KV head's group) are cut
//! into tiles of `cta_q` rows, the first taking the remainder ([`row_tiles`]); each tile attends the keys it can see (under a causal mask, up to
//! its last row's diagonal). When the tiles alone cannot fill the GPU (a few long appends), each
//! tile's keys are split into chunks whose partial states the kernel merges exactly (the last block
//! of a tile to finish). Items are ordered longest first so that the grid's tail is short.

use super::order::LongestFirst;

/// One unit of prefill work, laid out exactly as `PrefillWork` in kernels/prefill.cuh.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PrefillWork {
    pub request: i32,
    /// Row of the request's first query token in `q` and `o`.
    pub q_start: i32,
    pub qo_len: i32,
    pub kv_len: i32,
    /// First packed row of the tile.
    pub row_begin: i32,
    /// Keys `[kv_begin, kv_end)` of the request.
    pub kv_begin: i32,
    pub kv_end: i32,
    /// Ragged KV: row of the request's first key; paged: 0.
    pub kv_offset: i32,
    /// Paged KV: index into `kv_indices` of the request's first page.
    pub page_begin: i32,
    /// Custom mask: byte offset of the request's bits.
    pub mask_offset: i32,
    /// Partial-state slot, or -1 when the item writes the final output.
    pub partial: i32,
    /// A split tile's first slot and number of pieces.
    pub merge_begin: i32,
    pub num_pieces: i32,
    /// A split tile's arrival counter.
    pub counter: i32,
    /// Packed rows of the tile, at most `cta_q` (see [`row_tiles`]).
    pub rows: i32,
}

/// Where one request's data lives (all offsets already validated by the op).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PrefillRequest {
    pub qo_len: usize,
    pub kv_len: usize,
    pub q_start: usize,
    pub kv_offset: usize,
    pub page_begin: usize,
    pub mask_offset: usize,
}

/// The shape of the problem the planner needs besides the requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PrefillShape {
    /// Query heads per KV head (rows packed per query token).
    pub group: usize,
    /// Packed rows per tile.
    pub cta_q: usize,
    /// Keys per pipeline stage of the kernel (chunks are multiples of it).
    pub kv_tile: usize,
    pub causal: bool,
    /// Blocks per work item (the kernel runs each item for every KV head).
    pub num_kv_heads: usize,
    /// Blocks resident on the GPU at once.
    pub wave: usize,
    /// Most pieces one tile may be split into (the in-kernel merge keeps their LSEs in shared
    /// memory).
    pub max_pieces: usize,
    pub allow_split: bool,
    /// Batch-invariant mode: split every tile's keys into chunks of this many (a multiple of
    /// `kv_tile`), whatever the batch, instead of choosing a chunk from the batch.
    pub fixed_kv_chunk: Option<usize>,
}

/// The schedule of one prefill step.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PrefillSchedule {
    pub work: Vec<PrefillWork>,
    /// Keys per chunk (`None`: nothing was split).
    pub kv_chunk: Option<usize>,
    pub num_partial: usize,
    pub num_counters: usize,
}

/// Smallest chunk of keys worth a block of its own.
pub const MIN_KV_CHUNK: usize = 128;

/// The row tiles of a request of `rows` packed rows, as `(row_begin, rows)`: `cta_q` rows each,
/// except the first, which takes the remainder. The short tile goes first because under a
/// causal mask the first rows see the fewest keys: at the end, its padding rows (whose warpgroups
/// idle) would sit in the tile that sees every key (16 x 1024 at GQA 4 and 192-row tiles: 64 of
/// the last tile's 192 rows valid). The definition the tests check the planner against (which
/// walks the same tiles without a division per tile).
pub fn row_tiles(rows: usize, cta_q: usize) -> impl Iterator<Item = (usize, usize)> {
    let cta_q = cta_q.max(1);
    let first = if rows == 0 { 0 } else { (rows - 1) % cta_q + 1 };
    std::iter::once((0, first))
        .filter(|&(_, n)| n > 0)
        .chain((first..rows).step_by(cta_q).map(move |b| (b, cta_q)))
}

/// Keys the tile of packed rows `row_begin..row_begin + rows` of a request can see.
pub fn tile_kv_len(
    r: &PrefillRequest,
    shape: &PrefillShape,
    row_begin: usize,
    rows: usize,
) -> usize {
    if !shape.causal {
        return r.kv_len;
    }
    if rows == 0 {
        return 0; // (no such tile: row_tiles makes none)
    }
    let last_row = row_begin + rows - 1;
    let last_token = last_row / shape.group;
    // Query i sees keys j <= kv_len - qo_len + i.
    (r.kv_len + last_token + 1)
        .saturating_sub(r.qo_len)
        .min(r.kv_len)
}

/// Work items that fill one wave of blocks (each item runs once per KV head): fewer tiles than
/// this is when the planner splits keys.
fn items_per_wave(shape: &PrefillShape) -> usize {
    (shape.wave / shape.num_kv_heads.max(1)).max(1)
}

/// Plans a prefill step (see [`plan_prefill_into`], which reuses buffers across steps).
pub fn plan_prefill(requests: &[PrefillRequest], shape: &PrefillShape) -> PrefillSchedule {
    let mut s = PrefillSchedule::default();
    plan_prefill_into(requests, shape, &mut PrefillScratch::default(), &mut s);
    s
}

/// Buffers of [`plan_prefill_into`] besides the schedule, kept by the op across plans so that a
/// plan allocates nothing once they have grown.
#[derive(Clone, Debug, Default)]
pub struct PrefillScratch {
    /// Keys each tile sees, for the split decision.
    tile_kv: Vec<usize>,
    order: LongestFirst<PrefillWork>,
}

/// Plans a prefill step into `s`, reusing its buffers and `scratch`'s: the same schedule as
/// [`plan_prefill`].
pub fn plan_prefill_into(
    requests: &[PrefillRequest],
    shape: &PrefillShape,
    scratch: &mut PrefillScratch,
    s: &mut PrefillSchedule,
) {
    let tiles = TileWalk::new(shape);
    // The most keys a tile sees: a request's last tile sees all of its keys (so the tiles
    // themselves are only walked when the split is decided by them).
    let max_kv = requests
        .iter()
        .filter(|r| r.qo_len * shape.group > 0)
        .map(|r| r.kv_len)
        .max()
        .unwrap_or(0);
    let items_wanted = items_per_wave(shape);
    let mut chunk = shape.fixed_kv_chunk.filter(|&c| c > 0 && c < max_kv);
    if shape.fixed_kv_chunk.is_none() && shape.allow_split && max_kv > MIN_KV_CHUNK {
        // Split only a batch of fewer tiles than one wave's items: walking the requests' tiles
        // stops once there are that many.
        let tile_kv = &mut scratch.tile_kv;
        tile_kv.clear();
        tile_kv.reserve(items_wanted);
        for r in requests {
            if tile_kv.len() >= items_wanted {
                break;
            }
            tiles.walk(r, |_, _, kv_seen| tile_kv.push(kv_seen));
        }
        if tile_kv.len() < items_wanted {
            let count = |chunk: usize| {
                tile_kv
                    .iter()
                    .map(|&kv| kv.div_ceil(chunk).max(1))
                    .sum::<usize>()
            };
            // Smallest chunk (a whole number of kernel KV tiles) whose items fit one wave.
            let hi = super::smallest_chunk(
                MIN_KV_CHUNK.max(max_kv.div_ceil(shape.max_pieces.max(1))),
                max_kv,
                shape.kv_tile.max(1),
                items_wanted,
                count,
            );
            if hi < max_kv {
                chunk = Some(hi);
            }
        }
    }

    // The previous schedule's list lends its buffer. (A new one gets room for an item per
    // request, or for a split's items, which fit one wave.)
    let mut work = std::mem::take(&mut s.work);
    work.clear();
    work.reserve(match (chunk, shape.fixed_kv_chunk) {
        (Some(_), None) => items_wanted,
        _ => requests.len(),
    });
    let (mut num_partial, mut num_counters) = (0, 0);
    // A tile's item without its keys (the request's, and the tile's first row).
    let item = |i: usize, r: &PrefillRequest, row_begin: usize, rows: usize| PrefillWork {
        request: i as i32,
        q_start: r.q_start as i32,
        qo_len: r.qo_len as i32,
        kv_len: r.kv_len as i32,
        row_begin: row_begin as i32,
        rows: rows as i32,
        kv_offset: r.kv_offset as i32,
        page_begin: r.page_begin as i32,
        mask_offset: r.mask_offset as i32,
        partial: -1,
        num_pieces: 1,
        ..Default::default()
    };
    match chunk {
        // One item per tile.
        None => {
            for (i, r) in requests.iter().enumerate() {
                tiles.walk(r, |row_begin, rows, kv_seen| {
                    work.push(PrefillWork {
                        kv_end: kv_seen as i32,
                        ..item(i, r, row_begin, rows)
                    })
                });
            }
        }
        // A tile of more keys than a chunk: one item per chunk, each with its own partial
        // state, merged in slot order by the last to finish (its counter).
        Some(c) => {
            for (i, r) in requests.iter().enumerate() {
                tiles.walk(r, |row_begin, rows, kv_seen| {
                    let tile = PrefillWork {
                        kv_end: kv_seen as i32,
                        merge_begin: num_partial as i32,
                        counter: num_counters as i32,
                        ..item(i, r, row_begin, rows)
                    };
                    if kv_seen <= c {
                        work.push(tile);
                        return;
                    }
                    let pieces = kv_seen.div_ceil(c);
                    for k in 0..pieces {
                        work.push(PrefillWork {
                            kv_begin: (k * c) as i32,
                            kv_end: ((k + 1) * c).min(kv_seen) as i32,
                            partial: (num_partial + k) as i32,
                            num_pieces: pieces as i32,
                            ..tile
                        });
                    }
                    num_partial += pieces;
                    num_counters += 1;
                });
            }
        }
    }
    // Longest first: the last blocks to start are the shortest (plan/order.rs).
    scratch
        .order
        .sort(&mut work, |w| (w.kv_end - w.kv_begin) as u32);
    *s = PrefillSchedule {
        work,
        kv_chunk: chunk,
        num_partial,
        num_counters,
    };
}

/// Walks the tiles of a request ([`row_tiles`]) with the keys each sees ([`tile_kv_len`]),
/// without a division per tile (divisions, this one's, `step_by`'s and the tile count's, took
/// about a third of the time spent making items): the last tile sees all of the request's keys,
/// and the token of every other tile's last row advances by a constant number of tokens and
/// rows per tile, carried like digits, from the short first tile's.
#[derive(Clone, Copy, Debug)]
struct TileWalk {
    cta_q: usize,
    group: usize,
    causal: bool,
    /// `cta_q` rows, as (tokens, rows).
    step: (usize, usize),
}

impl TileWalk {
    fn new(shape: &PrefillShape) -> Self {
        let (cta_q, group) = (shape.cta_q.max(1), shape.group);
        let g = group.max(1); // (no request has tiles when group is 0)
        TileWalk {
            cta_q,
            group,
            causal: shape.causal,
            step: (cta_q / g, cta_q % g),
        }
    }

    /// Calls `f(row_begin, rows, keys seen)` for the tiles of `r`, first to last.
    fn walk(&self, r: &PrefillRequest, mut f: impl FnMut(usize, usize, usize)) {
        let rows = r.qo_len * self.group;
        if rows == 0 {
            return;
        }
        // The first tile takes the remainder; its last row as (token, row within the group).
        let first = (rows - 1) % self.cta_q + 1;
        let (mut token, mut row) = ((first - 1) / self.group, (first - 1) % self.group);
        let (mut row_begin, mut tile_rows) = (0, first);
        while row_begin < rows {
            let kv_seen = if !self.causal || row_begin + tile_rows >= rows {
                r.kv_len
            } else {
                // Query `token` sees keys j <= kv_len - qo_len + token.
                (r.kv_len + token + 1)
                    .saturating_sub(r.qo_len)
                    .min(r.kv_len)
            };
            f(row_begin, tile_rows, kv_seen);
            row_begin += tile_rows;
            tile_rows = self.cta_q;
            token += self.step.0;
            row += self.step.1;
            if row >= self.group {
                row -= self.group;
                token += 1;
            }
        }
    }
}

/// What any schedule of a bounded batch fits in: CUDA-graph mode sizes its grid and workspace
/// with it once, at construction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PrefillBounds {
    /// Work items (the grid runs each once per KV head).
    pub max_work: usize,
    /// Partial-state slots of split tiles.
    pub max_partial: usize,
    /// Arrival counters (one per split tile).
    pub max_counters: usize,
}

/// The most work items, partial-state slots and counters [`plan_prefill`] makes under `shape`
/// for any batch of at most `max_batch` requests with at most `max_qo_tokens` query tokens in
/// all, whatever their key lengths. Not for a fixed chunk (batch-invariant mode), whose items
/// grow with the keys: callers check such a schedule against the bounds.
///
/// Why they hold: a request of `q` tokens makes `ceil(q * group / cta_q)` tiles, at most
/// `(q * group + cta_q - 1) / cta_q`, so a batch makes at most
/// `(max_qo_tokens * group + max_batch * (cta_q - 1)) / cta_q` (and no more than its packed
/// rows); unsplit, each tile is one item. The planner splits only a batch of fewer tiles than
/// one wave's items, and then takes a chunk whose items fit in that wave (`smallest_chunk` only
/// returns a chunk whose count fits); each slot belongs to one item and each counter to one of
/// those tiles.
pub fn prefill_bounds(
    max_batch: usize,
    max_qo_tokens: usize,
    shape: &PrefillShape,
) -> PrefillBounds {
    let cta_q = shape.cta_q.max(1);
    let rows = max_qo_tokens.saturating_mul(shape.group);
    let tiles = rows.saturating_add(max_batch.saturating_mul(cta_q - 1)) / cta_q;
    let tiles = tiles.min(rows);
    let split = if shape.allow_split && rows > 0 {
        items_per_wave(shape)
    } else {
        0
    };
    PrefillBounds {
        max_work: tiles.max(split),
        max_partial: split,
        max_counters: split,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn requests(lens: &[(usize, usize)]) -> Vec<PrefillRequest> {
        let (mut q, mut k) = (0, 0);
        lens.iter()
            .map(|&(qo_len, kv_len)| {
                let r = PrefillRequest {
                    qo_len,
                    kv_len,
                    q_start: q,
                    kv_offset: k,
                    page_begin: 0,
                    mask_offset: 0,
                };
                q += qo_len;
                k += kv_len;
                r
            })
            .collect()
    }

    proptest! {
        /// Every (request, packed row, visible key) is covered by exactly one item, split tiles
        /// own consecutive slots, and each tile's pieces agree on their merge data.
        #[test]
        fn covers_every_row_and_key_once(
            lens in proptest::collection::vec((0usize..700, 0usize..3000), 0..12),
            group in 1usize..=8,
            cta_q in prop::sample::select(vec![16usize, 64, 128]),
            causal in any::<bool>(),
            heads in 1usize..=8,
            wave in 1usize..=600,
            max_pieces in 1usize..=64,
        ) {
            let reqs = requests(&lens);
            let shape = PrefillShape {
                group, cta_q, kv_tile: 64, causal, num_kv_heads: heads, wave, max_pieces,
                allow_split: true, fixed_kv_chunk: None,
            };
            let s = plan_prefill(&reqs, &shape);
            // keys covered per (request, tile)
            let mut covered = std::collections::HashMap::<(i32, i32), Vec<(i32, i32)>>::new();
            let mut rows_of = std::collections::HashMap::<(i32, i32), usize>::new();
            let mut slots = vec![0usize; s.num_partial];
            for w in &s.work {
                let r = &reqs[w.request as usize];
                prop_assert_eq!(w.q_start as usize, r.q_start);
                prop_assert_eq!(w.kv_offset as usize, r.kv_offset);
                prop_assert!(w.row_begin >= 0 && w.rows > 0 && w.rows as usize <= cta_q);
                prop_assert!(((w.row_begin + w.rows) as usize) <= r.qo_len * group);
                prop_assert!(w.kv_begin <= w.kv_end);
                covered.entry((w.request, w.row_begin)).or_default().push((w.kv_begin, w.kv_end));
                rows_of.insert((w.request, w.row_begin), w.rows as usize);
                if w.partial >= 0 {
                    prop_assert!(w.num_pieces as usize <= max_pieces);
                    prop_assert!(w.partial >= w.merge_begin && w.partial < w.merge_begin + w.num_pieces);
                    slots[w.partial as usize] += 1;
                    prop_assert!((w.counter as usize) < s.num_counters);
                }
            }
            prop_assert!(slots.iter().all(|&n| n == 1));
            for (i, r) in reqs.iter().enumerate() {
                // Every packed row in exactly one tile: the tiles of row_tiles, back to back.
                let mut next_row = 0;
                for (row_begin, rows) in row_tiles(r.qo_len * group, cta_q) {
                    prop_assert_eq!(row_begin, next_row);
                    next_row += rows;
                    prop_assert_eq!(rows_of.get(&(i as i32, row_begin as i32)).copied(), Some(rows));
                    let mut pieces = covered.remove(&(i as i32, row_begin as i32)).unwrap_or_default();
                    prop_assert!(!pieces.is_empty(), "tile ({}, {}) has no item", i, row_begin);
                    pieces.sort();
                    let mut at = 0;
                    for (b, e) in pieces {
                        prop_assert_eq!(b, at);
                        at = e;
                    }
                    prop_assert_eq!(at as usize, tile_kv_len(r, &shape, row_begin, rows));
                }
                prop_assert_eq!(next_row, r.qo_len * group);
            }
            prop_assert!(covered.is_empty(), "items for tiles that do not exist");
        }
    }

    proptest! {
        /// The tile walk (no division per tile) gives every tile's keys as `tile_kv_len`.
        #[test]
        fn tile_walk_matches_tile_kv_len(
            qo_len in 0usize..700,
            kv_len in 0usize..3000,
            group in 1usize..=8,
            cta_q in prop::sample::select(vec![16usize, 48, 64, 128, 192]),
            causal in any::<bool>(),
        ) {
            let r = requests(&[(qo_len, kv_len)])[0];
            let shape = PrefillShape {
                group, cta_q, kv_tile: 64, causal, num_kv_heads: 1, wave: 1, max_pieces: 1,
                allow_split: false, fixed_kv_chunk: None,
            };
            let mut walked = Vec::new();
            TileWalk::new(&shape).walk(&r, |row_begin, rows, kv| walked.push((row_begin, rows, kv)));
            let want: Vec<_> = row_tiles(qo_len * group, cta_q)
                .map(|(row_begin, rows)| (row_begin, rows, tile_kv_len(&r, &shape, row_begin, rows)))
                .collect();
            prop_assert_eq!(walked, want);
        }
    }

    proptest! {
        /// Planning into the buffers of earlier plans gives the schedule of a fresh plan.
        #[test]
        fn reused_buffers_plan_the_same(
            batches in proptest::collection::vec(
                proptest::collection::vec((0usize..300, 0usize..5000), 0..40),
                1..4,
            ),
            cta_q in prop::sample::select(vec![16usize, 64, 128]),
            wave in 1usize..=600,
        ) {
            let shape = PrefillShape {
                group: 4, cta_q, kv_tile: 64, causal: true, num_kv_heads: 8, wave,
                max_pieces: 64, allow_split: true, fixed_kv_chunk: None,
            };
            let (mut scratch, mut s) = (PrefillScratch::default(), PrefillSchedule::default());
            for lens in &batches {
                let reqs = requests(lens);
                plan_prefill_into(&reqs, &shape, &mut scratch, &mut s);
                prop_assert_eq!(&s, &plan_prefill(&reqs, &shape));
            }
        }
    }

    proptest! {
        /// Batch-invariant mode: a request's items are the same whatever else is in the batch.
        #[test]
        fn fixed_chunk_items_do_not_depend_on_the_batch(
            lens in proptest::collection::vec((1usize..300, 0usize..3000), 1..10),
            chunk_tiles in 1usize..10,
            causal in any::<bool>(),
            pick in 0usize..10,
        ) {
            let reqs = requests(&lens);
            let r = pick % reqs.len();
            let shape = PrefillShape {
                group: 4, cta_q: 64, kv_tile: 64, causal, num_kv_heads: 8, wave: 264,
                max_pieces: 1 << 20, allow_split: true, fixed_kv_chunk: Some(64 * chunk_tiles),
            };
            let of = |s: &PrefillSchedule, req: i32| {
                let mut v: Vec<(i32, i32, i32, i32)> = s
                    .work
                    .iter()
                    .filter(|w| w.request == req)
                    .map(|w| (w.row_begin, w.kv_begin, w.kv_end, w.num_pieces))
                    .collect();
                v.sort_unstable();
                v
            };
            let in_batch = plan_prefill(&reqs, &shape);
            let alone = plan_prefill(&requests(&lens[r..=r]), &shape);
            prop_assert_eq!(of(&in_batch, r as i32), of(&alone, 0));
        }
    }

    proptest! {
        /// Every batch inside the limits fits the bounds CUDA-graph mode sizes for, split or not,
        /// however long its keys.
        #[test]
        fn schedules_fit_the_bounds_of_their_limits(
            lens in proptest::collection::vec((0usize..600, 0usize..20_000), 0..20),
            spare_requests in 0usize..4,
            spare_tokens in 0usize..300,
            group in 1usize..=8,
            cta_q in prop::sample::select(vec![16usize, 64, 128, 192]),
            causal in any::<bool>(),
            heads in 1usize..=8,
            wave in 1usize..=1200,
            max_pieces in 1usize..=64,
            allow_split in any::<bool>(),
        ) {
            let reqs = requests(&lens);
            let shape = PrefillShape {
                group, cta_q, kv_tile: 64, causal, num_kv_heads: heads, wave, max_pieces,
                allow_split, fixed_kv_chunk: None,
            };
            let max_batch = lens.len() + spare_requests;
            let max_qo = lens.iter().map(|l| l.0).sum::<usize>() + spare_tokens;
            let b = prefill_bounds(max_batch, max_qo, &shape);
            let s = plan_prefill(&reqs, &shape);
            prop_assert!(s.work.len() <= b.max_work, "{} items > {:?}", s.work.len(), b);
            prop_assert!(s.num_partial <= b.max_partial, "{} slots > {:?}", s.num_partial, b);
            prop_assert!(s.num_counters <= b.max_counters, "{} counters > {:?}", s.num_counters, b);
        }
    }

    #[test]
    fn bounds_of_small_limits() {
        let shape = PrefillShape {
            group: 4,
            cta_q: 64,
            kv_tile: 64,
            causal: true,
            num_kv_heads: 8,
            wave: 264,
            max_pieces: 64,
            allow_split: true,
            fixed_kv_chunk: None,
        };
        // 100 requests of one token make 100 tiles of one item each; the bound, (400 + 100 *
        // 63) / 64, is a little above.
        let b = prefill_bounds(100, 100, &shape);
        assert_eq!(b.max_work, 104);
        assert_eq!(
            plan_prefill(&requests(&[(1, 50); 100]), &shape).work.len(),
            100
        );
        // Few tiles: the wave (264 / 8 heads = 33 items) bounds the split items.
        let b = prefill_bounds(2, 20, &shape);
        assert_eq!((b.max_work, b.max_partial, b.max_counters), (33, 33, 33));
        let unsplit = PrefillShape {
            allow_split: false,
            ..shape
        };
        let b = prefill_bounds(2, 20, &unsplit);
        assert_eq!((b.max_work, b.max_partial, b.max_counters), (3, 0, 0));
        assert_eq!(prefill_bounds(4, 0, &shape), PrefillBounds::default());
    }

    #[test]
    fn causal_tiles_stop_at_their_diagonal() {
        let shape = PrefillShape {
            group: 4,
            cta_q: 128,
            kv_tile: 64,
            causal: true,
            num_kv_heads: 8,
            wave: 264,
            max_pieces: 64,
            allow_split: false,
            fixed_kv_chunk: None,
        };
        let r = requests(&[(100, 1100)])[0];
        // 400 rows: a first tile of 16 rows (tokens 0..4), then three of 128.
        let tiles: Vec<_> = row_tiles(400, 128).collect();
        assert_eq!(tiles, [(0, 16), (16, 128), (144, 128), (272, 128)]);
        // Token 3 sees keys 0..=1003; the second tile's last token (35) keys 0..=1035.
        assert_eq!(tile_kv_len(&r, &shape, 0, 16), 1004);
        assert_eq!(tile_kv_len(&r, &shape, 16, 128), 1036);
        assert_eq!(tile_kv_len(&r, &shape, 272, 128), 1100);
        // More queries than keys: the first tokens see nothing.
        let r = requests(&[(100, 10)])[0];
        assert_eq!(tile_kv_len(&r, &shape, 0, 16), 0);
        // A whole number of tiles: no short one.
        assert_eq!(
            row_tiles(256, 128).collect::<Vec<_>>(),
            [(0, 128), (128, 128)]
        );
        assert_eq!(row_tiles(0, 128).count(), 0);
    }

    #[test]
    fn a_short_append_over_a_long_cache_is_split() {
        let shape = PrefillShape {
            group: 4,
            cta_q: 16,
            kv_tile: 64,
            causal: true,
            num_kv_heads: 8,
            wave: 264,
            max_pieces: 64,
            allow_split: true,
            fixed_kv_chunk: None,
        };
        let s = plan_prefill(&requests(&[(4, 4096)]), &shape);
        assert!(s.kv_chunk.is_some());
        assert!(s.work.len() > 1 && s.work.len() <= 33);
        // A long prompt fills the GPU by itself.
        let s = plan_prefill(
            &requests(&[(8192, 8192)]),
            &PrefillShape {
                cta_q: 128,
                ..shape
            },
        );
        assert_eq!(s.kv_chunk, None);
        assert_eq!(s.work.len(), 8192 * 4 / 128);
        assert!(s
            .work
            .windows(2)
            .all(|p| p[0].kv_end - p[0].kv_begin >= p[1].kv_end - p[1].kv_begin));
    }
}
