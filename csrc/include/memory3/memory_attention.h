// Memory-aware attention on the CPU: one softmax over the causal context and the memories of
// each query's chunk, memories read by id from the bank in place. Torch-free.
//
// The work is split into items of one (sequence, KV head, block of queries) with all the
// query heads of the GQA group packed as rows (row = query * G + head_in_group), so every
// key and memory row is loaded once per group. Keys come in blocks: first the memories of
// each chunk the query block touches, then the context in blocks of kKeyBlock. Scores use an
// online softmax (no T x S matrix); everything is accumulated in Acc (float, or double for
// double inputs).
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "memory3/cpu_gemm.h"
#include "memory3/cpu_rowops.h"
#include "memory3/numeric.h"
#include "memory3/params.h"

namespace memory3::cpu {

// The CPU backward's own scratch (its algorithm, not the op's contract): the per-row
// correction term and per-slot memory grads that the launcher adds into the bank rows by id
// in a fixed order, so the result is deterministic.
struct BackwardScratch {
  void* delta;      // [B, Hq, T] Acc: rowsum(dout * out) - dlse
  void* mem_slots;  // [B, C, R, 2, Hkv, M, D] Acc, or null when the bank gets no gradient
};

constexpr int kKeyBlock = 64;   // context keys per block
constexpr int kRowTarget = 64;  // query rows (queries x group heads) per work item

// One thread's view of a call: scratch tiles plus the per-item passes. T is the dtype of
// q/k/v, MT that of the bank (T or int8_t), Acc the accumulation type.
template <typename T, typename MT, typename Acc>
class MemoryAttentionCpu {
 public:
  static constexpr int MR = GemmTile<Acc>::MR;
  static constexpr int NR = GemmTile<Acc>::NR;

  MemoryAttentionCpu(const MemoryAttentionParams& p, int block_q)
      : p_(p), G_(p.Hq / p.Hkv), BQ_(block_q), Dp_(round_up(p.D, NR)),
        RQ_(round_up(block_q * (p.Hq / p.Hkv), MR)),
        KP_(round_up(std::max(kKeyBlock, p.R * p.M), NR)) {
    auto tile = [](std::vector<Acc>& t, size_t n) { t.assign(n, Acc(0)); };
    tile(q_, size_t(RQ_) * Dp_);
    tile(o_, size_t(RQ_) * Dp_);
    tile(s_, size_t(RQ_) * KP_);
    tile(kt_, size_t(Dp_) * KP_);
    tile(vn_, size_t(KP_) * Dp_);
    tile(kbuf_, size_t(4) * Dp_);
    tile(zrow_, size_t(Dp_));
    m_.assign(RQ_, Acc(0));
    l_.assign(RQ_, Acc(0));
    slot_.assign(KP_, 0);
  }

  // Position in the context of query i of sequence b (may be < 0 for padded queries).
  int query_base(int b) const { return kv_len(b) - p_.T; }
  int kv_len(int b) const { return p_.kv_lens ? p_.kv_lens[b] : p_.S; }
  // First position of chunk c, in int64: chunk_start + c * chunk_size may pass int32 even
  // when each of them fits (the launcher checks each against int32 only).
  int64_t chunk_begin(int c) const { return p_.chunk_start + int64_t(c) * p_.chunk_size; }

  // ---------------------------------------------------------------- forward
  M3_ALWAYS_INLINE void forward_item(int b, int kvh, int i0) {
    const int nq = std::min(BQ_, p_.T - i0);
    const int rows = nq * G_;
    const int pbase = query_base(b) + i0;  // position of the block's first query
    pack_query_rows(q_.data(), b, kvh, i0, nq, Acc(p_.scale));
    std::fill(m_.begin(), m_.end(), -std::numeric_limits<Acc>::infinity());
    std::fill(l_.begin(), l_.end(), Acc(0));
    std::fill(o_.begin(), o_.end(), Acc(0));
    if constexpr (std::is_same_v<Acc, float>) {
      if (nq == 1) {
        single_query_item(b, kvh, pbase, 0, pbase + 1, /*with_memories=*/true);
        finish_rows(b, kvh, i0, rows);
        return;
      }
    }
    for_each_key_block(b, kvh, pbase, nq, /*transposed_v=*/false,
                       [&](int row_lo, int n, int causal_j0) M3_LAMBDA_INLINE {
                         online_softmax_block(row_lo, rows, pbase, n, causal_j0);
                       });
    finish_rows(b, kvh, i0, rows);
  }

  // out = o / l and lse = m + log l for the item's rows.
  M3_ALWAYS_INLINE void finish_rows(int b, int kvh, int i0, int rows) {
    for (int r = 0; r < rows; ++r) {
      const int ii = r / G_, h = kvh * G_ + r % G_;
      T* out = static_cast<T*>(p_.out) + ((int64_t(b) * p_.T + i0 + ii) * p_.Hq + h) * p_.D;
      float* lse = p_.lse + (int64_t(b) * p_.Hq + h) * p_.T + i0 + ii;
      if (l_[r] > Acc(0)) {
        const Acc inv = Acc(1) / l_[r];
        for (int d = 0; d < p_.D; ++d) out[d] = store_as<T>(o_[r * Dp_ + d] * inv);
        *lse = float(m_[r] + std::log(l_[r]));
      } else {  // a query that sees no key at all (padding): zero output, lse = -inf
        for (int d = 0; d < p_.D; ++d) out[d] = store_as<T>(Acc(0));
        *lse = -std::numeric_limits<float>::infinity();
      }
    }
  }

  // Decode split over the context: part `part` of `parts` of sequence b's context (parts of
  // whole key blocks; the memories go with part 0), unnormalized: o [G][D], m and l [G] into
  // the part's slots for merge_parts.
  M3_ALWAYS_INLINE void forward_part(int b, int kvh, int part, int parts, float* o, float* m, float* l) {
    static_assert(std::is_same_v<Acc, float>);
    const int pos = query_base(b), L = std::max(pos + 1, 0);
    const int len = round_up((L + parts - 1) / parts, kKeyBlock);
    pack_query_rows(q_.data(), b, kvh, p_.T - 1, 1, Acc(p_.scale));
    std::fill(m_.begin(), m_.end(), -std::numeric_limits<Acc>::infinity());
    std::fill(l_.begin(), l_.end(), Acc(0));
    std::fill(o_.begin(), o_.end(), Acc(0));
    single_query_item(b, kvh, pos, std::min(L, part * len), std::min(L, (part + 1) * len), part == 0);
    for (int r = 0; r < G_; ++r) {
      std::copy(o_.data() + r * Dp_, o_.data() + r * Dp_ + p_.D, o + r * p_.D);
      m[r] = m_[r], l[r] = l_[r];
    }
  }

  // out and lse of the decode query of (b, kvh) from its parts' o, m, l (layout of forward_part).
  M3_ALWAYS_INLINE void merge_parts(int b, int kvh, int parts, const float* o, const float* m, const float* l) {
    for (int r = 0; r < G_; ++r) {
      float mx = -std::numeric_limits<float>::infinity();
      for (int s = 0; s < parts; ++s) mx = std::max(mx, m[s * G_ + r]);
      m_[r] = mx, l_[r] = 0;
      std::fill(o_.data() + r * Dp_, o_.data() + (r + 1) * Dp_, 0.0f);
      for (int s = 0; s < parts; ++s) {
        if (l[s * G_ + r] == 0.0f) continue;  // a part that saw no key
        const float w = std::exp(m[s * G_ + r] - mx);
        l_[r] += w * l[s * G_ + r];
        const float* os = o + (int64_t(s) * G_ + r) * p_.D;
        for (int d = 0; d < p_.D; ++d) o_[r * Dp_ + d] += w * os[d];
      }
    }
    finish_rows(b, kvh, p_.T - 1, G_);
  }

  // ---------------------------------------------------------------- backward
  // Query side: dq for one (b, kvh, query block), and delta for its rows.
  M3_ALWAYS_INLINE void backward_dq_item(const MemoryAttentionBwdParams& g, const BackwardScratch& w, int b, int kvh,
                                         int i0) {
    ensure_backward_tiles();
    const int nq = std::min(BQ_, p_.T - i0);
    const int rows = nq * G_;
    const int pbase = query_base(b) + i0;
    pack_query_rows(q_.data(), b, kvh, i0, nq, Acc(p_.scale));
    pack_backward_rows(g, w, b, kvh, i0, nq, /*compute_delta=*/true);
    std::fill(o_.begin(), o_.end(), Acc(0));  // dQ accumulator
    for_each_key_block(b, kvh, pbase, nq, /*transposed_v=*/true,
                       [&](int row_lo, int n, int causal_j0) M3_LAMBDA_INLINE {
                         const int ra = row_lo / MR * MR, np = round_up(n, NR);
                         probabilities_and_ds(ra, row_lo, rows, pbase, n, causal_j0);
                         // dQ += dS K: K in row layout, rebuilt from the transposed pack.
                         transpose(kn_.data(), Dp_, kt_.data(), KP_, Dp_, np);
                         gemm<Acc>(o_.data() + ra * Dp_, Dp_, ds_.data() + ra * KP_, KP_,
                                   kn_.data(), Dp_, round_up(rows, MR) - ra, Dp_, np, true);
                       });
    for (int r = 0; r < rows; ++r) {
      const int ii = r / G_, h = kvh * G_ + r % G_;
      T* dq = static_cast<T*>(g.dq) + ((int64_t(b) * p_.T + i0 + ii) * p_.Hq + h) * p_.D;
      for (int d = 0; d < p_.D; ++d) dq[d] = store_as<T>(o_[r * Dp_ + d] * Acc(p_.scale));
    }
  }

  // Key side, context: dk, dv for one (b, kvh, block of kKeyBlock keys).
  M3_ALWAYS_INLINE void backward_dkv_item(const MemoryAttentionBwdParams& g, const BackwardScratch& w, int b, int kvh,
                                          int j0) {
    ensure_backward_tiles();
    const int L = kv_len(b);
    const int n = std::min(kKeyBlock, L - j0);
    if (n <= 0) return;
    pack_context_keys(b, kvh, j0, n, /*transposed_v=*/true);
    // Queries at positions >= j0 see this block.
    const int qbase = query_base(b);
    const int i_lo = std::max(0, j0 - qbase);
    accumulate_key_grads(g, w, b, kvh, n, i_lo, p_.T, j0);
    for (int jj = 0; jj < n; ++jj) {
      const int64_t off = ((int64_t(b) * p_.S + j0 + jj) * p_.Hkv + kvh) * p_.D;
      T* dk = static_cast<T*>(g.dk) + off;
      T* dv = static_cast<T*>(g.dv) + off;
      for (int d = 0; d < p_.D; ++d) {
        dk[d] = store_as<T>(dkt_[jj * Dp_ + d]);
        dv[d] = store_as<T>(dvt_[jj * Dp_ + d]);
      }
    }
  }

  // Key side, memories: the grads of the memories of chunk c of sequence b, per slot, into
  // w.mem_slots (the launcher adds slots into the bank rows by id, in a fixed order).
  M3_ALWAYS_INLINE void backward_mem_item(const MemoryAttentionBwdParams& g, const BackwardScratch& w, int b, int c,
                                          int kvh) {
    ensure_backward_tiles();
    const int qbase = query_base(b);
    const int64_t lo = std::max<int64_t>(chunk_begin(c), std::max(qbase, 0));
    const int64_t hi = std::min<int64_t>(chunk_begin(c + 1), kv_len(b));
    if (lo >= hi) return;
    const int p_lo = int(lo), p_hi = int(hi);  // within [0, kv_len] now
    Acc* slots = static_cast<Acc*>(w.mem_slots);
    const int64_t slot_elems = int64_t(p_.M) * p_.D;
    auto slot_ptr = [&](int r, int kv) {  // [B, C, R, 2, Hkv, M, D]
      return slots + ((((int64_t(b) * p_.C + c) * p_.R + r) * 2 + kv) * p_.Hkv + kvh) * slot_elems;
    };
    const int n = pack_memory_keys(b, c, kvh, /*transposed_v=*/true);
    if (n == 0) return;
    accumulate_key_grads(g, w, b, kvh, n, p_lo - qbase, p_hi - qbase, /*causal_j0=*/-1);
    for (int jj = 0; jj < n; ++jj) {
      const int r = slot_[jj] / p_.M, t = slot_[jj] % p_.M;
      Acc* dk = slot_ptr(r, 0) + int64_t(t) * p_.D;
      Acc* dv = slot_ptr(r, 1) + int64_t(t) * p_.D;
      for (int d = 0; d < p_.D; ++d) {
        dk[d] = dkt_[jj * Dp_ + d];
        dv[d] = dvt_[jj * Dp_ + d];
      }
    }
  }

 private:
  // Calls f(row_lo, n, causal_j0) for every block of keys the query block sees, with the block
  // packed in kt_ (transposed) and vn_ or vt_: first the memories of each chunk the block
  // touches (rows from row_lo on are in that chunk or later ones; rows past the chunk are
  // masked through row_hi_), then the context.
  template <typename F>
  M3_ALWAYS_INLINE void for_each_key_block(int b, int kvh, int pbase, int nq, bool transposed_v, F&& f) {
    const int p_last = pbase + nq - 1;
    for (int p = std::max({pbase, p_.chunk_start, 0}); p <= p_last;) {
      const int c = (p - p_.chunk_start) / p_.chunk_size;
      const int p_end = int(std::min<int64_t>(p_last, chunk_begin(c + 1) - 1));
      const int n = pack_memory_keys(b, c, kvh, transposed_v);
      if (n > 0) {
        row_hi_ = (p_end - pbase + 1) * G_;
        f((p - pbase) * G_, n, -1);
      }
      p = p_end + 1;
    }
    row_hi_ = nq * G_;
    for (int j0 = 0; j0 <= p_last; j0 += kKeyBlock) {
      const int n = std::min(kKeyBlock, p_last + 1 - j0);
      pack_context_keys(b, kvh, j0, n, transposed_v);
      f(std::max(0, j0 - pbase) * G_, n, j0);
    }
  }

  // One query (decode): the G rows of its GQA group against the memories of its chunk
  // (packed, as in for_each_key_block) and then the context keys [j_lo, j_hi) read in place,
  // row by row, so no context key is transposed or copied (the decode cost is the read of K
  // and V).
  M3_ALWAYS_INLINE void single_query_item(int b, int kvh, int pos, int j_lo, int j_hi, bool with_memories) {
    const int rows = G_;
    if (with_memories && pos >= std::max(p_.chunk_start, 0)) {
      const int n = pack_memory_keys(b, (pos - p_.chunk_start) / p_.chunk_size, kvh, /*transposed_v=*/false);
      if (n > 0) {
        row_hi_ = rows;
        online_softmax_block(0, rows, pos, n, -1);
      }
    }
    const T* k = static_cast<const T*>(p_.k) + b * p_.k_stride_b + kvh * p_.k_stride_h;
    const T* v = static_cast<const T*>(p_.v) + b * p_.v_stride_b + kvh * p_.v_stride_h;
    for (int j0 = j_lo; j0 < j_hi; j0 += kKeyBlock) {
      const int n = std::min(kKeyBlock, j_hi - j0), np = round_up(n, NR);
      for (int jj = 0; jj < n; ++jj)  // the next block's rows: too far apart for the prefetcher
        if (j0 + kKeyBlock + jj < j_hi) {
          prefetch_row(k + (j0 + kKeyBlock + jj) * p_.k_stride_s);
          prefetch_row(v + (j0 + kKeyBlock + jj) * p_.v_stride_s);
        }
      for (int jj = 0; jj < np; jj += 4) {
        const float* kr[4];
        for (int x = 0; x < 4; ++x)
          kr[x] = jj + x < n ? float_row(k + (j0 + jj + x) * p_.k_stride_s, kbuf_.data() + x * Dp_) : zrow_.data();
        for (int r0 = 0; r0 < rows; r0 += 4) {  // q_ rows past `rows` are zero
          VecF acc[16] = {};  // lane group r * 4 + x: row r0 + r, key jj + x
          for (int d = 0; d < Dp_; d += kVecF) {
            VecF kv[4], qv[4];
            for (int x = 0; x < 4; ++x) kv[x] = load_vec(kr[x] + d);
            for (int r = 0; r < 4; ++r) qv[r] = load_vec(q_.data() + (r0 + r) * Dp_ + d);
            for (int r = 0; r < 4; ++r)
              for (int x = 0; x < 4; ++x) acc[r * 4 + x] += qv[r] * kv[x];
          }
          const VecF sums = hsum16(acc);
          for (int r = 0; r < 4; ++r) std::memcpy(s_.data() + (r0 + r) * KP_ + jj, &sums[r * 4], 4 * sizeof(float));
        }
      }
      for (int r = 0; r < rows; ++r) {
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
      for (int jj = 0; jj < n; ++jj) {  // O += P V, V rows in place
        const float* vr = float_row(v + (j0 + jj) * p_.v_stride_s, kbuf_.data());
        for (int r = 0; r < rows; ++r) {
          const float pr = s_[r * KP_ + jj];
          float* o = o_.data() + r * Dp_;
          for (int d = 0; d < Dp_; d += kVecF) store_vec(o + d, load_vec(o + d) + pr * load_vec(vr + d));
        }
      }
    }
  }

  // A context row as Dp_ floats: in place when it already is, else converted into buf
  // (whose padding [D, Dp) stays zero).
  M3_ALWAYS_INLINE const float* float_row(const T* src, float* buf) {
    if constexpr (std::is_same_v<T, float>)
      if (p_.D == Dp_) return src;
    for (int d = 0; d < p_.D; ++d) buf[d] = load_as<float>(src[d]);
    return buf;
  }

  // Number of keys of a block that query row r sees: all n, or up to its position.
  M3_ALWAYS_INLINE int visible_keys(int r, int pbase, int n, int causal_j0) const {
    if (causal_j0 < 0) return n;
    return std::max(0, std::min(n, pbase + r / G_ - causal_j0 + 1));
  }

  // Forward: S = Q K^T for rows [row_lo, row_hi_), online softmax, O += P V.
  M3_ALWAYS_INLINE void online_softmax_block(int row_lo, int rows, int pbase, int n, int causal_j0) {
    const int ra = row_lo / MR * MR, rb = round_up(std::min(rows, row_hi_), MR);
    const int np = round_up(n, NR);
    gemm<Acc>(s_.data() + ra * KP_, KP_, q_.data() + ra * Dp_, Dp_, kt_.data(), KP_, rb - ra, np, Dp_, false);
    const int row_end = std::min(rows, row_hi_);
    for (int r = ra; r < rb; ++r) {
      Acc* s = s_.data() + r * KP_;  // scores in, probabilities out
      const int lim = (r >= row_lo && r < row_end) ? visible_keys(r, pbase, n, causal_j0) : 0;
      if (lim == 0) {
        std::fill(s, s + np, Acc(0));
        continue;
      }
      mask_tail(s, lim, np);
      const Acc m_new = std::max(m_[r], row_max(s, np));
      const Acc alpha = std::exp(m_[r] - m_new);  // 0 on the first block (m = -inf)
      l_[r] = l_[r] * alpha + row_exp_sum(s, np, m_new);
      m_[r] = m_new;
      if (alpha != Acc(1)) {
        Acc* o = o_.data() + r * Dp_;
        for (int d = 0; d < Dp_; ++d) o[d] *= alpha;
      }
    }
    gemm<Acc>(o_.data() + ra * Dp_, Dp_, s_.data() + ra * KP_, KP_, vn_.data(), Dp_, rb - ra, Dp_, np, true);
  }

  // Backward: P = exp(S - lse) and dS = P (dP - delta) into s_ / ds_ for rows [ra, rows).
  M3_ALWAYS_INLINE void probabilities_and_ds(int ra, int row_lo, int rows, int pbase, int n, int causal_j0) {
    const int rb = round_up(std::min(rows, row_hi_), MR), np = round_up(n, NR);
    gemm<Acc>(s_.data() + ra * KP_, KP_, q_.data() + ra * Dp_, Dp_, kt_.data(), KP_, rb - ra, np, Dp_, false);
    gemm<Acc>(ds_.data() + ra * KP_, KP_, dout_.data() + ra * Dp_, Dp_, vt_.data(), KP_, rb - ra, np, Dp_, false);
    const int row_end = std::min(rows, row_hi_);
    for (int r = ra; r < round_up(rows, MR); ++r) {
      Acc* s = s_.data() + r * KP_;
      Acc* ds = ds_.data() + r * KP_;
      const int lim = (r >= row_lo && r < row_end) ? visible_keys(r, pbase, n, causal_j0) : 0;
      if (lim == 0) {
        std::fill(s, s + np, Acc(0));
        std::fill(ds, ds + np, Acc(0));
        continue;
      }
      mask_tail(s, lim, np);
      row_probs_and_ds(s, ds, np, lse_[r], delta_[r]);
    }
  }

  // Key side: for the n packed keys, dV += P^T dO and dK += dS^T (scale Q) over the queries
  // [i_lo, i_hi) of sequence b, in query blocks. Results in dvt_ / dkt_ ([n][Dp]).
  M3_ALWAYS_INLINE void accumulate_key_grads(const MemoryAttentionBwdParams& g, const BackwardScratch& w, int b,
                                             int kvh, int n, int i_lo, int i_hi, int causal_j0) {
    const int np = round_up(n, NR);
    std::fill(dkt_.begin(), dkt_.end(), Acc(0));
    std::fill(dvt_.begin(), dvt_.end(), Acc(0));
    for (int i0 = i_lo; i0 < i_hi; i0 += BQ_) {
      const int nq = std::min(BQ_, i_hi - i0);
      const int rows = nq * G_, rq = round_up(rows, MR);
      const int pbase = query_base(b) + i0;
      pack_query_rows(q_.data(), b, kvh, i0, nq, Acc(p_.scale));
      pack_backward_rows(g, w, b, kvh, i0, nq, /*compute_delta=*/false);
      row_hi_ = rows;
      probabilities_and_ds(0, 0, rows, pbase, n, causal_j0);
      transpose(pt_.data(), RQ_, s_.data(), KP_, rq, np);  // P^T  [np][rq]
      transpose(dst_.data(), RQ_, ds_.data(), KP_, rq, np);  // dS^T [np][rq]
      gemm<Acc>(dvt_.data(), Dp_, pt_.data(), RQ_, dout_.data(), Dp_, np, Dp_, rq, true);
      gemm<Acc>(dkt_.data(), Dp_, dst_.data(), RQ_, q_.data(), Dp_, np, Dp_, rq, true);
    }
  }

  // dst[c][r] = src[r][c] for r < rows, c < cols.
  static M3_ALWAYS_INLINE void transpose(Acc* dst, int ldd, const Acc* src, int lds, int rows, int cols) {
    for (int r = 0; r < rows; ++r)
      for (int c = 0; c < cols; ++c) dst[c * ldd + r] = src[r * lds + c];
  }

  // Rows of the query block: q (times mul) into dst, padding rows zero.
  M3_ALWAYS_INLINE void pack_query_rows(Acc* dst, int b, int kvh, int i0, int nq, Acc mul) {
    const T* q = static_cast<const T*>(p_.q);
    for (int ii = 0; ii < nq; ++ii)
      for (int gh = 0; gh < G_; ++gh)
        pack_row(dst + (ii * G_ + gh) * Dp_,
                 q + b * p_.q_stride_b + (i0 + ii) * p_.q_stride_t + (kvh * G_ + gh) * p_.q_stride_h, Acc(mul));
    std::fill(dst + nq * G_ * Dp_, dst + RQ_ * Dp_, Acc(0));
  }

  // dO rows, lse rows and delta rows of the query block (delta computed and stored, or read).
  M3_ALWAYS_INLINE void pack_backward_rows(const MemoryAttentionBwdParams& g, const BackwardScratch& w, int b,
                                           int kvh, int i0, int nq, bool compute_delta) {
    const T* dout = static_cast<const T*>(g.dout);
    const T* out = static_cast<const T*>(g.out);
    Acc* delta = static_cast<Acc*>(w.delta);
    for (int r = 0; r < RQ_; ++r) {
      if (r >= nq * G_) {
        std::fill(dout_.data() + r * Dp_, dout_.data() + (r + 1) * Dp_, Acc(0));
        lse_[r] = std::numeric_limits<Acc>::infinity();  // exp(S - inf) = 0
        delta_[r] = 0;
        continue;
      }
      const int ii = r / G_, h = kvh * G_ + r % G_;
      const int64_t row = (int64_t(b) * p_.T + i0 + ii) * p_.Hq + h;
      const int64_t stat = (int64_t(b) * p_.Hq + h) * p_.T + i0 + ii;
      pack_row(dout_.data() + r * Dp_, dout + row * p_.D, Acc(1));
      const float lse = p_.lse[stat];
      // A query that saw no key has lse = -inf and gets no gradient.
      lse_[r] = std::isinf(lse) && lse < 0 ? std::numeric_limits<Acc>::infinity() : Acc(lse);
      if (compute_delta) {
        Acc dot = 0;
        for (int d = 0; d < p_.D; ++d) dot += dout_[r * Dp_ + d] * load_as<Acc>(out[row * p_.D + d]);
        delta[stat] = dot - (g.dlse ? Acc(g.dlse[stat]) : Acc(0));
      }
      delta_[r] = delta[stat];
    }
  }

  // Context keys j0..j0+n-1 of (b, kvh): K transposed into kt_; V into vn_ (row layout) or
  // vt_ (transposed). Padding columns/rows are zeroed so they add nothing.
  M3_ALWAYS_INLINE void pack_context_keys(int b, int kvh, int j0, int n, bool transposed_v) {
    const T* k = static_cast<const T*>(p_.k) + b * p_.k_stride_b + kvh * p_.k_stride_h;
    const T* v = static_cast<const T*>(p_.v) + b * p_.v_stride_b + kvh * p_.v_stride_h;
    // Rows of one head are Hkv * D elements apart, too far for the hardware prefetcher to
    // follow: fetch the next block's rows while this one is packed.
    const int next = j0 + kKeyBlock;
    for (int jj = 0; jj < n; ++jj) {
      if (next + jj < p_.S) {
        prefetch_row(k + (next + jj) * p_.k_stride_s);
        prefetch_row(v + (next + jj) * p_.v_stride_s);
      }
      pack_col(kt_.data() + jj, k + (j0 + jj) * p_.k_stride_s, Acc(1));
      pack_value(jj, v + (j0 + jj) * p_.v_stride_s, Acc(1), transposed_v);
    }
    zero_key_padding(n, transposed_v);
  }

  M3_ALWAYS_INLINE void prefetch_row(const T* row) const {
    const char* bytes = reinterpret_cast<const char*>(row);
    for (int off = 0; off < p_.D * int(sizeof(T)); off += 64) __builtin_prefetch(bytes + off);
  }

  // The memories of chunk c of sequence b, read by id from the bank (int8 dequantized);
  // empty slots are skipped. Returns the number of keys packed; slot_[j] = r * M + t.
  M3_ALWAYS_INLINE int pack_memory_keys(int b, int c, int kvh, bool transposed_v) {
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
        pack_col(kt_.data() + n, mk + id * p_.mk_stride_n + kvh * p_.mk_stride_h + t * p_.mk_stride_m, ks);
        pack_value(n, mv + id * p_.mv_stride_n + kvh * p_.mv_stride_h + t * p_.mv_stride_m, vs, transposed_v);
        slot_[n] = r * p_.M + t;
      }
    }
    zero_key_padding(n, transposed_v);
    return n;
  }

  template <typename Src>
  M3_ALWAYS_INLINE void pack_row(Acc* dst, const Src* src, Acc mul) {
    for (int d = 0; d < p_.D; ++d) dst[d] = load_as<Acc>(src[d]) * mul;  // pad [D, Dp) stays 0
  }
  template <typename Src>
  M3_ALWAYS_INLINE void pack_col(Acc* dst, const Src* src, Acc mul) {
    for (int d = 0; d < p_.D; ++d) dst[d * KP_] = load_as<Acc>(src[d]) * mul;
  }
  template <typename Src>
  M3_ALWAYS_INLINE void pack_value(int j, const Src* src, Acc mul, bool transposed) {
    if (transposed) pack_col(vt_.data() + j, src, mul);
    else pack_row(vn_.data() + j * Dp_, src, mul);
  }
  M3_ALWAYS_INLINE void zero_key_padding(int n, bool transposed_v) {
    const int np = round_up(n, NR);
    for (int d = 0; d < p_.D; ++d) {
      std::fill(kt_.data() + d * KP_ + n, kt_.data() + d * KP_ + np, Acc(0));
      if (transposed_v) std::fill(vt_.data() + d * KP_ + n, vt_.data() + d * KP_ + np, Acc(0));
    }
    if (!transposed_v) std::fill(vn_.data() + n * Dp_, vn_.data() + np * Dp_, Acc(0));
  }

  void ensure_backward_tiles() {
    if (!ds_.empty()) return;
    auto tile = [](std::vector<Acc>& t, size_t n) { t.assign(n, Acc(0)); };
    tile(ds_, size_t(RQ_) * KP_);
    tile(vt_, size_t(Dp_) * KP_);
    tile(kn_, size_t(KP_) * Dp_);
    tile(dout_, size_t(RQ_) * Dp_);
    tile(pt_, size_t(KP_) * RQ_);
    tile(dst_, size_t(KP_) * RQ_);
    tile(dkt_, size_t(KP_) * Dp_);
    tile(dvt_, size_t(KP_) * Dp_);
    lse_.assign(RQ_, Acc(0));
    delta_.assign(RQ_, Acc(0));
  }

 private:
  const MemoryAttentionParams& p_;
  const int G_, BQ_, Dp_, RQ_, KP_;  // group size, queries per block, padded D, rows, keys
  int row_hi_ = 0;                   // rows at or past this are outside the current chunk
  std::vector<Acc> q_, o_, s_, kt_, vn_, m_, l_;              // forward tiles
  std::vector<Acc> kbuf_, zrow_;                              // decode: converted rows, zeros
  std::vector<Acc> ds_, vt_, kn_, dout_, pt_, dst_, dkt_, dvt_, lse_, delta_;  // backward
  std::vector<int> slot_;
};

// Queries per work item: enough rows (queries x group heads) to fill the GEMM tiles.
inline int query_block_size(int T, int G) { return std::max(1, std::min(T, kRowTarget / std::max(1, G))); }

}  // namespace memory3::cpu
