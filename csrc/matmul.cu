// Fused 4-bit matmul for few tokens: y[M, N] = x[M, K] @ dequant(W)[N, K]^T (+ bias), with W in
// bitsandbytes' packed layout (row-major [N, K], two codes per byte, first in the high nibble)
// read once from memory and decoded in registers, x fp16/bf16, fp32 accumulation on tensor cores.
//
// Note: why tensor cores at one token.
//     At 1-32 tokens the cost is reading 0.5 byte per weight, and the limit is how many
//     instructions the SMs spend per weight to keep up with HBM (the Triton GEMV spends ~11).
//     mma.sync.m16n8k16 multiplies a 16x16 weight tile by 8 tokens in one warp instruction, so
//     the multiply is nearly free even when 7 of the 8 token columns are padding; what remains
//     per pair of weights is one byte extract and one shared-memory lookup that yields both
//     decoded values as the packed 16-bit pair the mma takes (below).
//
// Note: the k permutation.
//     A reduction over k may visit k in any order, as long as x and W use the same one. Within a
//     64-wide group, lane t of a quad (t = lane % 4) owns the 16 consecutive k [16t, 16t + 16): 8
//     packed bytes per row, one 8-byte load. For mma step j (0..3) the fragment slots that PTX
//     calls k = 2t, 2t+1 hold k = 16t + 4j + {0, 1} and the slots k = 2t+8, 2t+9 hold
//     16t + 4j + {2, 3}: byte 2j and byte 2j+1 of the lane's 8 bytes for W, and four consecutive
//     x values (8 bytes of the lane's two 16-byte loads) for x. No shuffles, no shared memory.
//
// Note: one scale per group.
//     A group of 64 k lies inside one absmax block (blocksize >= 64 dividing K), so its four mma
//     steps accumulate sum(level * x) in a zeroed fragment, and one fp32 FMA per output applies
//     the block's absmax. The levels enter the mma rounded to the input type (the reference rounds
//     level * absmax instead): both are one rounding of a 16-bit value per weight; the tests bound
//     the difference against an fp32 product.
//
// Note: block scales by quad.
//     The four lanes of a quad hold the same rows, so a scale computed by every lane would be
//     computed four times (two loads, a lookup and two roundings each). Instead each lane computes
//     a quarter of the chunk's scales and takes the others from its quad-mates with __shfl_sync.
//
// Note: two chunk buffers.
//     A warp walks its groups in chunks of U. Everything a chunk needs from memory (weight bytes,
//     block-scale inputs and x) is loaded into one of two register buffers while the other
//     buffer's chunk computes; the loop body handles two chunks, so the buffers swap roles
//     without copies. (With one buffer copied into a working set each trip, nvcc placed the
//     copy after the next chunk's loads: ncu on the H100 showed 30% of all stall samples on that
//     copy waiting for the load just issued, and x loaded in the compute step was the top stall
//     at one token.) x in the buffers costs registers, so the kernel allows at most 8 warps
//     (its launch bound) and takes 2 groups per chunk, or 1 with more rows or tokens; 4 for one
//     token tile of 16 rows when each warp holds 32 groups or more (default_chunk). With 16
//     tokens per CTA, x is loaded when its chunk computes instead (kXInChunk): there the H100
//     sweep had it faster on three of the four Llama shapes (101 against 111 us on 28672x8192),
//     while with 8 and 32 tokens x in the buffers was faster on all four.
//
// Decode table: entry b (a packed byte) holds levels[b >> 4] (low half: the lower k) and
// levels[b & 15] (high half) converted to T; 256 entries, copied 32 times so that lane l always
// reads bank l (conflict-free lookups): 32 KB of shared memory, reused for the cross-warp
// reduction at the end.
//
// Work split: a CTA owns 16 * R output rows; its warps split K (group ranges) and reduce through
// shared memory; grid.y covers tokens in tiles of 8 * NT.
#include "common.cuh"
#include "mma.cuh"

namespace nf4 {
namespace {

constexpr int kGroup = 64;        // k per group: four m16n8k16 steps, one absmax
constexpr int kLut = 256 * 32;    // decode table entries (256 bytes x 32 bank copies)
constexpr int kMaxThreads = 256;

// Decoded pair for byte I (0..3) of `word`: the table row is the byte * 128 bytes, OR-ed with the
// lane's bank column (lane * 4 < 128, so OR is addition): one shift, one LOP3, one LDS.
template <int I>
__device__ __forceinline__ uint32_t decode(const uint32_t* s_lut, uint32_t word, uint32_t lane4) {
  const uint32_t row = (I == 0 ? (word << 7) : (word >> (8 * I - 7))) & 0x7F80u;
  return *reinterpret_cast<const uint32_t*>(reinterpret_cast<const char*>(s_lut) + (row | lane4));
}

// Groups per chunk (see Note: two chunk buffers): fewer when more tokens or rows take registers.
// One token tile of one row tile also comes with 4 (kLongChunk), for warps with long K ranges.
constexpr int default_chunk(int nt, int r) { return nt <= 2 && r == 1 ? 2 : 1; }
constexpr int kLongChunk = 4;
constexpr int kLongChunkMinGroups = 32;  // groups per warp from which it is used

template <typename T, int NT, int R, int U, bool kNested>
__global__ void __launch_bounds__(kMaxThreads) matmul_kernel(
    const T* __restrict__ x, int64_t M, int64_t N, int64_t K, const uint8_t* __restrict__ packed,
    const void* __restrict__ absmax_raw, const float* __restrict__ nested_absmax,
    const float* __restrict__ nested_code, const float* __restrict__ offset, int log2_bs,
    int log2_nested_bs, const T* __restrict__ bias, T* __restrict__ y, DecodeTable table) {
  __shared__ __align__(16) uint32_t s_lut[kLut];
  __shared__ float s_code[256];
  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int warps = blockDim.x >> 5;

  const int g = lane >> 2;  // row within an 8-row half of the m16 tile; token within an n8 tile
  const int t = lane & 3;
  const uint32_t lane4 = static_cast<uint32_t>(lane) * 4;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * (16 * R);
  const int64_t tok0 = static_cast<int64_t>(blockIdx.y) * (8 * NT);
  const int groups = static_cast<int>(K / kGroup);  // the launcher keeps N * K / 64 < 2^31
  const int gbeg = static_cast<int>(static_cast<int64_t>(groups) * warp / warps);
  const int gend = static_cast<int>(static_cast<int64_t>(groups) * (warp + 1) / warps);
  const int group_shift = log2_bs - 6;  // 2^group_shift groups per absmax block
  const int blocks_per_row = static_cast<int>(K >> log2_bs);
  const float mean = kNested ? *offset : 0.0f;

  constexpr bool kXInChunk = NT != 2;  // x loaded with the chunk, or when it computes (Note)
  constexpr int kPairs = 2 * R;                  // (row tile, half) pairs of a lane
  constexpr int kScales = U * kPairs;            // block scales a quad needs per chunk
  constexpr int kMine = (kScales + 3) / 4;       // ... of which each lane computes this many

  // Rows past N are clamped to N - 1: their loads stay in bounds and their outputs are never
  // stored, so no load needs a row predicate.
  const uint8_t* wp[R][2];
  int brow[kPairs];  // absmax block index of the pair's row at group 0
#pragma unroll
  for (int r = 0; r < R; ++r) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      int64_t row = row0 + 16 * r + 8 * h + g;
      row = row < N ? row : N - 1;
      wp[r][h] = packed + row * (K / 2) + static_cast<int64_t>(gbeg) * (kGroup / 2) + 8 * t;
      brow[2 * r + h] = static_cast<int>(row) * blocks_per_row;
    }
  }
  // See Note: block scales by quad. Scale s = pair * U + u of a chunk is computed by lane s % 4
  // of the quad (its k-th = s / 4): this lane computes u = t % U for pairs t / U + (4 / U) k.
  const int my_u = t % U;
  int my_brow[kMine];
  bool my_ok[kMine];
#pragma unroll
  for (int k = 0; k < kMine; ++k) {
    const int pair = t / U + (4 / U) * k;
    my_ok[k] = pair < kPairs;
    my_brow[k] = 0;
#pragma unroll
    for (int p = 0; p < kPairs; ++p) my_brow[k] = pair == p ? brow[p] : my_brow[k];
  }
  const T* xp[NT];
  bool tok_ok[NT];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    const int64_t tok = tok0 + 8 * nt + g;
    tok_ok[nt] = tok < M;
    xp[nt] = x + (tok_ok[nt] ? tok : 0) * K + static_cast<int64_t>(gbeg) * kGroup + 16 * t;
  }

  // x of chunk c: 16 consecutive values per lane, token and group; zero for padding tokens and
  // for groups past this warp's range.
  auto load_x = [&](uint4 (&dst)[U][NT][2], int c) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const bool in = c + u < gend;  // warp-uniform
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        if (in && tok_ok[nt]) {
          const uint4* p = reinterpret_cast<const uint4*>(xp[nt] + u * kGroup);
          dst[u][nt][0] = __ldg(p);
          dst[u][nt][1] = __ldg(p + 1);
        } else {
          dst[u][nt][0] = make_uint4(0, 0, 0, 0);
          dst[u][nt][1] = make_uint4(0, 0, 0, 0);
        }
      }
    }
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) xp[nt] += U * kGroup;
  };

  // See Note: two chunk buffers. A chunk's inputs: weight bytes, block-scale inputs and (with
  // kXInChunk) x.
  struct Chunk {
    uint2 w[U][R][2];
    uint32_t q[kMine];  // nested: absmax code; else the float32 absmax's bits
    float nabs[kMine];
    uint4 x[kXInChunk ? U : 1][NT][2];
  };
  auto load_chunk = [&](Chunk& b, int c) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const bool in = c + u < gend;  // warp-uniform
#pragma unroll
      for (int r = 0; r < R; ++r) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          b.w[u][r][h] = in ? load_weight(wp[r][h] + u * (kGroup / 2)) : make_uint2(0, 0);
        }
      }
    }
    if constexpr (kXInChunk) load_x(b.x, c);
#pragma unroll
    for (int k = 0; k < kMine; ++k) {
      const int gi = c + my_u;
      b.q[k] = 0;
      b.nabs[k] = 0.0f;
      if (my_ok[k] && gi < gend) {
        const int blk = my_brow[k] + (gi >> group_shift);
        if constexpr (kNested) {
          b.q[k] = __ldg(static_cast<const uint8_t*>(absmax_raw) + blk);
          b.nabs[k] = __ldg(nested_absmax + (blk >> log2_nested_bs));
        } else {
          b.q[k] = __float_as_uint(__ldg(static_cast<const float*>(absmax_raw) + blk));
        }
      }
    }
#pragma unroll
    for (int r = 0; r < R; ++r) {
#pragma unroll
      for (int h = 0; h < 2; ++h) wp[r][h] += U * (kGroup / 2);
    }
  };

  float acc[R][NT][4] = {};

  auto compute_chunk = [&](const Chunk& b, int c) {
    uint4 x_now[kXInChunk ? 1 : U][NT][2];
    if constexpr (!kXInChunk) load_x(x_now, c);
    const uint4 (*xs)[NT][2] = kXInChunk ? b.x : x_now;
    float mine[kMine];
#pragma unroll
    for (int k = 0; k < kMine; ++k) {
      if constexpr (kNested) {
        // As the reference: code value * nested absmax rounded, then + offset rounded. (A
        // group past the range gets a finite scale and zero x: it adds exactly 0.)
        mine[k] = nested_scale(s_code[b.q[k]], b.nabs[k], mean);
      } else {
        mine[k] = __uint_as_float(b.q[k]);
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
#pragma unroll
      for (int r = 0; r < R; ++r) {
        float scale[2];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int sidx = (2 * r + h) * U + u;  // compile-time: source lane and slot
          scale[h] = __shfl_sync(0xffffffffu, mine[sidx / 4], (lane & ~3) | (sidx % 4));
        }
        float part[NT][4] = {};
        const uint2& w0 = b.w[u][r][0];
        const uint2& w1 = b.w[u][r][1];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          // See Note: the k permutation. Bytes 2j, 2j+1 of each row's 8.
          const uint32_t word0 = j < 2 ? w0.x : w0.y;
          const uint32_t word1 = j < 2 ? w1.x : w1.y;
          uint32_t a[4];
          if ((j & 1) == 0) {
            a[0] = decode<0>(s_lut, word0, lane4);
            a[1] = decode<0>(s_lut, word1, lane4);
            a[2] = decode<1>(s_lut, word0, lane4);
            a[3] = decode<1>(s_lut, word1, lane4);
          } else {
            a[0] = decode<2>(s_lut, word0, lane4);
            a[1] = decode<2>(s_lut, word1, lane4);
            a[2] = decode<3>(s_lut, word0, lane4);
            a[3] = decode<3>(s_lut, word1, lane4);
          }
#pragma unroll
          for (int nt = 0; nt < NT; ++nt) {
            const uint4& v = xs[u][nt][j >> 1];
            const uint32_t b0 = (j & 1) ? v.z : v.x;
            const uint32_t b1 = (j & 1) ? v.w : v.y;
            Mma<T>::mma(part[nt], a, b0, b1);
          }
        }
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          acc[r][nt][0] = fmaf(scale[0], part[nt][0], acc[r][nt][0]);
          acc[r][nt][1] = fmaf(scale[0], part[nt][1], acc[r][nt][1]);
          acc[r][nt][2] = fmaf(scale[1], part[nt][2], acc[r][nt][2]);
          acc[r][nt][3] = fmaf(scale[1], part[nt][3], acc[r][nt][3]);
        }
      }
    }
  };

  Chunk ca, cb;
  if (gbeg < gend) load_chunk(ca, gbeg);  // in flight while the table is built

  // Decode table: thread b < 256 builds entry b and writes its 32 copies (16-byte stores,
  // rotated so that the 8 stores of a warp's instruction spread over all banks).
  for (int b = tid; b < 256; b += blockDim.x) {
    const uint32_t v = Mma<T>::pack(level(table, b >> 4), level(table, b & 15));
    const uint4 v4 = make_uint4(v, v, v, v);
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int slot = (i + b) & 7;
      *reinterpret_cast<uint4*>(&s_lut[b * 32 + slot * 4]) = v4;
    }
  }
  if constexpr (kNested) {
    for (int i = tid; i < 256; i += blockDim.x) s_code[i] = nested_code[i];
  }
  __syncthreads();

  // Two chunks per trip, each computed while the other's loads are in flight.
  for (int c = gbeg; c < gend; c += 2 * U) {
    if (c + U < gend) load_chunk(cb, c + U);
    compute_chunk(ca, c);
    if (c + U >= gend) break;
    if (c + 2 * U < gend) load_chunk(ca, c + 2 * U);
    compute_chunk(cb, c + U);
  }
  // Cross-warp reduction through the (no longer needed) decode table: one row tile at a time,
  // warps x NT x 32 lanes x 4 floats <= 32 KB (the launcher keeps warps * NT <= 64).
  float* red = reinterpret_cast<float*>(s_lut);
#pragma unroll
  for (int r = 0; r < R; ++r) {
    __syncthreads();
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      *reinterpret_cast<float4*>(&red[((warp * NT + nt) * 32 + lane) * 4]) =
          make_float4(acc[r][nt][0], acc[r][nt][1], acc[r][nt][2], acc[r][nt][3]);
    }
    __syncthreads();
    for (int idx = tid; idx < NT * 128; idx += blockDim.x) {
      const int nt = idx >> 7;
      const int l = (idx >> 2) & 31;
      const int i = idx & 3;
      // Accumulator layout of m16n8: element i of lane l is row l/4 + 8*(i/2), column 2*(l%4) + i%2.
      const int64_t feature = row0 + 16 * r + (l >> 2) + 8 * (i >> 1);
      const int64_t token = tok0 + 8 * nt + 2 * (l & 3) + (i & 1);
      if (feature >= N || token >= M) continue;
      float sum = 0.0f;
      for (int wi = 0; wi < warps; ++wi) sum += red[((wi * NT + nt) * 32 + l) * 4 + i];
      if (bias != nullptr) sum += Mma<T>::to_float(bias[feature]);
      y[token * N + feature] = Mma<T>::from_float(sum);
    }
  }
}

template <typename T, int NT, int R, int U>
void launch_chunked(bool nested, dim3 grid, dim3 block, cudaStream_t stream, const T* x, int64_t M, int64_t N,
                    int64_t K, const uint8_t* packed, const void* absmax, const float* nested_absmax,
                    const float* nested_code, const float* offset, int log2_bs, int log2_nested_bs,
                    const T* bias, T* y, const DecodeTable& table) {
  if (nested) {
    matmul_kernel<T, NT, R, U, true><<<grid, block, 0, stream>>>(
        x, M, N, K, packed, absmax, nested_absmax, nested_code, offset, log2_bs, log2_nested_bs, bias, y, table);
  } else {
    matmul_kernel<T, NT, R, U, false><<<grid, block, 0, stream>>>(
        x, M, N, K, packed, absmax, nested_absmax, nested_code, offset, log2_bs, log2_nested_bs, bias, y, table);
  }
}

template <typename T, int NT, int R>
Status launch_shape(const void* x, int64_t M, int64_t N, int64_t K, const uint8_t* packed,
                    int log2_bs, const void* absmax, bool nested, const float* nested_absmax,
                    const float* nested_code, const float* offset, int log2_nested_bs,
                    const void* bias, void* y, const DecodeTable& table, int warps,
                    cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((N + 16 * R - 1) / (16 * R)),
                  static_cast<unsigned>((M + 8 * NT - 1) / (8 * NT)));
  const dim3 block(32 * warps);
  const T* xt = static_cast<const T*>(x);
  const T* bt = static_cast<const T*>(bias);
  T* yt = static_cast<T*>(y);
  // See default_chunk: on the H100, 4 groups per chunk beat 2 where warps hold 32 groups or more
  // (28672x8192 and 4096x14336 at 4 warps) and lost below (K = 4096; 4096x14336 at 8 warps).
  if constexpr (NT == 1 && R == 1) {
    if (K / kGroup / warps >= kLongChunkMinGroups) {
      launch_chunked<T, NT, R, kLongChunk>(nested, grid, block, stream, xt, M, N, K, packed, absmax, nested_absmax,
                                           nested_code, offset, log2_bs, log2_nested_bs, bt, yt, table);
      return check_launch();
    }
  }
  launch_chunked<T, NT, R, default_chunk(NT, R)>(nested, grid, block, stream, xt, M, N, K, packed, absmax,
                                                 nested_absmax, nested_code, offset, log2_bs, log2_nested_bs, bt,
                                                 yt, table);
  return check_launch();
}

template <typename T, int NT>
Status launch_rows(int rows_per_cta, const void* x, int64_t M, int64_t N, int64_t K,
                   const uint8_t* packed, int log2_bs, const void* absmax, bool nested,
                   const float* nested_absmax, const float* nested_code, const float* offset,
                   int log2_nested_bs, const void* bias, void* y, const DecodeTable& table,
                   int warps, cudaStream_t stream) {
  switch (rows_per_cta) {
    case 16: return launch_shape<T, NT, 1>(x, M, N, K, packed, log2_bs, absmax, nested, nested_absmax, nested_code, offset, log2_nested_bs, bias, y, table, warps, stream);
    case 32: return launch_shape<T, NT, 2>(x, M, N, K, packed, log2_bs, absmax, nested, nested_absmax, nested_code, offset, log2_nested_bs, bias, y, table, warps, stream);
    case 64:
      // 64 rows x 32 tokens needs more registers than a thread has (it spills): not built.
      if constexpr (NT == 4) return kBadSize;
      else return launch_shape<T, NT, 4>(x, M, N, K, packed, log2_bs, absmax, nested, nested_absmax, nested_code, offset, log2_nested_bs, bias, y, table, warps, stream);
    default: return kBadSize;
  }
}

template <typename T>
Status launch_typed(int token_tile, int rows_per_cta, const void* x, int64_t M, int64_t N,
                    int64_t K, const uint8_t* packed, int log2_bs, const void* absmax, bool nested,
                    const float* nested_absmax, const float* nested_code, const float* offset,
                    int log2_nested_bs, const void* bias, void* y, const DecodeTable& table,
                    int warps, cudaStream_t stream) {
  switch (token_tile) {
    case 8: return launch_rows<T, 1>(rows_per_cta, x, M, N, K, packed, log2_bs, absmax, nested, nested_absmax, nested_code, offset, log2_nested_bs, bias, y, table, warps, stream);
    case 16: return launch_rows<T, 2>(rows_per_cta, x, M, N, K, packed, log2_bs, absmax, nested, nested_absmax, nested_code, offset, log2_nested_bs, bias, y, table, warps, stream);
    case 32: return launch_rows<T, 4>(rows_per_cta, x, M, N, K, packed, log2_bs, absmax, nested, nested_absmax, nested_code, offset, log2_nested_bs, bias, y, table, warps, stream);
    default: return kBadSize;
  }
}

}  // namespace

Status launch_matmul(const QuantWeight& w, const void* x, int dtype, int64_t M, const void* bias, void* y,
                     int token_tile, int rows_per_cta, int warps, int device, cudaStream_t stream) {
  int log2_bs = 0, log2_nested_bs = 0;
  if (const Status s = check_matmul_args(w, x, dtype, M, y, &log2_bs, &log2_nested_bs); s != kOk) return s;
  const int64_t N = w.rows, K = w.cols;
  const int64_t grid_x = (N + rows_per_cta - 1) / rows_per_cta;
  const int64_t grid_y = (M + token_tile - 1) / token_tile;
  if (grid_x > 0x7fffffff || grid_y > 65535) return kBadSize;
  if (warps < 1 || warps > kMaxThreads / 32 || warps * (token_tile / 8) > 64) return kBadSize;
  if (const Status s = use_device(device); s != kOk) return s;
  if (dtype == kFloat16) {
    return launch_typed<__half>(token_tile, rows_per_cta, x, M, N, K, w.packed, log2_bs, w.absmax, w.nested,
                                w.nested_absmax, w.nested_code, w.offset, log2_nested_bs, bias, y, w.table, warps,
                                stream);
  }
  return launch_typed<__nv_bfloat16>(token_tile, rows_per_cta, x, M, N, K, w.packed, log2_bs, w.absmax, w.nested,
                                     w.nested_absmax, w.nested_code, w.offset, log2_nested_bs, bias, y, w.table,
                                     warps, stream);
}

}  // namespace nf4
