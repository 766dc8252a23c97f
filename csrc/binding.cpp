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
Status launch_dequantize(const QuantWeight& w, void* out, int dtype, int device, cudaStream_t stream);
Status launch_matmul(const QuantWeight& w, const void* x, int dtype, int64_t M, const void* bias, void* y,
                     int token_tile, int rows_per_cta, int warps, int device, cudaStream_t stream);
bool wgmma_available(int device);
Status launch_matmul_wgmma(const QuantWeight& w, const void* x, int dtype, int64_t M, const void* bias, void* y,
                           int token_chunks, int k_split, int device, cudaStream_t stream);
Status launch_matmul_tiled(const QuantWeight& w, const void* x, int dtype, int64_t M, const void* bias, void* y,
                           int row_tiles, int token_tiles, int k_warps, int device, cudaStream_t stream);

// The fused matmul kernels by number, as nf4/cuda_backend.py names them (MATMUL_KERNELS).
enum MatmulKernel : int { kFewToken = 0, kTiled = 1, kWgmma = 2 };

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
      .def(pybind11::init([](const std::vector<float>& thresholds, int flat_code) {
             if (thresholds.size() != 256)
               throw pybind11::value_error("NestedTable needs 256 thresholds, got " +
                                           std::to_string(thresholds.size()));
             if (flat_code < 0 || flat_code > 255)
               throw pybind11::value_error("flat_code must be in [0, 255], got " + std::to_string(flat_code));
             NestedTable t{};
             for (int i = 0; i < 256; ++i) t.thresholds[i] = thresholds[i];
             t.flat_code = flat_code;
             return t;
           }),
           pybind11::arg("thresholds"), pybind11::arg("flat_code"));
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

  pybind11::class_<QuantWeight>(m, "QuantWeight")
      .def(pybind11::init([](std::uintptr_t packed, std::uintptr_t absmax, bool nested, std::uintptr_t nested_absmax,
                             std::uintptr_t nested_code, std::uintptr_t offset, int64_t blocksize,
                             int64_t nested_blocksize, int64_t rows, int64_t cols, const DecodeTable& table) {
             return QuantWeight{ptr<const uint8_t>(packed), ptr<const void>(absmax), nested,
                                ptr<const float>(nested_absmax), ptr<const float>(nested_code), ptr<const float>(offset),
                                blocksize, nested ? nested_blocksize : 0, rows, cols, table};
           }),
           pybind11::arg("packed"), pybind11::arg("absmax"), pybind11::arg("nested"), pybind11::arg("nested_absmax"),
           pybind11::arg("nested_code"), pybind11::arg("offset"), pybind11::arg("blocksize"),
           pybind11::arg("nested_blocksize"), pybind11::arg("rows"), pybind11::arg("cols"), pybind11::arg("table"),
           "One 4-bit weight's device pointers and sizes (validated by nf4/weight.py), kept per weight.")
      .def_readonly("rows", &QuantWeight::rows)
      .def_readonly("cols", &QuantWeight::cols)
      .def_readonly("blocksize", &QuantWeight::blocksize)
      .def_readonly("nested", &QuantWeight::nested);

  m.def("dequantize",
        [](const QuantWeight& w, std::uintptr_t out, int dtype, int device, std::uintptr_t stream) {
          return launch_dequantize(w, ptr<void>(out), dtype, device, stream_of(stream));
        },
        "One-launch dequantization (nested absmax and 4-bit codes together) into out [rows * cols].",
        pybind11::arg("weight"), pybind11::arg("out"), pybind11::arg("dtype"), pybind11::arg("device"),
        pybind11::arg("stream"));

  m.attr("MATMUL_FEW_TOKEN") = static_cast<int>(kFewToken);
  m.attr("MATMUL_TILED") = static_cast<int>(kTiled);
  m.attr("MATMUL_WGMMA") = static_cast<int>(kWgmma);
  m.def("matmul",
        [](const QuantWeight& w, int kernel, int c0, int c1, int c2, std::uintptr_t x, int dtype, int64_t m,
           std::uintptr_t bias, std::uintptr_t y, int device, std::uintptr_t stream) {
          switch (kernel) {
            case kFewToken:
              return launch_matmul(w, ptr<const void>(x), dtype, m, ptr<const void>(bias), ptr<void>(y), c0, c1, c2,
                                   device, stream_of(stream));
            case kTiled:
              return launch_matmul_tiled(w, ptr<const void>(x), dtype, m, ptr<const void>(bias), ptr<void>(y), c0,
                                         c1, c2, device, stream_of(stream));
            case kWgmma:
              return launch_matmul_wgmma(w, ptr<const void>(x), dtype, m, ptr<const void>(bias), ptr<void>(y), c0,
                                         c1, device, stream_of(stream));
            default:
              return kBadSize;
          }
        },
        "Fused 4-bit matmul, y [m, rows] = x [m, cols] @ dequant(W).T (+ bias), fp16/bf16, by one of the kernels:\n"
        "  MATMUL_FEW_TOKEN (c0, c1, c2) = (token_tile, rows_per_cta, warps): few tokens;\n"
        "  MATMUL_TILED (row_tiles, token_tiles, k_warps) with (row_tiles, token_tiles) in {(2, 8), (4, 8), (2, 16)}\n"
        "    and k_warps in {1, 2, 4} (not 4 with token_tiles 16): x shared through shared memory;\n"
        "  MATMUL_WGMMA (token_chunks, k_split, unused): Hopper (sm_90a builds), token_chunks of 64 tokens in\n"
        "    {1, 2}, k_split CTAs along K (one cluster) in {1, 2, 4}.",
        pybind11::arg("weight"), pybind11::arg("kernel"), pybind11::arg("c0"), pybind11::arg("c1"),
        pybind11::arg("c2"), pybind11::arg("x"), pybind11::arg("dtype"), pybind11::arg("m"), pybind11::arg("bias"),
        pybind11::arg("y"), pybind11::arg("device"), pybind11::arg("stream"));
  m.def("wgmma_available", &wgmma_available, pybind11::arg("device"),
        "Whether matmul_wgmma runs on this device (compute capability 9.0 and sm_90a code built).");

  // The targets this module was compiled for (CMakeLists.txt "Note: targets"), for `nf4 env`:
  // SASS for each of cuda_archs, and PTX for compute_<ptx_arch> ("" when none is embedded).
  m.attr("cuda_archs") = NF4_CUDA_ARCHS;
  m.attr("ptx_arch") = NF4_PTX_ARCH;

  m.def("last_cuda_error", []() { return std::string(cudaGetErrorString(last_cuda_error())); },
        "The CUDA error behind the last LAUNCH_FAILED or BAD_DEVICE status on this thread.");
}
