//! Host side of `FastDiv` (kernels/common.cuh): division by a run-time constant as a multiply-high
//! and a shift, exact for dividends below 2^31 (token positions are `i32`).

/// `(magic, shift)` such that `n / d == umulhi(n, magic) >> shift` for all `n < 2^31`; `magic = 0`
/// encodes `d = 1`.
pub fn fast_div_params(d: u32) -> (u32, u32) {
    assert!(d >= 1, "divisor must be positive");
    if d == 1 {
        return (0, 0);
    }
    let log2_ceil = 32 - (d - 1).leading_zeros(); // ceil(log2 d), >= 1
    let p = 31 + log2_ceil;
    let magic = (1u64 << p).div_ceil(d as u64);
    debug_assert!(magic <= u32::MAX as u64);
    (magic as u32, p - 32)
}

/// What the kernel computes, for tests.
#[cfg(test)]
pub fn fast_div(n: u32, (magic, shift): (u32, u32)) -> u32 {
    if magic == 0 {
        n
    } else {
        (((n as u64) * (magic as u64)) >> 32) as u32 >> shift
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_for_page_sizes_and_positions() {
        let mut ds: Vec<u32> = (1..=1024).collect();
        ds.extend([4093, 65536, 100_000, (1 << 30) + 7]);
        for d in ds {
            let params = fast_div_params(d);
            let mut n = 0u32;
            // Dense near zero, then geometric up to 2^31 - 1, plus the multiples of d and their
            // neighbours, where an off-by-one would show.
            while n < (1 << 31) - 1 {
                for m in [n, n.saturating_sub(1), n + 1] {
                    if m < (1 << 31) {
                        assert_eq!(fast_div(m, params), m / d, "{m} / {d}");
                    }
                }
                n = if n < 5000 { n + 1 } else { n + n / 97 + d };
            }
            let top = (1u32 << 31) - 1;
            assert_eq!(fast_div(top, params), top / d);
            assert_eq!(fast_div(top - top % d, params), top / d);
        }
    }
}
