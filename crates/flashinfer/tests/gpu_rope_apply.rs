//! GPU RoPE over the keys of a paged KV cache (`rope::RopeApply`, the separate pass that fused
//! RoPE decode is benchmarked against) against the CPU's rotation (`variant::rope_rotate`): NHD
//! and HND, page sizes 1/16/100 (pages cut into several runs of slots), empty requests, large
//! offsets, f16 and bf16, into a copy and in place; and its typed errors.

mod support;

use flashinfer::cuda::{DevSlice, DevSliceMut, DeviceRepr};
use flashinfer::layout::{KvLayout, PageTable, PagedKvDesc};
use flashinfer::reference::rel_l2_error;
use flashinfer::rope::RopeApply;
use flashinfer::variant::{rope_rotate, Rope};
use flashinfer::{DType, Element, Error};
use support::*;

/// One pool and table, rotated on the GPU into a copy and in place, checked row by row.
#[allow(clippy::too_many_arguments)]
fn run_case<T: Element + DeviceRepr>(
    rng: &mut flashinfer::random::SplitMix64,
    lens: &[usize],
    page_size: usize,
    num_kv_heads: usize,
    head_dim: usize,
    layout: KvLayout,
    rope: Rope,
    offset: Option<i32>,
) {
    let dev = device();
    let st = dev.stream();
    let num_pages = PageTable::pages_needed(lens, page_size) + 3; // pages no request uses
    let mut ids: Vec<i32> = (0..num_pages as i32).collect();
    rng.shuffle(&mut ids);
    let table = PageTable::from_kv_lens(lens, page_size, &ids, num_pages).unwrap();
    let desc = PagedKvDesc::new(layout, num_pages, page_size, num_kv_heads, head_dim).unwrap();
    let k: Vec<T> = rng.vec(desc.required_len(), 1.0);
    let offsets: Option<Vec<i32>> =
        offset.map(|o| lens.iter().map(|_| o + rng.below(1000) as i32).collect());

    let mut op = RopeApply::new(&dev, T::DTYPE).unwrap();
    op.plan(&table, &desc, rope, offsets.as_deref()).unwrap();
    let dk = upload(&dev, &k);
    let mut dst = poisoned::<T>(&dev, desc.required_len());
    op.run(
        DevSlice::new(&dk, st),
        DevSliceMut::new(&mut dst, st),
        &desc,
    )
    .unwrap();
    let got: Vec<T> = download(&dev, &dst);
    let what = format!("{lens:?} page {page_size} {layout} d{head_dim} {rope:?} {offset:?}");

    let mut written = vec![false; desc.required_len()];
    for (r, &len) in lens.iter().enumerate() {
        let off = offsets.as_ref().map_or(0, |o| o[r] as usize);
        for h in 0..num_kv_heads {
            let (mut g, mut w) = (Vec::new(), Vec::new());
            for j in 0..len {
                let (page, slot) = table.locate(r, j);
                let at = desc.k_offset(page, slot, h);
                let mut x: Vec<f32> = k[at..at + head_dim].iter().map(|e| e.to_f32()).collect();
                rope_rotate(&mut x, (off + j) as f64, &rope);
                w.extend(x.iter().map(|&e| e as f64));
                g.extend(got[at..at + head_dim].iter().map(|e| e.to_f32()));
                written[at..at + head_dim].fill(true);
            }
            if len > 0 {
                let err = rel_l2_error(&g, &w);
                assert!(
                    err <= tolerance::<T>(),
                    "{what}: request {r} head {h} rel err {err}"
                );
            }
        }
    }
    // Nothing else of the pool is written.
    assert!(
        got.iter()
            .zip(&written)
            .all(|(x, &w)| w || x.to_f32().is_nan()),
        "{what}: an element outside the used slots was written"
    );

    // In place gives the same bits.
    let mut inplace = upload(&dev, &k);
    op.run_in_place(DevSliceMut::new(&mut inplace, st), &desc)
        .unwrap();
    let again: Vec<T> = download(&dev, &inplace);
    for (i, &w) in written.iter().enumerate() {
        if w {
            assert_eq!(
                again[i].to_f32().to_bits(),
                got[i].to_f32().to_bits(),
                "{what}: in place differs at {i}"
            );
        } else {
            assert_eq!(again[i].to_f32().to_bits(), k[i].to_f32().to_bits());
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_rope_apply_matches_rope_rotate() {
    let mut rng = Rng::fresh("rope_apply");
    let llama3 = Rope {
        theta: 5e5,
        scale: 8.0,
    };
    run_case::<half::bf16>(
        &mut rng,
        &[0, 1, 16, 17, 300],
        16,
        8,
        128,
        KvLayout::Nhd,
        Rope::default(),
        None,
    );
    run_case::<half::bf16>(
        &mut rng,
        &[5000, 3],
        16,
        2,
        128,
        KvLayout::Hnd,
        Rope::default(),
        Some(30_000),
    );
    run_case::<half::f16>(
        &mut rng,
        &[37, 0, 5],
        1,
        4,
        64,
        KvLayout::Nhd,
        llama3,
        Some(12_345),
    );
    // Pages larger than one run of slots.
    run_case::<half::f16>(
        &mut rng,
        &[250, 99, 100, 1],
        100,
        2,
        256,
        KvLayout::Hnd,
        llama3,
        Some(7),
    );
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_rope_apply_rejects_bad_input() {
    let dev = device();
    let st = dev.stream();
    assert!(matches!(
        RopeApply::new(&dev, DType::F32).err(),
        Some(Error::InvalidArgument { arg: "dtype", .. })
    ));
    let mut op = RopeApply::new(&dev, DType::F16).unwrap();
    let desc = PagedKvDesc::new(KvLayout::Nhd, 4, 16, 2, 64).unwrap();
    let table = PageTable::from_kv_lens(&[20, 3], 16, &[0, 1, 2], 4).unwrap();
    let rope = Rope::default();
    let arg = |e: Error| match e {
        Error::InvalidArgument { arg, .. } => arg,
        other => panic!("{other}"),
    };
    // Offsets: one per request, non-negative, positions inside i32.
    for offsets in [&[1][..], &[0, -1][..], &[0, i32::MAX - 1][..]] {
        let e = op.plan(&table, &desc, rope, Some(offsets)).unwrap_err();
        assert_eq!(arg(e), "rope_offsets", "{offsets:?}");
    }
    let e = op
        .plan(
            &table,
            &desc,
            Rope {
                theta: 0.5,
                scale: 1.0,
            },
            None,
        )
        .unwrap_err();
    assert_eq!(arg(e), "rope");
    // A page shared by two requests would need two positions per slot.
    let shared = PageTable::new(&[0, 1, 2], &[3, 3], &[16, 4], 16, 4).unwrap();
    assert_eq!(
        arg(op.plan(&shared, &desc, rope, None).unwrap_err()),
        "table"
    );
    // A table of another page size, or pages outside the pool.
    let other = PageTable::from_kv_lens(&[20], 8, &[0, 1, 2], 3).unwrap();
    assert_eq!(
        arg(op.plan(&other, &desc, rope, None).unwrap_err()),
        "table"
    );
    let outside = PageTable::from_kv_lens(&[20], 16, &[5, 6], 8).unwrap();
    assert_eq!(
        arg(op.plan(&outside, &desc, rope, None).unwrap_err()),
        "table"
    );
    // run() needs a plan, for this description, of this element type, with whole pools.
    let k = upload(&dev, &vec![half::f16::ONE; desc.required_len()]);
    let mut dst = poisoned::<half::f16>(&dev, desc.required_len());
    let e = op
        .run(DevSlice::new(&k, st), DevSliceMut::new(&mut dst, st), &desc)
        .unwrap_err();
    assert_eq!(arg(e), "self");
    op.plan(&table, &desc, rope, None).unwrap();
    let hnd = PagedKvDesc::new(KvLayout::Hnd, 4, 16, 2, 64).unwrap();
    let e = op
        .run(DevSlice::new(&k, st), DevSliceMut::new(&mut dst, st), &hnd)
        .unwrap_err();
    assert_eq!(arg(e), "desc");
    let kb = upload(&dev, &vec![half::bf16::ONE; desc.required_len()]);
    let mut db = poisoned::<half::bf16>(&dev, desc.required_len());
    let e = op
        .run(DevSlice::new(&kb, st), DevSliceMut::new(&mut db, st), &desc)
        .unwrap_err();
    assert_eq!(arg(e), "dst");
    let mut short = poisoned::<half::f16>(&dev, desc.required_len() - 1);
    let e = op
        .run(
            DevSlice::new(&k, st),
            DevSliceMut::new(&mut short, st),
            &desc,
        )
        .unwrap_err();
    assert_eq!(arg(e), "dst");
    let out = download(&dev, &dst);
    assert!(
        out.iter().all(|x| x.to_f32().is_nan()),
        "nothing may be written on a rejected call"
    );
}
