//! Longest first: the order in which every scheduler hands out its work items, so that the last
//! blocks to start are the shortest and the grid's tail is short. Items of equal length keep the
//! order they were made in, so that a schedule stays a pure function of the lengths.
//!
//! Ordering is on the critical path of every `plan()`. The items (28 or 60 bytes) are not sorted
//! themselves: 8-byte (length, index) keys are, and the items are then gathered once. A list
//! already in order is only scanned; a short one is sorted by comparisons; a longer one by a
//! stable LSD radix sort of the length's bytes (two linear passes for lengths below 65536, none
//! for bytes every length shares): for 256 keys 0.74 us against 1.18 us for `sort_unstable` on
//! a 2-core EPYC VM, and further apart the more keys.

/// Up to this many items a comparison sort is faster than the radix passes, whose fixed cost is
/// a few passes over 256 counts (measured: equal at about 100 keys of two bytes).
const COMPARISON_SORT_MAX: usize = 96;

/// Scratch buffers of [`LongestFirst::sort`], kept across plans so that ordering allocates
/// nothing once they have grown.
#[derive(Clone, Debug)]
pub(crate) struct LongestFirst<T> {
    keys: Vec<u64>,
    spare: Vec<u64>,
    items: Vec<T>,
}

// (Derived, it would ask for `T: Default`.)
impl<T> Default for LongestFirst<T> {
    fn default() -> Self {
        Self {
            keys: Vec::new(),
            spare: Vec::new(),
            items: Vec::new(),
        }
    }
}

impl<T: Copy> LongestFirst<T> {
    /// Reorders `items` by decreasing `len`, items of equal length in their current order (the
    /// order of a stable sort by `Reverse(len)`).
    pub(crate) fn sort(&mut self, items: &mut Vec<T>, len: impl Fn(&T) -> u32) {
        assert!(items.len() <= u32::MAX as usize, "too many items to order");
        if items.windows(2).all(|p| len(&p[0]) >= len(&p[1])) {
            return;
        }
        // Key: the complemented length above the index, so that ascending keys are longest
        // first and equal lengths in index order. Bytes above the longest length's are the same
        // in every key.
        let mut longest = 0;
        self.keys.clear();
        self.keys.extend(items.iter().enumerate().map(|(i, w)| {
            let len = len(w);
            longest = longest.max(len);
            (u64::from(!len) << 32) | i as u64
        }));
        if self.keys.len() <= COMPARISON_SORT_MAX {
            // (The keys are distinct: an unstable sort gives the same order.)
            self.keys.sort_unstable();
        } else {
            let bytes = (u32::BITS - longest.leading_zeros()).div_ceil(8) as usize;
            radix_sort_high_half(&mut self.keys, bytes, &mut self.spare);
        }
        self.items.clear();
        self.items
            .extend(self.keys.iter().map(|&k| items[k as u32 as usize]));
        std::mem::swap(items, &mut self.items);
    }
}

/// Sorts `keys` stably by their upper 32 bits, of which only the lowest `bytes` bytes differ
/// (an LSD radix sort, a byte per pass); `spare` is scratch.
fn radix_sort_high_half(keys: &mut Vec<u64>, bytes: usize, spare: &mut Vec<u64>) {
    let n = keys.len();
    spare.clear();
    spare.resize(n, 0);
    for shift in (32..32 + 8 * bytes).step_by(8) {
        let digit = |k: u64| (k >> shift) as u8 as usize;
        let mut at = [0u32; 256];
        for &k in keys.iter() {
            at[digit(k)] += 1;
        }
        // A byte every key shares moves nothing.
        if keys.first().is_some_and(|&k| at[digit(k)] as usize == n) {
            continue;
        }
        // Where each byte value's keys start, then a stable scatter there.
        let mut sum = 0;
        for a in at.iter_mut() {
            (*a, sum) = (sum, sum + *a);
        }
        for &k in keys.iter() {
            let d = digit(k);
            spare[at[d] as usize] = k;
            at[d] += 1;
        }
        std::mem::swap(keys, spare);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// The order of a stable sort by decreasing length, whatever the lengths' range.
        #[test]
        fn matches_a_stable_sort_by_decreasing_length(
            lens in proptest::collection::vec(
                prop_oneof![0u32..4, 0u32..300, 0u32..70_000, any::<u32>()],
                0..600,
            ),
        ) {
            let mut items: Vec<(u32, usize)> = lens.iter().copied().zip(0..).collect();
            let mut want = items.clone();
            want.sort_by_key(|x| std::cmp::Reverse(x.0));
            let mut order = LongestFirst::default();
            order.sort(&mut items, |x| x.0);
            prop_assert_eq!(&items, &want);
            // Again with the buffers grown (and already in order).
            order.sort(&mut items, |x| x.0);
            prop_assert_eq!(&items, &want);
        }
    }

    #[test]
    fn equal_lengths_keep_their_order() {
        let mut items = vec![(5, 0), (7, 1), (5, 2), (300, 3), (7, 4), (0, 5), (300, 6)];
        LongestFirst::default().sort(&mut items, |x| x.0);
        let order: Vec<_> = items.iter().map(|x| x.1).collect();
        assert_eq!(order, [3, 6, 1, 4, 0, 2, 5]);
    }
}
