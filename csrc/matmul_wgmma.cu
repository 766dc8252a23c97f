// Fused 4-bit matmul for mid-size batches on Hopper (sm_90a): y[M, N] = x[M, K] @ dequant(W)[N, K]^T
// (+ bias), W in bitsandbytes' packed layout, x fp16/bf16. Warpgroup MMA (wgmma) with the decoded
// weight as the register operand A and x as the shared-memory operand B: the tensor cores read x
// straight from shared memory, and the threads only decode weights. matmul_tiled.cu is the same
// product with mma.sync for other GPUs (and the fallback when this kernel is not built).
//
// Note: the CTA.
//     Two warpgroups (256 threads). Each owns 64 output rows (warp w of the group: rows 16w to
//     16w + 15, the m16 layout of mma.sync) and all 64 * NB tokens of the CTA: NB wgmma
//     m64n64k16 per 16 k, accumulators 32 * NB fp32 per thread. WK = 1: the warpgroups take 64
//     rows each (128 per CTA); WK = 2: the same 64 rows, alternate 64-wide groups of K, summed
//     through shared memory at the end. A stage is WK groups of x and of the CTA's weight rows,
//     copied by cp.async four stages deep (three in flight while one is computed): the weight
//     comes from HBM, and one group's products are far shorter than its latency.
//
// Note: x in shared memory.
//     wgmma reads B (K-major, no swizzle) as core matrices of 8 tokens x 8 k (16-byte rows, 128
//     bytes each); a k16 step takes two of them along k (LBO apart) per 8 tokens (SBO apart).
//     x keeps its k order, so each 16-byte piece of an x row is one cp.async to its core matrix.
//
// Note: the weight bytes.
//     In k order, the A fragment of step j gives lane t of a quad k 16j + 2t, 2t + 1 (packed
//     byte 8j + t of the row's 32 in the group) and 16j + 8 + 2t, 2t + 9 (byte 8j + 4 + t): byte t
//     of every 4-byte word. A lane reads its two rows' 32 bytes from shared memory (the quad's
//     four lanes read the same addresses: a broadcast) and gathers byte t of each word with three
//     byte permutes per 4 words. Each gathered byte is then decoded as in matmul.cu.
//
// Note: synchronization.
//     cp.async writes through the generic proxy and wgmma reads through the async proxy: each
//     thread fences (fence.proxy.async) after its copies have landed, before the barrier. A
//     warpgroup decodes a group's four A fragments, fences, issues 4 * NB wgmma, commits and waits
//     for them before its registers or the stage are reused; the two warpgroups overlap each
//     other's decoding and products.
//
// Dequantization is exact as in matmul_tiled.cu (fp32 level * absmax rounded once to T).
//
// Status: correct (tests/test_cuda_matmul.py) but not on the automatic path. On the H100 it ran
// at 1.11x bf16 at 64 tokens and 2.0x at 128 on the 28672 x 8192 weight, no better than the
// tiled mma.sync kernel: ncu shows 2 warps per scheduler, 70% of cycles with none eligible,
// stalls on memory (scale loads), shared-memory latency (the decode chain) and the per-stage
// barrier. Each warpgroup decodes, issues, then waits for its products: nothing overlaps within
// a warpgroup. What it needs next: decode group s + 1 while group s's wgmma run (two A register
// sets, wgmma.wait_group 1), several groups per stage, and a producer warp for the copies.
#include <atomic>

#include "common.cuh"
#include "mma.cuh"

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define NF4_HAS_WGMMA 1
#else
#define NF4_HAS_WGMMA 0
#endif
#if defined(__CUDA_ARCH__) && !NF4_HAS_WGMMA
// Device passes for other targets compile the kernel as a stub: its helpers go unused there.
#pragma nv_diag_suppress 177
#endif

namespace nf4 {
namespace {

constexpr int kGroup = 64;
constexpr int kThreads = 256;
constexpr int kLutBytes = kF32LutBytes;
constexpr int kCodeBytes = 256 * 4;
// Core-matrix strides of the staged x (Note: x in shared memory, permuted).
constexpr uint32_t kLbo = 128;  // between the two k halves of a k16 step
constexpr uint32_t kSbo = 256;  // between consecutive 8-token core matrices

template <int NB, int WK>
struct WgTile {
  static constexpr int kTokens = 64 * NB;
  static constexpr int kNG = kTokens / 8;                 // 8-token core-matrix rows
  static constexpr int kRows = 64 * (2 / WK);             // output rows per CTA
  static constexpr int kXGroupBytes = kTokens * kGroup * 2;  // one 64-wide group of x
  static constexpr int kWGroupBytes = kRows * kGroup / 2;    // one group of the CTA's weight rows
  static constexpr int kStageBytes = WK * (kXGroupBytes + kWGroupBytes);
  static constexpr int kStages = 4;
  static constexpr int kSmem = kLutBytes + kCodeBytes + kStages * kStageBytes;
  static constexpr int kXChunks = kTokens * 8 * WK;   // 16-byte copies of x per stage
  static constexpr int kWChunks = kRows * 2 * WK;     // ... of the weight
  static_assert(kSmem <= 227 * 1024, "tile does not fit in shared memory");
  static_assert(WK == 1 || NB * 32 * 4 * 128 <= kSmem, "reduction must fit in shared memory");
};

__device__ __forceinline__ uint64_t smem_desc(const void* p) {
  const uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(p));
  return static_cast<uint64_t>((a >> 4) & 0x3FFF) | (static_cast<uint64_t>(kLbo >> 4) << 16) |
         (static_cast<uint64_t>(kSbo >> 4) << 32);
}

#if NF4_HAS_WGMMA
#define NF4_ACC32                                                                                      \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),      \
      "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]),         \
      "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]),       \
      "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]),       \
      "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
#define NF4_WGMMA_N64(TYPE)                                                                            \
  asm volatile(                                                                                        \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"                                                     \
      "wgmma.mma_async.sync.aligned.m64n64k16.f32." TYPE "." TYPE " "                                  \
      "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,"   \
      "%25,%26,%27,%28,%29,%30,%31}, {%32,%33,%34,%35}, %36, p, 1, 1, 0;\n}\n"                         \
      : NF4_ACC32                                                                                      \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(1))

__device__ __forceinline__ void wgmma_n64(float (&d)[32], const uint32_t (&a)[4], uint64_t desc, __nv_bfloat16) {
  NF4_WGMMA_N64("bf16");
}
__device__ __forceinline__ void wgmma_n64(float (&d)[32], const uint32_t (&a)[4], uint64_t desc, __half) {
  NF4_WGMMA_N64("f16");
}
#undef NF4_WGMMA_N64
#undef NF4_ACC32
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_wait_all() { asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory"); }
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
// Pins a register's value at this point (no read or copy of it moves across).
__device__ __forceinline__ void pin(float& r) { asm volatile("" : "+f"(r)::"memory"); }
__device__ __forceinline__ void pin(uint32_t& r) { asm volatile("" : "+r"(r)::"memory"); }
#endif

template <typename T, int NB, int WK, bool kNested>
__global__ void __launch_bounds__(kThreads) wgmma_kernel(
    const T* __restrict__ x, int64_t M, int64_t N, int64_t K, const uint8_t* __restrict__ packed,
    const void* __restrict__ absmax_raw, const float* __restrict__ nested_absmax,
    const float* __restrict__ nested_code, const float* __restrict__ offset, int log2_bs,
    int log2_nested_bs, const T* __restrict__ bias, T* __restrict__ y, DecodeTable table) {
#if NF4_HAS_WGMMA
  using Cfg = WgTile<NB, WK>;
  extern __shared__ __align__(128) unsigned char smem[];
  unsigned char* s_lut = smem;
  float* s_code = reinterpret_cast<float*>(smem + kLutBytes);
  unsigned char* s_x = smem + kLutBytes + kCodeBytes;

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int wg = warp >> 2;  // warpgroup
  const int wq = warp & 3;   // warp within it: 16 of its 64 rows
  const int wm = WK == 1 ? wg : 0;
  const int wk = WK == 1 ? 0 : wg;
  const int g = lane >> 2;
  const int t = lane & 3;
  const uint32_t col = static_cast<uint32_t>(lane & 15) * 8;
  const int64_t tok0 = static_cast<int64_t>(blockIdx.x) * Cfg::kTokens;
  const int64_t row0 = static_cast<int64_t>(blockIdx.y) * Cfg::kRows + wm * 64 + wq * 16;
  const int groups = static_cast<int>(K / kGroup);
  const int stages = (groups + WK - 1) / WK;
  const int group_shift = log2_bs - 6;
  const int blocks_per_row = static_cast<int>(K >> log2_bs);
  const float mean = kNested ? *offset : 0.0f;

  // Absmax block index at group 0 of row g + 8t (lanes t = 0, 1 compute the quad's two scales),
  // clamped to N - 1 (outputs past N are not stored).
  int brow = 0;
  {
    int64_t row = row0 + 8 * (t & 1) + g;
    row = row < N ? row : N - 1;
    brow = static_cast<int>(row) * blocks_per_row;
  }

  uint32_t q_next = 0;
  float nabs_next = 0.0f;
  auto load_scale = [&](int s) {
    const int gi = s * WK + wk;
    q_next = 0;
    nabs_next = 0.0f;
    if (t < 2 && gi < groups) {
      const int blk = brow + (gi >> group_shift);
      if constexpr (kNested) {
        q_next = __ldg(static_cast<const uint8_t*>(absmax_raw) + blk);
        nabs_next = __ldg(nested_absmax + (blk >> log2_nested_bs));
      } else {
        q_next = __float_as_uint(__ldg(static_cast<const float*>(absmax_raw) + blk));
      }
    }
  };

  // Stage s into buffer b: x (tokens past M and groups past K zero-filled) in core-matrix order
  // (Note: x in shared memory), then the CTA's weight rows (rows past N clamped to N - 1). A
  // thread copies the same pieces at every stage: their addresses are computed once, here.
  constexpr int kXPer = Cfg::kXChunks / kThreads;
  constexpr int kWPer = Cfg::kWChunks / kThreads;
  static_assert(kXPer * kThreads == Cfg::kXChunks && kWPer * kThreads == Cfg::kWChunks, "uneven copies");
  const T* x_src[kXPer];
  uint32_t x_dst[kXPer];
  int x_w[kXPer];
  bool x_ok[kXPer];
#pragma unroll
  for (int i = 0; i < kXPer; ++i) {
    // Eight consecutive threads fill one core matrix (all 32 banks); a warp reads 64 contiguous
    // bytes of each of 8 token rows.
    const int idx = tid + kThreads * i;
    const int q = (idx >> 3) & 7;  // 8 k per piece, 8 pieces per group
    const int n = ((idx >> 6) % Cfg::kNG) * 8 + (idx & 7);
    const int w = (idx >> 6) / Cfg::kNG;
    const int64_t tok = tok0 + n;
    x_ok[i] = tok < M;
    x_w[i] = w;
    x_src[i] = x + (x_ok[i] ? tok : 0) * K + static_cast<int64_t>(w) * kGroup + 8 * q;
    x_dst[i] = w * Cfg::kXGroupBytes + (((q >> 1) * Cfg::kNG + (n >> 3)) * 2 + (q & 1)) * 128 + (n & 7) * 16;
  }
  const uint8_t* w_src[kWPer];
  uint32_t w_dst[kWPer];
  int w_w[kWPer];
#pragma unroll
  for (int i = 0; i < kWPer; ++i) {
    const int idx = tid + kThreads * i;
    const int half = idx & 1;
    const int r = (idx >> 1) % Cfg::kRows;
    const int w = (idx >> 1) / Cfg::kRows;
    int64_t row = static_cast<int64_t>(blockIdx.y) * Cfg::kRows + r;
    row = row < N ? row : N - 1;
    w_w[i] = w;
    w_src[i] = packed + row * (K / 2) + static_cast<int64_t>(w) * (kGroup / 2) + 16 * half;
    w_dst[i] = WK * Cfg::kXGroupBytes + w * Cfg::kWGroupBytes + r * 32 + 16 * half;
  }
  auto issue_stage = [&](int s, int b) {
    unsigned char* buf = s_x + b * Cfg::kStageBytes;
    const int g0 = s * WK;
#pragma unroll
    for (int i = 0; i < kXPer; ++i) {
      const bool ok = x_ok[i] && g0 + x_w[i] < groups;
      cp_async16(buf + x_dst[i], ok ? x_src[i] + static_cast<int64_t>(g0) * kGroup : x, ok);
    }
#pragma unroll
    for (int i = 0; i < kWPer; ++i) {
      const bool ok = g0 + w_w[i] < groups;
      cp_async16(buf + w_dst[i], ok ? w_src[i] + static_cast<int64_t>(g0) * (kGroup / 2) : packed, ok);
    }
  };

#pragma unroll
  for (int s = 0; s < Cfg::kStages - 1; ++s) {
    if (s < stages) issue_stage(s, s);
    cp_async_commit();
  }
  load_scale(0);
  fill_f32_table(s_lut, table, tid, kThreads);
  if constexpr (kNested) {
    for (int i = tid; i < 256; i += kThreads) s_code[i] = nested_code[i];
  }

  float acc[NB][32];
#pragma unroll
  for (int c = 0; c < NB; ++c)
#pragma unroll
    for (int i = 0; i < 32; ++i) acc[c][i] = 0.0f;

  // Byte t of each of a row's 8 words, in k order: see Note: the weight bytes.
  const uint32_t sel = static_cast<uint32_t>(t) | ((4u + t) << 4);
  const int local_row = (WK == 1 ? wg * 64 : 0) + wq * 16 + g;

  for (int s = 0; s < stages; ++s) {
    cp_async_wait<Cfg::kStages - 2>();
    fence_proxy_async();  // cp.async wrote through the generic proxy; wgmma reads through the async one
    __syncthreads();      // stage s landed for everyone; every wgmma of stage s - 1 has completed
    {
      const int next = s + Cfg::kStages - 1;
      if (next < stages) issue_stage(next, next % Cfg::kStages);
      cp_async_commit();
    }
    float mine;
    if constexpr (kNested) {
      mine = nested_scale(s_code[q_next], nabs_next, mean);
    } else {
      mine = __uint_as_float(q_next);
    }
    if (s + 1 < stages) load_scale(s + 1);
    if (s * WK + wk >= groups) continue;  // warpgroup-uniform

    const unsigned char* xs = s_x + (s % Cfg::kStages) * Cfg::kStageBytes;
    const unsigned char* ws = xs + WK * Cfg::kXGroupBytes + wk * Cfg::kWGroupBytes;
    uint32_t wt[2][2];  // [row g, g + 8][word]: bytes t, t + 4, ... of the row's 32
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const uint4 lo = *reinterpret_cast<const uint4*>(ws + (local_row + 8 * h) * 32);
      const uint4 hi = *reinterpret_cast<const uint4*>(ws + (local_row + 8 * h) * 32 + 16);
      wt[h][0] = __byte_perm(__byte_perm(lo.x, lo.y, sel), __byte_perm(lo.z, lo.w, sel), 0x5410);
      wt[h][1] = __byte_perm(__byte_perm(hi.x, hi.y, sel), __byte_perm(hi.z, hi.w, sel), 0x5410);
    }
    const float sc0 = __shfl_sync(0xffffffffu, mine, lane & ~3);
    const float sc1 = __shfl_sync(0xffffffffu, mine, (lane & ~3) | 1);
    uint32_t a[4][4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      // Step j: k [16j, 16j + 16); the lane's slots 2t, 2t + 1 are byte 8j + t of the row, slots
      // 2t + 8, 2t + 9 byte 8j + 4 + t: bytes 2j % 4 and 2j % 4 + 1 of transposed word j / 2.
      const uint32_t r0 = wt[0][j >> 1];
      const uint32_t r1 = wt[1][j >> 1];
      if ((j & 1) == 0) {
        a[j][0] = scaled_byte<T, 0>(s_lut, r0, col, sc0);
        a[j][1] = scaled_byte<T, 0>(s_lut, r1, col, sc1);
        a[j][2] = scaled_byte<T, 1>(s_lut, r0, col, sc0);
        a[j][3] = scaled_byte<T, 1>(s_lut, r1, col, sc1);
      } else {
        a[j][0] = scaled_byte<T, 2>(s_lut, r0, col, sc0);
        a[j][1] = scaled_byte<T, 2>(s_lut, r1, col, sc1);
        a[j][2] = scaled_byte<T, 3>(s_lut, r0, col, sc0);
        a[j][3] = scaled_byte<T, 3>(s_lut, r1, col, sc1);
      }
    }
    const unsigned char* xw = xs + wk * Cfg::kXGroupBytes;
    wgmma_fence();
#pragma unroll
    for (int j = 0; j < 4; ++j) {
#pragma unroll
      for (int c = 0; c < NB; ++c) {
        wgmma_n64(acc[c], a[j], smem_desc(xw + (j * Cfg::kNG + 8 * c) * kSbo), T{});
      }
    }
    wgmma_commit();
    wgmma_wait_all();
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int i = 0; i < 4; ++i) pin(a[j][i]);
#pragma unroll
    for (int c = 0; c < NB; ++c)
#pragma unroll
      for (int i = 0; i < 32; ++i) pin(acc[c][i]);
  }
  cp_async_wait<0>();
  __syncthreads();  // all products done: shared memory is free

  if constexpr (WK == 2) {
    float* red = reinterpret_cast<float*>(smem);
    const int lt = tid & 127;
    if (wg == 1) {
#pragma unroll
      for (int c = 0; c < NB; ++c)
#pragma unroll
        for (int i = 0; i < 32; i += 4)
          *reinterpret_cast<float4*>(&red[((c * 8 + i / 4) * 128 + lt) * 4]) =
              make_float4(acc[c][i], acc[c][i + 1], acc[c][i + 2], acc[c][i + 3]);
    }
    __syncthreads();
    if (wg == 1) return;
#pragma unroll
    for (int c = 0; c < NB; ++c)
#pragma unroll
      for (int i = 0; i < 32; i += 4) {
        const float4 v = *reinterpret_cast<const float4*>(&red[((c * 8 + i / 4) * 128 + lt) * 4]);
        acc[c][i] += v.x;
        acc[c][i + 1] += v.y;
        acc[c][i + 2] += v.z;
        acc[c][i + 3] += v.w;
      }
  }

  // Accumulators of m64nNk16 per warp: element 4i + 2h + e of lane (g, t) is row g + 8h, token
  // 8i + 2t + e of the n64 chunk.
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int64_t feature = row0 + 8 * h + g;
    if (feature >= N) continue;
    const float b = bias != nullptr ? Mma<T>::to_float(bias[feature]) : 0.0f;
#pragma unroll
    for (int c = 0; c < NB; ++c) {
#pragma unroll
      for (int i = 0; i < 8; ++i) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int64_t token = tok0 + 64 * c + 8 * i + 2 * t + e;
          if (token < M) y[token * N + feature] = Mma<T>::from_float(acc[c][4 * i + 2 * h + e] + b);
        }
      }
    }
  }
#else
  __trap();  // not built for this GPU: the launcher refuses before launching
#endif
}

template <typename T, int NB, int WK>
Status launch_wg(const void* x, int64_t M, int64_t N, int64_t K, const uint8_t* packed, int log2_bs,
                 const void* absmax, bool nested, const float* nested_absmax, const float* nested_code,
                 const float* offset, int log2_nested_bs, const void* bias, void* y, const DecodeTable& table,
                 cudaStream_t stream) {
  using Cfg = WgTile<NB, WK>;
  const int64_t grid_x = (M + Cfg::kTokens - 1) / Cfg::kTokens;
  const int64_t grid_y = (N + Cfg::kRows - 1) / Cfg::kRows;
  if (grid_x > 0x7fffffff || grid_y > 65535) return kBadSize;
  auto kernel = nested ? wgmma_kernel<T, NB, WK, true> : wgmma_kernel<T, NB, WK, false>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::kSmem);
  if (err != cudaSuccess) {
    last_cuda_error() = err;
    cudaGetLastError();
    return kLaunchFailed;
  }
  kernel<<<dim3(static_cast<unsigned>(grid_x), static_cast<unsigned>(grid_y)), kThreads, Cfg::kSmem, stream>>>(
      static_cast<const T*>(x), M, N, K, packed, absmax, nested_absmax, nested_code, offset, log2_bs,
      log2_nested_bs, static_cast<const T*>(bias), static_cast<T*>(y), table);
  return check_launch();
}

template <typename T>
Status launch_wg_typed(int token_chunks, int k_groups, const void* x, int64_t M, int64_t N, int64_t K,
                       const uint8_t* packed, int log2_bs, const void* absmax, bool nested,
                       const float* nested_absmax, const float* nested_code, const float* offset,
                       int log2_nested_bs, const void* bias, void* y, const DecodeTable& table,
                       cudaStream_t stream) {
#define NF4_LAUNCH(NB, WK)                                                                                 \
  if (token_chunks == NB && k_groups == WK)                                                               \
    return launch_wg<T, NB, WK>(x, M, N, K, packed, log2_bs, absmax, nested, nested_absmax, nested_code, \
                                offset, log2_nested_bs, bias, y, table, stream);
  NF4_LAUNCH(1, 1)
  NF4_LAUNCH(1, 2)
  NF4_LAUNCH(2, 1)
  NF4_LAUNCH(2, 2)
#undef NF4_LAUNCH
  return kBadSize;
}

}  // namespace

bool wgmma_probe(int device);

// Whether the wgmma kernel can run on `device`: a compute capability 9.0 GPU and sm_90a code in
// this build (its binary version for the device is 90, not an sm_80 fallback).
bool wgmma_available(int device) {
  // Cached per device (the answer cannot change while the process runs).
  static std::atomic<int8_t> cache[64] = {};
  if (device < 0) return false;
  if (device < 64 && cache[device].load() != 0) return cache[device].load() > 0;
  const bool ok = wgmma_probe(device);
  if (device < 64) cache[device].store(ok ? 1 : -1);
  return ok;
}

bool wgmma_probe(int device) {
  int major = 0, minor = 0;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  if (major != 9 || minor != 0) return false;
  if (use_device(device) != kOk) return false;
  cudaFuncAttributes attr{};
  if (cudaFuncGetAttributes(&attr, wgmma_kernel<__nv_bfloat16, 1, 1, false>) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  return attr.binaryVersion == 90;
}

Status launch_matmul_wgmma(const void* x, int dtype, int64_t M, int64_t N, int64_t K, const uint8_t* packed,
                           int64_t blocksize, const void* absmax, bool nested, const float* nested_absmax,
                           const float* nested_code, const float* offset, int64_t nested_blocksize,
                           const void* bias, void* y, const DecodeTable& table, int token_chunks,
                           int k_groups, int device, cudaStream_t stream) {
  int log2_bs = 0, log2_nested_bs = 0;
  if (const Status s = check_matmul_args(x, dtype, M, N, K, packed, blocksize, absmax, nested, nested_absmax,
                                         nested_code, offset, nested_blocksize, y, &log2_bs, &log2_nested_bs);
      s != kOk) return s;
  if (!wgmma_available(device)) return kUnsupportedDevice;
  if (const Status s = use_device(device); s != kOk) return s;
  if (dtype == kFloat16) {
    return launch_wg_typed<__half>(token_chunks, k_groups, x, M, N, K, packed, log2_bs, absmax, nested,
                                   nested_absmax, nested_code, offset, log2_nested_bs, bias, y, table, stream);
  }
  return launch_wg_typed<__nv_bfloat16>(token_chunks, k_groups, x, M, N, K, packed, log2_bs, absmax, nested,
                                        nested_absmax, nested_code, offset, log2_nested_bs, bias, y, table,
                                        stream);
}

}  // namespace nf4
