//! CUDA graphs: capture the launches of a step once, replay them each step.
//!
//! A captured launch keeps its grid and its argument values, so an op is capturable only when
//! everything that changes between steps lives in device memory its `plan()` rewrites (see
//! `BatchDecode::for_cuda_graph`).

use std::sync::Arc;

use cudarc::driver::{sys, CudaGraph, CudaStream};

use crate::error::{Error, Result};

/// A captured step, replayed on the stream it was captured on.
pub struct Graph {
    graph: CudaGraph,
}

impl Graph {
    /// Captures the work `step` enqueues on `stream` (nothing runs during capture). `step` must
    /// only enqueue: no synchronisation, allocation or host-side wait on the stream.
    pub fn capture(stream: &Arc<CudaStream>, step: impl FnOnce() -> Result<()>) -> Result<Self> {
        stream.begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)?;
        let captured = step();
        // End the capture whatever happened, so the stream is usable again.
        let ended = stream.end_capture(sys::CUgraphInstantiate_flags(0));
        captured?;
        let graph = ended?
            .ok_or_else(|| Error::Unsupported("the captured step enqueued no work".into()))?;
        Ok(Self { graph })
    }

    /// Enqueues one replay of the captured step.
    pub fn replay(&self) -> Result<()> {
        Ok(self.graph.launch()?)
    }
}
