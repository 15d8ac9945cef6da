//! `flashinfer info`: what this machine offers the engine. Never fails for a missing GPU or NVRTC:
//! saying what is missing, and where we looked, is the point.

use flashinfer::cuda::{Device, DeviceInfo};
use flashinfer::jit::{catalog, DiskCache, Jit};

use crate::human_bytes;

pub fn run() -> Result<(), String> {
    say!("flashinfer-rs {}", env!("CARGO_PKG_VERSION"));
    for line in gpu_lines() {
        say!("{line}");
    }
    match Jit::shared() {
        Ok(jit) => say!("{}", jit.toolkit()),
        Err(e) => {
            say!("NVRTC: unavailable (kernels cannot be compiled; the CPU backend works)\n{e}")
        }
    }
    match DiskCache::open_default() {
        Ok(cache) => say!("{}", crate::cache::summary(&cache)?),
        Err(e) => say!("kernel cache: unavailable: {e}"),
    }
    say!(
        "kernel catalog: {} specialisations (`flashinfer warmup --list` lists them)",
        catalog().len()
    );
    Ok(())
}

/// One line per GPU, or one line saying why there is none.
pub fn gpu_lines() -> Vec<String> {
    let count = Device::count();
    if count == 0 {
        return vec![format!("GPU: none ({})", no_gpu_reason())];
    }
    (0..count)
        .map(|ordinal| match Device::new(ordinal) {
            Ok(dev) => describe(dev.info()),
            Err(e) => format!("GPU {ordinal}: present but unusable: {e}"),
        })
        .collect()
}

/// Why `Device::count()` is 0: no driver library, or a driver without a device.
pub fn no_gpu_reason() -> String {
    match Device::new(0) {
        Err(flashinfer::Error::NoGpu(why)) => format!("no CUDA GPU: {why}"),
        Err(e) => format!("no CUDA GPU: {e}"),
        Ok(_) => "no CUDA GPU".into(), // count() said 0; a device appearing now is not ours to use
    }
}

pub fn describe(info: &DeviceInfo) -> String {
    // The UUID tells two GPUs of one model apart in benchmark records (empty if the driver
    // gave none).
    let uuid = if info.uuid.is_empty() {
        String::new()
    } else {
        format!(" ({})", info.uuid)
    };
    format!(
        "GPU {}: {}{}, {} ({} SMs), shared memory {} per block (opt-in) / {} per SM, L2 {}, memory {}",
        info.ordinal,
        info.name,
        uuid,
        info.arch,
        info.sm_count,
        human_bytes(info.max_smem_per_block_optin as u64),
        human_bytes(info.smem_per_sm as u64),
        human_bytes(info.l2_bytes as u64),
        human_bytes(info.total_mem as u64),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gpu_line_names_the_uuid_only_when_there_is_one() {
        let mut info = DeviceInfo {
            ordinal: 0,
            name: "NVIDIA H200".into(),
            uuid: "GPU-4c49d654-779f-a964-a449-7f7a8c9597d5".into(),
            arch: flashinfer::jit::Arch::SM90,
            sm_count: 132,
            max_smem_per_block_optin: 227 * 1024,
            smem_per_sm: 228 * 1024,
            l2_bytes: 60 << 20,
            total_mem: 140 << 30,
        };
        let line = describe(&info);
        assert!(
            line.starts_with("GPU 0: NVIDIA H200 (GPU-4c49d654-779f-a964-a449-7f7a8c9597d5), "),
            "{line}"
        );
        info.uuid.clear();
        let line = describe(&info);
        assert!(line.starts_with("GPU 0: NVIDIA H200, "), "{line}");
        assert!(!line.contains("()"), "{line}");
    }
}
