//! Event timing with the L2 flushed before every run.

use std::sync::Arc;

use flashinfer::cuda::{sys, CudaSlice, Device, DriverError};

/// Bytes written between runs to evict the 60 MB L2 (DESIGN.md: a 256 MB write).
const FLUSH_BYTES: usize = 256 << 20;

pub struct Timer {
    dev: Arc<Device>,
    flush: CudaSlice<u8>,
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
    pub fn new(dev: &Arc<Device>) -> Result<Self, String> {
        let flush = dev
            .stream()
            .alloc_zeros::<u8>(FLUSH_BYTES)
            .map_err(|e| e.to_string())?;
        Ok(Self {
            dev: dev.clone(),
            flush,
        })
    }

    /// Runs `f` `warmup` times, then `runs` times each after an L2 flush, timing only `f`.
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
            stream.memset_zeros(&mut self.flush).map_err(e)?;
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
