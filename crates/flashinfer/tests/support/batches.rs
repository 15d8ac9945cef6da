//! Random cascade batches and block-sparse patterns shared by the CPU and GPU tests.

use flashinfer::layout::{Bsr, PageTable, Ragged};
use flashinfer::random::SplitMix64;

/// A batch whose requests share prefixes, described two ways: as cascade levels, and as one
/// page table per request holding all of its pages (the "one level" it must equal).
pub struct CascadeBatch {
    pub page_size: usize,
    pub num_pages: usize,
    /// Queries of each request.
    pub qo: Ragged,
    /// `(qo_indptr over groups, table with one entry per group)` per level, shared ones first.
    pub levels: Vec<(Ragged, PageTable)>,
    /// Each request's pages over all levels, in order.
    pub one_level: PageTable,
}

/// `batch` requests with `num_levels` levels: level 0 is one group of all requests, middle levels
/// cut the batch into random consecutive groups; shared levels hold up to `max_shared_pages` full
/// pages per group (possibly none); the last level is each request's own keys (at least its
/// `qo_len` of them, so that every query sees its whole prefix, as in a real append).
pub fn cascade_batch(
    rng: &mut SplitMix64,
    batch: usize,
    num_levels: usize,
    page_size: usize,
    max_shared_pages: usize,
    max_qo: usize,
    max_suffix: usize,
) -> CascadeBatch {
    let qo_lens: Vec<usize> = (0..batch).map(|_| 1 + rng.below(max_qo)).collect();
    let suffix: Vec<usize> = qo_lens
        .iter()
        .map(|&q| q + rng.below(max_suffix + 1))
        .collect();
    // Groups per shared level: (first request, end) ranges.
    let mut groups: Vec<Vec<(usize, usize)>> = Vec::new();
    for l in 0..num_levels.saturating_sub(1) {
        if l == 0 {
            groups.push(vec![(0, batch)]);
        } else {
            let mut g = Vec::new();
            let mut start = 0;
            while start < batch {
                let end = (start + 1 + rng.below(batch.div_ceil(2))).min(batch);
                g.push((start, end));
                start = end;
            }
            groups.push(g);
        }
    }
    let shared_pages: Vec<Vec<usize>> = groups
        .iter()
        .map(|g| g.iter().map(|_| rng.below(max_shared_pages + 1)).collect())
        .collect();
    let total: usize = shared_pages.iter().flatten().sum::<usize>()
        + suffix.iter().map(|s| s.div_ceil(page_size)).sum::<usize>();
    let num_pages = total + 2;
    let mut ids: Vec<i32> = (0..num_pages as i32).collect();
    rng.shuffle(&mut ids);
    let mut next = 0usize;
    let mut take = |n: usize| {
        let v = ids[next..next + n].to_vec();
        next += n;
        v
    };
    let mut levels = Vec::new();
    let mut per_request: Vec<Vec<i32>> = vec![Vec::new(); batch];
    for (l, g) in groups.iter().enumerate() {
        let mut indptr = vec![0i32];
        let mut indices = Vec::new();
        let mut last = Vec::new();
        let mut qo_group = Vec::new();
        for (gi, &(a, b)) in g.iter().enumerate() {
            let pages = take(shared_pages[l][gi]);
            for r in per_request.iter_mut().take(b).skip(a) {
                r.extend(&pages);
            }
            indices.extend(&pages);
            indptr.push(indices.len() as i32);
            last.push(if pages.is_empty() {
                0
            } else {
                page_size as i32
            });
            qo_group.push(qo_lens[a..b].iter().sum());
        }
        let table = PageTable::new(&indptr, &indices, &last, page_size, num_pages).unwrap();
        levels.push((Ragged::from_lens(&qo_group), table));
    }
    // The last level: each request's own keys.
    let mut indptr = vec![0i32];
    let mut indices = Vec::new();
    let mut last = Vec::new();
    for r in 0..batch {
        let pages = take(suffix[r].div_ceil(page_size));
        per_request[r].extend(&pages);
        indices.extend(&pages);
        indptr.push(indices.len() as i32);
        last.push((suffix[r] - (pages.len() - 1) * page_size) as i32);
    }
    let own = PageTable::new(&indptr, &indices, &last, page_size, num_pages).unwrap();
    levels.push((Ragged::from_lens(&qo_lens), own));
    let mut indptr = vec![0i32];
    let mut all = Vec::new();
    for r in &per_request {
        all.extend(r);
        indptr.push(all.len() as i32);
    }
    let one_level = PageTable::new(&indptr, &all, &last, page_size, num_pages).unwrap();
    CascadeBatch {
        page_size,
        num_pages,
        qo: Ragged::from_lens(&qo_lens),
        levels,
        one_level,
    }
}

/// A random R x C pattern over `num_rows` x `num_cols` (a multiple of C), about `density` of the
/// blocks present (some block rows empty), and random per-block masks.
pub fn bsr_pattern(
    rng: &mut SplitMix64,
    r: usize,
    c: usize,
    num_rows: usize,
    num_cols: usize,
    density_pct: usize,
) -> (Bsr, Vec<bool>) {
    let (mb, nb) = (num_rows.div_ceil(r), num_cols / c);
    let mut indptr = vec![0i32];
    let mut indices = Vec::new();
    for _ in 0..mb {
        let mut cols: Vec<i32> = (0..nb as i32)
            .filter(|_| rng.below(100) < density_pct)
            .collect();
        rng.shuffle(&mut cols); // any order: the op sorts
        indices.extend(cols);
        indptr.push(indices.len() as i32);
    }
    let bsr = Bsr::new(r, c, num_rows, num_cols, &indptr, &indices).unwrap();
    let mask = (0..indices.len() * r * c)
        .map(|_| rng.below(4) != 0)
        .collect();
    (bsr, mask)
}
