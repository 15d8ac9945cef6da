//! The decode planner: a pure function of request lengths and the GPU's size.
//!
//! Each work item is one (request, KV chunk); the kernel runs it for every KV head. When the batch
//! alone cannot fill the GPU, long requests are split into chunks (split-KV) whose partial states
//! are merged exactly afterwards. The chunk size is the smallest (so the most parallel) for which
//! the items still fit in one wave of resident blocks; splitting further would only add merge work.
//! A batch that fills the GPU by itself is split where a simulation of the block scheduler says
//! it shortens the step (plan/decode/split.rs, [`SplitPolicy`]).

mod split;

use super::order::LongestFirst;

pub use split::{estimate_makespan, Dispatch, SplitEstimate, SplitModel, SplitPolicy, MAX_WAVES};

/// One unit of decode work, laid out exactly as `DecodeWork` in kernels/decode.cuh.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodeWork {
    pub request: i32,
    /// Index into `kv_indices` of the request's first page.
    pub page_begin: i32,
    pub kv_start: i32,
    pub kv_len: i32,
    /// Partial-state slot, or -1 when the item writes the final output.
    pub partial: i32,
    /// For a split request: its first partial slot and number of pieces (the last block to
    /// finish merges them); unused otherwise.
    pub merge_begin: i32,
    pub num_pieces: i32,
}

impl DecodeWork {
    /// An item of no keys (what unused slots of a fixed-size list hold).
    pub const EMPTY: DecodeWork = DecodeWork {
        request: 0,
        page_begin: 0,
        kv_start: 0,
        kv_len: 0,
        partial: -1,
        merge_begin: 0,
        num_pieces: 0,
    };
}

/// The schedule of one decode step.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DecodeSchedule {
    pub work: Vec<DecodeWork>,
    /// Tokens per chunk (`None`: no request was split).
    pub chunk_size: Option<usize>,
    pub num_partial: usize,
}

impl DecodeSchedule {
    /// Whether the kernel's grid should start every KV head of an item before the next item
    /// (decode_common.cuh): for split or uneven batches, where the longest items must start
    /// first on every head (H200, heads fastest against items first: uniform [512, 7680] 3.26 ->
    /// 3.90 TB/s, one request of 32768 among 63 of 256: 2.51 -> 2.98). A uniform unsplit batch
    /// keeps items first, 4 % faster at page size 1 (64 x 4096: 285 against 296 us; equal at
    /// page 16).
    pub fn heads_fastest(&self) -> bool {
        let (first, last) = (self.work.first(), self.work.last());
        self.chunk_size.is_some() || first.map(|w| w.kv_len) != last.map(|w| w.kv_len)
    }
}

/// Waves of items from which a batch whose requests are each at most a fair share is planned
/// unsplit without simulation (see plan_decode_with).
pub const DEEP_WAVES: usize = 4;

/// Smallest chunk worth a block of its own: one 64-token tile of the tensor-core kernel. Small
/// batches are latency-bound, so even a 1024-token request spreads over 16 blocks per KV head.
/// Measured on the H200 at 1 x 1024: 10.5 us with 64-token chunks, 10.85 us with 128.
pub const MIN_CHUNK: usize = 64;
/// Chunks are whole multiples of this many tokens (so that they are whole kernel tiles for the
/// common tile of 32, and whole pages for power-of-two page sizes up to 64).
pub const CHUNK_ALIGN: usize = 64;

/// The most work items [`plan_decode_with`] makes for `batch` requests, whatever the policy and
/// the lengths: one per request, or, split, at most [`MAX_WAVES`] waves of items plus one per
/// request (CUDA-graph mode sizes its grid and workspace for this).
pub fn max_work_items(batch: usize, num_kv_heads: usize, wave: usize) -> usize {
    batch + MAX_WAVES * (wave / num_kv_heads.max(1)).max(1)
}

/// Plans a decode step with the default [`SplitPolicy`]. `kv_lens[i]` tokens of request `i`, its
/// pages starting at `page_begin[i]`; `num_kv_heads` blocks per work item; `wave` = blocks
/// resident at once; at most `max_pieces` chunks per request (the in-kernel merge keeps their
/// LSEs in shared memory).
pub fn plan_decode(
    kv_lens: &[usize],
    page_begin: &[i32],
    num_kv_heads: usize,
    wave: usize,
    max_pieces: usize,
    allow_split: bool,
) -> DecodeSchedule {
    plan_decode_with(
        kv_lens,
        page_begin,
        num_kv_heads,
        wave,
        max_pieces,
        allow_split,
        &SplitPolicy::default(),
    )
}

/// [`plan_decode`] with an explicit policy for batches that fill the GPU by themselves.
pub fn plan_decode_with(
    kv_lens: &[usize],
    page_begin: &[i32],
    num_kv_heads: usize,
    wave: usize,
    max_pieces: usize,
    allow_split: bool,
    policy: &SplitPolicy,
) -> DecodeSchedule {
    let chunk = decode_chunk(kv_lens, num_kv_heads, wave, max_pieces, allow_split, policy);
    schedule_decode(kv_lens, page_begin, chunk)
}

/// The chunk [`plan_decode_with`] splits requests into (`None`: none is split).
pub fn decode_chunk(
    kv_lens: &[usize],
    num_kv_heads: usize,
    wave: usize,
    max_pieces: usize,
    allow_split: bool,
    policy: &SplitPolicy,
) -> Option<usize> {
    let items_wanted = (wave / num_kv_heads.max(1)).max(1);
    let max_len = kv_lens.iter().copied().max().unwrap_or(0);
    let count = |chunk: usize| {
        kv_lens
            .iter()
            .map(|&l| l.div_ceil(chunk).max(1))
            .sum::<usize>()
    };
    let mut chunk = None;
    let round = |c: usize| c.div_ceil(CHUNK_ALIGN) * CHUNK_ALIGN;
    if allow_split && kv_lens.len() < items_wanted && max_len > MIN_CHUNK {
        // Smallest chunk (a multiple of CHUNK_ALIGN tokens) whose item count fits one wave.
        let hi = super::smallest_chunk(
            MIN_CHUNK.max(max_len.div_ceil(max_pieces.max(1))),
            max_len,
            CHUNK_ALIGN,
            items_wanted,
            count,
        );
        if hi < max_len {
            chunk = Some(hi);
        }
    } else if allow_split && max_len > MIN_CHUNK {
        // A batch that fills the GPU by itself: split only requests longer than some chunk, so
        // that a long request does not run alone after the others finished. Items come longest
        // first. Items: sum of ceil(len / chunk) <= total / chunk + batch, and every chunk is
        // at least total / (MAX_WAVES waves of items).
        let total: usize = kv_lens.iter().sum();
        let floor = round(MIN_CHUNK.max(max_len.div_ceil(max_pieces.max(1))));
        chunk = match policy {
            // A fair share of the work per resident block (total / blocks).
            SplitPolicy::FairShare => {
                Some(round(floor.max(total.div_ceil(items_wanted)))).filter(|&c| c < max_len)
            }
            // A deep batch (at least DEEP_WAVES waves of items, none longer than a slot's fair
            // share): dispatched longest first, only its shortest items end the tail, so it is
            // not split, without simulating (a simulation per candidate took plan() for 256
            // requests from 9.7 to over 20 us on the H200 host).
            SplitPolicy::Simulated(_)
                if kv_lens.len() >= DEEP_WAVES * items_wanted
                    && max_len <= total.div_ceil(items_wanted) =>
            {
                None
            }
            // The candidate with the smallest simulated makespan (split.rs).
            SplitPolicy::Simulated(model) => split::pick_chunk(
                kv_lens,
                total,
                max_len,
                floor,
                CHUNK_ALIGN,
                num_kv_heads,
                wave,
                model,
            ),
        };
    }
    chunk
}

/// Batch-invariant planning: every request longer than `chunk` tokens is split into chunks of
/// `chunk`, whatever else is in the batch, so a request's items (and so its result, to the bit)
/// do not depend on the batch. `chunk` is a multiple of [`CHUNK_ALIGN`] (the op checks).
pub fn plan_decode_fixed_chunk(
    kv_lens: &[usize],
    page_begin: &[i32],
    chunk: usize,
) -> DecodeSchedule {
    schedule_decode(kv_lens, page_begin, fixed_decode_chunk(kv_lens, chunk))
}

/// The chunk [`plan_decode_fixed_chunk`] splits requests into: `chunk`, unless no request is
/// longer.
pub fn fixed_decode_chunk(kv_lens: &[usize], chunk: usize) -> Option<usize> {
    let max_len = kv_lens.iter().copied().max().unwrap_or(0);
    (chunk < max_len).then_some(chunk)
}

/// [`schedule_decode_into`] into new buffers.
fn schedule_decode(kv_lens: &[usize], page_begin: &[i32], chunk: Option<usize>) -> DecodeSchedule {
    let mut s = DecodeSchedule::default();
    schedule_decode_into(
        kv_lens,
        page_begin,
        chunk,
        &mut DecodeScratch::default(),
        &mut s,
    );
    s
}

/// Buffers of [`schedule_decode_into`] besides the schedule, kept by the op across plans.
#[derive(Clone, Debug, Default)]
pub struct DecodeScratch {
    order: LongestFirst<DecodeWork>,
}

/// The work items for a chosen chunk size ([`decode_chunk`]'s or [`fixed_decode_chunk`]'s;
/// `None`: one item per request), longest first, into `s`. It reuses the buffers of `s` and
/// `scratch` (an op keeps both across plans), so a plan allocates nothing once they have grown:
/// fresh lists of thousands of items can cost more in page faults than filling them.
pub fn schedule_decode_into(
    kv_lens: &[usize],
    page_begin: &[i32],
    chunk: Option<usize>,
    scratch: &mut DecodeScratch,
    s: &mut DecodeSchedule,
) {
    s.work.clear();
    s.chunk_size = chunk;
    s.num_partial = 0;
    s.work.reserve(kv_lens.len());
    for (r, &len) in kv_lens.iter().enumerate() {
        let item = DecodeWork {
            request: r as i32,
            page_begin: page_begin[r],
            kv_start: 0,
            kv_len: len as i32,
            partial: -1,
            merge_begin: s.num_partial as i32,
            num_pieces: 1,
        };
        match chunk {
            Some(c) if len > c => {
                let pieces = len.div_ceil(c);
                for k in 0..pieces {
                    let start = k * c;
                    s.work.push(DecodeWork {
                        kv_start: start as i32,
                        kv_len: (len.min(start + c) - start) as i32,
                        partial: (s.num_partial + k) as i32,
                        num_pieces: pieces as i32,
                        ..item
                    });
                }
                s.num_partial += pieces;
            }
            // One item holds the whole request (no division: the unsplit plan is the common one).
            _ => s.work.push(item),
        }
    }
    // Longest first (the order of a stable sort: the schedule stays a pure function of the
    // lengths; plan/order.rs). The order does not change any result: every item writes its own
    // slot and merges go in slot order.
    scratch.order.sort(&mut s.work, |w| w.kv_len as u32);
}

#[cfg(test)]
mod tests;
