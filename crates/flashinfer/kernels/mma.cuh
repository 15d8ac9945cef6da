// mma.cuh: warp-level tensor-core helpers (sm_80+): ldmatrix, mma.sync m16n8k16, and the swizzled
// shared-memory layout they read.
//
// Fragment layout of mma.m16n8k16 (g = lane / 4, t = lane % 4):
//   A 16x16: a0 = (row g, cols 2t..2t+1), a1 = (row g+8, same), a2 = (row g, cols 2t+8..), a3 = (g+8, ...)
//   B 16x8:  b0 = (rows 2t..2t+1, col g), b1 = (rows 2t+8.., col g)
//   C 16x8:  c0,c1 = (row g, cols 2t, 2t+1), c2,c3 = (row g+8, same cols)
#pragma once
#include "common.cuh"

// A row of HEAD_DIM 16-bit elements is HEAD_DIM / 8 chunks of 16 bytes. Chunk c of row r is
// stored at chunk position c ^ (r % 8): the 8 rows an ldmatrix reads at one column then fall in 8
// different bank groups instead of one.
template <int ROW_ELEMS>
__device__ __forceinline__ int swizzle(int row, int chunk) {
  return row * ROW_ELEMS + ((chunk ^ (row & 7)) << 3);
}

__device__ __forceinline__ void ldmatrix_x4(u32* r, const void* smem) {
  u32 a = (u32)__cvta_generic_to_shared(smem);
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
}
__device__ __forceinline__ void ldmatrix_x4_trans(u32* r, const void* smem) {
  u32 a = (u32)__cvta_generic_to_shared(smem);
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
}

// c += a * b, with 16-bit inputs of type T and f32 accumulators.
template <class T>
__device__ __forceinline__ void mma_16816(float* c, const u32* a, u32 b0, u32 b1);
template <>
__device__ __forceinline__ void mma_16816<bf16_t>(float* c, const u32* a, u32 b0, u32 b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma_16816<half_t>(float* c, const u32* a, u32 b0, u32 b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two floats -> two 16-bit values of type T in one register (lo = first), one cvt instruction.
template <class T>
__device__ __forceinline__ u32 pack2(float lo, float hi);
template <>
__device__ __forceinline__ u32 pack2<bf16_t>(float lo, float hi) {
  u32 r;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}
template <>
__device__ __forceinline__ u32 pack2<half_t>(float lo, float hi) {
  u32 r;
  asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}
