//! Per-request custom attention masks, bit-packed.
//!
//! Request i's mask is row-major `[qo_len_i, kv_len_i]`, packed little-endian (bit `b` of a byte is
//! element `8*byte + b`), starting at byte `mask_indptr[i]`, each request padded to whole bytes.
//! A set bit means "this query sees this key".

use super::validate_indptr;
use crate::error::{ensure, Result};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CustomMask {
    bits: Vec<u8>,
    mask_indptr: Vec<i32>,
    qo_lens: Vec<usize>,
    kv_lens: Vec<usize>,
}

impl CustomMask {
    /// Bytes request `(qo_len, kv_len)` takes.
    pub fn bytes_for(qo_len: usize, kv_len: usize) -> usize {
        (qo_len * kv_len).div_ceil(8)
    }

    /// Validates packed bits against the requests' lengths.
    pub fn from_packed(
        bits: &[u8],
        mask_indptr: &[i32],
        qo_lens: &[usize],
        kv_lens: &[usize],
    ) -> Result<Self> {
        ensure(qo_lens.len() == kv_lens.len(), "kv_lens", || {
            format!(
                "has {} requests, qo_lens has {}",
                kv_lens.len(),
                qo_lens.len()
            )
        })?;
        // No capacity bound here: a `bits` buffer too short for consistent offsets is the fault
        // of `custom_mask`, reported below, not of `mask_indptr`.
        validate_indptr("mask_indptr", mask_indptr, Some(qo_lens.len()), None)?;
        for i in 0..qo_lens.len() {
            let have = (mask_indptr[i + 1] - mask_indptr[i]) as usize;
            let want = Self::bytes_for(qo_lens[i], kv_lens[i]);
            ensure(have == want, "mask_indptr", || {
                format!(
                    "request {i} has {have} mask bytes; qo_len {} x kv_len {} needs {want}",
                    qo_lens[i], kv_lens[i]
                )
            })?;
        }
        let total = *mask_indptr.last().unwrap() as usize;
        ensure(bits.len() == total, "custom_mask", || {
            format!("has {} bytes, mask_indptr ends at {total}", bits.len())
        })?;
        Ok(Self {
            bits: bits.to_vec(),
            mask_indptr: mask_indptr.to_vec(),
            qo_lens: qo_lens.to_vec(),
            kv_lens: kv_lens.to_vec(),
        })
    }

    /// Packs per-request boolean masks (each row-major `[qo_len, kv_len]`).
    pub fn pack(masks: &[Vec<bool>], qo_lens: &[usize], kv_lens: &[usize]) -> Result<Self> {
        ensure(masks.len() == qo_lens.len(), "masks", || {
            format!(
                "has {} requests, qo_lens has {}",
                masks.len(),
                qo_lens.len()
            )
        })?;
        let mut bits = Vec::new();
        let mut indptr = vec![0i32];
        for (i, m) in masks.iter().enumerate() {
            let (q, k) = (qo_lens[i], *kv_lens.get(i).unwrap_or(&0));
            ensure(m.len() == q * k, "masks", || {
                format!(
                    "request {i} has {} entries, expected qo_len {q} x kv_len {k}",
                    m.len()
                )
            })?;
            let start = bits.len();
            bits.resize(start + Self::bytes_for(q, k), 0u8);
            for (e, &on) in m.iter().enumerate() {
                if on {
                    bits[start + e / 8] |= 1 << (e % 8);
                }
            }
            indptr.push(bits.len() as i32);
        }
        Self::from_packed(&bits, &indptr, qo_lens, kv_lens)
    }

    pub fn bits(&self) -> &[u8] {
        &self.bits
    }
    pub fn mask_indptr(&self) -> &[i32] {
        &self.mask_indptr
    }
    pub fn batch_size(&self) -> usize {
        self.qo_lens.len()
    }
    pub fn qo_lens(&self) -> &[usize] {
        &self.qo_lens
    }
    pub fn kv_lens(&self) -> &[usize] {
        &self.kv_lens
    }

    /// Whether query `q` of request `i` sees key `k`.
    pub fn visible(&self, i: usize, q: usize, k: usize) -> bool {
        let e = q * self.kv_lens[i] + k;
        let byte = self.bits[self.mask_indptr[i] as usize + e / 8];
        (byte >> (e % 8)) & 1 == 1
    }
}
