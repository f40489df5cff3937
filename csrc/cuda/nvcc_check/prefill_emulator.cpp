// Runs the CUDA prefill kernels' own code on the CPU: include/memory3/prefill_attention.cuh
// (forward) and prefill_backward.cuh (delta, dq, dk/dv) compiled by the host compiler with
// M3_PREFILL_EMULATE, each CTA's threads as cooperative fibers (ucontext) on one OS thread.
// tests/test_cuda_prefill_emulated.py drives it and holds the results to memory3.reference,
// so the kernels' index arithmetic, masks, fragment layouts, tile schedule and pipeline are
// tested on any machine, before a GPU ever runs them.
//
// What is emulated, and how faithfully:
//   - __syncthreads: a barrier of the CTA's threads; a thread that exits while others wait, or
//     a barrier some threads never reach, is reported as a deadlock (a divergent barrier).
//   - warp collectives (__shfl_xor_sync, ldmatrix, mma.sync): a barrier of the warp's 32 lanes
//     around an exchange; all 32 must take part, as the real instructions require.
//   - ldmatrix / ldmatrix.trans and mma.m16n8k16 (bf16/fp16 in, float accumulate): the PTX
//     ISA's fragment layouts (prefill_mma.cuh's header comment); products exact, sums in float.
//   - cp.async: a synchronous copy (or zero fill), with the 16-byte alignment, the bounds of
//     shared memory and those of the input arrays (the global memory it may read) checked;
//     __ldg too. Shared memory starts as 0xFF bytes (NaN in bf16/fp16), so a read of a byte
//     nothing wrote shows up as NaN in the results.
// Not emulated: timing, memory ordering between warps without a barrier (a race that a
// barrier would hide is not found here: compute-sanitizer racecheck covers that on a GPU).
//
// With `simt` set in the header, the backward is the CUDA-core one (memory_attention_backward.cuh)
// instead of the tensor-core passes.
//
// Usage: prefill_emulator IN OUT. IN: one text line of sizes (see read_case), then the raw
// arrays; OUT: out, lse, dq, dk, dv[, dmem_k, dmem_v] raw. Exit 0, or a message and 1.
#define M3_PREFILL_EMULATE 1

#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <string>
#include <vector>

#include "memory3/numeric.h"
#include "memory3/params.h"

// ---------------------------------------------------------------- CUDA C++ on the host
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)

struct int4 {
  int x, y, z, w;
};
struct uint4 {
  unsigned x, y, z, w;
};
struct float2 {
  float x, y;
};
inline int4 make_int4(int a, int b, int c, int d) { return {a, b, c, d}; }
inline uint4 make_uint4(unsigned a, unsigned b, unsigned c, unsigned d) { return {a, b, c, d}; }
inline float2 make_float2(float a, float b) { return {a, b}; }
namespace emu {

[[noreturn]] void fail(const std::string& what) {
  std::fprintf(stderr, "emulator: %s\n", what.c_str());
  std::exit(1);
}

// The input arrays: the only global memory a bulk or vector load may read.
std::vector<std::pair<const unsigned char*, size_t>> globals;
void check_global(const void* p, size_t bytes, const char* what) {
  auto* b = static_cast<const unsigned char*>(p);
  for (const auto& [base, size] : globals)
    if (b >= base && b + bytes <= base + size) return;
  fail(std::string(what) + ": read outside every input array");
}

}  // namespace emu

template <typename T>
inline T __ldg(const T* p) {
  emu::check_global(p, sizeof(T), "__ldg");
  return *p;
}

namespace emu {

struct Dim3 {
  unsigned x = 0, y = 0, z = 0;
};

struct Group {  // a barrier of `size` fibers
  int size = 0, arrived = 0;
  long generation = 0;
};

struct Warp {
  Group g;
  const void* ptr[32];
  uint32_t a[32][4], b[32][2];
  double x[32];
};

struct Fiber {
  ucontext_t ctx;
  std::vector<char> stack;
  Dim3 tid;
  bool done = false;
};

struct Cta {
  std::vector<Fiber> fibers;
  ucontext_t scheduler;
  int current = -1;
  long events = 0;  // barrier arrivals and exits: progress
  Group all;
  std::vector<Warp> warps;
  std::vector<unsigned char> smem;
  Dim3 block, dim;
  const std::function<void()>* body = nullptr;
};

Cta* cta = nullptr;

Fiber& self() { return cta->fibers[cta->current]; }
int lane() { return int(self().tid.x % 32); }
Warp& warp() { return cta->warps[self().tid.x / 32]; }

void yield() { swapcontext(&self().ctx, &cta->scheduler); }

void sync(Group& g) {
  const long gen = g.generation;
  ++cta->events;
  if (++g.arrived == g.size) {
    g.arrived = 0;
    ++g.generation;
    return;
  }
  while (g.generation == gen) yield();
}

void trampoline() {
  (*cta->body)();
  self().done = true;
  ++cta->events;
}

// Runs body() as `threads` fibers of one CTA with `smem` bytes of dynamic shared memory.
void run_cta(unsigned block, int threads, size_t smem, const std::function<void()>& body) {
  static Cta c;
  c.fibers.resize(threads);
  c.warps.assign((threads + 31) / 32, Warp{});
  for (auto& w : c.warps) w.g.size = 32;
  c.all = Group{threads, 0, 0};
  c.smem.assign(smem, 0xFF);
  c.block = Dim3{block, 0, 0};
  c.dim = Dim3{unsigned(threads), 1, 1};
  c.body = &body;
  c.events = 0;
  cta = &c;
  for (int t = 0; t < threads; ++t) {
    Fiber& f = c.fibers[t];
    f.stack.resize(256 * 1024);
    f.done = false;
    f.tid = Dim3{unsigned(t), 0, 0};
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack.data();
    f.ctx.uc_stack.ss_size = f.stack.size();
    f.ctx.uc_link = &c.scheduler;
    makecontext(&f.ctx, trampoline, 0);
  }
  for (;;) {
    bool any = false;
    const long before = c.events;
    for (int t = 0; t < threads; ++t) {
      if (c.fibers[t].done) continue;
      any = true;
      c.current = t;
      swapcontext(&c.scheduler, &c.fibers[t].ctx);
    }
    if (!any) break;
    if (c.events == before) fail("deadlock: a barrier that not every thread of the CTA (or lane of a warp) reaches");
  }
  for (auto& w : c.warps)
    if (w.g.arrived != 0) fail("a thread exited while its warp waited in a collective");
  if (c.all.arrived != 0) fail("a thread exited while the CTA waited in __syncthreads");
}

bool in_smem(const void* p, size_t bytes) {
  auto* b = static_cast<const unsigned char*>(p);
  return b >= cta->smem.data() && b + bytes <= cta->smem.data() + cta->smem.size();
}

}  // namespace emu

#define threadIdx (emu::self().tid)
#define blockIdx (emu::cta->block)
#define blockDim (emu::cta->dim)
#define M3_PREFILL_DYNAMIC_SMEM(name) unsigned char* name = emu::cta->smem.data()

inline void __syncthreads() { emu::sync(emu::cta->all); }

template <typename T>
T __shfl_xor_sync(unsigned, T v, int mask) {
  static_assert(sizeof(T) <= sizeof(double));
  emu::Warp& w = emu::warp();
  const int l = emu::lane();
  std::memcpy(&w.x[l], &v, sizeof(T));
  emu::sync(w.g);
  T r;
  std::memcpy(&r, &w.x[l ^ mask], sizeof(T));
  emu::sync(w.g);
  return r;
}

// ---------------------------------------------------------------- the primitives of prefill_mma.cuh
namespace memory3::cuda {  // the range-error codes of cuda_common.cuh (a CUDA header)
enum RangeCode : int { kRangeNone = 0, kRangeMemIds = 1, kRangeKvLens = 2, kRangeChunks = 3 };
}  // namespace memory3::cuda

namespace memory3::prefill {

template <typename Elem>
struct ElemTraits;

template <typename Elem>
struct EmulatedTraits {
  static uint16_t bits(float x) {
    if constexpr (std::is_same_v<Elem, bf16_t>) return to_bf16(x).bits;
    else return to_fp16(x).bits;
  }
  static float value(uint16_t b) { return to_float(Elem{b}); }
  static uint32_t pack(float lo, float hi) { return uint32_t(bits(lo)) | (uint32_t(bits(hi)) << 16); }
  static float2 unpack(uint32_t u) { return {value(uint16_t(u & 0xffff)), value(uint16_t(u >> 16))}; }
  static Elem from_float(float x) { return Elem{bits(x)}; }
  static float to_float(Elem x) { return memory3::to_float(x); }
  // mma.m16n8k16: each lane builds A (16 x 16) and B (16 x 8) from the warp's fragments.
  static void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    emu::Warp& w = emu::warp();
    const int t = emu::lane();
    std::memcpy(w.a[t], a, sizeof(w.a[t]));
    w.b[t][0] = b0, w.b[t][1] = b1;
    emu::sync(w.g);
    float A[16][16], B[16][8];
    for (int u = 0; u < 32; ++u) {
      const int g = u / 4, q = u % 4;
      auto lo = [](uint32_t x) { return value(uint16_t(x & 0xffff)); };
      auto hi = [](uint32_t x) { return value(uint16_t(x >> 16)); };
      A[g][2 * q] = lo(w.a[u][0]), A[g][2 * q + 1] = hi(w.a[u][0]);
      A[g + 8][2 * q] = lo(w.a[u][1]), A[g + 8][2 * q + 1] = hi(w.a[u][1]);
      A[g][2 * q + 8] = lo(w.a[u][2]), A[g][2 * q + 9] = hi(w.a[u][2]);
      A[g + 8][2 * q + 8] = lo(w.a[u][3]), A[g + 8][2 * q + 9] = hi(w.a[u][3]);
      B[2 * q][g] = lo(w.b[u][0]), B[2 * q + 1][g] = hi(w.b[u][0]);
      B[2 * q + 8][g] = lo(w.b[u][1]), B[2 * q + 9][g] = hi(w.b[u][1]);
    }
    emu::sync(w.g);
    const int g = t / 4, q = t % 4;
    for (int e = 0; e < 4; ++e) {
      const int row = g + (e / 2) * 8, col = 2 * q + (e & 1);
      float sum = 0.f;
      for (int k = 0; k < 16; ++k) sum += A[row][k] * B[k][col];
      c[e] += sum;
    }
  }
};
template <>
struct ElemTraits<bf16_t> : EmulatedTraits<bf16_t> {};
template <>
struct ElemTraits<fp16_t> : EmulatedTraits<fp16_t> {};

inline void check_row(const void* row) {
  if (reinterpret_cast<uintptr_t>(row) % 16 != 0) emu::fail("ldmatrix row address not 16-byte aligned");
  if (!emu::in_smem(row, 16)) emu::fail("ldmatrix row outside shared memory");
}

// Lane t gets, of matrix i (rows given by lanes 8i..8i+7): plain, row t/4, elements 2(t%4) and
// 2(t%4)+1; transposed, element t/4 of rows 2(t%4) and 2(t%4)+1.
inline void ldmatrix_impl(uint32_t (&r)[4], const void* row, bool trans) {
  check_row(row);
  emu::Warp& w = emu::warp();
  const int t = emu::lane();
  w.ptr[t] = row;
  emu::sync(w.g);
  for (int i = 0; i < 4; ++i) {
    uint16_t lo, hi;
    if (!trans) {
      const auto* rp = static_cast<const uint16_t*>(w.ptr[i * 8 + t / 4]);
      lo = rp[2 * (t % 4)], hi = rp[2 * (t % 4) + 1];
    } else {
      lo = static_cast<const uint16_t*>(w.ptr[i * 8 + 2 * (t % 4)])[t / 4];
      hi = static_cast<const uint16_t*>(w.ptr[i * 8 + 2 * (t % 4) + 1])[t / 4];
    }
    r[i] = uint32_t(lo) | (uint32_t(hi) << 16);
  }
  emu::sync(w.g);
}
inline void ldmatrix_x4(uint32_t (&r)[4], const void* row) { ldmatrix_impl(r, row, false); }
inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row) { ldmatrix_impl(r, row, true); }

inline void cp_async_16(void* dst, const void* src, int bytes) {
  if (reinterpret_cast<uintptr_t>(dst) % 16 != 0 || !emu::in_smem(dst, 16)) emu::fail("cp.async: bad shared address");
  if (bytes != 0 && bytes != 16) emu::fail("cp.async: partial copy");
  if (bytes == 16 && reinterpret_cast<uintptr_t>(src) % 16 != 0) emu::fail("cp.async: unaligned global address");
  if (bytes == 16) emu::check_global(src, 16, "cp.async");
  if (bytes) std::memcpy(dst, src, 16);
  else std::memset(dst, 0, 16);
}
// The device range-error words: the first record wins, as with atomicCAS on the GPU.
inline void record_range(int64_t* words, int code, int64_t index, int64_t value, int64_t bound, int64_t extra = 0) {
  if (words == nullptr || words[0] != 0) return;
  words[0] = (int64_t(code) << 56) | (index + 1), words[1] = value, words[2] = bound, words[3] = extra;
}
inline void cp_async_commit() {}
inline void cp_async_wait_all() {}

}  // namespace memory3::prefill

// The CUDA bf16/fp16 types and conversions the CUDA-core backward uses, as the host's
// bit-exact conversions of memory3/numeric.h.
struct __nv_bfloat16 {
  uint16_t bits;
};
struct __half {
  uint16_t bits;
};
inline float __bfloat162float(__nv_bfloat16 x) { return memory3::to_float(memory3::bf16_t{x.bits}); }
inline float __half2float(__half x) { return memory3::to_float(memory3::fp16_t{x.bits}); }
inline __nv_bfloat16 __float2bfloat16_rn(float x) { return {memory3::to_bf16(x).bits}; }
inline __half __float2half_rn(float x) { return {memory3::to_fp16(x).bits}; }
inline float __expf(float x) { return std::exp(x); }
using std::isinf;

#include "memory3/memory_attention_backward.cuh"
#include "memory3/prefill_attention.cuh"
#include "memory3/prefill_backward.cuh"

// ---------------------------------------------------------------- the driver
namespace {

using namespace memory3;

struct Case {
  int B, T, S, Hq, Hkv, D, N, M, C, R, chunk_size, chunk_start, has_lens, int8, fp16, mem_grad, exact_p, simt;
  double scale;
};

template <typename T>
std::vector<T> read_array(std::ifstream& in, size_t n) {
  std::vector<T> v(n);
  in.read(reinterpret_cast<char*>(v.data()), std::streamsize(n * sizeof(T)));
  if (!in) emu::fail("input file too short");
  return v;
}
template <typename T>
void write_array(std::ofstream& out, const std::vector<T>& v) {
  out.write(reinterpret_cast<const char*>(v.data()), std::streamsize(v.size() * sizeof(T)));
}

// The CUDA-core backward (memory_attention_backward.cuh) with the grids of its launch_backward.
template <typename Elem, bool kInt8>
void run_simt_backward(const Case& c, const MemoryAttentionBwdParams& g, std::vector<float>& delta,
                       std::vector<float>& slots) {
  using T = std::conditional_t<std::is_same_v<Elem, bf16_t>, __nv_bfloat16, __half>;
  using MT = std::conditional_t<kInt8, int8_t, T>;
  const backward::BackwardScratch w{delta.data(), c.mem_grad ? slots.data() : nullptr};
  constexpr int kWarps = backward::kWarpsPerBlock;
  auto blocks = [](int64_t warps) { return (warps + kWarps - 1) / kWarps; };
  for (int64_t blk = 0; blk < blocks(int64_t(c.B) * c.T * c.Hq); ++blk)
    emu::run_cta(unsigned(blk), 32 * kWarps, 0, [&] { backward::dq_kernel<T, MT, float>(g, w); });
  for (int64_t blk = 0; blk < blocks(int64_t(c.B) * c.S * c.Hkv); ++blk)
    emu::run_cta(unsigned(blk), 32 * kWarps, 0, [&] { backward::dkv_kernel<T, MT, float>(g, w); });
  if (!c.mem_grad) return;
  for (int64_t blk = 0; blk < blocks(int64_t(c.B) * c.C * c.R * c.M * c.Hkv); ++blk)
    emu::run_cta(unsigned(blk), 32 * kWarps, 0, [&] { backward::dmem_kernel<T, MT, float>(g, w); });
  const int64_t per_memory = int64_t(c.Hkv) * c.M * c.D;
  for (int64_t blk = 0; blk < (per_memory + 255) / 256; ++blk)
    emu::run_cta(unsigned(blk), 256, 0, [&] { backward::reduce_memory_grads_kernel<float>(g, w); });
}

template <typename Elem, int kD, bool kInt8>
void run(const Case& c, std::ifstream& in, std::ofstream& out) {
  const size_t q_n = size_t(c.B) * c.T * c.Hq * c.D, kv_n = size_t(c.B) * c.S * c.Hkv * c.D;
  const size_t bank_n = size_t(c.N) * c.Hkv * c.M * c.D, stat_n = size_t(c.B) * c.Hq * c.T;
  auto q = read_array<uint16_t>(in, q_n), k = read_array<uint16_t>(in, kv_n), v = read_array<uint16_t>(in, kv_n);
  std::vector<uint16_t> mk16, mv16;
  std::vector<int8_t> mk8, mv8;
  std::vector<float> mks, mvs;
  if (kInt8) {
    mk8 = read_array<int8_t>(in, bank_n), mv8 = read_array<int8_t>(in, bank_n);
    mks = read_array<float>(in, bank_n / c.D), mvs = read_array<float>(in, bank_n / c.D);
  } else {
    mk16 = read_array<uint16_t>(in, bank_n), mv16 = read_array<uint16_t>(in, bank_n);
  }
  auto ids = read_array<int32_t>(in, size_t(c.B) * c.C * c.R);
  std::vector<int32_t> lens = c.has_lens ? read_array<int32_t>(in, c.B) : std::vector<int32_t>{};
  auto dout = read_array<uint16_t>(in, q_n);
  auto dlse = read_array<float>(in, stat_n);
  auto add = [](const auto& v) {
    emu::globals.push_back({reinterpret_cast<const unsigned char*>(v.data()), v.size() * sizeof(v[0])});
  };
  add(q), add(k), add(v), add(mk16), add(mv16), add(mk8), add(mv8), add(dout);

  MemoryAttentionBwdParams g{};
  g.q = q.data(), g.q_stride_b = int64_t(c.T) * c.Hq * c.D, g.q_stride_t = int64_t(c.Hq) * c.D, g.q_stride_h = c.D;
  g.k = k.data(), g.k_stride_b = int64_t(c.S) * c.Hkv * c.D, g.k_stride_s = int64_t(c.Hkv) * c.D, g.k_stride_h = c.D;
  g.v = v.data(), g.v_stride_b = g.k_stride_b, g.v_stride_s = g.k_stride_s, g.v_stride_h = c.D;
  g.mem_k = kInt8 ? static_cast<const void*>(mk8.data()) : mk16.data();
  g.mem_v = kInt8 ? static_cast<const void*>(mv8.data()) : mv16.data();
  g.mk_stride_n = g.mv_stride_n = int64_t(c.Hkv) * c.M * c.D;
  g.mk_stride_h = g.mv_stride_h = int64_t(c.M) * c.D;
  g.mk_stride_m = g.mv_stride_m = c.D;
  g.mem_k_scale = kInt8 ? mks.data() : nullptr;
  g.mem_v_scale = kInt8 ? mvs.data() : nullptr;
  g.mem_ids = ids.data();
  g.kv_lens = c.has_lens ? lens.data() : nullptr;
  std::vector<uint16_t> o(q_n, 0xFFFF), dq(q_n, 0xFFFF), dk(kv_n, 0xFFFF), dv(kv_n, 0xFFFF);  // poisoned (NaN)
  std::vector<float> lse(stat_n, NAN), delta(stat_n, NAN);
  g.out = o.data(), g.lse = lse.data();
  g.B = c.B, g.T = c.T, g.S = c.S, g.Hq = c.Hq, g.Hkv = c.Hkv, g.D = c.D, g.N = c.N, g.M = c.M, g.C = c.C, g.R = c.R;
  g.chunk_size = c.chunk_size, g.chunk_start = c.chunk_start, g.scale = c.scale;
  g.dout = dout.data(), g.dlse = dlse.data();
  g.dq = dq.data(), g.dk = dk.data(), g.dv = dv.data();
  const size_t slots_n = size_t(c.B) * c.C * c.R * 2 * c.Hkv * c.M * c.D;
  std::vector<float> slots(c.mem_grad ? slots_n : 0, NAN), dmk(c.mem_grad ? bank_n : 0, 0.f),
      dmv(c.mem_grad ? bank_n : 0, 0.f);
  g.dmem_k = c.mem_grad ? dmk.data() : nullptr;
  g.dmem_v = c.mem_grad ? dmv.data() : nullptr;

  // The grids of launch_forward and launch_backward.
  const int G = c.Hq / c.Hkv;
  const int64_t bh = int64_t(c.B) * c.Hkv;
  using Cfg = prefill::ForwardConfig<Elem, kD, 4, kInt8>;
  const int64_t q_tiles = (int64_t(c.T) * G + Cfg::kRows - 1) / Cfg::kRows;
  const MemoryAttentionParams& p = g;
  for (int64_t blk = 0; blk < q_tiles * bh; ++blk)
    emu::run_cta(unsigned(blk), Cfg::kThreads, Cfg::kSmem, [&] {
      if (c.exact_p) prefill::memory_attention_prefill_kernel<Elem, kD, 4, kInt8, true>(p);
      else prefill::memory_attention_prefill_kernel<Elem, kD, 4, kInt8, false>(p);
    });

  if (c.simt) {
    run_simt_backward<Elem, kInt8>(c, g, delta, slots);
  } else {
    const int64_t rows = int64_t(c.B) * c.T * c.Hq;
    for (int64_t blk = 0; blk < (rows + 3) / 4; ++blk)
      emu::run_cta(unsigned(blk), 128, 0, [&] { prefill::prefill_delta_kernel<Elem>(g, delta.data()); });
    constexpr int kSmem = prefill::backward_smem_bytes(kD, int(sizeof(Elem)));
    const int64_t bq_tiles = (int64_t(c.T) * G + prefill::kBwdRows - 1) / prefill::kBwdRows;
    for (int64_t blk = 0; blk < bq_tiles * bh; ++blk)
      emu::run_cta(unsigned(blk), prefill::kBwdThreads, kSmem,
                   [&] { prefill::prefill_dq_kernel<Elem, kD, kInt8>(g, delta.data()); });
    const int64_t k_tiles = (int64_t(c.S) + prefill::kBwdRows - 1) / prefill::kBwdRows;
    for (int64_t blk = 0; blk < k_tiles * bh; ++blk)
      emu::run_cta(unsigned(blk), prefill::kBwdThreads, kSmem,
                   [&] { prefill::prefill_dkv_kernel<Elem, kD, false>(g, delta.data(), nullptr); });
    if constexpr (!kInt8) {
      if (c.mem_grad) {
        const int64_t m_tiles = (int64_t(c.R) * c.M + prefill::kBwdRows - 1) / prefill::kBwdRows;
        for (int64_t blk = 0; blk < m_tiles * c.C * bh; ++blk)
          emu::run_cta(unsigned(blk), prefill::kBwdThreads, kSmem,
                       [&] { prefill::prefill_dkv_kernel<Elem, kD, true>(g, delta.data(), slots.data()); });
        // launch_reduce_memory_grads: slots in (b, c, r) order into the bank rows by id.
        const backward::BackwardScratch w{nullptr, slots.data()};
        const int64_t per_memory = int64_t(c.Hkv) * c.M * c.D;
        for (int64_t blk = 0; blk < (per_memory + 255) / 256; ++blk)
          emu::run_cta(unsigned(blk), 256, 0, [&] { backward::reduce_memory_grads_kernel<float>(g, w); });
      }
    }
  }
  write_array(out, o), write_array(out, lse), write_array(out, dq), write_array(out, dk), write_array(out, dv);
  if (c.mem_grad) write_array(out, dmk), write_array(out, dmv);
}

template <typename Elem, bool kInt8>
void run_dims(const Case& c, std::ifstream& in, std::ofstream& out) {
  switch (c.D) {
    case 32: return run<Elem, 32, kInt8>(c, in, out);
    case 64: return run<Elem, 64, kInt8>(c, in, out);
    case 80: return run<Elem, 80, kInt8>(c, in, out);
    case 96: return run<Elem, 96, kInt8>(c, in, out);
    case 128: return run<Elem, 128, kInt8>(c, in, out);
    default: emu::fail("head dim must be 32, 64, 80, 96 or 128");
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) emu::fail("usage: prefill_emulator IN OUT");
  std::ifstream in(argv[1], std::ios::binary);
  std::string header;
  std::getline(in, header);
  Case c{};
  if (std::sscanf(header.c_str(), "%d %d %d %d %d %d %d %d %d %d %d %d %d %d %d %d %d %d %lf", &c.B, &c.T, &c.S,
                  &c.Hq, &c.Hkv, &c.D, &c.N, &c.M, &c.C, &c.R, &c.chunk_size, &c.chunk_start, &c.has_lens, &c.int8,
                  &c.fp16, &c.mem_grad, &c.exact_p, &c.simt, &c.scale) != 19)
    emu::fail("bad header: " + header);
  std::ofstream out(argv[2], std::ios::binary);
  if (c.fp16) c.int8 ? run_dims<fp16_t, true>(c, in, out) : run_dims<fp16_t, false>(c, in, out);
  else c.int8 ? run_dims<bf16_t, true>(c, in, out) : run_dims<bf16_t, false>(c, in, out);
  return 0;
}
