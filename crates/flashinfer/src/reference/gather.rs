//! The gather: where key `j` of a request lives, for each KV layout.
//!
//! A [`KvSource`] answers two questions, the request's number of keys and the (K, V) rows of its
//! key `j` for one KV head; everything after that is the same code ([`super::attend`]).

use crate::layout::{PageTable, PagedKv, Ragged};

/// Where the keys of each request of a batch live.
pub(crate) trait KvSource<KV>: Sync {
    /// Number of keys of request `request`.
    fn kv_len(&self, request: usize) -> usize;
    /// (K row, V row), each `[head_dim]`, of key `j < kv_len(request)` for KV head `kv_head`.
    fn row(&self, request: usize, j: usize, kv_head: usize) -> (&[KV], &[KV]);
}

/// Where each request's keys start in a contiguous `[tokens, num_kv_heads, head_dim]` tensor.
pub(crate) enum Starts<'a> {
    /// One request of this many keys (single decode / prefill).
    Single(usize),
    /// Request i holds rows `kv_indptr[i]..kv_indptr[i+1]`.
    Ragged(&'a Ragged),
}

/// Contiguous K and V, `[tokens, num_kv_heads, head_dim]` each: the affine-index case.
pub(crate) struct ContiguousKv<'a, KV> {
    pub k: &'a [KV],
    pub v: &'a [KV],
    pub starts: Starts<'a>,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

impl<KV: Sync> KvSource<KV> for ContiguousKv<'_, KV> {
    fn kv_len(&self, request: usize) -> usize {
        match &self.starts {
            Starts::Single(n) => *n,
            Starts::Ragged(r) => r.len(request),
        }
    }

    #[inline]
    fn row(&self, request: usize, j: usize, kv_head: usize) -> (&[KV], &[KV]) {
        let token = match &self.starts {
            Starts::Single(_) => j,
            Starts::Ragged(r) => r.start(request) + j,
        };
        let o = (token * self.num_kv_heads + kv_head) * self.head_dim;
        (&self.k[o..o + self.head_dim], &self.v[o..o + self.head_dim])
    }
}

/// A paged KV cache reached through a page table: the block-sparse case.
pub(crate) struct PagedSource<'a, 'b, KV> {
    pub kv: &'b PagedKv<'a, KV>,
    pub table: &'b PageTable,
}

impl<KV: Sync> KvSource<KV> for PagedSource<'_, '_, KV> {
    fn kv_len(&self, request: usize) -> usize {
        self.table.kv_len(request)
    }

    #[inline]
    fn row(&self, request: usize, j: usize, kv_head: usize) -> (&[KV], &[KV]) {
        let (page, token) = self.table.locate(request, j);
        (
            self.kv.key(page, token, kv_head),
            self.kv.value(page, token, kv_head),
        )
    }
}
