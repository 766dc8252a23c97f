// Helpers shared by the fused matmul kernels (matmul.cu, matmul_tiled.cu): one m16n8k16
// tensor-core product with fp32 accumulation per input type, and the 16-bit conversions around it.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "common.cuh"

namespace nf4 {

// The argument checks every fused-matmul launcher makes before touching memory: pointers, block
// sizes, dtype, whole 64-wide groups inside one absmax block each (see matmul.cu, Note: one scale
// per group), fewer than 2^31 groups (32-bit block indices), 16-byte aligned x rows and 8-byte
// aligned packed rows. Fills log2 of both block sizes.
inline Status check_matmul_args(const void* x, int dtype, int64_t M, int64_t N, int64_t K, const uint8_t* packed,
                                int64_t blocksize, const void* absmax, bool nested, const float* nested_absmax,
                                const float* nested_code, const float* offset, int64_t nested_blocksize,
                                const void* y, int* log2_bs, int* log2_nested_bs) {
  constexpr int64_t kGroupK = 64;
  constexpr int64_t kMaxGroupCount = 0x7fffffff;
  if (x == nullptr || packed == nullptr || y == nullptr) return kNullPointer;
  if (const Status s = check_absmax(absmax, blocksize, nested, nested_absmax, nested_code, offset,
                                    nested_blocksize, log2_bs, log2_nested_bs); s != kOk) return s;
  if (dtype != kFloat16 && dtype != kBFloat16) return kBadDtype;
  if (M <= 0 || N <= 0 || K <= 0 || K % kGroupK != 0 || blocksize < kGroupK || K % blocksize != 0) return kBadSize;
  if (N > kMaxGroupCount / (K / kGroupK)) return kBadSize;
  // K % 64 == 0 keeps every row aligned when the base is.
  if (reinterpret_cast<uintptr_t>(x) % 16 != 0 || reinterpret_cast<uintptr_t>(packed) % 8 != 0) return kMisaligned;
  return kOk;
}


template <typename T>
struct Mma;

template <>
struct Mma<__nv_bfloat16> {
  __device__ static uint32_t pack(float lo, float hi) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  }
  __device__ static float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  __device__ static __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
  __device__ static void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

template <>
struct Mma<__half> {
  __device__ static uint32_t pack(float lo, float hi) {
    const __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  }
  __device__ static float to_float(__half v) { return __half2float(v); }
  __device__ static __half from_float(float v) { return __float2half_rn(v); }
  __device__ static void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

// Streamed once: do not keep it in L1 (x, which every CTA reads, should stay).
__device__ __forceinline__ uint2 load_weight(const uint8_t* p) {
  return __ldcs(reinterpret_cast<const uint2*>(p));
}

}  // namespace nf4
