// quantize_memory / dequantize_memory kernels (memory3/quant.cuh) for int8, int4 and pq:
// quantize from each float dtype, dequantize to each.
#include "memory3/quant.cuh"

M3_QUANTIZE_INSTANCE(, float)
M3_QUANTIZE_INSTANCE(, double)
M3_QUANTIZE_INSTANCE(, __nv_bfloat16)
M3_QUANTIZE_INSTANCE(, __half)
M3_DEQUANTIZE_INSTANCE(, float)
M3_DEQUANTIZE_INSTANCE(, double)
M3_DEQUANTIZE_INSTANCE(, __nv_bfloat16)
M3_DEQUANTIZE_INSTANCE(, __half)
