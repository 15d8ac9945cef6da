//! `flashinfer bench plan`: how long planning a step takes on the host. The schedulers alone
//! (pure functions of the request lengths; each also as its op calls it, reusing the previous
//! plan's buffers) run anywhere; with a GPU the ops' whole `plan()` is timed too
//! (scheduler, workspace layout and the one host-to-device copy), two ways: as a serving step
//! calls it (the stream has finished the previous plan's copy, which the previous step's kernels
//! needed anyway), and back to back (each call then also waits for the copy enqueued by the call
//! before it, so that number is bounded by the stream's copy latency, not by the host's work).

use std::time::Instant;

use flashinfer::cuda::Device;
use flashinfer::decode::{
    decode_chunk, plan_decode, schedule_decode_into, BatchDecode, DecodeConfig, DecodeSchedule,
    DecodeScratch, SplitPolicy,
};
use flashinfer::layout::{HeadConfig, PageTable, Ragged};
use flashinfer::plan::prefill::{
    plan_prefill, plan_prefill_into, PrefillRequest, PrefillSchedule, PrefillScratch, PrefillShape,
};
use flashinfer::prefill::{BatchPrefill, PrefillConfig, PrefillKv, PrefillMask};
use flashinfer::random::SplitMix64;
use flashinfer::{AttentionParams, DType};

#[derive(Debug, clap::Args)]
pub struct PlanArgs {
    /// Requests per step.
    #[arg(long, default_value_t = 256)]
    pub batch: usize,
    /// Longest KV length; lengths are uniform in 1..=max.
    #[arg(long, default_value_t = 8192)]
    pub max_kv_len: usize,
    /// Repetitions (median reported).
    #[arg(long, default_value_t = 2000)]
    pub reps: usize,
}

fn median_us(reps: usize, f: impl FnMut() -> Result<(), String>) -> Result<f64, String> {
    median_us_after(reps, || Ok(()), f)
}

/// The median of `f`'s host time when `before` (untimed) runs ahead of every call.
fn median_us_after(
    reps: usize,
    mut before: impl FnMut() -> Result<(), String>,
    mut f: impl FnMut() -> Result<(), String>,
) -> Result<f64, String> {
    let mut t = Vec::with_capacity(reps);
    for _ in 0..reps.max(1) {
        before()?;
        let s = Instant::now();
        f()?;
        t.push(s.elapsed().as_secs_f64() * 1e6);
    }
    t.sort_by(f64::total_cmp);
    Ok(t[t.len() / 2])
}

pub fn run(a: PlanArgs) -> Result<(), String> {
    let err = |e: flashinfer::Error| e.to_string();
    let mut rng = SplitMix64::new(7);
    let lens: Vec<usize> = (0..a.batch).map(|_| 1 + rng.below(a.max_kv_len)).collect();
    let page = 16;
    let num_pages = PageTable::pages_needed(&lens, page);
    let ids: Vec<i32> = (0..num_pages as i32).collect();
    let table = PageTable::from_kv_lens(&lens, page, &ids, num_pages).map_err(err)?;
    let begin = &table.kv_indptr()[..a.batch];
    println!(
        "plan: {} requests, KV lengths uniform in 1..={}, page {page} (host times, median of {})",
        a.batch, a.max_kv_len, a.reps
    );
    let t = median_us(a.reps, || {
        std::hint::black_box(plan_decode(&lens, begin, 8, 264, 6144, true));
        Ok(())
    })?;
    println!("  decode scheduler (plan_decode)            {t:>8.2} us");
    // As BatchDecode::plan calls it: into the buffers of the previous plan.
    let (mut scratch, mut s) = (DecodeScratch::default(), DecodeSchedule::default());
    let t = median_us(a.reps, || {
        let chunk = decode_chunk(&lens, 8, 264, 6144, true, &SplitPolicy::default());
        schedule_decode_into(&lens, begin, chunk, &mut scratch, &mut s);
        std::hint::black_box(&s);
        Ok(())
    })?;
    println!("    reusing buffers (schedule_decode_into)  {t:>8.2} us");
    let reqs: Vec<PrefillRequest> = lens
        .iter()
        .enumerate()
        .map(|(i, &kv)| PrefillRequest {
            qo_len: 1 + kv % 16,
            kv_len: kv,
            q_start: i * 16,
            ..Default::default()
        })
        .collect();
    let shape = PrefillShape {
        group: 4,
        cta_q: 64,
        kv_tile: 64,
        causal: true,
        num_kv_heads: 8,
        wave: 264,
        max_pieces: 300,
        allow_split: true,
        fixed_kv_chunk: None,
    };
    let t = median_us(a.reps, || {
        std::hint::black_box(plan_prefill(&reqs, &shape));
        Ok(())
    })?;
    println!("  prefill scheduler (plan_prefill, appends) {t:>8.2} us");
    // As BatchPrefill::plan calls it: into the buffers of the previous plan.
    let (mut scratch, mut s) = (PrefillScratch::default(), PrefillSchedule::default());
    let t = median_us(a.reps, || {
        plan_prefill_into(&reqs, &shape, &mut scratch, &mut s);
        std::hint::black_box(&s);
        Ok(())
    })?;
    println!("    reusing buffers (plan_prefill_into)     {t:>8.2} us");

    if Device::count() == 0 {
        println!("  (no GPU: the ops' plan(), with its host-to-device copy, was not timed)");
        return Ok(());
    }
    let dev = Device::new(0).map_err(err)?;
    let heads = HeadConfig::new(32, 8, 128).map_err(err)?;
    let mut decode = BatchDecode::new(
        &dev,
        DecodeConfig {
            heads,
            q_dtype: DType::BF16,
            kv_dtype: DType::BF16,
            params: AttentionParams::default(),
            allow_split: true,
        },
    )
    .map_err(err)?;
    let st = dev.stream().clone();
    let idle = || st.synchronize().map_err(|e| e.to_string());
    let t = median_us_after(a.reps, idle, || decode.plan(&table).map_err(err))?;
    println!("  BatchDecode::plan (one copy), as a step   {t:>8.2} us");
    let t = median_us(a.reps, || decode.plan(&table).map_err(err))?;
    println!("    back to back (waits for the last copy)  {t:>8.2} us");
    let mut prefill = BatchPrefill::new(
        &dev,
        PrefillConfig {
            heads,
            q_dtype: DType::BF16,
            kv_dtype: DType::BF16,
            params: AttentionParams::default(),
            mask: PrefillMask::Causal,
            allow_split: true,
        },
    )
    .map_err(err)?;
    let qo = Ragged::from_lens(&reqs.iter().map(|r| r.qo_len).collect::<Vec<_>>());
    let t = median_us_after(a.reps, idle, || {
        prefill
            .plan(&qo, PrefillKv::Paged(&table), None)
            .map_err(err)
    })?;
    println!("  BatchPrefill::plan (one copy), as a step  {t:>8.2} us");
    let t = median_us(a.reps, || {
        prefill
            .plan(&qo, PrefillKv::Paged(&table), None)
            .map_err(err)
    })?;
    println!("    back to back (waits for the last copy)  {t:>8.2} us");
    dev.stream().synchronize().map_err(|e| e.to_string())?;
    Ok(())
}
