//! The one core routine: attend one query row over keys reached through a gather closure.
//!
//! Paged, ragged and contiguous KV only differ in how key `j` is found (the paper's "one gather
//! abstraction, same code after"), so every attention op of the CPU backend ends up here.
//!
//! Scores are computed in base 2 (`q·k · sm_scale · log2(e)`, then `exp2`) like the GPU kernels,
//! and the LSE comes out in base 2; callers convert it with [`LseBase::from_log2`]. The softmax is
//! exact (two passes: scores and their max, then the weighted sum of values), accumulating in f32.
//!
//! [`LseBase::from_log2`]: crate::params::LseBase::from_log2

use super::mask::RowMask;
use crate::dtype::Element;
use rayon::prelude::*;

/// Per-thread scratch reused across rows, so a row costs no allocation once warm.
#[derive(Default)]
pub(crate) struct Scratch {
    /// The query row in f32.
    q: Vec<f32>,
    /// The f32 output accumulator, `[head_dim]`.
    acc: Vec<f32>,
    /// `(key index, base-2 score)` of every visible key of the row.
    scores: Vec<(usize, f32)>,
}

/// Attends one query row: `out = softmax(q·Kᵀ · sm_scale) · V` over the keys `mask` lets it see.
///
/// - `q`, `out`: `[head_dim]`.
/// - `gather(j)`: (K row, V row) of key `j`, each `[head_dim]`.
/// - `scale_log2`: `sm_scale · log2(e)`.
///
/// Returns the row's LSE in base 2. A row that sees no key gets zeros and `-inf`.
pub(crate) fn attend_row<'k, Q, KV, G>(
    q: &[Q],
    mask: RowMask<'_>,
    gather: G,
    scale_log2: f32,
    scratch: &mut Scratch,
    out: &mut [Q],
) -> f32
where
    Q: Element,
    KV: Element + 'k,
    G: Fn(usize) -> (&'k [KV], &'k [KV]),
{
    let Scratch { q: qf, acc, scores } = scratch;
    qf.clear();
    qf.extend(q.iter().map(|x| x.to_f32()));

    // Pass 1: base-2 scores of the visible keys and their maximum.
    scores.clear();
    let mut max = f32::NEG_INFINITY;
    for j in 0..mask.key_end {
        if !mask.visible(j) {
            continue;
        }
        let (k, _) = gather(j);
        let s = dot(qf, k) * scale_log2;
        max = max.max(s);
        scores.push((j, s));
    }
    if scores.is_empty() {
        out.fill(Q::from_f32(0.0));
        return f32::NEG_INFINITY;
    }

    // Pass 2: weights relative to the max, so each is <= 1 and their sum is >= 1 (no overflow,
    // no division by a tiny number).
    acc.clear();
    acc.resize(qf.len(), 0.0);
    let mut sum = 0.0f32;
    for &(j, s) in scores.iter() {
        let p = (s - max).exp2();
        sum += p;
        let (_, v) = gather(j);
        for (a, &x) in acc.iter_mut().zip(v) {
            *a += p * x.to_f32();
        }
    }
    for (o, &a) in out.iter_mut().zip(acc.iter()) {
        *o = Q::from_f32(a / sum);
    }
    max + sum.log2()
}

/// `q · k` of two f32 rows (the variant routine rotates keys into f32 first).
pub(crate) fn dot_f32(q: &[f32], k: &[f32]) -> f32 {
    dot(q, k)
}

/// `q · k` in f32. Eight independent partial sums let the compiler vectorise and keep the
/// rounding error of long rows down (a pairwise-ish sum).
#[inline]
fn dot<KV: Element>(q: &[f32], k: &[KV]) -> f32 {
    let mut lanes = [0.0f32; 8];
    let qc = q.chunks_exact(8);
    let kc = k.chunks_exact(8);
    let (qr, kr) = (qc.remainder(), kc.remainder());
    for (qs, ks) in qc.zip(kc) {
        for l in 0..8 {
            lanes[l] += qs[l] * ks[l].to_f32();
        }
    }
    let mut tail = 0.0f32;
    for (&a, &b) in qr.iter().zip(kr) {
        tail += a * b.to_f32();
    }
    let pairs = [
        lanes[0] + lanes[4],
        lanes[1] + lanes[5],
        lanes[2] + lanes[6],
        lanes[3] + lanes[7],
    ];
    (pairs[0] + pairs[2]) + (pairs[1] + pairs[3]) + tail
}

/// Runs `row(index, scratch, out_row)` for every `[dim]` row of `out` in parallel and stores the
/// LSE it returns in `lse[index]` when `lse` is given. The caller has checked that `lse` has one
/// entry per row and that `dim > 0`.
pub(crate) fn par_rows<Q, F>(out: &mut [Q], lse: Option<&mut [f32]>, dim: usize, row: F)
where
    Q: Element,
    F: Fn(usize, &mut Scratch, &mut [Q]) -> f32 + Sync + Send,
{
    if dim == 0 {
        return;
    }
    match lse {
        Some(lse) => out
            .par_chunks_mut(dim)
            .zip(lse.par_iter_mut())
            .enumerate()
            .for_each_init(Scratch::default, |s, (r, (o, l))| *l = row(r, s, o)),
        None => out
            .par_chunks_mut(dim)
            .enumerate()
            .for_each_init(Scratch::default, |s, (r, o)| {
                row(r, s, o);
            }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::MaskMode;

    fn row(q: &[f32], keys: &[[f32; 2]], vals: &[[f32; 2]], mask: RowMask<'_>) -> ([f32; 2], f32) {
        let mut out = [f32::NAN; 2];
        let lse2 = attend_row(
            q,
            mask,
            |j| (&keys[j][..], &vals[j][..]),
            std::f32::consts::LOG2_E,
            &mut Scratch::default(),
            &mut out,
        );
        (out, lse2)
    }

    #[test]
    fn two_equal_keys_average_values() {
        let keys = [[1.0, 0.0], [1.0, 0.0]];
        let vals = [[2.0, 4.0], [4.0, 8.0]];
        let (out, lse2) = row(
            &[0.5, 0.5],
            &keys,
            &vals,
            RowMask::new(MaskMode::None, 0, 1, 2, 0),
        );
        assert_eq!(out, [3.0, 6.0]);
        // Natural LSE = ln(2 e^0.5) = 0.5 + ln 2; in base 2: 0.5 log2(e) + 1.
        assert!((lse2 - (0.5 * std::f32::consts::LOG2_E + 1.0)).abs() < 1e-6);
    }

    #[test]
    fn no_visible_key_gives_zeros_and_neg_inf() {
        let keys = [[1.0, 0.0]];
        let vals = [[2.0, 4.0]];
        // Causal, 3 queries over 1 key: row 0 sees nothing.
        let (out, lse2) = row(
            &[0.5, 0.5],
            &keys,
            &vals,
            RowMask::new(MaskMode::Causal, 0, 3, 1, 0),
        );
        assert_eq!(out, [0.0, 0.0]);
        assert_eq!(lse2, f32::NEG_INFINITY);
    }

    #[test]
    fn dot_matches_naive_for_all_tails() {
        for n in 0..20 {
            let q: Vec<f32> = (0..n).map(|i| i as f32 * 0.25 - 1.0).collect();
            let k: Vec<f32> = (0..n).map(|i| 1.5 - i as f32 * 0.125).collect();
            let want: f32 = q.iter().zip(&k).map(|(a, b)| a * b).sum();
            assert!((dot(&q, &k) - want).abs() < 1e-4, "n = {n}");
        }
    }
}
