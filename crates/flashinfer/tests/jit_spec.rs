//! Architecture names, spec validation, the embedded headers and the catalog: the JIT's pure
//! parts, checked without NVRTC.

use flashinfer::jit::{catalog, compile_options, headers, Arch, KernelSpec};

#[test]
fn arch_names() {
    let cases = [
        ((8, 0), "sm_80", "compute_80"),
        ((8, 6), "sm_86", "compute_86"),
        ((8, 9), "sm_89", "compute_89"),
        ((9, 0), "sm_90a", "compute_90a"),
        ((10, 0), "sm_100a", "compute_100a"),
        ((12, 0), "sm_120a", "compute_120a"),
    ];
    for ((major, minor), sm, compute) in cases {
        let arch = Arch::new(major, minor);
        assert_eq!(arch.sm_name(), sm);
        assert_eq!(arch.compute_name(), compute);
        assert_eq!(arch.to_string(), sm);
        assert_eq!(arch.nvrtc_option(), format!("--gpu-architecture={sm}"));
        assert_eq!(sm.parse::<Arch>().unwrap(), arch);
        assert_eq!(compute.parse::<Arch>().unwrap(), arch);
        assert_eq!(format!("{major}.{minor}").parse::<Arch>().unwrap(), arch);
    }
    assert_eq!(Arch::SM80, Arch::new(8, 0));
    assert_eq!(Arch::SM90.sm_name(), "sm_90a");
    assert_eq!("sm_90".parse::<Arch>().unwrap(), Arch::SM90);
    assert_eq!("121".parse::<Arch>().unwrap(), Arch::new(12, 1));
    for bad in ["", "sm_", "sm_9", "ampere", "9.x", "sm_8a0"] {
        assert!(bad.parse::<Arch>().is_err(), "{bad:?} parsed");
    }
}

#[test]
fn spec_validation_names_the_problem() {
    let good = KernelSpec::new(
        "merge_states_bf16_h128",
        "extern \"C\" __global__ void k() {}",
        ["k"],
    );
    good.validate().unwrap();
    let bad = [
        (
            KernelSpec {
                name: String::new(),
                ..good.clone()
            },
            "spec.name",
        ),
        (
            KernelSpec {
                name: "a/b".into(),
                ..good.clone()
            },
            "spec.name",
        ),
        (
            KernelSpec {
                name: ".hidden".into(),
                ..good.clone()
            },
            "spec.name",
        ),
        (
            KernelSpec {
                name: "x".repeat(500),
                ..good.clone()
            },
            "spec.name",
        ),
        (
            KernelSpec {
                source: "  ".into(),
                ..good.clone()
            },
            "spec.source",
        ),
        (
            KernelSpec {
                source: "a\0b".into(),
                ..good.clone()
            },
            "spec.source",
        ),
        (
            KernelSpec {
                entries: vec![],
                ..good.clone()
            },
            "spec.entries",
        ),
        (
            KernelSpec {
                entries: vec!["1k".into()],
                ..good.clone()
            },
            "spec.entries",
        ),
        (
            KernelSpec {
                entries: vec!["k()".into()],
                ..good.clone()
            },
            "spec.entries",
        ),
    ];
    for (spec, arg) in bad {
        match spec.validate() {
            Err(flashinfer::Error::InvalidArgument { arg: got, .. }) => {
                assert_eq!(got, arg, "{spec:?}")
            }
            other => panic!("{spec:?}: expected InvalidArgument({arg}), got {other:?}"),
        }
    }
}

#[test]
fn every_kernel_header_is_embedded() {
    // A header added to kernels/ but not to headers.rs would compile on the author's machine
    // (if NVRTC found it on disk) and fail everywhere else.
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels");
    let mut on_disk: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".cuh"))
        .collect();
    on_disk.sort();
    let mut embedded: Vec<String> = headers::HEADERS
        .iter()
        .map(|(n, _)| n.to_string())
        .collect();
    embedded.sort();
    assert_eq!(
        embedded, on_disk,
        "kernels/*.cuh and jit/headers.rs disagree"
    );
    for (name, text) in headers::HEADERS {
        assert_eq!(
            *text,
            std::fs::read_to_string(dir.join(name)).unwrap(),
            "{name} is stale"
        );
        assert_eq!(headers::header(name), Some(*text));
    }
    assert!(headers::header("common.cuh").is_some());
}

#[test]
fn catalog_specs_are_valid_and_uniquely_named() {
    let specs = catalog();
    assert!(!specs.is_empty());
    let mut names = std::collections::HashSet::new();
    for spec in &specs {
        spec.validate().unwrap();
        assert!(
            names.insert(spec.name.clone()),
            "two catalog specs are named {}",
            spec.name
        );
    }
    assert!(specs.iter().any(|s| s
        .entries
        .iter()
        .any(|e| e == flashinfer::jit::SELFTEST_ENTRY)));
}

#[test]
fn compile_options_target_a_real_architecture() {
    let options = compile_options(Arch::SM90, None, &["-DFOO=1".to_string()]);
    assert_eq!(
        options,
        [
            "-std=c++17",
            "--gpu-architecture=sm_90a",
            "-default-device",
            "-lineinfo",
            "-DFOO=1"
        ]
    );
    let with_include = compile_options(
        Arch::SM80,
        Some(std::path::Path::new("/opt/cuda/include")),
        &[],
    );
    assert!(with_include.contains(&"--include-path=/opt/cuda/include".to_string()));
    assert!(with_include.contains(&"--gpu-architecture=sm_80".to_string()));
}
