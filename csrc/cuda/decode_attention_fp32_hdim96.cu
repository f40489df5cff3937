// memory_attention decode kernel (memory3/decode_attention.cuh): float queries, head dim 96,
// float and int8 banks. One small translation unit per (dtype, head dim), FlashAttention's layout.
#include "memory3/decode_attention.cuh"

M3_DECODE_INSTANCES(, float, 96)
