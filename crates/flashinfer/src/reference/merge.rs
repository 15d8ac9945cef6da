//! The attention-state merge operator (the paper's ⊕): combines partial attention results over
//! disjoint key sets into the result over their union, exactly.
//!
//! A state is `(v, s)`: `v` the softmax-weighted value row over its keys, `s` their log-sum-exp.
//! Merging states `i` gives `s = log Σ exp(s_i)` and `v = Σ exp(s_i - s) v_i`. Internally in base 2
//! (inputs converted with `base.to_log2`, the result with `base.from_log2`), accumulating in f32.
//!
//! A state with `s = -inf` covers no key: it contributes nothing and its `v` is never read, so
//! merging with it passes the other state through bit for bit. When every state is `-inf` the
//! result is zeros and `-inf`, as for attention over no key.
//!
//! Shapes are row-major, `v: [seq, num_heads, head_dim]`, `s: [seq, num_heads]` unless stated.

use super::check::{check_buf, numel};
use crate::dtype::Element;
use crate::error::{ensure, Result};
use crate::layout::Ragged;
use crate::params::LseBase;
use rayon::prelude::*;

/// Merges `n` states of one row into `out` (`[head_dim]`) and returns the merged LSE in `base`.
/// `state(i)` is `(v_i: [head_dim], s_i in base)`.
fn merge_row<'v, Q: Element>(
    n: usize,
    state: impl Fn(usize) -> (&'v [Q], f32),
    base: LseBase,
    acc: &mut Vec<f32>,
    out: &mut [Q],
) -> f32 {
    // The live states (s != -inf) and the largest base-2 LSE among them. A NaN LSE is kept live
    // and becomes the max, so it shows up in the output instead of being silently dropped.
    let mut live = 0usize;
    let mut only = 0usize;
    let mut max = f32::NEG_INFINITY;
    for i in 0..n {
        let s = state(i).1;
        if s == f32::NEG_INFINITY {
            continue;
        }
        live += 1;
        only = i;
        let s2 = base.to_log2(s);
        if !max.is_nan() && (s2.is_nan() || s2 > max) {
            max = s2;
        }
    }
    match live {
        0 => {
            out.fill(Q::from_f32(0.0));
            f32::NEG_INFINITY
        }
        1 => {
            // Exact pass-through: no round trip through base 2 or f32 weights.
            let (v, s) = state(only);
            out.copy_from_slice(v);
            s
        }
        _ => {
            acc.clear();
            acc.resize(out.len(), 0.0);
            let mut sum = 0.0f32;
            for i in 0..n {
                let (v, s) = state(i);
                if s == f32::NEG_INFINITY {
                    continue;
                }
                let w = (base.to_log2(s) - max).exp2();
                sum += w;
                for (a, &x) in acc.iter_mut().zip(v) {
                    *a += w * x.to_f32();
                }
            }
            for (o, &a) in out.iter_mut().zip(acc.iter()) {
                *o = Q::from_f32(a / sum);
            }
            base.from_log2(max + sum.log2())
        }
    }
}

/// Checks `num_heads`, `head_dim` and returns the elements of one `[num_heads, head_dim]` row.
fn row_elems(num_heads: usize, head_dim: usize) -> Result<usize> {
    ensure(num_heads >= 1, "num_heads", || "must be at least 1".into())?;
    ensure(head_dim >= 1, "head_dim", || "must be at least 1".into())?;
    numel("head_dim", &[num_heads, head_dim])
}

/// The number of `[num_heads, head_dim]` rows of `v` (named `arg`), which must be whole.
fn seq_len(arg: &'static str, len: usize, row: usize, shape: &str) -> Result<usize> {
    ensure(len.is_multiple_of(row), arg, || {
        format!("has {len} elements, not a whole number of {shape} rows of {row}")
    })?;
    Ok(len / row)
}

/// Merges two states row by row: `(v_out, s_out) = (v_a, s_a) ⊕ (v_b, s_b)`.
///
/// - `v_a`, `v_b`, `v_out`: `[seq, num_heads, head_dim]`
/// - `s_a`, `s_b`, `s_out`: `[seq, num_heads]`, LSE in `base` (the output too)
#[allow(clippy::too_many_arguments)]
pub fn merge_state<Q: Element>(
    v_a: &[Q],
    s_a: &[f32],
    v_b: &[Q],
    s_b: &[f32],
    num_heads: usize,
    head_dim: usize,
    base: LseBase,
    v_out: &mut [Q],
    s_out: &mut [f32],
) -> Result<()> {
    let row = row_elems(num_heads, head_dim)?;
    let seq = seq_len("v_a", v_a.len(), row, "[num_heads, head_dim]")?;
    check_buf("s_a", s_a.len(), &[seq, num_heads], "[seq, num_heads]")?;
    check_buf(
        "v_b",
        v_b.len(),
        &[seq, num_heads, head_dim],
        "[seq, num_heads, head_dim]",
    )?;
    check_buf("s_b", s_b.len(), &[seq, num_heads], "[seq, num_heads]")?;
    check_buf(
        "v_out",
        v_out.len(),
        &[seq, num_heads, head_dim],
        "[seq, num_heads, head_dim]",
    )?;
    check_buf("s_out", s_out.len(), &[seq, num_heads], "[seq, num_heads]")?;

    v_out
        .par_chunks_mut(head_dim)
        .zip(s_out.par_iter_mut())
        .enumerate()
        .for_each_init(Vec::new, |acc, (r, (o, s))| {
            let rows = r * head_dim..(r + 1) * head_dim;
            let state = |i: usize| match i {
                0 => (&v_a[rows.clone()], s_a[r]),
                _ => (&v_b[rows.clone()], s_b[r]),
            };
            *s = merge_row(2, state, base, acc, o);
        });
    Ok(())
}

/// Merges `(v_other, s_other)` into `(v, s)` in place, for the sequences where `mask` is nonzero
/// (all of them when `mask` is `None`); the others are left untouched.
///
/// - `v`, `v_other`: `[seq, num_heads, head_dim]`
/// - `s`, `s_other`: `[seq, num_heads]`, LSE in `base`
/// - `mask`: `[seq]`, 0 = skip this sequence
#[allow(clippy::too_many_arguments)]
pub fn merge_state_in_place<Q: Element>(
    v: &mut [Q],
    s: &mut [f32],
    v_other: &[Q],
    s_other: &[f32],
    mask: Option<&[u8]>,
    num_heads: usize,
    head_dim: usize,
    base: LseBase,
) -> Result<()> {
    let row = row_elems(num_heads, head_dim)?;
    let seq = seq_len("v", v.len(), row, "[num_heads, head_dim]")?;
    check_buf("s", s.len(), &[seq, num_heads], "[seq, num_heads]")?;
    check_buf(
        "v_other",
        v_other.len(),
        &[seq, num_heads, head_dim],
        "[seq, num_heads, head_dim]",
    )?;
    check_buf(
        "s_other",
        s_other.len(),
        &[seq, num_heads],
        "[seq, num_heads]",
    )?;
    if let Some(m) = mask {
        check_buf("mask", m.len(), &[seq], "[seq]")?;
    }

    v.par_chunks_mut(head_dim)
        .zip(s.par_iter_mut())
        .enumerate()
        .for_each_init(
            || (Vec::new(), Vec::new()),
            |(acc, own), (r, (vr, sr))| {
                if mask.is_some_and(|m| m[r / num_heads] == 0) {
                    return;
                }
                // Copy this row's own state out first: merge_row reads both states before writing.
                own.clear();
                own.extend_from_slice(vr);
                let other = &v_other[r * head_dim..(r + 1) * head_dim];
                let (s_own, s_oth) = (*sr, s_other[r]);
                let state = |i: usize| match i {
                    0 => (&own[..], s_own),
                    _ => (other, s_oth),
                };
                *sr = merge_row(2, state, base, acc, vr);
            },
        );
    Ok(())
}

/// Merges `num_states` states per row.
///
/// - `v`: `[seq, num_states, num_heads, head_dim]`; `s`: `[seq, num_states, num_heads]`, in `base`
/// - `v_out`: `[seq, num_heads, head_dim]`; `s_out`: `[seq, num_heads]`, in `base`
///
/// `seq` is taken from `v_out`. With `num_states = 0` every row is zeros and `-inf`.
#[allow(clippy::too_many_arguments)]
pub fn merge_states<Q: Element>(
    v: &[Q],
    s: &[f32],
    num_states: usize,
    num_heads: usize,
    head_dim: usize,
    base: LseBase,
    v_out: &mut [Q],
    s_out: &mut [f32],
) -> Result<()> {
    let row = row_elems(num_heads, head_dim)?;
    let seq = seq_len("v_out", v_out.len(), row, "[num_heads, head_dim]")?;
    check_buf(
        "v",
        v.len(),
        &[seq, num_states, num_heads, head_dim],
        "[seq, num_states, num_heads, head_dim]",
    )?;
    check_buf(
        "s",
        s.len(),
        &[seq, num_states, num_heads],
        "[seq, num_states, num_heads]",
    )?;
    check_buf("s_out", s_out.len(), &[seq, num_heads], "[seq, num_heads]")?;

    v_out
        .par_chunks_mut(head_dim)
        .zip(s_out.par_iter_mut())
        .enumerate()
        .for_each_init(Vec::new, |acc, (r, (o, so))| {
            let (i, h) = (r / num_heads, r % num_heads);
            let state = |k: usize| {
                let idx = (i * num_states + k) * num_heads + h;
                (&v[idx * head_dim..(idx + 1) * head_dim], s[idx])
            };
            *so = merge_row(num_states, state, base, acc, o);
        });
    Ok(())
}

/// Merges a variable number of states per row (split-KV decode merges its chunks with this).
///
/// - `v`: `[total, num_heads, head_dim]`; `s`: `[total, num_heads]`, in `base`, where
///   `total = indptr.total()` and output row i merges states `indptr[i]..indptr[i+1]`
/// - `v_out`: `[seq, num_heads, head_dim]`; `s_out`: `[seq, num_heads]`, `seq = indptr.batch_size()`
///
/// A row with no state is zeros and `-inf`.
#[allow(clippy::too_many_arguments)]
pub fn merge_states_varlen<Q: Element>(
    v: &[Q],
    s: &[f32],
    indptr: &Ragged,
    num_heads: usize,
    head_dim: usize,
    base: LseBase,
    v_out: &mut [Q],
    s_out: &mut [f32],
) -> Result<()> {
    row_elems(num_heads, head_dim)?;
    let (seq, total) = (indptr.batch_size(), indptr.total());
    check_buf(
        "v",
        v.len(),
        &[total, num_heads, head_dim],
        "[total, num_heads, head_dim]",
    )?;
    check_buf("s", s.len(), &[total, num_heads], "[total, num_heads]")?;
    check_buf(
        "v_out",
        v_out.len(),
        &[seq, num_heads, head_dim],
        "[seq, num_heads, head_dim]",
    )?;
    check_buf("s_out", s_out.len(), &[seq, num_heads], "[seq, num_heads]")?;

    v_out
        .par_chunks_mut(head_dim)
        .zip(s_out.par_iter_mut())
        .enumerate()
        .for_each_init(Vec::new, |acc, (r, (o, so))| {
            let (i, h) = (r / num_heads, r % num_heads);
            let start = indptr.start(i);
            let state = |k: usize| {
                let idx = (start + k) * num_heads + h;
                (&v[idx * head_dim..(idx + 1) * head_dim], s[idx])
            };
            *so = merge_row(indptr.len(i), state, base, acc, o);
        });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_of_two_halves_is_the_whole() {
        // Keys with scores 0 and ln 3 (natural), values 1 and 5: weights 1/4, 3/4 -> 4.
        let (v_a, s_a) = ([1.0f32], [0.0f32]);
        let (v_b, s_b) = ([5.0f32], [3.0f32.ln()]);
        let (mut v, mut s) = ([f32::NAN], [f32::NAN]);
        merge_state(
            &v_a,
            &s_a,
            &v_b,
            &s_b,
            1,
            1,
            LseBase::Natural,
            &mut v,
            &mut s,
        )
        .unwrap();
        assert!((v[0] - 4.0).abs() < 1e-6);
        assert!((s[0] - 4.0f32.ln()).abs() < 1e-6);
    }

    #[test]
    fn neg_inf_states_pass_through_exactly() {
        let (v_a, s_a) = ([0.3f32, -7.0], [1.2345f32]);
        let (v_b, s_b) = ([f32::NAN, f32::NAN], [f32::NEG_INFINITY]);
        let (mut v, mut s) = ([0.0f32; 2], [0.0f32]);
        merge_state(
            &v_a,
            &s_a,
            &v_b,
            &s_b,
            1,
            2,
            LseBase::Natural,
            &mut v,
            &mut s,
        )
        .unwrap();
        assert_eq!((v, s), (v_a, s_a));
        merge_state(&v_b, &s_b, &v_b, &s_b, 1, 2, LseBase::Base2, &mut v, &mut s).unwrap();
        assert_eq!((v, s), ([0.0, 0.0], [f32::NEG_INFINITY]));
    }
}
