//! `flashinfer bench jit`: how long a kernel takes to compile cold, and to load from the disk cache.

use std::time::Instant;

use flashinfer::cuda::{sys, Device};
use flashinfer::decode::DecodeTiles;
use flashinfer::jit::{DiskCache, Jit, SearchEnv};
use flashinfer::prefill::{PrefillMask, PrefillTiles};
use flashinfer::DType;

#[derive(Debug, clap::Args)]
pub struct JitArgs {
    /// Repetitions of the cached load (median reported).
    #[arg(long, default_value_t = 20)]
    pub loads: usize,
}

pub fn run(a: JitArgs) -> Result<(), String> {
    let err = |e: flashinfer::Error| e.to_string();
    let dev = Device::new(0).map_err(err)?;
    let arch = dev.arch();
    let dir = std::env::temp_dir().join(format!("flashinfer-bench-jit-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let jit = Jit::with(
        &SearchEnv::from_process(),
        DiskCache::open(&dir).map_err(err)?,
    )
    .map_err(err)?;
    let specs = [
        (
            "decode bf16 d128 g4",
            DecodeTiles::choose(128, 4, DType::BF16, DType::BF16).spec(),
        ),
        (
            "decode f16 d256 g8",
            DecodeTiles::choose(256, 8, DType::F16, DType::F16).spec(),
        ),
        (
            "prefill bf16 d128 g4",
            PrefillTiles::choose(
                128,
                4,
                DType::BF16,
                DType::BF16,
                true,
                PrefillMask::Causal,
                1 << 15,
                arch,
            )
            .spec(),
        ),
        (
            "prefill f16 d256 g1",
            PrefillTiles::mma_sync(
                256,
                1,
                DType::F16,
                DType::F16,
                false,
                PrefillMask::None,
                1 << 15,
            )
            .spec(),
        ),
        (
            "merge bf16",
            flashinfer::jit::catalog()
                .into_iter()
                .find(|s| s.name.starts_with("merge_inbf16"))
                .ok_or("no merge spec")?,
        ),
    ];
    println!(
        "JIT on {} ({arch}), NVRTC {:?}, cache {}",
        dev.info().name,
        jit.toolkit().nvrtc_version,
        dir.display()
    );
    println!(
        "{:<22} {:>14} {:>18} {:>14}",
        "kernel", "cold compile", "cached get+load", "CUBIN bytes"
    );
    for (label, spec) in specs {
        let t = Instant::now();
        let cold = jit.cubin(&spec, arch).map_err(err)?;
        let cold_ms = t.elapsed().as_secs_f64() * 1e3;
        if cold.from_cache {
            return Err("the fresh cache already held the kernel".into());
        }
        let mut times = Vec::new();
        for _ in 0..a.loads.max(1) {
            // A new Jit each time, as a new process would have: disk read, checksum, module load.
            let t = Instant::now();
            let fresh = Jit::with(
                &SearchEnv::from_process(),
                DiskCache::open(&dir).map_err(err)?,
            )
            .map_err(err)?;
            let setup = t.elapsed();
            let t = Instant::now();
            let hit = fresh.cubin(&spec, arch).map_err(err)?;
            if !hit.from_cache {
                return Err("the second lookup missed the disk cache".into());
            }
            let aligned: Vec<u64> = hit
                .bytes
                .chunks(8)
                .map(|c| {
                    let mut w = [0u8; 8];
                    w[..c.len()].copy_from_slice(c);
                    u64::from_ne_bytes(w)
                })
                .collect();
            dev.context().bind_to_thread().map_err(|e| e.to_string())?;
            let mut module = std::ptr::null_mut();
            // SAFETY: `aligned` holds a verified CUBIN for this device; the module is unloaded
            // right after, and nothing else uses it.
            unsafe {
                sys::cuModuleLoadData(&mut module, aligned.as_ptr().cast())
                    .result()
                    .map_err(|e| e.to_string())?;
                let elapsed = t.elapsed();
                sys::cuModuleUnload(module)
                    .result()
                    .map_err(|e| e.to_string())?;
                times.push(elapsed.as_secs_f64() * 1e3);
            }
            let _ = setup;
        }
        times.sort_by(f64::total_cmp);
        println!(
            "{label:<22} {cold_ms:>11.0} ms {:>15.2} ms {:>14}",
            times[times.len() / 2],
            cold.bytes.len()
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
