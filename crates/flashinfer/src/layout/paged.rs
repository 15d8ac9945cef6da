//! The paged KV cache: a pool of fixed-size pages plus a page table per request.
//!
//! Conventions (DESIGN.md): layouts NHD `[pages, page_size, heads, dim]` and HND
//! `[pages, heads, page_size, dim]`; K and V as two tensors or one `[pages, 2, ...]` tensor; any page
//! stride at least one page's footprint. The page table is `kv_indptr[batch+1]` (pages per request,
//! prefix-summed), `kv_indices` (page ids) and `kv_last_page_len[batch]` (`1..=page_size` for a
//! non-empty request, 0 for an empty one).

use super::validate_indptr;
use crate::error::{ensure, invalid, Result};

/// Order of the dimensions inside one page.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KvLayout {
    /// `[page_size, num_kv_heads, head_dim]` per page.
    Nhd,
    /// `[num_kv_heads, page_size, head_dim]` per page.
    Hnd,
}

impl std::str::FromStr for KvLayout {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "nhd" => Ok(KvLayout::Nhd),
            "hnd" => Ok(KvLayout::Hnd),
            _ => Err(format!("unknown KV layout `{s}` (expected nhd or hnd)")),
        }
    }
}

impl std::fmt::Display for KvLayout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            KvLayout::Nhd => "nhd",
            KvLayout::Hnd => "hnd",
        })
    }
}

/// Shape and strides of a page pool, in elements. Describes host and device buffers alike.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PagedKvDesc {
    pub layout: KvLayout,
    pub num_pages: usize,
    pub page_size: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// Elements from page `p` to page `p + 1` (in the K tensor, and in the V tensor).
    pub page_stride: usize,
    /// `Some(off)`: K and V share one `[pages, 2, ...]` tensor and V of page `p` starts `off`
    /// elements after K of page `p`. `None`: K and V are two tensors with the same strides.
    pub v_offset: Option<usize>,
}

impl PagedKvDesc {
    /// For ops that plan against a description and run against one: the two must be the same
    /// (the plan's offsets and bounds were computed for it).
    pub(crate) fn ensure_planned_for(&self, planned: &PagedKvDesc) -> Result<()> {
        ensure(self == planned, "desc", || {
            format!("{self:?} differs from the description given to plan(), {planned:?}")
        })
    }

    /// Separate K and V tensors, densely packed.
    pub fn new(
        layout: KvLayout,
        num_pages: usize,
        page_size: usize,
        num_kv_heads: usize,
        head_dim: usize,
    ) -> Result<Self> {
        ensure(page_size >= 1, "page_size", || "must be at least 1".into())?;
        ensure(num_kv_heads >= 1, "num_kv_heads", || {
            "must be at least 1".into()
        })?;
        ensure(head_dim >= 1, "head_dim", || "must be at least 1".into())?;
        let page_elems = page_size * num_kv_heads * head_dim;
        Ok(Self {
            layout,
            num_pages,
            page_size,
            num_kv_heads,
            head_dim,
            page_stride: page_elems,
            v_offset: None,
        })
    }

    /// One `[pages, 2, ...]` tensor holding K then V of each page.
    pub fn combined(
        layout: KvLayout,
        num_pages: usize,
        page_size: usize,
        num_kv_heads: usize,
        head_dim: usize,
    ) -> Result<Self> {
        let mut d = Self::new(layout, num_pages, page_size, num_kv_heads, head_dim)?;
        d.v_offset = Some(d.page_elems());
        d.page_stride = 2 * d.page_elems();
        Ok(d)
    }

    /// Overrides the page stride (e.g. a view into a larger, layer-interleaved pool).
    pub fn with_page_stride(mut self, page_stride: usize) -> Result<Self> {
        ensure(page_stride >= self.page_footprint(), "page_stride", || {
            format!(
                "{page_stride} is smaller than one page's footprint of {} elements",
                self.page_footprint()
            )
        })?;
        self.page_stride = page_stride;
        Ok(self)
    }

    /// Re-checks a description whose public fields may not come from the constructors: nonzero
    /// sizes, V not overlapping K inside a page, pages not overlapping each other, and a pool
    /// extent ([`PagedKvDesc::required_len`]) that fits `usize`. After it, every offset of a
    /// (page < num_pages, token, head) is computable without overflow.
    pub fn validate(&self) -> Result<()> {
        ensure(self.page_size >= 1, "page_size", || {
            "must be at least 1".into()
        })?;
        ensure(self.num_kv_heads >= 1, "num_kv_heads", || {
            "must be at least 1".into()
        })?;
        ensure(self.head_dim >= 1, "head_dim", || {
            "must be at least 1".into()
        })?;
        let page_elems = self
            .page_size
            .checked_mul(self.num_kv_heads)
            .and_then(|x| x.checked_mul(self.head_dim))
            .ok_or_else(|| invalid("desc", format!("one page of {self:?} overflows usize")))?;
        if let Some(off) = self.v_offset {
            ensure(off >= page_elems, "v_offset", || {
                format!("{off} is smaller than one page's K part of {page_elems} elements")
            })?;
        }
        let footprint = self
            .v_offset
            .unwrap_or(0)
            .checked_add(page_elems)
            .ok_or_else(|| invalid("v_offset", "page footprint overflows usize"))?;
        ensure(self.page_stride >= footprint, "page_stride", || {
            format!(
                "{} is smaller than one page's footprint of {footprint} elements",
                self.page_stride
            )
        })?;
        if self.num_pages > 0 {
            (self.num_pages - 1)
                .checked_mul(self.page_stride)
                .and_then(|x| x.checked_add(footprint))
                .ok_or_else(|| invalid("page_stride", "the pool's extent overflows usize"))?;
        }
        Ok(())
    }

    /// Elements of K (or of V) in one page.
    pub fn page_elems(&self) -> usize {
        self.page_size * self.num_kv_heads * self.head_dim
    }

    /// Elements one page spans from its K start to the end of its data.
    fn page_footprint(&self) -> usize {
        self.v_offset.unwrap_or(0) + self.page_elems()
    }

    pub fn token_stride(&self) -> usize {
        match self.layout {
            KvLayout::Nhd => self.num_kv_heads * self.head_dim,
            KvLayout::Hnd => self.head_dim,
        }
    }

    pub fn head_stride(&self) -> usize {
        match self.layout {
            KvLayout::Nhd => self.head_dim,
            KvLayout::Hnd => self.page_size * self.head_dim,
        }
    }

    /// Offset of K[page, token, head, 0]. Add `v_offset` (or use the V tensor) for V.
    pub fn k_offset(&self, page: usize, token: usize, head: usize) -> usize {
        page * self.page_stride + token * self.token_stride() + head * self.head_stride()
    }

    /// Offset of V[page, token, head, 0] in the V tensor (which is the K tensor when combined).
    pub fn v_offset_of(&self, page: usize, token: usize, head: usize) -> usize {
        self.k_offset(page, token, head) + self.v_offset.unwrap_or(0)
    }

    /// Minimum number of elements the K tensor (the combined tensor) must hold.
    pub fn required_len(&self) -> usize {
        if self.num_pages == 0 {
            0
        } else {
            (self.num_pages - 1) * self.page_stride + self.page_footprint()
        }
    }

    /// Checks that K and V buffers of these lengths hold the whole pool.
    pub fn check_buffers(&self, k_len: usize, v_len: usize) -> Result<()> {
        let need = self.required_len();
        ensure(k_len >= need, "k_cache", || {
            format!(
                "has {k_len} elements; the pool of {} pages needs {need}",
                self.num_pages
            )
        })?;
        if self.v_offset.is_none() {
            ensure(v_len >= need, "v_cache", || {
                format!(
                    "has {v_len} elements; the pool of {} pages needs {need}",
                    self.num_pages
                )
            })?;
        }
        Ok(())
    }
}

/// A host page pool: the description plus its buffers.
#[derive(Clone, Copy, Debug)]
pub struct PagedKv<'a, T> {
    pub desc: PagedKvDesc,
    pub k: &'a [T],
    pub v: &'a [T],
}

impl<'a, T> PagedKv<'a, T> {
    /// Separate K and V tensors.
    pub fn new(desc: PagedKvDesc, k: &'a [T], v: &'a [T]) -> Result<Self> {
        if desc.v_offset.is_some() {
            return Err(invalid(
                "desc",
                "describes a combined [pages, 2, ...] tensor; use PagedKv::combined",
            ));
        }
        desc.check_buffers(k.len(), v.len())?;
        Ok(Self { desc, k, v })
    }

    /// One `[pages, 2, ...]` tensor.
    pub fn combined(desc: PagedKvDesc, kv: &'a [T]) -> Result<Self> {
        if desc.v_offset.is_none() {
            return Err(invalid(
                "desc",
                "describes separate K and V tensors; use PagedKv::new",
            ));
        }
        desc.check_buffers(kv.len(), kv.len())?;
        Ok(Self { desc, k: kv, v: kv })
    }

    /// K row `[head_dim]` of (page, token in page, KV head).
    pub fn key(&self, page: usize, token: usize, head: usize) -> &'a [T] {
        let o = self.desc.k_offset(page, token, head);
        &self.k[o..o + self.desc.head_dim]
    }

    /// V row `[head_dim]` of (page, token in page, KV head).
    pub fn value(&self, page: usize, token: usize, head: usize) -> &'a [T] {
        let o = self.desc.v_offset_of(page, token, head);
        &self.v[o..o + self.desc.head_dim]
    }
}

/// A validated page table over a pool of `num_pages` pages of `page_size` tokens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PageTable {
    kv_indptr: Vec<i32>,
    kv_indices: Vec<i32>,
    kv_last_page_len: Vec<i32>,
    page_size: usize,
}

impl PageTable {
    pub fn new(
        kv_indptr: &[i32],
        kv_indices: &[i32],
        kv_last_page_len: &[i32],
        page_size: usize,
        num_pages: usize,
    ) -> Result<Self> {
        ensure(page_size >= 1, "page_size", || "must be at least 1".into())?;
        let batch = kv_last_page_len.len();
        validate_indptr("kv_indptr", kv_indptr, Some(batch), None)?;
        let used = *kv_indptr.last().unwrap_or(&0) as usize;
        ensure(used == kv_indices.len(), "kv_indices", || {
            format!(
                "has {} entries but kv_indptr[batch] = {used}",
                kv_indices.len()
            )
        })?;
        for (i, &p) in kv_indices.iter().enumerate() {
            ensure(p >= 0 && (p as usize) < num_pages, "kv_indices", || {
                format!("kv_indices[{i}] = {p} is outside the pool of {num_pages} pages")
            })?;
        }
        for (i, &l) in kv_last_page_len.iter().enumerate() {
            let pages = kv_indptr[i + 1] - kv_indptr[i];
            if pages == 0 {
                ensure(l == 0, "kv_last_page_len", || {
                    format!("kv_last_page_len[{i}] = {l} for a request with no pages; must be 0")
                })?;
            } else {
                ensure(
                    l >= 1 && l as usize <= page_size,
                    "kv_last_page_len",
                    || format!("kv_last_page_len[{i}] = {l} is outside 1..={page_size}"),
                )?;
            }
        }
        Ok(Self {
            kv_indptr: kv_indptr.to_vec(),
            kv_indices: kv_indices.to_vec(),
            kv_last_page_len: kv_last_page_len.to_vec(),
            page_size,
        })
    }

    /// Pages needed to hold each of `kv_lens`.
    pub fn pages_needed(kv_lens: &[usize], page_size: usize) -> usize {
        kv_lens.iter().map(|&l| l.div_ceil(page_size.max(1))).sum()
    }

    /// A table for `kv_lens`, taking page ids from `page_ids` in order (a permutation of the pool
    /// makes pages non-contiguous, as in a real cache).
    pub fn from_kv_lens(
        kv_lens: &[usize],
        page_size: usize,
        page_ids: &[i32],
        num_pages: usize,
    ) -> Result<Self> {
        ensure(page_size >= 1, "page_size", || "must be at least 1".into())?;
        let need = Self::pages_needed(kv_lens, page_size);
        ensure(page_ids.len() >= need, "page_ids", || {
            format!("has {} ids; the lengths need {need} pages", page_ids.len())
        })?;
        let mut indptr = vec![0i32];
        let mut last = Vec::with_capacity(kv_lens.len());
        for &l in kv_lens {
            let pages = l.div_ceil(page_size);
            indptr.push(indptr.last().unwrap() + pages as i32);
            last.push(if l == 0 {
                0
            } else {
                (l - (pages - 1) * page_size) as i32
            });
        }
        Self::new(&indptr, &page_ids[..need], &last, page_size, num_pages)
    }

    pub fn batch_size(&self) -> usize {
        self.kv_last_page_len.len()
    }
    pub fn page_size(&self) -> usize {
        self.page_size
    }
    pub fn kv_indptr(&self) -> &[i32] {
        &self.kv_indptr
    }
    pub fn kv_indices(&self) -> &[i32] {
        &self.kv_indices
    }
    pub fn kv_last_page_len(&self) -> &[i32] {
        &self.kv_last_page_len
    }
    /// Page ids of request `i`, in order.
    pub fn pages(&self, i: usize) -> &[i32] {
        &self.kv_indices[self.kv_indptr[i] as usize..self.kv_indptr[i + 1] as usize]
    }
    /// Tokens of request `i`.
    pub fn kv_len(&self, i: usize) -> usize {
        let pages = (self.kv_indptr[i + 1] - self.kv_indptr[i]) as usize;
        if pages == 0 {
            0
        } else {
            (pages - 1) * self.page_size + self.kv_last_page_len[i] as usize
        }
    }
    pub fn kv_lens(&self) -> Vec<usize> {
        (0..self.batch_size()).map(|i| self.kv_len(i)).collect()
    }
    /// (page id, token within page) of token `t` of request `i`.
    pub fn locate(&self, i: usize, t: usize) -> (usize, usize) {
        let p = self.pages(i)[t / self.page_size] as usize;
        (p, t % self.page_size)
    }
}
