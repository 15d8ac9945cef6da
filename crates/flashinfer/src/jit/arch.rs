//! GPU architectures as NVRTC names them. We always compile a CUBIN for the exact architecture of
//! the device, never PTX: no driver-side JIT at load time, and arch-specific features (wgmma, TMA
//! on sm_90a) are available.

use crate::error::{invalid, Error};

/// A compute capability, e.g. `Arch { major: 9, minor: 0 }` for the H100/H200.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Arch {
    pub major: u32,
    pub minor: u32,
}

impl Arch {
    /// Ampere A100.
    pub const SM80: Arch = Arch { major: 8, minor: 0 };
    /// Hopper H100/H200, compiled as `sm_90a`.
    pub const SM90: Arch = Arch { major: 9, minor: 0 };

    pub const fn new(major: u32, minor: u32) -> Arch {
        Arch { major, minor }
    }

    /// Whether this architecture has an arch-specific (`a`) variant with features that do not
    /// carry forward to later GPUs (wgmma and setmaxnreg on 9.0, tcgen05 on 10.x, ...). We target
    /// it because a CUBIN always runs on exactly the device it was compiled for anyway.
    pub fn has_arch_specific_variant(self) -> bool {
        matches!(
            (self.major, self.minor),
            (9, 0) | (10, 0) | (10, 3) | (12, 0) | (12, 1)
        )
    }

    fn suffix(self) -> &'static str {
        if self.has_arch_specific_variant() {
            "a"
        } else {
            ""
        }
    }

    /// The real architecture NVRTC compiles for: `sm_80`, `sm_90a`, `sm_100a`, ...
    pub fn sm_name(self) -> String {
        format!("sm_{}{}{}", self.major, self.minor, self.suffix())
    }

    /// The matching virtual architecture: `compute_80`, `compute_90a`, ...
    pub fn compute_name(self) -> String {
        format!("compute_{}{}{}", self.major, self.minor, self.suffix())
    }

    /// The NVRTC option that selects this architecture (always a real one, so we get a CUBIN).
    pub fn nvrtc_option(self) -> String {
        format!("--gpu-architecture={}", self.sm_name())
    }
}

impl std::fmt::Display for Arch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.sm_name())
    }
}

impl std::str::FromStr for Arch {
    type Err = Error;

    /// Accepts `sm_90a`, `sm_90`, `compute_90`, `90`, `9.0` and `10.0`-style names.
    fn from_str(s: &str) -> Result<Arch, Error> {
        let bad = || {
            invalid(
                "arch",
                format!("`{s}` is not an architecture (expected e.g. sm_80, sm_90a, 9.0)"),
            )
        };
        let t = s.trim();
        if let Some((major, minor)) = t.split_once('.') {
            let major = major.parse().map_err(|_| bad())?;
            let minor = minor.parse().map_err(|_| bad())?;
            return Ok(Arch::new(major, minor));
        }
        let digits = t
            .strip_prefix("sm_")
            .or_else(|| t.strip_prefix("compute_"))
            .unwrap_or(t);
        let digits = digits.strip_suffix('a').unwrap_or(digits);
        if digits.len() < 2 || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        // The last digit is the minor version: 80 -> 8.0, 100 -> 10.0, 121 -> 12.1.
        let (major, minor) = digits.split_at(digits.len() - 1);
        Ok(Arch::new(
            major.parse().map_err(|_| bad())?,
            minor.parse().map_err(|_| bad())?,
        ))
    }
}
