// memory_attention decode kernel (memory3/decode_attention.cuh): __half queries, any head dim
// up to 256 or unaligned inputs (element loads), float and int8 banks; and the split merge.
#include "memory3/decode_attention.cuh"

M3_DECODE_INSTANCES(, __half, 0)
M3_DECODE_MERGE_INSTANCE(, __half)
