//! Shared helpers of the GPU tests: the device, fresh random inputs, poisoned outputs, transfers.
#![allow(dead_code)]

pub mod batches;

use std::sync::Arc;

use flashinfer::cuda::{CudaSlice, Device};
use flashinfer::random::SplitMix64;
use flashinfer::Element;

/// The decode kernels a GPU test runs each case on: CUDA cores, tensor cores, and the tensor-core
/// kernel with its producer warp where it fits this GPU and head_dim.
pub fn decode_kernels(
    dev: &Device,
    head_dim: usize,
    group: usize,
    q: flashinfer::DType,
    kv: flashinfer::DType,
) -> Vec<flashinfer::decode::DecodeTiles> {
    use flashinfer::decode::DecodeTiles;
    let tc = DecodeTiles::tensor_core(head_dim, group, q, kv);
    let ws = tc
        .producer_warp_fits(dev.arch())
        .then(|| tc.with_producer_warp(true));
    [DecodeTiles::simt(head_dim, group, q, kv), tc]
        .into_iter()
        .chain(ws)
        .collect()
}

/// The GPU the tests run on. GPU tests never pass by skipping: no GPU is a failure.
pub fn device() -> Arc<Device> {
    Device::new(0).unwrap_or_else(|e| panic!("GPU test without a usable GPU: {e}"))
}

/// Fresh random inputs for each run; the seed is printed so a failure can be replayed with
/// FLASHINFER_TEST_SEED.
pub struct Rng;

impl Rng {
    #[allow(clippy::new_ret_no_self)]
    pub fn fresh(test: &str) -> SplitMix64 {
        let seed = std::env::var("FLASHINFER_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(SplitMix64::clock_seed);
        eprintln!("{test}: seed {seed}");
        SplitMix64::new(seed)
    }
}

pub fn upload<T: flashinfer::cuda::DeviceRepr>(dev: &Device, v: &[T]) -> CudaSlice<T> {
    dev.stream().clone_htod(v).expect("host-to-device copy")
}

pub fn download<T: flashinfer::cuda::DeviceRepr + Default + Clone>(
    dev: &Device,
    s: &CudaSlice<T>,
) -> Vec<T> {
    dev.stream().synchronize().expect("sync");
    dev.stream().clone_dtoh(s).expect("device-to-host copy")
}

/// A device buffer filled with NaN, so that any element a kernel fails to write fails the test.
pub fn poisoned<T: Element + flashinfer::cuda::DeviceRepr>(dev: &Device, n: usize) -> CudaSlice<T> {
    upload(dev, &vec![T::from_f32(f32::NAN); n])
}

pub fn to_f32<T: Element>(v: &[T]) -> Vec<f32> {
    v.iter().map(|x| x.to_f32()).collect()
}

pub fn to_f64<T: Element>(v: &[T]) -> Vec<f64> {
    v.iter().map(|x| x.to_f64()).collect()
}

/// DESIGN.md's tolerance for outputs of element type `T` (relative L2 against the reference).
pub fn tolerance<T: Element>() -> f64 {
    match T::DTYPE {
        flashinfer::DType::F16 => 2e-3,
        flashinfer::DType::BF16 => 1e-2,
        flashinfer::DType::F32 => 1e-5,
    }
}

/// Checks LSE values: -inf exactly where the reference is -inf, close elsewhere.
pub fn check_lse(what: &str, got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        if w == f32::NEG_INFINITY {
            assert_eq!(g, f32::NEG_INFINITY, "{what}[{i}]: expected -inf, got {g}");
        } else {
            assert!(
                g.is_finite() && (g - w).abs() <= tol * (1.0 + w.abs()),
                "{what}[{i}]: got {g}, want {w}"
            );
        }
    }
}
