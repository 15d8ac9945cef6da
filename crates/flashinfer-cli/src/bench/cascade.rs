//! `flashinfer bench cascade`: a prefix shared by a whole batch, attended as one level (every
//! request reads the prefix) and as a two-level cascade (the prefix read once for all queries,
//! then each request's own keys, merged), both checked, both timed.

use std::sync::Arc;

use flashinfer::cascade::{CascadeConfig, CascadeLevel, MultiLevelCascade};
use flashinfer::cuda::{CudaSlice, DevSlice, DevSliceMut, Device, DeviceRepr};
use flashinfer::decode::{BatchDecode, DecodeConfig};
use flashinfer::layout::{HeadConfig, KvLayout, PageTable, PagedKv, PagedKvDesc, Ragged};
use flashinfer::prefill::{BatchPrefill, PrefillConfig, PrefillKv, PrefillMask, PrefillTiles};
use flashinfer::random::SplitMix64;
use flashinfer::reference::{self, rel_l2_error};
use flashinfer::{AttentionParams, DType, Element, MaskMode};

use super::parse_heads;
use super::timing::Timer;

#[derive(Debug, clap::Args)]
pub struct CascadeArgs {
    /// Requests sharing the prefix.
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    /// Tokens of the shared prefix (a multiple of the page size).
    #[arg(long, default_value_t = 32768)]
    pub prefix: usize,
    /// Tokens each request has of its own (its queries included).
    #[arg(long, default_value_t = 256)]
    pub suffix: usize,
    /// Query tokens per request: 1 is a decode step, more an append.
    #[arg(long, default_value_t = 1)]
    pub qo_len: usize,
    #[arg(long, default_value_t = 16)]
    pub page_size: usize,
    #[arg(long, default_value = "32:8")]
    pub heads: String,
    #[arg(long, default_value_t = 128)]
    pub head_dim: usize,
    #[arg(long, default_value = "bf16")]
    pub dtype: DType,
    #[arg(long, default_value_t = 30)]
    pub runs: usize,
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
    /// Print one JSON line instead of the table.
    #[arg(long)]
    pub json: bool,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Tuning: force the shared level's wgmma block to this many warpgroups (1, 2 or 3).
    #[arg(long)]
    pub shared_wg: Option<usize>,
    /// Tuning: keys per pipeline stage of the shared level's forced block (default 64).
    #[arg(long)]
    pub shared_kv_tile: Option<usize>,
    /// Tuning: pipeline stages of the shared level's forced block (default 2).
    #[arg(long)]
    pub shared_nstage: Option<usize>,
    /// Tuning: give the shared level's forced block a producer warpgroup (warp specialisation).
    #[arg(long, requires = "shared_wg")]
    pub shared_ws: bool,
    /// Tuning: force the own level's block to the 16-row mma.sync tile with this many warps
    /// splitting the keys and this many keys per stage, as `WARPS,KEYS` (e.g. `2,32`).
    #[arg(long)]
    pub own_tiles: Option<String>,
    /// Also time each level alone (its kernel, no merge).
    #[arg(long)]
    pub breakdown: bool,
}

pub fn run(a: CascadeArgs) -> Result<(), String> {
    match a.dtype {
        DType::BF16 => run_typed::<half::bf16>(a),
        DType::F16 => run_typed::<half::f16>(a),
        DType::F32 => Err("cascade takes f16 or bf16".into()),
    }
}

fn run_typed<T: Element + DeviceRepr>(a: CascadeArgs) -> Result<(), String> {
    let err = |e: flashinfer::Error| e.to_string();
    let d = |e: flashinfer::cuda::DriverError| e.to_string();
    let (b, ps) = (a.batch, a.page_size);
    if b == 0 || ps == 0 || !a.prefix.is_multiple_of(ps) {
        return Err(
            "--batch and --page-size must be positive, --prefix a multiple of the page size".into(),
        );
    }
    if a.qo_len == 0 || a.suffix < a.qo_len {
        return Err("--qo-len must be at least 1 and at most --suffix".into());
    }
    let (hq, hk) = parse_heads(&a.heads)?;
    let heads = HeadConfig::new(hq, hk, a.head_dim).map_err(err)?;
    let dev: Arc<Device> = Device::new(0).map_err(err)?;
    let st = dev.stream().clone();
    let mut rng = SplitMix64::new(a.seed);

    // Pool: the prefix pages, then each request's own pages, shuffled.
    let prefix_pages = a.prefix / ps;
    let own_pages = a.suffix.div_ceil(ps);
    let num_pages = prefix_pages + b * own_pages;
    let mut ids: Vec<i32> = (0..num_pages as i32).collect();
    rng.shuffle(&mut ids);
    let prefix_ids = &ids[..prefix_pages];
    let last = (a.suffix - (own_pages - 1) * ps) as i32;
    let mut own = (vec![0i32], Vec::new());
    let mut full = (vec![0i32], Vec::new());
    for r in 0..b {
        let mine = &ids[prefix_pages + r * own_pages..prefix_pages + (r + 1) * own_pages];
        own.1.extend_from_slice(mine);
        own.0.push(own.1.len() as i32);
        full.1.extend_from_slice(prefix_ids);
        full.1.extend_from_slice(mine);
        full.0.push(full.1.len() as i32);
    }
    let shared = PageTable::new(
        &[0, prefix_pages as i32],
        prefix_ids,
        &[if prefix_pages > 0 { ps as i32 } else { 0 }],
        ps,
        num_pages,
    )
    .map_err(err)?;
    let own = PageTable::new(&own.0, &own.1, &vec![last; b], ps, num_pages).map_err(err)?;
    let one_level = PageTable::new(&full.0, &full.1, &vec![last; b], ps, num_pages).map_err(err)?;
    let desc = PagedKvDesc::new(KvLayout::Nhd, num_pages, ps, hk, a.head_dim).map_err(err)?;
    let k: Vec<T> = rng.vec(desc.required_len(), 1.0);
    let v: Vec<T> = rng.vec(desc.required_len(), 1.0);
    let rows = b * a.qo_len;
    let q: Vec<T> = rng.vec(rows * hq * a.head_dim, 1.0);
    let params = AttentionParams::default();
    let qo = Ragged::from_lens(&vec![a.qo_len; b]);
    let all_queries = Ragged::from_lens(&[rows]);

    let dq = st.clone_htod(&q).map_err(d)?;
    let dk = st.clone_htod(&k).map_err(d)?;
    let dv = st.clone_htod(&v).map_err(d)?;
    let up = |t: &PageTable| st.clone_htod(&[t.kv_indices(), &[0]].concat());
    let (d_shared, d_own, d_full) = (
        up(&shared).map_err(d)?,
        up(&own).map_err(d)?,
        up(&one_level).map_err(d)?,
    );
    let blank = || st.clone_htod(&vec![T::from_f32(f32::NAN); q.len()]);
    let (mut out_one, mut out_cascade) = (blank().map_err(d)?, blank().map_err(d)?);

    // One level: decode (or causal prefill for an append) over each request's whole table.
    enum OneLevel {
        Decode(Box<BatchDecode>),
        Prefill(Box<BatchPrefill>),
    }
    let mut one = if a.qo_len == 1 {
        let cfg = DecodeConfig {
            heads,
            q_dtype: T::DTYPE,
            kv_dtype: T::DTYPE,
            params,
            allow_split: true,
        };
        let mut op = BatchDecode::new(&dev, cfg).map_err(err)?;
        op.plan(&one_level).map_err(err)?;
        OneLevel::Decode(Box::new(op))
    } else {
        let cfg = PrefillConfig {
            heads,
            q_dtype: T::DTYPE,
            kv_dtype: T::DTYPE,
            params,
            mask: PrefillMask::Causal,
            allow_split: true,
        };
        let mut op = BatchPrefill::new(&dev, cfg).map_err(err)?;
        op.plan(&qo, PrefillKv::Paged(&one_level), None)
            .map_err(err)?;
        OneLevel::Prefill(Box::new(op))
    };
    let mut run_one = |out: &mut CudaSlice<T>| {
        let (qv, kv, vv) = (
            DevSlice::new(&dq, &st),
            DevSlice::new(&dk, &st),
            DevSlice::new(&dv, &st),
        );
        let ids = DevSlice::new(&d_full, &st);
        let o = DevSliceMut::new(out, &st);
        match &mut one {
            OneLevel::Decode(op) => op.run(qv, kv, vv, &desc, ids, o, None),
            OneLevel::Prefill(op) => op.run_paged(qv, kv, vv, &desc, ids, o, None, None),
        }
        .map_err(err)
    };
    let mut cascade = MultiLevelCascade::new(
        &dev,
        CascadeConfig {
            heads,
            dtype: T::DTYPE,
            params,
            num_levels: 2,
        },
    )
    .map_err(err)?;
    if let Some(wg) = a.shared_wg {
        if !(1..=3).contains(&wg) {
            return Err(format!("--shared-wg {wg}: expected 1, 2 or 3"));
        }
        let mut t = PrefillTiles::wgmma(
            a.head_dim,
            heads.group_size(),
            T::DTYPE,
            true,
            PrefillMask::None,
            wg,
            a.shared_kv_tile.unwrap_or(64),
        );
        t.nstage = a.shared_nstage.unwrap_or(2);
        t.warp_specialized = a.shared_ws;
        cascade.force_tiles(0, Some(t)).map_err(err)?;
    }
    let own_tiles = match &a.own_tiles {
        None => None,
        Some(spec) => {
            let parse = || -> Option<(usize, usize)> {
                let (w, k) = spec.split_once(',')?;
                Some((w.trim().parse().ok()?, k.trim().parse().ok()?))
            };
            let (w, k) =
                parse().ok_or_else(|| format!("--own-tiles `{spec}`: expected WARPS,KEYS"))?;
            let mut t = PrefillTiles::mma_sync(
                a.head_dim,
                heads.group_size(),
                T::DTYPE,
                T::DTYPE,
                true,
                PrefillMask::Causal,
                16,
            );
            t.warps_kv = w;
            t.kv_tile = k;
            Some(t)
        }
    };
    if own_tiles.is_some() {
        cascade.force_tiles(1, own_tiles).map_err(err)?;
    }
    cascade
        .plan(&[
            CascadeLevel {
                qo_indptr: &all_queries,
                table: &shared,
            },
            CascadeLevel {
                qo_indptr: &qo,
                table: &own,
            },
        ])
        .map_err(err)?;
    let mut run_cascade = |out: &mut CudaSlice<T>| {
        let ids = [DevSlice::new(&d_shared, &st), DevSlice::new(&d_own, &st)];
        cascade
            .run(
                DevSlice::new(&dq, &st),
                DevSlice::new(&dk, &st),
                DevSlice::new(&dv, &st),
                &desc,
                &ids,
                DevSliceMut::new(out, &st),
                None,
            )
            .map_err(err)
    };

    // Check: the cascade against the one-level result everywhere, and both against the CPU
    // backend for the first and last request.
    run_one(&mut out_one)?;
    run_cascade(&mut out_cascade)?;
    st.synchronize().map_err(d)?;
    let got_one: Vec<f32> = st
        .clone_dtoh(&out_one)
        .map_err(d)?
        .iter()
        .map(|x| x.to_f32())
        .collect();
    let got_cas: Vec<f32> = st
        .clone_dtoh(&out_cascade)
        .map_err(d)?
        .iter()
        .map(|x| x.to_f32())
        .collect();
    let to64 = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<f64>>();
    let mut worst = rel_l2_error(&got_cas, &to64(&got_one));
    let pool = PagedKv::new(desc, &k, &v).map_err(err)?;
    let row = a.qo_len * hq * a.head_dim;
    for r in [0, b - 1] {
        let sub = PageTable::new(
            &[0, one_level.pages(r).len() as i32],
            one_level.pages(r),
            &[last],
            ps,
            num_pages,
        )
        .map_err(err)?;
        let q32: Vec<f32> = q[r * row..(r + 1) * row]
            .iter()
            .map(|x| x.to_f32())
            .collect();
        let mut want = vec![0f32; row];
        reference::batch_prefill_paged(
            &q32,
            &Ragged::from_lens(&[a.qo_len]),
            &pool,
            &sub,
            heads,
            MaskMode::Causal,
            &params,
            &mut want,
            None,
        )
        .map_err(err)?;
        for got in [&got_one, &got_cas] {
            worst = worst.max(rel_l2_error(&got[r * row..(r + 1) * row], &to64(&want)));
        }
    }
    let tol = if T::DTYPE == DType::BF16 { 1e-2 } else { 2e-3 };
    if worst > tol {
        return Err(format!(
            "result check failed: rel L2 error {worst:.3e} > {tol:.0e}"
        ));
    }

    let mut timer = Timer::new(&dev)?;
    let t_one = timer.time(a.warmup, a.runs.max(30), || run_one(&mut out_one))?;
    let t_cas = timer.time(a.warmup, a.runs.max(30), || run_cascade(&mut out_cascade))?;
    let speedup = t_one.median_us / t_cas.median_us;
    if a.breakdown {
        // Each level alone, as the cascade plans it (same tiles), writing its state.
        let level_op =
            |mask, qo: &Ragged, table: &PageTable, tiles| -> Result<BatchPrefill, String> {
                let mut op = BatchPrefill::new(
                    &dev,
                    PrefillConfig {
                        heads,
                        q_dtype: T::DTYPE,
                        kv_dtype: T::DTYPE,
                        params,
                        mask,
                        allow_split: true,
                    },
                )
                .map_err(err)?;
                op.force_tiles(tiles).map_err(err)?;
                op.set_l2_lookahead(tiles.is_some_and(|t| t.l2_lookahead));
                op.plan(qo, PrefillKv::Paged(table), None).map_err(err)?;
                Ok(op)
            };
        let shared_tiles = cascade.tiles(0);
        let mut shared_op = level_op(PrefillMask::None, &all_queries, &shared, shared_tiles)?;
        let mut own_op = level_op(PrefillMask::Causal, &qo, &own, cascade.tiles(1))?;
        let mut lse_buf = st.alloc_zeros::<f32>(rows * hq).map_err(d)?;
        let mut time_level = |op: &mut BatchPrefill, ids: &CudaSlice<i32>| {
            timer.time(a.warmup, a.runs.max(30), || {
                op.run_paged(
                    DevSlice::new(&dq, &st),
                    DevSlice::new(&dk, &st),
                    DevSlice::new(&dv, &st),
                    &desc,
                    DevSlice::new(ids, &st),
                    DevSliceMut::new(&mut out_one, &st),
                    Some(DevSliceMut::new(&mut lse_buf, &st)),
                    None,
                )
                .map_err(err)
            })
        };
        let t_shared = time_level(&mut shared_op, &d_shared)?;
        let t_own = time_level(&mut own_op, &d_own)?;
        let name = |t: Option<PrefillTiles>| t.map_or("?".into(), |t| t.name());
        println!(
            "  breakdown: shared level alone {:.1} us ({}), own level alone {:.1} us ({})",
            t_shared.median_us,
            name(shared_tiles),
            t_own.median_us,
            name(cascade.tiles(1))
        );
    }
    if a.json {
        println!(
            "{{\"op\":\"cascade\",\"gpu\":\"{}\",\"gpu_uuid\":\"{}\",\"batch\":{b},\"prefix\":{},\"suffix\":{},\"qo_len\":{},\"page_size\":{ps},\"heads\":\"{hq}:{hk}\",\"head_dim\":{},\"dtype\":\"{}\",\"one_level_us\":{:.2},\"cascade_us\":{:.2},\"speedup\":{:.2},\"runs\":{},\"check_rel_err\":{:.3e}}}",
            dev.info().name, dev.info().uuid, a.prefix, a.suffix, a.qo_len, a.head_dim, T::DTYPE, t_one.median_us, t_cas.median_us, speedup, t_cas.runs, worst
        );
    } else {
        println!(
            "cascade: {b} requests sharing a {}-token prefix, {} own tokens each, {} queries each  page {ps}  heads {hq}:{hk}  d{}  {}  on {}",
            a.prefix, a.suffix, a.qo_len, a.head_dim, T::DTYPE, dev.info().name
        );
        println!("  check: cascade vs one level, and both vs CPU backend (2 requests): worst rel L2 {worst:.2e} (tol {tol:.0e})");
        println!(
            "  one level  median {:.1} us (min {:.1}, max {:.1})",
            t_one.median_us, t_one.min_us, t_one.max_us
        );
        println!(
            "  cascade    median {:.1} us (min {:.1}, max {:.1})  {speedup:.1}x faster  ({} runs each, L2 flushed)",
            t_cas.median_us, t_cas.min_us, t_cas.max_us, t_cas.runs
        );
    }
    Ok(())
}
