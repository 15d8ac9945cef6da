//! The decode planner: a pure function of request lengths and the GPU's size.
//!
//! Each work item is one (request, KV chunk); the kernel runs it for every KV head. When the batch
//! alone cannot fill the GPU, long requests are split into chunks (split-KV) whose partial states
//! are merged exactly afterwards. The chunk size is the smallest (so the most parallel) for which
//! the items still fit in one wave of resident blocks; splitting further would only add merge work.

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

/// The schedule of one decode step.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DecodeSchedule {
    pub work: Vec<DecodeWork>,
    /// Tokens per chunk (`None`: no request was split).
    pub chunk_size: Option<usize>,
    pub num_partial: usize,
}

/// Smallest chunk worth a block of its own: one 64-token tile of the tensor-core kernel. Small
/// batches are latency-bound, so even a 1024-token request spreads over 16 blocks per KV head.
/// Measured on the H200 at 1 x 1024: 10.5 us with 64-token chunks, 10.85 us with 128.
pub const MIN_CHUNK: usize = 64;
/// Chunks are whole multiples of this many tokens (so that they are whole kernel tiles for the
/// common tile of 32, and whole pages for power-of-two page sizes up to 64).
pub const CHUNK_ALIGN: usize = 64;

/// Plans a decode step. `kv_lens[i]` tokens of request `i`, its pages starting at
/// `page_begin[i]`; `num_kv_heads` blocks per work item; `wave` = blocks resident at once;
/// at most `max_pieces` chunks per request (the in-kernel merge keeps their LSEs in shared memory).
pub fn plan_decode(
    kv_lens: &[usize],
    page_begin: &[i32],
    num_kv_heads: usize,
    wave: usize,
    max_pieces: usize,
    allow_split: bool,
) -> DecodeSchedule {
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
        // A batch that fills the GPU by itself: split only requests longer than a fair share of
        // the work per resident block (total / blocks), so that a long request does not run alone
        // after the others finished. With the items ordered longest first, the GPU's block
        // scheduler then assigns each to the least-loaded slot (greedy longest-processing-time).
        // Items: sum of ceil(len / chunk) <= total / chunk + batch <= items_wanted + batch.
        let total: usize = kv_lens.iter().sum();
        let c = round(
            MIN_CHUNK
                .max(total.div_ceil(items_wanted))
                .max(max_len.div_ceil(max_pieces.max(1))),
        );
        if c < max_len {
            chunk = Some(c);
        }
    }
    schedule_with_chunk(kv_lens, page_begin, chunk)
}

/// Batch-invariant planning: every request longer than `chunk` tokens is split into chunks of
/// `chunk`, whatever else is in the batch, so a request's items (and so its result, to the bit)
/// do not depend on the batch. `chunk` is a multiple of [`CHUNK_ALIGN`] (the op checks).
pub fn plan_decode_fixed_chunk(
    kv_lens: &[usize],
    page_begin: &[i32],
    chunk: usize,
) -> DecodeSchedule {
    let max_len = kv_lens.iter().copied().max().unwrap_or(0);
    schedule_with_chunk(kv_lens, page_begin, (chunk < max_len).then_some(chunk))
}

/// The work items for a chosen chunk size (`None`: one item per request), longest first.
fn schedule_with_chunk(
    kv_lens: &[usize],
    page_begin: &[i32],
    chunk: Option<usize>,
) -> DecodeSchedule {
    let mut s = DecodeSchedule {
        chunk_size: chunk,
        ..Default::default()
    };
    for (r, &len) in kv_lens.iter().enumerate() {
        let c = chunk.unwrap_or(len.max(1));
        let pieces = len.div_ceil(c).max(1);
        for k in 0..pieces {
            let start = k * c;
            let partial = if pieces > 1 {
                (s.num_partial + k) as i32
            } else {
                -1
            };
            s.work.push(DecodeWork {
                request: r as i32,
                page_begin: page_begin[r],
                kv_start: start as i32,
                kv_len: (len.min(start + c) - start.min(len)) as i32,
                partial,
                merge_begin: s.num_partial as i32,
                num_pieces: pieces as i32,
            });
        }
        if pieces > 1 {
            s.num_partial += pieces;
        }
    }
    // Longest first (stable: the schedule stays a pure function of the lengths). The order does
    // not change any result: every item writes its own slot and merges go in slot order.
    s.work.sort_by_key(|w| std::cmp::Reverse(w.kv_len));
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Every token of every request is covered by exactly one item, chunks respect pages, and
        /// the merge lists name exactly the split requests' slots.
        #[test]
        fn covers_every_token_once(
            lens in proptest::collection::vec(0usize..20_000, 0..40),
            page_size in 1usize..=64,
            heads in 1usize..=8,
            wave in 1usize..=2000,
            max_pieces in 1usize..=300,
        ) {
            let begin: Vec<i32> = lens.iter().scan(0i32, |acc, &l| {
                let b = *acc; *acc += l.div_ceil(page_size) as i32; Some(b)
            }).collect();
            let s = plan_decode(&lens, &begin, heads, wave, max_pieces, true);
            // (start, len) of every item per request, checked for exact contiguous coverage
            // below (items come longest first, not in token order).
            let mut pieces: Vec<Vec<(usize, usize)>> = vec![Vec::new(); lens.len()];
            let mut slots = vec![false; s.num_partial];
            for w in &s.work {
                let r = w.request as usize;
                prop_assert_eq!(w.page_begin, begin[r]);
                pieces[r].push((w.kv_start as usize, w.kv_len as usize));
                if let Some(c) = s.chunk_size { prop_assert_eq!(c % CHUNK_ALIGN, 0); }
                if w.partial >= 0 {
                    prop_assert!(w.partial >= w.merge_begin && w.partial < w.merge_begin + w.num_pieces);
                    prop_assert!(!slots[w.partial as usize]);
                    slots[w.partial as usize] = true;
                }
            }
            for (r, p) in pieces.iter_mut().enumerate() {
                p.sort_unstable();
                let mut at = 0;
                for &(start, len) in p.iter() {
                    prop_assert_eq!(start, at);
                    at += len;
                }
                prop_assert_eq!(at, lens[r]);
            }
            prop_assert!(slots.iter().all(|&x| x));
            prop_assert!(s.work.iter().all(|w| (w.num_pieces as usize) <= max_pieces || w.partial < 0));
            // A split request's items agree on its slot range, which holds exactly its pieces.
            for w in s.work.iter().filter(|w| w.partial >= 0) {
                let same: Vec<_> = s.work.iter().filter(|x| x.request == w.request).collect();
                prop_assert_eq!(same.len(), w.num_pieces as usize);
                prop_assert!(same.iter().all(|x| x.merge_begin == w.merge_begin && x.num_pieces == w.num_pieces));
            }
            if s.chunk_size.is_some() {
                prop_assert!(s.work.len() <= (wave / heads).max(1) + lens.len());
            }
            prop_assert!(s.work.windows(2).all(|p| p[0].kv_len >= p[1].kv_len));
        }
    }

    proptest! {
        /// Batch-invariant mode: a request's items are the same whatever else is in the batch.
        #[test]
        fn fixed_chunk_items_do_not_depend_on_the_batch(
            lens in proptest::collection::vec(0usize..5000, 1..20),
            chunk_tiles in 1usize..20,
            pick in 0usize..20,
        ) {
            let chunk = chunk_tiles * CHUNK_ALIGN;
            let r = pick % lens.len();
            let begin = vec![0i32; lens.len()];
            let of = |s: &DecodeSchedule, req: i32| {
                let mut v: Vec<(i32, i32, i32)> = s
                    .work
                    .iter()
                    .filter(|w| w.request == req)
                    .map(|w| (w.kv_start, w.kv_len, w.num_pieces))
                    .collect();
                v.sort_unstable();
                v
            };
            let in_batch = plan_decode_fixed_chunk(&lens, &begin, chunk);
            let alone = plan_decode_fixed_chunk(&lens[r..=r], &[0], chunk);
            prop_assert_eq!(of(&in_batch, r as i32), of(&alone, 0));
        }
    }

    #[test]
    fn small_batch_of_long_requests_is_split() {
        let s = plan_decode(&[32768], &[0], 8, 132 * 3, 4096, true);
        assert!(s.chunk_size.is_some());
        assert!(s.work.len() > 1 && s.work.len() <= 132 * 3 / 8);
        let s = plan_decode(&[4096; 64], &vec![0; 64], 8, 132 * 3, 4096, true);
        assert_eq!(s.chunk_size, None, "a full uniform batch is not split");
        // A full but skewed batch: the long request is cut into chunks of about a fair share
        // (total / blocks), the short ones stay whole, and the longest items come first.
        let lens: Vec<usize> = [32768].into_iter().chain([256; 63]).collect();
        let s = plan_decode(&lens, &vec![0; 64], 8, 264, 4096, true);
        let c = s.chunk_size.expect("the long request is split");
        assert!(
            (48896 / 33..=48896 / 33 + CHUNK_ALIGN).contains(&c),
            "chunk {c}"
        );
        assert_eq!(
            s.work.iter().filter(|w| w.request == 0).count(),
            32768usize.div_ceil(c)
        );
        assert_eq!(s.work[0].request, 0);
        assert!(s.work.len() <= 33 + 64);
        assert_eq!(
            plan_decode(&[0, 5], &[0, 0], 8, 400, 4096, true).work.len(),
            2
        );
    }
}
