// Memory-aware attention on the CPU: one softmax over the causal context and the memories of
// each query's chunk, memories read by id from the bank in place. Torch-free.
//
// The work is split into items of one (sequence, KV head, block of queries) with all the
// query heads of the GQA group packed as rows (row = query * G + head_in_group), so every
// key and memory row is loaded once per group. Keys come in blocks: first the memories of
// each chunk the query block touches, then the context in blocks of kKeyBlock. Scores use an
// online softmax (no T x S matrix); everything is accumulated in Acc (float, or double for
// double inputs).
//
// Scores are computed transposed, S^T = K Q^T, with one column per query row: K is then the
// GEMM's row operand and is read in place (float inputs: no copy of the context at all), the
// softmax reductions run down the columns, 16 rows per vector, and P^T feeds P V and the
// backward's P^T dO / dS^T Q / dS K as it is (the GEMM reads A transposed for free).
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "memory3/cpu_bf16.h"
#include "memory3/cpu_gemm.h"
#include "memory3/cpu_gemm_fixed.h"
#include "memory3/cpu_rowops.h"
#include "memory3/numeric.h"
#include "memory3/params.h"

namespace memory3::cpu {

// The CPU backward's own scratch (its algorithm, not the op's contract): with more than one
// part per (sequence, KV head), each part's dQ accumulator (summed by the finishing pass; with
// one part dQ accumulates in the thread's own tile and is written at the item's end), and the
// per-slot memory grads that the launcher adds into the bank rows by id in a fixed order, so
// the result is deterministic.
struct BackwardScratch {
  void* dq_parts;   // [B, Hkv, parts, RT, Dp] Acc, zero-filled (RT = rows_per_sequence); null if parts == 1
  void* mem_slots;  // [B, C, R, 2, Hkv, M, D] Acc, or null when the bank gets no gradient
  int parts;        // work items per (sequence, KV head): its key blocks, round robin
};

constexpr int kKeyBlock = 64;   // context keys per block
constexpr int kRowTarget = 64;  // query rows (queries x group heads) per work item
// Backward: queries ahead whose rows of q, dO, O (and dq's rows, for writing) are prefetched
// while one query's rows are packed (or its dq stored). Those tensors pass through the
// backward once, from L3 or memory, and the packing loops waited on them (~6% of the 1-thread
// backward in perf annotate).
constexpr int kRowsAhead = 4;

// One thread's view of a call: scratch tiles plus the per-item passes. T is the dtype of
// q/k/v, MT that of the bank (T or int8_t), Acc the accumulation type. kDotBf16: bf16 inputs
// whose decode scores q . k of the context run on the CPU's bf16 dot-product unit
// (vdpbf16ps: products of two bf16 are exact in float, summed in float), K read as bf16 in
// place; only instantiated inside a worker compiled for AVX512-BF16 (M3_CPU_BF16_TARGET)
// and called when the CPU has it.
template <typename T, typename MT, typename Acc, bool kDotBf16 = false>
class MemoryAttentionCpu {
  static_assert(!kDotBf16 || (std::is_same_v<T, bf16_t> && std::is_same_v<Acc, float>));

 public:
  static constexpr int MR = GemmTile<Acc>::MR;
  static constexpr int NR = GemmTile<Acc>::NR;
  // Context rows are GEMM operands in place when they are already Acc (K as the row operand
  // of S^T = K Q^T: any D; as a column operand, V and the backward's K: rows of Dp columns).
  static constexpr bool kInPlace = std::is_same_v<T, Acc>;
  // Float backward: the recomputed scores S^T (through the K^T panel) and lse are kept in log2
  // units, so P = 2^(S - lse) needs no multiply per score; double keeps natural units.
  static constexpr Acc kScoreUnit = std::is_same_v<Acc, float> ? Acc(1.4426950408889634) : Acc(1);

  MemoryAttentionCpu(const MemoryAttentionParams& p, int block_q)
      : p_(p), G_(p.Hq / p.Hkv), BQ_(block_q), Dp_(round_up(p.D, NR)),
        RQ_(round_up(block_q * (p.Hq / p.Hkv), NR)),
        KP_(round_up(std::max(kKeyBlock, p.R * p.M), NR)), DR_(round_up(p.Hq, 4) + 4),
        Dh_(round_up(p.D, kBf16Lanes)) {
    auto tile = [](std::vector<Acc>& t, size_t n) { t.assign(n, Acc(0)); };
    const size_t rows = size_t(std::max(RQ_, DR_));  // decode: every head's rows (+ a 4-row group)
    tile(q_, rows * Dp_);
    tile(qt_, size_t(p.D) * RQ_);
    tile(o_, rows * Dp_);
    tile(s_, rows * KP_);
    tile(st_, size_t(KP_) * RQ_);
    tile(kn_, size_t(KP_) * Dp_);
    tile(vn_, size_t(KP_) * Dp_);
    tile(zrow_, size_t(Dp_));
    if constexpr (kDotBf16) {
      qh_.assign(size_t(DR_) * Dh_, bf16_t{0});
      zrowh_.assign(size_t(Dh_), bf16_t{0});
    }
    m_.assign(rows, Acc(0));
    l_.assign(rows, Acc(0));
    alpha_.assign(RQ_, Acc(0));
    lim_.assign(RQ_, 0);
    slot_.assign(KP_, 0);
  }

  // Position in the context of query i of sequence b (may be < 0 for padded queries).
  int query_base(int b) const { return kv_len(b) - p_.T; }
  int kv_len(int b) const { return p_.kv_lens ? p_.kv_lens[b] : p_.S; }
  // First position of chunk c, in int64: chunk_start + c * chunk_size may pass int32 even
  // when each of them fits (the launcher checks each against int32 only).
  int64_t chunk_begin(int c) const { return p_.chunk_start + int64_t(c) * p_.chunk_size; }
  // Backward: columns of one sequence's query rows in the per-item tiles (query blocks of
  // RQ_ columns each, padding columns included).
  int rows_per_sequence() const { return (p_.T + BQ_ - 1) / BQ_ * RQ_; }

  // ---------------------------------------------------------------- forward
  M3_ALWAYS_INLINE void forward_item(int b, int kvh, int i0) {
    const int nq = std::min(BQ_, p_.T - i0);
    const int rows = nq * G_;
    const int pbase = query_base(b) + i0;  // position of the block's first query
    if constexpr (std::is_same_v<Acc, float>) {
      if (nq == 1) {  // a one-query block: the decode path, one KV head
        pack_decode_rows(b, i0, kvh, kvh + 1);
        decode_rows(b, kvh, kvh + 1, pbase, 0, pbase + 1, /*with_memories=*/true);
        finish_rows(b, kvh, i0, rows);
        return;
      }
    }
    pack_query_cols(qt_.data(), RQ_, b, kvh, i0, nq);
    std::fill(m_.begin(), m_.end(), -std::numeric_limits<Acc>::infinity());
    std::fill(l_.begin(), l_.end(), Acc(0));
    std::fill(o_.begin(), o_.end(), Acc(0));
    // The memories of each chunk the block touches (rows of other chunks see none of them).
    const int p_last = pbase + nq - 1;
    for (int p = std::max({pbase, p_.chunk_start, 0}); p <= p_last;) {
      const int c = (p - p_.chunk_start) / p_.chunk_size;
      const int p_end = int(std::min<int64_t>(p_last, chunk_begin(c + 1) - 1));
      const int n = pack_memory_rows(b, c, kvh);
      if (n > 0) attend_block(kn_.data(), Dp_, vn_.data(), Dp_, n, (p - pbase) * G_, (p_end - pbase + 1) * G_, pbase, -1);
      p = p_end + 1;
    }
    for (int j0 = 0; j0 <= p_last; j0 += kKeyBlock) {
      const int n = std::min(kKeyBlock, p_last + 1 - j0);
      const Acc *K, *V;
      int ldk, ldv;
      context_rows(b, kvh, j0, n, /*k_as_columns=*/false, K, ldk, V, ldv);
      attend_block(K, ldk, V, ldv, n, std::max(0, j0 - pbase) * G_, rows, pbase, j0);
    }
    finish_rows(b, kvh, i0, rows);
  }

  // out = o / l and lse = m + log l for the item's rows.
  M3_ALWAYS_INLINE void finish_rows(int b, int kvh, int i0, int rows) {
    for (int r = 0; r < rows; ++r) finish_row(r, b, i0 + r / G_, kvh * G_ + r % G_);
  }

  // The same for a decode item: row r is query head r of sequence b's last query.
  M3_ALWAYS_INLINE void finish_decode(int b) {
    for (int r = 0; r < p_.Hq; ++r) finish_row(r, b, p_.T - 1, r);
  }

  M3_ALWAYS_INLINE void finish_row(int r, int b, int i, int h) {
    T* out = static_cast<T*>(p_.out) + ((int64_t(b) * p_.T + i) * p_.Hq + h) * p_.D;
    float* lse = p_.lse + (int64_t(b) * p_.Hq + h) * p_.T + i;
    if (l_[r] > Acc(0)) {
      const Acc inv = Acc(1) / l_[r];
      for (int d = 0; d < p_.D; ++d) out[d] = store_as<T>(o_[r * Dp_ + d] * inv);
      *lse = float(m_[r] + std::log(l_[r]));
    } else {  // a query that sees no key at all (padding): zero output, lse = -inf
      for (int d = 0; d < p_.D; ++d) out[d] = store_as<T>(Acc(0));
      *lse = -std::numeric_limits<float>::infinity();
    }
  }

  // Decode (T == 1, float accumulation): the query of sequence b, every KV head in one item,
  // so each context row [Hkv, D] is read once, front to back. Context part `part` of `parts`
  // (whole key blocks; the memories go with part 0). parts == 1: out and lse written; else the
  // unnormalized o [Hq][D], m and l [Hq] go to the part's slots for merge_decode.
  M3_ALWAYS_INLINE void decode_item(int b, int part, int parts, float* o, float* m, float* l) {
    static_assert(std::is_same_v<Acc, float>);
    const int pos = query_base(b), L = std::max(pos + 1, 0);
    const int len = round_up((L + parts - 1) / parts, kKeyBlock);
    pack_decode_rows(b, p_.T - 1, 0, p_.Hkv);
    decode_rows(b, 0, p_.Hkv, pos, std::min(L, part * len), std::min(L, (part + 1) * len), part == 0);
    if (parts == 1) return finish_decode(b);
    for (int r = 0; r < p_.Hq; ++r) {
      std::copy(o_.data() + r * Dp_, o_.data() + r * Dp_ + p_.D, o + r * p_.D);
      m[r] = m_[r], l[r] = l_[r];
    }
  }

  // out and lse of sequence b's decode query from its parts' o, m, l (layout of decode_item).
  M3_ALWAYS_INLINE void merge_decode(int b, int parts, const float* o, const float* m, const float* l) {
    const int H = p_.Hq;
    for (int r = 0; r < H; ++r) {
      float mx = -std::numeric_limits<float>::infinity();
      for (int s = 0; s < parts; ++s) mx = std::max(mx, m[s * H + r]);
      m_[r] = mx, l_[r] = 0;
      std::fill(o_.data() + r * Dp_, o_.data() + (r + 1) * Dp_, 0.0f);
      for (int s = 0; s < parts; ++s) {
        if (l[s * H + r] == 0.0f) continue;  // a part that saw no key
        const float w = std::exp(m[s * H + r] - mx);
        l_[r] += w * l[s * H + r];
        const float* os = o + (int64_t(s) * H + r) * p_.D;
        for (int d = 0; d < p_.D; ++d) o_[r * Dp_ + d] += w * os[d];
      }
    }
    finish_decode(b);
  }

  // ---------------------------------------------------------------- backward
  // FlashAttention-2's order: for each key block (context blocks, then each chunk's
  // memories) of sequence b and KV head kvh that this part owns, the query blocks that see it
  // recompute P^T from lse, and dK, dV of the block accumulate over them while dQ accumulates
  // per item (in w.dq_parts when the item is one of several parts, else in this thread's
  // tile). Five GEMMs per (key block, query block); the key block's K^T and V^T are packed
  // once as panels for all its query blocks. dk/dv rows and memory slots are each written by
  // exactly one item.
  M3_ALWAYS_INLINE void backward_item(const MemoryAttentionBwdParams& g, const BackwardScratch& w, int b, int kvh,
                                      int part) {
    ensure_backward_tiles();
    pack_backward_rows(g, b, kvh);
    const int RT = rows_per_sequence();
    Acc* dq = bdq_.data();
    if (w.dq_parts) dq = static_cast<Acc*>(w.dq_parts) + ((int64_t(b) * p_.Hkv + kvh) * w.parts + part) * RT * Dp_;
    else std::fill(bdq_.begin(), bdq_.end(), Acc(0));
    const int L = kv_len(b), qbase = query_base(b), nqb = (p_.T + BQ_ - 1) / BQ_;
    for (int kb = part; kb * kKeyBlock < L; kb += w.parts) {
      const int j0 = kb * kKeyBlock, n = std::min(kKeyBlock, L - j0);
      const Acc *K, *V;
      int ldk, ldv;
      context_rows(b, kvh, j0, n, /*k_as_columns=*/true, K, ldk, V, ldv);
      transpose(kt_.data(), KP_, K, ldk, n, p_.D, kScoreUnit);
      transpose(vt_.data(), KP_, V, ldv, n, p_.D);
      std::fill(dk_.begin(), dk_.begin() + n * Dp_, Acc(0));
      std::fill(dv_.begin(), dv_.begin() + n * Dp_, Acc(0));
      for (int qb = std::max(0, j0 - qbase) / BQ_; qb < nqb; ++qb) {
        const int nq = std::min(BQ_, p_.T - qb * BQ_), pbase = qbase + qb * BQ_;
        // Keys past the block's last query and queries before the block's first key see
        // nothing of each other: the diagonal block pairs shrink to what is seen.
        const int seen = std::min(n, pbase + nq - j0);
        key_grads_block(K, ldk, seen, qb, std::max(0, j0 - pbase) * G_, nq * G_, pbase, j0, dq);
      }
      const int64_t off = ((int64_t(b) * p_.S + j0) * p_.Hkv + kvh) * p_.D;
      for (int jj = 0; jj < n; ++jj) {
        T* dk = static_cast<T*>(g.dk) + off + int64_t(jj) * p_.Hkv * p_.D;
        T* dv = static_cast<T*>(g.dv) + off + int64_t(jj) * p_.Hkv * p_.D;
        for (int d = 0; d < p_.D; ++d) {
          dk[d] = store_as<T>(dk_[jj * Dp_ + d]);
          dv[d] = store_as<T>(dv_[jj * Dp_ + d]);
        }
      }
    }
    if (part == 0) zero_padding_key_grads(g, b, kvh, L);
    memory_key_grads(w, b, kvh, part, dq);
    if (!w.dq_parts) store_dq(g, b, kvh, dq, 1);
  }

  // dq of (b, kvh): the parts' accumulators summed, times the softmax scale.
  M3_ALWAYS_INLINE void backward_finish_dq(const MemoryAttentionBwdParams& g, const BackwardScratch& w, int b,
                                           int kvh) {
    const int64_t part_elems = int64_t(rows_per_sequence()) * Dp_;
    store_dq(g, b, kvh, static_cast<const Acc*>(w.dq_parts) + (int64_t(b) * p_.Hkv + kvh) * w.parts * part_elems,
             w.parts);
  }

 private:
  // ---------------------------------------------------------------- forward blocks
  // Keys [0, n) as rows of K (leading dim ldk) and V (ldv), for query rows [row_lo, row_end):
  // S^T = K Q^T, the online softmax down each column, O += P V.
  M3_ALWAYS_INLINE void attend_block(const Acc* K, int ldk, const Acc* V, int ldv, int n, int row_lo, int row_end,
                                     int pbase, int causal_j0) {
    const int ca = row_lo / NR * NR, cb = round_up(row_end, NR);
    gemm<Acc>(st_.data() + ca, RQ_, K, ldk, 1, qt_.data() + ca, RQ_, n, cb - ca, p_.D, false);
    set_limits(ca, cb, row_lo, row_end, pbase, n, causal_j0);
    online_softmax_columns(ca, cb, n);
    for (int r = ca; r < cb; ++r)
      if (alpha_[r] != Acc(1)) {
        Acc* o = o_.data() + r * Dp_;
        for (int d = 0; d < Dp_; ++d) o[d] *= alpha_[r];
      }
    gemm<Acc>(o_.data() + ca * Dp_, Dp_, st_.data() + ca, 1, RQ_, V, ldv, cb - ca, Dp_, n, true);
  }

  // lim_[r] for r in [ca, cb): how many of the block's keys row r sees (0 outside [lo, hi)).
  // Returns whether every row sees all n keys (nothing to mask).
  M3_ALWAYS_INLINE bool set_limits(int ca, int cb, int lo, int hi, int pbase, int n, int causal_j0) {
    bool all_seen = true;
    for (int r = ca; r < cb; ++r) {
      if (r < lo || r >= hi) lim_[r] = 0;
      else if (causal_j0 < 0) lim_[r] = n;
      else lim_[r] = std::max(0, std::min(n, pbase + r / G_ - causal_j0 + 1));
      all_seen &= lim_[r] == n;
    }
    return all_seen;
  }

  // st_ columns [ca, cb), keys [0, n): scores in, probabilities out; m_, l_ updated and
  // alpha_ = the factor the rows' O must be scaled by.
  M3_ALWAYS_INLINE void online_softmax_columns(int ca, int cb, int n) {
    constexpr Acc kNegInf = -std::numeric_limits<Acc>::infinity();
    if constexpr (std::is_same_v<Acc, float>) {
      for (int c = ca; c < cb; c += kVecF) {
        VecI lim;
        std::memcpy(&lim, lim_.data() + c, sizeof(lim));
        // Masked keys become -inf (exp gives 0). Each select takes its mask from the compare
        // right there: GCC scalarizes a select on a combined or carried mask in the clones.
        const VecF neg_inf = VecF{} + kNegInf;
        VecF mx = neg_inf;
        for (int j = 0; j < n; ++j) {
          float* sp = st_.data() + j * RQ_ + c;
          VecF s = load_vec(sp);
          s = (VecI{} + j) < lim ? s : neg_inf;
          store_vec(sp, s);
          mx = s > mx ? s : mx;
        }
        const VecF m_old = load_vec(m_.data() + c);
        const VecF m_new = mx > m_old ? mx : m_old;
        const VecF shift = m_new == kNegInf ? VecF{} : m_new;  // no key seen yet: keep 0s
        const VecF alpha = exp_nonpositive(m_old - shift);
        VecF sum{};
        for (int j = 0; j < n; ++j) {
          float* sp = st_.data() + j * RQ_ + c;
          const VecF p = exp_nonpositive(load_vec(sp) - shift);
          store_vec(sp, p);
          sum += p;
        }
        store_vec(l_.data() + c, load_vec(l_.data() + c) * alpha + sum);
        store_vec(m_.data() + c, m_new);
        store_vec(alpha_.data() + c, alpha);
      }
    } else {
      for (int c = ca; c < cb; ++c) {
        Acc mx = kNegInf;
        for (int j = 0; j < lim_[c]; ++j) mx = std::max(mx, st_[j * RQ_ + c]);
        const Acc m_new = std::max(m_[c], mx), shift = m_new == kNegInf ? Acc(0) : m_new;
        Acc sum = 0;
        for (int j = 0; j < n; ++j) {
          Acc& s = st_[j * RQ_ + c];
          s = j < lim_[c] ? std::exp(s - shift) : Acc(0);
          sum += s;
        }
        alpha_[c] = std::exp(m_[c] - shift);
        l_[c] = l_[c] * alpha_[c] + sum;
        m_[c] = m_new;
      }
    }
  }

  // Decode: the G rows of each KV head h in [h_lo, h_hi) (row (h - h_lo) * G + g, packed by
  // pack_decode_rows) against the memories of position pos's chunk (with_memories) and then
  // the context keys [j_lo, j_hi). Each key block is walked for every head in turn while it
  // is in cache, so the rows [Hkv, D] of the context stream in front to back (one head's
  // rows, Hkv * D apart, were latency-bound). Per head: scores, the softmax of each row, and
  // O += P V as a GEMM (O's rows stay in registers across the block's keys).
  M3_ALWAYS_INLINE void decode_rows(int b, int h_lo, int h_hi, int pos, int j_lo, int j_hi, bool with_memories) {
    const int rows = (h_hi - h_lo) * G_;
    std::fill(m_.begin(), m_.begin() + rows, -std::numeric_limits<Acc>::infinity());
    std::fill(l_.begin(), l_.begin() + rows, Acc(0));
    std::fill(o_.begin(), o_.begin() + rows * Dp_, Acc(0));
    const T* kseq = static_cast<const T*>(p_.k) + b * p_.k_stride_b;
    const T* vseq = static_cast<const T*>(p_.v) + b * p_.v_stride_b;
    const bool memories = with_memories && pos >= std::max(p_.chunk_start, 0);
    // Block -1: the chunk's memories (rows of kn_ / vn_), then the context in key blocks.
    for (int j0 = memories ? -1 : j_lo; j0 < j_hi; j0 = j0 < 0 ? j_lo : j0 + kKeyBlock) {
      prefetch_decode_block(kseq, vseq, h_lo, h_hi, j0 < 0 ? j_lo : j0 + kKeyBlock, j_hi);
      for (int h = h_lo; h < h_hi; ++h) {
        const int r0 = (h - h_lo) * G_;
        const Acc *K = kn_.data(), *V = vn_.data();
        int64_t ldk = Dp_, ldv = Dp_;
        int n;
        if (j0 < 0) {
          if ((n = pack_memory_rows(b, (pos - p_.chunk_start) / p_.chunk_size, h)) == 0) continue;
        } else {
          n = std::min(kKeyBlock, j_hi - j0);
          const T* k = kseq + h * p_.k_stride_h + j0 * p_.k_stride_s;
          const T* v = vseq + h * p_.v_stride_h + j0 * p_.v_stride_s;
          if constexpr (kDotBf16) {
            decode_scores_bf16(k, p_.k_stride_s, n, r0);
          } else if constexpr (kInPlace) {  // float rows of Dp_ = D columns are read as they are
            if (p_.D == Dp_) K = k, ldk = p_.k_stride_s;
          }
          if (K == kn_.data() && !kDotBf16)
            for (int jj = 0; jj < n; ++jj) pack_row(kn_.data() + jj * Dp_, k + jj * p_.k_stride_s, Acc(1));
          if constexpr (kInPlace) {
            if (p_.D == Dp_) V = v, ldv = p_.v_stride_s;
          }
          if (V == vn_.data())
            for (int jj = 0; jj < n; ++jj) pack_row(vn_.data() + jj * Dp_, v + jj * p_.v_stride_s, Acc(1));
        }
        if (!kDotBf16 || j0 < 0) decode_scores(K, ldk, n, r0);
        decode_softmax_pv(V, int(ldv), n, r0);
      }
    }
  }

  // The rows [Hkv, D] of the next key block [j, j_hi) of every head, when they are packed
  // (head stride D) and a row spans 2 KB or more (the paper's heads in float: 2.5 KB): the hardware prefetcher does not run that far
  // ahead (7.7 -> 4.7 ms at Hq=40, Hkv=8, D=80), while for small rows the prefetches only
  // cost time (0.45 -> 0.55 ms at Hkv=2, D=64 in bf16; thread CPU time, one core).
  M3_ALWAYS_INLINE void prefetch_decode_block(const T* kseq, const T* vseq, int h_lo, int h_hi, int j, int j_hi) {
    const int64_t kbytes = ((h_hi - h_lo - 1) * p_.k_stride_h + p_.D) * int64_t(sizeof(T));
    const int64_t vbytes = ((h_hi - h_lo - 1) * p_.v_stride_h + p_.D) * int64_t(sizeof(T));
    if (p_.k_stride_h != p_.D || p_.v_stride_h != p_.D || std::min(kbytes, vbytes) < 2048) return;
    for (int jj = j; jj < std::min(j + kKeyBlock, j_hi); ++jj) {
      const char* k = reinterpret_cast<const char*>(kseq + jj * p_.k_stride_s + h_lo * p_.k_stride_h);
      const char* v = reinterpret_cast<const char*>(vseq + jj * p_.v_stride_s + h_lo * p_.v_stride_h);
      for (int64_t off = 0; off < kbytes; off += 64) __builtin_prefetch(k + off);
      for (int64_t off = 0; off < vbytes; off += 64) __builtin_prefetch(v + off);
    }
  }

  // s_ rows [r0, r0 + G_) = q_ rows . K rows [0, n) (float rows of Dp_ readable columns).
  // Rows go 4 at a time, so up to 3 rows past the head's are scored too (the next head's, or
  // zero rows) and never used; 4 rows x 4 keys are 16 dot products folded by one shuffle tree.
  M3_ALWAYS_INLINE void decode_scores(const Acc* K, int64_t ldk, int n, int r0) {
    const int np = round_up(n, NR);
    for (int jj = 0; jj < np; jj += 4) {
      const float* kr[4];
      for (int x = 0; x < 4; ++x) kr[x] = jj + x < n ? K + (jj + x) * ldk : zrow_.data();
      for (int r = r0; r < r0 + G_; r += 4) {
        VecF acc[16] = {};  // lane group i * 4 + x: row r + i, key jj + x
        for (int d = 0; d < Dp_; d += kVecF) {
          VecF kv[4], qv[4];
          for (int x = 0; x < 4; ++x) kv[x] = load_vec(kr[x] + d);
          for (int i = 0; i < 4; ++i) qv[i] = load_vec(q_.data() + (r + i) * Dp_ + d);
          for (int i = 0; i < 4; ++i)
            for (int x = 0; x < 4; ++x) acc[i * 4 + x] += qv[i] * kv[x];
        }
        const VecF sums = hsum16(acc);
        for (int i = 0; i < 4; ++i) std::memcpy(s_.data() + (r + i) * KP_ + jj, &sums[i * 4], 4 * sizeof(float));
      }
    }
  }

  // The same on the bf16 dot-product unit, bf16 K rows (D columns, any stride) read in place
  // against the raw bf16 queries qh_; the scale multiplies the float sums.
  M3_ALWAYS_INLINE void decode_scores_bf16(const T* K, int64_t ldk, int n, int r0) {
#if M3_CPU_BF16_DOT
    if constexpr (kDotBf16) {
      const int np = round_up(n, NR), D = p_.D, full = D / kBf16Lanes * kBf16Lanes;
      const float scale = float(p_.scale);
      for (int jj = 0; jj < np; jj += 4) {
        const bf16_t* kr[4];
        for (int x = 0; x < 4; ++x) kr[x] = jj + x < n ? K + (jj + x) * ldk : zrowh_.data();
        for (int r = r0; r < r0 + G_; r += 4) {
          VecF acc[16] = {};
          const bf16_t* qr = qh_.data() + int64_t(r) * Dh_;
          for (int d = 0; d < full; d += kBf16Lanes) {
            VecBf kv[4], qv[4];
            for (int x = 0; x < 4; ++x) kv[x] = load_bf16(kr[x] + d);
            for (int i = 0; i < 4; ++i) qv[i] = load_bf16(qr + i * Dh_ + d);
            for (int i = 0; i < 4; ++i)
              for (int x = 0; x < 4; ++x) acc[i * 4 + x] = dot_bf16(acc[i * 4 + x], qv[i], kv[x]);
          }
          if (full < D) {  // the last D % 32 columns; qh_ rows are zero past D
            VecBf kv[4], qv[4];
            for (int x = 0; x < 4; ++x) kv[x] = load_bf16_head(kr[x] + full, D - full);
            for (int i = 0; i < 4; ++i) qv[i] = load_bf16(qr + i * Dh_ + full);
            for (int i = 0; i < 4; ++i)
              for (int x = 0; x < 4; ++x) acc[i * 4 + x] = dot_bf16(acc[i * 4 + x], qv[i], kv[x]);
          }
          const VecF sums = hsum16(acc) * scale;
          for (int i = 0; i < 4; ++i) std::memcpy(s_.data() + (r + i) * KP_ + jj, &sums[i * 4], 4 * sizeof(float));
        }
      }
    }
#endif
  }

  // Rows [r0, r0 + G_) of s_ hold scores of keys [0, n): the online softmax of each row, then
  // O += P V with V's rows [0, n) (ldv apart, Dp_ readable columns).
  M3_ALWAYS_INLINE void decode_softmax_pv(const Acc* V, int ldv, int n, int r0) {
    const int np = round_up(n, NR);
    for (int r = r0; r < r0 + G_; ++r) {
      Acc* s = s_.data() + r * KP_;
      mask_tail(s, n, np);
      const Acc m_new = std::max(m_[r], row_max(s, np));
      const Acc alpha = std::exp(m_[r] - m_new);
      l_[r] = l_[r] * alpha + row_exp_sum(s, np, m_new);
      m_[r] = m_new;
      if (alpha != Acc(1)) {
        Acc* o = o_.data() + r * Dp_;
        for (int d = 0; d < Dp_; ++d) o[d] *= alpha;
      }
    }
    gemm<Acc>(o_.data() + r0 * Dp_, Dp_, s_.data() + r0 * KP_, KP_, 1, V, ldv, G_, Dp_, n, true);
  }

  // ---------------------------------------------------------------- backward blocks
  // The memories of each chunk holding queries of b (this part's chunks): seen by that
  // chunk's queries only; their grads go to the chunk's slots when the bank is trainable.
  M3_ALWAYS_INLINE void memory_key_grads(const BackwardScratch& w, int b, int kvh, int part, Acc* dq) {
    const int L = kv_len(b), qbase = query_base(b);
    const int p_lo = std::max({qbase, 0, p_.chunk_start});
    if (p_lo >= L) return;
    const int c_lo = (p_lo - p_.chunk_start) / p_.chunk_size, c_hi = (L - 1 - p_.chunk_start) / p_.chunk_size;
    for (int c = c_lo + part; c <= c_hi; c += w.parts) {
      const int lo = int(std::max<int64_t>(chunk_begin(c), p_lo)) - qbase;  // query indices [lo, hi)
      const int hi = int(std::min<int64_t>(chunk_begin(c + 1), L)) - qbase;
      const int n = pack_memory_rows(b, c, kvh);
      if (n == 0) continue;
      transpose(kt_.data(), KP_, kn_.data(), Dp_, n, p_.D, kScoreUnit);
      transpose(vt_.data(), KP_, vn_.data(), Dp_, n, p_.D);
      std::fill(dk_.begin(), dk_.begin() + n * Dp_, Acc(0));
      std::fill(dv_.begin(), dv_.begin() + n * Dp_, Acc(0));
      for (int qb = lo / BQ_; qb * BQ_ < hi; ++qb) {
        const int i0 = qb * BQ_;
        const int row_lo = (std::max(lo, i0) - i0) * G_, row_end = (std::min(hi, i0 + BQ_) - i0) * G_;
        key_grads_block(kn_.data(), Dp_, n, qb, row_lo, row_end, qbase + i0, -1, dq);
      }
      if (!w.mem_slots) continue;
      Acc* slots = static_cast<Acc*>(w.mem_slots);
      const int64_t slot_elems = int64_t(p_.M) * p_.D;
      for (int jj = 0; jj < n; ++jj) {
        const int r = slot_[jj] / p_.M, t = slot_[jj] % p_.M;
        for (int kv = 0; kv < 2; ++kv) {  // [B, C, R, 2, Hkv, M, D]
          Acc* dst = slots + ((((int64_t(b) * p_.C + c) * p_.R + r) * 2 + kv) * p_.Hkv + kvh) * slot_elems +
                     int64_t(t) * p_.D;
          const Acc* src = (kv == 0 ? dk_ : dv_).data() + jj * Dp_;
          std::copy(src, src + p_.D, dst);
        }
      }
    }
  }

  // Keys [0, n) (K^T, V^T in the kt_ / vt_ panels, K also as rows for dQ) against the rows
  // [row_lo, row_end) of query block qb: P^T and dS^T recomputed, dV += P^T dO,
  // dK += dS^T (scale Q), dQ += dS K (scaled at the end).
  M3_ALWAYS_INLINE void key_grads_block(const Acc* K, int ldk, int n, int qb, int row_lo, int row_end, int pbase,
                                        int causal_j0, Acc* dq) {
    const int ca = row_lo / NR * NR, cb = round_up(row_end, NR), c0 = qb * RQ_ + ca, w = cb - ca;
    const int64_t blk = int64_t(qb) * p_.D * RQ_ + ca;  // the query block's Q^T / dO^T panel
    gemm_panel<Acc>(st_.data() + ca, RQ_, kt_.data(), KP_, bqt_.data() + blk, RQ_, n, w, p_.D, false);
    gemm_panel<Acc>(dpt_.data() + ca, RQ_, vt_.data(), KP_, bdot_.data() + blk, RQ_, n, w, p_.D, false);
    const bool all_seen = set_limits(ca, cb, row_lo, row_end, pbase, n, causal_j0);
    probabilities_and_ds_columns(ca, cb, n, qb * RQ_, all_seen);
    gemm_key_rows(dv_.data(), st_.data() + ca, bdo_.data() + int64_t(c0) * Dp_, n, w);
    gemm_key_rows(dk_.data(), dpt_.data() + ca, bq_.data() + int64_t(c0) * Dp_, n, w);
    gemm_panel<Acc>(dq + int64_t(c0) * Dp_, Dp_, dpt_.data() + ca, RQ_, K, ldk, w, Dp_, n, true);
  }

  // C [n x Dp] += A B with A = a P^T / dS^T tile (rows of RQ_ columns, w of them used) and
  // B = w rows of Dp: the row stride is a compile-time constant in the usual case.
  M3_ALWAYS_INLINE void gemm_key_rows(Acc* C, const Acc* A, const Acc* B, int n, int w) {
    if (RQ_ == kRowTarget) gemm_fixed<Acc, kRowTarget>(C, Dp_, A, 0, B, Dp_, n, Dp_, w, true);
    else gemm<Acc>(C, Dp_, A, RQ_, 1, B, Dp_, n, Dp_, w, true);
  }

  // P^T = exp(S^T - lse) and dS^T = P^T (dP^T - delta) in place over st_ / dpt_, columns
  // [ca, cb) of the query block whose tiles start at column c0. Float: S^T and lse are in
  // log2 units (kScoreUnit), so P^T = 2^(S^T - lse). all_seen: no key is masked for any of the
  // columns (every block pair off the diagonal), so the per-key compare and select are left out.
  M3_ALWAYS_INLINE void probabilities_and_ds_columns(int ca, int cb, int n, int c0, bool all_seen) {
    if constexpr (std::is_same_v<Acc, float>) {
      auto columns = [&](auto masked) M3_LAMBDA_INLINE {
        for (int c = ca; c < cb; c += kVecF) {
          VecI lim;
          std::memcpy(&lim, lim_.data() + c, sizeof(lim));
          const VecF lse = load_vec(blse_.data() + c0 + c), delta = load_vec(bdelta_.data() + c0 + c);
          const VecF neg_inf = VecF{} - std::numeric_limits<float>::infinity();
          for (int j = 0; j < n; ++j) {
            float *sp = st_.data() + j * RQ_ + c, *dp = dpt_.data() + j * RQ_ + c;
            VecF s = load_vec(sp);
            if constexpr (decltype(masked)::value)
              s = (VecI{} + j) < lim ? s : neg_inf;  // masked: 2^-inf = 0 (see above on selects)
            const VecF p = exp2_nonpositive(s - lse);
            store_vec(sp, p);
            store_vec(dp, p * (load_vec(dp) - delta));
          }
        }
      };
      if (all_seen) columns(std::false_type{});
      else columns(std::true_type{});
    } else {
      for (int c = ca; c < cb; ++c)
        for (int j = 0; j < n; ++j) {
          Acc &s = st_[j * RQ_ + c], &dp = dpt_[j * RQ_ + c];
          s = j < lim_[c] ? std::exp(s - blse_[c0 + c]) : Acc(0);
          dp = s * (dp - bdelta_[c0 + c]);
        }
    }
  }

  // Every query row of (b, kvh), in query blocks of RQ_ columns: Q (scaled) and dO as rows,
  // Q^T and dO^T as one [D x RQ_] panel per block, lse and delta = rowsum(dO * O) - dlse.
  // Padding rows and columns [D, Dp) are the same for every item and never written: they keep
  // the tiles' first values (zero, lse = +inf: P = 0), so nothing is cleared per item.
  M3_ALWAYS_INLINE void pack_backward_rows(const MemoryAttentionBwdParams& g, int b, int kvh) {
    using V = typename Vec64<Acc>::type;
    constexpr int W = GemmTile<Acc>::NR;
    const T* q = static_cast<const T*>(p_.q);
    const T* dout = static_cast<const T*>(g.dout);
    const T* out = static_cast<const T*>(g.out);
    for (int i = 0; i < p_.T; ++i)
      for (int gh = 0; gh < G_; ++gh) {
        const int r = i / BQ_ * RQ_ + i % BQ_ * G_ + gh, h = kvh * G_ + gh;
        const int64_t row = (int64_t(b) * p_.T + i) * p_.Hq + h;
        const int64_t stat = (int64_t(b) * p_.Hq + h) * p_.T + i;
        if (i + kRowsAhead < p_.T) {  // the rows come from L3 or memory: fetch ahead (see kRowsAhead)
          const int64_t ahead = row + int64_t(kRowsAhead) * p_.Hq;
          prefetch_row(q + b * p_.q_stride_b + (i + kRowsAhead) * p_.q_stride_t + h * p_.q_stride_h);
          prefetch_row(dout + ahead * p_.D);
          prefetch_row(out + ahead * p_.D);
        }
        Acc* dor = bdo_.data() + int64_t(r) * Dp_;
        pack_row(bq_.data() + int64_t(r) * Dp_, q + b * p_.q_stride_b + i * p_.q_stride_t + h * p_.q_stride_h,
                 Acc(p_.scale));
        pack_row(dor, dout + row * p_.D, Acc(1));
        // Float rows of whole vectors are read in place; else converted into orow_.
        const Acc* orow = orow_.data();
        if constexpr (kInPlace) {
          if (p_.D == Dp_) orow = reinterpret_cast<const Acc*>(out + row * p_.D);
        }
        if (orow == orow_.data()) pack_row(orow_.data(), out + row * p_.D, Acc(1));
        const float lse = p_.lse[stat];
        // A query that saw no key has lse = -inf and gets no gradient.
        blse_[r] = std::isinf(lse) && lse < 0 ? std::numeric_limits<Acc>::infinity() : Acc(lse) * kScoreUnit;
        V dot{};  // rows are zero past D
        for (int d = 0; d < Dp_; d += W) {
          V x, y;
          std::memcpy(&x, dor + d, sizeof(V));
          std::memcpy(&y, orow + d, sizeof(V));
          dot += x * y;
        }
        Acc sum = 0;
        for (int e = 0; e < W; ++e) sum += dot[e];
        bdelta_[r] = sum - (g.dlse ? Acc(g.dlse[stat]) : Acc(0));
      }
    for (int qb = 0; qb * RQ_ < rows_per_sequence(); ++qb) {
      transpose(bqt_.data() + int64_t(qb) * p_.D * RQ_, RQ_, bq_.data() + int64_t(qb) * RQ_ * Dp_, Dp_, RQ_, p_.D);
      transpose(bdot_.data() + int64_t(qb) * p_.D * RQ_, RQ_, bdo_.data() + int64_t(qb) * RQ_ * Dp_, Dp_, RQ_, p_.D);
    }
  }

  // Context rows [L, S) of (b, kvh) get no gradient (the launcher leaves dk, dv uninitialized).
  M3_ALWAYS_INLINE void zero_padding_key_grads(const MemoryAttentionBwdParams& g, int b, int kvh, int L) {
    for (int j = L; j < p_.S; ++j) {
      const int64_t off = ((int64_t(b) * p_.S + j) * p_.Hkv + kvh) * p_.D;
      std::fill(static_cast<T*>(g.dk) + off, static_cast<T*>(g.dk) + off + p_.D, store_as<T>(Acc(0)));
      std::fill(static_cast<T*>(g.dv) + off, static_cast<T*>(g.dv) + off + p_.D, store_as<T>(Acc(0)));
    }
  }

  // dq of (b, kvh) = scale * the sum of `parts` accumulators [RT x Dp], one after the other.
  M3_ALWAYS_INLINE void store_dq(const MemoryAttentionBwdParams& g, int b, int kvh, const Acc* acc, int parts) {
    const int64_t part_elems = int64_t(rows_per_sequence()) * Dp_;
    for (int i = 0; i < p_.T; ++i)
      for (int gh = 0; gh < G_; ++gh) {
        const int64_t r = int64_t(i / BQ_) * RQ_ + (i % BQ_) * G_ + gh;
        T* dq = static_cast<T*>(g.dq) + ((int64_t(b) * p_.T + i) * p_.Hq + kvh * G_ + gh) * p_.D;
        if (i + kRowsAhead < p_.T) prefetch_row(dq + int64_t(kRowsAhead) * p_.Hq * p_.D, /*write=*/true);
        if (parts == 1) {  // one accumulator: a plain scaled copy, vectorized
          const Acc* src = acc + r * Dp_;
          for (int d = 0; d < p_.D; ++d) dq[d] = store_as<T>(src[d] * Acc(p_.scale));
          continue;
        }
        for (int d = 0; d < p_.D; ++d) {
          Acc sum = 0;
          for (int s = 0; s < parts; ++s) sum += acc[s * part_elems + r * Dp_ + d];
          dq[d] = store_as<T>(sum * Acc(p_.scale));
        }
      }
  }

  // dst[c][r] = mul * src[r][c] for r < rows, c < cols: float in 16 x 16 blocks transposed in
  // registers, the rest 16 rows at a time, so the stores of one column stay in one cache line
  // (a plain loop strides the stores by ldd, which thrashed).
  static M3_ALWAYS_INLINE void transpose(Acc* dst, int ldd, const Acc* src, int lds, int rows, int cols,
                                         Acc mul = Acc(1)) {
    int r_done = 0, c_done = 0;
    if constexpr (std::is_same_v<Acc, float>) {
      r_done = rows / 16 * 16, c_done = cols / 16 * 16;
      for (int r0 = 0; r0 < r_done; r0 += 16)
        for (int c0 = 0; c0 < c_done; c0 += 16)
          transpose16(dst + int64_t(c0) * ldd + r0, ldd, src + int64_t(r0) * lds + c0, lds, mul);
    }
    auto scalar = [&](int r_lo, int r_hi, int c_lo, int c_hi) {
      for (int r0 = r_lo; r0 < r_hi; r0 += 16)
        for (int c = c_lo; c < c_hi; ++c)
          for (int r = r0; r < std::min(r_hi, r0 + 16); ++r)
            dst[int64_t(c) * ldd + r] = mul * src[int64_t(r) * lds + c];
    };
    scalar(0, r_done, c_done, cols);  // the columns past the last whole block
    scalar(r_done, rows, 0, cols);    // the rows past the last whole block
  }

  // One 16 x 16 float block: four butterfly stages, each swapping the off-diagonal b x b
  // sub-blocks of every 2b x 2b block (b = 8, 4, 2, 1), 16 two-vector shuffles per stage.
  static M3_ALWAYS_INLINE void transpose16(float* dst, int ldd, const float* src, int lds, float mul) {
    VecF x[16];
    for (int r = 0; r < 16; ++r) x[r] = load_vec(src + int64_t(r) * lds) * mul;
    transpose16_stage<8>(x);
    transpose16_stage<4>(x);
    transpose16_stage<2>(x);
    transpose16_stage<1>(x);
    for (int c = 0; c < 16; ++c) store_vec(dst + int64_t(c) * ldd, x[c]);
  }

  template <int B>
  static M3_ALWAYS_INLINE void transpose16_stage(VecF* x) {
    // Lanes of (row i, row i + B) that make the new rows i and i + B: literal constants, so
    // each shuffle is one two-source permute.
    constexpr VecI lo = B == 8   ? VecI{0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23}
                        : B == 4 ? VecI{0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27}
                        : B == 2 ? VecI{0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29}
                                 : VecI{0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30};
    constexpr VecI hi = B == 8   ? VecI{8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31}
                        : B == 4 ? VecI{4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31}
                        : B == 2 ? VecI{2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31}
                                 : VecI{1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31};
    for (int i = 0; i < 16; ++i)
      if (!(i & B)) {
        const VecF a = x[i], b = x[i + B];
        x[i] = __builtin_shuffle(a, b, lo);
        x[i + B] = __builtin_shuffle(a, b, hi);
      }
  }

  // ---------------------------------------------------------------- packing
  // Decode rows of query i of sequence b, heads of KV heads [h_lo, h_hi): q_ = q * scale
  // (float) and, for the bf16 dot products, qh_ = q as it is (bf16, rows of Dh_ zero-padded
  // columns); rows past them zero (the 4-row groups of the scores read up to 3 of them).
  M3_ALWAYS_INLINE void pack_decode_rows(int b, int i, int h_lo, int h_hi) {
    const T* q = static_cast<const T*>(p_.q) + b * p_.q_stride_b + i * p_.q_stride_t;
    const int rows = (h_hi - h_lo) * G_;
    for (int r = 0; r < rows; ++r) {
      const T* src = q + (h_lo * G_ + r) * p_.q_stride_h;
      pack_row(q_.data() + r * Dp_, src, Acc(p_.scale));
      if constexpr (kDotBf16) std::copy(src, src + p_.D, qh_.data() + int64_t(r) * Dh_);
    }
    std::fill(q_.begin() + rows * Dp_, q_.begin() + DR_ * Dp_, Acc(0));
    if constexpr (kDotBf16) std::fill(qh_.begin() + int64_t(rows) * Dh_, qh_.end(), bf16_t{0});
  }

  // The query block transposed and scaled: dst[d * ld + r] = scale * q(row r)[d], padding
  // columns zero.
  M3_ALWAYS_INLINE void pack_query_cols(Acc* dst, int ld, int b, int kvh, int i0, int nq) {
    const T* q = static_cast<const T*>(p_.q);
    const Acc scale = Acc(p_.scale);
    const int rows = nq * G_;
    for (int r = 0; r < rows; ++r) {
      const T* src = q + b * p_.q_stride_b + (i0 + r / G_) * p_.q_stride_t + (kvh * G_ + r % G_) * p_.q_stride_h;
      for (int d = 0; d < p_.D; ++d) dst[d * ld + r] = load_as<Acc>(src[d]) * scale;
    }
    for (int d = 0; d < p_.D; ++d) std::fill(dst + d * ld + rows, dst + d * ld + RQ_, Acc(0));
  }

  // Context keys [j0, j0 + n) of (b, kvh) as GEMM operands: rows of K and V in place when
  // they are Acc already (V, and K as a column operand, need rows of Dp_ columns), else
  // converted into kn_ / vn_. The next block's rows are prefetched: rows of one head are
  // Hkv * D elements apart, too far for the hardware prefetcher to follow.
  M3_ALWAYS_INLINE void context_rows(int b, int kvh, int j0, int n, bool k_as_columns, const Acc*& K, int& ldk,
                                     const Acc*& V, int& ldv) {
    const T* k = static_cast<const T*>(p_.k) + b * p_.k_stride_b + kvh * p_.k_stride_h + j0 * p_.k_stride_s;
    const T* v = static_cast<const T*>(p_.v) + b * p_.v_stride_b + kvh * p_.v_stride_h + j0 * p_.v_stride_s;
    for (int jj = kKeyBlock; jj < kKeyBlock + n && j0 + jj < p_.S; ++jj) {
      prefetch_row(k + jj * p_.k_stride_s);
      prefetch_row(v + jj * p_.v_stride_s);
    }
    const bool k_in_place = kInPlace && (!k_as_columns || p_.D == Dp_), v_in_place = kInPlace && p_.D == Dp_;
    if constexpr (kInPlace) {
      if (k_in_place) K = reinterpret_cast<const Acc*>(k), ldk = int(p_.k_stride_s);
      if (v_in_place) V = reinterpret_cast<const Acc*>(v), ldv = int(p_.v_stride_s);
    }
    if (!k_in_place) {
      for (int jj = 0; jj < n; ++jj) pack_row(kn_.data() + jj * Dp_, k + jj * p_.k_stride_s, Acc(1));
      K = kn_.data(), ldk = Dp_;
    }
    if (!v_in_place) {
      for (int jj = 0; jj < n; ++jj) pack_row(vn_.data() + jj * Dp_, v + jj * p_.v_stride_s, Acc(1));
      V = vn_.data(), ldv = Dp_;
    }
  }

  M3_ALWAYS_INLINE void prefetch_row(const T* row, bool write = false) const {
    const char* bytes = reinterpret_cast<const char*>(row);
    for (int off = 0; off < p_.D * int(sizeof(T)); off += 64) {
      if (write) __builtin_prefetch(bytes + off, 1);
      else __builtin_prefetch(bytes + off);
    }
  }

  // The memories of chunk c of sequence b as rows of kn_ / vn_, read by id from the bank
  // (int8 dequantized); empty slots are skipped. Returns the number of keys; slot_[j] = r * M + t.
  M3_ALWAYS_INLINE int pack_memory_rows(int b, int c, int kvh) {
    const MT* mk = static_cast<const MT*>(p_.mem_k);
    const MT* mv = static_cast<const MT*>(p_.mem_v);
    const int32_t* ids = p_.mem_ids + (int64_t(b) * p_.C + c) * p_.R;
    int n = 0;
    for (int r = 0; r < p_.R; ++r) {
      const int64_t id = ids[r];
      if (id < 0) continue;
      for (int t = 0; t < p_.M; ++t, ++n) {
        const int64_t srow = (id * p_.Hkv + kvh) * p_.M + t;
        const Acc ks = p_.mem_k_scale ? Acc(p_.mem_k_scale[srow]) : Acc(1);
        const Acc vs = p_.mem_v_scale ? Acc(p_.mem_v_scale[srow]) : Acc(1);
        pack_row(kn_.data() + n * Dp_, mk + id * p_.mk_stride_n + kvh * p_.mk_stride_h + t * p_.mk_stride_m, ks);
        pack_row(vn_.data() + n * Dp_, mv + id * p_.mv_stride_n + kvh * p_.mv_stride_h + t * p_.mv_stride_m, vs);
        slot_[n] = r * p_.M + t;
      }
    }
    return n;
  }

  template <typename Src>
  M3_ALWAYS_INLINE void pack_row(Acc* dst, const Src* src, Acc mul) {
    for (int d = 0; d < p_.D; ++d) dst[d] = load_as<Acc>(src[d]) * mul;  // pad [D, Dp) stays 0
  }

  void ensure_backward_tiles() {
    if (!bq_.empty()) return;
    const size_t RT = size_t(rows_per_sequence());
    auto tile = [](std::vector<Acc>& t, size_t n) { t.assign(n, Acc(0)); };
    tile(bq_, RT * Dp_);
    tile(bdo_, RT * Dp_);
    tile(bqt_, RT * p_.D);
    tile(bdot_, RT * p_.D);
    tile(bdq_, RT * Dp_);
    tile(orow_, size_t(Dp_));
    tile(kt_, size_t(p_.D) * KP_);
    tile(vt_, size_t(p_.D) * KP_);
    blse_.assign(RT, std::numeric_limits<Acc>::infinity());
    tile(bdelta_, RT);
    tile(dpt_, size_t(KP_) * RQ_);
    tile(dk_, size_t(KP_) * Dp_);
    tile(dv_, size_t(KP_) * Dp_);
  }

 private:
  const MemoryAttentionParams& p_;
  const int G_, BQ_, Dp_, RQ_, KP_;  // group size, queries per block, padded D, rows, keys
  const int DR_, Dh_;                // decode: rows of every head (+ 4), bf16 row length
  std::vector<Acc> q_, qt_, o_, s_, st_, kn_, vn_, m_, l_, alpha_;  // forward tiles
  std::vector<Acc> zrow_;                                           // decode: zeros
  std::vector<bf16_t> qh_, zrowh_;                                  // decode, bf16 dot: q, zeros
  std::vector<Acc> bq_, bdo_, bqt_, bdot_, blse_, bdelta_, dpt_, dk_, dv_;  // backward
  std::vector<Acc> bdq_, orow_, kt_, vt_;                                   // backward
  std::vector<int> lim_, slot_;
};

// Queries per work item: enough rows (queries x group heads) to fill the GEMM tiles.
inline int query_block_size(int T, int G) { return std::max(1, std::min(T, kRowTarget / std::max(1, G))); }

// Elements of one backward work item's dQ accumulator: rows_per_sequence() x Dp.
template <typename Acc>
inline int64_t dq_part_elems(int T, int G, int D, int block_q) {
  constexpr int NR = GemmTile<Acc>::NR;
  return int64_t((T + block_q - 1) / block_q) * round_up(block_q * G, NR) * round_up(D, NR);
}

}  // namespace memory3::cpu
