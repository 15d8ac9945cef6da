//! `flashinfer bench decode`: batch decode on a paged KV cache, checked, then timed.

use std::path::PathBuf;
use std::sync::Arc;

use flashinfer::cuda::{DevSlice, DevSliceMut, Device, DeviceRepr};
use flashinfer::decode::{BatchDecode, DecodeConfig, DecodeTiles};
use flashinfer::layout::{HeadConfig, KvLayout, PageTable, PagedKv, PagedKvDesc};
use flashinfer::random::SplitMix64;
use flashinfer::reference::{self, rel_l2_error};
use flashinfer::{AttentionParams, DType, Element};

use super::timing::Timer;
use super::{npy, parse_heads, HBM_BYTES_PER_S};

#[derive(Debug, clap::Args)]
pub struct DecodeArgs {
    /// Requests in the batch (ignored with --lens-file).
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    /// KV length of every request (ignored with --lens-file).
    #[arg(long, default_value_t = 4096)]
    pub kv_len: usize,
    /// File of per-request KV lengths, whitespace- or newline-separated.
    #[arg(long)]
    pub lens_file: Option<PathBuf>,
    #[arg(long, default_value_t = 16)]
    pub page_size: usize,
    /// Query heads : KV heads.
    #[arg(long, default_value = "32:8")]
    pub heads: String,
    #[arg(long, default_value_t = 128)]
    pub head_dim: usize,
    /// f16 or bf16 (q, KV and output).
    #[arg(long, default_value = "bf16")]
    pub dtype: DType,
    /// nhd or hnd.
    #[arg(long, default_value = "nhd")]
    pub layout: KvLayout,
    /// Timed runs (at least 30).
    #[arg(long, default_value_t = 50)]
    pub runs: usize,
    #[arg(long, default_value_t = 5)]
    pub warmup: usize,
    /// Disable split-KV.
    #[arg(long)]
    pub no_split: bool,
    /// Print one JSON line instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Write the inputs and the output as .npy files into DIR.
    #[arg(long)]
    pub save: Option<PathBuf>,
    /// Kernel: auto (the engine's choice), simt (CUDA cores) or tc (tensor cores).
    #[arg(long, default_value = "auto")]
    pub path: String,
    /// Override the pipeline depth of the chosen kernel (tuning).
    #[arg(long)]
    pub nstage: Option<usize>,
    /// Override the tensor-core kernel's 16-token steps per warp per tile (tuning).
    #[arg(long)]
    pub kt: Option<usize>,
    /// Turn off the L2 prefetch hint of the KV copies (tuning).
    #[arg(long)]
    pub no_prefetch: bool,
    /// Give requests consecutive page ids instead of a shuffled pool (how most published decode
    /// benchmarks lay out the cache; a real cache after some churn is shuffled).
    #[arg(long)]
    pub contiguous_pages: bool,
    /// Seed of the random inputs.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
}

pub fn run(a: DecodeArgs) -> Result<(), String> {
    match a.dtype {
        DType::BF16 => run_typed::<half::bf16>(a),
        DType::F16 => run_typed::<half::f16>(a),
        DType::F32 => Err("decode takes f16 or bf16".into()),
    }
}

fn lens(a: &DecodeArgs) -> Result<Vec<usize>, String> {
    match &a.lens_file {
        None => Ok(vec![a.kv_len; a.batch]),
        Some(p) => {
            let text = std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()))?;
            text.split_whitespace()
                .map(|t| {
                    t.parse::<usize>()
                        .map_err(|_| format!("{}: `{t}` is not a length", p.display()))
                })
                .collect()
        }
    }
}

/// Requests checked against the CPU backend: all when the batch is small, else the first, the
/// last, the longest and a spread of others (the CPU reference of 128 x 8192 takes minutes).
fn checked_requests(lens: &[usize]) -> Vec<usize> {
    let total: usize = lens.iter().sum();
    if total <= 1 << 19 {
        return (0..lens.len()).collect();
    }
    let longest = (0..lens.len()).max_by_key(|&i| lens[i]).unwrap_or(0);
    let mut pick: Vec<usize> = (0..lens.len()).step_by((lens.len() / 8).max(1)).collect();
    pick.extend([lens.len() - 1, longest]);
    pick.sort_unstable();
    pick.dedup();
    pick
}

fn run_typed<T: Element + DeviceRepr>(a: DecodeArgs) -> Result<(), String> {
    let err = |e: flashinfer::Error| e.to_string();
    let lens = lens(&a)?;
    if lens.is_empty() {
        return Err("the batch is empty".into());
    }
    let (hq, hk) = parse_heads(&a.heads)?;
    let heads = HeadConfig::new(hq, hk, a.head_dim).map_err(err)?;
    let dev: Arc<Device> = Device::new(0).map_err(err)?;
    let st = dev.stream().clone();
    let mut rng = SplitMix64::new(a.seed);

    let num_pages = PageTable::pages_needed(&lens, a.page_size);
    let mut ids: Vec<i32> = (0..num_pages as i32).collect();
    if !a.contiguous_pages {
        rng.shuffle(&mut ids);
    }
    let table = PageTable::from_kv_lens(&lens, a.page_size, &ids, num_pages).map_err(err)?;
    let desc = PagedKvDesc::new(a.layout, num_pages, a.page_size, hk, a.head_dim).map_err(err)?;
    let k: Vec<T> = rng.vec(desc.required_len(), 1.0);
    let v: Vec<T> = rng.vec(desc.required_len(), 1.0);
    let q: Vec<T> = rng.vec(lens.len() * hq * a.head_dim, 1.0);
    let params = AttentionParams::default();

    let cfg = DecodeConfig {
        heads,
        q_dtype: T::DTYPE,
        kv_dtype: T::DTYPE,
        params,
        allow_split: !a.no_split,
    };
    let g = heads.group_size();
    let tiles = match a.path.as_str() {
        "auto" => DecodeTiles::choose(a.head_dim, g, T::DTYPE, T::DTYPE),
        "simt" => DecodeTiles::simt(a.head_dim, g, T::DTYPE, T::DTYPE),
        "tc" => DecodeTiles::tensor_core(a.head_dim, g, T::DTYPE, T::DTYPE),
        other => return Err(format!("--path `{other}`: expected auto, simt or tc")),
    };
    let mut tiles = tiles;
    if let Some(n) = a.nstage {
        tiles.nstage = n;
    }
    if let (Some(kt), flashinfer::decode::DecodePath::TensorCore) = (a.kt, tiles.path) {
        tiles.passes = kt;
    }
    tiles.l2_prefetch = !a.no_prefetch;
    let mut op = BatchDecode::with_tiles(&dev, cfg, tiles).map_err(err)?;
    op.plan(&table).map_err(err)?;
    let d = |e: flashinfer::cuda::DriverError| e.to_string();
    let dq = st.clone_htod(&q).map_err(d)?;
    let dk = st.clone_htod(&k).map_err(d)?;
    let dv = st.clone_htod(&v).map_err(d)?;
    let di = st.clone_htod(table.kv_indices()).map_err(d)?;
    let mut dout = st
        .clone_htod(&vec![T::from_f32(f32::NAN); q.len()])
        .map_err(d)?;
    let run_once = |dout: &mut flashinfer::cuda::CudaSlice<T>| {
        op.run(
            DevSlice::new(&dq, &st),
            DevSlice::new(&dk, &st),
            DevSlice::new(&dv, &st),
            &desc,
            DevSlice::new(&di, &st),
            DevSliceMut::new(dout, &st),
            None,
        )
        .map_err(err)
    };

    // Check against the CPU backend before timing.
    run_once(&mut dout)?;
    st.synchronize().map_err(d)?;
    let out: Vec<T> = st.clone_dtoh(&dout).map_err(d)?;
    let pool = PagedKv::new(desc, &k, &v).map_err(err)?;
    let row = hq * a.head_dim;
    let mut worst = 0f64;
    let checked = checked_requests(&lens);
    for &r in &checked {
        let sub = PageTable::new(
            &[0, table.pages(r).len() as i32],
            table.pages(r),
            &[table.kv_last_page_len()[r]],
            a.page_size,
            num_pages,
        )
        .map_err(err)?;
        let q32: Vec<f32> = q[r * row..(r + 1) * row]
            .iter()
            .map(|x| x.to_f32())
            .collect();
        let mut want = vec![0f32; row];
        reference::batch_decode(&q32, &pool, &sub, heads, &params, &mut want, None).map_err(err)?;
        let got: Vec<f32> = out[r * row..(r + 1) * row]
            .iter()
            .map(|x| x.to_f32())
            .collect();
        let want64: Vec<f64> = want.iter().map(|&x| x as f64).collect();
        let e = if lens[r] == 0 {
            if got.iter().all(|&x| x == 0.0) {
                0.0
            } else {
                f64::INFINITY
            }
        } else {
            rel_l2_error(&got, &want64)
        };
        worst = worst.max(e);
    }
    let tol = if T::DTYPE == DType::BF16 { 1e-2 } else { 2e-3 };
    if worst > tol {
        return Err(format!(
            "result check failed: rel L2 error {worst:.3e} > {tol:.0e}"
        ));
    }

    if let Some(dir) = &a.save {
        save(dir, &a, &lens, &table, &desc, &q, &k, &v, &out, hq)?;
    }

    let mut timer = Timer::new(&dev)?;
    let stats = timer.time(a.warmup, a.runs.max(30), || run_once(&mut dout))?;
    let esz = T::DTYPE.size_bytes() as f64;
    let kv_bytes = lens.iter().sum::<usize>() as f64 * (hk * a.head_dim) as f64 * 2.0 * esz;
    let bytes = kv_bytes + 2.0 * q.len() as f64 * esz + table.kv_indices().len() as f64 * 4.0;
    let secs = stats.median_us * 1e-6;
    let floor_us = bytes / HBM_BYTES_PER_S * 1e6;
    let tbps = bytes / secs / 1e12;
    let pct = floor_us / stats.median_us * 100.0;
    let split = op
        .schedule()
        .chunk_size
        .map_or("none".to_string(), |c| c.to_string());
    let total: usize = lens.iter().sum();
    let name = if a.lens_file.is_some() {
        format!("{} reqs, {} tokens", lens.len(), total)
    } else {
        format!("{} x {}", a.batch, a.kv_len)
    };
    if a.json {
        println!(
            "{{\"op\":\"decode\",\"gpu\":\"{}\",\"batch\":{},\"total_kv\":{},\"kv_len\":{},\"page_size\":{},\"kernel\":\"{}\",\"heads\":\"{}:{}\",\"head_dim\":{},\"dtype\":\"{}\",\"layout\":\"{}\",\"pages\":\"{}\",\"split_chunk\":\"{}\",\"work_items\":{},\"median_us\":{:.2},\"min_us\":{:.2},\"max_us\":{:.2},\"runs\":{},\"bytes\":{},\"tb_per_s\":{:.3},\"floor_us\":{:.2},\"pct_of_floor\":{:.1},\"check_rel_err\":{:.3e},\"checked_requests\":{}}}",
            dev.info().name, lens.len(), total, if a.lens_file.is_some() { 0 } else { a.kv_len }, a.page_size, op.tiles().name(), hq, hk, a.head_dim, T::DTYPE, a.layout, if a.contiguous_pages { "contiguous" } else { "shuffled" }, split,
            op.schedule().work.len(), stats.median_us, stats.min_us, stats.max_us, stats.runs, bytes as u64, tbps, floor_us, pct, worst, checked.len()
        );
    } else {
        println!(
            "decode {name}  page {}  heads {hq}:{hk}  d{}  {}  {}  on {}",
            a.page_size,
            a.head_dim,
            T::DTYPE,
            a.layout,
            dev.info().name
        );
        println!(
            "  kernel {}  split chunk {split}  work items {}",
            op.tiles().name(),
            op.schedule().work.len()
        );
        println!(
            "  check: {} requests vs CPU backend, worst rel L2 {worst:.2e} (tol {tol:.0e})",
            checked.len()
        );
        println!(
            "  median {:.1} us (min {:.1}, max {:.1}, {} runs, L2 flushed)  {:.2} TB/s  floor {:.1} us  {:.1}% of floor",
            stats.median_us, stats.min_us, stats.max_us, stats.runs, tbps, floor_us, pct
        );
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn save<T: Element>(
    dir: &std::path::Path,
    a: &DecodeArgs,
    lens: &[usize],
    table: &PageTable,
    desc: &PagedKvDesc,
    q: &[T],
    k: &[T],
    v: &[T],
    out: &[T],
    hq: usize,
) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let f = |x: &[T]| x.iter().map(|e| e.to_f32()).collect::<Vec<f32>>();
    let (np, ps, hk, d) = (
        desc.num_pages,
        desc.page_size,
        desc.num_kv_heads,
        desc.head_dim,
    );
    let page_shape: Vec<usize> = match a.layout {
        KvLayout::Nhd => vec![np, ps, hk, d],
        KvLayout::Hnd => vec![np, hk, ps, d],
    };
    npy::write_f32(&dir.join("q.npy"), &[lens.len(), hq, a.head_dim], &f(q))?;
    npy::write_f32(&dir.join("k_cache.npy"), &page_shape, &f(k))?;
    npy::write_f32(&dir.join("v_cache.npy"), &page_shape, &f(v))?;
    npy::write_f32(&dir.join("out.npy"), &[lens.len(), hq, a.head_dim], &f(out))?;
    npy::write_i32(
        &dir.join("kv_indptr.npy"),
        &[table.kv_indptr().len()],
        table.kv_indptr(),
    )?;
    npy::write_i32(
        &dir.join("kv_indices.npy"),
        &[table.kv_indices().len()],
        table.kv_indices(),
    )?;
    npy::write_i32(
        &dir.join("kv_last_page_len.npy"),
        &[lens.len()],
        table.kv_last_page_len(),
    )?;
    let meta = format!(
        "{{\"op\": \"batch_decode\", \"dtype\": \"{}\", \"layout\": \"{}\", \"page_size\": {ps}, \
         \"num_qo_heads\": {hq}, \"num_kv_heads\": {hk}, \"head_dim\": {d}, \"sm_scale\": {}}}\n",
        a.dtype,
        a.layout,
        1.0 / (d as f64).sqrt(),
    );
    std::fs::write(dir.join("meta.json"), meta).map_err(|e| e.to_string())?;
    let note = format!(
        "flashinfer bench decode: inputs and output. Values are the {} tensors widened exactly to \
         float32; meta.json has the shapes and scale. out[b, h] = softmax(q[b, h] . K^T * sm_scale) V \
         over request b's tokens, query head h reading KV head h / {}. scripts/check_decode_npy.py \
         recomputes it with NumPy.\n",
        a.dtype,
        hq / hk,
    );
    std::fs::write(dir.join("README.txt"), note).map_err(|e| e.to_string())
}
