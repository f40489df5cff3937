// nvcc check of include/memory3/params.h, compiled for every target architecture by
// scripts/check_cuda_sources.sh (not built into memory3._C): each params struct is a legal
// kernel argument (trivially copyable, within the 4 KB parameter space) and its fields are
// read in device code. The CUDA kernels will take these structs by value, as this does.
#include <cstdint>
#include <type_traits>

#include "memory3/params.h"

namespace memory3 {
namespace {

template <typename Params>
constexpr bool kKernelArgument = std::is_trivially_copyable_v<Params> && sizeof(Params) <= 4096;

static_assert(kKernelArgument<MemoryAttentionParams>);
static_assert(kKernelArgument<MemoryAttentionBwdParams>);
static_assert(kKernelArgument<GatherParams>);
static_assert(kKernelArgument<QuantizeParams>);
static_assert(kKernelArgument<DequantizeParams>);
// The backward reads the forward's fields through its base: no copy, no re-layout.
static_assert(std::is_base_of_v<MemoryAttentionParams, MemoryAttentionBwdParams>);

// One value per struct that depends on its sizes, strides and pointers.
__device__ int64_t probe(const MemoryAttentionParams& p) {
  const int64_t id = p.mem_ids ? p.mem_ids[0] : -1;
  const int64_t len = p.kv_lens ? p.kv_lens[0] : p.S;
  return id * p.mk_stride_n + len * p.k_stride_s + int64_t(p.chunk_size) * p.C + p.chunk_start;
}
__device__ int64_t probe(const MemoryAttentionBwdParams& p) {
  return probe(static_cast<const MemoryAttentionParams&>(p)) + (p.dmem_k != nullptr) + (p.dlse != nullptr);
}
__device__ int64_t probe(const GatherParams& p) { return p.ids[0] * p.k.stride_n + p.vectors * p.D; }
__device__ int64_t probe(const QuantizeParams& p) { return p.N * p.Hkv * p.M * p.D + p.dsub; }
__device__ int64_t probe(const DequantizeParams& p) {
  return (p.ids ? p.ids[0] : 0) * p.codes_stride_n + p.Hkv * p.M * p.D + kPqCentroids * p.dsub;
}

}  // namespace

template <typename Params>
__global__ void ParamsProbeKernel(Params p, int64_t* out) {
  out[threadIdx.x] = probe(p);
}

template __global__ void ParamsProbeKernel<MemoryAttentionParams>(MemoryAttentionParams, int64_t*);
template __global__ void ParamsProbeKernel<MemoryAttentionBwdParams>(MemoryAttentionBwdParams, int64_t*);
template __global__ void ParamsProbeKernel<GatherParams>(GatherParams, int64_t*);
template __global__ void ParamsProbeKernel<QuantizeParams>(QuantizeParams, int64_t*);
template __global__ void ParamsProbeKernel<DequantizeParams>(DequantizeParams, int64_t*);

}  // namespace memory3
