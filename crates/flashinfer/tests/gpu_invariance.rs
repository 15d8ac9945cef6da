//! Batch-invariant mode: with a fixed split size (and, for prefill, fixed tiles) a request's
//! output is the same, to the bit, whatever else is in the batch.

mod support;

use flashinfer::cuda::{DevSlice, DevSliceMut};
use flashinfer::decode::{BatchDecode, DecodeConfig};
use flashinfer::layout::{HeadConfig, KvLayout, PageTable, PagedKvDesc, Ragged};
use flashinfer::prefill::{BatchPrefill, PrefillConfig, PrefillKv, PrefillMask, PrefillTiles};
use flashinfer::{AttentionParams, DType};
use support::*;

/// Pages for `lens` from a shared pool so that request `r` of either batch reads the same pages.
fn table_for(lens: &[usize], pages_of: &[Vec<i32>], page: usize, num_pages: usize) -> PageTable {
    let mut indptr = vec![0i32];
    let mut ids = Vec::new();
    let mut last = Vec::new();
    for (l, p) in lens.iter().zip(pages_of) {
        ids.extend(p);
        indptr.push(ids.len() as i32);
        last.push(if *l == 0 {
            0
        } else {
            (l - (p.len() - 1) * page) as i32
        });
    }
    PageTable::new(&indptr, &ids, &last, page, num_pages).unwrap()
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_batch_invariant_decode_and_prefill() {
    let mut rng = Rng::fresh("invariance");
    let dev = device();
    let st = dev.stream();
    let heads = HeadConfig::new(32, 8, 128).unwrap();
    let page = 16;
    // Requests 0 and 1 are "ours"; the big batch surrounds them with others.
    let ours = [5000usize, 300];
    let others = [12000usize, 3, 777, 64, 2049];
    let all: Vec<usize> = ours.iter().chain(&others).copied().collect();
    let num_pages = PageTable::pages_needed(&all, page);
    let mut ids: Vec<i32> = (0..num_pages as i32).collect();
    rng.shuffle(&mut ids);
    let mut pages_of = Vec::new();
    let mut at = 0;
    for &l in &all {
        let n = l.div_ceil(page);
        pages_of.push(ids[at..at + n].to_vec());
        at += n;
    }
    let small = table_for(&ours, &pages_of[..2], page, num_pages);
    // The big batch puts ours in the middle.
    let order = [2usize, 0, 3, 4, 1, 5, 6];
    let big_lens: Vec<usize> = order.iter().map(|&i| all[i]).collect();
    let big_pages: Vec<Vec<i32>> = order.iter().map(|&i| pages_of[i].clone()).collect();
    let big = table_for(&big_lens, &big_pages, page, num_pages);
    let desc = PagedKvDesc::new(KvLayout::Nhd, num_pages, page, 8, 128).unwrap();
    let k: Vec<half::bf16> = rng.vec(desc.required_len(), 1.0);
    let v: Vec<half::bf16> = rng.vec(desc.required_len(), 1.0);
    let (dk, dv) = (upload(&dev, &k), upload(&dev, &v));
    let row = 32 * 128;

    // Decode: one query per request; ours get the same q rows in both batches.
    let q_all: Vec<half::bf16> = rng.vec(all.len() * row, 1.0);
    let q_small: Vec<half::bf16> = q_all[..2 * row].to_vec();
    let q_big: Vec<half::bf16> = order
        .iter()
        .flat_map(|&i| q_all[i * row..(i + 1) * row].to_vec())
        .collect();
    let cfg = DecodeConfig {
        heads,
        q_dtype: DType::BF16,
        kv_dtype: DType::BF16,
        params: AttentionParams::default(),
        allow_split: true,
    };
    let run_decode = |table: &PageTable, q: &[half::bf16]| -> Vec<half::bf16> {
        let mut op = BatchDecode::new(&dev, cfg).unwrap();
        op.set_batch_invariant(Some(1024)).unwrap();
        op.plan(table).unwrap();
        let (dq, di) = (
            upload(&dev, q),
            upload(&dev, &[table.kv_indices(), &[0]].concat()),
        );
        let mut out = poisoned::<half::bf16>(&dev, q.len());
        op.run(
            DevSlice::new(&dq, st),
            DevSlice::new(&dk, st),
            DevSlice::new(&dv, st),
            &desc,
            DevSlice::new(&di, st),
            DevSliceMut::new(&mut out, st),
            None,
        )
        .unwrap();
        download(&dev, &out)
    };
    let a = run_decode(&small, &q_small);
    let b = run_decode(&big, &q_big);
    for (mine, pos) in [(0usize, 1usize), (1, 4)] {
        let (x, y) = (
            &a[mine * row..(mine + 1) * row],
            &b[pos * row..(pos + 1) * row],
        );
        assert!(x.iter().all(|e| e.to_f32().is_finite()));
        assert!(
            x.iter().zip(y).all(|(p, q)| p.to_bits() == q.to_bits()),
            "decode request {mine}: the batch changed its bits"
        );
    }

    // Prefill (append of 40 tokens per request), fixed tiles and chunk.
    let qo_len = 40;
    let q_all: Vec<half::bf16> = rng.vec(all.len() * qo_len * row, 1.0);
    let q_small: Vec<half::bf16> = q_all[..2 * qo_len * row].to_vec();
    let q_big: Vec<half::bf16> = order
        .iter()
        .flat_map(|&i| q_all[i * qo_len * row..(i + 1) * qo_len * row].to_vec())
        .collect();
    let pcfg = PrefillConfig {
        heads,
        q_dtype: DType::BF16,
        kv_dtype: DType::BF16,
        params: AttentionParams::default(),
        mask: PrefillMask::Causal,
        allow_split: true,
    };
    let tiles = PrefillTiles::mma_sync(
        128,
        4,
        DType::BF16,
        DType::BF16,
        true,
        PrefillMask::Causal,
        1 << 20,
    );
    let run_prefill = |table: &PageTable, q: &[half::bf16], n: usize| -> Vec<half::bf16> {
        let mut op = BatchPrefill::new(&dev, pcfg).unwrap();
        op.set_batch_invariant(Some((tiles, 1024))).unwrap();
        let qo = Ragged::from_lens(&vec![qo_len; n]);
        op.plan(&qo, PrefillKv::Paged(table), None).unwrap();
        let (dq, di) = (
            upload(&dev, q),
            upload(&dev, &[table.kv_indices(), &[0]].concat()),
        );
        let mut out = poisoned::<half::bf16>(&dev, q.len());
        op.run_paged(
            DevSlice::new(&dq, st),
            DevSlice::new(&dk, st),
            DevSlice::new(&dv, st),
            &desc,
            DevSlice::new(&di, st),
            DevSliceMut::new(&mut out, st),
            None,
            None,
        )
        .unwrap();
        download(&dev, &out)
    };
    let a = run_prefill(&small, &q_small, 2);
    let b = run_prefill(&big, &q_big, order.len());
    let rows = qo_len * row;
    for (mine, pos) in [(0usize, 1usize), (1, 4)] {
        let (x, y) = (
            &a[mine * rows..(mine + 1) * rows],
            &b[pos * rows..(pos + 1) * rows],
        );
        assert!(x.iter().all(|e| e.to_f32().is_finite()));
        assert!(
            x.iter().zip(y).all(|(p, q)| p.to_bits() == q.to_bits()),
            "prefill request {mine}: the batch changed its bits"
        );
    }
}
