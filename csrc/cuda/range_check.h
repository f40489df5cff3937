// Device-side range checks of the CUDA launchers (the plan of memory3/params.h): the device
// words kernels record a bad id or length in, the per-call check mode, and the op
// memory3::check_range_errors that reads the words after deferred calls (a graph replay).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace memory3::cuda_launch {

// The range-error words (memory3/cuda_common.cuh, kRangeWords) of the current device.
int64_t* range_error_words();

// True when this call must not sync: the stream is capturing a CUDA graph, or
// MEMORY3_RANGE_CHECK=deferred. Decided per call, before the launch.
bool range_check_deferred(cudaStream_t stream);

// After the launches of one op call: in sync mode, copy the words back (one stream sync) and
// raise the CPU op's RuntimeError if a kernel recorded an error; in deferred mode, nothing.
void finish_range_check(cudaStream_t stream, bool deferred);

}  // namespace memory3::cuda_launch
