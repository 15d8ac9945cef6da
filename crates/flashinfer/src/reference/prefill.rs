//! Prefill and append: many query rows per request, over contiguous, ragged or paged KV.
//!
//! All three public ops validate, then hand a [`KvSource`] to [`attend_batch`], which decode uses
//! too. Masks follow DESIGN.md: causal is aligned bottom-right, so "append" (qo_len < kv_len, the
//! new tokens at the end of the cache) is `batch_prefill_paged` with `MaskMode::Causal`.

use super::attend::{attend_row, par_rows};
use super::check::{
    check_buf, check_heads, check_i32, check_lse, check_mask, check_paged, scale_log2,
};
use super::gather::{ContiguousKv, KvSource, PagedSource, Starts};
use super::mask::RowMask;
use crate::dtype::Element;
use crate::error::{ensure, Result};
use crate::layout::{HeadConfig, PageTable, PagedKv, Ragged};
use crate::params::{AttentionParams, LseBase, MaskMode};

/// Attention of `q` (`[qo.total(), num_qo_heads, head_dim]`, request i owning rows
/// `qo.start(i)..qo.start(i) + qo.len(i)`) over `kv`, into `out` (same shape) and `lse`
/// (`[qo.total(), num_qo_heads]`, in `lse_base`). Rows run in parallel over (token, head).
/// Every argument has been validated by the caller.
#[allow(clippy::too_many_arguments)]
pub(crate) fn attend_batch<Q: Element, KV: Element, S: KvSource<KV>>(
    q: &[Q],
    qo: &Ragged,
    kv: &S,
    heads: &HeadConfig,
    mask: MaskMode<'_>,
    scale_log2: f32,
    lse_base: LseBase,
    out: &mut [Q],
    lse: Option<&mut [f32]>,
) {
    let (num_qo_heads, dim, group) = (heads.num_qo_heads, heads.head_dim, heads.group_size());
    let request_of_token = request_of_token(qo);
    par_rows(out, lse, dim, |row, scratch, o| {
        let (token, h) = (row / num_qo_heads, row % num_qo_heads);
        let request = request_of_token[token];
        let i = token - qo.start(request);
        let row_mask = RowMask::new(mask, request, qo.len(request), kv.kv_len(request), i);
        let kv_head = h / group;
        let lse2 = attend_row(
            &q[row * dim..(row + 1) * dim],
            row_mask,
            |j| kv.row(request, j, kv_head),
            scale_log2,
            scratch,
            o,
        );
        lse_base.from_log2(lse2)
    });
}

/// The request each query row of `qo` belongs to.
pub(crate) fn request_of_token(qo: &Ragged) -> Vec<usize> {
    let mut v = Vec::with_capacity(qo.total());
    for r in 0..qo.batch_size() {
        v.extend(std::iter::repeat_n(r, qo.len(r)));
    }
    v
}

/// Validates the arguments of a batch attention over a paged KV cache (shapes as
/// [`batch_prefill_paged`]) and returns the base-2 scale.
#[allow(clippy::too_many_arguments)]
pub(crate) fn check_batch_paged<Q: Element, KV: Element>(
    q: &[Q],
    qo_indptr: &Ragged,
    kv: &PagedKv<'_, KV>,
    table: &PageTable,
    heads: &HeadConfig,
    mask: MaskMode<'_>,
    params: &AttentionParams,
    out: &[Q],
    lse: &Option<&mut [f32]>,
) -> Result<f32> {
    check_heads(heads)?;
    let scale = scale_log2(params, heads.head_dim)?;
    let (hq, d) = (heads.num_qo_heads, heads.head_dim);
    let batch = qo_indptr.batch_size();
    ensure(table.batch_size() == batch, "kv_indptr", || {
        format!(
            "the page table has {} requests, qo_indptr has {batch}",
            table.batch_size()
        )
    })?;
    check_paged(kv, table, heads)?;
    let nnz = qo_indptr.total();
    check_buf(
        "q",
        q.len(),
        &[nnz, hq, d],
        "[nnz_qo, num_qo_heads, head_dim]",
    )?;
    check_buf(
        "out",
        out.len(),
        &[nnz, hq, d],
        "[nnz_qo, num_qo_heads, head_dim]",
    )?;
    check_lse(lse, &[nnz, hq], "[nnz_qo, num_qo_heads]")?;
    check_mask(mask, batch, true, |i| qo_indptr.len(i), |i| table.kv_len(i))?;
    Ok(scale)
}

/// Prefill of one request over contiguous K/V.
///
/// - `q`: `[qo_len, num_qo_heads, head_dim]`
/// - `k`, `v`: `[kv_len, num_kv_heads, head_dim]`
/// - `mask`: `Custom` uses request 0 of the `CustomMask`, which must be `qo_len x kv_len`.
/// - `out`: `[qo_len, num_qo_heads, head_dim]`; `lse`: `[qo_len, num_qo_heads]`, in
///   `params.lse_base`.
#[allow(clippy::too_many_arguments)]
pub fn single_prefill<Q: Element, KV: Element>(
    q: &[Q],
    k: &[KV],
    v: &[KV],
    qo_len: usize,
    kv_len: usize,
    heads: HeadConfig,
    mask: MaskMode<'_>,
    params: &AttentionParams,
    out: &mut [Q],
    lse: Option<&mut [f32]>,
) -> Result<()> {
    check_heads(&heads)?;
    let scale = scale_log2(params, heads.head_dim)?;
    let (hq, hkv, d) = (heads.num_qo_heads, heads.num_kv_heads, heads.head_dim);
    check_i32("qo_len", qo_len)?;
    check_i32("kv_len", kv_len)?;
    check_buf(
        "q",
        q.len(),
        &[qo_len, hq, d],
        "[qo_len, num_qo_heads, head_dim]",
    )?;
    check_buf(
        "k",
        k.len(),
        &[kv_len, hkv, d],
        "[kv_len, num_kv_heads, head_dim]",
    )?;
    check_buf(
        "v",
        v.len(),
        &[kv_len, hkv, d],
        "[kv_len, num_kv_heads, head_dim]",
    )?;
    check_buf(
        "out",
        out.len(),
        &[qo_len, hq, d],
        "[qo_len, num_qo_heads, head_dim]",
    )?;
    check_lse(&lse, &[qo_len, hq], "[qo_len, num_qo_heads]")?;
    check_mask(mask, 1, false, |_| qo_len, |_| kv_len)?;

    let source = ContiguousKv {
        k,
        v,
        starts: Starts::Single(kv_len),
        num_kv_heads: hkv,
        head_dim: d,
    };
    let qo = Ragged::from_lens(&[qo_len]);
    attend_batch(
        q,
        &qo,
        &source,
        &heads,
        mask,
        scale,
        params.lse_base,
        out,
        lse,
    );
    Ok(())
}

/// Batch prefill (and append) over a paged KV cache.
///
/// - `q`: `[nnz_qo, num_qo_heads, head_dim]`, request i owning rows `qo_indptr[i]..qo_indptr[i+1]`
/// - `kv`, `table`: the page pool and one page table entry per request (`kv_len` from the table)
/// - `mask`: `Causal` is aligned bottom-right (query i sees keys `j <= kv_len - qo_len + i`);
///   `Custom` must cover exactly this batch.
/// - `out`: `[nnz_qo, num_qo_heads, head_dim]`; `lse`: `[nnz_qo, num_qo_heads]`, in
///   `params.lse_base`.
#[allow(clippy::too_many_arguments)]
pub fn batch_prefill_paged<Q: Element, KV: Element>(
    q: &[Q],
    qo_indptr: &Ragged,
    kv: &PagedKv<'_, KV>,
    table: &PageTable,
    heads: HeadConfig,
    mask: MaskMode<'_>,
    params: &AttentionParams,
    out: &mut [Q],
    lse: Option<&mut [f32]>,
) -> Result<()> {
    let scale = check_batch_paged(q, qo_indptr, kv, table, &heads, mask, params, out, &lse)?;

    let source = PagedSource { kv, table };
    attend_batch(
        q,
        qo_indptr,
        &source,
        &heads,
        mask,
        scale,
        params.lse_base,
        out,
        lse,
    );
    Ok(())
}

/// Batch prefill over ragged (contiguous, variable-length) K/V.
///
/// - `q`: `[nnz_qo, num_qo_heads, head_dim]`, request i owning rows `qo_indptr[i]..qo_indptr[i+1]`
/// - `k`, `v`: `[nnz_kv, num_kv_heads, head_dim]`, request i owning rows
///   `kv_indptr[i]..kv_indptr[i+1]`
/// - `mask`: as for [`batch_prefill_paged`].
/// - `out`: `[nnz_qo, num_qo_heads, head_dim]`; `lse`: `[nnz_qo, num_qo_heads]`, in
///   `params.lse_base`.
#[allow(clippy::too_many_arguments)]
pub fn batch_prefill_ragged<Q: Element, KV: Element>(
    q: &[Q],
    qo_indptr: &Ragged,
    k: &[KV],
    v: &[KV],
    kv_indptr: &Ragged,
    heads: HeadConfig,
    mask: MaskMode<'_>,
    params: &AttentionParams,
    out: &mut [Q],
    lse: Option<&mut [f32]>,
) -> Result<()> {
    check_heads(&heads)?;
    let scale = scale_log2(params, heads.head_dim)?;
    let (hq, hkv, d) = (heads.num_qo_heads, heads.num_kv_heads, heads.head_dim);
    let batch = qo_indptr.batch_size();
    ensure(kv_indptr.batch_size() == batch, "kv_indptr", || {
        format!(
            "has {} requests, qo_indptr has {batch}",
            kv_indptr.batch_size()
        )
    })?;
    let (nnz_qo, nnz_kv) = (qo_indptr.total(), kv_indptr.total());
    check_buf(
        "q",
        q.len(),
        &[nnz_qo, hq, d],
        "[nnz_qo, num_qo_heads, head_dim]",
    )?;
    check_buf(
        "k",
        k.len(),
        &[nnz_kv, hkv, d],
        "[nnz_kv, num_kv_heads, head_dim]",
    )?;
    check_buf(
        "v",
        v.len(),
        &[nnz_kv, hkv, d],
        "[nnz_kv, num_kv_heads, head_dim]",
    )?;
    check_buf(
        "out",
        out.len(),
        &[nnz_qo, hq, d],
        "[nnz_qo, num_qo_heads, head_dim]",
    )?;
    check_lse(&lse, &[nnz_qo, hq], "[nnz_qo, num_qo_heads]")?;
    check_mask(
        mask,
        batch,
        true,
        |i| qo_indptr.len(i),
        |i| kv_indptr.len(i),
    )?;

    let source = ContiguousKv {
        k,
        v,
        starts: Starts::Ragged(kv_indptr),
        num_kv_heads: hkv,
        head_dim: d,
    };
    attend_batch(
        q,
        qo_indptr,
        &source,
        &heads,
        mask,
        scale,
        params.lse_base,
        out,
        lse,
    );
    Ok(())
}
