// The vq decoder (memory3/vq.cuh) for each output dtype.
#include "memory3/vq.cuh"

M3_VQ_INSTANCE(, float)
M3_VQ_INSTANCE(, double)
M3_VQ_INSTANCE(, __nv_bfloat16)
M3_VQ_INSTANCE(, __half)
