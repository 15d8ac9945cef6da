//! Schedulers: pure functions of request lengths and the GPU's size (no CUDA, no unsafe), so the
//! CPU tests cover them with property tests. Each op's `plan()` calls its scheduler here and lays
//! the result out in the workspace.

pub mod decode;
pub mod prefill;
