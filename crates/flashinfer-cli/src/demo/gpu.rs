//! The demo on the GPU: `BatchDecode` plan/run over the whole batch and over its two halves, the
//! halves merged with the GPU `merge_state`, everything checked against the CPU backend.

use std::sync::Arc;

use flashinfer::cuda::{CudaSlice, DevSlice, DevSliceMut, Device};
use flashinfer::decode::{BatchDecode, DecodeConfig};
use flashinfer::layout::{PageTable, PagedKv};
use flashinfer::reference::{self, rel_l2_error};
use flashinfer::{AttentionParams, DType, LseBase};
use half::bf16;

use super::{err, lse_error, Batch, RowCheck};

/// Device copies of the batch's inputs.
struct Inputs {
    q: CudaSlice<bf16>,
    k: CudaSlice<bf16>,
    v: CudaSlice<bf16>,
}

/// A decode's device outputs, poisoned with NaN before the run so that a row the kernel does not
/// write cannot pass.
struct Outputs {
    o: CudaSlice<bf16>,
    lse: CudaSlice<f32>,
}

fn poisoned(dev: &Device, b: &Batch) -> Result<Outputs, String> {
    let s = dev.stream();
    Ok(Outputs {
        o: s.clone_htod(&vec![bf16::NAN; b.q.len()]).map_err(err)?,
        lse: s
            .clone_htod(&vec![f32::NAN; b.batch_size() * b.heads.num_qo_heads])
            .map_err(err)?,
    })
}

/// Plans `op` for `table` and runs it into fresh poisoned outputs.
fn decode(
    dev: &Device,
    op: &mut BatchDecode,
    b: &Batch,
    x: &Inputs,
    table: &PageTable,
) -> Result<Outputs, String> {
    let s = dev.stream();
    op.plan(table).map_err(err)?;
    // One entry at least: a batch of empty requests has no page ids, and a zero-length
    // allocation is not worth special-casing.
    let mut ids = table.kv_indices().to_vec();
    ids.push(0);
    let kv_indices: CudaSlice<i32> = s.clone_htod(&ids).map_err(err)?;
    let mut out = poisoned(dev, b)?;
    op.run(
        DevSlice::new(&x.q, s),
        DevSlice::new(&x.k, s),
        DevSlice::new(&x.v, s),
        &b.desc,
        DevSlice::new(&kv_indices, s),
        DevSliceMut::new(&mut out.o, s),
        Some(DevSliceMut::new(&mut out.lse, s)),
    )
    .map_err(err)?;
    // kv_indices is freed at the end of this function; finish the work that reads it first.
    s.synchronize().map_err(err)?;
    Ok(out)
}

pub fn run(dev: &Arc<Device>, b: &Batch) -> Result<Vec<RowCheck>, String> {
    let info = dev.info();
    say!(
        "  running on GPU {}: {} ({}, {} SMs), checking against the CPU backend",
        info.ordinal,
        info.name,
        info.arch,
        info.sm_count
    );
    let cfg = DecodeConfig {
        heads: b.heads,
        q_dtype: DType::BF16,
        kv_dtype: DType::BF16,
        params: AttentionParams::default(),
        allow_split: true,
    };
    let mut op = BatchDecode::new(dev, cfg).map_err(err)?;
    say!("  kernel: {}", op.tiles().name());
    let s = dev.stream();
    let x = Inputs {
        q: s.clone_htod(&b.q).map_err(err)?,
        k: s.clone_htod(&b.k).map_err(err)?,
        v: s.clone_htod(&b.v).map_err(err)?,
    };

    let whole = decode(dev, &mut op, b, &x, &b.table)?;
    let sched = op.schedule();
    say!(
        "  plan: {} work items over {} KV heads, {}",
        sched.work.len(),
        b.heads.num_kv_heads,
        match sched.chunk_size {
            Some(c) => format!(
                "long requests split into chunks of {c} tokens ({} partial states)",
                sched.num_partial
            ),
            None => "no split".into(),
        }
    );
    let prefix = decode(dev, &mut op, b, &x, &b.prefix)?;
    let suffix = decode(dev, &mut op, b, &x, &b.suffix)?;
    let mut merged = poisoned(dev, b)?;
    let (hq, d) = (b.heads.num_qo_heads, b.heads.head_dim);
    flashinfer::merge::merge_state(
        dev,
        DevSlice::new(&prefix.o, s),
        DevSlice::new(&prefix.lse, s),
        DevSlice::new(&suffix.o, s),
        DevSlice::new(&suffix.lse, s),
        hq,
        d,
        LseBase::Natural,
        DevSliceMut::new(&mut merged.o, s),
        Some(DevSliceMut::new(&mut merged.lse, s)),
    )
    .map_err(err)?;
    s.synchronize().map_err(err)?;

    let f32s = |x: Vec<bf16>| x.into_iter().map(|v| v.to_f32()).collect::<Vec<f32>>();
    let out = f32s(s.clone_dtoh(&whole.o).map_err(err)?);
    let lse = s.clone_dtoh(&whole.lse).map_err(err)?;
    let merged_out = f32s(s.clone_dtoh(&merged.o).map_err(err)?);
    let merged_lse = s.clone_dtoh(&merged.lse).map_err(err)?;

    // The oracle: the CPU backend with f32 queries and outputs, so that it adds no bf16 rounding
    // of its own (bf16 -> f32 is exact).
    let kv = PagedKv::new(b.desc, &b.k, &b.v).map_err(err)?;
    let q32: Vec<f32> = b.q.iter().map(|x| x.to_f32()).collect();
    let mut ref_out = vec![f32::NAN; q32.len()];
    let mut ref_lse = vec![f32::NAN; lse.len()];
    reference::batch_decode(
        &q32,
        &kv,
        &b.table,
        b.heads,
        &AttentionParams::default(),
        &mut ref_out,
        Some(&mut ref_lse),
    )
    .map_err(err)?;

    let (row, heads) = (b.row_elems(), hq);
    let f64s = |x: &[f32]| x.iter().map(|&v| v as f64).collect::<Vec<f64>>();
    Ok((0..b.batch_size())
        .map(|i| {
            let (r, l) = (i * row..(i + 1) * row, i * heads..(i + 1) * heads);
            let (want, want_lse) = (f64s(&ref_out[r.clone()]), f64s(&ref_lse[l.clone()]));
            RowCheck {
                out_err: rel_l2_error(&out[r.clone()], &want),
                lse_err: lse_error(&lse[l.clone()], &want_lse),
                merge_out_err: rel_l2_error(&merged_out[r], &want),
                merge_lse_err: lse_error(&merged_lse[l], &want_lse),
            }
        })
        .collect())
}
