// Fused CPU attention with causal mass (SPEC §2), flash style, no T x T buffer.
//
// Forward: one task per (batch, query head, block of BQ query rows), run with at::parallel_for. For each
// key block of BK columns left of the diagonal: S = scale Q K^T (BLAS), mask (causal, key padding),
// online softmax with running max m, sum l and mass accumulator macc (rescaled like l), O += P V (BLAS).
// At the end O /= l, mass = macc / l, LSE = m + log l (+inf and zeros on rows without keys).
//
// Packed sequences (seg_start, int32 (B, T), non-decreasing, seg_start[i] <= i): row i sees keys
// seg_start[i] <= j <= i only. A query block's key tiles start at its first row's segment start (rounded
// down to a packed word), and each key tile runs its GEMMs on the rows that can see one of its keys only
// (causal: i >= j0; segment: seg_start[i] < j0 + bk, a prefix of the block), so the work follows the sum of
// squared segment lengths instead of T^2. Masked entries give P = 0, so the skipped rows and tiles would
// have contributed nothing.
//
// Backward: one task per (batch, key/value head), so dK and dV of a GQA group are summed without races
// (per (batch, query head) with partial dK, dV when there are fewer kv heads than threads).
// For each query head of the group and each query block: delta = rowsum(dO * O) + g * mass, then per key
// block recompute P = exp(S - LSE) and
//   dV += P^T dO,  dP = dO V^T + g * A,  dS = P (dP - delta),  dQ += scale dS K,  dK += scale dS^T Q.
//
// Inputs other than fp32 with unit last stride are converted to fp32 once; accumulation is fp32.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>
#include <torch/version.h>

#include <algorithm>
#include <string>
#include <utility>
#include <vector>

#include "gemm.h"
#include "row_ops.h"

namespace causal_attn_cpu {
namespace {

constexpr int64_t BQ = 64;   // query rows per tile
constexpr int64_t BK = 256;  // key columns per tile (multiple of 32: tiles start on packed-word bounds)

// fp32 view with unit stride along D and a row stride BLAS accepts as leading dimension (>= D; an
// expanded or overlapping T axis is copied); converts (copies) only when needed.
at::Tensor as_f32_rows(const at::Tensor& x) {
  at::Tensor y = x.scalar_type() == at::kFloat ? x : x.to(at::kFloat);
  return (y.stride(3) == 1 && y.stride(2) >= y.size(3)) ? y : y.contiguous();
}

// Strided fp32 matrix rows of one (batch, head): row t starts at base + t * ld.
struct Rows {
  const float* base;
  int64_t ld;
  const float* row(int64_t t) const { return base + t * ld; }
};

Rows head_rows(const at::Tensor& x, int64_t b, int64_t h) {
  return {x.data_ptr<float>() + b * x.stride(0) + h * x.stride(1), x.stride(2)};
}

struct Problem {
  int64_t B, Hq, Hkv, G, T, D, W;
  float scale;
  const int32_t* packed;  // (B, T, W) or nullptr
  const uint8_t* kpm;     // (B, T) or nullptr
  const int32_t* seg;     // (B, T) segment start of each row, or nullptr (one segment)
};

Problem make_problem(const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& packed,
                     const std::optional<at::Tensor>& kpm, const std::optional<at::Tensor>& seg_start,
                     double scale) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4, "q and k must be (B, H, T, D)");
  Problem p{q.size(0), q.size(1), k.size(1), 0, q.size(2), q.size(3), (q.size(2) + 31) / 32,
            static_cast<float>(scale), nullptr, nullptr, nullptr};
  TORCH_CHECK(p.Hkv > 0 && p.Hq % p.Hkv == 0, "Hq must be a multiple of Hkv");
  p.G = p.Hq / p.Hkv;
  if (packed.has_value()) {
    const auto& a = *packed;
    TORCH_CHECK(a.scalar_type() == at::kInt && a.is_contiguous() && a.dim() == 3 && a.size(0) == p.B &&
                    a.size(1) == p.T && a.size(2) == p.W,
                "packed adjacency must be contiguous int32 (B, T, ceil(T/32))");
    p.packed = a.data_ptr<int32_t>();
  }
  if (kpm.has_value()) {
    const auto& m = *kpm;
    TORCH_CHECK(m.scalar_type() == at::kBool && m.is_contiguous() && m.size(0) == p.B && m.size(1) == p.T,
                "key_padding_mask must be contiguous bool (B, T)");
    p.kpm = reinterpret_cast<const uint8_t*>(m.data_ptr<bool>());
  }
  if (seg_start.has_value()) {
    const auto& s = *seg_start;
    TORCH_CHECK(s.device().is_cpu(), "seg_start must be a CPU tensor, got one on ", s.device());
    TORCH_CHECK(s.scalar_type() == at::kInt, "seg_start must be int32, got ", s.scalar_type());
    TORCH_CHECK(s.dim() == 2 && s.size(0) == p.B && s.size(1) == p.T, "seg_start must have shape (B, T) = (", p.B,
                ", ", p.T, "), got ", s.sizes());
    TORCH_CHECK(s.is_contiguous(), "seg_start must be contiguous");
    p.seg = s.data_ptr<int32_t>();
    // The tiles below index keys from seg_start: an out-of-range value would read outside the inputs.
    for (int64_t b = 0; b < p.B; ++b) {
      const int32_t* row = p.seg + b * p.T;
      for (int64_t i = 0; i < p.T; ++i) {
        TORCH_CHECK(row[i] >= 0 && row[i] <= i && (i == 0 || row[i] >= row[i - 1]),
                    "seg_start must be non-decreasing along a row with 0 <= seg_start[b, i] <= i; row ", b,
                    " position ", i, " has ", row[i], i > 0 ? " after " : "", i > 0 ? std::to_string(row[i - 1]) : "");
      }
    }
  }
  return p;
}

// First key column the query block starting at row i0 reads: its first row's segment start (the block's
// smallest, seg_start is non-decreasing) rounded down to a packed word; 0 without segments.
int64_t first_key(const Problem& P, int64_t b, int64_t i0) {
  return P.seg ? (static_cast<int64_t>(P.seg[b * P.T + i0]) & ~int64_t{31}) : 0;
}

// Rows [r0, r1) (relative to i0) of query block [i0, i1) that may see a key of tile [j0, j0 + bk): causal
// rows i >= j0, and rows whose segment starts before the tile ends (a prefix: seg_start is non-decreasing).
// Empty (r0 >= r1) when no row can.
std::pair<int64_t, int64_t> tile_rows(const Problem& P, int64_t b, int64_t i0, int64_t i1, int64_t j0, int64_t bk) {
  const int64_t r0 = std::max<int64_t>(0, j0 - i0);
  int64_t r1 = i1 - i0;
  if (P.seg) {
    const int32_t* seg = P.seg + b * P.T + i0;
    while (r1 > r0 && seg[r1 - 1] >= j0 + bk) --r1;
  }
  return {r0, r1};
}

// Query block of a task index: consecutive tasks alternate between short (early) and long (late) blocks
// so that the contiguous task ranges at::parallel_for hands each thread carry similar causal work.
int64_t balanced_block(int64_t t, int64_t nblocks) {
  return (t % 2 == 0) ? t / 2 : nblocks - 1 - t / 2;
}

// Row kernels work on whole 32-column groups (one packed word each); score rows have BK >= that room.
int64_t round_up32(int64_t n) { return (n + 31) & ~int64_t{31}; }

// S (bq x bk, row stride BK) = scale Q[i0:i1] K[j0:j0+bk]^T with the keys a row may not see (past the
// diagonal, before its segment, padded) and the tail up to whole 32-column words set to -inf; rowmax[r]
// gets row r's max.
void masked_scores(const Problem& P, const Rows& Q, const Rows& K, int64_t b, int64_t i0, int64_t i1, int64_t j0,
                   int64_t bk, float* S, float* rowmax) {
  const uint8_t* kpm = P.kpm ? P.kpm + b * P.T + j0 : nullptr;
  const int32_t* seg = P.seg ? P.seg + b * P.T : nullptr;
  gemm_rm(false, true, i1 - i0, bk, P.D, P.scale, Q.row(i0), Q.ld, K.row(j0), K.ld, 0.0f, S, BK);
  for (int64_t r = 0; r < i1 - i0; ++r) {
    const int64_t n = std::clamp<int64_t>(i0 + r - j0 + 1, 0, bk);
    const int64_t lo = seg ? std::clamp<int64_t>(seg[i0 + r] - j0, 0, n) : 0;
    rowmax[r] = mask_and_max(S + r * BK, lo, n, round_up32(bk), kpm);
  }
}

// P = exp(S - LSE) in place on a tile from masked_scores (rows without keys have LSE = +inf: P = 0).
void probabilities(float* S, int64_t bq, int64_t bk, const float* lse) {
  for (int64_t r = 0; r < bq; ++r) exp_shift_sum(S + r * BK, round_up32(bk), lse[r], nullptr, nullptr);
}

// ------------------------------------------------------------------------------------------- forward
struct ForwardBuffers {
  std::vector<float> S, m, l, macc, rowmax;
  ForwardBuffers() : S(BQ * BK), m(BQ), l(BQ), macc(BQ), rowmax(BQ) {}
};

void forward_task(const Problem& P, const Rows& Q, const Rows& K, const Rows& V, float* O, float* lse,
                  float* mass, int64_t b, int64_t i0, int64_t i1, ForwardBuffers& buf) {
  const int64_t bq = i1 - i0, D = P.D;
  float *S = buf.S.data(), *m = buf.m.data(), *l = buf.l.data(), *macc = buf.macc.data();
  const int32_t* adj = P.packed ? P.packed + b * P.T * P.W : nullptr;
  std::fill(O, O + bq * D, 0.0f);
  std::fill(m, m + bq, kNegInf);
  std::fill(l, l + bq, 0.0f);
  std::fill(macc, macc + bq, 0.0f);
  for (int64_t j0 = first_key(P, b, i0); j0 < i1; j0 += BK) {
    const int64_t bk = std::min(BK, i1 - j0);
    const auto [r0, r1] = tile_rows(P, b, i0, i1, j0, bk);  // the other rows see no key of this tile
    if (r0 >= r1) continue;
    masked_scores(P, Q, K, b, i0 + r0, i0 + r1, j0, bk, S + r0 * BK, buf.rowmax.data() + r0);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t i = i0 + r;
      float* s = S + r * BK;
      const float m_new = std::max(m[r], buf.rowmax[r]);
      if (m_new == kNegInf) {  // no key for this row yet: P row is zero, nothing to rescale
        std::fill(s, s + bk, 0.0f);
        continue;
      }
      const float alpha = fast_exp(m[r] - m_new);
      float msum = 0.0f;
      const float rowsum = exp_shift_sum(s, round_up32(bk), m_new, adj ? adj + i * P.W + j0 / 32 : nullptr, &msum);
      if (alpha != 1.0f) scale_row(O + r * D, D, alpha);
      l[r] = l[r] * alpha + rowsum;
      macc[r] = macc[r] * alpha + msum;
      m[r] = m_new;
    }
    gemm_rm(false, false, r1 - r0, D, bk, 1.0f, S + r0 * BK, BK, V.row(j0), V.ld, 1.0f, O + r0 * D, D);
  }
  for (int64_t r = 0; r < bq; ++r) {
    if (l[r] > 0.0f) {
      scale_row(O + r * D, D, 1.0f / l[r]);
      lse[r] = m[r] + std::log(l[r]);
      if (mass) mass[r] = macc[r] / l[r];
    } else {
      std::fill(O + r * D, O + (r + 1) * D, 0.0f);
      lse[r] = std::numeric_limits<float>::infinity();
      if (mass) mass[r] = 0.0f;
    }
  }
}

// attn_map[b, i, :] += weight * sum over heads of P[b, h, i, :], one task per (batch, query block) so
// that no two threads write the same map rows. P is recomputed from the saved LSE.
void accumulate_map(const Problem& P, const at::Tensor& q, const at::Tensor& k, const float* lse,
                    at::Tensor& attn_map, float weight) {
  const int64_t nqb = (P.T + BQ - 1) / BQ;
  float* map = attn_map.data_ptr<float>();
  at::parallel_for(0, P.B * nqb, 1, [&](int64_t begin, int64_t end) {
    SingleThreadedBlas one_thread;
    std::vector<float> S(BQ * BK), rowmax(BQ);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / nqb, i0 = (t % nqb) * BQ, i1 = std::min(P.T, i0 + BQ);
      for (int64_t h = 0; h < P.Hq; ++h) {
        const float* L = lse + (b * P.Hq + h) * P.T + i0;
        for (int64_t j0 = first_key(P, b, i0); j0 < i1; j0 += BK) {
          const int64_t bk = std::min(BK, i1 - j0);
          const auto [r0, r1] = tile_rows(P, b, i0, i1, j0, bk);
          if (r0 >= r1) continue;
          masked_scores(P, head_rows(q, b, h), head_rows(k, b, h / P.G), b, i0 + r0, i0 + r1, j0, bk,
                        S.data() + r0 * BK, rowmax.data() + r0);
          probabilities(S.data() + r0 * BK, r1 - r0, bk, L + r0);
          for (int64_t r = r0; r < r1; ++r) {
            float* s = S.data() + r * BK;
            const int64_t n = std::clamp<int64_t>(i0 + r - j0 + 1, 0, bk);
            scale_row(s, n, weight);
            float* dst = map + (b * P.T + i0 + r) * P.T + j0;
            for (int64_t c = 0; c < n; ++c) dst[c] += s[c];
          }
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_forward(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, const std::optional<at::Tensor>& packed,
    const std::optional<at::Tensor>& kpm, const std::optional<at::Tensor>& seg_start, double scale,
    const std::optional<at::Tensor>& attn_map, double attn_map_weight) {
  const at::Tensor q = as_f32_rows(q_in), k = as_f32_rows(k_in), v = as_f32_rows(v_in);
  const Problem P = make_problem(q, k, packed, kpm, seg_start, scale);
  TORCH_CHECK(P.D <= 1024, "head dim above 1024 is not supported by the C++ backend");
  auto f32 = q.options().dtype(at::kFloat);
  at::Tensor out = at::empty({P.B, P.Hq, P.T, P.D}, f32);
  at::Tensor lse = at::empty({P.B, P.Hq, P.T}, f32);
  at::Tensor mass = P.packed ? at::empty({P.B, P.Hq, P.T}, f32) : at::empty({0}, f32);
  const int64_t nqb = (P.T + BQ - 1) / BQ;
  float* out_p = out.data_ptr<float>();
  float* lse_p = lse.data_ptr<float>();
  float* mass_p = P.packed ? mass.data_ptr<float>() : nullptr;
  at::parallel_for(0, P.B * P.Hq * nqb, 1, [&](int64_t begin, int64_t end) {
    SingleThreadedBlas one_thread;
    ForwardBuffers buf;
    for (int64_t t = begin; t < end; ++t) {
      const int64_t bh = t / nqb, b = bh / P.Hq, h = bh % P.Hq;
      const int64_t i0 = balanced_block(t % nqb, nqb) * BQ, i1 = std::min(P.T, i0 + BQ);
      const int64_t row0 = bh * P.T + i0;
      forward_task(P, head_rows(q, b, h), head_rows(k, b, h / P.G), head_rows(v, b, h / P.G),
                   out_p + row0 * P.D, lse_p + row0, mass_p ? mass_p + row0 : nullptr, b, i0, i1, buf);
    }
  });
  if (attn_map.has_value()) {
    at::Tensor map = *attn_map;
    TORCH_CHECK(map.scalar_type() == at::kFloat && map.is_contiguous() && map.numel() == P.B * P.T * P.T,
                "attn_map must be a contiguous float32 (B, T, T) tensor");
    accumulate_map(P, q, k, lse_p, map, static_cast<float>(attn_map_weight));
  }
  if (q_in.scalar_type() != at::kFloat) out = out.to(q_in.scalar_type());
  return {out, lse, mass};
}

// ------------------------------------------------------------------------------------------ backward
struct BackwardBuffers {
  std::vector<float> S, dP, delta, rowmax;
  BackwardBuffers() : S(BQ * BK), dP(BQ * BK), delta(BQ), rowmax(BQ) {}
};

// One query block of one query head against all its keys; accumulates into dQ rows (bq x D, zeroed
// here) and the group's dK, dV (T x D).
void backward_block(const Problem& P, const Rows& Q, const Rows& K, const Rows& V, const Rows& O, const Rows& dO,
                    const float* lse, const float* mass, const float* gmass, float* dQ, float* dK, float* dV,
                    int64_t b, int64_t i0, int64_t i1, BackwardBuffers& buf) {
  const int64_t bq = i1 - i0, D = P.D;
  const int32_t* adj = (P.packed && gmass) ? P.packed + b * P.T * P.W : nullptr;
  for (int64_t r = 0; r < bq; ++r) {
    buf.delta[r] = dot_row(dO.row(i0 + r), O.row(i0 + r), D) + (adj ? gmass[r] * mass[r] : 0.0f);
  }
  std::fill(dQ, dQ + bq * D, 0.0f);
  float* S = buf.S.data();
  float* dS = buf.dP.data();
  for (int64_t j0 = first_key(P, b, i0); j0 < i1; j0 += BK) {
    const int64_t bk = std::min(BK, i1 - j0), bk32 = round_up32(bk);
    const auto [r0, r1] = tile_rows(P, b, i0, i1, j0, bk);  // the other rows have P = 0 on this tile
    if (r0 >= r1) continue;
    const int64_t n = r1 - r0, a0 = i0 + r0;
    float *S0 = S + r0 * BK, *dS0 = dS + r0 * BK;
    masked_scores(P, Q, K, b, a0, i0 + r1, j0, bk, S0, buf.rowmax.data() + r0);
    probabilities(S0, n, bk, lse + r0);
    gemm_rm(true, false, bk, D, n, 1.0f, S0, BK, dO.row(a0), dO.ld, 1.0f, dV + j0 * D, D);
    gemm_rm(false, true, n, bk, D, 1.0f, dO.row(a0), dO.ld, V.row(j0), V.ld, 0.0f, dS0, BK);
    for (int64_t r = r0; r < r1; ++r) {
      softmax_grad_row(S + r * BK, dS + r * BK, bk32, buf.delta[r], adj ? gmass[r] : 0.0f,
                       adj ? adj + (i0 + r) * P.W + j0 / 32 : nullptr);
    }
    gemm_rm(false, false, n, D, bk, P.scale, dS0, BK, K.row(j0), K.ld, 1.0f, dQ + r0 * D, D);
    gemm_rm(true, false, bk, D, n, P.scale, dS0, BK, Q.row(a0), Q.ld, 1.0f, dK + j0 * D, D);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& out_in,
    const at::Tensor& lse_in, const at::Tensor& mass_in, const at::Tensor& dout_in,
    const std::optional<at::Tensor>& dmass_in, const std::optional<at::Tensor>& packed,
    const std::optional<at::Tensor>& kpm, const std::optional<at::Tensor>& seg_start, double scale) {
  const at::Tensor q = as_f32_rows(q_in), k = as_f32_rows(k_in), v = as_f32_rows(v_in);
  const at::Tensor o = as_f32_rows(out_in), dout = as_f32_rows(dout_in);
  const at::Tensor lse = lse_in.to(at::kFloat).contiguous();
  const Problem P = make_problem(q, k, packed, kpm, seg_start, scale);
  const bool use_mass = P.packed != nullptr && dmass_in.has_value() && mass_in.numel() > 0;
  at::Tensor mass, gmass;
  if (use_mass) {
    mass = mass_in.to(at::kFloat).contiguous();
    gmass = dmass_in->to(at::kFloat).contiguous();
  }
  auto f32 = q.options().dtype(at::kFloat);
  at::Tensor dq = at::empty({P.B, P.Hq, P.T, P.D}, f32);
  const int64_t nqb = (P.T + BQ - 1) / BQ;
  // All query tiles of query head h of sample b, adding into the (T x D) dK, dV given.
  auto query_head = [&](int64_t b, int64_t h, float* dK, float* dV, BackwardBuffers& buf) {
    const int64_t bh = b * P.Hq + h, hk = h / P.G;
    const float* L = lse.data_ptr<float>() + bh * P.T;
    const float* M = use_mass ? mass.data_ptr<float>() + bh * P.T : nullptr;
    const float* Gm = use_mass ? gmass.data_ptr<float>() + bh * P.T : nullptr;
    for (int64_t qb = 0; qb < nqb; ++qb) {
      const int64_t i0 = qb * BQ, i1 = std::min(P.T, i0 + BQ);
      backward_block(P, head_rows(q, b, h), head_rows(k, b, hk), head_rows(v, b, hk), head_rows(o, b, h),
                     head_rows(dout, b, h), L + i0, M ? M + i0 : nullptr, Gm ? Gm + i0 : nullptr,
                     dq.data_ptr<float>() + (bh * P.T + i0) * P.D, dK, dV, b, i0, i1, buf);
    }
  };
  // Tasks: (batch, kv head) summing a GQA group in place; with fewer of those than threads, (batch, query
  // head) tasks write per-head partials that are summed over the group afterwards.
  const bool per_query_head = P.G > 1 && P.B * P.Hkv < at::get_num_threads();
  const int64_t heads = per_query_head ? P.Hq : P.Hkv;
  at::Tensor dk = at::zeros({P.B, heads, P.T, P.D}, f32);
  at::Tensor dv = at::zeros({P.B, heads, P.T, P.D}, f32);
  at::parallel_for(0, P.B * heads, 1, [&](int64_t begin, int64_t end) {
    SingleThreadedBlas one_thread;
    BackwardBuffers buf;
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / heads, hh = t % heads;
      float* dK = dk.data_ptr<float>() + t * P.T * P.D;
      float* dV = dv.data_ptr<float>() + t * P.T * P.D;
      if (per_query_head) {
        query_head(b, hh, dK, dV, buf);
      } else {
        for (int64_t h = hh * P.G; h < (hh + 1) * P.G; ++h) query_head(b, h, dK, dV, buf);
      }
    }
  });
  if (per_query_head) {
    dk = dk.view({P.B, P.Hkv, P.G, P.T, P.D}).sum(2);
    dv = dv.view({P.B, P.Hkv, P.G, P.T, P.D}).sum(2);
  }
  auto cast = [](const at::Tensor& x, const at::Tensor& like) {
    return like.scalar_type() == at::kFloat ? x : x.to(like.scalar_type());
  };
  return {cast(dq, q_in), cast(dk, k_in), cast(dv, v_in)};
}

}  // namespace
}  // namespace causal_attn_cpu

// Read from the file, without loading it, by causal_attn/cpp_build.py (built_with_torch, built_from_sources):
// a library built against another torch, or from other sources than the ones installed beside it (an old
// prebuilt with an old operator schema), is rebuilt instead of loaded. CAUSAL_ATTN_SOURCES is the hash of
// csrc/ that cpp_build.compile_args passes as -DCAUSAL_ATTN_SOURCES=<hash>.
#ifndef CAUSAL_ATTN_SOURCES
#define CAUSAL_ATTN_SOURCES unknown
#endif
#define CAUSAL_ATTN_STR2(x) #x
#define CAUSAL_ATTN_STR(x) CAUSAL_ATTN_STR2(x)
extern "C" __attribute__((used, visibility("default"))) const char causal_attn_cpp_build_info[] =
    "causal_attn_cpp built with torch " TORCH_VERSION "; sources " CAUSAL_ATTN_STR(CAUSAL_ATTN_SOURCES) ";";

TORCH_LIBRARY(causal_attn_cpp, m) {
  m.def("forward(Tensor q, Tensor k, Tensor v, Tensor? packed, Tensor? key_padding_mask, "
        "Tensor? seg_start, float scale, Tensor(a!)? attn_map, float attn_map_weight) -> (Tensor, Tensor, Tensor)");
  m.def("backward(Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor mass, Tensor dout, "
        "Tensor? dmass, Tensor? packed, Tensor? key_padding_mask, Tensor? seg_start, float scale) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("has_blas() -> bool", []() { return causal_attn_cpu::have_blas(); });
}

TORCH_LIBRARY_IMPL(causal_attn_cpp, CPU, m) {
  m.impl("forward", &causal_attn_cpu::attention_forward);
  m.impl("backward", &causal_attn_cpu::attention_backward);
}
