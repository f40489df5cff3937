// The int64 -> int32 index narrowing kernel (memory3/index_narrow.cuh), compiled once.
#define M3_DEFINE_NARROW_INDEX
#include "memory3/index_narrow.cuh"
