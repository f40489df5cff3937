// Reports the architectures nvcc embedded in this library, read from the device code
// itself (__CUDA_ARCH__ of each compiled image), so `memory3 info` shows what really ran
// through nvcc rather than what CMake asked for.
#include <cuda_runtime.h>

#include <string>

namespace memory3 {
namespace {
__global__ void ReportArchKernel(int* arch) {
#ifdef __CUDA_ARCH__
  *arch = __CUDA_ARCH__;
#endif
}
}  // namespace

// The arch of the image the current device runs, or why none runs.
std::string cuda_compiled_arches() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
    cudaGetLastError();
    return "no CUDA device visible";
  }
  int* d_arch = nullptr;
  int h_arch = 0;
  if (cudaMalloc(&d_arch, sizeof(int)) != cudaSuccess) return "cudaMalloc failed";
  ReportArchKernel<<<1, 1>>>(d_arch);
  cudaError_t err = cudaMemcpy(&h_arch, d_arch, sizeof(int), cudaMemcpyDeviceToHost);
  cudaFree(d_arch);
  if (err != cudaSuccess) return std::string("kernel failed: ") + cudaGetErrorString(err);
  return "sm_" + std::to_string(h_arch / 10);
}
}  // namespace memory3
