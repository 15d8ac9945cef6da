//! Merging attention states on the GPU: the paper's ⊕ operator, exact.
//!
//! A state is `(v, s)`: `v` `[rows, heads, head_dim]` the attention output over some keys and `s`
//! `[rows, heads]` its log-sum-exp, in the base the caller names (`LseBase`). Merging the states of
//! disjoint key sets gives the state of their union. These ops are what split-KV and cascade
//! attention combine partial results with; the CPU versions are in `reference::merge`.

use crate::cuda::{launch, DevSlice, DevSliceMut, Device, LaunchConfig};
use crate::dtype::{DType, Element};
use crate::error::{ensure, Result};
use crate::jit::KernelSpec;
use crate::layout::check_len;
use crate::params::LseBase;

/// The merge kernels for one (input, output) element type pair and vector width.
pub(crate) fn merge_spec(tin: DType, tout: DType, vec: usize) -> KernelSpec {
    let name = format!("merge_in{tin}_out{tout}_vec{vec}");
    let source = format!(
        "#include \"common.cuh\"\nusing TIn = {};\nusing TOut = {};\nconstexpr int VEC = {vec};\n#include \"merge.cuh\"\n",
        tin.cuda_type(),
        tout.cuda_type()
    );
    KernelSpec::new(
        name,
        source,
        [
            "merge_state",
            "merge_state_in_place",
            "merge_states",
            "merge_states_varlen",
        ],
    )
}

/// Every merge specialisation we ship (for warmup and the compile-only tests).
pub(crate) fn specs() -> Vec<KernelSpec> {
    let mut v = Vec::new();
    for t in [DType::F16, DType::BF16, DType::F32] {
        v.push(merge_spec(t, t, 16 / t.size_bytes()));
        v.push(merge_spec(t, t, 1));
    }
    v
}

/// Vector width: 16 bytes of the input type when head_dim and every pointer allow it.
fn pick_vec(tin: DType, head_dim: usize, ptrs: &[u64]) -> usize {
    let vec = 16 / tin.size_bytes();
    if head_dim.is_multiple_of(vec) && ptrs.iter().all(|p| p.is_multiple_of(16)) {
        vec
    } else {
        1
    }
}

fn config(rows: usize, num_heads: usize, head_dim: usize, vec: usize) -> LaunchConfig {
    let bx = head_dim.div_ceil(vec);
    let by = (128 / bx).clamp(1, num_heads);
    LaunchConfig {
        grid: (rows as u32, num_heads.div_ceil(by) as u32, 1),
        block: (bx as u32, by as u32, 1),
        smem_bytes: 0,
    }
}

fn base_factors(base: LseBase) -> (f32, f32) {
    (base.to_log2(1.0), base.from_log2(1.0))
}

fn check_shapes(num_heads: usize, head_dim: usize) -> Result<()> {
    ensure(num_heads >= 1, "num_heads", || "must be at least 1".into())?;
    ensure((1..=1024).contains(&head_dim), "head_dim", || {
        format!("{head_dim} is outside 1..=1024")
    })
}

fn check_rows(rows: usize) -> Result<()> {
    ensure(rows < i32::MAX as usize, "v", || {
        format!("{rows} rows is too many for one launch")
    })
}

/// `(v_out, s_out) = (v_a, s_a) ⊕ (v_b, s_b)`, row by row.
#[allow(clippy::too_many_arguments)]
pub fn merge_state<T: Element>(
    dev: &Device,
    v_a: DevSlice<T>,
    s_a: DevSlice<f32>,
    v_b: DevSlice<T>,
    s_b: DevSlice<f32>,
    num_heads: usize,
    head_dim: usize,
    base: LseBase,
    v_out: DevSliceMut<T>,
    s_out: Option<DevSliceMut<f32>>,
) -> Result<()> {
    check_shapes(num_heads, head_dim)?;
    let rows = s_a.len() / num_heads;
    check_rows(rows)?;
    check_len("s_a", s_a.len(), rows * num_heads, "[rows, num_heads]")?;
    check_len(
        "v_a",
        v_a.len(),
        rows * num_heads * head_dim,
        "[rows, num_heads, head_dim]",
    )?;
    check_len(
        "v_b",
        v_b.len(),
        rows * num_heads * head_dim,
        "[rows, num_heads, head_dim]",
    )?;
    check_len("s_b", s_b.len(), rows * num_heads, "[rows, num_heads]")?;
    check_len(
        "v_out",
        v_out.len(),
        rows * num_heads * head_dim,
        "[rows, num_heads, head_dim]",
    )?;
    if let Some(s) = &s_out {
        check_len("s_out", s.len(), rows * num_heads, "[rows, num_heads]")?;
    }
    let vec = pick_vec(T::DTYPE, head_dim, &[v_a.ptr(), v_b.ptr(), v_out.ptr()]);
    let func = dev.kernel(&merge_spec(T::DTYPE, T::DTYPE, vec), "merge_state")?;
    let (to2, from2) = base_factors(base);
    let (pa, psa, pb, psb, po) = (v_a.ptr(), s_a.ptr(), v_b.ptr(), s_b.ptr(), v_out.ptr());
    let pso = s_out.as_ref().map_or(0, |s| s.ptr());
    let (h, d) = (num_heads as i32, head_dim as i32);
    let mut args = crate::kernel_args![&pa, &psa, &pb, &psb, &po, &pso, &h, &d, &to2, &from2];
    // SAFETY: argument list matches merge.cuh's merge_state; lengths were checked above.
    unsafe {
        launch(
            func,
            config(rows, num_heads, head_dim, vec),
            dev.stream(),
            &mut args,
        )
    }
}

/// `(v, s) ⊕= (v_other, s_other)` for rows whose `mask` byte is nonzero (all rows without mask).
#[allow(clippy::too_many_arguments)]
pub fn merge_state_in_place<T: Element>(
    dev: &Device,
    v: DevSliceMut<T>,
    s: DevSliceMut<f32>,
    v_other: DevSlice<T>,
    s_other: DevSlice<f32>,
    mask: Option<DevSlice<u8>>,
    num_heads: usize,
    head_dim: usize,
    base: LseBase,
) -> Result<()> {
    check_shapes(num_heads, head_dim)?;
    let rows = s.len() / num_heads;
    check_rows(rows)?;
    check_len("s", s.len(), rows * num_heads, "[rows, num_heads]")?;
    check_len(
        "v",
        v.len(),
        rows * num_heads * head_dim,
        "[rows, num_heads, head_dim]",
    )?;
    check_len(
        "v_other",
        v_other.len(),
        rows * num_heads * head_dim,
        "[rows, num_heads, head_dim]",
    )?;
    check_len(
        "s_other",
        s_other.len(),
        rows * num_heads,
        "[rows, num_heads]",
    )?;
    if let Some(m) = &mask {
        check_len("mask", m.len(), rows, "[rows]")?;
    }
    let vec = pick_vec(T::DTYPE, head_dim, &[v.ptr(), v_other.ptr()]);
    let func = dev.kernel(&merge_spec(T::DTYPE, T::DTYPE, vec), "merge_state_in_place")?;
    let (to2, from2) = base_factors(base);
    let (pv, ps, po, pso) = (v.ptr(), s.ptr(), v_other.ptr(), s_other.ptr());
    let pm = mask.as_ref().map_or(0, |m| m.ptr());
    let (h, d) = (num_heads as i32, head_dim as i32);
    let mut args = crate::kernel_args![&pv, &ps, &po, &pso, &pm, &h, &d, &to2, &from2];
    // SAFETY: argument list matches merge_state_in_place; lengths were checked above.
    unsafe {
        launch(
            func,
            config(rows, num_heads, head_dim, vec),
            dev.stream(),
            &mut args,
        )
    }
}

/// Merges `num_states` states per row: `v` `[rows, num_states, heads, dim]` → `v_out` `[rows, heads, dim]`.
#[allow(clippy::too_many_arguments)]
pub fn merge_states<T: Element>(
    dev: &Device,
    v: DevSlice<T>,
    s: DevSlice<f32>,
    num_states: usize,
    num_heads: usize,
    head_dim: usize,
    base: LseBase,
    v_out: DevSliceMut<T>,
    s_out: Option<DevSliceMut<f32>>,
) -> Result<()> {
    check_shapes(num_heads, head_dim)?;
    ensure(num_states >= 1, "num_states", || {
        "must be at least 1".into()
    })?;
    let rows = s.len() / (num_states * num_heads);
    check_rows(rows)?;
    check_len(
        "s",
        s.len(),
        rows * num_states * num_heads,
        "[rows, num_states, num_heads]",
    )?;
    check_len(
        "v",
        v.len(),
        rows * num_states * num_heads * head_dim,
        "[rows, num_states, num_heads, head_dim]",
    )?;
    check_len(
        "v_out",
        v_out.len(),
        rows * num_heads * head_dim,
        "[rows, num_heads, head_dim]",
    )?;
    if let Some(so) = &s_out {
        check_len("s_out", so.len(), rows * num_heads, "[rows, num_heads]")?;
    }
    let vec = pick_vec(T::DTYPE, head_dim, &[v.ptr(), v_out.ptr()]);
    let func = dev.kernel(&merge_spec(T::DTYPE, T::DTYPE, vec), "merge_states")?;
    let (to2, from2) = base_factors(base);
    let (pv, ps, po) = (v.ptr(), s.ptr(), v_out.ptr());
    let pso = s_out.as_ref().map_or(0, |s| s.ptr());
    let (n, h, d) = (num_states as i32, num_heads as i32, head_dim as i32);
    let mut args = crate::kernel_args![&pv, &ps, &po, &pso, &n, &h, &d, &to2, &from2];
    // SAFETY: argument list matches merge_states; lengths were checked above.
    unsafe {
        launch(
            func,
            config(rows, num_heads, head_dim, vec),
            dev.stream(),
            &mut args,
        )
    }
}

/// Variable-length merge: states `indptr[i]..indptr[i+1]` of `v` `[total, heads, dim]` merge into
/// row `i` of `v_out`. `indptr` lives on the device; `indptr_host` is the same array, for validation.
#[allow(clippy::too_many_arguments)]
pub fn merge_states_varlen<T: Element>(
    dev: &Device,
    v: DevSlice<T>,
    s: DevSlice<f32>,
    indptr: DevSlice<i32>,
    indptr_host: &[i32],
    num_heads: usize,
    head_dim: usize,
    base: LseBase,
    v_out: DevSliceMut<T>,
    s_out: Option<DevSliceMut<f32>>,
) -> Result<()> {
    check_shapes(num_heads, head_dim)?;
    let total = s.len() / num_heads;
    crate::layout::Ragged::new("indptr", indptr_host)?;
    let rows = indptr_host.len() - 1;
    check_rows(rows)?;
    check_len("indptr", indptr.len(), indptr_host.len(), "[rows + 1]")?;
    ensure(
        *indptr_host.last().unwrap_or(&0) as usize == total,
        "indptr",
        || {
            format!(
                "ends at {}, but `s` holds {total} states",
                indptr_host.last().unwrap_or(&0)
            )
        },
    )?;
    check_len("s", s.len(), total * num_heads, "[total, num_heads]")?;
    check_len(
        "v",
        v.len(),
        total * num_heads * head_dim,
        "[total, num_heads, head_dim]",
    )?;
    check_len(
        "v_out",
        v_out.len(),
        rows * num_heads * head_dim,
        "[rows, num_heads, head_dim]",
    )?;
    if let Some(so) = &s_out {
        check_len("s_out", so.len(), rows * num_heads, "[rows, num_heads]")?;
    }
    let vec = pick_vec(T::DTYPE, head_dim, &[v.ptr(), v_out.ptr()]);
    let func = dev.kernel(&merge_spec(T::DTYPE, T::DTYPE, vec), "merge_states_varlen")?;
    let (to2, from2) = base_factors(base);
    let (pv, ps, pi, po) = (v.ptr(), s.ptr(), indptr.ptr(), v_out.ptr());
    let pr = 0u64; // out_rows: row i merges into output row i
    let pso = s_out.as_ref().map_or(0, |s| s.ptr());
    let (h, d) = (num_heads as i32, head_dim as i32);
    let mut args = crate::kernel_args![&pv, &ps, &pi, &pr, &po, &pso, &h, &d, &to2, &from2];
    // SAFETY: argument list matches merge_states_varlen; indptr was validated against the state
    // count, so every state index is in bounds, and the lengths were checked above.
    unsafe {
        launch(
            func,
            config(rows, num_heads, head_dim, vec),
            dev.stream(),
            &mut args,
        )
    }
}
