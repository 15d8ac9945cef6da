//! The on-disk cache of compiled CUBINs.
//!
//! One file per kernel specialisation: `<name>-<key16>.cubin`, where the key is the SHA-256 of
//! everything that determines the CUBIN (see [`cache_key`]). Each file starts with a small header
//! (magic, payload length, SHA-256 of the payload) so that a truncated or corrupt entry is noticed
//! and rebuilt rather than handed to the driver. Entries are written atomically (temp file in the
//! same folder, fsync, rename), and [`DiskCache::get_or_insert_with`] holds an exclusive lock on
//! `<entry>.lock` around check-compile-write, so several processes warming the same kernel compile
//! it once and never see a half-written file.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest, Sha256};

use crate::error::{io_err, Result};

/// First bytes of every entry; the trailing digit is the format version.
const MAGIC: &[u8; 8] = b"FICUBIN1";
/// Magic, payload length (u64 little-endian), SHA-256 of the payload.
const HEADER_LEN: usize = 8 + 8 + 32;
const ENTRY_SUFFIX: &str = ".cubin";
const LOCK_SUFFIX: &str = ".cubin.lock";
/// Temp files are `.<entry>.tmp.<pid>.<n>`: hidden, and recognisable by `clear()`.
const TMP_MARKER: &str = ".tmp.";

/// Lowercase hex of a byte string.
fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The cache key: SHA-256 (hex) of every input that determines the CUBIN. Each field is
/// length-prefixed so that no two different inputs encode the same byte stream.
pub fn cache_key(
    source: &str,
    headers: &[(&str, &str)],
    options: &[String],
    arch_name: &str,
    nvrtc_version: (u32, u32),
) -> String {
    let mut hasher = Sha256::new();
    let mut field = |bytes: &[u8]| {
        hasher.update((bytes.len() as u64).to_le_bytes());
        hasher.update(bytes);
    };
    field(b"flashinfer-jit-cache-v1");
    field(source.as_bytes());
    field(&(headers.len() as u64).to_le_bytes());
    for (name, text) in headers {
        field(name.as_bytes());
        field(text.as_bytes());
    }
    field(&(options.len() as u64).to_le_bytes());
    for option in options {
        field(option.as_bytes());
    }
    field(arch_name.as_bytes());
    field(&nvrtc_version.0.to_le_bytes());
    field(&nvrtc_version.1.to_le_bytes());
    hex(&hasher.finalize())
}

/// A folder of cached CUBINs.
#[derive(Clone, Debug)]
pub struct DiskCache {
    dir: PathBuf,
}

/// What [`DiskCache::get_or_insert_with`] returns.
#[derive(Debug)]
pub struct CacheLookup {
    pub bytes: Vec<u8>,
    /// True when the entry was already on disk (possibly written by another process while we
    /// waited for the lock); false when `build` ran.
    pub from_cache: bool,
}

impl DiskCache {
    /// The folder used when none is given: `$FLASHINFER_CACHE_DIR`, else the user's cache folder
    /// (`~/.cache/flashinfer` on Linux), else `$HOME/.cache/flashinfer`, else the temp folder.
    pub fn default_dir() -> PathBuf {
        if let Some(dir) = std::env::var_os("FLASHINFER_CACHE_DIR").filter(|d| !d.is_empty()) {
            return PathBuf::from(dir);
        }
        if let Some(dir) = dirs::cache_dir() {
            return dir.join("flashinfer");
        }
        if let Some(home) = std::env::var_os("HOME").filter(|h| !h.is_empty()) {
            return PathBuf::from(home).join(".cache").join("flashinfer");
        }
        std::env::temp_dir().join("flashinfer-cache")
    }

    /// Opens (creating it if needed) the cache in `dir`.
    pub fn open(dir: impl Into<PathBuf>) -> Result<DiskCache> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        Ok(DiskCache { dir })
    }

    /// Opens the cache in [`DiskCache::default_dir`].
    /// When that folder cannot be created (a read-only home) and `$FLASHINFER_CACHE_DIR` is not
    /// set, falls back to the temp folder: a cache there beats no cache.
    pub fn open_default() -> Result<DiskCache> {
        let dir = DiskCache::default_dir();
        match DiskCache::open(&dir) {
            Ok(cache) => Ok(cache),
            Err(e) if std::env::var_os("FLASHINFER_CACHE_DIR").is_none_or(|d| d.is_empty()) => {
                let fallback = std::env::temp_dir().join("flashinfer-cache");
                tracing::warn!(
                    "cannot use {}: {e}; caching kernels in {}",
                    dir.display(),
                    fallback.display()
                );
                DiskCache::open(fallback).map_err(|_| e)
            }
            Err(e) => Err(e),
        }
    }

    /// The cache's folder.
    pub fn cache_dir(&self) -> &Path {
        &self.dir
    }

    /// The file that holds (or will hold) the entry for `name` and `key`.
    pub fn entry_path(&self, name: &str, key: &str) -> PathBuf {
        let short = &key[..key.len().min(16)];
        self.dir.join(format!("{name}-{short}{ENTRY_SUFFIX}"))
    }

    /// Reads an entry. `Ok(None)` when it is absent, or present but truncated or corrupt (it is
    /// then rebuilt by the next [`DiskCache::get_or_insert_with`]).
    pub fn get(&self, name: &str, key: &str) -> Result<Option<Vec<u8>>> {
        let path = self.entry_path(name, key);
        let mut file = match File::open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(&path)(e)),
        };
        let mut data = Vec::new();
        file.read_to_end(&mut data).map_err(io_err(&path))?;
        match decode(&data) {
            Ok(payload) => Ok(Some(payload.to_vec())),
            Err(why) => {
                tracing::warn!(
                    "cache entry {} is {why}; it will be rebuilt",
                    path.display()
                );
                Ok(None)
            }
        }
    }

    /// Writes an entry atomically: readers see the old file, or no file, or the whole new one.
    pub fn put(&self, name: &str, key: &str, payload: &[u8]) -> Result<()> {
        let path = self.entry_path(name, key);
        let file_name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let tmp = self.dir.join(format!(
            ".{file_name}{TMP_MARKER}{}.{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let written = (|| {
            let mut file = File::create(&tmp)?;
            file.write_all(&encode_header(payload))?;
            file.write_all(payload)?;
            // Data on disk before the rename makes it visible: a crash leaves no empty entry.
            file.sync_all()?;
            std::fs::rename(&tmp, &path)
        })();
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(io_err(&path)(e));
        }
        // Best effort: make the rename itself durable. Not all platforms can open a folder.
        if let Ok(dir) = File::open(&self.dir) {
            let _ = dir.sync_all();
        }
        Ok(())
    }

    /// Returns the entry for `name`/`key`, building and storing it with `build` if it is missing
    /// or corrupt. Concurrent callers, in this process or others, serialise on `<entry>.lock`
    /// and re-check after acquiring it, so `build` runs once per key.
    pub fn get_or_insert_with(
        &self,
        name: &str,
        key: &str,
        build: impl FnOnce() -> Result<Vec<u8>>,
    ) -> Result<CacheLookup> {
        // Fast path without the lock: a complete entry is immutable once renamed into place.
        if let Some(bytes) = self.get(name, key)? {
            return Ok(CacheLookup {
                bytes,
                from_cache: true,
            });
        }
        let entry = self.entry_path(name, key);
        let mut lock_path = entry.into_os_string();
        lock_path.push(".lock");
        let lock_path = PathBuf::from(lock_path);
        let lock_file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io_err(&lock_path))?;
        lock_file.lock().map_err(io_err(&lock_path))?;
        // Another process may have written it while we waited.
        let result = match self.get(name, key) {
            Ok(Some(bytes)) => Ok(CacheLookup {
                bytes,
                from_cache: true,
            }),
            Ok(None) => build().and_then(|bytes| {
                self.put(name, key, &bytes)?;
                Ok(CacheLookup {
                    bytes,
                    from_cache: false,
                })
            }),
            Err(e) => Err(e),
        };
        // Dropping the file releases the lock too; unlocking explicitly says when.
        let _ = lock_file.unlock();
        result
    }

    /// The files of this cache: entries, their lock files and leftover temp files.
    fn own_files(&self) -> Result<Vec<(PathBuf, u64)>> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err(&self.dir)(e)),
        };
        let mut files = Vec::new();
        for entry in entries {
            let entry = entry.map_err(io_err(&self.dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let ours = name.ends_with(ENTRY_SUFFIX)
                || name.ends_with(LOCK_SUFFIX)
                || (name.starts_with('.')
                    && name.contains(ENTRY_SUFFIX)
                    && name.contains(TMP_MARKER));
            let Ok(meta) = entry.metadata() else { continue };
            if ours && meta.is_file() {
                files.push((entry.path(), meta.len()));
            }
        }
        Ok(files)
    }

    /// Total size in bytes of the cache's files.
    pub fn size_bytes(&self) -> Result<u64> {
        Ok(self.own_files()?.iter().map(|(_, len)| len).sum())
    }

    /// Number of cached CUBINs.
    pub fn entry_count(&self) -> Result<usize> {
        Ok(self
            .own_files()?
            .iter()
            .filter(|(p, _)| p.to_string_lossy().ends_with(ENTRY_SUFFIX))
            .count())
    }

    /// Removes every file of the cache (only ours: the folder may be shared) and returns how many
    /// were removed. Safe while other processes use the cache: they rebuild what they miss.
    pub fn clear(&self) -> Result<usize> {
        let mut removed = 0;
        for (path, _) in self.own_files()? {
            match std::fs::remove_file(&path) {
                Ok(()) => removed += 1,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(&path)(e)),
            }
        }
        Ok(removed)
    }
}

fn encode_header(payload: &[u8]) -> [u8; HEADER_LEN] {
    let mut header = [0u8; HEADER_LEN];
    header[..8].copy_from_slice(MAGIC);
    header[8..16].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    header[16..].copy_from_slice(&Sha256::digest(payload));
    header
}

/// The payload of an entry, or why the entry is unusable.
fn decode(data: &[u8]) -> std::result::Result<&[u8], &'static str> {
    if data.len() < HEADER_LEN {
        return Err("truncated (shorter than its header)");
    }
    let (header, payload) = data.split_at(HEADER_LEN);
    if &header[..8] != MAGIC {
        return Err("not a flashinfer cache entry (bad magic)");
    }
    let mut len = [0u8; 8];
    len.copy_from_slice(&header[8..16]);
    if u64::from_le_bytes(len) != payload.len() as u64 {
        return Err("truncated (length mismatch)");
    }
    if header[16..] != Sha256::digest(payload)[..] {
        return Err("corrupt (checksum mismatch)");
    }
    Ok(payload)
}
