//! Cascade and block-sparse attention on the CPU backend, composed exactly as on the GPU: each
//! cascade level is a batch prefill over its groups (no mask for shared levels, causal for the
//! last), merged in level order; block-sparse attention is the paged prefill of the pattern's
//! page-table view. The definitions they must equal (one level; dense attention with the
//! pattern's mask) are what the tests compare them with.

use super::merge::merge_state_in_place;
use super::prefill::{batch_prefill_paged, single_prefill};
use crate::dtype::Element;
use crate::error::{ensure, Result};
use crate::layout::{Bsr, CustomMask, HeadConfig, PageTable, PagedKv, Ragged};
use crate::params::{AttentionParams, MaskMode};

/// Multi-level cascade attention: `levels[l] = (qo_indptr, table)` groups the rows of `q` and
/// gives each group its pages of `kv`; shared levels first, each request's own keys last.
/// `out`: `[rows, num_qo_heads, head_dim]`, `lse`: `[rows, num_qo_heads]`.
#[allow(clippy::too_many_arguments)]
pub fn cascade<Q: Element, KV: Element>(
    q: &[Q],
    kv: &PagedKv<'_, KV>,
    levels: &[(&Ragged, &PageTable)],
    heads: HeadConfig,
    params: &AttentionParams,
    out: &mut [Q],
    lse: &mut [f32],
) -> Result<()> {
    ensure(!levels.is_empty(), "levels", || {
        "a cascade has at least one level".into()
    })?;
    let mut level_out = vec![Q::default(); out.len()];
    let mut level_lse = vec![0f32; lse.len()];
    for (l, &(qo, table)) in levels.iter().enumerate() {
        let mask = if l + 1 == levels.len() {
            MaskMode::Causal
        } else {
            MaskMode::None
        };
        if l == 0 {
            batch_prefill_paged(q, qo, kv, table, heads, mask, params, out, Some(&mut *lse))?;
        } else {
            batch_prefill_paged(
                q,
                qo,
                kv,
                table,
                heads,
                mask,
                params,
                &mut level_out,
                Some(&mut level_lse),
            )?;
            merge_state_in_place(
                out,
                lse,
                &level_out,
                &level_lse,
                None,
                heads.num_qo_heads,
                heads.head_dim,
                params.lse_base,
            )?;
        }
    }
    Ok(())
}

/// Block-sparse attention of `q` (`[num_rows, num_qo_heads, head_dim]`) over `k`, `v`
/// (`[num_cols, num_kv_heads, head_dim]`) through the pattern `bsr` with optional per-block masks
/// (`[nnz, R, C]`, `bsr`'s order), computed as the GPU computes it: the paged prefill of
/// [`Bsr::as_paged`].
#[allow(clippy::too_many_arguments)]
pub fn block_sparse<Q: Element, KV: Element>(
    q: &[Q],
    k: &[KV],
    v: &[KV],
    bsr: &Bsr,
    block_mask: Option<&[bool]>,
    heads: HeadConfig,
    params: &AttentionParams,
    out: &mut [Q],
    lse: Option<&mut [f32]>,
) -> Result<()> {
    let paged = bsr.as_paged()?;
    let desc = bsr.key_pool(heads.num_kv_heads, heads.head_dim)?;
    let pool = PagedKv::new(desc, k, v)?;
    let mask = block_mask
        .map(|m| bsr.block_mask_as_custom(&paged, m))
        .transpose()?;
    let mode = mask.as_ref().map_or(MaskMode::None, MaskMode::Custom);
    batch_prefill_paged(
        q,
        &paged.qo_indptr,
        &pool,
        &paged.table,
        heads,
        mode,
        params,
        out,
        lse,
    )
}

/// The definition block-sparse attention must equal: dense attention of every query over every
/// key, masked by the pattern (and block masks) expanded to `[num_rows, num_cols]`.
#[allow(clippy::too_many_arguments)]
pub fn block_sparse_dense<Q: Element, KV: Element>(
    q: &[Q],
    k: &[KV],
    v: &[KV],
    bsr: &Bsr,
    block_mask: Option<&[bool]>,
    heads: HeadConfig,
    params: &AttentionParams,
    out: &mut [Q],
    lse: Option<&mut [f32]>,
) -> Result<()> {
    let dense = bsr.dense_mask(block_mask)?;
    let mask = CustomMask::pack(&[dense], &[bsr.num_rows], &[bsr.num_cols])?;
    single_prefill(
        q,
        k,
        v,
        bsr.num_rows,
        bsr.num_cols,
        heads,
        MaskMode::Custom(&mask),
        params,
        out,
        lse,
    )
}
