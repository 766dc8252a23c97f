// Fused 4-bit matmul for mid-size batches on Hopper (sm_90a): y[M, N] = x[M, K] @ dequant(W)[N, K]^T
// (+ bias), W in bitsandbytes' packed layout, x fp16/bf16. Warpgroup MMA (wgmma) with the decoded
// weight as the register operand A and x as the shared-memory operand B: the tensor cores read x
// straight from shared memory, and the threads only decode weights. matmul_tiled.cu is the same
// product with mma.sync for other GPUs (and the fallback when this kernel is not built).
//
// Note: the CTA.
//     Two warpgroups (256 threads), 128 output rows: warpgroup w owns rows 64w to 64w + 63 (warp
//     q of the group: rows 16q to 16q + 15, the m16 layout of mma.sync) and all 64 * NB tokens of
//     the CTA: NB wgmma m64n64k16 per 16 k, accumulators 32 * NB fp32 per thread. A stage is two
//     64-wide groups of K: x for the CTA's tokens and the CTA's weight rows (kStages buffers).
//
// Note: copies by TMA.
//     Thread 0 copies a stage with four TMA boxes (per group: x as 64 k x the CTA's tokens, the
//     weight as 32 bytes x 128 rows) that complete on the buffer's mbarrier; boxes reaching past
//     M, N or K arrive zero-filled, so no thread computes a copy address or a bound. (With every
//     thread issuing 10 cp.async per stage, ncu on the H100 showed 40% of the stall samples as
//     long-scoreboard waits: cp.async address registers held behind a full load queue, and absmax
//     loads used one stage after they were issued; the kernel ran at 1.5-1.8x bf16 at 128 tokens
//     instead of 0.84-1.14x.) Block scales are computed by chunks of kChunkStages stages into
//     shared memory, from absmax values loaded a whole chunk earlier.
//
// Note: decode overlapped with the products.
//     A warpgroup holds two A register sets. It issues group i's 4 * NB wgmma from one set,
//     commits, waits until group i - 1's have completed (wgmma.wait_group 1), then decodes group
//     i + 1 into the other set while group i's products run. Between stages every thread meets
//     the others at one barrier, after which the buffer of the stage before the current one is
//     free (its products completed before the barrier) and thread 0 refills it, then waits on the
//     next stage's mbarrier: kStages - 2 stages are in flight while one is computed. Tried and
//     slower on the H100 (5-20%): a third register set so that decode runs two groups ahead. It
//     needs the loop unrolled by three without early exits (a register copy between the sets, or
//     accumulators defined on several paths, make ptxas serialize the wgmma pipeline), and the
//     padding groups' predicated wgmma made ptxas insert a warpgroup.arrive before every wgmma.
//
// Note: split K across a cluster.
//     A 4096-row weight has 32 row tiles: too few CTAs for 132 SMs. The launch groups k_split
//     CTAs (1, 2 or 4) in a thread-block cluster along grid z; each takes a contiguous range of
//     stages. At the end each CTA writes its fp32 partial tile into its own shared memory, the
//     cluster synchronizes, and CTA r sums slice r of the tile over the cluster's CTAs (distributed
//     shared memory, in rank order: deterministic) and stores it. No workspace, no second launch.
//
// Note: x in shared memory.
//     The TMA writes a token's 64 k of a group as one 128-byte row with the 128-byte swizzle (the
//     16-byte pieces of row r permuted by r % 8), the layout wgmma reads as a K-major operand with
//     that swizzle mode: 8-row core-matrix groups 1024 bytes apart, a k16 step 32 bytes into the
//     rows. Each token's row is one full 128-byte line of x, read once from L2.
//
// Note: the weight bytes.
//     In k order, the A fragment of step j gives lane t of a quad k 16j + 2t, 2t + 1 (packed
//     byte 8j + t of the row's 32 in the group) and 16j + 8 + 2t, 2t + 9 (byte 8j + 4 + t): byte t
//     of every 4-byte word. A lane reads its two rows' 32 bytes from shared memory (the quad's
//     four lanes read the same addresses: a broadcast) and gathers byte t of each word with three
//     byte permutes per 4 words. Each gathered byte is then decoded through the fp32 table.
//
// Dequantization is exact as in matmul_tiled.cu (fp32 level * absmax rounded once to T).
#include <atomic>
#include <type_traits>

#include <cooperative_groups.h>
#include <cuda.h>  // CUtensorMap; the encoder comes through the runtime's driver entry point

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
constexpr int kRows = 128;       // output rows per CTA: 64 per warpgroup
constexpr int kStageGroups = 2;  // 64-wide groups of K per stage
constexpr int kChunkStages = 8;  // stages per chunk of block scales
constexpr int kChunkGroups = kChunkStages * kStageGroups;
constexpr int kLutBytes = kF32LutBytes;
constexpr int kCodeBytes = 256 * 4;
constexpr int kScaleBytes = 2 * kChunkGroups * kRows * 4;  // two chunks of block scales
constexpr int kMaxSplit = 4;     // CTAs per cluster along K
constexpr uint32_t kSwizzleAtom = 1024;  // 8 rows of 128 bytes: the 128-byte swizzle's period

template <int NB>
struct WgTile {
  static constexpr int kTokens = 64 * NB;
  static constexpr int kXGroupBytes = kTokens * kGroup * 2;  // one 64-wide group of x: a row per token
  static constexpr int kWGroupBytes = kRows * kGroup / 2;    // one group of the CTA's weight rows
  static constexpr int kStageBytes = kStageGroups * (kXGroupBytes + kWGroupBytes);
  static constexpr int kStages = NB == 1 ? 6 : 4;            // as many as fit
  static constexpr int kXOffset = 0;
  static constexpr int kWOffset = kStages * kStageGroups * kXGroupBytes;
  static constexpr int kLutOffset = kWOffset + kStages * kStageGroups * kWGroupBytes;
  static constexpr int kCodeOffset = kLutOffset + kLutBytes;
  static constexpr int kScaleOffset = kCodeOffset + kCodeBytes;
  static constexpr int kBarOffset = kScaleOffset + kScaleBytes;
  static constexpr int kSmem = kBarOffset + kStages * 8 + kSwizzleAtom;  // + slack to align the base
  static constexpr int kPartialBytes = kRows * kTokens * 4;             // the fp32 tile (split K)
  static_assert(kXGroupBytes % kSwizzleAtom == 0, "x buffers must stay aligned to the swizzle atom");
  static_assert(kSmem <= 227 * 1024, "tile does not fit in shared memory");
  static_assert(kPartialBytes <= kLutOffset, "the partial tile must fit in the stage buffers");
  static_assert(kChunkGroups * kRows == 8 * kThreads, "eight block scales per thread and chunk");
};

// wgmma descriptor of a K-major operand tile in shared memory, rows of 128 bytes with the 128-byte
// swizzle (as the TMA writes it): stride 1024 bytes between 8-row core-matrix groups, swizzle mode
// 1 in bits 62-63; the leading offset is unused for this layout. A k16 step within the 64-wide
// row starts 32 bytes further (the hardware applies the swizzle to the computed addresses).
__device__ __forceinline__ uint64_t smem_desc(const void* p) {
  const uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(p));
  return static_cast<uint64_t>((a >> 4) & 0x3FFF) | (uint64_t{1} << 16) |
         (static_cast<uint64_t>(kSwizzleAtom >> 4) << 32) | (uint64_t{1} << 62);
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
template <int N>
__device__ __forceinline__ void wgmma_wait() { asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory"); }
// Pins a register's value at this point (no read or copy of it moves across).
__device__ __forceinline__ void pin(float& r) { asm volatile("" : "+f"(r)::"memory"); }
__device__ __forceinline__ void pin(uint32_t& r) { asm volatile("" : "+r"(r)::"memory"); }

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void mbar_init(uint64_t* bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_init_fence() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}
// Arms the barrier for `bytes` of TMA writes (the producer's single arrival).
__device__ __forceinline__ void mbar_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
  asm volatile(
      "{\n.reg .pred done;\nNF4_WAIT:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra NF4_WAIT;\n}\n" ::"r"(smem_addr(bar)),
      "r"(parity)
      : "memory");
}
// A 2-D box of `map` at coordinates (c0 innermost, c1) into shared memory, completing on `bar`.
__device__ __forceinline__ void tma_load_2d(void* dst, const CUtensorMap* map, uint64_t* bar, int c0, int c1) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4}], [%2];\n" ::
          "r"(smem_addr(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(smem_addr(bar)), "r"(c0), "r"(c1)
      : "memory");
}
#endif

template <typename T, int NB, bool kNested>
__global__ void __launch_bounds__(kThreads, 1) wgmma_kernel(
    const __grid_constant__ CUtensorMap x_map, const __grid_constant__ CUtensorMap w_map, int64_t M, int64_t N,
    int64_t K, const void* __restrict__ absmax_raw, const float* __restrict__ nested_absmax,
    const float* __restrict__ nested_code, const float* __restrict__ offset, int log2_bs, int log2_nested_bs,
    const T* __restrict__ bias, T* __restrict__ y, DecodeTable table) {
#if NF4_HAS_WGMMA
  using Cfg = WgTile<NB>;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  // The 128-byte swizzle repeats every 1024 bytes: x buffers start on that period.
  unsigned char* smem = smem_raw + ((kSwizzleAtom - smem_addr(smem_raw) % kSwizzleAtom) % kSwizzleAtom);
  unsigned char* s_lut = smem + Cfg::kLutOffset;
  float* s_code = reinterpret_cast<float*>(smem + Cfg::kCodeOffset);
  float* s_scale = reinterpret_cast<float*>(smem + Cfg::kScaleOffset);  // [2][kChunkGroups][kRows]
  uint64_t* s_bar = reinterpret_cast<uint64_t*>(smem + Cfg::kBarOffset);  // one per stage buffer

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int g = lane >> 2;
  const int t = lane & 3;
  const uint32_t col = static_cast<uint32_t>(lane & 15) * 8;
  const int64_t tok0 = static_cast<int64_t>(blockIdx.x) * Cfg::kTokens;
  const int64_t rbase = static_cast<int64_t>(blockIdx.y) * kRows;
  const int groups = static_cast<int>(K / kGroup);
  // See Note: split K across a cluster. This CTA's stages: [s_beg, s_beg + n).
  const int all_stages = (groups + kStageGroups - 1) / kStageGroups;
  const int split = static_cast<int>(gridDim.z);
  const int s_beg = static_cast<int>(static_cast<int64_t>(all_stages) * blockIdx.z / split);
  const int n = static_cast<int>(static_cast<int64_t>(all_stages) * (blockIdx.z + 1) / split) - s_beg;
  const int group_shift = log2_bs - 6;
  const int blocks_per_row = static_cast<int>(K >> log2_bs);
  const float mean = kNested ? *offset : 0.0f;

  auto x_buf = [&](int s, int w) { return smem + Cfg::kXOffset + ((s % Cfg::kStages) * kStageGroups + w) * Cfg::kXGroupBytes; };
  auto w_buf = [&](int s, int w) { return smem + Cfg::kWOffset + ((s % Cfg::kStages) * kStageGroups + w) * Cfg::kWGroupBytes; };
  // Local stage s by TMA (thread 0 only): per group a box of x (64 k x the CTA's tokens, 128-byte
  // swizzled rows) and one of the weight (32 bytes x 128 rows). Boxes past M, N or K arrive as zeros.
  auto issue_stage = [&](int s) {
    uint64_t* bar = s_bar + s % Cfg::kStages;
    mbar_expect_tx(bar, Cfg::kStageBytes);
    const int g0 = (s_beg + s) * kStageGroups;
#pragma unroll
    for (int w = 0; w < kStageGroups; ++w) {
      tma_load_2d(x_buf(s, w), &x_map, bar, (g0 + w) * kGroup, static_cast<int>(tok0));
      tma_load_2d(w_buf(s, w), &w_map, bar, (g0 + w) * (kGroup / 2), static_cast<int>(rbase));
    }
  };

  // Block scales by chunks of kChunkStages stages (Note: the CTA): thread tid computes row sr,
  // groups 8 * sh .. 8 * sh + 7 of each chunk, from values loaded a chunk earlier.
  const int sr = tid % kRows;
  const int sh = tid / kRows;
  const int s_brow = static_cast<int>(rbase + sr < N ? rbase + sr : N - 1) * blocks_per_row;
  uint32_t q_raw[8];
  float nabs_raw[8];
  auto load_scales = [&](int c) {
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int ls = c * kChunkStages + (8 * sh + i) / kStageGroups;  // local stage
      const int gi = (s_beg + c * kChunkStages) * kStageGroups + 8 * sh + i;
      q_raw[i] = 0;
      nabs_raw[i] = 0.0f;
      if (ls < n && gi < groups) {
        const int blk = s_brow + (gi >> group_shift);
        if constexpr (kNested) {
          q_raw[i] = __ldg(static_cast<const uint8_t*>(absmax_raw) + blk);
          nabs_raw[i] = __ldg(nested_absmax + (blk >> log2_nested_bs));
        } else {
          q_raw[i] = __float_as_uint(__ldg(static_cast<const float*>(absmax_raw) + blk));
        }
      }
    }
  };
  auto store_scales = [&](int c) {  // needs s_code; zero for groups past K (their x is zero too)
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const float v = kNested ? nested_scale(s_code[q_raw[i]], nabs_raw[i], mean) : __uint_as_float(q_raw[i]);
      s_scale[((c & 1) * kChunkGroups + 8 * sh + i) * kRows + sr] = v;
    }
  };

  if (tid == 0) {
    for (int i = 0; i < Cfg::kStages; ++i) mbar_init(s_bar + i, 1);
    mbar_init_fence();
  }
  __syncthreads();  // barriers initialized
  if (tid == 0) {
    for (int s = 0; s < Cfg::kStages - 1 && s < n; ++s) issue_stage(s);
  }
  load_scales(0);
  fill_f32_table(s_lut, table, tid, kThreads);
  if constexpr (kNested) {
    for (int i = tid; i < 256; i += kThreads) s_code[i] = nested_code[i];
  }
  __syncthreads();  // s_code
  store_scales(0);
  load_scales(1);
  __syncthreads();  // the first chunk of scales, and the table

  float acc[NB][32];
#pragma unroll
  for (int c = 0; c < NB; ++c)
#pragma unroll
    for (int i = 0; i < 32; ++i) acc[c][i] = 0.0f;

  // Byte t of each of a row's 8 words, in k order: see Note: the weight bytes.
  const uint32_t sel = static_cast<uint32_t>(t) | ((4u + t) << 4);
  const int local_row = (warp >> 2) * 64 + (warp & 3) * 16 + g;

  // Group w of local stage s into A fragments (4 k16 steps).
  auto decode = [&](uint32_t (&a)[4][4], int s, int w) {
    const unsigned char* ws = w_buf(s, w);
    const float* sc = s_scale + (((s / kChunkStages) & 1) * kChunkGroups + (s % kChunkStages) * kStageGroups + w) * kRows;
    uint32_t wt[2][2];  // [row g, g + 8][word]: bytes t, t + 4, ... of the row's 32
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const uint4 lo = *reinterpret_cast<const uint4*>(ws + (local_row + 8 * h) * 32);
      const uint4 hi = *reinterpret_cast<const uint4*>(ws + (local_row + 8 * h) * 32 + 16);
      wt[h][0] = __byte_perm(__byte_perm(lo.x, lo.y, sel), __byte_perm(lo.z, lo.w, sel), 0x5410);
      wt[h][1] = __byte_perm(__byte_perm(hi.x, hi.y, sel), __byte_perm(hi.z, hi.w, sel), 0x5410);
    }
    const float sc0 = sc[local_row];
    const float sc1 = sc[local_row + 8];
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
  };
  // Group w of local stage s's products from A fragments `a`, committed as one wgmma group:
  // token chunk c is 64 rows (8 KB) into the x buffer, step j 32 bytes into each row.
  auto issue = [&](uint32_t (&a)[4][4], int s, int w) {
    const unsigned char* xw = x_buf(s, w);
    wgmma_fence();
#pragma unroll
    for (int j = 0; j < 4; ++j) {
#pragma unroll
      for (int c = 0; c < NB; ++c) wgmma_n64(acc[c], a[j], smem_desc(xw + c * 64 * 128 + j * 32), T{});
    }
    wgmma_commit();
  };
  auto pin_a = [&](uint32_t (&a)[4][4]) {
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int i = 0; i < 4; ++i) pin(a[j][i]);
  };

  // See Note: decode overlapped with the products.
  uint32_t a0[4][4], a1[4][4];
  if (n > 0) {
    mbar_wait(s_bar, 0);
    decode(a0, 0, 0);
  }
  for (int s = 0; s < n; ++s) {
    static_assert(kStageGroups == 2, "the loop body handles the two groups of a stage");
    issue(a0, s, 0);
    wgmma_wait<1>();  // the previous stage's second group is done: a1 is free
    pin_a(a1);
    decode(a1, s, 1);
    issue(a1, s, 1);
    if (s + 1 < n) {
      wgmma_wait<1>();  // this stage's first group is done: a0 is free, and no product reads stage s - 1
      pin_a(a0);
      __syncthreads();  // ... in either warpgroup, and stage s's weight bytes are decoded
      if (tid == 0 && s + Cfg::kStages - 1 < n) issue_stage(s + Cfg::kStages - 1);  // into stage s - 1's buffer
      if ((s + 2) % kChunkStages == 0) {
        // Chunk c starts at stage s + 2: its scales are read after the next barrier. The slot held
        // chunk c - 2, done with long ago.
        const int c = (s + 2) / kChunkStages;
        store_scales(c);
        load_scales(c + 1);
      }
      mbar_wait(s_bar + (s + 1) % Cfg::kStages, static_cast<uint32_t>(((s + 1) / Cfg::kStages) & 1));
      decode(a0, s + 1, 0);
    }
  }
  wgmma_wait<0>();
  pin_a(a0);
  pin_a(a1);
#pragma unroll
  for (int c = 0; c < NB; ++c)
#pragma unroll
    for (int i = 0; i < 32; ++i) pin(acc[c][i]);

  // Accumulators of m64nNk16 per warp: element 4i + 2h + e of lane (g, t) is row g + 8h, token
  // 8i + 2t + e of the n64 chunk c. A float4 of them (4i .. 4i + 3) is rows `row`, row + 8 by
  // tokens `token`, token + 1: stored (+ bias) where inside M x N.
  auto store_quad = [&](int64_t row, int64_t token, float4 v) {
    const float vals[2][2] = {{v.x, v.y}, {v.z, v.w}};
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t feature = row + 8 * h;
      if (feature >= N) continue;
      const float b = bias != nullptr ? Mma<T>::to_float(bias[feature]) : 0.0f;
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        if (token + e < M) y[(token + e) * N + feature] = Mma<T>::from_float(vals[h][e] + b);
      }
    }
  };
  if (split == 1) {
#pragma unroll
    for (int c = 0; c < NB; ++c)
#pragma unroll
      for (int i = 0; i < 8; ++i)
        store_quad(rbase + local_row, tok0 + 64 * c + 8 * i + 2 * t,
                   make_float4(acc[c][4 * i], acc[c][4 * i + 1], acc[c][4 * i + 2], acc[c][4 * i + 3]));
    return;
  }

  // See Note: split K across a cluster. Float4 u of the partial tile is (c, i) = u / kThreads of
  // thread u % kThreads: acc[c][4i .. 4i + 3].
  namespace cg = cooperative_groups;
  cg::cluster_group cluster = cg::this_cluster();
  __syncthreads();  // every product of this CTA has completed: the stage buffers are free
  float4* part = reinterpret_cast<float4*>(smem);
#pragma unroll
  for (int c = 0; c < NB; ++c)
#pragma unroll
    for (int i = 0; i < 8; ++i)
      part[(c * 8 + i) * kThreads + tid] = make_float4(acc[c][4 * i], acc[c][4 * i + 1], acc[c][4 * i + 2], acc[c][4 * i + 3]);
  cluster.sync();
  constexpr int kUnits = NB * 8 * kThreads;
  const int rank = static_cast<int>(cluster.block_rank());
  const int u_beg = kUnits * rank / split;
  const int u_end = kUnits * (rank + 1) / split;
  for (int u = u_beg + tid; u < u_end; u += kThreads) {
    float4 v[kMaxSplit];  // all remote loads first, then the sum in rank order
#pragma unroll
    for (int r = 0; r < kMaxSplit; ++r) {
      if (r < split) v[r] = cluster.map_shared_rank(part, r)[u];
    }
    float4 sum = v[0];
#pragma unroll
    for (int r = 1; r < kMaxSplit; ++r) {
      if (r < split) {
        sum.x += v[r].x;
        sum.y += v[r].y;
        sum.z += v[r].z;
        sum.w += v[r].w;
      }
    }
    const int owner = u % kThreads;
    const int c = u / kThreads / 8;
    const int i = u / kThreads % 8;
    const int ol = owner & 31;
    store_quad(rbase + (owner >> 7) * 64 + ((owner >> 5) & 3) * 16 + (ol >> 2), tok0 + 64 * c + 8 * i + 2 * (ol & 3),
               sum);
  }
  cluster.sync();  // the other CTAs have read this one's partial tile
#else
  __trap();  // not built for this GPU: the launcher refuses before launching
#endif
}

// cuTensorMapEncodeTiled from the driver, through the runtime (no link against libcuda).
using EncodeTiled = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                                 const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                                 CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

EncodeTiled encoder() {
  static std::atomic<EncodeTiled> fn{nullptr};
  EncodeTiled f = fn.load();
  if (f == nullptr) {
    void* p = nullptr;
    cudaDriverEntryPointQueryResult q{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000, cudaEnableDefault, &q) != cudaSuccess ||
        q != cudaDriverEntryPointSuccess) {
      cudaGetLastError();
      return nullptr;
    }
    f = reinterpret_cast<EncodeTiled>(p);
    fn.store(f);
  }
  return f;
}

// A row-major [rows, cols] tensor of `elem`-byte elements read in boxes of box_cols x box_rows.
bool encode_2d(CUtensorMap* map, CUtensorMapDataType type, int elem, const void* base, int64_t rows, int64_t cols,
               int box_cols, int box_rows, CUtensorMapSwizzle swizzle) {
  const EncodeTiled f = encoder();
  if (f == nullptr) return false;
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(cols), static_cast<cuuint64_t>(rows)};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(cols) * elem};
  const cuuint32_t box[2] = {static_cast<cuuint32_t>(box_cols), static_cast<cuuint32_t>(box_rows)};
  const cuuint32_t elem_strides[2] = {1, 1};
  return f(map, type, 2, const_cast<void*>(base), dims, strides, box, elem_strides, CU_TENSOR_MAP_INTERLEAVE_NONE,
           swizzle, CU_TENSOR_MAP_L2_PROMOTION_L2_128B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

template <typename T, int NB>
Status launch_wg(const void* x, int64_t M, int64_t N, int64_t K, const uint8_t* packed, int log2_bs,
                 const void* absmax, bool nested, const float* nested_absmax, const float* nested_code,
                 const float* offset, int log2_nested_bs, const void* bias, void* y, const DecodeTable& table,
                 int split, cudaStream_t stream) {
  using Cfg = WgTile<NB>;
  const int64_t grid_x = (M + Cfg::kTokens - 1) / Cfg::kTokens;
  const int64_t grid_y = (N + kRows - 1) / kRows;
  // TMA coordinates are 32-bit; its global addresses 16-byte aligned.
  if (M > 0x7fffffff || grid_x > 0x7fffffff || grid_y > 65535) return kBadSize;
  if (reinterpret_cast<uintptr_t>(packed) % 16 != 0) return kMisaligned;
  CUtensorMap x_map, w_map;
  const CUtensorMapDataType xtype =
      std::is_same<T, __half>::value ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16 : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16;
  if (!encode_2d(&x_map, xtype, 2, x, M, K, kGroup, Cfg::kTokens, CU_TENSOR_MAP_SWIZZLE_128B) ||
      !encode_2d(&w_map, CU_TENSOR_MAP_DATA_TYPE_UINT8, 1, packed, N, K / 2, kGroup / 2, kRows,
                 CU_TENSOR_MAP_SWIZZLE_NONE)) {
    return kLaunchFailed;
  }
  auto kernel = nested ? wgmma_kernel<T, NB, true> : wgmma_kernel<T, NB, false>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::kSmem);
  if (err == cudaSuccess) {
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(static_cast<unsigned>(grid_x), static_cast<unsigned>(grid_y), static_cast<unsigned>(split));
    cfg.blockDim = dim3(kThreads);
    cfg.dynamicSmemBytes = Cfg::kSmem;
    cfg.stream = stream;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = 1;
    attr[0].val.clusterDim.y = 1;
    attr[0].val.clusterDim.z = static_cast<unsigned>(split);
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    err = cudaLaunchKernelEx(&cfg, kernel, x_map, w_map, M, N, K, absmax, nested_absmax, nested_code, offset,
                             log2_bs, log2_nested_bs, static_cast<const T*>(bias), static_cast<T*>(y), table);
  }
  if (err != cudaSuccess) {
    last_cuda_error() = err;
    cudaGetLastError();
    return kLaunchFailed;
  }
  return check_launch();
}

template <typename T>
Status launch_wg_typed(int token_chunks, int k_split, const void* x, int64_t M, int64_t N, int64_t K,
                       const uint8_t* packed, int log2_bs, const void* absmax, bool nested,
                       const float* nested_absmax, const float* nested_code, const float* offset,
                       int log2_nested_bs, const void* bias, void* y, const DecodeTable& table,
                       cudaStream_t stream) {
  if (k_split != 1 && k_split != 2 && k_split != kMaxSplit) return kBadSize;
  if (token_chunks == 1)
    return launch_wg<T, 1>(x, M, N, K, packed, log2_bs, absmax, nested, nested_absmax, nested_code, offset,
                           log2_nested_bs, bias, y, table, k_split, stream);
  if (token_chunks == 2)
    return launch_wg<T, 2>(x, M, N, K, packed, log2_bs, absmax, nested, nested_absmax, nested_code, offset,
                           log2_nested_bs, bias, y, table, k_split, stream);
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
  if (cudaFuncGetAttributes(&attr, wgmma_kernel<__nv_bfloat16, 1, false>) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  return attr.binaryVersion == 90;
}

Status launch_matmul_wgmma(const QuantWeight& w, const void* x, int dtype, int64_t M, const void* bias, void* y,
                           int token_chunks, int k_split, int device, cudaStream_t stream) {
  int log2_bs = 0, log2_nested_bs = 0;
  if (const Status s = check_matmul_args(w, x, dtype, M, y, &log2_bs, &log2_nested_bs); s != kOk) return s;
  if (!wgmma_available(device)) return kUnsupportedDevice;
  if (const Status s = use_device(device); s != kOk) return s;
  const int64_t N = w.rows, K = w.cols;
  if (dtype == kFloat16) {
    return launch_wg_typed<__half>(token_chunks, k_split, x, M, N, K, w.packed, log2_bs, w.absmax, w.nested,
                                   w.nested_absmax, w.nested_code, w.offset, log2_nested_bs, bias, y, w.table,
                                   stream);
  }
  return launch_wg_typed<__nv_bfloat16>(token_chunks, k_split, x, M, N, K, w.packed, log2_bs, w.absmax, w.nested,
                                        w.nested_absmax, w.nested_code, w.offset, log2_nested_bs, bias, y, w.table,
                                        stream);
}

}  // namespace nf4
