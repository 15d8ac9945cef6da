//! `flashinfer bench decode`: batch decode on a paged KV cache, checked, then timed.

use std::path::PathBuf;
use std::sync::Arc;

use flashinfer::cuda::{CudaSlice, DevSlice, DevSliceMut, Device, DeviceRepr, Graph};
use flashinfer::decode::{BatchDecode, DecodeConfig, DecodeTiles, GraphLimits};
use flashinfer::layout::{HeadConfig, KvLayout, PageTable, PagedKv, PagedKvDesc, Ragged};
use flashinfer::random::SplitMix64;
use flashinfer::reference::{self, rel_l2_error};
use flashinfer::rope::RopeApply;
use flashinfer::variant::{rope_rotate, Rope};
use flashinfer::{AttentionParams, DType, Element, MaskMode};

use super::timing::{Flush, Stats, Timer, ROTATE_BYTES};
use super::variant_args::{VariantArgs, VariantValues};
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
    /// Turn off the L2 prefetch hint of the KV copies (tuning; the producer-warp kernel runs
    /// without it anyway).
    #[arg(long, conflicts_with = "prefetch")]
    pub no_prefetch: bool,
    /// Turn on the L2 prefetch hint of the KV copies (tuning; the block-wide loaders have it).
    #[arg(long)]
    pub prefetch: bool,
    /// Give requests consecutive page ids instead of a shuffled pool (how most published decode
    /// benchmarks lay out the cache; a real cache after some churn is shuffled).
    #[arg(long)]
    pub contiguous_pages: bool,
    /// Seed of the random inputs.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Also time a CUDA graph of N decode layers: N KV caches of the same shape (fresh random
    /// data each), one plan() of a CUDA-graph-mode op, N run()s (each into its own output)
    /// captured in one graph and replayed with the L2 flushed before each replay; prints the
    /// time per layer (replay / N) beside the single run's. Needs the engine's kernel (no
    /// --path/--nstage/--kt/--no-prefetch) and N caches' memory on the GPU.
    #[arg(long)]
    pub graph_layers: Option<usize>,
    /// Attention variants (--softcap, --window, --alibi, --sinks, --rope), in any combination.
    #[command(flatten)]
    pub variant: VariantArgs,
    /// The unfused baseline of --rope (same offsets): a separate kernel rotates the cached keys
    /// into a copy of the pool and the queries into a copy, then the decode (with the other
    /// variant flags, if any) reads the copies; the three launches are timed together.
    #[arg(long, conflicts_with = "rope")]
    pub rope_separate: bool,
    /// Batch-invariant mode: split every request longer than N tokens into N-token chunks,
    /// whatever the rest of the batch (N a positive multiple of the library's CHUNK_ALIGN, 64).
    #[arg(long, value_name = "N")]
    pub fixed_chunk: Option<usize>,
    /// How L2 is kept cold between timed runs: `write` (a 256 MB write before each run) or
    /// `rotate` (each run reads the next of several copies of the KV pool, 256 MB or more in
    /// all, after an untimed run on another copy; no flush, so no dirty lines for the timed
    /// kernel to write back).
    #[arg(long, value_enum, default_value = "write")]
    pub flush: Flush,
}

/// How a run applies RoPE.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RopeMode {
    None,
    Fused,
    Separate,
}

impl RopeMode {
    fn of(a: &DecodeArgs) -> Self {
        match (a.variant.rope, a.rope_separate) {
            (true, _) => RopeMode::Fused,
            (false, true) => RopeMode::Separate,
            (false, false) => RopeMode::None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            RopeMode::None => "none",
            RopeMode::Fused => "fused",
            RopeMode::Separate => "separate",
        }
    }
}

/// The separate RoPE pass of `--rope-separate`: its two ops (keys of the pool, queries) and the
/// rotated copies the decode reads.
struct SeparateRope<T> {
    keys: RopeApply,
    queries: RopeApply,
    q_desc: PagedKvDesc,
    k_rot: CudaSlice<T>,
    q_rot: CudaSlice<T>,
}

impl<T: Element + DeviceRepr> SeparateRope<T> {
    /// Plans the rotation of `table`'s keys (request `r` from `offsets[r]`) and of each request's
    /// query (at its last key's position; an empty request's query, whose output is zeros
    /// whatever it is, at its offset).
    fn new(
        dev: &Arc<Device>,
        table: &PageTable,
        desc: &PagedKvDesc,
        heads: HeadConfig,
        offsets: &[i32],
    ) -> Result<Self, String> {
        let err = |e: flashinfer::Error| e.to_string();
        let d = |e: flashinfer::cuda::DriverError| e.to_string();
        let rope = Rope::default();
        let mut keys = RopeApply::new(dev, T::DTYPE).map_err(err)?;
        keys.plan(table, desc, rope, Some(offsets)).map_err(err)?;
        // The queries `[batch, num_qo_heads, head_dim]` are a pool of one-slot pages, one per
        // request.
        let batch = table.batch_size();
        let q_desc = PagedKvDesc::new(KvLayout::Nhd, batch, 1, heads.num_qo_heads, heads.head_dim)
            .map_err(err)?;
        let ids: Vec<i32> = (0..batch as i32).collect();
        let q_table = PageTable::from_kv_lens(&vec![1; batch], 1, &ids, batch).map_err(err)?;
        let q_pos: Vec<i32> = table
            .kv_lens()
            .iter()
            .zip(offsets)
            .map(|(&l, &o)| o + l.saturating_sub(1) as i32)
            .collect();
        let mut queries = RopeApply::new(dev, T::DTYPE).map_err(err)?;
        queries
            .plan(&q_table, &q_desc, rope, Some(&q_pos))
            .map_err(err)?;
        // The copies start as NaN: a slot the pass failed to write fails the checks.
        let st = dev.stream();
        let nan = |n: usize| st.clone_htod(&vec![T::from_f32(f32::NAN); n]).map_err(d);
        Ok(Self {
            keys,
            queries,
            q_desc,
            k_rot: nan(desc.required_len())?,
            q_rot: nan(q_desc.required_len())?,
        })
    }

    /// Rotates the keys of `dk` and the queries of `dq` into the copies.
    fn run(
        &mut self,
        st: &Arc<flashinfer::cuda::CudaStream>,
        dq: &CudaSlice<T>,
        dk: &CudaSlice<T>,
        desc: &PagedKvDesc,
    ) -> Result<(), String> {
        let err = |e: flashinfer::Error| e.to_string();
        self.keys
            .run(
                DevSlice::new(dk, st),
                DevSliceMut::new(&mut self.k_rot, st),
                desc,
            )
            .map_err(err)?;
        self.queries
            .run(
                DevSlice::new(dq, st),
                DevSliceMut::new(&mut self.q_rot, st),
                &self.q_desc,
            )
            .map_err(err)
    }
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
    let rope_mode = RopeMode::of(&a);
    // --rope-separate's reference rotates as --rope does (same offsets); its decode runs without
    // RoPE (below).
    let mut variant_args = a.variant.clone();
    variant_args.rope |= rope_mode == RopeMode::Separate;
    // Flags are checked before the GPU is opened, so that a bad one is the error reported.
    variant_args.check(heads, lens.len())?;
    if (variant_args.any() || a.fixed_chunk.is_some())
        && (a.graph_layers.is_some() || a.save.is_some())
    {
        return Err(
            "the variant flags (--rope, --rope-separate, --softcap, --window, --alibi, \
                    --sinks) and --fixed-chunk time the single run: drop --graph-layers and --save"
                .into(),
        );
    }
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
    // Drawn after the inputs, so that these are the inputs of a plain run with the same seed.
    let variant = variant_args.build(heads, lens.len(), &mut rng)?;
    let offsets = variant.rope_offsets().unwrap_or_default();

    let cfg = DecodeConfig {
        heads,
        q_dtype: T::DTYPE,
        kv_dtype: T::DTYPE,
        params,
        allow_split: !a.no_split,
    };
    let g = heads.group_size();
    let tiles = match a.path.as_str() {
        "auto" => DecodeTiles::choose(a.head_dim, g, T::DTYPE, T::DTYPE).for_arch(dev.arch()),
        "simt" => DecodeTiles::simt(a.head_dim, g, T::DTYPE, T::DTYPE),
        "tc" => DecodeTiles::tensor_core(a.head_dim, g, T::DTYPE, T::DTYPE),
        other => return Err(format!("--path `{other}`: expected auto, simt or tc")),
    };
    // Fused RoPE runs without the producer warp (BatchDecode::set_variant): leave it now, so that
    // the tuning flags below apply to the kernel that runs (set_variant keeps them then).
    let mut tiles = if rope_mode == RopeMode::Fused {
        tiles.for_fused_rope()
    } else {
        tiles
    };
    if let Some(n) = a.nstage {
        tiles.nstage = n;
    }
    if let (Some(kt), flashinfer::decode::DecodePath::TensorCore) = (a.kt, tiles.path) {
        tiles.passes = kt;
    }
    if a.no_prefetch {
        tiles.l2_prefetch = false;
    }
    if a.prefetch {
        tiles.l2_prefetch = true;
    }
    let mut op = BatchDecode::with_tiles(&dev, cfg, tiles).map_err(err)?;
    // The separate pass does the rotation of --rope-separate; the decode the rest.
    let op_variant = match rope_mode {
        RopeMode::Separate => variant.without_rope(),
        _ => variant.variant(),
    };
    if !op_variant.is_plain() {
        op.set_variant(&op_variant).map_err(err)?;
    }
    // A bad N is the library's typed error (a positive multiple of its chunk alignment).
    if let Some(n) = a.fixed_chunk {
        op.set_batch_invariant(Some(n)).map_err(err)?;
    }
    op.plan(&table).map_err(err)?;
    let d = |e: flashinfer::cuda::DriverError| e.to_string();
    let dq = st.clone_htod(&q).map_err(d)?;
    let dk = st.clone_htod(&k).map_err(d)?;
    let dv = st.clone_htod(&v).map_err(d)?;
    let di = st.clone_htod(table.kv_indices()).map_err(d)?;
    let mut dout = st
        .clone_htod(&vec![T::from_f32(f32::NAN); q.len()])
        .map_err(d)?;
    let checked = checked_requests(&lens);
    let tol = if T::DTYPE == DType::BF16 { 1e-2 } else { 2e-3 };
    // --rope-separate: the separate pass, its rotated keys checked against the CPU's rotation
    // before anything is timed.
    let mut separate = match rope_mode {
        RopeMode::Separate => {
            let mut sep = SeparateRope::<T>::new(&dev, &table, &desc, heads, offsets)?;
            sep.run(&st, &dq, &dk, &desc)?;
            st.synchronize().map_err(d)?;
            let k_rot: Vec<T> = st.clone_dtoh(&sep.k_rot).map_err(d)?;
            let worst = check_rotated_keys(&k, &k_rot, &table, &desc, offsets, &checked)?;
            if worst > tol {
                return Err(format!(
                    "rotated keys check failed: rel L2 error {worst:.3e} > {tol:.0e}"
                ));
            }
            Some(sep)
        }
        _ => None,
    };
    // --flush rotate: copies of the pool beside the first, 256 MB or more in all; run i reads
    // copy i mod n (same bytes, so the check of the first run holds for every copy).
    let mut pools = vec![(dk, dv)];
    if a.flush == Flush::Rotate {
        let pool_bytes = 2 * desc.required_len() * T::DTYPE.size_bytes();
        // At least two: the untimed call before each timed one reads the other copy.
        let copies = ROTATE_BYTES.div_ceil(pool_bytes.max(1)).max(2);
        for _ in 1..copies {
            pools.push((st.clone_htod(&k).map_err(d)?, st.clone_htod(&v).map_err(d)?));
        }
    }
    let mut run_index = 0usize;
    let mut run_once = |dout: &mut flashinfer::cuda::CudaSlice<T>| {
        let (dk, dv) = &pools[run_index % pools.len()];
        run_index += 1;
        let (q_in, k_in) = match &mut separate {
            Some(sep) => {
                sep.run(&st, &dq, dk, &desc)?;
                (&sep.q_rot, &sep.k_rot)
            }
            None => (&dq, dk),
        };
        op.run(
            DevSlice::new(q_in, &st),
            DevSlice::new(k_in, &st),
            DevSlice::new(dv, &st),
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
    let worst = check_variant(
        &q, &k, &v, &out, &table, &desc, heads, &params, &checked, &variant,
    )?;
    if worst > tol {
        return Err(format!(
            "result check failed: rel L2 error {worst:.3e} > {tol:.0e}"
        ));
    }

    if let Some(dir) = &a.save {
        save(dir, &a, &lens, &table, &desc, &q, &k, &v, &out, hq)?;
    }

    let stats =
        Timer::with_flush(&dev, a.flush)?.time(a.warmup, a.runs.max(30), || run_once(&mut dout))?;
    // (Graph replays always follow a 256 MB write: their N caches are N distinct pools.)
    let mut timer = Timer::new(&dev)?;
    let graph = match a.graph_layers {
        Some(layers) => Some(time_graph_layers::<T>(
            &a, layers, &dev, cfg, &tiles, &table, &desc, heads, &mut rng, &mut timer,
        )?),
        None => None,
    };
    let esz = T::DTYPE.size_bytes() as f64;
    // A sliding window is planned: a request reads only the window's last window_left + 1 keys.
    let read_tokens: usize = lens
        .iter()
        .map(|&l| a.variant.window.map_or(l, |w| l.min(w.saturating_add(1))))
        .sum();
    let kv_bytes = read_tokens as f64 * (hk * a.head_dim) as f64 * 2.0 * esz;
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
            "{{\"op\":\"decode\",\"gpu\":\"{}\",\"gpu_uuid\":\"{}\",\"batch\":{},\"total_kv\":{},\"kv_len\":{},\"page_size\":{},\"kernel\":\"{}\",\"heads\":\"{}:{}\",\"head_dim\":{},\"dtype\":\"{}\",\"layout\":\"{}\",\"pages\":\"{}\",\"split_chunk\":\"{}\",\"work_items\":{},\"median_us\":{:.2},\"min_us\":{:.2},\"max_us\":{:.2},\"runs\":{},\"bytes\":{},\"tb_per_s\":{:.3},\"floor_us\":{:.2},\"pct_of_floor\":{:.1},\"check_rel_err\":{:.3e},\"checked_requests\":{},\"rope\":\"{}\"{},\"fixed_chunk\":{},\"flush\":\"{}\"{}}}",
            dev.info().name, dev.info().uuid, lens.len(), total, if a.lens_file.is_some() { 0 } else { a.kv_len }, a.page_size, op.tiles().name(), hq, hk, a.head_dim, T::DTYPE, a.layout, if a.contiguous_pages { "contiguous" } else { "shuffled" }, split,
            op.schedule().work.len(), stats.median_us, stats.min_us, stats.max_us, stats.runs, bytes as u64, tbps, floor_us, pct, worst, checked.len(), rope_mode.name(),
            variant.json(), a.fixed_chunk.map_or("null".to_string(), |n| n.to_string()), a.flush.name(),
            graph.as_ref().map_or(String::new(), |g| g.json(&stats))
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
            "  kernel {}  split chunk {split}{}  work items {}",
            op.tiles().name(),
            if a.fixed_chunk.is_some() {
                " (fixed: batch-invariant)"
            } else {
                ""
            },
            op.schedule().work.len()
        );
        if !variant.is_plain() {
            println!("  {}", variant.describe());
        }
        match rope_mode {
            RopeMode::None => {}
            RopeMode::Fused => println!(
                "  rope: fused (base 1e4, scale 1, offsets in [0, 1000))"
            ),
            RopeMode::Separate => println!(
                "  rope: separate pass (keys into a copy of the pool, queries into a copy, then the \
                 plain decode; timed together; floor and TB/s count the decode's bytes only)"
            ),
        }
        println!(
            "  check: {} requests vs CPU backend, worst rel L2 {worst:.2e} (tol {tol:.0e})",
            checked.len()
        );
        println!(
            "  median {:.1} us (min {:.1}, max {:.1}, {} runs, L2 flushed)  {:.2} TB/s  floor {:.1} us  {:.1}% of floor",
            stats.median_us, stats.min_us, stats.max_us, stats.runs, tbps, floor_us, pct
        );
        if let Some(g) = &graph {
            g.print(&stats);
        }
    }
    Ok(())
}

/// Worst relative L2 error of `out` against the CPU backend over the `checked` requests, each
/// recomputed alone (a table of its own pages), empty requests required to be exact zeros.
#[allow(clippy::too_many_arguments)]
fn check<T: Element>(
    q: &[T],
    k: &[T],
    v: &[T],
    out: &[T],
    table: &PageTable,
    desc: &PagedKvDesc,
    heads: HeadConfig,
    params: &AttentionParams,
    checked: &[usize],
) -> Result<f64, String> {
    let plain = VariantValues::default();
    check_variant(q, k, v, out, table, desc, heads, params, checked, &plain)
}

/// [`check`] with `variant` (RoPE's request `r` from its offset `r`), which the CPU backend
/// computes exactly.
#[allow(clippy::too_many_arguments)]
fn check_variant<T: Element>(
    q: &[T],
    k: &[T],
    v: &[T],
    out: &[T],
    table: &PageTable,
    desc: &PagedKvDesc,
    heads: HeadConfig,
    params: &AttentionParams,
    checked: &[usize],
    variant: &VariantValues,
) -> Result<f64, String> {
    let err = |e: flashinfer::Error| e.to_string();
    let pool = PagedKv::new(*desc, k, v).map_err(err)?;
    let row = heads.num_qo_heads * heads.head_dim;
    let kv_lens = table.kv_lens();
    let mut worst = 0f64;
    for &r in checked {
        let sub = PageTable::new(
            &[0, table.pages(r).len() as i32],
            table.pages(r),
            &[table.kv_last_page_len()[r]],
            table.page_size(),
            desc.num_pages,
        )
        .map_err(err)?;
        let q32: Vec<f32> = q[r * row..(r + 1) * row]
            .iter()
            .map(|x| x.to_f32())
            .collect();
        let mut want = vec![0f32; row];
        if variant.is_plain() {
            reference::batch_decode(&q32, &pool, &sub, heads, params, &mut want, None)
                .map_err(err)?
        } else {
            // Decode is one query per request under the causal mask, at position kv_len - 1.
            reference::batch_attention_paged(
                &q32,
                &Ragged::from_lens(&[1]),
                &pool,
                &sub,
                heads,
                MaskMode::Causal,
                params,
                &variant.for_request(r),
                &mut want,
                None,
            )
            .map_err(err)?
        }
        let got: Vec<f32> = out[r * row..(r + 1) * row]
            .iter()
            .map(|x| x.to_f32())
            .collect();
        let want64: Vec<f64> = want.iter().map(|&x| x as f64).collect();
        let e = if kv_lens[r] == 0 {
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
    Ok(worst)
}

/// Worst relative L2 error, per checked request and KV head, of the keys `k_rot` that the separate
/// RoPE pass wrote against the CPU's rotation (`variant::rope_rotate`, in f64) of the original
/// keys `k`: key `j` of request `r` at position `offsets[r] + j`.
fn check_rotated_keys<T: Element>(
    k: &[T],
    k_rot: &[T],
    table: &PageTable,
    desc: &PagedKvDesc,
    offsets: &[i32],
    checked: &[usize],
) -> Result<f64, String> {
    let rope = Rope::default();
    let d = desc.head_dim;
    let mut worst = 0f64;
    for &r in checked {
        for h in 0..desc.num_kv_heads {
            let (mut got, mut want) = (Vec::new(), Vec::new());
            for j in 0..table.kv_len(r) {
                let (page, slot) = table.locate(r, j);
                let at = desc.k_offset(page, slot, h);
                let mut x: Vec<f32> = k[at..at + d].iter().map(|e| e.to_f32()).collect();
                rope_rotate(&mut x, (offsets[r] as usize + j) as f64, &rope);
                want.extend(x.iter().map(|&e| e as f64));
                got.extend(k_rot[at..at + d].iter().map(|e| e.to_f32()));
            }
            if !want.is_empty() {
                worst = worst.max(rel_l2_error(&got, &want));
            }
        }
    }
    Ok(worst)
}

/// What `--graph-layers` measured.
struct GraphTiming {
    layers: usize,
    /// Replays of the whole graph (all layers).
    replay: Stats,
    /// One run of the CUDA-graph-mode op on its own (its grid has room for the most work items
    /// any plan of the batch makes, so it may launch more blocks than the plain op).
    graph_op_single: Stats,
    /// Worst error of the checked layer against the CPU backend.
    check_err: f64,
    checked_layer: usize,
}

impl GraphTiming {
    fn per_layer_us(&self) -> f64 {
        self.replay.median_us / self.layers as f64
    }

    fn print(&self, single: &Stats) {
        let per_layer = self.per_layer_us();
        println!(
            "  graph of {} layers: replay median {:.1} us (min {:.1}, max {:.1}, {} replays, L2 flushed)  \
             {per_layer:.1} us per layer = {:.3} x the single run ({:.1} us)",
            self.layers,
            self.replay.median_us,
            self.replay.min_us,
            self.replay.max_us,
            self.replay.runs,
            per_layer / single.median_us,
            single.median_us
        );
        println!(
            "  graph-mode op alone: median {:.1} us; layer {} checked vs CPU backend, worst rel L2 {:.2e}",
            self.graph_op_single.median_us, self.checked_layer, self.check_err
        );
    }

    /// Fields appended to the JSON line.
    fn json(&self, single: &Stats) -> String {
        format!(
            ",\"graph_layers\":{},\"graph_replay_median_us\":{:.2},\"graph_replay_min_us\":{:.2},\"graph_replays\":{},\"graph_per_layer_us\":{:.2},\"graph_per_layer_vs_single\":{:.4},\"graph_op_single_us\":{:.2},\"graph_check_rel_err\":{:.3e}",
            self.layers,
            self.replay.median_us,
            self.replay.min_us,
            self.replay.runs,
            self.per_layer_us(),
            self.per_layer_us() / single.median_us,
            self.graph_op_single.median_us,
            self.check_err
        )
    }
}

/// `--graph-layers`: `layers` decode layers of the batch `table` describes, each over its own KV
/// cache (same shape, fresh random data) and queries, into its own output; one plan() of a
/// CUDA-graph-mode op (a serving loop's), every layer's run() captured in one graph. The last
/// layer is checked against the CPU backend and every output for NaN (outputs start poisoned)
/// before timing.
#[allow(clippy::too_many_arguments)]
fn time_graph_layers<T: Element + DeviceRepr>(
    a: &DecodeArgs,
    layers: usize,
    dev: &Arc<Device>,
    cfg: DecodeConfig,
    tiles: &DecodeTiles,
    table: &PageTable,
    desc: &PagedKvDesc,
    heads: HeadConfig,
    rng: &mut SplitMix64,
    timer: &mut Timer,
) -> Result<GraphTiming, String> {
    let err = |e: flashinfer::Error| e.to_string();
    let d = |e: flashinfer::cuda::DriverError| e.to_string();
    if layers == 0 {
        return Err("--graph-layers must be at least 1".into());
    }
    let st = dev.stream().clone();
    let esz = T::DTYPE.size_bytes();
    let q_len = table.batch_size() * heads.num_qo_heads * heads.head_dim;
    let cache_bytes = 2 * desc.required_len() * esz;
    // Each layer: its K and V caches, its queries and its output.
    let need = layers * (cache_bytes + 2 * q_len * esz);
    // Room for the op's workspace, the graph and the allocator's rounding.
    let margin = 512 << 20;
    let (free, total) = dev.context().mem_get_info().map_err(d)?;
    let gib = |b: usize| b as f64 / (1u64 << 30) as f64;
    if need + margin > free {
        return Err(format!(
            "--graph-layers {layers}: {layers} layers of {:.2} GiB of KV cache each need {:.1} GiB, \
             and the GPU has {:.1} GiB free of {:.1} GiB; use fewer layers or a smaller batch",
            gib(cache_bytes),
            gib(need),
            gib(free),
            gib(total)
        ));
    }

    let limits = GraphLimits {
        max_batch: table.batch_size(),
        max_pages: table.kv_indices().len(),
    };
    let mut op = BatchDecode::for_cuda_graph(dev, cfg, limits).map_err(err)?;
    if op.tiles() != tiles {
        return Err(format!(
            "--graph-layers runs the engine's kernel {}, the single run used {}: drop \
             --path/--nstage/--kt/--no-prefetch to compare them",
            op.tiles().name(),
            tiles.name()
        ));
    }
    op.plan(table).map_err(err)?;
    let di = st.clone_htod(table.kv_indices()).map_err(d)?;

    // Every layer gets its own device buffers (so no layer's KV is served from L2 by another's),
    // uploaded from one set of fresh random host data: generating 32 GB of random numbers on
    // the host would take minutes and the kernel's time does not depend on the values.
    let k: Vec<T> = rng.vec(desc.required_len(), 1.0);
    let v: Vec<T> = rng.vec(desc.required_len(), 1.0);
    let q: Vec<T> = rng.vec(q_len, 1.0);
    let (mut dqs, mut dks, mut dvs, mut douts) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..layers {
        dks.push(st.clone_htod(&k).map_err(d)?);
        dvs.push(st.clone_htod(&v).map_err(d)?);
        dqs.push(st.clone_htod(&q).map_err(d)?);
        douts.push(
            st.clone_htod(&vec![T::from_f32(f32::NAN); q_len])
                .map_err(d)?,
        );
    }
    let kept = Some((q, k, v));
    let checked_layer = layers - 1;
    let (q, k, v) = kept.ok_or("no layer was built")?;

    let run_layer = |l: usize, out: &mut CudaSlice<T>| {
        op.run(
            DevSlice::new(&dqs[l], &st),
            DevSlice::new(&dks[l], &st),
            DevSlice::new(&dvs[l], &st),
            desc,
            DevSlice::new(&di, &st),
            DevSliceMut::new(out, &st),
            None,
        )
    };
    let graph = Graph::capture(&st, || {
        for (l, out) in douts.iter_mut().enumerate() {
            run_layer(l, out)?;
        }
        Ok(())
    })
    .map_err(err)?;

    // One replay, checked before timing.
    graph.replay().map_err(err)?;
    st.synchronize().map_err(d)?;
    for (l, out) in douts.iter().enumerate() {
        let host: Vec<T> = st.clone_dtoh(out).map_err(d)?;
        if host.iter().any(|x| x.to_f32().is_nan()) {
            return Err(format!(
                "graph check failed: layer {l}'s output has NaN (left unwritten?)"
            ));
        }
    }
    let out: Vec<T> = st.clone_dtoh(&douts[checked_layer]).map_err(d)?;
    let checked = checked_requests(&table.kv_lens());
    let params = cfg.params;
    let check_err = check(&q, &k, &v, &out, table, desc, heads, &params, &checked)?;
    let tol = if T::DTYPE == DType::BF16 { 1e-2 } else { 2e-3 };
    if check_err > tol {
        return Err(format!(
            "graph check failed: layer {checked_layer} rel L2 error {check_err:.3e} > {tol:.0e}"
        ));
    }

    let runs = a.runs.max(30);
    let graph_op_single = timer.time(a.warmup, runs, || {
        run_layer(checked_layer, &mut douts[checked_layer]).map_err(err)
    })?;
    let replay = timer.time(a.warmup, runs, || graph.replay().map_err(err))?;
    Ok(GraphTiming {
        layers,
        replay,
        graph_op_single,
        check_err,
        checked_layer,
    })
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::variant_args::VariantArgs;

    /// The check recomputes each request alone (its own page table and RoPE offset): the whole
    /// batch computed by the CPU backend passes it under every variant.
    #[test]
    fn the_whole_reference_passes_the_per_request_check() {
        let heads = HeadConfig::new(4, 2, 16).unwrap();
        let lens = [0, 5, 40, 33];
        let num_pages = PageTable::pages_needed(&lens, 16);
        let mut rng = SplitMix64::new(5);
        let mut ids: Vec<i32> = (0..num_pages as i32).collect();
        rng.shuffle(&mut ids);
        let table = PageTable::from_kv_lens(&lens, 16, &ids, num_pages).unwrap();
        let desc = PagedKvDesc::new(KvLayout::Hnd, num_pages, 16, 2, 16).unwrap();
        let k: Vec<f32> = rng.vec(desc.required_len(), 1.0);
        let v: Vec<f32> = rng.vec(desc.required_len(), 1.0);
        let q: Vec<f32> = rng.vec(lens.len() * 4 * 16, 1.0);
        let params = AttentionParams::default();
        let args = VariantArgs {
            softcap: Some(1.5),
            window: Some(20),
            alibi: true,
            sinks: true,
            rope: true,
        };
        let variant = args.build(heads, lens.len(), &mut rng).unwrap();
        let mut out = vec![0f32; q.len()];
        reference::batch_attention_paged(
            &q,
            &Ragged::from_lens(&[1; 4]),
            &PagedKv::new(desc, &k, &v).unwrap(),
            &table,
            heads,
            MaskMode::Causal,
            &params,
            &variant.variant(),
            &mut out,
            None,
        )
        .unwrap();
        let checked: Vec<usize> = (0..lens.len()).collect();
        let worst = check_variant(
            &q, &k, &v, &out, &table, &desc, heads, &params, &checked, &variant,
        )
        .unwrap();
        assert!(worst < 1e-6, "{worst}");
        // And the check sees a variant that is missing: the plain reference fails it.
        let plain = check(&q, &k, &v, &out, &table, &desc, heads, &params, &checked).unwrap();
        assert!(plain > 1e-2, "{plain}");
    }
}
