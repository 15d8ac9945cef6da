//! Every typed error of the layout constructors, and the CPU backend's own argument checks: each
//! bad input is rejected with `Error::InvalidArgument` naming the argument the caller got wrong.

use flashinfer::layout::{
    Bsr, CustomMask, HeadConfig, KvLayout, PageTable, PagedKv, PagedKvDesc, Ragged,
};
use flashinfer::reference;
use flashinfer::{AttentionParams, Error, LseBase, MaskMode};

/// The `arg` of an `InvalidArgument` error; panics (failing the test) on anything else.
fn arg_of<T: std::fmt::Debug>(r: flashinfer::Result<T>) -> &'static str {
    match r {
        Err(Error::InvalidArgument { arg, .. }) => arg,
        other => panic!("expected Error::InvalidArgument, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Ragged indptr
// ---------------------------------------------------------------------------------------------

#[test]
fn ragged_accepts_a_valid_indptr() {
    let r = Ragged::new("qo_indptr", &[0, 2, 2, 5]).unwrap();
    assert_eq!((r.batch_size(), r.total(), r.lens()), (3, 5, vec![2, 0, 3]));
}

#[test]
fn ragged_rejects_non_monotonic_indptr() {
    assert_eq!(arg_of(Ragged::new("qo_indptr", &[0, 3, 2])), "qo_indptr");
}

#[test]
fn ragged_rejects_indptr_not_starting_at_zero() {
    assert_eq!(arg_of(Ragged::new("kv_indptr", &[1, 3])), "kv_indptr");
}

#[test]
fn ragged_rejects_empty_indptr() {
    assert_eq!(arg_of(Ragged::new("qo_indptr", &[])), "qo_indptr");
}

// ---------------------------------------------------------------------------------------------
// Page table
// ---------------------------------------------------------------------------------------------

#[test]
fn page_table_accepts_a_valid_table() {
    // Request 0: pages 3, 1 (5 tokens at page size 4); request 1 empty; request 2: page 0, full.
    let t = PageTable::new(&[0, 2, 2, 3], &[3, 1, 0], &[1, 0, 4], 4, 4).unwrap();
    assert_eq!(t.kv_lens(), vec![5, 0, 4]);
    assert_eq!(t.locate(0, 4), (1, 0));
}

#[test]
fn page_table_rejects_non_monotonic_kv_indptr() {
    assert_eq!(
        arg_of(PageTable::new(&[0, 2, 1], &[0], &[1, 1], 4, 4)),
        "kv_indptr"
    );
}

#[test]
fn page_table_rejects_wrongly_sized_kv_indptr() {
    // Two requests (two last_page_len entries) but indptr for three.
    assert_eq!(
        arg_of(PageTable::new(&[0, 1, 2, 3], &[0, 1, 2], &[1, 1], 4, 4)),
        "kv_indptr"
    );
}

#[test]
fn page_table_rejects_kv_indptr_not_starting_at_zero() {
    assert_eq!(
        arg_of(PageTable::new(&[1, 2], &[0], &[1], 4, 4)),
        "kv_indptr"
    );
}

#[test]
fn page_table_rejects_kv_indices_length_mismatch() {
    assert_eq!(
        arg_of(PageTable::new(&[0, 2], &[0, 1, 2], &[1], 4, 4)),
        "kv_indices"
    );
    assert_eq!(
        arg_of(PageTable::new(&[0, 2], &[0], &[1], 4, 4)),
        "kv_indices"
    );
}

#[test]
fn page_table_rejects_page_ids_outside_the_pool() {
    assert_eq!(
        arg_of(PageTable::new(&[0, 2], &[0, 4], &[1], 4, 4)),
        "kv_indices"
    );
    assert_eq!(
        arg_of(PageTable::new(&[0, 1], &[-1], &[1], 4, 4)),
        "kv_indices"
    );
}

#[test]
fn page_table_rejects_zero_last_page_len_for_a_non_empty_request() {
    assert_eq!(
        arg_of(PageTable::new(&[0, 1], &[0], &[0], 4, 4)),
        "kv_last_page_len"
    );
}

#[test]
fn page_table_rejects_last_page_len_above_page_size() {
    assert_eq!(
        arg_of(PageTable::new(&[0, 1], &[0], &[5], 4, 4)),
        "kv_last_page_len"
    );
    assert_eq!(
        arg_of(PageTable::new(&[0, 1], &[0], &[-2], 4, 4)),
        "kv_last_page_len"
    );
}

#[test]
fn page_table_rejects_nonzero_last_page_len_for_an_empty_request() {
    assert_eq!(
        arg_of(PageTable::new(&[0, 0, 1], &[0], &[2, 1], 4, 4)),
        "kv_last_page_len"
    );
}

#[test]
fn page_table_rejects_zero_page_size() {
    assert_eq!(
        arg_of(PageTable::new(&[0, 0], &[], &[0], 0, 4)),
        "page_size"
    );
    assert_eq!(
        arg_of(PageTable::from_kv_lens(&[3], 0, &[0], 1)),
        "page_size"
    );
}

#[test]
fn page_table_from_kv_lens_rejects_too_few_page_ids() {
    assert_eq!(
        arg_of(PageTable::from_kv_lens(&[5, 3], 4, &[0, 1], 4)),
        "page_ids"
    );
}

// ---------------------------------------------------------------------------------------------
// Heads
// ---------------------------------------------------------------------------------------------

#[test]
fn heads_reject_kv_heads_that_do_not_divide_qo_heads() {
    assert_eq!(arg_of(HeadConfig::new(6, 4, 64)), "num_kv_heads");
}

#[test]
fn heads_reject_zero_counts() {
    assert_eq!(arg_of(HeadConfig::new(0, 1, 64)), "num_qo_heads");
    assert_eq!(arg_of(HeadConfig::new(4, 0, 64)), "num_kv_heads");
    assert_eq!(arg_of(HeadConfig::new(4, 2, 0)), "head_dim");
}

// ---------------------------------------------------------------------------------------------
// Page pool description and buffers
// ---------------------------------------------------------------------------------------------

#[test]
fn desc_rejects_zero_sizes() {
    assert_eq!(
        arg_of(PagedKvDesc::new(KvLayout::Nhd, 4, 0, 2, 8)),
        "page_size"
    );
    assert_eq!(
        arg_of(PagedKvDesc::new(KvLayout::Nhd, 4, 2, 0, 8)),
        "num_kv_heads"
    );
    assert_eq!(
        arg_of(PagedKvDesc::combined(KvLayout::Hnd, 4, 2, 2, 0)),
        "head_dim"
    );
}

#[test]
fn desc_rejects_page_stride_smaller_than_the_footprint() {
    let d = PagedKvDesc::new(KvLayout::Nhd, 4, 2, 2, 8).unwrap();
    assert_eq!(arg_of(d.with_page_stride(31)), "page_stride");
    assert!(d.with_page_stride(32).is_ok());
    // Combined: the footprint is K and V, twice the page.
    let c = PagedKvDesc::combined(KvLayout::Hnd, 4, 2, 2, 8).unwrap();
    assert_eq!(arg_of(c.with_page_stride(63)), "page_stride");
    assert!(c.with_page_stride(100).is_ok());
}

#[test]
fn paged_kv_rejects_short_k_buffer() {
    let d = PagedKvDesc::new(KvLayout::Nhd, 4, 2, 2, 8).unwrap();
    let (k, v) = (vec![0.0f32; 127], vec![0.0f32; 128]);
    assert_eq!(arg_of(PagedKv::new(d, &k, &v)), "k_cache");
}

#[test]
fn paged_kv_rejects_short_v_buffer() {
    let d = PagedKvDesc::new(KvLayout::Hnd, 4, 2, 2, 8).unwrap();
    let (k, v) = (vec![0.0f32; 128], vec![0.0f32; 127]);
    assert_eq!(arg_of(PagedKv::new(d, &k, &v)), "v_cache");
}

#[test]
fn paged_kv_rejects_short_combined_buffer_with_padded_stride() {
    // 3 pages, stride 70 > footprint 64: needs 2 * 70 + 64 = 204 elements.
    let d = PagedKvDesc::combined(KvLayout::Nhd, 3, 2, 2, 8)
        .unwrap()
        .with_page_stride(70)
        .unwrap();
    assert_eq!(arg_of(PagedKv::combined(d, &vec![0.0f32; 203])), "k_cache");
    assert!(PagedKv::combined(d, &vec![0.0f32; 204]).is_ok());
}

#[test]
fn paged_kv_rejects_combined_desc_with_separate_buffers() {
    let d = PagedKvDesc::combined(KvLayout::Nhd, 2, 2, 2, 8).unwrap();
    let (k, v) = (vec![0.0f32; 128], vec![0.0f32; 128]);
    assert_eq!(arg_of(PagedKv::new(d, &k, &v)), "desc");
}

#[test]
fn paged_kv_rejects_separate_desc_with_one_buffer() {
    let d = PagedKvDesc::new(KvLayout::Nhd, 2, 2, 2, 8).unwrap();
    assert_eq!(arg_of(PagedKv::combined(d, &vec![0.0f32; 128])), "desc");
}

// ---------------------------------------------------------------------------------------------
// Custom masks
// ---------------------------------------------------------------------------------------------

#[test]
fn custom_mask_accepts_matching_sizes_and_reads_little_endian_bits() {
    // Request 0: 1 x 3 (1 byte), request 1: 3 x 3 = 9 bits (2 bytes).
    let bits = [0b0000_0101u8, 0b1000_0000, 0b0000_0001];
    let m = CustomMask::from_packed(&bits, &[0, 1, 3], &[1, 3], &[3, 3]).unwrap();
    assert!(m.visible(0, 0, 0) && !m.visible(0, 0, 1) && m.visible(0, 0, 2));
    // Element 7 of request 1 is (2, 1); element 8 is (2, 2).
    assert!(m.visible(1, 2, 1) && m.visible(1, 2, 2) && !m.visible(1, 0, 0));
}

#[test]
fn custom_mask_rejects_bytes_not_matching_lengths() {
    // Request 1 is 3 x 3 = 9 bits = 2 bytes, but mask_indptr gives it 1.
    assert_eq!(
        arg_of(CustomMask::from_packed(
            &[0u8; 2],
            &[0, 1, 2],
            &[1, 3],
            &[3, 3]
        )),
        "mask_indptr"
    );
}

#[test]
fn custom_mask_rejects_bits_buffer_of_the_wrong_size() {
    // Offsets agree with the lengths (1 + 2 bytes); the buffer has 2 or 4 bytes.
    assert_eq!(
        arg_of(CustomMask::from_packed(
            &[0u8; 2],
            &[0, 1, 3],
            &[1, 3],
            &[3, 3]
        )),
        "custom_mask"
    );
    assert_eq!(
        arg_of(CustomMask::from_packed(
            &[0u8; 4],
            &[0, 1, 3],
            &[1, 3],
            &[3, 3]
        )),
        "custom_mask"
    );
}

#[test]
fn custom_mask_rejects_bad_mask_indptr() {
    assert_eq!(
        arg_of(CustomMask::from_packed(
            &[0u8; 3],
            &[0, 3],
            &[1, 3],
            &[3, 3]
        )),
        "mask_indptr"
    );
    assert_eq!(
        arg_of(CustomMask::from_packed(
            &[0u8; 3],
            &[1, 1, 3],
            &[1, 3],
            &[3, 3]
        )),
        "mask_indptr"
    );
}

#[test]
fn custom_mask_rejects_length_lists_that_disagree() {
    assert_eq!(
        arg_of(CustomMask::from_packed(&[0u8; 1], &[0, 1], &[1], &[3, 3])),
        "kv_lens"
    );
}

#[test]
fn custom_mask_pack_rejects_wrong_mask_sizes() {
    assert_eq!(
        arg_of(CustomMask::pack(&[vec![true; 5]], &[2], &[3])),
        "masks"
    );
    assert_eq!(
        arg_of(CustomMask::pack(&[vec![true; 6]], &[2, 1], &[3, 1])),
        "masks"
    );
}

// ---------------------------------------------------------------------------------------------
// Block-sparse rows
// ---------------------------------------------------------------------------------------------

#[test]
fn bsr_accepts_a_valid_matrix() {
    // 5 x 7 of 2 x 3 blocks: 3 row blocks, 3 column blocks.
    let b = Bsr::new(2, 3, 5, 7, &[0, 2, 2, 3], &[2, 0, 1]).unwrap();
    let dense = b.to_dense();
    assert!(dense[6] && !dense[5] && dense[0]);
    assert!(dense[4 * 7 + 3] && !dense[4 * 7 + 6]);
}

#[test]
fn bsr_rejects_column_block_outside_the_matrix() {
    assert_eq!(
        arg_of(Bsr::new(2, 3, 5, 7, &[0, 1, 1, 2], &[0, 3])),
        "indices"
    );
    assert_eq!(
        arg_of(Bsr::new(2, 3, 5, 7, &[0, 1, 1, 2], &[0, -1])),
        "indices"
    );
}

#[test]
fn bsr_rejects_duplicate_column_block() {
    assert_eq!(
        arg_of(Bsr::new(2, 3, 5, 7, &[0, 2, 2, 2], &[1, 1])),
        "indices"
    );
}

#[test]
fn bsr_rejects_wrong_indptr_length() {
    assert_eq!(arg_of(Bsr::new(2, 3, 5, 7, &[0, 1, 2], &[0, 1])), "indptr");
}

#[test]
fn bsr_rejects_non_monotonic_indptr() {
    assert_eq!(
        arg_of(Bsr::new(2, 3, 5, 7, &[0, 2, 1, 2], &[0, 1])),
        "indptr"
    );
}

#[test]
fn bsr_rejects_indices_length_mismatch() {
    assert_eq!(arg_of(Bsr::new(2, 3, 5, 7, &[0, 1, 1, 2], &[0])), "indices");
}

#[test]
fn bsr_rejects_zero_block_sizes() {
    assert_eq!(arg_of(Bsr::new(0, 3, 5, 7, &[0], &[])), "block_rows");
    assert_eq!(arg_of(Bsr::new(2, 0, 5, 7, &[0], &[])), "block_cols");
}

// ---------------------------------------------------------------------------------------------
// The CPU backend's own checks
// ---------------------------------------------------------------------------------------------

/// A small valid paged setup: 2 requests of 3 and 0 keys, 2 pages of 2, NHD, 4 qo / 2 kv heads.
struct Paged {
    desc: PagedKvDesc,
    k: Vec<f32>,
    v: Vec<f32>,
    table: PageTable,
    heads: HeadConfig,
}

fn paged() -> Paged {
    let desc = PagedKvDesc::new(KvLayout::Nhd, 3, 2, 2, 8).unwrap();
    let n = desc.required_len();
    Paged {
        desc,
        k: vec![0.5; n],
        v: vec![0.25; n],
        table: PageTable::from_kv_lens(&[3, 0], 2, &[2, 0], 3).unwrap(),
        heads: HeadConfig::new(4, 2, 8).unwrap(),
    }
}

const P: AttentionParams = AttentionParams {
    sm_scale: None,
    lse_base: LseBase::Natural,
};

#[test]
fn batch_decode_runs_and_rejects_wrong_lengths() {
    let p = paged();
    let kv = PagedKv::new(p.desc, &p.k, &p.v).unwrap();
    let q = vec![1.0f32; 2 * 4 * 8];
    let mut out = vec![f32::NAN; 2 * 4 * 8];
    let mut lse = vec![f32::NAN; 2 * 4];
    reference::batch_decode(&q, &kv, &p.table, p.heads, &P, &mut out, Some(&mut lse)).unwrap();
    assert!(out[..32].iter().all(|&x| x == 0.25) && out[32..].iter().all(|&x| x == 0.0));
    assert_eq!(lse[4..], [f32::NEG_INFINITY; 4]);

    let mut out = vec![f32::NAN; 2 * 4 * 8];
    let mut lse = vec![f32::NAN; 2 * 4];
    let r = reference::batch_decode(&q[1..], &kv, &p.table, p.heads, &P, &mut out, None);
    assert_eq!(arg_of(r), "q");
    let r = reference::batch_decode(&q, &kv, &p.table, p.heads, &P, &mut out[1..], None);
    assert_eq!(arg_of(r), "out");
    let r = reference::batch_decode(
        &q,
        &kv,
        &p.table,
        p.heads,
        &P,
        &mut out,
        Some(&mut lse[1..]),
    );
    assert_eq!(arg_of(r), "lse");
    // A rejected call writes nothing.
    assert!(out.iter().chain(&lse).all(|x| x.is_nan()));
}

#[test]
fn paged_ops_reject_pool_and_heads_mismatches() {
    let p = paged();
    let kv = PagedKv::new(p.desc, &p.k, &p.v).unwrap();
    let q = vec![1.0f32; 2 * 4 * 8];
    let mut out = vec![f32::NAN; 2 * 4 * 8];
    let decode = |heads: HeadConfig, table: &PageTable, kv: &PagedKv<f32>, out: &mut [f32]| {
        reference::batch_decode(&q, kv, table, heads, &P, out, None)
    };

    let wrong_dim = HeadConfig::new(4, 2, 4).unwrap();
    let out4 = &mut [0.0f32; 2 * 4 * 4];
    assert_eq!(arg_of(decode(wrong_dim, &p.table, &kv, out4)), "head_dim");
    let wrong_kv_heads = HeadConfig::new(4, 4, 8).unwrap();
    assert_eq!(
        arg_of(decode(wrong_kv_heads, &p.table, &kv, &mut out)),
        "num_kv_heads"
    );
    // A HeadConfig built by hand, bypassing HeadConfig::new.
    let bad = HeadConfig {
        num_qo_heads: 3,
        num_kv_heads: 2,
        head_dim: 8,
    };
    assert_eq!(arg_of(decode(bad, &p.table, &kv, &mut out)), "num_kv_heads");

    // A table validated against a bigger pool than this one.
    let big = PageTable::from_kv_lens(&[3, 0], 2, &[7, 0], 8).unwrap();
    assert_eq!(arg_of(decode(p.heads, &big, &kv, &mut out)), "kv_indices");
    // A table of another page size.
    let ps3 = PageTable::from_kv_lens(&[3, 0], 3, &[1], 3).unwrap();
    assert_eq!(arg_of(decode(p.heads, &ps3, &kv, &mut out)), "page_size");

    // A pool built by hand, bypassing PagedKv::new: buffers too short for its description.
    let short = PagedKv {
        desc: p.desc,
        k: &p.k[..10],
        v: &p.v,
    };
    assert_eq!(
        arg_of(decode(p.heads, &p.table, &short, &mut out)),
        "k_cache"
    );
    let short = PagedKv {
        desc: p.desc,
        k: &p.k,
        v: &p.v[..10],
    };
    assert_eq!(
        arg_of(decode(p.heads, &p.table, &short, &mut out)),
        "v_cache"
    );
    let mut squeezed = p.desc;
    squeezed.page_stride = 8;
    let overlap = PagedKv {
        desc: squeezed,
        k: &p.k,
        v: &p.v,
    };
    assert_eq!(
        arg_of(decode(p.heads, &p.table, &overlap, &mut out)),
        "page_stride"
    );
    assert!(out.iter().all(|x| x.is_nan()));
}

#[test]
fn batch_prefill_paged_rejects_batch_and_mask_mismatches() {
    let p = paged();
    let kv = PagedKv::new(p.desc, &p.k, &p.v).unwrap();
    let qo = Ragged::from_lens(&[2, 1]);
    let q = vec![1.0f32; 3 * 4 * 8];
    let mut out = vec![f32::NAN; 3 * 4 * 8];
    let run = |qo: &Ragged, mask: MaskMode, out: &mut [f32]| {
        reference::batch_prefill_paged(&q, qo, &kv, &p.table, p.heads, mask, &P, out, None)
    };
    run(&qo, MaskMode::Causal, &mut out).unwrap();

    let three = Ragged::from_lens(&[1, 1, 1]);
    assert_eq!(arg_of(run(&three, MaskMode::None, &mut out)), "kv_indptr");
    let longer = Ragged::from_lens(&[2, 2]);
    assert_eq!(arg_of(run(&longer, MaskMode::None, &mut out)), "q");
    // Mask of the wrong request shape, and of the wrong batch size.
    let m = CustomMask::pack(&[vec![true; 6], vec![true; 1]], &[2, 1], &[3, 1]).unwrap();
    assert_eq!(
        arg_of(run(&qo, MaskMode::Custom(&m), &mut out)),
        "custom_mask"
    );
    let m = CustomMask::pack(&[vec![true; 6]], &[2], &[3]).unwrap();
    assert_eq!(
        arg_of(run(&qo, MaskMode::Custom(&m), &mut out)),
        "custom_mask"
    );
    let nan_scale = AttentionParams {
        sm_scale: Some(f32::NAN),
        lse_base: LseBase::Natural,
    };
    let r = reference::batch_prefill_paged(
        &q,
        &qo,
        &kv,
        &p.table,
        p.heads,
        MaskMode::None,
        &nan_scale,
        &mut out,
        None,
    );
    assert_eq!(arg_of(r), "sm_scale");
}

#[test]
fn ragged_and_single_ops_reject_wrong_lengths() {
    let heads = HeadConfig::new(2, 1, 4).unwrap();
    let (qo, kv) = (Ragged::from_lens(&[1, 2]), Ragged::from_lens(&[3, 1]));
    let q = vec![1.0f32; 3 * 2 * 4];
    let k = vec![1.0f32; 4 * 4];
    let mut out = vec![0.0f32; 3 * 2 * 4];
    let ragged = |k: &[f32], v: &[f32], kv: &Ragged, out: &mut [f32]| {
        reference::batch_prefill_ragged(&q, &qo, k, v, kv, heads, MaskMode::Causal, &P, out, None)
    };
    ragged(&k, &k, &kv, &mut out).unwrap();
    assert_eq!(arg_of(ragged(&k[1..], &k, &kv, &mut out)), "k");
    assert_eq!(arg_of(ragged(&k, &k[4..], &kv, &mut out)), "v");
    assert_eq!(
        arg_of(ragged(&k, &k, &Ragged::from_lens(&[4]), &mut out)),
        "kv_indptr"
    );

    let mut out1 = vec![0.0f32; 2 * 4];
    let r = reference::single_decode(&q[..8], &k, &k, 3, heads, &P, &mut out1, None);
    assert_eq!(arg_of(r), "k");
    let r = reference::single_decode(&q[..7], &k, &k, 4, heads, &P, &mut out1, None);
    assert_eq!(arg_of(r), "q");
    let mut lse = vec![0.0f32; 3];
    let r = reference::single_decode(&q[..8], &k, &k, 4, heads, &P, &mut out1, Some(&mut lse));
    assert_eq!(arg_of(r), "lse");

    let m = CustomMask::pack(&[vec![true; 12]], &[3], &[4]).unwrap();
    let r = reference::single_prefill(
        &q,
        &k,
        &k,
        3,
        4,
        heads,
        MaskMode::Custom(&m),
        &P,
        &mut out,
        None,
    );
    r.unwrap();
    let r = reference::single_prefill(
        &q[..16],
        &k,
        &k,
        2,
        4,
        heads,
        MaskMode::Custom(&m),
        &P,
        &mut out[..16],
        None,
    );
    assert_eq!(arg_of(r), "custom_mask");
    let r = reference::single_prefill(
        &q,
        &k,
        &k,
        3,
        4,
        heads,
        MaskMode::None,
        &P,
        &mut out[1..],
        None,
    );
    assert_eq!(arg_of(r), "out");
}

#[test]
fn merge_ops_reject_wrong_lengths() {
    let (h, d) = (2, 4);
    let v = vec![1.0f32; 3 * h * d];
    let s = vec![0.0f32; 3 * h];
    let mut vo = vec![0.0f32; 3 * h * d];
    let mut so = vec![0.0f32; 3 * h];
    let b = LseBase::Natural;
    assert_eq!(
        arg_of(reference::merge_state(
            &v,
            &s,
            &v[1..],
            &s,
            h,
            d,
            b,
            &mut vo,
            &mut so
        )),
        "v_b"
    );
    assert_eq!(
        arg_of(reference::merge_state(
            &v[1..],
            &s,
            &v,
            &s,
            h,
            d,
            b,
            &mut vo,
            &mut so
        )),
        "v_a"
    );
    assert_eq!(
        arg_of(reference::merge_state(
            &v,
            &s,
            &v,
            &s[1..],
            h,
            d,
            b,
            &mut vo,
            &mut so
        )),
        "s_b"
    );
    assert_eq!(
        arg_of(reference::merge_state(
            &v,
            &s,
            &v,
            &s,
            h,
            d,
            b,
            &mut vo,
            &mut so[1..]
        )),
        "s_out"
    );
    assert_eq!(
        arg_of(reference::merge_state(
            &v, &s, &v, &s, 0, d, b, &mut vo, &mut so
        )),
        "num_heads"
    );

    let (mut vi, mut si) = (v.clone(), s.clone());
    let r = reference::merge_state_in_place(&mut vi, &mut si, &v, &s, Some(&[1, 0]), h, d, b);
    assert_eq!(arg_of(r), "mask");
    let r = reference::merge_state_in_place(&mut vi, &mut si[1..], &v, &s, None, h, d, b);
    assert_eq!(arg_of(r), "s");

    let r = reference::merge_states(&v, &s, 2, h, d, b, &mut vo, &mut so);
    assert_eq!(arg_of(r), "v");
    let r = reference::merge_states(&v, &s, 1, h, d, b, &mut vo[..3 * h * d - 1], &mut so);
    assert_eq!(arg_of(r), "v_out");

    let indptr = Ragged::from_lens(&[2, 0, 1]);
    reference::merge_states_varlen(&v, &s, &indptr, h, d, b, &mut vo, &mut so).unwrap();
    let indptr = Ragged::from_lens(&[2, 2]);
    let r = reference::merge_states_varlen(
        &v,
        &s,
        &indptr,
        h,
        d,
        b,
        &mut vo[..2 * h * d],
        &mut so[..2 * h],
    );
    assert_eq!(arg_of(r), "v");
}
