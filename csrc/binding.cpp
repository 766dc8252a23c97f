// pybind11 binding for nf4._C: raw device pointers (as integers), element counts, the device index
// and a stream handle in; a Status code out (nf4/cuda_backend.py turns it into an exception that
// names the sizes). No torch headers, so the module builds without torch. Tables are built from
// nf4/codebook.py into the classes below and passed to the kernels by value.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <string>
#include <vector>

#include "common.cuh"

namespace nf4 {

Status launch_quantize(const void* in, int dtype, int64_t n, int64_t blocksize, int quant_type,
                       uint8_t* packed, float* absmax, const EncodeTable& table, int device,
                       cudaStream_t stream);
Status launch_quantize_absmax(const float* absmax, int64_t blocks, const float* offset,
                              int64_t nested_blocksize, uint8_t* codes, float* nested_absmax,
                              const NestedTable& table, int device, cudaStream_t stream);
Status launch_dequantize(const uint8_t* packed, int64_t n, int64_t blocksize, const void* absmax,
                         bool nested, const float* nested_absmax, const float* nested_code,
                         const float* offset, int64_t nested_blocksize, void* out, int dtype,
                         const DecodeTable& table, int device, cudaStream_t stream);
Status launch_matmul(const void* x, int dtype, int64_t M, int64_t N, int64_t K,
                     const uint8_t* packed, int64_t blocksize, const void* absmax, bool nested,
                     const float* nested_absmax, const float* nested_code, const float* offset,
                     int64_t nested_blocksize, const void* bias, void* y, const DecodeTable& table,
                     int token_tile, int rows_per_cta, int warps, int device, cudaStream_t stream);
bool wgmma_available(int device);
Status launch_matmul_wgmma(const void* x, int dtype, int64_t M, int64_t N, int64_t K, const uint8_t* packed,
                           int64_t blocksize, const void* absmax, bool nested, const float* nested_absmax,
                           const float* nested_code, const float* offset, int64_t nested_blocksize,
                           const void* bias, void* y, const DecodeTable& table, int token_chunks,
                           int k_split, int device, cudaStream_t stream);
Status launch_matmul_tiled(const void* x, int dtype, int64_t M, int64_t N, int64_t K, const uint8_t* packed,
                           int64_t blocksize, const void* absmax, bool nested, const float* nested_absmax,
                           const float* nested_code, const float* offset, int64_t nested_blocksize,
                           const void* bias, void* y, const DecodeTable& table, int row_tiles,
                           int token_tiles, int k_warps, int device, cudaStream_t stream);

cudaError_t& last_cuda_error() {
  thread_local cudaError_t err = cudaSuccess;
  return err;
}

Status use_device(int device) {
  if (device < 0) return kBadDevice;
  int current = -1;
  cudaError_t err = cudaGetDevice(&current);
  if (err == cudaSuccess && current != device) err = cudaSetDevice(device);
  if (err != cudaSuccess) {
    last_cuda_error() = err;
    cudaGetLastError();  // not sticky: clear it so that the next launch check does not report it
    return kBadDevice;
  }
  return kOk;
}

}  // namespace nf4

namespace {

template <typename P>
P* ptr(std::uintptr_t address) {
  return reinterpret_cast<P*>(address);
}

cudaStream_t stream_of(std::uintptr_t handle) { return reinterpret_cast<cudaStream_t>(handle); }

}  // namespace

PYBIND11_MODULE(_C, m) {
  using namespace nf4;
  m.doc() = "nf4 CUDA kernels (raw-pointer interface; see nf4/cuda_backend.py)";

  pybind11::enum_<Status>(m, "Status")
      .value("OK", kOk)
      .value("BAD_BLOCKSIZE", kBadBlocksize)
      .value("BAD_QUANT_TYPE", kBadQuantType)
      .value("BAD_DTYPE", kBadDtype)
      .value("BAD_SIZE", kBadSize)
      .value("NULL_POINTER", kNullPointer)
      .value("LAUNCH_FAILED", kLaunchFailed)
      .value("BAD_TABLE", kBadTable)
      .value("MISALIGNED", kMisaligned)
      .value("BAD_DEVICE", kBadDevice)
      .value("UNSUPPORTED_DEVICE", kUnsupportedDevice);

  // Tables are built once (nf4/cuda_backend.py, from nf4/codebook.py) and passed to every launch
  // by value; converting Python lists on each call would cost microseconds per launch.
  pybind11::class_<EncodeTable>(m, "EncodeTable")
      .def(pybind11::init([](const std::vector<float>& inside, const std::vector<int>& below, float cell_scale,
                             float cell_offset, uint32_t fp4_codes, int zero_code) {
             if (inside.size() != kEncodeCells || below.size() != kEncodeCells)
               throw pybind11::value_error("EncodeTable needs " + std::to_string(kEncodeCells) +
                                           " cells, got " + std::to_string(inside.size()) + " and " +
                                           std::to_string(below.size()));
             if (zero_code < 0 || zero_code > 15)
               throw pybind11::value_error("zero_code must be in [0, 15], got " + std::to_string(zero_code));
             EncodeTable t{};
             for (int i = 0; i < kEncodeCells; ++i) {
               if (below[i] < 0 || below[i] > 15)
                 throw pybind11::value_error("below[] must be in [0, 15], got " + std::to_string(below[i]));
               t.inside[i] = inside[i];
               t.below[i] = static_cast<uint8_t>(below[i]);
             }
             t.cell_scale = cell_scale;
             t.cell_offset = cell_offset;
             t.fp4_codes = fp4_codes;
             t.zero_code = zero_code;
             return t;
           }),
           pybind11::arg("inside"), pybind11::arg("below"), pybind11::arg("cell_scale"),
           pybind11::arg("cell_offset"), pybind11::arg("fp4_codes"), pybind11::arg("zero_code"));
  pybind11::class_<NestedTable>(m, "NestedTable")
      .def(pybind11::init([](const std::vector<float>& thresholds, int zero_index) {
             if (thresholds.size() != 256)
               throw pybind11::value_error("NestedTable needs 256 thresholds, got " +
                                           std::to_string(thresholds.size()));
             if (zero_index < 0 || zero_index > 255)
               throw pybind11::value_error("zero_index must be in [0, 255], got " + std::to_string(zero_index));
             NestedTable t{};
             for (int i = 0; i < 256; ++i) t.thresholds[i] = thresholds[i];
             t.zero_index = zero_index;
             return t;
           }),
           pybind11::arg("thresholds"), pybind11::arg("zero_index"));
  pybind11::class_<DecodeTable>(m, "DecodeTable")
      .def(pybind11::init([](const std::vector<float>& levels) {
             if (levels.size() != 16)
               throw pybind11::value_error("DecodeTable needs 16 levels, got " + std::to_string(levels.size()));
             DecodeTable t{};
             for (int i = 0; i < 16; ++i) t.levels[i] = levels[i];
             return t;
           }),
           pybind11::arg("levels"));

  m.def("quantize",
        [](std::uintptr_t in, int dtype, int64_t n, int64_t blocksize, int quant_type, std::uintptr_t packed,
           std::uintptr_t absmax, const EncodeTable& table, int device, std::uintptr_t stream) {
          return launch_quantize(ptr<const void>(in), dtype, n, blocksize, quant_type, ptr<uint8_t>(packed),
                                 ptr<float>(absmax), table, device, stream_of(stream));
        },
        "Blockwise 4-bit quantization: packed uint8 [ceil(n/2)] and float32 absmax [ceil(n/blocksize)].",
        pybind11::arg("input"), pybind11::arg("dtype"), pybind11::arg("n"), pybind11::arg("blocksize"),
        pybind11::arg("quant_type"), pybind11::arg("packed"), pybind11::arg("absmax"), pybind11::arg("table"),
        pybind11::arg("device"), pybind11::arg("stream"));

  m.def("quantize_absmax",
        [](std::uintptr_t absmax, int64_t blocks, std::uintptr_t offset, int64_t nested_blocksize,
           std::uintptr_t codes, std::uintptr_t nested_absmax, const NestedTable& table, int device,
           std::uintptr_t stream) {
          return launch_quantize_absmax(ptr<const float>(absmax), blocks, ptr<const float>(offset),
                                        nested_blocksize, ptr<uint8_t>(codes), ptr<float>(nested_absmax),
                                        table, device, stream_of(stream));
        },
        "Double quantization of float32 absmax [blocks] around the mean at *offset (blocks of 256).",
        pybind11::arg("absmax"), pybind11::arg("blocks"), pybind11::arg("offset"),
        pybind11::arg("nested_blocksize"), pybind11::arg("codes"), pybind11::arg("nested_absmax"),
        pybind11::arg("table"), pybind11::arg("device"), pybind11::arg("stream"));

  m.def("dequantize",
        [](std::uintptr_t packed, int64_t n, int64_t blocksize, std::uintptr_t absmax, bool nested,
           std::uintptr_t nested_absmax, std::uintptr_t nested_code, std::uintptr_t offset,
           int64_t nested_blocksize, std::uintptr_t out, int dtype, const DecodeTable& table, int device,
           std::uintptr_t stream) {
          return launch_dequantize(ptr<const uint8_t>(packed), n, blocksize, ptr<const void>(absmax), nested,
                                   ptr<const float>(nested_absmax), ptr<const float>(nested_code),
                                   ptr<const float>(offset), nested_blocksize, ptr<void>(out), dtype, table,
                                   device, stream_of(stream));
        },
        "One-launch dequantization (nested absmax and 4-bit codes together) into out [n].",
        pybind11::arg("packed"), pybind11::arg("n"), pybind11::arg("blocksize"), pybind11::arg("absmax"),
        pybind11::arg("nested"), pybind11::arg("nested_absmax"), pybind11::arg("nested_code"),
        pybind11::arg("offset"), pybind11::arg("nested_blocksize"), pybind11::arg("out"),
        pybind11::arg("dtype"), pybind11::arg("table"), pybind11::arg("device"), pybind11::arg("stream"));

  m.def("matmul",
        [](std::uintptr_t x, int dtype, int64_t m, int64_t n, int64_t k, std::uintptr_t packed, int64_t blocksize,
           std::uintptr_t absmax, bool nested, std::uintptr_t nested_absmax, std::uintptr_t nested_code,
           std::uintptr_t offset, int64_t nested_blocksize, std::uintptr_t bias, std::uintptr_t y,
           const DecodeTable& table, int token_tile, int rows_per_cta, int warps, int device, std::uintptr_t stream) {
          return launch_matmul(ptr<const void>(x), dtype, m, n, k, ptr<const uint8_t>(packed), blocksize,
                               ptr<const void>(absmax), nested, ptr<const float>(nested_absmax),
                               ptr<const float>(nested_code), ptr<const float>(offset), nested_blocksize,
                               ptr<const void>(bias), ptr<void>(y), table, token_tile, rows_per_cta, warps,
                               device, stream_of(stream));
        },
        "Fused 4-bit matmul for few tokens: y [m, n] = x [m, k] @ dequant(W [n, k]).T (+ bias), fp16/bf16.",
        pybind11::arg("x"), pybind11::arg("dtype"), pybind11::arg("m"), pybind11::arg("n"), pybind11::arg("k"),
        pybind11::arg("packed"), pybind11::arg("blocksize"), pybind11::arg("absmax"), pybind11::arg("nested"),
        pybind11::arg("nested_absmax"), pybind11::arg("nested_code"), pybind11::arg("offset"),
        pybind11::arg("nested_blocksize"), pybind11::arg("bias"), pybind11::arg("y"), pybind11::arg("table"),
        pybind11::arg("token_tile"), pybind11::arg("rows_per_cta"), pybind11::arg("warps"), pybind11::arg("device"),
        pybind11::arg("stream"));

  m.def("matmul_tiled",
        [](std::uintptr_t x, int dtype, int64_t m, int64_t n, int64_t k, std::uintptr_t packed, int64_t blocksize,
           std::uintptr_t absmax, bool nested, std::uintptr_t nested_absmax, std::uintptr_t nested_code,
           std::uintptr_t offset, int64_t nested_blocksize, std::uintptr_t bias, std::uintptr_t y,
           const DecodeTable& table, int row_tiles, int token_tiles, int k_warps, int device, std::uintptr_t stream) {
          return launch_matmul_tiled(ptr<const void>(x), dtype, m, n, k, ptr<const uint8_t>(packed), blocksize,
                                     ptr<const void>(absmax), nested, ptr<const float>(nested_absmax),
                                     ptr<const float>(nested_code), ptr<const float>(offset), nested_blocksize,
                                     ptr<const void>(bias), ptr<void>(y), table, row_tiles, token_tiles, k_warps,
                                     device, stream_of(stream));
        },
        "Fused 4-bit matmul for tens to hundreds of tokens (x shared through shared memory): same "
        "arguments as matmul, tiles as (row_tiles, token_tiles) per warp in {(2, 8), (4, 8), (2, 16)} and "
        "k_warps in {1, 2, 4} (not 4 with token_tiles 16).",
        pybind11::arg("x"), pybind11::arg("dtype"), pybind11::arg("m"), pybind11::arg("n"), pybind11::arg("k"),
        pybind11::arg("packed"), pybind11::arg("blocksize"), pybind11::arg("absmax"), pybind11::arg("nested"),
        pybind11::arg("nested_absmax"), pybind11::arg("nested_code"), pybind11::arg("offset"),
        pybind11::arg("nested_blocksize"), pybind11::arg("bias"), pybind11::arg("y"), pybind11::arg("table"),
        pybind11::arg("row_tiles"), pybind11::arg("token_tiles"), pybind11::arg("k_warps"), pybind11::arg("device"),
        pybind11::arg("stream"));

  m.def("matmul_wgmma",
        [](std::uintptr_t x, int dtype, int64_t m, int64_t n, int64_t k, std::uintptr_t packed, int64_t blocksize,
           std::uintptr_t absmax, bool nested, std::uintptr_t nested_absmax, std::uintptr_t nested_code,
           std::uintptr_t offset, int64_t nested_blocksize, std::uintptr_t bias, std::uintptr_t y,
           const DecodeTable& table, int token_chunks, int k_split, int device, std::uintptr_t stream) {
          return launch_matmul_wgmma(ptr<const void>(x), dtype, m, n, k, ptr<const uint8_t>(packed), blocksize,
                                     ptr<const void>(absmax), nested, ptr<const float>(nested_absmax),
                                     ptr<const float>(nested_code), ptr<const float>(offset), nested_blocksize,
                                     ptr<const void>(bias), ptr<void>(y), table, token_chunks, k_split, device,
                                     stream_of(stream));
        },
        "Fused 4-bit matmul on Hopper (wgmma, sm_90a builds only): same arguments as matmul, tiles as "
        "token_chunks (64 tokens each) in {1, 2} and k_split (CTAs along K, one cluster) in {1, 2, 4}.",
        pybind11::arg("x"), pybind11::arg("dtype"), pybind11::arg("m"), pybind11::arg("n"), pybind11::arg("k"),
        pybind11::arg("packed"), pybind11::arg("blocksize"), pybind11::arg("absmax"), pybind11::arg("nested"),
        pybind11::arg("nested_absmax"), pybind11::arg("nested_code"), pybind11::arg("offset"),
        pybind11::arg("nested_blocksize"), pybind11::arg("bias"), pybind11::arg("y"), pybind11::arg("table"),
        pybind11::arg("token_chunks"), pybind11::arg("k_split"), pybind11::arg("device"), pybind11::arg("stream"));
  m.def("wgmma_available", &wgmma_available, pybind11::arg("device"),
        "Whether matmul_wgmma runs on this device (compute capability 9.0 and sm_90a code built).");

  // The targets this module was compiled for (CMakeLists.txt "Note: targets"), for `nf4 env`:
  // SASS for each of cuda_archs, and PTX for compute_<ptx_arch> ("" when none is embedded).
  m.attr("cuda_archs") = NF4_CUDA_ARCHS;
  m.attr("ptx_arch") = NF4_PTX_ARCH;

  m.def("last_cuda_error", []() { return std::string(cudaGetErrorString(last_cuda_error())); },
        "The CUDA error behind the last LAUNCH_FAILED or BAD_DEVICE status on this thread.");
}
