//! Schedulers: pure functions of request lengths and the GPU's size (no CUDA, no unsafe), so the
//! CPU tests cover them with property tests. Each op's `plan()` calls its scheduler here and lays
//! the result out in the workspace.

pub mod decode;
mod order;
pub mod prefill;

/// The smallest chunk, a multiple of `align` no smaller than `min` (rounded up), for which
/// `count(chunk)` (the work items it makes; never growing as the chunk grows) fits in
/// `items_wanted`: a binary search over the aligned sizes up to `max_len` (rounded up), which it
/// returns when nothing smaller fits. Both split-KV planners pick their chunk with it.
pub(crate) fn smallest_chunk(
    min: usize,
    max_len: usize,
    align: usize,
    items_wanted: usize,
    count: impl Fn(usize) -> usize,
) -> usize {
    let round = |c: usize| c.div_ceil(align) * align;
    let mut hi = round(max_len);
    let mut lo = round(min).min(hi);
    while lo < hi {
        let mid = round((lo + hi) / 2);
        let mid = if mid >= hi { lo } else { mid };
        if count(mid) <= items_wanted {
            hi = mid;
        } else {
            lo = mid + align;
        }
    }
    hi
}
