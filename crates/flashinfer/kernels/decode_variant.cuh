// decode_variant.cuh: the attention variants of the decode kernels (crate::variant defines them):
// RoPE, logits soft cap, ALiBi and sinks, each compiled in only when the generated source defines
// it (decode/tiles.rs), so that a plain kernel is exactly the plain code.
//
// The sliding window has no code here: a request's single query sits at position kv_len - 1, so
// the keys it sees are one contiguous range [kv_len - 1 - window_left, kv_len), and decode/mod.rs
// plans only that range (the work items start at the window's first key).
//
// Scores: the kernels multiply q·k by logit_scale() (decode_common.cuh; folded into q on CUDA
// cores), then decode_logit() applies the soft cap and ALiBi, in the scaled base-2 domain of the
// softmax. A plain kernel multiplies by sm_scale * log2(e) and nothing else.
#pragma once
#include "common.cuh"

#ifndef VARIANT_ROPE
#define VARIANT_ROPE 0
#endif
#ifndef VARIANT_SOFTCAP
#define VARIANT_SOFTCAP 0
#endif
#ifndef VARIANT_ALIBI
#define VARIANT_ALIBI 0
#endif
#ifndef VARIANT_SINKS
#define VARIANT_SINKS 0
#endif
// The variants that change a logit (as opposed to the softmax's denominator).
#define VARIANT_LOGITS (VARIANT_SOFTCAP || VARIANT_ALIBI)

#if VARIANT_ROPE
// RoPE, fused (Llama style: the pair (d, d + HEAD_DIM / 2) of a vector at position pos turns by
// pos / rope_scale * theta^(-2d / HEAD_DIM)). A request's key j is at rope_offsets[r] + j and its
// query at rope_offsets[r] + kv_len - 1. The query is rotated once per block; each kernel rotates
// the keys its own way (decode.cuh: the tile in shared memory, in place; decode_tc.cuh: the K
// fragments in registers, in packed 16-bit arithmetic, with the angles of a table built once per
// tile). sin and cos come from rope_sincos (common.cuh), exact for large positions.

// theta^(-2d / HEAD_DIM) / rope_scale, the angle per position of pair d (as prefill.cuh computes it).
__device__ __forceinline__ float rope_inv_freq(int d, float log2_theta, float rcp_scale) {
  return exp2f(-2.f * (float)d / (float)HEAD_DIM * log2_theta) * rcp_scale;
}

// The rotation of one pair: (x, y) -> (x cos - y sin, x sin + y cos).
__device__ __forceinline__ void rope_pair(float& x, float& y, float sn, float cs) {
  const float x0 = x;
  x = x0 * cs - y * sn;
  y = x0 * sn + y * cs;
}

// Turns the angle (cs, sn) by the angle (step_cs, step_sn): angle addition, 4 f32 operations.
__device__ __forceinline__ void rope_advance(float& cs, float& sn, float step_cs, float step_sn) {
  const float c0 = cs;
  cs = fmaf(c0, step_cs, -sn * step_sn);
  sn = fmaf(c0, step_sn, sn * step_cs);
}

// Packed 16-bit arithmetic (two lanes per 32-bit register, each rounded to the 16-bit type) for
// the tensor-core kernel's key rotation: the keys are 16-bit already and the mma reads them so.
__device__ __forceinline__ u32 hmul2(half_t, u32 a, u32 b) {
  u32 d;
  asm("mul.rn.f16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
  return d;
}
__device__ __forceinline__ u32 hfma2(half_t, u32 a, u32 b, u32 c) {
  u32 d;
  asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}
__device__ __forceinline__ u32 hmul2(bf16_t, u32 a, u32 b) {
  u32 d;
#if __CUDA_ARCH__ >= 900
  asm("mul.rn.bf16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
#else
  // sm_80 has no bf16x2 multiply: an fma adding -0 (which keeps the product's sign and value).
  asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(0x80008000u));
#endif
  return d;
}
__device__ __forceinline__ u32 hfma2(bf16_t, u32 a, u32 b, u32 c) {
  u32 d;
  asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}

// The rotation of two pairs packed in 16-bit registers, x = (x0, x1) and y = (y0, y1), by the
// packed cos, sin and -sin of their two angles: 4 packed operations for what takes 14 in f32
// (unpack 4, rotate 8, pack 2). cos and sin are 16-bit too and each result is rounded twice (the
// product, then the fma) instead of once: at bf16 that makes the logits' error ~20 % larger (rms,
// simulated; the rounding of the rotated q and k to bf16, which the f32 rotation had as well,
// dominates).
template <class T>
__device__ __forceinline__ void rope_pair2(u32& x, u32& y, u32 cs, u32 sn, u32 neg_sn) {
  const u32 x0 = x;
  x = hfma2(T{}, y, neg_sn, hmul2(T{}, x0, cs));  // x cos - y sin
  y = hfma2(T{}, x0, sn, hmul2(T{}, y, cs));      // x sin + y cos
}
#endif

#if VARIANT_LOGITS
// The base-2 logit of a score `x` already multiplied by logit_scale(): soft cap
// (softcap_out = c * log2(e)), then ALiBi (`slope_log2` = slope * log2(e) of the query head,
// `rel_pos` = key position - query position, <= 0).
#if VARIANT_SOFTCAP
// tanh(x) = 1 - 2 / (e^(2x) + 1): two special-function ops (ex2, rcp) and three others. The
// softmax needs the logit c tanh(x) to an absolute error (a weight moves by e^error), and this
// one is within about 1e-6 of tanh absolutely (ex2 and rcp both to ~2^-22 relative); +-inf give
// +-1. libm's tanhf is as accurate and a longer sequence; the hardware tanh (tanh.approx, one op)
// is 2^-11 relative, up to c 2^-11 absolute, which the prefill kernel accepts for its throughput.
__device__ __forceinline__ float tanh_exp2(float x) {
  const float e = fast_exp2(x * 2.8853900817779268f);  // e^(2x) = 2^(2x log2(e))
  return 1.f - __fdividef(2.f, e + 1.f);
}
#endif
__device__ __forceinline__ float decode_logit(float x, float softcap_out, float slope_log2, int rel_pos) {
#if VARIANT_SOFTCAP
  x = softcap_out * tanh_exp2(x);
#endif
#if VARIANT_ALIBI
  x += slope_log2 * (float)rel_pos;
#endif
  return x;
}
#endif

