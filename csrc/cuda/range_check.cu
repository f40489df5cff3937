// The device words of the range checks (one set per device: a __device__ variable lives in
// every device's copy of the module), the sync/deferred switch, the messages (the CPU
// launchers' wording), and memory3::check_range_errors() for deferred mode.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <array>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>

#include "memory3/cuda_common.cuh"
#include "env_choice.h"
#include "range_check.h"

namespace memory3 {
namespace {

__device__ int64_t g_range_error[cuda::kRangeWords];

constexpr int kMaxDevices = 64;
std::array<std::atomic<int64_t*>, kMaxDevices> g_words{};

std::string range_error_message(const int64_t (&w)[cuda::kRangeWords]) {
  const uint64_t tag = static_cast<uint64_t>(w[0]);
  const int code = int(tag >> 56);
  const int64_t index = int64_t(tag & ((uint64_t(1) << 56) - 1)) - 1;
  const std::string value = std::to_string(w[1]), bound = std::to_string(w[2]), i = std::to_string(index);
  switch (code) {
    case cuda::kRangeMemIds:
      return "mem_ids holds " + value + " at flat index " + i + ", outside [-1, N=" + bound + ")";
    case cuda::kRangeKvLens:
      return "kv_lens[" + i + "] = " + value + " is outside [0, S=" + bound + "]";
    case cuda::kRangeChunks:
      return "mem_ids has " + bound + " chunks but sequence " + i + " (" + value + " tokens) needs " +
             std::to_string(w[3]);
    case cuda::kRangeGatherIds:
    case cuda::kRangeDecodeIds:
      return "ids holds " + value + " at flat index " + i + ", outside [-1, N=" + bound + ")";
    case cuda::kRangeVqHeader:
      return "vq meta header (row 0) does not describe meta [" + value + ", D=" + bound + "] and codes of " +
             std::to_string(w[3]) + " bytes (format 1, integer coarse_bits/pq_m/pq_bits)";
    default:
      return "a CUDA kernel recorded range error code " + std::to_string(code);
  }
}

// Reads and clears the words of the current device (after `stream`'s work); raises if set.
void take_and_raise(int64_t* words, cudaStream_t stream) {
  int64_t host[cuda::kRangeWords];
  C10_CUDA_CHECK(cudaMemcpyAsync(host, words, sizeof(host), cudaMemcpyDeviceToHost, stream));
  C10_CUDA_CHECK(cudaStreamSynchronize(stream));
  if (host[0] == 0) return;
  C10_CUDA_CHECK(cudaMemsetAsync(words, 0, sizeof(host), stream));
  C10_CUDA_CHECK(cudaStreamSynchronize(stream));
  TORCH_CHECK(false, range_error_message(host));
}

// memory3::check_range_errors(): every device this process launched a checked kernel on.
void check_range_errors() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    (void)cudaGetLastError();
    return;
  }
  for (int d = 0; d < count && d < kMaxDevices; ++d) {
    int64_t* words = g_words[d].load();
    if (words == nullptr) continue;
    c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(d));
    C10_CUDA_CHECK(cudaDeviceSynchronize());
    take_and_raise(words, nullptr);
  }
}

}  // namespace

namespace cuda_launch {

int64_t* range_error_words() {
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  TORCH_CHECK(device < kMaxDevices, "memory3: CUDA device ", device, " is past the ", kMaxDevices, " supported");
  int64_t* words = g_words[device].load();
  if (words == nullptr) {
    C10_CUDA_CHECK(cudaGetSymbolAddress(reinterpret_cast<void**>(&words), g_range_error));
    g_words[device].store(words);
  }
  return words;
}

bool range_check_deferred(cudaStream_t stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &status));
  if (status != cudaStreamCaptureStatusNone) return true;
  return memory3::env_choice("MEMORY3_RANGE_CHECK", {"sync", "deferred"}, "sync") == "deferred";
}

void finish_range_check(cudaStream_t stream, bool deferred) {
  if (!deferred) take_and_raise(range_error_words(), stream);
}

}  // namespace cuda_launch

// A new op, CUDA builds only: raises the first range error the kernels recorded since the
// last check (deferred mode: after a graph replay or a hot loop), and clears it.
TORCH_LIBRARY_FRAGMENT(memory3, m) { m.def("check_range_errors() -> ()", &check_range_errors); }

}  // namespace memory3
