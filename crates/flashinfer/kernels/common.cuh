// common.cuh: element types, conversions, vector copies and warp reductions shared by every kernel.
//
// Our kernels include no CUDA headers (NVRTC provides the built-in intrinsics), so the JIT needs
// only libnvrtc: f16 and bf16 are 16-bit payloads converted with PTX `cvt`.
#pragma once

typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

struct half_t { u16 bits; };
struct bf16_t { u16 bits; };

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(half_t x) {
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x.bits));
  return f;
}
__device__ __forceinline__ float to_float(bf16_t x) { return __uint_as_float(((u32)x.bits) << 16); }

template <class T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ half_t from_float<half_t>(float x) {
  half_t h;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h.bits) : "f"(x));
  return h;
}
template <> __device__ __forceinline__ bf16_t from_float<bf16_t>(float x) {
  bf16_t h;
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h.bits) : "f"(x));
  return h;
}

// Two packed 16-bit values in one 32-bit word -> two floats.
__device__ __forceinline__ void unpack2(half_t, u32 w, float& a, float& b) {
  half_t lo{(u16)(w & 0xffff)}, hi{(u16)(w >> 16)};
  a = to_float(lo);
  b = to_float(hi);
}
__device__ __forceinline__ void unpack2(bf16_t, u32 w, float& a, float& b) {
  a = __uint_as_float(w << 16);
  b = __uint_as_float(w & 0xffff0000u);
}

// Loads VEC elements (16 bytes when VEC * sizeof(T) == 16) and widens them to float.
template <class T, int VEC>
__device__ __forceinline__ void load_vec_f32(const T* p, float* out) {
  if constexpr (sizeof(T) == 2 && VEC == 8) {
    uint4 w = *reinterpret_cast<const uint4*>(p);
    unpack2(T{}, w.x, out[0], out[1]);
    unpack2(T{}, w.y, out[2], out[3]);
    unpack2(T{}, w.z, out[4], out[5]);
    unpack2(T{}, w.w, out[6], out[7]);
  } else if constexpr (sizeof(T) == 4 && VEC == 4) {
    float4 w = *reinterpret_cast<const float4*>(p);
    out[0] = w.x; out[1] = w.y; out[2] = w.z; out[3] = w.w;
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) out[i] = to_float(p[i]);
  }
}

template <class T, int VEC>
__device__ __forceinline__ void store_vec_f32(T* p, const float* in) {
  if constexpr (sizeof(T) == 2 && VEC == 8) {
    u32 w[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      T a = from_float<T>(in[2 * i]), b = from_float<T>(in[2 * i + 1]);
      w[i] = (u32)a.bits | ((u32)b.bits << 16);
    }
    *reinterpret_cast<uint4*>(p) = make_uint4(w[0], w[1], w[2], w[3]);
  } else if constexpr (sizeof(T) == 4 && VEC == 4) {
    *reinterpret_cast<float4*>(p) = make_float4(in[0], in[1], in[2], in[3]);
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) p[i] = from_float<T>(in[i]);
  }
}

// exp2 on the SFU (ex2.approx: ~2 ulp relative over the whole range; -inf -> 0, large -> +inf).
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
__device__ __forceinline__ float fast_log2(float x) {
  float y;
  asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

#define NEG_INF (-__int_as_float(0x7f800000))

// Division by a run-time constant (the page size) without a divide: q = umulhi(n, magic) >> shift,
// exact for n < 2^31; magic = 0 means the divisor is 1. The host computes magic and shift
// (decode/fastdiv.rs).
struct FastDiv {
  u32 magic, shift;
  __device__ __forceinline__ u32 div(u32 n) const { return magic == 0 ? n : __umulhi(n, magic) >> shift; }
};

// sin and cos of pos * f, accurate for large positions: the product is split into its rounded value
// and the rounding error (an FMA), the value reduced by 2 pi in two parts (Cody-Waite), the error
// added back, then the fast intrinsic on [-pi, pi].
__device__ __forceinline__ void rope_sincos(int pos, float f, float& sn, float& cs) {
  const float x = (float)pos;
  const float a = x * f;
  const float err = fmaf(x, f, -a);
  const float k = rintf(a * 0.15915494309189535f);
  float r = fmaf(-k, 6.28318548202514648f, a);   // 2 pi rounded to float
  r = fmaf(-k, -1.74845553e-7f, r);              // 2 pi - (float)(2 pi)
  __sincosf(r + err, &sn, &cs);
}

// The shared-memory address (bytes) of a generic pointer into shared memory.
__device__ __forceinline__ u32 smem_addr(const void* smem) { return (u32)__cvta_generic_to_shared(smem); }
// Asynchronous global->shared copies (sm_80+) of 16 bytes to shared address `s` (bytes; see
// smem_addr: loaders that compute their destinations once per tile pass them so).
// `src_bytes` < 16 zero-fills the rest, so rows past the end of a request are never read from
// global memory; the overload without it copies whole rows known to be in range.
// With L2_PREFETCH defined, each copy also asks L2 to fetch the whole 256-byte sector group around
// it: a KV row is 128-512 contiguous bytes, so the neighbouring lanes' requests then hit in L2.
__device__ __forceinline__ void cp_async_16_at(u32 s, const void* gmem, int src_bytes) {
#ifdef L2_PREFETCH
  asm volatile("cp.async.cg.shared.global.L2::256B [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(src_bytes));
#else
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(src_bytes));
#endif
}
__device__ __forceinline__ void cp_async_16_at(u32 s, const void* gmem) {
#ifdef L2_PREFETCH
  asm volatile("cp.async.cg.shared.global.L2::256B [%0], [%1], 16;\n" ::"r"(s), "l"(gmem));
#else
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem));
#endif
}
// The same copy to a generic pointer into shared memory.
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, int src_bytes) {
  cp_async_16_at(smem_addr(smem), gmem, src_bytes);
}
// The value itself, opaque to the compiler: a base address computed once stays one register (pair)
// instead of being rebuilt from its uniform and per-thread parts at every use.
__device__ __forceinline__ u32 opaque(u32 x) {
  u32 y;
  asm volatile("mov.b32 %0, %1;" : "=r"(y) : "r"(x));
  return y;
}
__device__ __forceinline__ const char* opaque(const char* x) {
  const char* y;
  asm volatile("mov.b64 %0, %1;" : "=l"(y) : "l"(x));
  return y;
}
// Asks L2 to fetch the 128-byte line holding `gmem` (no register or shared-memory cost): a deeper
// look-ahead than the shared-memory stages allow, for gathers whose first touch misses L2.
__device__ __forceinline__ void prefetch_l2(const void* gmem) {
  asm volatile("prefetch.global.L2 [%0];\n" ::"l"(gmem));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

// Sum over groups of `WIDTH` consecutive lanes (WIDTH a power of two <= 32).
template <int WIDTH>
__device__ __forceinline__ float group_sum(float x) {
#pragma unroll
  for (int o = WIDTH / 2; o > 0; o /= 2) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}
