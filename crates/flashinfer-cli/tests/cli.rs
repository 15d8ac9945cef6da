//! Runs the built `flashinfer` binary the way a user does. These run everywhere; on a machine with
//! a GPU the demo runs there, so the CPU-backend assertions are only made without one.

use std::path::PathBuf;
use std::process::{Command, Output};

/// The `flashinfer` binary: cargo's build of it, or, where the tests were copied elsewhere (the GPU
/// host runs `.gpu/tests/*` with the binaries in `.gpu/bin/`), the one beside them.
fn flashinfer_bin() -> std::path::PathBuf {
    let built = std::path::PathBuf::from(env!("CARGO_BIN_EXE_flashinfer"));
    if built.exists() {
        return built;
    }
    let exe = std::env::current_exe().expect("test executable path");
    exe.parent()
        .and_then(|d| d.parent())
        .map(|d| d.join("bin/flashinfer"))
        .filter(|p| p.exists())
        .unwrap_or(built)
}

fn flashinfer(args: &[&str]) -> Output {
    Command::new(flashinfer_bin())
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("the flashinfer binary runs")
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A fresh, empty folder under the system temp folder, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let dir = std::env::temp_dir().join(format!(
            "flashinfer-cli-test-{tag}-{}-{nanos}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Whether this machine has a CUDA driver library (then the demo may run on a GPU).
fn has_cuda_driver() -> bool {
    ["/dev/nvidiactl", "/proc/driver/nvidia/version"]
        .iter()
        .any(|p| std::path::Path::new(p).exists())
}

#[test]
fn demo_passes_and_says_where_it_ran() {
    let out = flashinfer(&["demo"]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "demo failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("all 7 requests pass"), "{stdout}");
    if !has_cuda_driver() {
        assert!(
            stdout.contains("no GPU: ran on the CPU backend"),
            "{stdout}"
        );
    }
    // One table row per request, the empty one included.
    for kv_len in ["0", "1", "17", "300", "1000", "2500", "4097"] {
        assert!(
            stdout
                .lines()
                .any(|l| l.split_whitespace().nth(1) == Some(kv_len) && l.ends_with("pass")),
            "no passing row for kv_len {kv_len}:\n{stdout}"
        );
    }
}

#[test]
fn demo_on_the_cpu_backend_takes_custom_lengths() {
    let out = flashinfer(&[
        "demo",
        "--backend",
        "cpu",
        "--kv-lens",
        "5,0,33",
        "--seed",
        "7",
    ]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "demo failed:\n{stdout}\n{stderr}");
    assert!(
        stdout.contains("CPU backend requested: ran on the CPU backend"),
        "{stdout}"
    );
    assert!(stdout.contains("all 3 requests pass"), "{stdout}");
}

#[test]
fn info_succeeds_without_a_gpu_or_nvrtc() {
    let cache = TempDir::new("info");
    let out = Command::new(flashinfer_bin())
        .arg("info")
        .env("FLASHINFER_CACHE_DIR", &cache.0)
        .output()
        .expect("runs");
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "info failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("GPU"), "{stdout}");
    assert!(stdout.contains("NVRTC"), "{stdout}");
    assert!(stdout.contains("kernel cache"), "{stdout}");
    if !has_cuda_driver() {
        assert!(stdout.contains("GPU: none (no CUDA GPU"), "{stdout}");
    }
}

#[test]
fn cache_info_and_clear_use_flashinfer_cache_dir() {
    let cache = TempDir::new("cache");
    // A file that is not ours must survive `cache clear`.
    std::fs::write(cache.0.join("notes.txt"), "keep me").unwrap();
    std::fs::write(cache.0.join("fake-0123456789abcdef.cubin"), "x").unwrap();
    let run = |args: &[&str]| {
        Command::new(flashinfer_bin())
            .args(args)
            .env("FLASHINFER_CACHE_DIR", &cache.0)
            .output()
            .expect("runs")
    };
    let out = run(&["cache", "info"]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains(&cache.0.display().to_string()), "{stdout}");
    assert!(stdout.contains("1 kernel(s)"), "{stdout}");

    let out = run(&["cache", "clear"]);
    assert!(out.status.success(), "{:?}", text(&out));
    assert!(!cache.0.join("fake-0123456789abcdef.cubin").exists());
    assert!(cache.0.join("notes.txt").exists());
    let (stdout, _) = text(&run(&["cache", "info"]));
    assert!(stdout.contains("0 kernel(s)"), "{stdout}");
}

#[test]
fn bad_arguments_fail_with_a_clear_message() {
    for (args, needle) in [
        (&["frobnicate"][..], "unrecognized subcommand"),
        (&["demo", "--kv-lens", "12,x"][..], "invalid value 'x'"),
        (&["demo", "--backend", "tpu"][..], "invalid value 'tpu'"),
        (
            &["warmup", "--arch", "sm_99x"][..],
            "is not an architecture",
        ),
    ] {
        let out = flashinfer(args);
        let (stdout, stderr) = text(&out);
        assert!(!out.status.success(), "{args:?} succeeded:\n{stdout}");
        assert!(
            stderr.contains("error:") && stderr.contains(needle),
            "{args:?}:\n{stderr}"
        );
        assert!(!stderr.contains("panicked"), "{args:?}:\n{stderr}");
    }
}

#[test]
fn runtime_errors_exit_1_with_error_prefix() {
    let cache = TempDir::new("warmup");
    for args in [
        &["warmup", "--key", "no-such-kernel-name"][..],
        &["demo", "--kv-lens", "300000"][..],
    ] {
        let out = Command::new(flashinfer_bin())
            .args(args)
            .env("FLASHINFER_CACHE_DIR", &cache.0)
            .output()
            .expect("runs");
        let (stdout, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(1), "{args:?}:\n{stdout}\n{stderr}");
        assert!(stderr.starts_with("error: "), "{args:?}:\n{stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}:\n{stderr}");
    }
}

#[test]
fn warmup_lists_a_preset_without_compiling() {
    let out = flashinfer(&["warmup", "--preset", "llama3-8b", "--list"]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("batch_decode_qbf16_kvbf16_d128_g4_")),
        "{stdout}"
    );
    assert!(stdout.lines().any(|l| l.starts_with("merge_")), "{stdout}");
    assert!(stdout.lines().all(|l| !l.contains("qf16")), "{stdout}");
}

/// Compile-only tier: `warmup` compiles one small kernel for an explicit arch into a fresh cache,
/// then finds it cached. Needs NVRTC; skips loudly without it unless `FLASHINFER_REQUIRE_NVRTC=1`.
#[test]
fn warmup_compiles_then_hits_the_cache() {
    let cache = TempDir::new("warmup-compile");
    let run = || {
        Command::new(flashinfer_bin())
            .args([
                "warmup",
                "--key",
                "jit_selftest",
                "--arch",
                "sm_80",
                "--arch",
                "sm_90a",
            ])
            .env("FLASHINFER_CACHE_DIR", &cache.0)
            .output()
            .expect("runs")
    };
    let out = run();
    let (stdout, stderr) = text(&out);
    if !out.status.success() && stderr.contains("not found. Looked in") {
        if std::env::var("FLASHINFER_REQUIRE_NVRTC").as_deref() == Ok("1") {
            panic!("FLASHINFER_REQUIRE_NVRTC=1 but NVRTC is unusable:\n{stderr}");
        }
        eprintln!("\n*** SKIPPED warmup_compiles_then_hits_the_cache: NVRTC not found ***\n");
        return;
    }
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("2 compiled"), "{stdout}");
    assert!(stdout.contains("0 already cached"), "{stdout}");
    let out = run();
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("0 compiled"), "{stdout}");
    assert!(stdout.contains("2 already cached"), "{stdout}");
}
