//! `flashinfer cache info|clear`: the on-disk cache of compiled kernels.

use clap::Subcommand;
use flashinfer::jit::DiskCache;

use crate::human_bytes;

#[derive(Debug, Subcommand)]
pub enum CacheCmd {
    /// Show the cache folder, its number of kernels and its size.
    Info,
    /// Remove every cached kernel (other files in the folder are left alone).
    Clear,
}

pub fn run(cmd: &CacheCmd) -> Result<(), String> {
    let cache = DiskCache::open_default().map_err(|e| e.to_string())?;
    match cmd {
        CacheCmd::Info => {
            say!("{}", summary(&cache)?);
            Ok(())
        }
        CacheCmd::Clear => {
            let removed = cache.clear().map_err(|e| e.to_string())?;
            say!(
                "removed {removed} file(s) from {}",
                cache.cache_dir().display()
            );
            Ok(())
        }
    }
}

/// `<dir>: <n> kernel(s), <size>` (also shown by `flashinfer info`).
pub fn summary(cache: &DiskCache) -> Result<String, String> {
    let entries = cache.entry_count().map_err(|e| e.to_string())?;
    let bytes = cache.size_bytes().map_err(|e| e.to_string())?;
    Ok(format!(
        "kernel cache: {} ({entries} kernel(s), {})",
        cache.cache_dir().display(),
        human_bytes(bytes)
    ))
}
