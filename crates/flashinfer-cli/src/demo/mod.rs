//! `flashinfer demo`: batch decode of requests of very unequal lengths over a paged KV cache,
//! checked end to end.
//!
//! The batch: bf16, 32 query / 8 KV heads (GQA 4), head_dim 128, page size 16, page ids shuffled
//! (a real cache is fragmented), and every slot no request owns (spare pages, the tail of each
//! last page) poisoned with NaN, so reading outside the page table cannot go unnoticed.
//!
//! Two things are computed and checked for every request:
//! 1. decode over its whole KV;
//! 2. decode over the first half of its pages and over the rest, merged with `merge_state` (the
//!    paper's composable formats: prefix ⊕ suffix = whole).
//!
//! On a GPU both run there (`BatchDecode` plan/run, the GPU `merge_state`) and are checked against
//! the CPU backend; without one, the CPU backend runs them and is checked against a naive f64
//! computation written here ([`naive`]).

mod cpu;
mod gpu;
mod naive;

use std::sync::Arc;

use clap::{Args, ValueEnum};
use flashinfer::cuda::Device;
use flashinfer::layout::{HeadConfig, KvLayout, PageTable, PagedKvDesc};
use half::bf16;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{RngExt, SeedableRng};

pub const PAGE_SIZE: usize = 16;
pub const NUM_QO_HEADS: usize = 32;
pub const NUM_KV_HEADS: usize = 8;
pub const HEAD_DIM: usize = 128;
/// Pages no request owns, so that the ids in use are not simply 0..n.
const SPARE_PAGES: usize = 8;
/// Cap on the tokens of all requests: the demo holds the whole cache in host memory (64 KiB of K
/// and V per page of 16 tokens).
const MAX_TOTAL_TOKENS: usize = 1 << 18;

/// DESIGN.md's tolerance for bf16: ‖out − ref‖ / ‖ref‖.
pub const OUT_TOL: f64 = 1e-2;
/// Largest |lse − ref| accepted (natural log). LSE is accumulated in f32 on every backend.
pub const LSE_TOL: f64 = 1e-3;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Backend {
    /// The GPU if there is one, else the CPU backend.
    Auto,
    /// The GPU; fail without one.
    Gpu,
    /// The CPU backend, even with a GPU present.
    Cpu,
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Where to run.
    #[arg(long, value_enum, default_value_t = Backend::Auto)]
    backend: Backend,

    /// KV length of each request, comma-separated (0 is an empty request).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "0,1,17,300,1000,2500,4097"
    )]
    kv_lens: Vec<usize>,

    /// Seed of the random inputs.
    #[arg(long, default_value_t = 42)]
    seed: u64,
}

/// The demo's inputs. Everything the naive reference reads is kept here in plain form
/// (`request_pages`, `kv_lens`), independent of the library's page-table helpers.
pub struct Batch {
    pub heads: HeadConfig,
    pub desc: PagedKvDesc,
    pub kv_lens: Vec<usize>,
    /// Page ids of each request, in order.
    pub request_pages: Vec<Vec<usize>>,
    pub table: PageTable,
    /// The first half of each request's pages, and the rest.
    pub prefix: PageTable,
    pub suffix: PageTable,
    /// `[batch, num_qo_heads, head_dim]`
    pub q: Vec<bf16>,
    /// `[num_pages, page_size, num_kv_heads, head_dim]` (NHD), each.
    pub k: Vec<bf16>,
    pub v: Vec<bf16>,
}

impl Batch {
    pub fn new(kv_lens: &[usize], seed: u64) -> Result<Batch, String> {
        if kv_lens.is_empty() {
            return Err("--kv-lens needs at least one length".into());
        }
        let total: usize = kv_lens.iter().sum();
        if total > MAX_TOTAL_TOKENS {
            return Err(format!(
                "--kv-lens adds up to {total} tokens; the demo takes at most {MAX_TOTAL_TOKENS}"
            ));
        }
        let heads = HeadConfig::new(NUM_QO_HEADS, NUM_KV_HEADS, HEAD_DIM).map_err(err)?;
        let needed: usize = kv_lens.iter().map(|l| l.div_ceil(PAGE_SIZE)).sum();
        let num_pages = needed + SPARE_PAGES;
        let desc = PagedKvDesc::new(KvLayout::Nhd, num_pages, PAGE_SIZE, NUM_KV_HEADS, HEAD_DIM)
            .map_err(err)?;

        let mut rng = StdRng::seed_from_u64(seed);
        let mut ids: Vec<usize> = (0..num_pages).collect();
        ids.shuffle(&mut rng);
        let mut next = ids.into_iter();
        let request_pages: Vec<Vec<usize>> = kv_lens
            .iter()
            .map(|l| next.by_ref().take(l.div_ceil(PAGE_SIZE)).collect())
            .collect();

        let table = page_table(&request_pages, kv_lens, num_pages, |pages| (0, pages.len()))?;
        let prefix = page_table(&request_pages, kv_lens, num_pages, |pages| {
            (0, pages.len() / 2)
        })?;
        let suffix = page_table(&request_pages, kv_lens, num_pages, |pages| {
            (pages.len() / 2, pages.len())
        })?;

        // Poison everything, then write the tokens requests own.
        let token_elems = NUM_KV_HEADS * HEAD_DIM;
        let mut k = vec![bf16::NAN; num_pages * PAGE_SIZE * token_elems];
        let mut v = k.clone();
        for (pages, &len) in request_pages.iter().zip(kv_lens) {
            for t in 0..len {
                let at = (pages[t / PAGE_SIZE] * PAGE_SIZE + t % PAGE_SIZE) * token_elems;
                for x in &mut k[at..at + token_elems] {
                    *x = bf16::from_f32(rng.random_range(-1.0f32..1.0));
                }
                for x in &mut v[at..at + token_elems] {
                    *x = bf16::from_f32(rng.random_range(-1.0f32..1.0));
                }
            }
        }
        // Queries a little larger than keys, so that softmax is peaked rather than uniform.
        let q = (0..kv_lens.len() * NUM_QO_HEADS * HEAD_DIM)
            .map(|_| bf16::from_f32(rng.random_range(-2.0f32..2.0)))
            .collect();
        Ok(Batch {
            heads,
            desc,
            kv_lens: kv_lens.to_vec(),
            request_pages,
            table,
            prefix,
            suffix,
            q,
            k,
            v,
        })
    }

    pub fn batch_size(&self) -> usize {
        self.kv_lens.len()
    }
    /// Elements of one request's output rows, `num_qo_heads * head_dim`.
    pub fn row_elems(&self) -> usize {
        NUM_QO_HEADS * HEAD_DIM
    }
}

/// A page table over the pages `range(pages)` of each request. A request keeps its real last-page
/// length when the range ends at its last page; a range ending earlier ends on a full page.
fn page_table(
    request_pages: &[Vec<usize>],
    kv_lens: &[usize],
    num_pages: usize,
    range: impl Fn(&[usize]) -> (usize, usize),
) -> Result<PageTable, String> {
    let mut indptr = vec![0i32];
    let mut indices = Vec::new();
    let mut last = Vec::new();
    for (pages, &len) in request_pages.iter().zip(kv_lens) {
        let (start, end) = range(pages);
        indices.extend(pages[start..end].iter().map(|&p| p as i32));
        indptr.push(indices.len() as i32);
        last.push(if start == end {
            0
        } else if end == pages.len() {
            (len - (pages.len() - 1) * PAGE_SIZE) as i32
        } else {
            PAGE_SIZE as i32
        });
    }
    PageTable::new(&indptr, &indices, &last, PAGE_SIZE, num_pages).map_err(err)
}

/// The checks of one request.
#[derive(Clone, Copy, Debug)]
pub struct RowCheck {
    /// Relative L2 error of the decode output.
    pub out_err: f64,
    /// Largest absolute error of its LSE (natural log).
    pub lse_err: f64,
    /// The same for prefix ⊕ suffix.
    pub merge_out_err: f64,
    pub merge_lse_err: f64,
}

impl RowCheck {
    pub fn passes(&self) -> bool {
        // Written so that a NaN error fails.
        self.out_err <= OUT_TOL
            && self.lse_err <= LSE_TOL
            && self.merge_out_err <= OUT_TOL
            && self.merge_lse_err <= LSE_TOL
    }
}

/// Largest |a − b| over two LSE rows; equal infinities (an empty request's -inf) count as equal,
/// anything else non-finite as an infinite error.
pub fn lse_error(out: &[f32], reference: &[f64]) -> f64 {
    if out.len() != reference.len() {
        return f64::INFINITY;
    }
    out.iter()
        .zip(reference)
        .map(|(&o, &r)| {
            let o = o as f64;
            if o == r {
                0.0
            } else if o.is_finite() && r.is_finite() {
                (o - r).abs()
            } else {
                f64::INFINITY
            }
        })
        .fold(0.0, f64::max)
}

pub fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

pub fn run(args: &DemoArgs) -> Result<(), String> {
    // Decide where to run before building inputs: `--backend gpu` without a GPU fails fast.
    let (device, cpu_reason): (Option<Arc<Device>>, String) = match args.backend {
        Backend::Cpu => (None, "the CPU backend was requested (--backend cpu)".into()),
        Backend::Gpu => {
            if Device::count() == 0 {
                return Err(format!("--backend gpu: {}", crate::info::no_gpu_reason()));
            }
            (
                Some(Device::new(0).map_err(|e| format!("--backend gpu: {e}"))?),
                String::new(),
            )
        }
        Backend::Auto if Device::count() == 0 => (None, crate::info::no_gpu_reason()),
        Backend::Auto => match Device::new(0) {
            Ok(dev) => (Some(dev), String::new()),
            Err(e) => (None, format!("a GPU is present but unusable: {e}")),
        },
    };

    let batch = Batch::new(&args.kv_lens, args.seed)?;
    say!(
        "flashinfer demo: batch decode of {} requests, kv_lens {:?}",
        batch.batch_size(),
        batch.kv_lens
    );
    say!(
        "  paged KV cache: page_size {PAGE_SIZE}, {} pages with shuffled ids, unused slots poisoned \
         with NaN; bf16; {NUM_QO_HEADS} query / {NUM_KV_HEADS} KV heads, head_dim {HEAD_DIM}; seed {}",
        batch.desc.num_pages, args.seed
    );

    let (checks, ran_on) = match &device {
        Some(dev) => {
            let checks = gpu::run(dev, &batch)?;
            let info = dev.info();
            (
                checks,
                format!("ran on GPU {}: {} ({})", info.ordinal, info.name, info.arch),
            )
        }
        None => {
            say!("  ({cpu_reason})");
            let checks = cpu::run(&batch)?;
            let who = if args.backend == Backend::Cpu {
                "CPU backend requested"
            } else {
                "no GPU"
            };
            (checks, format!("{who}: ran on the CPU backend"))
        }
    };
    print_table(&batch, &checks);
    say!("{ran_on}");

    let failed = checks.iter().filter(|c| !c.passes()).count();
    if failed == 0 {
        say!(
            "all {} requests pass (output rel L2 <= {OUT_TOL:.0e}, LSE abs <= {LSE_TOL:.0e})",
            checks.len()
        );
        Ok(())
    } else {
        Err(format!(
            "{failed} of {} requests failed the check (output rel L2 <= {OUT_TOL:.0e}, LSE abs <= {LSE_TOL:.0e})",
            checks.len()
        ))
    }
}

fn print_table(batch: &Batch, checks: &[RowCheck]) {
    say!(
        "{:>4} {:>7} {:>6} {:>10} {:>10} {:>12} {:>12}  result",
        "req",
        "kv_len",
        "pages",
        "out err",
        "lse err",
        "merged out",
        "merged lse"
    );
    for (i, c) in checks.iter().enumerate() {
        say!(
            "{i:>4} {:>7} {:>6} {:>10.2e} {:>10.2e} {:>12.2e} {:>12.2e}  {}",
            batch.kv_lens[i],
            batch.request_pages[i].len(),
            c.out_err,
            c.lse_err,
            c.merge_out_err,
            c.merge_lse_err,
            if c.passes() { "pass" } else { "FAIL" }
        );
    }
    say!(
        "  out err: ‖out − ref‖/‖ref‖ over the request's {NUM_QO_HEADS} heads; lse err: max |lse − ref|; \
         merged: decode of the first half of the pages ⊕ decode of the rest, against the whole"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_layout_is_consistent() {
        let b = Batch::new(&[0, 1, 16, 17, 33], 7).unwrap();
        assert_eq!(b.table.kv_lens(), vec![0, 1, 16, 17, 33]);
        let halves: Vec<usize> = (0..5)
            .map(|i| b.prefix.kv_len(i) + b.suffix.kv_len(i))
            .collect();
        assert_eq!(halves, vec![0, 1, 16, 17, 33]);
        assert_eq!(b.prefix.kv_lens(), vec![0, 0, 0, 16, 16]);
        // Owned tokens are finite, the tail of a last page is poisoned.
        let (p, t) = b.table.locate(3, 16);
        assert!(b.k[(p * PAGE_SIZE + t) * NUM_KV_HEADS * HEAD_DIM].is_finite());
        assert!(b.k[(p * PAGE_SIZE + t + 1) * NUM_KV_HEADS * HEAD_DIM].is_nan());
    }

    #[test]
    fn lse_error_treats_matching_infinities_as_equal() {
        assert_eq!(lse_error(&[f32::NEG_INFINITY], &[f64::NEG_INFINITY]), 0.0);
        assert_eq!(lse_error(&[0.0], &[f64::NEG_INFINITY]), f64::INFINITY);
        assert_eq!(lse_error(&[f32::NAN], &[1.0]), f64::INFINITY);
        assert!((lse_error(&[1.5, 2.0], &[1.0, 2.25]) - 0.5).abs() < 1e-12);
    }

    #[test]
    fn too_many_tokens_is_an_error() {
        assert!(Batch::new(&[MAX_TOTAL_TOKENS + 1], 0).is_err());
        assert!(Batch::new(&[], 0).is_err());
    }
}
