// Blockwise 4-bit quantization (NF4, FP4) of fp32/fp16/bf16 input, and the nested (double)
// quantization of the absmax values.
//
// One launch quantizes a weight; double quantization adds torch's mean of the absmax (the reduction
// bitsandbytes uses, see nf4/cuda_backend.py) and a second, small kernel:
//   quantize_kernel         reads the weight once: per-block absmax, scale, encode, pack.
//   quantize_absmax_kernel  the nested step on the float32 absmax (n/64 values: ~2% of the bytes).
//
// Bit-compatibility with bitsandbytes' CUDA build, which is compiled with fast math:
//   * the block scale is rcp.approx.ftz(absmax), then x * scale, not x / absmax;
//   * this file is compiled with -ftz=true (CMakeLists.txt), so |x|, max and the product flush
//     denormals exactly as bnb's do.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common.cuh"

namespace nf4 {
namespace {

__device__ __forceinline__ float rcp_approx_ftz(float x) {
  float r;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
  return r;
}

template <typename T>
__device__ __forceinline__ float to_float(T v);
template <>
__device__ __forceinline__ float to_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

// Code of one scaled value x (see EncodeTable). floor(key * scale + offset) is read from the low
// mantissa bits of key * scale + (1.5 * 2^23 + offset) rounded down once (ulp 1 there), which is
// exact. NaN (a block whose absmax is 0 scales 0 * inf) is 0x7fffffff, cell 63, bucket 0: code 0,
// as bitsandbytes stores such blocks.
// Both tables are 32-bit words indexed by the same cell, so one address serves both loads.
template <QuantType QT>
__device__ __forceinline__ uint32_t encode(float x, const float* s_inside, const uint32_t* s_below,
                                           float scale, float magic, uint32_t fp4_codes) {
  const float key = QT == kNF4 ? x : fabsf(x);
  const uint32_t cell = __float_as_uint(__fmaf_rd(key, scale, magic)) & (kEncodeCells - 1);
  const uint32_t bucket = s_below[cell] + (key > s_inside[cell] ? 1u : 0u);
  if constexpr (QT == kNF4) {
    return bucket;
  } else {
    return ((fp4_codes >> (4 * bucket)) & 7u) | (x < 0.0f ? 8u : 0u);
  }
}

// Each warp covers kChunksPerThread rows of 32 consecutive 16-byte chunks (a row is 32*V
// elements), so every load and every packed store of a warp is one contiguous, coalesced span.
// A quantization block is then blocksize/V consecutive lanes of one row (blocksize <= 32*V,
// reduced with shuffles), or several whole rows (reduced through shared memory; a CTA tile of
// at least 4096 elements always holds whole blocks).
// 5 CTAs per SM (48 registers, no spills) rather than the 4 that 61 registers allow: more warps
// to cover the load -> reduce -> encode -> store phases of each warp.
template <typename T,      // input element type: float, __half or __nv_bfloat16
          QuantType QT>    // NF4 or FP4 encoder
__global__ void __launch_bounds__(kThreads, 5) quantize_kernel(
    const T* __restrict__ in, int64_t n, int log2_bs, uint8_t* __restrict__ packed,
    float* __restrict__ absmax, EncodeTable table, bool in_aligned) {
  constexpr int V = 16 / sizeof(T);                      // elements per 16-byte chunk
  constexpr int J = kChunksPerThread;
  constexpr int kRow = 32 * V;                           // elements per warp row
  constexpr int kTile = kWarps * J * kRow;               // elements per CTA
  static_assert(kTile >= 4096, "a CTA tile must hold whole blocks of the largest blocksize");

  __shared__ float s_inside[kEncodeCells];
  __shared__ uint32_t s_below[kEncodeCells];
  __shared__ float s_rowmax[kWarps * J];
  __shared__ float s_blockmax[kTile / 32];
  if (threadIdx.x < kEncodeCells) {
    s_inside[threadIdx.x] = table.inside[threadIdx.x];
    s_below[threadIdx.x] = table.below[threadIdx.x];
  }

  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int64_t tile_start = static_cast<int64_t>(blockIdx.x) * kTile;
  const int blocksize = 1 << log2_bs;

  float v[J][V];
#pragma unroll
  for (int j = 0; j < J; ++j) {
    const int64_t e = tile_start + static_cast<int64_t>((warp * J + j) * kRow + lane * V);
    if (in_aligned && e + V <= n) {
      const uint4 raw = __ldcs(reinterpret_cast<const uint4*>(in + e));
      const T* t = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int k = 0; k < V; ++k) v[j][k] = to_float(t[k]);
    } else {
#pragma unroll
      for (int k = 0; k < V; ++k) v[j][k] = e + k < n ? to_float(in[e + k]) : 0.0f;
    }
  }

  float m[J];
#pragma unroll
  for (int j = 0; j < J; ++j) {
    m[j] = 0.0f;
#pragma unroll
    for (int k = 0; k < V; ++k) m[j] = fmaxf(m[j], fabsf(v[j][k]));
  }
  const int group = blocksize / V < 32 ? blocksize / V : 32;  // lanes of one block in a row
  for (int off = 1; off < group; off <<= 1) {
#pragma unroll
    for (int j = 0; j < J; ++j) m[j] = fmaxf(m[j], __shfl_xor_sync(0xffffffffu, m[j], off));
  }
  __syncthreads();  // encode table written
  if (blocksize > kRow) {
    const int rows_per_block = blocksize / kRow;
    if (lane == 0) {
#pragma unroll
      for (int j = 0; j < J; ++j) s_rowmax[warp * J + j] = m[j];
    }
    __syncthreads();
    if (threadIdx.x < kTile / blocksize) {
      float b = 0.0f;
      for (int r = 0; r < rows_per_block; ++r) b = fmaxf(b, s_rowmax[threadIdx.x * rows_per_block + r]);
      s_blockmax[threadIdx.x] = b;
    }
    __syncthreads();
#pragma unroll
    for (int j = 0; j < J; ++j) m[j] = s_blockmax[(warp * J + j) / rows_per_block];
  }

  const uint32_t fp4_codes = table.fp4_codes;
  const float cell_scale = table.cell_scale;
  const float magic = 12582912.0f + table.cell_offset;  // 1.5 * 2^23
  const int64_t nbytes = (n + 1) / 2;
#pragma unroll
  for (int j = 0; j < J; ++j) {
    const int64_t e = tile_start + static_cast<int64_t>((warp * J + j) * kRow + lane * V);
    if (e >= n) continue;
    if ((e & (blocksize - 1)) == 0) absmax[e >> log2_bs] = m[j];
    const float scale = rcp_approx_ftz(m[j]);
    // Element 2b goes to the high nibble of byte b, 2b+1 to its low nibble; little-endian word.
    uint32_t word = 0;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const uint32_t code = encode<QT>(v[j][k] * scale, s_inside, s_below, cell_scale, magic, fp4_codes);
      word |= code << (8 * (k / 2) + (k % 2 == 0 ? 4 : 0));
    }
    if (e + V <= n) {
      if constexpr (V == 8) {
        *reinterpret_cast<uint32_t*>(packed + e / 2) = word;
      } else {
        *reinterpret_cast<uint16_t*>(packed + e / 2) = static_cast<uint16_t>(word);
      }
    } else {
      // Last chunk: elements past n take the code of 0.0 (the pad nibble of an odd count).
      for (int k = static_cast<int>(n - e); k < V; ++k) {
        const int shift = 8 * (k / 2) + (k % 2 == 0 ? 4 : 0);
        word = (word & ~(0xFu << shift)) | (static_cast<uint32_t>(table.zero_code) << shift);
      }
      for (int b = 0; b < V / 2 && e / 2 + b < nbytes; ++b) packed[e / 2 + b] = (word >> (8 * b)) & 0xFFu;
    }
  }
}

// Double quantization: one warp per nested block of kNestedBlock float32 absmax values, 8 per
// lane, all loaded before use. centred = absmax - mean; nested_absmax = max |centred|; code =
// index of the nearest dynamic-map value, by an 8-step binary search over the 255 midpoints (x
// above a midpoint takes the upper value); NaN (a block of identical values) takes table.flat_code,
// bitsandbytes' code there (it decodes to the offset whatever it is).
__global__ void __launch_bounds__(kThreads) quantize_absmax_kernel(
    const float* __restrict__ absmax, int64_t blocks, const float* __restrict__ offset,
    uint8_t* __restrict__ codes, float* __restrict__ nested_absmax, NestedTable table) {
  constexpr int kPerLane = kNestedBlock / 32;
  __shared__ float s_thr[256];
  s_thr[threadIdx.x] = table.thresholds[threadIdx.x];
  __syncthreads();
  const int64_t nb = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int64_t start = nb * kNestedBlock;
  if (start >= blocks) return;
  const float mean = *offset;
  float c[kPerLane];
  float m = 0.0f;
#pragma unroll
  for (int k = 0; k < kPerLane; ++k) {
    const int64_t i = start + k * 32 + lane;
    c[k] = i < blocks ? absmax[i] - mean : 0.0f;
    m = fmaxf(m, fabsf(c[k]));
  }
  for (int off = 16; off > 0; off >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, off));
  if (lane == 0) nested_absmax[nb] = m;
  const float scale = rcp_approx_ftz(m);
#pragma unroll
  for (int k = 0; k < kPerLane; ++k) {
    const float x = c[k] * scale;
    int code = 0;
#pragma unroll
    for (int step = 128; step > 0; step >>= 1) code += x > s_thr[code + step - 1] ? step : 0;
    const int64_t i = start + k * 32 + lane;
    if (i < blocks) codes[i] = static_cast<uint8_t>(isnan(x) ? table.flat_code : code);
  }
}

template <typename T>
Status launch_quantize_typed(const void* in, int64_t n, int log2_bs, int quant_type, uint8_t* packed,
                             float* absmax, const EncodeTable& table, cudaStream_t stream) {
  constexpr int64_t kTile = kWarps * kChunksPerThread * 32 * (16 / sizeof(T));
  const int64_t grid = (n + kTile - 1) / kTile;
  const T* src = static_cast<const T*>(in);
  const bool aligned = reinterpret_cast<uintptr_t>(in) % 16 == 0;
  if (quant_type == kNF4) {
    quantize_kernel<T, kNF4><<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(
        src, n, log2_bs, packed, absmax, table, aligned);
  } else {
    quantize_kernel<T, kFP4><<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(
        src, n, log2_bs, packed, absmax, table, aligned);
  }
  return check_launch();
}

}  // namespace

Status launch_quantize(const void* in, int dtype, int64_t n, int64_t blocksize, int quant_type,
                       uint8_t* packed, float* absmax, const EncodeTable& table, int device,
                       cudaStream_t stream) {
  if (in == nullptr || packed == nullptr || absmax == nullptr) return kNullPointer;
  if (n <= 0) return kBadSize;
  const int log2_bs = log2_blocksize(blocksize);
  if (log2_bs < 0) return kBadBlocksize;
  if (quant_type != kNF4 && quant_type != kFP4) return kBadQuantType;
  // Packed words are stored 2 or 4 bytes at a time; the backend allocates both outputs itself.
  if (reinterpret_cast<uintptr_t>(packed) % 4 != 0 || reinterpret_cast<uintptr_t>(absmax) % 4 != 0)
    return kMisaligned;
  if (dtype != kFloat32 && dtype != kFloat16 && dtype != kBFloat16) return kBadDtype;
  // 64-bit element indices throughout; the grid (n / 4096 CTAs at most) must fit in 31 bits.
  if (n > kMaxElements) return kBadSize;
  if (const Status s = use_device(device); s != kOk) return s;
  switch (dtype) {
    case kFloat32: return launch_quantize_typed<float>(in, n, log2_bs, quant_type, packed, absmax, table, stream);
    case kFloat16: return launch_quantize_typed<__half>(in, n, log2_bs, quant_type, packed, absmax, table, stream);
    case kBFloat16: return launch_quantize_typed<__nv_bfloat16>(in, n, log2_bs, quant_type, packed, absmax, table, stream);
    default: return kBadDtype;
  }
}

Status launch_quantize_absmax(const float* absmax, int64_t blocks, const float* offset,
                              int64_t nested_blocksize, uint8_t* codes, float* nested_absmax,
                              const NestedTable& table, int device, cudaStream_t stream) {
  if (absmax == nullptr || offset == nullptr || codes == nullptr || nested_absmax == nullptr)
    return kNullPointer;
  if (blocks <= 0) return kBadSize;
  if (nested_blocksize != kNestedBlock) return kBadBlocksize;
  if (table.flat_code < 0 || table.flat_code > 255) return kBadTable;
  const int64_t nested_blocks = (blocks + kNestedBlock - 1) / kNestedBlock;
  const int64_t grid = (nested_blocks + kWarps - 1) / kWarps;
  if (grid > 0x7fffffff) return kBadSize;
  if (const Status s = use_device(device); s != kOk) return s;
  quantize_absmax_kernel<<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(
      absmax, blocks, offset, codes, nested_absmax, table);
  return check_launch();
}

}  // namespace nf4
