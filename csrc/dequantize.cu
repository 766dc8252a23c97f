// Blockwise 4-bit dequantization in ONE launch: the nested absmax (8-bit code * nested absmax,
// then + offset) and the 4-bit codes are decoded by the same kernel, writing fp32/fp16/bf16.
// bitsandbytes needs two launches for double-quantized weights (absmax first, then the weight),
// which costs it most at small shapes: 4096x4096 in 0.031 ms on the H100.
//
// Rounding matches nf4.reference exactly: absmax = code_value * nested_absmax rounded, THEN
// + offset rounded (no FMA: nested_scale in mma.cuh); value = level * absmax in fp32, then
// one rounding to the output type.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common.cuh"
#include "mma.cuh"

namespace nf4 {
namespace {

template <typename T>
struct Vec;  // 16 bytes of output: V elements
template <>
struct Vec<float> {
  static constexpr int V = 4;
  __device__ static uint4 pack(const float* x) {
    return make_uint4(__float_as_uint(x[0]), __float_as_uint(x[1]), __float_as_uint(x[2]), __float_as_uint(x[3]));
  }
  __device__ static void store_one(float* p, float x) { *p = x; }
};
template <>
struct Vec<__half> {
  static constexpr int V = 8;
  __device__ static uint32_t pair(float a, float b) {
    const __half2 h = __floats2half2_rn(a, b);
    return *reinterpret_cast<const uint32_t*>(&h);
  }
  __device__ static uint4 pack(const float* x) {
    return make_uint4(pair(x[0], x[1]), pair(x[2], x[3]), pair(x[4], x[5]), pair(x[6], x[7]));
  }
  __device__ static void store_one(__half* p, float x) { *p = __float2half_rn(x); }
};
template <>
struct Vec<__nv_bfloat16> {
  static constexpr int V = 8;
  __device__ static uint32_t pair(float a, float b) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
    return *reinterpret_cast<const uint32_t*>(&h);
  }
  __device__ static uint4 pack(const float* x) {
    return make_uint4(pair(x[0], x[1]), pair(x[2], x[3]), pair(x[4], x[5]), pair(x[6], x[7]));
  }
  __device__ static void store_one(__nv_bfloat16* p, float x) { *p = __float2bfloat16_rn(x); }
};

// Same tiling as quantize_kernel: each warp covers kChunksPerThread rows of 32 consecutive
// 16-byte output chunks, so each store instruction of a warp writes one contiguous 512-byte span
// and each packed load reads a contiguous 128 (or 64) bytes. A chunk (<= 8 elements) never
// straddles a block (blocksize >= 32), so each chunk needs one absmax.
template <typename OutT,   // output element type: float, __half or __nv_bfloat16
          bool kNested>    // absmax given as uint8 codes of the nested (double) quantization
__global__ void __launch_bounds__(kThreads) dequantize_kernel(
    const uint8_t* __restrict__ packed, int64_t n, int log2_bs, const void* __restrict__ absmax_raw,
    const float* __restrict__ nested_absmax, const float* __restrict__ nested_code,
    const float* __restrict__ offset, int log2_nested_bs, OutT* __restrict__ out, DecodeTable table,
    bool aligned) {
  constexpr int V = Vec<OutT>::V;
  constexpr int J = kChunksPerThread;
  constexpr int kRow = 32 * V;
  constexpr int kTile = kWarps * J * kRow;
  using Word = typename std::conditional<V == 8, uint32_t, uint16_t>::type;  // V codes

  __shared__ float s_levels[16];
  if (threadIdx.x < 16) s_levels[threadIdx.x] = level(table, threadIdx.x);

  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int64_t tile_start = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t nbytes = (n + 1) / 2;

  // All loads first (packed words, then block scales) so that J independent requests per thread
  // are in flight before the first use.
  uint32_t words[J];
  float scale[J];
#pragma unroll
  for (int j = 0; j < J; ++j) {
    const int64_t e = tile_start + static_cast<int64_t>((warp * J + j) * kRow + lane * V);
    words[j] = 0;
    if (e >= n) continue;
    if (aligned && e + V <= n) {
      words[j] = __ldcs(reinterpret_cast<const Word*>(packed + e / 2));
    } else {
      for (int b = 0; b < V / 2 && e / 2 + b < nbytes; ++b) words[j] |= static_cast<uint32_t>(packed[e / 2 + b]) << (8 * b);
    }
  }
  float mean = 0.0f;
  if constexpr (kNested) mean = *offset;
#pragma unroll
  for (int j = 0; j < J; ++j) {
    const int64_t e = tile_start + static_cast<int64_t>((warp * J + j) * kRow + lane * V);
    scale[j] = 0.0f;
    if (e >= n) continue;
    const int64_t blk = e >> log2_bs;
    if constexpr (kNested) {
      const uint8_t code = static_cast<const uint8_t*>(absmax_raw)[blk];
      scale[j] = nested_scale(nested_code[code], nested_absmax[blk >> log2_nested_bs], mean);
    } else {
      scale[j] = static_cast<const float*>(absmax_raw)[blk];
    }
  }
  __syncthreads();  // s_levels written

#pragma unroll
  for (int j = 0; j < J; ++j) {
    const int64_t e = tile_start + static_cast<int64_t>((warp * J + j) * kRow + lane * V);
    if (e >= n) continue;
    float x[V];
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const uint32_t code = (words[j] >> (8 * (k / 2) + (k % 2 == 0 ? 4 : 0))) & 0xFu;
      x[k] = __fmul_rn(s_levels[code], scale[j]);
    }
    if (aligned && e + V <= n) {
      __stcs(reinterpret_cast<uint4*>(out + e), Vec<OutT>::pack(x));
    } else {
      for (int k = 0; k < V && e + k < n; ++k) Vec<OutT>::store_one(out + e + k, x[k]);
    }
  }
}

template <typename OutT>
Status launch_typed(const uint8_t* packed, int64_t n, int log2_bs, const void* absmax, bool nested,
                    const float* nested_absmax, const float* nested_code, const float* offset,
                    int log2_nested_bs, void* out, const DecodeTable& table, cudaStream_t stream) {
  constexpr int64_t kTile = kWarps * kChunksPerThread * 32 * Vec<OutT>::V;
  const int64_t grid = (n + kTile - 1) / kTile;
  const bool aligned = reinterpret_cast<uintptr_t>(out) % 16 == 0 && reinterpret_cast<uintptr_t>(packed) % 4 == 0;
  OutT* dst = static_cast<OutT*>(out);
  if (nested) {
    dequantize_kernel<OutT, true><<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(
        packed, n, log2_bs, absmax, nested_absmax, nested_code, offset, log2_nested_bs, dst, table, aligned);
  } else {
    dequantize_kernel<OutT, false><<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(
        packed, n, log2_bs, absmax, nested_absmax, nested_code, offset, log2_nested_bs, dst, table, aligned);
  }
  return check_launch();
}

}  // namespace

Status launch_dequantize(const QuantWeight& w, void* out, int dtype, int device, cudaStream_t stream) {
  if (w.packed == nullptr || out == nullptr) return kNullPointer;
  int log2_bs = 0, log2_nested_bs = 0;
  if (const Status s = check_absmax(w.absmax, w.blocksize, w.nested, w.nested_absmax, w.nested_code, w.offset,
                                    w.nested_blocksize, &log2_bs, &log2_nested_bs); s != kOk) return s;
  if (w.rows <= 0 || w.cols <= 0 || w.rows > kMaxElements / w.cols) return kBadSize;
  const int64_t n = w.rows * w.cols;
  if (dtype != kFloat32 && dtype != kFloat16 && dtype != kBFloat16) return kBadDtype;
  if (const Status s = use_device(device); s != kOk) return s;
  switch (dtype) {
    case kFloat32: return launch_typed<float>(w.packed, n, log2_bs, w.absmax, w.nested, w.nested_absmax, w.nested_code, w.offset, log2_nested_bs, out, w.table, stream);
    case kFloat16: return launch_typed<__half>(w.packed, n, log2_bs, w.absmax, w.nested, w.nested_absmax, w.nested_code, w.offset, log2_nested_bs, out, w.table, stream);
    case kBFloat16: return launch_typed<__nv_bfloat16>(w.packed, n, log2_bs, w.absmax, w.nested, w.nested_absmax, w.nested_code, w.offset, log2_nested_bs, out, w.table, stream);
    default: return kBadDtype;
  }
}

}  // namespace nf4
