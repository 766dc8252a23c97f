// Helpers shared by the fused matmul kernels (matmul.cu, matmul_tiled.cu, matmul_wgmma.cu): the
// launchers' argument checks, one m16n8k16 tensor-core product with fp32 accumulation per input
// type and the 16-bit conversions around it, the block scale of double quantization (dequantize.cu
// uses it too), cp.async, and the fp32 decode table of the two tiled kernels.
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
inline Status check_matmul_args(const QuantWeight& w, const void* x, int dtype, int64_t M, const void* y,
                                int* log2_bs, int* log2_nested_bs) {
  const int64_t N = w.rows, K = w.cols, blocksize = w.blocksize;
  constexpr int64_t kGroupK = 64;
  constexpr int64_t kMaxGroupCount = 0x7fffffff;
  if (x == nullptr || w.packed == nullptr || y == nullptr) return kNullPointer;
  if (const Status s = check_absmax(w.absmax, blocksize, w.nested, w.nested_absmax, w.nested_code, w.offset,
                                    w.nested_blocksize, log2_bs, log2_nested_bs); s != kOk) return s;
  if (dtype != kFloat16 && dtype != kBFloat16) return kBadDtype;
  if (M <= 0 || N <= 0 || K <= 0 || K % kGroupK != 0 || blocksize < kGroupK || K % blocksize != 0) return kBadSize;
  if (N > kMaxGroupCount / (K / kGroupK)) return kBadSize;
  // K % 64 == 0 keeps every row aligned when the base is.
  if (reinterpret_cast<uintptr_t>(x) % 16 != 0 || reinterpret_cast<uintptr_t>(w.packed) % 8 != 0) return kMisaligned;
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

// A block's absmax from its 8-bit code under double quantization, rounded as the reference:
// code value * nested absmax, then + offset.
__device__ __forceinline__ float nested_scale(float code_value, float nested_absmax, float mean) {
  return __fadd_rn(__fmul_rn(code_value, nested_absmax), mean);
}

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int bytes = valid ? 16 : 0;  // 0: fill with zeros, read nothing
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

// The fp32 decode table of matmul_tiled.cu and matmul_wgmma.cu: entry (byte b, copy c) at
// b * 128 + c * 8 holds levels[b >> 4], levels[b & 15], one copy per lane of a half-warp so that
// its 8-byte loads are conflict-free (32 KB).
constexpr int kF32LutCopies = 16;
constexpr int kF32LutBytes = 256 * kF32LutCopies * 8;

// table.levels[i] for a runtime i without indexing the by-value kernel parameter (nvcc copies an
// indexed parameter struct to local memory: a local load per table entry, measured as the top
// stall of the few-token kernel's prologue). Sixteen selects on constant-bank operands instead.
__device__ __forceinline__ float level(const DecodeTable& table, int i) {
  float v = table.levels[0];
#pragma unroll
  for (int j = 1; j < 16; ++j) v = i == j ? table.levels[j] : v;
  return v;
}

// With 256 threads, thread tid writes entries tid + 256k (k = 0..15): byte 16k + tid / 16, whose
// high nibble is k and low nibble tid / 16, so each thread selects one level, not two per entry.
__device__ __forceinline__ void fill_f32_table(unsigned char* s_lut, const DecodeTable& table, int tid, int threads) {
  float2* lut = reinterpret_cast<float2*>(s_lut);
  if (threads == 256) {
    const float lo = level(table, tid >> 4);
#pragma unroll
    for (int k = 0; k < 16; ++k) lut[tid + 256 * k] = make_float2(table.levels[k], lo);
    return;
  }
  for (int i = tid; i < 256 * kF32LutCopies; i += threads) {
    const int b = i / kF32LutCopies;
    lut[i] = make_float2(level(table, b >> 4), level(table, b & 15));
  }
}

// Byte I (0..3) of `word` decoded through the fp32 table (row = byte * 128 bytes, OR-ed with the
// lane's column (lane % 16) * 8 < 128), each level times the block scale, rounded once to T.
template <typename T, int I>
__device__ __forceinline__ uint32_t scaled_byte(const unsigned char* s_lut, uint32_t word, uint32_t col, float s) {
  const uint32_t row = (I == 0 ? (word << 7) : (word >> (8 * I - 7))) & 0x7F80u;
  const float2 f = *reinterpret_cast<const float2*>(s_lut + (row | col));
  return Mma<T>::pack(__fmul_rn(f.x, s), __fmul_rn(f.y, s));
}

}  // namespace nf4
