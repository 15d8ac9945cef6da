//! The built-in attention variants as benchmark flags, shared by `bench decode` and `bench
//! prefill` (issue 6 measures each against plain attention): the flags, the variant they make
//! (with its random run-time tensors), and how a report names it.

use flashinfer::layout::HeadConfig;
use flashinfer::random::SplitMix64;
use flashinfer::variant::{alibi_slopes, Rope, Variant};

/// Flags of the built-in variants (definitions in `flashinfer::variant`); any combination.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct VariantArgs {
    /// Logits soft cap C (Gemma 2 uses 50): each logit x becomes C tanh(x / C). The random inputs'
    /// logits are small (|x| well below 1), so a C near 1 is needed for the cap to change the
    /// result (and the check to see it).
    // Negative numbers are taken as values, so that `--softcap -1` gets the library's error
    // rather than clap's "unexpected argument".
    #[arg(long, value_name = "C", allow_negative_numbers = true)]
    pub softcap: Option<f32>,
    /// Sliding window (window_left, inclusive): a query at position p sees the keys at
    /// positions p - N and later. An N of kv_len - 1 or more keeps every key (the variant's cost
    /// alone); a smaller N also skips work.
    #[arg(long, value_name = "N", allow_negative_numbers = true, value_parser = parse_window)]
    pub window: Option<usize>,
    /// ALiBi with the standard geometric slopes of the query heads.
    #[arg(long)]
    pub alibi: bool,
    /// Attention sinks: one random logit per query head, uniform in [0, 8) (e^8 weighs as much as
    /// about 3000 keys, so a sink changes the result visibly).
    #[arg(long)]
    pub sinks: bool,
    /// Fused RoPE (the default base 1e4, scale 1): each request's keys start at a random offset
    /// in [0, 1000); the kernel rotates q and every key as it reads them.
    #[arg(long)]
    pub rope: bool,
}

/// `--window N`: a key count, so a negative one gets a message saying so (not clap's "invalid
/// digit").
fn parse_window(s: &str) -> Result<usize, String> {
    match s.trim().parse::<i64>() {
        Ok(n) if n < 0 => Err(format!(
            "window_left {n} is negative: it counts the keys a query sees to its left"
        )),
        _ => s
            .trim()
            .parse()
            .map_err(|_| format!("`{s}` is not a key count")),
    }
}

impl VariantArgs {
    /// Whether any variant is on (plain attention otherwise).
    pub fn any(&self) -> bool {
        self.softcap.is_some() || self.window.is_some() || self.alibi || self.sinks || self.rope
    }

    /// Checks the flags for `heads` and a batch of `batch` requests without drawing from the
    /// inputs' generator: the benchmarks call this before they open the GPU, so a bad flag is
    /// reported first.
    pub fn check(&self, heads: HeadConfig, batch: usize) -> Result<(), String> {
        self.build(heads, batch, &mut SplitMix64::new(0))
            .map(|_| ())
    }

    /// The variant of these flags for a batch of `batch` requests, its random tensors drawn from
    /// `rng` (RoPE offsets first, then sinks: a run with only --rope draws what it always drew).
    /// Checked with the library's validation (a soft cap that is not positive, say, is its typed
    /// error, as text).
    pub fn build(
        &self,
        heads: HeadConfig,
        batch: usize,
        rng: &mut SplitMix64,
    ) -> Result<VariantValues, String> {
        let rope_offsets = self
            .rope
            .then(|| (0..batch).map(|_| rng.below(1000) as i32).collect());
        let sinks = self
            .sinks
            .then(|| (0..heads.num_qo_heads).map(|_| 8.0 * rng.unit()).collect());
        let values = VariantValues {
            args: self.clone(),
            alibi_slopes: self.alibi.then(|| alibi_slopes(heads.num_qo_heads)),
            sinks,
            rope_offsets,
        };
        values
            .variant()
            .validate(&heads, Some(batch))
            .map_err(|e| e.to_string())?;
        Ok(values)
    }
}

/// A variant built from [`VariantArgs`]: the flags and the tensors they need, owned (a
/// [`Variant`] borrows them).
#[derive(Clone, Debug, Default)]
pub struct VariantValues {
    args: VariantArgs,
    alibi_slopes: Option<Vec<f32>>,
    sinks: Option<Vec<f32>>,
    /// `[batch]` under RoPE.
    rope_offsets: Option<Vec<i32>>,
}

impl VariantValues {
    /// The whole variant (what the CPU reference computes).
    pub fn variant(&self) -> Variant<'_> {
        Variant {
            logits_soft_cap: self.args.softcap,
            window_left: self.args.window,
            alibi_slopes: self.alibi_slopes.as_deref(),
            rope: self.args.rope.then(Rope::default),
            rope_offsets: self.rope_offsets.as_deref(),
            sinks: self.sinks.as_deref(),
        }
    }

    /// The variant without RoPE (decode's --rope-separate: a separate pass rotates q and K, the
    /// decode does the rest).
    pub fn without_rope(&self) -> Variant<'_> {
        Variant {
            rope: None,
            rope_offsets: None,
            ..self.variant()
        }
    }

    /// The variant of request `r` alone (its RoPE offset only), for checking one request.
    pub fn for_request(&self, r: usize) -> Variant<'_> {
        Variant {
            rope_offsets: self.rope_offsets.as_ref().map(|o| &o[r..r + 1]),
            ..self.variant()
        }
    }

    /// Per-request RoPE offsets (`None` without RoPE).
    pub fn rope_offsets(&self) -> Option<&[i32]> {
        self.rope_offsets.as_deref()
    }

    pub fn is_plain(&self) -> bool {
        self.variant().is_plain()
    }

    /// Whether a query's result depends on its position (RoPE, ALiBi, window), not only on the
    /// keys it sees.
    pub fn uses_positions(&self) -> bool {
        self.args.rope || self.args.alibi || self.args.window.is_some()
    }

    /// One line for the table, e.g. `variant cap_win (soft cap 30, window_left 1023)`.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(c) = self.args.softcap {
            parts.push(format!("soft cap {c}"));
        }
        if let Some(w) = self.args.window {
            parts.push(format!("window_left {w}"));
        }
        if self.args.alibi {
            parts.push("ALiBi slopes of the query heads".into());
        }
        if self.args.sinks {
            parts.push("random sinks in [0, 8)".into());
        }
        if self.args.rope {
            parts.push("RoPE base 1e4, offsets in [0, 1000)".into());
        }
        if parts.is_empty() {
            "variant plain".into()
        } else {
            format!("variant {} ({})", self.variant().key(), parts.join(", "))
        }
    }

    /// Fields of the JSON line: `"variant"` (the key, `plain` for none), and the soft cap and
    /// window (`null` when off).
    pub fn json(&self) -> String {
        let opt = |x: Option<String>| x.unwrap_or_else(|| "null".into());
        format!(
            ",\"variant\":\"{}\",\"softcap\":{},\"window_left\":{}",
            self.variant().key(),
            opt(self.args.softcap.map(|c| c.to_string())),
            opt(self.args.window.map(|w| w.to_string())),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn heads() -> HeadConfig {
        HeadConfig::new(8, 2, 64).unwrap()
    }

    #[test]
    fn no_flag_is_plain() {
        let v = VariantArgs::default()
            .build(heads(), 3, &mut SplitMix64::new(1))
            .unwrap();
        assert!(v.is_plain());
        assert_eq!(
            v.json(),
            ",\"variant\":\"plain\",\"softcap\":null,\"window_left\":null"
        );
    }

    #[test]
    fn every_flag_makes_its_part() {
        let args = VariantArgs {
            softcap: Some(30.0),
            window: Some(100),
            alibi: true,
            sinks: true,
            rope: true,
        };
        let v = args.build(heads(), 3, &mut SplitMix64::new(1)).unwrap();
        assert_eq!(v.variant().key(), "rope_cap_win_alibi_sink");
        assert_eq!(v.variant().alibi_slopes.unwrap().len(), 8);
        assert!(v
            .variant()
            .sinks
            .unwrap()
            .iter()
            .all(|&s| (0.0..8.0).contains(&s)));
        assert_eq!(v.rope_offsets().unwrap().len(), 3);
        assert_eq!(
            v.for_request(2).rope_offsets.unwrap(),
            &v.rope_offsets().unwrap()[2..]
        );
        assert_eq!(v.without_rope().key(), "cap_win_alibi_sink");
        assert!(v.json().contains("\"softcap\":30,\"window_left\":100"));
    }

    #[test]
    fn rope_draws_what_it_always_drew() {
        // --rope alone: the offsets are the first draws after the inputs, as before the other
        // flags existed, and adding --sinks draws after them.
        let only = VariantArgs {
            rope: true,
            ..Default::default()
        };
        let both = VariantArgs {
            sinks: true,
            ..only.clone()
        };
        let a = only.build(heads(), 4, &mut SplitMix64::new(7)).unwrap();
        let b = both.build(heads(), 4, &mut SplitMix64::new(7)).unwrap();
        assert_eq!(a.rope_offsets(), b.rope_offsets());
    }

    #[test]
    fn a_negative_window_is_refused() {
        assert_eq!(parse_window("1024"), Ok(1024));
        assert!(parse_window("-1").unwrap_err().contains("negative"));
        assert!(parse_window("x").is_err());
    }

    #[test]
    fn a_bad_soft_cap_is_the_librarys_error() {
        for c in [0.0, -1.0, f32::INFINITY] {
            let args = VariantArgs {
                softcap: Some(c),
                ..Default::default()
            };
            let e = args.build(heads(), 1, &mut SplitMix64::new(1)).unwrap_err();
            assert!(e.contains("logits_soft_cap"), "{e}");
        }
    }
}
