// pipeline.cuh: the synchronisation of a warp-specialised pipeline (sm_90): mbarriers in shared
// memory that a producer warp's copies complete and consumer warps release, and named barriers
// for a subset of the block's warps.
//
// A stage's "full" barrier expects one arrival per producer lane, made by the hardware when that
// lane's cp.async copies have landed (cp.async.mbarrier.arrive.noinc); its "empty" barrier expects
// one arrival per consumer warp, made after the warp's last read of the stage. The k-th use of a
// stage completes the barrier's phase k, so a waiter passes parity k & 1.
#pragma once

// (smem_addr: common.cuh.)

__device__ __forceinline__ void mbar_init(u64* bar, u32 count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(count) : "memory");
}

// Makes the initialised barriers visible to the other threads (and to the async copy unit) before
// the block barrier that follows.
__device__ __forceinline__ void mbar_init_fence() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}

__device__ __forceinline__ void mbar_arrive(u64* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_addr(bar)) : "memory");
}

// A consumer warp has read stage `stage` for the last time: one arrival per warp (lane 0, after
// the warp's reads) on the stage's "empty" mbarrier, which counts warps.
__device__ __forceinline__ void release_stage(u64* empty, int stage) {
  __syncwarp();
  if ((threadIdx.x & 31) == 0) mbar_arrive(&empty[stage]);
}

// The barrier counts one arrival when every cp.async this thread issued before has completed.
__device__ __forceinline__ void cp_async_mbar_arrive(u64* bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(smem_addr(bar)) : "memory");
}

// Blocks until the barrier's phase with the given parity has completed.
__device__ __forceinline__ void mbar_wait(u64* bar, u32 parity) {
  asm volatile(
      "{\n"
      ".reg .pred done;\n"
      "wait_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra wait_%=;\n"
      "}\n" ::"r"(smem_addr(bar)),
      "r"(parity)
      : "memory");
}

// Barrier `id` (1..15; 0 is __syncthreads) over the first `THREADS` threads that reach it.
template <int THREADS>
__device__ __forceinline__ void named_barrier_sync(int id) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "n"(THREADS) : "memory");
}
// Counts this thread at barrier `id` without waiting (the waiting side uses named_barrier_sync).
template <int THREADS>
__device__ __forceinline__ void named_barrier_arrive(int id) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "n"(THREADS) : "memory");
}

// Moves registers between the warpgroups of a block (sm_90): every thread of a warpgroup runs it.
template <int REGS>
__device__ __forceinline__ void setmaxnreg_dec() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(REGS));
}
template <int REGS>
__device__ __forceinline__ void setmaxnreg_inc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(REGS));
}
