//! The Rust example of README.md, compiled and run here, and checked to be what the README shows
//! (the lines between the README-BEGIN and README-END markers, unindented).
//!
//! Without a GPU it runs the CPU-backend half; with one, the GPU half too.

mod readme_example {
    // README-BEGIN
    use flashinfer::cuda::{DevSlice, DevSliceMut, Device};
    use flashinfer::decode::{BatchDecode, DecodeConfig};
    use flashinfer::layout::{HeadConfig, KvLayout, PageTable, PagedKv, PagedKvDesc};
    use flashinfer::{reference, AttentionParams, DType};
    use half::bf16;

    fn main() -> flashinfer::Result<()> {
        // 32 query heads sharing 8 KV heads (GQA), head_dim 128; a pool of 4 pages of 16 tokens.
        let heads = HeadConfig::new(32, 8, 128)?;
        let desc = PagedKvDesc::new(KvLayout::Nhd, 4, 16, heads.num_kv_heads, heads.head_dim)?;
        // kv_indptr, kv_indices, kv_last_page_len: request 0 holds pages 3 and 0 (16 + 4 tokens),
        // request 1 holds page 2 (5 tokens).
        let table = PageTable::new(&[0, 2, 3], &[3, 0, 2], &[4, 5], 16, desc.num_pages)?;
        let fill = |n: usize, m: usize| -> Vec<bf16> {
            (0..n)
                .map(|i| bf16::from_f32((i % m) as f32 / m as f32 - 0.5))
                .collect()
        };
        let (k, v) = (fill(desc.required_len(), 7), fill(desc.required_len(), 5));
        let q = fill(table.batch_size() * heads.num_qo_heads * heads.head_dim, 11);

        // The CPU backend: exact, multi-threaded, runs anywhere.
        let params = AttentionParams::default(); // scale 1/sqrt(head_dim), natural-log LSE
        let kv = PagedKv::new(desc, &k, &v)?;
        let mut out = vec![bf16::ZERO; q.len()]; // [batch, num_qo_heads, head_dim]
        reference::batch_decode(&q, &kv, &table, heads, &params, &mut out, None)?;

        // The GPU: kernels are compiled by NVRTC on first use (then cached on disk);
        // plan() runs on the host from the page table, run() only launches.
        if Device::count() > 0 {
            let dev = Device::new(0)?;
            let cfg = DecodeConfig {
                heads,
                q_dtype: DType::BF16,
                kv_dtype: DType::BF16,
                params,
                allow_split: true,
            };
            let mut decode = BatchDecode::new(&dev, cfg)?;
            let s = dev.stream();
            let (q_d, k_d, v_d) = (s.clone_htod(&q)?, s.clone_htod(&k)?, s.clone_htod(&v)?);
            let kv_indices = s.clone_htod(table.kv_indices())?;
            let mut out_d = s.alloc_zeros::<bf16>(q.len())?;
            decode.plan(&table)?;
            decode.run(
                DevSlice::new(&q_d, s),
                DevSlice::new(&k_d, s),
                DevSlice::new(&v_d, s),
                &desc,
                DevSlice::new(&kv_indices, s),
                DevSliceMut::new(&mut out_d, s),
                None,
            )?;
            let gpu: Vec<f32> = s.clone_dtoh(&out_d)?.iter().map(|x| x.to_f32()).collect();
            let cpu: Vec<f64> = out.iter().map(|x| x.to_f64()).collect();
            let err = reference::rel_l2_error(&gpu, &cpu);
            println!("GPU vs CPU backend: relative L2 error {err:.1e}");
            assert!(err <= 1e-2);
        }
        Ok(())
    }
    // README-END

    #[test]
    fn readme_example_runs() {
        main().expect("the README example runs");
    }
}

/// The example between the markers above, unindented.
fn example_source() -> String {
    let this_file = include_str!("readme.rs");
    let begin = this_file
        .find("    // README-BEGIN\n")
        .expect("begin marker")
        + "    // README-BEGIN\n".len();
    let end = this_file.find("    // README-END\n").expect("end marker");
    this_file[begin..end]
        .lines()
        .map(|l| l.strip_prefix("    ").unwrap_or(l))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn readme_shows_the_tested_example() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md");
    let readme = std::fs::read_to_string(path).expect("README.md at the repository root");
    let example = example_source();
    assert!(
        readme.contains(&format!("```rust\n{example}\n```")),
        "README.md's Rust example differs from crates/flashinfer-cli/tests/readme.rs; paste this \
         into README.md:\n```rust\n{example}\n```"
    );
}
