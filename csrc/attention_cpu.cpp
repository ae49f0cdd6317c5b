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
// Backward (issue 33): the work of one (batch, kv head) is cut into units, one per (query head of the GQA group,
// query block); a unit computes delta, then per key tile P, dS, dV += P^T dO, dK += scale dS^T Q and its own dQ
// rows += scale dS K (five tile GEMMs, one exp pass). The units are dealt out to a number of query groups that
// depends on the shape only (plan_backward: few (batch, kv head) pairs, more groups); one task per (batch, kv
// head, query group) runs its units in a fixed order into the group's own dK, dV, and a second pass adds the
// groups' dK, dV in group order. So the result is bitwise the same at any thread count (no atomics, no
// per-thread sums), and the one-thread work is that of a single pass over the units plus that final sum.
//
// Inputs other than fp32 with unit last stride are converted to fp32 once; accumulation is fp32.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>
#include <torch/version.h>

#include <algorithm>
#include <ctime>
#include <cstdlib>
#include <memory>
#include <mutex>
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

// Row kernels work on whole 32-column groups (one packed word each); score rows have that room.
int64_t round_up32(int64_t n) { return (n + 31) & ~int64_t{31}; }

// 64-byte aligned fp32 scratch. MKL may choose its code path by the operands' alignment; a result that
// depended on where malloc put a thread's buffer would break the bitwise thread-count invariance.
class Scratch {
 public:
  explicit Scratch(int64_t n)
      : p_(static_cast<float*>(std::aligned_alloc(64, static_cast<size_t>((n * 4 + 63) & ~int64_t{63}))), &std::free) {
    TORCH_CHECK(p_ != nullptr, "out of memory allocating ", n, " floats of attention scratch");
  }
  float* data() const { return p_.get(); }

 private:
  std::unique_ptr<float, decltype(&std::free)> p_;
};

// CPU time of the calling thread: unlike wall time it leaves out the moments another process had the core.
double thread_seconds() {
  timespec ts{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) + 1e-9 * static_cast<double>(ts.tv_nsec);
}

// Runs task(t) for t in [0, n) with at::parallel_for (contiguous chunks, one per thread); state() makes the
// per-chunk scratch. With `seconds`, task t's thread CPU time is stored in seconds[t] (benchmarks/sim_threads.py).
template <class State, class Task>
void run_tasks(int64_t n, double* seconds, State state, Task task) {
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    SingleThreadedBlas one_thread;
    auto buf = state();
    for (int64_t t = begin; t < end; ++t) {
      if (seconds == nullptr) {
        task(t, buf);
        continue;
      }
      const double t0 = thread_seconds();
      task(t, buf);
      seconds[t] = thread_seconds() - t0;
    }
  });
}

// S (bq x bk, row stride ld >= round_up32(bk)) = scale Q[i0:i1] K[j0:j0+bk]^T with the keys a row may not
// see (past the diagonal, before its segment, padded) and the tail up to whole 32-column words set to -inf;
// rowmax[r] gets row r's max.
void masked_scores(const Problem& P, const Rows& Q, const Rows& K, int64_t b, int64_t i0, int64_t i1, int64_t j0,
                   int64_t bk, float* S, int64_t ld, float* rowmax) {
  const uint8_t* kpm = P.kpm ? P.kpm + b * P.T + j0 : nullptr;
  const int32_t* seg = P.seg ? P.seg + b * P.T : nullptr;
  gemm_rm(false, true, i1 - i0, bk, P.D, P.scale, Q.row(i0), Q.ld, K.row(j0), K.ld, 0.0f, S, ld);
  for (int64_t r = 0; r < i1 - i0; ++r) {
    const int64_t n = std::clamp<int64_t>(i0 + r - j0 + 1, 0, bk);
    const int64_t lo = seg ? std::clamp<int64_t>(seg[i0 + r] - j0, 0, n) : 0;
    rowmax[r] = mask_and_max(S + r * ld, lo, n, round_up32(bk), kpm);
  }
}

// P = exp(S - LSE) in place on a tile from masked_scores (rows without keys have LSE = +inf: P = 0).
void probabilities(float* S, int64_t ld, int64_t bq, int64_t bk, const float* lse) {
  for (int64_t r = 0; r < bq; ++r) exp_shift_sum(S + r * ld, round_up32(bk), lse[r], nullptr, nullptr);
}

// ------------------------------------------------------------------------------------------- forward
struct ForwardBuffers {
  Scratch S, m, l, macc, rowmax;
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
    masked_scores(P, Q, K, b, i0 + r0, i0 + r1, j0, bk, S + r0 * BK, BK, buf.rowmax.data() + r0);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t i = i0 + r;
      float* s = S + r * BK;
      const float m_new = std::max(m[r], buf.rowmax.data()[r]);
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
  run_tasks(P.B * nqb, nullptr, [] { return std::pair<Scratch, Scratch>(BQ * BK, BQ); }, [&](int64_t t, auto& buf) {
    float *S = buf.first.data(), *rowmax = buf.second.data();
    const int64_t b = t / nqb, i0 = (t % nqb) * BQ, i1 = std::min(P.T, i0 + BQ);
    for (int64_t h = 0; h < P.Hq; ++h) {
      const float* L = lse + (b * P.Hq + h) * P.T + i0;
      for (int64_t j0 = first_key(P, b, i0); j0 < i1; j0 += BK) {
        const int64_t bk = std::min(BK, i1 - j0);
        const auto [r0, r1] = tile_rows(P, b, i0, i1, j0, bk);
        if (r0 >= r1) continue;
        masked_scores(P, head_rows(q, b, h), head_rows(k, b, h / P.G), b, i0 + r0, i0 + r1, j0, bk, S + r0 * BK, BK,
                      rowmax + r0);
        probabilities(S + r0 * BK, BK, r1 - r0, bk, L + r0);
        for (int64_t r = r0; r < r1; ++r) {
          float* s = S + r * BK;
          const int64_t n = std::clamp<int64_t>(i0 + r - j0 + 1, 0, bk);
          scale_row(s, n, weight);
          float* dst = map + (b * P.T + i0 + r) * P.T + j0;
          for (int64_t c = 0; c < n; ++c) dst[c] += s[c];
        }
      }
    }
  });
}

int64_t forward_tasks(const Problem& P) { return P.B * P.Hq * ((P.T + BQ - 1) / BQ); }

// out, lse, mass (allocated by the caller); with `seconds` (forward_tasks(P) doubles) each task's time.
void forward_pass(const Problem& P, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, float* out_p,
                  float* lse_p, float* mass_p, double* seconds) {
  const int64_t nqb = (P.T + BQ - 1) / BQ;
  run_tasks(forward_tasks(P), seconds, [] { return ForwardBuffers(); }, [&](int64_t t, ForwardBuffers& buf) {
    const int64_t bh = t / nqb, b = bh / P.Hq, h = bh % P.Hq;
    const int64_t i0 = balanced_block(t % nqb, nqb) * BQ, i1 = std::min(P.T, i0 + BQ);
    const int64_t row0 = bh * P.T + i0;
    forward_task(P, head_rows(q, b, h), head_rows(k, b, h / P.G), head_rows(v, b, h / P.G), out_p + row0 * P.D,
                 lse_p + row0, mass_p ? mass_p + row0 : nullptr, b, i0, i1, buf);
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
  forward_pass(P, q, k, v, out.data_ptr<float>(), lse.data_ptr<float>(), P.packed ? mass.data_ptr<float>() : nullptr,
               nullptr);
  if (attn_map.has_value()) {
    at::Tensor map = *attn_map;
    TORCH_CHECK(map.scalar_type() == at::kFloat && map.is_contiguous() && map.numel() == P.B * P.T * P.T,
                "attn_map must be a contiguous float32 (B, T, T) tensor");
    accumulate_map(P, q, k, lse.data_ptr<float>(), map, static_cast<float>(attn_map_weight));
  }
  if (q_in.scalar_type() != at::kFloat) out = out.to(q_in.scalar_type());
  return {out, lse, mass};
}

// ------------------------------------------------------------------------------------------ backward
// Backward tasks the plan aims for: a batch-1 sequence with 3 kv heads should still keep 32 cores busy.
constexpr int64_t kBackwardTasks = 32;
// Each query group past the first writes a partial dK, dV (2 T D floats per (batch, kv head)) that the final sum
// reads back: memory traffic ~ T D against the group's ~ G T^2 D / groups flops, so an extra group costs ~ 1 / (G T)
// of the one-thread time (measured for SmolLM2, 3 query heads per kv head, at one thread: 0.4-0.7 % per extra group
// at T 2048, 1-1.5 % at T 1024). At most one extra group per this many query rows of the GQA group (G T) keeps the
// total near 5 %.
constexpr int64_t kRowsPerExtraGroup = 1024;

// The backward's decomposition, a function of the shape only (never of the thread count). The work of one
// (batch, kv head) is cut into units, one per (query head of the GQA group, BQ-row query block); the units are
// dealt out to `groups` query groups, and each (batch, kv head, query group) is one task.
struct BackwardPlan {
  int64_t query_blocks;  // per head
  int64_t units;         // per (batch, kv head): G * query_blocks
  int64_t groups;        // query groups per (batch, kv head)
  int64_t tasks;         // B * Hkv * groups
  int64_t sum_tasks;     // tasks of the pass that adds the partial dK, dV (B * Hkv * query_blocks; 0 with one group)
};

BackwardPlan plan_backward(int64_t B, int64_t Hq, int64_t Hkv, int64_t T) {
  BackwardPlan p{};
  p.query_blocks = (T + BQ - 1) / BQ;
  p.units = Hq / Hkv * p.query_blocks;
  // Rounded down: a task count just above a thread count (33 on 32 threads) would idle most threads for a
  // second round of tasks. At least two units per group, so that the long-short dealing below balances them.
  const int64_t G = Hq / Hkv;
  p.groups = std::max<int64_t>(1, std::min({kBackwardTasks / (B * Hkv), 1 + G * T / kRowsPerExtraGroup, p.units / 2}));
  // An even number of tasks, so that two threads (a laptop, a small VM) get the same share.
  if (p.groups > 1 && (B * Hkv * p.groups) % 2 == 1) --p.groups;
  p.tasks = B * Hkv * p.groups;
  p.sum_tasks = p.groups > 1 ? B * Hkv * p.query_blocks : 0;
  return p;
}

// Query group of unit s, the units numbered from the most causal work to the least (query blocks from the last,
// the group's heads inner): dealt out boustrophedon (0, 1, .., g-1, g-1, .., 0, 0, 1, ..), so that every group
// gets about the same work.
int64_t unit_group(int64_t s, int64_t groups) {
  const int64_t pos = s % groups;
  return (s / groups) % 2 == 0 ? pos : groups - 1 - pos;
}

// One (batch, query head) of the backward's inputs.
struct HeadGrad {
  Rows Q, K, V, dO, O;
  const float *lse, *mass, *gmass;  // (T,) each; mass and gmass nullptr without the mass term
  float* delta;                     // (T,) scratch
};

// P and dS of query rows [a0, a1) against keys [j0, j0 + bk) into S and dS (row stride ld):
// P = exp(S - LSE), dS = P (dO V^T + g * A - delta).
void probs_and_grad(const Problem& P, const HeadGrad& H, int64_t b, int64_t a0, int64_t a1, int64_t j0, int64_t bk,
                    float* S, float* dS, int64_t ld, float* rowmax) {
  const int64_t n = a1 - a0;
  const int32_t* adj = (P.packed && H.gmass) ? P.packed + b * P.T * P.W : nullptr;
  masked_scores(P, H.Q, H.K, b, a0, a1, j0, bk, S, ld, rowmax);
  probabilities(S, ld, n, bk, H.lse + a0);
  gemm_rm(false, true, n, bk, P.D, 1.0f, H.dO.row(a0), H.dO.ld, H.V.row(j0), H.V.ld, 0.0f, dS, ld);
  for (int64_t r = 0; r < n; ++r) {
    const int64_t i = a0 + r;
    softmax_grad_row(S + r * ld, dS + r * ld, round_up32(bk), H.delta[i], adj ? H.gmass[i] : 0.0f,
                     adj ? adj + i * P.W + j0 / 32 : nullptr);
  }
}

struct GradBuffers {
  Scratch S, dS, rowmax;
  GradBuffers() : S(BQ * BK), dS(BQ * BK), rowmax(BQ) {}
};

// One unit: the backward of query rows [i0, i1) of one query head. delta, then per key tile P, dS and the dQ
// rows (which the unit owns: zeroed here), adding into dK, dV (T x D, the kv head's rows of the task's partial).
// dK, dV rows below `zeroed` hold sums; the rows a tile reaches beyond it are zeroed just before the tile's
// GEMMs add into them, while they are in cache (a memset of the whole partial up front costs a pass over memory).
void backward_unit(const Problem& P, const HeadGrad& H, int64_t b, int64_t i0, int64_t i1, float* dQ, float* dK,
                   float* dV, int64_t& zeroed, GradBuffers& buf) {
  const int64_t D = P.D;
  for (int64_t i = i0; i < i1; ++i) {
    H.delta[i] = dot_row(H.dO.row(i), H.O.row(i), D) + (H.gmass ? H.gmass[i] * H.mass[i] : 0.0f);
  }
  std::fill(dQ, dQ + (i1 - i0) * D, 0.0f);
  for (int64_t j0 = first_key(P, b, i0); j0 < i1; j0 += BK) {
    const int64_t bk = std::min(BK, i1 - j0);
    const auto [r0, r1] = tile_rows(P, b, i0, i1, j0, bk);  // the other rows have P = 0 on this tile
    if (r0 >= r1) continue;
    const int64_t n = r1 - r0, a0 = i0 + r0;
    float *S = buf.S.data() + r0 * BK, *dS = buf.dS.data() + r0 * BK;
    probs_and_grad(P, H, b, a0, i0 + r1, j0, bk, S, dS, BK, buf.rowmax.data() + r0);
    if (j0 + bk > zeroed) {
      std::fill(dK + zeroed * D, dK + (j0 + bk) * D, 0.0f);
      std::fill(dV + zeroed * D, dV + (j0 + bk) * D, 0.0f);
      zeroed = j0 + bk;
    }
    gemm_rm(true, false, bk, D, n, 1.0f, S, BK, H.dO.row(a0), H.dO.ld, 1.0f, dV + j0 * D, D);
    gemm_rm(false, false, n, D, bk, P.scale, dS, BK, H.K.row(j0), H.K.ld, 1.0f, dQ + r0 * D, D);
    gemm_rm(true, false, bk, D, n, P.scale, dS, BK, H.Q.row(a0), H.Q.ld, 1.0f, dK + j0 * D, D);
  }
}

// Memory for the partial dK, dV, kept between calls. A fresh buffer of this size (96 MB for 8 heads, D 128,
// T 4096) is mmap'ed by glibc on every call and pays a page fault per 4 KiB on first touch: 24k faults and ~65 ms
// of CPU time per call (10 % of that backward) on the 2-core development machine. Holds at most one buffer (the
// largest returned); a caller that finds it taken or too small allocates its own. 64-byte aligned (at::empty), so
// a slice's alignment follows from the shape.
class Workspace {
 public:
  static Workspace& get() {
    static Workspace w;
    return w;
  }
  at::Tensor take(int64_t n) {
    if (n == 0) return {};
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (free_.defined() && free_.numel() >= n) return std::exchange(free_, at::Tensor());
    }
    return at::empty({n}, at::TensorOptions().dtype(at::kFloat));
  }
  void give(at::Tensor t) {
    std::lock_guard<std::mutex> lock(mu_);
    if (t.defined() && (!free_.defined() || t.numel() > free_.numel())) free_ = std::move(t);
  }

 private:
  std::mutex mu_;
  at::Tensor free_;
};

// Per-task seconds of the backward's passes (benchmarks/sim_threads.py); nullptr in training.
struct BackwardTimes {
  double *units = nullptr, *sum = nullptr;
};

// Pass 1, one task per (batch, kv head, query group): the group's units in a fixed order, into the group's own
// dK, dV (group 0: the outputs; group r > 0: partial r - 1). Pass 2 (more than one group), one task per
// (batch, kv head, BQ rows): dK = ((dK_0 + dK_1) + dK_2) + ..., the same order whatever ran where.
void backward_passes(const Problem& P, const BackwardPlan& plan, const at::Tensor& q, const at::Tensor& k,
                     const at::Tensor& v, const at::Tensor& o, const at::Tensor& dout, const float* lse,
                     const float* mass, const float* gmass, float* dq, float* dk, float* dv, BackwardTimes times) {
  std::vector<float> delta(P.B * P.Hq * P.T);
  std::vector<HeadGrad> heads;
  for (int64_t bh = 0; bh < P.B * P.Hq; ++bh) {
    const int64_t b = bh / P.Hq, h = bh % P.Hq;
    heads.push_back({head_rows(q, b, h), head_rows(k, b, h / P.G), head_rows(v, b, h / P.G), head_rows(dout, b, h),
                     head_rows(o, b, h), lse + bh * P.T, gmass ? mass + bh * P.T : nullptr,
                     gmass ? gmass + bh * P.T : nullptr, delta.data() + bh * P.T});
  }
  const int64_t groups = plan.groups, nqb = plan.query_blocks, TD = P.T * P.D, pairs = P.B * P.Hkv;
  // dK and dV partials of groups 1 ..
  at::Tensor partial = Workspace::get().take(2 * (groups - 1) * pairs * TD);
  struct GiveBack {
    at::Tensor& t;
    ~GiveBack() { Workspace::get().give(std::move(t)); }
  } give_back{partial};
  auto grads = [&](int64_t r, int64_t bhk) -> std::pair<float*, float*> {
    if (r == 0) return {dk + bhk * TD, dv + bhk * TD};
    float* base = partial.data_ptr<float>() + 2 * ((r - 1) * pairs + bhk) * TD;
    return {base, base + TD};
  };
  run_tasks(plan.tasks, times.units, [] { return GradBuffers(); }, [&](int64_t t, GradBuffers& buf) {
    const int64_t bhk = t / groups, r = t % groups, b = bhk / P.Hkv, hk = bhk % P.Hkv;
    const auto [dK, dV] = grads(r, bhk);
    int64_t zeroed = 0;
    for (int64_t s = 0; s < plan.units; ++s) {
      if (unit_group(s, groups) != r) continue;
      const int64_t bh = b * P.Hq + hk * P.G + s % P.G, i0 = (nqb - 1 - s / P.G) * BQ, i1 = std::min(P.T, i0 + BQ);
      backward_unit(P, heads[bh], b, i0, i1, dq + (bh * P.T + i0) * P.D, dK, dV, zeroed, buf);
    }
    std::fill(dK + zeroed * P.D, dK + TD, 0.0f);  // keys no query row of the group sees
    std::fill(dV + zeroed * P.D, dV + TD, 0.0f);
  });
  if (groups == 1) return;
  run_tasks(plan.sum_tasks, times.sum, [] { return 0; }, [&](int64_t t, int) {
    const int64_t bhk = t / nqb, off = (t % nqb) * BQ * P.D, n = std::min(BQ * P.D, TD - off);
    for (int64_t r = 1; r < groups; ++r) {
      const auto [pk, pv] = grads(r, bhk);
      add_row(dk + bhk * TD + off, pk + off, n);
      add_row(dv + bhk * TD + off, pv + off, n);
    }
  });
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
  at::Tensor dq = at::empty({P.B, P.Hq, P.T, P.D}, f32);  // every row is written by one task
  at::Tensor dk = at::empty({P.B, P.Hkv, P.T, P.D}, f32);
  at::Tensor dv = at::empty({P.B, P.Hkv, P.T, P.D}, f32);
  backward_passes(P, plan_backward(P.B, P.Hq, P.Hkv, P.T), q, k, v, o, dout, lse.data_ptr<float>(),
                  use_mass ? mass.data_ptr<float>() : nullptr, use_mass ? gmass.data_ptr<float>() : nullptr,
                  dq.data_ptr<float>(), dk.data_ptr<float>(), dv.data_ptr<float>(), {});
  auto cast = [](const at::Tensor& x, const at::Tensor& like) {
    return like.scalar_type() == at::kFloat ? x : x.to(like.scalar_type());
  };
  return {cast(dq, q_in), cast(dk, k_in), cast(dv, v_in)};
}

// The query groups per (batch, kv head) of a shape's backward and the task counts of the kernel's parallel
// passes: forward, backward, and (more than one group) the sum of the partial dK, dV.
std::tuple<int64_t, std::vector<int64_t>> plan_tasks(int64_t B, int64_t Hq, int64_t Hkv, int64_t T) {
  TORCH_CHECK(B > 0 && Hkv > 0 && Hq % Hkv == 0 && T > 0, "plan needs B, T > 0 and Hq a multiple of Hkv > 0");
  const BackwardPlan p = plan_backward(B, Hq, Hkv, T);
  std::vector<int64_t> tasks{B * Hq * p.query_blocks, p.tasks};
  if (p.sum_tasks > 0) tasks.push_back(p.sum_tasks);
  return {p.groups, tasks};
}

// Forward then backward, serially timed per task, in the order at::parallel_for hands the tasks out: forward
// seconds and one float64 tensor per backward pass, as plan_tasks counts them. For benchmarks/sim_threads.py
// (run it at 1 thread). `query_groups` > 0 replaces the plan's number of query groups (1: one task per (batch,
// kv head), the backward before issue 33), so the simulation can compare; the kernel itself never does.
std::tuple<at::Tensor, std::vector<at::Tensor>> task_seconds(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& dout_in,
    const std::optional<at::Tensor>& dmass_in, const std::optional<at::Tensor>& packed,
    const std::optional<at::Tensor>& kpm, const std::optional<at::Tensor>& seg_start, double scale,
    int64_t query_groups) {
  const at::Tensor q = as_f32_rows(q_in), k = as_f32_rows(k_in), v = as_f32_rows(v_in), dout = as_f32_rows(dout_in);
  const Problem P = make_problem(q, k, packed, kpm, seg_start, scale);
  TORCH_CHECK(v.sizes() == k.sizes() && dout.sizes() == q.sizes(), "task_seconds: v must have k's shape ",
              k.sizes(), " and dout q's shape ", q.sizes(), "; got ", v.sizes(), " and ", dout.sizes());
  TORCH_CHECK(!dmass_in.has_value() || dmass_in->sizes() == at::IntArrayRef({P.B, P.Hq, P.T}),
              "task_seconds: dmass must have shape (B, Hq, T) = (", P.B, ", ", P.Hq, ", ", P.T, ")");
  TORCH_CHECK(query_groups >= 0, "task_seconds: query_groups must be >= 0 (0: the plan's), got ", query_groups);
  BackwardPlan plan = plan_backward(P.B, P.Hq, P.Hkv, P.T);
  if (query_groups > 0) {
    plan.groups = query_groups;
    plan.tasks = P.B * P.Hkv * query_groups;
    plan.sum_tasks = query_groups > 1 ? P.B * P.Hkv * plan.query_blocks : 0;
  }
  auto f32 = q.options().dtype(at::kFloat), f64 = q.options().dtype(at::kDouble);
  at::Tensor out = at::empty({P.B, P.Hq, P.T, P.D}, f32), lse = at::empty({P.B, P.Hq, P.T}, f32);
  at::Tensor mass = at::empty({P.B, P.Hq, P.T}, f32);
  at::Tensor gmass = (P.packed && dmass_in.has_value()) ? dmass_in->to(at::kFloat).contiguous() : at::Tensor();
  at::Tensor fwd = at::empty({forward_tasks(P)}, f64);
  std::vector<at::Tensor> passes{at::empty({plan.tasks}, f64)};
  if (plan.sum_tasks > 0) passes.push_back(at::empty({plan.sum_tasks}, f64));
  const BackwardTimes times{passes[0].data_ptr<double>(), plan.sum_tasks > 0 ? passes[1].data_ptr<double>() : nullptr};
  forward_pass(P, q, k, v, out.data_ptr<float>(), lse.data_ptr<float>(), mass.data_ptr<float>(),
               fwd.data_ptr<double>());
  at::Tensor dq = at::empty_like(out), dk = at::empty({P.B, P.Hkv, P.T, P.D}, f32), dv = at::empty_like(dk);
  backward_passes(P, plan, q, k, v, out, dout, lse.data_ptr<float>(), mass.data_ptr<float>(),
                  gmass.defined() ? gmass.data_ptr<float>() : nullptr, dq.data_ptr<float>(), dk.data_ptr<float>(),
                  dv.data_ptr<float>(), times);
  return {fwd, passes};
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
  m.def("plan(int batch, int q_heads, int kv_heads, int seq_len) -> (int, int[])", &causal_attn_cpu::plan_tasks);
  m.def("task_seconds(Tensor q, Tensor k, Tensor v, Tensor dout, Tensor? dmass, Tensor? packed, "
        "Tensor? key_padding_mask, Tensor? seg_start, float scale, int query_groups=0) -> (Tensor, Tensor[])");
}

TORCH_LIBRARY_IMPL(causal_attn_cpp, CPU, m) {
  m.impl("forward", &causal_attn_cpu::attention_forward);
  m.impl("backward", &causal_attn_cpu::attention_backward);
  m.impl("task_seconds", &causal_attn_cpu::task_seconds);
}
