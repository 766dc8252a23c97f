// Shared definitions for nf4's CUDA kernels. No torch headers: kernels see raw pointers only, and
// every table (levels, thresholds) arrives as a kernel argument built from nf4/codebook.py.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

namespace nf4 {

// Error codes returned by every launcher; nf4/cuda_backend.py turns them into exceptions that
// name the offending sizes.
enum Status : int {
  kOk = 0,
  kBadBlocksize = 1,
  kBadQuantType = 2,
  kBadDtype = 3,
  kBadSize = 4,
  kNullPointer = 5,
  kLaunchFailed = 6,
  kBadTable = 7,
  kMisaligned = 8,
  kBadDevice = 9,
  kUnsupportedDevice = 10,  // a kernel this GPU (or this build's targets) cannot run
};

enum Dtype : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };
enum QuantType : int { kNF4 = 0, kFP4 = 1 };

constexpr int kThreads = 256;            // threads per CTA of the 4-bit kernels
constexpr int kWarps = kThreads / 32;
constexpr int kChunksPerThread = 4;      // 16-byte chunks per thread: 64 bytes in flight each
// The smallest CTA tile is 4096 elements (fp32: 8 warps x 4 rows x 32 lanes x 4); with at most
// 2^31 - 1 CTAs per grid, n must stay below 4096 * (2^31 - 1).
constexpr int64_t kMaxElements = int64_t{4096} * 0x7fffffff;
// Values per nested (double-quantization) block: bitsandbytes' fixed 256, one warp of 8 per lane.
constexpr int kNestedBlock = 256;

// The 4-bit encoder's decision table (built by nf4/cuda_backend.py from nf4/codebook.py).
// The key (x for NF4, |x| for FP4) falls in cell k = floor(key * cell_scale + cell_offset) mod 64,
// an interval that holds at most one decision threshold: its bucket (the number of thresholds
// below the key) is below[k] + (key > inside[k]). Two conflict-free shared-memory loads per value
// instead of a search over 15 thresholds.
constexpr int kEncodeCells = 64;
struct EncodeTable {
  float inside[kEncodeCells];     // the threshold inside cell k, or +inf
  uint8_t below[kEncodeCells];    // thresholds below cell k
  float cell_scale;
  float cell_offset;
  uint32_t fp4_codes;  // FP4: magnitude code of bucket i in bits 4i..4i+3
  int zero_code;       // code of 0.0, padding the low nibble of an odd element count
};

// Thresholds between adjacent values of the 256-entry dynamic map (255 + a +inf pad).
struct NestedTable {
  float thresholds[256];
  int flat_code;       // code of a block whose values all equal the mean (bnb's: 0; codebook.NESTED_FLAT_CODE)
};

// The 16 float32 values that 4-bit codes decode to.
struct DecodeTable {
  float levels[16];
};

// One 4-bit weight as every dequantize and matmul launcher takes it: built once per weight by
// nf4/weight.py (after its tensors were validated there) and kept, so that a call passes one object
// instead of eleven values. The launchers still check pointers, block sizes and sizes.
struct QuantWeight {
  const uint8_t* packed;       // ceil(rows * cols / 2) bytes, element 2j in the high nibble
  const void* absmax;          // float32 [blocks], or uint8 codes [blocks] when nested
  bool nested;                 // double quantization
  const float* nested_absmax;  // float32 [ceil(blocks / nested_blocksize)] (nested only)
  const float* nested_code;    // float32 [256] dynamic map (nested only)
  const float* offset;         // float32 [1]: the mean subtracted from absmax (nested only)
  int64_t blocksize;           // values per absmax block (power of two, 32..4096)
  int64_t nested_blocksize;    // absmax codes per nested block (nested only)
  int64_t rows;                // out_features (N); 1 for a weight that is not a matrix
  int64_t cols;                // in_features (K); the element count when rows is 1
  DecodeTable table;           // the 16 levels of the weight's quant type
};

// The CUDA error behind the last kLaunchFailed on this thread (for the Python message).
cudaError_t& last_cuda_error();

// Makes `device` current for this thread (the extension links its own static runtime, whose
// current device is not torch's).
Status use_device(int device);

// blocksize must be a power of two in [32, 4096]; returns log2 or -1.
inline int log2_blocksize(int64_t blocksize) {
  if (blocksize < 32 || blocksize > 4096 || (blocksize & (blocksize - 1)) != 0) return -1;
  int l = 0;
  while ((int64_t{1} << l) < blocksize) ++l;
  return l;
}

// The absmax description every 4-bit launcher takes: pointers present, block sizes valid powers
// of two. Fills log2 of both block sizes (the nested one stays 0 without double quantization).
inline Status check_absmax(const void* absmax, int64_t blocksize, bool nested, const float* nested_absmax,
                           const float* nested_code, const float* offset, int64_t nested_blocksize,
                           int* log2_bs, int* log2_nested_bs) {
  if (absmax == nullptr) return kNullPointer;
  if (nested && (nested_absmax == nullptr || nested_code == nullptr || offset == nullptr)) return kNullPointer;
  *log2_bs = log2_blocksize(blocksize);
  if (*log2_bs < 0) return kBadBlocksize;
  *log2_nested_bs = 0;
  if (nested) {
    *log2_nested_bs = log2_blocksize(nested_blocksize);
    if (*log2_nested_bs < 0) return kBadBlocksize;
  }
  return kOk;
}

inline Status check_launch() {
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    last_cuda_error() = err;
    return kLaunchFailed;
  }
  return kOk;
}

}  // namespace nf4
