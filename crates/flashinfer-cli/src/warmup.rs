//! `flashinfer warmup`: compiles kernel specialisations of the catalog into the disk cache ahead of
//! time, in parallel, so that a server's first request does not wait for NVRTC.

use std::time::Instant;

use clap::{Args, ValueEnum};
use flashinfer::cuda::Device;
use flashinfer::jit::{catalog, Arch, Jit, KernelSpec};
use indicatif::{ProgressBar, ProgressStyle};
use rayon::prelude::*;

#[derive(Debug, Args)]
pub struct WarmupArgs {
    /// Compile what a model's attention needs (its decode kernel and the merge kernels).
    #[arg(long, value_enum)]
    preset: Option<Preset>,

    /// Compile the kernels whose name contains SUBSTRING (repeatable; combines with --preset).
    #[arg(long = "key", value_name = "SUBSTRING")]
    keys: Vec<String>,

    /// Architecture to compile for, e.g. sm_90a or sm_80 (repeatable). Default: the GPU's.
    #[arg(long, value_name = "ARCH", value_parser = parse_arch)]
    arch: Vec<Arch>,

    /// List the kernels selected (the whole catalog without --preset/--key) and exit.
    #[arg(long)]
    list: bool,

    /// Parallel compilations (default: one per core).
    #[arg(long, short = 'j', value_parser = clap::value_parser!(u16).range(1..))]
    jobs: Option<u16>,
}

fn parse_arch(s: &str) -> Result<Arch, String> {
    s.parse::<Arch>().map_err(|e| e.to_string())
}

/// Model shapes whose kernels `--preset` selects. All bf16.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Preset {
    /// Llama 2 7B: head_dim 128, 32 query / 32 KV heads (no GQA).
    #[value(name = "llama2-7b")]
    Llama2_7b,
    /// Llama 3 8B (and Mistral 7B): head_dim 128, 32 query / 8 KV heads.
    #[value(name = "llama3-8b")]
    Llama3_8b,
    /// Llama 3 70B: head_dim 128, 64 query / 8 KV heads.
    #[value(name = "llama3-70b")]
    Llama3_70b,
}

impl Preset {
    /// (head_dim, num_qo_heads, num_kv_heads)
    fn shape(self) -> (usize, usize, usize) {
        match self {
            Preset::Llama2_7b => (128, 32, 32),
            Preset::Llama3_8b => (128, 32, 8),
            Preset::Llama3_70b => (128, 64, 8),
        }
    }

    /// Whether `name` is a kernel this model needs: the bf16 decode kernel of its head_dim and
    /// GQA group, the merge kernels writing bf16 (split-KV and cascade merges), and the bf16
    /// prefill kernels of its shape that the catalog ships (any mask, ragged or paged).
    fn selects(self, name: &str) -> bool {
        let (d, hq, hkv) = self.shape();
        let shape = format!("_qbf16_kvbf16_d{d}_g{}_", hq / hkv);
        let decode = format!("batch_decode{shape}");
        let prefill = name.starts_with("batch_prefill") && name.contains(&shape);
        name.starts_with(&decode)
            || prefill
            || (name.starts_with("merge_") && name.contains("_outbf16_"))
    }
}

/// The catalog's specs that `--preset` / `--key` select (all of them when neither is given).
fn select(args: &WarmupArgs) -> Result<Vec<KernelSpec>, String> {
    let all = catalog();
    if args.preset.is_none() && args.keys.is_empty() {
        return Ok(all);
    }
    if let Some(preset) = args.preset {
        let decode_found = all
            .iter()
            .any(|s| s.name.starts_with("batch_decode") && preset.selects(&s.name));
        if !decode_found {
            return Err(format!(
                "preset {}: the catalog has no decode kernel for its shape (head_dim, heads) = {:?}",
                preset.to_possible_value().map(|v| v.get_name().to_string()).unwrap_or_default(),
                preset.shape()
            ));
        }
    }
    let chosen: Vec<KernelSpec> = all
        .into_iter()
        .filter(|s| {
            args.preset.is_some_and(|p| p.selects(&s.name))
                || args.keys.iter().any(|k| s.name.contains(k.as_str()))
        })
        .collect();
    if chosen.is_empty() {
        return Err(format!(
            "no kernel of the catalog matches --key {}; `flashinfer warmup --list` lists them",
            args.keys.join(" --key ")
        ));
    }
    Ok(chosen)
}

/// The architectures to compile for: `--arch`, else those of the GPUs present.
fn target_archs(args: &WarmupArgs) -> Result<Vec<Arch>, String> {
    let mut archs: Vec<Arch> = Vec::new();
    if args.arch.is_empty() {
        for ordinal in 0..Device::count() {
            let dev = Device::new(ordinal).map_err(|e| format!("GPU {ordinal}: {e}"))?;
            archs.push(dev.arch());
        }
        if archs.is_empty() {
            return Err(format!(
                "{}, so there is no architecture to compile for; pass one, e.g. --arch sm_90a",
                crate::info::no_gpu_reason()
            ));
        }
    } else {
        archs = args.arch.clone();
    }
    archs.sort();
    archs.dedup();
    Ok(archs)
}

pub fn run(args: &WarmupArgs) -> Result<(), String> {
    let specs = select(args)?;
    if args.list {
        for spec in &specs {
            say!("{}", spec.name);
        }
        return Ok(());
    }
    let archs = target_archs(args)?;
    let jit = Jit::shared().map_err(|e| e.to_string())?;
    let (major, minor) = jit.toolkit().nvrtc_version;
    let arch_names: Vec<String> = archs.iter().map(|a| a.sm_name()).collect();
    say!(
        "compiling {} kernel(s) for {} with NVRTC {major}.{minor} into {}",
        specs.len(),
        arch_names.join(", "),
        jit.cache().cache_dir().display()
    );

    let jobs: Vec<(&KernelSpec, Arch)> = specs
        .iter()
        .flat_map(|s| archs.iter().map(move |&a| (s, a)))
        .collect();
    let bar = ProgressBar::new(jobs.len() as u64);
    if let Ok(style) = ProgressStyle::with_template(
        "{bar:40.cyan/blue} {pos}/{len} [{elapsed_precise}] {wide_msg}",
    ) {
        bar.set_style(style);
    }
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(args.jobs.map_or(0, usize::from))
        .build()
        .map_err(|e| format!("cannot start the compile threads: {e}"))?;

    let start = Instant::now();
    let results: Vec<_> = pool.install(|| {
        jobs.par_iter()
            .map(|&(spec, arch)| {
                bar.set_message(format!("{} ({arch})", spec.name));
                let result = jit.cubin(spec, arch);
                bar.inc(1);
                (spec, arch, result)
            })
            .collect()
    });
    bar.finish_and_clear();
    let elapsed = start.elapsed().as_secs_f64();

    let mut compiled = 0usize;
    let mut cached = 0usize;
    let mut nvrtc_ms = 0.0f64;
    let mut failures = Vec::new();
    for (spec, arch, result) in results {
        match result {
            Ok(cubin) if cubin.from_cache => cached += 1,
            Ok(cubin) => {
                compiled += 1;
                nvrtc_ms += cubin.compile_ms;
            }
            Err(e) => failures.push(format!("{} ({arch}): {e}", spec.name)),
        }
    }
    say!(
        "{compiled} compiled (NVRTC time {:.1} s, summed over threads), {cached} already cached, {} failed; \
         {elapsed:.1} s in total",
        nvrtc_ms / 1e3,
        failures.len()
    );
    if failures.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{} kernel(s) failed to compile:\n{}",
            failures.len(),
            failures.join("\n")
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama3_8b_preset_selects_its_decode_and_bf16_merges() {
        let p = Preset::Llama3_8b;
        assert!(p.selects("batch_decode_qbf16_kvbf16_d128_g4_z1_p8_s4"));
        assert!(!p.selects("batch_decode_qf16_kvf16_d128_g4_z1_p8_s4"));
        assert!(!p.selects("batch_decode_qbf16_kvbf16_d128_g8_z1_p4_s4"));
        assert!(!p.selects("batch_decode_qbf16_kvbf16_d64_g4_z1_p8_s4"));
        assert!(p.selects("merge_inf32_outbf16_vec4"));
        assert!(p.selects("merge_inbf16_outbf16_vec8"));
        assert!(!p.selects("merge_inf16_outf16_vec8"));
        assert!(
            p.selects("batch_prefill_sm90_paged_causal_qbf16_kvbf16_d128_g4_wq12_wkv1_m1_kt64_s2")
        );
        assert!(p.selects("batch_prefill_ragged_causal_qbf16_kvbf16_d128_g4_wq4_wkv1_m2_kt64_s2"));
        assert!(!p.selects("batch_prefill_ragged_causal_qbf16_kvbf16_d128_g1_wq4_wkv1_m2_kt64_s2"));
    }

    #[test]
    fn every_preset_finds_a_decode_kernel_in_the_catalog() {
        let names: Vec<String> = catalog().into_iter().map(|s| s.name).collect();
        for p in Preset::value_variants() {
            assert!(
                names
                    .iter()
                    .any(|n| n.starts_with("batch_decode") && p.selects(n)),
                "{p:?} selects no decode kernel"
            );
        }
    }
}
