// Blockwise 4-bit quantization. Placeholder until the CUDA backend lands: it only proves the
// toolchain builds and links a kernel into nf4._C.
#include "common.cuh"

namespace nf4 {

__global__ void noop_kernel() {}

int launch_noop(cudaStream_t stream) {
  noop_kernel<<<1, 1, 0, stream>>>();
  return cudaGetLastError() == cudaSuccess ? kOk : kLaunchFailed;
}

}  // namespace nf4
