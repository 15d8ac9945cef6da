//! Which keys a query row sees: the visibility rules of DESIGN.md in one place.
//!
//! - `None`: every key of the request.
//! - `Causal`, aligned bottom-right: query `i` of `qo_len` sees key `j` of `kv_len` iff
//!   `j <= kv_len - qo_len + i`. When `qo_len > kv_len` the first `qo_len - kv_len` rows see nothing.
//! - `Custom`: the request's bit-packed row-major `[qo_len, kv_len]` mask.

use crate::layout::CustomMask;
use crate::params::MaskMode;

/// The keys one query row may see: `0..key_end`, further filtered by a custom mask if any.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RowMask<'a> {
    /// Keys at or past this index are never visible (the causal limit, else `kv_len`).
    pub key_end: usize,
    /// (mask, request, query row within the request).
    custom: Option<(&'a CustomMask, usize, usize)>,
}

impl<'a> RowMask<'a> {
    /// The visibility of query row `i` of request `request` (`qo_len` queries, `kv_len` keys).
    /// The caller has validated a custom mask against these lengths.
    pub fn new(mode: MaskMode<'a>, request: usize, qo_len: usize, kv_len: usize, i: usize) -> Self {
        match mode {
            MaskMode::None => Self {
                key_end: kv_len,
                custom: None,
            },
            MaskMode::Causal => Self {
                key_end: causal_key_end(qo_len, kv_len, i),
                custom: None,
            },
            MaskMode::Custom(m) => Self {
                key_end: kv_len,
                custom: Some((m, request, i)),
            },
        }
    }

    /// Whether key `j < key_end` is visible.
    #[inline]
    pub fn visible(&self, j: usize) -> bool {
        match self.custom {
            None => true,
            Some((m, request, i)) => m.visible(request, i, j),
        }
    }
}

/// One past the last key query `i` sees under the bottom-right causal mask:
/// `j <= kv_len - qo_len + i`, i.e. `j < kv_len + i + 1 - qo_len`, clamped to `0..=kv_len`
/// (computed without signed arithmetic, so `qo_len > kv_len` gives 0 for the leading rows).
pub(crate) fn causal_key_end(qo_len: usize, kv_len: usize, i: usize) -> usize {
    (kv_len + i + 1).saturating_sub(qo_len).min(kv_len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn causal_is_bottom_right() {
        // qo_len == kv_len: the usual lower triangle.
        assert_eq!(
            (0..3).map(|i| causal_key_end(3, 3, i)).collect::<Vec<_>>(),
            [1, 2, 3]
        );
        // Append: 2 new queries after 3 cached keys see 4 and 5 keys.
        assert_eq!(
            (0..2).map(|i| causal_key_end(2, 5, i)).collect::<Vec<_>>(),
            [4, 5]
        );
        // More queries than keys: the first qo_len - kv_len rows see nothing.
        assert_eq!(
            (0..4).map(|i| causal_key_end(4, 2, i)).collect::<Vec<_>>(),
            [0, 0, 1, 2]
        );
        // Decode (one query) sees everything; an empty request nothing.
        assert_eq!(causal_key_end(1, 7, 0), 7);
        assert_eq!(causal_key_end(1, 0, 0), 0);
    }

    #[test]
    fn custom_row_mask_reads_its_row() {
        // Request 1 is 2x3 with only (1, 2) visible.
        let m = CustomMask::pack(
            &[vec![true], vec![false, false, false, false, false, true]],
            &[1, 2],
            &[1, 3],
        )
        .unwrap();
        let r = RowMask::new(MaskMode::Custom(&m), 1, 2, 3, 1);
        assert_eq!(r.key_end, 3);
        assert_eq!(
            (0..3).map(|j| r.visible(j)).collect::<Vec<_>>(),
            [false, false, true]
        );
    }
}
