// pybind11 binding for nf4._C: raw device pointers (as integers), element counts, the device index
// and a stream handle in; a Status code out (nf4/cuda_backend.py turns it into an exception that
// names the sizes). No torch headers, so the module builds without torch. Tables arrive as Python
// lists built from nf4/codebook.py and are passed to the kernels by value.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
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
      .value("BAD_DEVICE", kBadDevice);

  m.def("quantize",
        [](std::uintptr_t in, int dtype, int64_t n, int64_t blocksize, int quant_type,
           std::uintptr_t packed, std::uintptr_t absmax, const std::vector<float>& thresholds,
           uint32_t fp4_codes, int zero_code, int device, std::uintptr_t stream) {
          EncodeTable table{};
          if (thresholds.size() != 16 || zero_code < 0 || zero_code > 15) return kBadTable;
          for (int i = 0; i < 16; ++i) table.thresholds[i] = thresholds[i];
          table.fp4_codes = fp4_codes;
          table.zero_code = zero_code;
          return launch_quantize(ptr<const void>(in), dtype, n, blocksize, quant_type, ptr<uint8_t>(packed),
                                 ptr<float>(absmax), table, device, stream_of(stream));
        },
        "Blockwise 4-bit quantization: packed uint8 [ceil(n/2)] and float32 absmax [ceil(n/blocksize)].",
        pybind11::arg("input"), pybind11::arg("dtype"), pybind11::arg("n"), pybind11::arg("blocksize"),
        pybind11::arg("quant_type"), pybind11::arg("packed"), pybind11::arg("absmax"),
        pybind11::arg("thresholds"), pybind11::arg("fp4_codes"), pybind11::arg("zero_code"),
        pybind11::arg("device"), pybind11::arg("stream"));

  m.def("quantize_absmax",
        [](std::uintptr_t absmax, int64_t blocks, std::uintptr_t offset, int64_t nested_blocksize,
           std::uintptr_t codes, std::uintptr_t nested_absmax, const std::vector<float>& thresholds,
           int zero_index, int device, std::uintptr_t stream) {
          NestedTable table{};
          if (thresholds.size() != 256) return kBadTable;
          for (int i = 0; i < 256; ++i) table.thresholds[i] = thresholds[i];
          table.zero_index = zero_index;
          return launch_quantize_absmax(ptr<const float>(absmax), blocks, ptr<const float>(offset),
                                        nested_blocksize, ptr<uint8_t>(codes), ptr<float>(nested_absmax),
                                        table, device, stream_of(stream));
        },
        "Double quantization of float32 absmax [blocks] around the mean at *offset.",
        pybind11::arg("absmax"), pybind11::arg("blocks"), pybind11::arg("offset"),
        pybind11::arg("nested_blocksize"), pybind11::arg("codes"), pybind11::arg("nested_absmax"),
        pybind11::arg("thresholds"), pybind11::arg("zero_index"), pybind11::arg("device"),
        pybind11::arg("stream"));

  m.def("dequantize",
        [](std::uintptr_t packed, int64_t n, int64_t blocksize, std::uintptr_t absmax, bool nested,
           std::uintptr_t nested_absmax, std::uintptr_t nested_code, std::uintptr_t offset,
           int64_t nested_blocksize, std::uintptr_t out, int dtype, const std::vector<float>& levels,
           int device, std::uintptr_t stream) {
          DecodeTable table{};
          if (levels.size() != 16) return kBadTable;
          for (int i = 0; i < 16; ++i) table.levels[i] = levels[i];
          return launch_dequantize(ptr<const uint8_t>(packed), n, blocksize, ptr<const void>(absmax), nested,
                                   ptr<const float>(nested_absmax), ptr<const float>(nested_code),
                                   ptr<const float>(offset), nested_blocksize, ptr<void>(out), dtype, table,
                                   device, stream_of(stream));
        },
        "One-launch dequantization (nested absmax and 4-bit codes together) into out [n].",
        pybind11::arg("packed"), pybind11::arg("n"), pybind11::arg("blocksize"), pybind11::arg("absmax"),
        pybind11::arg("nested"), pybind11::arg("nested_absmax"), pybind11::arg("nested_code"),
        pybind11::arg("offset"), pybind11::arg("nested_blocksize"), pybind11::arg("out"),
        pybind11::arg("dtype"), pybind11::arg("levels"), pybind11::arg("device"), pybind11::arg("stream"));

  m.def("last_cuda_error", []() { return std::string(cudaGetErrorString(last_cuda_error())); },
        "The CUDA error behind the last LAUNCH_FAILED or BAD_DEVICE status on this thread.");
}
