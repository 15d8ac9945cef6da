//! The plainest possible decode, in f64: the oracle for the CPU backend when there is no GPU.
//!
//! It shares nothing with the library but the inputs: it walks each request's page ids itself and
//! indexes the NHD pool by hand, scores in f64, and takes the natural-log LSE directly.

use rayon::prelude::*;

use super::Batch;

/// (output `[num_qo_heads * head_dim]`, LSE `[num_qo_heads]`) of each request.
pub fn batch_decode(b: &Batch) -> Vec<(Vec<f64>, Vec<f64>)> {
    (0..b.batch_size())
        .into_par_iter()
        .map(|i| request(b, i))
        .collect()
}

fn request(b: &Batch, i: usize) -> (Vec<f64>, Vec<f64>) {
    let (hq, hkv, d) = (b.heads.num_qo_heads, b.heads.num_kv_heads, b.heads.head_dim);
    let page_size = b.desc.page_size;
    let n = b.kv_lens[i];
    let pages = &b.request_pages[i];
    let scale = 1.0 / (d as f64).sqrt();
    // Element offset of (token t, kv head) in the NHD pool [pages, page_size, kv_heads, dim].
    let at = |t: usize, kv_head: usize| {
        ((pages[t / page_size] * page_size + t % page_size) * hkv + kv_head) * d
    };

    let mut out = vec![0.0f64; hq * d];
    let mut lse = vec![f64::NEG_INFINITY; hq];
    if n == 0 {
        return (out, lse); // no key: zeros and -inf
    }
    for h in 0..hq {
        let kv_head = h / (hq / hkv);
        let q: Vec<f64> = b.q[(i * hq + h) * d..][..d]
            .iter()
            .map(|x| x.to_f64())
            .collect();
        let scores: Vec<f64> = (0..n)
            .map(|t| {
                let k = &b.k[at(t, kv_head)..][..d];
                scale * q.iter().zip(k).map(|(a, k)| a * k.to_f64()).sum::<f64>()
            })
            .collect();
        let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let mut sum = 0.0;
        let o = &mut out[h * d..(h + 1) * d];
        for (t, s) in scores.iter().enumerate() {
            let w = (s - max).exp();
            sum += w;
            for (o, v) in o.iter_mut().zip(&b.v[at(t, kv_head)..][..d]) {
                *o += w * v.to_f64();
            }
        }
        o.iter_mut().for_each(|x| *x /= sum);
        lse[h] = max + sum.ln();
    }
    (out, lse)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_key_returns_its_value() {
        let b = Batch::new(&[1], 3).unwrap();
        let (out, lse) = &batch_decode(&b)[0];
        let page = b.request_pages[0][0];
        let (hq, hkv, d) = (b.heads.num_qo_heads, b.heads.num_kv_heads, b.heads.head_dim);
        for h in 0..hq {
            let kv = h / (hq / hkv);
            let v = &b.v[(page * b.desc.page_size * hkv + kv) * d..][..d];
            for (o, v) in out[h * d..(h + 1) * d].iter().zip(v) {
                assert_eq!(*o, v.to_f64());
            }
            assert!(lse[h].is_finite());
        }
    }
}
