//! Decode: one query row per request, over contiguous or paged KV.
//!
//! A decode row sees every key of its request (causal with qo_len = 1 is the same), so decode is
//! prefill with one row per request and no mask; it shares [`attend_batch`] with prefill.

use super::check::{check_buf, check_heads, check_i32, check_lse, check_paged, scale_log2};
use super::gather::{ContiguousKv, PagedSource, Starts};
use super::prefill::attend_batch;
use crate::dtype::Element;
use crate::error::Result;
use crate::layout::{HeadConfig, PageTable, PagedKv, Ragged};
use crate::params::{AttentionParams, MaskMode};

/// Decode of one request over contiguous K/V.
///
/// - `q`: `[num_qo_heads, head_dim]`
/// - `k`, `v`: `[kv_len, num_kv_heads, head_dim]` (`kv_len` may be 0: zeros and LSE -inf)
/// - `out`: `[num_qo_heads, head_dim]`; `lse`: `[num_qo_heads]`, in `params.lse_base`.
#[allow(clippy::too_many_arguments)]
pub fn single_decode<Q: Element, KV: Element>(
    q: &[Q],
    k: &[KV],
    v: &[KV],
    kv_len: usize,
    heads: HeadConfig,
    params: &AttentionParams,
    out: &mut [Q],
    lse: Option<&mut [f32]>,
) -> Result<()> {
    check_heads(&heads)?;
    let scale = scale_log2(params, heads.head_dim)?;
    let (hq, hkv, d) = (heads.num_qo_heads, heads.num_kv_heads, heads.head_dim);
    check_i32("kv_len", kv_len)?;
    check_buf("q", q.len(), &[hq, d], "[num_qo_heads, head_dim]")?;
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
    check_buf("out", out.len(), &[hq, d], "[num_qo_heads, head_dim]")?;
    check_lse(&lse, &[hq], "[num_qo_heads]")?;

    let source = ContiguousKv {
        k,
        v,
        starts: Starts::Single(kv_len),
        num_kv_heads: hkv,
        head_dim: d,
    };
    let qo = Ragged::from_lens(&[1]);
    attend_batch(
        q,
        &qo,
        &source,
        &heads,
        MaskMode::None,
        scale,
        params.lse_base,
        out,
        lse,
    );
    Ok(())
}

/// Batch decode over a paged KV cache: request i's query row attends the `table.kv_len(i)` keys
/// of its pages.
///
/// - `q`: `[batch, num_qo_heads, head_dim]`, `batch = table.batch_size()`
/// - `kv`, `table`: the page pool and its page table
/// - `out`: `[batch, num_qo_heads, head_dim]`; `lse`: `[batch, num_qo_heads]`, in
///   `params.lse_base`.
#[allow(clippy::too_many_arguments)]
pub fn batch_decode<Q: Element, KV: Element>(
    q: &[Q],
    kv: &PagedKv<'_, KV>,
    table: &PageTable,
    heads: HeadConfig,
    params: &AttentionParams,
    out: &mut [Q],
    lse: Option<&mut [f32]>,
) -> Result<()> {
    check_heads(&heads)?;
    let scale = scale_log2(params, heads.head_dim)?;
    let (hq, d) = (heads.num_qo_heads, heads.head_dim);
    let batch = table.batch_size();
    check_paged(kv, table, &heads)?;
    check_buf(
        "q",
        q.len(),
        &[batch, hq, d],
        "[batch, num_qo_heads, head_dim]",
    )?;
    check_buf(
        "out",
        out.len(),
        &[batch, hq, d],
        "[batch, num_qo_heads, head_dim]",
    )?;
    check_lse(&lse, &[batch, hq], "[batch, num_qo_heads]")?;

    let source = PagedSource { kv, table };
    let qo = Ragged::from_lens(&vec![1; batch]);
    attend_batch(
        q,
        &qo,
        &source,
        &heads,
        MaskMode::None,
        scale,
        params.lse_base,
        out,
        lse,
    );
    Ok(())
}
