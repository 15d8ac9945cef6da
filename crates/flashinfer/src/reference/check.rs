//! Argument validation shared by the CPU backend's ops. Everything is checked before any output
//! is touched, so a rejected call leaves `out` and `lse` as they were.
//!
//! The layout types validate themselves on construction, but `HeadConfig`, `PagedKvDesc` and
//! `PagedKv` have public fields and a page table is validated against *a* pool size, not
//! necessarily this pool's: what the gather will index is re-checked here, so that a bad
//! combination is an error rather than an out-of-bounds panic.

use crate::error::{ensure, invalid, Result};
use crate::layout::{check_len, HeadConfig, PageTable, PagedKv};
use crate::params::{AttentionParams, MaskMode};

/// The product of `dims`, or an error naming `arg` if it overflows `usize`.
pub(crate) fn numel(arg: &'static str, dims: &[usize]) -> Result<usize> {
    dims.iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| invalid(arg, format!("shape {dims:?} overflows usize")))
}

/// Checks that buffer `arg` has exactly the elements of `dims` (named `shape` in the message).
pub(crate) fn check_buf(arg: &'static str, len: usize, dims: &[usize], shape: &str) -> Result<()> {
    check_len(arg, len, numel(arg, dims)?, &format!("{shape} = {dims:?}"))
}

/// Checks an optional LSE buffer against `[rows, num_qo_heads]`.
pub(crate) fn check_lse(lse: &Option<&mut [f32]>, dims: &[usize], shape: &str) -> Result<()> {
    match lse {
        Some(l) => check_buf("lse", l.len(), dims, shape),
        None => Ok(()),
    }
}

/// Re-validates a `HeadConfig` (its fields are public, so it may not come from `HeadConfig::new`).
pub(crate) fn check_heads(heads: &HeadConfig) -> Result<()> {
    HeadConfig::new(heads.num_qo_heads, heads.num_kv_heads, heads.head_dim).map(|_| ())
}

/// The softmax scale times log2(e) (scores are computed in base 2), checked to be finite.
pub(crate) fn scale_log2(params: &AttentionParams, head_dim: usize) -> Result<f32> {
    let scale = params.scale(head_dim);
    let scale_log2 = scale * std::f32::consts::LOG2_E;
    ensure(
        scale.is_finite() && scale_log2.is_finite(),
        "sm_scale",
        || format!("{scale} is not a finite softmax scale"),
    )?;
    Ok(scale_log2)
}

/// Checks that a length fits the `i32` index arrays of the conventions.
pub(crate) fn check_i32(arg: &'static str, n: usize) -> Result<()> {
    ensure(i32::try_from(n).is_ok(), arg, || {
        format!("{n} does not fit the i32 index arrays")
    })
}

/// Checks a page pool and a page table against each other and against `heads`: everything the
/// paged gather will index lies inside the K and V buffers.
pub(crate) fn check_paged<KV>(
    kv: &PagedKv<'_, KV>,
    table: &PageTable,
    heads: &HeadConfig,
) -> Result<()> {
    let d = &kv.desc;
    ensure(d.page_size >= 1, "page_size", || {
        "must be at least 1".into()
    })?;
    ensure(d.num_kv_heads == heads.num_kv_heads, "num_kv_heads", || {
        format!(
            "the page pool has {} KV heads, the head config {}",
            d.num_kv_heads, heads.num_kv_heads
        )
    })?;
    ensure(d.head_dim == heads.head_dim, "head_dim", || {
        format!(
            "the page pool has head_dim {}, the head config {}",
            d.head_dim, heads.head_dim
        )
    })?;
    ensure(table.page_size() == d.page_size, "page_size", || {
        format!(
            "the page table has page_size {}, the page pool {}",
            table.page_size(),
            d.page_size
        )
    })?;

    let page_elems = numel("desc", &[d.page_size, d.num_kv_heads, d.head_dim])?;
    if let Some(off) = d.v_offset {
        // V starting inside K's part of the page would make K and V overlap.
        ensure(off >= page_elems, "v_offset", || {
            format!("{off} is smaller than one page's K part of {page_elems} elements")
        })?;
    }
    let footprint = d
        .v_offset
        .unwrap_or(0)
        .checked_add(page_elems)
        .ok_or_else(|| invalid("v_offset", "page footprint overflows usize"))?;
    ensure(d.page_stride >= footprint, "page_stride", || {
        format!(
            "{} is smaller than one page's footprint of {footprint} elements",
            d.page_stride
        )
    })?;
    let required = match d.num_pages {
        0 => 0,
        n => (n - 1)
            .checked_mul(d.page_stride)
            .and_then(|x| x.checked_add(footprint))
            .ok_or_else(|| invalid("page_stride", "the pool's extent overflows usize"))?,
    };
    ensure(kv.k.len() >= required, "k_cache", || {
        format!(
            "has {} elements; the pool of {} pages needs {required}",
            kv.k.len(),
            d.num_pages
        )
    })?;
    ensure(kv.v.len() >= required, "v_cache", || {
        format!(
            "has {} elements; the pool of {} pages needs {required}",
            kv.v.len(),
            d.num_pages
        )
    })?;

    for (i, &p) in table.kv_indices().iter().enumerate() {
        ensure(p >= 0 && (p as usize) < d.num_pages, "kv_indices", || {
            format!(
                "kv_indices[{i}] = {p} is outside the pool of {} pages",
                d.num_pages
            )
        })?;
    }
    Ok(())
}

/// Checks a mask against a batch: a custom mask must cover exactly (`exact_batch`) or at least
/// `batch` requests, each with the request's `qo_len` and `kv_len`.
pub(crate) fn check_mask(
    mask: MaskMode<'_>,
    batch: usize,
    exact_batch: bool,
    qo_len: impl Fn(usize) -> usize,
    kv_len: impl Fn(usize) -> usize,
) -> Result<()> {
    let MaskMode::Custom(m) = mask else {
        return Ok(());
    };
    let have = m.batch_size();
    ensure(
        have == batch || (!exact_batch && have >= batch),
        "custom_mask",
        || format!("covers {have} requests, the batch has {batch}"),
    )?;
    for i in 0..batch {
        let (q, k) = (qo_len(i), kv_len(i));
        let (mq, mk) = (m.qo_lens()[i], m.kv_lens()[i]);
        ensure(mq == q && mk == k, "custom_mask", || {
            format!("request {i} is {mq} x {mk}, but has qo_len {q} and kv_len {k}")
        })?;
    }
    Ok(())
}
