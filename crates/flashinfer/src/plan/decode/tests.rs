//! The decode planner's tests: invariants of every schedule (property tests over random batches
//! and policies), the H200 plans of issue 5, the split model, and (ignored) the plan table and
//! the model's fit to measured runs.

use super::*;
use proptest::prelude::*;

/// The invariants of every schedule: every token of every request is covered by exactly one
/// item, chunks respect pages, the merge lists name exactly the split requests' slots, at
/// most `max_pieces` pieces per request, at most [`max_work_items`] items, longest first.
fn check_schedule(
    s: &DecodeSchedule,
    lens: &[usize],
    begin: &[i32],
    heads: usize,
    wave: usize,
    max_pieces: usize,
) -> Result<(), TestCaseError> {
    // (start, len) of every item per request, checked for exact contiguous coverage
    // below (items come longest first, not in token order).
    let mut pieces: Vec<Vec<(usize, usize)>> = vec![Vec::new(); lens.len()];
    let mut slots = vec![false; s.num_partial];
    for w in &s.work {
        let r = w.request as usize;
        prop_assert_eq!(w.page_begin, begin[r]);
        pieces[r].push((w.kv_start as usize, w.kv_len as usize));
        if let Some(c) = s.chunk_size {
            prop_assert_eq!(c % CHUNK_ALIGN, 0);
        }
        if w.partial >= 0 {
            prop_assert!(w.partial >= w.merge_begin && w.partial < w.merge_begin + w.num_pieces);
            prop_assert!(!slots[w.partial as usize]);
            slots[w.partial as usize] = true;
        }
    }
    for (r, p) in pieces.iter_mut().enumerate() {
        p.sort_unstable();
        let mut at = 0;
        for &(start, len) in p.iter() {
            prop_assert_eq!(start, at);
            at += len;
        }
        prop_assert_eq!(at, lens[r]);
    }
    prop_assert!(slots.iter().all(|&x| x));
    prop_assert!(s
        .work
        .iter()
        .all(|w| (w.num_pieces as usize) <= max_pieces || w.partial < 0));
    // A split request's items agree on its slot range, which holds exactly its pieces.
    for w in s.work.iter().filter(|w| w.partial >= 0) {
        let same: Vec<_> = s.work.iter().filter(|x| x.request == w.request).collect();
        prop_assert_eq!(same.len(), w.num_pieces as usize);
        prop_assert!(same
            .iter()
            .all(|x| x.merge_begin == w.merge_begin && x.num_pieces == w.num_pieces));
    }
    // The bound CUDA-graph mode sizes its grid and workspace for.
    prop_assert!(s.work.len() <= max_work_items(lens.len(), heads, wave));
    prop_assert!(s.num_partial <= max_work_items(lens.len(), heads, wave));
    prop_assert!(s.work.windows(2).all(|p| p[0].kv_len >= p[1].kv_len));
    Ok(())
}

fn begins(lens: &[usize], page_size: usize) -> Vec<i32> {
    lens.iter()
        .scan(0i32, |acc, &l| {
            let b = *acc;
            *acc += l.div_ceil(page_size) as i32;
            Some(b)
        })
        .collect()
}

/// A policy: the old rule, the default model, or a random one (either dispatch order).
fn policy() -> impl Strategy<Value = SplitPolicy> {
    prop_oneof![
        Just(SplitPolicy::FairShare),
        Just(SplitPolicy::default()),
        (
            0.0f64..8.0,
            0.0f64..4.0,
            1.0f64..4.0,
            0.0f64..0.2,
            any::<bool>()
        )
            .prop_map(|(start, merge, lone_speedup, min_gain, item)| {
                SplitPolicy::Simulated(SplitModel {
                    start,
                    merge,
                    lone_speedup,
                    min_gain,
                    dispatch: if item {
                        Dispatch::ItemMajor
                    } else {
                        Dispatch::HeadMajor
                    },
                })
            }),
    ]
}

proptest! {
    #[test]
    fn covers_every_token_once(
        lens in proptest::collection::vec(0usize..20_000, 0..40),
        page_size in 1usize..=64,
        heads in 1usize..=8,
        wave in 1usize..=2000,
        max_pieces in 1usize..=300,
        policy in policy(),
    ) {
        let begin = begins(&lens, page_size);
        let s = plan_decode_with(&lens, &begin, heads, wave, max_pieces, true, &policy);
        check_schedule(&s, &lens, &begin, heads, wave, max_pieces)?;
        // A pure function of the lengths.
        prop_assert_eq!(&s, &plan_decode_with(&lens, &begin, heads, wave, max_pieces, true, &policy));
        prop_assert_eq!(plan_decode_with(&lens, &begin, heads, wave, max_pieces, false, &policy).work.len(), lens.len());
    }

    /// Batches that fill the GPU by themselves (the simulated policy's branch), skewed: a few
    /// long requests among many short ones.
    #[test]
    fn full_batches_cover_every_token_once(
        short in proptest::collection::vec(0usize..3000, 30..300),
        long in proptest::collection::vec(3000usize..100_000, 0..6),
        page_size in 1usize..=32,
        heads in 1usize..=8,
        wave in 8usize..=600,
        max_pieces in 1usize..=6144,
        policy in policy(),
    ) {
        let lens: Vec<usize> = long.into_iter().chain(short).collect();
        let begin = begins(&lens, page_size);
        let s = plan_decode_with(&lens, &begin, heads, wave, max_pieces, true, &policy);
        check_schedule(&s, &lens, &begin, heads, wave, max_pieces)?;
        prop_assert_eq!(&s, &plan_decode_with(&lens, &begin, heads, wave, max_pieces, true, &policy));
    }

    /// The small-batch branch (fewer requests than a wave of items) was tuned on the H200:
    /// it does not depend on the policy.
    #[test]
    fn small_batches_ignore_the_policy(
        lens in proptest::collection::vec(0usize..50_000, 0..33),
        policy in policy(),
    ) {
        let begin = vec![0; lens.len()];
        prop_assert_eq!(
            plan_decode_with(&lens, &begin, 8, 264, 6144, true, &policy),
            plan_decode_with(&lens, &begin, 8, 264, 6144, true, &SplitPolicy::FairShare)
        );
    }

    /// The simulated policy's pick is never estimated slower than the old rule's by more than
    /// its margin: the old rule's chunk (a fair share, or none) is one of its candidates.
    #[test]
    fn simulated_split_is_not_worse_than_fair_share(
        short in proptest::collection::vec(1usize..4000, 33..200),
        long in proptest::collection::vec(4000usize..60_000, 0..4),
    ) {
        let lens: Vec<usize> = long.into_iter().chain(short).collect();
        let begin = vec![0; lens.len()];
        let m = SplitModel::DEFAULT;
        let est = |p: &SplitPolicy| {
            let c = plan_decode_with(&lens, &begin, 8, 264, 6144, true, p).chunk_size;
            estimate_makespan(&lens, c, 8, 264, &m).makespan
        };
        let (new, old) = (est(&SplitPolicy::Simulated(m)), est(&SplitPolicy::FairShare));
        prop_assert!(new <= old * (1.0 + m.min_gain).powi(2) + 1e-9, "new {} old {}", new, old);
    }
}

proptest! {
    /// Batch-invariant mode: a request's items are the same whatever else is in the batch.
    #[test]
    fn fixed_chunk_items_do_not_depend_on_the_batch(
        lens in proptest::collection::vec(0usize..5000, 1..20),
        chunk_tiles in 1usize..20,
        pick in 0usize..20,
    ) {
        let chunk = chunk_tiles * CHUNK_ALIGN;
        let r = pick % lens.len();
        let begin = vec![0i32; lens.len()];
        let of = |s: &DecodeSchedule, req: i32| {
            let mut v: Vec<(i32, i32, i32)> = s
                .work
                .iter()
                .filter(|w| w.request == req)
                .map(|w| (w.kv_start, w.kv_len, w.num_pieces))
                .collect();
            v.sort_unstable();
            v
        };
        let in_batch = plan_decode_fixed_chunk(&lens, &begin, chunk);
        let alone = plan_decode_fixed_chunk(&lens[r..=r], &[0], chunk);
        prop_assert_eq!(of(&in_batch, r as i32), of(&alone, 0));
    }
}

fn lens_file(text: &str) -> Vec<usize> {
    text.split_whitespace()
        .map(|x| x.parse().unwrap())
        .collect()
}

fn uniform_512_7680_x64() -> Vec<usize> {
    lens_file(include_str!(
        "../../../../../docs/lens/uniform_512_7680_x64.txt"
    ))
}
fn one_32768_63x256() -> Vec<usize> {
    lens_file(include_str!(
        "../../../../../docs/lens/one_32768_63x256.txt"
    ))
}
fn zipf_x128_mean2500() -> Vec<usize> {
    lens_file(include_str!(
        "../../../../../docs/lens/zipf_x128_mean2500.txt"
    ))
}

/// Issue 5's shapes and the tuned regular ones: (name, lengths).
fn shapes() -> Vec<(&'static str, Vec<usize>)> {
    vec![
        ("uniform_512_7680_x64", uniform_512_7680_x64()),
        ("one_32768_63x256", one_32768_63x256()),
        ("zipf_x128_mean2500", zipf_x128_mean2500()),
        ("64 x 4096", vec![4096; 64]),
        ("128 x 8192", vec![8192; 128]),
        ("16 x 4096", vec![4096; 16]),
        ("1 x 32768", vec![32768]),
        ("1 x 1024", vec![1024]),
    ]
}

/// The H200's decode: 8 KV heads, 264 resident blocks, 6144 merge pieces (bf16, group 4).
const H200: (usize, usize, usize) = (8, 264, 6144);

fn h200_plan(lens: &[usize], policy: &SplitPolicy) -> DecodeSchedule {
    let (heads, wave, max_pieces) = H200;
    plan_decode_with(
        lens,
        &vec![0; lens.len()],
        heads,
        wave,
        max_pieces,
        true,
        policy,
    )
}

/// The model with head-major dispatch: blocks of one KV head after another, where finer splits
/// pay (the decode grid before session 4; the default is item-major, under which the fitted model
/// keeps the fair share for the batches below).
const HEAD_MAJOR: SplitModel = SplitModel {
    dispatch: Dispatch::HeadMajor,
    ..SplitModel::DEFAULT
};
#[test]
fn h200_plans() {
    let new = SplitPolicy::Simulated(HEAD_MAJOR);
    // The tuned plans: small batches and full uniform ones do not move.
    for (lens, chunk) in [
        (vec![1024], Some(64)),
        (vec![32768], Some(1024)),
        (vec![4096; 16], Some(2048)),
        (vec![4096; 64], None),
        (vec![8192; 128], None),
    ] {
        assert_eq!(
            h200_plan(&lens, &new).chunk_size,
            chunk,
            "{} x {}",
            lens.len(),
            lens[0]
        );
        assert_eq!(
            h200_plan(&lens, &new),
            h200_plan(&lens, &SplitPolicy::FairShare)
        );
    }
    // Issue 5's skewed batches under head-major dispatch (the pre-session-4 grid): split finer
    // than a fair share, to a shorter estimate.
    let m = HEAD_MAJOR;
    for lens in [
        uniform_512_7680_x64(),
        one_32768_63x256(),
        zipf_x128_mean2500(),
    ] {
        let (old, new) = (
            h200_plan(&lens, &SplitPolicy::FairShare),
            h200_plan(&lens, &new),
        );
        let c = new.chunk_size.expect("split");
        assert!(
            old.chunk_size.is_none_or(|o| c < o),
            "{c} vs {:?}",
            old.chunk_size
        );
        let est = |c| estimate_makespan(&lens, c, 8, 264, &m).makespan;
        assert!(est(new.chunk_size) < 0.95 * est(old.chunk_size));
        assert_eq!(
            new.work.len(),
            estimate_makespan(&lens, Some(c), 8, 264, &m).items
        );
    }
}

#[test]
fn makespan_estimates() {
    let m = HEAD_MAJOR;
    // One full wave of equal blocks: each 64 tiles + start, all at once.
    let e = estimate_makespan(&[4096; 33], None, 8, 264, &m);
    assert_eq!((e.items, e.makespan), (33, 64.0 + m.start));
    // Two waves.
    let e = estimate_makespan(&[4096; 66], None, 8, 264, &m);
    assert_eq!(e.makespan, 2.0 * (64.0 + m.start));
    // One block alone streams `lone_speedup` times as fast.
    let e = estimate_makespan(&[4096], None, 1, 264, &m);
    assert_eq!(e.makespan, (64.0 + m.start) / m.lone_speedup);
    // A split: 2 pieces of 32 tiles on one slot each; the last pieces merge, alone on half
    // the slots (so at twice the speed).
    let e = estimate_makespan(&[4096; 33], Some(2048), 4, 264, &m);
    assert_eq!(e.items, 66);
    assert_eq!(e.makespan, 32.0 + m.start + m.merge / 2.0);
    // Head-major: the long request of the last head starts late; item-major does better.
    let lens: Vec<usize> = [32768].into_iter().chain([256; 63]).collect();
    let item = SplitModel {
        dispatch: Dispatch::ItemMajor,
        ..m
    };
    let (h, i) = (
        estimate_makespan(&lens, Some(1536), 8, 264, &m).makespan,
        estimate_makespan(&lens, Some(1536), 8, 264, &item).makespan,
    );
    assert!(i < h, "{i} {h}");
}

#[test]
fn split_policy_knob() {
    assert_eq!("old".parse::<SplitPolicy>(), Ok(SplitPolicy::FairShare));
    assert_eq!(" new ".parse::<SplitPolicy>(), Ok(SplitPolicy::default()));
    let p: SplitPolicy = "new:start=2.5,merge=0,speedup=1.5,gain=0.05,dispatch=item"
        .parse()
        .unwrap();
    assert_eq!(
        p,
        SplitPolicy::Simulated(SplitModel {
            start: 2.5,
            merge: 0.0,
            lone_speedup: 1.5,
            min_gain: 0.05,
            dispatch: Dispatch::ItemMajor,
        })
    );
    for p in [p, SplitPolicy::default(), SplitPolicy::FairShare] {
        assert_eq!(p.to_string().parse::<SplitPolicy>(), Ok(p));
    }
    for bad in [
        "",
        "fast",
        "old:start=1",
        "new:start",
        "new:start=x",
        "new:speedup=0.5",
        "new:gain=1",
        "new:foo=1",
        "new:dispatch=col",
    ] {
        assert!(bad.parse::<SplitPolicy>().is_err(), "{bad:?}");
    }
    // Out-of-range values set directly are clamped, never a panic.
    let wild = SplitPolicy::Simulated(SplitModel {
        start: f64::INFINITY,
        merge: f64::NAN,
        lone_speedup: 0.0,
        min_gain: -1.0,
        dispatch: Dispatch::HeadMajor,
    });
    let lens = zipf_x128_mean2500();
    let s = h200_plan(&lens, &wild);
    assert_eq!(
        s.work.iter().map(|w| w.kv_len as usize).sum::<usize>(),
        lens.iter().sum()
    );
}

/// The plan table of issue 5: old and new policy's chunk, items and estimated makespan (in
/// 64-token tiles at the full-load rate, ~2.0 us each on the H200) against the ideal (every
/// slot streaming all the time, no fixed costs); "x" is estimate / ideal and "TB/s" 4.3 TB/s
/// x ideal / estimate (the kernel alone: launch and ramp, ~6 us, not counted). The last
/// column is what the new policy would pick, and its x, with an item-major grid.
/// `cargo test --release -p flashinfer --lib plan_table -- --ignored --nocapture`
#[test]
#[ignore]
fn plan_table() {
    let (heads, wave, _) = H200;
    let model = SplitModel::DEFAULT;
    let item_major = SplitModel {
        dispatch: Dispatch::ItemMajor,
        ..model
    };
    println!(
        "{:<22} {:>6} | {:>6} {:>5} {:>6} {:>5} {:>5} | {:>6} {:>5} {:>6} {:>5} {:>5} | {:>13}",
        "batch",
        "ideal",
        "old c",
        "items",
        "est",
        "x",
        "TB/s",
        "new c",
        "items",
        "est",
        "x",
        "TB/s",
        "item-major"
    );
    for (name, lens) in shapes() {
        let ideal = lens.iter().sum::<usize>() as f64 * heads as f64 / (64.0 * wave as f64);
        let row = |m: &SplitModel, p: &SplitPolicy| {
            let s = h200_plan(&lens, p);
            let e = estimate_makespan(&lens, s.chunk_size, heads, wave, m);
            let c = s.chunk_size.map_or("none".into(), |c| c.to_string());
            (c, s.work.len(), e.makespan)
        };
        let (oc, oi, oe) = row(&model, &SplitPolicy::FairShare);
        let (nc, ni, ne) = row(&model, &SplitPolicy::default());
        let (ic, _, ie) = row(&item_major, &SplitPolicy::Simulated(item_major));
        println!(
            "{name:<22} {ideal:>6.1} | {oc:>6} {oi:>5} {oe:>6.1} {:>5.2} {:>5.2} | {nc:>6} \
             {ni:>5} {ne:>6.1} {:>5.2} {:>5.2} | {ic:>6} {:>5.2}",
            oe / ideal,
            4.3 * ideal / oe,
            ne / ideal,
            4.3 * ideal / ne,
            ie / ideal
        );
    }
}

/// Re-fits the model's constants to measured H200 runs (docs/benchmarks.md; update `runs`
/// after a new measurement): prints the best constants, their predictions and the plans they
/// pick. `cargo test --release -p flashinfer --lib fit_split_model -- --ignored --nocapture`
#[test]
#[ignore]
fn fit_split_model_to_h200() {
    // (name, lengths, chunk the run used, median us).
    let runs: Vec<(&str, Vec<usize>, Option<usize>, f64)> = vec![
        ("64x4096", vec![4096; 64], None, 267.8),
        ("128x8192", vec![8192; 128], None, 1026.8),
        ("uniform", uniform_512_7680_x64(), None, 353.3),
        ("one", one_32768_63x256(), Some(1536), 80.4),
        ("zipf", zipf_x128_mean2500(), Some(9728), 434.9),
        ("16x4096", vec![4096; 16], Some(2048), 80.5),
        ("1x32768", vec![32768], Some(1024), 49.5),
        ("1x1024", vec![1024], Some(64), 10.5),
    ];
    // One tile (32 KB of K and V of one KV head) at one slot's share of 4.3 TB/s.
    let tile_us = 32768.0 / (4.3e12 / 264.0) * 1e6;
    let mut fits = vec![];
    for start in [1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0] {
        for merge in [0.0, 0.5, 1.0, 2.0, 3.0] {
            for lone_speedup in [1.5, 1.75, 2.0, 2.25, 2.5, 3.0] {
                let m = SplitModel {
                    start,
                    merge,
                    lone_speedup,
                    ..SplitModel::DEFAULT
                };
                let est: Vec<f64> = runs
                    .iter()
                    .map(|(_, l, c, _)| estimate_makespan(l, *c, 8, 264, &m).makespan * tile_us)
                    .collect();
                // The launch and ramp (us): the best of a few.
                for launch in [2.0, 4.0, 6.0, 8.0] {
                    let err: f64 = est
                        .iter()
                        .zip(&runs)
                        .map(|(e, r)| ((launch + e) / r.3).ln().powi(2))
                        .sum();
                    fits.push((err, m, launch, est.clone()));
                }
            }
        }
    }
    fits.sort_by(|a, b| a.0.total_cmp(&b.0));
    for (err, m, launch, est) in &fits[..8] {
        let pred: Vec<String> = est.iter().map(|e| format!("{:.0}", launch + e)).collect();
        let picks: Vec<String> = runs[..5]
            .iter()
            .map(|(n, l, _, _)| {
                format!(
                    "{n}:{:?}",
                    h200_plan(l, &SplitPolicy::Simulated(*m)).chunk_size
                )
            })
            .collect();
        println!(
            "rms {:.3} start {} merge {} speedup {} launch {launch} us | predicted {} | picks {}",
            (err / runs.len() as f64).sqrt(),
            m.start,
            m.merge,
            m.lone_speedup,
            pred.join(" "),
            picks.join(" ")
        );
    }
}

#[test]
fn small_batch_of_long_requests_is_split() {
    let s = plan_decode(&[32768], &[0], 8, 132 * 3, 4096, true);
    assert!(s.chunk_size.is_some());
    assert!(s.work.len() > 1 && s.work.len() <= 132 * 3 / 8);
    let s = plan_decode(&[4096; 64], &vec![0; 64], 8, 264, 4096, true);
    assert_eq!(s.chunk_size, None, "a full uniform batch is not split");
    // A full but skewed batch: the long request is cut into chunks (the old rule: of about
    // a fair share, total / blocks; the simulated one: finer), the short ones stay whole,
    // and the longest items come first.
    let lens: Vec<usize> = [32768].into_iter().chain([256; 63]).collect();
    for policy in [SplitPolicy::FairShare, SplitPolicy::Simulated(HEAD_MAJOR)] {
        let s = plan_decode_with(&lens, &vec![0; 64], 8, 264, 4096, true, &policy);
        let c = s.chunk_size.expect("the long request is split");
        let fair = 48896 / 33..=48896 / 33 + CHUNK_ALIGN;
        match policy {
            SplitPolicy::FairShare => assert!(fair.contains(&c), "chunk {c}"),
            _ => assert!(
                c < *fair.start() && c >= 48896 / (33 * MAX_WAVES),
                "chunk {c}"
            ),
        }
        assert_eq!(
            s.work.iter().filter(|w| w.request == 0).count(),
            32768usize.div_ceil(c)
        );
        assert_eq!(s.work.len(), 32768usize.div_ceil(c) + 63);
        assert_eq!(s.work[0].request, 0);
        assert!(s.work.len() <= max_work_items(64, 8, 264));
    }
    assert_eq!(
        plan_decode(&[0, 5], &[0, 0], 8, 400, 4096, true).work.len(),
        2
    );
}

#[test]
fn grid_order_follows_the_batch() {
    // Uniform and unsplit: items first. Uneven or split: KV heads fastest.
    let s = plan_decode(&[4096; 64], &vec![0; 64], 8, 264, 4096, true);
    assert!(s.chunk_size.is_none() && !s.heads_fastest());
    let lens: Vec<usize> = (0..64).map(|i| 512 + 100 * i).collect();
    assert!(plan_decode(&lens, &vec![0; 64], 8, 264, 4096, true).heads_fastest());
    let s = plan_decode(&[32768], &[0], 8, 264, 4096, true);
    assert!(s.chunk_size.is_some() && s.heads_fastest());
    assert!(!DecodeSchedule::default().heads_fastest());
}

#[test]
fn deep_batches_skip_the_simulation_and_agree_with_it() {
    // At least DEEP_WAVES waves of items, none longer than a fair share: no split, and the
    // simulated search agrees on such batches.
    let mut rng = crate::random::SplitMix64::new(11);
    for _ in 0..20 {
        let lens: Vec<usize> = (0..256)
            .map(|_| 1 + (rng.next_u64() % 8192) as usize)
            .collect();
        let s = plan_decode(&lens, &vec![0; 256], 8, 264, 4096, true);
        assert_eq!(s.chunk_size, None);
        let total: usize = lens.iter().sum();
        let max_len = *lens.iter().max().unwrap();
        let picked = split::pick_chunk(
            &lens,
            total,
            max_len,
            64,
            CHUNK_ALIGN,
            8,
            264,
            &SplitModel::DEFAULT,
        );
        assert_eq!(picked, None, "the simulation would split {lens:?}");
    }
}
