//! The JIT end to end on the GPU: a real op's kernel compiled by NVRTC in one process is found in
//! the disk cache by a second process, which loads it and runs it correctly.

mod support;

use std::process::Command;
use std::time::Instant;

use flashinfer::cuda::{DevSlice, DevSliceMut};
use flashinfer::decode::DecodeTiles;
use flashinfer::jit::Jit;
use flashinfer::reference::{self, rel_l2_error};
use flashinfer::{merge, DType, LseBase};
use support::*;

const NAME: &str = "gpu_jit_second_process_reuses_disk_cache";

/// In a child process: compile (or read) a decode kernel, load it, run a merge and check it.
fn child() {
    let dev = device();
    let spec = DecodeTiles::choose(128, 4, DType::BF16, DType::BF16).spec();
    let t = Instant::now();
    let cubin = Jit::shared().unwrap().cubin(&spec, dev.arch()).unwrap();
    let get_ms = t.elapsed().as_secs_f64() * 1e3;
    let t = Instant::now();
    dev.module(&spec).unwrap().kernel("batch_decode").unwrap();
    let load_ms = t.elapsed().as_secs_f64() * 1e3;
    println!(
        "FROM_CACHE={} GET_MS={get_ms:.2} LOAD_MS={load_ms:.2}",
        cubin.from_cache
    );

    // The loaded modules work: a merge through the JIT, checked against the CPU backend.
    let mut rng = Rng::fresh("jit child");
    let (rows, heads, dim) = (16, 8, 128);
    let (va, vb) = (
        rng.vec::<half::bf16>(rows * heads * dim, 1.0),
        rng.vec::<half::bf16>(rows * heads * dim, 1.0),
    );
    let (sa, sb): (Vec<f32>, Vec<f32>) = (
        (0..rows * heads).map(|_| rng.sym(5.0)).collect(),
        (0..rows * heads).map(|_| rng.sym(5.0)).collect(),
    );
    let mut want = vec![half::bf16::ZERO; va.len()];
    let mut want_s = vec![0f32; sa.len()];
    reference::merge_state(
        &va,
        &sa,
        &vb,
        &sb,
        heads,
        dim,
        LseBase::Natural,
        &mut want,
        &mut want_s,
    )
    .unwrap();
    let st = dev.stream();
    let (a, b, x, y) = (
        upload(&dev, &va),
        upload(&dev, &vb),
        upload(&dev, &sa),
        upload(&dev, &sb),
    );
    let mut o = poisoned::<half::bf16>(&dev, va.len());
    merge::merge_state(
        &dev,
        DevSlice::new(&a, st),
        DevSlice::new(&x, st),
        DevSlice::new(&b, st),
        DevSlice::new(&y, st),
        heads,
        dim,
        LseBase::Natural,
        DevSliceMut::new(&mut o, st),
        None,
    )
    .unwrap();
    let err = rel_l2_error(&to_f32(&download(&dev, &o)), &to_f64(&want));
    assert!(err <= 1e-2, "merge through the JIT: rel err {err}");
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_jit_second_process_reuses_disk_cache() {
    if std::env::var_os("FLASHINFER_JIT_CHILD").is_some() {
        return child();
    }
    let dir = std::env::temp_dir().join(format!(
        "flashinfer-jit-test-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    let exe = std::env::current_exe().unwrap();
    for (i, expect_cached) in [false, true].into_iter().enumerate() {
        let out = Command::new(&exe)
            .args([
                "--exact",
                NAME,
                "--include-ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("FLASHINFER_JIT_CHILD", "1")
            .env("FLASHINFER_CACHE_DIR", &dir)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "child process {i} failed:\n{text}");
        // The harness prints "test name ... " on the same line, before the child's report.
        let line = text
            .lines()
            .find_map(|l| l.find("FROM_CACHE=").map(|i| &l[i..]))
            .unwrap_or_else(|| panic!("no report:\n{text}"));
        println!("process {}: {line}", i + 1);
        assert!(
            line.starts_with(&format!("FROM_CACHE={expect_cached} ")),
            "process {}: expected from_cache = {expect_cached}: {line}",
            i + 1
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
