//! Event timing with the L2 flushed before every run.

use std::sync::Arc;

use flashinfer::cuda::{sys, CudaSlice, Device, DriverError};

/// Bytes written between runs to evict the 60 MB L2 (DESIGN.md: a 256 MB write).
const FLUSH_BYTES: usize = 256 << 20;
/// DESIGN.md's other method: runs rotate over copies of the inputs that together exceed this
/// (the flush's size, over 4 x the 60 MB L2), so no run finds its inputs in L2.
pub const ROTATE_BYTES: usize = FLUSH_BYTES;

/// How the L2 is kept cold between timed runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Flush {
    /// A 256 MB write before each run. It leaves L2 full of dirty lines, which the timed kernel
    /// then writes back to DRAM as its reads evict them (up to 60 MB of extra traffic).
    Write,
    /// No flush: the caller rotates over copies of its inputs of `ROTATE_BYTES` or more in all
    /// (at least two), and an untimed call runs before each timed one.
    Rotate,
}

impl Flush {
    pub fn name(self) -> &'static str {
        match self {
            Flush::Write => "write",
            Flush::Rotate => "rotate",
        }
    }
}

pub struct Timer {
    dev: Arc<Device>,
    flush: Option<CudaSlice<u8>>,
}

/// Timing summary in microseconds.
#[derive(Clone, Copy, Debug)]
pub struct Stats {
    pub median_us: f64,
    pub min_us: f64,
    pub max_us: f64,
    pub runs: usize,
}

impl Timer {
    /// A timer that writes 256 MB before each run.
    pub fn new(dev: &Arc<Device>) -> Result<Self, String> {
        Self::with_flush(dev, Flush::Write)
    }

    /// A timer with the given flush (with `Flush::Rotate`, the timed closure rotates its inputs).
    pub fn with_flush(dev: &Arc<Device>, flush: Flush) -> Result<Self, String> {
        let flush = match flush {
            Flush::Write => Some(
                dev.stream()
                    .alloc_zeros::<u8>(FLUSH_BYTES)
                    .map_err(|e| e.to_string())?,
            ),
            Flush::Rotate => None,
        };
        Ok(Self {
            dev: dev.clone(),
            flush,
        })
    }

    /// Runs `f` `warmup` times, then `runs` times each after an L2 flush (if this timer writes
    /// one), timing only `f`.
    pub fn time(
        &mut self,
        warmup: usize,
        runs: usize,
        mut f: impl FnMut() -> Result<(), String>,
    ) -> Result<Stats, String> {
        let e = |x: DriverError| x.to_string();
        let stream = self.dev.stream().clone();
        let ctx = self.dev.context().clone();
        for _ in 0..warmup {
            f()?;
        }
        let flags = Some(sys::CUevent_flags::CU_EVENT_DEFAULT);
        let mut times = Vec::with_capacity(runs);
        for _ in 0..runs {
            match &mut self.flush {
                Some(flush) => stream.memset_zeros(flush).map_err(e)?,
                // An untimed run (on the next copy) keeps the GPU busy while the timed one is
                // enqueued, as the flush does: otherwise the host's launch time is timed too.
                None => f()?,
            }
            let start = ctx.new_event(flags).map_err(e)?;
            let end = ctx.new_event(flags).map_err(e)?;
            start.record(&stream).map_err(e)?;
            f()?;
            end.record(&stream).map_err(e)?;
            times.push(start.elapsed_ms(&end).map_err(e)? as f64 * 1e3);
        }
        times.sort_by(f64::total_cmp);
        Ok(Stats {
            median_us: times[times.len() / 2],
            min_us: times[0],
            max_us: times[times.len() - 1],
            runs,
        })
    }
}
