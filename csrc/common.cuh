// Shared definitions for nf4's CUDA kernels. No torch headers: kernels see raw pointers only.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

namespace nf4 {

// Error codes returned by every launcher; the binding turns them into Python exceptions that
// name the offending sizes.
enum Status : int {
  kOk = 0,
  kBadBlocksize = 1,
  kBadQuantType = 2,
  kBadDtype = 3,
  kBadSize = 4,
  kNullPointer = 5,
  kLaunchFailed = 6,
};

enum Dtype : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };
enum QuantType : int { kNF4 = 0, kFP4 = 1 };

}  // namespace nf4
