// memory_attention decode kernel (memory3/decode_attention.cuh): __nv_bfloat16 queries, head dim 64,
// float and int8 banks. One small translation unit per (dtype, head dim), FlashAttention's layout.
#include "memory3/decode_attention.cuh"

M3_DECODE_INSTANCES(, __nv_bfloat16, 64)
