//! CUDA-graph mode of batch prefill against the CPU backend: `run_paged()` / `run_ragged()` is
//! captured once, then every step only re-plans (one host-to-device copy) and replays the graph:
//! batches shorter and longer than the captured one, split and unsplit, with empty requests,
//! requests without keys, one-token appends, and fewer requests. Outputs are poisoned before each
//! replay; rows past the step must stay poisoned (the kernel writes only the step's rows).

mod support;

use flashinfer::cuda::{CudaSlice, DevSlice, DevSliceMut, Graph};
use flashinfer::decode::{BatchDecode, DecodeConfig, GraphLimits};
use flashinfer::layout::{HeadConfig, KvLayout, PageTable, PagedKv, PagedKvDesc, Ragged};
use flashinfer::prefill::{
    BatchPrefill, PrefillConfig, PrefillGraphKv, PrefillGraphLimits, PrefillKv, PrefillMask,
    PrefillTiles,
};
use flashinfer::reference::{self, rel_l2_error};
use flashinfer::{AttentionParams, DType, Error, LseBase, MaskMode};
use support::*;

type T = half::bf16;

const QO_HEADS: usize = 32;
/// GQA 4.
const KV_HEADS: usize = 8;
const HEAD_DIM: usize = 128;
const ROW: usize = QO_HEADS * HEAD_DIM;
const PAGE: usize = 16;
const MAX_BATCH: usize = 8;
const MAX_QO: usize = 2048;
const MAX_PAGES: usize = 1600;
/// The pool holds a few pages no step uses.
const NUM_PAGES: usize = MAX_PAGES + 7;

/// `(qo_len, kv_len)` of each request of a step.
type Lens = Vec<(usize, usize)>;

fn heads() -> HeadConfig {
    HeadConfig::new(QO_HEADS, KV_HEADS, HEAD_DIM).unwrap()
}

fn params() -> AttentionParams {
    AttentionParams {
        sm_scale: Some(1.1 / (HEAD_DIM as f32).sqrt()),
        lse_base: LseBase::Natural,
    }
}

fn config(mask: PrefillMask) -> PrefillConfig {
    PrefillConfig {
        heads: heads(),
        q_dtype: DType::BF16,
        kv_dtype: DType::BF16,
        params: params(),
        mask,
        allow_split: true,
    }
}

/// `(qo_len, kv_len)` of each request of each step, and whether the step must split keys (the
/// split slots and counters of graph mode are exercised).
fn paged_steps() -> Vec<(Lens, Option<bool>)> {
    vec![
        // The captured step: a prompt, appends, a one-token append, an empty request.
        (
            vec![(300, 300), (17, 1000), (1, 2000), (0, 40), (64, 64)],
            None,
        ),
        // Longer and more requests: a long prompt, a request without keys (its rows output
        // zeros), an empty request with no keys either, one-token requests.
        (
            vec![
                (1200, 1200),
                (1, 4000),
                (100, 3000),
                (5, 0),
                (1, 1),
                (0, 0),
                (250, 260),
                (128, 129),
            ],
            None,
        ),
        // Fewer requests, shorter queries: one token over a long cache, split.
        (vec![(1, 15000)], Some(true)),
        // The full batch of one-token appends: fewer tiles than the GPU holds, split.
        (vec![(1, 3000); MAX_BATCH], Some(true)),
        // Only empty requests.
        (vec![(0, 0), (0, 10)], None),
        // The limits exactly: the most requests and query tokens.
        (
            vec![
                (1000, 1000),
                (600, 700),
                (200, 5000),
                (100, 100),
                (100, 2000),
                (40, 40),
                (7, 9000),
                (1, 1),
            ],
            None,
        ),
        // The captured step again.
        (
            vec![(300, 300), (17, 1000), (1, 2000), (0, 40), (64, 64)],
            None,
        ),
    ]
}

/// Checks a step's output and LSE (`nnz` rows) against the reference, and that the rows past the
/// step are still poisoned.
fn check_step(
    what: &str,
    lens: &[(usize, usize)],
    got: &[f32],
    got_lse: &[f32],
    want: &[f32],
    want_lse: &[f32],
) {
    let qo = Ragged::from_lens(&lens.iter().map(|l| l.0).collect::<Vec<_>>());
    let nnz = qo.total();
    for (r, &(qo_len, kv_len)) in lens.iter().enumerate() {
        let (s, e) = (qo.start(r) * ROW, (qo.start(r) + qo_len) * ROW);
        let w: Vec<f64> = want[s..e].iter().map(|&x| x as f64).collect();
        // 0 when both are zero (rows that see no key), infinite for a NaN left unwritten.
        let err = rel_l2_error(&got[s..e], &w);
        assert!(
            err <= tolerance::<T>(),
            "{what}: request {r} (qo {qo_len} kv {kv_len}) rel err {err}"
        );
        for (i, chunk) in want[s..e].chunks(HEAD_DIM).enumerate() {
            if chunk.iter().all(|&x| x == 0.0) {
                let g = &got[s + i * HEAD_DIM..s + (i + 1) * HEAD_DIM];
                assert!(
                    g.iter().all(|&x| x == 0.0),
                    "{what}: request {r} row {i} sees no key and must be zeros"
                );
            }
        }
    }
    check_lse(
        &format!("{what} lse"),
        &got_lse[..nnz * QO_HEADS],
        want_lse,
        1e-3,
    );
    assert!(
        got[nnz * ROW..].iter().all(|x| x.is_nan()),
        "{what}: an output row past the step's {nnz} was written"
    );
    assert!(
        got_lse[nnz * QO_HEADS..].iter().all(|x| x.is_nan()),
        "{what}: an LSE past the step's {nnz} rows was written"
    );
}

/// The paged pool, its device copy, and the fixed-size device buffers a captured step uses.
struct PagedFixture {
    dev: std::sync::Arc<flashinfer::cuda::Device>,
    desc: PagedKvDesc,
    k: Vec<T>,
    v: Vec<T>,
    dk: CudaSlice<T>,
    dv: CudaSlice<T>,
    /// `[MAX_QO, QO_HEADS, HEAD_DIM]`.
    dq: CudaSlice<T>,
    dout: CudaSlice<T>,
    dlse: CudaSlice<f32>,
    /// `[MAX_PAGES]`.
    di: CudaSlice<i32>,
}

impl PagedFixture {
    fn new(rng: &mut flashinfer::random::SplitMix64) -> Self {
        let dev = device();
        let desc = PagedKvDesc::new(KvLayout::Nhd, NUM_PAGES, PAGE, KV_HEADS, HEAD_DIM).unwrap();
        let k: Vec<T> = rng.vec(desc.required_len(), 1.0);
        let v: Vec<T> = rng.vec(desc.required_len(), 1.0);
        let (dk, dv) = (upload(&dev, &k), upload(&dev, &v));
        let dq = upload(&dev, &vec![T::ZERO; MAX_QO * ROW]);
        let dout = poisoned::<T>(&dev, MAX_QO * ROW);
        let dlse = poisoned::<f32>(&dev, MAX_QO * QO_HEADS);
        let di = upload(&dev, &vec![0i32; MAX_PAGES]);
        Self {
            dev,
            desc,
            k,
            v,
            dk,
            dv,
            dq,
            dout,
            dlse,
            di,
        }
    }

    /// A step's page table (fresh shuffled page ids) and queries, written to the device (only the
    /// step's rows of `dq` and entries of `di`: the rest keep older values, which the kernel must
    /// not read), outputs poisoned.
    fn load_step(
        &mut self,
        rng: &mut flashinfer::random::SplitMix64,
        lens: &[(usize, usize)],
    ) -> (Ragged, PageTable, Vec<T>) {
        let st = self.dev.stream();
        let qo = Ragged::from_lens(&lens.iter().map(|l| l.0).collect::<Vec<_>>());
        let kv_lens: Vec<usize> = lens.iter().map(|l| l.1).collect();
        let mut ids: Vec<i32> = (0..NUM_PAGES as i32).collect();
        rng.shuffle(&mut ids);
        let table = PageTable::from_kv_lens(&kv_lens, PAGE, &ids, NUM_PAGES).unwrap();
        let q: Vec<T> = rng.vec(qo.total() * ROW, 1.0);
        if !q.is_empty() {
            st.memcpy_htod(&q, &mut self.dq).unwrap();
        }
        if !table.kv_indices().is_empty() {
            st.memcpy_htod(table.kv_indices(), &mut self.di).unwrap();
        }
        self.poison();
        (qo, table, q)
    }

    fn poison(&mut self) {
        let st = self.dev.stream();
        st.memcpy_htod(&vec![T::from_f32(f32::NAN); MAX_QO * ROW], &mut self.dout)
            .unwrap();
        st.memcpy_htod(&vec![f32::NAN; MAX_QO * QO_HEADS], &mut self.dlse)
            .unwrap();
    }

    /// Enqueues the prefill on the fixture's buffers (what the graph captures).
    fn run(&mut self, op: &BatchPrefill) -> flashinfer::Result<()> {
        let st = self.dev.stream();
        op.run_paged(
            DevSlice::new(&self.dq, st),
            DevSlice::new(&self.dk, st),
            DevSlice::new(&self.dv, st),
            &self.desc,
            DevSlice::new(&self.di, st),
            DevSliceMut::new(&mut self.dout, st),
            Some(DevSliceMut::new(&mut self.dlse, st)),
            None,
        )
    }

    /// The CPU backend's output and LSE of a causal step.
    fn reference(&self, qo: &Ragged, table: &PageTable, q: &[T]) -> (Vec<f32>, Vec<f32>) {
        let pool = PagedKv::new(self.desc, &self.k, &self.v).unwrap();
        let mut want = vec![0f32; q.len()];
        let mut want_lse = vec![0f32; qo.total() * QO_HEADS];
        reference::batch_prefill_paged(
            &to_f32(q),
            qo,
            &pool,
            table,
            heads(),
            MaskMode::Causal,
            &params(),
            &mut want,
            Some(&mut want_lse),
        )
        .unwrap();
        (want, want_lse)
    }

    /// The device output and LSE (after a sync).
    fn download(&self) -> (Vec<f32>, Vec<f32>) {
        (
            to_f32(&download(&self.dev, &self.dout)),
            download(&self.dev, &self.dlse),
        )
    }
}

fn paged_limits() -> PrefillGraphLimits {
    PrefillGraphLimits {
        max_batch: MAX_BATCH,
        max_qo_tokens: MAX_QO,
        kv: PrefillGraphKv::Paged {
            max_pages: MAX_PAGES,
            page_size: PAGE,
        },
        max_mask_bytes: 0,
    }
}

/// Captures the first step of [`paged_steps`] and replays every step after re-planning it.
fn replay_paged_steps(test: &str, tiles: Option<PrefillTiles>) {
    let mut rng = Rng::fresh(test);
    let mut fx = PagedFixture::new(&mut rng);
    let mut op =
        BatchPrefill::for_cuda_graph(&fx.dev, config(PrefillMask::Causal), paged_limits(), tiles)
            .unwrap();
    let mut graph: Option<Graph> = None;
    let mut captured_tiles = None;
    for (step, (lens, expect_split)) in paged_steps().into_iter().enumerate() {
        let (qo, table, q) = fx.load_step(&mut rng, &lens);
        op.plan(&qo, PrefillKv::Paged(&table), None).unwrap();
        let tiles = op.tiles().unwrap();
        let what = format!("{test} step {step} {lens:?} {}", tiles.name());
        // Graph mode never changes the kernel, whatever the step's lengths.
        assert_eq!(*captured_tiles.get_or_insert(tiles), tiles, "{what}");
        if let Some(split) = expect_split {
            assert_eq!(
                op.schedule().kv_chunk.is_some(),
                split,
                "{what}: split decision {:?}",
                op.schedule().kv_chunk
            );
        }
        if graph.is_none() {
            let st = fx.dev.stream().clone();
            graph = Some(Graph::capture(&st, || fx.run(&op)).unwrap());
        }
        graph.as_ref().unwrap().replay().unwrap();
        let (got, got_lse) = fx.download();
        let (want, want_lse) = fx.reference(&qo, &table, &q);
        check_step(&what, &lens, &got, &got_lse, &want, &want_lse);
    }
}

/// The engine's tiles for the limits (2048 tokens over 8 requests: on Hopper a wgmma tile).
#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_prefill_cuda_graph_replays_after_replan() {
    replay_paged_steps("prefill_graph", None);
}

/// The same steps with the short-append tile forced (16 rows, two warps over 32-key stages: a
/// larger wave, so more split pieces per tile).
#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_prefill_cuda_graph_forced_small_tiles() {
    let t = PrefillTiles::mma_sync(
        HEAD_DIM,
        QO_HEADS / KV_HEADS,
        DType::BF16,
        DType::BF16,
        true,
        PrefillMask::Causal,
        1,
    );
    assert_eq!(t.cta_q(), 16);
    replay_paged_steps("prefill_graph_small_tiles", Some(t));
}

fn arg_of(e: Error) -> &'static str {
    match e {
        Error::InvalidArgument { arg, .. } => arg,
        other => panic!("expected a typed invalid-argument error, got {other}"),
    }
}

/// Plans outside the limits are typed errors that write nothing: replaying the graph afterwards
/// still computes the last good plan's step, bit for bit.
#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_prefill_cuda_graph_rejects_steps_over_its_limits() {
    let mut rng = Rng::fresh("prefill_graph_limits");
    let mut fx = PagedFixture::new(&mut rng);
    let mut op =
        BatchPrefill::for_cuda_graph(&fx.dev, config(PrefillMask::Causal), paged_limits(), None)
            .unwrap();
    let lens = vec![(200, 900), (1, 5000), (33, 33)];
    let (qo, table, q) = fx.load_step(&mut rng, &lens);
    op.plan(&qo, PrefillKv::Paged(&table), None).unwrap();
    let st = fx.dev.stream().clone();
    let graph = Graph::capture(&st, || fx.run(&op)).unwrap();
    graph.replay().unwrap();
    let (first, first_lse) = fx.download();
    let (want, want_lse) = fx.reference(&qo, &table, &q);
    check_step("before", &lens, &first, &first_lse, &want, &want_lse);

    let plan_lens = |op: &mut BatchPrefill, lens: &[(usize, usize)], page: usize| {
        let qo = Ragged::from_lens(&lens.iter().map(|l| l.0).collect::<Vec<_>>());
        let kv: Vec<usize> = lens.iter().map(|l| l.1).collect();
        let n = PageTable::pages_needed(&kv, page);
        let ids: Vec<i32> = (0..n as i32).collect();
        let t = PageTable::from_kv_lens(&kv, page, &ids, n.max(1)).unwrap();
        op.plan(&qo, PrefillKv::Paged(&t), None)
    };
    // One request too many.
    let e = plan_lens(&mut op, &[(1, 10); MAX_BATCH + 1], PAGE).unwrap_err();
    assert_eq!(arg_of(e), "qo_indptr");
    // One query token too many.
    let e = plan_lens(&mut op, &[(MAX_QO - 10, MAX_QO), (11, 20)], PAGE).unwrap_err();
    assert_eq!(arg_of(e), "qo_indptr");
    // One page too many.
    let e = plan_lens(&mut op, &[(1, MAX_PAGES * PAGE + 1)], PAGE).unwrap_err();
    assert_eq!(arg_of(e), "kv");
    // Another page size.
    let e = plan_lens(&mut op, &[(1, 100)], 32).unwrap_err();
    assert_eq!(arg_of(e), "kv");
    // Ragged keys on a graph built for pages.
    let r = Ragged::from_lens(&[1]);
    let e = op.plan(&r, PrefillKv::Ragged(&r), None).unwrap_err();
    assert_eq!(arg_of(e), "kv");
    // Tiles of another shape than the graph's.
    let other = PrefillTiles::mma_sync(
        HEAD_DIM,
        QO_HEADS / KV_HEADS,
        DType::BF16,
        DType::BF16,
        true,
        PrefillMask::Causal,
        if op.tiles().unwrap().cta_q() == 16 {
            1 << 20
        } else {
            1
        },
    );
    assert_eq!(arg_of(op.force_tiles(Some(other)).unwrap_err()), "tiles");

    // Nothing was written: the replay recomputes the first step exactly.
    fx.poison();
    graph.replay().unwrap();
    let (again, again_lse) = fx.download();
    assert!(
        first
            .iter()
            .zip(&again)
            .all(|(a, b)| a.to_bits() == b.to_bits()),
        "a rejected plan changed what the graph computes"
    );
    assert!(first_lse
        .iter()
        .zip(&again_lse)
        .all(|(a, b)| a.to_bits() == b.to_bits()));
}

/// Ragged K/V (no mask, GQA 4): `k`/`v` hold the limit's rows, each step writes its keys in front.
#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_prefill_cuda_graph_ragged() {
    const MAX_KV: usize = 20_000;
    let dev = device();
    let st = dev.stream();
    let mut rng = Rng::fresh("prefill_graph_ragged");
    let kv_row = KV_HEADS * HEAD_DIM;
    let limits = PrefillGraphLimits {
        max_batch: 4,
        max_qo_tokens: 1024,
        kv: PrefillGraphKv::Ragged {
            max_kv_tokens: MAX_KV,
        },
        max_mask_bytes: 0,
    };
    let mut op =
        BatchPrefill::for_cuda_graph(&dev, config(PrefillMask::None), limits, None).unwrap();
    let mut dq = upload(&dev, &vec![T::ZERO; 1024 * ROW]);
    let mut dk = upload(&dev, &vec![T::ZERO; MAX_KV * kv_row]);
    let mut dv = upload(&dev, &vec![T::ZERO; MAX_KV * kv_row]);
    let mut dout = poisoned::<T>(&dev, 1024 * ROW);
    let mut dlse = poisoned::<f32>(&dev, 1024 * QO_HEADS);
    let steps: [Lens; 4] = [
        vec![(100, 500), (0, 30), (1, 1), (3, 0)],
        vec![(1, 12_000)],
        vec![(700, 700), (3, 5000), (300, 2000), (21, 2300)],
        vec![(0, 0)],
    ];
    let mut graph: Option<Graph> = None;
    for (step, lens) in steps.iter().enumerate() {
        let qo = Ragged::from_lens(&lens.iter().map(|l| l.0).collect::<Vec<_>>());
        let kv = Ragged::from_lens(&lens.iter().map(|l| l.1).collect::<Vec<_>>());
        let q: Vec<T> = rng.vec(qo.total() * ROW, 1.0);
        let k: Vec<T> = rng.vec(kv.total() * kv_row, 1.0);
        let v: Vec<T> = rng.vec(kv.total() * kv_row, 1.0);
        for (host, dst) in [(&q, &mut dq), (&k, &mut dk), (&v, &mut dv)] {
            if !host.is_empty() {
                st.memcpy_htod(host, dst).unwrap();
            }
        }
        st.memcpy_htod(&vec![T::from_f32(f32::NAN); 1024 * ROW], &mut dout)
            .unwrap();
        st.memcpy_htod(&vec![f32::NAN; 1024 * QO_HEADS], &mut dlse)
            .unwrap();
        op.plan(&qo, PrefillKv::Ragged(&kv), None).unwrap();
        let what = format!("ragged step {step} {lens:?} {}", op.tiles().unwrap().name());
        if graph.is_none() {
            let captured = Graph::capture(st, || {
                op.run_ragged(
                    DevSlice::new(&dq, st),
                    DevSlice::new(&dk, st),
                    DevSlice::new(&dv, st),
                    DevSliceMut::new(&mut dout, st),
                    Some(DevSliceMut::new(&mut dlse, st)),
                    None,
                )
            });
            graph = Some(captured.unwrap());
        }
        graph.as_ref().unwrap().replay().unwrap();
        let got = to_f32(&download(&dev, &dout));
        let got_lse = download(&dev, &dlse);
        let mut want = vec![0f32; q.len()];
        let mut want_lse = vec![0f32; qo.total() * QO_HEADS];
        reference::batch_prefill_ragged(
            &to_f32(&q),
            &qo,
            &k,
            &v,
            &kv,
            heads(),
            MaskMode::None,
            &params(),
            &mut want,
            Some(&mut want_lse),
        )
        .unwrap();
        check_step(&what, lens, &got, &got_lse, &want, &want_lse);
    }
}

/// A decode step and a prefill step over one page pool, captured in one graph, replayed after
/// both are re-planned.
#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_decode_and_prefill_in_one_cuda_graph() {
    let mut rng = Rng::fresh("decode_prefill_graph");
    let mut fx = PagedFixture::new(&mut rng);
    let dev = fx.dev.clone();
    let st = dev.stream().clone();
    let mut prefill =
        BatchPrefill::for_cuda_graph(&dev, config(PrefillMask::Causal), paged_limits(), None)
            .unwrap();
    let dcfg = DecodeConfig {
        heads: heads(),
        q_dtype: DType::BF16,
        kv_dtype: DType::BF16,
        params: params(),
        allow_split: true,
    };
    let mut decode = BatchDecode::for_cuda_graph(
        &dev,
        dcfg,
        GraphLimits {
            max_batch: MAX_BATCH,
            max_pages: MAX_PAGES,
        },
    )
    .unwrap();
    let mut dq_dec = upload(&dev, &vec![T::ZERO; MAX_BATCH * ROW]);
    let mut dout_dec = poisoned::<T>(&dev, MAX_BATCH * ROW);
    let mut di_dec = upload(&dev, &vec![0i32; MAX_PAGES]);
    // (decode kv lens, prefill lens) per step.
    let steps: [(Vec<usize>, Lens); 3] = [
        (vec![100, 2000, 0, 17], vec![(300, 300), (1, 2000), (0, 40)]),
        (vec![9000], vec![(900, 1000), (64, 3000), (5, 0), (1, 1)]),
        (vec![1, 3, 500, 999, 0, 16, 7, 4000], vec![(1, 15000)]),
    ];
    let mut graph: Option<Graph> = None;
    for (step, (dec_lens, lens)) in steps.iter().enumerate() {
        let (qo, table, q) = fx.load_step(&mut rng, lens);
        let mut ids: Vec<i32> = (0..NUM_PAGES as i32).collect();
        rng.shuffle(&mut ids);
        let dec_table = PageTable::from_kv_lens(dec_lens, PAGE, &ids, NUM_PAGES).unwrap();
        let q_dec: Vec<T> = rng.vec(dec_lens.len() * ROW, 1.0);
        st.memcpy_htod(&q_dec, &mut dq_dec).unwrap();
        if !dec_table.kv_indices().is_empty() {
            st.memcpy_htod(dec_table.kv_indices(), &mut di_dec).unwrap();
        }
        st.memcpy_htod(&vec![T::from_f32(f32::NAN); MAX_BATCH * ROW], &mut dout_dec)
            .unwrap();
        prefill.plan(&qo, PrefillKv::Paged(&table), None).unwrap();
        decode.plan(&dec_table).unwrap();
        if graph.is_none() {
            let captured = Graph::capture(&st, || {
                fx.run(&prefill)?;
                decode.run(
                    DevSlice::new(&dq_dec, &st),
                    DevSlice::new(&fx.dk, &st),
                    DevSlice::new(&fx.dv, &st),
                    &fx.desc,
                    DevSlice::new(&di_dec, &st),
                    DevSliceMut::new(&mut dout_dec, &st),
                    None,
                )
            });
            graph = Some(captured.unwrap());
        }
        graph.as_ref().unwrap().replay().unwrap();

        let what = format!("step {step} prefill {lens:?}");
        let (got, got_lse) = fx.download();
        let (want, want_lse) = fx.reference(&qo, &table, &q);
        check_step(&what, lens, &got, &got_lse, &want, &want_lse);

        let got_dec = to_f32(&download(&dev, &dout_dec));
        let pool = PagedKv::new(fx.desc, &fx.k, &fx.v).unwrap();
        let mut want_dec = vec![0f32; q_dec.len()];
        reference::batch_decode(
            &to_f32(&q_dec),
            &pool,
            &dec_table,
            heads(),
            &params(),
            &mut want_dec,
            None,
        )
        .unwrap();
        for (r, &len) in dec_lens.iter().enumerate() {
            let w: Vec<f64> = want_dec[r * ROW..(r + 1) * ROW]
                .iter()
                .map(|&x| x as f64)
                .collect();
            let err = rel_l2_error(&got_dec[r * ROW..(r + 1) * ROW], &w);
            assert!(
                err <= tolerance::<T>(),
                "step {step} decode {dec_lens:?}: request {r} (kv_len {len}) rel err {err}"
            );
        }
        assert!(
            got_dec[dec_lens.len() * ROW..].iter().all(|x| x.is_nan()),
            "step {step}: a decode row past the batch was written"
        );
    }
}
