// gather_memory kernels (memory3/gather.cuh) writing __half: every bank dtype, int8 included.
#include "memory3/cuda_common.cuh"
#include "memory3/gather.cuh"

M3_GATHER_INSTANCES_FOR_OUT(, __half)
