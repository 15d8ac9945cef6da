//! A small, fast, seedable random generator (SplitMix64) for test inputs, the demo and the
//! benchmarks: random data, never zeros, reproducible from a printed seed.

use rayon::prelude::*;

use crate::dtype::Element;

#[derive(Clone, Debug)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// A seed from the clock, for tests that want fresh inputs every run.
    pub fn clock_seed() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0x5eed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Uniform in [-a, a).
    pub fn sym(&mut self, a: f32) -> f32 {
        (2.0 * self.unit() - 1.0) * a
    }

    /// Uniform in 0..n.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }

    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            v.swap(i, self.below(i + 1));
        }
    }

    /// `n` values uniform in [-a, a), generated in parallel (large KV pools take seconds
    /// otherwise); the same seed gives the same values.
    pub fn vec<T: Element>(&mut self, n: usize, a: f32) -> Vec<T> {
        const CHUNK: usize = 1 << 16;
        let base = self.next_u64();
        let mut v = vec![T::default(); n];
        v.par_chunks_mut(CHUNK).enumerate().for_each(|(i, c)| {
            let mut r = SplitMix64::new(base ^ (i as u64).wrapping_mul(0xD6E8_FEB8_6659_FD93));
            for x in c {
                *x = T::from_f32(r.sym(a));
            }
        });
        v
    }
}
