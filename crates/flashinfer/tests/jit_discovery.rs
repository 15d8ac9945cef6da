//! Finding NVRTC: when it is absent, the error lists every place searched and how to install it.
//! These tests build their own search places, so they pass the same with or without a CUDA
//! toolkit on the machine.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

use flashinfer::jit::{DiskCache, Jit, SearchEnv};
use flashinfer::Error;

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

fn mkdir(path: &Path) -> PathBuf {
    std::fs::create_dir_all(path).unwrap();
    path.to_path_buf()
}

/// Search places that all exist and hold nothing.
fn empty_env(root: &Path) -> SearchEnv {
    SearchEnv {
        nvrtc_path: None,
        cuda_roots: vec![
            ("$CUDA_HOME".into(), mkdir(&root.join("cuda_home"))),
            ("$CUDA_PATH".into(), mkdir(&root.join("cuda_path"))),
        ],
        virtual_env: {
            mkdir(&root.join("venv/lib/python3.11/site-packages"));
            Some(root.join("venv"))
        },
        python: None,
        library_path: vec![mkdir(&root.join("ld_dir_a")), mkdir(&root.join("ld_dir_b"))],
        system_names: vec!["libnvrtc-flashinfer-test-does-not-exist.so.99".into()],
        include_fallbacks: vec![],
    }
}

fn not_found(result: flashinfer::Result<Jit>) -> (Vec<String>, String, String) {
    match result {
        Err(e @ Error::NotFound { .. }) => {
            let message = e.to_string();
            let Error::NotFound { searched, hint, .. } = e else {
                unreachable!()
            };
            (searched, hint, message)
        }
        Err(other) => panic!("expected NotFound, got {other}"),
        Ok(jit) => panic!("expected NotFound, found {:?}", jit.toolkit()),
    }
}

#[test]
fn missing_nvrtc_lists_every_place_searched() {
    let root = scratch_dir("discovery-empty");
    let env = empty_env(&root);
    let cache = DiskCache::open(root.join("cache")).unwrap();
    let (searched, hint, message) = not_found(Jit::with(&env, cache));

    let expect = [
        root.join("cuda_home/lib64"),
        root.join("cuda_home/lib"),
        root.join("cuda_path/lib64"),
        root.join("cuda_path/lib"),
        root.join("ld_dir_a"),
        root.join("ld_dir_b"),
    ];
    for dir in &expect {
        let dir = dir.display().to_string();
        assert!(
            searched.iter().any(|s| s.contains(&dir)),
            "{dir} not listed in {searched:#?}"
        );
    }
    for label in [
        "$CUDA_HOME",
        "$CUDA_PATH",
        "$VIRTUAL_ENV",
        "$LD_LIBRARY_PATH",
        "dynamic linker",
    ] {
        assert!(
            searched.iter().any(|s| s.contains(label)),
            "{label} not listed in {searched:#?}"
        );
    }
    assert!(
        searched.iter().any(|s| s.contains("nvidia")),
        "venv wheels not listed: {searched:#?}"
    );
    assert!(searched
        .iter()
        .any(|s| s.contains("libnvrtc-flashinfer-test-does-not-exist.so.99")));
    assert!(hint.contains("pip install nvidia-cuda-nvrtc==13.0.88 nvidia-cuda-runtime==13.0.96"));
    assert!(hint.contains("CUDA_HOME"));
    // The Display form carries all of it, for users who only print the error.
    assert!(
        message.contains("libnvrtc")
            && message.contains("ld_dir_b")
            && message.contains("pip install")
    );
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn unusable_library_in_a_wheel_is_reported_with_the_reason() {
    // A CUDA 13 wheel layout whose libnvrtc is not a shared library.
    let root = scratch_dir("discovery-bad-wheel");
    let env = empty_env(&root);
    let site = root.join("venv/lib/python3.11/site-packages");
    let lib_dir = mkdir(&site.join("nvidia/cu13/lib"));
    std::fs::write(lib_dir.join("libnvrtc.so.13"), b"not an ELF file").unwrap();
    let cache = DiskCache::open(root.join("cache")).unwrap();
    let (searched, _, _) = not_found(Jit::with(&env, cache));
    let bad = lib_dir.join("libnvrtc.so.13").display().to_string();
    assert!(
        searched.iter().any(|s| s.contains(&bad)),
        "{bad} not listed in {searched:#?}"
    );
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn explicit_path_is_the_only_place_tried() {
    let root = scratch_dir("discovery-explicit");
    let mut env = empty_env(&root);
    let missing = root.join("nowhere/libnvrtc.so.13");
    env.nvrtc_path = Some(missing.clone());
    let cache = DiskCache::open(root.join("cache")).unwrap();
    let (searched, hint, _) = not_found(Jit::with(&env, cache));
    assert_eq!(searched.len(), 1, "{searched:#?}");
    assert!(
        searched[0].contains("FLASHINFER_NVRTC_PATH")
            && searched[0].contains(&missing.display().to_string())
    );
    assert!(hint.contains("FLASHINFER_NVRTC_PATH"));
    std::fs::remove_dir_all(&root).unwrap();
}

const CHILD_VAR: &str = "FLASHINFER_TEST_DISCOVERY_CHILD";

/// Not a test of its own: the body of the child process of
/// `search_places_come_from_the_environment`. Without the variable set it returns at once.
#[test]
fn child_process_reads_environment() {
    let Some(root) = std::env::var_os(CHILD_VAR) else {
        return;
    };
    let root = PathBuf::from(root);
    let env = SearchEnv::from_process();
    assert_eq!(env.nvrtc_path, None);
    assert!(
        env.cuda_roots
            .contains(&("$CUDA_HOME".into(), root.join("home"))),
        "{env:?}"
    );
    assert!(
        env.cuda_roots
            .contains(&("$CUDA_PATH".into(), root.join("path"))),
        "{env:?}"
    );
    assert!(
        env.cuda_roots
            .iter()
            .any(|(_, p)| p == Path::new("/usr/local/cuda")),
        "{env:?}"
    );
    assert_eq!(env.virtual_env, Some(root.join("venv")));
    assert_eq!(env.library_path, vec![root.join("ld1"), root.join("ld2")]);
    assert!(env.python.is_some());
    assert!(env
        .system_names
        .iter()
        .any(|n| n.starts_with("libnvrtc.so")));
}

#[test]
fn search_places_come_from_the_environment() {
    let root = scratch_dir("discovery-env");
    let ld = std::env::join_paths([root.join("ld1"), root.join("ld2")]).unwrap();
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "child_process_reads_environment",
            "--exact",
            "--test-threads=1",
        ])
        .env(CHILD_VAR, &root)
        .env_remove("FLASHINFER_NVRTC_PATH")
        .env("CUDA_HOME", root.join("home"))
        .env("CUDA_PATH", root.join("path"))
        .env("VIRTUAL_ENV", root.join("venv"))
        .env("LD_LIBRARY_PATH", ld)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "child failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::remove_dir_all(&root).unwrap();
}
