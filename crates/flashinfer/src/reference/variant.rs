//! Attention with variants ([`crate::variant`]) on the CPU backend: the definition every variant
//! kernel is checked against. One routine serves decode, prefill and append over a paged KV cache
//! (decode is one query per request under the causal mask; ragged KV is a paged cache of one page
//! per request).

use super::attend::{dot_f32, par_rows};
use super::mask::RowMask;
use super::prefill::{check_batch_paged, request_of_token};
use crate::dtype::Element;
use crate::error::Result;
use crate::layout::{HeadConfig, PageTable, PagedKv, Ragged};
use crate::params::{AttentionParams, MaskMode};
use crate::variant::{rope_rotate, Variant};

/// Batch attention with `variant` over a paged KV cache: arguments as
/// [`super::batch_prefill_paged`]. A row that sees no key outputs zeros, and its LSE is `-inf`
/// (or the sink logit when the variant has sinks: the sink is part of the softmax).
#[allow(clippy::too_many_arguments)]
pub fn batch_attention_paged<Q: Element, KV: Element>(
    q: &[Q],
    qo_indptr: &Ragged,
    kv: &PagedKv<'_, KV>,
    table: &PageTable,
    heads: HeadConfig,
    mask: MaskMode<'_>,
    params: &AttentionParams,
    variant: &Variant<'_>,
    out: &mut [Q],
    lse: Option<&mut [f32]>,
) -> Result<()> {
    check_batch_paged(q, qo_indptr, kv, table, &heads, mask, params, out, &lse)?;
    variant.validate(&heads, Some(qo_indptr.batch_size()))?;
    let sm_scale = params.scale(heads.head_dim);
    let (hq, d) = (heads.num_qo_heads, heads.head_dim);
    let request_of_token = request_of_token(qo_indptr);
    let group = heads.group_size();
    let log2e = std::f32::consts::LOG2_E;
    par_rows(out, lse, d, |row, _scratch, o| {
        let (token, h) = (row / hq, row % hq);
        let r = request_of_token[token];
        let (qo_len, kv_len) = (qo_indptr.len(r), table.kv_len(r));
        let i = token - qo_indptr.start(r);
        let q_pos = kv_len as i64 - qo_len as i64 + i as i64;
        let offset = variant.rope_offsets.map_or(0, |o| o[r] as i64);
        let mut qf: Vec<f32> = q[row * d..(row + 1) * d]
            .iter()
            .map(|x| x.to_f32())
            .collect();
        if let Some(rope) = &variant.rope {
            rope_rotate(&mut qf, (offset + q_pos) as f64, rope);
        }
        let row_mask = RowMask::new(mask, r, qo_len, kv_len, i);
        let first = variant
            .window_left
            .map_or(0, |w| (q_pos - w as i64).max(0) as usize);
        let kv_head = h / group;
        let mut kf = vec![0f32; d];
        let mut scores: Vec<(usize, f32)> = Vec::new();
        for j in first..row_mask.key_end {
            if !row_mask.visible(j) {
                continue;
            }
            let (page, slot) = table.locate(r, j);
            for (a, b) in kf.iter_mut().zip(kv.key(page, slot, kv_head)) {
                *a = b.to_f32();
            }
            if let Some(rope) = &variant.rope {
                rope_rotate(&mut kf, (offset + j as i64) as f64, rope);
            }
            let mut x = dot_f32(&qf, &kf) * sm_scale;
            if let Some(c) = variant.logits_soft_cap {
                x = c * (x / c).tanh();
            }
            if let Some(s) = variant.alibi_slopes {
                x += s[h] * (j as i64 - q_pos) as f32;
            }
            scores.push((j, x * log2e));
        }
        let sink = variant.sinks.map(|s| s[h] * log2e);
        let max = scores
            .iter()
            .map(|s| s.1)
            .chain(sink)
            .fold(f32::NEG_INFINITY, f32::max);
        if max == f32::NEG_INFINITY {
            o.fill(Q::from_f32(0.0));
            return f32::NEG_INFINITY;
        }
        let mut acc = vec![0f32; d];
        let mut sum = sink.map_or(0.0, |s| (s - max).exp2());
        for &(j, s) in &scores {
            let p = (s - max).exp2();
            sum += p;
            let (page, slot) = table.locate(r, j);
            for (a, v) in acc.iter_mut().zip(kv.value(page, slot, kv_head)) {
                *a += p * v.to_f32();
            }
        }
        for (out, a) in o.iter_mut().zip(&acc) {
            *out = Q::from_f32(a / sum);
        }
        params.lse_base.from_log2(max + sum.log2())
    });
    Ok(())
}
