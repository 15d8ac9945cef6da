//! Attention variants: what changes a score, which keys a query sees, and what the softmax adds,
//! on top of plain `softmax(q·k · sm_scale) v`.
//!
//! The built-ins (the paper's section 3.2.3; their exact definitions, which the CPU backend
//! implements in `reference::variant` and every kernel must match):
//!
//! - **RoPE** (Llama style, non-interleaved halves), applied to q and k before the dot product: the
//!   pair `(x[d], x[d + D/2])` of a vector at position `pos` is rotated by the angle
//!   `pos / rope_scale · rope_theta^(-2d / D)`. Positions: key `j` of a request is at
//!   `offset + j`, its query `i` at `offset + kv_len - qo_len + i` (`offset` per request, 0 by
//!   default), so a query sits at its own key's position.
//! - **Logits soft cap** `c` (Gemma 2, Grok): the natural logit `x = q·k · sm_scale` becomes
//!   `c · tanh(x / c)`.
//! - **ALiBi**: `x += slope[h] · (key position - query position)` (non-positive for causal
//!   attention), per query head `h`; [`alibi_slopes`] gives the standard geometric slopes.
//! - **Sliding window** `window_left`: a query at position `p` sees keys at positions
//!   `>= p - window_left` (inclusive, as in DESIGN.md), on top of the mask.
//! - **Attention sinks**: a per-head logit `sink[h]` (natural log) joins the softmax's denominator
//!   with no value: `o = Σ e^{x_j} v_j / (e^{sink} + Σ e^{x_j})`, and the returned LSE includes it.
//!
//! Order: RoPE, dot product and scale, soft cap, ALiBi, then the mask and the window.

use crate::error::{ensure, Result};
use crate::layout::HeadConfig;

/// Llama-style rotary embedding parameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rope {
    /// Base of the frequencies (Llama 2: 1e4, Llama 3: 5e5).
    pub theta: f32,
    /// Positions are divided by this (linear position interpolation); 1 = none.
    pub scale: f32,
}

impl Default for Rope {
    fn default() -> Self {
        Rope {
            theta: 1e4,
            scale: 1.0,
        }
    }
}

/// A combination of built-in variants with its run-time tensors. `Variant::default()` is plain
/// attention.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Variant<'a> {
    pub logits_soft_cap: Option<f32>,
    pub window_left: Option<usize>,
    /// `[num_qo_heads]`.
    pub alibi_slopes: Option<&'a [f32]>,
    pub rope: Option<Rope>,
    /// `[batch]` position of each request's first key (RoPE only); `None`: all 0.
    pub rope_offsets: Option<&'a [i32]>,
    /// `[num_qo_heads]` sink logits, natural log.
    pub sinks: Option<&'a [f32]>,
}

impl Variant<'_> {
    /// Plain attention.
    pub fn is_plain(&self) -> bool {
        *self == Variant::default()
    }

    /// A readable name of the combination (part of a kernel specialisation's key), e.g.
    /// `rope_cap_win_alibi_sink`, or `plain`.
    pub fn key(&self) -> String {
        let parts: Vec<&str> = [
            (self.rope.is_some(), "rope"),
            (self.logits_soft_cap.is_some(), "cap"),
            (self.window_left.is_some(), "win"),
            (self.alibi_slopes.is_some(), "alibi"),
            (self.sinks.is_some(), "sink"),
        ]
        .into_iter()
        .filter_map(|(on, name)| on.then_some(name))
        .collect();
        if parts.is_empty() {
            "plain".into()
        } else {
            parts.join("_")
        }
    }

    /// Checks the parameters and tensor lengths against the heads and, when it is known
    /// (`Some`), the batch size (the length of `rope_offsets`).
    pub fn validate(&self, heads: &HeadConfig, batch: Option<usize>) -> Result<()> {
        if let Some(c) = self.logits_soft_cap {
            ensure(c.is_finite() && c > 0.0, "logits_soft_cap", || {
                format!("{c} must be finite and positive")
            })?;
        }
        for (arg, t) in [("alibi_slopes", self.alibi_slopes), ("sinks", self.sinks)] {
            if let Some(t) = t {
                ensure(t.len() == heads.num_qo_heads, arg, || {
                    format!(
                        "has {} entries, one per query head ({}) expected",
                        t.len(),
                        heads.num_qo_heads
                    )
                })?;
                ensure(t.iter().all(|x| x.is_finite()), arg, || {
                    "must be finite".into()
                })?;
            }
        }
        if let Some(r) = self.rope {
            ensure(r.theta.is_finite() && r.theta > 1.0, "rope", || {
                format!("theta {} must be finite and above 1", r.theta)
            })?;
            ensure(r.scale.is_finite() && r.scale > 0.0, "rope", || {
                format!("scale {} must be finite and positive", r.scale)
            })?;
            ensure(heads.head_dim.is_multiple_of(2), "rope", || {
                format!("head_dim {} must be even", heads.head_dim)
            })?;
        }
        if let Some(o) = self.rope_offsets {
            ensure(self.rope.is_some(), "rope_offsets", || {
                "given without rope".into()
            })?;
            if let Some(batch) = batch {
                ensure(o.len() == batch, "rope_offsets", || {
                    format!("has {} entries, the batch has {batch} requests", o.len())
                })?;
            }
        }
        Ok(())
    }
}

/// Which built-in variants a kernel specialisation compiles in (the run-time values travel in the
/// kernel's parameters).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct VariantFlags {
    pub rope: bool,
    pub soft_cap: bool,
    pub alibi: bool,
    pub window: bool,
    pub sinks: bool,
}

impl VariantFlags {
    pub fn of(v: &Variant<'_>) -> Self {
        VariantFlags {
            rope: v.rope.is_some(),
            soft_cap: v.logits_soft_cap.is_some(),
            alibi: v.alibi_slopes.is_some(),
            window: v.window_left.is_some(),
            sinks: v.sinks.is_some(),
        }
    }
    pub fn is_plain(&self) -> bool {
        *self == VariantFlags::default()
    }
    /// Every switch on its own (the compile-only tier builds each).
    pub fn singles() -> [VariantFlags; 5] {
        let off = VariantFlags::default();
        [
            VariantFlags { rope: true, ..off },
            VariantFlags {
                soft_cap: true,
                ..off
            },
            VariantFlags { alibi: true, ..off },
            VariantFlags {
                window: true,
                ..off
            },
            VariantFlags { sinks: true, ..off },
        ]
    }
    /// Every switch on.
    pub fn all() -> VariantFlags {
        VariantFlags {
            rope: true,
            soft_cap: true,
            alibi: true,
            window: true,
            sinks: true,
        }
    }
    /// `_cap_alibi_win_sink`-style suffix of a specialisation's key; empty when plain (so plain
    /// kernels keep their names and cache entries).
    pub fn key_suffix(&self) -> String {
        [
            (self.rope, "_rope"),
            (self.soft_cap, "_cap"),
            (self.alibi, "_alibi"),
            (self.window, "_win"),
            (self.sinks, "_sink"),
        ]
        .into_iter()
        .filter_map(|(on, s)| on.then_some(s))
        .collect()
    }
    /// The `#define` lines that turn the variants on in a kernel's generated source.
    pub fn defines(&self) -> String {
        [
            (self.rope, "VARIANT_ROPE"),
            (self.soft_cap, "VARIANT_SOFTCAP"),
            (self.alibi, "VARIANT_ALIBI"),
            (self.window, "VARIANT_WINDOW"),
            (self.sinks, "VARIANT_SINKS"),
        ]
        .into_iter()
        .filter(|&(on, _)| on)
        .map(|(_, name)| format!("#define {name} 1\n"))
        .collect()
    }
}

/// The standard ALiBi slopes for `num_heads` heads: `2^(-8 (h + 1) / n)` for the largest power of
/// two `n <= num_heads`, then the odd multiples of the next power's slopes for the rest (as in the
/// ALiBi paper's reference code).
pub fn alibi_slopes(num_heads: usize) -> Vec<f32> {
    let n = if num_heads == 0 {
        return Vec::new();
    } else {
        1usize << (usize::BITS - 1 - num_heads.leading_zeros())
    };
    let base = |n: usize, h: usize| 2f64.powf(-8.0 * (h + 1) as f64 / n as f64);
    let mut s: Vec<f32> = (0..n).map(|h| base(n, h) as f32).collect();
    s.extend(
        (0..num_heads - n)
            .map(|i| base(2 * n, 2 * i) as f32)
            .collect::<Vec<_>>(),
    );
    s
}

/// Rotates `x` (`[head_dim]`, even) in place to position `pos`: Llama-style RoPE, the pair
/// `(x[d], x[d + D/2])` by the angle `pos / scale · theta^(-2d / D)`. Computed in f64 so that the
/// reference is exact to f32 rounding even at large positions.
pub fn rope_rotate(x: &mut [f32], pos: f64, rope: &Rope) {
    let half = x.len() / 2;
    for d in 0..half {
        let freq = (rope.theta as f64).powf(-2.0 * d as f64 / x.len() as f64);
        let angle = pos / rope.scale as f64 * freq;
        let (sin, cos) = angle.sin_cos();
        let (a, b) = (x[d] as f64, x[d + half] as f64);
        x[d] = (a * cos - b * sin) as f32;
        x[d + half] = (a * sin + b * cos) as f32;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_name_every_part() {
        assert_eq!(Variant::default().key(), "plain");
        let s = [0.5f32; 4];
        let v = Variant {
            logits_soft_cap: Some(30.0),
            alibi_slopes: Some(&s),
            rope: Some(Rope::default()),
            ..Default::default()
        };
        assert_eq!(v.key(), "rope_cap_alibi");
        assert!(!v.is_plain());
    }

    #[test]
    fn alibi_slopes_match_the_paper() {
        let s = alibi_slopes(8);
        assert!((s[0] - 0.5).abs() < 1e-7 && (s[7] - 1.0 / 256.0).abs() < 1e-9);
        // 12 heads: the 8 of n = 8, then 4 from n = 16 at odd positions (2^-0.5, 2^-1.5, ...).
        let s = alibi_slopes(12);
        assert_eq!(s.len(), 12);
        assert!((s[8] - 2f32.powf(-0.5)).abs() < 1e-6);
        assert!((s[9] - 2f32.powf(-1.5)).abs() < 1e-6);
    }

    #[test]
    fn rope_is_a_rotation_and_zero_position_is_identity() {
        let rope = Rope::default();
        let x: Vec<f32> = (0..16).map(|i| i as f32 * 0.3 - 2.0).collect();
        let mut y = x.clone();
        rope_rotate(&mut y, 0.0, &rope);
        assert_eq!(x, y);
        rope_rotate(&mut y, 1234.0, &rope);
        let n = |v: &[f32]| v.iter().map(|a| a * a).sum::<f32>();
        assert!((n(&x) - n(&y)).abs() < 1e-3);
        // Relative: <R(p) q, R(p') k> depends on p - p' only.
        let (q, k): (Vec<f32>, Vec<f32>) = (x.clone(), x.iter().rev().copied().collect());
        let dot_at = |p: f64, pk: f64| {
            let (mut a, mut b) = (q.clone(), k.clone());
            rope_rotate(&mut a, p, &rope);
            rope_rotate(&mut b, pk, &rope);
            a.iter().zip(&b).map(|(x, y)| x * y).sum::<f32>()
        };
        assert!((dot_at(10.0, 3.0) - dot_at(107.0, 100.0)).abs() < 1e-3);
    }

    #[test]
    fn validation_names_the_argument() {
        let h = HeadConfig::new(4, 2, 8).unwrap();
        let s = [0.1f32; 3];
        let v = Variant {
            alibi_slopes: Some(&s),
            ..Default::default()
        };
        assert!(v
            .validate(&h, Some(1))
            .unwrap_err()
            .to_string()
            .contains("alibi_slopes"));
        let v = Variant {
            logits_soft_cap: Some(-1.0),
            ..Default::default()
        };
        assert!(v
            .validate(&h, Some(1))
            .unwrap_err()
            .to_string()
            .contains("logits_soft_cap"));
        let o = [0i32; 2];
        let v = Variant {
            rope_offsets: Some(&o),
            ..Default::default()
        };
        assert!(v
            .validate(&h, Some(2))
            .unwrap_err()
            .to_string()
            .contains("rope_offsets"));
    }
}
