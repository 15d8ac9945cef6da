//! GPU merge ops against the CPU backend, on fresh random states (some empty: LSE = -inf).

mod support;

use flashinfer::cuda::{DevSlice, DevSliceMut};
use flashinfer::layout::Ragged;
use flashinfer::reference::{self, rel_l2_error};
use flashinfer::{merge, Element, LseBase};
use support::*;

/// Random LSE values, a few of them -inf (a state that saw no key).
fn random_lse(rng: &mut flashinfer::random::SplitMix64, n: usize) -> Vec<f32> {
    (0..n)
        .map(|_| {
            if rng.below(8) == 0 {
                f32::NEG_INFINITY
            } else {
                rng.sym(20.0)
            }
        })
        .collect()
}

fn merge_state_case<T: Element + flashinfer::cuda::DeviceRepr>(
    rows: usize,
    heads: usize,
    dim: usize,
    base: LseBase,
) {
    let dev = device();
    let mut rng = Rng::fresh("merge_state");
    let n = rows * heads * dim;
    let (va, vb) = (rng.vec::<T>(n, 2.0), rng.vec::<T>(n, 2.0));
    let (sa, sb) = (
        random_lse(&mut rng, rows * heads),
        random_lse(&mut rng, rows * heads),
    );
    let mut want_v = vec![T::default(); n];
    let mut want_s = vec![0f32; rows * heads];
    reference::merge_state(
        &va,
        &sa,
        &vb,
        &sb,
        heads,
        dim,
        base,
        &mut want_v,
        &mut want_s,
    )
    .unwrap();

    let s = dev.stream();
    let (dva, dsa, dvb, dsb) = (
        upload(&dev, &va),
        upload(&dev, &sa),
        upload(&dev, &vb),
        upload(&dev, &sb),
    );
    let mut dvo = poisoned::<T>(&dev, n);
    let mut dso = poisoned::<f32>(&dev, rows * heads);
    merge::merge_state(
        &dev,
        DevSlice::new(&dva, s),
        DevSlice::new(&dsa, s),
        DevSlice::new(&dvb, s),
        DevSlice::new(&dsb, s),
        heads,
        dim,
        base,
        DevSliceMut::new(&mut dvo, s),
        Some(DevSliceMut::new(&mut dso, s)),
    )
    .unwrap();
    let got_v = download(&dev, &dvo);
    let got_s = download(&dev, &dso);
    let err = rel_l2_error(&to_f32(&got_v), &to_f64(&want_v));
    assert!(
        err <= tolerance::<T>(),
        "merge_state {:?} d{dim}: rel err {err}",
        T::DTYPE
    );
    check_lse("merge_state lse", &got_s, &want_s, 1e-4);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_merge_state_matches_cpu() {
    for base in [LseBase::Natural, LseBase::Base2] {
        merge_state_case::<half::bf16>(37, 8, 128, base);
        merge_state_case::<half::f16>(5, 32, 64, base);
        merge_state_case::<f32>(9, 3, 256, base);
        merge_state_case::<half::bf16>(11, 4, 100, base); // head_dim not a multiple of 8: scalar path
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_merge_state_in_place_matches_cpu() {
    let dev = device();
    let mut rng = Rng::fresh("merge_state_in_place");
    let (rows, heads, dim) = (33, 8, 128);
    let n = rows * heads * dim;
    let v: Vec<half::bf16> = rng.vec(n, 2.0);
    let vo: Vec<half::bf16> = rng.vec(n, 2.0);
    let (s, so) = (
        random_lse(&mut rng, rows * heads),
        random_lse(&mut rng, rows * heads),
    );
    let mask: Vec<u8> = (0..rows).map(|_| (rng.below(3) != 0) as u8).collect();
    let (mut want_v, mut want_s) = (v.clone(), s.clone());
    reference::merge_state_in_place(
        &mut want_v,
        &mut want_s,
        &vo,
        &so,
        Some(&mask),
        heads,
        dim,
        LseBase::Natural,
    )
    .unwrap();
    let st = dev.stream();
    let (mut dv, mut ds) = (upload(&dev, &v), upload(&dev, &s));
    let (dvo, dso, dm) = (upload(&dev, &vo), upload(&dev, &so), upload(&dev, &mask));
    merge::merge_state_in_place(
        &dev,
        DevSliceMut::new(&mut dv, st),
        DevSliceMut::new(&mut ds, st),
        DevSlice::new(&dvo, st),
        DevSlice::new(&dso, st),
        Some(DevSlice::new(&dm, st)),
        heads,
        dim,
        LseBase::Natural,
    )
    .unwrap();
    let (got_v, got_s) = (download(&dev, &dv), download(&dev, &ds));
    let err = rel_l2_error(&to_f32(&got_v), &to_f64(&want_v));
    assert!(err <= 1e-2, "rel err {err}");
    check_lse("in-place lse", &got_s, &want_s, 1e-4);
    // Rows the mask skips are untouched, bit for bit.
    for r in (0..rows).filter(|&r| mask[r] == 0) {
        let row = r * heads * dim..(r + 1) * heads * dim;
        assert_eq!(&got_v[row.clone()], &v[row], "masked row {r} changed");
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_merge_states_and_varlen_match_cpu() {
    let dev = device();
    let mut rng = Rng::fresh("merge_states");
    let (rows, k, heads, dim) = (19, 5, 4, 128);
    let v: Vec<half::f16> = rng.vec(rows * k * heads * dim, 2.0);
    let s = random_lse(&mut rng, rows * k * heads);
    let mut want_v = vec![half::f16::ZERO; rows * heads * dim];
    let mut want_s = vec![0f32; rows * heads];
    reference::merge_states(
        &v,
        &s,
        k,
        heads,
        dim,
        LseBase::Base2,
        &mut want_v,
        &mut want_s,
    )
    .unwrap();
    let st = dev.stream();
    let (dv, ds) = (upload(&dev, &v), upload(&dev, &s));
    let mut dvo = poisoned::<half::f16>(&dev, rows * heads * dim);
    let mut dso = poisoned::<f32>(&dev, rows * heads);
    merge::merge_states(
        &dev,
        DevSlice::new(&dv, st),
        DevSlice::new(&ds, st),
        k,
        heads,
        dim,
        LseBase::Base2,
        DevSliceMut::new(&mut dvo, st),
        Some(DevSliceMut::new(&mut dso, st)),
    )
    .unwrap();
    let err = rel_l2_error(&to_f32(&download(&dev, &dvo)), &to_f64(&want_v));
    assert!(err <= 2e-3, "merge_states rel err {err}");
    check_lse("merge_states lse", &download(&dev, &dso), &want_s, 1e-4);

    // Variable length, with rows of 0 states (zeros, -inf) and of 1 state (a copy).
    let lens: Vec<usize> = (0..23)
        .map(|i| if i % 7 == 0 { 0 } else { rng.below(9) + 1 })
        .collect();
    let indptr = Ragged::from_lens(&lens);
    let total = indptr.total();
    let v: Vec<half::bf16> = rng.vec(total * heads * dim, 2.0);
    let s = random_lse(&mut rng, total * heads);
    let seq = lens.len();
    let mut want_v = vec![half::bf16::ZERO; seq * heads * dim];
    let mut want_s = vec![0f32; seq * heads];
    reference::merge_states_varlen(
        &v,
        &s,
        &indptr,
        heads,
        dim,
        LseBase::Natural,
        &mut want_v,
        &mut want_s,
    )
    .unwrap();
    let (dv, ds, di) = (
        upload(&dev, &v),
        upload(&dev, &s),
        upload(&dev, indptr.indptr()),
    );
    let mut dvo = poisoned::<half::bf16>(&dev, seq * heads * dim);
    let mut dso = poisoned::<f32>(&dev, seq * heads);
    merge::merge_states_varlen(
        &dev,
        DevSlice::new(&dv, st),
        DevSlice::new(&ds, st),
        DevSlice::new(&di, st),
        indptr.indptr(),
        heads,
        dim,
        LseBase::Natural,
        DevSliceMut::new(&mut dvo, st),
        Some(DevSliceMut::new(&mut dso, st)),
    )
    .unwrap();
    let err = rel_l2_error(&to_f32(&download(&dev, &dvo)), &to_f64(&want_v));
    assert!(err <= 1e-2, "varlen rel err {err}");
    check_lse("varlen lse", &download(&dev, &dso), &want_s, 1e-4);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_merge_rejects_bad_lengths_before_launch() {
    let dev = device();
    let st = dev.stream();
    let a = upload(&dev, &vec![half::bf16::ONE; 8 * 128]);
    let s = upload(&dev, &[0f32; 8]);
    let short = upload(&dev, &[0f32; 7]);
    let mut o = poisoned::<half::bf16>(&dev, 8 * 128);
    let err = merge::merge_state(
        &dev,
        DevSlice::new(&a, st),
        DevSlice::new(&s, st),
        DevSlice::new(&a, st),
        DevSlice::new(&short, st),
        8,
        128,
        LseBase::Natural,
        DevSliceMut::new(&mut o, st),
        None,
    )
    .unwrap_err();
    assert!(
        matches!(err, flashinfer::Error::InvalidArgument { arg: "s_b", .. }),
        "{err}"
    );
}

/// Ops launch on the stream of the device handle they are given, including a stream the caller
/// owns and passes as a raw `CUstream`.
#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_merge_runs_on_a_borrowed_stream() {
    let dev = device();
    let owned = dev.context().new_stream().unwrap();
    // SAFETY: `owned` is a live stream of this context and outlives `on_stream` and its work.
    let on_stream = unsafe { dev.with_borrowed_stream(owned.cu_stream()) }.unwrap();
    assert_eq!(on_stream.stream().cu_stream(), owned.cu_stream());
    let mut rng = Rng::fresh("borrowed stream");
    let (rows, heads, dim) = (64, 8, 128);
    let n = rows * heads * dim;
    let (va, vb) = (rng.vec::<half::bf16>(n, 2.0), rng.vec::<half::bf16>(n, 2.0));
    let (sa, sb) = (
        random_lse(&mut rng, rows * heads),
        random_lse(&mut rng, rows * heads),
    );
    let mut want_v = vec![half::bf16::ZERO; n];
    let mut want_s = vec![0f32; rows * heads];
    reference::merge_state(
        &va,
        &sa,
        &vb,
        &sb,
        heads,
        dim,
        LseBase::Natural,
        &mut want_v,
        &mut want_s,
    )
    .unwrap();
    let st = on_stream.stream();
    let (a, b, x, y) = (
        upload(&on_stream, &va),
        upload(&on_stream, &vb),
        upload(&on_stream, &sa),
        upload(&on_stream, &sb),
    );
    let mut o = poisoned::<half::bf16>(&on_stream, n);
    merge::merge_state(
        &on_stream,
        DevSlice::new(&a, st),
        DevSlice::new(&x, st),
        DevSlice::new(&b, st),
        DevSlice::new(&y, st),
        heads,
        dim,
        LseBase::Natural,
        DevSliceMut::new(&mut o, st),
        None,
    )
    .unwrap();
    let err = rel_l2_error(&to_f32(&download(&on_stream, &o)), &to_f64(&want_v));
    assert!(err <= 1e-2, "rel err {err}");
}
