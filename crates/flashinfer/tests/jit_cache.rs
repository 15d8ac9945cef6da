//! The on-disk CUBIN cache: keys, atomic writes, corruption detection, and concurrent writers
//! (threads and processes). Needs no NVRTC: payloads are made-up bytes.

use std::collections::HashSet;
use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::time::Duration;

use flashinfer::jit::{cache_key, DiskCache};

/// A fresh, empty folder for one test.
fn scratch_dir(tag: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "flashinfer-test-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn payload(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

const KEY: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

#[test]
fn key_changes_with_every_input() {
    let headers = [("common.cuh", "// a"), ("merge.cuh", "// b")];
    let options = vec![
        "-std=c++17".to_string(),
        "--gpu-architecture=sm_90a".to_string(),
    ];
    let base = cache_key("src", &headers, &options, "sm_90a", (13, 0));
    assert_eq!(base.len(), 64);
    assert!(base.bytes().all(|b| b.is_ascii_hexdigit()));
    assert_eq!(
        base,
        cache_key("src", &headers, &options, "sm_90a", (13, 0)),
        "deterministic"
    );

    let mut other_options = options.clone();
    other_options.push("-DX".into());
    let variants = [
        cache_key("src2", &headers, &options, "sm_90a", (13, 0)),
        cache_key(
            "src",
            &[("common.cuh", "// a"), ("merge.cuh", "// c")],
            &options,
            "sm_90a",
            (13, 0),
        ),
        cache_key(
            "src",
            &[("common.cuh", "// a"), ("merge2.cuh", "// b")],
            &options,
            "sm_90a",
            (13, 0),
        ),
        cache_key("src", &headers[..1], &options, "sm_90a", (13, 0)),
        cache_key("src", &headers, &other_options, "sm_90a", (13, 0)),
        cache_key("src", &headers, &options[..1], "sm_90a", (13, 0)),
        cache_key("src", &headers, &options, "sm_80", (13, 0)),
        cache_key("src", &headers, &options, "sm_90a", (13, 1)),
        cache_key("src", &headers, &options, "sm_90a", (12, 0)),
        // Field boundaries are encoded: moving bytes between fields changes the key.
        cache_key(
            "src",
            &[("common.cuh// a", ""), ("merge.cuh", "// b")],
            &options,
            "sm_90a",
            (13, 0),
        ),
    ];
    let mut seen = HashSet::new();
    seen.insert(base);
    for key in variants {
        assert!(seen.insert(key.clone()), "duplicate key {key}");
    }
}

#[test]
fn put_then_get_round_trips_and_leaves_no_temp_files() {
    let dir = scratch_dir("roundtrip");
    let cache = DiskCache::open(&dir).unwrap();
    assert_eq!(cache.cache_dir(), dir.as_path());
    assert_eq!(cache.get("k", KEY).unwrap(), None);

    let bytes = payload(7, 10_000);
    cache.put("merge_states_bf16_h128", KEY, &bytes).unwrap();
    let path = cache.entry_path("merge_states_bf16_h128", KEY);
    assert_eq!(
        path.file_name().unwrap().to_str().unwrap(),
        "merge_states_bf16_h128-0123456789abcdef.cubin"
    );
    assert_eq!(
        cache.get("merge_states_bf16_h128", KEY).unwrap(),
        Some(bytes.clone())
    );
    // The file is the payload plus a fixed header, and the only file there.
    assert_eq!(
        std::fs::metadata(&path).unwrap().len(),
        bytes.len() as u64 + 48
    );
    assert_eq!(
        files_in(&dir),
        vec!["merge_states_bf16_h128-0123456789abcdef.cubin"]
    );

    // Overwriting replaces the whole entry.
    let newer = payload(9, 123);
    cache.put("merge_states_bf16_h128", KEY, &newer).unwrap();
    assert_eq!(
        cache.get("merge_states_bf16_h128", KEY).unwrap(),
        Some(newer)
    );
    assert_eq!(files_in(&dir).len(), 1);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn corrupt_or_truncated_entries_are_detected_and_rebuilt() {
    let dir = scratch_dir("corrupt");
    let cache = DiskCache::open(&dir).unwrap();
    let good = payload(1, 4096);
    let path = cache.entry_path("k", KEY);

    type Damage = fn(&mut Vec<u8>);
    let damages: [(&str, Damage); 5] = [
        ("flipped payload byte", |d| d[100] ^= 0x40),
        ("truncated payload", |d| d.truncate(d.len() - 1)),
        ("truncated header", |d| d.truncate(20)),
        ("empty file", |d| d.clear()),
        ("bad magic", |d| d[0] = b'X'),
    ];
    for (what, damage) in damages {
        cache.put("k", KEY, &good).unwrap();
        let mut data = std::fs::read(&path).unwrap();
        damage(&mut data);
        std::fs::write(&path, &data).unwrap();
        assert_eq!(cache.get("k", KEY).unwrap(), None, "{what}: not detected");

        let builds = AtomicUsize::new(0);
        let lookup = cache
            .get_or_insert_with("k", KEY, || {
                builds.fetch_add(1, Ordering::SeqCst);
                Ok(good.clone())
            })
            .unwrap();
        assert_eq!(builds.load(Ordering::SeqCst), 1, "{what}: not rebuilt");
        assert!(!lookup.from_cache, "{what}");
        assert_eq!(lookup.bytes, good);
        assert_eq!(
            cache.get("k", KEY).unwrap(),
            Some(good.clone()),
            "{what}: rebuilt entry unreadable"
        );
    }

    // A hit does not build.
    let lookup = cache
        .get_or_insert_with("k", KEY, || panic!("built on a hit"))
        .unwrap();
    assert!(lookup.from_cache);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn failed_build_writes_nothing() {
    let dir = scratch_dir("failed");
    let cache = DiskCache::open(&dir).unwrap();
    let err = cache
        .get_or_insert_with("k", KEY, || {
            Err(flashinfer::Error::Unsupported("nope".into()))
        })
        .unwrap_err();
    assert!(matches!(err, flashinfer::Error::Unsupported(_)));
    assert_eq!(cache.get("k", KEY).unwrap(), None);
    assert!(files_in(&dir).iter().all(|f| !f.ends_with(".cubin")));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn concurrent_threads_build_once() {
    let dir = scratch_dir("threads");
    let builds = Arc::new(AtomicUsize::new(0));
    let threads = 8;
    let barrier = Arc::new(Barrier::new(threads));
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let (dir, builds, barrier) = (dir.clone(), builds.clone(), barrier.clone());
            std::thread::spawn(move || {
                // Each thread opens its own handle, as separate processes would.
                let cache = DiskCache::open(&dir).unwrap();
                barrier.wait();
                cache
                    .get_or_insert_with("shared_kernel", KEY, || {
                        builds.fetch_add(1, Ordering::SeqCst);
                        std::thread::sleep(Duration::from_millis(200));
                        Ok(payload(3, 50_000))
                    })
                    .unwrap()
            })
        })
        .collect();
    let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert_eq!(builds.load(Ordering::SeqCst), 1, "compiled more than once");
    assert_eq!(results.iter().filter(|r| !r.from_cache).count(), 1);
    assert!(results.iter().all(|r| r.bytes == payload(3, 50_000)));
    let cache = DiskCache::open(&dir).unwrap();
    assert_eq!(cache.entry_count().unwrap(), 1);
    assert_eq!(
        cache.get("shared_kernel", KEY).unwrap(),
        Some(payload(3, 50_000))
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

const CHILD_DIR_VAR: &str = "FLASHINFER_TEST_CACHE_CHILD_DIR";

/// Not a test of its own: the body of each child process of
/// `concurrent_processes_build_once`, which re-runs this test binary filtered to this name.
/// Without the variable set it returns at once.
#[test]
fn child_process_cache_writer() {
    let Some(dir) = std::env::var_os(CHILD_DIR_VAR) else {
        return;
    };
    let dir = PathBuf::from(dir);
    let cache = DiskCache::open(&dir).unwrap();
    let lookup = cache
        .get_or_insert_with("shared_kernel", KEY, || {
            // Record the build in a log that every process appends to.
            let mut log = OpenOptions::new()
                .create(true)
                .append(true)
                .open(dir.join("builds.log"))
                .unwrap();
            writeln!(log, "built by {}", std::process::id()).unwrap();
            std::thread::sleep(Duration::from_millis(300));
            Ok(payload(5, 200_000))
        })
        .unwrap();
    assert_eq!(lookup.bytes, payload(5, 200_000));
}

#[test]
fn concurrent_processes_build_once() {
    let dir = scratch_dir("processes");
    let exe = std::env::current_exe().unwrap();
    // Piped output, so that the children's own "test result" lines stay out of ours.
    let children: Vec<_> = (0..4)
        .map(|_| {
            Command::new(&exe)
                .args(["child_process_cache_writer", "--exact", "--test-threads=1"])
                .env(CHILD_DIR_VAR, &dir)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for child in children {
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "a child process failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let log = std::fs::read_to_string(dir.join("builds.log")).unwrap();
    assert_eq!(log.lines().count(), 1, "built more than once:\n{log}");
    let cache = DiskCache::open(&dir).unwrap();
    assert_eq!(cache.entry_count().unwrap(), 1);
    assert_eq!(
        cache.get("shared_kernel", KEY).unwrap(),
        Some(payload(5, 200_000))
    );
    assert!(
        files_in(&dir).iter().all(|f| !f.contains(".tmp.")),
        "temp files left: {:?}",
        files_in(&dir)
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn size_and_clear_touch_only_cache_files() {
    let dir = scratch_dir("clear");
    let cache = DiskCache::open(&dir).unwrap();
    assert_eq!(cache.size_bytes().unwrap(), 0);
    cache.put("a", KEY, &payload(1, 1000)).unwrap();
    cache.put("b", KEY, &payload(2, 3000)).unwrap();
    cache
        .get_or_insert_with("c", KEY, || Ok(payload(3, 10)))
        .unwrap(); // leaves a .lock file
    std::fs::write(dir.join("notes.txt"), "not ours").unwrap();

    assert_eq!(cache.entry_count().unwrap(), 3);
    assert_eq!(cache.size_bytes().unwrap(), 1000 + 3000 + 10 + 3 * 48);
    let removed = cache.clear().unwrap();
    assert!(removed >= 3, "removed {removed}");
    assert_eq!(cache.size_bytes().unwrap(), 0);
    assert_eq!(cache.entry_count().unwrap(), 0);
    assert_eq!(files_in(&dir), vec!["notes.txt"]);
    assert_eq!(cache.get("a", KEY).unwrap(), None);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn default_dir_follows_the_environment_variable() {
    // Only this test reads the variable in this binary, so setting it here races with nothing.
    let dir = scratch_dir("envdir");
    std::env::set_var("FLASHINFER_CACHE_DIR", &dir);
    assert_eq!(DiskCache::default_dir(), dir);
    let cache = DiskCache::open_default().unwrap();
    assert_eq!(cache.cache_dir(), dir.as_path());
    std::env::remove_var("FLASHINFER_CACHE_DIR");
    let default = DiskCache::default_dir();
    assert!(
        default.ends_with("flashinfer") || default.ends_with("flashinfer-cache"),
        "{default:?}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
