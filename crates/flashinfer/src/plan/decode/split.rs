//! How a decode batch that fills the GPU by itself is split: the chunk size whose simulated
//! makespan is the smallest.
//!
//! The decode kernel's grid is (work items, KV heads), and the hardware's block scheduler hands
//! blocks to free slots (`wave` of them: 2 blocks per SM on the H200, 264) in the order of their
//! linear index, x fastest: **head-major**, every KV head runs the whole (longest-first) item list
//! before the next head starts. Each slot takes the next block as soon as its block ends, so the
//! block scheduler is greedy list scheduling, and the head-major order means that the longest
//! items of the last head start when about (H-1)/H of the work is done: a long item then runs on
//! alone. Splitting shortens that tail but adds blocks, each with a fixed cost, and merges.
//!
//! The host simulates that scheduler for a handful of chunk sizes and keeps the best:
//! - Each block costs `start + tiles` (in 64-token tiles streamed at the full-load rate, one
//!   slot's share of the bandwidth), plus `merge` on the last piece of a split request.
//! - While blocks remain to dispatch every slot is busy, so every block streams at the full-load
//!   rate and the greedy assignment is exact in that model. Once the last block is dispatched the
//!   busy slots drain; with `n` of them busy each streams `min(lone_speedup, wave / n)` times as
//!   fast (the bandwidth is shared; a block alone is latency-bound).
//! - Candidates: no split, and chunks of total / (k waves of items) for k in {1, 1.5, 2, 3, 4}
//!   (multiples of `CHUNK_ALIGN`; k = 1 is the fair share, the old policy). The winner is the
//!   candidate with the fewest items among those within `min_gain` of the smallest estimate.
//!   Splits are simulated from the coarsest, stopping at the first that is slower than a coarser
//!   one, and a candidate whose lower bound (the work spread over the slots, or its longest
//!   block) cannot matter is not simulated.
//!
//! The simulation counts slots per finishing tick in a ring and walks runs of items of equal
//! duration, so it costs O(heads · runs + ticks) per candidate, not a heap operation per block;
//! a tick is 1/128 of the ideal step.
//!
//! Constants fitted (8 shapes, 4 parameters, error ~5 % rms) to the H200 numbers of
//! docs/benchmarks.md (64 x 4096, 128 x 8192, the three skewed batches at their measured plans,
//! 16 x 4096, 1 x 32768, 1 x 1024): `fit_split_model_to_h200` in plan/decode.rs re-fits them
//! from new measurements. The head-major order fits those numbers far better than an item-major
//! one (uniform [512, 7680]: 354 vs 306 us predicted, 353 measured).

use std::fmt;
use std::str::FromStr;

/// Tokens per cost tile: the tensor-core decode kernel's KV tile.
const TILE_TOKENS: usize = 64;
/// Cost units per tile (so that the fixed costs can be fractions of a tile).
const UNITS_PER_TILE: u64 = 8;
/// The simulation's clock ticks about this many times over the ideal makespan (the work spread
/// evenly over the slots): a block's duration is rounded to a tick (0.2 % of the step), so a
/// simulation handles at most ~this many distinct finishing times, however deep the batch.
const TICKS_PER_STEP: u64 = 128;
/// Candidate chunks: total / (k waves of items) with k = these / 2 (1, 1.5, 2, 3, 4).
const WAVES_X2: [usize; 5] = [2, 3, 4, 6, 8];
/// The most waves of items a candidate makes: items <= MAX_WAVES * (wave / heads) + batch.
pub const MAX_WAVES: usize = 4;
const _: () = assert!(WAVES_X2[WAVES_X2.len() - 1] <= 2 * MAX_WAVES);

/// The order in which the hardware starts the blocks of the (items, heads) grid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dispatch {
    /// Every head's pass over the item list in turn (grid x = item, the layout of today's kernel).
    HeadMajor,
    /// All heads of an item, then the next item (a grid with the head as the fastest index).
    ItemMajor,
}

/// The cost model of the simulated split (all costs in 64-token tiles of one block at the
/// full-load streaming rate, about 2.2 us on the H200: 32 KB of K and V per tile and KV head at
/// 4 TB/s / 264 blocks). Tune without rebuilding with
/// `FLASHINFER_DECODE_SPLIT=new:start=3,merge=1,speedup=2,gain=0.02` (see [`SplitPolicy`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SplitModel {
    /// Fixed cost of a block: q load, first-tile latency, the epilogue. Its q load and first
    /// tile alone are 2-3 us (1-1.5 tiles); the fit to measured runs prefers 3 to 4 (it also
    /// absorbs whatever a short block costs beyond its bytes).
    pub start: f64,
    /// The in-kernel merge of a split request, done by its last block (LSE load, weighted sum).
    pub merge: f64,
    /// How much faster a block streams when few blocks run (latency-bound: one block alone moved
    /// ~36 GB/s in FlashInfer's one-long-request run, against ~16 GB/s under full load).
    pub lone_speedup: f64,
    /// Relative gain a candidate with more items must promise over one with fewer (the model's
    /// error margin).
    pub min_gain: f64,
    /// Block start order of the kernel's grid: `ItemMajor` (every KV head of an item starts
    /// before the next item's; the decode kernels' grid since session 4) or `HeadMajor` (each
    /// head's whole item list in turn; the grid before).
    pub dispatch: Dispatch,
}

impl SplitModel {
    /// The model with every field in range (NaN: the default's), as the simulation uses it.
    fn sanitized(&self) -> SplitModel {
        let fix = |x: f64, lo: f64, hi: f64, default: f64| {
            if x.is_nan() {
                default
            } else {
                x.clamp(lo, hi)
            }
        };
        let d = SplitModel::DEFAULT;
        SplitModel {
            start: fix(self.start, 0.0, 1000.0, d.start),
            merge: fix(self.merge, 0.0, 1000.0, d.merge),
            lone_speedup: fix(self.lone_speedup, 1.0, 100.0, d.lone_speedup),
            min_gain: fix(self.min_gain, 0.0, 1.0, d.min_gain),
            dispatch: self.dispatch,
        }
    }

    /// The constants fitted to the H200 (see the module comment).
    pub const DEFAULT: SplitModel = SplitModel {
        start: 3.0,
        merge: 1.0,
        lone_speedup: 2.0,
        min_gain: 0.02,
        dispatch: Dispatch::ItemMajor,
    };
}

impl Default for SplitModel {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// How [`super::plan_decode_with`] splits a batch of at least one wave of items (the small-batch
/// branch and batch-invariant mode do not depend on it).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum SplitPolicy {
    /// Session 3's rule: split every request longer than total / one wave of items.
    FairShare,
    /// The chunk with the smallest simulated makespan (the default).
    Simulated(SplitModel),
}

impl Default for SplitPolicy {
    fn default() -> Self {
        SplitPolicy::Simulated(SplitModel::DEFAULT)
    }
}

/// `old`, `new`, or `new:key=value,...` with keys `start`, `merge`, `speedup` (tiles, tiles,
/// factor), `gain` (fraction) and `dispatch` (`head` or `item`): the syntax of the
/// `FLASHINFER_DECODE_SPLIT` tuning knob.
impl FromStr for SplitPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (name, rest) = s.trim().split_once(':').unwrap_or((s.trim(), ""));
        match name {
            "old" | "fair" if rest.is_empty() => return Ok(SplitPolicy::FairShare),
            "new" | "sim" => {}
            _ => return Err(format!("{s:?}: expected old, new or new:key=value,...")),
        }
        let mut m = SplitModel::DEFAULT;
        for kv in rest.split(',').filter(|kv| !kv.trim().is_empty()) {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| format!("{kv:?} is not key=value"))?;
            let (k, v) = (k.trim(), v.trim());
            if k == "dispatch" {
                m.dispatch = match v {
                    "head" => Dispatch::HeadMajor,
                    "item" => Dispatch::ItemMajor,
                    _ => return Err(format!("dispatch={v}: expected head or item")),
                };
                continue;
            }
            let x: f64 = v.parse().map_err(|_| format!("{k}={v}: not a number"))?;
            let (field, ok) = match k {
                "start" => (&mut m.start, (0.0..=1000.0).contains(&x)),
                "merge" => (&mut m.merge, (0.0..=1000.0).contains(&x)),
                "speedup" => (&mut m.lone_speedup, (1.0..=100.0).contains(&x)),
                "gain" => (&mut m.min_gain, (0.0..1.0).contains(&x)),
                _ => {
                    return Err(format!(
                        "unknown key {k:?} (start, merge, speedup, gain, dispatch)"
                    ))
                }
            };
            if !ok {
                return Err(format!("{k}={v} is out of range"));
            }
            *field = x;
        }
        Ok(SplitPolicy::Simulated(m))
    }
}

impl fmt::Display for SplitPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SplitPolicy::FairShare => write!(f, "old"),
            SplitPolicy::Simulated(m) => write!(
                f,
                "new:start={},merge={},speedup={},gain={},dispatch={}",
                m.start,
                m.merge,
                m.lone_speedup,
                m.min_gain,
                match m.dispatch {
                    Dispatch::HeadMajor => "head",
                    Dispatch::ItemMajor => "item",
                }
            ),
        }
    }
}

/// The model's costs in integer units ([`UNITS_PER_TILE`] per tile).
#[derive(Clone, Copy)]
struct Units {
    start: u64,
    merge: u64,
}

impl Units {
    fn of(m: &SplitModel) -> Self {
        let u = |tiles: f64| (tiles.clamp(0.0, 1000.0) * UNITS_PER_TILE as f64).round() as u64;
        Units {
            start: u(m.start),
            merge: u(m.merge),
        }
    }
    /// A block of `tiles` tiles.
    fn block(&self, tiles: usize) -> u64 {
        self.start + UNITS_PER_TILE * tiles as u64
    }
}

/// Tiles of an item of `tokens` tokens (an empty request still runs one block).
fn tiles_of(tokens: usize) -> usize {
    tokens.div_ceil(TILE_TOKENS).max(1)
}

/// Item count, total block duration per KV head and the longest block of one candidate.
#[derive(Clone, Copy)]
struct Shape {
    items: usize,
    work: u64,
    longest: u64,
}

/// The batch, summarized once for every candidate, so that a candidate costs O(requests it
/// splits + its chunk's tiles), not O(batch).
struct Batch {
    /// Requests of each tile count (index).
    hist: Vec<u32>,
    /// Requests of at most `t` tiles (index `t`), and their tiles.
    count_upto: Vec<u64>,
    tiles_upto: Vec<u64>,
    /// Lengths of the requests longer than `split_above` tokens: those of more tiles than any
    /// candidate chunk (of at least `split_above` tokens) has, and those beyond the histogram.
    long: Vec<usize>,
    /// Tiles of the longest request.
    longest_tiles: usize,
}

impl Batch {
    /// The histogram covers up to `hist_tiles` tiles (the coarsest candidate chunk's), and
    /// `split_above` (at most that many tiles' tokens) is the finest candidate chunk.
    fn new(lens: &[usize], split_above: usize, hist_tiles: usize) -> Self {
        let longest_tiles = tiles_of(lens.iter().copied().max().unwrap_or(0));
        let cap = hist_tiles.clamp(1, longest_tiles);
        debug_assert!(cap == longest_tiles || split_above <= TILE_TOKENS * cap);
        let mut b = Batch {
            hist: vec![0; cap + 1],
            count_upto: Vec::with_capacity(cap + 1),
            tiles_upto: Vec::with_capacity(cap + 1),
            long: Vec::new(),
            longest_tiles,
        };
        for &len in lens {
            let t = tiles_of(len);
            if t <= cap {
                b.hist[t] += 1;
            }
            if len > split_above {
                b.long.push(len);
            }
        }
        let (mut n, mut tiles) = (0u64, 0u64);
        for (t, &h) in b.hist.iter().enumerate() {
            n += h as u64;
            tiles += h as u64 * t as u64;
            b.count_upto.push(n);
            b.tiles_upto.push(tiles);
        }
        b
    }

    /// Tiles up to which the histogram holds every request, each one whole item (unsplit, or
    /// of at most `chunk` tokens); the others are in `long`.
    fn whole_upto(&self, chunk: Option<usize>) -> usize {
        let cap = self.hist.len() - 1;
        chunk.map_or(cap, |c| (c / TILE_TOKENS).min(cap))
    }

    /// Calls `item(tiles, merges, count)` for the items of the requests in `long` of more than
    /// `whole_upto` tiles, split into chunks of `chunk` tokens (`count` items of `tiles` tiles,
    /// merging or not).
    fn for_long_items(&self, chunk: Option<usize>, mut item: impl FnMut(usize, bool, u32)) {
        let upto = TILE_TOKENS * self.whole_upto(chunk);
        for &len in self.long.iter().filter(|&&len| len > upto) {
            match chunk {
                Some(c) if len > c => {
                    // 32-bit division where it fits (the planner's lengths are below 2^31).
                    let (full, rem) = match (u32::try_from(len), u32::try_from(c)) {
                        (Ok(l), Ok(c)) => ((l / c) as usize, (l % c) as usize),
                        _ => (len / c, len % c),
                    };
                    // The merge is the last piece's: the remainder's, or the last full chunk's.
                    if rem > 0 {
                        item(tiles_of(c), false, full as u32);
                        item(tiles_of(rem), true, 1);
                    } else {
                        item(tiles_of(c), false, full as u32 - 1);
                        item(tiles_of(c), true, 1);
                    }
                }
                _ => item(tiles_of(len), false, 1),
            }
        }
    }

    fn shape(&self, chunk: Option<usize>, u: Units) -> Shape {
        let upto = self.whole_upto(chunk);
        let n = self.count_upto[upto];
        let mut s = Shape {
            items: n as usize,
            work: n * u.start + UNITS_PER_TILE * self.tiles_upto[upto],
            longest: (1..=upto)
                .rev()
                .find(|&t| self.hist[t] > 0)
                .map_or(0, |t| u.block(t)),
        };
        self.for_long_items(chunk, |tiles, merges, count| {
            let d = u.block(tiles) + if merges { u.merge } else { 0 };
            s.items += count as usize;
            s.work += count as u64 * d;
            if count > 0 {
                s.longest = s.longest.max(d);
            }
        });
        s
    }
}

/// Scratch buffers of the simulation, reused across candidates.
#[derive(Default)]
struct Sim {
    /// Items per tile count (index), and those of them that also merge.
    hist: Vec<u32>,
    merge_hist: Vec<u32>,
    /// (duration in ticks, count) in dispatch order of one head's pass.
    runs: Vec<(u64, u32)>,
    /// Slots finishing at each tick (mod ring size).
    ring: Vec<u32>,
}

impl Sim {
    /// Estimated makespan (cost units) of the items of `chunk` (`s` its shape), `heads` blocks
    /// each, on `wave` slots, simulated with a clock of `tick` cost units.
    #[allow(clippy::too_many_arguments)]
    fn makespan(
        &mut self,
        batch: &Batch,
        chunk: Option<usize>,
        s: &Shape,
        heads: usize,
        wave: usize,
        u: Units,
        tick: u64,
        m: &SplitModel,
    ) -> f64 {
        // Items by tile count, longest first (the order of the work list, up to the order of
        // equal tile counts).
        let upto = batch.whole_upto(chunk);
        let max_tiles = chunk.map_or(batch.longest_tiles, |c| upto.max(tiles_of(c)));
        self.hist.clear();
        self.hist.extend_from_slice(&batch.hist[..=upto]);
        self.hist.resize(max_tiles + 1, 0);
        self.merge_hist.clear();
        self.merge_hist.resize(max_tiles + 1, 0);
        let (hist, merge_hist) = (&mut self.hist, &mut self.merge_hist);
        batch.for_long_items(chunk, |tiles, merges, count| {
            if merges {
                merge_hist[tiles] += count;
            } else {
                hist[tiles] += count;
            }
        });
        let (reps, passes) = match m.dispatch {
            Dispatch::HeadMajor => (1, heads),
            Dispatch::ItemMajor => (heads as u32, 1),
        };
        // Durations in ticks (at least one); equal neighbours form one run.
        let per_tick = 1.0 / tick as f64;
        let ticks = |d: u64| ((d as f64 * per_tick + 0.5) as u64).max(1);
        self.runs.clear();
        let mut run = |d: u64, n: u32| match self.runs.last_mut() {
            Some(last) if last.0 == d => last.1 += n,
            _ => self.runs.push((d, n)),
        };
        for t in (1..=max_tiles).rev() {
            if self.hist[t] > 0 {
                run(ticks(u.block(t)), self.hist[t] * reps);
            }
            if self.merge_hist[t] > 0 {
                run(ticks(u.block(t) + u.merge), self.merge_hist[t] * reps);
            }
        }
        // The ring holds finishing ticks in (now, now + longest]: its size exceeds `longest`.
        // The clock only moves forward, one tick at a time (a step is a few hundred ticks).
        let size = (ticks(s.longest) as usize + 1).next_power_of_two();
        if self.ring.len() != size {
            self.ring.clear();
            self.ring.resize(size, 0);
        }
        let (ring, mask) = (&mut self.ring[..], size - 1);
        // Dispatch: every free slot takes the next block at once; all slots start free at 0.
        let wave = wave.max(1) as u32;
        let (mut now, mut free) = (0usize, wave);
        for _ in 0..passes {
            for &(d, mut k) in &self.runs {
                let d = d as usize;
                while k > free {
                    // The free slots take what they can; the clock moves to the next finishing
                    // block.
                    ring[(now + d) & mask] += free;
                    k -= free;
                    free = 0;
                    while free == 0 {
                        now += 1;
                        free = std::mem::take(&mut ring[now & mask]);
                    }
                }
                ring[(now + d) & mask] += k;
                free -= k;
            }
        }
        // Drain: the busy slots finish; with fewer of them each streams faster (up to
        // `lone_speedup`): a tick with `busy` slots busy lasts max(1 / lone_speedup, busy / wave).
        // Leaves the ring empty.
        let mut busy = wave - free;
        let (per_speedup, per_slot) = (1.0 / m.lone_speedup.max(1.0), 1.0 / wave as f64);
        let mut real = now as f64;
        while busy > 0 {
            real += per_speedup.max(busy as f64 * per_slot);
            now += 1;
            busy -= std::mem::take(&mut ring[now & mask]);
        }
        real * tick as f64
    }
}

/// The simulation's tick (cost units) for a batch: the unsplit batch's ideal makespan over
/// [`TICKS_PER_STEP`], the same for every candidate so that their estimates compare.
fn tick_for(unsplit: &Shape, heads: usize, wave: usize) -> u64 {
    let ideal = unsplit.work * heads.max(1) as u64 / wave.max(1) as u64;
    (ideal / TICKS_PER_STEP).max(1)
}

/// A candidate split (`None`: none), its items and estimated makespan (tiles).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SplitEstimate {
    pub chunk: Option<usize>,
    pub items: usize,
    pub makespan: f64,
}

/// Estimated makespan in tiles (see the module comment) of splitting every request longer than
/// `chunk` tokens into chunks of `chunk` (`None`: no split), `heads` blocks per item, on `wave`
/// resident blocks.
pub fn estimate_makespan(
    lens: &[usize],
    chunk: Option<usize>,
    heads: usize,
    wave: usize,
    model: &SplitModel,
) -> SplitEstimate {
    let model = &model.sanitized();
    let u = Units::of(model);
    let chunk = chunk.map(|c| c.max(TILE_TOKENS));
    let batch = match chunk {
        Some(c) => Batch::new(lens, c / TILE_TOKENS * TILE_TOKENS, c / TILE_TOKENS),
        None => Batch::new(lens, usize::MAX, usize::MAX),
    };
    let s = batch.shape(chunk, u);
    let tick = tick_for(&batch.shape(None, u), heads, wave);
    let t = Sim::default().makespan(&batch, chunk, &s, heads.max(1), wave, u, tick, model);
    SplitEstimate {
        chunk,
        items: s.items,
        makespan: t / UNITS_PER_TILE as f64,
    }
}

/// The chunk (a multiple of `align`, itself a multiple of 64, and at least `floor`) of the batch
/// `lens` (`total` tokens, longest `max_len`) with the smallest estimated makespan, `None` for
/// no split. Candidates make at most `MAX_WAVES * wave / heads + lens.len()` items.
#[allow(clippy::too_many_arguments)]
pub(super) fn pick_chunk(
    lens: &[usize],
    total: usize,
    max_len: usize,
    floor: usize,
    align: usize,
    heads: usize,
    wave: usize,
    model: &SplitModel,
) -> Option<usize> {
    debug_assert_eq!(align % TILE_TOKENS, 0);
    let model = &model.sanitized();
    let items_wanted = (wave / heads.max(1)).max(1);
    let u = Units::of(model);
    let mut chunks = [0usize; WAVES_X2.len()];
    for (c, &w2) in chunks.iter_mut().zip(&WAVES_X2) {
        *c = (2 * total)
            .div_ceil(w2 * items_wanted)
            .max(floor)
            .div_ceil(align)
            * align;
    }
    // The largest candidate chunk is the first (coarsest split), the smallest the last.
    let batch = Batch::new(lens, chunks[chunks.len() - 1], chunks[0] / TILE_TOKENS);
    let unsplit = batch.shape(None, u);
    let tick = tick_for(&unsplit, heads, wave);
    // Candidates, fewest items first: no split, and total / (k waves of items); each with a
    // lower bound of its estimate: the slots together stream at most `wave` units per unit of
    // time, and a block runs at most `lone_speedup` times as fast as under full load.
    let bound = |s: &Shape| {
        (s.work as f64 * heads.max(1) as f64 / wave.max(1) as f64)
            .max(s.longest as f64 / model.lone_speedup.max(1.0))
    };
    let mut cands = Vec::with_capacity(WAVES_X2.len() + 1);
    cands.push((bound(&unsplit), None, unsplit, f64::INFINITY));
    for &c in &chunks {
        if c < max_len && cands.last().is_none_or(|&(_, last, _, _)| last != Some(c)) {
            let s = batch.shape(Some(c), u);
            cands.push((bound(&s), Some(c), s, f64::INFINITY));
        }
    }
    // The winner: the fewest items among the candidates within `min_gain` of the smallest
    // estimate (a finer split must pay for the model's error). No split is simulated first
    // where its bound is about the smallest (a deep or even batch: a split then has to beat it
    // by `min_gain` to matter), else last; the splits from the coarsest to the finest, stopping
    // at the first that is slower than a coarser one (the estimate is about convex in k: a
    // finer split shortens the tail but adds fixed costs). A candidate whose bound cannot
    // matter is skipped.
    let tolerance = 1.0 + model.min_gain;
    let mut sim = Sim::default();
    let mut estimate = |(_, c, s, t): &mut (f64, Option<usize>, Shape, f64)| {
        *t = sim.makespan(&batch, *c, s, heads.max(1), wave, u, tick, model);
        *t
    };
    let split_bound = cands[1..].iter().map(|x| x.0).fold(f64::INFINITY, f64::min);
    let unsplit_first = cands[0].0 <= split_bound * tolerance;
    let mut bar = f64::INFINITY;
    if unsplit_first {
        bar = estimate(&mut cands[0]) / tolerance;
    }
    let mut smallest = f64::INFINITY;
    for x in cands.iter_mut().skip(1) {
        if x.0 >= bar.min(smallest * tolerance) {
            continue;
        }
        let t = estimate(x);
        if t > smallest {
            break;
        }
        smallest = t;
    }
    if !unsplit_first && cands[0].0 <= smallest * tolerance {
        estimate(&mut cands[0]);
    }
    let smallest = cands.iter().map(|x| x.3).fold(f64::INFINITY, f64::min);
    // Candidates are in item order (every finer chunk makes at least as many items).
    cands
        .iter()
        .find(|x| x.3 <= smallest * tolerance)
        .and_then(|x| x.1)
}
