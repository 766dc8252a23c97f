// pybind11 binding for nf4._C: raw device pointers (as integers), sizes and a stream handle in,
// status codes out. No torch headers, so the module builds without torch.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "common.cuh"

namespace nf4 {
int launch_noop(cudaStream_t stream);
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "nf4 CUDA kernels (raw-pointer interface; see nf4/cuda_backend.py)";
  m.def("noop", [](std::uintptr_t stream) {
    return nf4::launch_noop(reinterpret_cast<cudaStream_t>(stream));
  });
}
