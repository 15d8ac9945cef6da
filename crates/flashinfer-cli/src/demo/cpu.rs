//! The demo on the CPU backend (`flashinfer::reference`), checked against the naive f64 decode.

use flashinfer::layout::{PageTable, PagedKv};
use flashinfer::reference::{self, rel_l2_error};
use flashinfer::{AttentionParams, LseBase};
use half::bf16;

use super::{err, lse_error, naive, Batch, RowCheck};

/// bf16 output and natural-log LSE of a CPU batch decode over `table`.
fn decode(
    b: &Batch,
    kv: &PagedKv<'_, bf16>,
    table: &PageTable,
) -> Result<(Vec<bf16>, Vec<f32>), String> {
    let mut out = vec![bf16::NAN; b.q.len()];
    let mut lse = vec![f32::NAN; b.batch_size() * b.heads.num_qo_heads];
    let params = AttentionParams::default(); // scale 1/sqrt(head_dim), natural-log LSE
    reference::batch_decode(&b.q, kv, table, b.heads, &params, &mut out, Some(&mut lse))
        .map_err(err)?;
    Ok((out, lse))
}

pub fn run(b: &Batch) -> Result<Vec<RowCheck>, String> {
    say!("  running on the CPU backend, checking against a naive f64 decode");
    let kv = PagedKv::new(b.desc, &b.k, &b.v).map_err(err)?;
    let (out, lse) = decode(b, &kv, &b.table)?;

    let (out_a, lse_a) = decode(b, &kv, &b.prefix)?;
    let (out_b, lse_b) = decode(b, &kv, &b.suffix)?;
    let mut merged = vec![bf16::NAN; out.len()];
    let mut merged_lse = vec![f32::NAN; lse.len()];
    let (hq, d) = (b.heads.num_qo_heads, b.heads.head_dim);
    reference::merge_state(
        &out_a,
        &lse_a,
        &out_b,
        &lse_b,
        hq,
        d,
        LseBase::Natural,
        &mut merged,
        &mut merged_lse,
    )
    .map_err(err)?;

    let oracle = naive::batch_decode(b);
    let (row, heads) = (b.row_elems(), hq);
    let f32s = |x: &[bf16]| x.iter().map(|v| v.to_f32()).collect::<Vec<f32>>();
    Ok(oracle
        .iter()
        .enumerate()
        .map(|(i, (ref_out, ref_lse))| RowCheck {
            out_err: rel_l2_error(&f32s(&out[i * row..(i + 1) * row]), ref_out),
            lse_err: lse_error(&lse[i * heads..(i + 1) * heads], ref_lse),
            merge_out_err: rel_l2_error(&f32s(&merged[i * row..(i + 1) * row]), ref_out),
            merge_lse_err: lse_error(&merged_lse[i * heads..(i + 1) * heads], ref_lse),
        })
        .collect())
}
