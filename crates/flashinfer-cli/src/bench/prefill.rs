//! `flashinfer bench prefill`: batch prefill / append on ragged or paged KV, checked, then timed.

use std::path::PathBuf;
use std::sync::Arc;

use flashinfer::cuda::{CudaSlice, DevSlice, DevSliceMut, Device, DeviceRepr};
use flashinfer::layout::{HeadConfig, KvLayout, PageTable, PagedKv, PagedKvDesc, Ragged};
use flashinfer::prefill::{BatchPrefill, PrefillConfig, PrefillKv, PrefillMask, PrefillTiles};
use flashinfer::random::SplitMix64;
use flashinfer::reference::{self, rel_l2_error};
use flashinfer::{AttentionParams, DType, Element, MaskMode};

use super::timing::Timer;
use super::variant_args::{VariantArgs, VariantValues};
use super::{npy, parse_heads, GEMM_FLOPS_PER_S, HBM_BYTES_PER_S};

#[derive(Debug, clap::Args)]
pub struct PrefillArgs {
    /// Requests in the batch (ignored with --lens-file).
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Query tokens per request (ignored with --lens-file).
    #[arg(long, default_value_t = 8192)]
    pub qo_len: usize,
    /// Keys per request; default: qo_len (a prompt). Larger: an append.
    #[arg(long)]
    pub kv_len: Option<usize>,
    /// File of per-request lengths, one `qo_len kv_len` pair per line.
    #[arg(long)]
    pub lens_file: Option<PathBuf>,
    /// Page size of a paged cache; 0: ragged (contiguous) K/V.
    #[arg(long, default_value_t = 0)]
    pub page_size: usize,
    /// Query heads : KV heads.
    #[arg(long, default_value = "32:8")]
    pub heads: String,
    #[arg(long, default_value_t = 128)]
    pub head_dim: usize,
    /// f16 or bf16.
    #[arg(long, default_value = "bf16")]
    pub dtype: DType,
    /// nhd or hnd (paged).
    #[arg(long, default_value = "nhd")]
    pub layout: KvLayout,
    /// causal or none.
    #[arg(long, default_value = "causal")]
    pub mask: String,
    #[arg(long, default_value_t = 30)]
    pub runs: usize,
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
    /// Disable split-KV.
    #[arg(long)]
    pub no_split: bool,
    /// wgmma kernel's producer warpgroup (warp specialisation): auto (the engine's choice), on
    /// or off (tuning).
    #[arg(long, default_value = "auto")]
    pub ws: String,
    /// Persistent blocks (with the producer warpgroup; never for split plans): auto, on or off
    /// (tuning).
    #[arg(long, default_value = "auto")]
    pub persistent: String,
    /// Print one JSON line instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Write the inputs and the output as .npy files into DIR.
    #[arg(long)]
    pub save: Option<PathBuf>,
    /// Matmul backend: auto (the engine's choice), mma (mma.sync, sm_80+) or wgmma (sm_90a).
    #[arg(long, default_value = "auto")]
    pub backend: String,
    /// Force the packed query rows per tile: 16, 64 or 128 for mma; 64, 128 or 192 for wgmma
    /// (tuning).
    #[arg(long)]
    pub cta_q: Option<usize>,
    /// Force the keys per pipeline stage (tuning).
    #[arg(long)]
    pub kv_tile: Option<usize>,
    /// Force the pipeline depth (tuning).
    #[arg(long)]
    pub nstage: Option<usize>,
    /// Force the warps that split each key tile (tuning; mma.sync's 16-row tile).
    #[arg(long)]
    pub warps_kv: Option<usize>,
    /// Intra-warpgroup overlap on forced tiles (tuning; with `--backend wgmma` and the producer
    /// warpgroup). The engine's own choice has it for three warpgroups of 64-key stages.
    #[arg(long)]
    pub overlap: bool,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Attention variants (--softcap, --window, --alibi, --sinks, --rope), in any combination.
    #[command(flatten)]
    pub variant: VariantArgs,
}

pub fn run(a: PrefillArgs) -> Result<(), String> {
    match a.dtype {
        DType::BF16 => run_typed::<half::bf16>(a),
        DType::F16 => run_typed::<half::f16>(a),
        DType::F32 => Err("prefill takes f16 or bf16".into()),
    }
}

fn lens(a: &PrefillArgs) -> Result<Vec<(usize, usize)>, String> {
    match &a.lens_file {
        None => Ok(vec![(a.qo_len, a.kv_len.unwrap_or(a.qo_len)); a.batch]),
        Some(p) => {
            let text = std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()))?;
            text.lines()
                .filter(|l| !l.trim().is_empty())
                .map(|l| {
                    let v: Vec<usize> = l
                        .split_whitespace()
                        .map(|t| t.parse::<usize>())
                        .collect::<Result<_, _>>()
                        .map_err(|_| format!("{}: `{l}` is not `qo_len kv_len`", p.display()))?;
                    match v[..] {
                        [q, k] => Ok((q, k)),
                        _ => Err(format!("{}: `{l}` is not `qo_len kv_len`", p.display())),
                    }
                })
                .collect()
        }
    }
}

/// (query, key) pairs that are attended: the work, in units of one q·k plus one p·v.
fn visible_pairs(qo: usize, kv: usize, causal: bool, window_left: Option<usize>) -> f64 {
    if !causal && window_left.is_none() {
        return (qo * kv) as f64;
    }
    // Query i, at position p = kv - qo + i, sees keys [p - window_left, p] (causal) or
    // [p - window_left, kv) (no mask), clamped to 0..kv.
    (0..qo)
        .map(|i| {
            let p = kv as i64 - qo as i64 + i as i64;
            let end = if causal {
                (p + 1).clamp(0, kv as i64)
            } else {
                kv as i64
            };
            let start = window_left.map_or(0, |w| (p - w as i64).max(0)).min(end);
            (end - start) as f64
        })
        .sum()
}

fn run_typed<T: Element + DeviceRepr>(a: PrefillArgs) -> Result<(), String> {
    let err = |e: flashinfer::Error| e.to_string();
    let d = |e: flashinfer::cuda::DriverError| e.to_string();
    let lens = lens(&a)?;
    if lens.is_empty() {
        return Err("the batch is empty".into());
    }
    let causal = match a.mask.as_str() {
        "causal" => true,
        "none" => false,
        m => return Err(format!("--mask `{m}`: expected causal or none")),
    };
    let (hq, hk) = parse_heads(&a.heads)?;
    let heads = HeadConfig::new(hq, hk, a.head_dim).map_err(err)?;
    let dim = a.head_dim;
    // Flags are checked before the GPU is opened, so that a bad one is the error reported.
    a.variant.check(heads, lens.len())?;
    if a.variant.any() && a.save.is_some() {
        return Err(
            "--save writes plain attention's inputs (its README has no variant): drop it or the \
             variant flags"
                .into(),
        );
    }
    let dev: Arc<Device> = Device::new(0).map_err(err)?;
    let st = dev.stream().clone();
    let mut rng = SplitMix64::new(a.seed);

    let qo_lens: Vec<usize> = lens.iter().map(|l| l.0).collect();
    let kv_lens: Vec<usize> = lens.iter().map(|l| l.1).collect();
    let qo = Ragged::from_lens(&qo_lens);
    let kv_ragged = Ragged::from_lens(&kv_lens);
    let q: Vec<T> = rng.vec(qo.total() * hq * dim, 1.0);
    // Keys of every request, contiguous (the reference reads them from here).
    let kv_rows = kv_ragged.total() * hk * dim;
    let k: Vec<T> = rng.vec(kv_rows, 1.0);
    let v: Vec<T> = rng.vec(kv_rows, 1.0);
    let params = AttentionParams::default();

    // The paged cache holds the same keys, scattered over shuffled pages.
    let paged = a.page_size > 0;
    let (table, desc, k_pool, v_pool) = if paged {
        let num_pages = PageTable::pages_needed(&kv_lens, a.page_size);
        let mut ids: Vec<i32> = (0..num_pages as i32).collect();
        rng.shuffle(&mut ids);
        let table = PageTable::from_kv_lens(&kv_lens, a.page_size, &ids, num_pages).map_err(err)?;
        let desc = PagedKvDesc::new(a.layout, num_pages, a.page_size, hk, dim).map_err(err)?;
        let mut kp = vec![T::from_f32(0.0); desc.required_len()];
        let mut vp = kp.clone();
        for (r, &kv_len) in kv_lens.iter().enumerate() {
            for t in 0..kv_len {
                let (page, slot) = table.locate(r, t);
                for h in 0..hk {
                    let src = ((kv_ragged.start(r) + t) * hk + h) * dim;
                    let dst = desc.k_offset(page, slot, h);
                    kp[dst..dst + dim].copy_from_slice(&k[src..src + dim]);
                    vp[dst..dst + dim].copy_from_slice(&v[src..src + dim]);
                }
            }
        }
        (Some(table), Some(desc), kp, vp)
    } else {
        (None, None, Vec::new(), Vec::new())
    };
    // Drawn after the inputs, so that these are the inputs of a plain run with the same seed.
    let variant = a.variant.build(heads, lens.len(), &mut rng)?;

    let cfg = PrefillConfig {
        heads,
        q_dtype: T::DTYPE,
        kv_dtype: T::DTYPE,
        params,
        mask: if causal {
            PrefillMask::Causal
        } else {
            PrefillMask::None
        },
        allow_split: !a.no_split,
    };
    let mut op = BatchPrefill::new(&dev, cfg).map_err(err)?;
    op.set_warp_specialization(match a.ws.as_str() {
        "auto" => None,
        "on" => Some(true),
        "off" => Some(false),
        w => return Err(format!("--ws `{w}`: expected auto, on or off")),
    });
    op.set_persistent(match a.persistent.as_str() {
        "auto" => None,
        "on" => Some(true),
        "off" => Some(false),
        w => return Err(format!("--persistent `{w}`: expected auto, on or off")),
    });
    if !variant.is_plain() {
        op.set_variant(&variant.variant()).map_err(err)?;
    }
    let tuned = a.cta_q.is_some()
        || a.kv_tile.is_some()
        || a.nstage.is_some()
        || a.warps_kv.is_some()
        || a.overlap;
    if tuned || a.backend != "auto" {
        let mut t = match a.backend.as_str() {
            "wgmma" => PrefillTiles::wgmma(
                dim,
                heads.group_size(),
                T::DTYPE,
                paged,
                cfg.mask,
                a.cta_q.unwrap_or(192) / 64,
                64,
            ),
            "mma" | "auto" => {
                let packed = match a.cta_q {
                    Some(16) => 16,
                    Some(64) => 64,
                    Some(128) | None => 1 << 20,
                    Some(c) => return Err(format!("--cta-q {c}: expected 16, 64 or 128")),
                };
                PrefillTiles::mma_sync(
                    dim,
                    heads.group_size(),
                    T::DTYPE,
                    T::DTYPE,
                    paged,
                    cfg.mask,
                    packed,
                )
            }
            b => return Err(format!("--backend `{b}`: expected auto, mma or wgmma")),
        };
        if let Some(kt) = a.kv_tile {
            t.kv_tile = kt;
        }
        if let Some(n) = a.nstage {
            t.nstage = n;
        }
        if let Some(w) = a.warps_kv {
            t.warps_kv = w;
        }
        if a.overlap {
            // The forced tiles take the producer warpgroup with it (the op's --ws decides last).
            t.warp_specialized = true;
            t.intra_wg_overlap = true;
        }
        op.force_tiles(Some(t)).map_err(err)?;
    }
    let kv_arg = match &table {
        Some(t) => PrefillKv::Paged(t),
        None => PrefillKv::Ragged(&kv_ragged),
    };
    op.plan(&qo, kv_arg, None).map_err(err)?;

    let dq = st.clone_htod(&q).map_err(d)?;
    let (dk, dv) = if paged {
        (
            st.clone_htod(&k_pool).map_err(d)?,
            st.clone_htod(&v_pool).map_err(d)?,
        )
    } else {
        (st.clone_htod(&k).map_err(d)?, st.clone_htod(&v).map_err(d)?)
    };
    let di = st
        .clone_htod(table.as_ref().map_or(&[0][..], |t| t.kv_indices()))
        .map_err(d)?;
    let mut dout = st
        .clone_htod(&vec![T::from_f32(f32::NAN); q.len()])
        .map_err(d)?;
    let run_once = |dout: &mut CudaSlice<T>| {
        let o = DevSliceMut::new(dout, &st);
        match &desc {
            Some(desc) => op.run_paged(
                DevSlice::new(&dq, &st),
                DevSlice::new(&dk, &st),
                DevSlice::new(&dv, &st),
                desc,
                DevSlice::new(&di, &st),
                o,
                None,
                None,
            ),
            None => op.run_ragged(
                DevSlice::new(&dq, &st),
                DevSlice::new(&dk, &st),
                DevSlice::new(&dv, &st),
                o,
                None,
                None,
            ),
        }
        .map_err(err)
    };

    // Check windows of query rows of a spread of requests against the CPU backend before timing.
    run_once(&mut dout)?;
    st.synchronize().map_err(d)?;
    let out: Vec<T> = st.clone_dtoh(&dout).map_err(d)?;
    let (worst, windows) = check(
        &lens, &qo, &kv_ragged, &q, &k, &v, &out, heads, causal, &params, &variant,
    )?;
    let tol = if T::DTYPE == DType::BF16 { 1e-2 } else { 2e-3 };
    if worst > tol {
        return Err(format!(
            "result check failed: rel L2 error {worst:.3e} > {tol:.0e}"
        ));
    }
    if let Some(dir) = &a.save {
        save(dir, &a, &qo, &kv_ragged, &q, &k, &v, &out, heads, causal)?;
    }

    let mut timer = Timer::new(&dev)?;
    let stats = timer.time(a.warmup, a.runs.max(30), || run_once(&mut dout))?;
    let pairs: f64 = lens
        .iter()
        .map(|&(q, k)| visible_pairs(q, k, causal, a.variant.window))
        .sum();
    let flops = 4.0 * pairs * (hq * dim) as f64;
    let esz = T::DTYPE.size_bytes() as f64;
    let bytes = (2 * q.len() + 2 * kv_rows) as f64 * esz;
    let secs = stats.median_us * 1e-6;
    let tflops = flops / secs / 1e12;
    let floor_us = (flops / GEMM_FLOPS_PER_S).max(bytes / HBM_BYTES_PER_S) * 1e6;
    let pct_peak = tflops * 1e12 / GEMM_FLOPS_PER_S * 100.0;
    let s = op.schedule();
    let split = s.kv_chunk.map_or("none".to_string(), |c| c.to_string());
    let kernel = op.tiles().map(|t| t.name()).unwrap_or_default();
    let kv_name = if paged {
        format!("paged {}", a.page_size)
    } else {
        "ragged".to_string()
    };
    let shape = if a.lens_file.is_some() {
        format!("{} reqs, {} queries", lens.len(), qo.total())
    } else {
        format!(
            "{} x {}/{}",
            a.batch,
            a.qo_len,
            a.kv_len.unwrap_or(a.qo_len)
        )
    };
    if a.json {
        println!(
            "{{\"op\":\"prefill\",\"gpu\":\"{}\",\"gpu_uuid\":\"{}\",\"batch\":{},\"qo_total\":{},\"kv_total\":{},\"kv\":\"{}\",\"mask\":\"{}\",\"kernel\":\"{}\",\"heads\":\"{hq}:{hk}\",\"head_dim\":{dim},\"dtype\":\"{}\",\"split_chunk\":\"{split}\",\"work_items\":{},\"median_us\":{:.2},\"min_us\":{:.2},\"max_us\":{:.2},\"runs\":{},\"tflop_per_s\":{:.1},\"pct_of_790\":{:.1},\"floor_us\":{:.2},\"check_rel_err\":{:.3e},\"checked_windows\":{windows}{}}}",
            dev.info().name, dev.info().uuid, lens.len(), qo.total(), kv_ragged.total(), kv_name, a.mask, kernel, T::DTYPE,
            s.work.len(), stats.median_us, stats.min_us, stats.max_us, stats.runs, tflops, pct_peak, floor_us, worst,
            variant.json()
        );
    } else {
        println!(
            "prefill {shape}  {kv_name}  {}  heads {hq}:{hk}  d{dim}  {}  on {}",
            a.mask,
            T::DTYPE,
            dev.info().name
        );
        println!(
            "  kernel {kernel}  split chunk {split}  work items {}",
            s.work.len()
        );
        if !variant.is_plain() {
            println!("  {}", variant.describe());
        }
        println!(
            "  check: {windows} windows of query rows vs CPU backend, worst rel L2 {worst:.2e} (tol {tol:.0e})"
        );
        println!(
            "  median {:.1} us (min {:.1}, max {:.1}, {} runs, L2 flushed)  {tflops:.1} TFLOP/s  {pct_peak:.1}% of 790  floor {floor_us:.1} us",
            stats.median_us, stats.min_us, stats.max_us, stats.runs
        );
    }
    Ok(())
}

/// Compares windows of up to 64 query rows (first, middle, last) of up to 8 requests with the CPU
/// backend. A window [i0, i1) of a causal request is itself a causal prefill of i1 - i0 queries
/// over the first kv_len - qo_len + i1 keys, so the reference attends only what it needs; its
/// queries keep their positions (bottom-right alignment), so this holds under every variant too.
/// Without the mask a window keeps its positions only if it ends at the last query, so under
/// RoPE, ALiBi or a window only the last window is checked there.
#[allow(clippy::too_many_arguments)]
fn check<T: Element>(
    lens: &[(usize, usize)],
    qo: &Ragged,
    kv: &Ragged,
    q: &[T],
    k: &[T],
    v: &[T],
    out: &[T],
    heads: HeadConfig,
    causal: bool,
    params: &AttentionParams,
    variant: &VariantValues,
) -> Result<(f64, usize), String> {
    let err = |e: flashinfer::Error| e.to_string();
    let (hq, hk, dim) = (heads.num_qo_heads, heads.num_kv_heads, heads.head_dim);
    let (qrow, krow) = (hq * dim, hk * dim);
    let mut worst = 0f64;
    let mut windows = 0;
    let step = (lens.len() / 8).max(1);
    for r in (0..lens.len()).step_by(step) {
        let (qo_len, kv_len) = lens[r];
        let w = qo_len.min(64);
        let mut starts = if causal || !variant.uses_positions() {
            vec![0, qo_len / 2, qo_len - w]
        } else {
            vec![qo_len - w]
        };
        starts.sort_unstable();
        starts.dedup();
        for i0 in starts {
            let i1 = (i0 + w).min(qo_len);
            if i1 == i0 {
                continue;
            }
            let keys = if causal {
                (kv_len + i1).saturating_sub(qo_len).min(kv_len)
            } else {
                kv_len
            };
            if causal && kv_len + i1 < qo_len + (i1 - i0) {
                continue; // some rows see no key: covered by the GPU tests, not sampled here
            }
            let qs = (qo.start(r) + i0) * qrow;
            let q32: Vec<f32> = q[qs..qs + (i1 - i0) * qrow]
                .iter()
                .map(|x| x.to_f32())
                .collect();
            let ks = kv.start(r) * krow;
            let (kw, vw) = (&k[ks..ks + keys * krow], &v[ks..ks + keys * krow]);
            let mask = if causal {
                MaskMode::Causal
            } else {
                MaskMode::None
            };
            let mut want = vec![0f32; q32.len()];
            if variant.is_plain() {
                reference::single_prefill(
                    &q32,
                    kw,
                    vw,
                    i1 - i0,
                    keys,
                    heads,
                    mask,
                    params,
                    &mut want,
                    None,
                )
                .map_err(err)?;
            } else {
                if keys == 0 {
                    continue; // rows that see no key: covered by the GPU tests
                }
                // The variant reference reads a paged cache: the window's keys as one page.
                let desc = PagedKvDesc::new(KvLayout::Nhd, 1, keys, hk, dim).map_err(err)?;
                let table = PageTable::from_kv_lens(&[keys], keys, &[0], 1).map_err(err)?;
                reference::batch_attention_paged(
                    &q32,
                    &Ragged::from_lens(&[i1 - i0]),
                    &PagedKv::new(desc, kw, vw).map_err(err)?,
                    &table,
                    heads,
                    mask,
                    params,
                    &variant.for_request(r),
                    &mut want,
                    None,
                )
                .map_err(err)?;
            }
            let got: Vec<f32> = out[qs..qs + q32.len()].iter().map(|x| x.to_f32()).collect();
            let want64: Vec<f64> = want.iter().map(|&x| x as f64).collect();
            worst = worst.max(rel_l2_error(&got, &want64));
            windows += 1;
        }
    }
    Ok((worst, windows))
}

#[allow(clippy::too_many_arguments)]
fn save<T: Element>(
    dir: &std::path::Path,
    a: &PrefillArgs,
    qo: &Ragged,
    kv: &Ragged,
    q: &[T],
    k: &[T],
    v: &[T],
    out: &[T],
    heads: HeadConfig,
    causal: bool,
) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let f = |x: &[T]| x.iter().map(|e| e.to_f32()).collect::<Vec<f32>>();
    let (hq, hk, d) = (heads.num_qo_heads, heads.num_kv_heads, heads.head_dim);
    npy::write_f32(&dir.join("q.npy"), &[qo.total(), hq, d], &f(q))?;
    npy::write_f32(&dir.join("k.npy"), &[kv.total(), hk, d], &f(k))?;
    npy::write_f32(&dir.join("v.npy"), &[kv.total(), hk, d], &f(v))?;
    npy::write_f32(&dir.join("out.npy"), &[qo.total(), hq, d], &f(out))?;
    npy::write_i32(
        &dir.join("qo_indptr.npy"),
        &[qo.indptr().len()],
        qo.indptr(),
    )?;
    npy::write_i32(
        &dir.join("kv_indptr.npy"),
        &[kv.indptr().len()],
        kv.indptr(),
    )?;
    let meta = format!(
        "{{\"op\": \"batch_prefill\", \"dtype\": \"{}\", \"causal\": {causal}, \"page_size\": {}, \
         \"num_qo_heads\": {hq}, \"num_kv_heads\": {hk}, \"head_dim\": {d}, \"sm_scale\": {}}}\n",
        a.dtype,
        a.page_size,
        1.0 / (d as f64).sqrt(),
    );
    std::fs::write(dir.join("meta.json"), meta).map_err(|e| e.to_string())?;
    let note = format!(
        "flashinfer bench prefill: inputs and output. Values are the {} tensors widened exactly to \
         float32; K/V are saved ragged (request i owns rows kv_indptr[i]..kv_indptr[i+1]) even when \
         the run used a paged cache (page_size in meta.json). out[t, h] = softmax(q[t, h] . K^T * \
         sm_scale) V over the keys of token t's request{}, query head h reading KV head h / {}.\n",
        a.dtype,
        if causal {
            ", query i of qo_len seeing keys j <= kv_len - qo_len + i"
        } else {
            ""
        },
        hq / hk,
    );
    std::fs::write(dir.join("README.txt"), note).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::variant_args::VariantArgs;

    /// The check's windows are sub-problems that must keep every query's position: the whole
    /// batch computed by the CPU backend passes it under every variant, with and without the
    /// causal mask (a window that moved a query would be off by the ALiBi bias or the rotation).
    #[test]
    fn the_whole_reference_passes_the_windowed_check() {
        let heads = HeadConfig::new(4, 2, 16).unwrap();
        let lens = [(130, 300), (70, 70), (1, 90)];
        let qo = Ragged::from_lens(&lens.map(|l| l.0));
        let kv = Ragged::from_lens(&lens.map(|l| l.1));
        let mut rng = SplitMix64::new(3);
        let q: Vec<f32> = rng.vec(qo.total() * 4 * 16, 1.0);
        let k: Vec<f32> = rng.vec(kv.total() * 2 * 16, 1.0);
        let v: Vec<f32> = rng.vec(kv.total() * 2 * 16, 1.0);
        // Ragged K/V as a cache of one-token pages, in order.
        let desc = PagedKvDesc::new(KvLayout::Nhd, kv.total(), 1, 2, 16).unwrap();
        let ids: Vec<i32> = (0..kv.total() as i32).collect();
        let table = PageTable::from_kv_lens(&kv.lens(), 1, &ids, kv.total()).unwrap();
        let pool = PagedKv::new(desc, &k, &v).unwrap();
        let params = AttentionParams::default();
        let args = VariantArgs {
            softcap: Some(1.5),
            window: Some(40),
            alibi: true,
            sinks: true,
            rope: true,
        };
        let variant = args.build(heads, lens.len(), &mut rng).unwrap();
        for causal in [true, false] {
            let mask = if causal {
                MaskMode::Causal
            } else {
                MaskMode::None
            };
            let mut out = vec![0f32; q.len()];
            reference::batch_attention_paged(
                &q,
                &qo,
                &pool,
                &table,
                heads,
                mask,
                &params,
                &variant.variant(),
                &mut out,
                None,
            )
            .unwrap();
            let (worst, windows) = check(
                &lens, &qo, &kv, &q, &k, &v, &out, heads, causal, &params, &variant,
            )
            .unwrap();
            assert!(worst < 1e-6, "causal {causal}: {worst}");
            assert!(windows >= 3, "causal {causal}: {windows} windows");
        }
    }

    #[test]
    fn visible_pairs_count_the_window() {
        // Causal 4 x 4, window 1: each query sees itself and the key before it (the first, one).
        assert_eq!(visible_pairs(4, 4, true, Some(1)), 7.0);
        assert_eq!(visible_pairs(4, 4, true, None), 10.0);
        // Append of 2 queries over 5 keys, no mask, window 2: positions 3 and 4 see keys 1.. and
        // 2.. up to the end.
        assert_eq!(visible_pairs(2, 5, false, Some(2)), 7.0);
        assert_eq!(visible_pairs(2, 5, false, None), 10.0);
    }
}
