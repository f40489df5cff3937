// gather_memory kernels (memory3/gather.cuh) writing __nv_bfloat16: every bank dtype, int8 included.
#include "memory3/cuda_common.cuh"
#include "memory3/gather.cuh"

M3_GATHER_INSTANCES_FOR_OUT(, __nv_bfloat16)
