// memory_attention decode kernel (memory3/decode_attention.cuh) for float64 queries (tests,
// gradcheck): any head dim, element loads, double accumulation, float64 and int8 banks.
#include "memory3/decode_attention.cuh"

M3_DECODE_INSTANCES(, double, 0)
