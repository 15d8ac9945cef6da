//! The attention variant of a decode op ([`crate::variant`] has the definitions): which switches
//! its kernel compiles in, their run-time values, and the tensors the kernel reads for them.
//!
//! A decode request has one query, at position `kv_len - 1` (bottom-right alignment), so:
//! - a sliding window is one contiguous range of keys, `[kv_len - 1 - window_left, kv_len)`:
//!   `plan()` schedules only those keys ([`DecodeVariant::window_starts`]) and the kernels have no
//!   window code (nor a kernel specialisation for it); a split request's chunks then cover only
//!   the window, so no block is spent on keys that are masked anyway;
//! - RoPE, soft cap, ALiBi and sinks are compiled in (kernels/decode_variant.cuh). ALiBi and RoPE
//!   need the query's position, i.e. the request's `kv_len`, which a chunk of a split request
//!   does not know, and RoPE each request's `rope_offsets` entry: `plan()` copies both to the
//!   device ([`DecodeVariant::upload_requests`]).
//!
//! The offsets are per request, so they change with the batch: `set_variant` keeps them on the
//! host and every `plan()` checks them against its batch and uploads them beside the lengths, into
//! one buffer whose address only changes when a plan needs more entries (never in CUDA-graph mode,
//! where it is sized for the largest batch once). A `set_variant` that changes only the offsets
//! keeps the kernel and every device buffer ([`DecodeVariant::same_except_offsets`]), so a captured
//! graph stays valid across steps whose batches differ.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream};

use crate::cuda::DevSlice;
use crate::error::{ensure, Result};
use crate::layout::HeadConfig;
use crate::variant::{Rope, Variant, VariantFlags};

/// Positions the kernels may compute past a request's last key (for rows of a tile past its end,
/// which are masked): RoPE's `offset + kv_len` must stay this far below `i32::MAX`.
const POSITION_SLACK: usize = 1 << 16;

/// A decode op's variant: plain by default.
#[derive(Default)]
pub(super) struct DecodeVariant {
    /// What the kernel compiles in: RoPE, soft cap, ALiBi, sinks (`window` is always false:
    /// planned).
    pub kernel_flags: VariantFlags,
    soft_cap: Option<f32>,
    window_left: Option<usize>,
    rope: Option<Rope>,
    /// Host copies of the per-head tensors (to recognise a call that changes only the offsets).
    alibi_slopes: Option<Vec<f32>>,
    sinks: Option<Vec<f32>>,
    /// The offsets of the last `set_variant` (`None`: all 0), checked and uploaded by `plan()`.
    rope_offsets: Option<Vec<i32>>,
    /// `[2 * num_qo_heads]`: the ALiBi slopes, then the sink logits, both times log2(e).
    per_head: Option<CudaSlice<f32>>,
    /// Per request of the plan (ALiBi, RoPE): `kv_len` in entries `[0, cap)` and, under RoPE,
    /// `rope_offsets` in `[cap, 2 cap)`, where `cap` is [`DecodeVariant::request_capacity`].
    /// Rewritten by every `plan()`.
    requests: Option<CudaSlice<i32>>,
}

/// The variant's fields of the kernel's parameter block (`DecodeParams` in decode_common.cuh).
pub(super) struct VariantParams {
    pub softcap_in: f32,
    pub softcap_out: f32,
    pub alibi_slopes_log2: u64,
    pub sinks_log2: u64,
    pub kv_lens: u64,
    pub rope_offsets: u64,
    pub rope_rcp_scale: f32,
    pub rope_log2_theta: f32,
}

/// Checks everything of `variant` that a decode op can check before it knows the batch.
fn validate(heads: HeadConfig, variant: &Variant<'_>) -> Result<()> {
    variant.validate(&heads, None)?;
    if let Some(w) = variant.window_left {
        ensure(w < i32::MAX as usize, "window_left", || {
            format!("{w} exceeds i32::MAX")
        })?;
    }
    if let Some(o) = variant.rope_offsets {
        if let Some((i, x)) = o.iter().enumerate().find(|(_, &x)| x < 0) {
            return Err(crate::error::invalid(
                "rope_offsets",
                format!("rope_offsets[{i}] = {x}: positions must be non-negative"),
            ));
        }
    }
    Ok(())
}

impl DecodeVariant {
    /// Validates `variant` for a decode op of `heads` (before anything is compiled or copied) and
    /// copies its per-head tensors to the device, once.
    pub fn new(stream: &Arc<CudaStream>, heads: HeadConfig, variant: &Variant<'_>) -> Result<Self> {
        validate(heads, variant)?;
        let flags = VariantFlags::of(variant);
        let per_head = if flags.alibi || flags.sinks {
            let log2e = std::f32::consts::LOG2_E;
            let n = heads.num_qo_heads;
            let mut host = vec![0f32; 2 * n];
            for (part, values) in host
                .chunks_mut(n)
                .zip([variant.alibi_slopes, variant.sinks])
            {
                if let Some(values) = values {
                    for (d, &x) in part.iter_mut().zip(values) {
                        *d = x * log2e;
                    }
                }
            }
            Some(stream.clone_htod(&host)?)
        } else {
            None
        };
        Ok(Self {
            kernel_flags: VariantFlags {
                window: false,
                ..flags
            },
            soft_cap: variant.logits_soft_cap,
            window_left: variant.window_left,
            rope: variant.rope,
            alibi_slopes: variant.alibi_slopes.map(<[f32]>::to_vec),
            sinks: variant.sinks.map(<[f32]>::to_vec),
            rope_offsets: variant.rope_offsets.map(<[i32]>::to_vec),
            per_head,
            requests: None,
        })
    }

    /// Whether `variant` differs from this one in `rope_offsets` at most: then it needs neither a
    /// new kernel nor new per-head tensors, only [`DecodeVariant::set_offsets`].
    pub fn same_except_offsets(&self, variant: &Variant<'_>) -> bool {
        let flags = VariantFlags::of(variant);
        VariantFlags {
            window: false,
            ..flags
        } == self.kernel_flags
            && variant.logits_soft_cap == self.soft_cap
            && variant.window_left == self.window_left
            && variant.rope == self.rope
            && variant.alibi_slopes == self.alibi_slopes.as_deref()
            && variant.sinks == self.sinks.as_deref()
    }

    /// Replaces the offsets (after [`DecodeVariant::same_except_offsets`]): validates `variant`
    /// and keeps every device buffer; the next `plan()` uploads the new offsets.
    pub fn set_offsets(&mut self, heads: HeadConfig, variant: &Variant<'_>) -> Result<()> {
        validate(heads, variant)?;
        self.rope_offsets = variant.rope_offsets.map(<[i32]>::to_vec);
        Ok(())
    }

    /// Without a sliding window `None`; with one, for each request the number of its first keys
    /// that its query does not see (those before `kv_len - 1 - window_left`).
    pub fn window_starts(&self, kv_lens: &[usize]) -> Option<Vec<usize>> {
        let w = self.window_left?;
        Some(kv_lens.iter().map(|&l| l.saturating_sub(w + 1)).collect())
    }

    /// Checks the RoPE offsets against a plan's requests: one per request, and every position
    /// (`offset + kv_len`, plus the slack the kernels compute past the end) inside `i32`.
    pub fn check_batch(&self, kv_lens: &[usize]) -> Result<()> {
        if self.rope.is_none() {
            return Ok(());
        }
        let batch = kv_lens.len();
        if let Some(o) = &self.rope_offsets {
            ensure(o.len() == batch, "rope_offsets", || {
                format!(
                    "has {} entries, the batch has {batch} requests (call set_variant for this \
                     step)",
                    o.len()
                )
            })?;
        }
        let limit = i32::MAX as usize - POSITION_SLACK;
        for (i, &len) in kv_lens.iter().enumerate() {
            let off = self.rope_offsets.as_ref().map_or(0, |o| o[i] as usize);
            ensure(off + len <= limit, "rope_offsets", || {
                format!(
                    "request {i}: offset {off} + kv_len {len} exceeds {limit}, the largest \
                     position decode supports"
                )
            })?;
        }
        Ok(())
    }

    /// Whether the kernel reads the per-request buffer.
    fn reads_requests(&self) -> bool {
        self.kernel_flags.alibi || self.kernel_flags.rope
    }

    /// Requests the per-request buffer `b` has room for.
    fn request_capacity(&self, b: &CudaSlice<i32>) -> usize {
        if self.kernel_flags.rope {
            b.len() / 2
        } else {
            b.len()
        }
    }

    /// Copies the requests' lengths (and, under RoPE, their offsets) to the device when the kernel
    /// reads them, into a buffer with room for at least `capacity` requests. Ordered on `stream`
    /// like the plan's own copy, so a CUDA graph captured with the buffer reads each plan's values.
    /// `plan()` ran [`DecodeVariant::check_batch`] on `kv_lens` first.
    pub fn upload_requests(
        &mut self,
        stream: &Arc<CudaStream>,
        kv_lens: &[usize],
        capacity: usize,
    ) -> Result<()> {
        if !self.reads_requests() {
            return Ok(());
        }
        let capacity = capacity.max(kv_lens.len()).max(1);
        let per_request = if self.kernel_flags.rope { 2 } else { 1 };
        let buf = match self.requests.take() {
            Some(b) if self.request_capacity(&b) >= capacity => b,
            _ => stream.alloc_zeros::<i32>(per_request * capacity)?,
        };
        let cap = self.request_capacity(&buf);
        let buf = self.requests.insert(buf);
        if kv_lens.is_empty() {
            return Ok(());
        }
        // plan() checked every length (and offset + length) against i32::MAX.
        let mut host: Vec<i32> = kv_lens.iter().map(|&l| l as i32).collect();
        if self.kernel_flags.rope {
            host.resize(cap, 0);
            match &self.rope_offsets {
                Some(o) => host.extend_from_slice(o),
                None => host.resize(cap + kv_lens.len(), 0),
            }
        }
        stream.memcpy_htod(&host, buf)?;
        Ok(())
    }

    /// The kernel's variant parameters for softmax scale `sm_scale` and `num_qo_heads` heads.
    /// Errors if the kernel reads per-request values that no plan uploaded.
    pub fn params(
        &self,
        stream: &CudaStream,
        sm_scale: f32,
        num_qo_heads: usize,
    ) -> Result<VariantParams> {
        let log2e = std::f32::consts::LOG2_E;
        let (alibi_slopes_log2, sinks_log2) = self.per_head.as_ref().map_or((0, 0), |b| {
            let base = DevSlice::new(b, stream).ptr();
            (base, base + (num_qo_heads * 4) as u64)
        });
        ensure(
            !self.reads_requests() || self.requests.is_some(),
            "self",
            || "run() called before plan()".into(),
        )?;
        let (kv_lens, rope_offsets) = self.requests.as_ref().map_or((0, 0), |b| {
            let base = DevSlice::new(b, stream).ptr();
            let offsets = if self.kernel_flags.rope {
                base + (self.request_capacity(b) * 4) as u64
            } else {
                0
            };
            (base, offsets)
        });
        let rope = self.rope.unwrap_or_default();
        Ok(VariantParams {
            softcap_in: self.soft_cap.map_or(0.0, |c| sm_scale / c),
            softcap_out: self.soft_cap.map_or(0.0, |c| c * log2e),
            alibi_slopes_log2,
            sinks_log2,
            kv_lens,
            rope_offsets,
            rope_rcp_scale: 1.0 / rope.scale,
            rope_log2_theta: rope.theta.log2(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_window_hides_the_keys_before_it() {
        let v = DecodeVariant {
            window_left: Some(3),
            ..Default::default()
        };
        // Keys at positions >= kv_len - 1 - 3 stay: 4 keys (or all of a shorter request).
        assert_eq!(
            v.window_starts(&[0, 1, 4, 5, 100]),
            Some(vec![0, 0, 0, 1, 96])
        );
        let v = DecodeVariant {
            window_left: Some(0),
            ..Default::default()
        };
        assert_eq!(v.window_starts(&[0, 1, 7]), Some(vec![0, 0, 6]));
        assert_eq!(DecodeVariant::default().window_starts(&[5]), None);
    }

    /// A RoPE variant without its device buffers (what `new` builds, minus the copies).
    fn rope_variant(offsets: Option<Vec<i32>>) -> DecodeVariant {
        DecodeVariant {
            kernel_flags: VariantFlags {
                rope: true,
                ..Default::default()
            },
            rope: Some(Rope::default()),
            rope_offsets: offsets,
            ..Default::default()
        }
    }

    #[test]
    fn rope_offsets_must_cover_the_batch_and_keep_positions_in_i32() {
        let v = rope_variant(Some(vec![0, 5]));
        assert!(v.check_batch(&[3, 4]).is_ok());
        let e = v.check_batch(&[3]).unwrap_err().to_string();
        assert!(e.contains("rope_offsets") && e.contains("2 entries"), "{e}");
        let big = i32::MAX - POSITION_SLACK as i32;
        let v = rope_variant(Some(vec![big - 10]));
        assert!(v.check_batch(&[10]).is_ok());
        let e = v.check_batch(&[11]).unwrap_err().to_string();
        assert!(e.contains("rope_offsets") && e.contains("request 0"), "{e}");
        // No offsets: every request starts at 0, whatever the batch.
        assert!(rope_variant(None).check_batch(&[1, 2, 3]).is_ok());
        // Without RoPE nothing is checked.
        assert!(DecodeVariant::default().check_batch(&[usize::MAX]).is_ok());
    }

    #[test]
    fn only_an_offsets_change_keeps_the_kernel_and_buffers() {
        let v = rope_variant(Some(vec![1, 2]));
        let o = [7, 8, 9];
        let same = Variant {
            rope: Some(Rope::default()),
            rope_offsets: Some(&o),
            ..Default::default()
        };
        assert!(v.same_except_offsets(&same));
        assert!(v.same_except_offsets(&Variant {
            rope_offsets: None,
            ..same
        }));
        for other in [
            Variant {
                rope: Some(Rope {
                    theta: 5e5,
                    scale: 1.0,
                }),
                ..same
            },
            Variant {
                logits_soft_cap: Some(30.0),
                ..same
            },
            Variant {
                window_left: Some(4),
                ..same
            },
            Variant::default(),
        ] {
            assert!(!v.same_except_offsets(&other), "{other:?}");
        }
        let slopes = [0.5f32, 0.25];
        let mut a = DecodeVariant {
            kernel_flags: VariantFlags {
                alibi: true,
                ..Default::default()
            },
            alibi_slopes: Some(slopes.to_vec()),
            ..Default::default()
        };
        let with = Variant {
            alibi_slopes: Some(&slopes),
            ..Default::default()
        };
        assert!(a.same_except_offsets(&with));
        let other = [0.5f32, 0.125];
        assert!(!a.same_except_offsets(&Variant {
            alibi_slopes: Some(&other),
            ..Default::default()
        }));
        // Negative offsets are refused by set_offsets too, naming the argument.
        let heads = HeadConfig::new(2, 1, 64).unwrap();
        let bad = [3, -1];
        a = rope_variant(None);
        let e = a
            .set_offsets(
                heads,
                &Variant {
                    rope: Some(Rope::default()),
                    rope_offsets: Some(&bad),
                    ..Default::default()
                },
            )
            .unwrap_err()
            .to_string();
        assert!(e.contains("rope_offsets[1] = -1"), "{e}");
        assert_eq!(
            a.rope_offsets, None,
            "a rejected call keeps the old offsets"
        );
    }
}
