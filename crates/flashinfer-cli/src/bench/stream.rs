//! `flashinfer bench stream`: the bandwidth floor, measured. A kernel that only reads N bytes
//! (16-byte loads, no attention), timed exactly as the decode benchmark times a decode (same
//! flushes, same events), so that a decode's time can be set against what merely reading its KV
//! bytes costs on this GPU under the same method (docs/perf-notes.md, session 12).

use std::sync::Arc;

use clap::Args;
use flashinfer::cuda::{launch, DevSlice, Device, LaunchConfig};
use flashinfer::jit::KernelSpec;
use flashinfer::random::SplitMix64;

use super::timing::{Flush, Timer, ROTATE_BYTES};

#[derive(Debug, Args)]
pub struct StreamArgs {
    /// Bytes to read per run (rounded down to 16-byte vectors), e.g. 134217728 for the K/V of
    /// 1 x 32768 at 8 KV heads, d128, bf16
    #[arg(long)]
    pub bytes: u64,
    /// The order in which the blocks read
    #[arg(long, value_enum, default_value_t = Order::Grid)]
    pub mode: Order,
    /// Blocks per SM (one wave: the grid is SMs x this)
    #[arg(long, default_value_t = 4)]
    pub blocks_per_sm: u32,
    /// Threads per block
    #[arg(long, default_value_t = 256)]
    pub threads: u32,
    /// `--mode dynamic`: bytes a block takes from the queue at a time (a multiple of 16)
    #[arg(long, default_value_t = 65536)]
    pub unit: u64,
    /// `--mode dynamic`: take the units in a scattered order (unit i is i * a large odd number
    /// modulo their count), as a paged cache's shuffled page ids are read
    #[arg(long)]
    pub shuffle: bool,
    /// 16-byte loads each thread keeps in flight (4, 8 or 16)
    #[arg(long, default_value_t = 8)]
    pub unroll: u32,
    #[arg(long, default_value_t = 50)]
    pub runs: usize,
    #[arg(long, default_value_t = 5)]
    pub warmup: usize,
    /// As `bench decode --flush`
    #[arg(long, value_enum, default_value_t = Flush::Write)]
    pub flush: Flush,
    #[arg(long)]
    pub json: bool,
}

/// Which bytes each block reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Order {
    /// Every block strides over the whole buffer: all SMs read neighbouring addresses at once
    /// (the kindest order for DRAM), every thread the same number of vectors.
    Grid,
    /// Each block reads one contiguous slice, as a one-wave split decode reads its chunks.
    Chunk,
    /// Blocks take `--unit` bytes at a time from a global counter until none are left: perfectly
    /// balanced work of a chosen grain, as a dynamically scheduled decode would read.
    Dynamic,
}

impl Order {
    fn name(self) -> &'static str {
        match self {
            Order::Grid => "grid",
            Order::Chunk => "chunk",
            Order::Dynamic => "dynamic",
        }
    }
}

const ENTRY: &str = "stream_read";

fn spec(unroll: u32, mode: Order) -> KernelSpec {
    // The loads feed an xor that is stored only if it equals a value random data never gives,
    // so nothing is written and nothing can be optimised away.
    let mode_id = match mode {
        Order::Grid => 0,
        Order::Chunk => 1,
        Order::Dynamic => 2,
    };
    let source = format!(
        r#"// bench stream: read n16 16-byte vectors, nothing else.
constexpr int UNROLL = {unroll};
constexpr int MODE = {mode_id};  // 0 grid, 1 chunk, 2 dynamic
__device__ __forceinline__ uint4 ld_stream(const uint4* p) {{
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {{%0, %1, %2, %3}}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}}
// Reads vectors [i, end) with stride `stride`, UNROLL loads in flight per thread.
__device__ __forceinline__ unsigned int read_range(const uint4* src, unsigned long long i,
                                                   unsigned long long end, unsigned long long stride) {{
  unsigned int acc = 0;
  for (; i + (UNROLL - 1) * stride < end; i += UNROLL * stride) {{
    uint4 v[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) v[u] = ld_stream(src + i + u * stride);
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) acc ^= v[u].x ^ v[u].y ^ v[u].z ^ v[u].w;
  }}
  for (; i < end; i += stride) {{
    const uint4 v = ld_stream(src + i);
    acc ^= v.x ^ v.y ^ v.z ^ v.w;
  }}
  return acc;
}}
// queue[0]: the next unit; queue[1]: blocks done (the last resets both for the next run).
extern "C" __global__ void {ENTRY}(const uint4* __restrict__ src, unsigned long long n16,
                                   unsigned int* __restrict__ sink, unsigned long long* queue,
                                   unsigned long long unit16, unsigned long long shuffle_mul) {{
  unsigned int acc = 0;
  if (MODE == 1) {{
    const unsigned long long per = (n16 + gridDim.x - 1) / gridDim.x;
    const unsigned long long begin = per * blockIdx.x;
    const unsigned long long end = begin + per < n16 ? begin + per : n16;
    acc = read_range(src, begin + threadIdx.x, end, blockDim.x);
  }} else if (MODE == 0) {{
    acc = read_range(src, (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x, n16,
                     (unsigned long long)gridDim.x * blockDim.x);
  }} else {{
    __shared__ unsigned long long next[2];
    const unsigned long long units = (n16 + unit16 - 1) / unit16;
    if (threadIdx.x == 0) next[0] = atomicAdd(queue, 1ull);
    __syncthreads();
    for (int k = 0;; k ^= 1) {{
      const unsigned long long u = next[k];
      if (u >= units) break;
      // Take the next unit before reading this one, so no block waits on the counter.
      if (threadIdx.x == 0) next[k ^ 1] = atomicAdd(queue, 1ull);
      const unsigned long long at = (shuffle_mul ? (u * shuffle_mul) % units : u) * unit16;
      const unsigned long long end = at + unit16 < n16 ? at + unit16 : n16;
      acc ^= read_range(src, at + threadIdx.x, end, blockDim.x);
      __syncthreads();
    }}
    if (threadIdx.x == 0) {{
      __threadfence();
      if (atomicAdd(queue + 1, 1ull) == gridDim.x - 1) {{
        queue[0] = 0;
        queue[1] = 0;
      }}
    }}
  }}
  if (acc == 0x9e3779b9u) sink[0] = acc;
}}
"#
    );
    KernelSpec::new(
        format!("bench_stream_read_u{unroll}_{}", mode.name()),
        source,
        [ENTRY],
    )
}

/// A multiplier coprime with `units` near units * 0.618 (a scattered permutation of the units).
fn shuffle_multiplier(units: u64) -> u64 {
    fn gcd(a: u64, b: u64) -> u64 {
        if b == 0 {
            a
        } else {
            gcd(b, a % b)
        }
    }
    let mut m = ((units as f64 * 0.618_033_988_75) as u64).max(1) | 1;
    while gcd(m, units) != 1 {
        m += 2;
    }
    m
}

pub fn run(a: StreamArgs) -> Result<(), String> {
    let err = |e: flashinfer::Error| e.to_string();
    let d = |e: flashinfer::cuda::DriverError| e.to_string();
    if ![4, 8, 16].contains(&a.unroll) {
        return Err(format!("--unroll {}: expected 4, 8 or 16", a.unroll));
    }
    if a.unit < 16 || !a.unit.is_multiple_of(16) {
        return Err(format!(
            "--unit {}: a positive multiple of 16 bytes",
            a.unit
        ));
    }
    if a.threads == 0 || a.threads > 1024 || a.blocks_per_sm == 0 {
        return Err("--threads must be 1..=1024 and --blocks-per-sm at least 1".into());
    }
    let n16 = a.bytes / 16;
    if n16 == 0 {
        return Err("--bytes: at least 16".into());
    }
    let dev: Arc<Device> = Device::new(0).map_err(err)?;
    let st = dev.stream().clone();
    let func = dev.kernel(&spec(a.unroll, a.mode), ENTRY).map_err(err)?;
    // Random bytes (so the sink's comparison is never true); copies to rotate over when asked.
    let mut rng = SplitMix64::new(0x2545f4914f6cdd1d);
    let host: Vec<u64> = (0..n16 * 2).map(|_| rng.next_u64()).collect();
    let copies = match a.flush {
        Flush::Write => 1,
        Flush::Rotate => (ROTATE_BYTES as u64).div_ceil(n16 * 16).max(2) as usize,
    };
    let bufs = (0..copies)
        .map(|_| st.clone_htod(&host).map_err(d))
        .collect::<Result<Vec<_>, _>>()?;
    let sink = st.alloc_zeros::<u64>(1).map_err(d)?;
    let queue = st.alloc_zeros::<u64>(2).map_err(d)?;
    let unit16 = a.unit / 16;
    let shuffle_mul = if a.shuffle && a.mode == Order::Dynamic {
        shuffle_multiplier(n16.div_ceil(unit16))
    } else {
        0
    };
    let cfg = LaunchConfig {
        grid: (dev.info().sm_count as u32 * a.blocks_per_sm, 1, 1),
        block: (a.threads, 1, 1),
        smem_bytes: 0,
    };
    let mut k = 0usize;
    let stats = Timer::with_flush(&dev, a.flush)?.time(a.warmup, a.runs.max(30), || {
        let src = DevSlice::new(&bufs[k % copies], &st).ptr();
        k += 1;
        let snk = DevSlice::new(&sink, &st).ptr();
        let que = DevSlice::new(&queue, &st).ptr();
        let mut args = flashinfer::kernel_args![&src, &n16, &snk, &que, &unit16, &shuffle_mul];
        // SAFETY: (const uint4*, u64, u32*, u64*, u64, u64) as the kernel declares; src holds
        // n16 vectors, queue two zeroed counters that the kernel leaves zeroed.
        unsafe { launch(func, cfg, &st, &mut args) }.map_err(err)
    })?;
    let bytes = (n16 * 16) as f64;
    let tbps = bytes / (stats.median_us * 1e-6) / 1e12;
    if a.json {
        println!(
            "{{\"op\":\"stream\",\"gpu\":\"{}\",\"gpu_uuid\":\"{}\",\"bytes\":{},\"mode\":\"{}\",\"unit\":{},\"shuffle\":{},\"blocks\":{},\"threads\":{},\"unroll\":{},\"flush\":\"{}\",\"median_us\":{:.2},\"min_us\":{:.2},\"max_us\":{:.2},\"runs\":{},\"tb_per_s\":{:.3}}}",
            dev.info().name, dev.info().uuid, n16 * 16, a.mode.name(), a.unit, shuffle_mul != 0, cfg.grid.0, a.threads, a.unroll,
            a.flush.name(), stats.median_us, stats.min_us, stats.max_us, stats.runs, tbps
        );
    } else {
        println!(
            "stream read {:.1} MB  {} x {} threads, unroll {}, {}{}  flush {}  on {}",
            bytes / 1e6,
            cfg.grid.0,
            a.threads,
            a.unroll,
            a.mode.name(),
            if a.mode == Order::Dynamic {
                format!(
                    " (units of {} B{})",
                    a.unit,
                    if shuffle_mul != 0 { ", shuffled" } else { "" }
                )
            } else {
                String::new()
            },
            a.flush.name(),
            dev.info().name
        );
        println!(
            "  median {:.2} us (min {:.2}, max {:.2}, {} runs)  {:.3} TB/s",
            stats.median_us, stats.min_us, stats.max_us, stats.runs, tbps
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use flashinfer::jit::{Arch, DiskCache, Jit, SearchEnv};

    /// Every (unroll, mode) the command accepts compiles with NVRTC for sm_90a (skipped, loudly,
    /// without NVRTC unless FLASHINFER_REQUIRE_NVRTC=1, as the library's compile-only tier).
    #[test]
    fn stream_kernels_compile() {
        let dir = std::env::temp_dir().join(format!("flashinfer-stream-{}", std::process::id()));
        let jit = match Jit::with(&SearchEnv::from_process(), DiskCache::open(&dir).unwrap()) {
            Ok(jit) => jit,
            Err(e) if std::env::var("FLASHINFER_REQUIRE_NVRTC").as_deref() == Ok("1") => {
                panic!("FLASHINFER_REQUIRE_NVRTC=1 but NVRTC is unusable: {e}")
            }
            Err(e) => {
                eprintln!("\n*** SKIPPED: NVRTC not found ***\n{e}\n");
                return;
            }
        };
        for unroll in [4, 8, 16] {
            for mode in [Order::Grid, Order::Chunk, Order::Dynamic] {
                let cubin = jit.compile_uncached(&spec(unroll, mode), Arch::SM90);
                assert!(cubin.is_ok(), "unroll {unroll} {mode:?}: {cubin:?}");
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The scattered order visits every unit once.
    #[test]
    fn shuffle_is_a_permutation() {
        for units in [1u64, 2, 7, 12, 64, 3125, 4096] {
            let m = shuffle_multiplier(units);
            let mut seen = vec![false; units as usize];
            for u in 0..units {
                seen[((u * m) % units) as usize] = true;
            }
            assert!(seen.iter().all(|&s| s), "units {units} multiplier {m}");
        }
    }
}
