// Fused 4-bit matmul for mid-size batches (tens to hundreds of tokens): y[M, N] = x[M, K] @
// dequant(W)[N, K]^T (+ bias), W in bitsandbytes' packed layout, x fp16/bf16, fp32 accumulation on
// tensor cores (mma.sync m16n8k16). matmul.cu covers a few tokens; this kernel shares x between
// warps through shared memory, so each decoded weight serves 64 or 128 tokens.
//
// Note: the tile.
//     A CTA has 8 warps: WM along output rows and WK along K (WM * WK = 8). A warp owns R m16
//     row tiles and NT n8 token tiles, all of the CTA's 8 * NT tokens. Per stage the CTA stages
//     WK consecutive 64-wide groups of x for its tokens in shared memory (cp.async, three stages
//     in flight, two where they would not fit); warp (wm, wk) takes group wk of the stage. Each
//     decoded weight fragment feeds NT products and each x fragment R, so shared-memory traffic
//     per product is 1/R (x) + 2/NT (weights) 128-byte wavefronts. Warps along K add their
//     partial sums through shared memory at the end. Consecutive CTAs cover the token tiles of
//     one row tile, so a weight row read by several of them comes from L2 after the first.
//
// Note: the k permutation (as in matmul.cu).
//     Within a group, lane t of a quad owns k [16t, 16t + 16): 8 packed bytes per weight row, and
//     16 consecutive x values. x rows are staged unpermuted; a lane's two 16-byte loads per token
//     hold its four mma steps' B fragments. Rows of the staged tile are padded by 16 bytes, so
//     the 8 lanes of each 16-byte load phase hit 8 distinct 16-byte bank groups.
//
// Note: exact dequantization.
//     The decode table holds fp32 level pairs (8 bytes per packed byte, one copy per 16 lanes so
//     that each half-warp's 8-byte loads are conflict-free: 32 KB). Each weight is level * absmax
//     in fp32 rounded once to the input type: the reference's dequantized weight, bit for bit, so
//     the only differences from x @ dequantize(W).T are the order of the fp32 sums.
#include "common.cuh"
#include "mma.cuh"

namespace nf4 {
namespace {

constexpr int kGroup = 64;
constexpr int kWarps = 8;
constexpr int kThreads = 32 * kWarps;
constexpr int kLutBytes = kF32LutBytes;
constexpr int kCodeBytes = 256 * 4;              // the nested code table
constexpr int kSmemBudget = 160 * 1024;          // under every supported GPU's opt-in limit (A100: 163 KB)

template <int R, int NT, int WK>
struct Tile {
  static constexpr int kWM = kWarps / WK;
  static constexpr int kRows = kWM * 16 * R;            // output rows per CTA
  static constexpr int kTokens = 8 * NT;                // tokens per CTA
  static constexpr int kStageK = WK * kGroup;           // k per stage
  static constexpr int kRowBytes = kStageK * 2 + 16;    // padded, see Note: the k permutation
  static constexpr int kStageBytes = kTokens * kRowBytes;
  static constexpr int kStages = kLutBytes + kCodeBytes + 3 * kStageBytes <= kSmemBudget ? 3 : 2;
  static constexpr int kSmem = kLutBytes + kCodeBytes + kStages * kStageBytes;
  static constexpr int kReduceFloats = (kWarps - kWM) * R * NT * 128;  // partial sums of warps wk > 0
  static constexpr bool kFits = kSmem <= kSmemBudget;  // (2, 16, 4) does not: not built
  static_assert(kWM * WK == kWarps, "WK must divide the warp count");
  static_assert(kReduceFloats * 4 <= kSmem, "reduction does not fit in the freed shared memory");
};

template <typename T, int R, int NT, int WK, bool kNested>
__global__ void __launch_bounds__(kThreads) tiled_kernel(
    const T* __restrict__ x, int64_t M, int64_t N, int64_t K, const uint8_t* __restrict__ packed,
    const void* __restrict__ absmax_raw, const float* __restrict__ nested_absmax,
    const float* __restrict__ nested_code, const float* __restrict__ offset, int log2_bs,
    int log2_nested_bs, const T* __restrict__ bias, T* __restrict__ y, DecodeTable table) {
  using Cfg = Tile<R, NT, WK>;
  extern __shared__ __align__(16) unsigned char smem[];
  unsigned char* s_lut = smem;
  float* s_code = reinterpret_cast<float*>(smem + kLutBytes);
  unsigned char* s_x = smem + kLutBytes + kCodeBytes;

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int wm = warp % Cfg::kWM;
  const int wk = warp / Cfg::kWM;
  const int g = lane >> 2;
  const int t = lane & 3;
  const uint32_t col = static_cast<uint32_t>(lane & 15) * 8;
  const int64_t tok0 = static_cast<int64_t>(blockIdx.x) * Cfg::kTokens;
  const int64_t row0 = static_cast<int64_t>(blockIdx.y) * Cfg::kRows + wm * 16 * R;
  const int groups = static_cast<int>(K / kGroup);  // the launcher keeps N * K / 64 < 2^31
  const int stages = (groups + WK - 1) / WK;
  const int group_shift = log2_bs - 6;  // 2^group_shift groups per absmax block
  const int blocks_per_row = static_cast<int>(K >> log2_bs);
  const float mean = kNested ? *offset : 0.0f;

  // Rows past N are clamped to N - 1 (loads stay in bounds; their outputs are not stored).
  const uint8_t* wp[R][2];
#pragma unroll
  for (int r = 0; r < R; ++r) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      int64_t row = row0 + 16 * r + 8 * h + g;
      row = row < N ? row : N - 1;
      wp[r][h] = packed + row * (K / 2) + wk * (kGroup / 2) + 8 * t;
    }
  }
  // Block scales by quad (see matmul.cu): the quad needs 2R per group, (row tile, half) pair
  // p = 2r + h; lane t computes pairs t, t + 4, ...
  constexpr int kPairs = 2 * R;
  constexpr int kMine = (kPairs + 3) / 4;
  int my_brow[kMine];
  bool my_ok[kMine];
#pragma unroll
  for (int k = 0; k < kMine; ++k) {
    const int p = t + 4 * k;
    my_ok[k] = p < kPairs;
    int64_t row = row0 + 16 * (p >> 1) + 8 * (p & 1) + g;
    row = row < N ? row : N - 1;
    my_brow[k] = static_cast<int>(row) * blocks_per_row;
  }

  uint2 w_next[R][2];
  uint32_t q_next[kMine];
  float nabs_next[kMine];
  auto load_weights = [&](int s) {
    const int gi = s * WK + wk;
    const bool in = gi < groups;  // warp-uniform
#pragma unroll
    for (int r = 0; r < R; ++r) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        w_next[r][h] = in ? load_weight(wp[r][h]) : make_uint2(0, 0);
        wp[r][h] += WK * (kGroup / 2);
      }
    }
#pragma unroll
    for (int k = 0; k < kMine; ++k) {
      q_next[k] = 0;
      nabs_next[k] = 0.0f;
      if (my_ok[k] && in) {
        const int blk = my_brow[k] + (gi >> group_shift);
        if constexpr (kNested) {
          q_next[k] = __ldg(static_cast<const uint8_t*>(absmax_raw) + blk);
          nabs_next[k] = __ldg(nested_absmax + (blk >> log2_nested_bs));
        } else {
          q_next[k] = __float_as_uint(__ldg(static_cast<const float*>(absmax_raw) + blk));
        }
      }
    }
  };
  // x for stage s into buffer b: tokens past M and groups past K are zero-filled.
  auto load_x = [&](int s, int b) {
    unsigned char* dst = s_x + b * Cfg::kStageBytes;
    const int64_t k0 = static_cast<int64_t>(s) * Cfg::kStageK;
    constexpr int kChunks = Cfg::kStageK / 8;  // 16-byte chunks per token row
#pragma unroll
    for (int idx = tid; idx < Cfg::kTokens * kChunks; idx += kThreads) {
      const int row = idx / kChunks;
      const int c = idx % kChunks;
      const int64_t tok = tok0 + row;
      const int64_t k = k0 + 8 * c;
      const bool ok = tok < M && k < K;
      cp_async16(dst + row * Cfg::kRowBytes + 16 * c, ok ? x + tok * K + k : x, ok);
    }
  };

#pragma unroll
  for (int s = 0; s < Cfg::kStages - 1; ++s) {
    if (s < stages) load_x(s, s);
    cp_async_commit();
  }
  load_weights(0);

  fill_f32_table(s_lut, table, tid, kThreads);
  if constexpr (kNested) {
    for (int i = tid; i < 256; i += kThreads) s_code[i] = nested_code[i];
  }

  float acc[R][NT][4] = {};

  for (int s = 0; s < stages; ++s) {
    cp_async_wait<Cfg::kStages - 2>();  // stage s has landed (for this thread's copies) ...
    __syncthreads();                    // ... and everyone's; buffer (s - 1) % kStages is free
    {
      const int next = s + Cfg::kStages - 1;
      if (next < stages) load_x(next, next % Cfg::kStages);
      cp_async_commit();  // (an empty group at the tail keeps the wait count uniform)
    }
    uint2 w[R][2];
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int h = 0; h < 2; ++h) w[r][h] = w_next[r][h];
    float mine[kMine];
#pragma unroll
    for (int k = 0; k < kMine; ++k) {
      if constexpr (kNested) {
        mine[k] = nested_scale(s_code[q_next[k]], nabs_next[k], mean);
      } else {
        mine[k] = __uint_as_float(q_next[k]);
      }
    }
    if (s + 1 < stages) load_weights(s + 1);
    if (s * WK + wk >= groups) continue;  // warp-uniform: the last stage may be partial

    float sc[R][2];
#pragma unroll
    for (int p = 0; p < kPairs; ++p) {
      sc[p >> 1][p & 1] = __shfl_sync(0xffffffffu, mine[p / 4], (lane & ~3) | (p % 4));
    }
    const unsigned char* xs =
        s_x + (s % Cfg::kStages) * Cfg::kStageBytes + g * Cfg::kRowBytes + wk * (kGroup * 2) + 32 * t;
#pragma unroll
    for (int jj = 0; jj < 2; ++jj) {
      uint4 xv[NT];
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        xv[nt] = *reinterpret_cast<const uint4*>(xs + nt * 8 * Cfg::kRowBytes + 16 * jj);
      }
#pragma unroll
      for (int jh = 0; jh < 2; ++jh) {
        // Mma step j = 2 jj + jh uses bytes 2j and 2j + 1 of each row's 8 (word jj).
#pragma unroll
        for (int r = 0; r < R; ++r) {
          const uint32_t w0 = jj == 0 ? w[r][0].x : w[r][0].y;
          const uint32_t w1 = jj == 0 ? w[r][1].x : w[r][1].y;
          uint32_t a[4];
          if (jh == 0) {
            a[0] = scaled_byte<T, 0>(s_lut, w0, col, sc[r][0]);
            a[1] = scaled_byte<T, 0>(s_lut, w1, col, sc[r][1]);
            a[2] = scaled_byte<T, 1>(s_lut, w0, col, sc[r][0]);
            a[3] = scaled_byte<T, 1>(s_lut, w1, col, sc[r][1]);
          } else {
            a[0] = scaled_byte<T, 2>(s_lut, w0, col, sc[r][0]);
            a[1] = scaled_byte<T, 2>(s_lut, w1, col, sc[r][1]);
            a[2] = scaled_byte<T, 3>(s_lut, w0, col, sc[r][0]);
            a[3] = scaled_byte<T, 3>(s_lut, w1, col, sc[r][1]);
          }
#pragma unroll
          for (int nt = 0; nt < NT; ++nt) {
            const uint32_t b0 = jh == 0 ? xv[nt].x : xv[nt].z;
            const uint32_t b1 = jh == 0 ? xv[nt].y : xv[nt].w;
            Mma<T>::mma(acc[r][nt], a, b0, b1);
          }
        }
      }
    }
  }
  cp_async_wait<0>();
  __syncthreads();  // every warp is done with the table and the staged x: reuse them

  if constexpr (WK > 1) {
    float* red = reinterpret_cast<float*>(smem);
    constexpr int kWarpFloats = R * NT * 128;
    if (wk > 0) {
      float* dst = red + ((wk - 1) * Cfg::kWM + wm) * kWarpFloats;
#pragma unroll
      for (int r = 0; r < R; ++r)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
          *reinterpret_cast<float4*>(dst + ((r * NT + nt) * 32 + lane) * 4) =
              make_float4(acc[r][nt][0], acc[r][nt][1], acc[r][nt][2], acc[r][nt][3]);
    }
    __syncthreads();
    if (wk > 0) return;
#pragma unroll
    for (int o = 1; o < WK; ++o) {
      const float* src = red + ((o - 1) * Cfg::kWM + wm) * kWarpFloats;
#pragma unroll
      for (int r = 0; r < R; ++r)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          const float4 v = *reinterpret_cast<const float4*>(src + ((r * NT + nt) * 32 + lane) * 4);
          acc[r][nt][0] += v.x;
          acc[r][nt][1] += v.y;
          acc[r][nt][2] += v.z;
          acc[r][nt][3] += v.w;
        }
    }
  }

  // Accumulator layout of m16n8: element i of lane (g, t) is row g + 8 (i / 2), token 2t + i % 2.
#pragma unroll
  for (int r = 0; r < R; ++r) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t feature = row0 + 16 * r + 8 * h + g;
      if (feature >= N) continue;
      const float b = bias != nullptr ? Mma<T>::to_float(bias[feature]) : 0.0f;
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int64_t token = tok0 + 8 * nt + 2 * t + e;
          if (token < M) y[token * N + feature] = Mma<T>::from_float(acc[r][nt][2 * h + e] + b);
        }
      }
    }
  }
}

template <typename T, int R, int NT, int WK>
Status launch_tile(const void* x, int64_t M, int64_t N, int64_t K, const uint8_t* packed, int log2_bs,
                   const void* absmax, bool nested, const float* nested_absmax, const float* nested_code,
                   const float* offset, int log2_nested_bs, const void* bias, void* y,
                   const DecodeTable& table, cudaStream_t stream) {
  using Cfg = Tile<R, NT, WK>;
  if constexpr (!Cfg::kFits) {
    return kBadSize;
  } else {
  const int64_t grid_x = (M + Cfg::kTokens - 1) / Cfg::kTokens;
  const int64_t grid_y = (N + Cfg::kRows - 1) / Cfg::kRows;
  if (grid_x > 0x7fffffff || grid_y > 65535) return kBadSize;
  auto kernel = nested ? tiled_kernel<T, R, NT, WK, true> : tiled_kernel<T, R, NT, WK, false>;
  // Above 48 KB of dynamic shared memory a kernel must opt in (per device; cheap to repeat).
  const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::kSmem);
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
}

// The built tiles: (R, NT) in {(2, 8), (4, 8), (2, 16)} times WK in {1, 2, 4}, less (2, 16, 4)
// (over the shared-memory budget).
template <typename T, int R, int NT>
Status launch_wk(int wk, const void* x, int64_t M, int64_t N, int64_t K, const uint8_t* packed, int log2_bs,
                 const void* absmax, bool nested, const float* nested_absmax, const float* nested_code,
                 const float* offset, int log2_nested_bs, const void* bias, void* y, const DecodeTable& table,
                 cudaStream_t stream) {
  switch (wk) {
    case 1: return launch_tile<T, R, NT, 1>(x, M, N, K, packed, log2_bs, absmax, nested, nested_absmax, nested_code, offset, log2_nested_bs, bias, y, table, stream);
    case 2: return launch_tile<T, R, NT, 2>(x, M, N, K, packed, log2_bs, absmax, nested, nested_absmax, nested_code, offset, log2_nested_bs, bias, y, table, stream);
    case 4: return launch_tile<T, R, NT, 4>(x, M, N, K, packed, log2_bs, absmax, nested, nested_absmax, nested_code, offset, log2_nested_bs, bias, y, table, stream);
    default: return kBadSize;
  }
}

template <typename T>
Status launch_typed(int row_tiles, int token_tiles, int wk, const void* x, int64_t M, int64_t N, int64_t K,
                    const uint8_t* packed, int log2_bs, const void* absmax, bool nested,
                    const float* nested_absmax, const float* nested_code, const float* offset,
                    int log2_nested_bs, const void* bias, void* y, const DecodeTable& table,
                    cudaStream_t stream) {
  if (row_tiles == 2 && token_tiles == 8) return launch_wk<T, 2, 8>(wk, x, M, N, K, packed, log2_bs, absmax, nested, nested_absmax, nested_code, offset, log2_nested_bs, bias, y, table, stream);
  if (row_tiles == 4 && token_tiles == 8) return launch_wk<T, 4, 8>(wk, x, M, N, K, packed, log2_bs, absmax, nested, nested_absmax, nested_code, offset, log2_nested_bs, bias, y, table, stream);
  if (row_tiles == 2 && token_tiles == 16) return launch_wk<T, 2, 16>(wk, x, M, N, K, packed, log2_bs, absmax, nested, nested_absmax, nested_code, offset, log2_nested_bs, bias, y, table, stream);
  return kBadSize;
}

}  // namespace

Status launch_matmul_tiled(const QuantWeight& w, const void* x, int dtype, int64_t M, const void* bias, void* y,
                           int row_tiles, int token_tiles, int k_warps, int device, cudaStream_t stream) {
  int log2_bs = 0, log2_nested_bs = 0;
  if (const Status s = check_matmul_args(w, x, dtype, M, y, &log2_bs, &log2_nested_bs); s != kOk) return s;
  if (const Status s = use_device(device); s != kOk) return s;
  const int64_t N = w.rows, K = w.cols;
  if (dtype == kFloat16) {
    return launch_typed<__half>(row_tiles, token_tiles, k_warps, x, M, N, K, w.packed, log2_bs, w.absmax, w.nested,
                                w.nested_absmax, w.nested_code, w.offset, log2_nested_bs, bias, y, w.table, stream);
  }
  return launch_typed<__nv_bfloat16>(row_tiles, token_tiles, k_warps, x, M, N, K, w.packed, log2_bs, w.absmax,
                                     w.nested, w.nested_absmax, w.nested_code, w.offset, log2_nested_bs, bias, y,
                                     w.table, stream);
}

}  // namespace nf4
